import CPlexus
import Glibc
@testable import Plexus
import SystemPackage
import Testing

/// `IOBackend.attempt` (an operation that can finish at once does, and its completion is
/// returned instead of going through `wait`) and the async adapter's fast path built on
/// it, with its per-task and per-turn budgets.
extension PlexusTests {
@Suite struct AttemptTests {
    @Test(arguments: Backends.kinds)
    func readyDataFinishesAtOnceOnReadinessBackendsAndThroughTheRingOnIoUring(_ kind: BackendKind) throws {
        try Harness.run(kind) { h in
            let (r, w) = try h.pipe()
            #expect(Glibc.write(w.rawValue, "ping", 4) == 4)
            let (token, atOnce) = h.attempt(.read(r, IOBuffer(capacity: 16)))
            // epoll and poll try read(2) first; io_uring sends pipe reads to the ring.
            #expect(atOnce == (kind != .ioUring), "\(kind): finished at once: \(atOnce)")
            let done = try h.waitFor(token)
            #expect(done.result == 4)
            #expect(done.bytes == Array("ping".utf8))
            #expect(h.backend.pendingCount == 0)
        }
    }

    @Test(arguments: Backends.kinds)
    func anEmptyPipeIsPreparedAndCompletesOnceThroughWait(_ kind: BackendKind) throws {
        try Harness.run(kind) { h in
            let (r, w) = try h.pipe(nonBlocking: kind != .ioUring)
            let (token, atOnce) = h.attempt(.read(r, IOBuffer(capacity: 16)))
            #expect(!atOnce, "a read of an empty pipe finished at once")
            #expect(h.backend.pendingCount == 1)
            try h.waitOnce(timeout: .zero)
            #expect(h.isPending(token))
            #expect(Glibc.write(w.rawValue, "late", 4) == 4)
            let done = try h.waitFor(token)
            #expect(done.result == 4)
            #expect(done.bytes == Array("late".utf8))
            #expect(h.backend.pendingCount == 0)
        }
    }

    @Test(arguments: Backends.kinds)
    func aPositionalReadOfACachedFileFinishesAtOnce(_ kind: BackendKind) throws {
        try Harness.run(kind) { h in
            let file = try h.temporaryFile(contents: Array("0123456789".utf8))
            var answers: [String] = []
            for _ in 0..<3 {
                let (token, atOnce) = h.attempt(.read(file.fd, IOBuffer(capacity: 4), offset: 3))
                let done = try h.waitFor(token)
                #expect(done.result == 4)
                #expect(done.bytes == Array("3456".utf8))
                answers.append(atOnce ? "at once" : "through wait")
            }
            // Readiness backends read files directly. io_uring asks preadv2(RWF_NOWAIT)
            // once it knows the fd is seekable (the first read tells it), unless the file
            // system refuses RWF_NOWAIT.
            if kind != .ioUring {
                #expect(answers == ["at once", "at once", "at once"])
            } else {
                #expect(answers.last == "at once" || answers.allSatisfy { $0 == "through wait" })
            }
            #expect(h.backend.pendingCount == 0)
        }
    }

