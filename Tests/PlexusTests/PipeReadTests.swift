import CPlexus
import Glibc
@testable import Plexus
import SystemPackage
import Testing

/// Reads of pipes that find them empty. io_uring parks such a read (after a short read
/// said the pipe is empty) on one multishot poll per pipe and runs it as preadv2 when
/// data comes; epoll and poll wait for readiness. Every backend must give the same
/// results: data in order, cancels, closes, shutdown and end of file exactly once.
extension PlexusTests {
@Suite struct PipeReadTests {
    static func write(_ fd: FileDescriptor, _ text: String) {
        #expect(Glibc.write(fd.rawValue, text, text.utf8.count) == text.utf8.count)
    }

    /// Reads what is there (a short read: the pipe is empty after it).
    static func drain(_ h: Harness, _ r: FileDescriptor, _ w: FileDescriptor, expecting text: String) throws {
        write(w, text)
        let done = try h.perform(.read(r, IOBuffer(capacity: 64)))
        #expect(done.bytes == Array(text.utf8))
    }

    /// A pipe emptied by a short read, and a read of it that waits.
    static func waitingRead(_ h: Harness, _ pipe: PipeCase) throws -> (FileDescriptor, FileDescriptor, Token) {
        let (r, w) = try h.pipe(nonBlocking: pipe.nonBlocking)
        try drain(h, r, w, expecting: "a")
        let waiting = h.prepare(.read(r, IOBuffer(capacity: 8)))
        try h.submit()
        try h.idle(for: .milliseconds(1))
        #expect(h.isPending(waiting))
        return (r, w, waiting)
    }

    @Test(arguments: PipeCase.all)
    func readsOfAnEmptyPipeGetLaterDataInOrder(_ pipe: PipeCase) throws {
        let kind = pipe.kind
        try Harness.run(kind) { h in
            let (r, w) = try h.pipe(nonBlocking: pipe.nonBlocking)
            let blockedBefore = h.backend.statistics.wouldBlock
            for round in 0..<20 {
                try Self.drain(h, r, w, expecting: "short \(round)")
                let first = h.prepare(.read(r, IOBuffer(capacity: 1)))
                let second = h.prepare(.read(r, IOBuffer(capacity: 64)))
                try h.submit()
                try h.idle(for: .milliseconds(1))
                #expect(h.isPending(first) && h.isPending(second))
                Self.write(w, "xy")
                let got = try h.waitFor([first, second])
                #expect(got[0].bytes == Array("x".utf8), "oldest read first")
                #expect(got[1].bytes == Array("y".utf8))
            }
            if kind == .ioUring, h.backend.capabilities.isSuperset(of: [.multishotPoll, .cancelByFileDescriptor]) {
                #expect(h.backend.statistics.wouldBlock - blockedBefore >= 20, "the reads did not wait on the pipe's poll")
            }
            if let uring = h.backend as? URingBackend {
                #expect(uring.pipeIsNonBlocking(r) == pipe.nonBlocking, "served as the wrong kind of pipe")
            }
        }
    }

    /// A pipe closed outside Plexus, its read end's number opened again through Plexus as
    /// a blocking FIFO: the read still waiting under the old pipe ends with EBADF, and the
    /// new fd is served as what it is (io_uring must not go on with the old pipe's
    /// O_NONBLOCK, which would make its writes plain write(2)s that can block the loop).
    @Test(arguments: PipeCase.all)
    func aPipesNumberOpenedAgainAsABlockingFIFOIsServedAsOne(_ pipe: PipeCase) throws {
        try Harness.run(pipe.kind) { h in
            let (r, w, waiting) = try Self.waitingRead(h, pipe)
            let fifo = try h.temporaryPath("fifo")
            #expect(mkfifo(fifo, 0o600) == 0)
            h.closeNow(r)
            let opened = try h.perform(.open(FilePath(fifo), flags: O_RDWR))  // O_RDWR: the open does not wait for a peer
            guard opened.result >= 0 else { Issue.record("open: \(opened)"); return }
            let reopened = h.own(opened.result)
            #expect(reopened == r, "the lowest free fd number comes back")
            #expect(try h.waitFor(waiting).result == -EBADF)
            if let uring = h.backend as? URingBackend, reopened == r {
                // Forgotten at the open; else the write below could block the loop for good.
                let known = uring.pipeIsNonBlocking(reopened)
                #expect(known == nil, "the old pipe's watch outlived it")
                if known != nil { return }
            }
            // A blocking FIFO with room for 64 KiB: 70000 bytes take what fits, at once.
            let big = try h.perform(.write(reopened, IOBuffer(bytes: [UInt8](repeating: 1, count: 70_000))))
            #expect(big.result > 0 && big.result < 70_000, "\(big)")
            if let uring = h.backend as? URingBackend, reopened == r {
                #expect(uring.pipeIsNonBlocking(reopened) == false)
            }
            h.closeNow(w)
            #expect(h.backend.pendingCount == 0)
        }
    }

