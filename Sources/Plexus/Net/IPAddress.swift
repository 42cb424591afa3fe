import CPlexus
import Glibc

/// An IPv4 address as a value: four octets, parsed from and printed as dotted text.
public struct IPv4Address: Sendable, Hashable, CustomStringConvertible, LosslessStringConvertible {
    /// The address in host byte order (127.0.0.1 is 0x7F00_0001).
    public var rawValue: UInt32

    public init(rawValue: UInt32) { self.rawValue = rawValue }

    public init(_ a: UInt8, _ b: UInt8, _ c: UInt8, _ d: UInt8) {
        rawValue = UInt32(a) << 24 | UInt32(b) << 16 | UInt32(c) << 8 | UInt32(d)
    }

    /// Dotted-quad text ("192.0.2.1"); nil if it is not (inet_pton).
    public init?(_ text: String) {
        var address = in_addr()
        guard parseAddress(AF_INET, text, &address) else { return nil }
        rawValue = UInt32(bigEndian: address.s_addr)
    }

    /// 0.0.0.0: every local address, for binding.
    public static let any = IPv4Address(rawValue: 0)
    /// 127.0.0.1.
    public static let loopback = IPv4Address(127, 0, 0, 1)
    /// 255.255.255.255.
    public static let broadcast = IPv4Address(rawValue: .max)

    public var octets: [UInt8] { [UInt8(rawValue >> 24), UInt8(truncatingIfNeeded: rawValue >> 16),
                                  UInt8(truncatingIfNeeded: rawValue >> 8), UInt8(truncatingIfNeeded: rawValue)] }
    public var isLoopback: Bool { rawValue >> 24 == 127 }
    public var isMulticast: Bool { rawValue >> 28 == 0xE }

    public var description: String { octets.map(String.init).joined(separator: ".") }

    var inAddr: in_addr { in_addr(s_addr: rawValue.bigEndian) }
}

/// An IPv6 address as a value: sixteen bytes, parsed from and printed as RFC 5952 text.
public struct IPv6Address: Sendable, Hashable, CustomStringConvertible, LosslessStringConvertible {
    /// The first and last eight bytes, each read big-endian (::1 is (0, 1)).
    public var high: UInt64
    public var low: UInt64

    public init(high: UInt64, low: UInt64) {
        self.high = high
        self.low = low
    }

    /// Sixteen bytes in network order.
    public init?(bytes: some Collection<UInt8>) {
        guard bytes.count == 16 else { return nil }
        let b = Array(bytes)
        high = b[0..<8].reduce(0) { $0 << 8 | UInt64($1) }
        low = b[8..<16].reduce(0) { $0 << 8 | UInt64($1) }
    }

    /// IPv6 text ("2001:db8::1", "::ffff:192.0.2.1"); nil if it is not (inet_pton).
    public init?(_ text: String) {
        var address = in6_addr()
        guard parseAddress(AF_INET6, text, &address) else { return nil }
        self.init(address)
    }

    init(_ address: in6_addr) {
        let bytes = withUnsafeBytes(of: address) { Array($0) }
        self.init(bytes: bytes)!
    }

    /// ::, every local address, for binding.
    public static let any = IPv6Address(high: 0, low: 0)
    /// ::1.
    public static let loopback = IPv6Address(high: 0, low: 1)

    /// The IPv4-mapped address ::ffff:a.b.c.d.
    public init(mapping v4: IPv4Address) {
        self.init(high: 0, low: 0xFFFF_0000_0000 | UInt64(v4.rawValue))
    }

    /// The sixteen bytes in network order.
    public var bytes: [UInt8] {
        (0..<8).map { UInt8(truncatingIfNeeded: high >> (56 - 8 * $0)) }
            + (0..<8).map { UInt8(truncatingIfNeeded: low >> (56 - 8 * $0)) }
    }

    /// The IPv4 address of an IPv4-mapped address (::ffff:a.b.c.d), else nil.
    public var mappedIPv4: IPv4Address? {
        high == 0 && low >> 32 == 0xFFFF ? IPv4Address(rawValue: UInt32(truncatingIfNeeded: low)) : nil
    }

    public var isLoopback: Bool { self == .loopback }

    var in6Addr: in6_addr {
        var address = in6_addr()
        withUnsafeMutableBytes(of: &address) { $0.copyBytes(from: bytes) }
        return address
    }

