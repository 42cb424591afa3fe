import Synchronization

/// Jobs handed to the loop by other threads: FIFO, so each thread's jobs run in the
/// order it queued them. Two arrays swap under the lock, so draining allocates nothing
/// once they have grown and jobs run without the lock held.
final class RemoteQueue: @unchecked Sendable {
    typealias Job = @Sendable () -> Void

    private let lock = Lock()
    private var incoming: [Job] = []
    private var running: [Job] = []
    private var closed = false
    private let queued = Atomic<Int>(0)

    init() {
        incoming.reserveCapacity(64)
        running.reserveCapacity(64)
    }

    /// Queues `job`; false once the queue is closed.
    func push(_ job: @escaping Job) -> Bool {
        lock.withLock {
            guard !closed else { return false }
            incoming.append(job)
            queued.add(1, ordering: .sequentiallyConsistent)
            return true
        }
    }

    var hasJobs: Bool { queued.load(ordering: .sequentiallyConsistent) > 0 }

    /// Stops taking jobs; those already queued still run.
    func close() {
        lock.withLock { closed = true }
    }

    /// Runs every job queued so far, in order (on the calling thread: the loop's).
    func drain(_ run: (Job) -> Void) {
        guard hasJobs else { return }
        lock.withLock {
            swap(&incoming, &running)
            queued.store(0, ordering: .sequentiallyConsistent)
        }
        for job in running { run(job) }
        running.removeAll(keepingCapacity: true)
    }
}
