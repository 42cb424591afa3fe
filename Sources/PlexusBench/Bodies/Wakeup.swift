import CPlexus
import CPlexusMallocCounter
import Glibc
import Plexus
import Synchronization
import SystemPackage

// eventfd cross-thread wake-up. One round trip: the benchmark thread wakes a loop thread
// that sleeps in its backend's wait; the loop thread answers by writing a reply eventfd,
// on which the benchmark thread blocks in read(2). The benchmark thread's side is the
// same in every variant; only the loop thread's side differs.
//
// Plexus:
//   raw       the loop thread runs backend.wait with a read of the request eventfd
//             pending; the benchmark thread writes that eventfd.
//   callback  an EventLoop on its own thread (EventLoop.startThread); the benchmark thread
//             calls loop.execute { write the reply eventfd }: the loop's own wake-up path.
// Baselines (loop thread side):
//   raw-io_uring  a READ of the request eventfd, io_uring_submit_and_wait(1), reply, re-arm.
//   raw-epoll     epoll_wait on the request eventfd (level-triggered), read(2), reply.
//   raw-poll      poll on the request eventfd, read(2), reply.
// Checked: every request is answered exactly once (each reply read returns 1, and the
// loop thread counted as many requests as the benchmark thread made round trips).
//
// Both threads are pinned to the CPU the benchmark thread is on (the loop thread inherits
// the mask), so the figure is the software path: eventfd, wait, scheduler. Unpinned, on
// this kind of VM, waking a sleeping vCPU costs 35-45 us and the runs turn bimodal.

func makeWakeupBody(_ c: BenchmarkCase) throws -> BenchmarkBody {
    let pin = CPUPin()
    do {
        switch (c.backend, c.adapter) {
        case (_, .callback) where !c.backend.isRaw: return try LoopWakeup(choice: c.backend.choice!, pin: pin)
        default: return try ThreadWakeup(c, pin: pin)
        }
    } catch {
        pin.restore()
        throw error
    }
}

/// Pins the calling thread (and the threads it then creates) to its current CPU until `restore`.
final class CPUPin {
    private let saved = UnsafeMutableRawPointer.allocate(byteCount: Int(PLEXUS_BENCH_AFFINITY_SIZE), alignment: 8)
    private var pinned: Bool

    init() { pinned = plexus_bench_pin_to_current_cpu(saved) >= 0 }

    func restore() {
        if pinned { _ = plexus_bench_restore_affinity(saved) }
        pinned = false
    }

    deinit {
        restore()
        saved.deallocate()
    }
}

/// The benchmark thread's side: write a request, block reading the reply.
class WakeupClient {
    let replyFD: Int32
    let pin: CPUPin
    var roundTrips = 0

    init(pin: CPUPin) throws {
        self.pin = pin
        replyFD = try makeEventFD(nonBlocking: false)
    }

    @inline(__always)
    func awaitReply() throws {
        var value: UInt64 = 0
        while true {
            let n = Glibc.read(replyFD, &value, 8)
            if n == 8 { break }
            if n < 0 && plexus_errno() == EINTR { continue }
            throw BenchmarkError.system("read(reply eventfd)")
        }
        guard value == 1 else { throw BenchmarkError.wrong("reply eventfd read \(value), expected 1") }
        roundTrips += 1
    }
}

/// raw, raw-io_uring, raw-epoll, raw-poll: a loop thread waiting on the request eventfd.
final class ThreadWakeup: WakeupClient, BenchmarkBody, @unchecked Sendable {
    let requestFD: Int32
    let backendName: BackendName
    let stop = Atomic<Bool>(false)
    let started = BenchSemaphore()
    var startError: (any Error)?
    var served = 0
    var loopError: (any Error)?
    var thread: BenchThread?

    init(_ c: BenchmarkCase, pin: CPUPin) throws {
        backendName = c.backend
        requestFD = try makeEventFD(nonBlocking: c.backend.mechanism.wantsNonBlockingFDs)
        try super.init(pin: pin)
        thread = try BenchThread(name: "bench-wakeup") { [self] in
            do { try serve() } catch { loopError = error }
        }
        started.wait()
        if let startError {
            thread?.join()
            closeFDs()
            throw startError
        }
    }

    private func closeFDs() {
        Glibc.close(requestFD)
        Glibc.close(replyFD)
    }

