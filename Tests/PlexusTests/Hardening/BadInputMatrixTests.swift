import CPlexus
import Glibc
@testable import Plexus
import Synchronization
import SystemPackage
import Testing

extension PlexusTests {
    /// Every public operation × every kind of bad input, on every backend: a typed error
    /// naming the operation and the errno (both checked), every wait bounded, no fd leaked
    /// (the root suite's fd check), every token completed exactly once (the harness).
    @Suite struct BadInputMatrix {
        /// Every operation that takes an fd, built fresh for `fd` (a factory: operations
        /// are noncopyable and consumed by prepare).
        static func everyOperation(on fd: FileDescriptor) -> [(String, () -> Operation)] {
            let address = SocketAddress(ipv4: "127.0.0.1", port: 9)!
            return [
                ("read", { .read(fd, IOBuffer(capacity: 8)) }),
                ("pread", { .read(fd, IOBuffer(capacity: 8), offset: 0) }),
                ("write", { .write(fd, IOBuffer("x")) }),
                ("pwrite", { .write(fd, IOBuffer("x"), offset: 0) }),
                ("readv", { var v = IOVector(capacity: 1); v.append(IOBuffer(capacity: 8)); return .readv(fd, v) }),
                ("writev", { var v = IOVector(capacity: 1); v.append(IOBuffer("x")); return .writev(fd, v) }),
                ("send", { .send(fd, IOBuffer("x")) }),
                ("recv", { .recv(fd, IOBuffer(capacity: 8)) }),
                ("sendmsg", { .sendMessage(fd, Message(IOBuffer("x"), address: address)) }),
                ("recvmsg", { .receiveMessage(fd, Message(IOBuffer(capacity: 8))) }),
                ("accept", { .accept(fd) }),
                ("accept(multishot)", { .accept(fd, multishot: true) }),
                ("connect", { .connect(fd, address) }),
                ("poll", { .poll(fd, .readable) }),
                ("poll(multishot)", { .poll(fd, .readable, multishot: true) }),
                ("fsync", { .fsync(fd) }),
                ("fdatasync", { .fsync(fd, dataOnly: true) }),
                ("shutdown", { .shutdown(fd, how: Int32(SHUT_RDWR)) }),
                ("open relative to it", { .open("relative", flags: O_RDONLY, directory: fd) }),
            ]
        }

        /// Prepares every case at once (so they also share the backend), waits for all of
        /// them with a bound, and checks each one's errno and typed error.
        static func expectAll(_ h: Harness, _ cases: [(String, () -> Operation, Int32)],
                              sourceLocation: SourceLocation = #_sourceLocation) throws {
            let tokens = cases.map { h.prepare($0.1(), sourceLocation: sourceLocation) }
            let outcomes = try h.waitFor(tokens, within: .seconds(10), sourceLocation: sourceLocation)
            for ((name, _, errno), outcome) in zip(cases, outcomes) {
                expectError(outcome, errno, "\(name) on \(h.kind)", sourceLocation: sourceLocation)
                if let error = outcome.error {
                    #expect(error.operation == outcome.kind.rawValue, sourceLocation: sourceLocation)
                    #expect(error.errno.rawValue == errno, "\(name): \(error)", sourceLocation: sourceLocation)
                    #expect(error.description.contains(outcome.kind.rawValue), sourceLocation: sourceLocation)
                } else {
                    Issue.record("\(name) on \(h.kind) did not fail: \(outcome)", sourceLocation: sourceLocation)
                }
                if outcome.kind.carriesBuffers {
                    #expect(outcome.hadOperation, "\(name): the refused operation hands its buffers back",
                            sourceLocation: sourceLocation)
                }
            }
        }

        @Test(arguments: Backends.kinds, [Int32(-1), 9999, 1 << 20])
        func `an invalid fd is EBADF for every operation`(kind: BackendKind, fd: Int32) throws {
            #expect(!isOpen(fd))
            try Harness.run(kind) { h in
                let bad = FileDescriptor(rawValue: fd)
                let cases = Self.everyOperation(on: bad).map { ($0.0, $0.1, EBADF) }
                try Self.expectAll(h, cases + [("close", { .close(bad) }, EBADF)])
            }
        }

