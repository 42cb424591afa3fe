import CPlexus
import Glibc
@testable import Plexus
import SystemPackage
import Testing

extension PlexusTests {
    /// StreamListener, StreamConnection and File at their edges, on every backend: end of
    /// file and half-close, shutdowns under parked operations, the accept sequence's
    /// backpressure and end, connects that fail, files at positions and typed file errors.
    @Suite struct NetReviewTests {
        /// Runs `body` on the loop thread; `body` gets a `finish` to call (once) with a
        /// result from a callback. A hang guard of `bound`.
        static func onLoop<R: Sendable>(_ loop: EventLoop, bound: Duration = .seconds(10),
                                        _ body: @escaping @Sendable (@escaping @Sendable (R) -> Void) -> Void) async throws -> R {
            let box = Locked<R?>(nil)
            let started = ContinuousClock.now
            loop.execute {
                body { r in box.withLock { $0 = r } }
            }
            while true {
                if let r = box.withLock({ $0 }) { return r }
                if ContinuousClock.now - started > bound { throw HarnessError.timedOut("callbacks") }
                try await Task.sleep(for: .milliseconds(2))
            }
        }

        /// Two connected stream sockets on `loop`: over loopback TCP (with their listener)
        /// or a Unix socketpair.
        struct Pair {
            let a: StreamConnection, b: StreamConnection
            let listener: StreamListener?

            func close() async throws {
                try await a.close()
                try await b.close()
                try await listener?.close()
            }
        }

        static func pair(_ loop: EventLoop, tcp: Bool) async throws -> Pair {
            guard tcp else {
                let (a, b) = try StreamConnection.pair(on: loop)
                return Pair(a: a, b: b, listener: nil)
            }
            let listener = try StreamListener.tcp(port: 0, on: loop)
            let address = try listener.localAddress()
            let accepted = Task(executorPreference: loop) { try await listener.accept() }
            let client = try await StreamConnection.connect(to: address, on: loop, timeout: .seconds(5))
            return Pair(a: client, b: try await accepted.value, listener: listener)
        }

        /// Three reads parked on a connection; the peer shuts its write side: every read
        /// ends with 0 (end of file), and a read after them does too.
        @Test(arguments: Backends.kinds, [false, true])
        func everyParkedReadSeesThePeersEndOfFile(kind: BackendKind, tcp: Bool) async throws {
            let loop = try Backends.loopThread(kind)
            defer { loop.shutdownAndWait() }
            #expect(loop.backendKind == kind)
            let pair = try await Self.pair(loop, tcp: tcp)
            let (a, b) = (pair.a, pair.b)
            let results: [Int] = try await Self.onLoop(loop) { finish in
                let got = Locked<[Int]>([])
                for _ in 0..<3 {
                    a.read(IOBuffer(capacity: 64)) { result, _ in
                        let n = (try? result.get()) ?? -1
                        let all = got.withLock { $0.append(n); return $0 }
                        if all.count == 3 {
                            // A later read: end of file again, at once.
                            a.read(IOBuffer(capacity: 64)) { result, _ in
                                finish(all + [(try? result.get()) ?? -1])
                            }
                        }
                    }
                }
                b.shutdown(.write)
            }
            #expect(results == [0, 0, 0, 0], "\(kind) tcp=\(tcp)")
            try await pair.close()
        }

        /// A read parked on a connection; this side shuts its read side: the read ends (0).
        @Test(arguments: Backends.kinds, [false, true])
        func aLocalReadShutdownEndsAParkedRead(kind: BackendKind, tcp: Bool) async throws {
            let loop = try Backends.loopThread(kind)
            defer { loop.shutdownAndWait() }
            #expect(loop.backendKind == kind)
            let pair = try await Self.pair(loop, tcp: tcp)
            let a = pair.a
            let result: Int = try await Self.onLoop(loop) { finish in
                a.read(IOBuffer(capacity: 64)) { result, _ in finish((try? result.get()) ?? -1) }
                a.shutdown(.read)
            }
            #expect(result == 0, "\(kind) tcp=\(tcp)")
            try await pair.close()
        }

