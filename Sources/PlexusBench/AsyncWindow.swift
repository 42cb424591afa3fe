import Plexus

// How the async bodies are measured. The timed window runs inside the loop, as a user's
// async code would: `runWindow` creates one `Task(executorPreference: loop)` and runs the
// loop on the benchmark thread (`loop.run()`) until that task shuts it down. Inside it,
// `workers` tasks (the first is the task itself, the others children of a task group on
// the same executor) each await `work(worker, times:)` in a loop:
//
// - worker 0 is the timekeeper: it does what the stepped runner does (warm-up, which
//   also sizes the stride; then one clock pair per `stride` calls on average, at jittered
//   gaps (`SamplingGaps`), a latency sample per timed call, the deadline checked on
//   timed calls) and moves the phase from warm-up to
//   timed to stop, snapshotting the workload's count of completed operations and the
//   malloc counter at the window's edges;
// - the other workers run until the phase is stop (all of them run on the loop thread:
//   plain variables, no atomics). Their operations are counted as each completes, by the
//   workload (`completedOperations`), not as each `work` call returns: a call does
//   `workerBatch` units, and echo-50's 49 other clients, in step with each other, took
//   ~33 ms a call, so a window counted whole calls only (a 30 ms window: the timekeeper's
//   requests alone, 1.9k/s of 96k/s; 60 ms: 54k/s).
// - `helpers` tasks (echo servers) run until `workersDone` makes them return.
//
// Tasks are created before the window opens; the window holds only awaits on the loop.
// `work` and the timekeeper are `nonisolated(nonsending)`, as loop-pinned code should be
// written: they run on the caller's executor, so returning from them is no executor switch
// (each `swift_task_switch` looks up the task's executor preference under the task's
// status lock; a plain nonisolated async function costs one more per await).
//
// The loop over the operations is in each workload's own (concrete) `work(_:times:)`, not
// here: Swift 6.3 follows every await of a `nonisolated(nonsending)` protocol requirement
// made from generic code with a `swift_task_switch` back to the caller's isolation, even
// once specialized and inlined, and that switch takes the status lock. With one `work`
// call per operation from this generic class, every async row paid it: nop-32 on epoll
// 86-92 ns per NOP against 61-67 ns for the same 32 tasks written concretely (/tmp
// experiment: a generic runner 86-90 ns, the same loop in the concrete type 62-66 ns).
// A loop-pinned user's code calls concrete types; the timekeeper's timed calls do one
// operation each and still pay it, once per sampling stride.

/// What an async window runs on: a task executor whose thread is the benchmark thread
/// while `run` runs, until `shutdown`. An `EventLoop`, or the floor's bare executor
/// (`FloorExecutor`).
protocol WindowExecutor: TaskExecutor {
    func run()
    func shutdown()
}

extension EventLoop: WindowExecutor {}

/// An async benchmark body, driven by `AsyncWindow`. Everything runs on the loop thread.
protocol AsyncWorkload: AnyObject, Sendable {
    associatedtype Executor: WindowExecutor
    var loop: Executor { get }
    /// Tasks calling `work`, each with its own index.
    var workers: Int { get }
    /// Tasks calling `help` once (servers), beside the workers.
    var helpers: Int { get }
    /// True when the workload records its own latency samples (per request).
    var recordsOwnLatency: Bool { get }
    /// `times` units of work for `worker`, each awaiting the adapter and checking its
    /// result (the window counts them through `completedOperations`). With a sampler, the
    /// first unit's latency is recorded in it, timed around that unit alone. The loop
    /// belongs in the concrete type (see the top of this file).
    nonisolated(nonsending) func work(_ worker: Int, times: Int, timing sampler: LatencySampler?) async throws
    /// A helper task's whole life; returns once `workersDone` asked it to.
    func help(_ helper: Int) async throws
    /// Operations completed so far by every worker, counted as each completes (the window
    /// reads it at its edges).
    var completedOperations: Int { get }
    /// Called on the loop once every worker returned: make the helpers return.
    func workersDone()
    /// After the loop stopped: checks every operation completed exactly once, right.
    func check() throws
    /// Closes fds.
    func close()
}

extension AsyncWorkload {
    var helpers: Int { 0 }
    var recordsOwnLatency: Bool { false }
    func help(_ helper: Int) async throws {}
    func workersDone() {}
}

/// The runner's handle on an `AsyncWindow`: closures made where the workload's type is
/// known, so the window's code is specialized for it. Called through `WindowBody`'s
/// witness table, a generic class's methods run unspecialized: every `work` call went
/// through a protocol witness thunk (one more task frame per operation) and was followed
/// by a `swift_task_switch`, which for a task with an executor preference takes the
/// task's status-record lock (callgrind, async file-qd32: ~3 task allocations and one
/// switch per read). A user's loop-pinned code calls concrete types and pays neither.
final class SpecializedWindow: WindowBody {
    private let run: (Duration, Duration, LatencySampler) throws -> WindowFigures
    private let end: () throws -> Void

