import CPlexus
import Glibc
@testable import Plexus
import Synchronization
import SystemPackage
import Testing

/// The public API surface at its edges (buffers, addresses, options, errors,
/// selection, loop misuse, streams and files). Every test runs on every backend.
extension PlexusTests {
    @Suite struct APIEdgeTests {
        // MARK: Helpers

        static func pipe(nonBlocking: Bool = true) throws -> (r: FileDescriptor, w: FileDescriptor) {
            var p: [Int32] = [-1, -1]
            try #require(plexus_pipe2(&p, O_CLOEXEC | (nonBlocking ? O_NONBLOCK : 0)) == 0)
            return (FileDescriptor(rawValue: p[0]), FileDescriptor(rawValue: p[1]))
        }

        static func pattern(_ n: Int, seed: UInt8 = 0) -> [UInt8] { (0..<n).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ Int(seed)) } }

        static func temporaryPath(_ name: String) -> String { "/tmp/plexus-api-edge-\(getpid())-\(name)" }

        static func fdCount() -> Int { openFileDescriptors().count }

        /// A port on 127.0.0.1 with nothing listening (bound and closed again).
        static func closedPort() throws -> UInt16 {
            let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
            try #require(fd >= 0)
            defer { close(fd) }
            let address = SocketAddress.loopback(port: 0)
            let r = address.withUnsafeSockaddr { bind(fd, $0, $1) }
            try #require(r == 0)
            var storage = sockaddr_storage()
            var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
            _ = withUnsafeMutablePointer(to: &storage) { p in
                p.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) }
            }
            return try #require(SocketAddress(storage: storage, length: length).port)
        }

        /// Runs `body` on the loop thread and waits (bounded) for it to call `done`.
        static func onLoop<R: Sendable>(_ loop: EventLoop, within seconds: Int = 10,
                                        _ body: @escaping @Sendable (@escaping @Sendable (R) -> Void) -> Void) throws -> R {
            let box = Mutex<R?>(nil)
            let start = ContinuousClock.now
            loop.execute { body { value in box.withLock { $0 = value } } }
            while ContinuousClock.now - start < .seconds(seconds) {
                if let v = box.withLock({ $0 }) { return v }
                usleep(1000)
            }
            throw HarnessError.timedOut("a loop callback")
        }

        // MARK: 1. Buffers

        @Test(arguments: Backends.kinds)
        func bufferEdgesHold(kind: BackendKind) throws {
            var zero = IOBuffer(capacity: 0)
            #expect(zero.capacity == 0 && zero.count == 0 && zero.isEmpty && zero.spareCapacity == 0)
            #expect(zero.append([1, 2, 3]) == 0)
            zero.consume(0)
            zero.appendUnsafe { _ in 0 }
            #expect(zero.bytes == [])
            #expect(zero.string == "")

            var b = IOBuffer(capacity: 8)
            #expect(b.append(Array("hello world".utf8)) == 8, "append takes what fits")
            #expect(b.string == "hello wo")
            b.consume(3)
            #expect(b.string == "lo wo")
            #expect(b.withUnsafeBytes { Array($0) } == Array("lo wo".utf8))
            #expect(b.spareCapacity == 0, "consume does not make room at the end")
            b.compact()
            #expect(b.string == "lo wo" && b.readerIndex == 0 && b.spareCapacity == 3)
            b.consume(5)
            #expect(b.readerIndex == 0 && b.writerIndex == 0 && b.spareCapacity == 8)
            b.append([9])
            b.clear()
            #expect(b.isEmpty && b.spareCapacity == 8)
            let c = IOBuffer(bytes: [UInt8]())
            #expect(c.capacity == 0)
            let copy = IOBuffer("abc").copy(capacity: 1)
            #expect(copy.capacity == 3 && copy.string == "abc")
            _ = kind
        }

        /// A zero-capacity buffer given to a read, and an empty one to a write: EINVAL,
        /// buffer back, on every backend (callback and async forms).
        @Test(arguments: Backends.kinds)
        func zeroCapacityReadAndEmptyWriteAreEINVAL(kind: BackendKind) async throws {
            let loop = try Backends.loopThread(kind)
            defer { loop.shutdownAndWait() }
            let (r, w) = try Self.pipe()
            defer { close(r.rawValue); close(w.rawValue) }
            do {
                _ = try await loop.read(r, into: IOBuffer(capacity: 0))
                Issue.record("a read into no room succeeded")
            } catch let e as PlexusError {
                #expect(e.errno == .invalidArgument && e.operation == "read", "\(e)")
            }
            do {
                _ = try await loop.write(w, IOBuffer(capacity: 16))
                Issue.record("a write of nothing succeeded")
            } catch let e as PlexusError {
                #expect(e.errno == .invalidArgument && e.operation == "write", "\(e)")
            }
        }

        /// readv into buffers with different spare room (one with none, some holding bytes
        /// already) through a pipe: the bytes land in order, byte for byte.
        @Test(arguments: Backends.kinds)
        func readvFillsSpareRegionsInOrder(kind: BackendKind) async throws {
            let loop = try Backends.loopThread(kind)
            defer { loop.shutdownAndWait() }
            let (r, w) = try Self.pipe()
            defer { close(r.rawValue); close(w.rawValue) }
            let data = Self.pattern(12, seed: 1)
            #expect(data.withUnsafeBytes { Glibc.write(w.rawValue, $0.baseAddress, $0.count) } == 12)

            try await loop.withTimeout(.seconds(10)) {
                var v = IOVector(capacity: 5)
                var b0 = IOBuffer(capacity: 4); b0.append([0xAA]); b0.consume(0)    // 1 held, 3 spare
                v.append(b0)
                v.append(IOBuffer(capacity: 0))                                   // no room
                var b2 = IOBuffer(capacity: 6); b2.append([0xBB, 0xCC]); b2.consume(1) // 1 held, 4 spare
                v.append(b2)
                var b3 = IOBuffer(capacity: 2); b3.append([0xDD, 0xEE])           // full
                v.append(b3)
                v.append(IOBuffer(capacity: 100))
                let done = try await loop.readv(r, into: v)
                let doneCount = done.count
                #expect(doneCount == 12)
                let vector = done.takeVector()
                #expect(vector.withBuffer(at: 0) { $0.bytes } == [0xAA] + Array(data[0..<3]))
                #expect(vector.withBuffer(at: 1) { $0.bytes } == [])
                #expect(vector.withBuffer(at: 2) { $0.bytes } == [0xCC] + Array(data[3..<7]))
                #expect(vector.withBuffer(at: 3) { $0.bytes } == [0xDD, 0xEE])
                #expect(vector.withBuffer(at: 4) { $0.bytes } == Array(data[7..<12]))
            }
        }

        /// writev of partly consumed buffers into a 4 KiB pipe that takes only part: the
        /// short write consumes exactly what went, writevAll sends the rest, the reader gets
        /// every byte in order.
        @Test(arguments: Backends.kinds)
        func shortWritevConsumesExactlyWhatWent(kind: BackendKind) async throws {
            let loop = try Backends.loopThread(kind)
            defer { loop.shutdownAndWait() }
            let (r, w) = try Self.pipe()
            defer { close(r.rawValue); close(w.rawValue) }
            #expect(fcntl(w.rawValue, Int32(PLEXUS_F_SETPIPE_SZ), 4096) == 4096)
            let parts = [Self.pattern(3000, seed: 1), Self.pattern(3000, seed: 2), Self.pattern(3000, seed: 3)]
            var expected: [UInt8] = []
            for (i, p) in parts.enumerated() { expected += p[(i * 10)...] }
            let expectedAll = expected
            try await loop.withTimeout(.seconds(20)) {
                var v = IOVector(capacity: 3)
                for (i, p) in parts.enumerated() {
                    var b = IOBuffer(bytes: p)
                    b.consume(i * 10)  // partly consumed already
                    v.append(b)
                }
                let first = try await loop.writev(w, v)
                let firstCount = first.count
                #expect(firstCount > 0 && firstCount <= 4096, "\(firstCount)")
                let vector = first.takeVector()
                #expect(vector.totalCount == expectedAll.count - firstCount)
                // What is left in the vector is exactly the tail of `expected`.
                var left: [UInt8] = []
                for i in 0..<vector.count { left += vector.withBuffer(at: i) { $0.bytes } }
                #expect(left == Array(expectedAll[firstCount...]))
                // Drain in parallel while the rest is written.
                let reader = Task { () async throws -> [UInt8] in
                    var got: [UInt8] = Array(expectedAll[0..<0])
                    var buffer = IOBuffer(capacity: 1000)
                    while got.count < expectedAll.count {
                        buffer.clear()
                        let t = try await loop.read(r, into: buffer)
                        let n = t.count
                        buffer = t.takeBuffer()
                        if n == 0 { break }
                        got += buffer.bytes
                    }
                    return got
                }
                let rest = try await loop.writev(w, vector)  // may be short again
                var vector2 = rest.takeVector()
                while vector2.totalCount > 0 {
                    vector2 = try await loop.writev(w, vector2).takeVector()
                }
                let got = try await reader.value
                #expect(got == expectedAll, "bytes differ at \(zip(got, expectedAll).enumerated().first { $0.element.0 != $0.element.1 }?.offset ?? -1)")
            }
        }

        /// 1024 one-byte buffers: pwritev and preadv of a temp file, byte for byte.
        @Test(arguments: Backends.kinds)
        func iovMaxVectorsThroughAFile(kind: BackendKind) async throws {
            let loop = try Backends.loopThread(kind)
            defer { loop.shutdownAndWait() }
            let path = Self.temporaryPath("iov-\(kind)")
            defer { unlink(path) }
            try await loop.withTimeout(.seconds(20)) {
                let file = try await File.open(FilePath(path), .readWrite, options: [.create, .truncate], on: loop)
                let data = Self.pattern(1024, seed: 5)
                var v = IOVector(capacity: 1024)
                for byte in data { v.append(IOBuffer(bytes: [byte])) }
                let written = try await file.writev(v, at: 0)
                #expect(written.count == 1024)
                var back = IOVector(capacity: 1024)
                for _ in 0..<1024 { back.append(IOBuffer(capacity: 1)) }
                let read = try await file.readv(into: back, at: 0)
                let readCount = read.count
                #expect(readCount == 1024)
                let vector = read.takeVector()
                var got: [UInt8] = []
                for i in 0..<vector.count { got += vector.withBuffer(at: i) { $0.bytes } }
                #expect(got == data)
                // A readv at the end of the file: 0 bytes, buffers untouched.
                var tail = IOVector(capacity: 2)
                tail.append(IOBuffer(capacity: 4)); tail.append(IOBuffer(capacity: 4))
                let eof = try await file.readv(into: tail, at: 1024)
                #expect(eof.count == 0)
                try await file.close()
            }
        }

        /// A huge IOBuffer capacity (what a file size or a length header could give) stops
        /// the process: the allocation fails and the initializer cannot throw (a
        /// precondition guarantees.md lists).
        @Test func hugeBufferCapacityStopsTheProcess() async {
            await #expect(processExitsWith: .failure) {
                let b = IOBuffer(capacity: 1 << 50)
                _ = b.capacity
            }
        }

        // MARK: 2. Addresses

        @Test(arguments: Backends.kinds)
        func ipv4TextParsing(kind: BackendKind) {
            #expect(IPv4Address("192.0.2.1")?.description == "192.0.2.1")
            #expect(IPv4Address("0.0.0.0") == .any)
            #expect(IPv4Address("255.255.255.255") == .broadcast)
            for bad in ["", " 1.2.3.4", "1.2.3.4 ", "01.2.3.4", "1.2.3.04", "256.1.1.1", "1.2.3", "1.2.3.4.5",
                        "1..2.3", "0x7f.0.0.1", "-1.2.3.4", "::1", "1.2.3.4/8", "localhost"] {
                #expect(IPv4Address(bad) == nil, "'\(bad)' parsed as \(IPv4Address(bad).map(String.init(describing:)) ?? "")")
            }
            _ = kind
        }

        /// Text with a NUL byte is not an address: inet_pton sees only what is before the
        /// NUL, so "127.0.0.1\0junk" must not parse (SocketAddress(unixPath:) rejects NULs).
        @Test(arguments: Backends.kinds)
        func addressTextWithANulByteIsRejected(kind: BackendKind) {
            #expect(IPv4Address("127.0.0.1\u{0}evil") == nil, "IPv4Address took text with a NUL")
            #expect(IPv6Address("::1\u{0}evil") == nil, "IPv6Address took text with a NUL")
            #expect(SocketAddress(host: "10.0.0.1\u{0}.example", port: 80) == nil, "SocketAddress(host:) took text with a NUL")
            #expect(SocketAddress(ipv4: "10.0.0.1\u{0}x", port: 80) == nil, "SocketAddress(ipv4:) took text with a NUL")
            #expect(SocketAddress(ipv6: "::1\u{0}x", port: 80) == nil, "SocketAddress(ipv6:) took text with a NUL")
            _ = kind
        }

        @Test(arguments: Backends.kinds)
        func ipv6TextParsingAndRoundTrips(kind: BackendKind) throws {
            let cases: [(String, String)] = [
                ("::", "::"), ("::1", "::1"), ("2001:DB8::1", "2001:db8::1"),
                ("2001:db8:0:0:0:0:0:1", "2001:db8::1"), ("2001:db8:0:1:0:0:0:1", "2001:db8:0:1::1"),
                ("::ffff:192.0.2.1", "::ffff:192.0.2.1"), ("fe80::1", "fe80::1"),
                ("1:2:3:4:5:6:7:8", "1:2:3:4:5:6:7:8"), ("1::", "1::"),
            ]
            for (text, printed) in cases {
                let a = try #require(IPv6Address(text), "\(text)")
                #expect(a.description == printed)
                #expect(IPv6Address(a.description) == a)
                #expect(IPv6Address(bytes: a.bytes) == a)
                #expect(IPAddress(text) == .v6(a))
            }
            for bad in ["", " ::1", "::1 ", "1::2::3", "12345::", "::g", "fe80::1%lo", "fe80::1%1", "[::1]", ":::",
                        "1:2:3:4:5:6:7:8:9", "::ffff:256.1.1.1"] {
                #expect(IPv6Address(bad) == nil, "'\(bad)'")
            }
            let mapped = try #require(IPv6Address("::ffff:10.1.2.3"))
            #expect(mapped.mappedIPv4 == IPv4Address(10, 1, 2, 3))
            #expect(IPv6Address(mapping: IPv4Address(10, 1, 2, 3)) == mapped)
            #expect(IPv6Address.loopback.mappedIPv4 == nil)
            #expect(IPAddress("10.1.2.3") != IPAddress("::ffff:10.1.2.3"))
            #expect(Set([IPAddress("::1")!, IPAddress("0::1")!, IPAddress("127.0.0.1")!]).count == 2)
            #expect(IPv6Address(bytes: [UInt8](repeating: 0, count: 15)) == nil)
            _ = kind
        }

        @Test(arguments: Backends.kinds)
        func socketAddressPortsAndText(kind: BackendKind) throws {
            for port: UInt16 in [0, 1, 65535] {
                let v4 = try #require(SocketAddress(host: "127.0.0.1", port: port))
                #expect(v4.port == port && v4.description == "127.0.0.1:\(port)" && v4.family == AF_INET)
                let v6 = try #require(SocketAddress(host: "::1", port: port))
                #expect(v6.port == port && v6.description == "[::1]:\(port)" && v6.family == AF_INET6)
                #expect(SocketAddress(ipv4: "127.0.0.1", port: port) == v4)
                #expect(SocketAddress(ipv6: "::1", port: port) == v6)
                #expect(v4 != v6)
                #expect(v4.ip == .v4(.loopback) && v6.ip == .v6(.loopback))
                #expect(v4.unixPath == nil)
            }
            #expect(SocketAddress(host: "127.0.0.1", port: 1) != SocketAddress(host: "127.0.0.1", port: 2))
            let a = SocketAddress(IPv6Address("fe80::1")!, port: 80, scopeID: 1)
            let b = SocketAddress(IPv6Address("fe80::1")!, port: 80, scopeID: 2)
            #expect(a != b, "scope ids differ")
            // Raw sockaddr constructor rejects impossible lengths.
            var s = sockaddr_storage()
            let tooShort = withUnsafePointer(to: &s) { p in p.withMemoryRebound(to: sockaddr.self, capacity: 1) { SocketAddress($0, length: 1) } }
            let tooLong = withUnsafePointer(to: &s) { p in p.withMemoryRebound(to: sockaddr.self, capacity: 1) { SocketAddress($0, length: 129) } }
            #expect(tooShort == nil && tooLong == nil)
            _ = kind
        }

        /// Unix paths: 107 bytes is the longest accepted (108 with the NUL); bound, the
        /// kernel's getsockname address equals the one built, text round-trips.
        @Test(arguments: Backends.kinds)
        func unixPathsAtTheLimit(kind: BackendKind) throws {
            let loop = try Backends.loopThread(kind)
            defer { loop.shutdownAndWait() }
            let prefix = "/tmp/pxr\(getpid())-"
            let path107 = prefix + String(repeating: "a", count: 107 - prefix.utf8.count)
            #expect(path107.utf8.count == 107)
            let address = try #require(SocketAddress(unixPath: path107))
            #expect(address.unixPath == path107)
            #expect(address.description == "unix:" + path107)
            #expect(SocketAddress(unixPath: path107 + "b") == nil, "108 bytes leave no room for the NUL")
            #expect(SocketAddress(unixPath: "") == nil)
            #expect(SocketAddress(unixPath: "a\u{0}b") == nil)
            defer { unlink(path107) }
            let listener = try StreamListener.bind(address, on: loop, removingExisting: true)
            let local = try listener.localAddress()
            #expect(local == address, "getsockname \(local) vs built \(address)")
            #expect(local.unixPath == path107)
            _ = loop.submitAndWait { listener.close() }
        }

        /// An abstract Unix address (bound outside Plexus) read back through localAddress():
        /// it has a name but no path. Once printed as "unix:", like an unnamed socket; now
        /// "unix:@name" (`unixPath` stays empty: there is no file to unlink).
        @Test(arguments: Backends.kinds)
        func abstractUnixAddressIsNotShownAsUnnamed(kind: BackendKind) throws {
            let loop = try Backends.loop(kind)
            defer { loop.shutdown() }
            let fd = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
            try #require(fd >= 0)
            defer { close(fd) }
            var sun = sockaddr_un()
            sun.sun_family = sa_family_t(AF_UNIX)
            let name = Array("plexus-api-edge-\(getpid())".utf8)
            withUnsafeMutableBytes(of: &sun.sun_path) { raw in raw[0] = 0; for (i, c) in name.enumerated() { raw[1 + i] = c } }
            let length = socklen_t(2 + 1 + name.count)
            let r = withUnsafePointer(to: &sun) { p in p.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, length) } }
            try #require(r == 0)
            let socket = DatagramSocket(fd: FileDescriptor(rawValue: fd), loop: loop)
            let local = try socket.localAddress()
            #expect(local.family == AF_UNIX)
            #expect(local.unixPath == "", "an abstract address has no path: \(String(describing: local.unixPath))")
            #expect(local.description == "unix:@" + String(decoding: name, as: UTF8.self), "\(local)")
        }

        // MARK: 2b. Socket options

        @Test(arguments: Backends.kinds)
        func socketOptionsWithBadValuesAreTyped(kind: BackendKind) throws {
            let loop = try Backends.loop(kind)
            defer { loop.shutdown() }
            let before = Self.fdCount()
            do {
                let udp = try DatagramSocket.udp(port: 0, on: loop)
                defer { close(udp.fd.rawValue) }
                for bad: Int32 in [0, 256, -2] {
                    #expect {
                        try udp.setOption(.timeToLive, bad)
                    } throws: { e in
                        let e = e as! PlexusError
                        return e.errno == .invalidArgument && e.operation == "setsockopt" && e.message.contains("IP_TTL")
                    }
                }
                try udp.setOption(.timeToLive, 1)
                #expect(try udp.option(.timeToLive) == 1)
                #expect(throws: PlexusError.self) { try udp.setOption(.ipv6Only, true) }  // IPv6 option on IPv4
                #expect(throws: PlexusError.self) { try udp.setOption(.keepAliveIdle, 0) } // TCP option on UDP
                #expect(try udp.option(.socketType) == Int32(SOCK_DGRAM.rawValue))
                try udp.setOption(.linger, .reset)
                #expect(try udp.option(.linger) == .reset)
                try udp.setOption(.linger, .off)
                #expect(try udp.option(.linger) == .off)
                try udp.setOption(.receiveBufferSize, -1)  // the kernel clamps; no crash
            }
            // A closed fd: EBADF, named.
            let dead = DatagramSocket(fd: FileDescriptor(rawValue: 999_999), loop: loop)
            #expect { try dead.setOption(.reuseAddress, true) } throws: { ($0 as? PlexusError)?.errno == .badFileDescriptor }
            #expect { _ = try dead.option(.pendingError) } throws: { ($0 as? PlexusError)?.errno == .badFileDescriptor }
            #expect { _ = try dead.localAddress() } throws: { ($0 as? PlexusError).map { $0.errno == .badFileDescriptor && $0.operation == "getsockname" } ?? false }
            #expect(Self.fdCount() == before)
        }

        // MARK: 3. Errors and selection

        @Test(arguments: Backends.kinds)
        func plexusErrorDescriptionsNameOperationAndErrno(kind: BackendKind) {
            let e = PlexusError(.read, result: -EBADF)
            #expect(e.operation == "read" && e.errno == .badFileDescriptor)
            #expect(e.description.contains("read") && e.description.contains("errno \(EBADF)"), "\(e)")
            let f = PlexusError(operation: "io_uring_setup", errno: .noMemory, message: "memlock")
            #expect(f.operation == "io_uring_setup" && f.description.contains("io_uring_setup") && f.description.contains("errno \(ENOMEM)"))
            let g = PlexusError(operation: "read", errno: .badFileDescriptor)
            #expect(g == e)
            #expect(PlexusError(operation: "read", errno: .badFileDescriptor, message: "x") != e)
            #expect(PlexusError(operation: "write", errno: .badFileDescriptor) != e)
            _ = kind
        }

        @Test(arguments: Backends.kinds)
        func backendNamesParseAndUnknownOnesListTheValid(kind: BackendKind) throws {
            #expect(try BackendChoice(name: "EPOLL") == .epoll)
            #expect(try BackendChoice(name: "Io_Uring") == .ioUring)
            #expect(try BackendChoice(name: "AUTO") == .automatic)
            for bad in [" epoll", "epoll ", "io-uring", "iouring", "", "kqueue", "epoll\n"] {
                do {
                    _ = try BackendChoice(name: bad)
                    Issue.record("'\(bad)' was taken as a backend")
                } catch {
                    let text = "\(error)"
                    #expect(text.contains("io_uring") && text.contains("epoll") && text.contains("poll") && text.contains("auto"), "\(text)")
                    #expect(text.contains("PLEXUS_BACKEND"))
                }
            }
            #expect(Capabilities([.nativeCompletions, .noDrop]).description == "[nativeCompletions, noDrop]")
            #expect(Capabilities().description == "[]")
            _ = kind
        }

        /// PLEXUS_BACKEND in the environment (in a child process, so the suite's own choice is untouched).
        @Test func environmentBackendValues() async {
            await #expect(processExitsWith: .success) {
                setenv("PLEXUS_BACKEND", "  ", 1)
                do { _ = try BackendChoice.fromEnvironment(); exit(3) } catch {
                    guard "\(error)".contains("valid names") else { exit(4) }
                }
                setenv("PLEXUS_BACKEND", "Poll", 1)
                guard (try? BackendChoice.fromEnvironment()) == .poll else { exit(5) }
                setenv("PLEXUS_BACKEND", "", 1)
                guard (try? BackendChoice.fromEnvironment()) == .automatic else { exit(6) }
                setenv("PLEXUS_BACKEND", "bogus", 1)
                do { _ = try EventLoop(); exit(7) } catch {
                    guard "\(error)".contains("bogus"), "\(error)".contains("io_uring, epoll, poll") else { exit(8) }
                }
                exit(0)
            }
        }

        // MARK: 4. Loop misuse

        /// A loop-thread-only call from another thread stops the process with a message
        /// that says what to do.
        @Test func loopThreadOnlyCallFromAnotherThreadStopsWithAdvice() async throws {
            let result = await #expect(processExitsWith: .failure, observing: [\.standardErrorContent]) {
                let loop = try EventLoop.startThread(name: "plexus-exit-api")
                loop.schedule(after: .seconds(1)) { _ in }
                sleep(5)
            }
            // An optimized build traps without the precondition's message.
            #if DEBUG
            if let result {
                let text = String(decoding: result.standardErrorContent, as: UTF8.self)
                #expect(text.contains("loop thread") && text.contains("execute"), "stderr: \(text)")
            }
            #else
            _ = result
            #endif
        }

        /// runOnce() from another thread while a thread run()s the loop: the loop's state is
        /// touched by two threads at once. A loop-thread-only call must trap.
        @Test func runOnceWhileAnotherThreadRunsTheLoopTraps() async throws {
            let result = await #expect(processExitsWith: .failure, observing: [\.standardErrorContent, \.exitStatus]) {
                alarm(10)  // a hang (seen on poll) ends as SIGALRM; stderr then lacks the check's message
                let loop = try EventLoop.startThread(name: "plexus-exit-api")
                for _ in 0..<1000 { loop.runOnce(timeout: .zero) }
                loop.shutdownAndWait()
                exit(0)  // ran without a word: the check is missing
            }
            if let result {
                #expect(result.exitStatus != .signal(SIGALRM), "a hang, not the loop-thread check")
                // An optimized build traps without the precondition's message.
                #if DEBUG
                let text = String(decoding: result.standardErrorContent, as: UTF8.self)
                #expect(text.contains("loop thread"), "\(result.exitStatus): a crash or hang, not the loop-thread check: \(text.suffix(300))")
                #endif
            }
        }

        /// pendingOperations is documented loop-thread only; it is read without a check.
        @Test func pendingOperationsOffTheLoopThreadTraps() async throws {
            await #expect(processExitsWith: .failure) {
                let loop = try EventLoop.startThread(name: "plexus-exit-api")
                _ = loop.pendingOperations
                _ = loop.pendingTimers
                loop.shutdownAndWait()
                exit(0)
            }
        }

        @Test(arguments: Backends.kinds)
        func executeAfterShutdownIsRefused(kind: BackendKind) throws {
            let loop = try Backends.loopThread(kind)
            let ran = Atomic<Int>(0)
            #expect(loop.execute { ran.add(1, ordering: .relaxed) })
            loop.shutdown()
            #expect(!loop.execute { ran.add(100, ordering: .relaxed) })
            loop.shutdownAndWait()
            #expect(!loop.execute { ran.add(100, ordering: .relaxed) })
            #expect(ran.load(ordering: .relaxed) == 1)
            // A loop never run, shut down: refused too.
            let idle = try Backends.loop(kind)
            idle.shutdown()
            #expect(!idle.execute {})
        }

        @Test(arguments: Backends.kinds)
        func aThousandLoopsCreatedAndDroppedLeaveNoFd(kind: BackendKind) throws {
            _ = try Backends.start(kind)
            let before = Self.fdCount()
            for _ in 0..<1000 {
                let loop = try EventLoop(backend: BackendChoice(rawValue: kind.rawValue)!)
                _ = loop
            }
            #expect(Self.fdCount() == before)
            // Turned once (its wake-up read armed) and dropped without shutdown.
            for _ in 0..<200 {
                let loop = try EventLoop(backend: BackendChoice(rawValue: kind.rawValue)!)
                loop.runOnce(timeout: .zero)
            }
            #expect(Self.fdCount() == before, "loops turned by runOnce and dropped leak")
            for _ in 0..<50 {
                let loop = try EventLoop.startThread(backend: BackendChoice(rawValue: kind.rawValue)!)
                loop.shutdownAndWait()
            }
            #expect(Self.fdCount() == before)
        }

        /// Right after startThread returns, a loop-thread-only call from the caller's thread
        /// must trap like any later one. startThread signals "started" before run() marks
        /// the loop running, so the check can miss it. Ten children; each must trap.
        @Test func callsRightAfterStartThreadAreChecked() async {
            for _ in 0..<10 {
                await #expect(processExitsWith: .failure) {
                    alarm(10)
                    let loop = try EventLoop.startThread(name: "plexus-exit-api", idleSpin: .zero)
                    loop.schedule(after: .seconds(60)) { _ in }  // not on the loop thread
                    loop.shutdownAndWait()
                    exit(0)  // the check did not fire
                }
            }
        }

        /// shutdownAndWait() on a loop run by the user's own thread (run(), not startThread):
        /// it must return, not wait forever for a thread startThread never made.
        @Test func shutdownAndWaitOnALoopRunByTheCallersOwnThreadReturns() async {
            await #expect(processExitsWith: .success) {
                alarm(5)  // SIGALRM ends a hang
                let loop = try EventLoop()
                var thread = pthread_t()
                let box = Unmanaged.passRetained(loop).toOpaque()
                pthread_create(&thread, nil, { raw in
                    Unmanaged<EventLoop>.fromOpaque(raw!).takeRetainedValue().run()
                    return nil
                }, box)
                usleep(100_000)
                loop.shutdownAndWait()
                pthread_join(thread, nil)
                exit(0)
            }
        }

        /// The same for a loop that was never run at all.
        @Test func shutdownAndWaitOnANeverRunLoopReturns() async {
            await #expect(processExitsWith: .success) {
                alarm(5)
                let loop = try EventLoop()
                loop.shutdownAndWait()
                exit(0)
            }
        }

        @Test func eventLoopGroupOfZeroLoopsTraps() async {
            await #expect(processExitsWith: .failure) {
                _ = try EventLoopGroup(loops: 0)
            }
        }

        /// A group larger than the fd limit allows: a typed error, and the loops already
        /// started are stopped with nothing leaked (in a child, which lowers its RLIMIT_NOFILE).
        @Test func eventLoopGroupBeyondTheFdLimitFailsTypedAndLeaksNothing() async {
            let report = ChildReport()
            let result = await #expect(processExitsWith: .success) { [report = report.path as String] in
                func print(_ line: String) { ChildReport.append(line, to: report) }
                // Dispatch's own timerfd may appear meanwhile: not the loops'.
                func count() -> Int { openFileDescriptors().filter { !$0.value.contains("timerfd") }.count }
                waitUntilFileDescriptorsSettle()
                let before = count()
                var limit = rlimit()
                getrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit)
                limit.rlim_cur = rlim_t(before + 40)
                setrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit)
                for name in ["epoll", "poll", "io_uring"] {
                    do {
                        let g = try EventLoopGroup(loops: 200, backend: BackendChoice(rawValue: name)!)
                        g.shutdownAndWait()
                        exit(10)
                    } catch let e as PlexusError {
                        guard e.errno == .tooManyOpenFiles else { print("\(name): \(e)"); exit(11) }
                    } catch let e as BackendSelectionError {
                        guard "\(e)".contains("errno \(EMFILE)") else { print("\(name): \(e)"); exit(12) }
                    } catch {
                        print("\(name): \(error)"); exit(13)
                    }
                    usleep(100_000)
                    let after = count()
                    // Under TSan the runtime opens its own fds (symbolizer pipes) meanwhile.
                    guard after == before || getenv("PLEXUS_SANITIZER") != nil else {
                        print("\(name): \(before) fds before, \(after) after: \(openFileDescriptors().sorted { $0.key < $1.key }.suffix(12))")
                        exit(14)
                    }
                }
                exit(0)
            }
            report.finish(result)
        }

        // MARK: 5. Streams and files

        @Test(arguments: Backends.kinds)
        func connectToAClosedPortIsECONNREFUSEDAndClosesTheSocket(kind: BackendKind) async throws {
            let loop = try Backends.loopThread(kind)
            defer { loop.shutdownAndWait() }
            let port = try Self.closedPort()
            let before = Self.fdCount()
            for host in ["127.0.0.1", "::1"] {
                let address = try #require(SocketAddress(host: host, port: port))
                do {
                    _ = try await StreamConnection.connect(to: address, on: loop, timeout: .seconds(5))
                    Issue.record("connected to a closed port")
                } catch let e as PlexusError {
                    #expect(e.errno == .connectionRefused && e.operation == "connect", "\(host): \(e)")
                }
                // Callback form.
                let result: Result<Int, PlexusError> = try Self.onLoop(loop) { done in
                    StreamConnection.connect(to: address, on: loop, timeout: .seconds(5)) { r in
                        done(r.map { c in close(c.fd.rawValue); return 0 })
                    }
                }
                guard case .failure(let e) = result else { Issue.record("callback connect succeeded"); continue }
                #expect(e.errno == .connectionRefused && e.operation == "connect", "\(host): \(e)")
            }
            // A Unix path that does not exist: ENOENT; one that is not a socket: ECONNREFUSED.
            let missing = try #require(SocketAddress(unixPath: Self.temporaryPath("missing")))
            await #expect { _ = try await StreamConnection.connect(to: missing, on: loop) } throws: {
                ($0 as? PlexusError)?.errno == .noSuchFileOrDirectory
            }
            for _ in 0..<20 where Self.fdCount() != before { usleep(10_000) }
            #expect(Self.fdCount() == before)
        }

        @Test(arguments: Backends.kinds)
        func connectToAnUnroutableAddressTimesOutTypedAndClosesTheSocket(kind: BackendKind) async throws {
            let loop = try Backends.loopThread(kind)
            defer { loop.shutdownAndWait() }
            let before = Self.fdCount()
            let address = SocketAddress(IPv4Address(192, 0, 2, 1), port: 9)  // TEST-NET-1
            do {
                _ = try await StreamConnection.connect(to: address, on: loop, timeout: .milliseconds(200))
                Issue.record("connected to TEST-NET-1")
            } catch let e as PlexusError {
                #expect([.timedOut, .networkUnreachable, .noRouteToHost, .connectionRefused].contains(e.errno), "\(e)")
                #expect(e.operation == "connect", "\(e)")
            }
            let result: Result<Int, PlexusError> = try Self.onLoop(loop) { done in
                StreamConnection.connect(to: address, on: loop, timeout: .milliseconds(200)) { r in
                    done(r.map { c in close(c.fd.rawValue); return 0 })
                }
            }
            if case .failure(let e) = result {
                #expect([.timedOut, .networkUnreachable, .noRouteToHost, .connectionRefused].contains(e.errno), "\(e)")
            } else { Issue.record("callback connect succeeded") }
            for _ in 0..<20 where Self.fdCount() != before { usleep(10_000) }
            #expect(Self.fdCount() == before)
        }

        /// A task cancelled while its connect waits: CancellationError, socket closed.
        @Test(arguments: Backends.kinds)
        func cancellingAConnectClosesItsSocket(kind: BackendKind) async throws {
            let loop = try Backends.loopThread(kind)
            defer { loop.shutdownAndWait() }
            // A listener whose backlog is full makes connects wait (SYNs dropped).
            let listener = try StreamListener.tcp(port: 0, on: loop, backlog: 0)
            defer { close(listener.fd.rawValue) }
            let address = try listener.localAddress()
            var fillers: [StreamConnection] = []
            for _ in 0..<4 { if let c = try? await StreamConnection.connect(to: address, on: loop, timeout: .milliseconds(300)) { fillers.append(c) } }
            defer { for c in fillers { close(c.fd.rawValue) } }
            let before = Self.fdCount()
            let task = Task { try await StreamConnection.connect(to: address, on: loop) }
            try await Task.sleep(for: .milliseconds(100))
            task.cancel()
            let outcome = await task.result
            if case .success(let c) = outcome { close(c.fd.rawValue) }
            for _ in 0..<50 where Self.fdCount() != before { usleep(10_000) }
            #expect(Self.fdCount() == before, "\(outcome)")
        }

        /// connect on a loop that has shut down: the helper makes a socket, and "on any
        /// failure the socket is closed". Async (from off the loop) and callback forms.
        @Test(arguments: Backends.kinds)
        func connectOnAShutDownLoopClosesItsSocket(kind: BackendKind) async throws {
            let loop = try Backends.loopThread(kind)
            loop.shutdownAndWait()
            let address = SocketAddress.loopback(port: try Self.closedPort())
            let beforeSet = Set(openFileDescriptors().keys)
            let before = beforeSet.count
            defer { for fd in openFileDescriptors().keys where !beforeSet.contains(fd) { close(fd) } }
            do {
                _ = try await StreamConnection.connect(to: address, on: loop)
                Issue.record("connected on a finished loop")
            } catch let e as PlexusError {
                #expect(e.errno == .canceled, "\(e)")
            }
            #expect(Self.fdCount() == before, "async connect on a finished loop leaked its socket: \(openFileDescriptors().filter { $0.value.hasPrefix("socket:") }.count) sockets open")
            let failed = Mutex<PlexusError?>(nil)
            StreamConnection.connect(to: address, on: loop) { r in
                if case .failure(let e) = r { failed.withLock { $0 = e } }
            }
            #expect(failed.withLock { $0 }?.errno == .canceled)
            #expect(Self.fdCount() == before, "callback connect on a finished loop leaked its socket")
        }

        @Test(arguments: Backends.kinds)
        func bindingAPortInUseIsEADDRINUSE(kind: BackendKind) throws {
            let loop = try Backends.loop(kind)
            defer { loop.shutdown() }
            let first = try StreamListener.tcp(port: 0, on: loop)
            defer { close(first.fd.rawValue) }
            let port = try #require(try first.localAddress().port)
            let before = Self.fdCount()
            #expect { _ = try StreamListener.tcp(port: port, on: loop) } throws: { e in
                guard let e = e as? PlexusError else { return false }
                return e.errno == .addressInUse && e.operation == "bind" && e.description.contains("127.0.0.1:\(port)")
                    && e.description.contains("errno \(EADDRINUSE)")
            }
            #expect { _ = try StreamListener.tcp(port: port, on: loop, reusePort: true) } throws: {
                ($0 as? PlexusError)?.errno == .addressInUse
            }
            let udp = try DatagramSocket.udp(port: 0, on: loop)
            defer { close(udp.fd.rawValue) }
            let udpPort = try #require(try udp.localAddress().port)
            let before2 = Self.fdCount()
            #expect { _ = try DatagramSocket.udp(port: udpPort, on: loop) } throws: { ($0 as? PlexusError)?.errno == .addressInUse }
            #expect(Self.fdCount() == before2)
            #expect { _ = try StreamListener.tcp(host: "not an address", port: 1, on: loop) } throws: { ($0 as? PlexusError)?.errno == .invalidArgument }
            #expect { _ = try StreamListener.tcp(host: "fe80::1%lo", port: 1, on: loop) } throws: { ($0 as? PlexusError)?.errno == .invalidArgument }
            #expect { _ = try StreamListener.unix(path: "/nonexistent-dir-\(getpid())/s", on: loop) } throws: {
                ($0 as? PlexusError)?.errno == .noSuchFileOrDirectory
            }
            #expect(Self.fdCount() == before - 0 + 1, "only the UDP socket is new")
        }

        /// removingExisting "unlinks a stale socket file first": a regular file at the path
        /// is not a stale socket and must survive (bind then fails EADDRINUSE).
        @Test(arguments: Backends.kinds)
        func removingExistingDoesNotDeleteARegularFile(kind: BackendKind) throws {
            let loop = try Backends.loop(kind)
            defer { loop.shutdown() }
            for datagram in [false, true] {
                let path = Self.temporaryPath("precious-\(kind)-\(datagram)")
                let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
                try #require(fd >= 0)
                _ = Glibc.write(fd, "data", 4)
                close(fd)
                defer { unlink(path) }
                if datagram {
                    if let s = try? DatagramSocket.bind(SocketAddress(unixPath: path)!, on: loop, removingExisting: true) { close(s.fd.rawValue) }
                } else {
                    if let l = try? StreamListener.unix(path: path, on: loop, removingExisting: true) { close(l.fd.rawValue) }
                }
                var st = stat()
                let exists = stat(path, &st) == 0
                #expect(exists && (st.st_mode & S_IFMT) == S_IFREG, "\(datagram ? "DatagramSocket.bind" : "StreamListener.unix"): removingExisting deleted a regular file")
            }
        }

        /// The error for a Unix path that is not a path (empty, or with a NUL) says so,
        /// not "too long".
        @Test(arguments: Backends.kinds)
        func unixListenerErrorForABadPathSaysWhatIsWrong(kind: BackendKind) throws {
            let loop = try Backends.loop(kind)
            defer { loop.shutdown() }
            for path in ["", "a\u{0}b"] {
                do {
                    _ = try StreamListener.unix(path: path, on: loop)
                    Issue.record("bound '\(path)'")
                } catch {
                    #expect(!error.message.contains("too long"), "'\(path.debugDescription)': \(error)")
                    #expect(error.errno != .fileNameTooLong, "'\(path.debugDescription)': \(error)")
                }
            }
            do {
                _ = try StreamListener.unix(path: "/" + String(repeating: "x", count: 200), on: loop)
                Issue.record("bound a 201-byte path")
            } catch {
                #expect(error.errno == .fileNameTooLong)
            }
        }

        @Test(arguments: Backends.kinds)
        func fileOpenedForOneDirectionRefusesTheOtherTyped(kind: BackendKind) async throws {
            let loop = try Backends.loopThread(kind)
            defer { loop.shutdownAndWait() }
            let path = Self.temporaryPath("dir-\(kind)")
            defer { unlink(path) }
            let before = Self.fdCount()
            try await loop.withTimeout(.seconds(10)) {
                let w = try await File.open(FilePath(path), .writeOnly, options: [.create, .truncate], on: loop)
                _ = try await w.writeAll(IOBuffer("hello"), at: 0)
                await #expect { _ = try await w.read(into: IOBuffer(capacity: 8), at: 0) } throws: {
                    ($0 as? PlexusError).map { $0.errno == .badFileDescriptor && $0.operation == "read" } ?? false
                }
                await #expect { _ = try await w.read(into: IOBuffer(capacity: 8), at: nil) } throws: {
                    ($0 as? PlexusError)?.errno == .badFileDescriptor
                }
                await #expect {
                    var v = IOVector(capacity: 1); v.append(IOBuffer(capacity: 8))
                    _ = try await w.readv(into: v, at: 0)
                } throws: {
                    ($0 as? PlexusError).map { $0.errno == .badFileDescriptor && $0.operation == "readv" } ?? false
                }
                #expect(try w.size() == 5)
                try await w.close()
                let r = try await File.open(FilePath(path), .readOnly, on: loop)
                await #expect { _ = try await r.write(IOBuffer("x"), at: 0) } throws: {
                    ($0 as? PlexusError).map { $0.errno == .badFileDescriptor && $0.operation == "write" } ?? false
                }
                let t = try await r.read(into: IOBuffer(capacity: 64), at: 0)
                let tCount = t.count
                let tString = t.takeBuffer().string
                #expect(tCount == 5 && tString == "hello")
                try await r.close()
                await #expect { _ = try await File.open(FilePath(path), .readOnly, options: [.create, .exclusive], on: loop) } throws: {
                    ($0 as? PlexusError).map { $0.errno == .fileExists && $0.operation == "open" } ?? false
                }
                await #expect { _ = try await File.open(FilePath(path + "-missing"), on: loop) } throws: {
                    ($0 as? PlexusError)?.errno == .noSuchFileOrDirectory
                }
            }
            #expect(Self.fdCount() == before)
        }

        @Test(arguments: Backends.kinds)
        func datagramsLargerThanUDPAllowsAreEMSGSIZE(kind: BackendKind) async throws {
            let loop = try Backends.loopThread(kind)
            defer { loop.shutdownAndWait() }
            let before = Self.fdCount()
            let receiver = try DatagramSocket.udp(port: 0, on: loop)
            let sender = try DatagramSocket.udp(port: 0, on: loop)
            let to = try receiver.localAddress()
            try await loop.withTimeout(.seconds(10)) {
                for size in [65_508, 70_000, 1 << 20] {
                    do {
                        _ = try await sender.send(IOBuffer(bytes: Self.pattern(size)), to: to)
                        Issue.record("a \(size)-byte datagram was sent")
                    } catch let e as PlexusError {
                        #expect(e.errno == .messageTooLong && e.operation == "sendmsg", "\(size): \(e)")
                    }
                }
                // The largest legal one goes, and arrives byte for byte with its sender.
                let big = Self.pattern(65_507, seed: 3)
                let sent = try await sender.send(IOBuffer(bytes: big), to: to)
                #expect(sent.count == 65_507)
                let got = try await receiver.receive(into: IOBuffer(capacity: 70_000))
                let gotCount = got.count
                #expect(gotCount == 65_507)
                let message = got.takeMessage()
                #expect(message.buffer.bytes == big)
                #expect(message.address == (try sender.localAddress()))
                // A datagram longer than the buffer: truncated to what fits.
                _ = try await sender.send(IOBuffer(bytes: big), to: to)
                let small = try await receiver.receive(into: IOBuffer(capacity: 10))
                #expect(small.count == 10)
                // An IPv6 destination on an IPv4 socket, and no destination on an unconnected one: typed.
                await #expect { _ = try await sender.send(IOBuffer("x"), to: SocketAddress(host: "::1", port: 9)!) } throws: {
                    ($0 as? PlexusError).map { $0.operation == "sendmsg" && $0.errno == .addressFamilyNotSupported } ?? false
                }
                await #expect { _ = try await sender.send(IOBuffer("x"), to: nil) } throws: {
                    ($0 as? PlexusError)?.errno == .addressRequired
                }
                try await sender.close()
                try await receiver.close()
            }
            // The callback form too.
            let s2 = try DatagramSocket.udp(port: 0, on: loop)
            let result: Result<Int, PlexusError> = try Self.onLoop(loop) { done in
                s2.send(IOBuffer(bytes: Self.pattern(70_000)), to: .loopback(port: 9)) { r, message in
                    precondition(message.buffer.count == 70_000, "the buffer comes back whole")
                    done(r)
                }
            }
            #expect(result.map { _ in 0 } == .failure(PlexusError(operation: "sendmsg", errno: .messageTooLong)))
            close(s2.fd.rawValue)
            #expect(Self.fdCount() == before)
        }
    }
}
