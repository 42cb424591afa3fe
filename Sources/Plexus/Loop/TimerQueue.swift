/// Names a scheduled timer until it has fired for the last time or was cancelled.
public struct TimerHandle: Hashable, Sendable {
    let index: UInt32
    let generation: UInt32
}

/// How a timer callback is called: once per firing, and once with `.cancelled` when the
/// timer is cancelled or the loop shuts down, so every timer ends exactly once.
public enum TimerEvent: Sendable, Equatable {
    case fired
    case cancelled
}

/// Pending timers: a binary heap ordered by deadline (then by scheduling order, so
/// timers due at the same time fire in the order they were scheduled) over a slab of
/// callbacks. Scheduling and firing are O(log n) and allocate nothing once the slab
/// and heap have grown; a cancelled timer stays in the heap until its turn and is then
/// skipped, since its slot's generation moved on (the heap is compacted when most of it
/// is such dead entries).
///
/// Heap and slab are hand-written on raw memory: the timer churn benchmark measured
/// swift-collections' Heap over an array of entries and a Swift array of optional
/// closures at 0.30x of a raw heap (bounds, uniqueness and exclusivity checks and
/// retain/release on every access). A final class so the loop holds it with `let` and
/// pays no exclusivity check per call. Loop thread only.
final class TimerQueue {
    typealias Callback = (TimerEvent) throws -> Void

    /// 24 bytes of plain data: what the heap moves around.
    struct Entry {
        var deadline: UInt64
        var sequence: UInt64
        var index: UInt32
        var generation: UInt32

        @inline(__always)
        static func < (a: Entry, b: Entry) -> Bool {
            a.deadline != b.deadline ? a.deadline < b.deadline : a.sequence < b.sequence
        }
    }

    struct Slot {
        var callback: Callback?
        /// Moves on when the timer ends, so stale heap entries and handles no longer match.
        var generation: UInt32 = 0
        var nextFree: UInt32 = .max
        /// Repeat interval in ns, 0 for a one-shot timer.
        var interval: UInt64 = 0
    }

    private var heap: UnsafeMutablePointer<Entry>
    private var heapCount = 0
    private var heapCapacity: Int
    private var slots: UnsafeMutablePointer<Slot>
    private var slotCount = 0
    private var slotCapacity: Int
    private var freeHead: UInt32 = .max
    private var sequence: UInt64 = 0
    /// Live timers.
    private(set) var count = 0

    init(capacity: Int = 64) {
        heapCapacity = capacity
        heap = .allocate(capacity: capacity)
        slotCapacity = capacity
        slots = .allocate(capacity: capacity)
    }

    deinit {
        slots.deinitialize(count: slotCount)
        slots.deallocate()
        heap.deallocate()
    }

    @inline(__always)
    func schedule(at deadline: UInt64, interval: UInt64, _ callback: consuming @escaping Callback) -> TimerHandle {
        let index: UInt32
        let slot: UnsafeMutablePointer<Slot>
        if freeHead != .max {
            index = freeHead
            slot = slots + Int(index)
            freeHead = slot.pointee.nextFree
            slot.pointee.callback = consume callback
            slot.pointee.interval = interval
        } else {
            if slotCount == slotCapacity { growSlots() }
            index = UInt32(truncatingIfNeeded: slotCount)
            slot = slots + slotCount
            slot.initialize(to: Slot(callback: consume callback, interval: interval))
            slotCount += 1
        }
        let generation = slot.pointee.generation
        sequence &+= 1
        push(Entry(deadline: deadline, sequence: sequence, index: index, generation: generation))
        count += 1
        return TimerHandle(index: index, generation: generation)
    }

    /// Removes the timer and returns its callback (to be called with `.cancelled`);
    /// nil if it already ended.
    @inline(__always)
    func cancel(_ handle: TimerHandle) -> Callback? {
        guard Int(handle.index) < slotCount else { return nil }
        let slot = slots + Int(handle.index)
        guard slot.pointee.generation == handle.generation, let callback = slot.pointee.callback.take() else { return nil }
        free(handle.index)
        if _slowPath(heapCount > 256 && heapCount > 4 * count) { compact() }
        return callback
    }

