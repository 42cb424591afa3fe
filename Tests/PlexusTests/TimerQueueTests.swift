import Testing
@testable import Plexus

extension PlexusTests {
/// The loop's timer heap and slab, and when `schedule(after:)` takes its clock reading.
@Suite struct TimerQueueTests {

    /// Against a sorted list: random deadlines (many equal), random cancels (enough to
    /// compact the heap), popped in (deadline, scheduling order).
    @Test func popsInDeadlineThenSchedulingOrder() {
        var rng = SplitMix64(seed: 0x7133)
        let queue = TimerQueue()
        var expected: [(deadline: UInt64, id: Int)] = []
        var handles: [(TimerHandle, Int, UInt64)] = []
        var popped: [Int] = []
        var cancelled: [Int] = []
        for id in 0..<5_000 {
            let deadline = rng.next() % 500
            handles.append((queue.schedule(at: deadline, interval: 0) { event in
                if event == .fired { popped.append(id) } else { cancelled.append(id) }
            }, id, deadline))
        }
        for (handle, id, deadline) in handles {
            if rng.next() % 5 != 0, let callback = queue.cancel(handle) {
                try? callback(.cancelled)
                #expect(queue.cancel(handle) == nil, "a second cancel finds nothing")
            } else {
                expected.append((deadline, id))
            }
        }
        #expect(queue.count == expected.count)
        while let callback = queue.popDue(now: 499) { try? callback(.fired) }
        #expect(popped == expected.sorted { ($0.deadline, $0.id) < ($1.deadline, $1.id) }.map(\.id))
        #expect(cancelled.count == 5_000 - expected.count)
        #expect(queue.count == 0)
    }

    /// `Duration.nanosecondsClamped` against `components` (whole seconds and attoseconds,
    /// an independent computation) around both of its paths' edges (2^64 and 2^73
    /// attoseconds) and at random; negative as 0, past UInt64 as `.max`. (Within 2^122
    /// attoseconds either way: `components` traps past Int64 seconds.)
    @Test func nanosecondsClampedMatchesComponents() {
        func reference(_ d: Duration) -> UInt64 {
            let (seconds, attoseconds) = d.components
            if seconds < 0 || (seconds == 0 && attoseconds <= 0) { return 0 }
            let (whole, overflow) = UInt64(seconds).multipliedReportingOverflow(by: 1_000_000_000)
            if overflow { return .max }
            let (sum, carry) = whole.addingReportingOverflow(UInt64(attoseconds / 1_000_000_000))
            return carry ? .max : sum
        }
        var cases: [Int128] = [0, 1, -1, 999_999_999, 1_000_000_000, 1_000_000_001, Int128(Int64.max), Int128(1) << 120, -(Int128(1) << 120)]
        for edge in [Int128(1) << 64, Int128(1) << 73, Int128(1_000_000_000) << 64] {
            cases += [edge - 1_000_000_001, edge - 1, edge, edge + 1, edge + 999_999_999]
        }
        cases += [3_600 * 1_000_000_000_000_000_000, Int128(UInt64.max) * 1_000_000_000, Int128(UInt64.max) * 1_000_000_000 + 999_999_999]
        var rng = SplitMix64(seed: 0x5EC0)
        for bits in [40, 64, 72, 73, 74, 90, 94, 100] {
            for _ in 0..<200 {
                cases.append((Int128(rng.next()) << 64 | Int128(rng.next())) >> (128 - bits))
            }
        }
        for attoseconds in cases {
            let d = Duration(attoseconds: attoseconds)
            #expect(d.nanosecondsClamped == reference(d), "\(attoseconds) attoseconds")
        }
    }

