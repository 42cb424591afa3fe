import Glibc

/// How producers wake a message queue's consumer loop. This is the one pluggable piece of
/// the hand-off: everything else (ring, flag, batches) does not care how the loop is woken.
public enum MessageQueueWake: String, Sendable, CaseIterable {
    /// `EventLoop.signal`: the queue object itself goes into the loop's remote-job queue
    /// (no closure, no allocation) and the loop's eventfd is written only if the loop is
    /// asleep or about to sleep. Works from any thread and on every backend.
    case loopSignal
}

/// A bounded multi-producer, single-consumer FIFO between threads and loops that never
/// loses a message.
///
/// - Producers run on any thread. `trySend` never blocks and hands the message back when
///   the queue is full or closed; `send` suspends until there is room (FIFO among the
///   suspended senders) and throws a `SendError` carrying the message if the queue closes
///   (or the sending task is cancelled) first. Each producer's messages arrive in the
///   order it sent them.
/// - The consumer lives on one loop: a callback (`onMessage`, `onBatch`) or
///   `for await message in queue` in a task on that loop. It drains in batches: an idle
///   consumer sleeps in the loop's wait, and producers wake it only on the transition
///   from "nothing pending" to "something pending", so it is woken once per batch.
/// - `close()` stops new sends. Messages already queued are delivered to the consumer,
///   or, when no consumer is attached (never was, stopped, or its loop has shut down),
///   returned to the caller of `close`. Senders still waiting get their message back in
///   the error. Shutting the consumer's loop down closes the queue after delivering what
///   was queued.
/// - Steady state allocates nothing: messages move through a ring preallocated with
///   `capacity` slots, the consumer's batch array is reused, and a wake-up queues this
///   object, not a closure. A pthread mutex guards the ring (one lock per send, one per
///   batch on the consumer side; see `measureHandOff`).
///
/// Messages still queued when the last reference to the queue goes away are destroyed
/// with it: `close()` first to get them back.
public final class MessageQueue<Message: Sendable>: @unchecked Sendable {
    /// What `trySend` did.
    public enum TrySendResult: Sendable {
        case sent
        /// The queue held `capacity` messages; here is yours back.
        case full(Message)
        /// The queue is closed; here is yours back.
        case closed(Message)

        public var isSent: Bool { if case .sent = self { true } else { false } }
    }

    /// Why `send` gave a message back, with the message.
    public struct SendError: Error, Sendable, CustomStringConvertible {
        public enum Reason: Sendable, Equatable {
            /// The queue was closed (by `close()` or by its loop's shutdown) before there was room.
            case closed
            /// The sending task was cancelled while it waited for room.
            case cancelled
        }
        public let reason: Reason
        public let message: Message
        public var description: String { "MessageQueue.send: \(reason == .closed ? "queue closed" : "cancelled"); message handed back" }
    }

    /// The most messages the queue holds; senders beyond it wait (`send`) or get theirs back (`trySend`).
    public let capacity: Int
    /// How producers wake the consumer loop.
    public let wakeMechanism: MessageQueueWake

    /// The consumer's loop. Weak: a signal that reaches the loop's remote queue after the
    /// loop stopped keeps the queue alive until the loop goes, never the other way round.
    private weak var loop: EventLoop?

    // MARK: State guarded by `lock`

    private let lock = Lock()
    private var ring: Ring<Message>
    private var senders = Ring<Sender>(capacity: 4)
    private var nextSenderID: UInt64 = 0
    /// The coalescing flag. True from the send that found the queue idle (and woke the
    /// consumer) until the consumer finds the ring empty: the callback consumer when a
    /// batch took everything, the async consumer when it is about to wait. Invariant:
    /// `!wakePending` implies `ring.isEmpty`, so a send that sees it set knows that a
    /// wake-up is on its way or that the consumer will look at the ring again.
    private var wakePending = false
    private var closed = false
    /// The consumer's loop has shut down: nothing will consume any more.
    private var loopGone = false
    private var consumer: Consumer = .none
    /// The async consumer, suspended because the ring was empty.
    private var consumerContinuation: UnsafeContinuation<Void, Never>?
    /// The consumer was told the queue ended (onClosed called).
    private var endReported = false
    /// `close()` returned nothing because a consumer was attached: what is queued is that
    /// consumer's to take. A cancelled async consumer keeps taking it then (nobody else
    /// would), and `stopConsuming()` hands it to the callback consumer that stops.
    private var owedToConsumer = false
    /// The generation of the last async consumer attached (its iterator's lease).
    private var asyncGeneration: UInt64 = 0
    /// The most messages the ring ever held (for tests: memory stays bounded).
    private(set) var highWaterMark = 0
    /// Times the consumer took a batch, and messages taken.
    private(set) var batchCount = 0
    /// Sends that signalled the consumer's loop (for tests).
    private(set) var wakeUpsSent = 0

