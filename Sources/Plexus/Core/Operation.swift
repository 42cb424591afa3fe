import CPlexus
import SystemPackage

/// One thing for a backend to do. Every backend accepts every operation and reports
/// the same completion for it (docs/design.md, "The one protocol").
///
/// An operation owns its buffers (`IOBuffer`, `IOVector`, `Message`) from `prepare`
/// until its final completion hands it back in `Completion.operation`.
public enum Operation: ~Copyable, Sendable {
    /// Completes with 0 (IORING_OP_NOP).
    case nop
    /// read(2)/pread(2) into the spare capacity; `offset` nil reads at the file position.
    case read(FileDescriptor, IOBuffer, offset: Int64? = nil)
    /// write(2)/pwrite(2) of the readable bytes; the completion consumes what was written.
    case write(FileDescriptor, IOBuffer, offset: Int64? = nil)
    /// readv(2)/preadv(2) into the spare capacity of each buffer in turn.
    case readv(FileDescriptor, IOVector, offset: Int64? = nil)
    /// writev(2)/pwritev(2) of the readable bytes of each buffer in turn.
    case writev(FileDescriptor, IOVector, offset: Int64? = nil)
    /// send(2) of the readable bytes (MSG_NOSIGNAL is always added).
    case send(FileDescriptor, IOBuffer, flags: Int32 = 0)
    /// recv(2) into the spare capacity.
    case recv(FileDescriptor, IOBuffer, flags: Int32 = 0)
    /// Multishot recv(2) into buffers of `group` the kernel picks: one completion per
    /// chunk, with the result's byte count and the `bufferID` it filled (see `BufferGroup`),
    /// until end of file (a final 0), an error, or cancel.
    case receiveMultishot(FileDescriptor, BufferGroup)
    /// sendmsg(2): the message's bytes, to its address if it has one.
    case sendMessage(FileDescriptor, Message, flags: Int32 = 0)
    /// recvmsg(2): appends to the message's buffer and sets its address to the sender's.
    case receiveMessage(FileDescriptor, Message, flags: Int32 = 0)
    /// accept4(2) with SOCK_CLOEXEC|SOCK_NONBLOCK; the result is the new fd.
    /// Multishot completes once per connection until cancelled or failed.
    case accept(FileDescriptor, multishot: Bool = false)
    /// connect(2); completes when the connection is established or failed.
    case connect(FileDescriptor, SocketAddress)
    /// Readiness as an operation: completes with the ready `PollEvents` bits.
    /// Multishot completes on every readiness edge until cancelled (on the poll backend,
    /// which has no edges, on every turn of the loop while the fd stays ready).
    case poll(FileDescriptor, PollEvents, multishot: Bool = false)
    /// Completes with 0 after `duration` (CLOCK_MONOTONIC), or -ECANCELED.
    case timeout(Duration)
    /// Completes with 0 at `deadline`, or -ECANCELED.
    case deadline(Deadline)
    /// Cancels the operation `token` names: 0 if it was found (it then completes with
    /// -ECANCELED), -ENOENT if no such operation is pending, -EALREADY if it is running.
    case cancel(Token)
    /// Cancels every pending operation on the fd, then close(2). Afterwards the fd
    /// number is no longer Plexus's.
    case close(FileDescriptor)
    /// openat(2) with O_CLOEXEC added; the result is the new fd. `directory` nil means AT_FDCWD.
    case open(FilePath, flags: Int32, mode: mode_t = 0o644, directory: FileDescriptor? = nil)
    /// fsync(2), or fdatasync(2) when `dataOnly`.
    case fsync(FileDescriptor, dataOnly: Bool = false)
    /// shutdown(2) with SHUT_RD, SHUT_WR or SHUT_RDWR.
    case shutdown(FileDescriptor, how: Int32)

    /// What kind of operation this is, for errors and statistics.
    @inline(__always)
    public var kind: OperationKind {
        switch self {
        case .nop: .nop
        case .read: .read
        case .write: .write
        case .readv: .readv
        case .writev: .writev
        case .send: .send
        case .recv: .recv
        case .receiveMultishot: .receiveMultishot
        case .sendMessage: .sendMessage
        case .receiveMessage: .receiveMessage
        case .accept(_, let multishot): multishot ? .acceptMultishot : .accept
        case .connect: .connect
        case .poll(_, _, let multishot): multishot ? .pollMultishot : .poll
        case .timeout: .timeout
        case .deadline: .timeout
        case .cancel: .cancel
        case .close: .close
        case .open: .open
        case .fsync: .fsync
        case .shutdown: .shutdown
        }
    }

