import CPlexus
import Glibc
@testable import Plexus
import Synchronization
import SystemPackage
import Testing

/// A thread that runs `body` once; joined by `join()`.
final class HelperThread: @unchecked Sendable {
    private var thread = pthread_t()
    private final class Box { let body: () -> Void; init(_ b: @escaping () -> Void) { body = b } }

    init(_ body: @escaping @Sendable () -> Void) {
        let box = Unmanaged.passRetained(Box(body)).toOpaque()
        let r = pthread_create(&thread, nil, { arg in
            let box = Unmanaged<AnyObject>.fromOpaque(arg!).takeRetainedValue() as! Box
            box.body()
            return nil
        }, box)
        precondition(r == 0)
    }

    func join() { pthread_join(thread, nil) }
}

final class DoneFlag: Sendable {
    let value = Atomic<Bool>(false)
    func set() { value.store(true, ordering: .sequentiallyConsistent) }
    var isSet: Bool { value.load(ordering: .sequentiallyConsistent) }
}

func sleepFor(_ d: Duration) {
    let ns = d.components.seconds * 1_000_000_000 + d.components.attoseconds / 1_000_000_000
    var ts = timespec(tv_sec: Int(ns / 1_000_000_000), tv_nsec: Int(ns % 1_000_000_000))
    nanosleep(&ts, nil)
}

/// Runs `unblock` on another thread after `after` unless `done` was set first; the
/// test measures whether its loop thread was stuck until then.
func unblockAfter(after: Duration, _ done: DoneFlag, unblock: @escaping @Sendable () -> Void) -> HelperThread {
    HelperThread {
        let step = Duration.milliseconds(10)
        var waited = Duration.zero
        while waited < after {
            if done.isSet { return }
            sleepFor(step)
            waited += step
        }
        if !done.isSet { unblock() }
    }
}

func secondsSince(_ from: Deadline, _ to: Deadline = .now) -> Double {
    Double(to.nanoseconds &- from.nanoseconds) / 1e9
}

/// posix_openpt + grantpt + unlockpt + ptsname_r through dlsym (not imported by Glibc here).
func openPseudoTerminal() -> (Int32, String)? {
    typealias Open = @convention(c) (Int32) -> Int32
    typealias Grant = @convention(c) (Int32) -> Int32
    typealias Name = @convention(c) (Int32, UnsafeMutablePointer<CChar>?, Int) -> Int32
    guard let o = dlsym(nil, "posix_openpt"), let g = dlsym(nil, "grantpt"), let u = dlsym(nil, "unlockpt"),
          let n = dlsym(nil, "ptsname_r") else { return nil }
    let m = unsafeBitCast(o, to: Open.self)(O_RDWR | O_NOCTTY | O_CLOEXEC)
    guard m >= 0 else { return nil }
    _ = unsafeBitCast(g, to: Grant.self)(m)
    guard unsafeBitCast(u, to: Grant.self)(m) == 0 else { Glibc.close(m); return nil }
    var buffer = [CChar](repeating: 0, count: 128)
    guard unsafeBitCast(n, to: Name.self)(m, &buffer, 128) == 0 else { Glibc.close(m); return nil }
    let length = buffer.firstIndex(of: 0) ?? buffer.count
    return (m, String(decoding: buffer[..<length].map { UInt8(bitPattern: $0) }, as: UTF8.self))
}

extension PlexusTests {
@Suite struct ReadinessEdgeTests {
    static let readiness: [BackendKind] = Backends.kinds.filter { $0 == .epoll || $0 == .poll }

    // MARK: A recycle after the starved receive ended

