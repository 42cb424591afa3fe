import CPlexus
import Glibc
@testable import Plexus
import Synchronization
import SystemPackage
import Testing

/// The C shim (CShims/) and the Swift syscall layer (System/Syscalls.swift): signal
/// masks, FIFOs, huge transfers, the -errno convention, liburing helpers; real fds and
/// real threads.
extension PlexusTests {
    @Suite struct ShimTests {
        // MARK: Helpers

        final class ThreadBody: @unchecked Sendable {
            let body: () -> Void
            init(_ body: @escaping () -> Void) { self.body = body }
        }

        /// Runs `body` on a new pthread whose signal mask is first set to empty (a thread
        /// of a program that never touched its mask), and joins it.
        static func onFreshThread(_ body: @escaping () -> Void) {
            let context = Unmanaged.passRetained(ThreadBody(body)).toOpaque()
            var thread = pthread_t()
            let r = pthread_create(&thread, nil, { p in
                let body = Unmanaged<ThreadBody>.fromOpaque(p!).takeRetainedValue()
                var empty = sigset_t()
                sigemptyset(&empty)
                pthread_sigmask(SIG_SETMASK, &empty, nil)
                body.body()
                return nil
            }, context)
            precondition(r == 0)
            pthread_join(thread, nil)
        }

        final class Box<T>: @unchecked Sendable {
            var value: T
            init(_ value: T) { self.value = value }
        }

        static func isBlocked(_ signal: Int32) -> Bool {
            var mask = sigset_t()
            pthread_sigmask(SIG_BLOCK, nil, &mask)
            return sigismember(&mask, signal) == 1
        }

        static func isPending(_ signal: Int32) -> Bool {
            var set = sigset_t()
            sigpending(&set)
            return sigismember(&set, signal) == 1
        }

        /// Starts `kind` without Swift Testing's task-locals (usable off the test's task).
        static func startPlain(_ kind: BackendKind) throws -> any IOBackend {
            try BackendChoice(rawValue: kind.rawValue)!.start().backend
        }

        /// Prepares, submits and waits (bounded) for one operation; returns its result.
        static func perform(_ backend: any IOBackend, _ operation: consuming Operation) throws -> Int32 {
            let token = backend.prepare(operation)
            _ = try backend.submit()
            var result: Int32?
            let end = Deadline.now + .seconds(10)
            while result == nil && Deadline.now < end {
                _ = try backend.wait(timeout: .milliseconds(100)) { c in if c.token == token && !c.flags.contains(.more) { result = c.result } }
            }
            return result ?? Int32.min
        }

        static func pipe(nonBlocking: Bool) throws -> (r: Int32, w: Int32) {
            var p: [Int32] = [-1, -1]
            guard plexus_pipe2(&p, O_CLOEXEC | (nonBlocking ? O_NONBLOCK : 0)) == 0 else {
                throw HarnessError.system("pipe2", plexus_errno())
            }
            return (p[0], p[1])
        }

        /// Fills pipe write end `w` (blocking or not) without blocking.
        static func fill(_ w: Int32) {
            let flags = fcntl(w, F_GETFL)
            _ = fcntl(w, F_SETFL, flags | O_NONBLOCK)
            let chunk = [UInt8](repeating: 7, count: 65536)
            while Glibc.write(w, chunk, chunk.count) > 0 {}
            _ = fcntl(w, F_SETFL, flags)
        }

        /// A new FIFO in /tmp (the caller unlinks it).
        static func makeFIFO(_ name: String) throws -> String {
            let path = "/tmp/plexus-shim-\(getpid())-\(name)-fifo"
            unlink(path)
            try #require(mkfifo(path, 0o600) == 0)
            return path
        }

