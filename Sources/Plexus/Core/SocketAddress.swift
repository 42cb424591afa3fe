import CPlexus
import Glibc

/// A socket address (IPv4, IPv6, Unix, or another family kept byte for byte).
///
/// 44 bytes: IP addresses live inline in a `sockaddr_in6` (a `sockaddr_in` fits in
/// it), a Unix path (or any other family's address) out of line. Every operation
/// carries its address by value, so a 128-byte `sockaddr_storage` here made every
/// `Operation` and `Completion` that big, and the hot path copied it around for nothing.
public struct SocketAddress: Sendable, Equatable, CustomStringConvertible {
    private var inet = sockaddr_in6()
    private var outOfLine: OutOfLine?
    var length: socklen_t

    /// A Unix address, or one of any family but AF_INET/AF_INET6, whole (AF_ALG's is
    /// 88 bytes: a sockaddr_in6 would cut it).
    private final class OutOfLine: Sendable {
        let address: sockaddr_storage
        init(_ address: sockaddr_storage) { self.address = address }
    }

    init(storage: sockaddr_storage, length: socklen_t) {
        self.length = min(length, socklen_t(MemoryLayout<sockaddr_storage>.size))
        self.storage = storage
    }

    /// The address as the kernel's `sockaddr_storage` (for bind, getsockname and the like).
    var storage: sockaddr_storage {
        get {
            var s = sockaddr_storage()
            withUnsafeMutableBytes(of: &s) { raw in
                if let outOfLine {
                    raw.storeBytes(of: outOfLine.address, as: sockaddr_storage.self)
                } else {
                    raw.storeBytes(of: inet, as: sockaddr_in6.self)
                }
            }
            return s
        }
        set {
            withUnsafeBytes(of: newValue) { raw in
                let family = Int32(newValue.ss_family)
                if family != AF_INET && family != AF_INET6 {
                    outOfLine = OutOfLine(newValue)
                    inet = sockaddr_in6()
                } else {
                    outOfLine = nil
                    inet = raw.load(as: sockaddr_in6.self)
                }
            }
        }
    }

    /// From a kernel-filled `sockaddr` of `length` bytes (recvfrom, accept, getsockname).
    public init?(_ address: UnsafePointer<sockaddr>, length: socklen_t) {
        guard length >= socklen_t(MemoryLayout<sa_family_t>.size),
              length <= socklen_t(MemoryLayout<sockaddr_storage>.size) else { return nil }
        var s = sockaddr_storage()
        withUnsafeMutableBytes(of: &s) { $0.copyMemory(from: UnsafeRawBufferPointer(start: address, count: Int(length))) }
        self.init(storage: s, length: length)
    }

    /// Calls `body` with the address as a `sockaddr` pointer and its length (for bind,
    /// connect and sendto).
    public func withUnsafeSockaddr<R, E: Error>(_ body: (UnsafePointer<sockaddr>, socklen_t) throws(E) -> R) throws(E) -> R {
        var s = storage
        return try withUnsafePointer(to: &s) { p throws(E) in
            try p.withMemoryRebound(to: sockaddr.self, capacity: 1) { sa throws(E) in try body(sa, length) }
        }
    }

    /// Writes the address where the kernel reads it; returns its length.
    func write(to destination: UnsafeMutablePointer<sockaddr_storage>) -> socklen_t {
        if let outOfLine {
            UnsafeMutableRawPointer(destination).storeBytes(of: outOfLine.address, as: sockaddr_storage.self)
        } else {
            UnsafeMutableRawPointer(destination).storeBytes(of: inet, as: sockaddr_in6.self)
        }
        return length
    }

    /// An IPv4 address such as "127.0.0.1" and a port; nil if `host` is not IPv4 text (inet_pton).
    public init?(ipv4 host: String, port: UInt16) {
        guard let address = IPv4Address(host) else { return nil }
        self.init(address, port: port)
    }

    /// An IPv6 address such as "::1" and a port; nil if `host` is not IPv6 text (inet_pton).
    public init?(ipv6 host: String, port: UInt16) {
        guard let address = IPv6Address(host) else { return nil }
        self.init(address, port: port)
    }

    /// A Unix domain socket path; nil if it is empty, holds a NUL byte, or does not fit
    /// in `sun_path`. (An empty path would bind an autobound abstract name, and a NUL
    /// would cut the path short or, first, name the abstract namespace: neither is a path.)
    public init?(unixPath path: String) {
        var sun = sockaddr_un()
        sun.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        guard !bytes.isEmpty, !bytes.contains(0), bytes.count < MemoryLayout.size(ofValue: sun.sun_path) else { return nil }
        withUnsafeMutableBytes(of: &sun.sun_path) { raw in
            raw.copyBytes(from: bytes)
            raw[bytes.count] = 0
        }
        var storage = sockaddr_storage()
        withUnsafeMutableBytes(of: &storage) { $0.storeBytes(of: sun, as: sockaddr_un.self) }
        let length = MemoryLayout<sockaddr_un>.offset(of: \sockaddr_un.sun_path)! + bytes.count + 1
        self.init(storage: storage, length: socklen_t(length))
    }

    /// AF_INET, AF_INET6, AF_UNIX, or the family of an address kept byte for byte.
    public var family: Int32 { outOfLine.map { Int32($0.address.ss_family) } ?? Int32(inet.sin6_family) }

    /// The port of an IP address, nil for Unix addresses.
    public var port: UInt16? {
        withUnsafeBytes(of: storage) { raw in
            switch family {
            case AF_INET: return UInt16(bigEndian: raw.load(as: sockaddr_in.self).sin_port)
            case AF_INET6: return UInt16(bigEndian: raw.load(as: sockaddr_in6.self).sin6_port)
            default: return nil
            }
        }
    }

    public var description: String {
        withUnsafeBytes(of: storage) { raw -> String in
            var text = [CChar](repeating: 0, count: Int(INET6_ADDRSTRLEN) + 1)
            switch family {
            case AF_INET:
                var a = raw.load(as: sockaddr_in.self).sin_addr
                inet_ntop(AF_INET, &a, &text, socklen_t(text.count))
                return "\(Self.text(text)):\(port ?? 0)"
            case AF_INET6:
                let sin6 = raw.load(as: sockaddr_in6.self)
                var a = sin6.sin6_addr
                inet_ntop(AF_INET6, &a, &text, socklen_t(text.count))
                // RFC 4007 zone: addresses that differ only in scope must print differently.
                let zone = sin6.sin6_scope_id != 0 ? "%\(sin6.sin6_scope_id)" : ""
                return "[\(Self.text(text))\(zone)]:\(port ?? 0)"
            case AF_UNIX:
                let offset = MemoryLayout<sockaddr_un>.offset(of: \sockaddr_un.sun_path)!
                let name = raw[offset..<max(offset, Int(length))]
                if name.count > 1, name.first == 0 {  // abstract: a name after a NUL, no file
                    return "unix:@" + String(decoding: name.dropFirst(), as: UTF8.self)
                }
                return "unix:" + String(decoding: name.prefix { $0 != 0 }, as: UTF8.self)
            default:
                return "family \(family)"
            }
        }
    }

    private static func text(_ chars: [CChar]) -> String {
        String(decoding: chars.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    public static func == (a: SocketAddress, b: SocketAddress) -> Bool {
        guard a.length == b.length else { return false }
        return withUnsafeBytes(of: a.storage) { x in
            withUnsafeBytes(of: b.storage) { y in x.prefix(Int(a.length)).elementsEqual(y.prefix(Int(b.length))) }
        }
    }
}
