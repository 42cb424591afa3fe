/// The kinds of `Operation`, named as errors and statistics name them.
public enum OperationKind: String, Sendable, CaseIterable {
    case nop, read, write, readv, writev, send, recv
    case receiveMultishot = "recv(multishot)"
    case sendMessage = "sendmsg"
    case receiveMessage = "recvmsg"
    case accept
    case acceptMultishot = "accept(multishot)"
    case connect, poll
    case pollMultishot = "poll(multishot)"
    case timeout, cancel, close, open, fsync, shutdown

    /// True for the kinds a deadline applies to (`IOBackend.prepare(_:deadline:)`): every
    /// one-shot operation except timeouts, cancels and closes.
    public var takesDeadline: Bool {
        switch self {
        case .receiveMultishot, .acceptMultishot, .pollMultishot, .timeout, .cancel, .close: false
        default: true
        }
    }

    /// True for the kinds whose operation owns buffers (an `IOBuffer`, `IOVector` or
    /// `Message`); the others have a `bufferlessView`.
    var hasBuffers: Bool {
        switch self {
        case .read, .write, .readv, .writev, .send, .recv, .sendMessage, .receiveMessage: true
        default: false
        }
    }

    /// True for the kinds that complete more than once.
    public var isMultishot: Bool { self == .acceptMultishot || self == .pollMultishot || self == .receiveMultishot }
}
