import CPlexus
import Glibc
import SystemPackage

/// A value a socket option holds, and how it is laid out for setsockopt/getsockopt.
public protocol SocketOptionValue: Sendable {
    /// Calls `body` with the bytes setsockopt takes.
    func withOptionBytes<R>(_ body: (UnsafeRawBufferPointer) throws -> R) rethrows -> R
    /// Decodes what getsockopt returned.
    init(optionBytes: UnsafeRawBufferPointer)
    /// Bytes getsockopt should have room for.
    static var optionSize: Int { get }
}

extension Bool: SocketOptionValue {
    public func withOptionBytes<R>(_ body: (UnsafeRawBufferPointer) throws -> R) rethrows -> R {
        try Swift.withUnsafeBytes(of: Int32(self ? 1 : 0)) { try body($0) }
    }
    public init(optionBytes: UnsafeRawBufferPointer) { self = optionBytes.loadUnaligned(as: Int32.self) != 0 }
    public static var optionSize: Int { 4 }
}

extension Int32: SocketOptionValue {
    public func withOptionBytes<R>(_ body: (UnsafeRawBufferPointer) throws -> R) rethrows -> R {
        try Swift.withUnsafeBytes(of: self) { try body($0) }
    }
    public init(optionBytes: UnsafeRawBufferPointer) { self = optionBytes.loadUnaligned(as: Int32.self) }
    public static var optionSize: Int { 4 }
}

/// SO_LINGER: nil is off (close returns at once, the kernel sends what is queued);
/// `.seconds(0)` makes close reset the connection (RST) and drop unsent data.
public struct Linger: SocketOptionValue, Equatable {
    public var seconds: Int32?
    public init(seconds: Int32?) { self.seconds = seconds }
    public static let off = Linger(seconds: nil)
    /// close(2) sends RST instead of FIN.
    public static let reset = Linger(seconds: 0)

    public func withOptionBytes<R>(_ body: (UnsafeRawBufferPointer) throws -> R) rethrows -> R {
        try Swift.withUnsafeBytes(of: linger(l_onoff: seconds == nil ? 0 : 1, l_linger: seconds ?? 0)) { try body($0) }
    }
    public init(optionBytes: UnsafeRawBufferPointer) {
        let l = optionBytes.loadUnaligned(as: linger.self)
        seconds = l.l_onoff == 0 ? nil : l.l_linger
    }
    public static var optionSize: Int { MemoryLayout<linger>.size }
}

/// A socket option: its level, its name and the type of its value.
/// `socket.setOption(.noDelay, true)`, `try socket.option(.receiveBufferSize)`.
public struct SocketOption<Value: SocketOptionValue>: Sendable, CustomStringConvertible {
    public let level: Int32
    public let name: Int32
    public let label: String

    public init(level: Int32, name: Int32, label: String) {
        self.level = level
        self.name = name
        self.label = label
    }

    public var description: String { label }
}

extension SocketOption where Value == Bool {
    /// SO_REUSEADDR: bind a port that has connections in TIME_WAIT.
    public static var reuseAddress: Self { Self(level: SOL_SOCKET, name: SO_REUSEADDR, label: "SO_REUSEADDR") }
    /// SO_REUSEPORT: several sockets bind the same port; the kernel spreads connections
    /// (or datagrams) over them, e.g. one listener per loop of a group.
    public static var reusePort: Self { Self(level: SOL_SOCKET, name: SO_REUSEPORT, label: "SO_REUSEPORT") }
    /// SO_KEEPALIVE.
    public static var keepAlive: Self { Self(level: SOL_SOCKET, name: SO_KEEPALIVE, label: "SO_KEEPALIVE") }
    /// SO_BROADCAST (UDP).
    public static var broadcast: Self { Self(level: SOL_SOCKET, name: SO_BROADCAST, label: "SO_BROADCAST") }
    /// TCP_NODELAY: send small segments at once (no Nagle).
    public static var noDelay: Self { Self(level: Int32(IPPROTO_TCP), name: TCP_NODELAY, label: "TCP_NODELAY") }
    /// IPV6_V6ONLY: an AF_INET6 socket does not also take IPv4-mapped traffic.
    public static var ipv6Only: Self { Self(level: Int32(IPPROTO_IPV6), name: IPV6_V6ONLY, label: "IPV6_V6ONLY") }
}

