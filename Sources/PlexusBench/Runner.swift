import Plexus

/// How long and how often each case runs.
public struct RunSettings: Sendable {
    /// Length of one timed window.
    public var duration: Duration
    /// Untimed steps before each window (caches, ring set-up, table growth).
    public var warmup: Duration
    /// Windows per case; the table reports the median of each figure.
    public var repetitions: Int

    public init(duration: Duration = .milliseconds(200), warmup: Duration = .milliseconds(40), repetitions: Int = 5) {
        self.duration = duration
        self.warmup = warmup
        self.repetitions = repetitions
    }

    /// A few milliseconds per case: enough to check results, not to measure.
    public static let quick = RunSettings(duration: .milliseconds(15), warmup: .milliseconds(3), repetitions: 1)
}

/// The figures of one timed window (or the medians over several).
public struct Measurement: Sendable {
    public var operations: Int
    public var opsPerSecond: Double
    /// Wall time per operation: 1e9 / ops per second.
    public var nsPerOp: Double { opsPerSecond > 0 ? 1e9 / opsPerSecond : .infinity }
    /// Sampled latency (per op, per batch or per turn: `Benchmark.latencyUnit`), in ns.
    public var p50: Double?
    public var p99: Double?
    /// malloc-family calls per operation in the window, all threads; nil when not counted.
    public var allocsPerOp: Double?

    public init(operations: Int, opsPerSecond: Double, p50: Double? = nil, p99: Double? = nil, allocsPerOp: Double? = nil) {
        self.operations = operations
        self.opsPerSecond = opsPerSecond
        self.p50 = p50
        self.p99 = p99
        self.allocsPerOp = allocsPerOp
    }
}

/// What running one case gave.
public struct CaseResult: Sendable {
    public let benchmarkCase: BenchmarkCase
    /// Medians over the repetitions.
    public let median: Measurement
    public let repetitions: [Measurement]

    public init(benchmarkCase: BenchmarkCase, median: Measurement, repetitions: [Measurement]) {
        self.benchmarkCase = benchmarkCase
        self.median = median
        self.repetitions = repetitions
    }
}

/// Runs bodies and measures them. Owns the latency buffer, so measuring allocates
/// nothing inside a timed window.
public final class BenchmarkRunner {
    let sampler = LatencySampler()

    public init() {}

    /// Nil when the backend starts here, else why not.
    public static func unavailability(_ backend: BackendName) -> String? {
        do {
            switch backend {
            case .rawIoUring: _ = try RawRing()
            case .rawEpoll, .rawPoll: break
            default: _ = try backend.choice!.start()
            }
            return nil
        } catch {
            return "\(error)"
        }
    }

    /// True when a body exists for the case.
    public static func hasBody(_ c: BenchmarkCase) -> Bool {
        guard c.benchmark.isImplemented else { return false }
        if c.backend.isRaw {
            // raw-io_uring async: the concurrency runtime's floor for an awaited NOP.
            if c.adapter == .async { return c.backend == .rawIoUring && c.benchmark == .nop1 }
            return c.adapter == .raw && c.benchmark.hasBaseline
        }
        return c.benchmark.adapters.contains(c.adapter)
    }

    /// One warm-up and one timed window on a fresh body; nil when the case has no body.
    public func measure(_ c: BenchmarkCase, duration: Duration, warmup: Duration) throws -> Measurement? {
        guard let anyBody = try makeBody(c, sampler: sampler) else { return nil }
        switch anyBody {
        case .steps(let body): return try measure(body, duration: duration, warmup: warmup)
        case .window(let body): return try measure(body, duration: duration, warmup: warmup)
        }
    }

