/// The one report every backend gives for an operation: `(token, result, flags)`, and,
/// on the final completion, the operation itself with its buffers.
public struct Completion: ~Copyable, Sendable {
    /// The token `prepare` returned for the operation.
    public let token: Token
    /// Bytes transferred, a new fd, poll bits or 0 on success; a negative errno on failure.
    /// A timeout that fired reports 0; anything cancelled reports -ECANCELED.
    public let result: Int32
    public let flags: CompletionFlags
    public let kind: OperationKind
    /// The operation, handed back on the final completion (when `flags` lacks `.more`),
    /// with read data appended to its buffers and written data consumed from them.
    ///
    /// Spelled `Optional<Operation>`, not `Operation?`: a `var` of the `?` spelling starts
    /// out nil, so `init` would assign over that nil, and destroying a noncopyable
    /// optional goes through the runtime's value witnesses (two indirect calls, ~45
    /// instructions per completion built).
    public var operation: Optional<Operation>
    /// The provided buffer a multishot receive filled with `result` bytes; give it back
    /// with the backend's `recycle` once read.
    public let bufferID: UInt16?

    public init(token: Token, result: Int32, flags: CompletionFlags, kind: OperationKind, operation: consuming Operation?,
                bufferID: UInt16? = nil) {
        self.token = token
        self.result = result
        self.flags = flags
        self.kind = kind
        self.operation = operation
        self.bufferID = bufferID
    }

    /// False when more completions follow for the same token (multishot).
    public var isFinal: Bool { !flags.contains(.more) }

    /// The result as a value or a typed error naming the operation and errno.
    public var value: Result<Int, PlexusError> {
        result >= 0 ? .success(Int(result)) : .failure(PlexusError(kind, result: result))
    }

    /// Returns the result, or throws the typed error.
    public func get() throws(PlexusError) -> Int {
        if result < 0 { throw PlexusError(kind, result: result) }
        return Int(result)
    }

    /// Takes the operation's buffer back, if it had one.
    public mutating func takeBuffer() -> IOBuffer? {
        operation.take()?.takeBuffer()
    }
}

/// Flags of a completion.
public struct CompletionFlags: OptionSet, Sendable, Hashable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    /// More completions follow for this token (IORING_CQE_F_MORE).
    public static let more = CompletionFlags(rawValue: 1 << 1)
    /// The socket had more data after this receive (IORING_CQE_F_SOCK_NONEMPTY).
    public static let socketNonEmpty = CompletionFlags(rawValue: 1 << 2)
    /// With -ECANCELED: its deadline (`IOBackend.prepare(_:deadline:)`) passed and
    /// cancelled it, not a cancel or a close. Set by the backend that did it, when it did:
    /// the readiness backends from their timer heap; io_uring from its standalone timeout,
    /// or, for a linked one, when the CQE comes in at or after the deadline.
    public static let deadlinePassed = CompletionFlags(rawValue: 1 << 3)
}
