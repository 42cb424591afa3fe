import CPlexus
import Glibc
@testable import Plexus
import SystemPackage
import Testing

extension PlexusTests {
    /// The typed socket and file helpers (Sources/Plexus/Net) on every backend.
    @Suite struct NetTests {
        // MARK: Helpers

        /// Bytes `[offset, offset + count)` of connection `seed`'s stream: 8-byte words that
        /// name the connection and their own offset, so any misplaced byte shows.
        static func fill(_ p: UnsafeMutableRawBufferPointer, seed: UInt64, offset: Int) {
            precondition(offset % 8 == 0 && p.count % 8 == 0)
            for w in 0..<(p.count / 8) {
                p.storeBytes(of: seed << 40 ^ UInt64(offset + w * 8), toByteOffset: w * 8, as: UInt64.self)
            }
        }

        /// Checks received bytes against the stream; returns the first bad offset, if any.
        static func check(_ p: UnsafeRawBufferPointer, seed: UInt64, offset: Int) -> Int? {
            for i in 0..<p.count {
                let position = offset + i
                let word = seed << 40 ^ UInt64(position & ~7)
                let expected = UInt8(truncatingIfNeeded: word >> (8 * UInt64(position & 7)))
                if p[i] != expected { return position }
            }
            return nil
        }

        static func temporaryPath(_ name: String) -> String {
            "/tmp/plexus-net-\(getpid())-\(name)"
        }

        // MARK: TCP

        /// 200 connections each send 1 MiB and read it back, checked byte for byte. The server
        /// uses the callback helpers, the clients the async ones; every operation has a deadline.
        @Test(arguments: Backends.kinds)
        func `TCP echo, 200 connections of 1 MiB each`(kind: BackendKind) async throws {
            let loop = try Backends.loopThread(kind)
            defer { loop.shutdownAndWait() }
            let connections = 200
            let perConnection = 1 << 20
            let listener = try StreamListener.tcp(port: 0, on: loop, backlog: 1024)
            let address = try listener.localAddress()
            #expect(address.port != 0)
            #expect(address.ip == .v4(.loopback))

            // Server: one multishot accept; each connection echoes until EOF, then closes.
            let accepted = loop.submitAndWait { () -> Token in
                listener.acceptMultishot { result in
                    guard case .success(let connection) = result else { return }
                    try connection.setNoDelay()
                    EchoSession(connection).start()
                }
            }

            let started = ContinuousClock.now
            try await loop.withTimeout(.seconds(120)) {
                try await withThrowingTaskGroup(of: Void.self) { group in
                    for c in 0..<connections {
                        group.addTask(executorPreference: loop) {
                            let connection = try await StreamConnection.connect(to: address, on: loop, timeout: .seconds(30))
                            let seed = UInt64(c + 1)
                            // Writer: 1 MiB in 64 KiB chunks, then FIN.
                            let writer = Task(executorPreference: loop) {
                                var chunk = IOBuffer(capacity: 64 * 1024)
                                var offset = 0
                                while offset < perConnection {
                                    chunk.clear()
                                    chunk.appendUnsafe { spare in
                                        NetTests.fill(spare, seed: seed, offset: offset)
                                        return spare.count
                                    }
                                    offset += chunk.count
                                    chunk = try await connection.writeAll(chunk)
                                }
                                try await connection.shutdown(.write)
                            }
                            // Reader: everything back, checked, then EOF.
                            var received = 0
                            var buffer = IOBuffer(capacity: 64 * 1024)
                            while true {
                                let read = try await connection.read(into: buffer)
                                let n = read.count
                                buffer = read.takeBuffer()
                                if n == 0 { break }
                                let bad = buffer.withUnsafeBytes { NetTests.check($0, seed: seed, offset: received) }
                                #expect(bad == nil, "connection \(c): wrong byte at offset \(bad ?? -1)")
                                if bad != nil { break }
                                received += n
                                buffer.clear()
                            }
                            try await writer.value
                            #expect(received == perConnection, "connection \(c) got \(received) bytes back")
                            try await connection.close()
                        }
                    }
                    try await group.waitForAll()
                }
            }
            let elapsed = ContinuousClock.now - started
            print("plexus-tests: TCP echo \(connections) x 1 MiB on \(kind): \(elapsed)")
            loop.submitAndWait { loop.cancel(accepted) }
            try await listener.close()
        }