    /// What the readiness backends run on the loop thread anyway (nop, fsync, shutdown,
    /// open, close) finishes at once through `attempt`; io_uring sends it to the ring.
    /// Either way each completes once, with its result.
    @Test(arguments: Backends.kinds)
    func operationsRunOnTheLoopThreadFinishAtOnceOnReadinessBackends(_ kind: BackendKind) throws {
        try Harness.run(kind) { h in
            let file = try h.temporaryFile(contents: Array("data".utf8))
            let (a, _) = try h.socketPair()
            let (r, _) = try h.pipe()
            // (Operation is noncopyable: made where it is attempted.)
            let names = ["nop", "fsync", "shutdown", "open", "close"]
            for name in names {
                let operation: Operation = switch name {
                case "nop": .nop
                case "fsync": .fsync(file.fd, dataOnly: false)
                case "shutdown": .shutdown(a, how: Int32(SHUT_WR))
                case "open": .open(FilePath(file.path), flags: O_RDONLY)
                default: .close(r)
                }
                let (token, atOnce) = h.attempt(operation)
                #expect(atOnce == (kind != .ioUring), "\(kind) \(name): finished at once: \(atOnce)")
                let done = try h.waitFor(token)
                #expect(done.result >= 0, "\(name): \(done.result)")
                if name == "open" { Glibc.close(done.result) } else { #expect(done.result == 0, "\(name)") }
            }
            #expect(h.backend.pendingCount == 0)
        }
    }

    /// A write attempted behind a write prepared (not yet submitted) on the same pipe, or a
    /// send behind a send on the same socket, waits for it: the bytes keep the order the
    /// operations were made in.
    @Test(arguments: Backends.kinds, ["pipe write", "socket send"])
    func anAttemptedWriteGoesAfterTheWritesPreparedBeforeIt(_ kind: BackendKind, _ transport: String) throws {
        try Harness.run(kind) { h in
            let socket = transport == "socket send"
            let (out, peer): (FileDescriptor, FileDescriptor)
            if socket {
                (out, peer) = try h.socketPair()
            } else {
                let (r, w) = try h.pipe(nonBlocking: kind != .ioUring)
                (out, peer) = (w, r)
            }
            func write(_ text: String) -> Operation { socket ? .send(out, IOBuffer(text)) : .write(out, IOBuffer(text)) }
            let first = h.prepare(write("first,"))
            let second = h.attempt(write("second")).token
            let got = try h.waitFor([first, second])
            #expect(got.map(\.result) == [6, 6])
            #expect(Self.waitingBytes(peer) == Array("first,second".utf8))
            #expect(h.backend.pendingCount == 0)
        }
    }

    /// An awaited send or write to a socket whose buffer has room finishes at once on every
    /// backend (io_uring: send(2) with MSG_DONTWAIT, not a suspension for the ring), and
    /// the bytes arrive in order.
    @Test(arguments: Backends.kinds)
    func aSendToASocketWithRoomFinishesAtOnceOnEveryBackend(_ kind: BackendKind) throws {
        try Harness.run(kind) { h in
            let (a, b) = try h.socketPair()
            let sent = h.attempt(.send(a, IOBuffer("ping,")))
            let written = h.attempt(.write(a, IOBuffer("pong")))
            #expect(sent.atOnce && written.atOnce, "\(kind): send at once \(sent.atOnce), write at once \(written.atOnce)")
            let got = try h.waitFor([sent.token, written.token])
            #expect(got.map(\.result) == [5, 4])
            #expect(Self.waitingBytes(b) == Array("ping,pong".utf8))
            #expect(h.backend.pendingCount == 0)
        }
    }

    /// A send to a full socket is prepared (it waits, on io_uring in the ring) and
    /// completes once the peer reads; one to a socket whose peer is gone ends at once with
    /// EPIPE and leaves no SIGPIPE pending on the thread.
    @Test(arguments: Backends.kinds)
    func aSendToAFullOrBrokenSocketWaitsOrFailsAtOnce(_ kind: BackendKind) throws {
        try Harness.run(kind) { h in
            let (a, b) = try h.socketPair()
            let filled = h.fillSendBuffer(a)
            #expect(filled > 0)
            let (token, atOnce) = h.attempt(.send(a, IOBuffer("tail")))
            #expect(!atOnce, "\(kind): a send to a full socket finished at once")
            try h.waitOnce(timeout: .zero)
            #expect(h.isPending(token))
            #expect(try StreamWriteTests.drainPeer(h, b, filled: filled, then: 4) == Array("tail".utf8))
            #expect(try h.waitFor(token).result == 4)

            let (c, d) = try h.socketPair()
            Glibc.close(d.rawValue)
            h.disown(d)
            let broken = h.attempt(.send(c, IOBuffer("gone")))
            #expect(broken.atOnce, "\(kind): a send to a closed peer was prepared")
            #expect(try h.waitFor(broken.token).result == -EPIPE)
            var pending = sigset_t()
            sigpending(&pending)
            #expect(sigismember(&pending, SIGPIPE) == 0, "SIGPIPE left pending")
            #expect(h.backend.pendingCount == 0)
        }
    }

    /// What `fd` (a socket pair's other end, non-blocking, or a pipe's read end with bytes
    /// in it) has to read now, with read(2) (at most 64 bytes).
    static func waitingBytes(_ fd: FileDescriptor) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: 64)
        let n = Glibc.read(fd.rawValue, &bytes, bytes.count)
        return Array(bytes.prefix(max(n, 0)))
    }

    /// An unlinked temporary file holding "abcdefgh", in the page cache: every positional
    /// read of it can finish at once.
    static func cachedEightByteFile(_ name: String) throws -> Int32 {
        let path = "/tmp/plexus-attempt-\(name)-\(getpid())"
        let fd = Glibc.open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        try #require(fd >= 0)
        unlink(path)
        #expect(Glibc.write(fd, "abcdefgh", 8) == 8)
        return fd
    }

    /// A task whose every read finishes at once must still let the loop turn: a timer due
    /// now fires while the task keeps reading, within one task's run of inline completions.
    @Test(arguments: Backends.kinds)
    func aTaskWhoseReadsNeverWaitStillLetsTheLoopTurn(_ kind: BackendKind) async throws {
        let loop = try Backends.loopThread(kind)
        defer { loop.shutdownAndWait() }
        let fd = try Self.cachedEightByteFile("one-\(kind)")
        defer { Glibc.close(fd) }
        let reads = 4 * EventLoop.inlineCompletionsPerTask
        let (firedAt, total) = try await Task(executorPreference: loop) { () async throws -> (Int?, Int) in
            var fired = false
            loop.schedule(after: .zero) { event in if event == .fired { fired = true } }
            var firedAt: Int?
            var buffer = IOBuffer(capacity: 8)
            var total = 0
            for i in 0..<reads {
                let done = try await loop.read(FileDescriptor(rawValue: fd), into: buffer, offset: 0)
                total += done.count
                buffer = done.takeBuffer()
                buffer.clear()
                if fired && firedAt == nil { firedAt = i }
            }
            return (firedAt, total)
        }.value
        #expect(total == 8 * reads)
        let at = try #require(firedAt, "the timer never fired while the task read \(reads) times")
        #expect(at <= EventLoop.inlineCompletionsPerTask + 1)
    }

