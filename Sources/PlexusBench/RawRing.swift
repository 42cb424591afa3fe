import CPlexus
import Glibc

/// An io_uring for the raw-io_uring baselines: liburing's inline functions straight from
/// Swift (FIELD-NOTES.md: they run at C speed), set up with the flags URingBackend tries
/// first (SINGLE_ISSUER + DEFER_TASKRUN, then COOP_TASKRUN, then none) and a CQ four
/// times the SQ, so the baseline and the backend drive the same kind of ring.
///
/// Create it on the thread that submits (SINGLE_ISSUER).
final class RawRing {
    let ring: UnsafeMutablePointer<io_uring>
    private let cqes: UnsafeMutablePointer<UnsafeMutablePointer<io_uring_cqe>?>
    private let batch: UInt32

    init(entries: UInt32 = 256) throws {
        ring = .allocate(capacity: 1)
        ring.initialize(to: io_uring())
        var result: Int32 = -EINVAL
        for attempt in [IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN | IORING_SETUP_SUBMIT_ALL,
                        IORING_SETUP_COOP_TASKRUN | IORING_SETUP_SUBMIT_ALL, 0] {
            var params = io_uring_params()
            params.flags = attempt | IORING_SETUP_CQSIZE | IORING_SETUP_CLAMP
            params.cq_entries = entries &* 4
            result = io_uring_queue_init_params(entries, ring, &params)
            if result != -EINVAL { break }
        }
        guard result == 0 else {
            ring.deallocate()
            throw BenchmarkError.system("io_uring_queue_init_params", -result)
        }
        batch = ring.pointee.cq.ring_entries
        cqes = .allocate(capacity: Int(batch))
    }

    deinit {
        io_uring_queue_exit(ring)
        ring.deallocate()
        cqes.deallocate()
    }

    /// The next SQE; the baselines never have more in flight than the SQ holds.
    @inline(__always)
    func sqe() -> UnsafeMutablePointer<io_uring_sqe> {
        io_uring_get_sqe(ring).unsafelyUnwrapped
    }

    /// io_uring_submit_and_wait: submits and waits for `count` completions (one syscall).
    @inline(__always)
    func submitAndWait(_ count: UInt32) throws {
        let r = io_uring_submit_and_wait(ring, count)
        if r < 0 && r != -EINTR && r != -EAGAIN && r != -EBUSY { throw BenchmarkError.system("io_uring_submit_and_wait", -r) }
    }

    /// io_uring_submit_and_get_events: submits and reaps without waiting (one syscall).
    @inline(__always)
    func submitAndPoll() throws {
        let r = io_uring_submit_and_get_events(ring)
        if r < 0 && r != -EINTR && r != -EAGAIN && r != -EBUSY { throw BenchmarkError.system("io_uring_submit_and_get_events", -r) }
    }

    /// Hands every ready CQE's (user_data, res) to `body`, then advances the CQ; returns how many.
    @inline(__always)
    func reap(_ body: (UInt64, Int32) throws -> Void) rethrows -> Int {
        var total = 0
        while true {
            let n = Int(io_uring_peek_batch_cqe(ring, cqes, batch))
            if n == 0 { return total }
            for i in 0..<n {
                let cqe = cqes[i].unsafelyUnwrapped
                try body(cqe.pointee.user_data, cqe.pointee.res)
            }
            io_uring_cq_advance(ring, UInt32(n))
            total += n
        }
    }
}

/// An epoll set for the raw-epoll baselines; fds are registered once, level-triggered.
final class RawEpoll {
    let fd: Int32
    let events: UnsafeMutablePointer<epoll_event>
    let capacity: Int32

    init(capacity: Int32 = 256) throws {
        fd = try check(epoll_create1(Int32(EPOLL_CLOEXEC)), "epoll_create1")
        self.capacity = capacity
        events = .allocate(capacity: Int(capacity))
    }

    deinit {
        Glibc.close(fd)
        events.deallocate()
    }

    func add(_ watched: Int32, events mask: UInt32 = EPOLLIN.rawValue, data: UInt64) throws {
        var event = epoll_event()
        event.events = mask
        event.data.u64 = data
        try check(epoll_ctl(fd, EPOLL_CTL_ADD, watched, &event), "epoll_ctl(ADD)")
    }

