import CPlexus
import Glibc
import Synchronization
import SystemPackage

/// One thread, one backend: the event loop.
///
/// Operations are submitted on the loop thread (from callbacks, or from other threads
/// through `execute`), their callbacks run on the loop thread, timers live in a heap,
/// and `shutdown` completes every pending operation and timer exactly once before the
/// loop thread returns from `run`.
///
/// Thread-safety: `execute`, `shutdown`, `shutdownAndWait`, `inLoop`, `isShuttingDown`,
/// `backendKind` and `selection` may be called from any thread; everything else belongs to the loop thread and checks it.
public final class EventLoop: @unchecked Sendable {
    /// The backend, used only on the loop thread.
    let backend: any PreparesBufferOperations
    /// How the backend was chosen (and why io_uring was not, under `auto`).
    public let selection: BackendSelectionInfo
    /// Called on the loop thread with every error a callback threw; the loop keeps running.
    public var errorHandler: @Sendable (CallbackError) -> Void

    let handlers = HandlerTable()
    let timers = TimerQueue()
    let remote = RemoteQueue()
    /// Swift tasks enqueued on the loop by the loop thread itself (resumed continuations).
    @exclusivity(unchecked) var localJobs: [LoopJob] = []
    @exclusivity(unchecked) private var runningJobs: [LoopJob] = []
    /// The face actors see (see EventLoop+Executor.swift); it holds the loop unowned.
    /// Made in `init`, not lazily: actors on any thread ask for it.
    private(set) var serialExecutor: LoopSerialExecutor!
    let asyncSlots = AsyncSlots()
    /// Runs the task jobs that reach the loop after `run()` returned.
    let orphans = OrphanJobs()
    /// 1 from the announcement of a wait (`announceSleep`) until a waker or the loop takes it back, else 0.
    private let sleepState = Atomic<Int>(0)
    private let stopRequested = Atomic<Bool>(false)
    private let wakeFD: Int32
    /// The loop thread's pthread_t (an integer on Linux), 0 when none. Atomic because
    /// `inLoop` reads it from any thread (executor enqueues, cancellation handlers).
    private let loopThreadID = Atomic<UInt>(0)
    @exclusivity(unchecked) private var running = false
    @exclusivity(unchecked) private var stopped = false
    /// Set when `run()` has returned: nobody will wait on the backend again.
    @exclusivity(unchecked) private var finished = false
    /// `finished`, for any thread (`hasFinished`).
    private let finishedForAll = Atomic<Bool>(false)
    @exclusivity(unchecked) private var wakeToken: Token?
    @exclusivity(unchecked) private var shutdownObservers: [any LoopShutdownObserver] = []
    /// The shutdown has told its observers; a later one is told when it registers.
    @exclusivity(unchecked) private var observersTold = false
    /// The backend's `handBackTarget`, kept alive here.
    private var handBackRelay: BufferHandBack!

    /// How another loop's thread wakes this loop when it sleeps: IORING_OP_MSG_RING when
    /// both loops run io_uring, else an eventfd write. MSG_RING is the default because it
    /// measured faster: a message-queue ping-pong between two io_uring loops took 9.7-9.9 us
    /// per round trip (p50) against 11.6-11.9 us with the eventfd (CrossLoopWakeTests,
    /// PLEXUS_BENCH_FULL=1, three runs). Set before other threads use the loop.
    public nonisolated(unsafe) var crossLoopWake: CrossLoopWake = .messageRing

    /// How long `run()` watches for work from other threads before it sleeps when it waits
    /// for nothing else: no operation pending but its own wake-up read, no timer due sooner.
    /// It gives up the CPU (sched_yield) and checks its queue of jobs until one comes or
    /// this much time passed. A message or task handed to the loop meanwhile is taken
    /// without a sleep and a wake-up, which on a virtual machine whose idle vCPUs halt
    /// costs 15-25 us each: plexus-bench mq-pingpong callback, at times when the threads
    /// really slept, went from 52-137k to 380-870k messages/s on io_uring and from
    /// 217-278k to 370-880k on epoll (A/B runs) with 2 us, and mq-handoff callback from
    /// 1.7-2.0M to 2.3-3.0M. A loop with I/O pending does not spin: the spin does not see
    /// I/O, so it would only delay it (async ping-pong was 2x slower with it). A loop pays
    /// at most this much CPU per sleep. `.zero` turns it off. Set before the loop runs.
    public nonisolated(unsafe) var idleSpin: Duration = .microseconds(2)