    /// A multishot receive runs out of buffers, then is cancelled, and its record slot goes
    /// to a read of a blocking pipe that waits for readiness. A recycle must not retry that
    /// read. Once failed on epoll and poll: the pool kept the receive by slot index, so the
    /// recycle called read(2) on the empty blocking pipe and blocked the loop thread until
    /// a watchdog wrote to it (fixed: tokens, and only a receive at the head of its fd).
    @Test(arguments: Backends.kinds)
    func recycleAfterCancelledStarvedReceiveDoesNotBlockOnAReusedSlot(_ kind: BackendKind) throws {
        try Harness.run(kind) { h in
            let (a, b) = try h.socketPair()
            let group = try h.backend.registerBuffers(count: 1, size: 16)
            let rm = h.prepare(.receiveMultishot(a, group))
            try h.submit()
            h.writeAll(b, "hello")
            let chunks = try h.waitForIntermediates(rm, count: 1)
            let id = try #require(chunks.first?.bufferID)
            try h.idle(for: .milliseconds(10))
            let c = h.prepare(.cancel(rm))
            try h.waitFor([c, rm])
            // Two reads so that one of them surely takes the receive's freed slot.
            let (pr, pw) = try h.pipe(nonBlocking: false)
            let r1 = h.prepare(.read(pr, IOBuffer(capacity: 8)))
            let r2 = h.prepare(.read(pr, IOBuffer(capacity: 8)))
            try h.submit()
            try h.idle(for: .milliseconds(10))
            let done = DoneFlag()
            let raw = pw.rawValue
            let dog = unblockAfter(after: .seconds(2), done) { var x: UInt8 = 0x41; _ = Glibc.write(raw, &x, 1) }
            let start = Deadline.now
            h.backend.recycle(group, id: id)
            let took = secondsSince(start)
            done.set()
            dog.join()
            #expect(took < 1, "\(kind): recycle blocked the loop thread for \(took) s (read(2) of an empty blocking pipe)")
            h.writeAll(pw, [UInt8](repeating: 0x42, count: 16))
            try h.waitFor([r1, r2])
            h.backend.unregisterBuffers(group)
        }
    }

    // MARK: A short read that did not drain the stream (MSG_PEEK, SCM_RIGHTS)
    // Once failed on epoll: a short read marked the stream drained, so the next read waited
    // for an edge without trying, and with a write parked on the fd no rearm came: bytes
    // already queued were never read (fixed: a peek marks nothing; a read parked on that
    // guess asks the poller again).

    /// A write parked on `fd`'s full send buffer: the fd is busy, so parking a read on it
    /// rearms nothing by itself.
    static func parkWrite(_ h: Harness, _ fd: FileDescriptor) throws -> Token {
        _ = h.fillSendBuffer(fd)
        let w = h.prepare(.write(fd, IOBuffer(bytes: [UInt8](repeating: 1, count: 4096))))
        try h.submit()
        try h.idle(for: .milliseconds(20))
        return w
    }

    /// `read` completes within 2 s with `text`; else it is recorded as stuck and cancelled.
    static func expect(_ h: Harness, _ read: Token, gets text: String, _ what: String) throws {
        try h.submit()
        do {
            let out = try h.waitFor(read, within: .seconds(2))
            #expect(out.string == text, "\(what): \(out)")
        } catch {
            Issue.record("\(what) never completed though \(text.utf8.count) bytes were queued")
            try h.waitFor(h.prepare(.cancel(read)))
        }
    }

    /// Cancels the parked `write` and finishes everything left.
    static func cancelAndDrain(_ h: Harness, _ write: Token) throws {
        try h.waitFor(h.prepare(.cancel(write)))
        try h.drain()
    }

    /// recv(MSG_PEEK) returns fewer bytes than asked and leaves them queued; the engine
    /// takes the short read as "drained" and parks the next recv without trying it. When
    /// the fd is busy (a write parked on its full send buffer), no rearm follows: on epoll
    /// the recv waits for an edge that never comes, although the bytes are there.
    @Test(arguments: Backends.kinds)
    func recvAfterPeekCompletesWhileAWriteIsParked(_ kind: BackendKind) throws {
        try Harness.run(kind) { h in
            let (a, b) = try h.socketPair()
            let w = try Self.parkWrite(h, a)
            h.writeAll(b, "hello")
            try h.idle(for: .milliseconds(20))  // the read edge arrives while no read is parked
            let peek = try h.perform(.recv(a, IOBuffer(capacity: 64), flags: Int32(MSG_PEEK)))
            #expect(peek.string == "hello")
            try Self.expect(h, h.prepare(.recv(a, IOBuffer(capacity: 64))), gets: "hello", "\(kind): recv after a MSG_PEEK")
            try Self.cancelAndDrain(h, w)
        }
    }

