import CPlexus
/// Where an awaiting task waits for its operation: the continuation to resume, and,
/// once the operation completed, its result and the operation with its buffers.
///
/// Indexed by the loop, not by the backend's token: the backend frees its slot at the
/// final completion, but the task collects the operation later, when it runs again.
/// Used only on the loop thread. Grows, never shrinks; no allocation per operation.
struct AsyncSlot: ~Copyable {
    var continuation: UnsafeContinuation<Void, Never>? = nil
    var operation: Operation? = nil
    var result: Int32 = 0
    var kind = OperationKind.nop
    var flags = CompletionFlags()
    var done = false
    /// The task's deadline passed and cancelled the operation.
    var timedOut = false
    var nextFree = -1
    /// What a cancellation handler on another thread reads: the operation to cancel and
    /// its loop. Written on the loop thread before the record is added.
    var token = Token.internalOperation
    unowned(unsafe) var loop: EventLoop? = nil
}

final class AsyncSlots {
    /// Slots live in chunks that never move: a cancellation record holds a slot's address
    /// (its token and loop) while the task is parked, and the table may grow meanwhile.
    private static let chunkShift = 6
    private static let chunkSize = 1 << chunkShift
    @exclusivity(unchecked) private var chunks: UnsafeMutablePointer<UnsafeMutablePointer<AsyncSlot>>
    @exclusivity(unchecked) private var chunkCount = 0
    @exclusivity(unchecked) private var chunkCapacity = 4
    @exclusivity(unchecked) private var freeHead = -1
    @exclusivity(unchecked) private var used = 0

    init() {
        chunks = .allocate(capacity: chunkCapacity)
        addChunk()
        // The cancellation records' one hook (the same function each time, so a racing
        // store from another loop's init is harmless).
        plexus_set_task_cancel_hook { context in
            let waiter = context!.assumingMemoryBound(to: AsyncSlot.self)
            waiter.pointee.loop?.cancelAwaited(waiter.pointee.token)
        }
    }

    deinit {
        for c in 0..<chunkCount {
            chunks[c].deinitialize(count: Self.chunkSize)
            chunks[c].deallocate()
        }
        chunks.deallocate()
    }

    func allocate() -> Int {
        if freeHead >= 0 {
            let i = freeHead
            freeHead = slot(i).pointee.nextFree
            return i
        }
        if used == chunkCount << Self.chunkShift { addChunk() }
        used += 1
        return used - 1
    }

    func free(_ i: Int) {
        let s = slot(i)
        s.pointee.continuation = nil
        s.pointee.operation = nil
        s.pointee.done = false
        s.pointee.timedOut = false
        s.pointee.nextFree = freeHead
        freeHead = i
    }

    @inline(__always)
    func slot(_ i: Int) -> UnsafeMutablePointer<AsyncSlot> {
        chunks[i >> Self.chunkShift] + (i & (Self.chunkSize - 1))
    }

    private func addChunk() {
        if chunkCount == chunkCapacity {
            let bigger = UnsafeMutablePointer<UnsafeMutablePointer<AsyncSlot>>.allocate(capacity: chunkCapacity * 2)
            bigger.moveInitialize(from: chunks, count: chunkCount)
            chunks.deallocate()
            chunks = bigger
            chunkCapacity *= 2
        }
        let chunk = UnsafeMutablePointer<AsyncSlot>.allocate(capacity: Self.chunkSize)
        for i in 0..<Self.chunkSize { (chunk + i).initialize(to: AsyncSlot()) }
        chunks[chunkCount] = chunk
        chunkCount += 1
    }
}
