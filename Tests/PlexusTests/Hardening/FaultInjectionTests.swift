import CPlexus
import Glibc
@testable import Plexus
import Synchronization
import SystemPackage
import Testing

extension PlexusTests {
    /// Faults injected through the real mechanisms: seccomp, a tiny ring, rlimits,
    /// signals, a resetting peer, a pipe whose reader left.
    @Suite struct FaultInjection {
        // MARK: seccomp denying io_uring_setup (the EPERM/ENOSYS/EACCES/EINVAL cases are in Fallback)

        @Test(arguments: [(ENOMEM, "ENOMEM"), (EMFILE, "EMFILE"), (EAGAIN, "EAGAIN")])
        func `auto falls back to epoll when io_uring_setup fails with a resource error`(errno: Int32, name: String) throws {
            do { _ = try BackendChoice.epoll.start() } catch {
                try Test.cancel("skipped: epoll cannot start here: \(error)")
            }
            let child = try runChild(
                [try builtExecutable("plexus-nouring"), try builtExecutable("plexus-demo"), "--round-trips", "500"],
                setting: ["PLEXUS_NOURING_ERRNO": "\(errno)"], removing: ["PLEXUS_BACKEND"])
            #expect(child.exitCode == 0, "\(child)")
            #expect(child.stdout.contains("pipe ping-pong on epoll: 500 round trips"), "\(child)")
            let info = try runChild(
                [try builtExecutable("plexus-nouring"), try builtExecutable("plexus-demo"), "--backend-info"],
                setting: ["PLEXUS_NOURING_ERRNO": "\(errno)"], removing: ["PLEXUS_BACKEND"])
            #expect(info.stdout.contains("backend: epoll"), "\(info)")
            #expect(info.stdout.contains(name), "the fallback reason must name \(name): \(info)")
        }

        @Test func `io_uring named under a seccomp ENOMEM is a clear error, epoll and poll still run`() throws {
            let nouring = try builtExecutable("plexus-nouring"), demo = try builtExecutable("plexus-demo")
            let named = try runChild([nouring, demo, "--backend-info"],
                                     setting: ["PLEXUS_BACKEND": "io_uring", "PLEXUS_NOURING_ERRNO": "\(ENOMEM)"])
            #expect(named.exitCode == 1, "\(named)")
            #expect(named.stderr.contains("io_uring backend cannot start"), "\(named)")
            #expect(named.stderr.contains("ENOMEM"), "\(named)")
            for backend in ["epoll", "poll"] {
                let child = try runChild([nouring, demo, "--round-trips", "200"], setting: ["PLEXUS_BACKEND": backend])
                #expect(child.exitCode == 0, "\(child)")
                #expect(child.stdout.contains("pipe ping-pong on \(backend): 200 round trips"), "\(child)")
            }
        }

        /// Kernels before 5.11 have no epoll_pwait2 (ENOSYS), and seccomp profiles older
        /// than it refuse it (EPERM): the epoll backend, the fallback on exactly such
        /// systems, must run there too (epoll_wait, timeouts in whole ms). plexus-demo's
        /// waits are timed (5 s), so each one goes through the refused call first.
        @Test func `epoll runs where epoll_pwait2 is ENOSYS (kernels before 5.11) or EPERM (old seccomp)`() throws {
            let nouring = try builtExecutable("plexus-nouring"), demo = try builtExecutable("plexus-demo")
            for refusal in ["1", "EPERM"] {
                for backend in ["epoll", "auto"] {
                    let child = try runChild([nouring, demo, "--round-trips", "300"],
                                             setting: ["PLEXUS_BACKEND": backend, "PLEXUS_NOURING_NO_EPOLL_PWAIT2": refusal])
                    #expect(child.exitCode == 0, "\(refusal): \(child)")
                    #expect(child.stdout.contains("pipe ping-pong on epoll: 300 round trips"), "\(refusal): \(child)")
                }
            }
        }

        // MARK: RLIMIT_MEMLOCK

