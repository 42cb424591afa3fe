import CPlexus
import Glibc
import SystemPackage

/// The per-operation record a backend keeps from `prepare` to the final completion.
///
/// Its size is pinned by a test: it is what every in-flight operation costs.
struct OperationRecord: ~Copyable {
    /// The operation and its buffers; nil while the slot is free, and for a read, write,
    /// send or recv, whose parts are held apart (`buffer`, `argument`).
    var operation: Operation?
    /// The buffer of a read, write, send or recv. Held apart from an `Operation` so the
    /// backends read and change it in place: an enum payload can only be reached by
    /// moving the whole 92-byte operation out and back, which the view, the result and the
    /// hand-back each paid (34 instructions per read in plexus-bench file-qd1 on io_uring,
    /// 81 per ping-pong round trip).
    var buffer: Optional<IOBuffer> = nil
    /// read, write: the offset (when `hasOffset`); send, recv: the flags.
    var argument: Int64 = 0
    var generation: UInt32 = 0
    /// Next slot in the free list or in a backend's wait queue.
    var next: UInt32 = OperationTable.none
    var kind: OperationKind = .nop
    /// The operation's fd, -1 if it has none (kept here for per-fd queues and cancels).
    var fd: Int32 = -1
    var state: State = .free
    /// io_uring only: a cancel of it was prepared. A multishot receive the kernel ends for
    /// want of buffers before the cancel reaches it then ends cancelled, not parked.
    var cancelRequested = false
    /// io_uring only: how its deadline, if any, is enforced, and whether it fired.
    var deadline: DeadlineMark = .none
    /// read, write: `argument` is an offset.
    var hasOffset = false
    /// Prepared by the loop for a handler that takes only the buffer back
    /// (`PreparesBufferOperations.prepareHandingBack`): the final completion may hand the
    /// buffer over alone, without an `Operation` or a `Completion` built around it.
    var handsBackBuffer = false

    enum DeadlineMark: UInt8 {
        case none
        /// An IORING_OP_LINK_TIMEOUT at the instant in the record's scratch `timeout`.
        case linked
        /// Its standalone timeout fired: the cancel that follows is the deadline's.
        case fired
    }

    enum State: UInt8 {
        case free
        /// Prepared, not yet submitted.
        case prepared
        /// Submitted; the kernel (or the readiness backend) owns it.
        case inFlight
        /// io_uring only: the kernel said EAGAIN (an old kernel and an O_NONBLOCK file), so
        /// a poll for readiness is in flight under the same token; then the operation reruns.
        case awaitingReadiness
        /// A multishot receive whose buffer group ran dry: parked until a recycle.
        case awaitingBuffers
        /// io_uring only: a read of an empty pipe, parked until the pipe's multishot poll
        /// reports data; nothing of it is in the kernel.
        case awaitingPipe
    }
}

extension OperationRecord {
    /// A prepared read, write, send or recv, its parts apart.
    @inline(__always)
    init(buffer: consuming IOBuffer, kind: OperationKind, fd: FileDescriptor, offset: Int64? = nil, flags: Int32 = 0,
         generation: UInt32) {
        assert(kind == .read || kind == .write || kind == .send || kind == .recv, "\(kind) has no single buffer")
        assert(offset == nil || flags == 0, "an offset is for reads and writes, flags for sends and receives")
        self.init(operation: nil, buffer: buffer, argument: offset ?? Int64(flags), generation: generation,
                  next: OperationTable.none, kind: kind, fd: fd.rawValue, state: .prepared, hasOffset: offset != nil)
    }

    /// The operation as prepared, its buffers with the result applied; the record keeps
    /// none of it.
    @inline(__always)
    mutating func take() -> Operation? {
        // Case by case, not through `Operation(kind, fd, ...)`: its precondition and second
        // switch cost every read 6-12 instructions here.
        let fd = FileDescriptor(rawValue: self.fd)
        switch kind {
        case .read: return .read(fd, buffer.take()!, offset: hasOffset ? argument : nil)
        case .write: return .write(fd, buffer.take()!, offset: hasOffset ? argument : nil)
        case .send: return .send(fd, buffer.take()!, flags: Int32(truncatingIfNeeded: argument))
        case .recv: return .recv(fd, buffer.take()!, flags: Int32(truncatingIfNeeded: argument))
        default: return operation.take()
        }
    }