    /// Same without MSG_PEEK: a unix stream recv stops after a segment that carried
    /// SCM_RIGHTS, so a plain short read leaves bytes queued.
    @Test(arguments: Backends.kinds)
    func readAfterFdPassingSegmentCompletesWhileAWriteIsParked(_ kind: BackendKind) throws {
        try Harness.run(kind) { h in
            let (a, b) = try h.socketPair()
            let w = try Self.parkWrite(h, a)
            // "aa" with an fd attached, then "bb".
            var passed: Int32 = Glibc.dup(0)
            defer { _ = Glibc.close(passed) }
            var payload: [UInt8] = Array("aa".utf8)
            let space = 24  // CMSG_SPACE(4) on LP64
            var control = [UInt8](repeating: 0, count: max(space, 64))
            let sent: Int = payload.withUnsafeMutableBytes { p in
                control.withUnsafeMutableBytes { c in
                    var iov = iovec(iov_base: p.baseAddress, iov_len: p.count)
                    return withUnsafeMutablePointer(to: &iov) { iovp in
                        var m = msghdr()
                        m.msg_iov = iovp
                        m.msg_iovlen = 1
                        m.msg_control = c.baseAddress
                        m.msg_controllen = space
                        let cm = c.baseAddress!.assumingMemoryBound(to: cmsghdr.self)
                        cm.pointee.cmsg_level = SOL_SOCKET
                        cm.pointee.cmsg_type = Int32(SCM_RIGHTS)
                        cm.pointee.cmsg_len = 20  // CMSG_LEN(4)
                        memcpy(c.baseAddress! + MemoryLayout<cmsghdr>.size, &passed, 4)
                        return Glibc.sendmsg(b.rawValue, &m, 0)
                    }
                }
            }
            #expect(sent == 2, "sendmsg: \(sent) errno \(plexus_errno())")
            h.writeAll(b, "bb")
            try h.idle(for: .milliseconds(20))
            let first = try h.perform(.read(a, IOBuffer(capacity: 64)))
            #expect(first.string == "aa", "\(first)")
            try Self.expect(h, h.prepare(.read(a, IOBuffer(capacity: 64))), gets: "bb", "\(kind): read after an SCM_RIGHTS segment")
            try Self.cancelAndDrain(h, w)
        }
    }

    // MARK: A read queued behind a starved multishot receive, which is cancelled
    // Once failed on epoll: the receive had taken the last edge without meeting EAGAIN,
    // and its cancel did not rearm, so the read behind it never saw the queued bytes.

    @Test(arguments: Backends.kinds)
    func readQueuedBehindStarvedMultishotReceiveGetsDataWhenItIsCancelled(_ kind: BackendKind) throws {
        try Harness.run(kind) { h in
            let (a, b) = try h.socketPair()
            let group = try h.backend.registerBuffers(count: 1, size: 4)
            let rm = h.prepare(.receiveMultishot(a, group))
            try h.submit()
            try h.idle(for: .milliseconds(10))
            h.writeAll(b, "abcdefgh")
            let chunks = try h.waitForIntermediates(rm, count: 1)
            #expect(chunks.first?.string == nil || true)
            let rd = h.prepare(.recv(a, IOBuffer(capacity: 16)))
            try h.submit()
            try h.idle(for: .milliseconds(20))
            let c = h.prepare(.cancel(rm))
            try h.waitFor([c, rm])
            do {
                let out = try h.waitFor(rd, within: .seconds(2))
                #expect(out.string == "efgh", "\(out)")
            } catch {
                Issue.record("\(kind): recv queued behind a cancelled starved multishot receive never got the 4 queued bytes")
                let cr = h.prepare(.cancel(rd))
                try h.waitFor(cr)
            }
            if let id = chunks.first?.bufferID { h.backend.recycle(group, id: id) }
            h.backend.unregisterBuffers(group)
        }
    }

    // MARK: Multishot poll and unchanged readiness

    /// Readiness that does not change (unread data) is not reported on every wait, where
    /// the kernel reports edges (io_uring, epoll). The poll backend's multishot poll is
    /// level-triggered, as poll(2) is (README): it reports on every wait while ready.
    @Test(arguments: Backends.kinds.filter { $0 != .poll })
    func multishotPollReportsUnchangedReadinessOnce(_ kind: BackendKind) throws {
        try Harness.run(kind) { h in
            let (r, w) = try h.pipe()
            let pm = h.prepare(.poll(r, .readable, multishot: true))
            try h.submit()
            try h.idle(for: .milliseconds(10))
            h.writeAll(w, "x")
            var calls = 0
            let end = Deadline.now + .milliseconds(200)
            while Deadline.now < end { try h.waitOnce(timeout: .milliseconds(20)); calls += 1 }
            let reports = h.log.filter { $0.token == pm }.count
            #expect(reports <= 2, "\(kind): \(reports) reports of one readiness change in \(calls) waits")
            let c = h.prepare(.cancel(pm))
            try h.waitFor([c, pm])
        }
    }

}
}

func raiseFileLimit(_ want: rlim_t) -> rlim_t {
    var lim = rlimit()
    getrlimit(Int32(RLIMIT_NOFILE.rawValue), &lim)
    if lim.rlim_cur < want {
        if lim.rlim_max < want && getuid() == 0 { lim.rlim_max = want }
        lim.rlim_cur = min(want, lim.rlim_max)
        setrlimit(Int32(RLIMIT_NOFILE.rawValue), &lim)
        getrlimit(Int32(RLIMIT_NOFILE.rawValue), &lim)
    }
    return lim.rlim_cur
}

