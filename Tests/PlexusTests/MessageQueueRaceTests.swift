import Glibc
import Synchronization
import Testing
@testable import Plexus

/// MessageQueue under races: many producers at capacity 1 and 2, close races,
/// shutdown while senders wait, attach/detach races, cancellation, resource-owning
/// messages, memory over millions of messages. Every test is bounded: a watchdog aborts
/// the process (a hang fails, it never blocks the run).
extension PlexusTests {
@Suite struct MessageQueueRaceTests {

    static let underTSan: Bool = getenv("PLEXUS_SANITIZER").map { String(cString: $0) == "tsan" } ?? false
    /// Scales message counts down under TSan.
    static func n(_ full: Int) -> Int { underTSan ? max(full / 10, 1) : full }

    // MARK: 1. many producers, capacity 1 and 2

    /// 3 threads (trySend), 3 tasks on another loop (send) and 2 detached tasks (send)
    /// against one consumer at capacity 1 and 2: each message exactly once, FIFO per producer.
    @Test(arguments: Backends.kinds, [1, 2])
    func manyProducersAtTinyCapacity(_ backend: BackendKind, _ capacity: Int) async throws {
        for kind in ["callback", "async", "asyncElsewhere"] {
            let dog = Watchdog("manyProducersAtTinyCapacity \(backend) cap \(capacity) \(kind)", seconds: 120)
            defer { dog.finish() }
            let loop = try Backends.loopThread(backend)
            let other = try Backends.loopThread(backend)
            let per = Self.n(4_000)
            let threadProducers = 3, loopTasks = 3, detached = 2
            let producers = threadProducers + loopTasks + detached, total = producers * per
            let queue = MessageQueue<UInt64>(capacity: capacity, loop: loop)
            let check = OrderCheck(producers: producers)
            let done = Countdown(1)
            switch kind {
            case "callback":
                loop.execute { queue.onMessage { m in check.take(m); if check.received == total { done.done() } } }
            case "async":
                Task(executorPreference: loop) {
                    for await m in queue { check.take(m); if check.received == total { done.done(); break } }
                }
            default:  // each next() hops to the loop and back
                Task.detached {
                    for await m in queue { check.take(m); if check.received == total { done.done(); break } }
                }
            }
            let threads = (0..<threadProducers).map { p in
                LoopTestSupport.spawn {
                    for i in 0..<per {
                        if QueueTestSupport.sendSpinning(queue, UInt64(p) << 32 | UInt64(i)) != nil { fatalError("closed while producing") }
                    }
                }
            }
            var tasks: [Task<Void, any Error>] = []
            for p in threadProducers..<(threadProducers + loopTasks) {
                tasks.append(Task(executorPreference: other) {
                    for i in 0..<per { try await queue.send(UInt64(p) << 32 | UInt64(i)) }
                })
            }
            for p in (threadProducers + loopTasks)..<producers {
                tasks.append(Task.detached {
                    for i in 0..<per { try await queue.send(UInt64(p) << 32 | UInt64(i)) }
                })
            }
            for t in tasks { try await t.value }
            for t in threads { pthread_join(t, nil) }
            #expect(await done.wait(seconds: 60), "\(backend) cap \(capacity) \(kind): consumer got \(check.received)/\(total)")
            let drained = Countdown(1)
            loop.execute { drained.done() }
            _ = await drained.wait(seconds: 10)
            #expect(queue.close().isEmpty)
            loop.shutdownAndWait()
            other.shutdownAndWait()
            #expect(check.received == total)
            #expect(check.duplicatesOrGaps == 0, "\(backend) cap \(capacity) \(kind): out of order, duplicated or missing")
            #expect(queue.highWaterMark <= capacity)
        }
    }

    // MARK: 2. close races: from producers, from two threads at once