    /// Timers due now interleaved with far ones that are cancelled before the turn (the
    /// churn benchmark's turn): the due ones fire in scheduling order, each timer ends once.
    @Test(arguments: Backends.kinds)
    func dueTimersFireInSchedulingOrderBesideCancelledFarOnes(_ kind: BackendKind) throws {
        let loop = try Backends.loop(kind)
        var fired: [Int] = []
        var cancelled = 0
        for turn in 0..<3 {
            var far: [TimerHandle] = []
            for i in 0..<64 {
                if i & 1 == 0 {
                    loop.schedule(after: .zero) { event in if event == .fired { fired.append(i) } }
                } else {
                    far.append(loop.schedule(after: .seconds(3600)) { event in if event == .cancelled { cancelled += 1 } })
                }
            }
            #expect(loop.pendingTimers == 64)
            for handle in far { #expect(loop.cancel(handle)) }
            #expect(!loop.cancel(far[0]))
            LoopTestSupport.turn(loop, until: { fired.count == 32 * (turn + 1) })
            #expect(fired.suffix(32) == Array(stride(from: 0, to: 64, by: 2)))
            #expect(cancelled == 32 * (turn + 1))
            #expect(loop.pendingTimers == 0)
        }
        loop.shutdown(); loop.run()
    }

    /// The delay counts from a clock reading taken after the call: from a callback, from
    /// outside the loop's turns, and when the caller keeps the loop busy after the call.
    @Test(arguments: Backends.kinds)
    func scheduleAfterNeverFiresEarly(_ kind: BackendKind) throws {
        let loop = try Backends.loop(kind)
        var early: [String] = []
        var done = 0
        func expectNotEarly(_ delay: Duration, _ name: String) {
            let start = Deadline.now
            loop.schedule(after: delay) { _ in
                if Deadline.now.nanoseconds - start.nanoseconds < delay.nanosecondsClamped { early.append(name) }
                done += 1
            }
        }
        expectNotEarly(.milliseconds(3), "outside a turn")
        loop.schedule(after: .zero) { _ in
            expectNotEarly(.milliseconds(2), "from a callback")
            expectNotEarly(.microseconds(1500), "from a callback that then works")
            var spin = Deadline.now
            let until = spin + .milliseconds(2)
            while spin < until { spin = Deadline.now }
        }
        LoopTestSupport.turn(loop, until: { done == 3 })
        #expect(early.isEmpty)
        loop.shutdown(); loop.run()
    }

    /// A timer cancelled or shut down before any turn gave it a deadline ends once,
    /// with `.cancelled`; a delay too large for the clock never fires.
    @Test(arguments: Backends.kinds)
    func timersThatNeverSawATurnEndOnce(_ kind: BackendKind) throws {
        let loop = try Backends.loop(kind)
        var events: [(Int, TimerEvent)] = []
        let first = loop.schedule(after: .zero) { events.append((0, $0)) }
        loop.schedule(after: .seconds(60)) { events.append((1, $0)) }
        loop.schedule(after: .seconds(Int64.max)) { events.append((2, $0)) }
        loop.schedule(after: .zero) { events.append((3, $0)) }
        #expect(loop.cancel(first))
        #expect(!loop.cancel(first))
        #expect(loop.pendingTimers == 3)
        loop.runOnce(timeout: .zero)
        #expect(events.map(\.0) == [0, 3])
        loop.shutdown(); loop.run()
        #expect(events.map(\.0) == [0, 3, 1, 2], "shutdown cancels in deadline order")
        #expect(events.map(\.1) == [.cancelled, .fired, .cancelled, .cancelled])
        #expect(loop.pendingTimers == 0)
    }

    /// A repeating timer that cancels itself from its own callback ends once more, with
    /// `.cancelled`, and fires no more.
    @Test(arguments: Backends.kinds)
    func repeatingTimerCancelsItselfFromItsCallback(_ kind: BackendKind) throws {
        let loop = try Backends.loop(kind)
        var fired = 0
        var cancelled = 0
        var handle: TimerHandle?
        handle = loop.scheduleRepeating(every: .microseconds(200)) { event in
            if event == .cancelled { cancelled += 1; return }
            fired += 1
            if fired == 3 { #expect(loop.cancel(handle!)) }
        }
        LoopTestSupport.turn(loop, until: { cancelled == 1 })
        loop.runOnce(timeout: .milliseconds(2))
        #expect(fired == 3)
        #expect(cancelled == 1)
        #expect(loop.pendingTimers == 0)
        loop.shutdown(); loop.run()
    }
}
}
