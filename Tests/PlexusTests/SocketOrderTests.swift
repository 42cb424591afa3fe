import CPlexus
import Glibc
@testable import Plexus
import SystemPackage
import Testing

/// A socket's operations keep the order they were made in, whether they start at once
/// (`attempt`, io_uring's send(MSG_DONTWAIT)) or in the ring: a send after a connect or a
/// shutdown(SHUT_WR) prepared before it, on every backend. io_uring runs SHUTDOWN in its
/// workers, so a send behind it in the SQ ran first and its bytes reached the peer after
/// the shutdown; an attempted send ran before a connect still in the SQ (EPIPE).
extension PlexusTests {
@Suite struct SocketOrderTests {
    /// A shutdown(SHUT_WR) prepared (still in the SQ on io_uring), then a send or write on
    /// the same socket, attempted or prepared: it comes after the shutdown, so EPIPE, and
    /// no byte reaches the peer.
    @Test(arguments: Backends.kinds, ["attempted send", "attempted write", "prepared send"])
    func aWriteGoesAfterAShutdownPreparedBeforeIt(_ kind: BackendKind, _ how: String) throws {
        try Harness.run(kind) { h in
            let (a, b) = try h.socketPair()
            let shut = h.prepare(.shutdown(a, how: Int32(SHUT_WR)))
            let late: Token = switch how {
            case "attempted send": h.attempt(.send(a, IOBuffer("late"))).token
            case "attempted write": h.attempt(.write(a, IOBuffer("late"))).token
            default: h.prepare(.send(a, IOBuffer("late")))
            }
            let got = try h.waitFor([shut, late])
            #expect(got[0].result == 0)
            #expect(got[1].result == -EPIPE, "\(kind): \(how) after shutdown -> \(got[1])")
            #expect(AttemptTests.waitingBytes(b) == [], "\(kind): bytes reached the peer after its shutdown")
        }
    }

    /// A TCP connect prepared (not yet submitted), then a send attempted on the socket:
    /// the send comes after the connect and its bytes arrive.
    @Test(arguments: Backends.kinds)
    func anAttemptedSendGoesAfterAConnectPreparedBeforeIt(_ kind: BackendKind) throws {
        try Harness.run(kind) { h in
            let listener = try h.tcpListener()
            let s = try h.inetSocket()
            let connect = h.prepare(.connect(s, listener.address))
            let sent = h.attempt(.send(s, IOBuffer("hello")))
            let got = try h.waitFor([connect, sent.token])
            #expect(got[0].result == 0, "\(kind): connect -> \(got[0])")
            #expect(got[1].result == 5, "\(kind): send behind a prepared connect -> \(got[1]) (at once \(sent.atOnce))")
            let accepted = Glibc.accept(listener.fd.rawValue, nil, nil)
            if accepted >= 0 {
                defer { Glibc.close(accepted) }
                var bytes = [UInt8](repeating: 0, count: 16)
                var n = 0
                for _ in 0..<100 where n <= 0 {
                    n = Glibc.recv(accepted, &bytes, 16, Int32(MSG_DONTWAIT))
                    if n <= 0 { usleep(1000) }
                }
                #expect(Array(bytes.prefix(max(n, 0))) == Array("hello".utf8))
            }
        }
    }

    /// A send blocked on a full socket, then a shutdown: the shutdown is not held back by
    /// it (the send ends with EPIPE or its bytes, as on epoll and poll), and nothing hangs.
    @Test(arguments: Backends.kinds)
    func aShutdownBehindABlockedSendIsNotHeldBack(_ kind: BackendKind) throws {
        try Harness.run(kind) { h in
            let (a, _) = try h.socketPair()
            _ = h.fillSendBuffer(a)
            let blocked = h.prepare(.send(a, IOBuffer("tail")))
            try h.waitOnce(timeout: .zero)
            let shut = h.prepare(.shutdown(a, how: Int32(SHUT_WR)))
            let got = try h.waitFor([shut, blocked], within: .seconds(3))
            #expect(got[0].result == 0)
            #expect(got[1].result == -EPIPE, "\(kind): \(got[1])")
        }
    }

    /// Another socket's SQE in the SQ does not keep an attempted send from finishing at once.
    @Test(arguments: Backends.kinds)
    func anAttemptedSendBehindAnotherSocketsOperationStillFinishesAtOnce(_ kind: BackendKind) throws {
        try Harness.run(kind) { h in
            let (a, b) = try h.socketPair()
            let (c, _) = try h.socketPair()
            let other = h.prepare(.recv(c, IOBuffer(capacity: 4)))
            let sent = h.attempt(.send(a, IOBuffer("ping")))
            #expect(sent.atOnce, "\(kind)")
            #expect(try h.waitFor(sent.token).result == 4)
            #expect(PlexusTests.AttemptTests.waitingBytes(b) == Array("ping".utf8))
            h.prepare(.cancel(other))
            _ = try h.waitFor(other)
        }
    }
}
}
