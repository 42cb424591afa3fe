import Glibc
import Plexus
import PlexusBench
import Testing

extension PlexusTests {
    /// Every microbenchmark body, run briefly on every backend that starts here (or only on
    /// PLEXUS_BACKEND's and its raw baseline when that is set), checking its result, never
    /// its speed. PLEXUS_BENCH_FULL=1 also runs the whole table at full length and prints it.
    /// Nested in the serialized root suite: the fd-leak check covers every body too.
    @Suite struct BenchmarkTests {
        static let environmentBackend: String? = {
            guard let raw = getenv("PLEXUS_BACKEND") else { return nil }
            let name = String(cString: raw)
            return name.isEmpty || name == "auto" ? nil : name
        }()

        /// The backends to run on: PLEXUS_BACKEND's and its baseline, or all that start.
        static var backends: [BackendName] {
            if let name = environmentBackend, let named = BackendName(rawValue: name) {
                return [named, named.baseline]
            }
            return BackendName.allCases.filter { BenchmarkRunner.unavailability($0) == nil }
        }

        static var cases: [BenchmarkCase] { Plan(backends: backends).cases }

        static var full: Bool { getenv("PLEXUS_BENCH_FULL").map { String(cString: $0) == "1" } ?? false }

        @Test func namedBackendStarts() throws {
            guard let name = Self.environmentBackend else { return }
            let named = try #require(BackendName(rawValue: name), "PLEXUS_BACKEND=\(name) is not a backend")
            #expect(BenchmarkRunner.unavailability(named) == nil, "PLEXUS_BACKEND=\(name) does not start")
        }