extension PlexusTests.ReadinessEdgeTests {
    // MARK: Several accepts on one listener

    @Test(arguments: Backends.kinds)
    func multishotAcceptThenOneShotAcceptEveryConnectionOnce(_ kind: BackendKind) throws {
        try Harness.run(kind) { h in
            let (l, port, _) = try h.tcpListener()
            let ma = h.prepare(.accept(l, multishot: true))
            let oa = h.prepare(.accept(l))
            try h.submit()
            try h.idle(for: .milliseconds(10))
            var clients: [FileDescriptor] = []
            for _ in 0..<3 { clients.append(try h.tcpClient(port: port)) }
            try h.idle(for: .milliseconds(300))
            let multi = h.log.filter { $0.token == ma && $0.result >= 0 }.count
            let one = h.log.filter { $0.token == oa }.map(\.result)
            #expect(multi + one.filter { $0 >= 0 }.count == 3, "\(kind): every connection accepted exactly once")
            for t in [ma, oa] where h.isPending(t) { h.prepare(.cancel(t)) }
            try h.drain()
        }
    }

    @Test(arguments: Backends.kinds)
    func oneShotAcceptThenMultishotAccept(_ kind: BackendKind) throws {
        try Harness.run(kind) { h in
            let (l, port, _) = try h.tcpListener()
            let oa = h.prepare(.accept(l))
            let ma = h.prepare(.accept(l, multishot: true))
            try h.submit()
            try h.idle(for: .milliseconds(10))
            for _ in 0..<3 { _ = try h.tcpClient(port: port) }
            try h.idle(for: .milliseconds(300))
            let multi = h.log.filter { $0.token == ma && $0.result >= 0 }.count
            let one = h.log.filter { $0.token == oa }.map(\.result)
            #expect(one.count == 1 && one[0] >= 0, "\(kind): one-shot accept \(one)")
            #expect(multi == 2, "\(kind): multishot got \(multi)")
            h.prepare(.cancel(ma))
            try h.drain()
        }
    }

    // MARK: Several operations on one fd, one edge

    @Test(arguments: Backends.kinds)
    func readsPollsAndAWriteOnOneSocketOneEdge(_ kind: BackendKind) throws {
        try Harness.run(kind) { h in
            let (a, b) = try h.socketPair()
            let r1 = h.prepare(.read(a, IOBuffer(capacity: 4)))
            let r2 = h.prepare(.recv(a, IOBuffer(capacity: 4)))
            let r3 = h.prepare(.read(a, IOBuffer(capacity: 64)))
            let p1 = h.prepare(.poll(a, .readable))
            let pm = h.prepare(.poll(a, .readable, multishot: true))
            try h.submit()
            try h.idle(for: .milliseconds(10))
            _ = h.fillSendBuffer(a)
            let w = h.prepare(.write(a, IOBuffer(bytes: [UInt8](repeating: 7, count: 100))))
            try h.submit()
            try h.idle(for: .milliseconds(10))
            h.writeAll(b, "0123456789")  // one edge
            let outs = try h.waitFor([r1, r2, r3, p1], within: .seconds(3))
            #expect(outs[0].string == "0123" && outs[1].string == "4567" && outs[2].string == "89", "\(outs)")
            #expect(outs[3].result & Int32(POLLIN) != 0)
            #expect(h.isPending(w) && h.isPending(pm))
            // Drain the peer: the write completes, exactly once.
            var got = 0
            let end = Deadline.now + .seconds(5)
            while h.isPending(w) && Deadline.now < end {
                got += h.readNow(b).count
                try h.waitOnce(timeout: .milliseconds(5))
            }
            let wo = try h.waitFor(w)
            #expect(wo.result == 100)
            h.prepare(.cancel(pm))
            try h.drain()
        }
    }

    // MARK: Blocking fds of many kinds