        /// Plexus registers no buffers; what locked memory can still refuse is the ring
        /// itself (kernels before 5.12 charge it to RLIMIT_MEMLOCK; later ones to the
        /// memory cgroup). With the limit at 0 and CAP_IPC_LOCK dropped, a big ring
        /// either starts or fails with a clear error, and auto falls back.
        @Test func `RLIMIT_MEMLOCK at zero without CAP_IPC_LOCK: a big ring starts or fails clearly`() throws {
            let setpriv = "/usr/bin/setpriv", prlimit = "/usr/bin/prlimit"
            guard access(setpriv, X_OK) == 0, access(prlimit, X_OK) == 0 else {
                try Test.cancel("skipped: setpriv and prlimit (util-linux) are needed")
            }
            let demo = try builtExecutable("plexus-demo")
            var drop = [setpriv]
            if getuid() == 0 { drop += ["--bounding-set=-ipc_lock", "--inh-caps=-ipc_lock"] }
            let wrap = drop + [prlimit, "--memlock=0:0"]
            for backend in ["auto", "io_uring"] {
                let child = try runChild(wrap + [demo, "--backend-info"], setting: ["PLEXUS_BACKEND": backend])
                print("plexus-tests: RLIMIT_MEMLOCK=0, PLEXUS_BACKEND=\(backend): \(child)")
                if backend == "auto" {
                    #expect(child.exitCode == 0, "auto must always start something: \(child)")
                    #expect(child.stdout.contains("backend: io_uring") || child.stdout.contains("fallback reason: io_uring"),
                            "\(child)")
                } else if child.exitCode != 0 {
                    #expect(child.stderr.contains("io_uring backend cannot start"), "\(child)")
                }
            }
            // In this process too (as root the limit may not bind): a ring of 32768 SQEs
            // and 131072 CQEs under a zero soft limit.
            try Faults.withSoftLimit(Faults.lockedMemoryLimit, 0) {
                do {
                    let big = try URingBackend(entries: 32768)
                    #expect(big.pendingCount == 0)
                } catch let error as PlexusError {
                    #expect(error.operation == "io_uring_queue_init", "\(error)")
                    #expect(error.errno == .noMemory || error.errno == .notPermitted, "\(error)")
                }
                let auto = try BackendChoice.automatic.start(entries: 32768)
                #expect(auto.kind == .ioUring || auto.fallbackReason != nil)
            }
        }

        // MARK: A tiny ring

