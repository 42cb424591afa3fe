import Glibc
@testable import Plexus
import SystemPackage
import Testing

extension PlexusTests {
    /// cancel, close with pending operations, cancelAll, and exactly-once completion.
    @Suite struct Cancellation {
        @Test(arguments: Backends.kinds)
        func `cancel a pending read`(kind: BackendKind) throws {
            try Harness.run(kind) { h in
                let pipe = try h.pipe()
                let read = h.prepare(.read(pipe.read, IOBuffer(capacity: 16)))
                try h.submit()
                try h.idle(for: .milliseconds(10))
                #expect(h.isPending(read))
                let cancel = h.prepare(.cancel(read))
                let outcomes = try h.waitFor([cancel, read])
                expectResult(outcomes[0], 0, "the cancel found its target")
                expectError(outcomes[1], ECANCELED)
                #expect(outcomes[1].hadOperation, "the cancelled read hands its buffer back")
                #expect(outcomes[1].bytes == [])
                // The pipe still works afterwards, and nothing of the cancelled read lingers.
                h.writeAll(pipe.write, "after")
                #expect(try h.perform(.read(pipe.read, IOBuffer(capacity: 16))).string == "after")
            }
        }

        @Test(arguments: Backends.kinds)
        func `cancel a pending timeout`(kind: BackendKind) throws {
            try Harness.run(kind) { h in
                let timeout = h.prepare(.timeout(.seconds(3600)))
                try h.submit()
                let cancel = h.prepare(.cancel(timeout))
                let outcomes = try h.waitFor([cancel, timeout])
                expectResult(outcomes[0], 0)
                expectError(outcomes[1], ECANCELED, "a cancelled timeout reports -ECANCELED, not 0")
            }
        }

        @Test(arguments: Backends.kinds)
        func `cancel in the same batch as its target`(kind: BackendKind) throws {
            try Harness.run(kind) { h in
                let pipe = try h.pipe()
                let read = h.prepare(.read(pipe.read, IOBuffer(capacity: 16)))
                let cancel = h.prepare(.cancel(read))
                let outcomes = try h.waitFor([cancel, read])
                expectResult(outcomes[0], 0)
                expectError(outcomes[1], ECANCELED)
            }
        }

        @Test(arguments: Backends.kinds)
        func `cancel of an unknown token is ENOENT`(kind: BackendKind) throws {
            try Harness.run(kind) { h in
                let unknown = Token(rawValue: 0x0000_0bad_0000_1234)
                expectError(try h.perform(.cancel(unknown)), ENOENT)
            }
        }

        @Test(arguments: Backends.kinds)
        func `cancel of a completed operation is ENOENT, even when its slot is reused`(kind: BackendKind) throws {
            try Harness.run(kind) { h in
                let done = try h.perform(.nop)
                // Reuse the slot: a pending read probably lands where the nop was.
                let pipe = try h.pipe()
                let read = h.prepare(.read(pipe.read, IOBuffer(capacity: 4)))
                #expect(read != done.token, "a token is never handed out twice")
                let cancel = try h.perform(.cancel(done.token))
                expectError(cancel, ENOENT)
                #expect(h.isPending(read), "a stale token must not cancel the operation that reuses its slot")
                h.writeAll(pipe.write, "ok")
                expectResult(try h.waitFor(read), 2)
            }
        }

        @Test(arguments: Backends.kinds)
        func `close with a pending read cancels it, then closes`(kind: BackendKind) throws {
            try Harness.run(kind) { h in
                let pipe = try h.pipe()
                let read = h.prepare(.read(pipe.read, IOBuffer(capacity: 16)))
                let poll = h.prepare(.poll(pipe.read, .readable))
                try h.submit()
                try h.idle(for: .milliseconds(10))
                let close = h.prepare(.close(pipe.read))
                let outcomes = try h.waitFor([close, read, poll])
                expectResult(outcomes[0], 0)
                expectError(outcomes[1], ECANCELED)
                expectError(outcomes[2], ECANCELED)
                #expect(outcomes[1].hadOperation)
                #expect(!isOpen(pipe.read.rawValue), "the fd is closed after close completes")
            }
        }

        @Test(arguments: Backends.kinds)
        func `close with pending socket operations`(kind: BackendKind) throws {
            try Harness.run(kind) { h in
                let (a, _) = try h.socketPair()
                let listener = try h.tcpListener()
                let recv = h.prepare(.recv(a, IOBuffer(capacity: 16)))
                let accept = h.prepare(.accept(listener.fd, multishot: true))
                try h.submit()
                try h.idle(for: .milliseconds(10))
                let closeA = h.prepare(.close(a))
                let closeListener = h.prepare(.close(listener.fd))
                let outcomes = try h.waitFor([closeA, closeListener, recv, accept])
                expectResult(outcomes[0], 0)
                expectResult(outcomes[1], 0)
                expectError(outcomes[2], ECANCELED)
                expectError(outcomes[3], ECANCELED)
                #expect(!isOpen(a.rawValue) && !isOpen(listener.fd.rawValue))
            }
        }

