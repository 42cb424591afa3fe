/// A growable array of trivial values behind one pointer: the backends keep it in a
/// `let`, so reads and writes cost what they cost in C (no exclusivity checks, no
/// retain/release). It allocates only when it grows.
struct RawArray<Element: BitwiseCopyable> {
    private struct Header {
        var base: UnsafeMutablePointer<Element>
        var count: Int
        var capacity: Int
    }

    private let header: UnsafeMutablePointer<Header>

    init(capacity: Int) {
        let capacity = max(capacity, 1)
        header = .allocate(capacity: 1)
        header.initialize(to: Header(base: .allocate(capacity: capacity), count: 0, capacity: capacity))
    }

    func destroy() {
        header.pointee.base.deallocate()
        header.deallocate()
    }

    var count: Int {
        @inline(__always) get { header.pointee.count }
    }

    var isEmpty: Bool {
        @inline(__always) get { header.pointee.count == 0 }
    }

    var base: UnsafeMutablePointer<Element> {
        @inline(__always) get { header.pointee.base }
    }

    @inline(__always)
    func pointer(_ i: Int) -> UnsafeMutablePointer<Element> {
        header.pointee.base + i
    }

    subscript(_ i: Int) -> Element {
        @inline(__always) get { header.pointee.base[i] }
        @inline(__always) nonmutating set { header.pointee.base[i] = newValue }
    }

    @inline(__always)
    func append(_ element: Element) {
        if header.pointee.count == header.pointee.capacity { reserve(header.pointee.capacity * 2) }
        (header.pointee.base + header.pointee.count).initialize(to: element)
        header.pointee.count += 1
    }

    /// The last element, if any.
    var last: Element? {
        @inline(__always) get { header.pointee.count > 0 ? header.pointee.base[header.pointee.count - 1] : nil }
    }

    /// Drops the last element.
    @inline(__always)
    func removeLast() { header.pointee.count -= 1 }

    /// Drops the first `n` elements, moving the rest to the front.
    func removeFirst(_ n: Int) {
        precondition(n >= 0 && n <= header.pointee.count)
        header.pointee.base.update(from: header.pointee.base + n, count: header.pointee.count - n)
        header.pointee.count -= n
    }

    /// Forgets every element; keeps the memory.
    @inline(__always)
    func removeAll() { header.pointee.count = 0 }

    /// Grows to `count` elements (at least), filling new ones with `value`.
    func grow(to count: Int, filling value: Element) {
        guard count > header.pointee.count else { return }
        if count > header.pointee.capacity { reserve(max(count, header.pointee.capacity * 2)) }
        (header.pointee.base + header.pointee.count).initialize(repeating: value, count: count - header.pointee.count)
        header.pointee.count = count
    }

    private func reserve(_ capacity: Int) {
        let new = UnsafeMutablePointer<Element>.allocate(capacity: capacity)
        new.moveInitialize(from: header.pointee.base, count: header.pointee.count)
        header.pointee.base.deallocate()
        header.pointee.base = new
        header.pointee.capacity = capacity
    }
}