        /// The SigBlk mask of a child spawned (posix_spawn, no attributes) by the calling thread.
        static func childBlockedMask() throws -> UInt64 {
            let path = "/tmp/plexus-shim-\(getpid())-sigblk"
            defer { unlink(path) }
            var actions = posix_spawn_file_actions_t()
            posix_spawn_file_actions_init(&actions)
            defer { posix_spawn_file_actions_destroy(&actions) }
            posix_spawn_file_actions_addopen(&actions, 1, path, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
            let argv: [String] = ["/bin/grep", "SigBlk", "/proc/self/status"]
            var cargs = argv.map { strdup($0) } + [nil]
            defer { for p in cargs { free(p) } }
            var pid = pid_t()
            let r = posix_spawn(&pid, "/bin/grep", &actions, nil, &cargs, environ)
            guard r == 0 else { throw HarnessError.system("posix_spawn", r) }
            var status: Int32 = 0
            _ = waitpid(pid, &status, 0)
            guard let file = fopen(path, "r") else { throw HarnessError.system("fopen", plexus_errno()) }
            defer { fclose(file) }
            var line = [CChar](repeating: 0, count: 256)
            guard fgets(&line, 256, file) != nil else { return 0 }
            let text = String(decoding: line.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
            let hex = String((text.split(separator: ":").last ?? "").filter { $0.isHexDigit })
            return UInt64(hex, radix: 16) ?? 0
        }

        // MARK: 1. SIGPIPE: the caller's thread and its children

        /// A backend driven from the caller's own thread (as README's example does) blocks
        /// SIGPIPE there. Once failed: after the backend was gone, SIGPIPE stayed blocked
        /// on that thread for good (now the mask is given back).
        @Test(arguments: Backends.kinds)
        func aBackendLeavesItsCallersSignalMaskAsItFoundIt(kind: BackendKind) throws {
            let out = Box<(before: Bool, during: Bool, after: Bool, result: Int32, error: String?)>((true, false, true, 0, nil))
            Self.onFreshThread {
                out.value.before = Self.isBlocked(SIGPIPE)
                do {
                    let backend = try Self.startPlain(kind)
                    out.value.result = try Self.perform(backend, .nop)
                    out.value.during = Self.isBlocked(SIGPIPE)
                } catch { out.value.error = "\(error)" }
                out.value.after = Self.isBlocked(SIGPIPE)
            }
            #expect(out.value.error == nil)
            #expect(out.value.result == 0)
            #expect(!out.value.before, "the fresh thread starts with SIGPIPE unblocked")
            #expect(out.value.during, "while the backend runs, SIGPIPE is blocked (documented)")
            #expect(!out.value.after,
                    "\(kind): SIGPIPE is still blocked on the caller's thread after its backend was destroyed")
        }

        /// A child spawned from a thread that once used a backend inherits its signal mask.
        /// Once failed: SIGPIPE was still blocked there, so `yes | head` style children got
        /// EPIPE instead of dying quietly.
        @Test(arguments: Backends.kinds)
        func aChildSpawnedAfterTheBackendIsGoneDoesNotInheritABlockedSIGPIPE(kind: BackendKind) throws {
            let out = Box<(mask: UInt64, error: String?)>((0, nil))
            Self.onFreshThread {
                do {
                    do {
                        let backend = try Self.startPlain(kind)
                        _ = try Self.perform(backend, .nop)
                    }
                    out.value.mask = try Self.childBlockedMask()
                } catch { out.value.error = "\(error)" }
            }
            #expect(out.value.error == nil)
            let sigpipeBit: UInt64 = 1 << UInt64(SIGPIPE - 1)
            #expect(out.value.mask & sigpipeBit == 0,
                    "\(kind): a child spawned later has SigBlk \(String(out.value.mask, radix: 16)), SIGPIPE blocked")
        }