    // MARK: State owned by the loop thread

    /// The consumer's batch, reused: allocation-free once it has grown to `capacity`.
    private var batch: [Message] = []
    private var resumeScratch: [UnsafeContinuation<SenderOutcome, Never>] = []
    private var isDelivering = false
    /// The queue's signal came round while `isDelivering` (a nested turn): it is queued
    /// again once the batch is delivered.
    private var signalledWhileDelivering = false

    private enum Consumer {
        case none
        case callback(([Message]) -> Void, onClosed: (() -> Void)?)
        /// The async consumer holding the iterator of this generation.
        case async(UInt64)
        var isAttached: Bool { if case .none = self { false } else { true } }
    }

    private struct Sender {
        let id: UInt64
        let message: Message
        let continuation: UnsafeContinuation<SenderOutcome, Never>
    }

    private enum SenderOutcome {
        case sent
        case rejected(SendError)
    }

    /// A queue of at most `capacity` messages consumed on `loop`.
    ///
    /// The loop's shutdown closes the queue (after delivering what was queued); a queue
    /// created on a loop that has already shut down starts closed.
    public init(capacity: Int, loop: EventLoop, wake: MessageQueueWake = .loopSignal) {
        precondition(capacity > 0, "MessageQueue capacity must be at least 1")
        self.capacity = capacity
        self.wakeMechanism = wake
        self.loop = loop
        ring = Ring(capacity: capacity)
        batch.reserveCapacity(capacity)
        resumeScratch.reserveCapacity(capacity)
        // The loop tells the queue when it shuts down; weakly, so a dropped queue goes away.
        let installed = loop.execute { [weak self] in
            guard let self, let loop = self.loop else { return }
            loop.onShutdown(WeakShutdownObserver(self))
        }
        if !installed { lock.withLock { closed = true; loopGone = true } }
    }

    // MARK: Producers (any thread)

    /// Queues `message` if there is room, without blocking; otherwise hands it back.
    public func trySend(_ message: Message) -> TrySendResult {
        lock.lock()
        if closed {
            lock.unlock()
            return .closed(message)
        }
        if ring.isFull {
            lock.unlock()
            return .full(message)
        }
        let wake = acceptLocked(message)
        lock.unlock()
        if let wake { wakeConsumer(wake) }
        return .sent
    }

    /// Queues `message`, suspending while the queue is full; senders that wait are let in
    /// in the order they started waiting. Throws, with the message, if the queue is closed
    /// first or the task is cancelled while it waits.
    public func send(_ message: Message) async throws(SendError) {
        lock.lock()
        if closed {
            lock.unlock()
            throw SendError(reason: .closed, message: message)
        }
        if !ring.isFull {
            let wake = acceptLocked(message)
            lock.unlock()
            if let wake { wakeConsumer(wake) }
            return
        }
        let id = nextSenderID
        nextSenderID &+= 1
        lock.unlock()

        let outcome: SenderOutcome = await withTaskCancellationHandler {
            await withUnsafeContinuation { (continuation: UnsafeContinuation<SenderOutcome, Never>) in
                lock.lock()
                let early: SenderOutcome?
                var wake: EventLoop? = nil
                if closed {
                    early = .rejected(SendError(reason: .closed, message: message))
                } else if !ring.isFull {
                    // The consumer made room between the first look and now. No sender
                    // can be waiting then (they are let in whenever room appears).
                    wake = acceptLocked(message)
                    early = .sent
                } else if Task.isCancelled {
                    // Cancelled before the handler could find us: it set the flag first.
                    early = .rejected(SendError(reason: .cancelled, message: message))
                } else {
                    senders.pushGrowing(Sender(id: id, message: message, continuation: continuation))
                    early = nil
                }
                lock.unlock()
                if let wake { wakeConsumer(wake) }
                if let early { continuation.resume(returning: early) }
            }
        } onCancel: {
            self.cancelSender(id)
        }
        if case .rejected(let error) = outcome { throw error }
    }

