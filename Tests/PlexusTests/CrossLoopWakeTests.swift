import Glibc
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
}
}
