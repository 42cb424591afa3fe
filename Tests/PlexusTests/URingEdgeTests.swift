import CPlexus
import Glibc
@testable import Plexus
import SystemPackage
import Testing

/// The io_uring backend's special paths at their edges (pipes parked on a poll, one read
/// and one write per stream in the ring, deadlines linked or standalone, a full SQ,
/// cancelAll), run on every backend of the run: the others must behave the same.
extension PlexusTests {
@Suite struct URingEdgeTests {
    static func write(_ fd: FileDescriptor, _ text: String) {
        #expect(Glibc.write(fd.rawValue, text, text.utf8.count) == text.utf8.count)
    }

    /// A pipe emptied by a short read.
    static func drainedPipe(_ h: Harness, _ pipe: PipeCase) throws -> (FileDescriptor, FileDescriptor) {
        let (r, w) = try h.pipe(nonBlocking: pipe.nonBlocking)
        write(w, "a")
        let done = try h.perform(.read(r, IOBuffer(capacity: 64)))
        #expect(done.bytes == Array("a".utf8))
        return (r, w)
    }

    // MARK: Pipes

    /// End of file reaches every parked read, in order, not just the first. Once failed on
    /// io_uring: the poll report stopped at the first read's 0, the writer's close woke
    /// the poll only once, and the other reads (and any read after them) never ended.
    @Test(arguments: PipeCase.all)
    func endOfFileReachesEveryParkedRead(_ pipe: PipeCase) throws {
        try Harness.run(pipe.kind) { h in
            let (r, w) = try Self.drainedPipe(h, pipe)
            let reads = (0..<3).map { _ in h.prepare(.read(r, IOBuffer(capacity: 8))) }
            try h.submit()
            try h.idle(for: .milliseconds(2))
            #expect(reads.allSatisfy { h.isPending($0) })
            h.closeNow(w)
            let got = try h.waitFor(reads, within: .seconds(2))
            #expect(got.map(\.result) == [0, 0, 0])
            // A read after the end of file gets it too.
            #expect(try h.perform(.read(r, IOBuffer(capacity: 8)), within: .seconds(2)).result == 0)
        }
    }

    /// The writer closes when data is there and reads are parked: the data, then EOF to the rest.
    @Test(arguments: PipeCase.all)
    func dataThenEOFToParkedReads(_ pipe: PipeCase) throws {
        try Harness.run(pipe.kind) { h in
            let (r, w) = try Self.drainedPipe(h, pipe)
            let reads = (0..<4).map { _ in h.prepare(.read(r, IOBuffer(capacity: 2))) }
            try h.submit()
            try h.idle(for: .milliseconds(2))
            Self.write(w, "xyz")
            h.closeNow(w)
            let got = try h.waitFor(reads, within: .seconds(2))
            #expect(got.map { $0.bytes ?? [] } == [Array("xy".utf8), Array("z".utf8), [], []])
        }
    }

    /// Writes "xy" to a pipe with `first` parked and `second` behind it: `first` must get
    /// "x"; returns `second`'s outcome.
    static func expectOlderReadFirst(_ h: Harness, _ first: Token, _ second: Token, _ w: FileDescriptor) throws -> Outcome {
        try h.submit()
        try h.idle(for: .milliseconds(2))
        #expect(h.isPending(first) && h.isPending(second))
        write(w, "xy")
        try? h.runUntil("both reads", within: .seconds(1)) { !h.isPending(first) && !h.isPending(second) }
        #expect(!h.isPending(first), "the older read still waits; the newer got \(h.finals[second].map(\.description) ?? "nothing")")
        if h.isPending(first) { write(w, "z") }
        let got = try h.waitFor([first], within: .seconds(2))
        #expect(got[0].bytes == Array("x".utf8), "oldest read first, got \(got[0].bytes?.text ?? "nil")")
        if h.isPending(second) { write(w, "z") }
        return try h.waitFor(second, within: .seconds(2))
    }

    /// Three one-byte reads of a drained pipe, of each kind the io_uring backend serves its
    /// own way, then "xyz": each read gets the next byte. A read with a deadline never
    /// parks on the pipe's poll, so it goes to the ring, and a readv waits behind the
    /// parked read: a plain read prepared after either must wait behind it, not park on the
    /// poll beside the reads there (`URingBackend.startOnPipe`). The readv's case fails
    /// when the read parks; the deadline's does not on 6.x kernels, whose task work gives
    /// the ring's read its bytes before the poll's report reaches Plexus (the next test
    /// reaches that case).
    @Test(arguments: PipeCase.all)
    func readsOfADrainedPipeAfterOnesThatCannotParkKeepOrder(_ pipe: PipeCase) throws {
        try Harness.run(pipe.kind) { h in
            for label in ["deadline, read, read", "read, readv, read"] {
                let (r, w) = try Self.drainedPipe(h, pipe)
                let tokens: [Token]
                if label.hasPrefix("deadline") {
                    tokens = [h.prepare(.read(r, IOBuffer(capacity: 1)), deadline: .now + .seconds(30)),
                              h.prepare(.read(r, IOBuffer(capacity: 1))),
                              h.prepare(.read(r, IOBuffer(capacity: 1)))]
                } else {
                    var vector = IOVector(capacity: 1)
                    vector.append(IOBuffer(capacity: 1))
                    tokens = [h.prepare(.read(r, IOBuffer(capacity: 1))),
                              h.prepare(.readv(r, vector)),
                              h.prepare(.read(r, IOBuffer(capacity: 1)))]
                }
                try h.submit()
                try h.idle(for: .milliseconds(2))
                #expect(tokens.allSatisfy { h.isPending($0) }, "\(label)")
                Self.write(w, "xyz")
                let got = try h.waitFor(tokens, within: .seconds(2))
                let bytes = got.map { ($0.bytes ?? $0.vectorBytes?.flatMap { $0 } ?? []).text }
                #expect(bytes == ["x", "y", "z"], "\(pipe) \(label)")
            }
        }
    }

