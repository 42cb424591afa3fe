import ArgumentParser
import Glibc
import PlexusBench

@main
struct PlexusBenchCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "plexus-bench",
        abstract: "Plexus microbenchmarks: every backend and adapter side by side with raw baselines.",
        discussion: """
        For each benchmark, each backend runs it through each adapter, next to a raw \
        baseline loop that calls the C shim (liburing, epoll_wait, poll, plain syscalls) \
        directly with no Plexus layer. The table on stdout gives, per benchmark × backend \
        × adapter, the median over the repetitions (interleaved: each benchmark's cases \
        take turns, one window each, so a slow spell of the machine hits them alike) of: \
        ops/s, ns/op, p50 and p99 latency \
        (sampled with CLOCK_MONOTONIC; per op, per batch or per turn, as the legend says), \
        malloc-family calls per operation (counted in this process by an interposed \
        malloc, all threads, after warm-up), and ops/s as a ratio to the raw baseline of \
        the same mechanism. A progress line goes to stderr.

        Benchmarks: \(Benchmark.allCases.map(\.rawValue).joined(separator: ", ")). \
        `plexus-bench --list` says what each one does and which backends start here.

        Backends: io_uring, epoll, poll (Plexus) and raw-io_uring, raw-epoll, raw-poll \
        (baselines). Adapters: raw (the IOBackend protocol itself; also the adapter name \
        of the baselines), callback (EventLoop callbacks), async (async/await, timed \
        inside a task whose executor is the loop; the "vs cb" column is its rate over the \
        callback rate). timers has no raw-adapter or async row (its raw-* baselines run); mq-* \
        have no raw rows. With async \
        selected, nop-1 also has a raw-io_uring async row: the Swift concurrency runtime's \
        floor (one awaited NOP through a bare TaskExecutor over a raw ring), the async NOP's \
        target; the lines under the table give each async nop-1 over it, and the best \
        async/callback ratio the runtime allows where the async body must suspend and the \
        callback body does not (pingpong; nop-1 and nop-32 on io_uring). The last lines check the \
        performance goals against the run: callback at 0.9x of raw or more, async at 0.9x \
        of callback or more, allocations per operation (0 callback, at most 1 async), \
        pingpong on io_uring at least as fast as on epoll; a row that misses is named with \
        the time per operation it adds to the row it is compared with.

        Build with `swift build -c release`: debug builds measure the compiler, not Plexus.
        """
    )

    @Option(name: .long, help: ArgumentHelp("Comma-separated benchmarks to run, or 'all'.", valueName: "list"))
    var benchmarks: String = "all"

    @Option(name: .long, help: ArgumentHelp("""
        Comma-separated backends, or 'all' (every one that starts here). Naming a Plexus \
        backend also runs its raw baseline (see --no-baselines).
        """, valueName: "list"))
    var backends: String = "all"

    @Option(name: .long, help: ArgumentHelp("Comma-separated adapters for the Plexus backends (raw, callback, async), or 'all'. Baselines run as 'raw' (and raw-io_uring nop-1 as 'async': the floor).", valueName: "list"))
    var adapters: String = "all"

    @Option(name: .long, help: ArgumentHelp("Length of each timed run, e.g. 200ms, 0.5s, 1s.", valueName: "time"))
    var duration: String = "200ms"

    @Option(name: .long, help: ArgumentHelp("Untimed warm-up before each timed run (mq-* rows warm up with a fixed calibration run instead, which also sizes their message count to --duration).", valueName: "time"))
    var warmup: String = "40ms"

    @Option(name: .long, help: "Timed runs per case, each on freshly set-up fds and loops; the table reports the median.")
    var repetitions: Int = 5

    @Option(name: .long, help: ArgumentHelp("Also write the results as JSON to FILE: one record per benchmark × backend × adapter with benchmark, backend, adapter, ops_per_sec, ns_per_op, p50_ns, p99_ns, allocs_per_op.", valueName: "file"))
    var json: String?

    @Flag(name: .long, help: "Do not add the raw baseline of each Plexus backend named in --backends.")
    var noBaselines = false

    @Flag(name: .long, help: "No progress line on stderr.")
    var quiet = false

    @Flag(name: .long, help: "List the benchmarks and which backends start here, then exit.")
    var list = false

    func validate() throws {
        guard repetitions >= 1 else { throw ValidationError("--repetitions must be at least 1") }
        _ = try parseDuration(duration, "--duration")
        _ = try parseDuration(warmup, "--warmup")
        _ = try selection(benchmarks, Benchmark.self, "--benchmarks")
        _ = try selection(backends, BackendName.self, "--backends")
        _ = try selection(adapters, Adapter.self, "--adapters")
    }

    func run() throws {
        let settings = RunSettings(duration: try parseDuration(duration, "--duration"),
                                   warmup: try parseDuration(warmup, "--warmup"), repetitions: repetitions)
        let chosenBenchmarks = try selection(benchmarks, Benchmark.self, "--benchmarks")
        let chosenAdapters = try selection(adapters, Adapter.self, "--adapters")
        var chosenBackends = try selection(backends, BackendName.self, "--backends")
        if !noBaselines {
            for b in chosenBackends where !b.isRaw && !chosenBackends.contains(b.baseline) { chosenBackends.append(b.baseline) }
        }

        var report = Report()
        report.benchmarks = chosenBenchmarks
        var usable: [BackendName] = []
        for backend in BackendName.allCases where chosenBackends.contains(backend) {
            if let why = BenchmarkRunner.unavailability(backend) {
                report.notes.append("\(backend): skipped, it does not start here: \(why)")
            } else {
                usable.append(backend)
            }
        }
        if list {
            print("benchmarks:")
            for b in Benchmark.allCases {
                print("  \(b.rawValue.padding(12)) \(b.summary)")
                if b.isImplemented { print("  \("".padding(12)) latency sampled \(b.latencyUnit)") }
                if let note = b.asyncLatencyNote { print("  \("".padding(12)) \(note)") }
            }
            print("backends that start here: \(usable.map(\.rawValue).joined(separator: ", "))")
            for note in report.notes { print(note) }
            return
        }
        if chosenBenchmarks.contains(where: \.isMessageQueue) {
            report.notes.append("mq-*: MessageQueueBenchmark.measureHandOff, loop-signal wake, no raw baseline; allocs/op from the first message sent to the last received (its set-up left out).")
        }

        let plan = Plan(benchmarks: chosenBenchmarks, backends: usable, adapters: chosenAdapters)
        let cases = plan.cases
        guard !cases.isEmpty else {
            throw ValidationError("nothing to run: no benchmark of --benchmarks \(benchmarks) has a row for --adapters \(adapters) on --backends \(backends) here")
        }
        // Opened (created or truncated) before the run, so that a path that cannot be
        // written fails now, not after it; but only once there is a run: a refused one or
        // --list leaves an existing file as it was.
        let jsonFile = try json.map { try OutputFile(path: $0) }
        let progress = Progress(enabled: !quiet, total: cases.count, repetitions: settings.repetitions)
        let runner = BenchmarkRunner()
        var failures = 0
        report.results = runner.runInterleaved(
            cases, settings: settings,
            progress: { i, repetition in progress.show(i + 1, cases[i], repetition) },
            failed: { c, error in
                failures += 1
                report.notes.append("\(c): FAILED: \(error)")
            })
        progress.done()
        if !MallocCounterInfo.active {
            report.notes.append("allocations are not counted in this process (sanitizer build): allocs/op shows n/a.")
        }
        print(report.table(allocationsCounted: MallocCounterInfo.active), terminator: "")
        try jsonFile?.write(report.json())
        if failures > 0 { throw ExitCode(1) }
    }
}