    /// Each wait must return promptly; reads must give what the syscall gives.
    @Test(arguments: Backends.kinds)
    func blockingFdsOfManyKinds(_ kind: BackendKind) throws {
        try Harness.run(kind) { h in
            func check(_ what: String, _ token: Token, trigger: () -> Void, _ verify: (Outcome) -> Void) throws {
                var worst = 0.0
                for _ in 0..<3 {
                    let s = Deadline.now
                    try h.waitOnce(timeout: .milliseconds(20))
                    worst = max(worst, secondsSince(s))
                }
                trigger()
                do {
                    let out = try h.waitFor(token, within: .seconds(3))
                    verify(out)
                } catch {
                    Issue.record("\(kind) \(what): never completed")
                }
                #expect(worst < 0.5, "\(kind) \(what): a wait took \(worst) s")
            }
            // /dev/null, /dev/zero, a directory: at once.
            let null = h.own(Glibc.open("/dev/null", O_RDWR | O_CLOEXEC))
            expectResult(try h.perform(.read(null, IOBuffer(capacity: 8)), within: .seconds(2)), 0)
            expectResult(try h.perform(.write(null, IOBuffer("abc")), within: .seconds(2)), 3)
            let zero = h.own(Glibc.open("/dev/zero", O_RDONLY | O_CLOEXEC))
            expectResult(try h.perform(.read(zero, IOBuffer(capacity: 8)), within: .seconds(2)), 8)
            let dir = h.own(Glibc.open("/tmp", O_RDONLY | O_DIRECTORY | O_CLOEXEC))
            expectError(try h.perform(.read(dir, IOBuffer(capacity: 8)), within: .seconds(2)), EISDIR)
            // eventfd
            let efd = h.own(eventfd(0, Int32(EFD_CLOEXEC)))
            let er = h.prepare(.read(efd, IOBuffer(capacity: 8)))
            try h.submit()
            try check("eventfd", er, trigger: { var v: UInt64 = 3; _ = Glibc.write(efd.rawValue, &v, 8) }) {
                expectResult($0, 8)
            }
            // timerfd
            let tfd = h.own(timerfd_create(CLOCK_MONOTONIC, Int32(TFD_CLOEXEC)))
            let tr = h.prepare(.read(tfd, IOBuffer(capacity: 8)))
            try h.submit()
            try check("timerfd", tr, trigger: {
                var spec = itimerspec(it_interval: timespec(), it_value: timespec(tv_sec: 0, tv_nsec: 30_000_000))
                _ = timerfd_settime(tfd.rawValue, 0, &spec, nil)
            }) { expectResult($0, 8) }
            // inotify
            let dirPath = try h.temporaryDirectory()
            let ifd = h.own(inotify_init1(Int32(IN_CLOEXEC)))
            _ = inotify_add_watch(ifd.rawValue, dirPath, UInt32(IN_CREATE))
            let ir = h.prepare(.read(ifd, IOBuffer(capacity: 4096)))
            try h.submit()
            try check("inotify", ir, trigger: { _ = Glibc.close(Glibc.open(dirPath + "/x", O_CREAT | O_WRONLY, 0o600)) }) {
                #expect($0.result > 0, "\($0)")
            }
            // signalfd (SIGWINCH: ignored by default, so a stray one is harmless), thread-directed.
            var set = sigset_t()
            sigemptyset(&set)
            sigaddset(&set, SIGWINCH)
            var old = sigset_t()
            pthread_sigmask(SIG_BLOCK, &set, &old)
            typealias SignalFD = @convention(c) (Int32, UnsafePointer<sigset_t>, Int32) -> Int32
            let sfd = h.own(unsafeBitCast(dlsym(nil, "signalfd")!, to: SignalFD.self)(-1, &set, O_CLOEXEC))
            let sr = h.prepare(.read(sfd, IOBuffer(capacity: 128)))
            try h.submit()
            try check("signalfd", sr, trigger: { _ = pthread_kill(pthread_self(), SIGWINCH) }) {
                expectResult($0, 128)
            }
            pthread_sigmask(SIG_SETMASK, &old, nil)
            // FIFO from mkfifo, opened O_RDWR (blocking)
            let fifoPath = try h.temporaryPath("fifo")
            #expect(mkfifo(fifoPath, 0o600) == 0)
            let fifo = h.own(Glibc.open(fifoPath, O_RDWR | O_CLOEXEC))
            let fr = h.prepare(.read(fifo, IOBuffer(capacity: 64)))
            try h.submit()
            try check("fifo", fr, trigger: { _ = Glibc.write(fifo.rawValue, "hey", 3) }) { #expect($0.string == "hey") }
            // blocking socketpair, both directions
            var sv: [Int32] = [-1, -1]
            _ = socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue | SOCK_CLOEXEC.rawValue), 0, &sv)
            let s0 = h.own(sv[0]), s1 = h.own(sv[1])
            let sr0 = h.prepare(.read(s0, IOBuffer(capacity: 64)))
            try h.submit()
            try check("blocking socket", sr0, trigger: { _ = Glibc.write(s1.rawValue, "sock", 4) }) { #expect($0.string == "sock") }
            _ = h.fillSendBuffer(s0)
            let sw = h.prepare(.write(s0, IOBuffer(bytes: [UInt8](repeating: 1, count: 1000))))
            try h.submit()
            try check("blocking socket write", sw, trigger: {
                var junk = [UInt8](repeating: 0, count: 1 << 20)
                _ = Glibc.recv(s1.rawValue, &junk, junk.count, Int32(MSG_DONTWAIT))
            }) { #expect($0.result > 0) }
            // pty slave, blocking, raw mode
            if let (m, name) = openPseudoTerminal() {
                h.own(m)
                let slave = h.own(Glibc.open(name, O_RDWR | O_NOCTTY | O_CLOEXEC))
                var tio = termios()
                tcgetattr(slave.rawValue, &tio)
                cfmakeraw(&tio)
                tcsetattr(slave.rawValue, TCSANOW, &tio)
                let pr = h.prepare(.read(slave, IOBuffer(capacity: 64)))
                try h.submit()
                try check("pty slave", pr, trigger: { _ = Glibc.write(m, "tty", 3) }) { #expect($0.string == "tty") }
                let mr = h.prepare(.read(FileDescriptor(rawValue: m), IOBuffer(capacity: 64)))
                try h.submit()
                try check("pty master", mr, trigger: { _ = Glibc.write(slave.rawValue, "out", 3) }) { #expect($0.string == "out") }
            }
        }
    }

    // MARK: fd reuse through Plexus close

    @Test(arguments: Backends.kinds)
    func blockingSocketTakesTheNumberOfAClosedNonBlockingPipe(_ kind: BackendKind) throws {
        try Harness.run(kind) { h in
            let (r, w) = try h.pipe()
            let first = h.prepare(.read(r, IOBuffer(capacity: 8)))
            try h.submit()
            h.writeAll(w, "p")
            try h.waitFor(first)
            let short = h.prepare(.read(r, IOBuffer(capacity: 8)))  // parks after the short read
            try h.submit()
            try h.idle(for: .milliseconds(10))
            let c = h.prepare(.close(r))
            let closed = try h.waitFor([short, c])
            expectError(closed[0], ECANCELED, "\(kind): a read parked after a short read, then close through Plexus")
            h.disown(r)
            var sv: [Int32] = [-1, -1]
            _ = socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue | SOCK_CLOEXEC.rawValue), 0, &sv)
            if sv[0] != r.rawValue {
                #expect(dup2(sv[0], r.rawValue) == r.rawValue)
                _ = Glibc.close(sv[0])
            }
            let s = h.own(r.rawValue), peer = h.own(sv[1])
            let done = DoneFlag()
            let dog = unblockAfter(after: .seconds(2), done) { _ = Glibc.write(peer.rawValue, "X", 1) }
            let t = h.prepare(.read(s, IOBuffer(capacity: 8)))
            try h.submit()
            let start = Deadline.now
            try h.waitOnce(timeout: .milliseconds(50))
            let took = secondsSince(start)
            done.set()
            dog.join()
            #expect(took < 1, "\(kind): the loop blocked \(took) s on a blocking socket that took a pipe's number")
            h.writeAll(peer, "s")
            let out = try h.waitFor(t)
            #expect(out.result >= 1)
            // A nonblocking pipe where the blocking socket was.
            let c2 = h.prepare(.close(s))
            try h.waitFor(c2)
            h.disown(s)
            let (r2, w2) = try h.pipe()
            if r2.rawValue != s.rawValue {
                #expect(dup2(r2.rawValue, s.rawValue) == s.rawValue)
                h.closeNow(r2)
                h.own(s.rawValue)
            }
            h.writeAll(w2, "again")
            let (t2, atOnce) = h.attempt(.read(s, IOBuffer(capacity: 16)))
            #expect(atOnce || kind == .ioUring, "\(kind): a read of a nonblocking pipe with data did not finish at once")
            #expect(try h.waitFor(t2).string == "again")
        }
    }

    // MARK: Hang-ups

    @Test(arguments: Backends.kinds)
    func resetWithReadWriteAndPollParked(_ kind: BackendKind) throws {
        try Harness.run(kind) { h in
            let (l, port, _) = try h.tcpListener()
            let client = try h.tcpClient(port: port)
            let acc = try h.perform(.accept(l))
            let server = FileDescriptor(rawValue: acc.result)
            _ = h.fillSendBuffer(client)
            let r1 = h.prepare(.read(client, IOBuffer(capacity: 16)))
            let r2 = h.prepare(.read(client, IOBuffer(capacity: 16)))
            let w1 = h.prepare(.write(client, IOBuffer(bytes: [UInt8](repeating: 1, count: 4096))))
            let w2 = h.prepare(.write(client, IOBuffer(bytes: [UInt8](repeating: 2, count: 4096))))
            let p = h.prepare(.poll(client, [.readHangup]))
            try h.submit()
            try h.idle(for: .milliseconds(20))
            var lin = linger(l_onoff: 1, l_linger: 0)
            _ = setsockopt(server.rawValue, SOL_SOCKET, SO_LINGER, &lin, socklen_t(MemoryLayout<linger>.size))
            let c = h.prepare(.close(server))
            let outs = try h.waitFor([c, r1, r2, w1, w2, p], within: .seconds(3))
            #expect(outs[1].result == -ECONNRESET || outs[1].result == 0, "\(outs[1])")
            #expect(outs[2].result <= 0, "\(outs[2])")
            #expect(outs[3].result < 0 && outs[4].result < 0, "\(outs[3]) \(outs[4])")
        }
    }

    @Test(arguments: Backends.kinds)
    func ourShutdownEndsParkedReadAndWrite(_ kind: BackendKind) throws {
        try Harness.run(kind) { h in
            let (l, port, _) = try h.tcpListener()
            let client = try h.tcpClient(port: port)
            let acc = try h.perform(.accept(l))
            // Fixed buffers (no autotuning): once full, the send buffer stays full, so the
            // write below stays parked until the shutdown (it once slipped through).
            var size: Int32 = 16384
            _ = setsockopt(acc.result, SOL_SOCKET, SO_RCVBUF, &size, socklen_t(MemoryLayout<Int32>.size))
            _ = setsockopt(client.rawValue, SOL_SOCKET, SO_SNDBUF, &size, socklen_t(MemoryLayout<Int32>.size))
            let r = h.prepare(.read(client, IOBuffer(capacity: 16)))
            try h.submit()
            try h.idle(for: .milliseconds(10))
            let s = h.prepare(.shutdown(client, how: Int32(SHUT_RD)))
            do {
                let outs = try h.waitFor([s, r], within: .seconds(2))
                #expect(outs[1].result == 0, "\(kind): a read parked before our shutdown(SHUT_RD) ends at end of file: \(outs[1])")
            } catch {
                Issue.record("\(kind): a read parked before our shutdown(SHUT_RD) never completed")
                try h.waitFor(h.prepare(.cancel(r)))
            }
            _ = h.fillSendBuffer(client)
            let w = h.prepare(.write(client, IOBuffer(bytes: [UInt8](repeating: 1, count: 4096))))
            try h.submit()
            try h.idle(for: .milliseconds(10))
            let s2 = h.prepare(.shutdown(client, how: Int32(SHUT_WR)))
            do {
                let o = try h.waitFor([s2, w], within: .seconds(2))
                #expect(o[1].result == -EPIPE, "\(o[1])")
            } catch {
                Issue.record("\(kind): a write parked before our shutdown(SHUT_WR) never completed")
                try h.waitFor(h.prepare(.cancel(w)))
            }
        }
    }
}

extension PlexusTests.ReadinessEdgeTests {
    // MARK: Scale and poll(2) specifics

