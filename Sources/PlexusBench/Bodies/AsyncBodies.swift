import CPlexus
import Glibc
import Plexus
import Synchronization
import SystemPackage

// The async adapter's bodies: the same work as the callback bodies, written as a user
// writes async code on a loop (`try await loop.read(fd, into: buffer)`), each inside
// tasks whose executor is the loop, so every await resumes on the loop thread with no
// hop. The window runs inside those tasks (AsyncWindow.swift).
//
//   nop-1       one task: `try await loop.nop()` in a loop (one await per NOP: the
//               runtime's floor per await, FIELD-NOTES "Executors and the async floor").
//               On epoll and poll a NOP finishes at once (`IOBackend.attempt`), so the
//               task suspends only once per 64 NOPs (the per-task inline budget).
//   nop-32      32 long-lived tasks (a discarding task group on the loop), each awaiting
//               one NOP at a time. All 32 run in one turn of the loop, so their NOPs go to
//               the kernel in one submission, as the callback body's batch does (on epoll
//               and poll each task's run of inline NOPs instead). Chosen
//               over a task group per batch of 32 (32 child tasks per batch: ~4-5 mallocs
//               per NOP, FIELD-NOTES) and over one task awaiting 32 NOPs (the adapter has
//               no batch await). Latency: worker 0's await, which spans one turn = one batch.
//   pingpong    a reader task and a writer task: the reader lets the writer go, then
//               awaits its read; the writer awaits its write and parks until let go again.
//               The read reaches the empty pipe first, as in the callback body; both go to
//               the kernel in the same turn (see AsyncPingPong).
//   wakeup      a task on a loop thread awaits an `UnsafeContinuation`; the benchmark
//               thread resumes it (the loop's cross-thread task enqueue: remote queue and
//               eventfd), the task writes the reply eventfd and parks again.
//   echo-N      per connection a client task (send, then recv until 64 bytes, check) and a
//               server task (recv, send back); the clients are the workers.
//   file-qdN    N tasks, each awaiting one 4 KiB pread at a time from the shared offset
//               sequence (qd32: 32 reads in flight, submitted in one turn).
//   timers      no async row: the callback churn measures the loop's timer heap, while
//               `loop.sleep(for:)` is a kernel timeout operation (IORING_OP_TIMEOUT) and
//               cancelling it means cancelling a Task per timer: another benchmark.
// Checked: the same as the callback bodies (every result, every byte, exactly once).

func makeAsyncBody(_ c: BenchmarkCase, sampler: LatencySampler) throws -> AnyBenchmarkBody? {
    if c.backend == .rawIoUring && c.benchmark == .nop1 { return .window(SpecializedWindow(try FloorNop())) }
    guard let choice = c.backend.choice else { return nil }
    switch c.benchmark {
    case .nop1: return .window(SpecializedWindow(try AsyncNop(choice: choice, tasks: 1)))
    case .nop32: return .window(SpecializedWindow(try AsyncNop(choice: choice, tasks: 32)))
    case .pingPong:
        let pipe = try makePipe(nonBlocking: c.backend.wantsNonBlockingPipe)
        do { return .window(SpecializedWindow(try AsyncPingPong(pipe, choice: choice))) } catch {
            Glibc.close(pipe.read)
            Glibc.close(pipe.write)
            throw error
        }
    case .wakeup:
        let pin = CPUPin()
        do { return .steps(try AsyncWakeup(choice: choice, pin: pin)) } catch { pin.restore(); throw error }
    case .echo1, .echo50:
        let pairs = try makeTCPPairs(c.benchmark == .echo1 ? 1 : 50, nonBlocking: c.backend.mechanism.wantsNonBlockingFDs)
        do { return .window(SpecializedWindow(try AsyncEcho(pairs, sampler: sampler, choice: choice))) } catch {
            for pair in pairs { Glibc.close(pair.client); Glibc.close(pair.server) }
            throw error
        }
    case .file1, .file32:
        let fd = try makeBenchmarkFile()
        do { return .window(SpecializedWindow(try AsyncFileRead(fd: fd, depth: c.benchmark == .file1 ? 1 : 32, choice: choice))) } catch {
            Glibc.close(fd)
            throw error
        }
    case .timers, .messageQueue, .messageQueuePingPong:
        return nil
    }
}

// MARK: nop

/// What the awaited NOPs of a body returned: each must be 0.
struct NopTally {
    var completed = 0
    var bad = 0

    mutating func count(_ result: Int) {
        if result != 0 { bad += 1 }
        completed += 1
    }

    func check() throws {
        if bad > 0 { throw BenchmarkError.wrong("\(bad) of \(completed) NOPs returned non-zero") }
    }
}

