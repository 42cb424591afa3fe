import CPlexus
import Glibc
@testable import Plexus
import SystemPackage
import Testing

/// A write parked on a full Unix stream socket whose peer then shuts down its read side
/// ends with EPIPE on every backend, as a blocking send(2) does. The kernel wakes a
/// blocked writer for it, but unix_poll reports no POLLOUT, POLLERR or POLLHUP, so the
/// readiness backends never heard of it and the write waited for ever.
extension PlexusTests {
@Suite struct PeerShutdownTests {
    static func writeOperation(_ how: String, _ fd: FileDescriptor) -> Operation {
        switch how {
        case "send", "seqpacket send": return .send(fd, IOBuffer("tail"))
        case "write": return .write(fd, IOBuffer("tail"))
        case "writev":
            var v = IOVector(capacity: 2)
            v.append(IOBuffer("ta"))
            v.append(IOBuffer("il"))
            return .writev(fd, v)
        default: return .sendMessage(fd, Message(IOBuffer("tail")))
        }
    }

    @Test(arguments: Backends.kinds, ["send", "write", "writev", "sendmsg", "seqpacket send"])
    func aParkedWriteEndsWhenThePeerShutsItsReadSide(_ kind: BackendKind, _ how: String) throws {
        try Harness.run(kind) { h in
            let type = how == "seqpacket send" ? SOCK_SEQPACKET : SOCK_STREAM
            let (a, b) = try h.socketPair(type: Int32(type.rawValue))
            _ = h.fillSendBuffer(a)
            let blocked = h.prepare(Self.writeOperation(how, a))
            try h.waitOnce(timeout: .zero)
            #expect(h.finals[blocked] == nil, "\(kind): the \(how) did not park on a full socket")
            #expect(Glibc.shutdown(b.rawValue, Int32(SHUT_RD)) == 0)
            let got = try h.waitFor(blocked, within: .seconds(5))
            #expect(got.result == -EPIPE, "\(kind): \(how) after the peer's SHUT_RD -> \(got)")
        }
    }

    /// The control: writes parked on a full Unix socket through several of the readiness
    /// backends' retries (after 100 ms, then 200 ms) stay parked while the peer is there
    /// and reads nothing, then finish in order once it reads.
    @Test(arguments: Backends.kinds)
    func parkedWritesToALivePeerWaitThroughTheRetriesAndKeepTheirOrder(_ kind: BackendKind) throws {
        try Harness.run(kind) { h in
            let (a, b) = try h.socketPair()
            let filled = h.fillSendBuffer(a)
            let first = h.prepare(.send(a, IOBuffer("ta")))
            let second = h.prepare(.write(a, IOBuffer("il")))
            let retriesBefore = h.backend.statistics.unreportedRetries
            let until = Deadline.now + .milliseconds(350)
            while Deadline.now < until { try h.waitOnce(timeout: .milliseconds(50)) }
            #expect(h.finals[first] == nil && h.finals[second] == nil, "\(kind): a write to a full socket finished")
            let retries = h.backend.statistics.unreportedRetries - retriesBefore
            if kind == .ioUring {
                #expect(retries == 0)
            } else {
                #expect(retries >= 1, "\(kind): the parked writes were not retried")
            }
            var received: [UInt8] = []
            var chunk = [UInt8](repeating: 0, count: 65536)
            let done = Deadline.now + .seconds(5)
            while received.count < filled + 4 && Deadline.now < done {
                let n = Glibc.recv(b.rawValue, &chunk, chunk.count, Int32(MSG_DONTWAIT))
                if n > 0 { received += chunk.prefix(n) } else { try h.waitOnce(timeout: .milliseconds(5)) }
            }
            let got = try h.waitFor([first, second])
            #expect(got.map(\.result) == [2, 2], "\(kind): \(got)")
            #expect(received.count == filled + 4)
            #expect(Array(received.suffix(4)) == Array("tail".utf8), "\(kind): the parked writes arrived out of order")
        }
    }

    /// A write parked on a full Unix socket whose fd number is then closed outside Plexus
    /// and reused (dup2 of another socket over it): its bytes never reach the new socket.
    /// epoll proves the fd before a retry (EPOLL_CTL_MOD says ENOENT) and ends the write
    /// with EBADF; io_uring's write holds the old socket, and ends when its peer closes.
    /// poll(2) has no such check (README, "Backends"), so it is left out.
    @Test(arguments: Backends.kinds)
    func aParkedWriteNeverGoesToTheSocketThatReusedItsNumber(_ kind: BackendKind) throws {
        try Harness.run(kind) { h in
            guard kind != .poll else { return }
            let (a, b) = try h.socketPair()
            let (c, d) = try h.socketPair()
            _ = h.fillSendBuffer(a)
            let blocked = h.prepare(.send(a, IOBuffer("OLD!")))
            try h.waitOnce(timeout: .zero)
            #expect(h.finals[blocked] == nil, "\(kind): the send did not park on a full socket")
            #expect(dup2(c.rawValue, a.rawValue) == a.rawValue)  // a now names c's socket
            if kind == .ioUring {
                try h.idle(for: .milliseconds(250))
                #expect(h.finals[blocked] == nil, "\(kind): the send ended on a live socket")
                h.closeNow(b)
            }
            let got = try h.waitFor(blocked, within: .seconds(5))
            if kind == .ioUring {
                #expect(got.result == -EPIPE || got.result == -ECONNRESET, "\(kind): \(got)")
            } else {
                #expect(got.result == -EBADF, "\(kind): \(got)")
            }
            #expect(AttemptTests.waitingBytes(d) == [], "\(kind): the old write reached the socket that took its number")
        }
    }

    /// The same through the event loop's async adapter: the awaited send throws EPIPE.
    @Test(arguments: Backends.kinds)
    func anAwaitedSendThrowsWhenThePeerShutsItsReadSide(_ kind: BackendKind) async throws {
        let loop = try Backends.loopThread(kind)
        defer { loop.shutdownAndWait() }
        var fds: [Int32] = [-1, -1]
        let flags = Int32(SOCK_CLOEXEC.rawValue) | Int32(SOCK_NONBLOCK.rawValue)
        try #require(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | flags, 0, &fds) == 0)
        defer { Glibc.close(fds[0]); Glibc.close(fds[1]) }
        let chunk = [UInt8](repeating: 0, count: 65536)
        while Glibc.send(fds[0], chunk, chunk.count, Int32(MSG_DONTWAIT)) > 0 {}
        let (a, peer) = (fds[0], fds[1])
        let shutter = Task {
            try await Task.sleep(for: .milliseconds(300))  // after the send has parked and been retried
            return Glibc.shutdown(peer, Int32(SHUT_RD))
        }
        let error = await #expect(throws: PlexusError.self) {
            try await loop.withTimeout(.seconds(5)) {
                _ = try await loop.send(FileDescriptor(rawValue: a), IOBuffer("tail"))
            }
        }
        #expect(try await shutter.value == 0)
        #expect(error?.errno == .brokenPipe, "\(kind): \(String(describing: error))")
    }
}
}
