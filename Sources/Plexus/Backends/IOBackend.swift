import SystemPackage

/// The one protocol behind which io_uring, epoll and poll do the same work.
///
/// Completion is the common shape: `prepare` an operation and get its token, `submit`,
/// then `wait` hands back `(token, result, flags)` for each finished operation. The
/// readiness backends (epoll, poll) emulate it: they try the syscall, and on EAGAIN
/// wait for readiness and try again. A backend belongs to one thread; it allocates only
/// while its record table grows, never per operation in steady state.
///
/// Every prepared operation completes exactly once with a final completion
/// (docs/guarantees.md, 1): with its result, an error, or -ECANCELED (after `cancel`,
/// `close` of its fd, or `shutdown`).
public protocol IOBackend: AnyObject {
    /// Which backend this is.
    var kind: BackendKind { get }
    /// What this backend does natively on this kernel.
    var capabilities: Capabilities { get }
    /// Operations prepared and not yet finally completed.
    var pendingCount: Int { get }

    /// Queues `operation` and returns its token. Nothing happens until `submit` or `wait`.
    func prepare(_ operation: consuming Operation) -> Token

    /// Prepares `operation` with a deadline: still pending at `deadline`, it is cancelled
    /// and completes with -ECANCELED. io_uring links an IORING_OP_LINK_TIMEOUT (absolute,
    /// CLOCK_MONOTONIC) to it, so the kernel cancels it; epoll and poll put the deadline
    /// in their timer heap. A kind that takes no deadline (`OperationKind.takesDeadline`)
    /// is prepared without one.
    func prepare(_ operation: consuming Operation, deadline: Deadline) -> Token

    /// Prepares `operation` like `prepare`, except that when the backend would start it
    /// with a syscall that may finish at once, it starts it now: on io_uring, a page-cached
    /// file read through preadv2(RWF_NOWAIT), a pipe write done at once (pwritev2 or
    /// write(2)), a send or write to a socket done at once (send(2) with MSG_DONTWAIT),
    /// and input refused before the ring; on epoll and poll, which try the
    /// syscall first, a read, write, readv, writev, send, receive, sendmsg, recvmsg or
    /// accept, and a nop, fsync, shutdown, open or close, which they run on the loop
    /// thread anyway. It starts it after everything prepared before it, and a final result
    /// is returned here instead of through `wait`. The async adapter's fast path: an
    /// awaited operation whose result is there at once need not suspend.
    func attempt(_ operation: consuming Operation) -> Attempt

    /// Starts every prepared operation (io_uring_submit; the syscalls themselves on epoll
    /// and poll). Returns how many were started.
    @discardableResult
    func submit() throws(PlexusError) -> Int

    /// Submits, then waits until at least one completion is ready or `timeout` passes
    /// (nil waits without limit, `.zero` only polls), and hands every ready completion
    /// to `body`. Returns how many were handed over; 0 on timeout or a signal.
    @discardableResult
    func wait(timeout: Duration?, _ body: (consuming Completion) -> Void) throws(PlexusError) -> Int

    /// Cancels every pending operation and hands each final completion to `body`, so
    /// nothing is left in flight. The backend stays usable.
    func cancelAll(_ body: (consuming Completion) -> Void)

    /// Creates `count` (a power of two, at most 32768) buffers of `size` bytes for
    /// `Operation.receiveMultishot`: a provided buffer ring on io_uring, a free list on
    /// epoll and poll. Every buffer starts out available.
    func registerBuffers(count: Int, size: Int) throws(PlexusError) -> BufferGroup

    /// Makes buffer `id` of `group` available again after its bytes were read; a
    /// multishot receive paused for want of buffers resumes. A buffer that is not out
    /// (recycled already) is left alone.
    func recycle(_ group: BufferGroup, id: UInt16)

    /// Releases a group (io_uring unregisters its ring). A multishot receive still using
    /// it ends with -EINVAL once it needs a buffer.
    func unregisterBuffers(_ group: BufferGroup)

    /// Counters for tests and benchmarks.
    var statistics: BackendStatistics { get }
}

