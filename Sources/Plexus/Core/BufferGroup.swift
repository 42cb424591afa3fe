/// Equal-sized receive buffers that the kernel picks from, one per chunk, for
/// `Operation.receiveMultishot`: a provided buffer ring (IORING_REGISTER_PBUF_RING) on
/// io_uring, a free list the backend picks from on epoll and poll.
///
/// A completion of a multishot receive names the buffer it filled (`bufferID`); read it
/// with `withBuffer`, then hand it back with the backend's `recycle`. Until then the
/// kernel cannot reuse it, and when every buffer is out the receive pauses (ENOBUFS on
/// io_uring) and resumes at the next recycle: a slow reader bounds its own memory.
public struct BufferGroup: Sendable, Hashable {
    /// The group id the kernel knows (bgid).
    public let id: UInt16
    /// Buffers in the group (a power of two).
    public let count: Int
    /// Bytes per buffer.
    public let size: Int
    let storage: BufferStorage

    init(id: UInt16, count: Int, size: Int) {
        self.id = id
        self.count = count
        self.size = size
        storage = BufferStorage(byteCount: count * size)
    }

    /// Calls `body` with the first `length` bytes of buffer `id` (a completion's result).
    public func withBuffer<R, E: Error>(_ id: UInt16, length: Int,
                                        _ body: (UnsafeRawBufferPointer) throws(E) -> R) throws(E) -> R {
        precondition(Int(id) < count && length >= 0 && length <= size, "buffer \(id) or length \(length) out of range")
        return try body(UnsafeRawBufferPointer(start: address(of: id), count: length))
    }

    func address(of id: UInt16) -> UnsafeMutableRawPointer { storage.base + Int(id) * size }

    public static func == (a: BufferGroup, b: BufferGroup) -> Bool { a.storage === b.storage }
    public func hash(into hasher: inout Hasher) { hasher.combine(ObjectIdentifier(storage)) }
}

/// The memory of a buffer group, freed when the last group value and the backend drop it.
final class BufferStorage: @unchecked Sendable {
    let base: UnsafeMutableRawPointer
    init(byteCount: Int) { base = .allocate(byteCount: max(byteCount, 1), alignment: 4096) }
    deinit { base.deallocate() }
}