    /// Creates a loop over the backend `choice` names (by default `PLEXUS_BACKEND`).
    /// The loop runs when a thread calls `run()`; see `EventLoop.startThread`.
    public init(backend choice: BackendChoice? = nil, entries: UInt32 = 256) throws {
        let chosen = try choice ?? BackendChoice.fromEnvironment()
        let selected = try chosen.start(entries: entries)
        backend = selected.started
        selection = BackendSelectionInfo(kind: selected.kind, choice: chosen, fallbackReason: selected.fallbackReason,
                                         capabilities: selected.backend.capabilities)
        wakeFD = eventfd(0, Int32(EFD_CLOEXEC | EFD_NONBLOCK))
        guard wakeFD >= 0 else {
            throw PlexusError(operation: "eventfd", errno: Errno(rawValue: plexus_errno()))
        }
        errorHandler = { error in
            let line = "plexus: unhandled callback error: \(error)\n"
            _ = line.utf8CString.withUnsafeBufferPointer { Glibc.write(2, $0.baseAddress, $0.count - 1) }
        }
        serialExecutor = LoopSerialExecutor(loop: self)
        handBackRelay = LoopHandBack(self)
        backend.handBackTarget = .passUnretained(handBackRelay)
    }

    deinit {
        backend.handBackTarget = nil  // the backend may outlive this (cancelAll in its deinit)
        Glibc.close(wakeFD)
    }

    /// The backend that runs this loop.
    public var backendKind: BackendKind { selection.kind }

    /// True on the loop thread while it runs.
    public var inLoop: Bool {
        let id = loopThreadID.load(ordering: .relaxed)
        // glibc's pthread_equal is `==` on the pthread_t; comparing here saves a call.
        return id != 0 && pthread_t(id) == pthread_self()
    }

    /// Every submit checks it: the cheaper `running` is tested first (a loop driven by
    /// `runOnce` is not `running`, and then the thread is not checked either way).
    @inline(__always)
    func assertInLoop(_ function: StaticString = #function) {
        precondition(!running || inLoop, "\(function) must be called on the loop thread; use execute { } from other threads")
    }

    // MARK: Running

    /// Runs the loop on the calling thread until `shutdown` has completed everything.
    public func run() {
        run(onStart: nil)
    }

    /// `run()`; `onStart` runs on the loop thread once the loop counts as running there,
    /// before its first turn (`startThread` returns then: the thread check holds at once).
    func run(onStart: (() -> Void)?) {
        precondition(!running && !stopped, "run() called twice")
        loopThreadID.store(UInt(pthread_self()), ordering: .relaxed)
        running = true
        runState.store(1, ordering: .releasing)
        onStart?()
        plexus_set_current_loop(Unmanaged.passUnretained(self).toOpaque())
        defer { plexus_set_current_loop(nil) }
        armWake()
        while true {
            inlineBudget = Self.inlineCompletionsPerTurn
            runRemoteJobs()
            fireDueTimers()
            if stopRequested.load(ordering: .acquiring) { break }
            var timeout = nextTimeout()
            if !timeout.isZero, idleSpin.attoseconds > 0, timeout.map({ $0 > idleSpin }) ?? true,
               backend.pendingCount <= (wakeToken == nil ? 0 : 1) {
                spinBeforeSleep()
                timeout = nextTimeout()  // .zero if a job came; else the timers' wait, from now
            }
            wait(timeout: announceSleep(timeout))
            endSleep()
            settleTimers()
        }
        drainForShutdown()
        finished = true
        running = false
        stopped = true
        // From now on no job queued here would run. What came since the shutdown's last
        // drain runs now, still on this thread: a closure accepted before the close, a
        // signal (a message queue's consumer with messages left or its end to announce).
        // Task jobs, those too and any left in `localJobs` (a task that kept yielding past
        // the shutdown's rounds), and every one enqueued from now on (`enqueueOnLoop`)
        // run on another thread, once this one is done (`OrphanJobs.release`).
        var late: [LoopJob] = []
        for job in remote.finish() {
            switch job {
            case .task(let task): late.append(task)
            case .closure(let body): body()
            case .signal(let target): target.loopSignalled()
            }
        }
        late.append(contentsOf: localJobs)
        localJobs.removeAll()
        loopThreadID.store(0, ordering: .relaxed)
        finishedForAll.store(true, ordering: .releasing)
        orphans.release(late, of: self)
        runState.store(2, ordering: .releasing)
        runEnded.signal()
    }

    /// Announces that the loop is about to wait up to `timeout` (unless that is `.zero`),
    /// then looks once more; returns the wait to make. A job queued before the
    /// announcement is seen here (the wait becomes a poll); one queued after it sees the
    /// announcement and wakes the loop (`wakeForRemoteJob`). Both sides are sequentially
    /// consistent: each stores, then loads what the other stored.
    @inline(__always)
    private func announceSleep(_ timeout: Duration?) -> Duration? {
        guard !timeout.isZero else { return timeout }
        sleepState.store(1, ordering: .sequentiallyConsistent)
        if remote.hasJobs || !localJobs.isEmpty || stopRequested.load(ordering: .sequentiallyConsistent) { return .zero }
        return timeout
    }

