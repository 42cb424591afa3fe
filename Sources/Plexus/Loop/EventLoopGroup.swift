import Glibc
import Synchronization

/// N loops on N threads, for thread-per-core servers; `next()` hands them out round-robin.
public final class EventLoopGroup: Sendable {
    public let loops: [EventLoop]
    private let cursor = Atomic<Int>(0)

    /// Starts `count` loops (default: one per online core), each on its own thread.
    public init(loops count: Int = Int(sysconf(Int32(_SC_NPROCESSORS_ONLN))), backend: BackendChoice? = nil,
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
        loops[cursor.wrappingAdd(1, ordering: .relaxed).oldValue % loops.count]
    }

    /// Shuts every loop down and waits for their threads.
    public func shutdownAndWait() {
        for loop in loops { loop.shutdown() }
        for loop in loops { loop.shutdownAndWait() }
    }
}
