import SystemPackage

/// What failed, with the errno the kernel gave and a sentence for people.
///
/// Every callback receives a `Result<Int, PlexusError>`, so the type is kept small: an
/// operation's own failure (`init(_:result:)`) is its kind and errno, two words with no
/// reference, and the strings are made only when read. Errors that name another call or
/// carry their own message keep them in one shared box. (Two `String`s stored inline made
/// every callback's `Result` go through the runtime's generic value witnesses to copy and
/// destroy: about 400 instructions per ping-pong round trip, measured with callgrind.)
public struct PlexusError: Error, Equatable, Sendable, CustomStringConvertible {
    /// The errno (swift-system's `Errno`).
    public let errno: Errno
    private let kind: OperationKind
    private let text: Text?

    /// The call named instead of `kind`, and a message instead of the errno's own.
    private final class Text: Sendable {
        let operation: String?
        let message: String?
        init(operation: String?, message: String?) {
            self.operation = operation
            self.message = message
        }
    }

    /// The operation or call that failed: "read", "accept", "io_uring_queue_init", ...
    public var operation: String { text?.operation ?? kind.rawValue }

    /// What went wrong and, where it helps, what to do.
    public var message: String { text?.message ?? errno.description }

    public init(operation: String, errno: Errno, message: String? = nil) {
        self.errno = errno
        if let kind = OperationKind(rawValue: operation) {
            self.kind = kind
            self.text = message.map { Text(operation: nil, message: $0) }
        } else {
            self.kind = .nop
            self.text = Text(operation: operation, message: message)
        }
    }

    /// From an operation's negative result.
    public init(_ kind: OperationKind, result: Int32) {
        self.errno = Errno(rawValue: -result)
        self.kind = kind
        self.text = nil
    }

    public static func == (a: PlexusError, b: PlexusError) -> Bool {
        a.errno == b.errno && a.operation == b.operation && a.message == b.message
    }

    public var description: String {
        "\(operation) failed: \(message) (errno \(errno.rawValue))"
    }
}
