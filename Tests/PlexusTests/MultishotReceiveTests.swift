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
