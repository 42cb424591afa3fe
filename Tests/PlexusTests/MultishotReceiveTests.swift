import CPlexus
import Glibc
@testable import Plexus
import SystemPackage
import Testing

extension PlexusTests {
/// Multishot receive into a buffer group: a provided buffer ring on io_uring, a free
/// list on epoll and poll. Every byte arrives once and in order; when every buffer is
/// out the receive pauses, and a recycle resumes it.
@Suite struct MultishotReceiveTests {
    @Test(arguments: Backends.kinds)
    func chunksArriveInOrderAndPauseWhenBuffersRunOut(_ kind: BackendKind) throws {
        try Harness.run(kind) { h in
            let (a, b) = try h.socketPair()
            let group = try h.backend.registerBuffers(count: 4, size: 16)
            #expect(group.count == 4 && group.size == 16)
            let token = h.prepare(.receiveMultishot(a, group))
            try h.submit()
            // 4 buffers of 16 bytes hold 64 bytes; the 200 sent wait until buffers come back.
            let sent = (0..<200).map { UInt8($0 & 0xff) }
            h.writeAll(b, sent)
            var received: [UInt8] = []
            var seen = 0
            while received.count < sent.count {
                let chunks = try h.waitForIntermediates(token, count: seen + 1)
                #expect(chunks.count <= seen + 4, "never more chunks out than buffers")
                for chunk in chunks[seen...] {
                    let id = try #require(chunk.bufferID, "a chunk names its buffer")
                    group.withBuffer(id, length: Int(chunk.result)) { received.append(contentsOf: $0) }
                    h.backend.recycle(group, id: id)
                }
                seen = chunks.count
            }
            #expect(received == sent)
            // The peer's close ends the receive with a final 0.
            h.closeNow(b)
            let final = try h.waitFor(token)
            #expect(final.result == 0)
            #expect(final.isFinal)
        }
    }

    /// A receive prepared while a multishot receive of the same stream is on waits behind
    /// it, as every read of a stream waits behind the one before: the multishot one gets
    /// all the data until it ends, then the receive gets what comes next.
    @Test(arguments: Backends.kinds)
    func aReceiveBehindAMultishotReceiveWaitsUntilItEnds(_ kind: BackendKind) throws {
        try Harness.run(kind) { h in
            let (a, b) = try h.socketPair()
            let group = try h.backend.registerBuffers(count: 8, size: 16)
            let multishot = h.prepare(.receiveMultishot(a, group))
            try h.submit()
            try h.idle(for: .milliseconds(1))
            let single = h.prepare(.recv(a, IOBuffer(capacity: 64)))
            try h.submit()
            try h.idle(for: .milliseconds(1))
            // 8 buffers of 16 bytes hold the 8 messages without a recycle.
            var sent: [UInt8] = []
            func received() -> [UInt8] {
                var bytes: [UInt8] = []
                for chunk in h.intermediates[multishot] ?? [] {
                    guard let id = chunk.bufferID, chunk.result > 0 else { continue }
                    group.withBuffer(id, length: Int(chunk.result)) { bytes.append(contentsOf: $0) }
                }
                return bytes
            }
            for round in 0..<8 {
                let text = Array("round \(round);".utf8)
                sent += text
                h.writeAll(b, text)
                try h.runUntil("round \(round) received", within: .seconds(2)) {
                    received().count >= sent.count || !h.isPending(single)
                }
                #expect(h.isPending(single), "\(kind): the receive behind the multishot one took data")
                guard h.isPending(single) else { return }
            }
            #expect(received() == sent)
            let cancel = h.prepare(.cancel(multishot))
            #expect(try h.waitFor([multishot, cancel]).map(\.result) == [-ECANCELED, 0])
            h.writeAll(b, Array("next".utf8))
            #expect(try h.waitFor(single).bytes == Array("next".utf8))
        }
    }

    /// One 1-byte buffer and "ab": the receive takes "a" and runs dry on "b". A close of
    /// its fd prepared in the callback of "a" ends it, cancelled, with nothing recycled.
    /// (Found by review: on io_uring the kernel's ENOBUFS came in the same reap, after the
    /// close had begun, and the receive waited for a recycle that never came.)
    @Test(arguments: Backends.kinds)
    func aCloseInAChunksCallbackEndsTheReceiveThatRanDry(_ kind: BackendKind) throws {
        try Harness.run(kind) { h in
            let (a, b) = try h.socketPair()
            let group = try h.backend.registerBuffers(count: 1, size: 1)
            let receive = h.prepare(.receiveMultishot(a, group))
            try h.submit()
            try h.idle(for: .milliseconds(1))
            var close: Token?
            h.onCompletion = { outcome in
                if outcome.token == receive, close == nil { close = h.prepare(.close(a)) }
            }
            h.writeAll(b, "ab")
            let chunks = try h.waitForIntermediates(receive, count: 1)
            h.onCompletion = nil
            #expect(chunks.first?.result == 1)
            let closing = try #require(close)
            let got = try h.waitFor([receive, closing], within: .seconds(2))
            #expect(got.map(\.result) == [-ECANCELED, 0])
        }
    }

    @Test(arguments: Backends.kinds)
    func aStarvedReceiveIsCancelledAndEndsOnce(_ kind: BackendKind) throws {
        try Harness.run(kind) { h in
            let (a, b) = try h.socketPair()
            let group = try h.backend.registerBuffers(count: 2, size: 8)
            let token = h.prepare(.receiveMultishot(a, group))
            try h.submit()
            h.writeAll(b, Array(repeating: 7, count: 64))
            let chunks = try h.waitForIntermediates(token, count: 2)
            #expect(chunks.count == 2)
            try h.idle(for: .milliseconds(20))
            #expect(h.intermediates[token]?.count == 2, "no buffer left: the receive waits")
            let cancel = h.prepare(.cancel(token))
            let results = try h.waitFor([token, cancel])
            #expect(results[0].result == -ECANCELED)
            #expect(results[1].result == 0)
        }
    }

    @Test(arguments: Backends.kinds)
    func badBufferGroupsAreTypedErrors(_ kind: BackendKind) throws {
        try Harness.run(kind) { h in
            for (count, size) in [(0, 16), (3, 16), (4, 0), (65536, 16)] {
                #expect(throws: PlexusError.self) { try h.backend.registerBuffers(count: count, size: size) }
            }
        }
    }
}
}