    /// Stops new sends and returns the messages no consumer will take: everything still
    /// queued when no consumer is attached (none was, it stopped, or its loop shut down),
    /// otherwise nothing (the consumer gets them, then the end of the queue). Senders
    /// still waiting are resumed with `SendError(.closed)` carrying their message.
    /// When this returns nothing because a consumer is attached, what is queued is that
    /// consumer's: an async consumer cancelled from then on still takes it, and a callback
    /// consumer that stops gets it from `stopConsuming()`. (An async consumer that breaks
    /// out of its loop leaves it for another `close()`.) Callable from any thread, more
    /// than once.
    public func close() -> [Message] {
        lock.lock()
        closed = true
        var rejected: [Sender] = []
        while let sender = senders.pop() { rejected.append(sender) }
        var returned: [Message] = []
        var notify: EventLoop? = nil
        if loopGone || !consumer.isAttached || loop == nil {
            returned.reserveCapacity(ring.count)
            while let message = ring.pop() { returned.append(message) }
            wakePending = false
        } else {
            notify = loop  // the consumer must learn that the queue ended
            owedToConsumer = true
        }
        lock.unlock()
        for sender in rejected {
            sender.continuation.resume(returning: .rejected(SendError(reason: .closed, message: sender.message)))
        }
        if let notify { wakeConsumer(notify) }
        return returned
    }

    /// True once `close()` was called or the consumer's loop shut down.
    public var isClosed: Bool { lock.withLock { closed } }

    /// Messages queued now (a snapshot).
    public var count: Int { lock.withLock { ring.count } }

    /// Senders suspended in `send` now (a snapshot).
    public var waitingSenders: Int { lock.withLock { senders.count } }

    /// Puts `message` into the ring (not full, not closed) and flips the coalescing flag;
    /// returns the loop to wake when this send found the queue idle.
    @inline(__always)
    private func acceptLocked(_ message: Message) -> EventLoop? {
        ring.push(message)
        if ring.count > highWaterMark { highWaterMark = ring.count }
        if wakePending { return nil }
        wakePending = true
        wakeUpsSent += 1
        return loop
    }

    /// The wake-up: the only place that knows how the consumer's loop is reached.
    @inline(__always)
    private func wakeConsumer(_ loop: EventLoop) {
        switch wakeMechanism {
        case .loopSignal: loop.signal(self)
        }
    }

    private func cancelSender(_ id: UInt64) {
        // Not found: it was let in, or rejected, already; or it is not queued yet and
        // will see Task.isCancelled when it is.
        if let sender = lock.withLock({ senders.remove(where: { $0.id == id }) }) {
            sender.continuation.resume(returning: .rejected(SendError(reason: .cancelled, message: sender.message)))
        }
    }

    // MARK: The consumer (its loop's thread)

    /// Consumes every message with `body`, on the loop thread, in batches; `onClosed` runs
    /// once when the queue is closed and everything queued was delivered. Call on the loop
    /// thread (or before the loop runs). One consumer at a time.
    public func onMessage(_ body: @escaping (Message) -> Void, onClosed: (() -> Void)? = nil) {
        onBatch({ batch in for message in batch { body(message) } }, onClosed: onClosed)
    }

    /// Consumes the queue a batch at a time: each call gets every message that was queued
    /// when the consumer woke (at most `capacity`), oldest first. The array is reused for
    /// the next batch; keeping it costs a copy, nothing else. On a queue whose loop's
    /// `run()` has returned, what is left and then `onClosed` are delivered at once, on
    /// the calling thread, before this returns.
    public func onBatch(_ body: @escaping ([Message]) -> Void, onClosed: (() -> Void)? = nil) {
        guard let loop else { preconditionFailure("the consumer's loop is gone") }
        loop.assertInLoop()
        lock.withLock {
            precondition(!consumer.isAttached, "MessageQueue has a consumer already (single consumer)")
            consumer = .callback(body, onClosed: onClosed)
            endReported = false  // each consumer learns the end, even one that comes after it
        }
        // Messages may have been waiting for a consumer; their wake-up was spent. A loop
        // whose `run()` has returned takes no signal: the queue is closed then (its
        // shutdown closed it), and what is left and the end are delivered now, here.
        if !loop.signal(self) { consumerTurn() }
    }

    /// Detaches the callback consumer (loop thread). Messages stay queued for the next
    /// consumer, or for `close()` to return. A batch being delivered is delivered whole.
    /// Once the queue is closed, nobody else is owed what is still queued (a `close()`
    /// made while this consumer was attached returned nothing): it is returned here.
    @discardableResult
    public func stopConsuming() -> [Message] {
        loop?.assertInLoop()
        return lock.withLock {
            guard case .callback = consumer else { return [] }
            consumer = .none
            guard closed else { return [] }
            var rest: [Message] = []
            while let message = ring.pop() { rest.append(message) }
            wakePending = false
            return rest
        }
    }

