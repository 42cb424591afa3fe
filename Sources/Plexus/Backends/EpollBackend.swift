import CPlexus
import Glibc
import SystemPackage

/// The epoll backend: completions emulated over readiness (`ReadinessEngine`).
///
/// Each fd is registered once, edge-triggered, for EPOLLIN|EPOLLOUT|EPOLLRDHUP, and
/// stays registered until Plexus closes it; an operation first tries its syscall and
/// only waits for an edge after EAGAIN. Regular files (which epoll rejects with EPERM)
/// run directly. Nothing is native: `capabilities` is empty.
public final class EpollBackend: IOBackend, ReadinessBackend {
    let engine: ReadinessEngine<EpollPoller>

    /// Creates the epoll instance (EPOLL_CLOEXEC); `entries` sizes the event buffer.
    public init(entries: UInt32 = 256) throws(PlexusError) {
        engine = try ReadinessEngine(entries: entries)
    }

    public var kind: BackendKind { .epoll }
    public var capabilities: Capabilities { [] }
    public var pendingCount: Int { engine.pendingCount }
    public var statistics: BackendStatistics { engine.statistics }

    @inline(__always)
    public func prepare(_ operation: consuming Operation) -> Token {
        engine.prepare(operation)
    }

    public func prepare(_ operation: consuming Operation, deadline: Deadline) -> Token {
        engine.prepare(operation, deadline: deadline)
    }

    public func attempt(_ operation: consuming Operation) -> Attempt {
        engine.attempt(operation)
    }

    @discardableResult
    public func submit() throws(PlexusError) -> Int {
        engine.submit()
    }

    @discardableResult
    public func wait(timeout: Duration?, _ body: (consuming Completion) -> Void) throws(PlexusError) -> Int {
        try engine.wait(timeout: timeout, body)
    }

    public func cancelAll(_ body: (consuming Completion) -> Void) {
        engine.cancelAll(body)
    }

    public func registerBuffers(count: Int, size: Int) throws(PlexusError) -> BufferGroup {
        try engine.registerBuffers(count: count, size: size)
    }

    public func unregisterBuffers(_ group: BufferGroup) {
        engine.unregisterBuffers(group)
    }

    public func recycle(_ group: BufferGroup, id: UInt16) {
        engine.recycle(group, id: id)
    }
}

/// epoll(7) as a `ReadinessPoller`: one registration per fd, edge-triggered, with the
/// fd number as the event's data; EPOLL_CTL_MOD (same mask) asks for a fresh report.
struct EpollPoller: ReadinessPoller {
    static var backendKind: BackendKind { .epoll }
    static var waitCallName: String { "epoll_wait" }
    static var rearmIsASyscall: Bool { true }
    static var mask: UInt32 { EPOLLIN.rawValue | EPOLLOUT.rawValue | EPOLLRDHUP.rawValue | EPOLLET.rawValue }

    let epfd: Int32
    let events: UnsafeMutablePointer<epoll_event>
    let capacity: Int32

    init(entries: UInt32) throws(PlexusError) {
        let fd = Sys.epollCreate(Int32(EPOLL_CLOEXEC))
        guard fd >= 0 else { throw PlexusError(operation: "epoll_create1", errno: Errno(rawValue: -fd)) }
        epfd = fd
        capacity = Int32(min(max(entries, 16), 4096))
        events = .allocate(capacity: Int(capacity))
    }

    func destroy() {
        _ = Sys.close(epfd)
        events.deallocate()
    }

    func register(_ fd: Int32) -> Int32 {
        let r = control(EPOLL_CTL_ADD, fd)
        return r == -EEXIST ? 0 : r
    }

    @inline(__always)
    func update(_ fd: Int32, interest: UInt32, rearm: Bool, states: RawArray<FDState>) -> Int32 {
        guard rearm, interest != 0 else { return 0 }
        let r = control(EPOLL_CTL_MOD, fd)
        // ENOENT: closed outside Plexus and the number reused; EBADF: closed and not reused;
        // EPERM: reused by a regular file (epoll checks the target before the registration).
        return r == -ENOENT || r == -EBADF || r == -EPERM ? r : 0
    }

    func remove(_ fd: Int32, states: RawArray<FDState>) {
        guard Int(fd) < states.count, states[Int(fd)].registered else { return }
        _ = control(EPOLL_CTL_DEL, fd)
    }

    @inline(__always)
    func wait(_ timeout: UnsafePointer<timespec>?) -> Int32 {
        Sys.epollWait(epfd, events, capacity, timeout)
    }

    @inline(__always)
    func event(_ i: Int) -> (fd: Int32, events: UInt32) {
        (Int32(truncatingIfNeeded: events[i].data.u64), events[i].events)
    }

    @inline(__always)
    private func control(_ op: Int32, _ fd: Int32) -> Int32 {
        var event = epoll_event()
        event.events = Self.mask
        event.data.u64 = UInt64(UInt32(bitPattern: fd))
        return Sys.epollControl(epfd, op, fd, &event)
    }
}