    /// A body that times its own window (async, message queue).
    func measure(_ body: WindowBody, duration: Duration, warmup: Duration) throws -> Measurement {
        var finished = false
        defer { if !finished { try? body.finish() } }
        sampler.enabled = false
        sampler.reset()
        let figures = try body.runWindow(duration: duration, warmup: warmup, sampler: sampler)
        sampler.enabled = false
        finished = true
        try body.finish()
        guard figures.operations > 0 else { throw BenchmarkError.wrong("no operation completed in \(duration)") }
        let seconds = Double(max(figures.nanoseconds, 1)) / 1e9
        var p50 = figures.p50
        var p99 = figures.p99
        if p50 == nil, let latency = sampler.percentiles() { (p50, p99) = latency }
        return Measurement(operations: figures.operations, opsPerSecond: Double(figures.operations) / seconds,
                           p50: p50, p99: p99,
                           allocsPerOp: MallocCounter.isActive ? Double(figures.allocations) / Double(figures.operations) : nil)
    }

    /// A stepped body: the runner times the window.
    func measure(_ body: BenchmarkBody, duration: Duration, warmup: Duration) throws -> Measurement {
        var finished = false
        defer { if !finished { try? body.finish() } }
        sampler.enabled = false
        sampler.reset()

        // Warm-up, which also tells how long a step takes.
        let warmupEnd = monotonicNanoseconds() &+ UInt64(warmup.nanosecondsForBench)
        let warmupStart = monotonicNanoseconds()
        var warmupSteps = 0
        var now = warmupStart
        repeat {
            _ = try body.step()
            warmupSteps += 1
            now = monotonicNanoseconds()
        } while now < warmupEnd || warmupSteps < 3
        let stepNanoseconds = max(1, (now - warmupStart) / UInt64(warmupSteps))
        // The deadline is checked on the timed steps: one in `stride` on average, at
        // jittered gaps, so a body with a period of its own (a wait every 8th turn) is
        // sampled at every phase of it, not always at the same one.
        var gaps = SamplingGaps(stride: timingStride(callNanoseconds: stepNanoseconds))
        let timeSteps = !body.recordsOwnLatency

        sampler.reset()
        sampler.enabled = true
        let allocationsBefore = MallocCounter.count
        let start = monotonicNanoseconds()
        let deadline = start &+ UInt64(duration.nanosecondsForBench)
        var operations = 0
        var untilTimed = 0
        var end = start
        while true {
            if untilTimed == 0 {
                let t0 = monotonicNanoseconds()
                operations += try body.step()
                let t1 = monotonicNanoseconds()
                if timeSteps { sampler.record(t1 &- t0) }
                if t1 >= deadline {
                    end = t1
                    break
                }
                untilTimed = gaps.next()
            } else {
                operations += try body.step()
                untilTimed -= 1
            }
        }
        let allocations = MallocCounter.count &- allocationsBefore
        sampler.enabled = false
        finished = true
        try body.finish()

        guard operations > 0 else { throw BenchmarkError.wrong("no operation completed in \(duration)") }
        let seconds = Double(end - start) / 1e9
        let latency = sampler.percentiles()
        return Measurement(operations: operations, opsPerSecond: Double(operations) / seconds,
                           p50: latency?.p50, p99: latency?.p99,
                           allocsPerOp: MallocCounter.isActive ? Double(allocations) / Double(operations) : nil)
    }

    /// `settings.repetitions` windows, each on a fresh body; nil when the case has no body.
    /// `progress` is called before each repetition with its number (1-based).
    public func run(_ c: BenchmarkCase, settings: RunSettings, progress: (Int) -> Void = { _ in }) throws -> CaseResult? {
        var measurements: [Measurement] = []
        for repetition in 1...max(1, settings.repetitions) {
            progress(repetition)
            guard let m = try measure(c, duration: settings.duration, warmup: settings.warmup) else { return nil }
            measurements.append(m)
        }
        return Self.summary(c, measurements)
    }