extension SocketOption where Value == Int32 {
    /// SO_RCVBUF in bytes (the kernel doubles what is set, and reports the doubled size).
    public static var receiveBufferSize: Self { Self(level: SOL_SOCKET, name: SO_RCVBUF, label: "SO_RCVBUF") }
    /// SO_SNDBUF in bytes (doubled, as SO_RCVBUF).
    public static var sendBufferSize: Self { Self(level: SOL_SOCKET, name: SO_SNDBUF, label: "SO_SNDBUF") }
    /// SO_ERROR (read-only): the pending socket error, cleared by reading it.
    public static var pendingError: Self { Self(level: SOL_SOCKET, name: SO_ERROR, label: "SO_ERROR") }
    /// SO_TYPE (read-only): SOCK_STREAM, SOCK_DGRAM, ...
    public static var socketType: Self { Self(level: SOL_SOCKET, name: SO_TYPE, label: "SO_TYPE") }
    /// TCP_KEEPIDLE in seconds.
    public static var keepAliveIdle: Self { Self(level: Int32(IPPROTO_TCP), name: TCP_KEEPIDLE, label: "TCP_KEEPIDLE") }
    /// IP_TTL.
    public static var timeToLive: Self { Self(level: Int32(IPPROTO_IP), name: IP_TTL, label: "IP_TTL") }
}

extension SocketOption where Value == Linger {
    /// SO_LINGER.
    public static var linger: Self { Self(level: SOL_SOCKET, name: SO_LINGER, label: "SO_LINGER") }
}

/// What every socket helper has: its fd, the loop it runs on, options and addresses.
///
/// Option and address calls are plain system calls (setsockopt, getsockname): callable
/// from any thread, they never block.
public protocol SocketHandle: Sendable {
    var fd: FileDescriptor { get }
    var loop: EventLoop { get }
}

extension SocketHandle {
    /// setsockopt(2).
    public func setOption<V>(_ option: SocketOption<V>, _ value: V) throws(PlexusError) {
        try Socket.setOption(fd, option, value)
    }

    /// getsockopt(2).
    public func option<V>(_ option: SocketOption<V>) throws(PlexusError) -> V {
        try Socket.option(fd, option)
    }

    /// getsockname(2): the local address (with the port the kernel chose for port 0).
    public func localAddress() throws(PlexusError) -> SocketAddress {
        try Socket.address(fd, peer: false)
    }

    /// getpeername(2): the connected peer's address.
    public func peerAddress() throws(PlexusError) -> SocketAddress {
        try Socket.address(fd, peer: true)
    }
}

/// The synchronous socket calls behind the helpers (none of them blocks).
enum Socket {
    static func error(_ call: String, _ message: String? = nil) -> PlexusError {
        PlexusError(operation: call, errno: Errno(rawValue: plexus_errno()), message: message)
    }

    /// socket(2) with SOCK_CLOEXEC | SOCK_NONBLOCK.
    static func make(family: Int32, type: Int32) throws(PlexusError) -> FileDescriptor {
        let fd = Glibc.socket(family, type | Int32(SOCK_CLOEXEC.rawValue) | Int32(SOCK_NONBLOCK.rawValue), 0)
        guard fd >= 0 else { throw error("socket") }
        return FileDescriptor(rawValue: fd)
    }

    /// A new socket for `address`'s family, with `body` run on it; closed if `body` throws.
    static func make<R>(for address: SocketAddress, type: Int32,
                        _ body: (FileDescriptor) throws(PlexusError) -> R) throws(PlexusError) -> R {
        let fd = try make(family: address.family, type: type)
        do {
            return try body(fd)
        } catch {
            _ = Glibc.close(fd.rawValue)
            throw error
        }
    }