        /// Connect with a timeout: succeeds against a listener, ETIMEDOUT once its backlog is
        /// full (the kernel drops SYNs), ECONNREFUSED where nothing listens.
        @Test(arguments: Backends.kinds)
        func `connect with a timeout`(kind: BackendKind) async throws {
            let loop = try Backends.loopThread(kind)
            defer { loop.shutdownAndWait() }
            let listener = try StreamListener.tcp(port: 0, on: loop, backlog: 0)
            let address = try listener.localAddress()

            var connected: [StreamConnection] = []
            var timedOut = false
            for _ in 0..<6 where !timedOut {
                do {
                    connected.append(try await StreamConnection.connect(to: address, on: loop, timeout: .milliseconds(300)))
                } catch let error as PlexusError {
                    #expect(error.errno == .timedOut, "\(error)")
                    timedOut = true
                }
            }
            #expect(timedOut, "a listener with a full backlog should leave a connect pending until the timeout")
            for c in connected { try await c.close() }
            try await listener.close()

            // Refused: the port is closed now.
            await #expect(throws: PlexusError.self) {
                _ = try await StreamConnection.connect(to: address, on: loop, timeout: .seconds(5))
            }

            // The callback form, against a fresh listener.
            let other = try StreamListener.tcp(port: 0, on: loop)
            let result = await withCheckedContinuation { (done: CheckedContinuation<Result<StreamConnection, PlexusError>, Never>) in
                loop.execute {
                    StreamConnection.connect(to: try! other.localAddress(), on: loop, timeout: .seconds(5)) { done.resume(returning: $0) }
                }
            }
            let connection = try result.get()
            let peer = try connection.peerAddress()
            #expect(peer == (try other.localAddress()))
            try await connection.close()
            try await other.close()
        }