        @Test(arguments: Backends.kinds)
        func `a closed fd is EBADF for every operation`(kind: BackendKind) throws {
            try Harness.run(kind) { h in
                // Used through Plexus first (so a backend that caches per-fd state has some),
                // then closed behind its back.
                let pipe = try h.pipe()
                h.writeAll(pipe.write, "x")
                expectResult(try h.perform(.read(pipe.read, IOBuffer(capacity: 8))), 1)
                h.closeNow(pipe.read)
                // Each alone first: in one batch with a close, the close cancels the others.
                for (name, make) in Self.everyOperation(on: pipe.read) { try Self.expectAll(h, [(name, make, EBADF)]) }
                try Self.expectAll(h, Self.everyOperation(on: pipe.read).map { ($0.0, $0.1, EBADF) })
                expectError(try h.perform(.close(pipe.read)), EBADF, "close of an fd closed behind Plexus's back")
                // And closed through Plexus: the number is no longer Plexus's.
                expectResult(try h.perform(.close(pipe.write)), 0)
                try Self.expectAll(h, Self.everyOperation(on: pipe.write).map { ($0.0, $0.1, EBADF) })
                expectError(try h.perform(.close(pipe.write)), EBADF, "a second close")
            }
        }

        @Test(arguments: Backends.kinds)
        func `an fd of the wrong kind or socket state`(kind: BackendKind) throws {
            try Harness.run(kind) { h in
                let pipe = try h.pipe()
                let listener = try h.tcpListener()
                let unconnected = try h.inetSocket()
                let unconnected2 = try h.inetSocket()
                let udp = try h.udpSocket()
                let (connected, peer) = try h.socketPair()
                h.writeAll(peer, "data")
                let file = try h.temporaryFile(contents: bytes("data"))
                let directory = Glibc.open(try h.temporaryDirectory(), O_RDONLY | O_DIRECTORY | O_CLOEXEC)
                let dir = h.own(directory)
                let address = listener.address
                var pipeVector = IOVector(capacity: 1)
                pipeVector.append(IOBuffer(capacity: 4))
                _ = pipeVector
                let cases: [(String, () -> Operation, Int32)] = [
                    ("recv on a pipe", { .recv(pipe.read, IOBuffer(capacity: 4)) }, ENOTSOCK),
                    ("send on a pipe", { .send(pipe.write, IOBuffer("x")) }, ENOTSOCK),
                    ("recvmsg on a pipe", { .receiveMessage(pipe.read, Message(IOBuffer(capacity: 4))) }, ENOTSOCK),
                    ("sendmsg on a file", { .sendMessage(file.fd, Message(IOBuffer("x"), address: address)) }, ENOTSOCK),
                    ("send on a regular file", { .send(file.fd, IOBuffer("x")) }, ENOTSOCK),
                    ("accept on a pipe", { .accept(pipe.read) }, ENOTSOCK),
                    ("accept(multishot) on a regular file", { .accept(file.fd, multishot: true) }, ENOTSOCK),
                    ("accept on a socket that is not listening", { .accept(unconnected) }, EINVAL),
                    ("accept on a UDP socket", { .accept(udp.fd) }, EOPNOTSUPP),
                    ("connect on a pipe", { .connect(pipe.read, address) }, ENOTSOCK),
                    ("connect on a listening socket", { .connect(listener.fd, address) }, EISCONN),
                    ("shutdown on a pipe", { .shutdown(pipe.read, how: Int32(SHUT_RDWR)) }, ENOTSOCK),
                    ("shutdown of a socket that is not connected", { .shutdown(unconnected2, how: Int32(SHUT_RDWR)) }, ENOTCONN),
                    ("read on a listening socket", { .read(listener.fd, IOBuffer(capacity: 4)) }, ENOTCONN),
                    ("recv on an unconnected socket", { .recv(unconnected, IOBuffer(capacity: 4)) }, ENOTCONN),
                    ("send on an unconnected socket", { .send(unconnected, IOBuffer("x")) }, EPIPE),
                    ("pread on a pipe (no lseek)", { .read(pipe.read, IOBuffer(capacity: 4), offset: 0) }, ESPIPE),
                    ("pwrite on a pipe", { .write(pipe.write, IOBuffer("x"), offset: 0) }, ESPIPE),
                    ("preadv on a socket", { var v = IOVector(capacity: 1); v.append(IOBuffer(capacity: 4)); return .readv(listener.fd, v, offset: 0) }, ESPIPE),
                    ("pread on a connected socket", { .read(connected, IOBuffer(capacity: 4), offset: 0) }, ESPIPE),
                    ("pwrite on a connected socket", { .write(connected, IOBuffer("x"), offset: 0) }, ESPIPE),
                    ("pwritev on a connected socket", { var v = IOVector(capacity: 1); v.append(IOBuffer("x")); return .writev(connected, v, offset: 0) }, ESPIPE),
                    ("read on a directory", { .read(dir, IOBuffer(capacity: 4)) }, EISDIR),
                    ("write to a directory", { .write(dir, IOBuffer("x")) }, EBADF),
                    ("write to the read end", { .write(pipe.read, IOBuffer("x")) }, EBADF),
                    ("read from the write end", { .read(pipe.write, IOBuffer(capacity: 4)) }, EBADF),
                    ("fsync of a pipe", { .fsync(pipe.write) }, EINVAL),
                    ("fsync of a socket", { .fsync(listener.fd) }, EINVAL),
                    ("open relative to a regular file", { .open("x", flags: O_RDONLY, directory: file.fd) }, ENOTDIR),
                ]
                try Self.expectAll(h, cases)
                // SIGPIPE from "send on an unconnected socket" is impossible: send adds MSG_NOSIGNAL.
            }
        }

