/// Which cases to run, in table order: per benchmark, per mechanism, the raw baseline
/// first, then the Plexus backend with each adapter.
public struct Plan: Sendable {
    public var benchmarks: [Benchmark]
    public var backends: [BackendName]
    public var adapters: [Adapter]

    public init(benchmarks: [Benchmark] = Benchmark.allCases, backends: [BackendName] = BackendName.allCases,
                adapters: [Adapter] = Adapter.allCases) {
        self.benchmarks = benchmarks
        self.backends = backends
        self.adapters = adapters
    }

    /// Every case that has a body, in table order.
    public var cases: [BenchmarkCase] {
        var result: [BenchmarkCase] = []
        for benchmark in benchmarks {
            for plexus in BackendName.plexus {
                let baseline = plexus.baseline
                if backends.contains(baseline) {
                    result.append(BenchmarkCase(benchmark, baseline, .raw))
                    if adapters.contains(.async) { result.append(BenchmarkCase(benchmark, baseline, .async)) }
                }
                guard backends.contains(plexus) else { continue }
                for adapter in adapters {
                    let c = BenchmarkCase(benchmark, plexus, adapter)
                    if BenchmarkRunner.hasBody(c) { result.append(c) }
                }
            }
        }
        return result.filter { BenchmarkRunner.hasBody($0) }
    }
}

/// The results of a run as a table (stdout) and as JSON (--json).
public struct Report: Sendable {
    public var results: [CaseResult] = []
    /// Lines printed under the table: skipped backends, placeholders, failures.
    public var notes: [String] = []
    public var benchmarks: [Benchmark] = []

    public init() {}

    public func result(_ benchmark: Benchmark, _ backend: BackendName, _ adapter: Adapter) -> CaseResult? {
        results.first { $0.benchmarkCase == BenchmarkCase(benchmark, backend, adapter) }
    }

    /// ops/s of the case over ops/s of its raw baseline, when both ran.
    public func ratio(_ r: CaseResult) -> Double? {
        guard let base = rawBaseline(r), base.median.opsPerSecond > 0 else { return nil }
        return r.median.opsPerSecond / base.median.opsPerSecond
    }

    /// The raw baseline row the case is compared with, when it ran.
    func rawBaseline(_ r: CaseResult) -> CaseResult? {
        let c = r.benchmarkCase
        // The floor row (raw-io_uring async) over the C loop; baselines themselves are the base.
        let baseline: BackendName = c.backend.isRaw ? c.backend : c.backend.baseline
        guard !(c.backend.isRaw && c.adapter == .raw) else { return nil }
        return result(c.benchmark, baseline, .raw)
    }

    /// ops/s of an async NOP over the concurrency runtime's floor (raw-io_uring async)
    /// measured in the same run: docs/design.md's target for the async NOP.
    public func floorRatio(_ r: CaseResult) -> Double? {
        let c = r.benchmarkCase
        guard c.adapter == .async, !c.backend.isRaw, let floor = result(c.benchmark, .rawIoUring, .async),
              floor.median.opsPerSecond > 0 else { return nil }
        return r.median.opsPerSecond / floor.median.opsPerSecond
    }

    /// What one suspension costs the Swift concurrency runtime at least, in this run: the
    /// floor row (one awaited NOP through a bare TaskExecutor) minus the raw ring's NOP.
    public var suspensionFloorNanoseconds: Double? {
        guard let floor = result(.nop1, .rawIoUring, .async), let raw = result(.nop1, .rawIoUring, .raw),
              floor.median.opsPerSecond > 0, raw.median.opsPerSecond > 0 else { return nil }
        let s = floor.median.nsPerOp - raw.median.nsPerOp
        return s > 0 ? s : nil
    }

