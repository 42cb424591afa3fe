import Synchronization

/// Names one submitted operation until its final completion.
///
/// A backend hands out a token from `prepare`; it is the slot of the operation's record
/// (low 32 bits) and that slot's generation (high 32 bits), so a token kept after its
/// operation completed can never cancel or match the operation that reuses the slot.
/// Each backend's generations start at a value of its own (`GenerationSeed`), so a token
/// given to another loop's `cancel` finds nothing there instead of that loop's operation
/// in the same slot.
/// `index` is below the backend's record count, so callers can keep per-operation state
/// in a plain array indexed by it.
public struct Token: Hashable, Sendable, CustomStringConvertible {
    public let rawValue: UInt64

    public init(rawValue: UInt64) { self.rawValue = rawValue }

    init(index: UInt32, generation: UInt32) {
        rawValue = UInt64(generation) << 32 | UInt64(index)
    }

    /// The record slot; dense from 0.
    public var index: Int { Int(UInt32(truncatingIfNeeded: rawValue)) }
    /// The slot's generation when the operation was prepared.
    public var generation: UInt32 { UInt32(truncatingIfNeeded: rawValue >> 32) }

    /// user_data of the backend's own SQEs, which never reach callers.
    static let internalOperation = Token(index: .max, generation: .max)
    /// user_data of an IORING_OP_MSG_RING wake-up from another loop: it only ends the wait.
    static let ringWake = Token(index: .max - 1, generation: .max)

    public var description: String { "#\(index).\(generation)" }
}

/// Where the slot generations of a new operation table or timer queue start: a
/// process-wide count times 2^32/φ (Fibonacci hashing), so the N tables and queues made
/// so far start at least about 0.38 · 2^32 / N apart (consecutive ones 1.6 · 10^9). Two loops
/// used the same way never hand out the same token or timer handle: one loop's handle
/// given to another's `cancel` matches nothing there, unless one of its slots was reused
/// that many more times than the other's.
enum GenerationSeed {
    private static let count = Atomic<UInt32>(0)

    static func next() -> UInt32 {
        count.wrappingAdd(1, ordering: .relaxed).newValue &* 0x9E37_79B9
    }
}