        @Test(arguments: cases)
        func resultIsCorrect(_ c: BenchmarkCase) throws {
            // Each body checks every operation's result as it runs and, in finish, that every
            // operation completed exactly once; a wrong result throws.
            let result = try #require(try BenchmarkRunner().run(c, settings: .quick), "\(c) has no body")
            #expect(result.median.operations > 0)
            #expect(result.median.opsPerSecond > 0)
            if MallocCounter.isActive { #expect(result.median.allocsPerOp != nil) }
        }

        @Test func everyImplementedBenchmarkHasACaseOnEachBackend() {
            let cases = Self.cases
            if Self.backends.contains(.rawIoUring) {
                #expect(cases.contains(BenchmarkCase(.nop1, .rawIoUring, .async)), "nop-1 has no floor row")
            }
            for backend in Self.backends {
                for benchmark in Benchmark.allCases where benchmark.isImplemented {
                    if backend.isRaw && !benchmark.hasBaseline { continue }
                    let present = cases.contains { $0.benchmark == benchmark && $0.backend == backend }
                    #expect(present, "\(benchmark) has no case on \(backend)")
                    // Every adapter the benchmark names has a body on every Plexus backend.
                    if !backend.isRaw {
                        for adapter in benchmark.adapters {
                            #expect(cases.contains(BenchmarkCase(benchmark, backend, adapter)), "\(benchmark) has no \(adapter) case on \(backend)")
                        }
                    }
                }
            }
            #expect(!cases.contains { $0.benchmark.isMessageQueue && $0.backend.isRaw }, "the message queue has no raw baseline")
        }

        @Test func reportShowsAsyncOverCallback() throws {
            let callback = CaseResult(benchmarkCase: BenchmarkCase(.nop1, .epoll, .callback),
                                      median: Measurement(operations: 10, opsPerSecond: 1000), repetitions: [])
            let async = CaseResult(benchmarkCase: BenchmarkCase(.nop1, .epoll, .async),
                                   median: Measurement(operations: 10, opsPerSecond: 500), repetitions: [])
            var report = Report()
            report.benchmarks = [.nop1]
            report.results = [callback, async]
            #expect(report.asyncRatio(async) == 0.5)
            #expect(report.asyncRatio(callback) == nil)
            #expect(report.table(allocationsCounted: true).contains("0.50x"))
        }

        @Test func reportBoundsAsyncOverCallbackByTheFloor() throws {
            func result(_ b: Benchmark, _ backend: BackendName, _ adapter: Adapter, nsPerOp: Double) -> CaseResult {
                CaseResult(benchmarkCase: BenchmarkCase(b, backend, adapter),
                           median: Measurement(operations: 10, opsPerSecond: 1e9 / nsPerOp), repetitions: [])
            }
            // The floor's NOP takes 250 ns more than the raw ring's: a suspension costs 250 ns.
            let pingAsync = result(.pingPong, .epoll, .async, nsPerOp: 2000)
            var report = Report()
            report.benchmarks = [.nop1, .pingPong]
            report.results = [result(.nop1, .rawIoUring, .raw, nsPerOp: 300), result(.nop1, .rawIoUring, .async, nsPerOp: 550),
                              result(.pingPong, .epoll, .callback, nsPerOp: 1500), pingAsync]
            #expect(abs(try #require(report.suspensionFloorNanoseconds) - 250) < 1e-6)
            // Two suspensions per round trip on top of the callback's 1500 ns: 1500 / 2000.
            #expect(abs(try #require(report.asyncBound(pingAsync)) - 0.75) < 1e-9)
            #expect(report.asyncBound(result(.nop1, .epoll, .async, nsPerOp: 100)) == nil, "an epoll NOP need not suspend")
            // Each of nop-32's tasks suspends once per io_uring NOP: 100 / (100 + 250).
            report.results.append(result(.nop32, .ioUring, .callback, nsPerOp: 100))
            let nop32Bound = try #require(report.asyncBound(result(.nop32, .ioUring, .async, nsPerOp: 400)))
            #expect(abs(nop32Bound - 100.0 / 350.0) < 1e-9)
            #expect(report.asyncBound(result(.nop32, .poll, .async, nsPerOp: 100)) == nil, "a poll NOP need not suspend")
            // An echo request: the client's and the server's receive, 5000 / (5000 + 500).
            report.results.append(result(.echo1, .ioUring, .callback, nsPerOp: 5000))
            let echoBound = try #require(report.asyncBound(result(.echo1, .ioUring, .async, nsPerOp: 6000)))
            #expect(abs(echoBound - 5000.0 / 5500.0) < 1e-9)
            #expect(report.asyncBound(result(.file1, .ioUring, .async, nsPerOp: 600)) == nil, "a cached read need not suspend")
            #expect(report.table(allocationsCounted: true).contains("pingpong epoll at most 0.75x (measured 0.75x)"))
        }

        @Test func reportChecksTheGoals() throws {
            func result(_ b: Benchmark, _ backend: BackendName, _ adapter: Adapter, rate: Double, allocs: Double = 0) -> CaseResult {
                CaseResult(benchmarkCase: BenchmarkCase(b, backend, adapter),
                           median: Measurement(operations: 10, opsPerSecond: rate, allocsPerOp: allocs), repetitions: [])
            }
            var report = Report()
            report.benchmarks = [.pingPong, .file1]
            report.results = [
                result(.pingPong, .rawEpoll, .raw, rate: 1000), result(.pingPong, .epoll, .callback, rate: 600),
                result(.pingPong, .epoll, .async, rate: 540, allocs: 0.5),
                result(.pingPong, .rawIoUring, .raw, rate: 700), result(.pingPong, .ioUring, .callback, rate: 690),
                result(.pingPong, .ioUring, .async, rate: 400),
                result(.file1, .rawPoll, .raw, rate: 100), result(.file1, .poll, .callback, rate: 95, allocs: 0.01),
                result(.file1, .rawEpoll, .raw, rate: 100), result(.file1, .epoll, .callback, rate: 89.8),
            ]
            let goals = report.goals()
            #expect(goals.count == 4, "\(goals)")
            // Each miss also gives the time per operation it adds: 1/600 s - 1/1000 s, and so on.
            #expect(goals.contains("callback at 0.9x of raw or more: 2 of 4 rows; below: pingpong epoll 0.60x (+666.7us/op), "
                                   + "file-qd1 epoll 0.89x (+1.14ms/op)"))
            #expect(goals.contains("async at 0.9x of callback or more: 1 of 2 rows; below: pingpong io_uring 0.57x (+1.05ms/op)"))
            #expect(goals.contains("allocations per operation: callback at most 0.01 (goal 0), async at most 0.50 (goal 1 at most)"))
            #expect(goals.contains("pingpong on io_uring over epoll (goal 1x or more): callback 1.15x, async 0.74x"))
            #expect(report.table(allocationsCounted: true).contains("goals, in this run:\n  callback at 0.9x"))
        }

