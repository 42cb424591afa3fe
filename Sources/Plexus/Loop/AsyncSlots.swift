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
    var nextFree = -1
}

final class AsyncSlots {
    private var slots: UnsafeMutablePointer<AsyncSlot>
    private var capacity: Int
    private var freeHead = -1
    private var used = 0

    init(capacity: Int = 64) {
        self.capacity = capacity
        slots = .allocate(capacity: capacity)
        for i in 0..<capacity { (slots + i).initialize(to: AsyncSlot()) }
    }

    deinit {
        slots.deinitialize(count: capacity)
        slots.deallocate()
    }

    func allocate() -> Int {
        if freeHead >= 0 {
            let i = freeHead
            freeHead = slots[i].nextFree
            return i
        }
        if used == capacity { grow() }
        used += 1
        return used - 1
    }

    func free(_ i: Int) {
        slots[i].continuation = nil
        slots[i].operation = nil
        slots[i].done = false
        slots[i].nextFree = freeHead
        freeHead = i
    }

    @inline(__always)
    func slot(_ i: Int) -> UnsafeMutablePointer<AsyncSlot> { slots + i }

    private func grow() {
        let bigger = UnsafeMutablePointer<AsyncSlot>.allocate(capacity: capacity * 2)
        bigger.moveInitialize(from: slots, count: capacity)
        for i in capacity..<capacity * 2 { (bigger + i).initialize(to: AsyncSlot()) }
        slots.deallocate()
        slots = bigger
        capacity *= 2
    }
}