    /// epoll_wait (epoll_pwait2 for a timeout other than 0) with `timeoutNanoseconds` (nil blocks); returns the ready count.
    @inline(__always)
    func wait(timeoutNanoseconds: Int? = nil) throws -> Int {
        var n: Int32
        if let timeoutNanoseconds {
            var ts = timespec(tv_sec: timeoutNanoseconds / 1_000_000_000, tv_nsec: timeoutNanoseconds % 1_000_000_000)
            n = plexus_epoll_wait(fd, events, capacity, &ts)
        } else {
            n = plexus_epoll_wait(fd, events, capacity, nil)
        }
        if n < 0 {
            if plexus_errno() == EINTR { return 0 }
            throw BenchmarkError.system("epoll_wait")
        }
        return Int(n)
    }

    @inline(__always)
    func data(_ i: Int) -> UInt64 { events[i].data.u64 }
}

/// poll over a fixed pollfd array for the raw-poll baselines.
final class RawPoll {
    let fds: UnsafeMutablePointer<pollfd>
    private(set) var count = 0
    let capacity: Int
    /// The shim's state for `plexus_poll`'s zero-timeout probe (the poll backend's too).
    let probeSkips = UnsafeMutablePointer<Int32>.allocate(capacity: 1)

    init(capacity: Int) {
        self.capacity = capacity
        fds = .allocate(capacity: capacity)
        probeSkips.initialize(to: 0)
    }

    deinit {
        fds.deallocate()
        probeSkips.deallocate()
    }

    func add(_ fd: Int32, events: Int16 = Int16(POLLIN)) {
        precondition(count < capacity)
        fds[count] = pollfd(fd: fd, events: events, revents: 0)
        count += 1
    }

    /// `plexus_poll` (a zero-timeout poll first, as the poll backend waits) with
    /// `timeoutNanoseconds` (nil blocks); returns the ready count.
    @inline(__always)
    func wait(timeoutNanoseconds: Int? = nil) throws -> Int {
        var n: Int32
        if let timeoutNanoseconds {
            var ts = timespec(tv_sec: timeoutNanoseconds / 1_000_000_000, tv_nsec: timeoutNanoseconds % 1_000_000_000)
            n = plexus_poll(fds, nfds_t(count), &ts, probeSkips)
        } else {
            n = plexus_poll(fds, nfds_t(count), nil, probeSkips)
        }
        if n < 0 {
            if plexus_errno() == EINTR { return 0 }
            throw BenchmarkError.system("poll")
        }
        return Int(n)
    }
}

/// The ready queue of the raw-epoll and raw-poll NOP baselines: what a readiness loop
/// written by hand keeps for work that completes without a syscall. A fixed ring of
/// (user data, result) entries, pushed when the NOP is queued and handed to a closure,
/// in order, when the loop's turn completes them, as `RawRing.reap` hands over CQEs.
final class RawReadyQueue {
    private let entries: UnsafeMutablePointer<(UInt64, Int32)>
    private let mask: Int
    @exclusivity(unchecked) private var head = 0
    @exclusivity(unchecked) private var tail = 0

    /// `capacity` is rounded up to a power of two.
    init(capacity: Int) {
        var size = 1
        while size < capacity { size <<= 1 }
        entries = .allocate(capacity: size)
        mask = size - 1
    }

    deinit { entries.deallocate() }

    /// Queues one entry; the baselines never queue more than the capacity.
    @inline(__always)
    func push(_ userData: UInt64, _ result: Int32) {
        precondition(tail - head <= mask, "raw ready queue full")
        entries[tail & mask] = (userData, result)
        tail &+= 1
    }

    /// Hands every queued entry's (user data, result) to `body`, oldest first; returns how many.
    @inline(__always)
    func drain(_ body: (UInt64, Int32) throws -> Void) rethrows -> Int {
        let n = tail - head
        while head != tail {
            let (userData, result) = entries[head & mask]
            head &+= 1
            try body(userData, result)
        }
        return n
    }
}

