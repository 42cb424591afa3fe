import Glibc
import Synchronization
import Testing
@testable import Plexus

/// The message queue on every backend that runs here, with real threads.
extension PlexusTests {
@Suite struct MessageQueueTests {

    /// 4 producers x 250k messages, capacity 64, a consumer that pauses every 1000
    /// messages: each message arrives exactly once and in its producer's order, and the
    /// queue never holds more than its capacity. Two producers are threads using
    /// trySend; two are tasks using send (backpressure).
    @Test(arguments: Backends.kinds, HandOffConsumer.allCases)
    func fourProducersSlowConsumerEveryMessageOnceInOrder(_ backend: BackendKind, _ kind: HandOffConsumer) async throws {
        let rssBefore = QueueTestSupport.residentKiB()
        do {
            let loop = try Backends.loopThread(backend)
            let producers = 4, perProducer = 250_000, total = producers * perProducer
            let queue = MessageQueue<UInt64>(capacity: 64, loop: loop)
            let check = OrderCheck(producers: producers)
            let done = Semaphore()
            // On the loop thread only.
            let consume: @Sendable (UInt64) -> Void = { message in
                check.take(message)
                if check.received % 1000 == 0 { QueueTestSupport.busyPause(microseconds: 100) }
                if check.received == total { done.signal() }
            }
            switch kind {
            case .callback:
                loop.execute { queue.onMessage { consume($0) } }
            case .async:
                Task(executorPreference: loop) {
                    for await message in queue {
                        precondition(loop.inLoop)
                        consume(message)
                        if check.received == total { break }
                    }
                }
            }
            let threads = (0..<2).map { p in
                LoopTestSupport.spawn {
                    for i in 0..<perProducer {
                        if QueueTestSupport.sendSpinning(queue, UInt64(p) << 32 | UInt64(i)) != nil {
                            fatalError("closed while producing")
                        }
                    }
                }
            }
            let senders = (2..<4).map { p in
                Task.detached {
                    for i in 0..<perProducer { try await queue.send(UInt64(p) << 32 | UInt64(i)) }
                }
            }
            for s in senders { try await s.value }
            for t in threads { pthread_join(t, nil) }
            done.wait()
            // The consumer is attached (async: detached once it broke out): nothing left.
            let drainedSignal = Semaphore()
            loop.execute { drainedSignal.signal() }
            drainedSignal.wait()
            let left = queue.close()
            #expect(left.isEmpty)
            loop.shutdownAndWait()
            #expect(check.received == total)
            #expect(check.duplicatesOrGaps == 0, "out of order, duplicated or missing")
            #expect((0..<producers).allSatisfy { check.next[$0] == perProducer })
            #expect(queue.highWaterMark <= 64, "the queue held \(queue.highWaterMark) messages")
            let rssAfter = QueueTestSupport.residentKiB()
            print("MessageQueue \(backend.rawValue) \(kind.rawValue): \(total) messages in \(queue.batchCount) batches "
                  + "(\(total / max(queue.batchCount, 1)) per batch), high-water \(queue.highWaterMark)/64, "
                  + "RSS \(rssBefore) KiB before, \(rssAfter) KiB after")
        }
    }

    @Test(arguments: Backends.kinds)
    func trySendOnFullAndOnClosedQueueHandsTheMessageBack(_ backend: BackendKind) async throws {
        do {
            let loop = try Backends.loopThread(backend)
            let queue = MessageQueue<String>(capacity: 2, loop: loop)  // no consumer yet
            #expect(queue.trySend("a").isSent)
            #expect(queue.trySend("b").isSent)
            guard case .full(let back) = queue.trySend("c") else { Issue.record("not full"); return }
            #expect(back == "c")
            #expect(queue.count == 2)
            // No consumer attached: close hands back what is queued, in order.
            #expect(queue.close() == ["a", "b"])
            guard case .closed(let back2) = queue.trySend("d") else { Issue.record("not closed"); return }
            #expect(back2 == "d")
            let error = await queue.sendReturningError("e")
            #expect(error?.reason == .closed)
            #expect(error?.message == "e")
            #expect(queue.close().isEmpty, "a second close finds nothing")
            loop.shutdownAndWait()
        }
    }

