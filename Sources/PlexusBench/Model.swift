import Plexus

/// The microbenchmarks of the performance contract (docs/design.md) and issue 7.
public enum Benchmark: String, CaseIterable, Sendable, CustomStringConvertible {
    case nop1 = "nop-1"
    case nop32 = "nop-32"
    case pingPong = "pingpong"
    case wakeup = "wakeup"
    case timers = "timers"
    case messageQueue = "mq-handoff"
    case messageQueuePingPong = "mq-pingpong"
    case echo1 = "echo-1"
    case echo50 = "echo-50"
    case file1 = "file-qd1"
    case file32 = "file-qd32"

    public var description: String { rawValue }

    /// One line for --help and the table's legend.
    public var summary: String {
        switch self {
        case .nop1: "NOP submit/complete, one per submission"
        case .nop32: "NOP submit/complete, 32 per submission"
        case .pingPong: "pipe ping-pong on one thread: a read waits on an empty pipe, 1 byte is written, the read returns it"
        case .wakeup: "eventfd cross-thread wake-up: another thread wakes the loop thread (eventfd write / loop.execute), which answers; round trip"
        case .timers: "timer churn: 64 timers scheduled per turn, 32 due now fire, 32 far ones are cancelled"
        case .messageQueue: "MessageQueue hand-off, 2 producer threads to a consumer on the loop (trySend, yield when full; capacity 64; loop-signal wake): throughput"
        case .messageQueuePingPong: "MessageQueue hand-off, one message in flight: the producer thread sends the next as soon as the consumer on the loop received the last"
        case .echo1: "TCP echo on loopback, 1 connection, 64-byte messages, client and server on one loop"
        case .echo50: "TCP echo on loopback, 50 connections, 64-byte messages, client and server on one loop"
        case .file1: "4 KiB reads at random offsets of a page-cached 8 MiB temp file, queue depth 1"
        case .file32: "4 KiB reads at random offsets of a page-cached 8 MiB temp file, 32 per submission"
        }
    }

    /// What one latency sample is.
    public var latencyUnit: String {
        switch self {
        case .nop1: "per op"
        case .nop32: "per batch of 32"
        case .pingPong: "per round trip"
        case .wakeup: "per round trip"
        case .timers: "per turn of 64 timers"
        case .messageQueue: "per message, producer's send to consumer's receipt (queueing included)"
        case .messageQueuePingPong: "per message, producer's send to consumer's receipt"
        case .echo1, .echo50: "per request (send to echo received)"
        case .file1: "per read"
        case .file32: "per batch of 32 reads"
        }
    }

    /// Where the async rows' latency samples mean something else than `latencyUnit`: the
    /// batch is 32 tasks there, and a sample is one task's await.
    public var asyncLatencyNote: String? {
        switch self {
        case .nop32, .file32:
            "async rows: per await of one of the 32 tasks: a turn of the batch when it waits, one op when the result is there at once (NOPs on epoll and poll, page-cached reads)"
        default: nil
        }
    }

    /// Adapters this benchmark has bodies for, on a Plexus backend.
    public var adapters: [Adapter] {
        switch self {
        // timers: the callback churn is the loop's timer heap; the async `sleep(for:)` is a
        // kernel timeout operation (IORING_OP_TIMEOUT) and cancelling one needs a Task per
        // timer, so an async row would measure something else (see AsyncBodies.swift).
        case .timers: [.callback]
        case .messageQueue, .messageQueuePingPong: [.callback, .async]
        default: [.raw, .callback, .async]
        }
    }

    /// False for a placeholder that has no body yet (no numbers are ever made up for it).
    public var isImplemented: Bool { true }

    /// The message-queue rows: MessageQueueBenchmark.measureHandOff, no raw baseline.
    public var isMessageQueue: Bool { self == .messageQueue || self == .messageQueuePingPong }

    /// True when a raw baseline loop exists for it.
    public var hasBaseline: Bool { !isMessageQueue }
}

/// Where the work runs: a Plexus backend, or the raw baseline loop over the same kernel
/// mechanism that calls the C shim directly with no Plexus layer.
public enum BackendName: String, CaseIterable, Sendable, CustomStringConvertible {
    case ioUring = "io_uring"
    case epoll
    case poll
    case rawIoUring = "raw-io_uring"
    case rawEpoll = "raw-epoll"
    case rawPoll = "raw-poll"

    public var description: String { rawValue }

    /// True for the raw baselines.
    public var isRaw: Bool { self == .rawIoUring || self == .rawEpoll || self == .rawPoll }

    /// The kernel mechanism, which pairs a Plexus backend with its baseline.
    public var mechanism: Mechanism {
        switch self {
        case .ioUring, .rawIoUring: .ioUring
        case .epoll, .rawEpoll: .epoll
        case .poll, .rawPoll: .poll
        }
    }

    /// The ping-pong pipe is O_NONBLOCK for every Plexus backend and the readiness
    /// baselines, as a loop's user makes it, so that io_uring and epoll are compared on the
    /// same pipe. The raw io_uring loop keeps a blocking one, on which its READ parks in
    /// the kernel's poll on every kernel (old ones fail it with EAGAIN on an O_NONBLOCK
    /// pipe). Through Plexus, io_uring serves a blocking pipe too, ~200 ns per round trip
    /// slower (preadv2/pwritev2 with RWF_NOWAIT, where O_NONBLOCK allows read/write).
    var wantsNonBlockingPipe: Bool { self != .rawIoUring }

