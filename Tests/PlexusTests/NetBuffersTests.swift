import CPlexus
import Glibc
@testable import Plexus
import SystemPackage
import Testing

extension PlexusTests {
    /// IOBuffer/IOVector at their edges, datagram sockets, socket options and addresses,
    /// on every backend.
    @Suite struct NetBuffersTests {
        static func pattern(_ n: Int, seed: UInt8 = 0) -> [UInt8] {
            (0..<n).map { UInt8(truncatingIfNeeded: $0 &* 13 &+ Int(seed) &+ $0 >> 8) }
        }

        static func path(_ name: String) -> String { "/tmp/pxnb-\(getpid())-\(name)" }

        /// sendto(2) outside Plexus.
        static func rawSend(_ fd: FileDescriptor, _ bytes: [UInt8], to address: SocketAddress) -> Int {
            bytes.withUnsafeBytes { b in
                address.withUnsafeSockaddr { sa, len in Glibc.sendto(fd.rawValue, b.baseAddress, b.count, 0, sa, len) }
            }
        }

        // MARK: Datagrams

        /// Four receives prepared on an empty UDP socket, then four datagrams: the receive
        /// prepared first gets the first datagram, on every backend (as four reads of a
        /// stream get its bytes in order; guarantees.md, StreamReadTests).
        @Test(arguments: Backends.kinds)
        func receivesPreparedFirstGetTheFirstDatagrams(kind: BackendKind) throws {
            try Harness.run(kind) { h in
                let a = try h.udpSocket()
                let b = try h.udpSocket()
                var tokens: [Token] = []
                for _ in 0..<4 { tokens.append(h.prepare(.receiveMessage(b.fd, Message(IOBuffer(capacity: 16))))) }
                try h.submit()
                try h.idle(for: .milliseconds(20))
                for i in 0..<4 {
                    #expect(Self.rawSend(a.fd, Array("d\(i)".utf8), to: b.address) == 2)
                }
                let outcomes = try h.waitFor(tokens)
                let got = outcomes.map { $0.string ?? "?" }
                #expect(got == ["d0", "d1", "d2", "d3"], "receive i got \(got) on \(kind)")
            }
        }

        /// Eight sends to a Unix datagram socket whose peer's queue is full wait, then arrive
        /// in the order they were prepared, on every backend (as sends to a full stream
        /// socket do, StreamWriteTests).
        @Test(arguments: Backends.kinds)
        func blockedDatagramSendsArriveInOrder(kind: BackendKind) throws {
            try Harness.run(kind) { h in
                let (a, b) = try h.socketPair(type: Int32(SOCK_DGRAM.rawValue))
                while Glibc.send(a.rawValue, "f", 1, Int32(MSG_DONTWAIT)) == 1 {}  // the peer's queue is full
                var tokens: [Token] = []
                for i in 0..<8 { tokens.append(h.prepare(.sendMessage(a, Message(IOBuffer("s\(i)"))))) }
                try h.submit()
                try h.idle(for: .milliseconds(20))
                #expect(tokens.allSatisfy { h.isPending($0) }, "the sends should wait for room")
                var got: [String] = []
                var spins = 0
                while got.count < 8 && spins < 2000 {
                    var byte = [UInt8](repeating: 0, count: 8)
                    let n = Glibc.recv(b.rawValue, &byte, 8, Int32(MSG_DONTWAIT))
                    if n > 0 {
                        let text = String(decoding: byte[0..<n], as: UTF8.self)
                        if text != "f" { got.append(text) }
                    } else {
                        try h.waitOnce(timeout: .milliseconds(5)); spins += 1
                    }
                }
                _ = try h.waitFor(tokens)
                #expect(got == (0..<8).map { "s\($0)" }, "datagrams arrived as \(got) on \(kind)")
            }
        }