        /// Half-close: after this side shuts its write side, it still reads what the peer
        /// sends, and the peer sees end of file.
        @Test(arguments: Backends.kinds, [false, true])
        func afterShuttingItsWriteSideAConnectionStillReads(kind: BackendKind, tcp: Bool) async throws {
            let loop = try Backends.loopThread(kind)
            defer { loop.shutdownAndWait() }
            #expect(loop.backendKind == kind)
            let pair = try await Self.pair(loop, tcp: tcp)
            let (a, b) = (pair.a, pair.b)
            try await loop.withTimeout(.seconds(10)) {
                try await Task(executorPreference: loop) {
                    let parked = Task(executorPreference: loop) { () throws -> String in
                        var buffer = IOBuffer(capacity: 64)
                        while true {
                            let read = try await a.read(into: buffer)
                            let n = read.count
                            buffer = read.takeBuffer()
                            if n == 0 || buffer.count >= 5 { return buffer.string }
                        }
                    }
                    try await a.shutdown(.write)
                    let eof = try await b.read(into: IOBuffer(capacity: 8))
                    #expect(eof.count == 0)
                    _ = try await b.writeAll(IOBuffer("hello"))
                    #expect(try await parked.value == "hello")
                    // A write on the shut side: EPIPE.
                    do {
                        _ = try await a.write(IOBuffer("x"))
                        Issue.record("a write after shutdown(.write) succeeded")
                    } catch let error as PlexusError {
                        #expect(error.errno == .brokenPipe, "\(error)")
                    }
                }.value
            }
            try await pair.close()
        }

