import CPlexus
import Glibc
import Synchronization
import SystemPackage
import Testing
@testable import Plexus

extension PlexusTests {
/// The event loop on every backend that runs here.
@Suite struct EventLoopTests {

    @Test(arguments: Backends.kinds)
    func timersFireInOrderAndNotEarly(_ kind: BackendKind) throws {
        do {
            let loop = try Backends.loop(kind)
                        let start = Deadline.now
            var fired: [(Int, UInt64)] = []
            for i in (0..<20).reversed() {
                loop.schedule(after: .milliseconds(i * 2)) { event in
                    #expect(event == .fired)
                    fired.append((i, Deadline.now.nanoseconds - start.nanoseconds))
                }
            }
            var cancelledSeen = false
            let doomed = loop.schedule(after: .milliseconds(5)) { event in cancelledSeen = event == .cancelled }
            #expect(loop.cancel(doomed))
            #expect(!loop.cancel(doomed), "a second cancel finds nothing")
            LoopTestSupport.turn(loop, until: { fired.count == 20 })
            #expect(fired.map(\.0) == Array(0..<20))
            for (i, elapsed) in fired { #expect(elapsed >= UInt64(i * 2) * 1_000_000, "timer \(i) fired early") }
            #expect(cancelledSeen)
            loop.shutdown(); loop.run()
        }
    }

    /// `idleSpin` spins only a loop that waits for other threads alone, and a job or a
    /// shutdown from another thread ends the spin; a read or a timer the loop waits for
    /// keeps it from spinning at all. With a spin of 10 s, each step below ends in well
    /// under that; a spin that held one back would take the full 10 s.
    @Test(arguments: Backends.kinds)
    func anIdleSpinNeverHoldsBackJobsIOTimersOrShutdown(_ kind: BackendKind) async throws {
        let loop = try Backends.loopThread(kind, idleSpin: .seconds(10))
        let clock = ContinuousClock()
        func within5s(_ what: String, _ body: () async throws -> Void) async rethrows {
            let start = clock.now
            try await body()
            #expect(clock.now - start < .seconds(5), "\(kind): \(what) waited for the spin")
        }
        // Idle: the loop spins; a job from this thread ends the spin.
        try await Task.sleep(for: .milliseconds(20))
        await within5s("a job from another thread") {
            await withCheckedContinuation { (done: CheckedContinuation<Void, Never>) in
                #expect(loop.execute { done.resume() })
            }
        }
        // A read of an empty pipe, fed from here 20 ms later.
        var pipeFDs: [Int32] = [-1, -1]
        #expect(plexus_pipe2(&pipeFDs, O_CLOEXEC | O_NONBLOCK) == 0)
        let (readEnd, writeEnd) = (pipeFDs[0], pipeFDs[1])
        defer { Glibc.close(readEnd); Glibc.close(writeEnd) }
        try await within5s("a read") {
            try await withCheckedThrowingContinuation { (done: CheckedContinuation<Void, any Error>) in
                #expect(loop.execute {
                    loop.read(FileDescriptor(rawValue: readEnd), IOBuffer(capacity: 8)) { result, _ in
                        done.resume(with: result.map { _ in () })
                    }
                })
                usleep(20_000)
                #expect(Glibc.write(writeEnd, "x", 1) == 1)
            }
        }
        // A timer 20 ms away.
        await within5s("a timer") {
            await withCheckedContinuation { (done: CheckedContinuation<Void, Never>) in
                #expect(loop.execute { loop.schedule(after: .milliseconds(20)) { _ in done.resume() } })
            }
        }
        // Idle again, spinning: shutdown ends it.
        try await Task.sleep(for: .milliseconds(20))
        await within5s("shutdown") { loop.shutdownAndWait() }
    }

    @Test(arguments: Backends.kinds)
    func hundredThousandTimers(_ kind: BackendKind) throws {
        let loop = try Backends.loop(kind)
                var fired = 0
        var cancelled = 0
        var handles: [TimerHandle] = []
        handles.reserveCapacity(100_000)
        for i in 0..<100_000 {
            handles.append(loop.schedule(after: .microseconds(i % 1000)) { event in
                if event == .fired { fired += 1 } else { cancelled += 1 }
            })
        }
        for h in handles.enumerated() where h.offset % 2 == 1 { loop.cancel(h.element) }
        #expect(loop.pendingTimers == 50_000)
        LoopTestSupport.turn(loop, until: { fired == 50_000 })
        #expect(fired == 50_000)
        #expect(cancelled == 50_000)
        let repeatingCount = Box(0)
        let repeating = loop.scheduleRepeating(every: .milliseconds(1)) { event in
            if event == .fired { repeatingCount.value += 1 }
        }
        LoopTestSupport.turn(loop, until: { repeatingCount.value >= 5 })
        loop.cancel(repeating)
        #expect(loop.pendingTimers == 0)
        loop.shutdown(); loop.run()
    }