        /// EPIPE on every pipe kind, at once and after waiting on a full pipe: typed, no
        /// SIGPIPE delivered (a counting handler is installed), and none left pending.
        @Test(arguments: PipeCase.all)
        func epipeLeavesNoSIGPIPEPendingOrDelivered(pipeCase: PipeCase) throws {
            let out = Box<(results: [Int32], pending: [Bool], error: String?)>(([], [], nil))
            let (_, delivered) = Faults.countingSIGPIPE {
                Self.onFreshThread {
                    do {
                        let backend = try Self.startPlain(pipeCase.kind)
                        // At once: the reader is gone before the write.
                        let (r1, w1) = try Self.pipe(nonBlocking: pipeCase.nonBlocking)
                        close(r1)
                        out.value.results.append(try Self.perform(backend, .write(FileDescriptor(rawValue: w1), IOBuffer("x"))))
                        out.value.pending.append(Self.isPending(SIGPIPE))
                        _ = try Self.perform(backend, .close(FileDescriptor(rawValue: w1)))
                        // Waiting: a full pipe, the reader goes while the write waits.
                        let (r2, w2) = try Self.pipe(nonBlocking: pipeCase.nonBlocking)
                        Self.fill(w2)
                        let token = backend.prepare(.write(FileDescriptor(rawValue: w2), IOBuffer(bytes: [UInt8](repeating: 1, count: 100))))
                        _ = try backend.submit()
                        var result: Int32?
                        _ = try backend.wait(timeout: .milliseconds(50)) { c in if c.token == token { result = c.result } }
                        close(r2)
                        let end = Deadline.now + .seconds(10)
                        while result == nil && Deadline.now < end {
                            _ = try backend.wait(timeout: .milliseconds(100)) { c in if c.token == token { result = c.result } }
                        }
                        out.value.results.append(result ?? Int32.min)
                        out.value.pending.append(Self.isPending(SIGPIPE))
                        _ = try Self.perform(backend, .close(FileDescriptor(rawValue: w2)))
                    } catch { out.value.error = "\(error)" }
                }
            }
            #expect(out.value.error == nil)
            #expect(out.value.results == [-EPIPE, -EPIPE], "\(pipeCase)")
            #expect(out.value.pending == [false, false], "\(pipeCase): SIGPIPE left pending on the thread")
            #expect(delivered == 0, "\(pipeCase): \(delivered) SIGPIPE delivered")
        }

        /// Two backends on one thread, one destroyed while the other lives: the survivor's
        /// EPIPE still raises no SIGPIPE (whatever restores the mask for the first must not
        /// leave the second unprotected), and a thread that blocked SIGPIPE itself keeps it
        /// blocked after a backend is gone.
        @Test(arguments: Backends.kinds)
        func aSurvivingBackendStaysProtectedAndAnOwnBlockStays(kind: BackendKind) throws {
            let out = Box<(result: Int32, ownBlockKept: Bool, error: String?)>((0, false, nil))
            let (_, delivered) = Faults.countingSIGPIPE {
                Self.onFreshThread {
                    do {
                        let a = try Self.startPlain(kind)
                        _ = try Self.perform(a, .nop)
                        do {
                            let b = try Self.startPlain(kind)
                            _ = try Self.perform(b, .nop)
                        }
                        let (r, w) = try Self.pipe(nonBlocking: true)
                        close(r)
                        out.value.result = try Self.perform(a, .write(FileDescriptor(rawValue: w), IOBuffer("x")))
                        _ = try Self.perform(a, .close(FileDescriptor(rawValue: w)))
                    } catch { out.value.error = "\(error)" }
                }
                Self.onFreshThread {
                    var set = sigset_t()
                    sigemptyset(&set)
                    sigaddset(&set, SIGPIPE)
                    pthread_sigmask(SIG_BLOCK, &set, nil)
                    do {
                        let backend = try Self.startPlain(kind)
                        _ = try Self.perform(backend, .nop)
                    } catch { out.value.error = "\(error)" }
                    out.value.ownBlockKept = Self.isBlocked(SIGPIPE)
                }
            }
            #expect(out.value.error == nil)
            #expect(out.value.result == -EPIPE)
            #expect(delivered == 0, "\(kind): \(delivered) SIGPIPE delivered")
            #expect(out.value.ownBlockKept, "\(kind): a thread's own SIGPIPE block was undone")
        }