    /// The loop thread.
    private func serve() throws {
        switch backendName {
        case .rawIoUring: try serveRawURing()
        case .rawEpoll, .rawPoll: try serveRawReadiness()
        default: try serveBackend()
        }
    }

    private func startFailed(_ error: any Error) throws -> Never {
        startError = error
        started.signal()
        throw error
    }

    private func serveRawURing() throws {
        let ring: RawRing
        do { ring = try RawRing() } catch { try startFailed(error) }
        started.signal()
        let value = UnsafeMutablePointer<UInt64>.allocate(capacity: 1)
        defer { value.deallocate() }
        func arm() {
            let sqe = ring.sqe()
            io_uring_prep_read(sqe, requestFD, value, 8, UInt64.max)
            io_uring_sqe_set_data64(sqe, 1)
        }
        arm()
        while true {
            try ring.submitAndWait(1)
            var result: Int32 = 0
            if ring.reap({ _, res in result = res }) == 0 { continue }
            if stop.load(ordering: .acquiring) { return }
            guard result == 8 else { throw BenchmarkError.wrong("eventfd READ returned \(result)") }
            served += Int(value.pointee)
            signalEventFD(replyFD)
            arm()
        }
    }

    private func serveRawReadiness() throws {
        let epoll: RawEpoll?
        let poll: RawPoll?
        do {
            if backendName == .rawEpoll {
                epoll = try RawEpoll()
                poll = nil
                try epoll!.add(requestFD, data: 1)
            } else {
                epoll = nil
                poll = RawPoll(capacity: 1)
                poll!.add(requestFD)
            }
        } catch { try startFailed(error) }
        started.signal()
        while true {
            if try (epoll?.wait() ?? poll!.wait()) == 0 { continue }
            let value = drainEventFD(requestFD)
            if stop.load(ordering: .acquiring) { return }
            served += Int(value)
            signalEventFD(replyFD)
        }
    }

    private func serveBackend() throws {
        let backend: any IOBackend
        do { backend = try startBackend(backendName) } catch { try startFailed(error) }
        started.signal()
        let fd = FileDescriptor(rawValue: requestFD)
        _ = backend.prepare(.read(fd, IOBuffer(capacity: 8)))
        var failure: BenchmarkError?
        var done = false
        while !done {
            try backend.wait(timeout: nil) { completion in
                var completion = completion
                var buffer = completion.takeBuffer()!
                if stop.load(ordering: .acquiring) { done = true; return }
                if completion.result != 8 {
                    failure = BenchmarkError.wrong("eventfd read returned \(completion.result)")
                    done = true
                    return
                }
                served += Int(buffer.withUnsafeBytes { $0.load(as: UInt64.self) })
                signalEventFD(replyFD)
                buffer.clear()
                _ = backend.prepare(.read(fd, buffer))
            }
        }
        if let failure { throw failure }
    }

    func step() throws -> Int {
        signalEventFD(requestFD)
        try awaitReply()
        return 1
    }

    func finish() throws {
        stop.store(true, ordering: .releasing)
        signalEventFD(requestFD)
        thread?.join()
        closeFDs()
        pin.restore()
        if let loopError { throw loopError }
        if served != roundTrips { throw BenchmarkError.wrong("loop thread served \(served) of \(roundTrips) requests") }
    }
}

/// callback: loop.execute from the benchmark thread.
final class LoopWakeup: WakeupClient, BenchmarkBody, @unchecked Sendable {
    let loop: EventLoop
    /// Written only on the loop thread; read after shutdownAndWait.
    var served = 0

    init(choice: BackendChoice, pin: CPUPin) throws {
        loop = try EventLoop.startThread(name: "bench-wakeup", backend: choice)
        try super.init(pin: pin)
    }

    @inline(__always)
    func answer() {
        served += 1
        signalEventFD(replyFD)
    }

    func step() throws -> Int {
        // Captures one reference: no allocation for the closure itself.
        guard loop.execute({ [self] in answer() }) else { throw BenchmarkError("the loop refused execute") }
        try awaitReply()
        return 1
    }

    func finish() throws {
        loop.shutdownAndWait()
        Glibc.close(replyFD)
        pin.restore()
        if served != roundTrips { throw BenchmarkError.wrong("loop served \(served) of \(roundTrips) requests") }
    }
}
