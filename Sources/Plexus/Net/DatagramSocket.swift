import CPlexus
import Glibc
import SystemPackage

/// A datagram socket: UDP over IPv4 or IPv6, or a Unix domain datagram socket.
///
/// Sends and receives are sendmsg(2)/recvmsg(2), so every datagram carries its peer's
/// address: `send(_:to:)` names the destination (nil on a connected socket), a receive
/// reports the sender in `message.address`. Callback methods: loop thread; async: any task.
public struct DatagramSocket: SocketHandle {
    public let fd: FileDescriptor
    public let loop: EventLoop

    public init(fd: FileDescriptor, loop: EventLoop) {
        self.fd = fd
        self.loop = loop
    }

    /// socket + bind (port 0: the kernel picks; see `localAddress()`). `reusePort` lets
    /// several sockets bind the same port (the kernel spreads datagrams over them).
    public static func bind(_ address: SocketAddress, on loop: EventLoop, reuseAddress: Bool = false,
                            reusePort: Bool = false, removingExisting: Bool = false) throws(PlexusError) -> DatagramSocket {
        if removingExisting { Socket.removeStaleSocketFile(address) }
        return try Socket.make(for: address, type: Int32(SOCK_DGRAM.rawValue)) { fd throws(PlexusError) in
            if reuseAddress { try Socket.setOption(fd, .reuseAddress, true) }
            if reusePort { try Socket.setOption(fd, .reusePort, true) }
            try Socket.bind(fd, address)
            return DatagramSocket(fd: fd, loop: loop)
        }
    }

    /// A UDP socket bound to `host` and `port`.
    public static func udp(host: String = "127.0.0.1", port: UInt16 = 0, on loop: EventLoop,
                           reusePort: Bool = false) throws(PlexusError) -> DatagramSocket {
        guard let address = SocketAddress(host: host, port: port) else {
            throw PlexusError(operation: "bind", errno: .invalidArgument, message: "\(host) is not an IPv4 or IPv6 address")
        }
        return try bind(address, on: loop, reusePort: reusePort)
    }

    /// An unbound socket of `family` (AF_INET, AF_INET6, AF_UNIX); the kernel binds an
    /// IP socket to an ephemeral port on its first send.
    public static func unbound(family: Int32 = AF_INET, on loop: EventLoop) throws(PlexusError) -> DatagramSocket {
        DatagramSocket(fd: try Socket.make(family: family, type: Int32(SOCK_DGRAM.rawValue)), loop: loop)
    }

    /// connect(2): fixes the peer (sends without an address go there; only its datagrams
    /// are received). Immediate for datagram sockets.
    public func connect(to address: SocketAddress) throws(PlexusError) {
        let r = address.withSockaddr { Glibc.connect(fd.rawValue, $0, $1) }
        guard r == 0 else { throw Socket.error("connect") }
    }

    // MARK: Callbacks (loop thread)

    /// Sends the buffer's readable bytes as one datagram to `address` (nil: the connected peer).
    @discardableResult
    public func send(_ buffer: consuming IOBuffer, to address: SocketAddress?,
                     _ callback: @escaping (Result<Int, PlexusError>, consuming Message) throws -> Void) -> Token {
        loop.sendMessage(fd, Message(buffer, address: address), callback)
    }

    /// Receives one datagram into the spare capacity (a longer one is truncated);
    /// `message.address` is the sender.
    @discardableResult
    public func receive(into buffer: consuming IOBuffer,
                        _ callback: @escaping (Result<Int, PlexusError>, consuming Message) throws -> Void) -> Token {
        loop.receiveMessage(fd, Message(buffer), callback)
    }

    /// Cancels pending operations, then closes the socket.
    @discardableResult
    public func close(_ callback: @escaping (Result<Void, PlexusError>) throws -> Void = { _ in }) -> Token {
        loop.close(fd, callback)
    }

    // MARK: Async

    /// Sends one datagram to `address` (nil: the connected peer).
    public func send(_ buffer: consuming IOBuffer, to address: SocketAddress?) async throws -> MessageTransfer {
        try await loop.sendMessage(fd, Message(buffer, address: address))
    }

    /// Receives one datagram; `message.address` is the sender.
    public func receive(into buffer: consuming IOBuffer) async throws -> MessageTransfer {
        try await loop.receiveMessage(fd, Message(buffer))
    }

    /// Cancels pending operations, then closes the socket.
    public func close() async throws {
        try await loop.close(fd)
    }
}
