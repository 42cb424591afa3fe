import CPlexus
import Glibc
import SystemPackage

/// The poll backend: completions emulated over readiness (`ReadinessEngine`).
///
/// A pollfd array holds the fds that have parked operations, with the union of what
/// they wait for, and is kept up to date incrementally (swap-remove); poll(2) is
/// level-triggered. Regular files run directly. Nothing is native: `capabilities` is
/// empty.
public final class PollBackend: IOBackend, ReadinessBackend {
    let engine: ReadinessEngine<PollPoller>

    /// Creates the backend; `entries` sizes the initial pollfd array.
    public init(entries: UInt32 = 256) throws(PlexusError) {
        engine = try ReadinessEngine(entries: entries)
    }

    public var kind: BackendKind { .poll }
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

/// poll(2) as a `ReadinessPoller`: a pollfd per fd with parked operations (its slot is
/// kept in `FDState.slot`), interest = union of the parked directions, level-triggered.
struct PollPoller: ReadinessPoller {
    static var backendKind: BackendKind { .poll }
    static var waitCallName: String { "poll" }
    static var rearmIsASyscall: Bool { false }

    struct Ready {
        var fd: Int32
        var events: UInt32
    }

    let pollfds: RawArray<pollfd>
    /// What the last `wait` found, copied out so the array may change while it is handled.
    let ready: RawArray<Ready>
    /// The shim's state for `plexus_poll`'s zero-timeout probe.
    let probeSkips = UnsafeMutablePointer<Int32>.allocate(capacity: 1)

    init(entries: UInt32) throws(PlexusError) {
        pollfds = RawArray(capacity: Int(min(max(entries, 16), 4096)))
        ready = RawArray(capacity: Int(min(max(entries, 16), 4096)))
        probeSkips.initialize(to: 0)
    }

    func destroy() {
        pollfds.destroy()
        ready.destroy()
        probeSkips.deallocate()
    }

    func register(_ fd: Int32) -> Int32 { 0 }

    @inline(__always)
    func update(_ fd: Int32, interest: UInt32, rearm: Bool, states: RawArray<FDState>) -> Int32 {
        let state = states.pointer(Int(fd))
        let slot = Int(state.pointee.slot)
        if interest == 0 {
            guard slot >= 0 else { return 0 }
            let last = pollfds.count - 1
            if slot != last {
                let moved = pollfds[last]
                pollfds[slot] = moved
                states.pointer(Int(moved.fd)).pointee.slot = Int32(slot)
            }
            pollfds.removeLast()
            state.pointee.slot = -1
        } else if slot < 0 {
            state.pointee.slot = Int32(pollfds.count)
            pollfds.append(pollfd(fd: fd, events: Int16(truncatingIfNeeded: interest), revents: 0))
        } else {
            pollfds.pointer(slot).pointee.events = Int16(truncatingIfNeeded: interest)
        }
        return 0
    }

    func remove(_ fd: Int32, states: RawArray<FDState>) {
        guard Int(fd) < states.count else { return }
        _ = update(fd, interest: 0, rearm: false, states: states)
    }

    @inline(__always)
    func wait(_ timeout: UnsafePointer<timespec>?) -> Int32 {
        ready.removeAll()
        let n = Sys.poll(pollfds.base, pollfds.count, timeout, probeSkips: probeSkips)
        guard n > 0 else { return n }
        var found: Int32 = 0
        for i in 0..<pollfds.count where pollfds[i].revents != 0 {
            ready.append(Ready(fd: pollfds[i].fd, events: UInt32(UInt16(bitPattern: pollfds[i].revents))))
            found += 1
            if found == n { break }
        }
        return found
    }

    @inline(__always)
    func event(_ i: Int) -> (fd: Int32, events: UInt32) {
        (ready[i].fd, ready[i].events)
    }

    /// poll(2) refuses more fds than RLIMIT_NOFILE's soft limit (lowered after they were
    /// opened): say so, as epoll, which has no such limit, keeps serving.
    func explain(_ errno: Int32) -> String? {
        var limit = rlimit()
        guard errno == EINVAL, getrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit) == 0,
              UInt64(pollfds.count) > UInt64(limit.rlim_cur) else { return nil }
        return "poll(2) watches \(pollfds.count) fds, more than RLIMIT_NOFILE's soft limit (\(limit.rlim_cur)) allows: raise it, or use the epoll backend"
    }
}
