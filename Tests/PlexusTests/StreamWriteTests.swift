import CPlexus
import Glibc
@testable import Plexus
import SystemPackage
import Testing

/// Writes to byte streams: pipes and stream sockets. io_uring keeps one write per stream
/// in the ring (it keeps no order between two to a full pipe or socket) and writes to a
/// pipe at once with pwritev2(RWF_NOWAIT) while it takes them; epoll and poll try the
/// syscall first and park on EAGAIN. Every backend must keep a stream's writes in order
/// and finish each exactly once.
extension PlexusTests {
@Suite struct StreamWriteTests {
    /// A pipe of one page, the smallest the kernel allows, so it fills quickly.
    static func onePagePipe(_ h: Harness, _ pipe: PipeCase) throws -> (FileDescriptor, FileDescriptor) {
        let (r, w) = try h.pipe(nonBlocking: pipe.nonBlocking)
        #expect(fcntl(w.rawValue, Int32(PLEXUS_F_SETPIPE_SZ), 4096) == 4096)
        return (r, w)
    }

    /// Reads exactly `count` bytes with read(2).
    static func readAll(_ r: FileDescriptor, _ count: Int) -> [UInt8] {
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 8192)
        while bytes.count < count {
            let n = Glibc.read(r.rawValue, &chunk, min(chunk.count, count - bytes.count))
            if n <= 0 { break }
            bytes += chunk.prefix(n)
        }
        return bytes
    }

    @Test(arguments: PipeCase.all)
    func writesToAPipeWithRoomFinishAtOnceAndWritesToAFullOneQueueInOrder(_ pipe: PipeCase) throws {
        let kind = pipe.kind
        try Harness.run(kind) { h in
            let (r, w) = try Self.onePagePipe(h, pipe)
            // Room: at once, on every backend.
            let (first, firstAtOnce) = h.attempt(.write(w, IOBuffer("a")))
            #expect(firstAtOnce, "\(kind): a write to an empty pipe waited")
            let filler = [UInt8](repeating: UInt8(ascii: "."), count: 4095)
            let (fill, fillAtOnce) = h.attempt(.write(w, IOBuffer(bytes: filler)))
            #expect(fillAtOnce)
            #expect(try h.waitFor(first).result == 1)
            #expect(try h.waitFor(fill).result == 4095)
            // Full: this one waits, and the next one queues behind it, not at once.
            let (b, bAtOnce) = h.attempt(.write(w, IOBuffer("B")))
            let (c, cAtOnce) = h.attempt(.write(w, IOBuffer("C")))
            #expect(!bAtOnce && !cAtOnce, "\(kind): a write to a full pipe finished at once")
            try h.submit()
            try h.idle(for: .milliseconds(1))
            #expect(h.isPending(b) && h.isPending(c))
            let drained = Self.readAll(r, 4096)
            #expect(drained.count == 4096 && drained.first == UInt8(ascii: "a"))
            let done = try h.waitFor([b, c])
            #expect(done.map(\.result) == [1, 1])
            #expect(Self.readAll(r, 2) == Array("BC".utf8))
            // Nothing waits any more: the next write is at once again.
            let (d, dAtOnce) = h.attempt(.write(w, IOBuffer("D")))
            #expect(dAtOnce, "\(kind): a write after the queue emptied waited")
            #expect(try h.waitFor(d).result == 1)
            #expect(Self.readAll(r, 1) == Array("D".utf8))
            #expect(h.backend.pendingCount == 0)
            if let uring = h.backend as? URingBackend {
                #expect(uring.pipeIsNonBlocking(w) == pipe.nonBlocking, "served as the wrong kind of pipe")
            }
        }
    }

