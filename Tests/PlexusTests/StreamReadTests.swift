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
    /// Four one-byte reads (read and recv alternating on sockets) of an empty stream,
    /// then "ABCD": each read gets the next byte.
    @Test(arguments: Backends.kinds)
    func readsWaitingOnAStreamGetItsDataInOrder(_ kind: BackendKind) throws {
        try Harness.run(kind) { h in
            let (x, y) = try h.socketPair()
            let (r, w) = try h.pipe(nonBlocking: kind != .ioUring)
            for (transport, from, to) in [("unix", x, y), ("pipe", r, w)] {
                let tokens = (0..<4).map { i in
                    i % 2 == 1 && transport != "pipe" ? h.prepare(.recv(from, IOBuffer(capacity: 1)))
                        : h.prepare(.read(from, IOBuffer(capacity: 1)))
                }
                try h.submit()
                try h.idle(for: .milliseconds(1))
                for t in tokens { #expect(h.isPending(t), "\(transport)") }
                #expect(Glibc.write(to.rawValue, "ABCD", 4) == 4)
                let got = try h.waitFor(tokens)
                #expect(got.map { $0.bytes ?? [] } == ["A", "B", "C", "D"].map { Array($0.utf8) },
                        "\(kind) \(transport): \(got.map { String(decoding: $0.bytes ?? [], as: UTF8.self) })")
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
}
}