    /// Runs `cases` with their repetitions interleaved within each benchmark: the first
    /// repetition of every case of a benchmark (its baselines, backends and adapters),
    /// then the second of each, and so on. A machine that slows down for a while then
    /// slows down every row of the benchmark alike, so the ratios between them, which
    /// are what the table is read for, hold better than when each case ran its
    /// repetitions back to back. `progress` is called before each window with the case's
    /// index in `cases` and the repetition (1-based); `failed` when a case throws, which
    /// drops it from the later rounds. Results come in the order of `cases`.
    public func runInterleaved(_ cases: [BenchmarkCase], settings: RunSettings,
                               progress: (Int, Int) -> Void = { _, _ in },
                               failed: (BenchmarkCase, any Error) -> Void = { _, _ in }) -> [CaseResult] {
        var measurements = [[Measurement]](repeating: [], count: cases.count)
        var dropped = [Bool](repeating: false, count: cases.count)
        var first = 0
        while first < cases.count {
            var end = first
            while end < cases.count && cases[end].benchmark == cases[first].benchmark { end += 1 }
            for repetition in 1...max(1, settings.repetitions) {
                for i in first..<end where !dropped[i] {
                    progress(i, repetition)
                    do {
                        if let m = try measure(cases[i], duration: settings.duration, warmup: settings.warmup) {
                            measurements[i].append(m)
                        } else {
                            dropped[i] = true  // no body
                        }
                    } catch {
                        dropped[i] = true
                        measurements[i] = []
                        failed(cases[i], error)
                    }
                }
            }
            first = end
        }
        return cases.indices.compactMap { i in measurements[i].isEmpty ? nil : Self.summary(cases[i], measurements[i]) }
    }

    /// The medians of a case's repetitions.
    static func summary(_ c: BenchmarkCase, _ measurements: [Measurement]) -> CaseResult {
        func median(_ values: [Double]) -> Double {
            let sorted = values.sorted()
            return sorted.count % 2 == 1 ? sorted[sorted.count / 2] : (sorted[sorted.count / 2 - 1] + sorted[sorted.count / 2]) / 2
        }
        func medianOptional(_ values: [Double?]) -> Double? {
            let present = values.compactMap { $0 }
            return present.isEmpty ? nil : median(present)
        }
        let result = Measurement(operations: measurements.map(\.operations).reduce(0, +),
                                 opsPerSecond: median(measurements.map(\.opsPerSecond)),
                                 p50: medianOptional(measurements.map(\.p50)),
                                 p99: medianOptional(measurements.map(\.p99)),
                                 allocsPerOp: medianOptional(measurements.map(\.allocsPerOp)))
        return CaseResult(benchmarkCase: c, median: result, repetitions: measurements)
    }
}

extension Duration {
    var nanosecondsForBench: Int64 {
        let (seconds, attoseconds) = components
        return seconds &* 1_000_000_000 &+ attoseconds / 1_000_000_000
    }
}

/// Time one call in this many (a power of two, at most 1024), so the two clock reads
/// around it (~50 ns) cost under ~1% of the window.
func timingStride(callNanoseconds: UInt64) -> Int {
    var stride = 1
    while stride < 1024 && UInt64(stride) * callNanoseconds < 5_000 { stride <<= 1 }
    return stride
}

/// How many untimed calls to make before the next timed one: uniform in
/// 0...2 × (stride - 1), so one call in `stride` is timed on average. A fixed gap (one
/// timed call every `stride`, a power of two) samples a body that does something every
/// 2^k-th call (the readiness loops' wait every 8th turn, the async adapter's suspension
/// every 64th inline NOP) always at the same phase: its p99 then never shows the costly
/// call, or its p50 is the costly call, depending on where the window started.
struct SamplingGaps {
    let stride: Int
    private var random = XorShift(state: 0x2545_F491_4F6C_DD1D)

    init(stride: Int) { self.stride = max(1, stride) }

    @inline(__always)
    mutating func next() -> Int {
        stride == 1 ? 0 : Int(random.next() % UInt64(2 * stride - 1))
    }
}