        /// poll(2) refuses more pollfds than the RLIMIT_NOFILE soft limit (EINVAL), which a
        /// program may lower below the fds it already has: epoll and io_uring keep serving;
        /// the poll backend's error says why (once: a bare EINVAL) and it serves again once
        /// the limit is back.
        @Test(arguments: Backends.kinds)
        func aSoftFileLimitBelowTheParkedFds(kind: BackendKind) throws {
            try Harness.run(kind) { h in
                var pipes: [(read: FileDescriptor, write: FileDescriptor)] = []
                for _ in 0..<40 { pipes.append(try h.pipe()) }
                let tokens = pipes.map { h.prepare(.read($0.read, IOBuffer(capacity: 8))) }
                try h.submit()
                try h.waitOnce(timeout: .milliseconds(5))
                var waitError: PlexusError?
                try Faults.withSoftLimit(Faults.fileLimit, 20) {  // below the 40 fds parked
                    #expect(Glibc.write(pipes[0].write.rawValue, Array("ok".utf8), 2) == 2)
                    do {
                        // The backend's own wait: the harness's records a wait error as a failure.
                        _ = try h.backend.wait(timeout: .milliseconds(200)) { completion in h.receive(completion) }
                    } catch {
                        waitError = error as? PlexusError
                    }
                }
                if kind == .poll {
                    #expect(waitError?.operation == "poll" && waitError?.errno == .invalidArgument, "\(String(describing: waitError))")
                    #expect(waitError?.message.contains("RLIMIT_NOFILE") == true, "\(String(describing: waitError))")
                } else {
                    #expect(waitError == nil, "\(kind): \(String(describing: waitError))")
                }
                for p in pipes { _ = Glibc.write(p.write.rawValue, "x", 1) }
                try h.waitFor(tokens)
            }
        }

        /// An open of a FIFO for reading waits for a writer (open(2) blocks). Submitting it
        /// must not block the caller's (the loop's) thread. Once failed on epoll and poll:
        /// submit waited 500 ms, until a writer came (for ever without one).
        @Test(arguments: Backends.kinds)
        func openingAFIFOWithoutAWriterDoesNotBlockSubmit(kind: BackendKind) throws {
            let path = try Self.makeFIFO("open")
            defer { unlink(path) }
            let writer = Box<Int32>(-1)
            var thread = pthread_t()
            let body = ThreadBody {
                usleep(500_000)
                writer.value = open(path, O_WRONLY | O_NONBLOCK | O_CLOEXEC)  // ENXIO, never a hang, once no reader is left
            }
            precondition(pthread_create(&thread, nil, { p in
                Unmanaged<ThreadBody>.fromOpaque(p!).takeRetainedValue().body()
                return nil
            }, Unmanaged.passRetained(body).toOpaque()) == 0)
            defer {
                pthread_join(thread, nil)
                if writer.value >= 0 { close(writer.value) }
            }
            try Harness.run(kind) { h in
                let start = Deadline.now
                let token = h.prepare(.open(FilePath(path), flags: O_RDONLY))
                try h.submit()
                let submitted = Deadline.now.nanoseconds - start.nanoseconds
                let outcome = try h.waitFor(token)
                #expect(outcome.result >= 0, "\(outcome)")
                #expect(submitted < 100_000_000, "\(kind): submit of a FIFO open blocked the caller for \(submitted / 1_000_000) ms")
            }
        }

        /// A FIFO opened through Plexus with no writer (without O_NONBLOCK, as asked) does
        /// not block the loop, and a read of it waits for a writer, as the open would have:
        /// the writer's bytes, then end of file when it leaves. (read(2) of a FIFO that never
        /// had a writer returns end of file at once; poll(2) never reports one, so Plexus
        /// waits: it does not change the fd's flags to find out.)
        @Test(arguments: Backends.kinds)
        func aFIFOOpenedWithoutAWriterWaitsForOne(kind: BackendKind) throws {
            let path = try Self.makeFIFO("wait")
            defer { unlink(path) }
            try Harness.run(kind) { h in
                let opened = try h.waitFor(h.prepare(.open(FilePath(path), flags: O_RDONLY)), within: .seconds(5))
                try #require(opened.result >= 0, "\(opened)")
                let fd = h.own(opened.result)
                #expect(fcntl(fd.rawValue, F_GETFL) & O_NONBLOCK == 0, "open leaves the flags it was asked for")
                let pending = h.prepare(.read(fd, IOBuffer(capacity: 8)))
                try h.submit()
                try h.waitOnce(timeout: .milliseconds(20))
                #expect(h.isPending(pending), "no writer yet: the read waits")
                let writer = open(path, O_WRONLY | O_NONBLOCK | O_CLOEXEC)
                try #require(writer >= 0)
                #expect(Glibc.write(writer, "abc", 3) == 3)
                let got = try h.waitFor(pending)
                #expect(got.bytes == Array("abc".utf8))
                close(writer)
                expectResult(try h.waitFor(h.prepare(.read(fd, IOBuffer(capacity: 8)))), 0, "the writer left")
            }
        }