    @inline(__always)
    init<W: AsyncWorkload>(_ workload: W) {
        let window = AsyncWindow(workload)
        run = { try window.runWindow(duration: $0, warmup: $1, sampler: $2) }
        end = { try window.finish() }
    }

    func runWindow(duration: Duration, warmup: Duration, sampler: LatencySampler) throws -> WindowFigures {
        try run(duration, warmup, sampler)
    }

    func finish() throws { try end() }
}

/// Runs an `AsyncWorkload`'s window inside a task on its loop.
final class AsyncWindow<W: AsyncWorkload>: @unchecked Sendable {
    enum Phase { case warmup, timed, stop }

    let workload: W
    var phase = Phase.warmup
    var running = 0
    var failure: (any Error)?
    var figures: WindowFigures?
    var ran = false
    /// The runner's sampler, handed to the task through this object (used only on the loop thread while it runs).
    var sampler: LatencySampler?

    init(_ workload: W) { self.workload = workload }

    func runWindow(duration: Duration, warmup: Duration, sampler: LatencySampler) throws -> WindowFigures {
        let loop = workload.loop
        let durationNS = UInt64(duration.nanosecondsForBench)
        let warmupNS = UInt64(warmup.nanosecondsForBench)
        ran = true
        self.sampler = sampler
        defer { self.sampler = nil }
        Task(executorPreference: loop) { [self] in
            await drive(warmup: warmupNS, duration: durationNS, sampler: self.sampler!)
            loop.shutdown()
        }
        loop.run()  // returns when the task above has shut the loop down
        if let failure { throw failure }
        guard let figures else { throw BenchmarkError.wrong("the timed window did not end") }
        return figures
    }

    private func fail(_ error: any Error) {
        if failure == nil { failure = error }
        phase = .stop
    }

    private func drive(warmup: UInt64, duration: UInt64, sampler: LatencySampler) async {
        let loop = workload.loop
        running = workload.workers
        await withDiscardingTaskGroup { group in
            for h in 0..<workload.helpers {
                group.addTask(executorPreference: loop) { [self] in
                    do { try await workload.help(h) } catch { fail(error) }
                }
            }
            for w in 1..<max(1, workload.workers) {
                group.addTask(executorPreference: loop) { [self] in await worker(w) }
            }
            do { try await timekeeper(warmup: warmup, duration: duration, sampler: sampler) } catch { fail(error) }
            phase = .stop
            workerReturned()
        }
    }

    /// Workers 1...: their loop in a `nonisolated(nonsending)` function, as loop-pinned
    /// code should be written. Awaited in the task's own closure, every `work` call
    /// returned to a nonisolated context: a `swift_task_switch` per operation, which for a
    /// task with an executor preference takes the task's status-record lock (~250
    /// instructions per operation, callgrind file-qd32).
    nonisolated(nonsending) private func worker(_ w: Int) async {
        do {
            while phase != .stop { try await workload.work(w, times: Self.workerBatch, timing: nil) }
        } catch { fail(error) }
        workerReturned()
    }

    /// Units a worker does between looks at the phase: after the window closes it may do
    /// up to this many more (uncounted: the window's end is read before).
    static var workerBatch: Int { 64 }

    private func workerReturned() {
        running -= 1
        if running == 0 { workload.workersDone() }
    }

    /// Worker 0: the runner's loop, awaited on the loop thread.
    nonisolated(nonsending) private func timekeeper(warmup: UInt64, duration: UInt64, sampler: LatencySampler) async throws {
        let warmupStart = monotonicNanoseconds()
        var now = warmupStart
        var warmupCalls = 0
        repeat {
            try await workload.work(0, times: 1, timing: nil)
            warmupCalls += 1
            now = monotonicNanoseconds()
        } while (now < warmupStart &+ warmup || warmupCalls < 3) && phase != .stop
        let callNanoseconds = max(1, (now - warmupStart) / UInt64(warmupCalls))
        var gaps = SamplingGaps(stride: timingStride(callNanoseconds: callNanoseconds))
        let timeCalls = !workload.recordsOwnLatency

        sampler.reset()
        sampler.enabled = true
        phase = .timed
        let operationsBefore = workload.completedOperations
        let allocationsBefore = MallocCounter.count
        let start = monotonicNanoseconds()
        let deadline = start &+ duration
        var end = start
        while phase != .stop {
            // One timed unit, then a jittered gap (one stride on average) in one call.
            try await workload.work(0, times: 1, timing: timeCalls ? sampler : nil)
            let now = monotonicNanoseconds()
            if now >= deadline {
                end = now
                break
            }
            let untimed = gaps.next()
            if untimed > 0 { try await workload.work(0, times: untimed, timing: nil) }
        }
        let allocations = MallocCounter.count &- allocationsBefore
        let operations = workload.completedOperations &- operationsBefore
        sampler.enabled = false
        figures = WindowFigures(operations: operations, nanoseconds: end &- start, allocations: allocations)
    }

    func finish() throws {
        let loop = workload.loop
        if !ran { loop.shutdown(); loop.run() }  // set up but never run: stop it cleanly
        workload.close()
        if let failure { throw failure }
        try workload.check()
    }
}
