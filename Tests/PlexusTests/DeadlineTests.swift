import CPlexus
import Glibc
@testable import Plexus
import SystemPackage
import Testing

/// `IOBackend.prepare(_:deadline:)`: a linked IORING_OP_LINK_TIMEOUT on io_uring, the
/// timer heap on epoll and poll.
extension PlexusTests {
@Suite struct DeadlineTests {
    @Test(arguments: Backends.kinds)
    func aReadStillPendingAtItsDeadlineIsCancelled(_ kind: BackendKind) throws {
        try Harness.run(kind) { h in
            let (r, _) = try h.pipe(nonBlocking: kind != .ioUring)
            let start = Deadline.now
            let token = h.prepare(.read(r, IOBuffer(capacity: 8)), deadline: start + .milliseconds(30))
            #expect(try h.waitFor(token).result == -ECANCELED)
            #expect(Deadline.now >= start + .milliseconds(30), "cancelled before its deadline")
            #expect(h.backend.pendingCount == 0)
        }
    }

    /// An operation the kernel answers EAGAIN (a recv with MSG_DONTWAIT, a read of an
    /// O_NONBLOCK socket) waits for readiness under the same deadline.
    @Test(arguments: Backends.kinds)
    func anOperationThatWaitsForReadinessAfterEAGAINKeepsItsDeadline(_ kind: BackendKind) throws {
        try Harness.run(kind) { h in
            let (a, b) = try h.socketPair()
            let (c, _) = try h.socketPair()
            _ = fcntl(c.rawValue, F_SETFL, fcntl(c.rawValue, F_GETFL) | O_NONBLOCK)
            let start = Deadline.now
            let recv = h.prepare(.recv(a, IOBuffer(capacity: 8), flags: Int32(MSG_DONTWAIT)), deadline: start + .milliseconds(30))
            let read = h.prepare(.read(c, IOBuffer(capacity: 8)), deadline: start + .milliseconds(30))
            let got = try h.waitFor([recv, read], within: .seconds(2))
            #expect(got.map(\.result) == [-ECANCELED, -ECANCELED])
            #expect(Deadline.now >= start + .milliseconds(30), "cancelled before its deadline")
            // Nothing of them is left to take a byte later.
            h.writeAll(b, "x")
            try h.idle(for: .milliseconds(30))
            var byte: UInt8 = 0
            #expect(Glibc.read(a.rawValue, &byte, 1) == 1)
            #expect(h.backend.pendingCount == 0)
        }
    }

    @Test(arguments: Backends.kinds)
    func operationsDoneBeforeTheirDeadlinesKeepTheirResultsAndNothingFiresLater(_ kind: BackendKind) throws {
        try Harness.run(kind) { h in
            let (r, w) = try h.pipe(nonBlocking: kind != .ioUring)
            let deadline = Deadline.now + .milliseconds(40)
            var tokens: [Token] = []
            for _ in 0..<200 {
                tokens.append(h.prepare(.write(w, IOBuffer("x")), deadline: deadline))
                tokens.append(h.prepare(.nop, deadline: deadline))
            }
            let got = try h.waitFor(tokens)
            #expect(got.allSatisfy { $0.result >= 0 }, "\(got.filter { $0.result < 0 }.count) failed")
            // Past the deadlines: no late cancel, no stray completion (the harness records any).
            try h.idle(for: .milliseconds(80))
            #expect(h.backend.pendingCount == 0)
            var bytes = [UInt8](repeating: 0, count: 512)
            #expect(Glibc.read(r.rawValue, &bytes, 512) == 200)
        }
    }

    @Test(arguments: Backends.kinds)
    func kindsThatTakeNoDeadlineArePreparedAsUsual(_ kind: BackendKind) throws {
        try Harness.run(kind) { h in
            let token = h.prepare(.timeout(.milliseconds(5)), deadline: Deadline.now)
            let result = try h.waitFor(token).result
            #expect(result == 0, "a timeout is not cut short by a deadline")
        }
    }