        /// A datagram longer than the buffer: without flags the count is what fit; with
        /// MSG_TRUNC (recvmsg and recv) it is the datagram's length while the buffer holds
        /// only what fit, the same on every backend, and never more than the buffer.
        @Test(arguments: Backends.kinds)
        func truncatedDatagramCountsAreTheSameOnEveryBackend(kind: BackendKind) throws {
            try Harness.run(kind) { h in
                let a = try h.udpSocket()
                let b = try h.udpSocket()
                let data = Self.pattern(100, seed: 1)
                for _ in 0..<3 { #expect(Self.rawSend(a.fd, data, to: b.address) == 100) }
                let plain = try h.perform(.receiveMessage(b.fd, Message(IOBuffer(capacity: 10))))
                expectResult(plain, 10)
                #expect(plain.bytes == Array(data[0..<10]))
                #expect(plain.address == a.address)
                let trunc = try h.perform(.receiveMessage(b.fd, Message(IOBuffer(capacity: 10)), flags: Int32(MSG_TRUNC)))
                expectResult(trunc, 100, "MSG_TRUNC: the datagram's real length")
                #expect(trunc.bytes == Array(data[0..<10]), "only what fits is appended")
                let recvTrunc = try h.perform(.recv(b.fd, IOBuffer(capacity: 7), flags: Int32(MSG_TRUNC)))
                expectResult(recvTrunc, 100)
                #expect(recvTrunc.bytes == Array(data[0..<7]))
            }
        }

        /// A datagram cut to the buffer says so (`Message.truncated`, MSG_TRUNC in the
        /// msghdr's flags). Once failed: a whole 10-byte datagram and a 1000-byte one cut to
        /// 10 bytes looked the same, and the 990 lost bytes were invisible.
        @Test(arguments: Backends.kinds)
        func aTruncatedDatagramSaysSo(kind: BackendKind) async throws {
            let loop = try Backends.loopThread(kind)
            defer { loop.shutdownAndWait() }
            let receiver = try DatagramSocket.udp(on: loop)
            let sender = try DatagramSocket.udp(on: loop)
            let to = try receiver.localAddress()
            try await loop.withTimeout(.seconds(10)) {
                _ = try await sender.send(IOBuffer("0123456789"), to: to)
                _ = try await sender.send(IOBuffer(String(repeating: "x", count: 1000)), to: to)
                _ = try await sender.send(IOBuffer(""), to: to)
                let exact = try await receiver.receive(into: IOBuffer(capacity: 10)).takeMessage()
                let long = try await receiver.receive(into: IOBuffer(capacity: 10)).takeMessage()
                let empty = try await receiver.receive(into: IOBuffer(capacity: 10)).takeMessage()
                let exactCut = exact.truncated, longCut = long.truncated, emptyCut = empty.truncated
                let longCount = long.buffer.count
                #expect(!exactCut, "exactly 10 bytes fit")
                #expect(longCut, "1000 bytes were cut to 10")
                #expect(!emptyCut)
                #expect(longCount == 10)
                try await sender.close()
                try await receiver.close()
            }
        }

        /// Unix datagrams: an empty one from a bound sender arrives with the sender's path;
        /// one from an unbound sender, received through the same slot right after, has no
        /// address (no stale sender from the previous receive).
        @Test(arguments: Backends.kinds)
        func unixDatagramSendersEmptyAndUnbound(kind: BackendKind) throws {
            try Harness.run(kind) { h in
                let serverPath = Self.path("srv-\(kind)"), clientPath = Self.path("cli-\(kind)")
                unlink(serverPath); unlink(clientPath)
                defer { unlink(serverPath); unlink(clientPath) }
                let server = h.own(socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_NONBLOCK.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0))
                let client = h.own(socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_NONBLOCK.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0))
                let unbound = h.own(socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_NONBLOCK.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0))
                let sa = SocketAddress(unixPath: serverPath)!, ca = SocketAddress(unixPath: clientPath)!
                try #require(sa.withUnsafeSockaddr { bind(server.rawValue, $0, $1) } == 0)
                try #require(ca.withUnsafeSockaddr { bind(client.rawValue, $0, $1) } == 0)
                for round in 0..<3 {
                    let empty = try h.perform(.sendMessage(client, Message(IOBuffer(capacity: 0), address: sa)))
                    expectResult(empty, 0)
                    let got = try h.perform(.receiveMessage(server, Message(IOBuffer(capacity: 8))))
                    expectResult(got, 0, "round \(round)")
                    #expect(got.address == ca, "round \(round): \(String(describing: got.address))")
                    #expect(got.address?.unixPath == clientPath)
                    #expect(Self.rawSend(unbound, Array("anon".utf8), to: sa) == 4)
                    let anon = try h.perform(.receiveMessage(server, Message(IOBuffer(capacity: 8))))
                    expectResult(anon, 4)
                    #expect(anon.string == "anon")
                    #expect(anon.address == nil || anon.address?.unixPath == "",
                            "round \(round): an unbound sender reported as \(String(describing: anon.address))")
                }
            }
        }

        /// A receive that fails hands its message back without a sender: an address the
        /// caller's Message held before must not look like the sender of this failed receive.
        @Test(arguments: Backends.kinds)
        func aFailedReceiveReportsNoSender(kind: BackendKind) throws {
            try Harness.run(kind) { h in
                let stale = SocketAddress(ipv4: "192.0.2.7", port: 7)!
                let (p, q) = try h.pipe()
                _ = q
                let failed = try h.perform(.receiveMessage(p, Message(IOBuffer(capacity: 8), address: stale)))
                #expect(failed.errno == ENOTSOCK)
                #expect(failed.address == nil, "a failed receive reports sender \(String(describing: failed.address))")
            }
        }

        /// Families that do not match the socket: typed errors naming the call, buffers back.
        @Test(arguments: Backends.kinds)
        func mismatchedFamiliesAreTyped(kind: BackendKind) async throws {
            let loop = try Backends.loopThread(kind)
            defer { loop.shutdownAndWait() }
            let path = Self.path("mm-\(kind)")
            unlink(path); defer { unlink(path) }
            let v4 = try DatagramSocket.udp(on: loop)
            let unix = try DatagramSocket.bind(SocketAddress(unixPath: path)!, on: loop)
            try await loop.withTimeout(.seconds(10)) {
                await #expect { _ = try await v4.send(IOBuffer("x"), to: SocketAddress(unixPath: path)!) } throws: {
                    ($0 as? PlexusError).map { $0.operation == "sendmsg" } ?? false
                }
                await #expect { _ = try await unix.send(IOBuffer("x"), to: .loopback(port: 9)) } throws: {
                    ($0 as? PlexusError).map { $0.operation == "sendmsg" } ?? false
                }
                #expect { try v4.connect(to: SocketAddress(host: "::1", port: 9)!) } throws: {
                    ($0 as? PlexusError).map { $0.operation == "connect" } ?? false
                }
                // The callback form hands the buffer back whole.
                let left: Int = try APIEdgeTests.onLoop(loop) { done in
                    v4.send(IOBuffer(bytes: Self.pattern(33)), to: SocketAddress(unixPath: path)!) { _, m in done(m.buffer.count) }
                }
                #expect(left == 33)
                try await v4.close()
                try await unix.close()
            }
        }

        /// An unbound AF_INET6 socket (dual stack) sends to 127.0.0.1 and is answered: the
        /// IPv4 side sees 127.0.0.1, the IPv6 side a mapped ::ffff:127.0.0.1 with the port.
        /// And ::1 to ::1: addresses equal what getsockname says.
        @Test(arguments: Backends.kinds)
        func dualStackAndIPv6Loopback(kind: BackendKind) async throws {
            let loop = try Backends.loopThread(kind)
            defer { loop.shutdownAndWait() }
            let v4 = try DatagramSocket.udp(on: loop)
            let v6 = try DatagramSocket.unbound(family: AF_INET6, on: loop)
            let a = try DatagramSocket.udp(host: "::1", on: loop)
            let b = try DatagramSocket.udp(host: "::1", on: loop)
            try await loop.withTimeout(.seconds(10)) {
                _ = try await v6.send(IOBuffer("hi4"), to: try v4.localAddress())
                let got = try await v4.receive(into: IOBuffer(capacity: 8))
                let m = got.takeMessage()
                #expect(m.buffer.string == "hi4")
                let mAddress = m.address
                let from = try #require(mAddress)
                #expect(from.family == AF_INET && from.ip == .v4(.loopback))
                _ = try await v4.send(IOBuffer("back"), to: from)
                let reply = try await v6.receive(into: IOBuffer(capacity: 8)).takeMessage()
                #expect(reply.buffer.string == "back")
                let rAddress = reply.address
                let r = try #require(rAddress)
                #expect(r.family == AF_INET6)
                if case .v6(let six) = r.ip { #expect(six.mappedIPv4 == .loopback) } else { Issue.record("\(r)") }
                #expect(r.port == (try v4.localAddress()).port)

                _ = try await a.send(IOBuffer("six"), to: try b.localAddress())
                let s = try await b.receive(into: IOBuffer(capacity: 8)).takeMessage()
                #expect(s.buffer.string == "six")
                #expect(s.address == (try a.localAddress()))
                #expect(s.address?.description == "[::1]:\((try a.localAddress()).port!)")
                for sock in [v4, v6, a, b] { try await sock.close() }
            }
        }

        // MARK: Vectors

        /// writevAll of 1024 buffers (1..2047 bytes, some partly consumed, some empty) over
        /// a TCP connection with small socket buffers, read back by readv of 1024 small
        /// buffers: every byte, in order, counts add up. And over a Unix socketpair.
        @Test(arguments: Backends.kinds)
        func iovMaxVectorsThroughSlowSockets(kind: BackendKind) async throws {
            let loop = try Backends.loopThread(kind)
            defer { loop.shutdownAndWait() }
            let listener = try StreamListener.tcp(port: 0, on: loop)
            let address = try listener.localAddress()
            try await loop.withTimeout(.seconds(60)) {
                let client = try await StreamConnection.connect(to: address, on: loop)
                let server = try await listener.accept()
                try client.setOption(.sendBufferSize, 4096)
                try server.setOption(.receiveBufferSize, 4096)
                let (u1, u2) = try StreamConnection.pair(on: loop)
                try u1.setOption(.sendBufferSize, 4096)
                for (w, r) in [(client, server), (u1, u2)] {
                    var expected: [UInt8] = []
                    var v = IOVector(capacity: 1024)
                    for i in 0..<1024 {
                        let size = (i * 37) % 384
                        var b = IOBuffer(bytes: Self.pattern(size, seed: UInt8(truncatingIfNeeded: i)))
                        if size > 4 && i % 3 == 0 { b.consume(3) }
                        b.withUnsafeBytes { expected += $0 }
                        v.append(b)
                    }
                    let total = expected.count
                    let all = expected
                    let reader = Task { () async throws -> [UInt8] in
                        var got: [UInt8] = []
                        while got.count < total {
                            var rv = IOVector(capacity: 1024)
                            for _ in 0..<1024 { rv.append(IOBuffer(capacity: 3)) }
                            let t = try await r.readv(into: rv)
                            let n = t.count
                            let back = t.takeVector()
                            var chunk: [UInt8] = []
                            for j in 0..<back.count { chunk += back.withBuffer(at: j) { $0.bytes } }
                            #expect(chunk.count == n, "readv said \(n), buffers hold \(chunk.count)")
                            if n == 0 { break }
                            got += chunk
                        }
                        return got
                    }
                    let rest = try await w.writevAll(v)
                    #expect(rest.totalCount == 0)
                    let got = try await reader.value
                    #expect(got.count == total)
                    #expect(got == all, "first difference at \(zip(got, all).enumerated().first { $0.element.0 != $0.element.1 }?.offset ?? -1)")
                }
                for c in [client, server, u1, u2] { try await c.close() }
                try await listener.close()
            }
        }

        /// readv with no room and writev of nothing on a socket: EINVAL naming the call,
        /// the vector back untouched (callback form). On UDP, a writev is one datagram and a
        /// readv into less room than the datagram keeps what fits.
        @Test(arguments: Backends.kinds)
        func vectorsOnSocketsAtTheirEdges(kind: BackendKind) throws {
            try Harness.run(kind) { h in
                let (a, b) = try h.socketPair()
                var full = IOVector(capacity: 3)
                for _ in 0..<3 { full.append(IOBuffer("ab")) }  // no spare room anywhere
                let noRoom = try h.perform(.readv(a, full, offset: nil))
                #expect(noRoom.errno == EINVAL && noRoom.error?.operation == "readv")
                #expect(noRoom.vectorBytes == [Array("ab".utf8), Array("ab".utf8), Array("ab".utf8)])
                var empty = IOVector(capacity: 2)
                empty.append(IOBuffer(capacity: 4)); empty.append(IOBuffer(capacity: 0))
                let nothing = try h.perform(.writev(b, empty, offset: nil))
                #expect(nothing.errno == EINVAL && nothing.error?.operation == "writev")

                let u1 = try h.udpSocket(), u2 = try h.udpSocket()
                try #require(u2.address.withUnsafeSockaddr { connect(u1.fd.rawValue, $0, $1) } == 0)
                var parts = IOVector(capacity: 3)
                parts.append(IOBuffer("abc")); parts.append(IOBuffer("defg")); parts.append(IOBuffer("hij"))
                let sent = try h.perform(.writev(u1.fd, parts, offset: nil))
                expectResult(sent, 10)
                #expect(sent.vectorBytes == [[], [], []])
                var room = IOVector(capacity: 2)
                room.append(IOBuffer(capacity: 4)); room.append(IOBuffer(capacity: 4))
                let got = try h.perform(.readv(u2.fd, room, offset: nil))
                expectResult(got, 8, "the rest of the datagram is dropped")
                #expect(got.vectorBytes == [Array("abcd".utf8), Array("efgh".utf8)])
                // Too big for UDP: EMSGSIZE, vector intact.
                var big = IOVector(capacity: 2)
                big.append(IOBuffer(bytes: Self.pattern(40_000))); big.append(IOBuffer(bytes: Self.pattern(40_000)))
                let tooBig = try h.perform(.writev(u1.fd, big, offset: nil))
                #expect(tooBig.errno == EMSGSIZE)
                #expect(tooBig.vectorBytes?.map(\.count) == [40_000, 40_000])
            }
        }

        // MARK: Options

        /// What setOption(.linger, x) sets, option(.linger) reads back, or the set is
        /// refused with a typed error.
        @Test(arguments: Backends.kinds)
        func lingerGetterMatchesSetter(kind: BackendKind) throws {
            let loop = try Backends.loop(kind)
            defer { loop.shutdown() }
            let udp = try DatagramSocket.udp(on: loop)
            defer { close(udp.fd.rawValue) }
            for seconds: Int32? in [nil, 0, 1, 3600, Int32.max, -1, Int32.min] {
                let value = Linger(seconds: seconds)
                do {
                    try udp.setOption(.linger, value)
                    let back = try udp.option(.linger)
                    #expect(back == value, "set \(String(describing: seconds)), got \(String(describing: back.seconds))")
                } catch {
                    #expect(error.errno == .invalidArgument && error.operation == "setsockopt", "\(error)")
                }
            }
        }

        /// Options read back as set (the documented doubling of buffer sizes aside).
        @Test(arguments: Backends.kinds)
        func optionsReadBackAsSet(kind: BackendKind) async throws {
            let loop = try Backends.loopThread(kind)
            defer { loop.shutdownAndWait() }
            let listener = try StreamListener.tcp(port: 0, on: loop)
            let tcp = try await StreamConnection.connect(to: try listener.localAddress(), on: loop)
            let udp6 = try DatagramSocket.unbound(family: AF_INET6, on: loop)
            for on in [true, false, true] {
                try tcp.setOption(.noDelay, on); #expect(try tcp.option(.noDelay) == on)
                try tcp.setOption(.keepAlive, on); #expect(try tcp.option(.keepAlive) == on)
                try tcp.setOption(.reuseAddress, on); #expect(try tcp.option(.reuseAddress) == on)
                try tcp.setOption(.reusePort, on); #expect(try tcp.option(.reusePort) == on)
                try udp6.setOption(.ipv6Only, on); #expect(try udp6.option(.ipv6Only) == on)
                try udp6.setOption(.broadcast, on); #expect(try udp6.option(.broadcast) == on)
            }
            for idle: Int32 in [1, 7200, 32767] {
                try tcp.setOption(.keepAliveIdle, idle); #expect(try tcp.option(.keepAliveIdle) == idle)
            }
            #expect { try tcp.setOption(.keepAliveIdle, 32768) } throws: { ($0 as? PlexusError)?.errno == .invalidArgument }
            try tcp.setOption(.sendBufferSize, 65536)
            #expect(try tcp.option(.sendBufferSize) == 131072)
            #expect(try tcp.option(.socketType) == Int32(SOCK_STREAM.rawValue))
            #expect(try tcp.option(.pendingError) == 0)
            #expect { try tcp.setOption(.socketType, 2) } throws: { ($0 as? PlexusError)?.operation == "setsockopt" }
            try await tcp.close()
            try await udp6.close()
            try await listener.close()
        }

        // MARK: Addresses

        /// A sockaddr of a family whose address is longer than a sockaddr_in6 (AF_ALG's is 88
        /// bytes) given to SocketAddress(_:length:) gives back the same bytes.
        @Test func rawSockaddrKeepsEveryByte() {
            var raw = [UInt8](repeating: 0, count: 88)
            raw.withUnsafeMutableBytes { $0.storeBytes(of: sa_family_t(38 /* AF_ALG */), as: sa_family_t.self) }
            for (i, c) in "hash".utf8.enumerated() { raw[2 + i] = c }
            for (i, c) in "sha256".utf8.enumerated() { raw[24 + i] = c }  // salg_name at 24
            let address = raw.withUnsafeBytes { b in
                SocketAddress(b.baseAddress!.assumingMemoryBound(to: sockaddr.self), length: 88)
            }
            let back = address.map { a in a.withUnsafeSockaddr { sa, len in Array(UnsafeRawBufferPointer(start: sa, count: Int(len))) } }
            #expect(back == raw, "salg_name lost: \(String(describing: back?[24..<30]))")
            // sockaddr_in6 with flow info and scope id: all 28 bytes survive.
            var sin6 = sockaddr_in6()
            sin6.sin6_family = sa_family_t(AF_INET6); sin6.sin6_port = UInt16(65535).bigEndian
            sin6.sin6_flowinfo = 0x1234_5678; sin6.sin6_scope_id = 0xDEAD_BEEF
            sin6.sin6_addr = IPv6Address("fe80::1")!.in6Addr
            let original = withUnsafeBytes(of: sin6) { Array($0) }
            let a6 = withUnsafePointer(to: &sin6) { p in
                p.withMemoryRebound(to: sockaddr.self, capacity: 1) { SocketAddress($0, length: socklen_t(MemoryLayout<sockaddr_in6>.size)) }
            }
            #expect(a6?.withUnsafeSockaddr { sa, len in Array(UnsafeRawBufferPointer(start: sa, count: Int(len))) } == original)
            #expect(a6?.port == 65535)
        }

        /// Two IPv6 addresses that differ only in scope id are different (==), so their text
        /// must differ too: RFC 4007 writes the zone as "fe80::1%2".
        @Test func ipv6DescriptionShowsTheScope() {
            let a = SocketAddress(IPv6Address("fe80::1")!, port: 80, scopeID: 2)
            let b = SocketAddress(IPv6Address("fe80::1")!, port: 80, scopeID: 0)
            #expect(a != b)
            #expect(a.description != b.description, "both print as \(a)")
            #expect(a.description == "[fe80::1%2]:80", "\(a)")
            #expect(a.scopeID == 2 && b.scopeID == 0)
            #expect(SocketAddress.loopback(port: 80).scopeID == nil)
        }

        /// Round trips that hold: getsockname of unbound sockets, IPv4 and IPv6 text.
        @Test(arguments: Backends.kinds)
        func addressesOfUnboundSocketsAndTextRoundTrips(kind: BackendKind) throws {
            let loop = try Backends.loop(kind)
            defer { loop.shutdown() }
            for family in [AF_INET, AF_INET6, AF_UNIX] {
                let s = try DatagramSocket.unbound(family: family, on: loop)
                defer { close(s.fd.rawValue) }
                let local = try s.localAddress()
                #expect(local.family == family)
                switch family {
                case AF_INET: #expect(local.description == "0.0.0.0:0")
                case AF_INET6: #expect(local.description == "[::]:0")
                default: #expect(local.description == "unix:" && local.unixPath == "")
                }
                #expect { _ = try s.peerAddress() } throws: { ($0 as? PlexusError).map { $0.errno == .socketNotConnected && $0.operation == "getpeername" } ?? false }
            }
            #expect { _ = try DatagramSocket.unbound(family: 12345, on: loop) } throws: {
                ($0 as? PlexusError).map { $0.operation == "socket" && $0.errno == .addressFamilyNotSupported } ?? false
            }
            for x in [UInt32(0), 1, 0x7F00_0001, 0xFFFF_FFFF, 0x0A00_00FF] {
                let a = IPv4Address(rawValue: x)
                #expect(IPv4Address(a.description) == a)
                let m = IPv6Address(mapping: a)
                #expect(IPv6Address(m.description) == m && m.mappedIPv4 == a)
                #expect(IPAddress(IPAddress.v4(a).description) == .v4(a))
            }
            var seed: UInt64 = 0x9E37_79B9_7F4A_7C15
            for _ in 0..<2000 {
                seed = seed &* 6364136223846793005 &+ 1442695040888963407
                let hi = seed
                seed = seed &* 6364136223846793005 &+ 1442695040888963407
                let lo = seed & (seed >> 7)  // zero runs sometimes
                for a in [IPv6Address(high: hi, low: lo), IPv6Address(high: 0, low: lo), IPv6Address(high: hi & 0xFFFF_0000_0000_FFFF, low: 0)] {
                    #expect(IPv6Address(a.description) == a, "\(a.high) \(a.low) -> \(a)")
                    #expect(IPAddress(a.description) == .v6(a))
                }
            }
        }

        // MARK: Buffers

        /// Buffer helpers at their edges: copy with a smaller or negative capacity keeps every
        /// byte; compact after consume; append of a non-contiguous collection.
        @Test func bufferHelpersAtTheirEdges() {
            var b = IOBuffer(bytes: Self.pattern(64))
            b.consume(60)
            let c = b.copy(capacity: -5)
            #expect(c.bytes == Array(Self.pattern(64)[60...]) && c.capacity == 4)
            b.compact()
            #expect(b.bytes == Array(Self.pattern(64)[60...]) && b.spareCapacity == 60)
            #expect(b.append(Set([UInt8(1)])) == 1)
            #expect(b.append((0..<1000).lazy.map { UInt8(truncatingIfNeeded: $0) }) == 59)
            #expect(b.count == 64 && b.spareCapacity == 0)
            var z = IOBuffer(capacity: 0)
            z.compact()
            #expect(z.copy(capacity: 0).capacity == 0)
        }
    }
}