        /// Writes parked on a full connection; this side shuts its write side through
        /// Plexus: each ends with EPIPE, once. Once failed on epoll and poll for a Unix stream
        /// socket: unix_poll reports no POLLOUT or POLLHUP for a shut send side while the
        /// peer's buffer is full, so the writes waited for ever (io_uring: EPIPE).
        @Test(arguments: Backends.kinds, ["unix", "unix, async shutdown", "tcp"])
        func parkedWritesEndWithEPIPEAtALocalWriteShutdown(kind: BackendKind, variant: String) async throws {
            let tcp = variant.hasPrefix("tcp"), async = variant.hasSuffix("async shutdown")
            let loop = try Backends.loopThread(kind)
            defer { loop.shutdownAndWait() }
            #expect(loop.backendKind == kind)
            let pair = try await Self.pair(loop, tcp: tcp)
            let (a, b) = (pair.a, pair.b)
            try a.setOption(.sendBufferSize, 4096)
            // Fill a's send buffer (and b's receive buffer) synchronously.
            var junk = [UInt8](repeating: 7, count: 65536)
            while Glibc.send(a.fd.rawValue, &junk, junk.count, Int32(MSG_DONTWAIT | MSG_NOSIGNAL)) > 0 {}
            let results: [String] = try await Self.onLoop(loop) { finish in
                let got = Locked<[String]>([])
                for _ in 0..<3 {
                    a.write(IOBuffer(String(repeating: "z", count: 100_000))) { result, _ in
                        let s: String
                        switch result {
                        case .success(let n): s = "ok \(n)"
                        case .failure(let e): s = "\(e.errno)"
                        }
                        let all = got.withLock { $0.append(s); return $0 }
                        if all.count == 3 { finish(all) }
                    }
                }
                if async {
                    Task(executorPreference: loop) { try await a.shutdown(.write) }
                } else {
                    a.shutdown(.write) { result in #expect((try? result.get()) != nil, "\(result)") }
                }
            }
            let epipe = "\(Errno.brokenPipe)"
            if tcp {
                // Loopback TCP may still move bytes to the peer before the shutdown runs: a
                // write may get some through; the ones still waiting end with EPIPE.
                #expect(results.last == epipe && results.allSatisfy { $0 == epipe || $0.hasPrefix("ok ") }, "\(kind) \(results)")
            } else {
                #expect(results == [epipe, epipe, epipe], "\(kind), \(variant)")
            }
            // The peer still reads what was sent before, then end of file.
            var total = 0
            while true {
                let n = Glibc.recv(b.fd.rawValue, &junk, junk.count, Int32(MSG_DONTWAIT))
                if n <= 0 { #expect(n == 0, "errno \(errno)"); break }
                total += n
            }
            #expect(total > 0)
            try await pair.close()
        }

        /// A connections() sequence with a buffer limit of 1 takes every one of 20
        /// connections, none lost or doubled.
        @Test(arguments: Backends.kinds)
        func connectionsWithABufferLimitOfOneLoseNone(kind: BackendKind) async throws {
            let loop = try Backends.loopThread(kind)
            defer { loop.shutdownAndWait() }
            #expect(loop.backendKind == kind)
            let listener = try StreamListener.tcp(port: 0, on: loop)
            let address = try listener.localAddress()
            var clients: [StreamConnection] = []
            for _ in 0..<20 { clients.append(try await StreamConnection.connect(to: address, on: loop, timeout: .seconds(5))) }
            let ports = try await loop.withTimeout(.seconds(10)) {
                try await Task(executorPreference: loop) { () throws -> [UInt16] in
                    var ports: [UInt16] = []
                    for try await connection in listener.connections(bufferLimit: 1) {
                        ports.append(try connection.peerAddress().port ?? 0)
                        connection.close()  // the callback close: on the loop, it needs no await
                        try await loop.sleep(for: .milliseconds(1))
                        if ports.count == 20 { break }
                    }
                    return ports
                }.value
            }
            var expected: [UInt16] = []
            for c in clients { expected.append(try c.localAddress().port ?? 0) }
            #expect(Set(ports) == Set(expected))
            #expect(ports.count == 20)
            for c in clients { try await c.close() }
            try await listener.close()
        }

        /// Closing the listener under a connections() sequence ends it (no hang).
        @Test(arguments: Backends.kinds)
        func closingTheListenerEndsItsConnections(kind: BackendKind) async throws {
            let loop = try Backends.loopThread(kind)
            defer { loop.shutdownAndWait() }
            #expect(loop.backendKind == kind)
            let listener = try StreamListener.tcp(port: 0, on: loop)
            let outcome = Task(executorPreference: loop) { () -> String in
                do {
                    for try await c in listener.connections() { try await c.close() }
                    return "ended"
                } catch {
                    return "\(error)"
                }
            }
            try await Task.sleep(for: .milliseconds(50))
            try await listener.close()
            let result = try await loop.withTimeout(.seconds(5)) { await outcome.value }
            #expect(result == "ended", "\(kind)")
        }

        /// File: sequential reads at the file position, writes at the position and appends.
        @Test(arguments: Backends.kinds)
        func fileReadsAndWritesAtThePosition(kind: BackendKind) async throws {
            let loop = try Backends.loopThread(kind)
            defer { loop.shutdownAndWait() }
            #expect(loop.backendKind == kind)
            let path = "/tmp/plexus-review-\(getpid())-\(kind)"
            defer { unlink(path) }
            try await Task(executorPreference: loop) {
                let file = try await File.open(FilePath(path), .readWrite, options: [.create, .truncate], on: loop)
                _ = try await file.writeAll(IOBuffer("abcdef"), at: nil)
                _ = try await file.writeAll(IOBuffer("ghij"), at: nil)
                #expect(try file.size() == 10)
                var got = ""
                var offset: Int64 = 0
                while true {
                    let r = try await file.read(into: IOBuffer(capacity: 3), at: offset)
                    if r.count == 0 { break }
                    offset += Int64(r.count)
                    got += r.buffer.string
                }
                #expect(got == "abcdefghij")
                try await file.close()

                let appender = try await File.open(FilePath(path), .writeOnly, options: [.append], on: loop)
                _ = try await appender.writeAll(IOBuffer("XY"), at: nil)
                try await appender.close()
                let reader = try await File.open(FilePath(path), on: loop)
                var all = ""
                while true {
                    let r = try await reader.read(into: IOBuffer(capacity: 4), at: nil)
                    if r.count == 0 { break }
                    all += r.buffer.string
                }
                #expect(all == "abcdefghijXY")
                try await reader.close()
            }.value
        }

        /// File.writeAll (callback) of a buffer larger than one write can take, to a pipe:
        /// every byte, in order, the count right.
        @Test(arguments: Backends.kinds)
        func fileWriteAllCallbackToAPipe(kind: BackendKind) async throws {
            let loop = try Backends.loopThread(kind)
            defer { loop.shutdownAndWait() }
            #expect(loop.backendKind == kind)
            let (r, w) = try FileDescriptor.pipe()
            _ = fcntl(r.rawValue, F_SETFL, O_NONBLOCK)
            _ = fcntl(w.rawValue, F_SETFL, O_NONBLOCK)
            let reader = File(fd: r, loop: loop)
            let writer = File(fd: w, loop: loop)
            let total = 1 << 20
            let expected = (0..<total).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ $0 >> 8) }
            let readerTask = Task(executorPreference: loop) { () throws -> [UInt8] in
                var all = IOBuffer(capacity: total)
                while all.count < total {
                    let r = try await reader.read(into: all, at: nil)
                    let n = r.count
                    all = r.takeBuffer()
                    if n == 0 { break }
                }
                return all.withUnsafeBytes { Array($0) }
            }
            let written: Int = try await Self.onLoop(loop, bound: .seconds(30)) { finish in
                var bytes = IOBuffer(capacity: total)
                bytes.appendUnsafe { spare in
                    spare.copyBytes(from: expected)
                    return total
                }
                writer.writeAll(bytes, at: nil) { result, _ in finish((try? result.get()) ?? -1) }
            }
            #expect(written == total)
            let received = try await readerTask.value
            #expect(received == expected)
            try await reader.close()
            try await writer.close()
        }
    }
}

