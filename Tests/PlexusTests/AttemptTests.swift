import CPlexus
import Glibc
@testable import Plexus
import SystemPackage
import Testing

/// `IOBackend.attempt` (an operation that can finish at once does, and its completion is
/// returned instead of going through `wait`) and the async adapter's fast path built on
/// it, with its per-turn budget.
extension PlexusTests {
@Suite struct AttemptTests {
    /// Result and readable bytes of a completion (its buffer, if any).
    struct Finished {
        let token: Token
        let result: Int32
        let bytes: [UInt8]?
    }

    static func finished(_ completion: consuming Completion) -> Finished {
        var completion = completion
        let buffer = completion.takeBuffer()
        return Finished(token: completion.token, result: completion.result, bytes: buffer?.bytes)
    }

    /// `attempt`'s outcome: finished at once, or the token it was prepared under.
    static func attempt(_ backend: any IOBackend, _ operation: consuming Operation) -> Result<Finished, TokenBox> {
        switch backend.attempt(operation) {
        case .completed(let completion): return .success(finished(completion))
        case .prepared(let token): return .failure(TokenBox(token: token))
        }
    }

    struct TokenBox: Error { let token: Token }

    /// Waits (bounded) until `token`'s final completion; fails on any other completion.
    static func waitFor(_ token: Token, _ backend: any IOBackend) throws -> Finished? {
        let start = ContinuousClock.now
        var got: Finished?
        while got == nil && ContinuousClock.now - start < .seconds(5) {
            try backend.wait(timeout: .milliseconds(50)) { completion in
                let f = finished(completion)
                #expect(f.token == token, "a completion for \(f.token), expected \(token)")
                if f.token == token { got = f }
            }
        }
        return got
    }

    @Test(arguments: Backends.kinds)
    func readyDataFinishesAtOnceOnReadinessBackendsAndThroughTheRingOnIoUring(_ kind: BackendKind) throws {
        try Harness.run(kind) { h in
            let (r, w) = try h.pipe()
            #expect(Glibc.write(w.rawValue, "ping", 4) == 4)
            switch Self.attempt(h.backend, .read(r, IOBuffer(capacity: 16))) {
            case .success(let done):
                // epoll and poll try read(2) first.
                #expect(kind != .ioUring, "io_uring sends pipe reads to the ring")
                #expect(done.result == 4)
                #expect(done.bytes == Array("ping".utf8))
            case .failure(let prepared):
                #expect(kind == .ioUring, "\(kind) tries the read at once")
                let done = try #require(try Self.waitFor(prepared.token, h.backend))
                #expect(done.result == 4)
                #expect(done.bytes == Array("ping".utf8))
            }
            #expect(h.backend.pendingCount == 0)
        }
    }

    @Test(arguments: Backends.kinds)
    func anEmptyPipeIsPreparedAndCompletesOnceThroughWait(_ kind: BackendKind) throws {
        try Harness.run(kind) { h in
            let (r, w) = try h.pipe(nonBlocking: kind != .ioUring)
            guard case .failure(let prepared) = Self.attempt(h.backend, .read(r, IOBuffer(capacity: 16))) else {
                Issue.record("a read of an empty pipe finished at once")
                return
            }
            #expect(h.backend.pendingCount == 1)
            _ = try h.backend.wait(timeout: .zero) { c in Issue.record("unexpected completion \(c.token) \(c.result)") }
            #expect(Glibc.write(w.rawValue, "late", 4) == 4)
            let done = try #require(try Self.waitFor(prepared.token, h.backend))
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
                switch Self.attempt(h.backend, .read(file.fd, IOBuffer(capacity: 4), offset: 3)) {
                case .success(let done):
                    #expect(done.result == 4)
                    #expect(done.bytes == Array("3456".utf8))
                    answers.append("at once")
                case .failure(let prepared):
                    let done = try #require(try Self.waitFor(prepared.token, h.backend))
                    #expect(done.result == 4)
                    #expect(done.bytes == Array("3456".utf8))
                    answers.append("through wait")
                }
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

    @Test(arguments: Backends.kinds)
    func anAttemptedWriteGoesAfterTheWritesPreparedBeforeIt(_ kind: BackendKind) throws {
        try Harness.run(kind) { h in
            let (r, w) = try h.pipe(nonBlocking: kind != .ioUring)
            let first = h.backend.prepare(.write(w, IOBuffer("first,")))
            var tokens = [first]
            switch Self.attempt(h.backend, .write(w, IOBuffer("second"))) {
            case .success(let done): #expect(done.result == 6)
            case .failure(let prepared): tokens.append(prepared.token)
            }
            var results: [Token: Int32] = [:]
            let start = ContinuousClock.now
            while results.count < tokens.count && ContinuousClock.now - start < .seconds(5) {
                try h.backend.wait(timeout: .milliseconds(50)) { c in results[c.token] = c.result }
            }
            #expect(Set(results.keys) == Set(tokens))
            #expect(results.values.allSatisfy { $0 >= 0 })
            var bytes = [UInt8](repeating: 0, count: 32)
            let n = Glibc.read(r.rawValue, &bytes, 32)
            #expect(Array(bytes.prefix(max(n, 0))) == Array("first,second".utf8))
            #expect(h.backend.pendingCount == 0)
        }
    }

    /// A task whose every read finishes at once must still let the loop turn: a timer due
    /// now fires while the task keeps reading, within one budget of inline completions.
    @Test(arguments: Backends.kinds)
    func aTaskWhoseReadsNeverWaitStillLetsTheLoopTurn(_ kind: BackendKind) async throws {
        let loop = try Backends.loopThread(kind)
        defer { loop.shutdownAndWait() }
        let path = "/tmp/plexus-attempt-\(getpid())-\(kind)"
        let fd = Glibc.open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        try #require(fd >= 0)
        defer { Glibc.close(fd); unlink(path) }
        #expect(Glibc.write(fd, "abcdefgh", 8) == 8)
        let reads = 4 * EventLoop.inlineCompletionsPerTurn
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
        #expect(at <= EventLoop.inlineCompletionsPerTurn + 1)
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