    @Test(arguments: Backends.kinds)
    func suspendedSenderIsResumedByCloseWithItsMessage(_ backend: BackendKind) async throws {
        do {
            let loop = try Backends.loopThread(backend)
            let queue = MessageQueue<Int>(capacity: 1, loop: loop)
            #expect(queue.trySend(1).isSent)
            let sender = Task { () -> MessageQueue<Int>.SendError? in
                await queue.sendReturningError(2)
            }
            try await QueueTestSupport.waitUntil { queue.waitingSenders == 1 }
            #expect(queue.close() == [1], "no consumer: the queued message comes back to close")
            let error = await sender.value
            #expect(error?.reason == .closed)
            #expect(error?.message == 2)
            loop.shutdownAndWait()
        }
    }

    @Test(arguments: Backends.kinds)
    func cancelledSenderGetsItsMessageBack(_ backend: BackendKind) async throws {
        do {
            let loop = try Backends.loopThread(backend)
            let queue = MessageQueue<Int>(capacity: 1, loop: loop)
            #expect(queue.trySend(1).isSent)
            let sender = Task { () -> MessageQueue<Int>.SendError? in
                await queue.sendReturningError(2)
            }
            try await QueueTestSupport.waitUntil { queue.waitingSenders == 1 }
            sender.cancel()
            let error = await sender.value
            #expect(error?.reason == .cancelled)
            #expect(error?.message == 2)
            #expect(queue.waitingSenders == 0)
            #expect(queue.close() == [1])
            loop.shutdownAndWait()
        }
    }

    /// Senders that wait are let in in the order they started waiting.
    @Test(arguments: Backends.kinds)
    func waitingSendersAreAdmittedInOrder(_ backend: BackendKind) async throws {
        do {
            let loop = try Backends.loopThread(backend)
            let queue = MessageQueue<Int>(capacity: 1, loop: loop)
            #expect(queue.trySend(0).isSent)
            var senders: [Task<Void, any Error>] = []
            for i in 1...5 {
                senders.append(Task { try await queue.send(i) })
                try await QueueTestSupport.waitUntil { queue.waitingSenders == i }
            }
            let received = Mutex<[Int]>([])
            let ended = Semaphore()
            loop.execute {
                queue.onMessage({ m in received.withLock { $0.append(m) } }, onClosed: { ended.signal() })
            }
            for s in senders { try await s.value }
            #expect(queue.close().isEmpty, "a consumer is attached: it gets the rest")
            ended.wait()
            #expect(received.withLock { $0 } == [0, 1, 2, 3, 4, 5])
            loop.shutdownAndWait()
        }
    }

