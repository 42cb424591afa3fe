import CPlexus
import Glibc
import SystemPackage

/// A listening stream socket: TCP over IPv4 or IPv6, or a Unix domain stream socket.
///
/// Created with `bind`, which is synchronous (socket, setsockopt, bind, listen never
/// block). Accepted connections are CLOEXEC and non-blocking, and run on the listener's
/// loop; hand one to another loop with `StreamConnection(fd:loop:)`. Callback methods
/// must be called on the loop thread; async methods from any task.
public struct StreamListener: SocketHandle {
    public let fd: FileDescriptor
    public let loop: EventLoop

    /// Wraps a listening socket the caller made.
    public init(fd: FileDescriptor, loop: EventLoop) {
        self.fd = fd
        self.loop = loop
    }

    /// socket + bind + listen. IP sockets get SO_REUSEADDR; `reusePort` adds SO_REUSEPORT,
    /// so each loop of a group can bind its own listener to the same port (the kernel
    /// spreads new connections over them). For a Unix path, `removingExisting` unlinks
    /// a stale socket file first; anything else at the path stays, and bind fails with
    /// EADDRINUSE.
    public static func bind(_ address: SocketAddress, on loop: EventLoop, backlog: Int32 = 1024,
                            reusePort: Bool = false, removingExisting: Bool = false) throws(PlexusError) -> StreamListener {
        if removingExisting { Socket.removeStaleSocketFile(address) }
        return try Socket.make(for: address, type: Int32(SOCK_STREAM.rawValue)) { fd throws(PlexusError) in
            if address.family != AF_UNIX {
                try Socket.setOption(fd, .reuseAddress, true)
                if reusePort { try Socket.setOption(fd, .reusePort, true) }
            }
            try Socket.bind(fd, address)
            try Socket.listen(fd, backlog: backlog)
            return StreamListener(fd: fd, loop: loop)
        }
    }

    /// A TCP listener on `host` (IPv4 or IPv6 text) and `port` (0: the kernel picks; see `localAddress()`).
    public static func tcp(host: String = "127.0.0.1", port: UInt16, on loop: EventLoop, backlog: Int32 = 1024,
                           reusePort: Bool = false) throws(PlexusError) -> StreamListener {
        guard let address = SocketAddress(host: host, port: port) else {
            throw PlexusError(operation: "bind", errno: .invalidArgument, message: "\(host) is not an IPv4 or IPv6 address")
        }
        return try bind(address, on: loop, backlog: backlog, reusePort: reusePort)
    }

    /// A Unix domain stream listener at `path`.
    public static func unix(path: String, on loop: EventLoop, backlog: Int32 = 1024,
                            removingExisting: Bool = false) throws(PlexusError) -> StreamListener {
        let address = try Socket.unixAddress(path)
        return try bind(address, on: loop, backlog: backlog, removingExisting: removingExisting)
    }

    // MARK: Callbacks (loop thread)

    /// Accepts one connection.
    @discardableResult
    public func accept(_ callback: @escaping (Result<StreamConnection, PlexusError>) throws -> Void) -> Token {
        let loop = self.loop
        return loop.accept(fd) { result in try callback(result.map { StreamConnection(fd: $0, loop: loop) }) }
    }

    /// Accepts connections until `loop.cancel(token)` or an error (the last call has the error;
    /// a cancel reports ECANCELED). One multishot accept on io_uring, emulated elsewhere.
    @discardableResult
    public func acceptMultishot(_ callback: @escaping (Result<StreamConnection, PlexusError>) throws -> Void) -> Token {
        let loop = self.loop
        return loop.acceptMultishot(fd) { result in try callback(result.map { StreamConnection(fd: $0, loop: loop) }) }
    }

    /// Cancels pending accepts, then closes the listener.
    @discardableResult
    public func close(_ callback: @escaping (Result<Void, PlexusError>) throws -> Void = { _ in }) -> Token {
        loop.close(fd, callback)
    }

    // MARK: Async

    /// The next connection.
    public func accept() async throws -> StreamConnection {
        StreamConnection(fd: try await loop.accept(fd), loop: loop)
    }

    /// Accepted connections as an `AsyncSequence` (see `EventLoop.connections`).
    public func connections(bufferLimit: Int = 64) -> AcceptedConnections {
        AcceptedConnections(base: loop.connections(fd, bufferLimit: bufferLimit), loop: loop)
    }

    /// Cancels pending accepts, then closes the listener.
    public func close() async throws {
        try await loop.close(fd)
    }
}

/// `StreamListener.connections()`: the accepted fds as `StreamConnection`s.
public struct AcceptedConnections: AsyncSequence, Sendable {
    public typealias Element = StreamConnection
    let base: Connections
    let loop: EventLoop

    public func makeAsyncIterator() -> Iterator { Iterator(base: base.makeAsyncIterator(), loop: loop) }

    public struct Iterator: AsyncIteratorProtocol {
        var base: Connections.Iterator
        let loop: EventLoop

        public mutating func next() async throws -> StreamConnection? {
            guard let fd = try await base.next() else { return nil }
            return StreamConnection(fd: fd, loop: loop)
        }
    }
}