    /// Awake again. Relaxed: a waker that still reads the announcement only writes one
    /// wake-up too many, which the next wait takes at once; the next announcement is
    /// sequentially consistent again. (A fence per turn saved.)
    @inline(__always)
    private func endSleep() {
        sleepState.store(0, ordering: .relaxed)
    }

    /// Yields the CPU until a job comes from another thread, `shutdown` is called or
    /// `idleSpin` passed. Wakers see no sleep announced yet, so they only queue (no
    /// eventfd write).
    @inline(never)
    private func spinBeforeSleep() {
        let end = Deadline.now.nanoseconds.addingSaturated(idleSpin.nanosecondsClamped)
        while !remote.hasJobs && !stopRequested.load(ordering: .relaxed) {
            sched_yield()
            if Deadline.now.nanoseconds >= end { return }
        }
    }

    /// Runs one turn: remote jobs, due timers, and the backend's ready completions,
    /// waiting at most `timeout`. For tests and for embedding in another loop.
    ///
    /// A callback may turn the loop itself (a nested turn: a helper that pumps the loop
    /// until something completes); every callback, job and message still runs once. A
    /// turn runs the jobs queued so far first, then waits: a pump should check its
    /// condition before each turn and give the turn a timeout when nothing else may come.
    /// Shutdown cancels pending operations only once the callbacks running return, so a
    /// pump inside a `run()` loop should also stop on `isShuttingDown`. On a loop whose
    /// `run()` has returned it does nothing.
    public func runOnce(timeout: Duration? = .zero) {
        precondition(!running || inLoop, "runOnce() must be called on the loop thread: another thread runs this loop; use execute { } from other threads")
        // A loop whose run() has returned has nothing left to turn (whatever reaches it ends
        // at once), and its thread must not become the loop's thread again.
        if hasFinished { return }
        if loopThreadID.load(ordering: .relaxed) == 0 {
            loopThreadID.store(UInt(pthread_self()), ordering: .relaxed)
            armWake()
        }
        inlineBudget = Self.inlineCompletionsPerTurn
        runRemoteJobs()
        fireDueTimers()
        var limit = nextTimeout()
        if let t = timeout, limit == nil || t < limit! { limit = t }
        // Announced as `run()` announces it: a job queued from another thread while this
        // turn waits must wake it. A callback's nested turn waits while `run()` counts as
        // awake (or has had its announcement taken by an earlier job), and a loop driven
        // by `runOnce` never announced one: its wait slept through the job.
        wait(timeout: announceSleep(limit))
        endSleep()
        fireDueTimers()
        settleTimers()
    }

    /// Starts a thread named `name` that runs the loop; returns once it runs. `idleSpin`
    /// sets the loop's `idleSpin`.
    public static func startThread(name: String = "plexus-loop", backend choice: BackendChoice? = nil,
                                   entries: UInt32 = 256, idleSpin: Duration = .microseconds(2)) throws -> EventLoop {
        let loop = try EventLoop(backend: choice, entries: entries)
        loop.idleSpin = idleSpin
        loop.ownThread.store(true, ordering: .relaxed)  // before the thread: it is created after
        let started = Semaphore()
        let context = Unmanaged.passRetained(ThreadStart(loop: loop, name: name, started: started)).toOpaque()
        var thread = pthread_t()
        let rc = pthread_create(&thread, nil, { raw in
            // Every reference to the loop is dropped before `threadFinished` is signalled, so
            // a caller of shutdownAndWait() that drops the last one closes the loop's fds.
            let finished: Semaphore = {
                let start = Unmanaged<ThreadStart>.fromOpaque(raw!).takeRetainedValue()
                _ = plexus_set_thread_name(start.name)
                start.loop.run(onStart: { start.started.signal() })
                return start.loop.threadFinished
            }()
            finished.signal()
            return nil
        }, context)
        guard rc == 0 else {
            Unmanaged<ThreadStart>.fromOpaque(context).release()
            throw PlexusError(operation: "pthread_create", errno: Errno(rawValue: rc))
        }
        pthread_detach(thread)
        started.wait()
        return loop
    }

    let threadFinished = Semaphore()
    /// Started by `startThread`, whose thread signals `threadFinished`.
    private let ownThread = Atomic<Bool>(false)
    /// 0 never run, 1 running, 2 `run()` returned (then `runEnded` is signalled).
    private let runState = Atomic<Int>(0)
    private let runEnded = Semaphore()

    /// Stops the loop: no new remote jobs are accepted, jobs already queued run, every
    /// pending operation completes with -ECANCELED and every timer with `.cancelled`,
    /// then `run` returns. Callable from any thread; returns at once.
    public func shutdown() {
        if stopRequested.exchange(true, ordering: .sequentiallyConsistent) { return }
        remote.close()
        wake()
    }

