/// The loop as a Swift executor.
///
/// A `TaskExecutor` as well as a `SerialExecutor`: a task started with
/// `Task(executorPreference: loop)` runs its nonisolated code on the loop thread, and a
/// continuation the loop resumes re-enters the loop's local job queue directly, with no
/// hop through the global pool and no allocation (FIELD-NOTES.md: 15x faster than a
/// SerialExecutor alone).
///
/// The two roles run jobs differently: a task job runs as nonisolated code on the loop
/// (`runSynchronously(on: taskExecutor)`), an actor's job runs isolated to the loop's
/// serial executor. Were task jobs run as isolated, every nonisolated async call in them
/// (withUnsafeContinuation, withTaskCancellationHandler) would switch executors: a
/// suspension and an extra job per await. Actor jobs therefore arrive through a small
/// separate object, `LoopSerialExecutor`, that `asUnownedSerialExecutor()` returns.
///
/// An actor pinned to the loop resumes without a thread hop only inside a task that
/// prefers the loop: a suspended task without a preference is resumed by the runtime on
/// the global pool, and only then switches to the actor, queueing its job on the loop
/// from that thread (`AsyncAdapterTests.actorsPinnedToTheLoopAwaitWithoutAHop`).
extension EventLoop: SerialExecutor, TaskExecutor {
    public func enqueue(_ job: consuming ExecutorJob) {
        enqueueOnLoop(LoopJob(job: UnownedJob(job), isolated: false))
    }

    func enqueueOnLoop(_ job: LoopJob) {
        if inLoop {
            localJobs.append(job)
        } else if remote.push(.task(job)) {
            wakeForRemoteJob()
        } else {
            orphans.adopt([job], of: self)  // run() has returned
        }
    }

    public func asUnownedSerialExecutor() -> UnownedSerialExecutor {
        UnownedSerialExecutor(ordinary: serialExecutor)
    }

    public func asUnownedTaskExecutor() -> UnownedTaskExecutor {
        UnownedTaskExecutor(ordinary: self)
    }

    public func checkIsolated() {
        precondition(inLoop || orphans.isCurrentThread, "not on the loop thread")
    }

    func runTask(_ job: LoopJob) {
        if job.isolated {
            job.job.runSynchronously(isolatedTo: asUnownedSerialExecutor(), taskExecutor: asUnownedTaskExecutor())
        } else {
            job.job.runSynchronously(on: asUnownedTaskExecutor())
        }
    }
}

/// A job for the loop thread, and whether it runs isolated (an actor's) or not (a task's).
struct LoopJob {
    let job: UnownedJob
    let isolated: Bool
}

/// The serial-executor face of a loop: actors whose `unownedExecutor` is the loop's
/// enqueue here, and their jobs run isolated on the loop thread.
final class LoopSerialExecutor: SerialExecutor, @unchecked Sendable {
    unowned(unsafe) let loop: EventLoop

    init(loop: EventLoop) { self.loop = loop }

    func enqueue(_ job: consuming ExecutorJob) {
        loop.enqueueOnLoop(LoopJob(job: UnownedJob(job), isolated: true))
    }

    func asUnownedSerialExecutor() -> UnownedSerialExecutor {
        UnownedSerialExecutor(ordinary: self)
    }

    func checkIsolated() {
        precondition(loop.inLoop || loop.orphans.isCurrentThread, "not on the loop thread")
    }
}