    /// The kernel's view of the operation (`Operation.kernelView`); a read's, write's,
    /// send's or recv's straight from the record's fields.
    @inline(__always)
    mutating func kernelView(scratch: UnsafeMutablePointer<plexus_op_scratch>) -> KernelView {
        switch kind {
        case .read, .write, .send, .recv:
            var v = KernelView()
            let region = bufferRegion
            if kind == .read || kind == .write {
                v.set(FileDescriptor(rawValue: fd), region, hasOffset ? argument : nil)
            } else {
                v.set(FileDescriptor(rawValue: fd), region, nil)
                v.flags = Int32(truncatingIfNeeded: argument) | (kind == .send ? Int32(MSG_NOSIGNAL) : 0)
            }
            return v
        case .readv, .writev, .sendMessage, .receiveMessage:
            return operation!.kernelView(scratch: scratch)
        default:
            return operation!.bufferlessView(scratch: scratch)
        }
    }

    /// What the kernel sees of a read's, write's, send's or recv's buffer: the spare
    /// capacity to read or receive into, the readable bytes to write or send; empty
    /// without a buffer.
    @inline(__always)
    var bufferRegion: UnsafeMutableRawBufferPointer {
        switch buffer {  // borrowed: `buffer!` would move it out
        case .some(let b): kind == .read || kind == .recv ? b.spareRegion : b.readableRegion
        case .none: UnsafeMutableRawBufferPointer(start: nil, count: 0)
        }
    }

    /// A read's, write's, send's or recv's region as the kernel gets it (`KernelView.set`):
    /// its start, and its size capped at `Operation.maxTransfer`; 0 without a buffer.
    @inline(__always)
    var transfer: (base: UnsafeMutableRawPointer?, length: Int) {
        let region = bufferRegion
        return (region.baseAddress, min(region.count, Operation.maxTransfer))
    }

    /// Applies a final result to the operation's buffers (`Operation.apply`).
    @inline(__always)
    mutating func apply(result: Int32, kind: OperationKind, scratch: UnsafeMutablePointer<plexus_op_scratch>) {
        switch kind {
        case .read, .recv:
            if result > 0 { buffer!.didAppend(Int(result)) }
        case .write, .send:
            if result > 0 { buffer!.didSend(Int(result)) }
        default:
            operation!.apply(result: result, kind: kind, scratch: scratch)
        }
    }
}

/// A slab of operation records and their kernel-visible scratch memory, indexed by
/// token. Records live in fixed chunks that never move, so the addresses handed to
/// the kernel (iovecs, msghdrs, sockaddrs, timespecs) stay valid until completion.
///
/// A value type holding only pointers: the backends keep it in a `let`, so the hot path
/// pays no exclusivity checks (FIELD-NOTES.md: a raw-pointer slab runs near C speed).
struct OperationTable {
    static let none = UInt32.max
    static let chunkShift = 8
    static let chunkSize = 1 << chunkShift
    static let maxChunks = 1 << 14  // 4M operations in flight

    private struct Header {
        var freeHead: UInt32 = OperationTable.none
        var chunkCount = 0
        var live = 0
        /// Every slot's first generation (`GenerationSeed`).
        let seed = GenerationSeed.next()
    }

    private let header: UnsafeMutablePointer<Header>
    private let records: UnsafeMutablePointer<UnsafeMutablePointer<OperationRecord>?>
    private let scratches: UnsafeMutablePointer<UnsafeMutablePointer<plexus_op_scratch>?>

    init() {
        header = .allocate(capacity: 1)
        header.initialize(to: Header())
        records = .allocate(capacity: Self.maxChunks)
        records.initialize(repeating: nil, count: Self.maxChunks)
        scratches = .allocate(capacity: Self.maxChunks)
        scratches.initialize(repeating: nil, count: Self.maxChunks)
    }

    /// Frees the table; every record must already be free.
    func destroy() {
        for c in 0..<header.pointee.chunkCount {
            records[c]!.deinitialize(count: Self.chunkSize)
            records[c]!.deallocate()
            scratches[c]!.deallocate()
        }
        records.deallocate()
        scratches.deallocate()
        header.deallocate()
    }

    /// Records in use.
    var liveCount: Int { header.pointee.live }
    /// Slots allocated so far (every token index is below this).
    var slotCount: Int { header.pointee.chunkCount << Self.chunkShift }

    @inline(__always)
    func record(_ index: Int) -> UnsafeMutablePointer<OperationRecord> {
        records[index >> Self.chunkShift].unsafelyUnwrapped + (index & (Self.chunkSize - 1))
    }

    @inline(__always)
    func scratch(_ index: Int) -> UnsafeMutablePointer<plexus_op_scratch> {
        scratches[index >> Self.chunkShift].unsafelyUnwrapped + (index & (Self.chunkSize - 1))
    }

