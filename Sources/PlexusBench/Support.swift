import CPlexus
import CPlexusMallocCounter
import Glibc

// Small pieces every benchmark body shares: the clock, the latency sampler, the malloc
// counter, errors, fds and threads. Nothing here runs inside a timed window except
// `monotonicNanoseconds` and `LatencySampler.record`, which allocate nothing.

/// CLOCK_MONOTONIC in nanoseconds (clock_gettime through the vDSO: ~20-30 ns, no syscall).
@inline(__always)
public func monotonicNanoseconds() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return UInt64(ts.tv_sec) &* 1_000_000_000 &+ UInt64(ts.tv_nsec)
}

/// The process-wide malloc counter of CPlexusMallocCounter.
public enum MallocCounter {
    /// True when every allocation in the process is counted (false under sanitizers).
    public static let isActive: Bool = plexus_malloc_counter_active() != 0
    /// Allocation calls so far, from every thread.
    @inline(__always)
    public static var count: UInt64 { plexus_malloc_count() }
}

/// A fixed-capacity buffer of latency samples in nanoseconds: allocated once, so
/// recording inside a timed window never allocates. Past `capacity` samples it keeps a
/// uniform random sample of all of them (reservoir sampling), so a long window's
/// percentiles describe the whole window, not its first `capacity` samples.
public final class LatencySampler {
    private let storage: UnsafeMutablePointer<UInt64>
    public let capacity: Int
    /// Samples kept (at most `capacity`).
    public private(set) var count = 0
    /// Samples recorded since `reset`, kept or not.
    public private(set) var seen = 0
    /// Samples recorded only while true (off during warm-up).
    public var enabled = false
    private var random = XorShift(state: 0x9E37_79B9_7F4A_7C15)

    public init(capacity: Int = 1 << 20) {
        self.capacity = max(1, capacity)
        storage = .allocate(capacity: self.capacity)
    }

    deinit { storage.deallocate() }

    @inline(__always)
    public func record(_ nanoseconds: UInt64) {
        guard enabled else { return }
        seen &+= 1
        if count < capacity {
            storage[count] = nanoseconds
            count &+= 1
        } else {
            // Algorithm R: the n-th sample replaces a kept one with probability capacity/n.
            let slot = Int(random.next() % UInt64(seen))
            if slot < capacity { storage[slot] = nanoseconds }
        }
    }

    public func reset() {
        count = 0
        seen = 0
    }

    /// (p50, p99) of the samples so far, nearest rank (the smallest sample that at least
    /// p% of the samples do not exceed); sorts them in place. Nil without samples.
    public func percentiles() -> (p50: Double, p99: Double)? {
        guard count > 0 else { return nil }
        var buffer = UnsafeMutableBufferPointer(start: storage, count: count)
        buffer.sort()
        return (Double(buffer[Self.nearestRankIndex(percent: 50, count: count)]),
                Double(buffer[Self.nearestRankIndex(percent: 99, count: count)]))
    }

    /// The index, in `count` sorted samples, of the nearest-rank `percent`th percentile:
    /// ceil(count × percent / 100) - 1. (`count * 99 / 100` is one too high whenever that
    /// product is whole: of 200 samples it took the 199th, above 99% of them.)
    static func nearestRankIndex(percent: Int, count: Int) -> Int {
        max(0, (count * percent + 99) / 100 - 1)
    }
}

extension Optional where Wrapped == LatencySampler {
    /// For the async workloads' loops: a clock reading before unit `i` when it is to be
    /// timed (the first, with a sampler), else 0.
    @inline(__always)
    func startTiming(_ i: Int) -> UInt64 {
        if i == 0, self != nil { return monotonicNanoseconds() }
        return 0
    }

    /// Records the time since `start`, if `startTiming` took a reading.
    @inline(__always)
    func stopTiming(_ start: UInt64) {
        if start != 0 { self!.record(monotonicNanoseconds() &- start) }
    }
}

/// What a benchmark reports when it cannot run or its result is wrong.
public struct BenchmarkError: Error, CustomStringConvertible, Sendable {
    public let message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }

    /// A failed syscall, with errno.
    static func system(_ call: String, _ errnoValue: Int32 = plexus_errno()) -> BenchmarkError {
        BenchmarkError("\(call) failed: \(String(cString: strerror(errnoValue))) (errno \(errnoValue))")
    }

    /// A wrong result: the benchmark measured something other than what it claims.
    static func wrong(_ what: String) -> BenchmarkError { BenchmarkError("wrong result: \(what)") }
}

/// Throws `BenchmarkError.system` when a syscall returned -1.
@discardableResult
func check(_ result: Int32, _ call: String) throws -> Int32 {
    if result < 0 { throw BenchmarkError.system(call) }
    return result
}

/// Throws when a liburing call returned -errno.
@discardableResult
func checkNegative(_ result: Int32, _ call: String) throws -> Int32 {
    if result < 0 { throw BenchmarkError.system(call, -result) }
    return result
}