enum MallocCounterInfo {
    static var active: Bool { MallocCounter.isActive }
}

/// The progress line on stderr: rewritten in place on a terminal; otherwise a line per
/// case for its first window, then a line per round of a benchmark's windows.
final class Progress {
    let enabled: Bool
    let total: Int
    let repetitions: Int
    let terminal = isatty(2) != 0
    var lastRound = ""

    init(enabled: Bool, total: Int, repetitions: Int) {
        self.enabled = enabled
        self.total = total
        self.repetitions = repetitions
    }

    func show(_ index: Int, _ c: BenchmarkCase, _ repetition: Int) {
        guard enabled else { return }
        let text = "[\(index)/\(total)] \(c.benchmark) \(c.backend) \(c.adapter) (run \(repetition)/\(repetitions))"
        if terminal {
            writeStderr("\r\u{1B}[K" + text)
        } else if repetition == 1 {
            writeStderr(text + "\n")
        } else if lastRound != "\(c.benchmark) \(repetition)" {
            writeStderr("[\(index)/\(total)] \(c.benchmark): every case, run \(repetition)/\(repetitions)\n")
        }
        lastRound = "\(c.benchmark) \(repetition)"
    }

    func done() {
        if enabled && terminal { writeStderr("\r\u{1B}[K") }
    }
}