    /// A read of a drained pipe with a deadline, or a readv, prepared in a callback when
    /// the pipe's poll has already reported data that Plexus has not yet read (its CQE
    /// comes later in the same reap), then a plain read: the ring's read is not submitted
    /// yet, so if the plain read parked on the poll beside it, the report would give the
    /// plain read "x". It must wait behind the older read. (Found by review: without
    /// `startOnPipe`'s check of the reads in the ring, the reads get "y", "x".)
    @Test(arguments: PipeCase.all)
    func aReadPreparedBeforeThePollsReportWaitsBehindAReadInTheRing(_ pipe: PipeCase) throws {
        try Harness.run(pipe.kind) { h in
            for older in ["deadline", "readv"] {
                let (r, w) = try Self.drainedPipe(h, pipe)
                let parked = h.prepare(.read(r, IOBuffer(capacity: 4)))  // arms the poll on io_uring
                try h.submit()
                try h.idle(for: .milliseconds(2))
                Self.write(w, "p")
                #expect(try h.waitFor(parked).bytes == Array("p".utf8))  // short: drained again
                Self.write(w, "xy")
                let nop = h.prepare(.nop)
                var reads: [Token] = []
                // The NOP's CQE comes first in this wait (submitted, then the poll's task work).
                _ = try h.backend.wait(timeout: .milliseconds(100)) { (c: consuming Completion) in
                    let token = c.token
                    h.receive(c)
                    guard token == nop else { return }
                    if older == "deadline" {
                        reads.append(h.prepare(.read(r, IOBuffer(capacity: 1)), deadline: .now + .seconds(30)))
                    } else {
                        var vector = IOVector(capacity: 1)
                        vector.append(IOBuffer(capacity: 1))
                        reads.append(h.prepare(.readv(r, vector)))
                    }
                    reads.append(h.prepare(.read(r, IOBuffer(capacity: 1))))
                }
                #expect(reads.count == 2, "\(older): the NOP did not complete in the first wait")
                let got = try h.waitFor(reads, within: .seconds(2))
                let bytes = got.map { ($0.bytes ?? $0.vectorBytes?.flatMap { $0 } ?? []).text }
                #expect(bytes == ["x", "y"], "\(pipe) \(older)")
            }
        }
    }

    /// A read parked on the pipe's poll, then a readv of the same pipe: the older read
    /// gets the first bytes. Once failed on io_uring: the readv, which cannot park, went
    /// to the ring ahead of the parked read and took its bytes.
    @Test(arguments: PipeCase.all)
    func parkedReadThenReadvKeepOrder(_ pipe: PipeCase) throws {
        try Harness.run(pipe.kind) { h in
            let (r, w) = try Self.drainedPipe(h, pipe)
            let first = h.prepare(.read(r, IOBuffer(capacity: 1)))
            var vector = IOVector(capacity: 1)
            vector.append(IOBuffer(capacity: 8))
            let second = h.prepare(.readv(r, vector))
            let last = try Self.expectOlderReadFirst(h, first, second, w)
            let text = last.vectorBytes?.flatMap { $0 }.text ?? "nil"
            #expect(text.hasPrefix("y"), "readv got \(text)")
        }
    }

    /// A read parked on the pipe's poll, then a read with a deadline (which never parks):
    /// the older read must get the first bytes.
    @Test(arguments: PipeCase.all)
    func parkedReadThenDeadlineReadKeepOrder(_ pipe: PipeCase) throws {
        try Harness.run(pipe.kind) { h in
            let (r, w) = try Self.drainedPipe(h, pipe)
            let first = h.prepare(.read(r, IOBuffer(capacity: 1)))
            let second = h.prepare(.read(r, IOBuffer(capacity: 8)), deadline: .now + .seconds(5))
            let last = try Self.expectOlderReadFirst(h, first, second, w)
            #expect(last.bytes?.text.hasPrefix("y") == true, "deadline read got \(last.bytes?.text ?? "nil")")
        }
    }

    /// Many reads queued on one pipe, interleaved with writes through the backend and
    /// cancels of some: the data goes to the remaining reads in order.
    @Test(arguments: PipeCase.all)
    func manyQueuedReadsInterleavedWithWritesAndCancels(_ pipe: PipeCase) throws {
        try Harness.run(pipe.kind) { h in
            let (r, w) = try Self.drainedPipe(h, pipe)
            var reads: [Token] = []
            for i in 0..<40 {
                reads.append(h.prepare(.read(r, IOBuffer(capacity: 1))))
                if i % 10 == 9 { try h.submit(); try h.idle(for: .milliseconds(1)) }
            }
            try h.submit()
            let cancelled = Set([3, 7, 20, 39].map { reads[$0] })
            for t in cancelled { h.prepare(.cancel(t)) }
            try h.submit()
            try h.idle(for: .milliseconds(2))
            var writes: [Token] = []
            for i in 0..<36 { writes.append(h.prepare(.write(w, IOBuffer(bytes: [UInt8(i)])))) }
            try h.submit()
            let got = try h.waitFor(reads + writes, within: .seconds(3))
            let live = zip(reads, got.prefix(40)).filter { !cancelled.contains($0.0) }.map(\.1)
            #expect(live.compactMap(\.bytes).flatMap { $0 } == (0..<36).map(UInt8.init), "\(live.map(\.description))")
            #expect(zip(reads, got).filter { cancelled.contains($0.0) }.allSatisfy { $0.1.result == -ECANCELED })
        }
    }

    // MARK: A full SQ before the first submit