    /// Shuts the loop down and waits until it is done: for a loop of `startThread`, until its
    /// thread is done (and has dropped the loop); for one a thread of yours runs, until its
    /// `run()` returned. A loop that never ran returns at once (a later `run()` returns at
    /// once too). Not from the loop's own thread (a callback, a task on the loop): it would
    /// wait for itself; call `shutdown()` there.
    public func shutdownAndWait() {
        precondition(!inLoop, "shutdownAndWait() on the loop's own thread would wait for itself forever; call shutdown() there")
        shutdown()
        let done = ownThread.load(ordering: .relaxed) ? threadFinished : runEnded
        if done === runEnded && runState.load(ordering: .acquiring) == 0 { return }
        done.wait()
        done.signal()  // a second caller does not block
    }

    /// Runs `job` on the loop thread, after the jobs queued before it by the same thread.
    /// Returns false (and drops nothing: the job was not taken) once shutdown began.
    @discardableResult
    public func execute(_ job: @escaping @Sendable () -> Void) -> Bool {
        guard remote.push(.closure(job)) else { return false }
        // Wake only a loop that is asleep or about to be: one eventfd write per sleep.
        wakeForRemoteJob()
        return true
    }

    /// Queues `target.loopSignalled()` to run on the loop thread, waking the loop only if
    /// it sleeps. Callable from any thread; allocates nothing once the queue has grown.
    /// False once `run()` has returned: nothing will run it then.
    @discardableResult
    func signal(_ target: any LoopSignalTarget) -> Bool {
        guard remote.push(.signal(target)) else { return false }
        wakeForRemoteJob()
        return true
    }

    // MARK: Submitting

    /// Prepares `operation` with `handler`; the heart of every adapter. With a deadline,
    /// the backend enforces it (`IOBackend.prepare(_:deadline:)`).
    @inline(__always)
    func submit(_ operation: consuming Operation, _ handler: consuming Handler, deadline: Deadline? = nil) -> Token {
        assertInLoop()
        if _slowPath(finished) { return refuse(operation, handler) }
        let token: Token
        if let deadline { token = backend.prepare(operation, deadline: deadline) } else { token = backend.prepare(operation) }
        register(handler, for: token)
        return token
    }

    /// `submit` of the read, write, send or recv (`kind`) of these parts, which the backend
    /// takes apart into its record without an `Operation` in between.
    @inline(__always)
    func submit(_ kind: OperationKind, _ fd: FileDescriptor, _ buffer: consuming IOBuffer, offset: Int64? = nil,
                flags: Int32 = 0, _ handler: consuming Handler) -> Token {
        assertInLoop()
        if _slowPath(finished) { return refuse(Operation(kind, fd, buffer, offset: offset, flags: flags), handler) }
        let token = backend.prepareHandingBack(kind, fd, buffer, offset: offset, flags: flags)
        register(handler, for: token)
        return token
    }

    /// `submit`, or the operation's final completion when the backend finished it at
    /// once (`IOBackend.attempt`). The handler is made (by `handler`) only when it is
    /// needed, when the operation was prepared or is refused: an awaited operation that
    /// finishes at once then takes no async slot.
    @inline(__always)
    func attempt(_ operation: consuming Operation, orRegister handler: () -> Handler) -> Attempt {
        assertInLoop()
        if _slowPath(finished) { return .prepared(refuse(operation, handler())) }
        switch backend.attempt(operation) {
        case .completed(let completion):
            return .completed(completion)
        case .prepared(let token):
            register(handler(), for: token)
            return .prepared(token)
        }
    }

    /// Puts `handler` in the slot of `token`, a freshly prepared operation.
    @inline(__always)
    private func register(_ handler: consuming Handler, for token: Token) {
        let slot = handlers.slot(token.index)
        // The slot's handler is `.none`: the final completion of the slot's last operation
        // moved it out (`dispatch`). Initialized over, not assigned, which would destroy
        // that `.none` through an outlined call, once per operation.
        if case .none = slot.pointee.handler {} else { assertionFailure("slot \(token.index) still has a handler") }
        slot.initialize(to: HandlerSlot(handler: handler, token: token, cancelRequested: false))
    }

    /// Awaited operations one task may finish without suspending, in a row: then it
    /// suspends once, so the other tasks of the loop get their turn (Tokio's per-task
    /// budget of 128 has the same job). Per task, not per turn: 32 tasks reading a cached
    /// file each get a run of inline reads per turn, instead of the first one taking the
    /// turn's whole budget and the other 31 suspending on every read (plexus-bench
    /// file-qd32 async).
    static let inlineCompletionsPerTask = 64
    /// Awaited operations finished without suspending per turn of the loop, all tasks
    /// together: a turn still ends after this many, so timers and the kernel's
    /// completions wait at most that long (about 0.5 ms of 4 KiB cached reads).
    static let inlineCompletionsPerTurn = 1024
    /// What is left of `inlineCompletionsPerTurn` in this turn.
    @exclusivity(unchecked) var inlineBudget = EventLoop.inlineCompletionsPerTurn
    /// The task of the current run of inline completions (an identity, never used as a
    /// pointer), and the run's length so far.
    @exclusivity(unchecked) var inlineTask: UnsafeRawPointer?
    @exclusivity(unchecked) var inlineStreak = 0

