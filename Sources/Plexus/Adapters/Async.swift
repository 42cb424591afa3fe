import CPlexus
import Glibc
import Synchronization
import SystemPackage

/// Bytes moved by an operation, and the buffer handed back (no copy).
public struct Transfer: ~Copyable, Sendable {
    /// Bytes read or written.
    public let count: Int
    /// The buffer: reads appended to it, writes consumed from it.
    public var buffer: IOBuffer

    /// Takes the buffer out.
    public consuming func takeBuffer() -> IOBuffer { buffer }
}

/// Bytes moved by a readv or writev, and the vector handed back.
public struct VectorTransfer: ~Copyable, Sendable {
    public let count: Int
    public var vector: IOVector
    public consuming func takeVector() -> IOVector { vector }
}

/// Bytes moved by a sendmsg or recvmsg, and the message handed back (with the sender's
/// address after a receive).
public struct MessageTransfer: ~Copyable, Sendable {
    public let count: Int
    public var message: Message
    public consuming func takeMessage() -> Message { message }
}

/// What an awaited operation ended with.
struct AsyncOutcome: ~Copyable {
    let result: Int32
    let kind: OperationKind
    var operation: Operation?
    let cancelled: Bool
    var timedOut = false

    /// The result, or the error: `CancellationError` when the task was cancelled and the
    /// operation ended cancelled; ETIMEDOUT when the deadline cancelled it; a
    /// `PlexusError` naming the operation otherwise.
    func check() throws -> Int {
        if result >= 0 { return Int(result) }
        if cancelled && result == -ECANCELED { throw CancellationError() }
        if timedOut && result == -ECANCELED {
            throw PlexusError(operation: kind.rawValue, errno: .timedOut, message: "the deadline passed before it completed")
        }
        throw PlexusError(kind, result: result)
    }
}

/// The async/await adapter: every operation as an `async throws` function.
///
/// The functions are `nonisolated(nonsending)`: they start on the caller's executor
/// instead of switching to the generic one first, which saved 3 of the 9 executor
/// switches per awaited NOP (about 7% of its time; plexus-bench nop-1 async); the
/// runtime's cancellation record instead of `withTaskCancellationHandler` (`suspend`)
/// saved 2 more: 3 per awaited operation now.
///
/// An operation whose result is there at once (`IOBackend.attempt`) returns without
/// suspending, at most `inlineCompletionsPerTask` times in a row per task and
/// `inlineCompletionsPerTurn` times per loop turn. A deadline from
/// `withDeadline` is the backend's own (`IOBackend.prepare(_:deadline:)`).
///
/// The awaiting code runs on the loop thread: directly when the task's executor is
/// the loop (`Task(executorPreference: loop)`: no thread hop, no allocation), else by
/// switching to it for the duration of the call. Cancelling the task cancels the
/// operation in the kernel; the call returns only after the operation's own completion
/// arrived, so the kernel never touches a buffer after it was handed back. An operation
/// that finished before the cancel took effect returns its result.
extension EventLoop {
    /// Submits `operation` and suspends until its final completion.
    ///
    /// Inlined into each public operation: an async function that is called gets its own
    /// frame from the task allocator (about 80 instructions to allocate and free, callgrind),
    /// so the work around the one suspension point is in synchronous functions
    /// (`startAwaited`, `finishAwaited`) and only the suspension stays here.
    @inline(__always)
    nonisolated(nonsending) func perform(_ operation: consuming Operation) async -> AsyncOutcome {
        if !inLoop { return await performOffLoop(operation) }
        switch startAwaited(operation) {
        case .finished(let outcome):
            return outcome
        case .suspended(let index, let token, let deadlineTimer):
            await suspend(until: index, token: token)
            return finishAwaited(index, deadlineTimer: deadlineTimer)
        }
    }

    /// `perform` from off the loop thread: moves to the loop for the call.
    @inline(never)
    nonisolated(nonsending) private func performOffLoop(_ operation: consuming Operation) async -> AsyncOutcome {
        // A loop shutting down takes no new work: end the call here, buffer included. A
        // close is never cancelled: the draining loop still runs it, and once `run()` has
        // returned nothing is pending on the fd, so close(2) runs here.
        if isShuttingDown {
            guard operation.kind == .close, let fd = operation.fileDescriptor else {
                return AsyncOutcome(result: -ECANCELED, kind: operation.kind, operation: operation, cancelled: false)
            }
            if hasFinished {
                let result = Sys.close(fd.rawValue)
                return AsyncOutcome(result: result, kind: .close, operation: operation, cancelled: false)
            }
        }
        // Move to the loop thread for the call; the box is the price of the hop.
        let box = OperationBox(operation)
        let (result, kind, cancelled, timedOut) = await withTaskExecutorPreference(self) {
            var outcome = await self.perform(box.take())
            box.put(outcome.operation.take())
            return (outcome.result, outcome.kind, outcome.cancelled, outcome.timedOut)
        }
        return AsyncOutcome(result: result, kind: kind, operation: box.takeIfAny(), cancelled: cancelled,
                            timedOut: timedOut)
    }

