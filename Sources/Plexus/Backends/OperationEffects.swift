import CPlexus
import Glibc
import SystemPackage


/// Checks and effects every backend applies the same way, so that an operation means
/// the same thing on io_uring, epoll and poll.
extension Operation {
    /// Linux caps one read or write at this many bytes (MAX_RW_COUNT); so do we.
    static let maxTransfer = 0x7fff_f000

    /// The kernel's view of the operation: fd, memory region or iovecs, offset, flags,
    /// with the msghdr, address or timespec written into `scratch`. `invalid` is set
    /// (to -EINVAL, -EBADF or -ENOENT) for input no backend may pass to the kernel: an
    /// empty buffer (a read of 0 bytes would look like end of file), a negative offset
    /// (io_uring reads -1 as "the file position"), a negative fd, an empty path.
    /// A record holds a read's, write's, send's or recv's buffer apart, and
    /// `OperationRecord.kernelView` makes their views; this makes the others'.
    mutating func kernelView(scratch: UnsafeMutablePointer<plexus_op_scratch>) -> KernelView {
        var v = KernelView()
        switch consume self {
        case .readv(let fd, let vector, let offset):
            let (iov, count, total) = vector.fillVectors(forWriting: false)
            v.setVector(fd, iov, count, total, offset); self = .readv(fd, vector, offset: offset)
        case .writev(let fd, let vector, let offset):
            let (iov, count, total) = vector.fillVectors(forWriting: true)
            v.setVector(fd, iov, count, total, offset); self = .writev(fd, vector, offset: offset)
        case .sendMessage(let fd, let m, let flags):
            v.set(fd, m.buffer.readableRegion, nil, emptyAllowed: true); v.flags = flags | Int32(MSG_NOSIGNAL)
            Self.fillMessage(scratch, m.buffer.readableRegion, address: m.address)
            self = .sendMessage(fd, m, flags: flags)
        case .receiveMessage(let fd, let m, let flags):
            v.set(fd, m.buffer.spareRegion, nil); v.flags = flags
            Self.fillMessage(scratch, m.buffer.spareRegion, address: nil)
            scratch.pointee.message.msg_namelen = socklen_t(MemoryLayout<sockaddr_storage>.size)
            self = .receiveMessage(fd, m, flags: flags)
        case let other:
            self = other
            v = bufferlessView(scratch: scratch)
        }
        return v
    }

    /// `kernelView` of an operation without buffers, read in place: `switch consume self`
    /// and rebuilding `self` moves the whole enum through registers and back (~90
    /// instructions for a NOP). Buffers cannot be bound without consuming (a borrowing
    /// binding of a noncopyable payload in a tuple is a compiler error in Swift 6.3), so
    /// `kernelView` handles those; `OperationRecord.kernelView` calls this directly for
    /// the others. `mutating` only so that it applies to a record's `operation!` in place.
    mutating func bufferlessView(scratch: UnsafeMutablePointer<plexus_op_scratch>) -> KernelView {
        var v = KernelView()
        switch self {
        case .receiveMultishot(let fd, let group):
            v.setFD(fd); v.length = group.size
        case .accept(let fd, _):
            v.setFD(fd)
        case .close(let fd):
            v.setFD(fd)
        case .connect(let fd, let address):
            v.setFD(fd)
            scratch.pointee.address_length = address.write(to: &scratch.pointee.address)
        case .poll(let fd, let events, _):
            v.setFD(fd); v.flags = Int32(bitPattern: events.rawValue)
        case .timeout(let duration):
            scratch.pointee.timeout = __kernel_timespec(nanoseconds: duration.nanosecondsClamped)
        case .deadline(let deadline):
            scratch.pointee.timeout = __kernel_timespec(nanoseconds: deadline.nanoseconds)
        case .open(let path, let flags, _, let directory):
            v.fd = directory?.rawValue ?? AT_FDCWD
            if path.isEmpty { v.invalid = -ENOENT }
            v.flags = flags | O_CLOEXEC
        case .fsync(let fd, let dataOnly):
            v.setFD(fd); v.flags = dataOnly ? 1 : 0
        case .shutdown(let fd, let how):
            v.setFD(fd); v.flags = how
        default:  // nop, cancel (and the operations with buffers, which never come here)
            assert(!kind.hasBuffers, "\(kind) has buffers: it needs kernelView")
        }
        return v
    }

    /// Applies a final result to the operation's buffers: reads append, writes consume,
    /// a received message learns its sender from `scratch` (a read's, write's, send's or
    /// recv's buffer, held apart in its record, in `OperationRecord.apply`). Inline, so
    /// that a result with nothing to apply (0, an error) costs no call.
    @inline(__always)
    mutating func apply(result: Int32, kind: OperationKind, scratch: UnsafeMutablePointer<plexus_op_scratch>) {
        // An empty datagram has a sender too; a failed receive has none (not even one the
        // message held before).
        if result > 0 || kind == .receiveMessage {
            applyToVectorOrMessage(transferred: Int(result), scratch: scratch)
        }
    }