/// A connected stream socket (TCP or Unix) on a loop.
///
/// Reads are recv(2) into a buffer's spare capacity (0 bytes read: the peer closed);
/// writes are send(2) with MSG_NOSIGNAL, consuming what was sent; `writeAll` resubmits
/// after short writes. Callback methods: on the loop thread. Async methods: any task
/// (on a task whose executor is the loop, without a thread hop).
public struct StreamConnection: SocketHandle {
    public let fd: FileDescriptor
    public let loop: EventLoop

    /// Wraps a connected socket (e.g. one accepted elsewhere, handed to this loop).
    public init(fd: FileDescriptor, loop: EventLoop) {
        self.fd = fd
        self.loop = loop
    }

    /// Connects a new CLOEXEC, non-blocking socket to `address`. After `timeout` the
    /// connect is cancelled and this throws ETIMEDOUT; on any failure the socket is closed.
    public static func connect(to address: SocketAddress, on loop: EventLoop, timeout: Duration? = nil) async throws -> StreamConnection {
        let fd = try Socket.make(family: address.family, type: Int32(SOCK_STREAM.rawValue))
        do {
            if let timeout {
                try await loop.withTimeout(timeout) { try await loop.connect(fd, to: address) }
            } else {
                try await loop.connect(fd, to: address)
            }
        } catch {
            try? await loop.close(fd)
            throw error
        }
        return StreamConnection(fd: fd, loop: loop)
    }

    /// Connects (loop thread); the callback gets the connection, or the error with the
    /// socket already closed (ETIMEDOUT after `timeout`).
    public static func connect(to address: SocketAddress, on loop: EventLoop, timeout: Duration? = nil,
                               _ callback: @escaping (Result<StreamConnection, PlexusError>) throws -> Void) {
        let fd: FileDescriptor
        do {
            fd = try Socket.make(family: address.family, type: Int32(SOCK_STREAM.rawValue))
        } catch {
            loop.invokeLater { try callback(.failure(error)) }
            return
        }
        let state = ConnectState()
        let token = loop.connect(fd, to: address) { result in
            if let timer = state.timer { state.timer = nil; loop.cancel(timer) }
            switch result {
            case .success:
                try callback(.success(StreamConnection(fd: fd, loop: loop)))
            case .failure(var error):
                if state.timedOut && error.errno == .canceled {
                    error = PlexusError(operation: "connect", errno: .timedOut, message: "connect to \(address) timed out")
                }
                loop.close(fd) { _ in }
                try callback(.failure(error))
            }
        }
        if let timeout {
            state.timer = loop.schedule(after: timeout) { event in
                state.timer = nil
                guard event == .fired else { return }
                state.timedOut = true
                loop.cancel(token)
            }
        }
    }

    /// A connected pair of Unix stream sockets (socketpair), both on `loop`.
    public static func pair(on loop: EventLoop) throws(PlexusError) -> (StreamConnection, StreamConnection) {
        var fds: [Int32] = [-1, -1]
        let flags = Int32(SOCK_STREAM.rawValue | SOCK_CLOEXEC.rawValue | SOCK_NONBLOCK.rawValue)
        guard socketpair(AF_UNIX, flags, 0, &fds) == 0 else { throw Socket.error("socketpair") }
        return (StreamConnection(fd: FileDescriptor(rawValue: fds[0]), loop: loop),
                StreamConnection(fd: FileDescriptor(rawValue: fds[1]), loop: loop))
    }

    /// TCP_NODELAY on or off.
    public func setNoDelay(_ on: Bool = true) throws(PlexusError) {
        try setOption(.noDelay, on)
    }

    // MARK: Callbacks (loop thread)

    /// recv(2) into the spare capacity; 0 means the peer closed.
    @discardableResult
    public func read(_ buffer: consuming IOBuffer,
                     _ callback: @escaping (Result<Int, PlexusError>, consuming IOBuffer) throws -> Void) -> Token {
        loop.recv(fd, buffer, callback)
    }

    /// One send(2) of the readable bytes; may be short.
    @discardableResult
    public func write(_ buffer: consuming IOBuffer,
                      _ callback: @escaping (Result<Int, PlexusError>, consuming IOBuffer) throws -> Void) -> Token {
        loop.send(fd, buffer, callback)
    }

    /// Sends every readable byte, resubmitting after short writes; the callback gets the
    /// total sent (or the first error) and the buffer (empty after success).
    public func writeAll(_ buffer: consuming IOBuffer,
                         _ callback: @escaping (Result<Int, PlexusError>, consuming IOBuffer) throws -> Void) {
        Self.sendAll(loop, fd, buffer, sent: 0, callback)
    }