        /// Repetitions take turns within a benchmark (so a slow spell hits its rows alike),
        /// and results come back in the order of the cases.
        @Test func repetitionsOfABenchmarksCasesAreInterleaved() throws {
            let cases = [BenchmarkCase(.nop1, .rawEpoll, .raw), BenchmarkCase(.nop1, .rawPoll, .raw),
                         BenchmarkCase(.nop32, .rawEpoll, .raw)]
            var settings = RunSettings.quick
            settings.repetitions = 2
            var order: [String] = []
            let results = BenchmarkRunner().runInterleaved(cases, settings: settings, progress: { i, rep in order.append("\(i).\(rep)") }) { c, error in
                Issue.record("\(c): \(error)")
            }
            #expect(order == ["0.1", "1.1", "0.2", "1.2", "2.1", "2.2"])
            #expect(results.map(\.benchmarkCase) == cases)
            #expect(results.allSatisfy { $0.repetitions.count == 2 })
        }

        @Test func mallocCounterCountsAllocations() {
            guard MallocCounter.isActive else { return }  // sanitizer build: the sanitizer owns malloc
            let before = MallocCounter.count
            let boxes = (0..<10).map { _ in CountedBox() }
            #expect(MallocCounter.count - before >= 10)
            #expect(boxes.count == 10)
        }

        @Test func jsonHasExactlyTheDocumentedFields() throws {
            let c = BenchmarkCase(.nop1, .rawEpoll, .raw)
            var report = Report()
            report.benchmarks = [.nop1]
            report.results = [try #require(try BenchmarkRunner().run(c, settings: .quick))]
            let json = report.json()
            for field in ["benchmark", "backend", "adapter", "ops_per_sec", "ns_per_op", "p50_ns", "p99_ns", "allocs_per_op"] {
                #expect(json.contains("\"\(field)\": "), "JSON lacks \(field)")
            }
            #expect(json.contains("\"benchmark\": \"nop-1\", \"backend\": \"raw-epoll\", \"adapter\": \"raw\""))
            #expect(report.table(allocationsCounted: true).contains("nop-1"))
        }

        /// plexus-bench as a user runs it (the debug build beside the tests): input it cannot
        /// use is refused before anything runs, with exit 64 and what is wrong, and an
        /// unwritable --json path with exit 1 and the errno, not after the whole table.
        @Test func plexusBenchRefusesWhatItCannotUseBeforeItRuns() throws {
            let bench = try builtExecutable("plexus-bench")
            let quick = ["--duration", "10ms", "--warmup", "1ms", "--repetitions", "1", "--quiet"]
            for (arguments, complaint) in [(["--duration", "0.1ns"], "--duration"), (["--warmup", "0x10ms"], "--warmup"),
                                           (["--benchmarks", "mq-handoff", "--adapters", "raw"], "nothing to run")] {
                let run = try runChild([bench] + quick + arguments)
                #expect(run.exitCode == 64 && run.stderr.contains(complaint), "\(arguments): \(run)")
                #expect(run.stdout.isEmpty, "\(arguments): ran anyway")
            }
            let unwritable = try runChild([bench] + quick + ["--benchmarks", "nop-1", "--json", "/nonexistent-dir/out.json"])
            #expect(unwritable.exitCode == 1 && unwritable.stderr.contains("cannot open /nonexistent-dir/out.json: No such file"),
                    "\(unwritable)")
            #expect(unwritable.stdout.isEmpty, "ran before it found the path unwritable")
        }

        /// A name listed twice is one selection: one row and one JSON record per case.
        @Test func plexusBenchRunsANameListedTwiceOnce() throws {
            let bench = try builtExecutable("plexus-bench")
            let path = "/tmp/plexus-bench-\(getpid())-twice.json"
            defer { unlink(path) }
            let run = try runChild([bench, "--duration", "10ms", "--warmup", "1ms", "--repetitions", "1", "--quiet",
                                    "--benchmarks", "nop-1,nop-1", "--backends", "raw-epoll,raw-epoll", "--json", path])
            #expect(run.exitCode == 0, "\(run)")
            #expect(run.stdout.components(separatedBy: "raw-epoll").count - 1 == 1, "\(run.stdout)")
            #expect(readWholeFile(path).components(separatedBy: "\"benchmark\"").count - 1 == 1, "\(readWholeFile(path))")
        }

        @Test(.enabled(if: PlexusTests.BenchmarkTests.full, "set PLEXUS_BENCH_FULL=1 to run the full table"))
        func fullTable() throws {
            var report = Report()
            report.benchmarks = Benchmark.allCases
            report.results = BenchmarkRunner().runInterleaved(Self.cases, settings: RunSettings()) { c, error in
                Issue.record("\(c): \(error)")
            }
            print(report.table(allocationsCounted: MallocCounter.isActive))
        }
    }
}

private final class CountedBox {
    var value = 0
}
