import CPlexus
import Glibc

/// One thin wrapper per system call the backends make themselves (the readiness
/// backends' I/O, and what the io_uring backend does at once instead of in the ring).
///
/// Every wrapper returns the call's non-negative result, or `-errno` on failure, so a
/// result can go straight into a completion. Calls that may be interrupted by a signal
/// before doing anything (EINTR) are retried here; `close` is not (Linux has already
/// released the fd when it reports EINTR).
enum Sys {
    @inline(__always)
    private static func check(_ result: Int) -> Int { result >= 0 ? result : -Int(plexus_errno()) }

    @inline(__always)
    private static func check(_ result: Int32) -> Int32 { result >= 0 ? result : -plexus_errno() }

    /// read(2).
    @inline(__always)
    static func read(_ fd: Int32, _ base: UnsafeMutableRawPointer?, _ count: Int) -> Int {
        while true {
            let r = check(Glibc.read(fd, base, count))
            if r != -Int(EINTR) { return r }
        }
    }

    /// write(2).
    @inline(__always)
    static func write(_ fd: Int32, _ base: UnsafeRawPointer?, _ count: Int) -> Int {
        while true {
            let r = check(Glibc.write(fd, base, count))
            if r != -Int(EINTR) { return r }
        }
    }

    /// pread(2).
    @inline(__always)
    static func pread(_ fd: Int32, _ base: UnsafeMutableRawPointer?, _ count: Int, _ offset: Int64) -> Int {
        while true {
            let r = check(Glibc.pread(fd, base, count, off_t(offset)))
            if r != -Int(EINTR) { return r }
        }
    }

    /// pwrite(2).
    @inline(__always)
    static func pwrite(_ fd: Int32, _ base: UnsafeRawPointer?, _ count: Int, _ offset: Int64) -> Int {
        while true {
            let r = check(Glibc.pwrite(fd, base, count, off_t(offset)))
            if r != -Int(EINTR) { return r }
        }
    }

    /// preadv2(2) of one buffer with RWF_NOWAIT (through the shim): the read happens only
    /// if it need not wait (EAGAIN otherwise; EOPNOTSUPP where the file cannot say).
    /// `offset` -1 reads at the file position.
    @inline(__always)
    static func readNoWait(_ fd: Int32, _ base: UnsafeMutableRawPointer?, _ count: Int, _ offset: Int64) -> Int {
        var vector = iovec(iov_base: base, iov_len: count)
        while true {
            let r = check(plexus_preadv2(fd, &vector, 1, off_t(offset), Int32(PLEXUS_RWF_NOWAIT)))
            if r != -Int(EINTR) { return r }
        }
    }

    /// pwritev2(2) of one buffer with RWF_NOWAIT (through the shim), as `readNoWait`.
    @inline(__always)
    static func writeNoWait(_ fd: Int32, _ base: UnsafeRawPointer?, _ count: Int, _ offset: Int64) -> Int {
        var vector = iovec(iov_base: UnsafeMutableRawPointer(mutating: base), iov_len: count)
        while true {
            let r = check(plexus_pwritev2(fd, &vector, 1, off_t(offset), Int32(PLEXUS_RWF_NOWAIT)))
            if r != -Int(EINTR) { return r }
        }
    }

    /// readv(2).
    @inline(__always)
    static func readv(_ fd: Int32, _ vectors: UnsafePointer<iovec>?, _ count: Int) -> Int {
        while true {
            let r = check(Glibc.readv(fd, vectors, Int32(count)))
            if r != -Int(EINTR) { return r }
        }
    }

    /// writev(2).
    @inline(__always)
    static func writev(_ fd: Int32, _ vectors: UnsafePointer<iovec>?, _ count: Int) -> Int {
        while true {
            let r = check(Glibc.writev(fd, vectors, Int32(count)))
            if r != -Int(EINTR) { return r }
        }
    }

