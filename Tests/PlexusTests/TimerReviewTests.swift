import Glibc
@testable import Plexus
import SystemPackage
import Testing

extension PlexusTests {
/// Timers that are late, and timers scheduled from timer callbacks at deadlines that
/// have already passed: each timer fires once per due deadline, and a pass over the due
/// timers ends, so jobs and I/O get their turn.
@Suite struct TimerReviewTests {

    /// A repeating timer due long ago fires once for the deadline it missed, not twice:
    /// rescheduled "one interval after its previous deadline, not before now", it used to
    /// come due again at `now` itself and fire a second time in the same pass.
    @Test func aLateRepeatingTimerFiresOnceAndComesDueOneIntervalLater() {
        let queue = TimerQueue()
        var fired = 0
        let handle = queue.schedule(at: 1_000, interval: 100) { event in if event == .fired { fired += 1 } }
        while let callback = queue.popDue(now: 1_550) { try? callback(.fired) }
        #expect(fired == 1, "a repeating timer 5 intervals late fired \(fired) times for one clock reading")
        #expect(queue.nextDeadline().map { $0 > 1_550 } == true, "its next deadline is after now")
        #expect(queue.nextDeadline().map { $0 <= 1_650 } == true, "and at most one interval after now")
        // On time (late by less than an interval): it keeps its phase.
        while let callback = queue.popDue(now: 1_655) { try? callback(.fired) }
        #expect(fired == 2)
        #expect(queue.nextDeadline() == 1_750)
        _ = queue.cancel(handle)
    }

    /// The same through a loop that was not turned for several intervals: two firings of
    /// the repeating timer always have another turn between them (a timer scheduled
    /// after `.zero` from the first fires before the second). The interval is long
    /// enough that a turn never takes it.
    @Test(arguments: Backends.kinds)
    func aLateRepeatingTimerFiresOnceInItsTurn(_ kind: BackendKind) throws {
        let loop = try Backends.loop(kind)
        var events: [String] = []
        let handle = loop.scheduleRepeating(every: .milliseconds(300)) { event in
            guard event == .fired else { return }
            events.append("R")
            loop.schedule(after: .zero) { if $0 == .fired { events.append("s") } }
        }
        usleep(1_000_000)  // the loop turns no more for more than three intervals
        LoopTestSupport.turn(loop, until: { events.filter { $0 == "R" }.count >= 3 })
        let firings = events.filter { $0 == "R" }.count
        #expect(firings >= 3)
        #expect(!events.joined().contains("RR"), "two firings in one pass: \(events.joined())")
        #expect(loop.cancel(handle))
        loop.shutdown(); loop.run()
        #expect(loop.pendingTimers == 0)
    }

    /// A timer callback that schedules a timer at a deadline already passed (here: the
    /// same one, again and again, as a retry until something happens would) does not
    /// keep the loop in one pass over its timers: a job queued meanwhile runs. It used to
    /// run the whole chain in one pass (for ever, had the chain waited for the job).
    @Test(arguments: Backends.kinds)
    func aTimerChainAtAPassedDeadlineLetsJobsRun(_ kind: BackendKind) throws {
        let loop = try Backends.loop(kind)
        /// Loop thread only (the test's thread turns the loop).
        final class State: @unchecked Sendable {
            var links = 0
            var jobRan = false
            var linksWhenJobRan = -1
        }
        let bound = 100_000
        let state = State()
        let past = Deadline.now
        func link(_ event: TimerEvent) {
            guard event == .fired else { return }
            state.links += 1
            if state.links == 1 { loop.execute { state.jobRan = true; state.linksWhenJobRan = state.links } }
            if !state.jobRan && state.links < bound { loop.schedule(at: past, link) }
        }
        loop.schedule(at: past, link)
        LoopTestSupport.turn(loop, until: { state.jobRan && loop.pendingTimers == 0 })
        #expect(state.jobRan)
        #expect(state.linksWhenJobRan < bound, "the chain of \(bound) passed timers ran before a job queued by its first link")
        loop.shutdown(); loop.run()
    }

    /// The same with I/O: a read whose bytes are already in its pipe completes while such a
    /// chain runs, and other due timers fire beside it.
    @Test(arguments: Backends.kinds)
    func aTimerChainAtAPassedDeadlineLetsIOAndOtherTimersRun(_ kind: BackendKind) throws {
        let loop = try Backends.loop(kind)
        var fds: [Int32] = [0, 0]
        #expect(Glibc.pipe(&fds) == 0)
        for fd in fds {
            _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
            _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
        }
        defer { Glibc.close(fds[0]); Glibc.close(fds[1]) }
        #expect(Glibc.write(fds[1], "x", 1) == 1)
        let bound = 100_000
        var links = 0
        var readDone = false
        var otherFired = false
        var linksWhenRead = -1
        var linksWhenOther = -1
        let past = Deadline.now
        func link(_ event: TimerEvent) {
            guard event == .fired else { return }
            links += 1
            if (!readDone || !otherFired) && links < bound { loop.schedule(at: past, link) }
        }
        loop.schedule(at: past, link)
        loop.schedule(after: .milliseconds(1)) { event in
            if event == .fired { otherFired = true; linksWhenOther = links }
        }
        loop.read(FileDescriptor(rawValue: fds[0]), IOBuffer(capacity: 16)) { result, _ in
            readDone = true
            linksWhenRead = links
            #expect((try? result.get()) == 1)
        }
        LoopTestSupport.turn(loop, until: { readDone && otherFired && loop.pendingTimers == 0 })
        #expect(readDone && otherFired)
        #expect(linksWhenRead < bound, "the read completed only after the chain of \(bound) passed timers")
        #expect(linksWhenOther < bound, "a due 1 ms timer fired only after the chain of \(bound) passed timers")
        loop.shutdown(); loop.run()
        #expect(loop.pendingOperations == 0)
    }
}
}
