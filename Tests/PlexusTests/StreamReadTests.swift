import CPlexus
import Glibc
@testable import Plexus
import SystemPackage
import Testing

/// Several reads waiting on one byte stream (pipe, Unix or TCP socket). io_uring gives
/// two receives in the ring of an empty socket its data in reverse, so it keeps one read
/// per stream in the ring and the later ones waiting behind it; epoll and poll keep a
/// FIFO per fd. Every backend must hand the data to the reads in the order they were
/// prepared, and end each exactly once.
extension PlexusTests {
@Suite struct StreamReadTests {
    /// Each read got one byte, the next of `text`.
    static func expectOneByteEach(_ got: [Outcome], _ text: String, _ label: String,
                                  sourceLocation: SourceLocation = #_sourceLocation) {
        #expect(got.map { $0.bytes ?? [] } == text.map { Array(String($0).utf8) },
                "\(label): \(got.map { String(decoding: $0.bytes ?? [], as: UTF8.self) })", sourceLocation: sourceLocation)
    }

    /// The empty byte streams the read tests run on, by name: a Unix socket pair and the
    /// pipes of `PipeCase.all` for this backend (read end, write end).
    static func emptyStreams(_ h: Harness, _ kind: BackendKind) throws -> [(String, FileDescriptor, FileDescriptor)] {
        let (x, y) = try h.socketPair()
        var streams = [("unix", x, y)]
        for pipe in PipeCase.all where pipe.kind == kind {
            let (r, w) = try h.pipe(nonBlocking: pipe.nonBlocking)
            streams.append((pipe.nonBlocking ? "O_NONBLOCK pipe" : "blocking pipe", r, w))
        }
        return streams
    }