    /// How `startAwaited` left an awaited operation.
    enum AsyncStart: ~Copyable {
        /// Its result was there at once: no suspension.
        case finished(AsyncOutcome)
        /// Submitted under async slot `index`; the task suspends until the loop resumes it.
        case suspended(index: Int, token: Token, deadlineTimer: TimerHandle?)
    }

    /// On the loop thread: finishes `operation` at once when it can, or submits it.
    @inline(never)
    private func startAwaited(_ operation: consuming Operation) -> AsyncStart {
        var index = -1
        let token: Token
        // A deadline from withDeadline: the backend's own (a linked IORING_OP_LINK_TIMEOUT
        // on io_uring, the timer heap on epoll and poll), or a loop timer for the kinds
        // that take none.
        var deadlineTimer: TimerHandle?
        if EventLoop.deadlinesInUse.load(ordering: .relaxed), let deadline = EventLoop.currentDeadline {
            let slot = asyncSlots.allocate()
            index = slot
            if operation.kind.takesDeadline {
                token = submit(operation, .resume(slot), deadline: deadline)
            } else {
                token = submit(operation, .resume(slot))
                deadlineTimer = schedule(at: deadline) { [self] event in
                    guard event == .fired, !asyncSlots.slot(slot).pointee.done else { return }
                    asyncSlots.slot(slot).pointee.timedOut = true
                    cancel(token, discardingDescriptors: false)
                }
            }
        } else if inlineBudget > 0 && mayFinishInline() {
            // The fast path: a result that is there at once returns without suspending,
            // and takes no async slot.
            switch attempt(operation, orRegister: { index = asyncSlots.allocate(); return .resume(index) }) {
            case .completed(var completion):
                inlineBudget -= 1
                inlineStreak += 1
                return .finished(AsyncOutcome(result: completion.result, kind: completion.kind,
                                              operation: completion.operation.take(), cancelled: false))
            case .prepared(let prepared):
                token = prepared
                inlineStreak = 0  // it suspends: its run ends here
            }
        } else {
            index = asyncSlots.allocate()
            token = submit(operation, .resume(index))
        }
        return .suspended(index: index, token: token, deadlineTimer: deadlineTimer)
    }

    /// On the loop thread, after the resume: the outcome of slot `index`, which is freed.
    @inline(never)
    private func finishAwaited(_ index: Int, deadlineTimer: TimerHandle?) -> AsyncOutcome {
        if let deadlineTimer { timers.discard(deadlineTimer) }
        let waiter = asyncSlots.slot(index)
        let outcome = AsyncOutcome(result: waiter.pointee.result, kind: waiter.pointee.kind,
                                   operation: waiter.pointee.operation.take(), cancelled: Task.isCancelled,
                                   timedOut: waiter.pointee.timedOut)
        asyncSlots.free(index)
        return outcome
    }

    /// False when the current task has finished `inlineCompletionsPerTask` operations
    /// in a row without suspending: this one suspends (and the run starts again).
    ///
    /// A cancelled task is not asked about: an operation that can finish at once finishes
    /// before a cancel could reach it on the slow path too (the cancel is prepared after
    /// it), and one that parks suspends with the cancellation record, which cancels it.
    @inline(__always)
    private func mayFinishInline() -> Bool {
        let task = plexus_current_task()
        if task != inlineTask {
            inlineTask = task
            inlineStreak = 0
            return true
        }
        if inlineStreak < Self.inlineCompletionsPerTask { return true }
        inlineStreak = 0
        return false
    }

    /// Parks the task until the loop resumes slot `index`; cancelling the task meanwhile
    /// cancels `token`'s operation.
    ///
    /// The cancellation handler is the runtime's own record (CShims:
    /// swift_task_addCancellationHandler, what `withTaskCancellationHandler` is built on),
    /// not `withTaskCancellationHandler` itself: that one is an opaque function with an
    /// isolation parameter, and its closure nesting cost two executor switches per awaited
    /// operation (5 instead of 3) and about 12% of an awaited NOP (plexus-bench nop-1
    /// async, io_uring: 995 -> 883 ns). The record's context is the slot, whose address
    /// never changes while the task is parked.
    @inline(__always)
    nonisolated(nonsending) private func suspend(until index: Int, token: Token) async {
        let waiter = asyncSlots.slot(index)
        waiter.pointee.token = token
        waiter.pointee.loop = self
        let record = plexus_task_add_cancellation_handler(UnsafeMutableRawPointer(waiter))
        await withUnsafeContinuation { (continuation: UnsafeContinuation<Void, Never>) in
            if waiter.pointee.done {
                continuation.resume()
            } else {
                waiter.pointee.continuation = continuation
            }
        }
        plexus_task_remove_cancellation_handler(record)
    }