    /// A full pipe and three writes behind it: the first waits in the kernel (io_uring)
    /// or parked (epoll, poll); the others wait behind it.
    static func fullPipeWithWaitingWrites(_ h: Harness, _ pipe: PipeCase, _ texts: [String])
        throws -> (r: FileDescriptor, w: FileDescriptor, tokens: [Token]) {
        let (r, w) = try onePagePipe(h, pipe)
        let fill = h.prepare(.write(w, IOBuffer(bytes: [UInt8](repeating: 0, count: 4096))))
        #expect(try h.waitFor(fill).result == 4096)
        let tokens = texts.map { h.prepare(.write(w, IOBuffer($0))) }
        try h.submit()
        try h.idle(for: .milliseconds(1))
        for t in tokens { #expect(h.isPending(t)) }
        return (r, w, tokens)
    }

    @Test(arguments: PipeCase.all)
    func cancellingWaitingWritesLeavesTheOthersInOrder(_ pipe: PipeCase) throws {
        let kind = pipe.kind
        try Harness.run(kind) { h in
            let (r, _, t) = try Self.fullPipeWithWaitingWrites(h, pipe, ["B", "C", "D", "E"])
            // C waits behind B; B is the one in the kernel on io_uring. Cancel both.
            let cancels = [h.prepare(.cancel(t[1])), h.prepare(.cancel(t[0]))]
            let cancelled = try h.waitFor([t[0], t[1]])
            #expect(cancelled.map(\.result) == [-ECANCELED, -ECANCELED])
            #expect(try h.waitFor(cancels).map(\.result) == [0, 0])
            #expect(Self.readAll(r, 4096).count == 4096)
            #expect(try h.waitFor([t[2], t[3]]).map(\.result) == [1, 1])
            #expect(Self.readAll(r, 2) == Array("DE".utf8))
            #expect(h.backend.pendingCount == 0)
        }
    }

    @Test(arguments: PipeCase.all)
    func closingAPipeWithWaitingWritesEndsEachOnce(_ pipe: PipeCase) throws {
        let kind = pipe.kind
        try Harness.run(kind) { h in
            let (_, w, t) = try Self.fullPipeWithWaitingWrites(h, pipe, ["B", "C", "D"])
            let close = h.prepare(.close(w))
            let ended = try h.waitFor(t)
            #expect(ended.map(\.result) == [-ECANCELED, -ECANCELED, -ECANCELED])
            #expect(try h.waitFor(close).result == 0)
            #expect(h.backend.pendingCount == 0)
        }
    }

    @Test(arguments: PipeCase.all)
    func cancelAllEndsWaitingWritesOnce(_ pipe: PipeCase) throws {
        let kind = pipe.kind
        try Harness.run(kind) { h in
            let (_, _, t) = try Self.fullPipeWithWaitingWrites(h, pipe, ["B", "C", "D"])
            h.cancelAll()
            let ended = try h.waitFor(t)
            #expect(ended.map(\.result) == [-ECANCELED, -ECANCELED, -ECANCELED])
            #expect(h.backend.pendingCount == 0)
        }
    }

    @Test(arguments: PipeCase.all)
    func aWriteWithADeadlineBehindAFullPipeEndsAtItsDeadline(_ pipe: PipeCase) throws {
        let kind = pipe.kind
        try Harness.run(kind) { h in
            let (r, w, t) = try Self.fullPipeWithWaitingWrites(h, pipe, ["B"])
            let late = h.prepare(.write(w, IOBuffer("L")), deadline: .now + .milliseconds(20))
            #expect(try h.waitFor(late).result == -ECANCELED)
            #expect(Self.readAll(r, 4096).count == 4096)
            #expect(try h.waitFor(t[0]).result == 1)
            #expect(Self.readAll(r, 1) == Array("B".utf8))
            #expect(h.backend.pendingCount == 0)
        }
    }

    /// Reads the peer `b` of a socket whose send buffer held `filled` bytes, while the
    /// backend runs, until those and `count` more came: returns the `count` after them.
    static func drainPeer(_ h: Harness, _ b: FileDescriptor, filled: Int, then count: Int) throws -> [UInt8] {
        var tail: [UInt8] = []
        var got = 0
        var buffer = [UInt8](repeating: 0, count: 65536)
        let start = ContinuousClock.now
        while got < filled + count && ContinuousClock.now - start < .seconds(5) {
            let n = Glibc.recv(b.rawValue, &buffer, buffer.count, Int32(MSG_DONTWAIT))
            if n > 0 {
                for k in 0..<n where got + k >= filled { tail.append(buffer[k]) }
                got += n
            } else {
                try h.waitOnce(timeout: .milliseconds(1))
            }
        }
        return tail
    }

    /// Eight writes (send and write alternating) to a Unix and a TCP socket whose buffers
    /// are full arrive in the order they were prepared.
    @Test(arguments: Backends.kinds)
    func writesToAFullSocketArriveInOrder(_ kind: BackendKind) throws {
        try Harness.run(kind) { h in
            let (x, y) = try h.socketPair()
            let listener = try h.tcpListener()
            let client = try h.tcpClient(port: listener.port)
            let server = FileDescriptor(rawValue: plexus_accept4(listener.fd.rawValue, nil, nil, Int32(SOCK_CLOEXEC.rawValue)))
            try #require(server.rawValue >= 0)
            defer { h.closeNow(server) }
            for (transport, a, b) in [("unix", x, y), ("tcp", client, server)] {
                let filled = h.fillSendBuffer(a)
                let letters = Array("ABCDEFGH".utf8)
                let tokens = letters.indices.map { i in
                    i % 2 == 0 ? h.prepare(.send(a, IOBuffer(bytes: [letters[i]])))
                        : h.prepare(.write(a, IOBuffer(bytes: [letters[i]])))
                }
                try h.submit()
                let tail = try Self.drainPeer(h, b, filled: filled, then: letters.count)
                let done = try h.waitFor(tokens)
                #expect(done.map(\.result) == Array(repeating: 1, count: letters.count), "\(transport)")
                #expect(tail == letters, "\(kind) \(transport): \(String(decoding: tail, as: UTF8.self))")
            }
            #expect(h.backend.pendingCount == 0)
        }
    }

    /// The same with deadlines (far off) on some of the writes: a write with a deadline
    /// keeps its place in the stream's order too.
    @Test(arguments: Backends.kinds)
    func writesWithDeadlinesToAFullSocketArriveInOrder(_ kind: BackendKind) throws {
        try Harness.run(kind) { h in
            let (a, b) = try h.socketPair()
            let filled = h.fillSendBuffer(a)
            let letters = Array("ABCDEFGH".utf8)
            let far = Deadline.now + .seconds(30)
            let tokens = letters.indices.map { i in
                i % 3 == 0 ? h.prepare(.send(a, IOBuffer(bytes: [letters[i]])))
                    : h.prepare(.send(a, IOBuffer(bytes: [letters[i]])), deadline: far)
            }
            try h.submit()
            let tail = try Self.drainPeer(h, b, filled: filled, then: letters.count)
            let done = try h.waitFor(tokens)
            #expect(done.map(\.result) == Array(repeating: 1, count: letters.count))
            #expect(tail == letters, "\(kind): \(String(decoding: tail, as: UTF8.self))")
            #expect(h.backend.pendingCount == 0)
        }
    }

    /// A write bigger than the room left takes what fits and says how much.
    @Test(arguments: PipeCase.all)
    func aWriteBiggerThanTheRoomLeftIsShort(_ pipe: PipeCase) throws {
        let kind = pipe.kind
        try Harness.run(kind) { h in
            let (r, w) = try Self.onePagePipe(h, pipe)
            let big = [UInt8](repeating: 7, count: 10_000)
            let done = try h.perform(.write(w, IOBuffer(bytes: big)))
            // What fits, at once, on every backend and pipe: a write that waited for the
            // reader would block (nothing reads here) or take all of it.
            #expect(done.result > 0 && done.result < 10_000, "\(done)")
            #expect(Self.readAll(r, Int(done.result)) == Array(big.prefix(Int(done.result))))
        }
    }
}
}