        // MARK: 2. Huge transfers: counts above INT32_MAX requested

        /// A write of 3 GiB (untouched memory) to /dev/null: Linux transfers MAX_RW_COUNT
        /// (0x7ffff000) per call, and every backend reports exactly that, never a negative
        /// or truncated count; a read at an offset past 4 GiB gets the right byte.
        @Test(arguments: Backends.kinds)
        func transfersAboveINT32MAXReportTheKernelsCount(kind: BackendKind) throws {
            guard getenv("PLEXUS_SANITIZER") == nil else { try Test.cancel("skipped: 3 GiB allocations under a sanitizer") }
            let huge = 3 << 30
            try Harness.run(kind) { h in
                let null = open("/dev/null", O_WRONLY | O_NONBLOCK | O_CLOEXEC)
                try #require(null >= 0)
                let nullFD = h.own(null)
                var big = IOBuffer(capacity: huge)
                big.appendUnsafe { $0.count }  // readable, never touched
                let w = try h.perform(.write(nullFD, big))
                #expect(w.result == Int32(Operation.maxTransfer), "\(kind) write: \(w)")
                #expect(w.returned.buffer?.count == huge - Operation.maxTransfer)

                let path = "/tmp/plexus-shim-\(getpid())-sparse"
                let file = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
                try #require(file >= 0)
                unlink(path)
                let fileFD = h.own(file)
                try #require(ftruncate(file, off_t(huge)) == 0)
                // At an offset past INT32_MAX and past 4 GiB: still the right bytes.
                try #require(pwrite(file, "Z", 1, off_t(huge - 1)) == 1)
                let tail = try h.perform(.read(fileFD, IOBuffer(capacity: 16), offset: Int64(huge - 1)))
                #expect(tail.result == 1 && tail.bytes == Array("Z".utf8), "\(kind): \(tail)")
            }
        }

        // MARK: 3. Sys: the -errno convention, EINTR

        /// Every wrapper returns -errno (never -1) on failure.
        @Test func sysWrappersReturnNegativeErrno() throws {
            var byte: UInt8 = 0
            #expect(Sys.read(-1, &byte, 1) == -Int(EBADF))
            #expect(Sys.write(-1, &byte, 1) == -Int(EBADF))
            let full = open("/dev/full", O_WRONLY | O_CLOEXEC)
            try #require(full >= 0)
            defer { close(full) }
            #expect(Sys.write(full, &byte, 1) == -Int(ENOSPC))
            #expect(Sys.writeNoWait(full, &byte, 1, -1) == -Int(ENOSPC) || Sys.writeNoWait(full, &byte, 1, -1) == -Int(EOPNOTSUPP))
            let (r, w) = try Self.pipe(nonBlocking: true)
            defer { close(r); close(w) }
            #expect(Sys.pread(r, &byte, 1, 0) == -Int(ESPIPE))
            #expect(Sys.read(r, &byte, 1) == -Int(EAGAIN))
            #expect(Sys.readNoWait(r, &byte, 1, -1) == -Int(EAGAIN))
            #expect(Sys.accept4(r) == -ENOTSOCK)
            #expect(Sys.socketType(r) == -ENOTSOCK)
            #expect(Sys.fileType(-1) == -EBADF)
            #expect(Sys.statusFlags(-1) == -EBADF)
            #expect(Sys.close(-1) == -EBADF)
            #expect(Sys.fsync(-1) == -EBADF)
            #expect(Sys.shutdown(r, Int32(SHUT_RDWR)) == -ENOTSOCK)
            #expect(Sys.epollCreate(12345) == -EINVAL)
            var events = [epoll_event](repeating: epoll_event(), count: 4)
            var ts = timespec(tv_sec: 0, tv_nsec: 1_000_000)
            #expect(Sys.epollWait(-1, &events, 4, &ts) == -EBADF)
            #expect(Sys.epollWait(-1, &events, 4, nil) == -EBADF)
            var zero = timespec(tv_sec: 0, tv_nsec: 0)
            #expect(Sys.epollWait(-1, &events, 4, &zero) == -EBADF)
            var event = epoll_event()
            #expect(Sys.epollControl(-1, EPOLL_CTL_ADD, r, &event) == -EBADF)
            #expect(Sys.openat(AT_FDCWD, "/nonexistent/plexus", O_RDONLY | O_CLOEXEC, 0) == -ENOENT)
        }