    /// The async adapter's deadline on a backend-enforced kind ends in ETIMEDOUT; one
    /// that completes in time returns its result.
    @Test(arguments: Backends.kinds)
    func withTimeoutOnAnAwaitedReadUsesTheBackendsDeadline(_ kind: BackendKind) async throws {
        let loop = try Backends.loopThread(kind)
        defer { loop.shutdownAndWait() }
        var p: [Int32] = [0, 0]
        try #require(plexus_pipe2(&p, O_CLOEXEC | O_NONBLOCK) == 0)
        defer { Glibc.close(p[0]); Glibc.close(p[1]) }
        let fd = FileDescriptor(rawValue: p[0])
        let writeEnd = p[1]
        let outcome: (Errno?, Int?) = await Task(executorPreference: loop) {
            var timedOut: Errno?
            do {
                _ = try await loop.withTimeout(.milliseconds(20)) { try await loop.read(fd, into: IOBuffer(capacity: 8)).count }
            } catch let error as PlexusError {
                timedOut = error.errno
            } catch {}
            _ = Glibc.write(writeEnd, "ok", 2)
            let n = try? await loop.withTimeout(.seconds(5)) { try await loop.read(fd, into: IOBuffer(capacity: 8)).count }
            return (timedOut, n)
        }.value
        #expect(outcome.0 == .timedOut)
        #expect(outcome.1 == 2)
    }

    /// A loop on `kind`, a TCP listener nobody connects to and a socket pair nobody
    /// writes to: what the sequence tests below wait on.
    static func withIdleSockets(_ kind: BackendKind,
                                _ body: (EventLoop, StreamListener, StreamConnection) async throws -> Void) async throws {
        let loop = try Backends.loopThread(kind)
        defer { loop.shutdownAndWait() }
        let listener = try StreamListener.tcp(port: 0, on: loop)
        defer { Glibc.close(listener.fd.rawValue) }
        let (a, b) = try StreamConnection.pair(on: loop)
        defer { Glibc.close(a.fd.rawValue); Glibc.close(b.fd.rawValue) }
        try await body(loop, listener, a)
    }

    /// Iterates `connections` of `listener` (accept) or `receives` of `socket` to the end.
    static func iterate(_ accept: Bool, _ loop: EventLoop, _ listener: StreamListener, _ socket: StreamConnection) async throws {
        if accept {
            for try await c in listener.connections() { Glibc.close(c.fd.rawValue) }
        } else {
            for try await _ in loop.receives(socket.fd) {}
        }
    }

    /// `withTimeout` covers the sequences too: iterating `connections` (no client) or
    /// `receives` (no data) under a 60 ms timeout throws ETIMEDOUT naming the multishot
    /// operation, and leaves nothing pending. Before, both waited forever on every
    /// backend: their `next()` parks on a continuation no single operation covers.
    @Test(arguments: Backends.kinds)
    func sequencesUnderATimeoutThrowETIMEDOUT(_ kind: BackendKind) async throws {
        try await Self.withIdleSockets(kind) { loop, listener, a in
            let work = Task(executorPreference: loop) { () -> [String] in
                var got: [String] = []
                for accept in [true, false] {
                    let start = Deadline.now
                    do {
                        try await loop.withTimeout(.milliseconds(60)) { try await Self.iterate(accept, loop, listener, a) }
                        got.append("\(accept ? "accept" : "recv"): ended without error")
                    } catch let error as PlexusError {
                        let early = Deadline.now < start + .milliseconds(60)
                        got.append("\(error.operation) \(error.errno == .timedOut ? "ETIMEDOUT" : "\(error.errno)")\(early ? " early" : "")")
                    } catch {
                        got.append("\(accept ? "accept" : "recv"): \(error)")
                    }
                }
                return got
            }
            // Bounded: a sequence that ignores the timeout is cancelled after 3 s, and fails.
            let watchdog = Task { try? await Task.sleep(for: .seconds(3)); work.cancel() }
            let outcomes = await work.value
            watchdog.cancel()
            #expect(outcomes == ["accept(multishot) ETIMEDOUT", "recv(multishot) ETIMEDOUT"], "\(kind)")
            try await loop.sleep(for: .milliseconds(5))  // the cancelled multishots' completions
            let (operations, timers) = await Task(executorPreference: loop) { (loop.pendingOperations, loop.pendingTimers) }.value
            #expect(operations == 1, "\(kind): only the loop's wake-up read is left")
            #expect(timers == 0, "\(kind)")
        }
    }