    /// The token of operations refused by a finished loop; never a backend's (its index is
    /// past any slab), and `cancel` ignores it.
    static let refusedToken = Token(rawValue: UInt64.max - 1)

    /// `run()` has returned, so nothing would ever complete `operation`: it is not started,
    /// and its handler runs now, on the caller's thread, once, with -ECANCELED and its buffers.
    /// A close is the exception: it is never cancelled (on any backend, shutdown included),
    /// and with no backend left nothing is pending on the fd, so close(2) runs now and its
    /// result is reported: a caller that hands an fd to a finished loop to close leaks none.
    private func refuse(_ operation: consuming Operation, _ handler: consuming Handler) -> Token {
        let kind = operation.kind
        var result = -ECANCELED
        if kind == .close, let fd = operation.fileDescriptor {
            result = Sys.close(fd.rawValue)
        }
        deliver(handler, Completion(token: Self.refusedToken, result: result, flags: [], kind: kind,
                                    operation: operation), result: result)
        return Self.refusedToken
    }

    /// Asks the backend to cancel `token`'s operation. Its callback still runs exactly
    /// once: with -ECANCELED, or with its result if it had already finished; an accept or
    /// open that still produced an fd has that fd closed and reports -ECANCELED.
    public func cancel(_ token: Token) {
        cancel(token, discardingDescriptors: true)
    }

    /// `discardingDescriptors: false` keeps delivering the fds a multishot accept still
    /// yields after the cancel (a stream pausing for backpressure wants every connection).
    func cancel(_ token: Token, discardingDescriptors: Bool) {
        assertInLoop()
        // A token this loop never handed out (another loop's, or made up) may name a slot
        // past the table: looking it up must not grow the table to it.
        if finished || token == Self.refusedToken || token.index >= handlers.capacity { return }
        let slot = handlers.slot(token.index)
        if case .none = slot.pointee.handler { return }
        guard slot.pointee.token == token, !slot.pointee.cancelRequested else { return }
        slot.pointee.cancelRequested = discardingDescriptors
        _ = backend.prepare(.cancel(token))
    }

    /// True once `shutdown` was called.
    public var isShuttingDown: Bool { stopRequested.load(ordering: .acquiring) }

    /// True once `run()` has returned (any thread): no loop thread will run anything of
    /// this loop again, so code that would hop to it runs where it is instead.
    var hasFinished: Bool { finishedForAll.load(ordering: .acquiring) }

    /// Pending operations (the loop's own eventfd read included). Loop thread only (or
    /// after `run` returned): it reads the backend's unsynchronized counter.
    public var pendingOperations: Int {
        assertInLoop()
        return backend.pendingCount
    }
    /// Pending timers. Loop thread only, like `pendingOperations`.
    public var pendingTimers: Int {
        assertInLoop()
        return timers.count
    }

    // MARK: Timers

    /// Calls `callback` with `.fired` after `delay`, or with `.cancelled` (at once when the
    /// loop's `run()` has returned, as for every `schedule`).
    ///
    /// The delay counts from the loop's next clock reading, taken when the callbacks
    /// running now return (or, outside the loop's callbacks, at the start of the next
    /// turn), not from a reading per call: the timer never fires early, and fires later
    /// by what the caller still does before returning to the loop.
    @discardableResult
    public func schedule(after delay: Duration, _ callback: consuming @escaping (TimerEvent) throws -> Void) -> TimerHandle {
        assertInLoop()
        if _slowPath(finished) { return refuse(callback) }
        return timers.schedule(after: delay.nanosecondsClamped, callback)
    }

    /// Calls `callback` with `.fired` at `deadline` (CLOCK_MONOTONIC), or with `.cancelled`.
    @discardableResult
    public func schedule(at deadline: Deadline, _ callback: consuming @escaping (TimerEvent) throws -> Void) -> TimerHandle {
        assertInLoop()
        if _slowPath(finished) { return refuse(callback) }
        return timers.schedule(at: deadline.nanoseconds, interval: 0, callback)
    }

    /// Calls `callback` with `.fired` every `interval` (first after one interval) until cancelled.
    @discardableResult
    public func scheduleRepeating(every interval: Duration, _ callback: consuming @escaping (TimerEvent) throws -> Void) -> TimerHandle {
        assertInLoop()
        if _slowPath(finished) { return refuse(callback) }
        let ns = max(interval.nanosecondsClamped, 1)
        return timers.schedule(at: Deadline.now.nanoseconds.addingSaturated(ns), interval: ns, callback)
    }