        @Test(arguments: Backends.kinds)
        func `a ring of two entries: SQ full again and again, nothing lost`(kind: BackendKind) throws {
            try Harness.run(kind, entries: 2) { h in
                let pipe = try h.pipe()
                var tokens = (0..<300).map { _ in h.prepare(.nop) }
                let reads = (0..<20).map { _ in h.prepare(.read(pipe.read, IOBuffer(capacity: 1))) }
                tokens += (0..<200).map { _ in h.prepare(.nop) }
                try h.submit()
                for i in 0..<20 { h.writeAll(pipe.write, [UInt8(i)]) }
                let outcomes = try h.waitFor(tokens + reads)
                #expect(outcomes.count == 520)
                #expect(outcomes.prefix(500).allSatisfy { $0.result == 0 })
                let got = outcomes.suffix(20).compactMap(\.bytes).flatMap { $0 }
                #expect(got.sorted() == (0..<20).map(UInt8.init), "every byte read exactly once")
                let stats = h.backend.statistics
                print("plexus-tests: \(kind) entries 2: \(stats)")
                if kind == .ioUring { #expect(stats.submissionQueueFull > 0) }
            }
        }

        @Test(arguments: Backends.kinds)
        func `a ring of two entries: CQ overflow under multishot accept loses no connection`(kind: BackendKind) throws {
            try Harness.run(kind, entries: 2) { h in
                let listener = try h.tcpListener()
                let count = 64
                // Every connection is queued in the backlog before the accept is armed, so
                // the kernel produces 64 CQEs at once into a CQ of 8.
                let clients = try (0..<count).map { _ in try h.tcpClient(port: listener.port) }
                let accept = h.prepare(.accept(listener.fd, multishot: true))
                try h.submit()
                let got = try h.waitForIntermediates(accept, count: count)
                #expect(h.finals[accept] == nil, "the multishot accept ended: \(String(describing: h.finals[accept]))")
                let fds = got.map(\.result)
                #expect(fds.count == count, "\(fds.count) of \(count) connections delivered")
                #expect(fds.allSatisfy { $0 >= 0 }, "\(got)")
                #expect(Set(fds).count == fds.count, "an fd was delivered twice")
                // Each accepted fd is a live connection to one client.
                for (i, fd) in fds.enumerated() where fd >= 0 {
                    h.writeAll(FileDescriptor(rawValue: fd), [UInt8(i & 0xff)])
                }
                var seen: [UInt8] = []
                for client in clients { seen += try h.readExactly(client, count: 1) }
                #expect(seen.sorted() == (0..<count).map { UInt8($0 & 0xff) }.sorted())
                expectResult(try h.perform(.cancel(accept)), 0)
                expectError(try h.waitFor(accept), ECANCELED)
                let stats = h.backend.statistics
                print("plexus-tests: \(kind) entries 2, \(count) accepts: overflows \(stats.completionQueueOverflows), re-arms \(stats.multishotRearms)")
            }
        }

        @Test(arguments: Backends.kinds)
        func `a ring of two entries: multishot poll under a burst of writes, then a loop on it`(kind: BackendKind) throws {
            try Harness.run(kind, entries: 2) { h in
                let (a, b) = try h.socketPair()
                let poll = h.prepare(.poll(a, .readable, multishot: true))
                let nops = (0..<100).map { _ in h.prepare(.nop) }
                try h.submit()
                for _ in 0..<50 {
                    h.writeAll(b, [1])
                    try h.submit()
                }
                _ = try h.waitFor(nops)
                let readiness = try h.waitForIntermediates(poll, count: 1)
                #expect(!readiness.isEmpty)
                #expect(readiness.allSatisfy { PollEvents(rawValue: UInt32(bitPattern: $0.result)).contains(.readable) })
                #expect(h.readNow(a).count == 50)
                expectResult(try h.perform(.cancel(poll)), 0)
                expectError(try h.waitFor(poll), ECANCELED)
            }
            // The loop over the same tiny ring: 2000 callbacks, each exactly once.
            _ = try Backends.start(kind)
            let loop = try EventLoop(backend: BackendChoice(rawValue: kind.rawValue)!, entries: 2)
            var done = 0
            var results: [Int: Int] = [:]
            for i in 0..<2000 {
                loop.nop { result in
                    results[i, default: 0] += 1
                    #expect((try? result.get()) == 0)
                    done += 1
                }
            }
            LoopTestSupport.turn(loop) { done == 2000 }
            #expect(results.count == 2000 && results.values.allSatisfy { $0 == 1 })
            loop.shutdown(); loop.run()
        }

        // MARK: RLIMIT_NOFILE

        @Test(arguments: Backends.kinds)
        func `EMFILE: accept and open fail typed, the backend keeps serving and recovers`(kind: BackendKind) throws {
            try Harness.run(kind) { h in
                let listener = try h.tcpListener()
                let client = try h.tcpClient(port: listener.port)
                let second = try h.tcpClient(port: listener.port)
                let pipe = try h.pipe()
                let path = try h.temporaryPath("emfile")
                let limit = rlim_t(Faults.highestOpenFD() + 16)
                try Faults.withSoftLimit(Faults.fileLimit, limit) {
                    var fillers = Faults.exhaustFileDescriptors()
                    defer { fillers.forEach { _ = Glibc.close($0) } }
                    #expect(!fillers.isEmpty)
                    expectError(try h.perform(.accept(listener.fd)), EMFILE, "accept with no fd left")
                    expectError(try h.perform(.open(FilePath(path), flags: O_RDWR | O_CREAT, mode: 0o600)), EMFILE,
                                "open with no fd left")
                    let multishot = h.prepare(.accept(listener.fd, multishot: true))
                    try h.submit()
                    // Either the multishot ends with EMFILE, or it reports EMFILE and goes on.
                    try h.runUntil("multishot accept reports EMFILE") {
                        h.finals[multishot] != nil || !(h.intermediates[multishot] ?? []).isEmpty
                    }
                    let ended = h.finals[multishot]
                    if let ended { expectError(ended, EMFILE, "multishot accept with no fd left") }
                    for outcome in h.intermediates[multishot] ?? [] { expectError(outcome, EMFILE) }
                    print("plexus-tests: \(kind) multishot accept under EMFILE: \(ended.map { "ended: \($0)" } ?? "kept going: \(h.intermediates[multishot] ?? [])")")
                    // Still serving: I/O on fds that exist works.
                    h.writeAll(pipe.write, "alive")
                    let read = try h.perform(.read(pipe.read, IOBuffer(capacity: 16)))
                    #expect(read.string == "alive")
                    expectResult(try h.perform(.send(client, IOBuffer("x"))), 1)
                    // Free two numbers: the pending connection is accepted, the file opens.
                    Glibc.close(fillers.removeLast()); Glibc.close(fillers.removeLast())
                    Glibc.close(fillers.removeLast()); Glibc.close(fillers.removeLast())
                    if ended == nil {
                        let got = try h.waitForIntermediates(multishot, count: (h.intermediates[multishot]?.count ?? 0) + 1)
                        #expect(got.contains { $0.result >= 0 }, "multishot accept recovered: \(got)")
                        expectResult(try h.perform(.cancel(multishot)), 0)
                        _ = try h.waitFor(multishot)
                    } else {
                        let accepted = try h.perform(.accept(listener.fd))
                        #expect(accepted.result >= 0, "accept after fds were freed: \(accepted)")
                    }
                    let opened = try h.perform(.open(FilePath(path), flags: O_RDWR | O_CREAT, mode: 0o600))
                    #expect(opened.result >= 0, "open after fds were freed: \(opened)")
                    if opened.result >= 0 { #expect(isCloseOnExec(opened.result)) }
                    _ = second
                }
            }
        }

        @Test(arguments: Backends.kinds)
        func `EMFILE: a loop cannot be created, says why and leaks nothing`(kind: BackendKind) throws {
            _ = try Backends.start(kind)
            let before = openFileDescriptors().count
            try Faults.withSoftLimit(Faults.fileLimit, rlim_t(Faults.highestOpenFD() + 4)) {
                let fillers = Faults.exhaustFileDescriptors()
                defer { fillers.forEach { _ = Glibc.close($0) } }
                do {
                    let loop = try EventLoop(backend: BackendChoice(rawValue: kind.rawValue)!)
                    Issue.record("a loop started with no fd left: \(loop.backendKind)")
                } catch {
                    print("plexus-tests: \(kind) loop under EMFILE: \(error)")
                    #expect("\(error)".contains("EMFILE") || "\(error)".contains("errno \(EMFILE)")
                            || "\(error)".contains("Too many open files"), "\(error)")
                }
            }
            #expect(openFileDescriptors().count == before)
        }

        // MARK: EINTR

        @Test(arguments: Backends.kinds)
        func `signals without SA_RESTART during a backend wait: no error, nothing lost`(kind: BackendKind) throws {
            try Faults.withSignalHandler(SIGUSR1, { _ in sigusr1Count.add(1, ordering: .relaxed) }) {
                let mask = Faults.unblock(SIGUSR1)
                defer { Faults.restoreMask(mask) }
                let received = sigusr1Count.load(ordering: .relaxed)
                try Harness.run(kind) { h in
                    let storm = SignalStorm(pthread_self(), SIGUSR1, every: 500)
                    var sent = 0
                    defer { if sent == 0 { sent = storm.stop() } }
                    let pipe = try h.pipe()
                    let timer = h.prepare(.timeout(.milliseconds(300)))
                    let read = h.prepare(.read(pipe.read, IOBuffer(capacity: 8)))
                    try h.submit()
                    // Waits of many lengths, each likely to be interrupted.
                    try h.idle(for: .milliseconds(100))
                    h.writeAll(pipe.write, "late")
                    let outcomes = try h.waitFor([timer, read])
                    expectResult(outcomes[0], 0, "the timeout fired, not cut short by EINTR")
                    #expect(outcomes[1].string == "late")
                    for _ in 0..<200 { expectResult(try h.perform(.nop), 0) }
                    sent = storm.stop()
                    #expect(sent > 10, "the storm sent \(sent) signals")
                }
                #expect(sigusr1Count.load(ordering: .relaxed) - received > 10, "the waits were interrupted")
            }
        }

        @Test(arguments: Backends.kinds)
        func `signals without SA_RESTART at the loop thread: callbacks, timers and awaits keep working`(kind: BackendKind) async throws {
            let loop = try Backends.loopThread(kind)
            let errorsBox = ErrorCounter()
            loop.execute {
                loop.errorHandler = { _ in errorsBox.count.add(1, ordering: .relaxed) }
                _ = Faults.unblock(SIGUSR1)  // the loop thread inherited the pool's blocked mask
            }
            let before = sigusr1Count.load(ordering: .relaxed)
            try await Faults.withSignalHandler(SIGUSR1, { _ in sigusr1Count.add(1, ordering: .relaxed) }) {
                let storm = SignalStorm(Faults.loopThreadID(loop), SIGUSR1, every: 200)
                var p: [Int32] = [0, 0]
                #expect(plexus_pipe2(&p, O_CLOEXEC | O_NONBLOCK) == 0)
                defer { Glibc.close(p[0]); Glibc.close(p[1]) }
                let start = Deadline.now
                for i in 0..<300 {
                    let text = "round \(i)"
                    _ = try await loop.write(FileDescriptor(rawValue: p[1]), IOBuffer(text))
                    let back = try await loop.read(FileDescriptor(rawValue: p[0]), into: IOBuffer(capacity: 64))
                    #expect(back.buffer.string == text)
                }
                for _ in 0..<20 { try await loop.sleep(for: .milliseconds(3)) }
                #expect(Deadline.now.nanoseconds - start.nanoseconds >= 60_000_000, "sleeps were not cut short")
                let sent = storm.stop()
                #expect(sent > 10, "the storm sent \(sent) signals")
            }
            loop.shutdownAndWait()
            #expect(sigusr1Count.load(ordering: .relaxed) - before > 10, "the loop thread received the signals")
            #expect(errorsBox.count.load(ordering: .relaxed) == 0, "the loop reported an error to its errorHandler")
        }

        // MARK: A peer that resets, a pipe whose reader left

        @Test(arguments: Backends.kinds)
        func `a peer that resets (SO_LINGER 0): typed ECONNRESET or EPIPE, no SIGPIPE`(kind: BackendKind) throws {
            try Harness.run(kind) { h in
                let listener = try h.tcpListener()
                let client = try h.tcpClient(port: listener.port)
                let accepted = try h.perform(.accept(listener.fd))
                #expect(accepted.result >= 0)
                guard accepted.result >= 0 else { return }
                let server = FileDescriptor(rawValue: accepted.result)
                let recv = h.prepare(.recv(server, IOBuffer(capacity: 64)))
                let poll = h.prepare(.poll(server, [.readable, .readHangup]))
                try h.submit()
                var linger = Glibc.linger(l_onoff: 1, l_linger: 0)
                #expect(setsockopt(client.rawValue, SOL_SOCKET, SO_LINGER, &linger, socklen_t(MemoryLayout<Glibc.linger>.size)) == 0)
                h.closeNow(client)  // RST
                let (outcomes, sigpipes) = try Faults.countingSIGPIPE {
                    var outcomes = try h.waitFor([recv, poll])
                    outcomes.append(try h.perform(.send(server, IOBuffer("to nobody"))))
                    outcomes.append(try h.perform(.write(server, IOBuffer("to nobody"))))
                    outcomes.append(try h.perform(.recv(server, IOBuffer(capacity: 8))))
                    return outcomes
                }
                expectError(outcomes[0], ECONNRESET, "recv pending when the peer reset")
                let events = PollEvents(rawValue: UInt32(bitPattern: outcomes[1].result))
                #expect(outcomes[1].result > 0 && !events.intersection([.error, .hangup, .readHangup, .readable]).isEmpty, "\(outcomes[1])")
                for outcome in outcomes[2...3] {
                    #expect(outcome.errno == EPIPE || outcome.errno == ECONNRESET, "\(outcome)")
                    expectError(outcome, outcome.errno ?? EPIPE)
                }
                #expect(outcomes[4].result == 0 || outcomes[4].errno == ECONNRESET, "recv after the reset: \(outcomes[4])")
                #expect(sigpipes == 0, "writing to a reset socket raised SIGPIPE \(sigpipes) times (\(kind))")
            }
        }

        @Test(arguments: Backends.kinds)
        func `a pipe whose reader closed: EPIPE as a typed error, no SIGPIPE`(kind: BackendKind) throws {
            try Harness.run(kind) { h in
                let pipe = try h.pipe()
                h.closeNow(pipe.read)
                // A blocking pipe too: io_uring writes it with pwritev2(RWF_NOWAIT), the
                // O_NONBLOCK one with write(2).
                let blockingPipe = try h.pipe(nonBlocking: false)
                h.closeNow(blockingPipe.read)
                let (a, b) = try h.socketPair()
                h.closeNow(b)
                var vector = IOVector(capacity: 1)
                vector.append(IOBuffer("v"))
                var socketVector = IOVector(capacity: 1)
                socketVector.append(IOBuffer("v"))
                // Nothing runs before submit (or wait): the signals are counted from here.
                let tokens = [
                    h.prepare(.write(pipe.write, IOBuffer("nobody"))),
                    h.prepare(.writev(pipe.write, vector)),
                    h.prepare(.write(blockingPipe.write, IOBuffer("nobody"))),
                    h.prepare(.send(a, IOBuffer("nobody"))),
                    h.prepare(.write(a, IOBuffer("nobody"))),
                    h.prepare(.writev(a, socketVector)),
                    h.prepare(.sendMessage(a, Message(IOBuffer("nobody")))),
                ]
                let (outcomes, sigpipes) = try Faults.countingSIGPIPE { try h.waitFor(tokens) }
                for outcome in outcomes {
                    expectError(outcome, EPIPE)
                    #expect(outcome.hadOperation, "the buffer came back")
                }
                #expect(sigpipes == 0, "EPIPE raised SIGPIPE \(sigpipes) times on \(kind): a program with the default disposition dies")
            }
        }

        @Test(arguments: Backends.kinds)
        func `a pipe whose reader closed, through the loop: PlexusError naming write and EPIPE, no SIGPIPE`(kind: BackendKind) async throws {
            let loop = try Backends.loopThread(kind)
            var p: [Int32] = [0, 0]
            #expect(plexus_pipe2(&p, O_CLOEXEC | O_NONBLOCK) == 0)
            Glibc.close(p[0])
            let (_, sigpipes) = await Faults.countingSIGPIPE {
                do {
                    _ = try await loop.write(FileDescriptor(rawValue: p[1]), IOBuffer("nobody"))
                    Issue.record("a write to a pipe without a reader succeeded")
                } catch let error as PlexusError {
                    #expect(error.operation == "write")
                    #expect(error.errno == .brokenPipe)
                } catch {
                    Issue.record("untyped error \(error)")
                }
            }
            loop.shutdownAndWait()
            Glibc.close(p[1])
            #expect(sigpipes == 0, "the loop thread raised SIGPIPE \(sigpipes) times on \(kind)")
        }
    }
}

final class ErrorCounter: Sendable {
    let count = Atomic<Int>(0)
}
