import CPlexus

/// A byte buffer that an operation owns while the kernel may touch it.
///
/// `IOBuffer` is noncopyable: passing it to an operation moves it there, and the only
/// way to get it back is the operation's completion. User code therefore cannot read,
/// reuse or free the memory while a read, write or receive is in flight, and the
/// compiler checks it. The memory is freed when the last owner drops the buffer.
///
/// The readable bytes are `[readerIndex, writerIndex)`. A read or receive appends at
/// `writerIndex` into the spare capacity; a write or send takes bytes from `readerIndex`
/// and a completed write consumes what the kernel accepted, so resubmitting the same
/// buffer after a short write sends exactly the rest.
public struct IOBuffer: ~Copyable, @unchecked Sendable {
    // Unique ownership of `base` makes sending the buffer to another thread safe.
    @usableFromInline let base: UnsafeMutableRawPointer
    /// Total bytes of storage.
    public let capacity: Int
    /// First readable byte.
    public private(set) var readerIndex: Int = 0
    /// One past the last readable byte; reads append here.
    public private(set) var writerIndex: Int = 0

    /// Allocates `capacity` bytes (uninitialised, none readable). A zero capacity is
    /// allowed; operations given no room complete with `EINVAL`.
    public init(capacity: Int) {
        precondition(capacity >= 0, "IOBuffer capacity must not be negative")
        self.capacity = capacity
        self.base = UnsafeMutableRawPointer.allocate(byteCount: max(capacity, 1), alignment: 64)
    }

    /// A buffer holding a copy of `bytes`, all readable.
    public init(bytes: some Collection<UInt8>) {
        self.init(capacity: bytes.count)
        append(bytes)
    }

    /// A buffer holding the UTF-8 bytes of `string`, all readable.
    public init(_ string: String) {
        self.init(bytes: Array(string.utf8))
    }

    deinit { base.deallocate() }

    /// Readable bytes.
    public var count: Int { writerIndex - readerIndex }
    /// Bytes a read can still append.
    public var spareCapacity: Int { capacity - writerIndex }
    public var isEmpty: Bool { writerIndex == readerIndex }

    /// Calls `body` with the readable bytes.
    public func withUnsafeBytes<R, E: Error>(_ body: (UnsafeRawBufferPointer) throws(E) -> R) throws(E) -> R {
        try body(UnsafeRawBufferPointer(start: base + readerIndex, count: count))
    }

    /// Calls `body` with the spare capacity; `body` returns how many bytes it wrote there.
    public mutating func appendUnsafe<E: Error>(_ body: (UnsafeMutableRawBufferPointer) throws(E) -> Int) throws(E) {
        let written = try body(UnsafeMutableRawBufferPointer(start: base + writerIndex, count: spareCapacity))
        precondition(written >= 0 && written <= spareCapacity, "appendUnsafe wrote outside the spare capacity")
        writerIndex += written
    }

    /// Appends as many of `bytes` as fit; returns how many were appended.
    @discardableResult
    public mutating func append(_ bytes: some Collection<UInt8>) -> Int {
        let n = min(bytes.count, spareCapacity)
        var p = base + writerIndex
        for byte in bytes.prefix(n) {
            p.storeBytes(of: byte, as: UInt8.self)
            p += 1
        }
        writerIndex += n
        return n
    }

    /// Drops `n` readable bytes from the front.
    public mutating func consume(_ n: Int) {
        precondition(n >= 0 && n <= count, "consume(\(n)) beyond the \(count) readable bytes")
        readerIndex += n
        if readerIndex == writerIndex { readerIndex = 0; writerIndex = 0 }
    }

    /// Forgets every byte; the whole capacity is spare again.
    public mutating func clear() {
        readerIndex = 0
        writerIndex = 0
    }

    /// A copy of the readable bytes.
    public var bytes: [UInt8] { withUnsafeBytes { Array($0) } }
    /// The readable bytes decoded as UTF-8.
    public var string: String { withUnsafeBytes { String(decoding: $0, as: UTF8.self) } }

    // MARK: For the backends