    /// 2000 pipes with a read parked on each; every third gets data, every third of the
    /// rest is closed through Plexus in the same turn, the rest cancelled.
    @Test(arguments: Backends.kinds)
    func twoThousandParkedReadsWithClosesInTheSameTurn(_ kind: BackendKind) throws {
        let limit = raiseFileLimit(8192)
        try #require(limit >= 4200, "RLIMIT_NOFILE \(limit)")
        try Harness.run(kind) { h in
            var pipes: [(FileDescriptor, FileDescriptor)] = []
            var reads: [Token] = []
            for _ in 0..<2000 {
                let p = try h.pipe()
                pipes.append(p)
                reads.append(h.prepare(.read(p.0, IOBuffer(capacity: 8))))
            }
            try h.submit()
            try h.idle(for: .milliseconds(20))
            #expect(h.backend.pendingCount == 2000)
            var closes: [Token] = []
            for i in 0..<2000 {
                switch i % 3 {
                case 0: h.writeAll(pipes[i].1, "\(i % 10)")
                case 1: closes.append(h.prepare(.close(pipes[i].0)))
                default: break
                }
            }
            try h.submit()
            try h.waitFor(closes)
            for i in stride(from: 1, to: 2000, by: 3) { h.disown(pipes[i].0) }
            for i in stride(from: 0, to: 2000, by: 3) {
                let o = try h.waitFor(reads[i], within: .seconds(5))
                #expect(o.string == "\(i % 10)", "read \(i): \(o)")
            }
            for i in stride(from: 1, to: 2000, by: 3) { #expect(h.finals[reads[i]]?.result == -ECANCELED) }
            // Now the survivors get data in reverse order.
            for i in stride(from: 2, to: 2000, by: 3).reversed() { h.writeAll(pipes[i].1, "z") }
            for i in stride(from: 2, to: 2000, by: 3) {
                let o = try h.waitFor(reads[i], within: .seconds(5))
                #expect(o.string == "z", "read \(i): \(o)")
            }
            #expect(h.backend.pendingCount == 0)
        }
    }

    @Test(arguments: Backends.kinds)
    func fdAbove65535(_ kind: BackendKind) throws {
        let limit = raiseFileLimit(70_100)
        // The hard limit here is 20000 (no CAP_SYS_RESOURCE): then the highest fd allowed.
        let target = limit > 70_010 ? Int32(70_000) : Int32(limit - 1)
        // Without CAP_SYS_RESOURCE the hard limit may be lower (20000 here): then the highest fd allowed.
        try Harness.run(kind) { h in
            let (r, w) = try h.pipe()
            let high = h.own(dup2(r.rawValue, target))
            try #require(high.rawValue == target)
            let low = h.prepare(.read(r, IOBuffer(capacity: 8)))
            let t = h.prepare(.read(high, IOBuffer(capacity: 8)))
            let p = h.prepare(.poll(high, .readable))
            try h.submit()
            try h.idle(for: .milliseconds(10))
            h.writeAll(w, "hi")
            try h.waitFor(p, within: .seconds(3))
            try h.runUntil("one read") { !h.isPending(low) || !h.isPending(t) }
            let c = h.prepare(.close(high))
            try h.waitFor(c)
            h.disown(high)
            h.writeAll(w, "more")
            try h.drain()  // the read of the low fd, if the high one took "hi"
            h.writeAll(w, "again")
            let again = try h.perform(.read(r, IOBuffer(capacity: 8)), within: .seconds(3))
            #expect(again.result > 0)
        }
    }

    // MARK: Timers

    @Test(arguments: Backends.kinds)
    func manyEqualTimeoutsFireInOrderAndDeadlinesCancelReads(_ kind: BackendKind) throws {
        try Harness.run(kind) { h in
            var timeouts: [Token] = []
            for _ in 0..<500 { timeouts.append(h.prepare(.timeout(.milliseconds(30)))) }
            let (r, _) = try h.pipe()
            var reads: [Token] = []
            let deadline = Deadline.now + .milliseconds(40)
            for _ in 0..<300 { reads.append(h.prepare(.read(r, IOBuffer(capacity: 8)), deadline: deadline)) }
            try h.submit()
            let outs = try h.waitFor(timeouts, within: .seconds(5))
            #expect(outs.allSatisfy { $0.result == 0 })
            let order = h.log.filter { $0.kind == .timeout }.map(\.token)
            #expect(order == timeouts, "\(kind): equal timeouts fired out of order")
            let ro = try h.waitFor(reads, within: .seconds(5))
            #expect(ro.allSatisfy { $0.result == -ECANCELED })
            // epoll and poll end them in order; io_uring's kernel cancels its timeouts in its own order.
            if kind != .ioUring {
                let readOrder = h.log.filter { $0.kind == .read }.map(\.token)
                #expect(readOrder == reads, "\(kind): reads cancelled by one deadline out of FIFO order")
            }
        }
    }

    /// A cancel and the deadline of the same read in the same turn; then many cycles of
    /// deadlines that just miss: each op completes exactly once (the harness checks).
    @Test(arguments: Backends.kinds)
    func cancelRacingDeadline(_ kind: BackendKind) throws {
        try Harness.run(kind) { h in
            let (r, w) = try h.pipe()
            for round in 0..<200 {
                let d = Deadline.now + .microseconds(Int64(round % 7) * 50)
                let t = h.prepare(.read(r, IOBuffer(capacity: 8)), deadline: d)
                try h.submit()
                if round % 3 == 0 { h.writeAll(w, "x") }
                sleepFor(.microseconds(Int64(round % 5) * 40))
                let c = h.prepare(.cancel(t))
                let outs = try h.waitFor([t, c], within: .seconds(3))
                #expect(outs[0].result == -ECANCELED || outs[0].result == 1, "\(outs[0])")
                #expect(outs[1].result == 0 || outs[1].result == -ENOENT || outs[1].result == -EALREADY, "\(outs[1])")
                _ = h.readNow(r)
            }
            // A timeout after all that still fires on time.
            let start = Deadline.now
            let t = try h.perform(.timeout(.milliseconds(20)))
            #expect(t.result == 0 && secondsSince(start) < 0.5)
            #expect(h.backend.pendingCount == 0)
        }
    }
}
