import SystemPackage

/// What failed, with the errno the kernel gave and a sentence for people.
public struct PlexusError: Error, Equatable, Sendable, CustomStringConvertible {
    /// The operation or call that failed: "read", "accept", "io_uring_queue_init", ...
    public let operation: String
    /// The errno (swift-system's `Errno`).
    public let errno: Errno
    /// What went wrong and, where it helps, what to do.
    public let message: String

    public init(operation: String, errno: Errno, message: String? = nil) {
        self.operation = operation
        self.errno = errno
        self.message = message ?? errno.description
    }

    /// From an operation's negative result.
    public init(_ kind: OperationKind, result: Int32) {
        self.init(operation: kind.rawValue, errno: Errno(rawValue: -result))
    }

    public var description: String {
        "\(operation) failed: \(message) (errno \(errno.rawValue))"
    }
}