    /// The fd the operation works on, if any.
    @inline(__always)
    public var fileDescriptor: FileDescriptor? {
        switch self {
        case .read(let fd, _, _): fd
        case .write(let fd, _, _): fd
        case .readv(let fd, _, _): fd
        case .writev(let fd, _, _): fd
        case .send(let fd, _, _): fd
        case .recv(let fd, _, _): fd
        case .receiveMultishot(let fd, _): fd
        case .sendMessage(let fd, _, _): fd
        case .receiveMessage(let fd, _, _): fd
        case .accept(let fd, _): fd
        case .connect(let fd, _): fd
        case .poll(let fd, _, _): fd
        case .close(let fd): fd
        case .fsync(let fd, _): fd
        case .shutdown(let fd, _): fd
        default: nil
        }
    }

    /// Takes the single buffer of a read, write, send or recv back out of the operation.
    @inline(__always)  // the loop's dispatch: no call, and no copy of the operation for one
    public consuming func takeBuffer() -> IOBuffer? {
        switch consume self {
        case .read(_, let b, _): return b
        case .write(_, let b, _): return b
        case .send(_, let b, _): return b
        case .recv(_, let b, _): return b
        case .sendMessage(_, let m, _): return m.takeBuffer()
        case .receiveMessage(_, let m, _): return m.takeBuffer()
        default:
            return nil
        }
    }

    /// Ends the operation, freeing its buffers. Operations without buffers end in the
    /// switch itself (a tag check, and a release for a receive's group); letting an
    /// `Operation` go out of scope calls its destroy value witness instead (~55
    /// instructions through the type's metadata).
    @inline(__always)
    consuming func discard() {
        // One label per case: a noncopyable switch takes no multi-pattern labels yet.
        switch consume self {
        case .nop: return
        case .accept: return
        case .poll: return
        case .timeout: return
        case .deadline: return
        case .cancel: return
        case .close: return
        case .fsync: return
        case .shutdown: return
        case .receiveMultishot: return
        case let other: _ = consume other
        }
    }

    /// Takes the vector of a readv or writev back out of the operation.
    public consuming func takeVector() -> IOVector? {
        switch consume self {
        case .readv(_, let v, _): return v
        case .writev(_, let v, _): return v
        default: return nil
        }
    }

    /// Takes the message of a sendMessage or receiveMessage back out of the operation.
    public consuming func takeMessage() -> Message? {
        switch consume self {
        case .sendMessage(_, let m, _): return m
        case .receiveMessage(_, let m, _): return m
        default: return nil
        }
    }
}

/// A datagram for sendmsg/recvmsg: one buffer and an optional peer address.
public struct Message: ~Copyable, Sendable {
    public var buffer: IOBuffer
    /// Destination for sendMessage; after receiveMessage, the sender.
    public var address: SocketAddress?
    /// After receiveMessage: the datagram was longer than the buffer's spare capacity and
    /// its tail was discarded (MSG_TRUNC in the msghdr's flags).
    public internal(set) var truncated = false

    public init(_ buffer: consuming IOBuffer, address: SocketAddress? = nil) {
        self.buffer = buffer
        self.address = address
    }

    public consuming func takeBuffer() -> IOBuffer { buffer }
}

/// poll(2) event bits, used by `Operation.poll` and reported in its result.
public struct PollEvents: OptionSet, Sendable, Hashable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    public static let readable = PollEvents(rawValue: UInt32(POLLIN))
    public static let writable = PollEvents(rawValue: UInt32(POLLOUT))
    public static let priority = PollEvents(rawValue: UInt32(POLLPRI))
    public static let error = PollEvents(rawValue: UInt32(POLLERR))
    public static let hangup = PollEvents(rawValue: UInt32(POLLHUP))
    public static let readHangup = PollEvents(rawValue: UInt32(PLEXUS_POLLRDHUP))
    public static let invalid = PollEvents(rawValue: UInt32(POLLNVAL))
}

/// A point on CLOCK_MONOTONIC, in nanoseconds.
public struct Deadline: Comparable, Hashable, Sendable {
    public let nanoseconds: UInt64
    public init(nanoseconds: UInt64) { self.nanoseconds = nanoseconds }