    /// The readable region, as the kernel sees it for a write or send.
    var readableRegion: UnsafeMutableRawBufferPointer {
        UnsafeMutableRawBufferPointer(start: base + readerIndex, count: count)
    }
    /// The spare region, as the kernel sees it for a read or receive.
    var spareRegion: UnsafeMutableRawBufferPointer {
        UnsafeMutableRawBufferPointer(start: base + writerIndex, count: spareCapacity)
    }
    /// Records that the kernel appended `n` bytes.
    mutating func didAppend(_ n: Int) { writerIndex += min(max(n, 0), spareCapacity) }
    /// Records that the kernel took `n` bytes of the readable ones.
    mutating func didSend(_ n: Int) { consume(min(max(n, 0), count)) }
}

/// Several `IOBuffer`s used as one scatter/gather vector by readv and writev.
///
/// Noncopyable for the same reason as `IOBuffer`; its storage is on the heap so the
/// `iovec` array the kernel reads stays put while the vector is moved around.
public struct IOVector: ~Copyable, @unchecked Sendable {
    @usableFromInline var storage: UnsafeMutablePointer<IOBuffer>
    let vectors: UnsafeMutablePointer<iovec>
    /// Number of buffers.
    public private(set) var count: Int = 0
    /// Most buffers this vector can hold.
    public let capacity: Int

    /// An empty vector with room for `capacity` buffers (at most IOV_MAX, 1024).
    public init(capacity: Int) {
        precondition(capacity >= 1 && capacity <= 1024, "IOVector capacity must be 1...1024 (IOV_MAX)")
        self.capacity = capacity
        storage = .allocate(capacity: capacity)
        vectors = .allocate(capacity: capacity)
    }

    deinit {
        storage.deinitialize(count: count)
        storage.deallocate()
        vectors.deallocate()
    }

    /// Appends `buffer` (moving it into the vector).
    public mutating func append(_ buffer: consuming IOBuffer) {
        precondition(count < capacity, "IOVector is full")
        (storage + count).initialize(to: buffer)
        count += 1
    }

    /// Removes and returns the last buffer.
    public mutating func removeLast() -> IOBuffer {
        precondition(count > 0, "IOVector is empty")
        count -= 1
        return (storage + count).move()
    }

    /// Calls `body` with buffer `index`.
    public func withBuffer<R, E: Error>(at index: Int, _ body: (borrowing IOBuffer) throws(E) -> R) throws(E) -> R {
        precondition(index >= 0 && index < count, "IOVector index out of range")
        return try body(storage[index])
    }

    /// Mutates buffer `index` in place.
    public mutating func modifyBuffer<R, E: Error>(at index: Int, _ body: (inout IOBuffer) throws(E) -> R) throws(E) -> R {
        precondition(index >= 0 && index < count, "IOVector index out of range")
        return try body(&storage[index])
    }

    /// Readable bytes over all buffers.
    public var totalCount: Int { (0..<count).reduce(0) { $0 + storage[$1].count } }

    // MARK: For the backends

    /// Fills the iovec array for a writev (readable regions) or a readv (spare regions).
    func fillVectors(forWriting: Bool) -> (UnsafeMutablePointer<iovec>, Int, Int) {
        var total = 0
        for i in 0..<count {
            let region = forWriting ? storage[i].readableRegion : storage[i].spareRegion
            vectors[i] = iovec(iov_base: region.baseAddress, iov_len: region.count)
            total += region.count
        }
        return (vectors, count, total)
    }

    /// Distributes `n` bytes the kernel read over the spare regions, in order.
    mutating func didRead(_ n: Int) {
        var left = max(n, 0)
        for i in 0..<count where left > 0 {
            let take = min(left, storage[i].spareCapacity)
            storage[i].didAppend(take)
            left -= take
        }
    }

    /// Consumes `n` bytes the kernel wrote from the readable regions, in order.
    mutating func didWrite(_ n: Int) {
        var left = max(n, 0)
        for i in 0..<count where left > 0 {
            let take = min(left, storage[i].count)
            storage[i].consume(take)
            left -= take
        }
    }
}