    /// Unlinks the socket file at a Unix address's path, if a socket file is what is there
    /// (lstat(2)): never a regular file, a directory or a link someone left at the path.
    static func removeStaleSocketFile(_ address: SocketAddress) {
        guard let path = address.unixPath, !path.isEmpty else { return }
        var info = stat()
        guard lstat(path, &info) == 0, info.st_mode & S_IFMT == S_IFSOCK else { return }
        _ = unlink(path)
    }

    /// The address of a Unix socket at `path`, or an error that says what is wrong with it.
    static func unixAddress(_ path: String) throws(PlexusError) -> SocketAddress {
        if let address = SocketAddress(unixPath: path) { return address }
        if path.isEmpty { throw PlexusError(operation: "bind", errno: .invalidArgument, message: "empty unix socket path") }
        if path.utf8.contains(0) {
            throw PlexusError(operation: "bind", errno: .invalidArgument, message: "unix socket path contains a NUL byte")
        }
        throw PlexusError(operation: "bind", errno: .fileNameTooLong,
                          message: "unix socket path too long (\(path.utf8.count) bytes, at most 107): \(path)")
    }

    static func bind(_ fd: FileDescriptor, _ address: SocketAddress) throws(PlexusError) {
        let r = address.withSockaddr { Glibc.bind(fd.rawValue, $0, $1) }
        guard r == 0 else { throw error("bind", "bind \(address): \(Errno(rawValue: plexus_errno()))") }
    }

    static func listen(_ fd: FileDescriptor, backlog: Int32) throws(PlexusError) {
        guard Glibc.listen(fd.rawValue, backlog) == 0 else { throw error("listen") }
    }

    static func setOption<V>(_ fd: FileDescriptor, _ option: SocketOption<V>, _ value: V) throws(PlexusError) {
        // SO_LINGER takes any int, but the kernel reads a negative one as unsigned (a
        // linger of ~292 million years) and reads back a different number: refuse it.
        if let linger = value as? Linger, let seconds = linger.seconds, seconds < 0 {
            throw PlexusError(operation: "setsockopt", errno: .invalidArgument,
                              message: "setsockopt \(option): a negative linger (\(seconds) s)")
        }
        let r = value.withOptionBytes { Glibc.setsockopt(fd.rawValue, option.level, option.name, $0.baseAddress, socklen_t($0.count)) }
        guard r == 0 else { throw error("setsockopt", "setsockopt \(option): \(Errno(rawValue: plexus_errno()))") }
    }

    static func option<V>(_ fd: FileDescriptor, _ option: SocketOption<V>) throws(PlexusError) -> V {
        let raw = UnsafeMutableRawBufferPointer.allocate(byteCount: max(V.optionSize, 16), alignment: 8)
        defer { raw.deallocate() }
        raw.initializeMemory(as: UInt8.self, repeating: 0)
        var length = socklen_t(V.optionSize)
        guard Glibc.getsockopt(fd.rawValue, option.level, option.name, raw.baseAddress, &length) == 0 else {
            throw error("getsockopt", "getsockopt \(option): \(Errno(rawValue: plexus_errno()))")
        }
        return V(optionBytes: UnsafeRawBufferPointer(raw))
    }

    static func address(_ fd: FileDescriptor, peer: Bool) throws(PlexusError) -> SocketAddress {
        var storage = sockaddr_storage()
        var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
        let r = withUnsafeMutablePointer(to: &storage) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                peer ? Glibc.getpeername(fd.rawValue, $0, &length) : Glibc.getsockname(fd.rawValue, $0, &length)
            }
        }
        guard r == 0 else { throw error(peer ? "getpeername" : "getsockname") }
        return SocketAddress(storage: storage, length: length)
    }
}

/// Which direction shutdown(2) closes.
public enum ShutdownDirection: Sendable {
    case read, write, both
    var how: Int32 {
        switch self {
        case .read: Int32(SHUT_RD)
        case .write: Int32(SHUT_WR)
        case .both: Int32(SHUT_RDWR)
        }
    }
}