    /// Removes the timer without calling it (for the loop's own timers).
    func discard(_ handle: TimerHandle) {
        _ = cancel(handle)
    }

    /// The earliest live deadline, dropping cancelled entries on the way.
    @inline(__always)
    func nextDeadline() -> UInt64? {
        while heapCount > 0 {
            if isLive(heap[0]) { return heap[0].deadline }
            popMin()
        }
        return nil
    }

    /// Pops the earliest timer due at `now` and returns its callback. A repeating timer
    /// stays, rescheduled one interval after its previous deadline (not before `now`).
    @inline(__always)
    func popDue(now: UInt64) -> Callback? {
        while heapCount > 0 {
            let top = heap[0]
            let slot = slots + Int(top.index)
            if slot.pointee.generation != top.generation {
                popMin()  // cancelled
                continue
            }
            if top.deadline > now { return nil }
            let interval = slot.pointee.interval
            if interval == 0 {
                popMin()
                let callback = slot.pointee.callback.take()
                free(top.index)
                return callback
            }
            sequence &+= 1
            replaceMin(Entry(deadline: max(top.deadline &+ interval, now), sequence: sequence,
                             index: top.index, generation: top.generation))
            return slot.pointee.callback
        }
        return nil
    }

    /// Removes every timer and returns their callbacks in deadline order.
    func removeAll() -> [Callback] {
        var callbacks: [Callback] = []
        while heapCount > 0 {
            let entry = heap[0]
            popMin()
            guard isLive(entry), let callback = slots[Int(entry.index)].callback.take() else { continue }
            callbacks.append(callback)
            free(entry.index)
        }
        return callbacks
    }

    // MARK: Slab

    @inline(__always)
    private func isLive(_ e: Entry) -> Bool {
        slots[Int(e.index)].generation == e.generation
    }

    /// Ends the timer in `index` (its callback already taken) and frees the slot.
    @inline(__always)
    private func free(_ index: UInt32) {
        let slot = slots + Int(index)
        slot.pointee.generation &+= 1
        slot.pointee.nextFree = freeHead
        freeHead = index
        count -= 1
    }

    private func growSlots() {
        let bigger = UnsafeMutablePointer<Slot>.allocate(capacity: slotCapacity * 2)
        bigger.moveInitialize(from: slots, count: slotCount)
        slots.deallocate()
        slots = bigger
        slotCapacity *= 2
    }

    // MARK: Heap

    @inline(__always)
    private func push(_ e: Entry) {
        if _slowPath(heapCount == heapCapacity) { growHeap() }
        var i = heapCount
        heapCount += 1
        while i > 0 {
            let parent = (i - 1) >> 1
            if !(e < heap[parent]) { break }
            heap[i] = heap[parent]
            i = parent
        }
        heap[i] = e
    }

    @inline(__always)
    private func popMin() {
        heapCount -= 1
        if heapCount > 0 { siftDown(heap[heapCount], from: 0) }
    }

    /// Replaces the root with `e` (a later deadline) and restores the order.
    @inline(__always)
    private func replaceMin(_ e: Entry) {
        siftDown(e, from: 0)
    }

    @inline(__always)
    private func siftDown(_ e: Entry, from start: Int) {
        var i = start
        while true {
            var child = 2 * i + 1
            if child >= heapCount { break }
            if child + 1 < heapCount && heap[child + 1] < heap[child] { child += 1 }
            if !(heap[child] < e) { break }
            heap[i] = heap[child]
            i = child
        }
        heap[i] = e
    }

    private func growHeap() {
        let bigger = UnsafeMutablePointer<Entry>.allocate(capacity: heapCapacity * 2)
        bigger.moveInitialize(from: heap, count: heapCount)
        heap.deallocate()
        heap = bigger
        heapCapacity *= 2
    }

    /// Drops the cancelled entries and rebuilds the heap from the live ones (bottom-up,
    /// O(n)): without it a loop that keeps cancelling far-off timers would keep them all.
    private func compact() {
        var kept = 0
        for i in 0..<heapCount where isLive(heap[i]) {
            heap[kept] = heap[i]
            kept += 1
        }
        heapCount = kept
        var i = kept / 2
        while i > 0 {
            i -= 1
            siftDown(heap[i], from: i)
        }
    }
}