    /// Takes what is queued (at most one ring's worth), lets waiting senders into the room
    /// this made, and delivers it; asks for another turn when more is queued.
    private func deliverBatch() {
        if isDelivering {
            // The consumer's callback turned the loop itself (a nested runOnce) and this
            // queue's signal came round: its batch is still being handed over, so the next
            // one waits for the turn after the batch (the signal is queued again then), in
            // order. Not queued again now: every nested turn would find it and not wait, so
            // a callback pumping the loop would spin.
            signalledWhileDelivering = true
            return
        }
        lock.lock()
        guard case .callback(let body, let onClosed) = consumer else {
            lock.unlock()
            return
        }
        while let message = ring.pop() { batch.append(message) }
        if !batch.isEmpty { batchCount += 1 }
        admitWaitingSendersLocked()
        let more = !ring.isEmpty
        if !more { wakePending = false }
        var reportEnd = false
        if closed && !more && !endReported {
            endReported = true
            reportEnd = true
        }
        lock.unlock()
        resumeAdmittedSenders()
        if !batch.isEmpty {
            isDelivering = true
            body(batch)
            isDelivering = false
            batch.removeAll(keepingCapacity: true)
        }
        let signalled = signalledWhileDelivering
        signalledWhileDelivering = false
        if more || signalled, let loop { loop.signal(self) }
        if reportEnd { onClosed?() }
    }

    /// Moves waiting senders' messages into free ring slots, oldest sender first (lock held).
    private func admitWaitingSendersLocked() {
        while !ring.isFull, let sender = senders.pop() {
            ring.push(sender.message)
            resumeScratch.append(sender.continuation)
        }
        if ring.count > highWaterMark { highWaterMark = ring.count }
    }

    private func resumeAdmittedSenders() {
        guard !resumeScratch.isEmpty else { return }
        for continuation in resumeScratch { continuation.resume(returning: .sent) }
        resumeScratch.removeAll(keepingCapacity: true)
    }

    /// The loop is shutting down (its thread, `onShutdown`): close, hand waiting
    /// senders their messages back, and deliver what is queued to the consumer.
    func loopDidShutDown() {
        var rejected: [Sender] = []
        lock.withLock {
            closed = true
            while let sender = senders.pop() { rejected.append(sender) }
        }
        for sender in rejected {
            sender.continuation.resume(returning: .rejected(SendError(reason: .closed, message: sender.message)))
        }
        consumerTurn()
        lock.withLock { loopGone = true }
    }

    /// One consumer turn on the loop thread.
    private func consumerTurn() {
        let kind = lock.withLock { consumer }
        switch kind {
        case .none:
            return
        case .callback:
            // At shutdown no sender waits, so this one batch empties the ring; otherwise
            // a ring refilled by waiting senders signals itself another turn.
            deliverBatch()
        case .async:
            lock.withLock { consumerContinuation.take() }?.resume()
        }
    }

    // MARK: The async consumer

    /// Takes the next message for the async consumer (loop thread; hops there if needed).
    /// Returns nil once the queue is closed and empty, or when the task is cancelled.
    func receive(_ generation: UInt64) async -> Message? {
        // Without a loop, or with one that is gone (it runs no tasks), what is left is
        // taken here, without hopping.
        guard let loop = self.loop, loop.inLoop || !lock.withLock({ loopGone }) else {
            return lock.withLock { mayTakeLocked(generation) ? ring.pop() : nil }
        }
        if !loop.inLoop { return await withTaskExecutorPreference(loop) { await self.receiveOnLoop(generation) } }
        return await receiveOnLoop(generation)
    }

    /// Whether the async consumer of `generation` may take another message (lock held).
    /// A cancelled one takes nothing more, unless a close() left the rest to it, and it
    /// leaves then, in the same critical section: a close() from now on sees no consumer
    /// and returns what is queued (otherwise one that came before its iterator went would
    /// return nothing, and nobody would take what is queued).
    private func mayTakeLocked(_ generation: UInt64) -> Bool {
        guard case .async(let current) = consumer, current == generation else { return false }
        if Task.isCancelled && !owedToConsumer {
            consumer = .none
            return false
        }
        return true
    }

    /// The next queued message, without suspending, for the async consumer on the loop
    /// thread; nil when none is queued, when called from elsewhere, or when the task is
    /// cancelled, and then `receive` decides. A message is usually there, and this way it
    /// costs no async call: each would take a frame from the task allocator (plexus-bench
    /// mq-handoff async).
    @inline(__always)
    func receiveQueued(_ generation: UInt64) -> Message? {
        guard let loop = self.loop, loop.inLoop else { return nil }
        lock.lock()
        if !mayTakeLocked(generation) {
            lock.unlock()
            return nil
        }
        return popLocked()
    }