    /// A task cancelled while it waits in `connections` or `receives` gets
    /// CancellationError, as one cancelled before it asked does (before, the waiting one
    /// saw the sequence end, as if its listener had closed).
    @Test(arguments: Backends.kinds)
    func sequencesCancelledWhileWaitingThrowCancellationError(_ kind: BackendKind) async throws {
        try await Self.withIdleSockets(kind) { loop, listener, a in
            let waiting = [true, false].map { accept in
                Task(executorPreference: loop) { () -> String in
                    do { try await Self.iterate(accept, loop, listener, a); return "ended" } catch { return "\(type(of: error))" }
                }
            }
            try await Task.sleep(for: .milliseconds(20))  // both wait in next()
            for task in waiting { task.cancel() }
            for task in waiting { #expect(await task.value == "CancellationError", "\(kind)") }
        }
    }

    /// Readiness the retried operation keeps answering EAGAIN (POLLERR of a UDP socket
    /// with IP_RECVERR and an error queued, SO_ERROR read): the deadline still ends it.
    /// (Found by review, on io_uring: a poll ready at once never arms the timeout linked
    /// to it, and the loop spun past the deadline for ever.)
    @Test(arguments: Backends.kinds)
    func aDeadlineEndsAnOperationWhoseReadinessKeepsFiringWhileItKeepsGettingEAGAIN(_ kind: BackendKind) throws {
        let s = try Self.udpSocketWithPersistentPOLLERR()
        defer { Glibc.close(s) }
        try Harness.run(kind) { h in
            let start = Deadline.now
            let recv = h.prepare(.recv(FileDescriptor(rawValue: s), IOBuffer(capacity: 8), flags: Int32(MSG_DONTWAIT)),
                                 deadline: start + .milliseconds(30))
            let got = try h.waitFor(recv, within: .seconds(2))
            #expect(got.result == -ECANCELED && got.flags.contains(.deadlinePassed), "\(got)")
        }
    }

    /// A standalone deadline (the recv waits behind another on its socket) fires while the
    /// recv waits in the SQ; the recv's EAGAIN is reaped after it. (Found by review, on the
    /// COOP_TASKRUN and plain rings: the deadline's cancel found nothing, and the
    /// readiness poll that followed waited for ever.)
    @Test(arguments: Backends.kinds)
    func aStandaloneDeadlineThatFiresJustBeforeTheEAGAINStillEndsTheOperation(_ kind: BackendKind) throws {
        try Harness.run(kind) { h in
            let (_, second) = try Self.recvWithAStandaloneDeadlineNotYetSubmitted(h)
            usleep(80_000)  // its deadline passes before the next submit
            let got = try h.waitFor(second, within: .seconds(2))
            #expect(got.result == -ECANCELED && got.flags.contains(.deadlinePassed), "\(got)")
        }
    }

    /// The same recv with a close of its socket prepared before the deadline: the close
    /// ended it, not the deadline, and it ends before the close, as on epoll and poll.
    /// (Found by review, on io_uring: the recv's ECANCELED came after the close's
    /// completion, flagged `deadlinePassed`, which an awaited recv reports as ETIMEDOUT.)
    @Test(arguments: Backends.kinds)
    func aRecvWhoseCloseCameBeforeItsDeadlineEndsByTheCloseAndBeforeIt(_ kind: BackendKind) throws {
        try Harness.run(kind) { h in
            let (a, second) = try Self.recvWithAStandaloneDeadlineNotYetSubmitted(h)
            h.disown(a)
            let close = h.prepare(.close(a))
            usleep(80_000)
            let got = try h.waitFor([second, close], within: .seconds(2))
            let order = h.log.filter { $0.token == second || $0.token == close }.map { $0.token == second ? "recv" : "close" }
            #expect(got.map(\.result) == [-ECANCELED, 0])
            #expect(!got[0].flags.contains(.deadlinePassed), "ended by the close prepared before the deadline")
            #expect(order == ["recv", "close"])
        }
    }

    /// A recv with MSG_DONTWAIT and a close of its socket prepared behind it: the recv
    /// ends first, as on epoll and poll. (Found by review: on io_uring it came after.)
    @Test(arguments: Backends.kinds)
    func aRecvAnsweredEAGAINAfterItsFDsClosePreparedEndsBeforeTheClose(_ kind: BackendKind) throws {
        try Harness.run(kind) { h in
            let (a, _) = try h.socketPair()
            h.disown(a)
            let recv = h.prepare(.recv(a, IOBuffer(capacity: 8), flags: Int32(MSG_DONTWAIT)))
            let close = h.prepare(.close(a))
            let got = try h.waitFor([recv, close], within: .seconds(2))
            let order = h.log.filter { $0.token == recv || $0.token == close }.map { $0.token == recv ? "recv" : "close" }
            #expect(got.map(\.result) == [-ECANCELED, 0])
            #expect(order == ["recv", "close"])
        }
    }

    /// A recv or a send the kernel answered EAGAIN, ended by its deadline or a cancel while
    /// it waits for readiness, leaves its socket usable: the next recv gets the next byte,
    /// the next send goes. (Found by review, on io_uring: the stream still counted the
    /// first in the ring, and every later recv or send of the socket waited for ever.)
    @Test(arguments: Backends.kinds)
    func aSocketStaysUsableAfterAnOperationWaitingForReadinessEnds(_ kind: BackendKind) throws {
        try Harness.run(kind) { h in
            let (a, b) = try h.socketPair()
            let timed = h.prepare(.recv(a, IOBuffer(capacity: 8), flags: Int32(MSG_DONTWAIT)),
                                  deadline: Deadline.now + .milliseconds(30))
            let ended = try h.waitFor(timed, within: .seconds(2))
            #expect(ended.result == -ECANCELED && ended.flags.contains(.deadlinePassed), "\(ended)")
            let cancelled = h.prepare(.recv(a, IOBuffer(capacity: 8), flags: Int32(MSG_DONTWAIT)))
            try h.submit()
            try h.idle(for: .milliseconds(10))
            let cancel = h.prepare(.cancel(cancelled))
            #expect(try h.waitFor([cancelled, cancel], within: .seconds(2)).map(\.result) == [-ECANCELED, 0])
            let next = h.prepare(.recv(a, IOBuffer(capacity: 8)))
            try h.submit()
            h.writeAll(b, "y")
            #expect(try h.waitFor(next, within: .seconds(2)).result == 1)

            let filled = h.fillSendBuffer(a)
            let send = h.prepare(.send(a, IOBuffer("x"), flags: Int32(MSG_DONTWAIT)), deadline: Deadline.now + .milliseconds(30))
            let sendEnded = try h.waitFor(send, within: .seconds(2))
            #expect(sendEnded.result == -ECANCELED && sendEnded.flags.contains(.deadlinePassed), "\(sendEnded)")
            _ = try h.readExactly(b, count: filled)
            #expect(try h.perform(.send(a, IOBuffer("z"), flags: 0), within: .seconds(2)).result == 1)
        }
    }

    /// A recv the kernel answered EAGAIN waits for readiness; a byte comes (its poll fires)
    /// and a close of the socket is prepared before that poll's completion is reaped: the
    /// recv ends first, as on epoll and poll. (Found by review, on the COOP_TASKRUN and
    /// plain rings: it ended after the close.)
    @Test(arguments: Backends.kinds)
    func aCloseAfterTheReadinessOfARecvThatGotEAGAINEndsTheRecvFirst(_ kind: BackendKind) throws {
        try Harness.run(kind) { h in
            let (a, b) = try h.socketPair()
            h.disown(a)
            let recv = h.prepare(.recv(a, IOBuffer(capacity: 8), flags: Int32(MSG_DONTWAIT)))
            try h.submit()
            try h.idle(for: .milliseconds(10))
            h.writeAll(b, "z")
            usleep(5_000)
            let close = h.prepare(.close(a))
            let got = try h.waitFor([recv, close], within: .seconds(2))
            let order = h.log.filter { $0.token == recv || $0.token == close }.map { $0.token == recv ? "recv" : "close" }
            #expect(got.map(\.result) == [-ECANCELED, 0])
            #expect(order == ["recv", "close"], "\(got)")
        }
    }

    /// A recv with MSG_DONTWAIT and a deadline 50 ms away, on a socket where it waited
    /// behind another recv (so its deadline is standalone): that one has its byte now, and
    /// this one is prepared in the SQ, not yet submitted. Returns the socket and the recv.
    static func recvWithAStandaloneDeadlineNotYetSubmitted(_ h: Harness) throws -> (FileDescriptor, Token) {
        let (a, b) = try h.socketPair()
        let first = h.prepare(.recv(a, IOBuffer(capacity: 1)))
        let second = h.prepare(.recv(a, IOBuffer(capacity: 8), flags: Int32(MSG_DONTWAIT)),
                               deadline: Deadline.now + .milliseconds(50))
        try h.submit()
        try h.idle(for: .milliseconds(5))
        h.writeAll(b, "x")
        _ = try h.waitFor(first, within: .seconds(2))
        return (a, second)
    }

    /// A connected UDP socket whose error queue holds an ICMP port unreachable
    /// (IP_RECVERR) and whose SO_ERROR was read: poll(2) says POLLERR for ever, and a
    /// recv with MSG_DONTWAIT says EAGAIN.
    static func udpSocketWithPersistentPOLLERR() throws -> Int32 {
        let s = socket(AF_INET, Int32(SOCK_DGRAM.rawValue | SOCK_CLOEXEC.rawValue), 0)
        try #require(s >= 0)
        var one: Int32 = 1
        try #require(setsockopt(s, Int32(IPPROTO_IP), IP_RECVERR, &one, 4) == 0)
        let t = socket(AF_INET, Int32(SOCK_DGRAM.rawValue | SOCK_CLOEXEC.rawValue), 0)
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = UInt32(0x7f00_0001).bigEndian
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        withUnsafeMutablePointer(to: &address) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) { _ = bind(t, $0, length); _ = getsockname(t, $0, &length) }
        }
        Glibc.close(t)  // the port is closed now: a datagram to it draws an ICMP port unreachable
        withUnsafeMutablePointer(to: &address) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) { _ = connect(s, $0, length) }
        }
        _ = Glibc.send(s, "x", 1, 0)
        usleep(20_000)
        var error: Int32 = 0
        var errorLength = socklen_t(4)
        _ = getsockopt(s, SOL_SOCKET, SO_ERROR, &error, &errorLength)  // clears sk_err; the queue keeps its entry
        var p = pollfd(fd: s, events: Int16(POLLIN), revents: 0)
        try #require(poll(&p, 1, 0) == 1 && p.revents & Int16(POLLERR) != 0, "no POLLERR")
        var byte: UInt8 = 0
        try #require(Glibc.recv(s, &byte, 1, Int32(MSG_DONTWAIT)) == -1 && errno == EAGAIN)
        return s
    }
}
}