    /// entries 2, before the first submit (the ring is still disabled): a close whose
    /// second SQE does not fit must still leave the fd number usable once it completed.
    @Test(arguments: Backends.kinds)
    func tinyRingCloseBeforeFirstSubmitLeavesNumberUsable(_ kind: BackendKind) throws {
        try Harness.run(kind, entries: 2) { h in
            let (r, w) = try h.pipe()
            let number = r.rawValue
            let nop = h.prepare(.nop)
            h.disown(r)
            let close = h.prepare(.close(r))
            try h.submit()
            let got = try h.waitFor([nop, close], within: .seconds(2))
            #expect(got.map(\.result) == [0, 0])
            #expect(!isOpen(number))
            // The number comes back as a new pipe's end.
            let (r2, w2) = try h.pipe()
            #expect(r2.rawValue == number)
            Self.write(w2, "hi")
            let read = try h.perform(.read(r2, IOBuffer(capacity: 8)), within: .seconds(2))
            #expect(read.bytes == Array("hi".utf8), "a read of the reused fd number: \(read)")
            _ = h.readNow(r2)
            let write = try h.perform(.write(w, IOBuffer("x")), within: .seconds(2))
            expectError(write, EPIPE)
        }
    }

    /// entries 2, before the first submit: a close that waits for SQ space has closed its
    /// fd for its caller, as on epoll and poll, where it runs at once: a write prepared
    /// after it ends with EBADF, on a pipe seen before (whose writes start from their
    /// record on io_uring) and on one not seen yet. (Found by review: io_uring wrote to
    /// the pipe at once.)
    @Test(arguments: Backends.kinds)
    func tinyRingWriteAfterABackloggedCloseIsEBADF(_ kind: BackendKind) throws {
        for seenBefore in [false, true] {
            try Harness.run(kind, entries: 2) { h in
                let (r, w) = try h.pipe()
                // A pipe write takes no SQE on io_uring: it is done at once.
                let first = seenBefore ? [h.prepare(.write(w, IOBuffer("a")))] : []
                let nops = [h.prepare(.nop), h.prepare(.nop)]
                h.disown(w)
                let close = h.prepare(.close(w))
                let write = h.prepare(.write(w, IOBuffer("x")))
                try h.submit()
                let got = try h.waitFor(first + nops + [close, write], within: .seconds(2))
                #expect(got.map(\.result) == (seenBefore ? [1] : []) + [0, 0, 0, -EBADF], "seen before: \(seenBefore)")
                #expect(h.readNow(r) == (seenBefore ? Array("a".utf8) : []),
                        "the write prepared after the close reached the pipe (seen before: \(seenBefore))")
            }
        }
    }

    /// entries 2, before the first submit: a read and then a close of its fd, both waiting
    /// for SQ space. The close ends the read as it ends any operation on the fd prepared
    /// before it, with ECANCELED (on epoll and poll the read parks, and the close cancels
    /// it), not with the EBADF of operations prepared after the close.
    @Test(arguments: Backends.kinds)
    func tinyRingReadBeforeABackloggedCloseIsCancelled(_ kind: BackendKind) throws {
        try Harness.run(kind, entries: 2) { h in
            let (r, _) = try h.pipe()
            let nops = [h.prepare(.nop), h.prepare(.nop)]
            let read = h.prepare(.read(r, IOBuffer(capacity: 8)))
            h.disown(r)
            let close = h.prepare(.close(r))
            try h.submit()
            let got = try h.waitFor(nops + [read, close], within: .seconds(2))
            #expect(got.map(\.result) == [0, 0, -ECANCELED, 0])
        }
    }

    /// A backend that goes before its first submit: the closes it prepared, one with its
    /// SQEs and one waiting for SQ space on io_uring, have closed their fds, as on epoll
    /// and poll, where a close runs at once. (Found by review: a ring never enabled ran
    /// nothing, and its deinit dropped the closes with the fds open.)
    @Test(arguments: Backends.kinds)
    func closesOfABackendGoneBeforeItsFirstSubmitRun(_ kind: BackendKind) throws {
        var first: [Int32] = [0, 0], second: [Int32] = [0, 0]
        #expect(plexus_pipe2(&first, O_CLOEXEC | O_NONBLOCK) == 0 && plexus_pipe2(&second, O_CLOEXEC | O_NONBLOCK) == 0)
        defer { _ = Glibc.close(first[1]); _ = Glibc.close(second[1]) }
        do {
            let selected = try Backends.start(kind, entries: 2)
            let backend = selected.backend
            _ = backend.prepare(.close(FileDescriptor(rawValue: first[0])))
            _ = backend.prepare(.close(FileDescriptor(rawValue: second[0])))
            #expect(backend.pendingCount <= 2)
        }
        #expect(!isOpen(first[0]), "\(kind): the close with its SQEs left its fd open")
        #expect(!isOpen(second[0]), "\(kind): the close waiting for SQ space left its fd open")
    }

    /// entries 2, before the first submit: a close waiting for SQ space, and a cancel of
    /// it. The fd is closed for its caller once the close is prepared, on every backend
    /// (epoll and poll close at once): the cancel comes too late (ENOENT), the close runs,
    /// and the reads prepared before it end with ECANCELED. (Found by review: io_uring
    /// cancelled the close, so the fd stayed open with what it knew of the pipe forgotten,
    /// and a later read took the bytes of the read still in the ring.)
    @Test(arguments: Backends.kinds)
    func tinyRingACloseWaitingForSQSpaceIsNotCancelled(_ kind: BackendKind) throws {
        try Harness.run(kind, entries: 2) { h in
            let (r, _) = try h.pipe()
            let first = h.prepare(.read(r, IOBuffer(capacity: 1)))
            let nop = h.prepare(.nop)
            let second = h.prepare(.read(r, IOBuffer(capacity: 1)))
            h.disown(r)
            let close = h.prepare(.close(r))
            let cancel = h.prepare(.cancel(close))
            try h.submit()
            let got = try h.waitFor([first, nop, second, close, cancel], within: .seconds(2))
            #expect(got.map(\.result) == [-ECANCELED, 0, -ECANCELED, 0, -ENOENT])
        }
    }

