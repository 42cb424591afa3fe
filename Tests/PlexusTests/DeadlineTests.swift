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
}
}