    @Test(arguments: Backends.kinds)
    func executeFromEightThreadsRunsEveryJobInPerThreadOrder(_ kind: BackendKind) throws {
        do {
            let loop = try Backends.loopThread(kind)
                        let perThread = 12_500
            let seen = UnsafeCounters(count: 8)
            let threads = (0..<8).map { t in
                LoopTestSupport.spawn {
                    for i in 0..<perThread {
                        let ok = loop.execute {
                            precondition(loop.inLoop)
                            // Per-thread FIFO: job i of thread t runs after job i-1.
                            if seen[t] == i { seen[t] = i + 1 } else { seen.outOfOrder += 1 }
                        }
                        precondition(ok)
                    }
                }
            }
            for t in threads { pthread_join(t, nil) }
            let done = Semaphore()
            loop.execute { done.signal() }
            done.wait()
            loop.shutdownAndWait()
            #expect((0..<8).allSatisfy { seen[$0] == perThread })
            #expect(seen.outOfOrder == 0)
            #expect(loop.execute {} == false, "a shut-down loop takes no new work")
        }
    }

    @Test(arguments: Backends.kinds)
    func throwingCallbackReachesTheErrorHandlerAndTheLoopGoesOn(_ kind: BackendKind) throws {
        struct Boom: Error {}
        do {
            let loop = try Backends.loop(kind)
            let errors = Mutex<[String]>([])
            loop.errorHandler = { e in errors.withLock { $0.append(e.operation) } }
            var after = false
            loop.nop { _ in throw Boom() }
            loop.schedule(after: .milliseconds(1)) { _ in throw Boom() }
            loop.schedule(after: .milliseconds(3)) { _ in after = true }
            LoopTestSupport.turn(loop, until: { after })
            #expect(after)
            #expect(errors.withLock { $0 } == ["nop", "timeout"])
            loop.shutdown(); loop.run()
        }
    }

    /// Thousands of mixed operations with random cancels, closes and a shutdown in the
    /// middle: every callback runs exactly once and nothing leaks.
    @Test(arguments: Backends.kinds)
    func everyOperationCompletesExactlyOnce(_ kind: BackendKind) throws {
        do {
            var rng = SplitMix64(seed: 0x5EED)
            let loop = try Backends.loop(kind)
                        var calls: [Int] = []
            var expected = 0
            func record(_ id: Int) { calls[id] += 1 }
            func newID() -> Int { calls.append(0); expected += 1; return calls.count - 1 }
            let listener = try LoopTestSupport.listener()
            var openFDs: [Int32] = []
            for round in 0..<40 {
                var pipes: [(Int32, Int32)] = []
                for _ in 0..<10 {
                    var p: [Int32] = [0, 0]
                    precondition(plexus_pipe2(&p, O_CLOEXEC | O_NONBLOCK) == 0)
                    pipes.append((p[0], p[1]))
                }
                var tokens: [Token] = []
                var timers: [TimerHandle] = []
                for _ in 0..<50 {
                    let (r, w) = pipes[Int(rng.next() % 10)]
                    switch rng.next() % 6 {
                    case 0:
                        let id = newID()
                        tokens.append(loop.read(FileDescriptor(rawValue: r), IOBuffer(capacity: 64)) { _, _ in record(id) })
                    case 1:
                        let id = newID()
                        tokens.append(loop.write(FileDescriptor(rawValue: w), IOBuffer("x")) { _, _ in record(id) })
                    case 2:
                        let id = newID()
                        timers.append(loop.schedule(after: .microseconds(Int(rng.next() % 2000))) { _ in record(id) })
                    case 3:
                        let id = newID()
                        tokens.append(loop.accept(FileDescriptor(rawValue: listener.fd)) { result in
                            record(id)
                            if case .success(let fd) = result { Glibc.close(fd.rawValue) }
                        })
                    case 4:
                        let id = newID()
                        tokens.append(loop.nop { _ in record(id) })
                    default:
                        let id = newID()
                        tokens.append(loop.timeout(.microseconds(Int(rng.next() % 3000))) { _ in record(id) })
                    }
                }
                // Connect a few clients for the accepts.
                for _ in 0..<Int(rng.next() % 4) { openFDs.append(try LoopTestSupport.connect(to: listener.address)) }
                for t in tokens where rng.next() % 3 == 0 { loop.cancel(t) }
                for t in timers where rng.next() % 3 == 0 { loop.cancel(t) }
                loop.runOnce(timeout: .milliseconds(1))
                // Close half the pipes through Plexus: their pending operations are cancelled.
                for (i, (r, w)) in pipes.enumerated() {
                    if i % 2 == 0 {
                        let a = newID(), b = newID()
                        loop.close(FileDescriptor(rawValue: r)) { _ in record(a) }
                        loop.close(FileDescriptor(rawValue: w)) { _ in record(b) }
                    } else {
                        openFDs.append(r); openFDs.append(w)
                    }
                }
                if round == 20 { break }  // shutdown in the middle, with work pending
            }
            loop.shutdown()
            loop.run()
            #expect(calls.count == expected)
            let wrong = calls.enumerated().filter { $0.element != 1 }
            #expect(wrong.isEmpty, "callbacks not run exactly once: \(wrong.prefix(10))")
            #expect(loop.pendingOperations == 0)
            #expect(loop.pendingTimers == 0)
            for fd in openFDs { Glibc.close(fd) }
            Glibc.close(listener.fd)
        }
    }