    /// entries 2, before the first submit: an operation that waits in the backlog and a
    /// cancel of it prepared after a submit: the cancel finds it. Once failed on io_uring:
    /// the cancel reached the kernel first, answered ENOENT, and the read ran uncancelled.
    @Test(arguments: Backends.kinds)
    func tinyRingCancelOfABackloggedRead(_ kind: BackendKind) throws {
        try Harness.run(kind, entries: 2) { h in
            let pipes = try (0..<3).map { _ in try h.pipe() }
            let reads = pipes.map { h.prepare(.read($0.read, IOBuffer(capacity: 8))) }
            try h.submit()
            let cancel = h.prepare(.cancel(reads[2]))
            try h.submit()
            let got = try? h.waitFor([reads[2], cancel], within: .seconds(2))
            #expect(got != nil, "cancel: \(h.finals[cancel].map(\.description) ?? "pending"), read: \(h.finals[reads[2]].map(\.description) ?? "pending")")
            if let got {
                #expect(got[0].result == -ECANCELED, "\(got[0])")
                #expect(got[1].result == 0, "\(got[1])")
            }
            for p in pipes { Self.write(p.write, "z") }
            try h.waitFor(reads, within: .seconds(2))
        }
    }

    // MARK: Byte-stream order

    static func pattern(_ i: Int, _ size: Int) -> [UInt8] {
        (0..<size).map { UInt8(truncatingIfNeeded: ($0 &* 7) ^ (i &* 31)) }
    }

    /// 20 writes of distinct 48 KiB patterns to a socket whose peer reads slowly, some
    /// cancelled and some timed out in the middle: what arrives is, in order, the prefix
    /// each write reports, and nothing else.
    @Test(arguments: Backends.kinds)
    func twentyWritesWithCancelsAndDeadlinesKeepTheStream(_ kind: BackendKind) throws {
        try Harness.run(kind) { h in
            let (xa, xb) = try h.socketPair()
            let listener = try h.tcpListener()
            let client = try h.tcpClient(port: listener.port)
            let server = FileDescriptor(rawValue: plexus_accept4(listener.fd.rawValue, nil, nil, Int32(SOCK_CLOEXEC.rawValue | SOCK_NONBLOCK.rawValue)))
            try #require(server.rawValue >= 0)
            h.own(server.rawValue)
            for (transport, a, b) in [("unix", xa, xb), ("tcp", client, server)] {
                let size = 48 * 1024
                var tokens: [Token] = []
                for i in 0..<20 {
                    let buffer = IOBuffer(bytes: Self.pattern(i, size))
                    if i == 8 || i == 15 {
                        tokens.append(h.prepare(.send(a, buffer), deadline: .now + .milliseconds(5)))
                    } else if i % 2 == 0 {
                        tokens.append(h.prepare(.send(a, buffer)))
                    } else {
                        tokens.append(h.prepare(.write(a, buffer)))
                    }
                }
                try h.submit()
                let cancels = [5, 12, 19].map { h.prepare(.cancel(tokens[$0])) }
                try h.submit()
                try h.idle(for: .milliseconds(20))
                // Read slowly: 4 KiB at a time, with the backend running in between.
                var received: [UInt8] = []
                var buffer = [UInt8](repeating: 0, count: 4096)
                let start = ContinuousClock.now
                while ContinuousClock.now - start < .seconds(8) {
                    let n = Glibc.recv(b.rawValue, &buffer, buffer.count, Int32(MSG_DONTWAIT))
                    if n > 0 { received += buffer[0..<n] } else {
                        if tokens.allSatisfy({ !h.isPending($0) }) { break }
                    }
                    try h.waitOnce(timeout: .microseconds(200))
                }
                let done = try h.waitFor(tokens + cancels, within: .seconds(2))
                var expected: [UInt8] = []
                for i in 0..<20 where done[i].result > 0 { expected += Self.pattern(i, size).prefix(Int(done[i].result)) }
                let results = done.prefix(20).map(\.result)
                #expect(received.count == expected.count, "\(kind) \(transport): got \(received.count) bytes, the writes report \(expected.count): \(results)")
                #expect(received == expected, "\(kind) \(transport): stream differs; results \(results)")
                for i in [5, 12, 19] {
                    #expect(done[i].result == -ECANCELED || done[i].result == Int32(size), "\(transport) write \(i): \(done[i])")
                }
            }
        }
    }