    /// Suspensions per operation that an async body cannot avoid and its callback body
    /// does not have: ping-pong's reader suspends on its read of the empty pipe and its
    /// writer on being let go (AsyncPingPong); an echo request's client suspends on its
    /// receive of the echo, which the server has not sent yet, and the server on its
    /// receive of the next request, which the client has not sent yet (AsyncEcho); an
    /// io_uring NOP always goes to the kernel, so each task awaiting one suspends (nop-1's
    /// one task, each of nop-32's 32).
    static func unavoidableSuspensions(_ c: BenchmarkCase) -> Int? {
        switch c.benchmark {
        case .pingPong, .echo1, .echo50: 2
        case .nop1, .nop32: c.backend == .ioUring ? 1 : nil
        default: nil
        }
    }

    /// The best async/callback ratio the runtime allows for `r`'s benchmark and backend:
    /// the callback's ns/op plus the floor's cost of each unavoidable suspension.
    public func asyncBound(_ r: CaseResult) -> Double? {
        let c = r.benchmarkCase
        guard c.adapter == .async, let n = Self.unavoidableSuspensions(c), let s = suspensionFloorNanoseconds,
              let callback = callbackRow(r), callback.median.opsPerSecond > 0 else { return nil }
        let cb = callback.median.nsPerOp
        return cb / (cb + Double(n) * s)
    }

    /// ops/s of an async case over ops/s of the callback case on the same backend.
    public func asyncRatio(_ r: CaseResult) -> Double? {
        guard r.benchmarkCase.adapter == .async, let base = callbackRow(r), base.median.opsPerSecond > 0 else { return nil }
        return r.median.opsPerSecond / base.median.opsPerSecond
    }

    /// The callback row of the case's benchmark and backend, when it ran.
    func callbackRow(_ r: CaseResult) -> CaseResult? {
        result(r.benchmarkCase.benchmark, r.benchmarkCase.backend, .callback)
    }

    /// The performance goals (README, "Benchmarks") checked against this run: the
    /// callback adapter at 0.9x of its raw baseline or more, the async adapter at 0.9x of
    /// the callback adapter or more, no allocation per operation on the callback path and
    /// at most one on the async path, ping-pong at least as fast on io_uring as on epoll.
    /// A line per goal whose rows ran.
    public func goals() -> [String] {
        // A miss names the row, its ratio (rounded down, so that a row just under 0.9 never
        // reads "0.90x"), and the time per operation it adds to the row it is compared
        // with: what the ratio means in absolute terms (a fixed cost per operation weighs
        // more beside a cheap syscall).
        func named(_ r: CaseResult, _ x: Double, over base: CaseResult?) -> String {
            var name = "\(r.benchmarkCase.benchmark) \(r.benchmarkCase.backend) \(fixed((x * 100).rounded(.down) / 100, 2))x"
            if let base, r.median.opsPerSecond > 0, base.median.opsPerSecond > 0 {
                name += " (+" + formatNanoseconds(1e9 / r.median.opsPerSecond - 1e9 / base.median.opsPerSecond) + "/op)"
            }
            return name
        }
        func share(_ pairs: [(CaseResult, Double)], _ goal: String, base: (CaseResult) -> CaseResult?) -> String? {
            guard !pairs.isEmpty else { return nil }
            let below = pairs.filter { $0.1 < 0.9 }
            return "\(goal): \(pairs.count - below.count) of \(pairs.count) rows"
                + (below.isEmpty ? "" : "; below: " + below.map { named($0.0, $0.1, over: base($0.0)) }.joined(separator: ", "))
        }
        var lines: [String] = []
        let plexus = results.filter { !$0.benchmarkCase.backend.isRaw }
        let callbacks = plexus.filter { $0.benchmarkCase.adapter == .callback }
        let asyncs = plexus.filter { $0.benchmarkCase.adapter == .async }
        if let line = share(callbacks.compactMap { r in ratio(r).map { (r, $0) } }, "callback at 0.9x of raw or more",
                            base: rawBaseline) { lines.append(line) }
        if let line = share(asyncs.compactMap { r in asyncRatio(r).map { (r, $0) } }, "async at 0.9x of callback or more",
                            base: callbackRow) { lines.append(line) }
        var allocations: [String] = []
        if let most = callbacks.compactMap(\.median.allocsPerOp).max() { allocations.append("callback at most \(fixed(most, 2)) (goal 0)") }
        if let most = asyncs.compactMap(\.median.allocsPerOp).max() { allocations.append("async at most \(fixed(most, 2)) (goal 1 at most)") }
        if !allocations.isEmpty { lines.append("allocations per operation: " + allocations.joined(separator: ", ")) }
        let pingpong = [Adapter.raw, .callback, .async].compactMap { adapter -> String? in
            guard let uring = result(.pingPong, .ioUring, adapter), let epoll = result(.pingPong, .epoll, adapter),
                  epoll.median.opsPerSecond > 0 else { return nil }
            return "\(adapter) \(fixed(uring.median.opsPerSecond / epoll.median.opsPerSecond, 2))x"
        }
        if !pingpong.isEmpty { lines.append("pingpong on io_uring over epoll (goal 1x or more): " + pingpong.joined(separator: ", ")) }
        return lines
    }

