import Glibc
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