    /// close() returns what a consumer that stopped (or whose loop shut down) left behind.
    @Test(arguments: Backends.kinds)
    func closeWithTheConsumerGoneReturnsTheUndeliveredMessages(_ backend: BackendKind) async throws {
        do {
            let loop = try Backends.loopThread(backend)
            let queue = MessageQueue<Int>(capacity: 16, loop: loop)
            let received = Mutex<[Int]>([])
            let attached = Semaphore()
            loop.execute {
                queue.onMessage { m in received.withLock { $0.append(m) } }
                attached.signal()
            }
            attached.wait()
            #expect(queue.trySend(1).isSent)
            try await QueueTestSupport.waitUntil { received.withLock { $0 } == [1] }
            let stopped = Semaphore()
            loop.execute { queue.stopConsuming(); stopped.signal() }
            stopped.wait()
            for i in 2...4 { #expect(queue.trySend(i).isSent) }
            #expect(queue.close() == [2, 3, 4])
            #expect(received.withLock { $0 } == [1])

            // An async consumer that broke out of its loop has gone too.
            let queue2 = MessageQueue<Int>(capacity: 16, loop: loop)
            for i in 1...3 { #expect(queue2.trySend(i).isSent) }
            let first = await Task(executorPreference: loop) { () -> Int? in
                for await m in queue2 { return m }
                return nil
            }.value
            #expect(first == 1)
            #expect(queue2.close() == [2, 3])

            // The loop shut down: the queue is closed, and a queue made afterwards too.
            let queue3 = MessageQueue<Int>(capacity: 4, loop: loop)
            loop.shutdownAndWait()
            #expect(queue3.isClosed)
            guard case .closed(5) = queue3.trySend(5) else { Issue.record("open after shutdown"); return }
            let queue4 = MessageQueue<Int>(capacity: 4, loop: loop)
            #expect(queue4.isClosed)
        }
    }

    /// Loop shutdown with a consumer: everything queued is delivered (a waiting sender is
    /// let in when the consumer makes room), then the consumer learns the end.
    @Test(arguments: Backends.kinds, HandOffConsumer.allCases)
    func loopShutdownDeliversWhatIsQueued(_ backend: BackendKind, _ kind: HandOffConsumer) async throws {
        do {
            let loop = try Backends.loopThread(backend)
            let queue = MessageQueue<Int>(capacity: 3, loop: loop)
            let received = Box<[Int]>([])
            let ended = Box(false)
            let ready = Semaphore()
            switch kind {
            case .callback:
                loop.execute {
                    queue.onMessage({ received.value.append($0) }, onClosed: { ended.value = true })
                    ready.signal()
                }
            case .async:
                Task(executorPreference: loop) {
                    let iterator = queue.makeAsyncIterator()
                    ready.signal()
                    var messages = iterator
                    while let m = await messages.next() { received.value.append(m) }
                    ended.value = true
                }
            }
            ready.wait()
            // Hold the loop thread in a job so messages queue up while the consumer cannot run.
            let hold = Semaphore(), held = Semaphore()
            loop.execute { held.signal(); hold.wait() }
            held.wait()
            for i in 1...3 { #expect(queue.trySend(i).isSent) }
            let sender = Task.detached { await queue.sendReturningError(4) }
            try await QueueTestSupport.waitUntil { queue.waitingSenders == 1 }
            loop.shutdown()
            hold.signal()
            loop.shutdownAndWait()
            #expect(received.value == [1, 2, 3, 4])
            #expect(ended.value)
            #expect(await sender.value == nil)
            #expect(queue.isClosed)
            #expect(queue.close().isEmpty)
        }
    }

    /// Loop shutdown without a consumer: a waiting sender gets its message back, and
    /// close() returns what was queued.
    @Test(arguments: Backends.kinds)
    func loopShutdownWithoutConsumerHandsEverythingBack(_ backend: BackendKind) async throws {
        do {
            let loop = try Backends.loopThread(backend)
            let queue = MessageQueue<Int>(capacity: 3, loop: loop)
            for i in 1...3 { #expect(queue.trySend(i).isSent) }
            let sender = Task.detached { () -> MessageQueue<Int>.SendError? in
                await queue.sendReturningError(4)
            }
            try await QueueTestSupport.waitUntil { queue.waitingSenders == 1 }
            loop.shutdownAndWait()
            let error = await sender.value
            #expect(error?.reason == .closed)
            #expect(error?.message == 4)
            #expect(queue.isClosed)
            #expect(queue.close() == [1, 2, 3])
        }
    }

    /// An idle consumer sleeps in the loop's wait: its thread uses (almost) no CPU over a second.
    @Test(arguments: Backends.kinds)
    func idleConsumerUsesNoCPU(_ backend: BackendKind) async throws {
        do {
            let loop = try Backends.loopThread(backend)
            let callbackQueue = MessageQueue<Int>(capacity: 8, loop: loop)
            let asyncQueue = MessageQueue<Int>(capacity: 8, loop: loop)
            let received = Atomic<Int>(0)
            let threadBox = Mutex<pthread_t?>(nil)
            loop.execute {
                threadBox.withLock { $0 = pthread_self() }
                callbackQueue.onMessage { _ in received.add(1, ordering: .relaxed) }
            }
            let consumer = Task(executorPreference: loop) {
                for await _ in asyncQueue { received.add(1, ordering: .relaxed) }
            }
            try await QueueTestSupport.waitUntil { threadBox.withLock { $0 } != nil }
            // Both consumers work...
            #expect(callbackQueue.trySend(1).isSent)
            #expect(asyncQueue.trySend(1).isSent)
            try await QueueTestSupport.waitUntil { received.load(ordering: .relaxed) == 2 }
            // ...then sit idle for a second.
            let thread = threadBox.withLock { $0 }!
            let before = QueueTestSupport.threadCPUNanoseconds(thread)
            usleep(1_000_000)
            let after = QueueTestSupport.threadCPUNanoseconds(thread)
            let used = after - before
            print("MessageQueue \(backend.rawValue): idle loop thread used \(used / 1000) us of CPU in 1 s")
            #expect(used < 50_000_000, "idle consumer used \(used / 1_000_000) ms of CPU in one second")
            #expect(callbackQueue.close().isEmpty)
            #expect(asyncQueue.close().isEmpty)
            await consumer.value
            loop.shutdownAndWait()
        }
    }

    /// An async consumer sees every message sent before close, then the end.
    @Test(arguments: Backends.kinds)
    func asyncConsumerEndsAfterCloseWithEverything(_ backend: BackendKind) async throws {
        do {
            let loop = try Backends.loopThread(backend)
            let queue = MessageQueue<Int>(capacity: 4, loop: loop)
            let consumer = Task(executorPreference: loop) { () -> [Int] in
                var all: [Int] = []
                for await m in queue { all.append(m) }
                return all
            }
            for i in 0..<1000 { try await queue.send(i) }
            #expect(queue.close().isEmpty)
            #expect(await consumer.value == Array(0..<1000))
            loop.shutdownAndWait()
        }
    }

    /// A cancelled async consumer's next message is nil even while messages are queued,
    /// with its loop running (taken at once or after a wait alike) or gone (then taken
    /// without the loop), and those messages stay in the queue: close hands them back.
    @Test(arguments: Backends.kinds, [false, true])
    func cancelledAsyncConsumerLeavesTheRestQueued(_ backend: BackendKind, loopGone: Bool) async throws {
        let loop = try Backends.loopThread(backend)
        #expect(loop.backendKind == backend)
        let queue = MessageQueue<Int>(capacity: 8, loop: loop)
        for i in 0..<4 { try await queue.send(i) }
        if loopGone { loop.shutdownAndWait() }
        let consume = { () async -> [Int?] in
            var iterator = queue.makeAsyncIterator()
            let first = await iterator.next()
            withUnsafeCurrentTask { $0?.cancel() }
            return [first, await iterator.next()]
        }
        let got = loopGone ? await Task { await consume() }.value
                           : await Task(executorPreference: loop) { await consume() }.value
        #expect(got == [0, nil], "loop gone: \(loopGone)")
        #expect(queue.close() == [1, 2, 3], "loop gone: \(loopGone)")
        if !loopGone { loop.shutdownAndWait() }
    }

    /// An async consumer that takes one message at a time from a producer that waits for
    /// each receipt is signalled only when it waits: a send while it runs leaves no signal
    /// behind. (Each message sent while it ran used to signal the loop, and the stale
    /// signal later resumed it for an empty ring: about one signal per message.)
    @Test(arguments: Backends.kinds)
    func anAsyncConsumerIsSignalledOnlyWhenItWaits(_ backend: BackendKind) async throws {
        let loop = try Backends.loopThread(backend)
        #expect(loop.backendKind == backend)
        let queue = MessageQueue<Int>(capacity: 8, loop: loop)
        let received = Atomic<Int>(0)
        let consumer = Task(executorPreference: loop) { () -> [Int] in
            var all: [Int] = []
            for await m in queue {
                all.append(m)
                received.store(all.count, ordering: .releasing)
            }
            return all
        }
        let count = 2_000
        for i in 0..<count {
            try await queue.send(i)
            while received.load(ordering: .acquiring) <= i { sched_yield() }
        }
        #expect(queue.close().isEmpty)
        #expect(await consumer.value == Array(0..<count))
        let (signals, waits) = await Task(executorPreference: loop) { (queue.wakeUpsSent, queue.batchCount) }.value
        // One signal per wait; the bound allows two more.
        #expect(signals <= waits + 2, "\(signals) signals for \(waits) waits and \(count) messages")
        loop.shutdownAndWait()
    }

    /// An async consumer that took the message which emptied the ring and then left (its
    /// `for await` ended) leaves the wake-up flag set, so later sends signal nobody: a callback
    /// consumer that attaches then still gets every message, because attaching looks at
    /// the ring itself.
    @Test(arguments: Backends.kinds)
    func aConsumerAttachingAfterAnAsyncOneLeftGetsWhatCameMeanwhile(_ backend: BackendKind) async throws {
        let loop = try Backends.loopThread(backend)
        #expect(loop.backendKind == backend)
        let queue = MessageQueue<Int>(capacity: 8, loop: loop)
        #expect(queue.trySend(0).isSent)
        let first = await Task(executorPreference: loop) { () -> Int? in
            for await m in queue { return m }
            return nil
        }.value
        #expect(first == 0)
        let signalsBefore = await Task(executorPreference: loop) { queue.wakeUpsSent }.value
        for i in 1...3 { #expect(queue.trySend(i).isSent) }
        let signalsAfter = await Task(executorPreference: loop) { queue.wakeUpsSent }.value
        #expect(signalsAfter == signalsBefore, "the sends after the async consumer left signalled")
        let got = Mutex<[Int]>([])
        #expect(loop.execute { queue.onMessage { m in got.withLock { $0.append(m) } } })
        try await QueueTestSupport.waitUntil { got.withLock { $0.count } == 3 }
        #expect(got.withLock { $0 } == [1, 2, 3])
        #expect(queue.close().isEmpty)
        loop.shutdownAndWait()
    }

    /// Hand-off throughput and latency per backend and consumer; reported, never asserted.
    /// PLEXUS_BENCH_FULL=1 runs the full sizes.
    @Test(arguments: Backends.kinds)
    func handOffThroughputAndLatency(_ backend: BackendKind) throws {
        let full = getenv("PLEXUS_BENCH_FULL").map { String(cString: $0) == "1" } ?? false
        let perProducer = full ? 1_000_000 : 50_000
        let pings = full ? 100_000 : 5_000
        for wake in MessageQueueWake.allCases {
            for consumer in HandOffConsumer.allCases {
                let t = try MessageQueueBenchmark.measureHandOff(backend: BackendChoice(rawValue: backend.rawValue)!, wake: wake, consumer: consumer,
                                                                 producers: 4, messagesPerProducer: perProducer / 4, capacity: 1024)
                #expect(t.backend.rawValue == backend.rawValue)
                print(t)
                for mode in [HandOffMeasurement.Mode.pingPong, .idleWake] {
                    let p = try MessageQueueBenchmark.measureHandOff(backend: BackendChoice(rawValue: backend.rawValue)!, wake: wake, consumer: consumer,
                                                                     mode: mode, messagesPerProducer: mode == .idleWake ? pings / 5 : pings)
                    print(p)
                }
            }
        }
    }
}
}

extension MessageQueue {
    /// `send`, with the typed error as a value.
    func sendReturningError(_ message: Message) async -> SendError? {
        do throws(SendError) {
            try await send(message)
            return nil
        } catch {
            return error
        }
    }
}

/// Per-producer order check, on the consumer's thread only.
final class OrderCheck: @unchecked Sendable {
    var next: [Int]
    var received = 0
    var duplicatesOrGaps = 0
    init(producers: Int) { next = Array(repeating: 0, count: producers) }
    func take(_ message: UInt64) {
        let p = Int(message >> 32), i = Int(message & 0xFFFF_FFFF)
        if next[p] == i { next[p] = i + 1 } else { duplicatesOrGaps += 1 }
        received += 1
    }
}

enum QueueTestSupport {
    /// `trySend` until the queue takes `message`, yielding while it is full: nil once sent,
    /// or the message a closed queue handed back.
    static func sendSpinning<M: Sendable>(_ queue: MessageQueue<M>, _ message: M) -> M? {
        var message = message
        while true {
            switch queue.trySend(message) {
            case .sent: return nil
            case .full(let back): message = back; sched_yield()
            case .closed(let back): return back
            }
        }
    }

    /// Resident set size from /proc/self/statm, in KiB.
    static func residentKiB() -> Int {
        let fd = open("/proc/self/statm", O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return -1 }
        defer { Glibc.close(fd) }
        var bytes = [UInt8](repeating: 0, count: 256)
        let n = read(fd, &bytes, 256)
        guard n > 0 else { return -1 }
        let fields = String(decoding: bytes[0..<n], as: UTF8.self).split(separator: " ")
        guard fields.count >= 2, let pages = Int(fields[1]) else { return -1 }
        return pages * sysconf(Int32(_SC_PAGESIZE)) / 1024
    }

    /// CPU time the thread has used (pthread_getcpuclockid + clock_gettime).
    static func threadCPUNanoseconds(_ thread: pthread_t) -> UInt64 {
        var clock = clockid_t()
        precondition(pthread_getcpuclockid(thread, &clock) == 0)
        var ts = timespec()
        precondition(clock_gettime(clock, &ts) == 0)
        return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
    }

    static func busyPause(microseconds: UInt64) {
        let end = monotonicNanoseconds() + microseconds * 1000
        while monotonicNanoseconds() < end {}
    }

    /// Polls `condition` (test scaffolding only) for at most 10 s.
    static func waitUntil(_ condition: @Sendable () -> Bool) async throws {
        let deadline = monotonicNanoseconds() + 10_000_000_000
        while !condition() {
            guard monotonicNanoseconds() < deadline else {
                Issue.record("timed out waiting")
                return
            }
            try await Task.sleep(nanoseconds: 1_000_000)
        }
    }
}