    /// Reads and writes mixed on one socket with cancels and deadlines in the middle.
    @Test(arguments: Backends.kinds)
    func mixedReadsAndWritesWithCancelsKeepOrder(_ kind: BackendKind) throws {
        try Harness.run(kind) { h in
            let (a, b) = try h.socketPair()
            var reads: [Token] = []
            var cancelled: Set<Int> = []
            for i in 0..<30 {
                if i % 7 == 3 {
                    reads.append(h.prepare(.recv(a, IOBuffer(capacity: 1)), deadline: .now + .milliseconds(3)))
                    cancelled.insert(i)
                } else {
                    reads.append(h.prepare(.read(a, IOBuffer(capacity: 1))))
                }
                _ = h.prepare(.write(a, IOBuffer(bytes: [UInt8(i)])))
            }
            try h.submit()
            for i in [4, 11, 25] { h.prepare(.cancel(reads[i])); cancelled.insert(i) }
            try h.submit()
            try h.idle(for: .milliseconds(20))
            let live = (0..<30).filter { !cancelled.contains($0) }
            h.writeAll(b, live.map { UInt8($0) })
            let got = try h.waitFor(reads, within: .seconds(3))
            for i in cancelled { #expect(got[i].result == -ECANCELED, "read \(i): \(got[i])") }
            #expect(live.compactMap { got[$0].bytes?.first } == live.map { UInt8($0) }, "\(live.map { got[$0].description })")
            try h.drain(within: .seconds(2))
            #expect(try h.readExactly(b, count: 30) == (0..<30).map { UInt8($0) })
        }
    }

    // MARK: Deadlines

    /// Deadlines already passed: in the ring (linked) and waiting in line (standalone).
    @Test(arguments: Backends.kinds)
    func deadlinesAlreadyPassed(_ kind: BackendKind) throws {
        try Harness.run(kind) { h in
            let (a, b) = try h.socketPair()
            let past = Deadline(nanoseconds: Deadline.now.nanoseconds - 1_000_000_000)
            let start = ContinuousClock.now
            let first = h.prepare(.recv(a, IOBuffer(capacity: 1)), deadline: past)
            let second = h.prepare(.recv(a, IOBuffer(capacity: 1)), deadline: past)
            let plain = h.prepare(.recv(a, IOBuffer(capacity: 1)))
            let third = h.prepare(.recv(a, IOBuffer(capacity: 1)), deadline: past)
            try h.submit()
            let got = try h.waitFor([first, second, third], within: .seconds(2))
            #expect(got.map(\.result) == [-ECANCELED, -ECANCELED, -ECANCELED], "\(got)")
            #expect(ContinuousClock.now - start < .milliseconds(500))
            h.writeAll(b, [42])
            #expect(try h.waitFor(plain, within: .seconds(2)).bytes == [42])
            // A write to a full socket with a passed deadline, and one behind it.
            let filled = h.fillSendBuffer(a)
            let w1 = h.prepare(.send(a, IOBuffer("x")), deadline: past)
            let w2 = h.prepare(.send(a, IOBuffer("y")), deadline: past)
            let w3 = h.prepare(.send(a, IOBuffer("z")))
            try h.submit()
            let ws = try h.waitFor([w1, w2], within: .seconds(2))
            #expect(ws.map(\.result) == [-ECANCELED, -ECANCELED])
            var tail: [UInt8] = []
            var buffer = [UInt8](repeating: 0, count: 65536)
            let start2 = ContinuousClock.now
            while tail.count < filled + 1 && ContinuousClock.now - start2 < .seconds(5) {
                let n = Glibc.recv(b.rawValue, &buffer, buffer.count, Int32(MSG_DONTWAIT))
                if n > 0 { tail += buffer[0..<n] } else { try h.waitOnce(timeout: .milliseconds(1)) }
            }
            #expect(tail.count == filled + 1)
            #expect(tail.last == UInt8(ascii: "z"))
            #expect(try h.waitFor(w3).result == 1)
        }
    }

    /// 1000 reads with deadlines on one socket, half of them expiring: each ends once,
    /// the others get the data in order, and no timeout stays behind.
    @Test(arguments: Backends.kinds)
    func thousandDeadlinesHalfExpire(_ kind: BackendKind) throws {
        try Harness.run(kind) { h in
            let (a, b) = try h.socketPair()
            let soon = Deadline.now + .milliseconds(30)
            let far = Deadline.now + .seconds(30)
            var reads: [Token] = []
            for i in 0..<1000 {
                let at = i % 2 == 0 ? soon : far
                reads.append(h.prepare(.recv(a, IOBuffer(capacity: 1)), deadline: at))
            }
            try h.submit()
            // Bounded, not timed: a sanitizer build takes longer to prepare 1000 reads.
            let expired = (0..<1000).filter { $0 % 2 == 0 }
            try h.runUntil("every expired read ends", within: .seconds(10)) { expired.allSatisfy { !h.isPending(reads[$0]) } }
            let data = (0..<500).map { UInt8(truncatingIfNeeded: $0) }
            h.writeAll(b, data)
            let got = try h.waitFor(reads, within: .seconds(5))
            var expiredOK = true
            var oddBytes: [UInt8] = []
            for i in 0..<1000 {
                if i % 2 == 0 { if got[i].result != -ECANCELED { expiredOK = false } } else if let byte = got[i].bytes?.first { oddBytes.append(byte) }
            }
            #expect(expiredOK)
            #expect(oddBytes == data)
            if let uring = h.backend as? URingBackend {
                try h.runUntil("no standalone deadline left", within: .seconds(2)) { uring.standaloneDeadlines == 0 }
            }
        }
    }

    /// Equal deadlines for many operations, the data arriving around that moment: each
    /// read ends exactly once, and a cancelled one took no data.
    @Test(arguments: Backends.kinds)
    func finishingAtTheDeadline(_ kind: BackendKind) throws {
        try Harness.run(kind) { h in
            let (a, b) = try h.socketPair()
            var sent = 0
            var got: [UInt8] = []
            for round in 0..<150 {
                let at = Deadline.now + .microseconds(300 + (round % 5) * 50)
                let reads = (0..<4).map { _ in h.prepare(.recv(a, IOBuffer(capacity: 1)), deadline: at) }
                try h.submit()
                while Deadline.now < at { try h.waitOnce(timeout: .zero) }
                h.writeAll(b, [UInt8(truncatingIfNeeded: sent), UInt8(truncatingIfNeeded: sent + 1)])
                sent += 2
                let done = try h.waitFor(reads, within: .seconds(2))
                got += done.compactMap { $0.result > 0 ? $0.bytes?.first : nil }
                #expect(done.allSatisfy { $0.result == 1 || $0.result == -ECANCELED }, "\(done)")
                got += h.readNow(a)
            }
            #expect(got == (0..<sent).map { UInt8(truncatingIfNeeded: $0) }, "\(got.count) of \(sent) bytes, or out of order")
        }
    }

    // MARK: A full SQ (enabled ring)

    /// entries 2 after the first submit: every kind at once, closes (two SQEs) with reads
    /// pending on their fds, cancels, deadlines (two SQEs) expiring and not.
    @Test(arguments: Backends.kinds)
    func tinyRingEveryKindOnce(_ kind: BackendKind) throws {
        try Harness.run(kind, entries: 2) { h in
            try h.perform(.nop)
            let (sa, sb) = try h.socketPair()
            let pipes = try (0..<6).map { _ in try h.pipe() }
            let file = try h.temporaryFile(contents: Array("0123456789".utf8))
            var expect: [(Token, Int32, String)] = []
            for round in 0..<4 {
                expect.append((h.prepare(.nop), 0, "nop"))
                expect.append((h.prepare(.read(file.fd, IOBuffer(capacity: 4), offset: 2)), 4, "file read"))
                expect.append((h.prepare(.timeout(.milliseconds(1))), 0, "timeout"))
                expect.append((h.prepare(.nop, deadline: .now + .seconds(20)), 0, "nop deadline"))
                expect.append((h.prepare(.write(pipes[round].write, IOBuffer("ab"))), 2, "pipe write"))
                expect.append((h.prepare(.read(pipes[round].read, IOBuffer(capacity: 8))), 2, "pipe read"))
                expect.append((h.prepare(.send(sa, IOBuffer(bytes: [UInt8(round)]))), 1, "send"))
                expect.append((h.prepare(.recv(sb, IOBuffer(capacity: 1)), deadline: .now + .seconds(20)), 1, "recv deadline"))
                expect.append((h.prepare(.recv(sa, IOBuffer(capacity: 1)), deadline: .now + .milliseconds(2)), -ECANCELED, "recv expiring"))
                let pending = h.prepare(.read(pipes[4].read, IOBuffer(capacity: 1)))
                expect.append((pending, -ECANCELED, "read cancelled"))
                expect.append((h.prepare(.cancel(pending)), 0, "cancel"))
            }
            // Closes of pipes with reads pending on them.
            let doomed = [pipes[4].write, pipes[5].read]
            let r5 = h.prepare(.read(pipes[5].read, IOBuffer(capacity: 1)))
            expect.append((r5, -ECANCELED, "read of closed"))
            for fd in doomed { h.disown(fd); expect.append((h.prepare(.close(fd)), 0, "close")) }
            try h.submit()
            let got = try h.waitFor(expect.map(\.0), within: .seconds(5))
            for (i, outcome) in got.enumerated() {
                #expect(outcome.result == expect[i].1, "\(expect[i].2): \(outcome)")
            }
            for fd in doomed { #expect(!isOpen(fd.rawValue)) }
            // The stream is in order.
            #expect(got.enumerated().filter { expect[$0.offset].2 == "recv deadline" }.compactMap { $0.element.bytes?.first } == [0, 1, 2, 3])
            try h.drain(within: .seconds(2))
            if let uring = h.backend as? URingBackend {
                try h.runUntil("no standalone deadline left", within: .seconds(2)) { uring.standaloneDeadlines == 0 }
            }
        }
    }

    // MARK: cancelAll with operations in every state

    @Test(arguments: PipeCase.all)
    func cancelAllInEveryState(_ pipe: PipeCase) throws {
        try Harness.run(pipe.kind) { h in
            let (r, w) = try Self.drainedPipe(h, pipe)
            let parked = (0..<2).map { _ in h.prepare(.read(r, IOBuffer(capacity: 1))) }
            let (a, b) = try h.socketPair()
            let inRing = h.prepare(.recv(a, IOBuffer(capacity: 1)))
            let waiting = h.prepare(.recv(a, IOBuffer(capacity: 1)), deadline: .now + .seconds(30))
            let (e, f) = try h.socketPair()
            let filled = h.fillSendBuffer(e)
            let writeInRing = h.prepare(.send(e, IOBuffer("x")))
            let writeWaiting = h.prepare(.write(e, IOBuffer("y")))
            let (c, d) = try h.socketPair()
            let group = try h.backend.registerBuffers(count: 2, size: 8)
            let starved = h.prepare(.receiveMultishot(c, group))
            let timeout = h.prepare(.timeout(.seconds(30)))
            try h.submit()
            h.writeAll(d, Array(repeating: 7, count: 64))
            _ = try h.waitForIntermediates(starved, count: 2, within: .seconds(2))
            try h.idle(for: .milliseconds(5))
            let all = parked + [inRing, waiting, writeInRing, writeWaiting, starved, timeout]
            #expect(all.allSatisfy { h.isPending($0) })
            h.cancelAll()
            for t in all { #expect(!h.isPending(t), "\(t) still pending after cancelAll") }
            let results = all.map { h.finals[$0]?.result }
            #expect(results.allSatisfy { $0 == -ECANCELED }, "\(results)")
            #expect(h.backend.pendingCount == 0)
            if let uring = h.backend as? URingBackend {
                try h.runUntil("no standalone deadline left", within: .seconds(2)) { uring.standaloneDeadlines == 0 }
            }
            // Everything still works afterwards, in order.
            Self.write(w, "pq")
            let again = [h.prepare(.read(r, IOBuffer(capacity: 1))), h.prepare(.read(r, IOBuffer(capacity: 1)))]
            #expect(try h.waitFor(again, within: .seconds(2)).map { $0.bytes ?? [] } == [Array("p".utf8), Array("q".utf8)])
            let r1 = h.prepare(.recv(a, IOBuffer(capacity: 1)))
            let r2 = h.prepare(.recv(a, IOBuffer(capacity: 1)))
            try h.submit()
            h.writeAll(b, [1, 2])
            #expect(try h.waitFor([r1, r2], within: .seconds(2)).map { $0.bytes ?? [] } == [[1], [2]])
            let w1 = h.prepare(.send(e, IOBuffer("X")))
            let w2 = h.prepare(.write(e, IOBuffer("Y")))
            try h.submit()
            var tail: [UInt8] = []
            var buffer = [UInt8](repeating: 0, count: 65536)
            let start = ContinuousClock.now
            while tail.count < filled + 2 && ContinuousClock.now - start < .seconds(5) {
                let n = Glibc.recv(f.rawValue, &buffer, buffer.count, Int32(MSG_DONTWAIT))
                if n > 0 { tail += buffer[0..<n] } else { try h.waitOnce(timeout: .milliseconds(1)) }
            }
            #expect(Array(tail.suffix(2)) == Array("XY".utf8), "the cancelled writes left nothing, the new ones arrive in order")
            try h.waitFor([w1, w2], within: .seconds(2))
            h.backend.unregisterBuffers(group)
        }
    }

    /// EventLoop shutdown with reads parked on a pipe, reads waiting on a socket, a write
    /// waiting behind a full socket, a timer: every callback exactly once, ECANCELED.
    @Test(arguments: Backends.kinds)
    func loopShutdownWithWaitingOperations(_ kind: BackendKind) throws {
        let loop = try Backends.loop(kind)
        var p: [Int32] = [0, 0]
        try #require(plexus_pipe2(&p, O_CLOEXEC | O_NONBLOCK) == 0)
        var s: [Int32] = [0, 0]
        try #require(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue | SOCK_CLOEXEC.rawValue | SOCK_NONBLOCK.rawValue), 0, &s) == 0)
        defer { for fd in p + s { _ = Glibc.close(fd) } }
        let r = FileDescriptor(rawValue: p[0]), a = FileDescriptor(rawValue: s[0])
        _ = Glibc.write(p[1], "a", 1)
        var first = false
        loop.read(r, IOBuffer(capacity: 8)) { _, _ in first = true }
        LoopTestSupport.turn(loop) { first }
        var calls: [Int: [Int32]] = [:]
        func record(_ i: Int, _ result: Result<Int, PlexusError>) {
            switch result {
            case .success(let n): calls[i, default: []].append(Int32(n))
            case .failure(let e): calls[i, default: []].append(-e.errno.rawValue)
            }
        }
        for i in 0..<3 { loop.read(r, IOBuffer(capacity: 1)) { res, _ in record(i, res) } }
        for i in 3..<6 { loop.recv(a, IOBuffer(capacity: 1)) { res, _ in record(i, res) } }
        var filler = [UInt8](repeating: 0, count: 65536)
        while Glibc.send(s[0], &filler, filler.count, Int32(MSG_DONTWAIT)) > 0 {}
        for i in 6..<9 { loop.send(a, IOBuffer("x")) { res, _ in record(i, res) } }
        for _ in 0..<5 { loop.runOnce(timeout: .milliseconds(1)) }
        #expect(calls.isEmpty, "\(calls)")
        loop.shutdown()
        loop.run()
        #expect(calls.count == 9, "\(calls)")
        #expect(calls.values.allSatisfy { $0 == [-ECANCELED] }, "\(calls)")
    }

    /// A multishot receive starved of buffers with data left in the socket, a recv behind
    /// it: when the group is unregistered the multishot one ends, and the recv gets the
    /// next bytes in order; the peer closing then ends a further recv with 0.
    @Test(arguments: Backends.kinds)
    func recvBehindAStarvedMultishotGetsTheRestInOrder(_ kind: BackendKind) throws {
        try Harness.run(kind) { h in
            let (a, b) = try h.socketPair()
            let group = try h.backend.registerBuffers(count: 2, size: 4)
            let multishot = h.prepare(.receiveMultishot(a, group))
            try h.submit()
            try h.idle(for: .milliseconds(1))
            let data = (0..<20).map { UInt8($0) }
            h.writeAll(b, data)
            let chunks = try h.waitForIntermediates(multishot, count: 2, within: .seconds(2))
            let behind = h.prepare(.recv(a, IOBuffer(capacity: 64)))
            try h.submit()
            try h.idle(for: .milliseconds(5))
            #expect(h.isPending(behind))
            var got: [UInt8] = []
            for chunk in chunks { if let id = chunk.bufferID { group.withBuffer(id, length: Int(chunk.result)) { got += $0 } } }
            h.backend.unregisterBuffers(group)
            let end = try h.waitFor(multishot, within: .seconds(2))
            #expect(end.result < 0, "\(end)")
            let rest = try h.waitFor(behind, within: .seconds(2))
            got += rest.bytes ?? []
            #expect(got == data, "\(got)")
            h.closeNow(b)
            #expect(try h.perform(.recv(a, IOBuffer(capacity: 8)), within: .seconds(2)).result == 0)
        }
    }

    // MARK: The kernel ends a multishot operation while a close or cancel of it waits

    /// A multishot poll or accept (`multishot` picks) whose kernel operation ends (its CQE
    /// meets a full CQ: 24 NOPs on an 8-entry CQ) after a NOP's callback, reaped before
    /// it, prepared `then` of it: a close of its fd, or a cancel of it. The operation was
    /// prepared first: it ends with ECANCELED, the cancel with 0, as on epoll and poll.
    /// (Found by review, on io_uring: it was armed again, and got EBADF after the close,
    /// or ran on past the cancel, which answered ENOENT.)
    func multishotEndedByTheKernel(_ h: Harness, accept: Bool, close: Bool) throws {
        let target: Token, fd: FileDescriptor, peer: () throws -> Void
        if accept {
            let listener = try h.tcpListener()
            (fd, target) = (listener.fd, h.prepare(.accept(listener.fd, multishot: true)))
            peer = { _ = try h.tcpClient(port: listener.port) }
        } else {
            let (a, b) = try h.socketPair()
            (fd, target) = (a, h.prepare(.poll(a, .readable, multishot: true)))
            peer = { h.writeAll(b, "x") }
        }
        try h.submit()
        try h.idle(for: .milliseconds(1))
        let nops = (0..<24).map { _ in h.prepare(.nop) }
        try h.submit()
        try peer()
        var then: Token?
        if close { h.disown(fd) }
        h.onCompletion = { outcome in
            if then == nil, outcome.kind == .nop { then = h.prepare(close ? .close(fd) : .cancel(target)) }
        }
        try h.waitOnce(timeout: .zero)  // the report meets the full CQ: the kernel ends it
        try h.waitFor(nops)
        h.onCompletion = nil
        let got = try h.waitFor([target, try #require(then)], within: .seconds(2))
        #expect(got.map(\.result) == [-ECANCELED, 0], "\(h.log.filter { $0.token == target }.map(\.description))")
    }

    @Test(arguments: Backends.kinds, [false, true])
    func aMultishotOperationTheKernelEndsAfterItsFDsCloseBeganIsCancelled(_ kind: BackendKind, accept: Bool) throws {
        try Harness.run(kind, entries: 2) { h in try multishotEndedByTheKernel(h, accept: accept, close: true) }
    }

    @Test(arguments: Backends.kinds, [false, true])
    func aMultishotOperationTheKernelEndsWhileItsCancelWaitsIsCancelled(_ kind: BackendKind, accept: Bool) throws {
        try Harness.run(kind, entries: 2) { h in try multishotEndedByTheKernel(h, accept: accept, close: false) }
    }

    /// entries 2, after the first submit (the ring is enabled): a recv in the ring, a NOP,
    /// then a close of the recv's socket, whose cancel takes the SQ's last entry. The recv
    /// ends with ECANCELED. (Once failed on io_uring: the close's hard-linked SQE was taken
    /// with a submit for room, which cut the link; the kernel ran the cancel in io-wq after
    /// the close, EBADF, and the recv waited for ever on a socket closed for its caller.
    /// Found by the first runs on COOP_TASKRUN and plain rings.)
    @Test(arguments: Backends.kinds)
    func tinyEnabledRingCloseWithOneSQEntryLeftCancelsTheRecv(_ kind: BackendKind) throws {
        try Harness.run(kind, entries: 2) { h in
            let (a, _) = try h.socketPair()
            try h.perform(.nop)
            let recv = h.prepare(.recv(a, IOBuffer(capacity: 8)))
            try h.submit()
            try h.idle(for: .milliseconds(2))
            let nop = h.prepare(.nop)
            h.disown(a)
            let close = h.prepare(.close(a))
            try h.submit()
            let got = try h.waitFor([recv, nop, close], within: .seconds(2))
            #expect(got.map(\.result) == [-ECANCELED, 0, 0])
        }
    }

    /// A cancel prepared while the kernel's EAGAIN for a recv(MSG_DONTWAIT) waits in the
    /// CQ: the cancel reports 0 and the recv ends with ECANCELED at once, as on epoll and
    /// poll. (Found by review, on io_uring: the EAGAIN armed a readiness poll, the cancel
    /// found nothing (ENOENT), and the recv went on and took the next byte.)
    @Test(arguments: Backends.kinds)
    func aCancelOfARecvWhoseEAGAINIsNotYetReapedEndsIt(_ kind: BackendKind) throws {
        try Harness.run(kind) { h in
            let (a, b) = try h.socketPair()
            let recv = h.prepare(.recv(a, IOBuffer(capacity: 8), flags: Int32(MSG_DONTWAIT)))
            try h.submit()
            let cancel = h.prepare(.cancel(recv))
            let c = try h.waitFor(cancel, within: .seconds(2))
            try h.idle(for: .milliseconds(50))
            let stillPending = h.isPending(recv)
            h.writeAll(b, "x")
            let r = try h.waitFor(recv, within: .seconds(2))
            #expect(c.result == 0, "cancel")
            #expect(!stillPending, "recv still pending 50 ms after its cancel completed")
            #expect(r.result == -ECANCELED)
        }
    }

    /// Two closes of one fd, the second waiting for SQ space; the first one's callback
    /// opens a file, which gets the fd's number. The second close fails with EBADF and
    /// leaves the file alone, as on epoll and poll, where it runs right after the first;
    /// a cancel of it comes too late. (Found by review, on io_uring: the second close
    /// reached the kernel after the callback and closed the file.)
    @Test(arguments: Backends.kinds)
    func aSecondCloseOfAnFDLeavesItsReusedNumberAlone(_ kind: BackendKind) throws {
        try Harness.run(kind, entries: 2) { h in
            let (r, _) = try h.pipe()
            let nop = h.prepare(.nop)
            h.disown(r)
            let first = h.prepare(.close(r))
            let between = (0..<4).map { _ in h.prepare(.nop) }
            let second = h.prepare(.close(r))
            let cancel = h.prepare(.cancel(second))
            var reopened: Int32 = -1
            h.onCompletion = { o in if o.token == first { reopened = Glibc.open("/dev/null", O_RDONLY | O_CLOEXEC) } }
            try h.submit()
            let got = try h.waitFor([nop, first, second, cancel] + between, within: .seconds(2))
            h.onCompletion = nil
            #expect(got.prefix(4).map(\.result) == [0, 0, -EBADF, -ENOENT])
            #expect(h.finals[first]!.at <= h.finals[second]!.at, "the second close ended before the first")
            #expect(reopened == r.rawValue && isOpen(reopened), "reopened \(reopened)")
            _ = Glibc.close(reopened)
        }
    }
}
}