    /// preadv(2).
    @inline(__always)
    static func preadv(_ fd: Int32, _ vectors: UnsafePointer<iovec>?, _ count: Int, _ offset: Int64) -> Int {
        while true {
            let r = check(Glibc.preadv(fd, vectors, Int32(count), off_t(offset)))
            if r != -Int(EINTR) { return r }
        }
    }

    /// pwritev(2).
    @inline(__always)
    static func pwritev(_ fd: Int32, _ vectors: UnsafePointer<iovec>?, _ count: Int, _ offset: Int64) -> Int {
        while true {
            let r = check(Glibc.pwritev(fd, vectors, Int32(count), off_t(offset)))
            if r != -Int(EINTR) { return r }
        }
    }

    /// recv(2).
    @inline(__always)
    static func recv(_ fd: Int32, _ base: UnsafeMutableRawPointer?, _ count: Int, _ flags: Int32) -> Int {
        while true {
            let r = check(Glibc.recv(fd, base, count, flags))
            if r != -Int(EINTR) { return r }
        }
    }

    /// send(2).
    @inline(__always)
    static func send(_ fd: Int32, _ base: UnsafeRawPointer?, _ count: Int, _ flags: Int32) -> Int {
        while true {
            let r = check(Glibc.send(fd, base, count, flags))
            if r != -Int(EINTR) { return r }
        }
    }

    /// recvmsg(2).
    @inline(__always)
    static func recvmsg(_ fd: Int32, _ message: UnsafeMutablePointer<msghdr>, _ flags: Int32) -> Int {
        while true {
            let r = check(Glibc.recvmsg(fd, message, flags))
            if r != -Int(EINTR) { return r }
        }
    }

    /// sendmsg(2).
    @inline(__always)
    static func sendmsg(_ fd: Int32, _ message: UnsafePointer<msghdr>, _ flags: Int32) -> Int {
        while true {
            let r = check(Glibc.sendmsg(fd, message, flags))
            if r != -Int(EINTR) { return r }
        }
    }

    /// accept4(2) with SOCK_NONBLOCK|SOCK_CLOEXEC (through the shim: accept4 is GNU-only).
    @inline(__always)
    static func accept4(_ fd: Int32) -> Int32 {
        let flags = Int32(SOCK_NONBLOCK.rawValue | SOCK_CLOEXEC.rawValue)
        while true {
            let r = check(plexus_accept4(fd, nil, nil, flags))
            if r != -EINTR { return r }
        }
    }

    /// connect(2). Not retried on EINTR: the connection then proceeds asynchronously,
    /// and the caller treats EINTR like EINPROGRESS.
    @inline(__always)
    static func connect(_ fd: Int32, _ address: UnsafePointer<sockaddr_storage>, _ length: socklen_t) -> Int32 {
        address.withMemoryRebound(to: sockaddr.self, capacity: 1) { check(Glibc.connect(fd, $0, length)) }
    }

    /// openat(2); `flags` must already include O_CLOEXEC.
    static func openat(_ directory: Int32, _ path: UnsafePointer<CChar>, _ flags: Int32, _ mode: mode_t) -> Int32 {
        while true {
            let r = check(Glibc.openat(directory, path, flags, mode))
            if r != -EINTR { return r }
        }
    }

    /// openat(2) that never waits, as io_uring's OPENAT tries first: with O_NONBLOCK added
    /// (a FIFO opens at once instead of waiting for its other end; for writing with no
    /// reader that is ENXIO), then O_NONBLOCK taken off again unless the caller asked for it.
    static func openatNoWait(_ directory: Int32, _ path: UnsafePointer<CChar>, _ flags: Int32, _ mode: mode_t) -> Int32 {
        if flags & O_NONBLOCK != 0 { return openat(directory, path, flags, mode) }
        let fd = openat(directory, path, flags | O_NONBLOCK, mode)
        if fd >= 0 {
            let status = statusFlags(fd)
            if status >= 0 { _ = Glibc.fcntl(fd, F_SETFL, status & ~O_NONBLOCK) }
        }
        return fd
    }

