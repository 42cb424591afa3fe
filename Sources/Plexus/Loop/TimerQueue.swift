import HeapModule

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
/// skipped, since its generation no longer matches.
struct TimerQueue {
    typealias Callback = (TimerEvent) throws -> Void

    struct Entry: Comparable {
        let deadline: UInt64
        let sequence: UInt64
        let index: UInt32
        let generation: UInt32
        static func < (a: Entry, b: Entry) -> Bool {
            (a.deadline, a.sequence) < (b.deadline, b.sequence)
        }
        static func == (a: Entry, b: Entry) -> Bool { a.sequence == b.sequence }
    }

    struct Slot {
        var callback: Callback?
        var generation: UInt32 = 0
        /// Repeat interval in ns, 0 for a one-shot timer.
        var interval: UInt64 = 0
        var nextFree: UInt32 = .max
    }

    private var heap = Heap<Entry>()
    private var slots: [Slot] = []
    private var freeHead: UInt32 = .max
    private var sequence: UInt64 = 0
    private(set) var count = 0

    mutating func schedule(at deadline: UInt64, interval: UInt64, _ callback: @escaping Callback) -> TimerHandle {
        let index: UInt32
        if freeHead != .max {
            index = freeHead
            freeHead = slots[Int(index)].nextFree
        } else {
            index = UInt32(slots.count)
            slots.append(Slot())
        }
        slots[Int(index)].callback = callback
        slots[Int(index)].interval = interval
        let generation = slots[Int(index)].generation
        sequence &+= 1
        heap.insert(Entry(deadline: deadline, sequence: sequence, index: index, generation: generation))
        count += 1
        return TimerHandle(index: index, generation: generation)
    }

    /// Removes the timer and returns its callback (to be called with `.cancelled`);
    /// nil if it already ended.
    mutating func cancel(_ handle: TimerHandle) -> Callback? {
        guard Int(handle.index) < slots.count, slots[Int(handle.index)].generation == handle.generation,
              let callback = slots[Int(handle.index)].callback else { return nil }
        free(handle.index)
        return callback
    }

    /// Removes the timer without calling it (for the loop's own timers).
    mutating func discard(_ handle: TimerHandle) {
        _ = cancel(handle)
    }

    /// The earliest live deadline, dropping cancelled entries on the way.
    mutating func nextDeadline() -> UInt64? {
        while let top = heap.min {
            if isLive(top) { return top.deadline }
            _ = heap.removeMin()
        }
        return nil
    }

    /// Pops the earliest timer due at `now`: its callback, and whether it was its last firing.
    /// A repeating timer is rescheduled one interval after its previous deadline.
    mutating func popDue(now: UInt64) -> (callback: Callback, handle: TimerHandle)? {
        while let top = heap.min, top.deadline <= now {
            _ = heap.removeMin()
            guard isLive(top) else { continue }
            let slot = slots[Int(top.index)]
            let handle = TimerHandle(index: top.index, generation: top.generation)
            if slot.interval > 0 {
                sequence &+= 1
                let next = max(top.deadline &+ slot.interval, now)
                heap.insert(Entry(deadline: next, sequence: sequence, index: top.index, generation: top.generation))
            } else {
                free(top.index)
            }
            return (slot.callback!, handle)
        }
        return nil
    }

    /// Removes every timer and returns their callbacks in deadline order.
    mutating func removeAll() -> [Callback] {
        var callbacks: [Callback] = []
        while let entry = heap.popMin() {
            guard isLive(entry) else { continue }
            callbacks.append(slots[Int(entry.index)].callback!)
            free(entry.index)
        }
        return callbacks
    }

    private func isLive(_ e: Entry) -> Bool {
        slots[Int(e.index)].generation == e.generation && slots[Int(e.index)].callback != nil
    }

    private mutating func free(_ index: UInt32) {
        slots[Int(index)].callback = nil
        slots[Int(index)].generation &+= 1
        slots[Int(index)].nextFree = freeHead
        freeHead = index
        count -= 1
    }
}