    /// Now, from clock_gettime(CLOCK_MONOTONIC).
    public static var now: Deadline {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return Deadline(nanoseconds: UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec))
    }

    /// Saturates: a deadline past the end of UInt64 nanoseconds (585 years) is `.max`,
    /// which never comes, instead of wrapping into the past.
    public static func + (d: Deadline, duration: Duration) -> Deadline {
        Deadline(nanoseconds: d.nanoseconds.addingSaturated(duration.nanosecondsClamped))
    }

    public static func < (a: Deadline, b: Deadline) -> Bool { a.nanoseconds < b.nanoseconds }

    /// Time left until the deadline from `now` (zero if passed).
    func remaining(from now: Deadline) -> UInt64 {
        nanoseconds > now.nanoseconds ? nanoseconds - now.nanoseconds : 0
    }
}

extension UInt64 {
    /// `self + other`, or `.max` where that overflows: for deadlines and timer periods, so
    /// one too far off never comes rather than wrapping into the past and coming at once.
    @inline(__always)
    func addingSaturated(_ other: UInt64) -> UInt64 {
        let (sum, overflow) = addingReportingOverflow(other)
        return overflow ? .max : sum
    }
}

extension Optional where Wrapped == Duration {
    /// `self == .zero` (a wait that only polls) without a call to `Duration.zero`'s
    /// getter, which the turn paid twice (12 instructions a turn in nop-1).
    @inline(__always)
    var isZero: Bool {
        if case .some(let duration) = self { return duration.attoseconds == 0 }
        return false
    }
}

extension Duration {
    /// Whole nanoseconds, negative durations as 0 and huge ones as UInt64.max.
    @inline(__always)
    var nanosecondsClamped: UInt64 {
        // From the Int128 attoseconds: `components` cost ~5 ns more per timer in the timer
        // churn benchmark. 10^9 = 2^9 * 1953125, and floor(floor(x / 2^9) / 1953125) is
        // floor(x / 10^9), so below 2^73 attoseconds (2.6 hours) the quotient is a shift
        // and a 64-bit division by a constant, which compiles to a multiply; longer
        // durations take the 128-by-64-bit division (__udivti3, ~40 instructions).
        let attoseconds = self.attoseconds
        if attoseconds <= 0 { return 0 }
        let high = UInt64(truncatingIfNeeded: attoseconds >> 64), low = UInt64(truncatingIfNeeded: attoseconds)
        if high < 1 << 9 { return (high << 55 | low >> 9) / 1_953_125 }
        if high >= 1_000_000_000 { return .max }  // the quotient would not fit
        return Self.nanoseconds(high: high, low: low)
    }

    @inline(never)
    private static func nanoseconds(high: UInt64, low: UInt64) -> UInt64 {
        UInt64(1_000_000_000).dividingFullWidth((high, low)).quotient
    }
}

// Read from a record's `Operation?` in place: a borrowed noncopyable optional cannot be
// force-unwrapped without consuming it, but it can be matched.
extension Optional where Wrapped == Operation {
    /// The token a cancel targets.
    var cancelTarget: Token? {
        switch self {
        case .some(.cancel(let target)): target
        default: nil
        }
    }

    /// True for `.deadline` (an absolute CLOCK_MONOTONIC time).
    var isDeadline: Bool {
        switch self {
        case .some(.deadline): true
        default: false
        }
    }

    /// The buffer group of a multishot receive.
    var bufferGroup: BufferGroup? {
        switch self {
        case .some(.receiveMultishot(_, let group)): group
        default: nil
        }
    }

    /// The path and mode of an open.
    var openArguments: (path: FilePath, mode: mode_t)? {
        switch self {
        case .some(.open(let path, _, let mode, _)): (path, mode)
        default: nil
        }
    }

    // Hot paths end an `Operation?` with these instead of letting it go out of scope: the
    // implicit destroy of a noncopyable optional goes through the runtime's value
    // witnesses (two indirect calls, ~45 instructions); a switch frees the payload inline.

    /// Ends the operation, if any, freeing its buffers.
    @inline(__always)
    consuming func discard() {
        if case .some(let operation) = consume self { operation.discard() }
    }

    /// Takes the single buffer of a read, write, send, recv or message operation.
    @inline(__always)
    consuming func takeBuffer() -> IOBuffer? {
        if case .some(let operation) = consume self { return operation.takeBuffer() }
        return nil
    }
}