    /// `run()` has returned, so nothing would ever fire a timer: its callback runs now, on
    /// the caller's thread, once, with `.cancelled`. The handle names no timer (`cancel`
    /// returns false for it).
    private func refuse(_ callback: consuming @escaping (TimerEvent) throws -> Void) -> TimerHandle {
        invoke(kind: .timeout, token: nil) { try callback(.cancelled) }
        return TimerHandle(index: .max, generation: 0)
    }

    /// Cancels a timer; its callback runs with `.cancelled` (at once, on this thread).
    /// Returns false if it had already ended.
    @discardableResult
    public func cancel(_ timer: TimerHandle) -> Bool {
        assertInLoop()
        guard let callback = timers.cancel(timer) else { return false }
        invoke(kind: .timeout, token: nil) { try callback(.cancelled) }
        return true
    }

    // MARK: The turn

    // The turn's steps check inline whether they have anything to do and call out only
    // when they do: a turn with no timers and no jobs (every NOP of nop-1) paid ~200
    // instructions of prologues, a stack-protector check and calls for nothing.

    @inline(__always)
    private func nextTimeout() -> Duration? {
        if remote.hasJobs || !localJobs.isEmpty { return .zero }
        guard timers.count > 0 else { return nil }
        return nextTimerTimeout()
    }

    @inline(never)
    private func nextTimerTimeout() -> Duration? {
        let now = Deadline.now.nanoseconds
        timers.settle(now: now)
        guard let next = timers.nextDeadline() else { return nil }
        return next <= now ? .zero : .nanoseconds(Int64(clamping: next - now))
    }

    private func wait(timeout: Duration?) {
        do {
            try backend.wait(timeout: timeout) { completion in self.dispatch(completion) }
        } catch {
            errorHandler(CallbackError(operation: "wait", token: nil, error: error))
            // A wait that fails fails again next turn, most likely: pause a millisecond
            // rather than spin a core and flood the error handler.
            var pause = timespec(tv_sec: 0, tv_nsec: 1_000_000)
            _ = nanosleep(&pause, nil)
        }
    }

    @inline(__always)
    private func fireDueTimers() {
        if timers.count > 0 { fireDueTimersNow() }
    }

    @inline(never)
    private func fireDueTimersNow() {
        let now = Deadline.now.nanoseconds
        // Only the timers scheduled before this pass: one that a callback schedules at a
        // deadline already passed fires in the next turn, after jobs and I/O.
        let limit = timers.lastSequence
        timers.settle(now: now)
        while let callback = timers.popDue(now: now, scheduledThrough: limit) {
            invoke(kind: .timeout, token: nil) { try callback(.fired) }
        }
        timers.endPass()
    }

    /// Gives the timers scheduled after a delay since the last clock reading their
    /// deadlines, from a reading taken now (after they were scheduled).
    @inline(__always)
    private func settleTimers() {
        if timers.isUnsettled { settleTimersNow() }
    }

    @inline(never)
    private func settleTimersNow() {
        timers.settle(now: Deadline.now.nanoseconds)
    }

    @inline(__always)
    private func runRemoteJobs() {
        if remote.hasJobs { runRemoteJobsNow() }
        runLocalJobs()
    }

    @inline(never)
    private func runRemoteJobsNow() {
        remote.drain { job in
            switch job {
            case .closure(let body): body()
            case .task(let task): runTask(task)
            case .signal(let target): target.loopSignalled()
            }
        }
    }

    /// Runs the tasks resumed on this thread, and those they resume in turn, a bounded
    /// number of rounds so I/O is not starved.
    @inline(__always)
    private func runLocalJobs() {
        if !localJobs.isEmpty { runLocalJobsNow() }
    }

    /// Each round's jobs are taken into a local array, as `RemoteQueue.drain` does, so a
    /// job that turns the loop itself (a nested `runOnce`) never runs them again.
    @inline(never)
    private func runLocalJobsNow() {
        var rounds = 0
        while !localJobs.isEmpty && rounds < 16 {
            var batch = runningJobs
            runningJobs = []
            swap(&localJobs, &batch)
            for job in batch { runTask(job) }
            batch.removeAll(keepingCapacity: true)
            runningJobs = batch
            rounds += 1
        }
    }

    /// Wakes the loop for a job queued from another thread.
    func wakeForRemoteJob() {
        if sleepState.compareExchange(expected: 1, desired: 0, ordering: .sequentiallyConsistent).exchanged {
            if crossLoopWake == .messageRing, wakeThroughRing() { return }
            wake()
        }
    }

