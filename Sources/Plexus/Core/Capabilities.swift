/// What a backend does natively; the layers above choose their strategy from it.
public struct Capabilities: OptionSet, Sendable, Hashable, CustomStringConvertible {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }

    /// Completions come from the kernel (io_uring), not from readiness plus a syscall.
    public static let nativeCompletions = Capabilities(rawValue: 1 << 0)
    /// One accept operation yields every connection (IORING_ACCEPT_MULTISHOT).
    public static let multishotAccept = Capabilities(rawValue: 1 << 1)
    /// One poll operation reports every readiness edge (IORING_POLL_ADD_MULTI).
    public static let multishotPoll = Capabilities(rawValue: 1 << 2)
    /// One receive yields every chunk into kernel-picked buffers (IORING_RECV_MULTISHOT).
    public static let multishotReceive = Capabilities(rawValue: 1 << 3)
    /// Provided buffer rings (IORING_REGISTER_PBUF_RING).
    public static let providedBufferRings = Capabilities(rawValue: 1 << 4)
    /// Operations can be linked so one runs after another (IOSQE_IO_LINK).
    public static let linkedOperations = Capabilities(rawValue: 1 << 5)
    /// Regular-file I/O does not block the loop thread (the kernel runs it asynchronously).
    public static let nonBlockingFileIO = Capabilities(rawValue: 1 << 6)
    /// Pending operations on an fd can be cancelled in one call (IORING_ASYNC_CANCEL_FD).
    public static let cancelByFileDescriptor = Capabilities(rawValue: 1 << 7)
    /// The ring runs completion work only when the loop waits (IORING_SETUP_DEFER_TASKRUN).
    public static let deferredTaskRun = Capabilities(rawValue: 1 << 8)
    /// The kernel keeps CQEs that do not fit instead of dropping them (IORING_FEAT_NODROP).
    public static let noDrop = Capabilities(rawValue: 1 << 9)
    /// Cross-ring messages (IORING_OP_MSG_RING).
    public static let messageRing = Capabilities(rawValue: 1 << 10)

    static let names: [(Capabilities, String)] = [
        (.nativeCompletions, "nativeCompletions"), (.multishotAccept, "multishotAccept"),
        (.multishotPoll, "multishotPoll"), (.multishotReceive, "multishotReceive"),
        (.providedBufferRings, "providedBufferRings"), (.linkedOperations, "linkedOperations"),
        (.nonBlockingFileIO, "nonBlockingFileIO"), (.cancelByFileDescriptor, "cancelByFileDescriptor"),
        (.deferredTaskRun, "deferredTaskRun"), (.noDrop, "noDrop"), (.messageRing, "messageRing"),
    ]

    public var description: String {
        "[" + Self.names.filter { contains($0.0) }.map(\.1).joined(separator: ", ") + "]"
    }
}