    private static func sendAll(_ loop: EventLoop, _ fd: FileDescriptor, _ buffer: consuming IOBuffer, sent: Int,
                                _ callback: @escaping (Result<Int, PlexusError>, consuming IOBuffer) throws -> Void) {
        loop.send(fd, buffer) { result, buffer in
            switch result {
            case .success(let n) where n > 0 && !buffer.isEmpty:
                sendAll(loop, fd, buffer, sent: sent + n, callback)
            case .success(let n):
                try callback(.success(sent + n), buffer)
            case .failure(let error) where error.errno == .invalidArgument && buffer.isEmpty:
                // Nothing to send (a send of no bytes is EINVAL): done, as the async writeAll is.
                try callback(.success(sent), buffer)
            case .failure(let error):
                try callback(.failure(error), buffer)
            }
        }
    }

    /// readv(2) into each buffer's spare capacity in turn.
    @discardableResult
    public func readv(_ vector: consuming IOVector,
                      _ callback: @escaping (Result<Int, PlexusError>, consuming IOVector) throws -> Void) -> Token {
        loop.readv(fd, vector, callback)
    }

    /// One writev(2); may be short (what was written is consumed from the buffers).
    @discardableResult
    public func writev(_ vector: consuming IOVector,
                       _ callback: @escaping (Result<Int, PlexusError>, consuming IOVector) throws -> Void) -> Token {
        loop.writev(fd, vector, callback)
    }

    /// writev(2) until every buffer is empty.
    public func writevAll(_ vector: consuming IOVector,
                          _ callback: @escaping (Result<Int, PlexusError>, consuming IOVector) throws -> Void) {
        Self.writevAll(loop, fd, vector, sent: 0, callback)
    }

    private static func writevAll(_ loop: EventLoop, _ fd: FileDescriptor, _ vector: consuming IOVector, sent: Int,
                                  _ callback: @escaping (Result<Int, PlexusError>, consuming IOVector) throws -> Void) {
        loop.writev(fd, vector) { result, vector in
            switch result {
            case .success(let n) where n > 0 && vector.totalCount > 0:
                writevAll(loop, fd, vector, sent: sent + n, callback)
            case .success(let n):
                try callback(.success(sent + n), vector)
            case .failure(let error) where error.errno == .invalidArgument && vector.totalCount == 0:
                try callback(.success(sent), vector)  // nothing to write, as for writeAll
            case .failure(let error):
                try callback(.failure(error), vector)
            }
        }
    }

    /// shutdown(2).
    @discardableResult
    public func shutdown(_ direction: ShutdownDirection,
                         _ callback: @escaping (Result<Void, PlexusError>) throws -> Void = { _ in }) -> Token {
        loop.shutdown(fd, how: direction.how, callback)
    }

    /// Cancels the connection's pending operations, then closes it.
    @discardableResult
    public func close(_ callback: @escaping (Result<Void, PlexusError>) throws -> Void = { _ in }) -> Token {
        loop.close(fd, callback)
    }

    // MARK: Async

    /// recv(2) into the spare capacity; a count of 0 means the peer closed.
    public func read(into buffer: consuming IOBuffer) async throws -> Transfer {
        try await loop.recv(fd, into: buffer)
    }

    /// One send(2); may be short.
    public func write(_ buffer: consuming IOBuffer) async throws -> Transfer {
        try await loop.send(fd, buffer)
    }

    /// Sends every readable byte, resubmitting after short writes; returns the emptied buffer.
    /// An error part-way (a reset, a deadline) is thrown and the unsent rest goes with the
    /// buffer: how much the peer got is then unknown. Call `write` in a loop to keep it.
    public func writeAll(_ buffer: consuming IOBuffer) async throws -> IOBuffer {
        var buffer = buffer
        while !buffer.isEmpty {
            let done = try await loop.send(fd, buffer)
            buffer = done.takeBuffer()
        }
        return buffer
    }

    /// readv(2).
    public func readv(into vector: consuming IOVector) async throws -> VectorTransfer {
        try await loop.readv(fd, into: vector)
    }

    /// One writev(2); may be short.
    public func writev(_ vector: consuming IOVector) async throws -> VectorTransfer {
        try await loop.writev(fd, vector)
    }

    /// writev(2) until every buffer is empty; returns the vector.
    public func writevAll(_ vector: consuming IOVector) async throws -> IOVector {
        var vector = vector
        while vector.totalCount > 0 {
            let done = try await loop.writev(fd, vector)
            vector = done.takeVector()
        }
        return vector
    }

    /// shutdown(2).
    public func shutdown(_ direction: ShutdownDirection) async throws {
        try await loop.shutdown(fd, how: direction.how)
    }

    /// Cancels the connection's pending operations, then closes it.
    public func close() async throws {
        try await loop.close(fd)
    }
}

/// A connect's timer and whether it fired (loop thread only).
private final class ConnectState: @unchecked Sendable {
    var timer: TimerHandle?
    var timedOut = false
}

extension EventLoop {
    /// Runs `body` on the loop in a later turn (so a callback never runs inside the call
    /// that registered it), also when the loop shuts down first; errors go to `errorHandler`.
    /// On a loop whose `run()` has returned there is no later turn: it runs at once, as
    /// the callbacks of operations submitted then do.
    func invokeLater(_ body: @escaping () throws -> Void) {
        schedule(after: .zero) { _ in try body() }
    }
}