    /// Takes a free slot for `operation`; allocates only when every chunk is full.
    @inline(__always)
    func insert(_ operation: consuming Operation) -> Token {
        let (r, token) = claim()
        // Initialized over, not assigned: a free slot holds no operation (`remove` took it)
        // and plain fields only, and assigning would destroy its nil `Operation?` through
        // the runtime's value witnesses.
        switch consume operation {
        case .read(let fd, let b, let offset):
            r.initialize(to: OperationRecord(buffer: b, kind: .read, fd: fd, offset: offset, generation: token.generation))
        case .write(let fd, let b, let offset):
            r.initialize(to: OperationRecord(buffer: b, kind: .write, fd: fd, offset: offset, generation: token.generation))
        case .send(let fd, let b, let flags):
            r.initialize(to: OperationRecord(buffer: b, kind: .send, fd: fd, flags: flags, generation: token.generation))
        case .recv(let fd, let b, let flags):
            r.initialize(to: OperationRecord(buffer: b, kind: .recv, fd: fd, flags: flags, generation: token.generation))
        case let other:
            let kind = other.kind
            let fd = other.fileDescriptor?.rawValue ?? -1
            r.initialize(to: OperationRecord(operation: other, generation: token.generation, next: Self.none,
                                             kind: kind, fd: fd, state: .prepared, cancelRequested: false, deadline: .none))
        }
        return token
    }

    /// `insert` of a read, write, send or recv (`kind`) from its parts.
    @inline(__always)
    func insert(_ kind: OperationKind, _ fd: FileDescriptor, _ buffer: consuming IOBuffer, offset: Int64?,
                flags: Int32, handsBackBuffer: Bool = false) -> Token {
        let (r, token) = claim()
        r.initialize(to: OperationRecord(buffer: buffer, kind: kind, fd: fd, offset: offset, flags: flags,
                                         generation: token.generation))
        r.pointee.handsBackBuffer = handsBackBuffer
        return token
    }

    /// A free slot, to be initialized, and its token.
    @inline(__always)
    private func claim() -> (UnsafeMutablePointer<OperationRecord>, Token) {
        if header.pointee.freeHead == Self.none { grow() }
        let index = Int(header.pointee.freeHead)
        let r = record(index)
        header.pointee.freeHead = r.pointee.next
        header.pointee.live += 1
        return (r, Token(index: UInt32(index), generation: r.pointee.generation))
    }

    /// The record `token` names, if that operation is still live.
    @inline(__always)
    func live(_ token: Token) -> UnsafeMutablePointer<OperationRecord>? {
        guard token.index < slotCount else { return nil }
        let r = record(token.index)
        return r.pointee.state != .free && r.pointee.generation == token.generation ? r : nil
    }

    /// Frees the slot and hands back its operation; the generation moves on so the old token dies.
    @inline(__always)
    func remove(_ index: Int) -> Operation? {
        let r = record(index)
        let operation = r.pointee.take()
        free(r, index)
        return operation
    }

    /// `remove` of a read, write, send or recv whose buffer alone goes back (`handsBackBuffer`).
    @inline(__always)
    func removeBuffer(_ index: Int) -> IOBuffer {
        let r = record(index)
        let buffer = r.pointee.buffer.take()!
        r.pointee.handsBackBuffer = false
        free(r, index)
        return buffer
    }

    @inline(__always)
    private func free(_ r: UnsafeMutablePointer<OperationRecord>, _ index: Int) {
        r.pointee.state = .free
        r.pointee.generation &+= 1
        r.pointee.next = header.pointee.freeHead
        header.pointee.freeHead = UInt32(index)
        header.pointee.live -= 1
    }

    /// Indices of every live record.
    func liveIndices() -> [Int] {
        (0..<slotCount).filter { record($0).pointee.state != .free }
    }

    private func grow() {
        let c = header.pointee.chunkCount
        precondition(c < Self.maxChunks, "more than \(Self.maxChunks << Self.chunkShift) operations in flight")
        let chunk = UnsafeMutablePointer<OperationRecord>.allocate(capacity: Self.chunkSize)
        for i in 0..<Self.chunkSize {
            (chunk + i).initialize(to: OperationRecord(generation: header.pointee.seed))
        }
        let scratch = UnsafeMutablePointer<plexus_op_scratch>.allocate(capacity: Self.chunkSize)
        scratch.initialize(repeating: plexus_op_scratch(), count: Self.chunkSize)
        records[c] = chunk
        scratches[c] = scratch
        header.pointee.chunkCount = c + 1
        // Thread the new slots onto the free list, lowest index first.
        let first = c << Self.chunkShift
        for i in 0..<Self.chunkSize {
            chunk[i].next = i + 1 < Self.chunkSize ? UInt32(first + i + 1) : header.pointee.freeHead
        }
        header.pointee.freeHead = UInt32(first)
    }
}
