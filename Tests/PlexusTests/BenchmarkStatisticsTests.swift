import Glibc
import Plexus
@testable import PlexusBench
import Testing

extension PlexusTests {
    /// What the harness computes from its samples and counters, on synthetic bodies whose
    /// true figures are known.
    @Suite struct BenchmarkStatisticsTests {
        /// Every 8th step is slow, as a readiness loop's turn that makes its zero-timeout
        /// wait every 8th time (raw-epoll, raw-poll, the readiness engine).
        final class EveryEighthStepSlow: BenchmarkBody {
            var steps = 0
            func step() throws -> Int {
                let cost: UInt64 = steps & 7 == 7 ? 20_000 : 200
                steps += 1
                let end = monotonicNanoseconds() &+ cost
                while monotonicNanoseconds() < end {}
                return 1
            }
            func finish() throws {}
        }

        /// 12.5% of the steps take 20 us: the p99 is a slow step and the p50 a fast one, in
        /// every window, wherever the warm-up left the body's period. Sampled at a fixed
        /// power-of-two stride, every sample of a window fell on the same phase.
        @Test func sampledPercentilesSeeEveryPhaseOfAPeriodicBody() throws {
            let runner = BenchmarkRunner()
            for window in 0..<6 {
                let m = try runner.measure(EveryEighthStepSlow(), duration: .milliseconds(30),
                                           warmup: .microseconds(300 + 700 * window))
                let p50 = try #require(m.p50), p99 = try #require(m.p99)
                #expect(p50 < 10_000, "window \(window): p50 \(p50) ns is a slow step")
                #expect(p99 >= 20_000, "window \(window): p99 \(p99) ns is a fast step")
            }
        }

        /// A sampler that fills up keeps a uniform sample of the whole window: 30% fast then
        /// 70% slow samples, 100 times its capacity, give a slow p50. It used to keep the
        /// first `capacity` samples and drop the rest: every percentile was a fast one.
        @Test func aFullSamplerKeepsAUniformSampleOfTheWindow() {
            let sampler = LatencySampler(capacity: 1_000)
            sampler.enabled = true
            for i in 0..<100_000 { sampler.record(i < 30_000 ? 100 : 1_000_000) }
            #expect(sampler.count == 1_000 && sampler.seen == 100_000)
            let (p50, p99) = sampler.percentiles()!
            #expect(p50 == 1_000_000 && p99 == 1_000_000, "p50 \(p50) p99 \(p99)")
            sampler.reset()
            for v in [300, 100, 200] as [UInt64] { sampler.record(v) }
            #expect(sampler.count == 3 && sampler.seen == 3 && sampler.percentiles()!.p50 == 200)
        }

        /// Two tasks on a loop taking turns, 20 us of work a unit; counts the units that
        /// completed while the window was open.
        final class TakingTurns: AsyncWorkload, @unchecked Sendable {
            let loop: EventLoop
            var workers: Int { 2 }
            weak var window: AsyncWindow<TakingTurns>?
            var completed = 0
            var completedWhileTimed = 0
            /// Units the second worker (not the timekeeper) completed while the window was open.
            var otherWorkerWhileTimed = 0
            var completedOperations: Int { completed }

            init() throws { loop = try EventLoop(backend: .poll) }

            nonisolated(nonsending) func work(_ worker: Int, times: Int, timing sampler: LatencySampler?) async throws {
                for _ in 0..<times {
                    let end = monotonicNanoseconds() &+ 20_000
                    while monotonicNanoseconds() < end {}
                    await Task.yield()
                    completed += 1
                    if window?.phase == .timed {
                        completedWhileTimed += 1
                        if worker != 0 { otherWorkerWhileTimed += 1 }
                    }
                }
            }

            func check() throws {}
            func close() {}
        }

        /// An async window counts every operation that completed in it, the other workers'
        /// too. They used to be counted per `work` call of 64 units: a window shorter than
        /// such a call counted the timekeeper's units alone (echo-50 async, 30 ms: 1.9k/s
        /// of 96k/s).
        @Test func asyncWindowCountsEveryWorkersOperationsAsTheyComplete() throws {
            for duration in [5, 10, 20] {
                let workload = try TakingTurns()
                let window = AsyncWindow(workload)
                workload.window = window
                let figures = try window.runWindow(duration: .milliseconds(duration), warmup: .microseconds(100),
                                                   sampler: LatencySampler(capacity: 1024))
                try window.finish()
                #expect(figures.operations == workload.completedWhileTimed,
                        "\(duration) ms: counted \(figures.operations), completed \(workload.completedWhileTimed) in the window")
                // The premise (no timing asserted): the other worker worked in the window too.
                #expect(workload.otherWorkerWhileTimed > 0, "the other worker did not take turns")
            }
        }

        /// Nearest rank: of 1...200, p50 is 100 and p99 is 198 (the smallest value that
        /// 99% of them do not exceed); of 1...100, 50 and 99; one sample is both.
        @Test func percentilesAreNearestRank() throws {
            func percentiles(_ values: [UInt64]) throws -> (p50: Double, p99: Double) {
                let sampler = LatencySampler(capacity: values.count)
                sampler.enabled = true
                for v in values.shuffled() { sampler.record(v) }
                return try #require(sampler.percentiles())
            }
            let of200 = try percentiles(Array(1...200))
            #expect(of200.p50 == 100 && of200.p99 == 198, "\(of200)")
            let of100 = try percentiles(Array(1...100))
            #expect(of100.p50 == 50 && of100.p99 == 99, "\(of100)")
            let of1000 = try percentiles(Array(1...1000))
            #expect(of1000.p50 == 500 && of1000.p99 == 990, "\(of1000)")
            let one = try percentiles([7])
            #expect(one.p50 == 7 && one.p99 == 7)
            #expect(LatencySampler().percentiles() == nil)
        }

        /// A run plexus-bench refuses (no rows) or --list writes no results, so an existing
        /// --json file keeps its contents; it used to be truncated to nothing.
        @Test func plexusBenchLeavesTheJSONFileAloneWhenItDoesNotRun() throws {
            let bench = try builtExecutable("plexus-bench")
            let path = "/tmp/plexus-bench-\(getpid())-kept.json"
            defer { unlink(path) }
            let kept = "[{\"kept\": 1}]\n"
            for arguments in [["--benchmarks", "mq-handoff", "--adapters", "raw"], ["--list"]] {
                let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
                try #require(fd >= 0)
                _ = kept.withCString { write(fd, $0, strlen($0)) }
                close(fd)
                let run = try runChild([bench, "--quiet", "--json", path] + arguments)
                #expect(run.exitCode == (arguments == ["--list"] ? 0 : 64), "\(arguments): \(run)")
                #expect(readWholeFile(path) == kept, "\(arguments): the file became '\(readWholeFile(path))'")
            }
        }

        @Test func samplingGapsAverageTheStrideAndCoverEveryPhase() {
            var gaps = SamplingGaps(stride: 16)
            var phases = [Int](repeating: 0, count: 8)
            var position = 0
            var total = 0
            let samples = 80_000
            for _ in 0..<samples {
                phases[position & 7] += 1
                let gap = gaps.next()
                #expect(gap >= 0 && gap <= 30)
                position += 1 + gap
                total += 1 + gap
            }
            let mean = Double(total) / Double(samples)
            #expect(abs(mean - 16) < 0.2, "\(mean) calls per timed call")
            for count in phases { #expect(abs(Double(count) / Double(samples) - 0.125) < 0.01, "\(phases)") }
            var one = SamplingGaps(stride: 1)
            #expect(one.next() == 0)
        }
    }
}