final class AsyncNop: AsyncWorkload, @unchecked Sendable {
    let loop: EventLoop
    let workers: Int
    @exclusivity(unchecked) var tally = NopTally()

    init(choice: BackendChoice, tasks: Int) throws {
        loop = try EventLoop(backend: choice)
        workers = tasks
    }

    var completedOperations: Int { tally.completed }

    nonisolated(nonsending) func work(_ worker: Int, times: Int, timing sampler: LatencySampler?) async throws {
        for unitIndex in 0..<times {
            let start = sampler.startTiming(unitIndex)
            try await unit(worker)
            sampler.stopTiming(start)
        }
    }

    @inline(__always)
    nonisolated(nonsending) private func unit(_ worker: Int) async throws {
        tally.count(try await loop.nop())
    }

    func check() throws { try tally.check() }

    func close() {}
}

// MARK: the floor

/// The Swift concurrency runtime's floor for one awaited NOP (docs/design.md, performance
/// contract: the async NOP's target): the least an async API over io_uring can do, with
/// no Plexus in it. A bare `TaskExecutor` runs the task's jobs on the benchmark thread and
/// drives a raw ring; `nop()` writes a NOP SQE and parks the task in an
/// `UnsafeContinuation` that the reap resumes. No cancellation, no slots, no handler
/// table: the runtime's own cost (a continuation, a suspension, the executor switches of
/// one async call) and the ring's.
final class FloorExecutor: WindowExecutor, @unchecked Sendable {
    let ring: RawRing
    /// Jobs to run; used only on the benchmark thread (the task is created there too).
    private var jobs: [UnownedJob] = []
    private var running: [UnownedJob] = []
    private var waiting: [UnsafeContinuation<Int32, Never>?] = []
    private var free: [Int] = []
    private var pending = 0
    private var stopped = false

    init() throws {
        ring = try RawRing()
        jobs.reserveCapacity(64)
        running.reserveCapacity(64)
        waiting.reserveCapacity(64)
        free.reserveCapacity(64)
    }

    func enqueue(_ job: consuming ExecutorJob) {
        jobs.append(UnownedJob(job))
    }

    func run() {
        while true {
            while !jobs.isEmpty {
                swap(&jobs, &running)
                for job in running { job.runSynchronously(on: asUnownedTaskExecutor()) }
                running.removeAll(keepingCapacity: true)
            }
            if stopped || pending == 0 { return }
            try? ring.submitAndWait(1)
            _ = ring.reap { data, result in
                let slot = Int(data)
                pending -= 1
                free.append(slot)
                waiting[slot].take()!.resume(returning: result)
            }
        }
    }

    func shutdown() { stopped = true }

    /// An awaited IORING_OP_NOP.
    nonisolated(nonsending) func nop() async -> Int32 {
        await withUnsafeContinuation { continuation in
            let slot: Int
            if let reused = free.popLast() { slot = reused } else { slot = waiting.count; waiting.append(nil) }
            waiting[slot] = continuation
            pending += 1
            let sqe = ring.sqe()
            io_uring_prep_nop(sqe)
            io_uring_sqe_set_data64(sqe, UInt64(slot))
        }
    }
}

/// nop-1 on the floor executor: one task awaiting one NOP at a time.
final class FloorNop: AsyncWorkload, @unchecked Sendable {
    let loop: FloorExecutor
    var workers: Int { 1 }
    @exclusivity(unchecked) var tally = NopTally()

    init() throws { loop = try FloorExecutor() }

    var completedOperations: Int { tally.completed }

    nonisolated(nonsending) func work(_ worker: Int, times: Int, timing sampler: LatencySampler?) async throws {
        for unitIndex in 0..<times {
            let start = sampler.startTiming(unitIndex)
            try await unit(worker)
            sampler.stopTiming(start)
        }
    }

    @inline(__always)
    nonisolated(nonsending) private func unit(_ worker: Int) async throws {
        tally.count(Int(await loop.nop()))
    }

    func check() throws { try tally.check() }

    func close() {}
}

// MARK: pingpong