    @Test(arguments: PipeCase.all)
    func aCancelledWaitingReadEndsOnceAndTheNextReadWorks(_ pipe: PipeCase) throws {
        let kind = pipe.kind
        try Harness.run(kind) { h in
            let (r, w, waiting) = try Self.waitingRead(h, pipe)
            h.prepare(.cancel(waiting))
            try h.submit()
            #expect(try h.waitFor(waiting).result == -ECANCELED)
            Self.write(w, "b")
            #expect(try h.perform(.read(r, IOBuffer(capacity: 8))).bytes == Array("b".utf8))
        }
    }

    @Test(arguments: PipeCase.all)
    func closingThePipeEndsItsWaitingReads(_ pipe: PipeCase) throws {
        let kind = pipe.kind
        try Harness.run(kind) { h in
            let (r, _, waiting) = try Self.waitingRead(h, pipe)
            h.disown(r)
            let close = h.prepare(.close(r))
            try h.submit()
            let got = try h.waitFor([waiting, close])
            #expect(got[0].result == -ECANCELED)
            #expect(got[1].result == 0)
        }
    }

    @Test(arguments: PipeCase.all)
    func theWriterClosingEndsAWaitingReadWithEndOfFile(_ pipe: PipeCase) throws {
        let kind = pipe.kind
        try Harness.run(kind) { h in
            let (_, w, waiting) = try Self.waitingRead(h, pipe)
            h.closeNow(w)
            #expect(try h.waitFor(waiting).result == 0)
        }
    }

    @Test(arguments: PipeCase.all)
    func cancelAllEndsWaitingReads(_ pipe: PipeCase) throws {
        let kind = pipe.kind
        try Harness.run(kind) { h in
            let (r, w, waiting) = try Self.waitingRead(h, pipe)
            h.cancelAll()
            #expect(try h.waitFor(waiting).result == -ECANCELED)
            #expect(h.backend.pendingCount == 0)
            // The backend goes on: a new read of the same pipe.
            Self.write(w, "b")
            #expect(try h.perform(.read(r, IOBuffer(capacity: 8))).bytes == Array("b".utf8))
        }
    }

    @Test(arguments: PipeCase.all)
    func aDeadlineStillEndsAReadOfAnEmptyPipe(_ pipe: PipeCase) throws {
        let kind = pipe.kind
        try Harness.run(kind) { h in
            let (r, w) = try h.pipe(nonBlocking: pipe.nonBlocking)
            try Self.drain(h, r, w, expecting: "a")
            let start = Deadline.now
            let token = h.prepare(.read(r, IOBuffer(capacity: 8)), deadline: start + .milliseconds(20))
            #expect(try h.waitFor(token).result == -ECANCELED)
            #expect(Deadline.now >= start + .milliseconds(20))
        }
    }

    /// A completion queue that overflows while a read waits on a pipe's poll: the read
    /// still gets its data exactly once (whether the kernel keeps the poll's CQE in its
    /// overflow list or ends the poll, which sends the read back to an ordinary READ).
    @Test(arguments: PipeCase.all)
    func aWaitingReadSurvivesACompletionQueueOverflow(_ pipe: PipeCase) throws {
        let kind = pipe.kind
        try Harness.run(kind, entries: 2) { h in
            let (r, w, waiting) = try Self.waitingRead(h, pipe)
            // Many completions nobody reaps yet, then data: the CQ (8 entries) overflows.
            var nops: [Token] = []
            for _ in 0..<24 { nops.append(h.prepare(.nop)) }
            try h.submit()
            Self.write(w, "late")
            let got = try h.waitFor(waiting)
            #expect(got.bytes == Array("late".utf8))
            try h.waitFor(nops)
            Self.write(w, "next")
            #expect(try h.perform(.read(r, IOBuffer(capacity: 8))).bytes == Array("next".utf8))
        }
    }
}
}
