import Synchronization

/// Work handed to the loop by other threads: FIFO, so each thread's jobs run in the
/// order it queued them. Two arrays swap under the lock, so draining allocates nothing
/// once they have grown, and jobs run without the lock held.
final class RemoteQueue: @unchecked Sendable {
    enum Job {
        /// `execute { }`.
        case closure(@Sendable () -> Void)
        /// A Swift task enqueued on the loop as its executor.
        case task(LoopJob)
        /// A component (a message queue's consumer) asking for a turn; no closure, no allocation.
        case signal(any LoopSignalTarget)
    }

    private let lock = Lock()
    private var incoming: [Job] = []
    private var running: [Job] = []
    private var closed = false
    private var finished = false
    private let queued = Atomic<Int>(0)
    /// Task jobs queued from other threads so far (`taskPushes`).
    private var taskJobsPushed = 0

    init() {
        incoming.reserveCapacity(64)
        running.reserveCapacity(64)
    }

    /// Queues `job`; false once the queue is closed (tasks are always taken: a task
    /// that was started must be able to finish), and for any job once it is finished.
    func push(_ job: Job) -> Bool {
        lock.withLock {
            if finished { return false }
            if closed, case .closure = job { return false }  // tasks and signals still run
            incoming.append(job)
            if case .task = job { taskJobsPushed &+= 1 }
            queued.add(1, ordering: .sequentiallyConsistent)
            return true
        }
    }

    var hasJobs: Bool { queued.load(ordering: .sequentiallyConsistent) > 0 }

    /// Task jobs queued from other threads so far, from any thread: a task whose awaits
    /// hop off the loop and back shows here once per hop (tests).
    var taskPushes: Int { lock.withLock { taskJobsPushed } }

    /// Stops taking closures; those already queued still run.
    func close() {
        lock.withLock { closed = true }
    }

    /// Takes no job any more (the loop's `run()` returns) and hands back what is still
    /// queued: the task jobs that came after the shutdown's last drain.
    func finish() -> [Job] {
        lock.withLock {
            finished = true
            let rest = incoming
            incoming.removeAll()
            queued.store(0, ordering: .sequentiallyConsistent)
            return rest
        }
    }

    /// Runs every job queued so far, in order (on the calling thread: the loop's).
    ///
    /// The jobs are taken into a local array: a job may turn the loop itself (a nested
    /// `runOnce`), which drains again, and swapping `running` from under this drain put
    /// its jobs back in `incoming`, to run a second time. `running` is only the spare
    /// buffer the two drains of a turn trade, so steady state allocates nothing.
    func drain(_ run: (Job) -> Void) {
        guard hasJobs else { return }
        var batch = running
        running = []
        lock.withLock {
            swap(&incoming, &batch)
            queued.store(0, ordering: .sequentiallyConsistent)
        }
        for job in batch { run(job) }
        batch.removeAll(keepingCapacity: true)
        running = batch
    }
}

/// Something that asks the loop for a turn from another thread without allocating:
/// `EventLoop.signal(_:)` queues the object itself and the loop calls `loopSignalled()`
/// on its thread. Coalescing (one signal per batch) is the target's job.
protocol LoopSignalTarget: AnyObject, Sendable {
    func loopSignalled()
}