extension PlexusTests.NetReviewTests {
    /// A connect whose task is cancelled while it waits (a listener with a full backlog):
    /// CancellationError, and the socket is closed (the suite's fd check).
    @Test(arguments: Backends.kinds)
    func aCancelledConnectClosesItsSocket(kind: BackendKind) async throws {
        let loop = try Backends.loopThread(kind)
        defer { loop.shutdownAndWait() }
        #expect(loop.backendKind == kind)
        let listener = try StreamListener.tcp(port: 0, on: loop, backlog: 0)
        let address = try listener.localAddress()
        var connected: [StreamConnection] = []
        // Fill the backlog: connects then wait (SYNs dropped).
        var pending: Task<StreamConnection, Error>?
        for _ in 0..<8 {
            let t = Task(executorPreference: loop) { try await StreamConnection.connect(to: address, on: loop) }
            try await Task.sleep(for: .milliseconds(100))
            // Still pending?
            let done = Locked(false)
            let probe = Task { _ = try? await t.value; done.withLock { $0 = true } }
            try await Task.sleep(for: .milliseconds(100))
            if done.withLock({ $0 }) {
                connected.append(try await t.value)
                _ = probe
            } else {
                pending = t
                break
            }
        }
        let task = try #require(pending)
        task.cancel()
        do {
            let c = try await task.value
            connected.append(c)
            Issue.record("the cancelled connect succeeded")
        } catch {
            #expect(error is CancellationError, "\(error)")
        }
        for c in connected { try await c.close() }
        try await listener.close()
    }