        @Test(arguments: Backends.kinds)
        func `close of an fd with nothing pending`(kind: BackendKind) throws {
            try Harness.run(kind) { h in
                let pipe = try h.pipe()
                expectResult(try h.perform(.close(pipe.write)), 0)
                #expect(!isOpen(pipe.write.rawValue))
                expectError(try h.perform(.close(FileDescriptor(rawValue: -1))), EBADF)
            }
        }

        @Test(arguments: Backends.kinds)
        func `cancelAll completes everything exactly once`(kind: BackendKind) throws {
            try Harness.run(kind) { h in
                let pipe = try h.pipe()
                let (a, _) = try h.socketPair()
                let listener = try h.tcpListener()
                var tokens: [Token] = []
                tokens.append(h.prepare(.read(pipe.read, IOBuffer(capacity: 8))))
                tokens.append(h.prepare(.read(pipe.read, IOBuffer(capacity: 8))))
                tokens.append(h.prepare(.recv(a, IOBuffer(capacity: 8))))
                tokens.append(h.prepare(.poll(a, .readable)))
                tokens.append(h.prepare(.poll(a, .readable, multishot: true)))
                tokens.append(h.prepare(.accept(listener.fd)))
                tokens.append(h.prepare(.accept(listener.fd, multishot: true)))
                tokens.append(h.prepare(.timeout(.seconds(3600))))
                tokens.append(h.prepare(.deadline(Deadline.now + .seconds(3600))))
                let nop = h.prepare(.nop)
                try h.submit()
                try h.idle(for: .milliseconds(20))
                #expect(tokens.allSatisfy { h.isPending($0) })
                // Prepared but never submitted: cancelAll must complete these too.
                let unsubmitted = [h.prepare(.read(pipe.read, IOBuffer(capacity: 8))), h.prepare(.timeout(.seconds(3600)))]
                #expect(h.backend.pendingCount == tokens.count + unsubmitted.count)

                let before = h.log.count
                h.cancelAll()
                let delivered = h.log[before...].map(\.token)
                for token in tokens + unsubmitted {
                    #expect(h.finals[token] != nil, "cancelAll did not complete \(token)")
                    if let outcome = h.finals[token] { expectError(outcome, ECANCELED) }
                }
                #expect(Set(delivered).count == delivered.count, "cancelAll handed a token over twice: \(delivered)")
                #expect(h.finals[nop]?.result == 0)
                #expect(h.backend.pendingCount == 0)
                #expect(h.open.isEmpty)

                // Nothing more arrives afterwards, and the backend is still usable.
                try h.idle(for: .milliseconds(20))
                expectResult(try h.perform(.nop), 0)
                h.cancelAll()
                #expect(h.open.isEmpty)
            }
        }

        @Test(arguments: Backends.kinds)
        func `pendingCount follows prepared operations back to 0`(kind: BackendKind) throws {
            try Harness.run(kind) { h in
                #expect(h.backend.pendingCount == 0)
                let pipe = try h.pipe()
                let reads = (0..<3).map { _ in h.prepare(.read(pipe.read, IOBuffer(capacity: 1))) }
                #expect(h.backend.pendingCount == 3, "prepared operations are pending")
                try h.submit()
                try h.idle(for: .milliseconds(10))
                #expect(h.backend.pendingCount == 3)
                h.writeAll(pipe.write, "abc")
                try h.waitFor(reads)
                #expect(h.backend.pendingCount == 0)
            }
        }

        @Test(arguments: Backends.kinds)
        func `thousands of mixed operations with random cancels complete exactly once`(kind: BackendKind) throws {
            // A small ring on io_uring, so the submission queue fills and is flushed.
            try Harness.run(kind, entries: 8) { h in
                var random = SplitMix64(seed: 0x5eed)
                let pipe = try h.pipe()
                var all: [Token] = []
                var cancels = 0
                for round in 0..<40 {
                    var batch: [Token] = []
                    for _ in 0..<50 {
                        switch random.next() % 4 {
                        case 0: batch.append(h.prepare(.timeout(.microseconds(Int64(random.next() % 2000)))))
                        case 1: batch.append(h.prepare(.read(pipe.read, IOBuffer(capacity: 1))))
                        default: batch.append(h.prepare(.nop))
                        }
                    }
                    try h.submit()
                    for token in batch where random.next() % 3 == 0 {
                        batch.append(h.prepare(.cancel(token)))
                        cancels += 1
                    }
                    h.writeAll(pipe.write, [UInt8](repeating: UInt8(round), count: 20))
                    all += batch
                    try h.runUntil("round \(round)") { h.open.count < 200 }
                }
                // Feed the remaining reads, then wait for everything.
                h.writeAll(pipe.write, [UInt8](repeating: 0xff, count: 4096))
                try h.drain(within: .seconds(30))
                #expect(all.allSatisfy { h.finals[$0] != nil })
                #expect(h.log.filter(\.isFinal).count == all.count, "one final completion per token")
                #expect(cancels > 0)
                #expect(h.backend.pendingCount == 0)
                _ = h.readNow(pipe.read)
            }
        }
    }
}

/// A small deterministic generator (SplitMix64), so a failing run can be repeated.
struct SplitMix64 {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}