    /// From another io_uring loop's thread: IORING_OP_MSG_RING from that loop's ring to
    /// this one, instead of an eventfd write. False when it does not apply.
    private func wakeThroughRing() -> Bool {
        guard let raw = plexus_current_loop() else { return false }
        let sender = Unmanaged<EventLoop>.fromOpaque(raw).takeUnretainedValue()
        // A ring not yet enabled (created R_DISABLED, before its loop's first wait) would
        // refuse the message with EBADFD on the sender's ring, and the wake-up would be
        // lost: the eventfd then.
        guard sender !== self, let from = sender.backend as? URingBackend,
              let to = backend as? URingBackend, to.takesRingMessages.load(ordering: .acquiring) else { return false }
        return from.postWake(toRing: to.ringFD)
    }

    @inline(__always)
    private func invoke(kind: OperationKind, token: Token?, _ body: () throws -> Void) {
        do { try body() } catch {
            errorHandler(CallbackError(operation: kind.rawValue, token: token, error: error))
        }
    }

    /// Calls the operation's handler in the shape it was registered with.
    private func dispatch(_ completion: consuming Completion) {
        let slot = handlers.slot(completion.token.index)
        let final = completion.isFinal
        var result = completion.result
        let kind = completion.kind
        if _slowPath(slot.pointee.cancelRequested), result >= 0, kind == .accept || kind == .acceptMultishot || kind == .open {
            // The caller no longer wants this fd: never hand it out, never leak it.
            Glibc.close(result)
            result = -ECANCELED
            if !final {
                completion.operation.discard()
                return
            }
        }
        // A final completion moves the handler out (no retain/release of its closure).
        var handler = Handler.none
        if final { swap(&handler, &slot.pointee.handler) } else { handler = slot.pointee.handler }
        deliver(handler, completion, result: result)
    }

    /// Calls the `.buffer` handler of an operation `submit(kind, fd, buffer, ...)` prepared
    /// with the final result and the buffer, which the backend handed back alone.
    func handBack(_ token: Token, _ result: Int32, _ kind: OperationKind, _ buffer: consuming IOBuffer) {
        let slot = handlers.slot(token.index)
        var handler = Handler.none
        swap(&handler, &slot.pointee.handler)
        guard case .buffer(let body) = handler else {
            assertionFailure("a buffer handed back to a \(kind) whose handler is not .buffer")
            return
        }
        do {
            try body(Self.value(result, kind), buffer)
        } catch {
            errorHandler(CallbackError(operation: kind.rawValue, token: token, error: error))
        }
    }

    /// Calls `handler` with `completion`, whose result is `result`, in the shape the
    /// handler was registered with.
    ///
    /// Every path ends the completion's operation explicitly (`discard`, `takeBuffer`, or
    /// handing it on), never by letting it go out of scope: see `Optional<Operation>.discard`.
    @inline(__always)
    private func deliver(_ handler: Handler, _ completion: consuming Completion, result: Int32) {
        let token = completion.token, kind = completion.kind, flags = completion.flags
        do {
            switch handler {
            case .none:
                completion.operation.discard()
            case .wake:
                if completion.isFinal {
                    rearmWake(completion.operation.takeBuffer())
                } else {
                    completion.operation.discard()
                }
            case .resume(let i):
                let waiter = asyncSlots.slot(i)
                // The backend says when its deadline cancelled it (not a close or a cancel).
                if flags.contains(.deadlinePassed) { waiter.pointee.timedOut = true }
                waiter.pointee.result = result
                waiter.pointee.kind = kind
                waiter.pointee.flags = flags
                waiter.pointee.operation = completion.operation
                waiter.pointee.done = true
                waiter.pointee.continuation.take()?.resume()
            case .completion(let body):
                try body(Completion(token: token, result: result, flags: flags, kind: kind,
                                    operation: completion.operation, bufferID: completion.bufferID))
            case .count(let body):
                completion.operation.discard()
                try body(Self.value(result, kind))
            case .buffer(let body):
                try body(Self.value(result, kind), completion.operation.takeBuffer()!)
            case .vector(let body):
                try body(Self.value(result, kind), completion.operation!.takeVector()!)
            case .message(let body):
                try body(Self.value(result, kind), completion.operation!.takeMessage()!)
            case .descriptor(let body):
                completion.operation.discard()
                try body(Self.value(result, kind).map { FileDescriptor(rawValue: Int32($0)) })
            case .done(let body):
                completion.operation.discard()
                try body(Self.value(result, kind).map { _ in () })
            case .events(let body):
                completion.operation.discard()
                try body(Self.value(result, kind).map { PollEvents(rawValue: UInt32($0)) })
            }
        } catch {
            errorHandler(CallbackError(operation: kind.rawValue, token: token, error: error))
        }
    }

    /// A result as the callback shapes take it (`Completion.value`).
    @inline(__always)
    private static func value(_ result: Int32, _ kind: OperationKind) -> Result<Int, PlexusError> {
        result >= 0 ? .success(Int(result)) : .failure(PlexusError(kind, result: result))
    }