    /// Four one-byte reads (read and recv alternating on sockets) of an empty stream,
    /// then "ABCD": each read gets the next byte.
    @Test(arguments: Backends.kinds)
    func readsWaitingOnAStreamGetItsDataInOrder(_ kind: BackendKind) throws {
        try Harness.run(kind) { h in
            for (transport, from, to) in try Self.emptyStreams(h, kind) {
                let tokens = (0..<4).map { i in
                    i % 2 == 1 && transport == "unix" ? h.prepare(.recv(from, IOBuffer(capacity: 1)))
                        : h.prepare(.read(from, IOBuffer(capacity: 1)))
                }
                try h.submit()
                try h.idle(for: .milliseconds(1))
                for t in tokens { #expect(h.isPending(t), "\(transport)") }
                #expect(Glibc.write(to.rawValue, "ABCD", 4) == 4)
                Self.expectOneByteEach(try h.waitFor(tokens), "ABCD", "\(kind) \(transport)")
            }
            #expect(h.backend.pendingCount == 0)
        }
    }

    /// The same with deadlines on some of the reads (withTimeout on a shared socket): a
    /// read with a deadline keeps its place in the stream's order too, and one whose
    /// deadline passes while it waits ends alone, taking no byte.
    @Test(arguments: Backends.kinds)
    func readsWithDeadlinesKeepTheStreamsOrder(_ kind: BackendKind) throws {
        try Harness.run(kind) { h in
            for (transport, from, to) in try Self.emptyStreams(h, kind) {
                let far = Deadline.now + .seconds(30)
                let tokens = (0..<6).map { i in
                    switch i % 3 {
                    case 0: h.prepare(.read(from, IOBuffer(capacity: 1)))
                    case 1: h.prepare(.read(from, IOBuffer(capacity: 1)), deadline: far)
                    default: h.prepare(.read(from, IOBuffer(capacity: 1)), deadline: .now + .milliseconds(i == 2 ? 20 : 30_000))
                    }
                }
                try h.submit()
                // The third read's deadline passes while it waits behind the first two.
                #expect(try h.waitFor(tokens[2]).result == -ECANCELED, "\(kind) \(transport)")
                for t in tokens where t != tokens[2] { #expect(h.isPending(t), "\(kind) \(transport)") }
                #expect(Glibc.write(to.rawValue, "ABCDE", 5) == 5)
                let rest = [0, 1, 3, 4, 5].map { tokens[$0] }
                Self.expectOneByteEach(try h.waitFor(rest), "ABCDE", "\(kind) \(transport)")
            }
            #expect(h.backend.pendingCount == 0)
        }
    }

    /// A read with a deadline waits behind another, goes on when that one finishes, and is
    /// still pending when its deadline passes: it is cancelled where it is then (in the
    /// ring on io_uring), and the next read gets the next byte.
    @Test(arguments: Backends.kinds)
    func aReadWhoseDeadlinePassesAfterItWentOnIsCancelledThere(_ kind: BackendKind) throws {
        try Harness.run(kind) { h in
            let (x, y) = try h.socketPair()
            let first = h.prepare(.recv(x, IOBuffer(capacity: 1)))
            let timed = h.prepare(.recv(x, IOBuffer(capacity: 1)), deadline: .now + .milliseconds(200))
            try h.submit()
            try h.idle(for: .milliseconds(1))
            #expect(Glibc.write(y.rawValue, "A", 1) == 1)
            #expect(try h.waitFor(first).bytes == Array("A".utf8))
            #expect(h.isPending(timed))
            #expect(try h.waitFor(timed).result == -ECANCELED, "\(kind)")
            let next = h.prepare(.recv(x, IOBuffer(capacity: 1)))
            #expect(Glibc.write(y.rawValue, "B", 1) == 1)
            #expect(try h.waitFor(next).bytes == Array("B".utf8))
            #expect(h.backend.pendingCount == 0)
        }
    }

    /// Reads with deadlines far off that wait and then finish leave no timeout behind in
    /// the kernel (io_uring removes each standalone timeout when its read finishes).
    @Test(arguments: Backends.kinds)
    func finishedReadsLeaveNoDeadlineBehind(_ kind: BackendKind) throws {
        try Harness.run(kind) { h in
            let (x, y) = try h.socketPair()
            let far = Deadline.now + .seconds(60)
            let tokens = (0..<8).map { _ in h.prepare(.recv(x, IOBuffer(capacity: 1)), deadline: far) }
            try h.submit()
            try h.idle(for: .milliseconds(1))
            #expect(Glibc.write(y.rawValue, "ABCDEFGH", 8) == 8)
            Self.expectOneByteEach(try h.waitFor(tokens), "ABCDEFGH", "\(kind)")
            if let uring = h.backend as? URingBackend {
                try h.runUntil("the removed timeouts reported", within: .seconds(2)) { uring.standaloneDeadlines == 0 }
            }
            #expect(h.backend.pendingCount == 0)
        }
    }

    @Test(arguments: Backends.kinds)
    func cancellingAWaitingReadLeavesTheOthersInOrder(_ kind: BackendKind) throws {
        try Harness.run(kind) { h in
            let (x, y) = try h.socketPair()
            let tokens = (0..<3).map { _ in h.prepare(.recv(x, IOBuffer(capacity: 1))) }
            try h.submit()
            try h.idle(for: .milliseconds(1))
            let cancel = h.prepare(.cancel(tokens[1]))
            #expect(try h.waitFor(tokens[1]).result == -ECANCELED)
            #expect(try h.waitFor(cancel).result == 0)
            #expect(Glibc.write(y.rawValue, "AB", 2) == 2)
            let got = try h.waitFor([tokens[0], tokens[2]])
            #expect(got.map { $0.bytes ?? [] } == [Array("A".utf8), Array("B".utf8)])
            #expect(h.backend.pendingCount == 0)
        }
    }

    /// Reads and writes waiting on a socket: cancel-all and close end each exactly once.
    @Test(arguments: Backends.kinds)
    func cancelAllAndCloseEndWaitingReadsAndWritesOfASocket(_ kind: BackendKind) throws {
        try Harness.run(kind) { h in
            for ending in ["cancel-all", "close"] {
                let (x, _) = try h.socketPair()
                let reads = (0..<3).map { _ in h.prepare(.recv(x, IOBuffer(capacity: 8))) }
                let filled = h.fillSendBuffer(x)
                #expect(filled > 0)
                let writes = (0..<3).map { _ in h.prepare(.send(x, IOBuffer("w"))) }
                try h.submit()
                try h.idle(for: .milliseconds(1))
                if ending == "close" {
                    let close = h.prepare(.close(x))
                    #expect(try h.waitFor(close).result == 0)
                } else {
                    h.cancelAll()
                }
                let ended = try h.waitFor(reads + writes)
                #expect(ended.allSatisfy { $0.result == -ECANCELED }, "\(ending): \(ended.map(\.result))")
            }
            #expect(h.backend.pendingCount == 0)
        }
    }

    /// A peer that sends each message as a 4-byte header and a 12-byte body in one write:
    /// the header read waits for the message, then the body read, whose bytes are there,
    /// gets them; on epoll and poll it finishes at once (`attempt`), without waiting for a
    /// readiness report. (A poll heuristic once made such body reads wait: 1 of 64 at once.)
    @Test(arguments: Backends.kinds)
    func aBodyReadAfterItsHeaderGetsTheWaitingBytesAtOnce(_ kind: BackendKind) throws {
        try Harness.run(kind) { h in
            #expect(h.backend.kind == kind)
            let (from, to) = try h.socketPair()
            let rounds = 64
            var atOnce = 0
            for i in 0..<rounds {
                let header = h.prepare(.recv(from, IOBuffer(capacity: 4)))
                try h.submit()
                let message = Array("H\(String(1000 + i).dropFirst())BODY-\(String(10_000_000 + i).dropFirst())".utf8)
                #expect(message.withUnsafeBytes { Glibc.write(to.rawValue, $0.baseAddress, 16) } == 16)
                #expect(try h.waitFor(header).bytes == Array(message[0..<4]), "\(kind) header \(i)")
                let (body, finished) = h.attempt(.recv(from, IOBuffer(capacity: 12)))
                if finished { atOnce += 1 }
                #expect(try h.waitFor(body).bytes == Array(message[4..<16]), "\(kind) body \(i)")
            }
            if kind != .ioUring {  // io_uring finishes only cached file reads at once
                #expect(atOnce == rounds, "\(atOnce) of \(rounds) body reads finished at once")
            }
            #expect(h.backend.pendingCount == 0)
        }
    }
}
}
