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
}
}