func writeStderr(_ text: String) {
    var text = text
    text.withUTF8 { bytes in
        var offset = 0
        while offset < bytes.count {
            let n = Glibc.write(2, bytes.baseAddress! + offset, bytes.count - offset)
            if n <= 0 { return }
            offset += n
        }
    }
}

/// The --json file: open(2)ed (created or truncated) before the run, written after it.
final class OutputFile {
    let path: String
    private let fd: Int32

    init(path: String) throws(OutputError) {
        self.path = path
        fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw OutputError(action: "open", path: path, errno: errno) }
    }

    deinit { close(fd) }

    func write(_ contents: String) throws(OutputError) {
        var contents = contents
        let failed: Int32? = contents.withUTF8 { bytes in
            var offset = 0
            while offset < bytes.count {
                let n = Glibc.write(fd, bytes.baseAddress! + offset, bytes.count - offset)
                if n < 0 && errno == EINTR { continue }
                guard n > 0 else { return n < 0 ? errno : EIO }
                offset += n
            }
            return nil
        }
        if let failed { throw OutputError(action: "write", path: path, errno: failed) }
    }
}

/// A failure to write the results: not a usage error, so no usage text; exit status 1.
struct OutputError: Error, CustomStringConvertible {
    let action: String
    let path: String
    let errno: Int32
    var description: String { "cannot \(action) \(path): \(String(cString: strerror(errno)))" }
}

/// "200ms", "0.5s", "1s", "500us", or plain seconds ("0.2").
func parseDuration(_ text: String, _ option: String) throws -> Duration {
    let units: [(String, Double)] = [("ms", 1e-3), ("us", 1e-6), ("ns", 1e-9), ("s", 1)]
    var number = Substring(text)
    var scale = 1.0
    for (suffix, factor) in units where text.hasSuffix(suffix) {
        number = text.dropLast(suffix.count)
        scale = factor
        break
    }
    // Decimal digits and a point only: Double() also reads hex ("0x10") and exponents.
    guard number.allSatisfy({ $0.isASCII && ($0.isNumber || $0 == ".") }), let value = Double(number),
          value * scale >= 1e-6, value * scale < 3600 else {
        throw ValidationError("\(option): '\(text)' is not a duration like 200ms, 0.5s or 1s (from 1us to under an hour)")
    }
    return .nanoseconds(Int64(value * scale * 1e9))
}

/// A comma-separated list of raw values, or "all".
func selection<T: RawRepresentable & CaseIterable>(_ text: String, _: T.Type, _ option: String) throws -> [T] where T.RawValue == String {
    if text == "all" { return Array(T.allCases) }
    var chosen: [T] = []
    for name in text.split(separator: ",").map({ String($0).trimmingWhitespace() }) where !name.isEmpty {
        guard let value = T(rawValue: name) else {
            throw ValidationError("\(option): unknown '\(name)'; valid: all, \(T.allCases.map(\.rawValue).joined(separator: ", "))")
        }
        // A name given twice is one selection: one row, one JSON record.
        if !chosen.contains(where: { $0.rawValue == name }) { chosen.append(value) }
    }
    guard !chosen.isEmpty else { throw ValidationError("\(option) is empty") }
    return chosen
}

extension String {
    func padding(_ width: Int) -> String { count >= width ? self : self + String(repeating: " ", count: width - count) }
    func trimmingWhitespace() -> String {
        String(drop(while: { $0 == " " }).reversed().drop(while: { $0 == " " }).reversed())
    }
}