    /// Producers (threads with trySend, tasks with send) race a close() issued from two
    /// threads at once, with a callback consumer attached or none. Every message is
    /// delivered or handed back (trySend result, SendError, close's return) exactly once.
    @Test(arguments: Backends.kinds, [false, true])
    func closeFromTwoThreadsWhileProducing(_ backend: BackendKind, consumerAttached: Bool) async throws {
        let dog = Watchdog("closeFromTwoThreadsWhileProducing \(backend)", seconds: 120)
        defer { dog.finish() }
        for round in 0..<Self.n(40) {
            let loop = try Backends.loopThread(backend)
            let queue = MessageQueue<UInt64>(capacity: 2, loop: loop)
            let ledger = Ledger(producers: 6, per: 2_000)
            let ended = Countdown(1)
            if consumerAttached {
                // The consumer itself closes too, at a point that moves each round.
                let seen = Box(0)
                let closeAt = 1 + (round * 131) % 6_000
                loop.execute {
                    queue.onMessage({ m in
                        ledger.mark(m, .delivered)
                        seen.value += 1
                        if seen.value == closeAt { for back in queue.close() { ledger.mark(back, .handedBack) } }
                    }, onClosed: { ended.done() })
                }
            }
            let threads = (0..<3).map { p in
                LoopTestSupport.spawn {
                    for i in 0..<2_000 {
                        let id = UInt64(p) << 32 | UInt64(i)
                        ledger.produced(id)
                        if let back = QueueTestSupport.sendSpinning(queue, id) { ledger.mark(back, .handedBack); return }
                    }
                }
            }
            let tasks = (3..<6).map { p in
                Task.detached {
                    for i in 0..<2_000 {
                        let id = UInt64(p) << 32 | UInt64(i)
                        ledger.produced(id)
                        if let error = await queue.sendReturningError(id) {
                            ledger.mark(error.message, .handedBack)
                            return
                        }
                    }
                }
            }
            usleep(UInt32(round % 7) * 300)
            let go = Atomic<Bool>(false)
            let closers = (0..<2).map { _ in
                LoopTestSupport.spawn {
                    while !go.load(ordering: .acquiring) {}
                    for m in queue.close() { ledger.mark(m, .handedBack) }
                }
            }
            go.store(true, ordering: .releasing)
            for t in closers { pthread_join(t, nil) }
            for t in threads { pthread_join(t, nil) }
            for t in tasks { await t.value }
            if consumerAttached {
                #expect(await ended.wait(seconds: 10), "\(backend) round \(round): onClosed never came")
            }
            for m in queue.close() { ledger.mark(m, .handedBack) }  // nothing, normally
            loop.shutdownAndWait()
            let problems = ledger.problems()
            #expect(problems.isEmpty, "\(backend) consumer \(consumerAttached) round \(round): \(problems.prefix(5))")
            if !problems.isEmpty { break }
        }
    }

    // MARK: 3. close from inside the consumer's batch