/// The backends' `prepare` of a read, write, send or recv from its parts, for the
/// callback adapter: an `Operation` built only to be taken apart into the record again
/// cost 15-35 instructions per operation (plexus-bench file-qd1, pingpong).
protocol PreparesBufferOperations: IOBackend {
    /// `prepare(.read(fd, buffer, offset:))` and the like, for `kind` read, write, send
    /// or recv; `offset` is for reads and writes, `flags` for sends and receives.
    func prepare(_ kind: OperationKind, _ fd: FileDescriptor, _ buffer: consuming IOBuffer, offset: Int64?,
                 flags: Int32) -> Token

    /// `prepare(kind, fd, buffer, ...)` for an operation whose final completion (from `wait`
    /// or `cancelAll`) goes, as its token, result and buffer (the result applied), to
    /// `handBackTarget` when there is one, without an `Operation` or a `Completion` built
    /// around the buffer.
    func prepareHandingBack(_ kind: OperationKind, _ fd: FileDescriptor, _ buffer: consuming IOBuffer,
                            offset: Int64?, flags: Int32) -> Token

    /// Who takes the buffers of operations `prepareHandingBack` prepared: the loop's relay,
    /// which the loop keeps alive and clears from here before it goes.
    var handBackTarget: Unmanaged<BufferHandBack>? { get set }
}

/// Takes the buffer of an operation prepared with `prepareHandingBack` at its final
/// completion (the event loop's relay: its `.buffer` handlers want nothing else). A
/// class, not a protocol, so a backend can hold it `Unmanaged` and call it without a
/// retain and a release per completion, which an `unowned(unsafe)` existential still
/// cost (file-qd32 on io_uring: 25 instructions a read).
class BufferHandBack {
    func handBack(_ token: Token, _ result: Int32, _ kind: OperationKind, _ buffer: consuming IOBuffer) {
        preconditionFailure("BufferHandBack.handBack is for a subclass to override")
    }
}

extension Unmanaged where Instance == BufferHandBack {
    /// `handBack` on the target, which the caller knows to be alive, without retaining it.
    @inline(__always)
    func handBack(_ token: Token, _ result: Int32, _ kind: OperationKind, _ buffer: consuming IOBuffer) {
        var buffer = Optional(buffer)  // (a consuming parameter cannot be consumed in a closure)
        _withUnsafeGuaranteedRef { $0.handBack(token, result, kind, buffer.take()!) }
    }
}

extension Operation {
    /// The read, write, send or recv `PreparesBufferOperations.prepare` takes apart.
    init(_ kind: OperationKind, _ fd: FileDescriptor, _ buffer: consuming IOBuffer, offset: Int64?, flags: Int32) {
        switch kind {
        case .read: self = .read(fd, buffer, offset: offset)
        case .write: self = .write(fd, buffer, offset: offset)
        case .send: self = .send(fd, buffer, flags: flags)
        default:
            precondition(kind == .recv, "\(kind) is no single-buffer operation")
            self = .recv(fd, buffer, flags: flags)
        }
    }
}

/// What `IOBackend.attempt` did with an operation.
public enum Attempt: ~Copyable {
    /// It finished at once: its final completion (buffers included).
    case completed(Completion)
    /// It was prepared, as `prepare` does: it completes through `wait`.
    case prepared(Token)
}

/// The three backends.
public enum BackendKind: String, Sendable, CaseIterable, CustomStringConvertible {
    case ioUring = "io_uring"
    case epoll
    case poll

    public var description: String { rawValue }
}

/// Counters a backend keeps.
public struct BackendStatistics: Sendable, Equatable {
    /// Operations prepared since creation.
    public var prepared: UInt64 = 0
    /// Completions delivered, intermediate multishot ones included.
    public var completed: UInt64 = 0
    /// Times the submission queue was full and had to be flushed before preparing.
    public var submissionQueueFull: UInt64 = 0
    /// CQEs the kernel reported as overflowed (kept by IORING_FEAT_NODROP, not lost).
    public var completionQueueOverflows: UInt64 = 0
    /// Multishot operations the backend re-armed after the kernel ended them.
    public var multishotRearms: UInt64 = 0
    /// Syscalls tried that returned EAGAIN and were parked for readiness (epoll, poll).
    public var wouldBlock: UInt64 = 0
    /// Parked writes retried without a readiness report (epoll, poll): those on Unix stream
    /// and seqpacket sockets, whose peer's shutdown(SHUT_RD) ends them with no report.
    public var unreportedRetries: UInt64 = 0
    public init() {}
}