    public func table(allocationsCounted: Bool) -> String {
        let header = ["benchmark", "backend", "adapter", "ops/s", "ns/op", "p50", "p99", "allocs/op", "vs raw", "vs cb"]
        var rows: [[String]] = []
        for benchmark in benchmarks {
            for r in results where r.benchmarkCase.benchmark == benchmark {
                let c = r.benchmarkCase
                let m = r.median
                rows.append([
                    c.benchmark.rawValue, c.backend.rawValue, c.adapter.rawValue,
                    formatRate(m.opsPerSecond), formatNanoseconds(m.nsPerOp),
                    m.p50.map(formatNanoseconds) ?? "-", m.p99.map(formatNanoseconds) ?? "-",
                    m.allocsPerOp.map { fixed($0, 2) } ?? "n/a",
                    c.backend.isRaw && c.adapter == .raw ? "base" : ratio(r).map { fixed($0, 2) + "x" } ?? "-",
                    asyncRatio(r).map { fixed($0, 2) + "x" } ?? (c.adapter == .callback ? "base" : ""),
                ])
            }
        }
        var widths = header.map(\.count)
        for row in rows { for (i, cell) in row.enumerated() { widths[i] = max(widths[i], cell.count) } }
        func line(_ cells: [String]) -> String {
            cells.enumerated().map { i, cell in
                let pad = String(repeating: " ", count: widths[i] - cell.count)
                return i < 3 ? cell + pad : pad + cell  // names left, numbers right
            }.joined(separator: "  ")
        }
        var out = line(header) + "\n" + line(widths.map { String(repeating: "-", count: $0) }) + "\n"
        var previous: String?
        for row in rows {
            if let previous, previous != row[0] { out += "\n" }
            out += line(row) + "\n"
            previous = row[0]
        }
        out += "\nlatency samples: "
        out += benchmarks.filter(\.isImplemented).map { "\($0) \($0.latencyUnit)" }.joined(separator: "; ")
        let asyncNotes = benchmarks.filter { b in
            b.asyncLatencyNote != nil && results.contains { $0.benchmarkCase.benchmark == b && $0.benchmarkCase.adapter == .async }
        }
        for b in asyncNotes { out += ". \(b) \(b.asyncLatencyNote!)" }
        out += ".\nvs raw: ops/s over the raw baseline of the same mechanism. vs cb: async ops/s over callback ops/s on the same backend. allocs/op: malloc-family calls per op in the timed window, all threads"
        out += allocationsCounted ? ".\n" : " (not counted in this process: sanitizer build).\n"
        let floors = results.compactMap { r in floorRatio(r).map { "\(r.benchmarkCase.backend) \(fixed($0, 2))x" } }
        if !floors.isEmpty {
            out += "raw-io_uring async (nop-1): the Swift concurrency floor, one awaited NOP through a bare "
                + "TaskExecutor over a raw ring; Plexus's async nop-1 over it: " + floors.joined(separator: ", ") + ".\n"
        }
        if let s = suspensionFloorNanoseconds {
            let bounds = results.compactMap { r -> String? in
                guard let bound = asyncBound(r), let measured = asyncRatio(r) else { return nil }
                let c = r.benchmarkCase
                return "\(c.benchmark) \(c.backend) at most \(fixed(bound, 2))x (measured \(fixed(measured, 2))x)"
            }
            if !bounds.isEmpty {
                out += "async over callback, the runtime's limit: a suspension costs at least \(Int(s.rounded())) ns here "
                    + "(the floor row minus raw-io_uring's nop-1); with the suspensions the callback body does not have "
                    + "(pingpong 2 per round trip, echo 2 per request, io_uring nop-1 and nop-32 1 per NOP), async/cb can reach " + bounds.joined(separator: ", ") + ".\n"
            }
        }
        let goalLines = goals()
        if !goalLines.isEmpty { out += "goals, in this run:\n" + goalLines.map { "  " + $0 + "\n" }.joined() }
        for note in notes { out += note + "\n" }
        return out
    }

