import CPlexus
import Glibc
@testable import Plexus
import Synchronization
import SystemPackage
import Testing

extension PlexusTests {
/// Timers, files and multishot receives with buffer groups at their edges, on every
/// backend: huge and negative durations, cancels from callbacks, offsets near Int64.max,
/// close with operations pending, recycling twice, group ids that wrap.
@Suite struct TimersFilesBuffersTests {

    // MARK: Timers

    /// A repeating timer with a huge interval must not fire at once (let alone every turn).
    /// The callback cancels itself after 50 firings, so a defect shows as a count, not a hang.
    @Test(arguments: Backends.kinds)
    func repeatingTimerWithHugeIntervalDoesNotFire(_ kind: BackendKind) throws {
        let loop = try Backends.loop(kind)
        var fired = 0
        var cancelled = 0
        var handle: TimerHandle?
        var turns = 0
        var firedInTurn: [Int: Int] = [:]
        handle = loop.scheduleRepeating(every: .seconds(Int64.max)) { event in
            if event == .fired {
                fired += 1
                firedInTurn[turns, default: 0] += 1
                if fired >= 50, let h = handle { loop.cancel(h) }
            } else {
                cancelled += 1
            }
        }
        let end = Deadline.now + .milliseconds(50)
        while Deadline.now < end { loop.runOnce(timeout: .milliseconds(5)); turns += 1 }
        #expect(fired == 0, "a repeating timer every Int64.max seconds fired \(fired) times within 50 ms; per turn: \(firedInTurn)")
        if let h = handle, cancelled == 0 { loop.cancel(h) }
        #expect(cancelled == 1)
        loop.shutdown(); loop.run()
    }

    /// schedule(at: .now + huge) must not fire at once: Deadline + Duration must saturate.
    @Test(arguments: Backends.kinds)
    func scheduleAtNowPlusHugeDoesNotFire(_ kind: BackendKind) throws {
        let loop = try Backends.loop(kind)
        var events: [TimerEvent] = []
        let h = loop.schedule(at: Deadline.now + .seconds(Int64.max)) { events.append($0) }
        let h2 = loop.schedule(after: .seconds(Int64.max)) { events.append($0) }
        let end = Deadline.now + .milliseconds(30)
        while Deadline.now < end { loop.runOnce(timeout: .milliseconds(5)) }
        #expect(events.isEmpty, "a timer due at now + Int64.max s reported \(events)")
        loop.cancel(h); loop.cancel(h2)
        loop.shutdown(); loop.run()
    }

    /// withTimeout with a huge duration must not time out at once.
    @Test(arguments: Backends.kinds)
    func withTimeoutOfHugeDurationDoesNotTimeOutAtOnce(_ kind: BackendKind) async throws {
        let loop = try Backends.loopThread(kind)
        defer { loop.shutdownAndWait() }
        let outcome: String = await Task(executorPreference: loop) {
            do {
                try await loop.withTimeout(.seconds(Int64.max)) { try await loop.sleep(for: .milliseconds(5)) }
                return "ok"
            } catch { return "\(error)" }
        }.value
        #expect(outcome == "ok")
    }

    /// sleep(until: .now + huge) must not return at once.
    @Test(arguments: Backends.kinds)
    func sleepUntilNowPlusHugeDoesNotReturnAtOnce(_ kind: BackendKind) async throws {
        let loop = try Backends.loopThread(kind)
        defer { loop.shutdownAndWait() }
        let task = Task(executorPreference: loop) { () -> String in
            do { try await loop.sleep(until: Deadline.now + .seconds(Int64.max)); return "returned" } catch { return "threw \(type(of: error))" }
        }
        try await Task.sleep(for: .milliseconds(50))
        task.cancel()
        let r = await task.value
        #expect(r == "threw CancellationError", "sleep(until: now + huge): \(r)")
    }

