/// The loop as a Swift executor.
///
/// A `TaskExecutor` as well as a `SerialExecutor`: a task started with
/// `Task(executorPreference: loop)` runs its nonisolated code on the loop thread, and a
/// continuation the loop resumes re-enters the loop's local job queue directly, with no
/// hop through the global pool and no allocation (FIELD-NOTES.md: 15x faster than a
/// SerialExecutor alone).
extension EventLoop: SerialExecutor, TaskExecutor {
    public func enqueue(_ job: consuming ExecutorJob) {
        let job = UnownedJob(job)
        if inLoop {
            localJobs.append(job)
        } else {
            _ = remote.push(.task(job))
            wakeForRemoteJob()
        }
    }

    public func asUnownedSerialExecutor() -> UnownedSerialExecutor {
        UnownedSerialExecutor(ordinary: self)
    }

    public func asUnownedTaskExecutor() -> UnownedTaskExecutor {
        UnownedTaskExecutor(ordinary: self)
    }

    public func checkIsolated() {
        precondition(inLoop, "not on the loop thread of \(self)")
    }

    func runTask(_ job: UnownedJob) {
        job.runSynchronously(isolatedTo: asUnownedSerialExecutor(), taskExecutor: asUnownedTaskExecutor())
    }
}
