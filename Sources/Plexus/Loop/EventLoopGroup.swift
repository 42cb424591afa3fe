import CPlexus
import Glibc
import Synchronization

/// N loops on N threads, for thread-per-core servers; `next()` hands them out round-robin.
public final class EventLoopGroup: Sendable {
    public let loops: [EventLoop]
    let cursor = Atomic<Int>(0)

    /// One loop per CPU this process may run on: its affinity mask (sched_getaffinity), so
    /// `taskset` and cpuset cgroups count; the online cores when the mask cannot be read.
    /// (A CPU quota, cgroup `cpu.max`, is not counted.)
    public static var defaultLoopCount: Int {
        let usable = plexus_usable_cpus()
        return usable > 0 ? Int(usable) : max(1, sysconf(Int32(_SC_NPROCESSORS_ONLN)))
    }

    /// Starts `count` loops (default: `defaultLoopCount`, one per usable CPU), each on its own thread.
    public init(loops count: Int = EventLoopGroup.defaultLoopCount, backend: BackendChoice? = nil,
                entries: UInt32 = 256) throws {
        precondition(count >= 1, "an EventLoopGroup needs at least one loop")
        var started: [EventLoop] = []
        do {
            for i in 0..<count {
                started.append(try EventLoop.startThread(name: "plexus-loop-\(i)", backend: backend, entries: entries))
            }
        } catch {
            for loop in started { loop.shutdownAndWait() }
            throw error
        }
        loops = started
    }

    /// The next loop, round-robin.
    public func next() -> EventLoop {
        // Unsigned: the counter wraps to negative values after Int.max calls.
        let turn = UInt(bitPattern: cursor.wrappingAdd(1, ordering: .relaxed).oldValue)
        return loops[Int(turn % UInt(loops.count))]
    }

    /// Shuts every loop down and waits for their threads.
    public func shutdownAndWait() {
        for loop in loops { loop.shutdown() }
        for loop in loops { loop.shutdownAndWait() }
    }
}