func setNonBlocking(_ fd: Int32, _ on: Bool) throws {
    let flags = try check(fcntl(fd, F_GETFL), "fcntl(F_GETFL)")
    try check(fcntl(fd, F_SETFL, on ? flags | O_NONBLOCK : flags & ~O_NONBLOCK), "fcntl(F_SETFL)")
}

/// A pipe with O_CLOEXEC; non-blocking when `nonBlocking`.
func makePipe(nonBlocking: Bool) throws -> (read: Int32, write: Int32) {
    var fds: [Int32] = [-1, -1]
    try check(plexus_pipe2(&fds, O_CLOEXEC | (nonBlocking ? O_NONBLOCK : 0)), "pipe2")
    return (fds[0], fds[1])
}

/// An eventfd with EFD_CLOEXEC; non-blocking when `nonBlocking`.
func makeEventFD(nonBlocking: Bool) throws -> Int32 {
    try check(eventfd(0, Int32(EFD_CLOEXEC) | (nonBlocking ? Int32(EFD_NONBLOCK) : 0)), "eventfd")
}

/// Writes 1 to an eventfd.
@inline(__always)
func signalEventFD(_ fd: Int32) {
    var one: UInt64 = 1
    _ = Glibc.write(fd, &one, 8)
}

/// Reads an eventfd (blocking or not); returns its counter, 0 on EAGAIN.
@inline(__always)
func drainEventFD(_ fd: Int32) -> UInt64 {
    var value: UInt64 = 0
    return Glibc.read(fd, &value, 8) == 8 ? value : 0
}

/// Connected loopback TCP pairs (client, server) with TCP_NODELAY on both ends.
func makeTCPPairs(_ count: Int, nonBlocking: Bool) throws -> [(client: Int32, server: Int32)] {
    let listener = try check(socket(AF_INET, Int32(SOCK_STREAM.rawValue | SOCK_CLOEXEC.rawValue), 0), "socket")
    defer { Glibc.close(listener) }
    var one: Int32 = 1
    setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
    var address = sockaddr_in()
    address.sin_family = sa_family_t(AF_INET)
    address.sin_addr.s_addr = UInt32(0x7f00_0001).bigEndian
    address.sin_port = 0
    var length = socklen_t(MemoryLayout<sockaddr_in>.size)
    try withUnsafeMutablePointer(to: &address) { pointer in
        try pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { sa in
            try check(bind(listener, sa, length), "bind")
            try check(getsockname(listener, sa, &length), "getsockname")
        }
    }
    try check(listen(listener, Int32(max(count, 16))), "listen")
    var pairs: [(client: Int32, server: Int32)] = []
    do {
        for _ in 0..<count {
            let client = try check(socket(AF_INET, Int32(SOCK_STREAM.rawValue | SOCK_CLOEXEC.rawValue), 0), "socket")
            let connected = withUnsafePointer(to: &address) { pointer in
                pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(client, $0, length) }
            }
            if connected < 0 { let e = plexus_errno(); Glibc.close(client); throw BenchmarkError.system("connect", e) }
            let server = plexus_accept4(listener, nil, nil, Int32(SOCK_CLOEXEC.rawValue))
            if server < 0 { let e = plexus_errno(); Glibc.close(client); throw BenchmarkError.system("accept4", e) }
            pairs.append((client, server))
            for fd in [client, server] {
                setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
                try setNonBlocking(fd, nonBlocking)
            }
        }
    } catch {
        for pair in pairs { Glibc.close(pair.client); Glibc.close(pair.server) }
        throw error
    }
    return pairs
}

/// A thread running `body`, joined by `join()`. For the loop side of cross-thread benchmarks.
final class BenchThread: @unchecked Sendable {
    private var thread = pthread_t()
    private let body: () -> Void
    private let name: String

    init(name: String, _ body: @escaping () -> Void) throws {
        self.body = body
        self.name = name
        let context = Unmanaged.passRetained(self).toOpaque()
        let rc = pthread_create(&thread, nil, { raw in
            let me = Unmanaged<BenchThread>.fromOpaque(raw!).takeRetainedValue()
            _ = me.name.withCString { plexus_set_thread_name($0) }
            me.body()
            return nil
        }, context)
        if rc != 0 {
            Unmanaged<BenchThread>.fromOpaque(context).release()
            throw BenchmarkError.system("pthread_create", rc)
        }
    }

    func join() { pthread_join(thread, nil) }
}

/// xorshift64*: a cheap reproducible sequence for random file offsets.
struct XorShift {
    var state: UInt64
    mutating func next() -> UInt64 {
        state ^= state >> 12
        state ^= state << 25
        state ^= state >> 27
        return state &* 2_685_821_657_736_338_717
    }
}

/// A counting semaphore on sem_t.
final class BenchSemaphore: @unchecked Sendable {
    private let semaphore: UnsafeMutablePointer<sem_t>

    init() {
        semaphore = .allocate(capacity: 1)
        sem_init(semaphore, 0, 0)
    }

    deinit {
        sem_destroy(semaphore)
        semaphore.deallocate()
    }

    func signal() { sem_post(semaphore) }

    func wait() {
        while sem_wait(semaphore) != 0 && plexus_errno() == EINTR {}
    }
}
