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
/// callbacks.
///
/// `schedule(after:)` reads no clock: the timer waits in a FIFO with its delay until the
/// loop's next clock reading (`settle(now:)`, taken before the loop next looks at its
/// timers: when the running callbacks return), and its deadline is that reading plus the
/// delay. The reading is later than the call, so the timer never fires early; it may
/// fire later by what the callback that scheduled it still did after the call. A clock
/// read per call (20 ns here) was 0.65 us of the benchmark's 2 us turn of 64 timers. Scheduling and firing are O(log n) and allocate nothing once the slab
/// and heap have grown; a cancelled timer stays in the heap until its turn and is then
/// skipped, since its slot's generation moved on (the heap is compacted when most of it
/// is such dead entries).
///
/// Heap and slab are hand-written on raw memory: the timer churn benchmark measured
/// swift-collections' Heap over an array of entries and a Swift array of optional
/// closures at 0.30x of a raw heap (bounds, uniqueness and exclusivity checks and
/// retain/release on every access). A final class so the loop holds it with `let`, with
/// `@exclusivity(unchecked)` stored properties: their dynamic exclusivity checks
/// (swift_beginAccess) were 17% of that benchmark once `schedule(after:)` stopped reading
/// the clock. Sound because no method calls out while it holds an access (callbacks are
/// returned, never called, here) and the queue is used on the loop thread only.
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

    @exclusivity(unchecked) private var heap: UnsafeMutablePointer<Entry>
    @exclusivity(unchecked) private var heapCount = 0
    @exclusivity(unchecked) private var heapCapacity: Int
    @exclusivity(unchecked) private var slots: UnsafeMutablePointer<Slot>
    @exclusivity(unchecked) private var slotCount = 0
    @exclusivity(unchecked) private var slotCapacity: Int
    /// Timers scheduled after a delay since the last `settle`, in scheduling order, each
    /// with its delay in `deadline`.
    @exclusivity(unchecked) private var unsettled: UnsafeMutablePointer<Entry>
    @exclusivity(unchecked) private var unsettledCount = 0
    @exclusivity(unchecked) private var unsettledCapacity: Int
    /// Due timers scheduled during the current pass over the due ones (`popDue` with a
    /// limit), held out of the heap until `endPass`: a callback that schedules a timer at
    /// a passed deadline does not keep the loop in one pass for ever.
    @exclusivity(unchecked) private var deferred: UnsafeMutablePointer<Entry>
    @exclusivity(unchecked) private var deferredCount = 0
    @exclusivity(unchecked) private var deferredCapacity: Int
    @exclusivity(unchecked) private var freeHead: UInt32 = .max
    @exclusivity(unchecked) private var sequence: UInt64 = 0
    /// Every slot's first generation (`GenerationSeed`): another loop's handles match none.
    private let seed = GenerationSeed.next()
    /// Live timers.
    @exclusivity(unchecked) private(set) var count = 0

    init(capacity: Int = 64) {
        heapCapacity = capacity
        heap = .allocate(capacity: capacity)
        slotCapacity = capacity
        slots = .allocate(capacity: capacity)
        unsettledCapacity = capacity
        unsettled = .allocate(capacity: capacity)
        deferredCapacity = capacity
        deferred = .allocate(capacity: capacity)
    }

    deinit {
        slots.deinitialize(count: slotCount)
        slots.deallocate()
        heap.deallocate()
        unsettled.deallocate()
        deferred.deallocate()
    }

    /// A timer due at `deadline` (ns, CLOCK_MONOTONIC), repeating every `interval` ns if not 0.
    @inline(__always)
    func schedule(at deadline: UInt64, interval: UInt64, _ callback: consuming @escaping Callback) -> TimerHandle {
        let entry = claim(interval: interval, callback)
        push(Entry(deadline: deadline, sequence: entry.sequence, index: entry.index, generation: entry.generation))
        return TimerHandle(index: entry.index, generation: entry.generation)
    }

    /// A one-shot timer due `delay` ns after the next `settle(now:)`.
    @inline(__always)
    func schedule(after delay: UInt64, _ callback: consuming @escaping Callback) -> TimerHandle {
        let entry = claim(interval: 0, callback)
        if _slowPath(unsettledCount == unsettledCapacity) { Self.grow(&unsettled, &unsettledCapacity, count: unsettledCount) }
        unsettled[unsettledCount] = Entry(deadline: delay, sequence: entry.sequence, index: entry.index, generation: entry.generation)
        unsettledCount += 1
        return TimerHandle(index: entry.index, generation: entry.generation)
    }

    /// True when timers scheduled after a delay wait for a clock reading.
    var isUnsettled: Bool { unsettledCount > 0 }

    /// Gives the timers scheduled after a delay their deadlines: `now` (read after they
    /// were scheduled) plus the delay. The loop calls it with every clock reading it
    /// takes for its timers, before looking at them.
    @inline(__always)
    func settle(now: UInt64) {
        for i in 0..<unsettledCount where isLive(unsettled[i]) {
            var entry = unsettled[i]
            entry.deadline = now.addingSaturated(entry.deadline)
            push(entry)
        }
        unsettledCount = 0
    }

    /// Takes a slot for `callback`: its index and generation, and the next sequence number.
    @inline(__always)
    private func claim(interval: UInt64, _ callback: consuming @escaping Callback) -> Entry {
        let index: UInt32
        let slot: UnsafeMutablePointer<Slot>
        if freeHead != .max {
            index = freeHead
            slot = slots + Int(index)
            freeHead = slot.pointee.nextFree
            // Initialized over, not assigned: a free slot's callback is nil (taken when the
            // timer ended), and assigning destroys that nil through an outlined call.
            slot.initialize(to: Slot(callback: consume callback, generation: slot.pointee.generation, interval: interval))
        } else {
            if slotCount == slotCapacity { Self.grow(&slots, &slotCapacity, count: slotCount) }
            index = UInt32(truncatingIfNeeded: slotCount)
            slot = slots + slotCount
            slot.initialize(to: Slot(callback: consume callback, generation: seed, interval: interval))
            slotCount += 1
        }
        sequence &+= 1
        count += 1
        return Entry(deadline: 0, sequence: sequence, index: index, generation: slot.pointee.generation)
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

    /// The earliest live deadline, dropping cancelled entries on the way. Settle first.
    @inline(__always)
    func nextDeadline() -> UInt64? {
        while heapCount > 0 {
            if isLive(heap[0]) { return heap[0].deadline }
            popMin()
        }
        return nil
    }

    /// The sequence number of the timer scheduled last: a pass over the due timers
    /// passes it to `popDue` as its limit.
    var lastSequence: UInt64 { sequence }

    /// Pops the earliest timer due at `now` and returns its callback (settle first). A
    /// repeating timer stays, rescheduled one interval after its previous deadline, or one
    /// interval after `now` when that has passed too (it missed a whole interval: it fires
    /// once for what it missed, not once more at once).
    ///
    /// A timer scheduled after `limit` (`lastSequence` when the pass began) is not fired:
    /// it waits for `endPass` and the next pass, so callbacks scheduling timers at passed
    /// deadlines cannot keep the loop here.
    @inline(__always)
    func popDue(now: UInt64, scheduledThrough limit: UInt64 = .max) -> Callback? {
        while heapCount > 0 {
            let top = heap[0]
            let slot = slots + Int(top.index)
            if slot.pointee.generation != top.generation {
                popMin()  // cancelled
                continue
            }
            if top.deadline > now { return nil }
            if _slowPath(top.sequence > limit) {
                popMin()
                if deferredCount == deferredCapacity { Self.grow(&deferred, &deferredCapacity, count: deferredCount) }
                deferred[deferredCount] = top
                deferredCount += 1
                continue
            }
            let interval = slot.pointee.interval
            if interval == 0 {
                popMin()
                let callback = slot.pointee.callback.take()
                free(top.index)
                return callback
            }
            sequence &+= 1
            let next = top.deadline.addingSaturated(interval)
            replaceMin(Entry(deadline: next > now ? next : now.addingSaturated(interval), sequence: sequence,
                             index: top.index, generation: top.generation))
            return slot.pointee.callback
        }
        return nil
    }

    /// Ends a pass of `popDue` with a limit: the timers it held back go into the heap.
    @inline(__always)
    func endPass() {
        if _slowPath(deferredCount > 0) {
            for i in 0..<deferredCount where isLive(deferred[i]) { push(deferred[i]) }
            deferredCount = 0
        }
    }

    /// Removes every timer and returns their callbacks in deadline order.
    func removeAll() -> [Callback] {
        if unsettledCount > 0 { settle(now: Deadline.now.nanoseconds) }
        endPass()
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

    /// Doubles the capacity of `storage`, moving its first `count` elements.
    private static func grow<T>(_ storage: inout UnsafeMutablePointer<T>, _ capacity: inout Int, count: Int) {
        let bigger = UnsafeMutablePointer<T>.allocate(capacity: capacity * 2)
        bigger.moveInitialize(from: storage, count: count)
        storage.deallocate()
        storage = bigger
        capacity *= 2
    }

    // MARK: Heap

    @inline(__always)
    private func push(_ e: Entry) {
        if _slowPath(heapCount == heapCapacity) { Self.grow(&heap, &heapCapacity, count: heapCount) }
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