    public var description: String {
        var address = in6Addr
        var text = [CChar](repeating: 0, count: Int(INET6_ADDRSTRLEN) + 1)
        inet_ntop(AF_INET6, &address, &text, socklen_t(text.count))
        return String(decoding: text.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
}

/// An IPv4 or an IPv6 address.
public enum IPAddress: Sendable, Hashable, CustomStringConvertible, LosslessStringConvertible {
    case v4(IPv4Address)
    case v6(IPv6Address)

    /// IPv4 or IPv6 text; nil if it is neither.
    public init?(_ text: String) {
        if let v4 = IPv4Address(text) { self = .v4(v4) } else if let v6 = IPv6Address(text) { self = .v6(v6) } else { return nil }
    }

    public var description: String {
        switch self {
        case .v4(let a): a.description
        case .v6(let a): a.description
        }
    }
}

extension SocketAddress {
    /// An IPv4 socket address.
    public init(_ address: IPv4Address, port: UInt16) {
        var sin = sockaddr_in()
        sin.sin_family = sa_family_t(AF_INET)
        sin.sin_port = port.bigEndian
        sin.sin_addr = address.inAddr
        var storage = sockaddr_storage()
        withUnsafeMutableBytes(of: &storage) { $0.storeBytes(of: sin, as: sockaddr_in.self) }
        self.init(storage: storage, length: socklen_t(MemoryLayout<sockaddr_in>.size))
    }

    /// An IPv6 socket address; `scopeID` is the interface index of a link-local address.
    public init(_ address: IPv6Address, port: UInt16, scopeID: UInt32 = 0) {
        var sin6 = sockaddr_in6()
        sin6.sin6_family = sa_family_t(AF_INET6)
        sin6.sin6_port = port.bigEndian
        sin6.sin6_addr = address.in6Addr
        sin6.sin6_scope_id = scopeID
        var storage = sockaddr_storage()
        withUnsafeMutableBytes(of: &storage) { $0.storeBytes(of: sin6, as: sockaddr_in6.self) }
        self.init(storage: storage, length: socklen_t(MemoryLayout<sockaddr_in6>.size))
    }

    /// An IPv4 or IPv6 socket address.
    public init(_ address: IPAddress, port: UInt16) {
        switch address {
        case .v4(let a): self.init(a, port: port)
        case .v6(let a): self.init(a, port: port)
        }
    }

    /// IPv4 or IPv6 text and a port; nil if the text is neither (no name lookup).
    public init?(host: String, port: UInt16) {
        guard let ip = IPAddress(host) else { return nil }
        self.init(ip, port: port)
    }

    /// 127.0.0.1:`port`.
    public static func loopback(port: UInt16) -> SocketAddress { SocketAddress(IPv4Address.loopback, port: port) }

    /// The IP address of an AF_INET or AF_INET6 address.
    public var ip: IPAddress? {
        withUnsafeBytes(of: storage) { raw -> IPAddress? in
            switch family {
            case AF_INET: .v4(IPv4Address(rawValue: UInt32(bigEndian: raw.load(as: sockaddr_in.self).sin_addr.s_addr)))
            case AF_INET6: .v6(IPv6Address(raw.load(as: sockaddr_in6.self).sin6_addr))
            default: nil
            }
        }
    }

    /// The scope (interface index) of an AF_INET6 address, 0 when it has none; nil for
    /// other families. `description` shows a non-zero one as `[fe80::1%2]:port`.
    public var scopeID: UInt32? {
        guard family == AF_INET6 else { return nil }
        return withUnsafeBytes(of: storage) { $0.load(as: sockaddr_in6.self).sin6_scope_id }
    }

    /// The path of an AF_UNIX address (empty for an unnamed socket, and for an abstract
    /// one, which has a name but no path: `description` shows it as `unix:@name`), nil
    /// for IP addresses.
    public var unixPath: String? {
        guard family == AF_UNIX else { return nil }
        return withUnsafeBytes(of: storage) { raw in
            let offset = MemoryLayout<sockaddr_un>.offset(of: \sockaddr_un.sun_path)!
            guard Int(length) > offset else { return "" }
            return String(decoding: raw[offset..<Int(length)].prefix { $0 != 0 }, as: UTF8.self)
        }
    }

    /// Calls `body` with the address as the kernel takes it.
    func withSockaddr<R>(_ body: (UnsafePointer<sockaddr>, socklen_t) throws -> R) rethrows -> R {
        try withUnsafePointer(to: storage) { p in
            try p.withMemoryRebound(to: sockaddr.self, capacity: 1) { try body($0, length) }
        }
    }
}

/// inet_pton(3) of `text` into `address`. Text with a NUL byte is refused: the C string
/// would end there, and "127.0.0.1\0junk" would read as 127.0.0.1.
func parseAddress(_ family: Int32, _ text: String, _ address: UnsafeMutableRawPointer) -> Bool {
    guard !text.utf8.contains(0) else { return false }
    return inet_pton(family, text, address) == 1
}