    /// Many tasks whose reads never wait: each gets its own run of inline completions (no
    /// task is made to suspend on every read because another used the turn's budget), and
    /// the turn still ends after the per-turn budget, all tasks together.
    @Test(arguments: Backends.kinds)
    func manyTasksWhoseReadsNeverWaitEachGetARunAndStillLetTheLoopTurn(_ kind: BackendKind) async throws {
        let loop = try Backends.loopThread(kind)
        defer { loop.shutdownAndWait() }
        let fd = try Self.cachedEightByteFile("many-\(kind)")
        defer { Glibc.close(fd) }
        let tasks = 32
        let readsPerTask = 2 * EventLoop.inlineCompletionsPerTurn / tasks + EventLoop.inlineCompletionsPerTask
        final class Tally: @unchecked Sendable {  // used on the loop thread only
            var reads = 0
            var firedAt: Int?
            /// Reads each task finished in a row, without another task's read between them.
            var longestRun = 0
            var run = 0
            var last = -1
        }
        let tally = Tally()
        try await Task(executorPreference: loop) { () async throws in
            loop.schedule(after: .zero) { event in if event == .fired { tally.firedAt = tally.reads } }
            try await withThrowingDiscardingTaskGroup { group in
                for t in 0..<tasks {
                    group.addTask(executorPreference: loop) {
                        var buffer = IOBuffer(capacity: 8)
                        for _ in 0..<readsPerTask {
                            let done = try await loop.read(FileDescriptor(rawValue: fd), into: buffer, offset: 0)
                            #expect(done.count == 8)
                            buffer = done.takeBuffer()
                            buffer.clear()
                            tally.reads += 1
                            tally.run = tally.last == t ? tally.run + 1 : 1
                            tally.last = t
                            tally.longestRun = max(tally.longestRun, tally.run)
                        }
                    }
                }
            }
        }.value
        #expect(tally.reads == tasks * readsPerTask)
        // Runs of inline reads happened, and none longer than a task's budget (plus the
        // one read after the task suspended, which may follow without another task's).
        #expect(tally.longestRun > 1)
        #expect(tally.longestRun <= EventLoop.inlineCompletionsPerTask + 1)
        let at = try #require(tally.firedAt, "the timer never fired during \(tally.reads) reads")
        #expect(at <= EventLoop.inlineCompletionsPerTurn + tasks)
    }

    /// After a short read of a stream the readiness backends wait for the next report
    /// instead of trying first; data written later must still arrive, and a datagram
    /// socket (where a short read says nothing about the queue) must still get its queued
    /// datagram.
    @Test(arguments: Backends.kinds)
    func readsAfterAShortReadStillSeeLaterDataAndQueuedDatagrams(_ kind: BackendKind) throws {
        try Harness.run(kind) { h in
            let (a, b) = try h.socketPair()
            for round in 0..<3 {
                let text = "round \(round)"
                #expect(Glibc.write(b.rawValue, text, text.utf8.count) == text.utf8.count)
                let first = h.prepare(.recv(a, IOBuffer(capacity: 64)))
                try h.submit()
                let got = try h.waitFor(first)
                #expect(got.bytes == Array(text.utf8), "a short read of \(text.utf8.count) of 64 bytes")
                // The stream is drained now; this read waits for the data written after it.
                let second = h.prepare(.recv(a, IOBuffer(capacity: 64)))
                try h.submit()
                #expect(Glibc.write(b.rawValue, "more", 4) == 4)
                let later = try h.waitFor(second)
                #expect(later.bytes == Array("more".utf8))
            }
            let (d1, d2) = try h.socketPair(type: Int32(SOCK_DGRAM.rawValue))
            // Parked first, so the one readiness report is spent on it.
            let one = h.prepare(.recv(d1, IOBuffer(capacity: 64)))
            try h.submit()
            try h.idle(for: .milliseconds(20))
            #expect(Glibc.write(d2.rawValue, "one", 3) == 3)
            #expect(Glibc.write(d2.rawValue, "two", 3) == 3)
            #expect(try h.waitFor(one).bytes == Array("one".utf8))
            // Queued before the first read: no new report will come for it.
            let two = h.prepare(.recv(d1, IOBuffer(capacity: 64)))
            try h.submit()
            #expect(try h.waitFor(two, within: .seconds(2)).bytes == Array("two".utf8))
        }
    }
}
}
