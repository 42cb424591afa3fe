import CPlexus
import SystemPackage

/// Which backend to start: a named one, or `automatic` (io_uring, else epoll).
public enum BackendChoice: String, Sendable, CaseIterable, CustomStringConvertible {
    case automatic = "auto"
    case ioUring = "io_uring"
    case epoll
    case poll

    /// The environment variable that picks the backend.
    public static let environmentVariable = "PLEXUS_BACKEND"

    /// Parses a name as `PLEXUS_BACKEND` spells it; unknown names list the valid ones.
    public init(name: String) throws(BackendSelectionError) {
        guard let choice = BackendChoice(rawValue: name.lowercased()) else {
            throw .unknownName(name, valid: BackendChoice.allCases.map(\.rawValue))
        }
        self = choice
    }

    /// `PLEXUS_BACKEND`, or `automatic` when it is unset or empty. Setuid and setgid
    /// programs ignore the variable (secure_getenv), so it cannot steer them.
    public static func fromEnvironment() throws(BackendSelectionError) -> BackendChoice {
        guard let raw = plexus_secure_getenv(environmentVariable) else { return .automatic }
        let name = String(decoding: UnsafeRawBufferPointer(start: raw, count: strlen(raw)), as: UTF8.self)
        return name.isEmpty ? .automatic : try BackendChoice(name: name)
    }

    public var description: String { rawValue }

    /// Starts the chosen backend. `automatic` falls back from io_uring to epoll on any
    /// failure to start io_uring and records why in `SelectedBackend.fallbackReason`.
    public func start(entries: UInt32 = 256) throws(BackendSelectionError) -> SelectedBackend {
        switch self {
        case .ioUring:
            do { return SelectedBackend(try URingBackend(entries: entries), choice: self) }
            catch { throw .unavailable(.ioUring, error) }
        case .epoll:
            do { return SelectedBackend(try EpollBackend(entries: entries), choice: self) }
            catch { throw .unavailable(.epoll, error) }
        case .poll:
            do { return SelectedBackend(try PollBackend(entries: entries), choice: self) }
            catch { throw .unavailable(.poll, error) }
        case .automatic:
            let whyNot: PlexusError
            do { return SelectedBackend(try URingBackend(entries: entries), choice: self) }
            catch { whyNot = error }
            do { return SelectedBackend(try EpollBackend(entries: entries), choice: self, fallbackReason: whyNot) }
            catch {
                // Say why neither started: io_uring's reason is the one users look for first.
                throw .unavailable(.epoll, PlexusError(operation: error.operation, errno: error.errno,
                                                       message: "\(error.message); io_uring was not used either: \(whyNot)"))
            }
        }
    }
}

/// A started backend and how it was chosen.
public struct SelectedBackend {
    public var backend: any IOBackend { started }
    /// The backend, with the loop's shortcut for single-buffer operations.
    let started: any PreparesBufferOperations
    public let choice: BackendChoice
    /// Why `automatic` did not use io_uring; nil when it did, or when a backend was named.
    public let fallbackReason: PlexusError?

    init(_ backend: any PreparesBufferOperations, choice: BackendChoice, fallbackReason: PlexusError? = nil) {
        self.started = backend
        self.choice = choice
        self.fallbackReason = fallbackReason
    }

    public var kind: BackendKind { backend.kind }

    /// One line for logs: what runs, and why when it is a fallback.
    public var summary: String {
        var text = "backend \(backend.kind) (requested \(choice))"
        if let fallbackReason { text += "; io_uring unavailable: \(fallbackReason)" }
        return text
    }
}

/// Why no backend could be started.
public enum BackendSelectionError: Error, Equatable, Sendable, CustomStringConvertible {
    /// `PLEXUS_BACKEND` (or a name in code) is not a backend.
    case unknownName(String, valid: [String])
    /// The named backend failed to start.
    case unavailable(BackendKind, PlexusError)

    public var description: String {
        switch self {
        case .unknownName(let name, let valid):
            return "unknown backend '\(name)' in \(BackendChoice.environmentVariable); valid names: \(valid.joined(separator: ", "))"
        case .unavailable(let kind, let error):
            var text = "the \(kind) backend cannot start: \(error)"
            if kind == .ioUring {
                text += ". io_uring may be disabled (sysctl kernel.io_uring_disabled), denied by a seccomp"
                text += " profile (containers), or missing from this kernel; set \(BackendChoice.environmentVariable)=auto"
                text += " to fall back to epoll, or \(BackendChoice.environmentVariable)=epoll"
            }
            return text
        }
    }
}
