import CPlexus
import Glibc
import Synchronization

/// Runs the Swift jobs that reach a loop after its `run()` returned.
///
/// A task whose executor is the loop may be suspended elsewhere when the loop shuts down
/// (in `Task.sleep`, on another actor, in a continuation another thread resumes). When it
/// resumes, its job comes to the loop, and no loop thread will run it: the task would
/// never finish, and whoever awaits it would hang. Such jobs run here instead, one at a
/// time, on a thread started for them that ends when none is left. The task's loop
/// operations there end at once with -ECANCELED, as they do from any thread once the
/// loop is shutting down, so the task runs to its end.
///
/// That thread holds the loop while it runs jobs: a loop whose tasks outlive it is freed
/// (and its fds closed) when they end, not when `shutdownAndWait` returns.
final class OrphanJobs: @unchecked Sendable {
    private let lock = Lock()
    private var incoming: [LoopJob] = []
    private var draining = false
    /// Until `run()` has handed over what it still had (`release`), jobs only queue: no
    /// job may run here while the loop thread still runs its last ones.
    private var held = true
    /// The pthread_t of the thread running the jobs now, 0 when none (`isCurrentThread`).
    private let runner = Atomic<UInt>(0)
    /// Threads started here that still hold the loop (tests wait for 0).
    private let threadsHoldingTheLoop = Atomic<Int>(0)

    /// True on the thread running the orphaned jobs: an actor pinned to the finished
    /// loop is isolated there.
    var isCurrentThread: Bool {
        let id = runner.load(ordering: .relaxed)
        return id != 0 && pthread_t(id) == pthread_self()
    }

    /// No thread of this loop's orphaned jobs is running or holds the loop.
    var isIdle: Bool { threadsHoldingTheLoop.load(ordering: .acquiring) == 0 }

    /// Jobs the queue holds without growing: for tests that check it stays bounded while
    /// jobs keep coming.
    var capacity: Int { lock.withLock { incoming.capacity } }

    /// Queues `jobs` and starts a thread for them unless one is running (or `run()` has
    /// not released the queue yet).
    func adopt(_ jobs: [LoopJob], of loop: EventLoop) {
        queue(jobs, of: loop, releasing: false)
    }

    /// Called once by `run()` as it returns, with the jobs the loop thread did not run:
    /// from now on queued jobs run here.
    func release(_ jobs: [LoopJob], of loop: EventLoop) {
        queue(jobs, of: loop, releasing: true)
    }

    private func queue(_ jobs: [LoopJob], of loop: EventLoop, releasing: Bool) {
        let start = lock.withLock {
            incoming.append(contentsOf: jobs)
            if releasing { held = false }
            if held || draining || incoming.isEmpty { return false }
            draining = true
            return true
        }
        if start { startThread(loop) }
    }

    private func startThread(_ loop: EventLoop) {
        threadsHoldingTheLoop.add(1, ordering: .relaxed)
        let context = Unmanaged.passRetained(loop).toOpaque()
        var thread = pthread_t()
        let rc = pthread_create(&thread, nil, { raw in
            let orphans: OrphanJobs = {
                let loop = Unmanaged<EventLoop>.fromOpaque(raw!).takeRetainedValue()
                _ = plexus_set_thread_name("plexus-orphans")
                loop.orphans.drain(loop)
                return loop.orphans
            }()
            // The loop is released above; only now is this thread done with it.
            orphans.threadsHoldingTheLoop.subtract(1, ordering: .releasing)
            return nil
        }, context)
        if rc == 0 {
            pthread_detach(thread)
        } else {
            // No thread to be had: run them on this one rather than never.
            Unmanaged<EventLoop>.fromOpaque(context).release()
            drain(loop)
            threadsHoldingTheLoop.subtract(1, ordering: .releasing)
        }
    }

    /// Runs queued jobs until none is left; the jobs they enqueue on the loop come here
    /// too. Takes them a batch at a time, swapping two arrays, so a stream of jobs that
    /// never lets the queue run empty (an actor and a task calling each other) keeps it
    /// at the size of one batch.
    private func drain(_ loop: EventLoop) {
        runner.store(UInt(pthread_self()), ordering: .relaxed)
        var batch: [LoopJob] = []
        while true {
            let more = lock.withLock {
                guard !incoming.isEmpty else {
                    draining = false
                    runner.store(0, ordering: .relaxed)
                    return false
                }
                swap(&incoming, &batch)
                return true
            }
            guard more else { return }
            for job in batch { loop.runTask(job) }
            batch.removeAll(keepingCapacity: true)
        }
    }
}