    private mutating func applyToVectorOrMessage(transferred n: Int, scratch: UnsafeMutablePointer<plexus_op_scratch>) {
        switch consume self {
        case .readv(let fd, var v, let offset):
            v.didRead(n); self = .readv(fd, v, offset: offset)
        case .writev(let fd, var v, let offset):
            v.didWrite(n); self = .writev(fd, v, offset: offset)
        case .sendMessage(let fd, var m, let flags):
            m.buffer.consume(min(n, m.buffer.count)); self = .sendMessage(fd, m, flags: flags)
        case .receiveMessage(let fd, var m, let flags):
            m.buffer.didAppend(n)
            let length = scratch.pointee.message.msg_namelen
            m.address = n >= 0 && length > 0 ? SocketAddress(storage: scratch.pointee.address, length: length) : nil
            m.truncated = n >= 0 && scratch.pointee.message.msg_flags & Int32(MSG_TRUNC) != 0
            self = .receiveMessage(fd, m, flags: flags)
        case let other:
            self = other
        }
    }

    private static func fillMessage(_ scratch: UnsafeMutablePointer<plexus_op_scratch>,
                                    _ region: UnsafeMutableRawBufferPointer, address: SocketAddress?) {
        scratch.pointee.vector = iovec(iov_base: region.baseAddress, iov_len: min(region.count, maxTransfer))
        var header = msghdr()
        withUnsafeMutablePointer(to: &scratch.pointee.vector) { header.msg_iov = $0 }
        header.msg_iovlen = 1
        if let address {
            header.msg_namelen = address.write(to: &scratch.pointee.address)
        }
        withUnsafeMutablePointer(to: &scratch.pointee.address) {
            header.msg_name = UnsafeMutableRawPointer($0)
        }
        if address == nil { header.msg_namelen = 0 }
        scratch.pointee.message = header
    }
}

/// What a backend hands the kernel for one operation (see `Operation.kernelView`).
struct KernelView {
    var fd: Int32 = -1
    var base: UnsafeMutableRawPointer? = nil
    /// Bytes to transfer, capped at `Operation.maxTransfer`.
    var length = 0
    /// -1 means "at the file position".
    var offset: Int64 = -1
    var vectors: UnsafeMutablePointer<iovec>? = nil
    var vectorCount = 0
    /// send/recv flags, poll events, open flags, fsync's data-only bit or shutdown's how.
    var flags: Int32 = 0
    /// A negative errno when the input must not reach the kernel.
    var invalid: Int32? = nil

    mutating func setFD(_ fd: FileDescriptor) {
        self.fd = fd.rawValue
        if fd.rawValue < 0 { invalid = -EBADF }
    }

    /// `emptyAllowed`: a sendmsg of no bytes is a datagram of its own (on a datagram
    /// socket), not a mistake; every other operation given no room is EINVAL.
    mutating func set(_ fd: FileDescriptor, _ region: UnsafeMutableRawBufferPointer, _ offset: Int64?,
                      emptyAllowed: Bool = false) {
        setFD(fd)
        base = region.baseAddress
        length = min(region.count, Operation.maxTransfer)
        check(region.count, offset, emptyAllowed: emptyAllowed)
    }

    mutating func setVector(_ fd: FileDescriptor, _ iov: UnsafeMutablePointer<iovec>, _ count: Int, _ total: Int, _ offset: Int64?) {
        setFD(fd)
        vectors = iov
        vectorCount = count
        length = min(total, Operation.maxTransfer)
        check(total, offset)
    }

    private mutating func check(_ total: Int, _ offset: Int64?, emptyAllowed: Bool = false) {
        if let offset {
            if offset < 0 { invalid = invalid ?? -EINVAL }
            self.offset = offset
        }
        if total == 0 && !emptyAllowed { invalid = invalid ?? -EINVAL }
    }
}

extension __kernel_timespec {
    /// The timespec io_uring takes for a timeout, a deadline or a wait, from nanoseconds.
    init(nanoseconds ns: UInt64) {
        self.init(tv_sec: Int64(ns / 1_000_000_000), tv_nsec: Int64(ns % 1_000_000_000))
    }

    /// Back to nanoseconds: the instant of an absolute timeout, as `Deadline` counts it.
    var nanoseconds: UInt64 { UInt64(tv_sec) &* 1_000_000_000 &+ UInt64(tv_nsec) }
}