    /// The raw baseline of a Plexus backend (itself for a baseline).
    public var baseline: BackendName {
        switch mechanism {
        case .ioUring: .rawIoUring
        case .epoll: .rawEpoll
        case .poll: .rawPoll
        }
    }

    /// The Plexus backend choice, nil for a baseline.
    public var choice: BackendChoice? {
        switch self {
        case .ioUring: .ioUring
        case .epoll: .epoll
        case .poll: .poll
        default: nil
        }
    }

    public static let plexus: [BackendName] = [.ioUring, .epoll, .poll]
}

/// io_uring, epoll or poll: what the kernel does underneath.
public enum Mechanism: Sendable {
    case ioUring, epoll, poll

    /// io_uring reads and writes park in the kernel on a blocking fd (one completion);
    /// readiness loops need O_NONBLOCK fds. Plexus and its baseline get the same fds.
    var wantsNonBlockingFDs: Bool { self != .ioUring }
}

/// How the work is written on top of the backend.
public enum Adapter: String, CaseIterable, Sendable, CustomStringConvertible {
    /// Straight on the `IOBackend` protocol: prepare / submit / wait, no loop. Also the
    /// adapter name of the raw baselines, which have no layer at all.
    case raw
    /// The EventLoop and its callback adapter (`loop.read(fd, buffer) { result, buffer in }`).
    case callback
    /// The async/await adapter (`try await loop.read(fd, into: buffer)`): the timed window
    /// runs inside `Task(executorPreference: loop)` on the loop thread (AsyncWindow.swift).
    case async

    public var description: String { rawValue }
}

/// One benchmark on one backend with one adapter.
public struct BenchmarkCase: Hashable, Sendable, CustomStringConvertible {
    public let benchmark: Benchmark
    public let backend: BackendName
    public let adapter: Adapter

    public init(_ benchmark: Benchmark, _ backend: BackendName, _ adapter: Adapter) {
        self.benchmark = benchmark
        self.backend = backend
        self.adapter = adapter
    }

    public var description: String { "\(benchmark) \(backend) \(adapter)" }
}

/// A benchmark set up and ready to run: the runner calls `step` until the time is up,
/// then `finish`, which checks the result and frees everything.
protocol BenchmarkBody: AnyObject {
    /// Does one unit of work (an op, a batch, a round trip, or one turn of the loop) and
    /// returns how many operations completed in it. Checks each result as it goes.
    func step() throws -> Int
    /// True when the body records per-operation latencies into its sampler itself;
    /// otherwise the runner times sampled steps.
    var recordsOwnLatency: Bool { get }
    /// Stops, checks that every operation completed exactly once with the right result,
    /// and releases fds and threads.
    func finish() throws
}

extension BenchmarkBody {
    var recordsOwnLatency: Bool { false }
}

/// A body that runs its own warm-up and timed window and reports the figures: the async
/// bodies (the window runs inside a task on the loop, see AsyncWindow.swift) and the
/// message-queue hand-off (a whole measurement of MessageQueueBenchmark).
protocol WindowBody: AnyObject {
    func runWindow(duration: Duration, warmup: Duration, sampler: LatencySampler) throws -> WindowFigures
    /// Checks that every operation completed exactly once with the right result, and
    /// releases fds and threads.
    func finish() throws
}

/// What one self-timed window measured.
struct WindowFigures {
    var operations: Int
    var nanoseconds: UInt64
    /// malloc-family calls in the window, all threads.
    var allocations: UInt64
    /// Latency percentiles the body measured itself; nil: taken from the sampler.
    var p50: Double? = nil
    var p99: Double? = nil
}

/// A body of either kind.
enum AnyBenchmarkBody {
    /// The runner calls `step` and times the window.
    case steps(BenchmarkBody)
    /// The body times its window itself.
    case window(WindowBody)

    func finish() throws {
        switch self {
        case .steps(let body): try body.finish()
        case .window(let body): try body.finish()
        }
    }
}

/// Builds the body for a case; nil when the case does not exist.
func makeBody(_ c: BenchmarkCase, sampler: LatencySampler) throws -> AnyBenchmarkBody? {
    guard BenchmarkRunner.hasBody(c) else { return nil }
    if c.benchmark.isMessageQueue { return try makeMessageQueueBody(c).map { .window($0) } }
    if c.adapter == .async { return try makeAsyncBody(c, sampler: sampler) }
    return try makeSteppedBody(c, sampler: sampler).map { .steps($0) }
}

func makeSteppedBody(_ c: BenchmarkCase, sampler: LatencySampler) throws -> BenchmarkBody? {
    switch c.benchmark {
    case .nop1: return try makeNopBody(c, batch: 1)
    case .nop32: return try makeNopBody(c, batch: 32)
    case .pingPong: return try makePingPongBody(c)
    case .wakeup: return try makeWakeupBody(c)
    case .timers: return try makeTimerBody(c)
    case .messageQueue, .messageQueuePingPong: return nil
    case .echo1: return try makeEchoBody(c, connections: 1, sampler: sampler)
    case .echo50: return try makeEchoBody(c, connections: 50, sampler: sampler)
    case .file1: return try makeFileBody(c, depth: 1)
    case .file32: return try makeFileBody(c, depth: 32)
    }
}

/// Starts the Plexus backend a case names.
func startBackend(_ backend: BackendName) throws -> any IOBackend {
    guard let choice = backend.choice else { throw BenchmarkError("\(backend) is not a Plexus backend") }
    return try choice.start().backend
}