    /// Zero and negative durations complete with 0 (timeout op) / .fired (timer), huge ones wait.
    @Test(arguments: Backends.kinds)
    func zeroNegativeAndHugeTimeoutOperations(_ kind: BackendKind) throws {
        let loop = try Backends.loop(kind)
        var results: [String: Result<Void, PlexusError>] = [:]
        loop.timeout(.zero) { results["zero"] = $0 }
        loop.timeout(.seconds(-5)) { results["negative"] = $0 }
        let hugeToken = loop.timeout(.seconds(Int64.max)) { results["huge"] = $0 }
        var timerEvents: [String] = []
        loop.schedule(after: .seconds(-1)) { timerEvents.append("neg \($0)") }
        loop.schedule(at: Deadline(nanoseconds: 0)) { timerEvents.append("zero-at \($0)") }
        LoopTestSupport.turn(loop) { results["zero"] != nil && results["negative"] != nil && timerEvents.count == 2 }
        #expect((try? results["zero"]?.get()) != nil)
        #expect((try? results["negative"]?.get()) != nil)
        #expect(results["huge"] == nil)
        loop.cancel(hugeToken)
        LoopTestSupport.turn(loop) { results["huge"] != nil }
        if case .failure(let e)? = results["huge"] { #expect(e.errno == .canceled) } else { Issue.record("huge: \(String(describing: results["huge"]))") }
        #expect(Set(timerEvents) == ["neg fired", "zero-at fired"])
        loop.shutdown(); loop.run()
    }

    /// Cancel from inside a timer's own callback (one-shot: false, nothing more) and of
    /// another timer due in the same turn (it ends once, cancelled, never fired).
    @Test(arguments: Backends.kinds)
    func cancelFromCallbacks(_ kind: BackendKind) throws {
        let loop = try Backends.loop(kind)
        var log: [String] = []
        var a: TimerHandle!
        var b: TimerHandle!
        let at = Deadline.now + .milliseconds(2)
        a = loop.schedule(at: at) { e in
            log.append("a \(e)")
            log.append("a self-cancel \(loop.cancel(a))")
            log.append("a cancels b \(loop.cancel(b))")
        }
        b = loop.schedule(at: at) { e in log.append("b \(e)") }
        LoopTestSupport.turn(loop) { log.count >= 4 }
        loop.runOnce(timeout: .milliseconds(5))
        #expect(log == ["a fired", "a self-cancel false", "b cancelled", "a cancels b true"])
        #expect(loop.pendingTimers == 0)
        loop.shutdown(); loop.run()
    }

    /// A repeating timer cancelled from its own callback: one .cancelled, never fired again;
    /// a new timer scheduled in the same callback (reusing the slot) still fires.
    @Test(arguments: Backends.kinds)
    func repeatingSelfCancelThenRescheduleInSameCallback(_ kind: BackendKind) throws {
        let loop = try Backends.loop(kind)
        var fired = 0, cancelled = 0, successorFired = 0, successorCancelled = 0
        var h: TimerHandle!
        var successor: TimerHandle?
        h = loop.scheduleRepeating(every: .milliseconds(1)) { e in
            if e == .fired {
                fired += 1
                if fired == 3 {
                    #expect(loop.cancel(h))
                    #expect(!loop.cancel(h))
                    successor = loop.schedule(after: .milliseconds(1)) { e in
                        if e == .fired { successorFired += 1 } else { successorCancelled += 1 }
                    }
                }
            } else { cancelled += 1 }
        }
        LoopTestSupport.turn(loop) { successorFired == 1 }
        let end = Deadline.now + .milliseconds(20)
        while Deadline.now < end { loop.runOnce(timeout: .milliseconds(2)) }
        #expect(fired == 3 && cancelled == 1 && successorFired == 1 && successorCancelled == 0)
        #expect(!loop.cancel(h), "stale repeating handle")
        if let successor { #expect(!loop.cancel(successor)) }
        loop.shutdown(); loop.run()
    }

    /// 2000 timers with the same deadline (schedule(at:)) fire in scheduling order, and
    /// timers scheduled with after(.zero) in one turn fire in order too.
    @Test(arguments: Backends.kinds)
    func equalDeadlinesFireInSchedulingOrder(_ kind: BackendKind) throws {
        let loop = try Backends.loop(kind)
        var order: [Int] = []
        let at = Deadline.now + .milliseconds(3)
        var handles: [TimerHandle] = []
        for i in 0..<2000 {
            handles.append(loop.schedule(at: at) { e in if e == .fired { order.append(i) } })
        }
        // Cancel every third one, then schedule more at the same deadline.
        var expected: [Int] = []
        for i in 0..<2000 { if i % 3 == 0 { loop.cancel(handles[i]) } else { expected.append(i) } }
        for i in 2000..<2500 {
            loop.schedule(at: at) { e in if e == .fired { order.append(i) } }
            expected.append(i)
        }
        LoopTestSupport.turn(loop) { order.count == expected.count }
        #expect(order == expected)
        loop.shutdown(); loop.run()
    }

    /// Thousands of schedule/fire/cancel cycles: a stale handle never cancels a newer timer
    /// that reuses its slot.
    @Test(arguments: Backends.kinds)
    func staleHandlesNeverCancelNewerTimers(_ kind: BackendKind) throws {
        let loop = try Backends.loop(kind)
        var stale: [TimerHandle] = []
        var wrong = 0
        var fired = 0
        var cancelledCount = 0
        for round in 0..<2000 {
            // One that fires, one cancelled: both handles go stale.
            var done = false
            let f = loop.schedule(after: .zero) { e in if e == .fired { done = true } }
            let c = loop.schedule(after: .seconds(60)) { e in if e == .cancelled { cancelledCount += 1 } }
            #expect(loop.cancel(c))
            while !done { loop.runOnce(timeout: .zero) }
            stale.append(f); stale.append(c)
            // New timers that reuse those slots.
            var newFired = 0
            let n1 = loop.schedule(after: .zero) { e in if e == .fired { newFired += 1 } else { wrong += 1 } }
            let n2 = loop.schedule(after: .zero) { e in if e == .fired { newFired += 1 } else { wrong += 1 } }
            for s in stale.suffix(8) where loop.cancel(s) { wrong += 1 }
            #expect(n1 != f || round < 0)
            _ = n2
            while newFired < 2 && wrong == 0 { loop.runOnce(timeout: .zero) }
            fired += newFired
            if wrong > 0 { break }
        }
        #expect(wrong == 0)
        #expect(cancelledCount == 2000)
        #expect(loop.pendingTimers == 0)
        loop.shutdown(); loop.run()
    }

    /// Heap compaction under cancel churn (far timers cancelled while near ones pend).
    @Test(arguments: Backends.kinds)
    func compactionKeepsLiveTimers(_ kind: BackendKind) throws {
        let loop = try Backends.loop(kind)
        var firedIDs: [Int] = []
        var keep: [Int] = []
        for i in 0..<3000 {
            let h = loop.schedule(at: Deadline.now + .milliseconds(Int64(5 + i % 7))) { e in if e == .fired { firedIDs.append(i) } }
            if i % 10 != 0 { loop.cancel(h) } else { keep.append(i) }
        }
        LoopTestSupport.turn(loop) { firedIDs.count == keep.count }
        #expect(Set(firedIDs) == Set(keep) && firedIDs.count == keep.count)
        loop.shutdown(); loop.run()
    }

    /// Timers across shutdown (loop thread): every one ends exactly once; the pending ones
    /// with .cancelled; timers scheduled from the .cancelled callbacks too; nothing after.
    @Test(arguments: Backends.kinds)
    func timersAcrossShutdownEndExactlyOnce(_ kind: BackendKind) throws {
        let loop = try Backends.loopThread(kind)
        let counts = Mutex<[Int: [TimerEvent]]>([:])
        let scheduled = Semaphore()
        loop.execute {
            for i in 0..<200 {
                let record: (TimerEvent) -> Void = { e in counts.withLock { $0[i, default: []].append(e) } }
                switch i % 4 {
                case 0: loop.schedule(after: .seconds(3600)) { record($0) }
                case 1: loop.scheduleRepeating(every: .milliseconds(1)) { record($0) }
                case 2: loop.schedule(at: Deadline.now + .seconds(3600)) { e in
                    record(e)
                    // Scheduling from a .cancelled callback during shutdown.
                    if e == .cancelled {
                        loop.schedule(after: .zero) { e2 in counts.withLock { $0[1000 + i, default: []].append(e2) } }
                    }
                }
                default: loop.schedule(after: .seconds(-1)) { record($0) }
                }
            }
            scheduled.signal()
        }
        scheduled.wait()
        sleepMilliseconds(20)
        loop.shutdownAndWait()
        let snapshot = counts.withLock { $0 }
        for i in 0..<200 {
            let events = snapshot[i] ?? []
            switch i % 4 {
            case 1:
                #expect(events.last == .cancelled && events.filter { $0 == .cancelled }.count == 1, "repeating \(i): \(events.suffix(3))")
            case 3:
                #expect(events == [.fired], "past one-shot \(i): \(events)")
            default:
                #expect(events == [.cancelled], "one-shot \(i): \(events)")
            }
            if i % 4 == 2 { #expect(snapshot[1000 + i] == [.cancelled], "scheduled during shutdown \(i): \(String(describing: snapshot[1000 + i]))") }
        }
    }

    /// A scheduled timer after `run()` returned: callback runs once with .cancelled.
    @Test(arguments: Backends.kinds)
    func timersOnAFinishedLoop(_ kind: BackendKind) throws {
        let loop = try Backends.loop(kind)
        loop.shutdown(); loop.run()
        var events: [TimerEvent] = []
        let h = loop.schedule(after: .zero) { events.append($0) }
        let r = loop.scheduleRepeating(every: .milliseconds(1)) { events.append($0) }
        #expect(events == [.cancelled, .cancelled])
        #expect(!loop.cancel(h) && !loop.cancel(r))
    }

    /// A cancelled sleep throws CancellationError promptly on every backend.
    @Test(arguments: Backends.kinds)
    func cancelledSleepThrowsCancellationError(_ kind: BackendKind) async throws {
        let loop = try Backends.loopThread(kind)
        defer { loop.shutdownAndWait() }
        let started = Deadline.now
        let task = Task(executorPreference: loop) { () -> String in
            do { try await loop.sleep(for: .seconds(30)); return "returned" } catch { return "\(type(of: error))" }
        }
        try await Task.sleep(for: .milliseconds(20))
        task.cancel()
        let r = await task.value
        #expect(r == "CancellationError")
        #expect(Deadline.now.nanoseconds - started.nanoseconds < 5_000_000_000)
        // An already-cancelled task: sleep(for: 0) and sleep(for: 1 s)
        let pre = Task(executorPreference: loop) { () -> [String] in
            withUnsafeCurrentTask { $0?.cancel() }
            var out: [String] = []
            for d in [Duration.zero, .seconds(1)] {
                do { try await loop.sleep(for: d); out.append("returned") } catch { out.append("\(type(of: error))") }
            }
            return out
        }
        let preR = await pre.value
        #expect(preR[1] == "CancellationError", "\(preR)")
    }

    /// Sleeps of many tasks with equal durations all end; the loop has nothing left.
    @Test(arguments: Backends.kinds)
    func manyConcurrentSleepsEnd(_ kind: BackendKind) async throws {
        let loop = try Backends.loopThread(kind)
        defer { loop.shutdownAndWait() }
        let n = await withTaskGroup(of: Int.self) { group in
            for i in 0..<300 {
                group.addTask(executorPreference: loop) {
                    do { try await loop.sleep(for: .milliseconds(Int64(i % 5))); return 1 } catch { return 0 }
                }
            }
            var n = 0
            for await r in group { n += r }
            return n
        }
        #expect(n == 300)
    }

    // MARK: Files

    /// Reads past EOF return 0 and leave the buffer alone; offsets near Int64.max match
    /// what pread/pwrite say; writes to an O_RDONLY fd are EBADF.
    @Test(arguments: Backends.kinds)
    func fileEdgeOffsets(_ kind: BackendKind) throws {
        try Harness.run(kind) { h in
            let (fd, path) = try h.temporaryFile("edge", contents: Array("hello".utf8))
            var past = try h.perform(.read(fd, IOBuffer(capacity: 16), offset: 100))
            #expect(past.result == 0 && past.bytes == [])
            past = try h.perform(.read(fd, IOBuffer(capacity: 16), offset: 5))
            #expect(past.result == 0)
            let partial = try h.perform(.read(fd, IOBuffer(capacity: 16), offset: 3))
            #expect(partial.result == 2 && partial.string == "lo")
            // readv past EOF
            var v = IOVector(capacity: 2)
            v.append(IOBuffer(capacity: 4)); v.append(IOBuffer(capacity: 4))
            let rv = try h.perform(.readv(fd, v, offset: 1_000_000))
            #expect(rv.result == 0)
            // Near Int64.max: compare with the kernel directly.
            for offset in [Int64.max, Int64.max - 1, Int64.max - 4096, Int64(1) << 62] {
                var scratch = [UInt8](repeating: 0, count: 16)
                let direct = scratch.withUnsafeMutableBytes { pread(fd.rawValue, $0.baseAddress, 16, Int(offset)) }
                let directErrno = direct < 0 ? plexus_errno() : 0
                let r = try h.perform(.read(fd, IOBuffer(capacity: 16), offset: offset))
                #expect(Int(r.result) == (direct < 0 ? -Int(directErrno) : direct), "read at \(offset): \(r) vs pread \(direct) errno \(directErrno)")
                let w = try h.perform(.write(fd, IOBuffer("x"), offset: offset))
                let directW = pwrite(fd.rawValue, "x", 1, Int(offset))
                let directWErrno = directW < 0 ? plexus_errno() : 0
                #expect(Int(w.result) == (directW < 0 ? -Int(directWErrno) : directW), "write at \(offset): \(w) vs pwrite \(directW) errno \(directWErrno)")
            }
            // Negative offsets of every flavour.
            for off in [Int64(-1), -2, Int64.min] {
                expectError(try h.perform(.read(fd, IOBuffer(capacity: 4), offset: off)), EINVAL)
                expectError(try h.perform(.write(fd, IOBuffer("x"), offset: off)), EINVAL)
            }
            // Write to O_RDONLY, read from O_WRONLY.
            let ro = h.own(Glibc.open(path, O_RDONLY | O_CLOEXEC))
            expectError(try h.perform(.write(ro, IOBuffer("zz"), offset: 0)), EBADF)
            expectError(try h.perform(.write(ro, IOBuffer("zz"))), EBADF)
            let wo = h.own(Glibc.open(path, O_WRONLY | O_CLOEXEC))
            expectError(try h.perform(.read(wo, IOBuffer(capacity: 4), offset: 0)), EBADF)
            // fsync of an O_RDONLY file succeeds on Linux.
            expectResult(try h.perform(.fsync(ro)), 0)
        }
    }

    /// open: missing path, EEXIST, EISDIR, ENAMETOOLONG, a directory fd; opened fds are CLOEXEC.
    @Test(arguments: Backends.kinds)
    func openErrors(_ kind: BackendKind) throws {
        try Harness.run(kind) { h in
            let dir = try h.temporaryDirectory()
            expectError(try h.perform(.open(FilePath(dir + "/missing/x"), flags: O_RDONLY)), ENOENT)
            expectError(try h.perform(.open(FilePath(dir + "/missing"), flags: O_RDONLY)), ENOENT)
            let c = try h.perform(.open(FilePath(dir + "/f"), flags: O_RDWR | O_CREAT | O_EXCL, mode: 0o600))
            #expect(c.result >= 0)
            if c.result >= 0 { #expect(isCloseOnExec(c.result)) }
            expectError(try h.perform(.open(FilePath(dir + "/f"), flags: O_RDWR | O_CREAT | O_EXCL)), EEXIST)
            expectError(try h.perform(.open(FilePath(dir), flags: O_WRONLY)), EISDIR)
            expectError(try h.perform(.open(FilePath(dir + "/" + String(repeating: "a", count: 300)), flags: O_RDONLY)), ENAMETOOLONG)
            if c.result >= 0 {
                expectResult(try h.perform(.close(FileDescriptor(rawValue: c.result))), 0)
                // Double close through Plexus: EBADF, and the fd is not open.
                expectError(try h.perform(.close(FileDescriptor(rawValue: c.result))), EBADF)
            }
        }
    }

    /// close with several pending operations (pipe reads, polls; a socket's starved multishot
    /// receive and a write to its full send buffer): each ends -ECANCELED before close's 0.
    @Test(arguments: Backends.kinds)
    func closeCancelsPendingThenCloses(_ kind: BackendKind) throws {
        try Harness.run(kind) { h in
            let (r, _) = try h.pipe()
            let r1 = h.prepare(.read(r, IOBuffer(capacity: 8)))
            let r2 = h.prepare(.read(r, IOBuffer(capacity: 8)))
            let p = h.prepare(.poll(r, .readable))
            let pm = h.prepare(.poll(r, .readable, multishot: true))
            let (a, b) = try h.socketPair()
            let group = try h.backend.registerBuffers(count: 2, size: 16)
            let rm = h.prepare(.receiveMultishot(a, group))
            try h.submit()
            h.writeAll(b, [UInt8](repeating: 3, count: 100))
            _ = try h.waitForIntermediates(rm, count: 2)
            _ = h.fillSendBuffer(a)
            let w = h.prepare(.write(a, IOBuffer(bytes: [UInt8](repeating: 1, count: 4096))))
            try h.submit()
            try h.idle(for: .milliseconds(5))
            let c = h.prepare(.close(r))
            let c2 = h.prepare(.close(a))
            try h.submit()
            let outs = try h.waitFor([r1, r2, p, pm, rm, w, c, c2])
            for o in outs[0..<6] { #expect(o.errno == ECANCELED, "\(o)") }
            #expect(outs[6].result == 0 && outs[7].result == 0)
            for (t, closer) in [(r1, c), (r2, c), (p, c), (pm, c), (rm, c2), (w, c2)] {
                let i = h.log.lastIndex { $0.token == t }!
                let closeAt = h.log.firstIndex { $0.token == closer }!
                #expect(i < closeAt, "\(t) completed after its close")
            }
            h.backend.unregisterBuffers(group)
        }
    }

    /// close through the loop's callback API with pending reads: callback order.
    @Test(arguments: Backends.kinds)
    func loopCloseWithPendingOperations(_ kind: BackendKind) throws {
        let loop = try Backends.loop(kind)
        var p: [Int32] = [0, 0]
        #expect(plexus_pipe2(&p, O_CLOEXEC | O_NONBLOCK) == 0)
        defer { Glibc.close(p[1]) }
        let r = FileDescriptor(rawValue: p[0])
        var log: [String] = []
        loop.read(r, IOBuffer(capacity: 8)) { res, _ in log.append("read1 \((try? res.get()).map { "\($0)" } ?? "err")") }
        loop.read(r, IOBuffer(capacity: 8)) { res, _ in log.append("read2 \((try? res.get()).map { "\($0)" } ?? "err")") }
        loop.runOnce(timeout: .milliseconds(5))
        loop.close(r) { res in log.append("close \((try? res.get()) != nil ? "ok" : "err")") }
        loop.close(r) { res in log.append("close2 \((try? res.get()) != nil ? "ok" : "err")") }
        LoopTestSupport.turn(loop) { log.count == 4 }
        #expect(log.count == 4)
        #expect(log.suffix(2) == ["close ok", "close2 err"], "\(log)")
        #expect(!isOpen(r.rawValue))
        loop.shutdown(); loop.run()
    }

    /// The File API (async): write 1 MiB with writeAll at an offset, read it back byte for
    /// byte, sync, size, close, second close fails.
    @Test(arguments: Backends.kinds)
    func fileAsyncRoundTrip(_ kind: BackendKind) async throws {
        let loop = try Backends.loopThread(kind)
        defer { loop.shutdownAndWait() }
        var template = Array("/tmp/plexus-review-XXXXXX".utf8CString)
        let tfd = mkstemp(&template)
        #expect(tfd >= 0)
        Glibc.close(tfd)
        let path = String(decoding: template.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        defer { unlink(path) }
        let result: String = await Task(executorPreference: loop) {
            do {
                let file = try await File.open(FilePath(path), .readWrite, options: [.truncate], on: loop)
                let data = (0..<(1 << 20)).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ 7) }
                _ = try await file.writeAll(IOBuffer(bytes: data), at: 4096)
                try await file.sync()
                let size = try file.size()
                var got: [UInt8] = []
                var offset: Int64 = 4096
                while true {
                    let t = try await file.read(into: IOBuffer(capacity: 100_000), at: offset)
                    if t.count == 0 { break }
                    got += t.buffer.bytes
                    offset += Int64(t.count)
                }
                let hole = try await file.read(into: IOBuffer(capacity: 4096), at: 0)
                try await file.close()
                var secondClose = "ok"
                do { try await file.close() } catch let e as PlexusError { secondClose = "\(e.errno)" }
                if size != 4096 + (1 << 20) { return "size \(size)" }
                if got != data { return "data differs (\(got.count) bytes)" }
                if hole.buffer.bytes != [UInt8](repeating: 0, count: 4096) { return "hole not zero" }
                if secondClose == "ok" { return "second close succeeded" }
                return "ok"
            } catch { return "threw \(error)" }
        }.value
        #expect(result == "ok")
    }

    /// File.writeAll (callback) with an empty buffer, a negative offset, and to a read-only file.
    @Test(arguments: Backends.kinds)
    func fileCallbackWriteAllEdges(_ kind: BackendKind) throws {
        let loop = try Backends.loop(kind)
        var template = Array("/tmp/plexus-review-XXXXXX".utf8CString)
        let tfd = mkstemp(&template)
        #expect(tfd >= 0)
        let path = String(decoding: template.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        defer { unlink(path); Glibc.close(tfd) }
        let rw = File(fd: FileDescriptor(rawValue: tfd), loop: loop)
        var out: [String] = []
        rw.writeAll(IOBuffer(capacity: 8), at: 0) { r, _ in out.append("empty \((try? r.get()).map { "\($0)" } ?? "\(r)")") }
        rw.writeAll(IOBuffer("abc"), at: -3) { r, b in out.append("neg \((try? r.get()).map { "\($0)" } ?? "\(r)") left \(b.count)") }
        LoopTestSupport.turn(loop) { out.count == 2 }
        #expect(out.first == "empty 0", "\(out)")
        #expect(out.count == 2 && out[1].contains("EINVAL") || out[1].contains("nvalid"), "\(out)")
        var ro: File?
        File.open(FilePath(path), .readOnly, on: loop) { r in ro = try r.get() }
        LoopTestSupport.turn(loop) { ro != nil }
        var roOut = ""
        ro?.writeAll(IOBuffer("abc"), at: 0) { r, b in roOut = "\(r) \(b.count)" }
        LoopTestSupport.turn(loop) { !roOut.isEmpty }
        #expect(roOut.contains("EBADF") || roOut.contains("Bad file"), "\(roOut)")
        var closed = false
        ro?.close { _ in closed = true }
        LoopTestSupport.turn(loop) { closed }
        loop.shutdown(); loop.run()
    }

    // MARK: Multishot receive with buffer groups

    /// A consumer that never recycles: exactly `count` chunks come, then the receive pauses
    /// (no final, no error, nothing dropped); recycling lets the rest through byte for byte.
    @Test(arguments: Backends.kinds)
    func neverRecyclingPausesWithoutDropping(_ kind: BackendKind) throws {
        try Harness.run(kind) { h in
            let (a, b) = try h.socketPair()
            let group = try h.backend.registerBuffers(count: 4, size: 1024)
            let token = h.prepare(.receiveMultishot(a, group))
            try h.submit()
            let sent = (0..<(256 * 1024)).map { UInt8(truncatingIfNeeded: $0 &* 13 &+ ($0 >> 9)) }
            var sentCount = 0
            // Push as much as the socket takes.
            func pump() {
                while sentCount < sent.count {
                    let n = sent[sentCount...].withUnsafeBytes { Glibc.send(b.rawValue, $0.baseAddress, min($0.count, 65536), Int32(MSG_DONTWAIT)) }
                    if n <= 0 { break }
                    sentCount += n
                }
            }
            pump()
            try h.idle(for: .milliseconds(100))
            let early = h.intermediates[token] ?? []
            #expect(early.count == 4, "chunks before any recycle: \(early.count)")
            #expect(h.isPending(token), "the receive ended: \(String(describing: h.finals[token]))")
            var received: [UInt8] = []
            var seen = 0
            let deadline = Deadline.now + .seconds(20)
            while received.count < sent.count && Deadline.now < deadline {
                pump()
                let chunks = try h.waitForIntermediates(token, count: seen + 1)
                let outstanding = chunks.count - seen
                #expect(outstanding <= 4)
                var ids = Set<UInt16>()
                for chunk in chunks[seen...] {
                    let id = try #require(chunk.bufferID)
                    #expect(ids.insert(id).inserted, "buffer \(id) handed out twice while outstanding")
                    group.withBuffer(id, length: Int(chunk.result)) { received.append(contentsOf: $0) }
                }
                for chunk in chunks[seen...] { h.backend.recycle(group, id: chunk.bufferID!) }
                seen = chunks.count
                if h.finals[token] != nil { break }
            }
            #expect(received.count == sent.count)
            #expect(received == sent)
            h.closeNow(b)
            let final = try h.waitFor(token)
            #expect(final.result == 0)
            h.backend.unregisterBuffers(group)
        }
    }

    /// Recycling the same buffer id twice must not let two outstanding chunks share a buffer.
    @Test(arguments: Backends.kinds)
    func doubleRecycleNeverSharesABuffer(_ kind: BackendKind) throws {
        try Harness.run(kind) { h in
            let (a, b) = try h.socketPair()
            let group = try h.backend.registerBuffers(count: 4, size: 8)
            let token = h.prepare(.receiveMultishot(a, group))
            try h.submit()
            h.writeAll(b, Array("AAAAAAAA".utf8))
            let first = try h.waitForIntermediates(token, count: 1)
            let id = try #require(first.first?.bufferID)
            h.backend.recycle(group, id: id)
            h.backend.recycle(group, id: id)  // the mistake
            // 4 distinct chunks of 8 bytes; none recycled.
            for c in ["BBBBBBBB", "CCCCCCCC", "DDDDDDDD", "EEEEEEEE"] {
                h.writeAll(b, Array(c.utf8))
                try h.idle(for: .milliseconds(10))
            }
            try h.idle(for: .milliseconds(50))
            let chunks = Array((h.intermediates[token] ?? []).dropFirst())
            let ids = chunks.compactMap(\.bufferID)
            var contents: [String] = []
            for chunk in chunks { group.withBuffer(chunk.bufferID!, length: Int(chunk.result)) { contents.append(String(decoding: $0, as: UTF8.self)) } }
            #expect(Set(ids).count == ids.count, "outstanding chunks share buffers: ids \(ids), contents \(contents)")
            h.closeNow(b)
            for chunk in chunks { h.backend.recycle(group, id: chunk.bufferID!) }
            try h.runUntil("end") { h.finals[token] != nil }
            h.backend.unregisterBuffers(group)
        }
    }

    /// Unregistering the group under a pending multishot receive: it ends (an error) once
    /// data arrives; it must not spin or hang.
    @Test(arguments: Backends.kinds)
    func unregisterUnderAPendingReceiveEndsIt(_ kind: BackendKind) throws {
        try Harness.run(kind) { h in
            let (a, b) = try h.socketPair()
            let group = try h.backend.registerBuffers(count: 2, size: 64)
            let token = h.prepare(.receiveMultishot(a, group))
            try h.submit()
            try h.idle(for: .milliseconds(5))
            h.backend.unregisterBuffers(group)
            h.writeAll(b, Array("data".utf8))
            let end = Deadline.now + .milliseconds(500)
            while h.finals[token] == nil && Deadline.now < end { try h.waitOnce(timeout: .milliseconds(10)) }
            let final = h.finals[token]
            #expect(final != nil && final!.result < 0, "receive after unregister: \(String(describing: final)), intermediates \(h.intermediates[token]?.count ?? 0)")
            if final == nil {
                Issue.record("\(kind): still pending after unregister; statistics \(h.backend.statistics)")
                h.cancelAll()
            }
        }
    }

    /// Buffer group ids wrap after 65536 registrations: a new group must never take the id
    /// of a group still registered.
    @Test(arguments: Backends.kinds)
    func groupIDsDoNotCollideAfterWrap(_ kind: BackendKind) throws {
        try Harness.run(kind) { h in
            let kept = try h.backend.registerBuffers(count: 1, size: 1)
            var collided: BufferGroup?
            var error: (any Error)?
            for _ in 0..<65_537 {
                do {
                    let g = try h.backend.registerBuffers(count: 1, size: 1)
                    if g.id == kept.id { collided = g; break }
                    h.backend.unregisterBuffers(g)
                } catch let e { error = e; break }
            }
            #expect(collided == nil, "group id \(kept.id) handed out again while still registered")
            #expect(error == nil, "registerBuffers threw with ids free: \(String(describing: error))")
            if let collided { h.backend.unregisterBuffers(collided) }
            // The kept group still works.
            let (a, b) = try h.socketPair()
            let token = h.prepare(.receiveMultishot(a, kept))
            try h.submit()
            h.writeAll(b, [42])
            let chunks = try h.waitForIntermediates(token, count: 1, within: .seconds(3))
            #expect(chunks.count == 1)
            if let id = chunks.first?.bufferID {
                // A recycle of a group that was silently replaced would trap here (preconditionFailure).
                if collided == nil { h.backend.recycle(kept, id: id) }
            }
            h.closeNow(b)
            try h.runUntil("end") { h.finals[token] != nil }
            h.backend.unregisterBuffers(kept)
        }
    }

    /// receives(): peer closes mid-stream after a few MiB; a slow consumer; every byte, then nil.
    @Test(arguments: Backends.kinds)
    func receivesSlowConsumerThenPeerClose(_ kind: BackendKind) async throws {
        let loop = try Backends.loopThread(kind)
        defer { loop.shutdownAndWait() }
        var pair: [Int32] = [0, 0]
        #expect(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue | SOCK_CLOEXEC.rawValue | SOCK_NONBLOCK.rawValue), 0, &pair) == 0)
        defer { Glibc.close(pair[0]) }
        let reader = FileDescriptor(rawValue: pair[0]), writer = FileDescriptor(rawValue: pair[1])
        let total = 3 << 20
        let sent = (0..<total).map { UInt8(truncatingIfNeeded: ($0 &* 2654435761) >> 13) }
        let consumer = Task(executorPreference: loop) { () throws -> [UInt8] in
            var got: [UInt8] = []
            var n = 0
            try await loop.withTimeout(.seconds(30)) {
                for try await chunk in loop.receives(reader, bufferCount: 2, bufferSize: 3000) {
                    got += chunk
                    n += 1
                    if n % 64 == 0 { try await loop.sleep(for: .milliseconds(1)) }
                }
            }
            return got
        }
        _ = try await Task(executorPreference: loop) {
            _ = try await loop.writeAll(writer, IOBuffer(bytes: sent))
            try await loop.close(writer)
        }.value
        let got = try await consumer.value
        #expect(got.count == total)
        #expect(got == sent)
    }

    /// receives(): the peer resets mid-stream: chunks already received are yielded, then an
    /// error is thrown (not a silent end), and the stream ends once.
    @Test(arguments: Backends.kinds)
    func receivesPeerResetMidStream(_ kind: BackendKind) async throws {
        let loop = try Backends.loopThread(kind)
        defer { loop.shutdownAndWait() }
        let (lfd, address) = try LoopTestSupport.listener()
        defer { Glibc.close(lfd) }
        let client = try LoopTestSupport.connect(to: address)
        let server = Glibc.accept(lfd, nil, nil)
        _ = fcntl(server, F_SETFL, fcntl(server, F_GETFL) | O_NONBLOCK)
        _ = fcntl(server, F_SETFD, FD_CLOEXEC)
        #expect(server >= 0)
        defer { Glibc.close(server) }
        let payload = [UInt8](repeating: 7, count: 10_000)
        #expect(payload.withUnsafeBytes { Glibc.send(client, $0.baseAddress, $0.count, 0) } == 10_000)
        try await Task.sleep(for: .milliseconds(20))
        var linger = Glibc.linger(l_onoff: 1, l_linger: 0)
        setsockopt(client, SOL_SOCKET, SO_LINGER, &linger, socklen_t(MemoryLayout<Glibc.linger>.size))
        Glibc.close(client)
        let outcome: String = await Task(executorPreference: loop) {
            var got = 0
            do {
                try await loop.withTimeout(.seconds(5)) {
                    for try await chunk in loop.receives(FileDescriptor(rawValue: server), bufferCount: 4, bufferSize: 1024) { got += chunk.count }
                }
                return "ended \(got)"
            } catch let e as PlexusError { return "error \(e.errno) after \(got)" } catch { return "\(error)" }
        }.value
        // RST discards unread data on Linux, so a reset may come before any byte; either
        // way it must be an error, not a clean end.
        #expect(outcome.hasPrefix("error"), "\(outcome)")
    }

    /// receives(): a consumer that breaks out early; the loop keeps nothing pending and
    /// the group is released; a second receives() on the same fd works.
    @Test(arguments: Backends.kinds)
    func receivesBreakThenAgain(_ kind: BackendKind) async throws {
        let loop = try Backends.loopThread(kind)
        defer { loop.shutdownAndWait() }
        var pair: [Int32] = [0, 0]
        #expect(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue | SOCK_CLOEXEC.rawValue | SOCK_NONBLOCK.rawValue), 0, &pair) == 0)
        defer { Glibc.close(pair[0]); Glibc.close(pair[1]) }
        let reader = FileDescriptor(rawValue: pair[0])
        let data = [UInt8](repeating: 1, count: 5000)
        _ = data.withUnsafeBytes { Glibc.send(pair[1], $0.baseAddress, $0.count, 0) }
        let first: Int = try await Task(executorPreference: loop) {
            for try await chunk in loop.receives(reader, bufferCount: 4, bufferSize: 100) { return chunk.count }
            return -1
        }.value
        #expect(first == 100)
        try await loop.sleep(for: .milliseconds(20))
        let pending = await Task(executorPreference: loop) { loop.pendingOperations }.value
        #expect(pending == 1, "left pending after breaking out: \(pending)")
        let second: Int = try await Task(executorPreference: loop) {
            var n = 0
            try await loop.withTimeout(.milliseconds(300)) {
                do {
                    for try await chunk in loop.receives(reader, bufferCount: 4, bufferSize: 100) { n += chunk.count }
                } catch let e as PlexusError where e.errno == .timedOut {}
            }
            return n
        }.value
        // The first stream took at most 4 buffers of 100 bytes from the socket; the rest is here.
        #expect(second >= 5000 - 500 && second <= 4900, "second stream got \(second) (first took \(first))")
    }
}
}

private func sleepMilliseconds(_ ms: Int) {
    var ts = timespec(tv_sec: ms / 1000, tv_nsec: (ms % 1000) * 1_000_000)
    nanosleep(&ts, nil)
}

extension PlexusTests.TimersFilesBuffersTests {
    /// A multishot receive that ran out of buffers (all out), then one recycled, then
    /// cancelled: it must end with -ECANCELED.
    @Test(arguments: Backends.kinds, [0, 1, 4])
    func cancelStarvedMultishotReceive(_ kind: BackendKind, recycled: Int) throws {
        try Harness.run(kind) { h in
            let (a, b) = try h.socketPair()
            let group = try h.backend.registerBuffers(count: 4, size: 100)
            let token = h.prepare(.receiveMultishot(a, group))
            try h.submit()
            h.writeAll(b, [UInt8](repeating: 1, count: 5000))
            var chunks = try h.waitForIntermediates(token, count: 4)
            #expect(chunks.count == 4)
            for c in chunks.prefix(recycled) { h.backend.recycle(group, id: c.bufferID!) }
            try h.idle(for: .milliseconds(20))
            chunks = h.intermediates[token] ?? []
            h.prepare(.cancel(token))
            try h.submit()
            let final = try h.waitFor(token, within: .seconds(2))
            #expect(final.errno == ECANCELED, "\(final)")
            try h.drain()
            h.backend.unregisterBuffers(group)
        }
    }

    /// A read prepared on an fd after its close (same batch) must fail (EBADF), not wait forever.
    @Test(arguments: PipeCase.all, [false, true])
    func readPreparedAfterCloseInTheSameBatch(_ pipeCase: PipeCase, withPendingRead: Bool) throws {
        try Harness.run(pipeCase.kind) { h in
            let (r, _) = try h.pipe(nonBlocking: pipeCase.nonBlocking)
            var tokens: [Token] = []
            if withPendingRead {
                tokens.append(h.prepare(.read(r, IOBuffer(capacity: 8))))
                try h.submit()
                try h.idle(for: .milliseconds(5))
            }
            tokens.append(h.prepare(.close(r)))
            tokens.append(h.prepare(.read(r, IOBuffer(capacity: 8))))
            try h.submit()
            let outs = try h.waitFor(tokens, within: .seconds(2))
            #expect(outs.last?.errno == EBADF, "\(outs)")
        }
    }
}

extension PlexusTests.TimersFilesBuffersTests {
    /// Recycle a buffer of a starved multishot receive, then cancel it in the same turn.
    @Test(arguments: Backends.kinds, [false, true])
    func recycleThenCancelSameTurn(_ kind: BackendKind, moreData: Bool) throws {
        try Harness.run(kind) { h in
            let (a, b) = try h.socketPair()
            let group = try h.backend.registerBuffers(count: 4, size: 100)
            let token = h.prepare(.receiveMultishot(a, group))
            try h.submit()
            h.writeAll(b, [UInt8](repeating: 1, count: moreData ? 5000 : 400))
            let chunks = try h.waitForIntermediates(token, count: 4)
            try h.idle(for: .milliseconds(10))
            h.backend.recycle(group, id: chunks[0].bufferID!)
            let cancelToken = h.prepare(.cancel(token))
            try h.submit()
            let cancelResult = try h.waitFor(cancelToken, within: .seconds(2))
            let final: Outcome
            do { final = try h.waitFor(token, within: .seconds(2)) } catch {
                Issue.record("cancel reported \(cancelResult); the receive got \(h.intermediates[token]?.count ?? 0) chunks and never ended")
                throw error
            }
            #expect(final.errno == ECANCELED, "\(final)")
            try h.drain()
            h.backend.unregisterBuffers(group)
            // A second multishot receive on the same fd works.
            let g2 = try h.backend.registerBuffers(count: 4, size: 100)
            let t2 = h.prepare(.receiveMultishot(a, g2))
            try h.submit()
            h.writeAll(b, [2])
            let c2 = try h.waitForIntermediates(t2, count: 1, within: .seconds(2))
            #expect(!c2.isEmpty)
            h.prepare(.cancel(t2)); try h.submit()
            try h.drain()
            h.backend.unregisterBuffers(g2)
        }
    }
}