        @Test(arguments: Backends.kinds)
        func `zero-length buffers are EINVAL and come back untouched`(kind: BackendKind) throws {
            try Harness.run(kind) { h in
                let pipe = try h.pipe()
                let (a, _) = try h.socketPair()
                let file = try h.temporaryFile(contents: bytes("data"))
                let empty = { () -> IOVector in var v = IOVector(capacity: 1); v.append(IOBuffer(capacity: 0)); return v }
                let cases: [(String, () -> Operation, Int32)] = [
                    ("read into 0 bytes", { .read(pipe.read, IOBuffer(capacity: 0)) }, EINVAL),
                    ("pread into 0 bytes", { .read(file.fd, IOBuffer(capacity: 0), offset: 0) }, EINVAL),
                    ("write of 0 bytes", { .write(pipe.write, IOBuffer(capacity: 8)) }, EINVAL),
                    ("pwrite of 0 bytes", { .write(file.fd, IOBuffer(capacity: 8), offset: 0) }, EINVAL),
                    ("readv of empty buffers", { .readv(file.fd, empty()) }, EINVAL),
                    ("writev of empty buffers", { .writev(pipe.write, empty()) }, EINVAL),
                    ("send of 0 bytes", { .send(a, IOBuffer(capacity: 0)) }, EINVAL),
                    ("recv into 0 bytes", { .recv(a, IOBuffer(capacity: 0)) }, EINVAL),
                    ("recvmsg into 0 bytes", { .receiveMessage(a, Message(IOBuffer(capacity: 0))) }, EINVAL),
                ]
                try Self.expectAll(h, cases)
                #expect(h.readNow(pipe.read).isEmpty, "nothing was written")
                #expect(readWholeFile(file.path) == "data")
                // Again on pipes the backend knows, drained by a short read: their reads and
                // writes start from the record (`URingBackend.startOnPipe`,
                // `ReadinessEngine.transferReady`), which must refuse these too.
                for nonBlocking in [false, true] {
                    let known = try h.pipe(nonBlocking: nonBlocking)
                    expectResult(try h.perform(.write(known.write, IOBuffer("a"))), 1, "write to a pipe")
                    expectResult(try h.perform(.read(known.read, IOBuffer(capacity: 64))), 1, "short read of a pipe")
                    try Self.expectAll(h, [
                        ("read into 0 bytes of a known pipe", { .read(known.read, IOBuffer(capacity: 0)) }, EINVAL),
                        ("write of 0 bytes to a known pipe", { .write(known.write, IOBuffer(capacity: 8)) }, EINVAL),
                    ])
                    // Nothing was written: the next read gets the next write's byte alone.
                    expectResult(try h.perform(.write(known.write, IOBuffer("b"))), 1, "write to a pipe")
                    #expect(try h.perform(.read(known.read, IOBuffer(capacity: 64))).bytes == Array("b".utf8))
                }
            }
        }