    /// The callback connect to a closed port: ECONNREFUSED, the socket closed.
    @Test(arguments: Backends.kinds)
    func aRefusedCallbackConnectClosesItsSocket(kind: BackendKind) async throws {
        let loop = try Backends.loopThread(kind)
        defer { loop.shutdownAndWait() }
        #expect(loop.backendKind == kind)
        let listener = try StreamListener.tcp(port: 0, on: loop)
        let address = try listener.localAddress()
        try await listener.close()
        let result: String = try await Self.onLoop(loop) { finish in
            StreamConnection.connect(to: address, on: loop, timeout: .seconds(5)) { r in
                switch r {
                case .success(let c): c.close(); finish("connected")
                case .failure(let e): finish("\(e.errno)")
                }
            }
        }
        #expect(result == "\(Errno.connectionRefused)")
        // The close is queued by then; let it run.
        _ = try await Self.onLoop(loop) { finish in loop.nop { _ in finish(0) } }
    }

    /// File helpers on the wrong kind of fd and bad paths: typed errors on every backend.
    @Test(arguments: Backends.kinds)
    func fileErrorsAreTyped(kind: BackendKind) async throws {
        let loop = try Backends.loopThread(kind)
        defer { loop.shutdownAndWait() }
        #expect(loop.backendKind == kind)
        try await Task(executorPreference: loop) {
            do {
                _ = try await File.open(FilePath("/nonexistent/plexus/x"), on: loop)
                Issue.record("opened a missing file")
            } catch let e as PlexusError { #expect(e.errno == .noSuchFileOrDirectory, "\(e)") }
            do {
                _ = try await File.open(FilePath("/tmp"), .writeOnly, on: loop)
                Issue.record("opened a directory for writing")
            } catch let e as PlexusError { #expect(e.errno == .isDirectory, "\(e)") }
            let path = "/tmp/plexus-review-excl-\(getpid())"
            defer { unlink(path) }
            let f = try await File.open(FilePath(path), .readWrite, options: [.create, .exclusive], on: loop)
            do {
                _ = try await File.open(FilePath(path), .readWrite, options: [.create, .exclusive], on: loop)
                Issue.record("O_EXCL opened an existing file")
            } catch let e as PlexusError { #expect(e.errno == .fileExists, "\(e)") }
            // readv/writev at offsets.
            var out = IOVector(capacity: 2)
            out.append(IOBuffer("hello "))
            out.append(IOBuffer("world"))
            let w = try await f.writev(out, at: 100)
            #expect(w.count == 11)
            #expect(try f.size() == 111)
            var inv = IOVector(capacity: 2)
            inv.append(IOBuffer(capacity: 5))
            inv.append(IOBuffer(capacity: 20))
            let r = try await f.readv(into: inv, at: 100)
            #expect(r.count == 11)
            #expect(r.vector.withBuffer(at: 0) { $0.string } == "hello")
            #expect(r.vector.withBuffer(at: 1) { $0.string } == " world")
            // A hole reads as zeros.
            let z = try await f.read(into: IOBuffer(capacity: 4), at: 0)
            #expect(z.count == 4)
            #expect(z.buffer.withUnsafeBytes { Array($0) } == [0, 0, 0, 0])
            // Past the end: 0.
            let e = try await f.read(into: IOBuffer(capacity: 4), at: 1000)
            #expect(e.count == 0)
            try await f.sync()
            try await f.sync(dataOnly: true)
            try await f.close()
        }.value
    }

    /// A positional read of an empty pipe is ESPIPE at once, as on io_uring: the blocking
    /// pipe stdin usually is, and an O_NONBLOCK one after a short read emptied it (both
    /// once waited for data on epoll and poll, and so for ever on a pipe nobody writes).
    @Test(arguments: Backends.kinds, ["blocking", "nonblocking-drained", "socket-drained"])
    func aPositionalReadOfAnEmptyPipeIsESPIPEAtOnce(kind: BackendKind, variant: String) async throws {
        let loop = try Backends.loopThread(kind)
        defer { loop.shutdownAndWait() }
        #expect(loop.backendKind == kind)
        let r: FileDescriptor, w: FileDescriptor
        if variant.hasPrefix("socket") {
            var fds: [Int32] = [-1, -1]
            #expect(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue | SOCK_CLOEXEC.rawValue | SOCK_NONBLOCK.rawValue), 0, &fds) == 0)
            (r, w) = (FileDescriptor(rawValue: fds[0]), FileDescriptor(rawValue: fds[1]))
        } else {
            (r, w) = try FileDescriptor.pipe()
            if variant.hasPrefix("nonblocking") {
                _ = fcntl(r.rawValue, F_SETFL, O_NONBLOCK)
                _ = fcntl(w.rawValue, F_SETFL, O_NONBLOCK)
            }
        }
        let reader = File(fd: r, loop: loop)
        let writer = File(fd: w, loop: loop)
        let results: [String] = try await Self.onLoop(loop) { finish in
            func describe(_ result: Result<Int, PlexusError>) -> String {
                switch result {
                case .success(let n): "read \(n)"
                case .failure(let e): "\(e.errno)"
                }
            }
            if variant.hasSuffix("drained") {
                // A short read: the engine now knows the stream is empty.
                writer.write(IOBuffer("ab"), at: nil) { _, _ in }
                reader.read(into: IOBuffer(capacity: 64), at: nil) { first, _ in
                    reader.read(into: IOBuffer(capacity: 8), at: 0) { second, _ in
                        finish([describe(first), describe(second)])
                    }
                }
            } else {
                reader.read(into: IOBuffer(capacity: 8), at: 0) { result, _ in finish(["read 2", describe(result)]) }
            }
        }
        #expect(results == ["read 2", "\(Errno.illegalSeek)"], "\(kind), \(variant)")
        try await reader.close()
        try await writer.close()
    }
}

extension PlexusTests.NetReviewTests {
    /// Eight reads of a file at its position (offset nil), prepared together, with the
    /// file's pages out of the page cache: as eight read(2) calls, each gets its own part
    /// of the file, every byte once.
    @Test(arguments: Backends.kinds)
    func readsAtTheFilePositionEachGetTheirOwnBytes(kind: BackendKind) async throws {
        let loop = try Backends.loopThread(kind)
        defer { loop.shutdownAndWait() }
        #expect(loop.backendKind == kind)
        let path = "/tmp/plexus-review-pos-\(getpid())-\(kind)"
        defer { unlink(path) }
        let chunk = 4096, count = 8
        let bytes = (0..<(chunk * count)).map { UInt8(truncatingIfNeeded: $0 / chunk + 1) }
        let fd = open(path, O_CREAT | O_TRUNC | O_RDWR | O_CLOEXEC, 0o600)
        #expect(fd >= 0)
        #expect(bytes.withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) } == bytes.count)
        #expect(fsync(fd) == 0)
        #expect(posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED) == 0)
        let file = File(fd: FileDescriptor(rawValue: fd), loop: loop)
        _ = lseek(fd, 0, SEEK_SET)
        let got: [[UInt8]] = try await Self.onLoop(loop) { finish in
            let all = Locked<[[UInt8]]>([])
            for _ in 0..<count {
                file.read(into: IOBuffer(capacity: chunk), at: nil) { result, buffer in
                    let data = buffer.withUnsafeBytes { Array($0) }
                    let n = all.withLock { $0.append(data); return $0.count }
                    if n == count { finish(all.withLock { $0 }) }
                }
            }
        }
        // io_uring takes f_pos when each IORING_OP_READ with offset -1 is issued and moves
        // it only when it completes: reads punted to its workers (pages not cached) all
        // read offset 0 unless the backend keeps one in the ring at a time, in order.
        #expect(got.map { $0.first ?? 0 } == (1...count).map { UInt8($0) },
                "\(kind): chunks read \(got.map { ($0.first ?? 0, $0.count) })")
        try await file.close()
    }
}
