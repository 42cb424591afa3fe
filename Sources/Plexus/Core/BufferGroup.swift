/// Equal-sized receive buffers that the kernel picks from, one per chunk, for
/// `Operation.receiveMultishot`: a provided buffer ring (IORING_REGISTER_PBUF_RING) on
/// io_uring, a free list the backend picks from on epoll and poll.
///
/// A completion of a multishot receive names the buffer it filled (`bufferID`); read it
/// with `withBuffer`, then hand it back with the backend's `recycle`. Until then the
/// kernel cannot reuse it, and when every buffer is out the receive pauses (ENOBUFS on
/// io_uring) and resumes at the next recycle: a slow reader bounds its own memory.
/// Recycling a buffer that is not out (a second time) does nothing: it never puts one
/// buffer in the kernel's hands twice, where two chunks would share it.
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
        storage = BufferStorage(byteCount: count * size, buffers: count)
    }

    /// The first group id from `next` on (wrapping around) that is not `inUse`; nil when
    /// all 65536 are. Ids wrap: a long-lived group must not share its id with a new one.
    static func freeID(from next: UInt16, inUse: (UInt16) -> Bool) -> UInt16? {
        var id = next
        for _ in 0...Int(UInt16.max) {
            if !inUse(id) { return id }
            id &+= 1
        }
        return nil
    }

    // Which buffers are out: handed to the caller in a completion and not yet recycled.
    // Kept with the buffers, for every backend alike; loop thread only.

    /// Buffers handed out and not yet recycled.
    var outstanding: Int { storage.outCount }

    /// Buffer `id` was handed to the caller (a completion names it).
    func handOut(_ id: UInt16) { _ = storage.setOut(id, true) }

    /// Buffer `id` comes back; false when it was not out (recycled twice, or never handed
    /// out), and then nothing may reuse it a second time.
    func takeBack(_ id: UInt16) -> Bool { storage.setOut(id, false) }

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

/// The memory of a buffer group, freed when the last group value and the backend drop it,
/// and one bit per buffer: out (with the caller) or not.
final class BufferStorage: @unchecked Sendable {
    let base: UnsafeMutableRawPointer
    private var out: [UInt64]
    private(set) var outCount = 0

    init(byteCount: Int, buffers: Int) {
        base = .allocate(byteCount: max(byteCount, 1), alignment: 4096)
        out = Array(repeating: 0, count: (buffers + 63) / 64)
    }
    deinit { base.deallocate() }

    /// Sets buffer `id` out or back; false when it already was.
    func setOut(_ id: UInt16, _ isOut: Bool) -> Bool {
        let word = Int(id) / 64, bit = UInt64(1) << (UInt64(id) % 64)
        guard (out[word] & bit != 0) != isOut else { return false }
        out[word] ^= bit
        outCount += isOut ? 1 : -1
        return true
    }
}