    /// One record per benchmark × backend × adapter that ran.
    public func json() -> String {
        func number(_ v: Double?) -> String {
            guard let v, v.isFinite else { return "null" }
            return v == v.rounded() && abs(v) < 1e15 ? String(Int64(v)) : "\(v)"
        }
        let records = results.map { r in
            let c = r.benchmarkCase
            let m = r.median
            return "  {\"benchmark\": \"\(c.benchmark.rawValue)\", \"backend\": \"\(c.backend.rawValue)\", "
                + "\"adapter\": \"\(c.adapter.rawValue)\", \"ops_per_sec\": \(number(m.opsPerSecond)), "
                + "\"ns_per_op\": \(number(m.nsPerOp)), \"p50_ns\": \(number(m.p50)), \"p99_ns\": \(number(m.p99)), "
                + "\"allocs_per_op\": \(number(m.allocsPerOp))}"
        }
        return "[\n" + records.joined(separator: ",\n") + "\n]\n"
    }
}

// MARK: Formatting without Foundation

/// `value` with `decimals` digits after the point.
func fixed(_ value: Double, _ decimals: Int) -> String {
    guard value.isFinite else { return "-" }
    var scale = 1.0
    for _ in 0..<decimals { scale *= 10 }
    let scaled = Int64((abs(value) * scale).rounded())
    let whole = scaled / Int64(scale)
    var text = (value < 0 && scaled != 0 ? "-" : "") + String(whole)
    if decimals > 0 {
        let fraction = String(scaled % Int64(scale))
        text += "." + String(repeating: "0", count: decimals - fraction.count) + fraction
    }
    return text
}

/// 3 significant digits at most: 12.3M, 456k, 7.89k, 812.
func formatRate(_ v: Double) -> String {
    func scaled(_ x: Double, _ suffix: String) -> String {
        fixed(x, x < 10 ? 2 : x < 100 ? 1 : 0) + suffix
    }
    if v >= 1e9 { return scaled(v / 1e9, "G") }
    if v >= 1e6 { return scaled(v / 1e6, "M") }
    if v >= 1e3 { return scaled(v / 1e3, "k") }
    return scaled(v, "")
}

/// 812ns, 1.23us, 45.6us, 1.20ms.
func formatNanoseconds(_ v: Double) -> String {
    if !v.isFinite { return "-" }
    if v < 1_000 { return fixed(v, 0) + "ns" }
    if v < 1_000_000 { return fixed(v / 1e3, v < 10_000 ? 2 : 1) + "us" }
    if v < 1_000_000_000 { return fixed(v / 1e6, 2) + "ms" }
    return fixed(v / 1e9, 2) + "s"
}