    @Test(arguments: Backends.kinds)
    func cancelledAcceptNeverLeaksItsDescriptor(_ kind: BackendKind) throws {
        do {
            let loop = try Backends.loop(kind)
            let listener = try LoopTestSupport.listener()
            var results: [Result<FileDescriptor, PlexusError>] = []
            for _ in 0..<20 {
                let t = loop.accept(FileDescriptor(rawValue: listener.fd)) { results.append($0) }
                let client = try LoopTestSupport.connect(to: listener.address)
                loop.cancel(t)
                LoopTestSupport.turn(loop, until: { results.count > 0 })
                Glibc.close(client)
                if case .success(let fd) = results.removeFirst() { Glibc.close(fd.rawValue) }
            }
            loop.shutdown(); loop.run()
            Glibc.close(listener.fd)
        }
    }
}
}

final class Box<T>: @unchecked Sendable {
    var value: T
    init(_ value: T) { self.value = value }
}

/// Counters written by the loop thread only, read after it stopped.
final class UnsafeCounters: @unchecked Sendable {
    private var values: [Int]
    var outOfOrder = 0
    init(count: Int) { values = Array(repeating: 0, count: count) }
    subscript(i: Int) -> Int {
        get { values[i] }
        set { values[i] = newValue }
    }
}


enum LoopTestSupport {
    /// Turns the loop until `done` or 10 s (never hangs).
    static func turn(_ loop: EventLoop, until done: () -> Bool) {
        let deadline = Deadline.now + .seconds(10)
        while !done() && Deadline.now < deadline { loop.runOnce(timeout: .milliseconds(5)) }
        #expect(done(), "timed out")
    }

    static func spawn(_ body: @escaping @Sendable () -> Void) -> pthread_t {
        final class Job { let body: @Sendable () -> Void; init(_ b: @escaping @Sendable () -> Void) { body = b } }
        var t = pthread_t()
        pthread_create(&t, nil, { raw in
            Unmanaged<Job>.fromOpaque(raw!).takeRetainedValue().body()
            return nil
        }, Unmanaged.passRetained(Job(body)).toOpaque())
        return t
    }

    static func listener() throws -> (fd: Int32, address: SocketAddress) {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue | SOCK_CLOEXEC.rawValue | SOCK_NONBLOCK.rawValue), 0)
        var one: Int32 = 1
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, 4)
        let b = SocketAddress(ipv4: "127.0.0.1", port: 0)!.withUnsafeSockaddr { bind(fd, $0, $1) }
        precondition(b == 0 && listen(fd, 512) == 0)
        var bound = sockaddr_storage()
        var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
        let address = withUnsafeMutablePointer(to: &bound) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) { sa -> SocketAddress in
                _ = getsockname(fd, sa, &length)
                return SocketAddress(sa, length: length)!
            }
        }
        return (fd, address)
    }

    static func connect(to address: SocketAddress) throws -> Int32 {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue | SOCK_CLOEXEC.rawValue), 0)
        let r = address.withUnsafeSockaddr { Glibc.connect(fd, $0, $1) }
        precondition(r == 0, "connect failed: \(errno)")
        return fd
    }
}
