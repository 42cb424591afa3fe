import Glibc
@testable import Plexus
import SystemPackage
import Testing

extension PlexusTests {
/// Tokens and timer handles belong to the loop that made them. Given to another loop's
/// `cancel`, they cancel nothing there: two loops used the same way used to hand out the
/// same tokens and handles (the same slot, both slots' generations starting at 0), so
/// the other loop's operation or timer in that slot was cancelled. A made-up token must
/// not grow the loop's handler table to its slot either.
@Suite struct ForeignHandleTests {
    @Test(arguments: Backends.kinds)
    func anotherLoopsTokenCancelsNothingHere(_ kind: BackendKind) throws {
        let a = try Backends.loop(kind), b = try Backends.loop(kind)
        let (ra, wa) = try APIEdgeTests.pipe(), (rb, wb) = try APIEdgeTests.pipe()
        defer { for fd in [ra, wa, rb, wb] { try? fd.close() } }
        a.runOnce(); b.runOnce()  // each arms its wake-up read first
        var aResult: Result<Int, PlexusError>?, bResult: Result<Int, PlexusError>?
        let tokenA = a.read(ra, IOBuffer(capacity: 8)) { result, _ in aResult = result }
        let tokenB = b.read(rb, IOBuffer(capacity: 8)) { result, _ in bResult = result }
        #expect(tokenA.index == tokenB.index, "the same slot in both loops")
        #expect(tokenA != tokenB, "two loops handed out the same token: \(tokenA)")

        a.cancel(tokenB)
        for _ in 0..<3 { a.runOnce() }
        #expect(aResult == nil, "another loop's token cancelled this loop's read: \(String(describing: aResult))")
        #expect(Glibc.write(wa.rawValue, "x", 1) == 1)
        #expect(Glibc.write(wb.rawValue, "y", 1) == 1)
        LoopTestSupport.turn(a, until: { aResult != nil })
        LoopTestSupport.turn(b, until: { bResult != nil })
        #expect(try aResult?.get() == 1)
        #expect(try bResult?.get() == 1)
        a.shutdown(); a.run()
        b.shutdown(); b.run()
    }

    @Test(arguments: Backends.kinds)
    func anotherLoopsTimerHandleCancelsNothingHere(_ kind: BackendKind) throws {
        let a = try Backends.loop(kind), b = try Backends.loop(kind)
        var aEvents: [TimerEvent] = [], bEvents: [TimerEvent] = []
        let handleA = a.schedule(after: .seconds(3600)) { aEvents.append($0) }
        let handleB = b.schedule(after: .seconds(3600)) { bEvents.append($0) }
        #expect(handleA != handleB, "two loops handed out the same timer handle")
        #expect(!a.cancel(handleB), "another loop's handle cancelled a timer here")
        #expect(aEvents.isEmpty && a.pendingTimers == 1)
        #expect(a.cancel(handleA) && b.cancel(handleB))
        #expect(aEvents == [.cancelled] && bEvents == [.cancelled])
        a.shutdown(); a.run()
        b.shutdown(); b.run()
    }

    /// A token naming a slot far past any the loop made (made up, or of a loop with more
    /// operations in flight) is ignored; the handler table used to grow to its slot, which
    /// for a slot near 2^32 is more memory than there is.
    @Test(arguments: Backends.kinds)
    func aMadeUpTokenIsIgnored(_ kind: BackendKind) throws {
        let loop = try Backends.loop(kind)
        loop.runOnce()
        var done = false
        let nop = loop.nop { _ in done = true }
        for raw in [UInt64(0xFFFF_FFF0), UInt64.max, UInt64(1) << 40 | 0x7FFF_FFFF, nop.rawValue ^ (1 << 40)] {
            loop.cancel(Token(rawValue: raw))
        }
        LoopTestSupport.turn(loop, until: { done })
        #expect(done)
        loop.shutdown(); loop.run()
    }
}
}