    /// Cancels an awaited operation from its task's cancellation handler: any thread, so
    /// off the loop it hops there. The token's generation keeps a late cancel harmless.
    /// An fd the operation produced before the cancel took effect (an accept, an open) is
    /// returned to the task, as any result that came first: it is the task's to close.
    func cancelAwaited(_ token: Token) {
        if inLoop {
            cancel(token, discardingDescriptors: false)
        } else {
            _ = remote.push(.closure { self.cancel(token, discardingDescriptors: false) })
            wakeForRemoteJob()
        }
    }

    /// The deadline `withDeadline` set for the operations of the current task.
    @TaskLocal static var currentDeadline: Deadline?

    /// False until the first `withDeadline` in this process: until then no task can have
    /// a deadline, and `perform` skips the task-local lookup (two per ping-pong round
    /// trip, about 80 instructions each). Set before the task-local, so a task that has
    /// one always sees it (the store happens on the same task before its operations).
    static let deadlinesInUse = Atomic<Bool>(false)

    /// Runs `body` with a deadline for every operation it awaits on a loop: an operation
    /// still pending at `deadline` is cancelled and throws a `PlexusError` with ETIMEDOUT.
    /// The backend enforces it (`IOBackend.prepare(_:deadline:)`: a linked
    /// IORING_OP_LINK_TIMEOUT on io_uring, the timer heap on epoll and poll); kinds that
    /// take no deadline there (`OperationKind.takesDeadline`) get a loop timer.
    public func withDeadline<R>(_ deadline: Deadline, _ body: () async throws -> R) async throws -> R {
        EventLoop.deadlinesInUse.store(true, ordering: .relaxed)
        let outer = EventLoop.currentDeadline
        return try await EventLoop.$currentDeadline.withValue(min(deadline, outer ?? deadline)) { try await body() }
    }

    /// For a sequence's waiting `next()` (`connections`, `receives`), which no single
    /// operation covers: a loop timer that calls `fire` at the deadline `withDeadline` set
    /// for the current task, if any; ETIMEDOUT for `kind` now if it has passed.
    func timerForCurrentDeadline(_ kind: OperationKind, _ fire: @escaping () -> Void) throws(PlexusError) -> TimerHandle? {
        guard Self.deadlinesInUse.load(ordering: .relaxed), let deadline = Self.currentDeadline else { return nil }
        if Deadline.now >= deadline { throw PlexusError(kind, result: -ETIMEDOUT) }
        return schedule(at: deadline) { event in if event == .fired { fire() } }
    }

    /// `withDeadline(.now + timeout, body)`.
    public func withTimeout<R>(_ timeout: Duration, _ body: () async throws -> R) async throws -> R {
        try await withDeadline(Deadline.now + timeout, body)
    }

    /// IORING_OP_NOP.
    nonisolated(nonsending) public func nop() async throws -> Int {
        try await perform(.nop).check()
    }

    /// read(2)/pread(2) into `buffer`'s spare capacity.
    nonisolated(nonsending) public func read(_ fd: FileDescriptor, into buffer: consuming IOBuffer, offset: Int64? = nil) async throws -> Transfer {
        try await transfer(perform(.read(fd, buffer, offset: offset)))
    }

    /// write(2)/pwrite(2) of `buffer`'s readable bytes (consumed as written).
    nonisolated(nonsending) public func write(_ fd: FileDescriptor, _ buffer: consuming IOBuffer, offset: Int64? = nil) async throws -> Transfer {
        try await transfer(perform(.write(fd, buffer, offset: offset)))
    }

    /// Writes every readable byte of `buffer`, resubmitting after short writes. An error
    /// part-way is thrown and the unwritten rest goes with the buffer: how much was
    /// written is then unknown. Call `write` in a loop to keep it.
    nonisolated(nonsending) public func writeAll(_ fd: FileDescriptor, _ buffer: consuming IOBuffer, offset: Int64? = nil) async throws -> IOBuffer {
        var buffer = buffer
        var position = offset
        while !buffer.isEmpty {
            let done = try await write(fd, buffer, offset: position)
            if let p = position { position = p + Int64(done.count) }
            buffer = done.takeBuffer()
        }
        return buffer
    }

    /// readv(2)/preadv(2).
    nonisolated(nonsending) public func readv(_ fd: FileDescriptor, into vector: consuming IOVector, offset: Int64? = nil) async throws -> VectorTransfer {
        var outcome = await perform(.readv(fd, vector, offset: offset))
        let n = try outcome.check()
        return VectorTransfer(count: n, vector: outcome.operation.take()!.takeVector()!)
    }