        /// poll(2) refuses more pollfds than RLIMIT_NOFILE with EINVAL: -EINVAL, typed, in
        /// both the probing and the waiting path of plexus_poll.
        @Test func sysPollMoreFdsThanTheLimitIsNegativeEINVAL() throws {
            var fds = [pollfd](repeating: pollfd(fd: -1, events: 0, revents: 0), count: 200)
            let skips = UnsafeMutablePointer<Int32>.allocate(capacity: 1)
            defer { skips.deallocate() }
            try Faults.withSoftLimit(Faults.fileLimit, 100) {
                skips.pointee = 0
                var ts = timespec(tv_sec: 0, tv_nsec: 1_000_000)
                #expect(Sys.poll(&fds, 200, &ts, probeSkips: skips) == -EINVAL)
                skips.pointee = 3
                #expect(Sys.poll(&fds, 200, &ts, probeSkips: skips) == -EINVAL)
                #expect(Sys.poll(&fds, 200, nil, probeSkips: skips) == -EINVAL)
            }
        }

        /// A blocking read interrupted by a signal without SA_RESTART is retried by Sys.read
        /// (nothing was transferred); the bytes arrive.
        @Test func sysReadRetriesEINTR() throws {
            let (r, w) = try Self.pipe(nonBlocking: false)
            defer { close(r); close(w) }
            let out = Box<Int>(0)
            let lock = Locked<Bool>(false)
            let before = sigusr1Count.load(ordering: .sequentiallyConsistent)
            Faults.withSignalHandler(SIGUSR1, { _ in sigusr1Count.add(1, ordering: .sequentiallyConsistent) }) {
                var reader = pthread_t()
                let body = ThreadBody {
                    var buffer = [UInt8](repeating: 0, count: 8)
                    lock.withLock { $0 = true }
                    out.value = buffer.withUnsafeMutableBytes { Sys.read(r, $0.baseAddress, 8) }
                }
                let context = Unmanaged.passRetained(body).toOpaque()
                precondition(pthread_create(&reader, nil, { p in
                    var empty = sigset_t()
                    sigemptyset(&empty)
                    pthread_sigmask(SIG_SETMASK, &empty, nil)
                    Unmanaged<ThreadBody>.fromOpaque(p!).takeRetainedValue().body()
                    return nil
                }, context) == 0)
                while !lock.withLock({ $0 }) { usleep(1000) }
                for _ in 0..<5 {
                    usleep(20_000)
                    pthread_kill(reader, SIGUSR1)
                }
                usleep(20_000)
                #expect(Glibc.write(w, Array("abc".utf8), 3) == 3)
                pthread_join(reader, nil)
            }
            #expect(sigusr1Count.load(ordering: .sequentiallyConsistent) - before >= 1, "the signals landed")
            #expect(out.value == 3, "Sys.read returned \(out.value)")
        }

        // MARK: 4. The liburing helpers against upstream semantics

        static var uringKinds: [BackendKind] { Backends.kinds.filter { $0 == .ioUring } }