/// Two tasks on the loop, as a peer waiting for a message writes it: the reader (worker 0)
/// lets the writer go, then awaits its read; the writer task, let go, awaits its 1-byte
/// write and parks until the reader lets it go again. The reader's read is submitted
/// before the writer runs, so it meets the empty pipe first and both reach the kernel in
/// the same turn, as in the callback body. Three resumptions per round trip (the reader
/// after its read; the writer after its write and after being let go), no allocation.
/// (`async let` for the write is one resumption fewer but creates a child task per
/// round trip: 4 mallocs and slower here.)
final class AsyncPingPong: PingPongState, AsyncWorkload, @unchecked Sendable {
    let loop: EventLoop
    var workers: Int { 1 }
    var helpers: Int { 1 }
    @exclusivity(unchecked) var readBuffer: IOBuffer? = IOBuffer(capacity: 64)
    @exclusivity(unchecked) var writeBuffer: IOBuffer? = IOBuffer(capacity: 64)
    /// The writer, parked until the reader lets it go with the byte to write (nil: stop).
    @exclusivity(unchecked) var writer: UnsafeContinuation<UInt8?, Never>?
    /// The reader let go of a writer that had not parked yet.
    @exclusivity(unchecked) var pendingByte: UInt8??
    @exclusivity(unchecked) var writeResult = 1

    init(_ pipe: (read: Int32, write: Int32), choice: BackendChoice) throws {
        loop = try EventLoop(backend: choice)
        super.init(pipe: pipe)
    }

    var completedOperations: Int { roundTrips }

    private func letWriterGo(_ byte: UInt8?) {
        if let writer = writer.take() { writer.resume(returning: byte) } else { pendingByte = .some(byte) }
    }

    /// The writer task.
    func help(_ helper: Int) async throws {
        while true {
            let next: UInt8?
            if let pending = pendingByte.take() {
                next = pending
            } else {
                next = await withUnsafeContinuation { writer = $0 }
            }
            guard let byte = next else { return }
            var out = writeBuffer.take()!
            out.appendUnsafe { $0[0] = byte; return 1 }
            let done = try await loop.write(FileDescriptor(rawValue: writeFD), out)
            writeResult = done.count
            writeBuffer = done.takeBuffer()
        }
    }

    nonisolated(nonsending) func work(_ worker: Int, times: Int, timing sampler: LatencySampler?) async throws {
        for unitIndex in 0..<times {
            let start = sampler.startTiming(unitIndex)
            try await unit(worker)
            sampler.stopTiming(start)
        }
    }

    /// The reader: one round trip.
    @inline(__always)
    nonisolated(nonsending) private func unit(_ worker: Int) async throws {
        guard writeResult == 1 else { throw BenchmarkError.wrong("write returned \(writeResult)") }
        letWriterGo(sequence)
        let got = try await loop.read(FileDescriptor(rawValue: readFD), into: readBuffer.take()!)
        let count = got.count
        var buffer = got.takeBuffer()
        let byte = buffer.withUnsafeBytes { $0.first ?? 0 }
        buffer.clear()
        readBuffer = consume buffer
        try check(read: count, byte: byte)
    }

    func workersDone() { letWriterGo(nil) }

    func check() throws {
        if writeResult != 1 { throw BenchmarkError.wrong("write returned \(writeResult)") }
    }

    func close() { closeFDs() }
}

// MARK: wakeup

/// async: a task on the loop thread parks in a continuation that the benchmark thread
/// resumes; the task answers on the reply eventfd and parks again.
final class AsyncWakeup: WakeupClient, BenchmarkBody, @unchecked Sendable {
    let loop: EventLoop
    /// The parked task's continuation: stored by the loop thread before it writes the
    /// reply, taken by the benchmark thread after it read the reply.
    let parked = Mutex<UnsafeContinuation<Bool, Never>?>(nil)
    /// Written only on the loop thread; read after shutdownAndWait.
    @exclusivity(unchecked) var served = 0

    init(choice: BackendChoice, pin: CPUPin) throws {
        loop = try EventLoop.startThread(name: "bench-wakeup", backend: choice)
        try super.init(pin: pin)
        Task(executorPreference: loop) { [self] in
            while await withUnsafeContinuation({ (c: UnsafeContinuation<Bool, Never>) in
                parked.withLock { $0 = c }
                signalEventFD(replyFD)  // parked: the first reply says "ready", later ones answer
            }) {
                served += 1
            }
        }
        try awaitReply()  // the task has parked
        roundTrips = 0
    }

    func step() throws -> Int {
        guard let continuation = parked.withLock({ $0.take() }) else { throw BenchmarkError.wrong("the task has not parked") }
        continuation.resume(returning: true)
        try awaitReply()
        return 1
    }

    func finish() throws {
        parked.withLock { $0.take() }?.resume(returning: false)
        loop.shutdownAndWait()
        Glibc.close(replyFD)
        pin.restore()
        if served != roundTrips { throw BenchmarkError.wrong("the task served \(served) of \(roundTrips) requests") }
    }
}

// MARK: echo

final class AsyncEchoConnection: EchoBuffers {
    @exclusivity(unchecked) var served = 0
}