    /// writev(2)/pwritev(2).
    nonisolated(nonsending) public func writev(_ fd: FileDescriptor, _ vector: consuming IOVector, offset: Int64? = nil) async throws -> VectorTransfer {
        var outcome = await perform(.writev(fd, vector, offset: offset))
        let n = try outcome.check()
        return VectorTransfer(count: n, vector: outcome.operation.take()!.takeVector()!)
    }

    /// send(2) with MSG_NOSIGNAL.
    nonisolated(nonsending) public func send(_ fd: FileDescriptor, _ buffer: consuming IOBuffer, flags: Int32 = 0) async throws -> Transfer {
        try await transfer(perform(.send(fd, buffer, flags: flags)))
    }

    /// recv(2).
    nonisolated(nonsending) public func recv(_ fd: FileDescriptor, into buffer: consuming IOBuffer, flags: Int32 = 0) async throws -> Transfer {
        try await transfer(perform(.recv(fd, buffer, flags: flags)))
    }

    /// sendmsg(2).
    nonisolated(nonsending) public func sendMessage(_ fd: FileDescriptor, _ message: consuming Message, flags: Int32 = 0) async throws -> MessageTransfer {
        var outcome = await perform(.sendMessage(fd, message, flags: flags))
        let n = try outcome.check()
        return MessageTransfer(count: n, message: outcome.operation.take()!.takeMessage()!)
    }

    /// recvmsg(2); the message comes back with the sender's address.
    nonisolated(nonsending) public func receiveMessage(_ fd: FileDescriptor, _ message: consuming Message, flags: Int32 = 0) async throws -> MessageTransfer {
        var outcome = await perform(.receiveMessage(fd, message, flags: flags))
        let n = try outcome.check()
        return MessageTransfer(count: n, message: outcome.operation.take()!.takeMessage()!)
    }

    /// accept4(2): the next connection (CLOEXEC, non-blocking).
    nonisolated(nonsending) public func accept(_ fd: FileDescriptor) async throws -> FileDescriptor {
        FileDescriptor(rawValue: Int32(try await perform(.accept(fd)).check()))
    }

    /// connect(2).
    nonisolated(nonsending) public func connect(_ fd: FileDescriptor, to address: SocketAddress) async throws {
        _ = try await perform(.connect(fd, address)).check()
    }

    /// Waits until `fd` is ready for `events`; returns the ready events.
    nonisolated(nonsending) public func poll(_ fd: FileDescriptor, _ events: PollEvents) async throws -> PollEvents {
        PollEvents(rawValue: UInt32(try await perform(.poll(fd, events)).check()))
    }

    /// Cancels the fd's pending operations, then close(2).
    nonisolated(nonsending) public func close(_ fd: FileDescriptor) async throws {
        _ = try await perform(.close(fd)).check()
    }

    /// openat(2) with O_CLOEXEC.
    nonisolated(nonsending) public func open(_ path: FilePath, flags: Int32, mode: mode_t = 0o644, directory: FileDescriptor? = nil) async throws -> FileDescriptor {
        FileDescriptor(rawValue: Int32(try await perform(.open(path, flags: flags, mode: mode, directory: directory)).check()))
    }

    /// fsync(2) or fdatasync(2).
    nonisolated(nonsending) public func fsync(_ fd: FileDescriptor, dataOnly: Bool = false) async throws {
        _ = try await perform(.fsync(fd, dataOnly: dataOnly)).check()
    }

    /// shutdown(2).
    nonisolated(nonsending) public func shutdown(_ fd: FileDescriptor, how: Int32) async throws {
        _ = try await perform(.shutdown(fd, how: how)).check()
    }

    /// Suspends for `duration` (a timeout operation); throws `CancellationError` if the
    /// task is cancelled first.
    nonisolated(nonsending) public func sleep(for duration: Duration) async throws {
        _ = try await perform(.timeout(duration)).check()
    }

    /// Suspends until `deadline` (CLOCK_MONOTONIC).
    nonisolated(nonsending) public func sleep(until deadline: Deadline) async throws {
        _ = try await perform(.deadline(deadline)).check()
    }

    private func transfer(_ outcome: consuming AsyncOutcome) throws -> Transfer {
        var outcome = outcome
        let n = try outcome.check()
        return Transfer(count: n, buffer: outcome.operation.take()!.takeBuffer()!)
    }
}

/// Carries an operation across the hop to the loop thread.
final class OperationBox: @unchecked Sendable {
    private var operation: Operation?
    init(_ operation: consuming Operation) { self.operation = .some(operation) }
    func take() -> Operation { operation.take()! }
    func takeIfAny() -> Operation? { operation.take() }
    func put(_ operation: consuming Operation?) { self.operation = operation }
}