        /// plexus_setup_buf_ring behaves as upstream io_uring_setup_buf_ring: NULL and
        /// *error = -errno on failure (entries not a power of two, 0, above 32768, a group id
        /// taken); success registers; free unregisters, so the group id can be used again.
        @Test(arguments: uringKinds)
        func bufRingHelperMatchesUpstream(kind: BackendKind) throws {
            let ring = UnsafeMutablePointer<io_uring>.allocate(capacity: 1)
            defer { ring.deallocate() }
            ring.initialize(to: io_uring())
            try #require(io_uring_queue_init(8, ring, 0) == 0)
            defer { io_uring_queue_exit(ring) }
            var error: Int32 = 12345
            #expect(plexus_setup_buf_ring(ring, 3, 1, &error) == nil)
            #expect(error == -EINVAL, "non power of two: \(error)")
            error = 12345
            #expect(plexus_setup_buf_ring(ring, 0, 1, &error) == nil)
            #expect(error == -EINVAL, "zero entries: \(error)")
            error = 12345
            #expect(plexus_setup_buf_ring(ring, 65536, 1, &error) == nil)
            #expect(error == -EINVAL, "65536 entries: \(error)")
            error = 12345
            let br = plexus_setup_buf_ring(ring, 8, 7, &error)
            #expect(br != nil && error == 0)
            error = 12345
            #expect(plexus_setup_buf_ring(ring, 8, 7, &error) == nil)
            #expect(error == -EEXIST, "group taken: \(error)")
            if let br { #expect(plexus_free_buf_ring(ring, br, 8, 7) == 0) }
            // Freed: the id can be registered again.
            error = 12345
            if let again = plexus_setup_buf_ring(ring, 8, 7, &error) {
                #expect(plexus_free_buf_ring(ring, again, 8, 7) == 0)
            } else {
                Issue.record("group 7 not reusable after free: \(error)")
            }
        }

        /// plexus_enable_rings: 0 on a ring created R_DISABLED, -EBADFD (a negative errno,
        /// not -1) on one already enabled; plexus_probe_opcodes: NOP supported, an opcode
        /// above the last one not.
        @Test(arguments: uringKinds)
        func enableRingsAndProbeUseNegativeErrno(kind: BackendKind) throws {
            let ring = UnsafeMutablePointer<io_uring>.allocate(capacity: 1)
            defer { ring.deallocate() }
            ring.initialize(to: io_uring())
            var params = io_uring_params()
            params.flags = IORING_SETUP_R_DISABLED
            try #require(io_uring_queue_init_params(8, ring, &params) == 0)
            defer { io_uring_queue_exit(ring) }
            var supported = [UInt8](repeating: 7, count: 256)
            #expect(plexus_probe_opcodes(ring, &supported) == 0)
            #expect(supported[Int(IORING_OP_NOP.rawValue)] == 1)
            #expect(supported[250] == 0)
            #expect(plexus_enable_rings(ring) == 0)
            #expect(plexus_enable_rings(ring) == -EBADFD)
            #expect(plexus_cq_overflow(ring) == 0)
        }

        /// plexus_epoll_wait with a sub-millisecond and a multi-second timespec waits about
        /// that long (epoll_pwait2) and returns 0; the zero and NULL paths too.
        @Test func epollWaitTimeoutsHold() throws {
            let epfd = epoll_create1(Int32(EPOLL_CLOEXEC))
            try #require(epfd >= 0)
            defer { close(epfd) }
            var events = [epoll_event](repeating: epoll_event(), count: 4)
            var ts = timespec(tv_sec: 0, tv_nsec: 300_000)
            let start = Deadline.now
            #expect(plexus_epoll_wait(epfd, &events, 4, &ts) == 0)
            let waited = Deadline.now.nanoseconds - start.nanoseconds
            #expect(waited >= 300_000 && waited < 5_000_000_000, "waited \(waited) ns")  // upper bound loose: a loaded 2-core machine once stalled 0.9 s
            var zero = timespec(tv_sec: 0, tv_nsec: 0)
            #expect(plexus_epoll_wait(epfd, &events, 4, &zero) == 0)
        }

        /// plexus_poll's probe: a zero-timeout poll that finds nothing makes the next 8
        /// waits skip the probe; a ready fd is reported by the probe without waiting.
        @Test func pollProbeSkipsHold() throws {
            let (r, w) = try Self.pipe(nonBlocking: true)
            defer { close(r); close(w) }
            var fds = [pollfd(fd: r, events: Int16(POLLIN), revents: 0)]
            var skips: Int32 = 0
            var ts = timespec(tv_sec: 0, tv_nsec: 1_000_000)
            #expect(plexus_poll(&fds, 1, &ts, &skips) == 0)
            #expect(skips == 8)
            #expect(plexus_poll(&fds, 1, &ts, &skips) == 0)
            #expect(skips == 7)
            #expect(Glibc.write(w, "a", 1) == 1)
            skips = 0
            #expect(plexus_poll(&fds, 1, nil, &skips) == 1)
            #expect(fds[0].revents & Int16(POLLIN) != 0)
            #expect(skips == 0)
        }
    }
}