final class AsyncEcho: AsyncWorkload, @unchecked Sendable {
    let loop: EventLoop
    let stats: EchoStats
    let connections: [AsyncEchoConnection]
    var workers: Int { connections.count }
    var helpers: Int { connections.count }
    var recordsOwnLatency: Bool { true }

    init(_ pairs: [(client: Int32, server: Int32)], sampler: LatencySampler, choice: BackendChoice) throws {
        loop = try EventLoop(backend: choice)
        stats = EchoStats(sampler: sampler)
        connections = pairs.map { AsyncEchoConnection(pair: $0) }
    }

    var completedOperations: Int { stats.requests }

    nonisolated(nonsending) func work(_ i: Int, times: Int, timing sampler: LatencySampler?) async throws {
        for unitIndex in 0..<times {
            let start = sampler.startTiming(unitIndex)
            try await unit(i)
            sampler.stopTiming(start)
        }
    }

    /// The client of connection `i`: one request, send then receive the whole echo.
    @inline(__always)
    nonisolated(nonsending) private func unit(_ i: Int) async throws {
        let c = connections[i]
        c.sequence &+= 1
        let sequence = c.sequence
        var message = c.clientSend.take()!
        message.appendUnsafe { fillEchoMessage($0.baseAddress!, connection: i, sequence: sequence); return echoMessageSize }
        let sentAt = monotonicNanoseconds()
        let sent = try await loop.send(c.client, message)
        guard sent.count == echoMessageSize else { throw BenchmarkError.wrong("client send returned \(sent.count)") }
        c.clientSend = sent.takeBuffer()
        var reply = c.clientRecv.take()!
        while reply.count < echoMessageSize {
            let got = try await loop.recv(c.client, into: reply)
            guard got.count > 0 else { throw BenchmarkError.wrong("client recv returned \(got.count)") }
            reply = got.takeBuffer()
        }
        try reply.withUnsafeBytes { try checkEchoMessage($0.baseAddress!, count: $0.count, connection: i, sequence: sequence) }
        stats.completed(sentAt: sentAt, now: monotonicNanoseconds())
        reply.clear()
        c.clientRecv = consume reply
    }

    /// The server of connection `i`: echoes until the client's end is shut down.
    func help(_ i: Int) async throws {
        let c = connections[i]
        var buffer = c.serverBuffer.take()!
        while true {
            let got = try await loop.recv(c.server, into: buffer)
            if got.count == 0 { break }  // shut down: the window is over
            buffer = try await loop.writeAll(c.server, got.takeBuffer())
            buffer.clear()
            c.served += 1
        }
    }

    func workersDone() {
        stats.stopping = true
        for c in connections { Glibc.shutdown(c.client.rawValue, Int32(SHUT_RDWR)) }
    }

    func check() throws {
        for (i, c) in connections.enumerated() where c.served != Int(c.sequence) {
            throw BenchmarkError.wrong("connection \(i): the server echoed \(c.served) of \(c.sequence) requests")
        }
    }

    func close() {
        for c in connections {
            Glibc.close(c.client.rawValue)
            Glibc.close(c.server.rawValue)
        }
    }
}

// MARK: file reads

final class AsyncFileRead: FileReadState, AsyncWorkload, @unchecked Sendable {
    let loop: EventLoop
    var workers: Int { depth }
    final class Slot { @exclusivity(unchecked) var buffer: IOBuffer? = IOBuffer(capacity: fileBlockSize) }
    let slots: [Slot]

    init(fd: Int32, depth: Int, choice: BackendChoice) throws {
        loop = try EventLoop(backend: choice)
        slots = (0..<depth).map { _ in Slot() }
        super.init(file: fd, depth: depth)
    }

    var completedOperations: Int { reads }

    nonisolated(nonsending) func work(_ worker: Int, times: Int, timing sampler: LatencySampler?) async throws {
        for unitIndex in 0..<times {
            let start = sampler.startTiming(unitIndex)
            try await unit(worker)
            sampler.stopTiming(start)
        }
    }

    @inline(__always)
    nonisolated(nonsending) private func unit(_ worker: Int) async throws {
        let slot = slots[worker]
        let offset = nextOffset()
        let got = try await loop.read(FileDescriptor(rawValue: fd), into: slot.buffer.take()!, offset: offset)
        let count = got.count
        var buffer = got.takeBuffer()
        try buffer.withUnsafeBytes { try checkFileBlock($0.baseAddress!, count: count, offset: offset) }
        buffer.clear()
        slot.buffer = consume buffer
        reads += 1
    }

    func check() throws {}

    func close() { Glibc.close(fd) }
}