    /// close(2). Never retried: on Linux the fd is gone even when close reports EINTR.
    static func close(_ fd: Int32) -> Int32 {
        check(Glibc.close(fd))
    }

    /// fsync(2).
    static func fsync(_ fd: Int32) -> Int32 {
        while true {
            let r = check(Glibc.fsync(fd))
            if r != -EINTR { return r }
        }
    }

    /// fdatasync(2).
    static func fdatasync(_ fd: Int32) -> Int32 {
        while true {
            let r = check(Glibc.fdatasync(fd))
            if r != -EINTR { return r }
        }
    }

    /// shutdown(2).
    static func shutdown(_ fd: Int32, _ how: Int32) -> Int32 {
        check(Glibc.shutdown(fd, how))
    }

    /// fstat(2): the file type bits of `st_mode` (S_IFMT), or -errno.
    static func fileType(_ fd: Int32) -> Int32 {
        var st = stat()
        let r = check(Glibc.fstat(fd, &st))
        return r < 0 ? r : Int32(bitPattern: st.st_mode & S_IFMT)
    }

    /// getsockopt(2) SO_TYPE: SOCK_STREAM, SOCK_DGRAM..., or -errno.
    static func socketType(_ fd: Int32) -> Int32 { socketOption(fd, SO_TYPE) }

    /// getsockopt(2) SO_DOMAIN: AF_UNIX, AF_INET..., or -errno.
    static func socketDomain(_ fd: Int32) -> Int32 { socketOption(fd, SO_DOMAIN) }

    /// getsockopt(2) of an int-valued SOL_SOCKET option, or -errno.
    private static func socketOption(_ fd: Int32, _ name: Int32) -> Int32 {
        var value: Int32 = 0
        var length = socklen_t(MemoryLayout<Int32>.size)
        let r = check(getsockopt(fd, SOL_SOCKET, name, &value, &length))
        return r < 0 ? r : value
    }

    /// fcntl(2) with F_GETFL: the file status flags, or -errno.
    static func statusFlags(_ fd: Int32) -> Int32 {
        check(Glibc.fcntl(fd, F_GETFL))
    }

    /// epoll_create1(2).
    static func epollCreate(_ flags: Int32) -> Int32 {
        check(epoll_create1(flags))
    }

    /// epoll_ctl(2).
    @inline(__always)
    static func epollControl(_ epfd: Int32, _ op: Int32, _ fd: Int32, _ event: UnsafeMutablePointer<epoll_event>?) -> Int32 {
        check(epoll_ctl(epfd, op, fd, event))
    }

    /// epoll_wait(2), or epoll_pwait2(2) for a timeout other than none or zero, without a
    /// signal mask (through the shim); nil `timeout` blocks.
    /// EINTR is returned, not retried: the caller delivers what is ready.
    @inline(__always)
    static func epollWait(_ epfd: Int32, _ events: UnsafeMutablePointer<epoll_event>, _ max: Int32,
                          _ timeout: UnsafePointer<timespec>?) -> Int32 {
        check(plexus_epoll_wait(epfd, events, max, timeout))
    }

    /// poll(2) with a zero timeout, then, if nothing was ready, poll(2) or ppoll(2) with
    /// `timeout` (nil blocks), without a signal mask (through the shim); `probeSkips` is
    /// the caller's state for skipping the first poll after misses.
    /// EINTR is returned, not retried: the caller delivers what is ready.
    @inline(__always)
    static func poll(_ fds: UnsafeMutablePointer<pollfd>?, _ count: Int, _ timeout: UnsafePointer<timespec>?,
                     probeSkips: UnsafeMutablePointer<Int32>) -> Int32 {
        check(plexus_poll(fds, nfds_t(count), timeout, probeSkips))
    }
}
