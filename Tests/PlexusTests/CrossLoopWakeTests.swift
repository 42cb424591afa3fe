import CPlexus
import Glibc
import Synchronization
import Testing
@testable import Plexus

extension PlexusTests {
/// Waking one loop from another: an eventfd write, or IORING_OP_MSG_RING between two
/// io_uring loops. Both must deliver every message; PLEXUS_BENCH_FULL=1 prints the
/// round-trip latency of each, which is how the default was chosen.
@Suite struct CrossLoopWakeTests {
    static let mechanisms: [CrossLoopWake] = [.eventfd, .messageRing]

    /// Ping-pong between two loops through two message queues, each hop waking a loop
    /// that sleeps. Returns the median and p99 round trip in ns.
    static func pingPong(_ kind: BackendKind, _ wake: CrossLoopWake, rounds: Int) throws -> (p50: UInt64, p99: UInt64) {
        let a = try Backends.loopThread(kind)
        let b = try Backends.loopThread(kind)
        defer { a.shutdownAndWait(); b.shutdownAndWait() }
        a.crossLoopWake = wake
        b.crossLoopWake = wake
        let toB = MessageQueue<UInt64>(capacity: 8, loop: b)
        let toA = MessageQueue<UInt64>(capacity: 8, loop: a)
        let done = Semaphore()
        let samples = Box([UInt64](repeating: 0, count: rounds))
        let state = Box((round: 0, sent: UInt64(0)))
        b.execute { toB.onMessage { value in precondition(toA.trySend(value).isSent) } }
        a.execute {
            toA.onMessage { value in
                precondition(value == UInt64(state.value.round))
                samples.value[state.value.round] = Deadline.now.nanoseconds - state.value.sent
                state.value.round += 1
                if state.value.round == rounds { done.signal(); return }
                state.value.sent = Deadline.now.nanoseconds
                precondition(toB.trySend(UInt64(state.value.round)).isSent)
            }
            state.value.sent = Deadline.now.nanoseconds
            precondition(toB.trySend(0).isSent)
        }
        done.wait()
        _ = toA.close(); _ = toB.close()
        let sorted = samples.value.sorted()
        return (sorted[rounds / 2], sorted[rounds * 99 / 100])
    }

    @Test(arguments: Backends.kinds, mechanisms)
    func everyMessageCrossesWithEitherWake(_ kind: BackendKind, _ wake: CrossLoopWake) throws {
        let full = getenv("PLEXUS_BENCH_FULL") != nil
        let (p50, p99) = try Self.pingPong(kind, wake, rounds: full ? 20_000 : 500)
        if full { print("cross-loop wake \(kind) \(wake): round trip p50 \(p50) ns, p99 \(p99) ns") }
        #expect(p50 > 0)
    }

    /// A loop's thread wakes loops that just started, whose first sleep may come before
    /// their ring is enabled (io_uring creates it R_DISABLED until the loop's first
    /// wait): every job still runs at once. Before, the MSG_RING to a ring not yet enabled
    /// failed with EBADFD on the sender's ring, unseen, and the job waited for another
    /// wake-up (a helper's run: 2 to 11 of 1500-4000 on io_uring; none with the eventfd).
    /// A statistical check: 300 fresh loops per backend.
    @Test(arguments: Backends.kinds)
    func jobsSentToLoopsThatJustStartedRunAtOnce(_ kind: BackendKind) async throws {
        let a = try Backends.loopThread(kind)
        defer { a.shutdownAndWait() }
        var missed = 0
        for i in 0..<300 {
            let b = try Backends.loopThread(kind, idleSpin: .zero)
            let ran = Countdown(1)
            let spin = UInt64((i * 37) % 40) * 100  // 0-3.9 us: sweep B's first sleep
            _ = a.execute {
                let end = monotonicNanoseconds() + spin
                while monotonicNanoseconds() < end {}
                _ = b.execute { ran.done() }
            }
            if !(await ran.wait(seconds: 1)) { missed += 1 }
            b.shutdownAndWait()
        }
        #expect(missed == 0, "\(kind): \(missed) of 300 jobs sent to a loop that just started waited for another wake-up")
    }

    /// The flag behind it: a ring created R_DISABLED takes no MSG_RING until enabled.
    @Test func aRingTakesMessagesOnceEnabled() throws {
        let backend = try Backends.start(.ioUring).backend as! URingBackend
        let disabled = backend.setupFlags & IORING_SETUP_R_DISABLED != 0
        let before = backend.takesRingMessages.load(ordering: .acquiring)
        #expect(before == !disabled)
        try backend.wait(timeout: .zero) { _ in }
        let after = backend.takesRingMessages.load(ordering: .acquiring)
        #expect(after)
    }
}
}