    /// Pops the next message, if any, and unlocks `lock`; admits waiting senders to the
    /// room it made.
    @inline(__always)
    private func popLocked() -> Message? {
        guard let message = ring.pop() else {
            lock.unlock()
            return nil
        }
        admitWaitingSendersLocked()
        // `wakePending` stays set even when this emptied the ring: the async consumer
        // looks at the ring again before it waits, and clears it then (`receiveOnLoop`),
        // so a send meanwhile needs no signal. Cleared here, every message sent while the
        // consumer runs would leave a signal job behind that later resumes it for nothing.
        lock.unlock()
        resumeAdmittedSenders()
        return message
    }

    private func receiveOnLoop(_ generation: UInt64) async -> Message? {
        while true {
            lock.lock()
            if !mayTakeLocked(generation) {
                lock.unlock()
                return nil
            }
            if !ring.isEmpty { return popLocked() }
            if closed {
                wakePending = false
                lock.unlock()
                return nil
            }
            lock.unlock()
            // Decide to sleep and publish the continuation in one critical section: the
            // calls on the way in may hop executors, and a signal handled in such a gap
            // must find either a message in the ring or the continuation, never neither.
            await withTaskCancellationHandler {
                await withUnsafeContinuation { (continuation: UnsafeContinuation<Void, Never>) in
                    lock.lock()
                    if !ring.isEmpty || closed || Task.isCancelled {
                        lock.unlock()
                        continuation.resume()
                        return
                    }
                    wakePending = false  // the ring is empty: the next send wakes us
                    consumerContinuation = continuation
                    batchCount += 1      // the wake-up that resumes us starts a batch
                    lock.unlock()
                }
            } onCancel: {
                if let loop = self.loop { loop.signal(self) }
            }
        }
    }

    fileprivate func attachAsyncConsumer() -> UInt64 {
        lock.withLock {
            precondition(!consumer.isAttached, "MessageQueue has a consumer already (single consumer)")
            asyncGeneration &+= 1
            consumer = .async(asyncGeneration)
            return asyncGeneration
        }
    }

    fileprivate func detachAsyncConsumer(_ generation: UInt64) {
        lock.withLock {
            if case .async(let current) = consumer, current == generation { consumer = .none }
        }
    }

    deinit {
        // Messages still in the ring are destroyed with it (documented); waiting senders
        // cannot exist: each holds a reference to the queue.
    }
}

extension MessageQueue: LoopSignalTarget {
    func loopSignalled() {
        consumerTurn()
    }
}

extension MessageQueue: AsyncSequence {
    public typealias Element = Message
    public typealias Failure = Never

    /// The async consumer: `for await message in queue` in a task on the queue's loop
    /// (`Task(executorPreference: loop)`; from elsewhere each `next` hops to the loop).
    /// Making the iterator attaches the consumer; dropping it detaches it, leaving what
    /// is still queued for the next consumer or for `close()`.
    public func makeAsyncIterator() -> AsyncIterator {
        let generation = attachAsyncConsumer()
        return AsyncIterator(lease: ConsumerLease(self, generation))
    }

    public struct AsyncIterator: AsyncIteratorProtocol {
        let lease: ConsumerLease

        public mutating func next() async -> Message? {
            if let message = lease.queue.receiveQueued(lease.generation) { return message }
            return await lease.queue.receive(lease.generation)
        }

        public mutating func next(isolation actor: isolated (any Actor)?) async -> Message? {
            if let message = lease.queue.receiveQueued(lease.generation) { return message }
            return await lease.queue.receive(lease.generation)
        }
    }

    /// Detaches the async consumer when its iterator goes away.
    final class ConsumerLease: Sendable {
        let queue: MessageQueue
        let generation: UInt64
        init(_ queue: MessageQueue, _ generation: UInt64) { self.queue = queue; self.generation = generation }
        deinit { queue.detachAsyncConsumer(generation) }
    }
}

/// Forwards a loop's shutdown to a queue without keeping the queue alive.
private final class WeakShutdownObserver<Message: Sendable>: LoopShutdownObserver {
    weak var queue: MessageQueue<Message>?
    init(_ queue: MessageQueue<Message>) { self.queue = queue }
    func loopWillShutDown() { queue?.loopDidShutDown() }
}