    // MARK: Wake-ups

    private func armWake() {
        guard wakeToken == nil else { return }  // runOnce() may have armed it already
        rearmWake(IOBuffer(capacity: 8))
    }

    private func rearmWake(_ buffer: consuming IOBuffer?) {
        wakeToken = nil
        guard !stopped, var buffer = buffer else { return }
        buffer.clear()
        wakeToken = submit(.read(FileDescriptor(rawValue: wakeFD), buffer), .wake)
    }

    private func wake() {
        var one: UInt64 = 1
        _ = Glibc.write(wakeFD, &one, 8)
    }

    // MARK: Shutdown

    /// Calls `observer.loopWillShutDown()` on the loop thread when shutdown begins, after
    /// the jobs queued before it ran and before operations and timers are cancelled.
    func onShutdown(_ observer: any LoopShutdownObserver) {
        assertInLoop()
        // Past the point where observers are told (a job that ran late in the shutdown):
        // this one is told now.
        if observersTold { observer.loopWillShutDown(); return }
        shutdownObservers.append(observer)
    }

    private func drainForShutdown() {
        runRemoteJobs()
        // Until none is left: an observer told may register another (a queue's consumer
        // attaching as a closed queue hands its rest over, or a job a nested turn runs).
        while !shutdownObservers.isEmpty {
            let observers = shutdownObservers
            shutdownObservers.removeAll()
            for observer in observers { observer.loopWillShutDown() }
        }
        observersTold = true
        runRemoteJobs()
        for callback in timers.removeAll() {
            invoke(kind: .timeout, token: nil) { try callback(.cancelled) }
        }
        stopped = true
        // Callbacks may submit again while being cancelled; cancel until nothing is left.
        // Task jobs still queued once no operation or timer is (a task that keeps
        // yielding) are not waited for: `run()` hands them to another thread.
        var rounds = 0
        runLocalJobs()
        while backend.pendingCount > 0 || timers.count > 0 {
            // Start what was accepted first: a close then really closes (a close is never
            // cancelled, on any backend), and everything else is in flight to be cancelled.
            _ = try? backend.submit()
            backend.cancelAll { completion in self.dispatch(completion) }
            runLocalJobs()
            for callback in timers.removeAll() {
                invoke(kind: .timeout, token: nil) { try callback(.cancelled) }
            }
            rounds += 1
            if rounds > 10_000 {
                errorHandler(CallbackError(operation: "shutdown", token: nil,
                                           error: PlexusError(operation: "shutdown", errno: .resourceBusy,
                                                              message: "callbacks keep submitting during shutdown")))
                break
            }
        }
    }
}

/// Hands a backend's buffers to the loop's `handBack`. The loop keeps it, and it holds the
/// loop unmanaged: the backend calls through it without retaining either.
private final class LoopHandBack: BufferHandBack {
    let loop: Unmanaged<EventLoop>
    init(_ loop: EventLoop) { self.loop = .passUnretained(loop) }

    override func handBack(_ token: Token, _ result: Int32, _ kind: OperationKind, _ buffer: consuming IOBuffer) {
        var buffer = Optional(buffer)
        loop._withUnsafeGuaranteedRef { $0.handBack(token, result, kind, buffer.take()!) }
    }
}

/// A component that must finish its work when its loop shuts down (a message queue
/// delivering what is queued); see `EventLoop.onShutdown`.
protocol LoopShutdownObserver: AnyObject {
    func loopWillShutDown()
}

/// How a thread wakes a sleeping loop.
public enum CrossLoopWake: Sendable {
    /// write(2) to the loop's eventfd (every backend, every thread).
    case eventfd
    /// IORING_OP_MSG_RING from the waking loop's ring, when the waker is a loop thread and
    /// both loops run io_uring; otherwise the eventfd.
    case messageRing
}

/// How a loop's backend was chosen.
public struct BackendSelectionInfo: Sendable {
    public let kind: BackendKind
    public let choice: BackendChoice
    /// Why `auto` did not use io_uring, when it did not.
    public let fallbackReason: PlexusError?
    public let capabilities: Capabilities
}

/// An error a callback threw, with the operation that caused it.
public struct CallbackError: Error, Sendable, CustomStringConvertible {
    /// The operation whose callback threw ("read", "timeout", ...).
    public let operation: String
    /// Its token, when it was an I/O operation.
    public let token: Token?
    public let error: any Error

    public var description: String {
        "callback of \(operation)\(token.map { " \($0)" } ?? "") threw: \(error)"
    }
}

private final class ThreadStart: @unchecked Sendable {
    let loop: EventLoop
    let name: String
    let started: Semaphore
    init(loop: EventLoop, name: String, started: Semaphore) {
        self.loop = loop
        self.name = name
        self.started = started
    }
}