    /// A batch consumer closes the queue from inside its first batch while senders wait:
    /// the batch is delivered whole, the waiting senders get their messages back (or were
    /// admitted and are delivered), onClosed comes once, and trySend afterwards is refused.
    @Test(arguments: Backends.kinds)
    func closeFromInsideABatch(_ backend: BackendKind) async throws {
        let dog = Watchdog("closeFromInsideABatch \(backend)", seconds: 60)
        defer { dog.finish() }
        let loop = try Backends.loopThread(backend)
        let queue = MessageQueue<Int>(capacity: 4, loop: loop)
        let hold = Semaphore(), held = Semaphore()
        loop.execute { held.signal(); hold.wait() }
        held.wait()
        for i in 0..<4 { #expect(queue.trySend(i).isSent) }
        var senders: [Task<MessageQueue<Int>.SendError?, Never>] = []
        for i in 4..<7 {
            senders.append(Task.detached { await queue.sendReturningError(i) })
            try await QueueTestSupport.waitUntil { queue.waitingSenders == i - 3 }
        }
        let batches = Box<[[Int]]>([])
        let closedCalls = Atomic<Int>(0)
        let returnedInside = Box<[Int]>([])
        loop.execute {
            queue.onBatch({ batch in
                batches.value.append(batch)
                if batches.value.count == 1 { returnedInside.value = queue.close() }
            }, onClosed: { closedCalls.add(1, ordering: .relaxed) })
        }
        hold.signal()
        var rejected: [Int] = []
        for s in senders { if let e = await s.value { #expect(e.reason == .closed); rejected.append(e.message) } }
        try await QueueTestSupport.waitUntil { closedCalls.load(ordering: .relaxed) >= 1 }
        try await Task.sleep(for: .milliseconds(20))
        let delivered = await Task(executorPreference: loop) { batches.value.flatMap { $0 } }.value
        #expect(returnedInside.value.isEmpty, "a consumer is attached: close returns nothing")
        #expect(closedCalls.load(ordering: .relaxed) == 1)
        #expect((delivered + rejected).sorted() == Array(0..<7), "delivered \(delivered), rejected \(rejected)")
        guard case .closed = queue.trySend(99) else { Issue.record("trySend after close not refused"); return }
        #expect(queue.close().isEmpty)
        loop.shutdownAndWait()
    }

    // MARK: 4. consumer's loop shuts down while senders of every kind wait

    /// Capacity 1; threads (trySend), tasks on another loop and detached tasks (send) keep
    /// sending while the consumer's loop shuts down mid-stream. Every message is delivered
    /// or handed back exactly once; FIFO per producer among those delivered.
    @Test(arguments: Backends.kinds, HandOffConsumer.allCases)
    func consumerLoopShutsDownUnderLoad(_ backend: BackendKind, _ kind: HandOffConsumer) async throws {
        let dog = Watchdog("consumerLoopShutsDownUnderLoad \(backend) \(kind)", seconds: 120)
        defer { dog.finish() }
        for round in 0..<Self.n(20) {
            let loop = try Backends.loopThread(backend)
            let other = try Backends.loopThread(backend)
            let queue = MessageQueue<UInt64>(capacity: 1, loop: loop)
            let per = 5_000
            let ledger = Ledger(producers: 6, per: per)
            let consumerDone = Countdown(1)
            switch kind {
            case .callback:
                loop.execute { queue.onMessage({ ledger.mark($0, .delivered) }, onClosed: { consumerDone.done() }) }
            case .async:
                Task(executorPreference: loop) {
                    for await m in queue { ledger.mark(m, .delivered) }
                    consumerDone.done()
                }
            }
            let threads = (0..<2).map { p in
                LoopTestSupport.spawn {
                    for i in 0..<per {
                        let id = UInt64(p) << 32 | UInt64(i)
                        ledger.produced(id)
                        if let back = QueueTestSupport.sendSpinning(queue, id) { ledger.mark(back, .handedBack); return }
                    }
                }
            }
            var tasks: [Task<Void, Never>] = []
            for p in 2..<4 {
                tasks.append(Task(executorPreference: other) {
                    for i in 0..<per {
                        let id = UInt64(p) << 32 | UInt64(i)
                        ledger.produced(id)
                        if let e = await queue.sendReturningError(id) { ledger.mark(e.message, .handedBack); return }
                    }
                })
            }
            for p in 4..<6 {
                tasks.append(Task.detached {
                    for i in 0..<per {
                        let id = UInt64(p) << 32 | UInt64(i)
                        ledger.produced(id)
                        if let e = await queue.sendReturningError(id) { ledger.mark(e.message, .handedBack); return }
                    }
                })
            }
            usleep(UInt32(200 + (round % 5) * 400))
            loop.shutdownAndWait()
            for t in threads { pthread_join(t, nil) }
            for t in tasks { await t.value }
            #expect(await consumerDone.wait(seconds: 10), "\(backend) \(kind) round \(round): consumer never ended")
            for m in queue.close() { ledger.mark(m, .handedBack) }
            other.shutdownAndWait()
            try await PlexusTests.FinishedLoopTests.expectIdle(loop, backend)
            let problems = ledger.problems()
            #expect(problems.isEmpty, "\(backend) \(kind) round \(round): \(problems.prefix(5))")
            if !problems.isEmpty { break }
        }
    }

    // MARK: 5. a sender whose own loop shuts down while it waits

    /// A task on loop B waits in send (queue full); B shuts down; the consumer then makes
    /// room: the sender is admitted and finishes (on B's orphan thread), the message is
    /// delivered once. A second one is rejected by close with its message.
    @Test(arguments: Backends.kinds)
    func senderWhoseLoopShutsDownWhileWaiting(_ backend: BackendKind) async throws {
        let dog = Watchdog("senderWhoseLoopShutsDownWhileWaiting \(backend)", seconds: 60)
        defer { dog.finish() }
        let consumerLoop = try Backends.loopThread(backend)
        let senderLoop = try Backends.loopThread(backend)
        let queue = MessageQueue<Int>(capacity: 1, loop: consumerLoop)
        #expect(queue.trySend(0).isSent)
        let s1 = Task(executorPreference: senderLoop) { await queue.sendReturningError(1) }
        try await QueueTestSupport.waitUntil { queue.waitingSenders == 1 }
        senderLoop.shutdownAndWait()
        let got = Locked<[Int]>([])
        consumerLoop.execute { queue.onMessage { m in got.withLock { $0.append(m) } } }
        #expect(await s1.value == nil)
        try await QueueTestSupport.waitUntil { got.withLock { $0 } == [0, 1] }
        // Second: a sender on another finished-loop waits, then close hands it back.
        let loop3 = try Backends.loopThread(backend)
        let stop = Countdown(1)
        consumerLoop.execute { queue.stopConsuming(); stop.done() }
        #expect(await stop.wait(seconds: 5))
        #expect(queue.trySend(2).isSent)
        let s2 = Task(executorPreference: loop3) { await queue.sendReturningError(3) }
        try await QueueTestSupport.waitUntil { queue.waitingSenders == 1 }
        loop3.shutdownAndWait()
        #expect(queue.close() == [2])
        let e = await s2.value
        #expect(e?.reason == .closed && e?.message == 3)
        consumerLoop.shutdownAndWait()
        #expect(got.withLock { $0 } == [0, 1])
        // The senders finished on their finished loops' orphan threads: let those go.
        try await PlexusTests.FinishedLoopTests.expectIdle(senderLoop, backend)
        try await PlexusTests.FinishedLoopTests.expectIdle(loop3, backend)
    }

    // MARK: 6. attach / detach / re-attach while producers run

    /// A driver on the loop alternates: an async consumer takes k messages and leaves, a
    /// callback consumer takes k and stops, and so on, while 4 threads trySend at capacity
    /// 2. Every message exactly once, FIFO per producer.
    @Test(arguments: Backends.kinds)
    func consumersComeAndGoWhileProducing(_ backend: BackendKind) async throws {
        let dog = Watchdog("consumersComeAndGoWhileProducing \(backend)", seconds: 120)
        defer { dog.finish() }
        let loop = try Backends.loopThread(backend)
        let per = Self.n(25_000), producers = 4, total = per * producers
        let queue = MessageQueue<UInt64>(capacity: 2, loop: loop)
        let check = OrderCheck(producers: producers)
        let driver = Task(executorPreference: loop) { () -> Int in
            var phases = 0
            var k = 1
            while check.received < total {
                phases += 1
                k = k % 97 + 3
                // async phase
                do {
                    var it = queue.makeAsyncIterator()
                    for _ in 0..<min(k, total - check.received) {
                        guard let m = await it.next() else { return phases }
                        check.take(m)
                    }
                }
                if check.received >= total { break }
                // callback phase
                let target = min(check.received + k, total)
                await withUnsafeContinuation { (c: UnsafeContinuation<Void, Never>) in
                    var resumed = false
                    queue.onBatch { batch in
                        for m in batch { check.take(m) }
                        if !resumed && check.received >= target {
                            resumed = true
                            queue.stopConsuming()
                            c.resume()
                        }
                    }
                }
            }
            return phases
        }
        let threads = (0..<producers).map { p in
            LoopTestSupport.spawn {
                for i in 0..<per {
                    if QueueTestSupport.sendSpinning(queue, UInt64(p) << 32 | UInt64(i)) != nil { fatalError("closed while producing") }
                }
            }
        }
        for t in threads { pthread_join(t, nil) }
        _ = await driver.value
        #expect(queue.close().isEmpty)
        loop.shutdownAndWait()
        #expect(check.received == total)
        #expect(check.duplicatesOrGaps == 0)
    }

    // MARK: 7. cancellation of senders and receivers at every await

    /// 16 sender tasks at capacity 1, each cancelled at a random moment; an async consumer
    /// cancelled and restarted over and over. Every message delivered or handed back
    /// (.cancelled/.closed) exactly once; among the delivered, each sender's order holds.
    @Test(arguments: Backends.kinds)
    func cancellationEverywhere(_ backend: BackendKind) async throws {
        let dog = Watchdog("cancellationEverywhere \(backend)", seconds: 120)
        defer { dog.finish() }
        let loop = try Backends.loopThread(backend)
        let other = try Backends.loopThread(backend)
        let queue = MessageQueue<UInt64>(capacity: 1, loop: loop)
        let producers = 16, per = Self.n(3_000)
        let ledger = Ledger(producers: producers, per: per)
        let lastDelivered = Box<[Int]>(Array(repeating: -1, count: producers))  // loop thread only
        let orderViolations = Atomic<Int>(0)
        let record: @Sendable (UInt64) -> Void = { m in
            let p = Int(m >> 32), i = Int(m & 0xFFFF_FFFF)
            if i <= lastDelivered.value[p] { orderViolations.add(1, ordering: .relaxed) }
            lastDelivered.value[p] = i
            ledger.mark(m, .delivered)
        }
        let senders = (0..<producers).map { p in
            let body: @Sendable () async -> Void = {
                for i in 0..<per {
                    let id = UInt64(p) << 32 | UInt64(i)
                    ledger.produced(id)
                    if let e = await queue.sendReturningError(id) {
                        ledger.mark(e.message, .handedBack)
                        if e.reason == .closed { return }
                    }
                }
            }
            return p % 2 == 0 ? Task(executorPreference: other, operation: body) : Task.detached(operation: body)
        }
        let cancellers = Task.detached {
            for round in 0..<producers {
                try? await Task.sleep(for: .microseconds(300 * (round + 1)))
                senders[(round * 7) % producers].cancel()
            }
        }
        var consumerRounds = 0
        let allSent = Atomic<Bool>(false)
        let waiter = Task.detached { for s in senders { await s.value }; allSent.store(true, ordering: .releasing) }
        while !allSent.load(ordering: .acquiring) {
            consumerRounds += 1
            let c = Task(executorPreference: loop) {
                for await m in queue { record(m) }
            }
            try await Task.sleep(for: .microseconds(UInt64(50 + (consumerRounds * 37) % 700)))
            c.cancel()
            await c.value
        }
        await waiter.value
        await cancellers.value
        // The last consumer drains what is left; close() then ends it.
        let last = Task(executorPreference: loop) { for await m in queue { record(m) } }
        try await QueueTestSupport.waitUntil { queue.count == 0 }
        #expect(queue.close().isEmpty)
        await last.value
        loop.shutdownAndWait()
        other.shutdownAndWait()
        let problems = ledger.problems()
        #expect(problems.isEmpty, "\(backend): \(problems.prefix(5))")
        #expect(orderViolations.load(ordering: .relaxed) == 0)
    }

    /// A sender task already cancelled before it calls send: with room the message is
    /// sent (no await needed), on a full queue it comes back at once as .cancelled; a
    /// receiver already cancelled gets nil and leaves the messages queued.
    @Test(arguments: Backends.kinds)
    func alreadyCancelledSendersAndReceivers(_ backend: BackendKind) async throws {
        let dog = Watchdog("alreadyCancelledSendersAndReceivers \(backend)", seconds: 30)
        defer { dog.finish() }
        let loop = try Backends.loopThread(backend)
        let queue = MessageQueue<Int>(capacity: 1, loop: loop)
        let results = await Task.detached { () -> [MessageQueue<Int>.SendError?] in
            withUnsafeCurrentTask { $0?.cancel() }
            return [await queue.sendReturningError(1), await queue.sendReturningError(2)]
        }.value
        #expect(results[0] == nil)
        #expect(results[1]?.reason == .cancelled && results[1]?.message == 2)
        #expect(queue.waitingSenders == 0)
        let got = await Task(executorPreference: loop) { () -> Int? in
            withUnsafeCurrentTask { $0?.cancel() }
            for await m in queue { return m }
            return nil
        }.value
        #expect(got == nil)
        #expect(queue.close() == [1])
        loop.shutdownAndWait()
    }

    // MARK: 8. messages that own resources

    /// Messages that own an fd and an IOBuffer go through every path: delivered,
    /// refused by a full queue, refused by a closed one, cancelled sender, close's return,
    /// loop shutdown, and left in a queue that is dropped. Each fd is closed exactly once
    /// (no EBADF), every message is freed, and the process's fd count comes back.
    @Test(arguments: Backends.kinds)
    func resourceOwningMessagesFreedExactlyOnce(_ backend: BackendKind) async throws {
        let dog = Watchdog("resourceOwningMessagesFreedExactlyOnce \(backend)", seconds: 60)
        defer { dog.finish() }
        let fdsBefore = openFileDescriptors().count
        let stats = ResourceStats()
        do {
            let loop = try Backends.loopThread(backend)
            let queue = MessageQueue<FDMessage>(capacity: 2, loop: loop)
            let delivered = Atomic<Int>(0)
            // Full: handed back.
            #expect(queue.trySend(FDMessage(stats)).isSent)
            #expect(queue.trySend(FDMessage(stats)).isSent)
            if case .full(let m) = queue.trySend(FDMessage(stats)) { m.consume() } else { Issue.record("not full") }
            // Cancelled sender.
            let cancelled = Task.detached { await queue.sendReturningError(FDMessage(stats)) }
            try await QueueTestSupport.waitUntil { queue.waitingSenders == 1 }
            cancelled.cancel()
            if let e = await cancelled.value { e.message.consume() } else { Issue.record("cancelled sender sent") }
            // Delivered, many, from threads and tasks.
            loop.execute { queue.onMessage { m in m.consume(); delivered.add(1, ordering: .relaxed) } }
            let threads = (0..<2).map { _ in
                LoopTestSupport.spawn {
                    for _ in 0..<Self.n(2_000) {
                        if let back = QueueTestSupport.sendSpinning(queue, FDMessage(stats)) { back.consume(); return }
                    }
                }
            }
            let task = Task.detached {
                for _ in 0..<Self.n(2_000) {
                    if let e = await queue.sendReturningError(FDMessage(stats)) { e.message.consume(); return }
                }
            }
            for t in threads { pthread_join(t, nil) }
            await task.value
            try await QueueTestSupport.waitUntil { delivered.load(ordering: .relaxed) == 2 + 3 * Self.n(2_000) }
            // Loop shutdown with a waiting sender and no consumer: it gets its message back.
            let stopped = Countdown(1)
            loop.execute { queue.stopConsuming(); stopped.done() }
            #expect(await stopped.wait(seconds: 5))
            #expect(queue.trySend(FDMessage(stats)).isSent)
            #expect(queue.trySend(FDMessage(stats)).isSent)
            let waiting = Task.detached { await queue.sendReturningError(FDMessage(stats)) }
            try await QueueTestSupport.waitUntil { queue.waitingSenders == 1 }
            loop.shutdownAndWait()
            if let e = await waiting.value { e.message.consume() } else { Issue.record("sent after shutdown") }
            if case .closed(let m) = queue.trySend(FDMessage(stats)) { m.consume() } else { Issue.record("open") }
            let left = queue.close()
            #expect(left.count == 2)
            for m in left { m.consume() }
            // A queue dropped with messages in it frees them (documented).
            let loop2 = try Backends.loopThread(backend)
            do {
                let dropped = MessageQueue<FDMessage>(capacity: 4, loop: loop2)
                for _ in 0..<3 { #expect(dropped.trySend(FDMessage(stats)).isSent) }
            }
            loop2.shutdownAndWait()
        }
        try await QueueTestSupport.waitUntil { stats.live.load(ordering: .relaxed) == 0 }
        #expect(stats.live.load(ordering: .relaxed) == 0, "messages never freed")
        #expect(stats.badClose.load(ordering: .relaxed) == 0, "an fd was closed twice")
        #expect(stats.consumedTwice.load(ordering: .relaxed) == 0, "a message was consumed twice")
        #expect(stats.droppedUnconsumed.load(ordering: .relaxed) == 3, "only the dropped queue's 3 should die unconsumed")
        #expect(openFileDescriptors().count == fdsBefore)
    }

    // MARK: 9. a consumer that leaves after close(): who gets the messages?

    /// close() with a callback consumer attached returns nothing ("the consumer gets them"),
    /// but the consumer then stops before its turn. The messages are neither delivered nor
    /// handed back: nobody is told about them, and they die with the queue.
    @Test(arguments: Backends.kinds)
    func aCallbackConsumerStoppingAfterCloseGetsTheRest(_ backend: BackendKind) async throws {
        let dog = Watchdog("aCallbackConsumerStoppingAfterCloseGetsTheRest \(backend)", seconds: 30)
        defer { dog.finish() }
        let stats = ResourceStats()
        let loop = try Backends.loopThread(backend)
        let got = Box<[Int]>([])
        let ended = Atomic<Bool>(false)
        var returned: [FDMessage] = []
        do {
            let queue = MessageQueue<FDMessage>(capacity: 4, loop: loop)
            let attached = Countdown(1)
            loop.execute {
                queue.onMessage({ m in got.value.append(Int(m.fd)); m.consume() }, onClosed: { ended.store(true, ordering: .relaxed) })
                attached.done()
            }
            #expect(await attached.wait(seconds: 5))
            // The consumer decides to stop (a job already queued on its loop) while a
            // producer sends and closes from another thread.
            let hold = Semaphore(), held = Semaphore()
            loop.execute { held.signal(); hold.wait() }
            held.wait()
            let stoppedWith = Box<[FDMessage]>([])
            loop.execute {
                // Compiles against both APIs: stopConsuming() -> Void (before) or -> [Message].
                let rest: Any = queue.stopConsuming()
                if let rest = rest as? [FDMessage] { stoppedWith.value = rest }
            }
            for _ in 0..<3 { #expect(queue.trySend(FDMessage(stats)).isSent) }
            returned = queue.close()             // consumer still attached: returns []
            hold.signal()
            let flushed = Countdown(1)
            loop.execute { flushed.done() }
            #expect(await flushed.wait(seconds: 5))
            returned += stoppedWith.value         // the consumer that stopped got them (fix)
            // Only a second close(), which nothing tells the caller to make, finds them.
            let second = queue.close()
            for m in second { m.consume() }
        }
        loop.shutdownAndWait()
        for m in returned { m.consume() }
        let delivered = await Task.detached { got.value.count }.value
        #expect(delivered + returned.count == 3, "\(backend): \(3 - delivered - returned.count) messages neither delivered to the consumer nor returned by close()")
        #expect(ended.load(ordering: .relaxed) || delivered + returned.count == 3, "\(backend): consumer never told of the end either")
    }

    /// The same with an async consumer that is cancelled after close() returned nothing:
    /// its `for await` ends, the iterator goes, the messages stay in the ring with nobody
    /// to take them, and die with the queue unless someone calls close() again.
    @Test(arguments: Backends.kinds)
    func anAsyncConsumerCancelledAfterCloseStillTakesTheRest(_ backend: BackendKind) async throws {
        let dog = Watchdog("anAsyncConsumerCancelledAfterCloseStillTakesTheRest \(backend)", seconds: 30)
        defer { dog.finish() }
        let stats = ResourceStats()
        let loop = try Backends.loopThread(backend)
        var returned: [FDMessage] = []
        var delivered = 0
        do {
            let queue = MessageQueue<FDMessage>(capacity: 4, loop: loop)
            let gate = Countdown(1)
            let proceed = Atomic<Bool>(false)
            let consumer = Task(executorPreference: loop) { () -> Int in
                var n = 0
                for await m in queue {
                    m.consume(); n += 1
                    gate.done()
                    while !proceed.load(ordering: .acquiring) { await Task.yield() }
                }
                return n
            }
            #expect(queue.trySend(FDMessage(stats)).isSent)
            #expect(await gate.wait(seconds: 5))
            for _ in 0..<3 { #expect(queue.trySend(FDMessage(stats)).isSent) }
            returned = queue.close()   // consumer attached: []
            consumer.cancel()          // the application shuts its consumer down
            proceed.store(true, ordering: .releasing)
            delivered = await consumer.value
        }
        loop.shutdownAndWait()
        for m in returned { m.consume() }
        #expect(delivered + returned.count == 4, "\(backend): \(4 - delivered - returned.count) messages neither delivered nor handed back")
        #expect(stats.droppedUnconsumed.load(ordering: .relaxed) == 0, "\(backend): messages destroyed undelivered")
    }

    /// Races a consumer leaving (callback: stopConsuming at a moving count; async: its task
    /// cancelled at a moving time) against close() from another thread, while a thread
    /// produces. Every message is delivered, refused to trySend, or returned by the one
    /// close() or by stopConsuming(), never left for a second close() to find.
    @Test(arguments: Backends.kinds, HandOffConsumer.allCases)
    func consumerLeavingRacesClose(_ backend: BackendKind, _ kind: HandOffConsumer) async throws {
        let dog = Watchdog("consumerLeavingRacesClose \(backend) \(kind)", seconds: 120)
        defer { dog.finish() }
        var stranded = 0
        let rounds = Self.n(100)
        for round in 0..<rounds {
            let loop = try Backends.loopThread(backend)
            let queue = MessageQueue<UInt64>(capacity: 4, loop: loop)
            let ledger = Ledger(producers: 1, per: 4_000)
            let stopAt = 1 + (round * 37) % 400
            var consumerTask: Task<Void, Never>? = nil
            switch kind {
            case .callback:
                let seen = Box(0)
                loop.execute {
                    queue.onMessage { m in
                        ledger.mark(m, .delivered)
                        seen.value += 1
                        if seen.value == stopAt {
                            let rest: Any = queue.stopConsuming()
                            for back in (rest as? [UInt64]) ?? [] { ledger.mark(back, .handedBack) }
                        }
                    }
                }
            case .async:
                consumerTask = Task(executorPreference: loop) { for await m in queue { ledger.mark(m, .delivered) } }
            }
            let producer = LoopTestSupport.spawn {
                for i in 0..<4_000 {
                    let id = UInt64(i)
                    ledger.produced(id)
                    if let back = QueueTestSupport.sendSpinning(queue, id) { ledger.mark(back, .handedBack); return }
                }
            }
            if let consumerTask {
                let delay = UInt32((round * 53) % 600)
                let canceller = LoopTestSupport.spawn { usleep(delay); consumerTask.cancel() }
                usleep(UInt32((round * 29) % 600))
                for m in queue.close() { ledger.mark(m, .handedBack) }
                pthread_join(canceller, nil)
                await consumerTask.value
            } else {
                usleep(UInt32((round * 29) % 600))
                for m in queue.close() { ledger.mark(m, .handedBack) }
            }
            pthread_join(producer, nil)
            let settled = Countdown(1)
            loop.execute { settled.done() }
            _ = await settled.wait(seconds: 5)
            loop.shutdownAndWait()
            let second = queue.close()
            stranded += second.count
            for m in second { ledger.mark(m, .handedBack) }
            let problems = ledger.problems()
            #expect(problems.isEmpty, "\(backend) \(kind) round \(round): \(problems.prefix(3))")
            if !problems.isEmpty { break }
        }
        #expect(stranded == 0, "\(backend) \(kind): \(stranded) messages left for a second close()")
    }

    /// An async consumer whose task was cancelled gets nil and still holds its iterator
    /// (the for-await body has not unwound yet) when close() comes from another thread:
    /// close() sees a consumer and returns nothing; the iterator then goes. What is queued
    /// is neither delivered nor returned (only a second close() finds it).
    @Test(arguments: Backends.kinds)
    func anAsyncConsumerLeavingJustAsCloseComes(_ backend: BackendKind) async throws {
        let dog = Watchdog("anAsyncConsumerLeavingJustAsCloseComes \(backend)", seconds: 30)
        defer { dog.finish() }
        let loop = try Backends.loopThread(backend)
        let queue = MessageQueue<Int>(capacity: 4, loop: loop)
        for i in 0..<3 { #expect(queue.trySend(i).isSent) }
        let gotNil = Countdown(1)
        let closed = Atomic<Bool>(false)
        let consumer = Task(executorPreference: loop) { () -> [Int] in
            var got: [Int] = []
            var it = queue.makeAsyncIterator()
            withUnsafeCurrentTask { $0?.cancel() }
            while let m = await it.next() { got.append(m) }
            gotNil.done()
            while !closed.load(ordering: .acquiring) { await Task.yield() }
            return got  // the iterator goes here
        }
        #expect(await gotNil.wait(seconds: 5))
        let returned = queue.close()
        closed.store(true, ordering: .releasing)
        let delivered = await consumer.value
        let second = queue.close()
        loop.shutdownAndWait()
        #expect(delivered.count + returned.count == 3, "\(backend): \(second.count) messages left for a second close()")
    }

    /// A callback consumer that attaches to a queue whose end was already reported to an
    /// earlier consumer is told the end too (an async one gets nil at once).
    @Test(arguments: Backends.kinds)
    func aSecondConsumerOfAnEndedQueueIsToldTheEnd(_ backend: BackendKind) async throws {
        let dog = Watchdog("aSecondConsumerOfAnEndedQueueIsToldTheEnd \(backend)", seconds: 30)
        defer { dog.finish() }
        let loop = try Backends.loopThread(backend)
        let queue = MessageQueue<Int>(capacity: 4, loop: loop)
        let firstEnd = Countdown(1), secondEnd = Countdown(1), attached = Countdown(1)
        loop.execute {
            queue.onMessage({ _ in }, onClosed: { queue.stopConsuming(); firstEnd.done() })
            attached.done()
        }
        #expect(await attached.wait(seconds: 5))
        #expect(queue.trySend(1).isSent)
        #expect(queue.close().isEmpty)
        #expect(await firstEnd.wait(seconds: 5))
        let asyncEnd = await Task(executorPreference: loop) { () -> Bool in
            for await _ in queue { return false }
            return true
        }.value
        #expect(asyncEnd, "an async consumer of the ended queue gets nil")
        loop.execute { queue.onMessage({ _ in }, onClosed: { secondEnd.done() }) }
        #expect(await secondEnd.wait(seconds: 2), "\(backend): the second callback consumer never learns the queue ended")
        loop.shutdownAndWait()
    }

    // MARK: 10. memory over half a million messages

    /// 500k messages (class instances owning 64 bytes) through capacity 2 with thread and
    /// task producers: after 100k to warm up, RSS grows by less than 16 MiB over the rest.
    @Test(arguments: Backends.kinds)
    func memoryStaysFlatOverHalfAMillionMessages(_ backend: BackendKind) async throws {
        // Sanitizers keep freed memory for a while (ASan's quarantine): RSS says nothing then.
        if getenv("PLEXUS_SANITIZER") != nil { return }
        let dog = Watchdog("memoryStaysFlatOverHalfAMillionMessages \(backend)", seconds: 240)
        defer { dog.finish() }
        let loop = try Backends.loopThread(backend)
        let queue = MessageQueue<Payload>(capacity: 2, loop: loop)
        let received = Atomic<Int>(0)
        loop.execute { queue.onBatch { b in received.add(b.count, ordering: .relaxed) } }
        func pump(_ count: Int) async throws {
            let threads = (0..<2).map { _ in
                LoopTestSupport.spawn {
                    for _ in 0..<count / 4 {
                        if QueueTestSupport.sendSpinning(queue, Payload()) != nil { fatalError() }
                    }
                }
            }
            let tasks = (0..<2).map { _ in Task.detached { for _ in 0..<count / 4 { try await queue.send(Payload()) } } }
            for t in tasks { try await t.value }
            for t in threads { pthread_join(t, nil) }
        }
        try await pump(100_000)
        let before = QueueTestSupport.residentKiB()
        try await pump(400_000)
        try await QueueTestSupport.waitUntil { received.load(ordering: .relaxed) == 500_000 }
        let after = QueueTestSupport.residentKiB()
        #expect(after - before < 16 * 1024, "RSS grew \((after - before) / 1024) MiB over 400k messages")
        #expect(queue.close().isEmpty)
        loop.shutdownAndWait()
        #expect(Payload.live.load(ordering: .relaxed) == 0)
    }
}
}

// MARK: - Support

/// Aborts the process if `finish()` is not called within `seconds`: a hang fails the run.
final class Watchdog: @unchecked Sendable {
    private let done = Atomic<Bool>(false)
    init(_ name: String, seconds: Int) {
        let limit = PlexusTests.MessageQueueRaceTests.underTSan ? seconds * 4 : seconds
        let thread = LoopTestSupport.spawn { [self] in
            for _ in 0..<limit * 10 {
                if self.done.load(ordering: .acquiring) { return }
                usleep(100_000)
            }
            let text = "WATCHDOG: \(name) hung for \(limit) s\n"
            _ = text.withCString { Glibc.write(2, $0, strlen($0)) }
            abort()
        }
        pthread_detach(thread)
    }
    func finish() { done.store(true, ordering: .releasing) }
}

/// Every message's fate, counted: produced once, then exactly one of delivered / handed back.
final class Ledger: @unchecked Sendable {
    enum Fate { case delivered, handedBack }
    let producers: Int, per: Int
    private let lock = Lock()
    private var producedCount: [UInt8]
    private var delivered: [UInt8]
    private var handedBack: [UInt8]
    private var handed = 0
    init(producers: Int, per: Int) {
        self.producers = producers; self.per = per
        producedCount = Array(repeating: 0, count: producers * per)
        delivered = producedCount; handedBack = producedCount
    }
    private func index(_ id: UInt64) -> Int { Int(id >> 32) * per + Int(id & 0xFFFF_FFFF) }
    func produced(_ id: UInt64) { lock.withLock { producedCount[index(id)] &+= 1 } }
    func mark(_ id: UInt64, _ fate: Fate) {
        lock.withLock {
            switch fate {
            case .delivered: delivered[index(id)] &+= 1
            case .handedBack: handedBack[index(id)] &+= 1; handed += 1
            }
        }
    }
    var handedBackCount: Int { lock.withLock { handed } }
    func problems() -> [String] {
        lock.withLock {
            var out: [String] = []
            for i in 0..<producers * per {
                let p = producedCount[i], d = delivered[i], h = handedBack[i]
                if p == 0 { if d + h != 0 { out.append("\(i / per):\(i % per) never produced, fate d\(d) h\(h)") }; continue }
                if !(d + h == 1 && p == 1) { out.append("producer \(i / per) message \(i % per): produced \(p), delivered \(d), handed back \(h)") }
            }
            return out
        }
    }
}

final class ResourceStats: Sendable {
    let live = Atomic<Int>(0)
    let badClose = Atomic<Int>(0)
    let consumedTwice = Atomic<Int>(0)
    let droppedUnconsumed = Atomic<Int>(0)
}

/// A message owning an fd and an IOBuffer. `consume()` marks it handled; its deinit
/// closes the fd (exactly once: EBADF counts as a double close).
final class FDMessage: @unchecked Sendable {
    let fd: Int32
    let buffer: IOBuffer
    private let stats: ResourceStats
    private let consumed = Atomic<Int>(0)
    init(_ stats: ResourceStats) {
        self.stats = stats
        fd = open("/dev/null", O_RDONLY | O_CLOEXEC)
        precondition(fd >= 0)
        buffer = IOBuffer(capacity: 256)
        stats.live.add(1, ordering: .relaxed)
    }
    func consume() {
        if consumed.add(1, ordering: .relaxed).newValue > 1 { stats.consumedTwice.add(1, ordering: .relaxed) }
    }
    deinit {
        if consumed.load(ordering: .relaxed) == 0 { stats.droppedUnconsumed.add(1, ordering: .relaxed) }
        if Glibc.close(fd) != 0 { stats.badClose.add(1, ordering: .relaxed) }
        stats.live.subtract(1, ordering: .relaxed)
    }
}

final class Payload: Sendable {
    static let live = Atomic<Int>(0)
    let bytes: (UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64) = (0, 0, 0, 0, 0, 0, 0, 0)
    init() { Self.live.add(1, ordering: .relaxed) }
    deinit { Self.live.subtract(1, ordering: .relaxed) }
}
