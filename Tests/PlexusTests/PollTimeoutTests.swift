import Glibc
@testable import Plexus
import SystemPackage
import Testing

extension PlexusTests {
    /// Readiness as an operation, and time: timeouts and deadlines fire, never early.
    /// No test asserts an upper bound on time.
    @Suite struct PollAndTime {
        static func bits(_ outcome: Outcome) -> PollEvents { PollEvents(rawValue: UInt32(max(outcome.result, 0))) }

        @Test(arguments: Backends.kinds)
        func `one-shot poll waits for readable`(kind: BackendKind) throws {
            try Harness.run(kind) { h in
                let pipe = try h.pipe()
                let token = h.prepare(.poll(pipe.read, .readable))
                try h.submit()
                try h.idle(for: .milliseconds(20))
                #expect(h.isPending(token), "nothing to read yet")
                h.writeAll(pipe.write, "x")
                let outcome = try h.waitFor(token)
                #expect(Self.bits(outcome).contains(.readable), "\(outcome)")
                #expect(outcome.isFinal)
                #expect(h.readNow(pipe.read) == bytes("x"), "poll does not consume data")
            }
        }

        @Test(arguments: Backends.kinds)
        func `one-shot poll for writable completes at once`(kind: BackendKind) throws {
            try Harness.run(kind) { h in
                let pipe = try h.pipe()
                let outcome = try h.perform(.poll(pipe.write, .writable))
                #expect(Self.bits(outcome).contains(.writable), "\(outcome)")
            }
        }

        @Test(arguments: Backends.kinds)
        func `poll reports hang-up when the writer closes`(kind: BackendKind) throws {
            try Harness.run(kind) { h in
                let pipe = try h.pipe()
                let token = h.prepare(.poll(pipe.read, .readable))
                try h.submit()
                h.closeNow(pipe.write)
                let outcome = try h.waitFor(token)
                #expect(Self.bits(outcome).contains(.hangup), "\(outcome)")
            }
        }

        @Test(arguments: Backends.kinds)
        func `multishot poll reports every readiness edge until cancelled`(kind: BackendKind) throws {
            try Harness.run(kind) { h in
                let (a, b) = try h.socketPair()
                let token = h.prepare(.poll(b, .readable, multishot: true))
                try h.submit()
                for round in 1...3 {
                    h.writeAll(a, "\(round)")
                    let seen = try h.waitForIntermediates(token, count: round)
                    #expect(seen.count >= round)
                    #expect(seen.allSatisfy { Self.bits($0).contains(.readable) && $0.flags.contains(.more) }, "\(seen)")
                    #expect(h.readNow(b) == bytes("\(round)"))
                }
                #expect(h.isPending(token), "a multishot poll stays armed")
                let cancel = h.prepare(.cancel(token))
                let outcomes = try h.waitFor([cancel, token])
                expectResult(outcomes[0], 0)
                expectError(outcomes[1], ECANCELED)
            }
        }

        @Test(arguments: Backends.kinds)
        func `a timeout fires with 0 and not early`(kind: BackendKind) throws {
            try Harness.run(kind) { h in
                let start = Deadline.now
                let outcome = try h.perform(.timeout(.milliseconds(50)))
                expectResult(outcome, 0, "a timeout that fires reports 0")
                let elapsed = outcome.at.nanoseconds - start.nanoseconds
                #expect(elapsed >= 50_000_000, "fired after \(elapsed) ns, asked for 50 ms")
            }
        }

        @Test(arguments: Backends.kinds)
        func `a deadline fires with 0 and not before it`(kind: BackendKind) throws {
            try Harness.run(kind) { h in
                let deadline = Deadline.now + .milliseconds(40)
                let outcome = try h.perform(.deadline(deadline))
                expectResult(outcome, 0)
                #expect(outcome.at >= deadline, "fired \(deadline.nanoseconds - outcome.at.nanoseconds) ns early")
                let past = try h.perform(.deadline(Deadline(nanoseconds: 1)))
                expectResult(past, 0, "a deadline in the past fires at once")
            }
        }

        @Test(arguments: Backends.kinds)
        func `a zero timeout fires`(kind: BackendKind) throws {
            try Harness.run(kind) { h in
                expectResult(try h.perform(.timeout(.zero)), 0)
                expectResult(try h.perform(.timeout(.seconds(-2))), 0, "a negative duration is 0")
            }
        }

        // A negative duration under one second has components (seconds: 0, attoseconds: < 0);
        // it once trapped in Duration.nanosecondsClamped.
        @Test(arguments: Backends.kinds)
        func `a negative timeout under a second fires at once`(kind: BackendKind) throws {
            try Harness.run(kind) { h in
                expectResult(try h.perform(.timeout(.milliseconds(-5))), 0, "a negative duration is 0")
                expectResult(try h.perform(.deadline(Deadline.now + .milliseconds(-5))), 0)
            }
        }

        @Test(arguments: Backends.kinds)
        func `timeouts fire in the order of their deadlines`(kind: BackendKind) throws {
            try Harness.run(kind) { h in
                let start = Deadline.now
                let late = h.prepare(.timeout(.milliseconds(120)))
                let early = h.prepare(.timeout(.milliseconds(30)))
                let middle = h.prepare(.deadline(start + .milliseconds(70)))
                let outcomes = try h.waitFor([early, middle, late])
                #expect(outcomes.allSatisfy { $0.result == 0 }, "\(outcomes)")
                let wanted: Set<Token> = [early, middle, late]
                var order: [Token] = []
                for outcome in h.log where wanted.contains(outcome.token) { order.append(outcome.token) }
                #expect(order == [early, middle, late])
                #expect(outcomes[2].at.nanoseconds - start.nanoseconds >= 120_000_000)
            }
        }

        @Test(arguments: Backends.kinds)
        func `wait with a timeout returns 0 when nothing completes`(kind: BackendKind) throws {
            try Harness.run(kind) { h in
                // wait may return 0 early when a signal interrupts it (EINTR), so wait in a
                // loop: nothing may complete, and each call returns 0.
                let end = Deadline.now + .milliseconds(30)
                var calls = 0
                while Deadline.now < end && calls < 1000 {
                    let none = try h.waitOnce(timeout: .nanoseconds(Int64(end.remaining(from: .now))))
                    #expect(none == 0)
                    calls += 1
                }
                #expect(Deadline.now >= end)
                let polled = try h.waitOnce(timeout: .zero)
                #expect(polled == 0)
            }
        }
    }
}
