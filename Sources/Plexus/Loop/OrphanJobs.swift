import CPlexus
import Glibc
import Synchronization

/// Runs the Swift jobs that reach a loop after its `run()` returned.
///
/// A task whose executor is the loop may be suspended elsewhere when the loop shuts down
/// (in `Task.sleep`, on another actor, in a continuation another thread resumes). When it
/// resumes, its job comes to the loop, and no loop thread will run it: the task would
/// never finish, and whoever awaits it would hang. Such jobs run here instead, one at a
/// time and in order, on a thread started for them that ends when none is left. The
/// task's loop operations there end at once with -ECANCELED, as they do from any thread
/// once the loop is shutting down, so the task runs to its end.
final class OrphanJobs: @unchecked Sendable {
    private struct State {
        var jobs: [LoopJob] = []
        var next = 0
        var draining = false
    }

    private let state = Mutex(State())
    /// The pthread_t of the thread running the jobs now, 0 when none (`isCurrentThread`).
    private let runner = Atomic<UInt>(0)

    /// True on the thread running the orphaned jobs: an actor pinned to the finished
    /// loop is isolated there.
    var isCurrentThread: Bool {
        let id = runner.load(ordering: .relaxed)
        return id != 0 && pthread_t(id) == pthread_self()
    }

    /// Queues `jobs` and starts a thread for them unless one is running.
    func adopt(_ jobs: [LoopJob], of loop: EventLoop) {
        guard !jobs.isEmpty else { return }
        let start = state.withLock {
            $0.jobs.append(contentsOf: jobs)
            if $0.draining { return false }
            $0.draining = true
            return true
        }
        if start { startThread(loop) }
    }

    private func startThread(_ loop: EventLoop) {
        let context = Unmanaged.passRetained(loop).toOpaque()
        var thread = pthread_t()
        let rc = pthread_create(&thread, nil, { raw in
            let loop = Unmanaged<EventLoop>.fromOpaque(raw!).takeRetainedValue()
            _ = plexus_set_thread_name("plexus-orphans")
            loop.orphans.drain(loop)
            return nil
        }, context)
        if rc == 0 {
            pthread_detach(thread)
        } else {
            // No thread to be had: run them on this one rather than never.
            Unmanaged<EventLoop>.fromOpaque(context).release()
            drain(loop)
        }
    }

    /// Runs queued jobs until none is left; the jobs they enqueue on the loop come here too.
    private func drain(_ loop: EventLoop) {
        runner.store(UInt(pthread_self()), ordering: .relaxed)
        while let job = take() { loop.runTask(job) }
    }

    private func take() -> LoopJob? {
        state.withLock {
            guard $0.next < $0.jobs.count else {
                $0.jobs.removeAll()
                $0.next = 0
                $0.draining = false
                runner.store(0, ordering: .relaxed)
                return nil
            }
            $0.next += 1
            return $0.jobs[$0.next - 1]
        }
    }
}
