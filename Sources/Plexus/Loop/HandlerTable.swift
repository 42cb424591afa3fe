import SystemPackage

/// What to call when an operation completes, in the shape its adapter promised.
///
/// One case per callback shape instead of a wrapping closure: a closure that captures
/// the user's closure costs an allocation per operation (FIELD-NOTES.md), a stored
/// case costs nothing.
enum Handler {
    case none
    case completion((consuming Completion) throws -> Void)
    case count((Result<Int, PlexusError>) throws -> Void)
    case buffer((Result<Int, PlexusError>, consuming IOBuffer) throws -> Void)
    case vector((Result<Int, PlexusError>, consuming IOVector) throws -> Void)
    case message((Result<Int, PlexusError>, consuming Message) throws -> Void)
    case descriptor((Result<FileDescriptor, PlexusError>) throws -> Void)
    case done((Result<Void, PlexusError>) throws -> Void)
    case events((Result<PollEvents, PlexusError>) throws -> Void)
    /// An awaiting task, parked in `AsyncSlots` at this index.
    case resume(Int)
    /// The loop's own eventfd read.
    case wake
}

/// Handlers indexed by token index: the backend's slots are dense from 0, so a plain
/// growable array of the same size needs no hashing.
struct HandlerSlot {
    var handler: Handler = .none
    /// The token the handler belongs to: a stale token (its slot reused) must not touch it.
    var token = Token(rawValue: .max)
    /// The user asked to cancel; an fd the operation still produced is closed.
    var cancelRequested = false
}

final class HandlerTable {
    @exclusivity(unchecked) private(set) var slots: UnsafeMutablePointer<HandlerSlot>
    @exclusivity(unchecked) private(set) var capacity: Int

    init(capacity: Int = 256) {
        self.capacity = capacity
        slots = .allocate(capacity: capacity)
        slots.initialize(repeating: HandlerSlot(), count: capacity)
    }

    deinit {
        slots.deinitialize(count: capacity)
        slots.deallocate()
    }

    @inline(__always)
    func slot(_ index: Int) -> UnsafeMutablePointer<HandlerSlot> {
        if index >= capacity { grow(to: index + 1) }
        return slots + index
    }

    private func grow(to needed: Int) {
        var newCapacity = capacity * 2
        while newCapacity < needed { newCapacity *= 2 }
        let bigger = UnsafeMutablePointer<HandlerSlot>.allocate(capacity: newCapacity)
        bigger.moveInitialize(from: slots, count: capacity)
        (bigger + capacity).initialize(repeating: HandlerSlot(), count: newCapacity - capacity)
        slots.deallocate()
        slots = bigger
        capacity = newCapacity
    }
}
