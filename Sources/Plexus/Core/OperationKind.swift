import Glibc

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

    /// accept(2) errors that end one connection, not the listener: the connection was
    /// aborted before it was accepted (ECONNABORTED), or accept passed on a network error
    /// pending on it (EPROTO; accept(2): "treat them like EAGAIN by retrying"). A multishot
    /// accept goes on past them, as libuv's and SwiftNIO's accept loops do.
    static func endsOnlyOneConnection(_ result: Int32) -> Bool { result == -ECONNABORTED || result == -EPROTO }

    /// True for the kinds that complete more than once.
    public var isMultishot: Bool { self == .acceptMultishot || self == .pollMultishot || self == .receiveMultishot }

    /// True for the kinds that take an offset (pread, pwrite, preadv, pwritev), which a
    /// socket or a pipe refuses with ESPIPE.
    var takesOffset: Bool { self == .read || self == .write || self == .readv || self == .writev }
}