        /// A peer that resets the connection (SO_LINGER 0, then close) while data is in
        /// flight: the pending write and the next read fail with an error, nothing crashes.
        @Test(arguments: Backends.kinds)
        func `a reset mid-transfer is an error, not a crash`(kind: BackendKind) async throws {
            let loop = try Backends.loopThread(kind)
            defer { loop.shutdownAndWait() }
            let listener = try StreamListener.tcp(port: 0, on: loop)
            let address = try listener.localAddress()
            try await Task(executorPreference: loop) {
                let client = try await StreamConnection.connect(to: address, on: loop, timeout: .seconds(5))
                let server = try await listener.accept()
                // The client sends far more than the socket buffers hold; the server reads a
                // little, then resets.
                let writer = Task(executorPreference: loop) { () -> (any Error)? in
                    var big = IOBuffer(capacity: 32 << 20)
                    big.appendUnsafe { spare in
                        spare.initializeMemory(as: UInt8.self, repeating: 0x5A)
                        return spare.count
                    }
                    do {
                        _ = try await client.writeAll(big)
                        return nil
                    } catch {
                        return error
                    }
                }
                let first = try await server.read(into: IOBuffer(capacity: 64 * 1024))
                #expect(first.count > 0)
                try server.setOption(.linger, .reset)
                #expect(try server.option(.linger) == .reset)
                try await server.close()

                let writeError = await writer.value
                let writeErrno = (writeError as? PlexusError)?.errno
                #expect(writeErrno == .connectionReset || writeErrno == .brokenPipe,
                        "the write after a reset: \(String(describing: writeError))")
                // A read after the reset: an error or end of stream, never a crash or a hang.
                do {
                    let read = try await client.read(into: IOBuffer(capacity: 1024))
                    #expect(read.count == 0)
                } catch let error as PlexusError {
                    #expect(error.errno == .connectionReset || error.errno == .brokenPipe, "\(error)")
                }
                try await client.close()
            }.value
            try await listener.close()
        }

        // MARK: UDP

        @Test(arguments: Backends.kinds)
        func `UDP round trips carry addresses`(kind: BackendKind) async throws {
            let loop = try Backends.loopThread(kind)
            defer { loop.shutdownAndWait() }
            let server = try DatagramSocket.udp(on: loop)
            let client = try DatagramSocket.udp(on: loop)
            let serverAddress = try server.localAddress()
            let clientAddress = try client.localAddress()
            try await Task(executorPreference: loop) {
                // The server echoes each datagram to whoever sent it.
                let echo = Task(executorPreference: loop) {
                    var buffer = IOBuffer(capacity: 2048)
                    for _ in 0..<100 {
                        let received = try await server.receive(into: buffer).takeMessage()
                        let from = received.address
                        #expect(from == clientAddress)
                        let sent = try await server.send(received.takeBuffer(), to: from)
                        buffer = sent.takeMessage().takeBuffer()
                        buffer.clear()
                    }
                }
                for i in 0..<100 {
                    let payload = "datagram \(i) " + String(repeating: "u", count: i * 10)
                    let sent = try await client.send(IOBuffer(payload), to: serverAddress)
                    #expect(sent.count == payload.utf8.count)
                    let back = try await client.receive(into: IOBuffer(capacity: 2048))
                    let text = back.message.buffer.string
                    let from = back.message.address
                    #expect(text == payload)
                    #expect(from == serverAddress)
                }
                try await echo.value
            }.value

            // The callback form, on a connected socket (no address on send).
            try client.connect(to: serverAddress)
            let reply = await withCheckedContinuation { (done: CheckedContinuation<String, Never>) in
                loop.execute {
                    server.receive(into: IOBuffer(capacity: 64)) { result, message in
                        let n = try? result.get()
                        #expect(n == 5)
                        let from = message.address
                        #expect(from == clientAddress)
                        server.send(message.takeBuffer(), to: from) { _, _ in }
                    }
                    client.send(IOBuffer("hello"), to: nil) { result, _ in
                        let n = try? result.get()
                        #expect(n == 5)
                        client.receive(into: IOBuffer(capacity: 64)) { _, message in
                            done.resume(returning: message.buffer.string)
                        }
                    }
                }
            }
            #expect(reply == "hello")
            try await client.close()
            try await server.close()
        }

        // MARK: Unix sockets

        @Test(arguments: Backends.kinds)
        func `Unix stream sockets with readv, writev and shutdown`(kind: BackendKind) async throws {
            let loop = try Backends.loopThread(kind)
            defer { loop.shutdownAndWait() }
            let path = NetTests.temporaryPath("unix-\(kind)")
            defer { unlink(path) }
            let listener = try StreamListener.unix(path: path, on: loop, removingExisting: true)
            #expect(try listener.localAddress().unixPath == path)
            try await Task(executorPreference: loop) {
                let client = try await StreamConnection.connect(to: SocketAddress(unixPath: path)!, on: loop)
                let server = try await listener.accept()

                var out = IOVector(capacity: 3)
                out.append(IOBuffer("one "))
                out.append(IOBuffer("two "))
                out.append(IOBuffer("three"))
                let drained = try await client.writevAll(out)
                #expect(drained.totalCount == 0)
                try await client.shutdown(.write)

                var collected = ""
                while true {
                    var vector = IOVector(capacity: 2)
                    vector.append(IOBuffer(capacity: 3))
                    vector.append(IOBuffer(capacity: 5))
                    let read = try await server.readv(into: vector)
                    if read.count == 0 { break }
                    for i in 0..<read.vector.count { collected += read.vector.withBuffer(at: i) { $0.string } }
                }
                #expect(collected == "one two three")

                _ = try await server.writeAll(IOBuffer("reply"))
                try await server.close()
                var reply = IOBuffer(capacity: 16)
                while true {
                    let read = try await client.read(into: reply)
                    let n = read.count
                    reply = read.takeBuffer()
                    if n == 0 { break }
                }
                #expect(reply.string == "reply")
                try await client.close()
            }.value
            try await listener.close()
        }

        @Test(arguments: Backends.kinds)
        func `Unix datagram sockets and socket pairs`(kind: BackendKind) async throws {
            let loop = try Backends.loopThread(kind)
            defer { loop.shutdownAndWait() }
            let path = NetTests.temporaryPath("dgram-\(kind)")
            let clientPath = path + "-client"
            defer { unlink(path); unlink(clientPath) }
            let server = try DatagramSocket.bind(SocketAddress(unixPath: path)!, on: loop, removingExisting: true)
            let client = try DatagramSocket.bind(SocketAddress(unixPath: clientPath)!, on: loop, removingExisting: true)
            _ = try await client.send(IOBuffer("over unix"), to: SocketAddress(unixPath: path)!)
            let got = try await server.receive(into: IOBuffer(capacity: 64))
            let text = got.message.buffer.string
            let sender = got.message.address?.unixPath
            #expect(text == "over unix")
            #expect(sender == clientPath)
            try await client.close()
            try await server.close()

            let (a, b) = try StreamConnection.pair(on: loop)
            _ = try await a.writeAll(IOBuffer("pair"))
            let read = try await b.read(into: IOBuffer(capacity: 8))
            let pairText = read.buffer.string
            #expect(pairText == "pair")
            try await a.close()
            try await b.close()
        }

        /// Writing nothing succeeds with 0 through every `*All` helper, async and callback
        /// alike (before, the callback forms failed with EINVAL while the async ones
        /// returned), and an empty UDP datagram, legal and meaningful, is sent and arrives
        /// (before, sendmsg of no bytes was refused with EINVAL).
        @Test(arguments: Backends.kinds)
        func `writing nothing succeeds; an empty datagram is sent`(kind: BackendKind) async throws {
            let loop = try Backends.loopThread(kind)
            defer { loop.shutdownAndWait() }
            let (a, b) = try StreamConnection.pair(on: loop)
            let path = NetTests.temporaryPath("empty-\(kind)")
            defer { unlink(path) }
            let results = Box<[String: Result<Int, PlexusError>]>([:])
            let done = Semaphore()
            _ = loop.execute {
                a.writeAll(IOBuffer(capacity: 0)) { result, _ in results.value["writeAll"] = result; done.signal() }
                var empty = IOVector(capacity: 1)
                empty.append(IOBuffer(capacity: 0))
                a.writevAll(empty) { result, _ in results.value["writevAll"] = result; done.signal() }
                File.open(FilePath(path), .readWrite, options: [.create, .truncate], on: loop) { opened in
                    guard case .success(let file) = opened else { results.value["open"] = opened.map { _ in 0 }; done.signal(); return }
                    file.writeAll(IOBuffer(capacity: 0), at: 0) { result, _ in
                        results.value["File.writeAll"] = result
                        file.close { _ in done.signal() }
                    }
                }
            }
            for _ in 0..<3 { done.wait() }
            for name in ["writeAll", "writevAll", "File.writeAll"] {
                #expect((try? results.value[name]?.get()) == 0, "\(kind) \(name): \(String(describing: results.value[name]))")
            }
            let asyncCount = try await a.writeAll(IOBuffer(capacity: 0)).count
            #expect(asyncCount == 0)
            try await a.close()
            try await b.close()

            let receiver = try DatagramSocket.udp(on: loop)
            let sender = try DatagramSocket.udp(on: loop)
            let sent = try await sender.send(IOBuffer(capacity: 0), to: try receiver.localAddress()).count
            #expect(sent == 0)
            let got = try await receiver.receive(into: IOBuffer(capacity: 16))
            #expect(got.count == 0, "an empty datagram arrives as one")
            let from = got.message.address?.port, senderPort = try sender.localAddress().port
            #expect(from == senderPort, "from \(String(describing: got.message.address)), sender port \(String(describing: senderPort))")
            try await sender.close()
            try await receiver.close()
        }

        // MARK: Files

        @Test(arguments: Backends.kinds)
        func `file write, fsync, then read back`(kind: BackendKind) async throws {
            let loop = try Backends.loopThread(kind)
            defer { loop.shutdownAndWait() }
            let path = NetTests.temporaryPath("file-\(kind)")
            defer { unlink(path) }
            let size = 1 << 20
            let file = try await File.open(FilePath(path), .readWrite, options: [.create, .truncate], mode: 0o600, on: loop)
            // 1 MiB in four positional writes, issued back to front.
            for part in (0..<4).reversed() {
                var chunk = IOBuffer(capacity: size / 4)
                chunk.appendUnsafe { spare in
                    NetTests.fill(spare, seed: 7, offset: part * size / 4)
                    return spare.count
                }
                let left = try await file.writeAll(chunk, at: Int64(part * size / 4))
                let empty = left.isEmpty
                #expect(empty)
            }
            // A vectored tail after it.
            var tail = IOVector(capacity: 2)
            tail.append(IOBuffer("tail-"))
            tail.append(IOBuffer("end"))
            let wrote = try await file.writev(tail, at: Int64(size))
            #expect(wrote.count == 8)
            try await file.sync()
            try await file.sync(dataOnly: true)
            #expect(try file.size() == Int64(size + 8))
            try await file.close()

            // Read it back through a fresh open: positional reads in 64 KiB pieces, checked.
            let again = try await File.open(FilePath(path), on: loop)
            var offset = 0
            var buffer = IOBuffer(capacity: 64 * 1024)
            while offset < size {
                let read = try await again.read(into: buffer, at: Int64(offset))
                let n = read.count
                buffer = read.takeBuffer()
                #expect(n > 0)
                let bad = buffer.withUnsafeBytes { NetTests.check($0, seed: 7, offset: offset) }
                #expect(bad == nil, "wrong byte at \(bad ?? -1)")
                offset += n
                buffer.clear()
            }
            var vector = IOVector(capacity: 2)
            vector.append(IOBuffer(capacity: 5))
            vector.append(IOBuffer(capacity: 10))
            let tailRead = try await again.readv(into: vector, at: Int64(size))
            #expect(tailRead.count == 8)
            let first = tailRead.vector.withBuffer(at: 0) { $0.string }
            let second = tailRead.vector.withBuffer(at: 1) { $0.string }
            #expect(first + second == "tail-end")
            let end = try await again.read(into: IOBuffer(capacity: 16), at: Int64(size + 8))
            #expect(end.count == 0)
            try await again.close()

            // The callback forms: open, write, read, close.
            let text = await withCheckedContinuation { (done: CheckedContinuation<String, Never>) in
                loop.execute {
                    File.open(FilePath(path), .readWrite, on: loop) { result in
                        guard case .success(let f) = result else {
                            Issue.record("open: \(result)")
                            done.resume(returning: "")
                            return
                        }
                        f.writeAll(IOBuffer("callback"), at: 0) { written, _ in
                            let n = try? written.get()
                            #expect(n == 8)
                            f.read(into: IOBuffer(capacity: 8), at: 0) { _, buffer in
                                let s = buffer.string
                                f.close { _ in done.resume(returning: s) }
                            }
                        }
                    }
                }
            }
            #expect(text == "callback")

            // Opening what is not there is a typed error.
            await #expect(throws: PlexusError.self) {
                _ = try await File.open(FilePath(path + "-missing"), on: loop)
            }
        }

        // MARK: Values and options

        @Test func `IPv4 and IPv6 addresses as values`() throws {
            let v4 = try #require(IPv4Address("192.0.2.33"))
            #expect(v4.description == "192.0.2.33")
            #expect(v4.octets == [192, 0, 2, 33])
            #expect(IPv4Address("256.1.1.1") == nil)
            #expect(IPv4Address.loopback.isLoopback)
            let v6 = try #require(IPv6Address("2001:db8::1"))
            #expect(v6.description == "2001:db8::1")
            #expect(v6.bytes.count == 16)
            #expect(IPv6Address(bytes: v6.bytes) == v6)
            #expect(IPv6Address("::1") == .loopback)
            #expect(IPv6Address(mapping: v4).mappedIPv4 == v4)
            #expect(IPv6Address("::ffff:192.0.2.33")?.mappedIPv4 == v4)
            #expect(IPAddress("::") == .v6(.any))
            #expect(IPAddress("nonsense") == nil)

            let a = SocketAddress(v4, port: 8080)
            #expect(a.description == "192.0.2.33:8080")
            #expect(a.ip == .v4(v4))
            #expect(a == SocketAddress(ipv4: "192.0.2.33", port: 8080))
            let b = SocketAddress(v6, port: 443)
            #expect(b.description == "[2001:db8::1]:443")
            #expect(b.ip == .v6(v6))
            #expect(b.port == 443)
            #expect(SocketAddress(host: "::1", port: 1) == SocketAddress(ipv6: "::1", port: 1))
            #expect(SocketAddress(host: "localhost", port: 1) == nil, "no name lookup")
            #expect(SocketAddress(unixPath: "/tmp/x")?.unixPath == "/tmp/x")
            #expect(SocketAddress(unixPath: "") == nil, "an empty path would bind an abstract name")
            #expect(SocketAddress(unixPath: "\0abstract") == nil, "a NUL byte is no path")
            #expect(SocketAddress(unixPath: "/tmp/a\0b") == nil, "a NUL byte would cut the path short")
            #expect(SocketAddress(unixPath: String(repeating: "x", count: 108)) == nil, "longer than sun_path")
            #expect(a.unixPath == nil)
        }

        @Test(arguments: Backends.kinds)
        func `socket options through the typed API`(kind: BackendKind) async throws {
            let loop = try Backends.loopThread(kind)
            defer { loop.shutdownAndWait() }
            let listener = try StreamListener.tcp(port: 0, on: loop, reusePort: true)
            #expect(try listener.option(.reuseAddress))
            #expect(try listener.option(.reusePort))
            #expect(try listener.option(.socketType) == Int32(SOCK_STREAM.rawValue))
            // A second listener on the same port: SO_REUSEPORT lets it bind.
            let port = try #require(try listener.localAddress().port)
            let twin = try StreamListener.tcp(port: port, on: loop, reusePort: true)
            // Without SO_REUSEPORT the port is taken.
            #expect(throws: PlexusError.self) { _ = try StreamListener.tcp(port: port, on: loop) }

            let client = try await StreamConnection.connect(to: .loopback(port: port), on: loop)
            #expect(try client.option(.noDelay) == false)
            try client.setNoDelay()
            #expect(try client.option(.noDelay))
            try client.setOption(.keepAlive, true)
            #expect(try client.option(.keepAlive))
            try client.setOption(.receiveBufferSize, 65536)
            #expect(try client.option(.receiveBufferSize) >= 65536)
            #expect(try client.option(.linger) == .off)
            try client.setOption(.linger, Linger(seconds: 3))
            #expect(try client.option(.linger) == Linger(seconds: 3))
            #expect(try client.option(.pendingError) == 0)
            #expect(try client.peerAddress().port == port)
            // Every helper socket is CLOEXEC and non-blocking.
            for fd in [listener.fd, twin.fd, client.fd] {
                #expect(fcntl(fd.rawValue, F_GETFD) & FD_CLOEXEC != 0)
                #expect(fcntl(fd.rawValue, F_GETFL) & O_NONBLOCK != 0)
            }
            // A Unix socket has no TCP_NODELAY: a typed error, not a crash.
            let (a, b) = try StreamConnection.pair(on: loop)
            #expect(throws: PlexusError.self) { try a.setNoDelay() }
            try await a.close()
            try await b.close()
            try await client.close()
            try await twin.close()
            try await listener.close()
        }

        @Test(arguments: Backends.kinds)
        func `IPv6 loopback listener`(kind: BackendKind) async throws {
            let loop = try Backends.loopThread(kind)
            defer { loop.shutdownAndWait() }
            let listener: StreamListener
            do {
                listener = try StreamListener.tcp(host: "::1", port: 0, on: loop)
            } catch {
                try Test.cancel("skipped: no IPv6 loopback here: \(error)")
            }
            let address = try listener.localAddress()
            #expect(address.ip == .v6(.loopback))
            let client = try await StreamConnection.connect(to: address, on: loop, timeout: .seconds(5))
            let server = try await listener.accept()
            _ = try await client.writeAll(IOBuffer("six"))
            let got = try await server.read(into: IOBuffer(capacity: 8))
            let text = got.buffer.string
            #expect(text == "six")
            try await client.close()
            try await server.close()
            try await listener.close()
        }

        @Test func `IOBuffer compact keeps a partial message and makes room behind it`() {
            var buffer = IOBuffer(capacity: 16)
            buffer.append(Array("hello, world!".utf8))
            buffer.consume(7)
            #expect(buffer.spareCapacity == 3)
            buffer.compact()
            let text = buffer.string
            #expect(text == "world!")
            #expect(buffer.spareCapacity == 10)
            let bigger = buffer.copy(capacity: 64)
            let copied = bigger.string
            #expect(copied == "world!")
            #expect(bigger.capacity == 64)
        }

        /// A non-blocking connect(2) to a Unix stream listener whose backlog is full fails
        /// with EAGAIN at once (not EINPROGRESS), and no readiness ever follows for it: it
        /// ends as a typed EAGAIN on every backend. Once failed on epoll and poll (found by
        /// fault injection): it was parked for readiness and waited for ever (here: until
        /// its deadline, ETIMEDOUT).
        @Test(arguments: Backends.kinds)
        func aUnixConnectToAFullBacklogEndsAtOnceWithEAGAIN(kind: BackendKind) async throws {
            let loop = try Backends.loopThread(kind)
            defer { loop.shutdownAndWait() }
            let path = "/tmp/plexus-net-\(getpid())-\(kind.rawValue).sock"
            unlink(path)
            defer { unlink(path) }
            let listener = try StreamListener.unix(path: path, on: loop, backlog: 0)
            let address = try #require(SocketAddress(unixPath: path))
            var fillers: [Int32] = []
            defer { for fd in fillers { close(fd) } }
            // Fill the backlog with plain non-blocking connects until the kernel says EAGAIN.
            var sun = sockaddr_un()
            sun.sun_family = sa_family_t(AF_UNIX)
            withUnsafeMutableBytes(of: &sun.sun_path) { bytes in
                for (i, c) in path.utf8.enumerated() { bytes[i] = c }
            }
            var refused = false
            while fillers.count < 64 {
                let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_NONBLOCK.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
                try #require(fd >= 0)
                let r = withUnsafePointer(to: &sun) {
                    $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
                }
                if r != 0 {
                    let e = plexus_errno()
                    close(fd)
                    try #require(e == EAGAIN, "filling the backlog stopped with errno \(e)")
                    refused = true
                    break
                }
                fillers.append(fd)
            }
            try #require(refused, "the backlog never filled")

            let start = ContinuousClock.now
            do {
                let connection = try await StreamConnection.connect(to: address, on: loop, timeout: .seconds(3))
                try? await connection.close()
                Issue.record("connected to a listener whose backlog is full")
            } catch let error as PlexusError {
                #expect(error.operation == "connect")
                #expect(error.errno == .resourceTemporarilyUnavailable,
                        "\(kind): expected EAGAIN at once, got \(error) after \(ContinuousClock.now - start)")
            }
            #expect(ContinuousClock.now - start < .seconds(1), "\(kind): the connect waited \(ContinuousClock.now - start)")

            // The loop goes on: once the backlog has room, a connect through Plexus succeeds.
            for fd in fillers { close(fd) }
            fillers.removeAll()
            let accepted = Task(executorPreference: loop) { try await listener.accept() }
            let connection = try await StreamConnection.connect(to: address, on: loop, timeout: .seconds(3))
            let server = try await accepted.value
            try await connection.close()
            try await server.close()
            try await listener.close()
        }
    }
}

/// Echoes with the callback helpers: read, then writeAll, then read again; close at EOF.
private final class EchoSession {
    let connection: StreamConnection
    init(_ connection: StreamConnection) { self.connection = connection }

    func start() { read(IOBuffer(capacity: 64 * 1024)) }

    private func read(_ buffer: consuming IOBuffer) {
        var buffer = buffer
        buffer.clear()
        connection.read(buffer) { [self] result, buffer in
            guard case .success(let n) = result, n > 0 else {
                connection.close()
                return
            }
            connection.writeAll(buffer) { [self] written, buffer in
                guard case .success = written else {
                    connection.close()
                    return
                }
                read(buffer)
            }
        }
    }
}

extension EventLoop {
    /// Runs `body` on the loop thread and waits for its result (for test set-up).
    func submitAndWait<R: Sendable>(_ body: @escaping @Sendable () -> R) -> R {
        let box = ResultBox<R>()
        let semaphore = Semaphore()
        execute {
            box.value = body()
            semaphore.signal()
        }
        semaphore.wait()
        return box.value!
    }
}

private final class ResultBox<R>: @unchecked Sendable {
    var value: R?
}