        @Test(arguments: Backends.kinds)
        func `negative offsets are EINVAL, huge offsets are EOF or a typed error`(kind: BackendKind) throws {
            try Harness.run(kind) { h in
                let file = try h.temporaryFile(contents: bytes("0123456789"))
                let one = { (b: consuming IOBuffer) -> IOVector in var v = IOVector(capacity: 1); v.append(b); return v }
                var cases: [(String, () -> Operation, Int32)] = []
                for offset: Int64 in [-1, -2, -4096, .min] {
                    cases += [
                        ("read at \(offset)", { .read(file.fd, IOBuffer(capacity: 4), offset: offset) }, EINVAL),
                        ("write at \(offset)", { .write(file.fd, IOBuffer("x"), offset: offset) }, EINVAL),
                        ("readv at \(offset)", { .readv(file.fd, one(IOBuffer(capacity: 4)), offset: offset) }, EINVAL),
                        ("writev at \(offset)", { .writev(file.fd, one(IOBuffer("x")), offset: offset) }, EINVAL),
                    ]
                }
                try Self.expectAll(h, cases)
                // Beyond the end: a read finds EOF; a write past the largest file size fails typed.
                expectResult(try h.perform(.read(file.fd, IOBuffer(capacity: 4), offset: 1 << 40)), 0, "read far past EOF")
                // pread(2) refuses a position whose end overflows loff_t: EINVAL, on every backend.
                let last = try h.perform(.read(file.fd, IOBuffer(capacity: 4), offset: .max))
                #expect(last.result == 0 || last.errno == EINVAL, "read at Int64.max: \(last)")
                let far = try h.perform(.write(file.fd, IOBuffer("x"), offset: .max))
                #expect(far.errno == EFBIG || far.errno == EINVAL, "write at Int64.max: \(far)")
                if let error = far.error { #expect(error.operation == "write") }
                #expect(readWholeFile(file.path) == "0123456789", "nothing was written")
            }
        }

        @Test(arguments: Backends.kinds)
        func `huge lengths: partial transfers, IOV_MAX is EINVAL`(kind: BackendKind) throws {
            try Harness.run(kind) { h in
                let pipe = try h.pipe()
                // 16 MiB into a pipe (64 KiB): a partial write, the rest left in the buffer.
                let huge = 16 << 20
                let written = try h.perform(.write(pipe.write, IOBuffer(bytes: repeatElement(UInt8(7), count: huge))))
                #expect(written.result > 0 && Int(written.result) < huge, "\(written)")
                #expect(written.bytes?.count == huge - Int(max(written.result, 0)), "the unwritten rest stays in the buffer")
                // A 64 MiB read of what is there returns what is there.
                let read = try h.perform(.read(pipe.read, IOBuffer(capacity: 64 << 20)))
                #expect(read.result == written.result, "\(read)")
                // IOV_MAX (1024) buffers, the most an IOVector holds (more is a precondition).
                var many = IOVector(capacity: 1024)
                for _ in 0..<1024 { many.append(IOBuffer("y")) }
                expectResult(try h.perform(.writev(pipe.write, many)), 1024, "writev of 1024 buffers")
                var into = IOVector(capacity: 1024)
                for _ in 0..<1024 { into.append(IOBuffer(capacity: 1)) }
                expectResult(try h.perform(.readv(pipe.read, into)), 1024, "readv into 1024 buffers")
                _ = h.readNow(pipe.read)
            }
        }

        @Test(arguments: Backends.kinds)
        func `cancelled before submit: ECANCELED exactly once, buffers back`(kind: BackendKind) throws {
            try Harness.run(kind) { h in
                let pipe = try h.pipe()
                let (a, _) = try h.socketPair()
                let listener = try h.tcpListener()
                let udp = try h.udpSocket()
                let factories: [(String, () -> Operation)] = [
                    ("read", { .read(pipe.read, IOBuffer(capacity: 8)) }),
                    ("readv", { var v = IOVector(capacity: 1); v.append(IOBuffer(capacity: 8)); return .readv(pipe.read, v) }),
                    ("recv", { .recv(a, IOBuffer(capacity: 8)) }),
                    ("recvmsg", { .receiveMessage(udp.fd, Message(IOBuffer(capacity: 8))) }),
                    ("accept", { .accept(listener.fd) }),
                    ("accept(multishot)", { .accept(listener.fd, multishot: true) }),
                    ("poll", { .poll(pipe.read, .readable) }),
                    ("poll(multishot)", { .poll(a, .readable, multishot: true) }),
                    ("timeout", { .timeout(.seconds(30)) }),
                    ("deadline", { .deadline(Deadline.now + .seconds(30)) }),
                ]
                var pairs: [(String, Token, Token)] = []
                for (name, make) in factories {
                    let target = h.prepare(make())
                    pairs.append((name, target, h.prepare(.cancel(target))))
                }
                // Nothing was submitted yet; now everything is.
                for (name, target, cancel) in pairs {
                    let outcomes = try h.waitFor([target, cancel])
                    expectError(outcomes[0], ECANCELED, "\(name) cancelled before submit")
                    expectResult(outcomes[1], 0, "the cancel of \(name) found it")
                    #expect(h.intermediates[target] == nil, "\(name) reported before it was cancelled")
                }
                // Quick operations cancelled before submit may finish first: either way, once.
                let nop = h.prepare(.nop)
                let cancelNop = h.prepare(.cancel(nop))
                let outcomes = try h.waitFor([nop, cancelNop])
                #expect(outcomes[0].result == 0 || outcomes[0].errno == ECANCELED, "\(outcomes[0])")
                #expect([0, -ENOENT, -EALREADY].contains(outcomes[1].result), "\(outcomes[1])")
                // A cancel of a token that is gone, and of one never issued.
                expectError(try h.perform(.cancel(nop)), ENOENT, "cancel of a completed token")
                expectError(try h.perform(.cancel(Token(rawValue: 0xdead_beef_0000_0042))), ENOENT, "cancel of a made-up token")
            }
        }

        // MARK: After the loop shut down

        /// Every callback operation on a loop that has shut down: each callback runs once,
        /// with a typed ECANCELED naming its operation, and buffers come back.
        @Test(arguments: Backends.kinds)
        func `submitted after loop shutdown: every callback once, typed ECANCELED, nothing started, timers cancelled`(kind: BackendKind) throws {
            var p: [Int32] = [0, 0]
            #expect(plexus_pipe2(&p, O_CLOEXEC | O_NONBLOCK) == 0)
            defer { Glibc.close(p[0]); Glibc.close(p[1]) }
            let r = FileDescriptor(rawValue: p[0]), w = FileDescriptor(rawValue: p[1])
            let results = Box<[String: [Result<Int, PlexusError>]]>([:])
            let buffersBack = Box(0)
            let opened = Box<[Int32]>([])
            let timerEvents = Box<[String: [TimerEvent]]>([:])
            do {
                // The real case: the loop's thread has finished; nobody will ever wait again.
                let loop = try Backends.loopThread(kind)
                loop.shutdownAndWait()
                #expect(loop.execute {} == false, "a stopped loop takes no job")
                func record(_ name: String) -> (Result<Int, PlexusError>) -> Void {
                    { results.value[name, default: []].append($0) }
                }
                loop.nop(record("nop"))
                loop.read(r, IOBuffer(capacity: 8)) { result, _ in record("read")(result); buffersBack.value += 1 }
                loop.write(w, IOBuffer("x")) { result, _ in record("write")(result); buffersBack.value += 1 }
                loop.recv(r, IOBuffer(capacity: 8)) { result, _ in record("recv")(result); buffersBack.value += 1 }
                loop.send(w, IOBuffer("x")) { result, _ in record("send")(result); buffersBack.value += 1 }
                loop.accept(r) { record("accept")($0.map { Int($0.rawValue) }) }
                loop.poll(r, .readable) { record("poll")($0.map { Int($0.rawValue) }) }
                loop.timeout(.milliseconds(1)) { record("timeout")($0.map { 0 }) }
                loop.fsync(w) { record("fsync")($0.map { 0 }) }
                loop.open("/dev/null", flags: O_RDONLY) {
                    if case .success(let fd) = $0 { opened.value.append(fd.rawValue) }
                    record("open")($0.map { Int($0.rawValue) })
                }
                // Timers end once too, with .cancelled: nothing will ever fire them.
                for (name, schedule) in [("schedule(after:)", { loop.schedule(after: .milliseconds(1), $0) }),
                                         ("schedule(at:)", { loop.schedule(at: Deadline.now, $0) }),
                                         ("scheduleRepeating", { loop.scheduleRepeating(every: .milliseconds(1), $0) })]
                    as [(String, (@escaping (TimerEvent) throws -> Void) -> TimerHandle)] {
                    let handle = schedule { timerEvents.value[name, default: []].append($0) }
                    #expect(loop.cancel(handle) == false, "\(name): a timer of a stopped loop has already ended")
                }
                // Bounded: the callbacks must run without anyone turning the loop.
                let deadline = Deadline.now + .seconds(1)
                while results.value.values.map(\.count).reduce(0, +) < 10 && Deadline.now < deadline { usleep(1000) }
                #expect(loop.pendingOperations == 0, "operations left pending in a stopped loop: \(loop.pendingOperations)")
                #expect(loop.pendingTimers == 0, "timers left pending in a stopped loop: \(loop.pendingTimers)")
            }
            for name in ["schedule(after:)", "schedule(at:)", "scheduleRepeating"] {
                #expect(timerEvents.value[name] == [.cancelled], "\(name) after shutdown on \(kind)")
            }
            for fd in opened.value { Glibc.close(fd) }
            let names = ["nop", "read", "write", "recv", "send", "accept", "poll", "timeout", "fsync", "open"]
            for name in names {
                let got = results.value[name] ?? []
                #expect(got.count == 1, "\(name) after shutdown: callback ran \(got.count) times on \(kind)")
                if let first = got.first, case .failure(let error) = first {
                    #expect(error.errno == .canceled, "\(name): \(error)")
                    #expect(error.operation == name, "\(name): \(error)")
                } else if let first = got.first {
                    Issue.record("\(name) after shutdown succeeded: \(first)")
                }
            }
            #expect(buffersBack.value == 4)
        }

        @Test(arguments: Backends.kinds)
        func `awaited after loop shutdown: typed ECANCELED naming the operation, buffer back; a close still closes`(kind: BackendKind) async throws {
            var p: [Int32] = [0, 0]
            #expect(plexus_pipe2(&p, O_CLOEXEC | O_NONBLOCK) == 0)
            defer { Glibc.close(p[0]); Glibc.close(p[1]) }
            let r = FileDescriptor(rawValue: p[0]), w = FileDescriptor(rawValue: p[1])
            let loop = try Backends.loopThread(kind)
            loop.shutdownAndWait()
            func expectCancelled(_ name: String, _ body: () async throws -> Void) async {
                do {
                    try await body()
                    Issue.record("\(name) after shutdown succeeded on \(kind)")
                } catch let error as PlexusError {
                    #expect(error.errno == .canceled, "\(name): \(error)")
                    #expect(error.operation == name, "\(name): \(error)")
                } catch {
                    Issue.record("\(name) after shutdown threw an untyped \(error)")
                }
            }
            await expectCancelled("nop") { _ = try await loop.nop() }
            await expectCancelled("read") { _ = try await loop.read(r, into: IOBuffer(capacity: 8)) }
            await expectCancelled("write") { _ = try await loop.write(w, IOBuffer("x")) }
            await expectCancelled("recv") { _ = try await loop.recv(r, into: IOBuffer(capacity: 8)) }
            await expectCancelled("send") { _ = try await loop.send(w, IOBuffer("x")) }
            await expectCancelled("accept") { _ = try await loop.accept(r) }
            await expectCancelled("connect") { try await loop.connect(r, to: SocketAddress(ipv4: "127.0.0.1", port: 9)!) }
            await expectCancelled("poll") { _ = try await loop.poll(r, .readable) }
            await expectCancelled("open") { _ = try await loop.open("/dev/null", flags: O_RDONLY) }
            await expectCancelled("fsync") { try await loop.fsync(w) }
            await expectCancelled("shutdown") { try await loop.shutdown(r, how: Int32(SHUT_RDWR)) }
            // A close is never cancelled: with the loop gone, close(2) runs at once (fd 9999
            // is no fd: EBADF, the kernel's answer).
            do {
                try await loop.close(FileDescriptor(rawValue: 9999))
                Issue.record("close of fd 9999 after shutdown succeeded on \(kind)")
            } catch let error as PlexusError {
                #expect(error.errno == .badFileDescriptor && error.operation == "close", "close: \(error)")
            }
            await expectCancelled("timeout") { try await loop.sleep(for: .milliseconds(1)) }
            #expect(h_readNothing(r), "nothing was written after shutdown")
        }
    }
}

/// True when the pipe has nothing to read.
private func h_readNothing(_ fd: FileDescriptor) -> Bool {
    var byte: UInt8 = 0
    return Glibc.read(fd.rawValue, &byte, 1) <= 0
}
