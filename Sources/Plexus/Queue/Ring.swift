/// A FIFO ring over one allocation: push and pop move elements, never allocate. It
/// grows (doubling) only when asked to, so a fixed-capacity ring stays the size its
/// owner chose. Not thread-safe: its owner guards it.
struct Ring<Element>: ~Copyable {
    private var storage: UnsafeMutablePointer<Element>
    private(set) var capacity: Int
    private var head = 0
    private(set) var count = 0

    init(capacity: Int) {
        precondition(capacity > 0, "a ring needs room for at least one element")
        self.capacity = capacity
        storage = .allocate(capacity: capacity)
    }

    deinit {
        var i = head
        for _ in 0..<count {
            (storage + i).deinitialize(count: 1)
            i += 1
            if i == capacity { i = 0 }
        }
        storage.deallocate()
    }

    var isEmpty: Bool { count == 0 }
    var isFull: Bool { count == capacity }

    /// Appends at the tail; the ring must not be full.
    mutating func push(_ element: consuming Element) {
        precondition(count < capacity, "push on a full ring")
        var tail = head + count
        if tail >= capacity { tail -= capacity }
        (storage + tail).initialize(to: element)
        count += 1
    }

    /// Appends, doubling the storage first when full.
    mutating func pushGrowing(_ element: consuming Element) {
        if count == capacity { grow() }
        push(element)
    }

    /// Removes the head.
    mutating func pop() -> Element? {
        guard count > 0 else { return nil }
        let element = (storage + head).move()
        head += 1
        if head == capacity { head = 0 }
        count -= 1
        return element
    }

    /// Removes the first element `matches` selects, keeping the others in order. O(n).
    mutating func remove(where matches: (borrowing Element) -> Bool) -> Element? {
        var found: Element? = nil
        for _ in 0..<count {
            let element = pop()!
            if found == nil && matches(element) {
                found = element
            } else {
                push(element)
            }
        }
        return found
    }

    private mutating func grow() {
        let n = count
        let bigger = UnsafeMutablePointer<Element>.allocate(capacity: capacity * 2)
        for i in 0..<n { (bigger + i).initialize(to: pop()!) }
        storage.deallocate()
        storage = bigger
        capacity *= 2
        head = 0
        count = n
    }
}
