import CPlexus
import Glibc
@testable import Plexus
import SystemPackage
import Testing

extension PlexusTests {
    /// open, fsync and close of temporary files.
    @Suite struct Files {
        @Test(arguments: Backends.kinds)
        func `open, write, fsync and close a temporary file`(kind: BackendKind) throws {
            try Harness.run(kind) { h in
                let path = try h.temporaryPath("created")
                let opened = try h.perform(.open(FilePath(path), flags: O_RDWR | O_CREAT | O_EXCL, mode: 0o600))
                #expect(opened.result >= 0, "\(opened)")
                guard opened.result >= 0 else { return }
                #expect(isCloseOnExec(opened.result), "open adds O_CLOEXEC")
                let fd = FileDescriptor(rawValue: opened.result)
                expectResult(try h.perform(.write(fd, IOBuffer("durable"), offset: 0)), 7)
                expectResult(try h.perform(.fsync(fd)), 0)
                expectResult(try h.perform(.fsync(fd, dataOnly: true)), 0)
                expectResult(try h.perform(.close(fd)), 0)
                #expect(!isOpen(fd.rawValue))
                #expect(readWholeFile(path) == "durable")

                expectError(try h.perform(.open(FilePath(path), flags: O_RDWR | O_CREAT | O_EXCL)), EEXIST)
                let readOnly = try h.perform(.open(FilePath(path), flags: O_RDONLY))
                #expect(readOnly.result >= 0, "\(readOnly)")
                if readOnly.result >= 0 {
                    let back = try h.perform(.read(FileDescriptor(rawValue: readOnly.result), IOBuffer(capacity: 64)))
                    #expect(back.string == "durable")
                    expectError(try h.perform(.write(FileDescriptor(rawValue: readOnly.result), IOBuffer("x"))), EBADF)
                }
            }
        }

        @Test(arguments: Backends.kinds)
        func `open relative to a directory fd`(kind: BackendKind) throws {
            try Harness.run(kind) { h in
                let directory = try h.perform(.open(FilePath(try h.temporaryDirectory()), flags: O_RDONLY | O_DIRECTORY))
                #expect(directory.result >= 0, "\(directory)")
                guard directory.result >= 0 else { return }
                let dirFD = FileDescriptor(rawValue: directory.result)
                let file = try h.perform(.open("inside", flags: O_WRONLY | O_CREAT, mode: 0o600, directory: dirFD))
                #expect(file.result >= 0, "\(file)")
                #expect(access(try h.temporaryPath("inside"), F_OK) == 0)
                let read = try h.perform(.read(dirFD, IOBuffer(capacity: 16)))
                expectError(read, EISDIR)
            }
        }

        @Test(arguments: Backends.kinds)
        func `open of a missing file is ENOENT`(kind: BackendKind) throws {
            try Harness.run(kind) { h in
                let missing = try h.temporaryPath("does-not-exist")
                expectError(try h.perform(.open(FilePath(missing), flags: O_RDONLY)), ENOENT)
                expectError(try h.perform(.open(FilePath(""), flags: O_RDONLY)), ENOENT, "an empty path")
                expectError(try h.perform(.open(FilePath(missing + "/below"), flags: O_RDONLY)), ENOENT)
            }
        }

        @Test(arguments: Backends.kinds)
        func `fsync of a pipe or a bad fd fails`(kind: BackendKind) throws {
            try Harness.run(kind) { h in
                let pipe = try h.pipe()
                expectError(try h.perform(.fsync(pipe.write)), EINVAL)
                expectError(try h.perform(.fsync(FileDescriptor(rawValue: -1))), EBADF)
            }
        }
    }

    /// Bad input gives a typed error with the errno: never a crash, a hang or a leaked fd.
    @Suite struct BadInput {
        @Test(arguments: Backends.kinds)
        func `a negative fd is EBADF for every operation that takes one`(kind: BackendKind) throws {
            try Harness.run(kind) { h in
                let bad = FileDescriptor(rawValue: -1)
                let address = SocketAddress(ipv4: "127.0.0.1", port: 9)!
                var vector = IOVector(capacity: 1)
                vector.append(IOBuffer(capacity: 8))
                var gather = IOVector(capacity: 1)
                gather.append(IOBuffer("x"))
                var tokens: [Token] = []
                tokens.append(h.prepare(.read(bad, IOBuffer(capacity: 8))))
                tokens.append(h.prepare(.write(bad, IOBuffer("x"))))
                tokens.append(h.prepare(.readv(bad, vector)))
                tokens.append(h.prepare(.writev(bad, gather)))
                tokens.append(h.prepare(.send(bad, IOBuffer("x"))))
                tokens.append(h.prepare(.recv(bad, IOBuffer(capacity: 8))))
                tokens.append(h.prepare(.sendMessage(bad, Message(IOBuffer("x"), address: address))))
                tokens.append(h.prepare(.receiveMessage(bad, Message(IOBuffer(capacity: 8)))))
                tokens.append(h.prepare(.accept(bad)))
                tokens.append(h.prepare(.accept(bad, multishot: true)))
                tokens.append(h.prepare(.connect(bad, address)))
                tokens.append(h.prepare(.poll(bad, .readable)))
                tokens.append(h.prepare(.poll(bad, .readable, multishot: true)))
                tokens.append(h.prepare(.close(bad)))
                tokens.append(h.prepare(.fsync(bad)))
                tokens.append(h.prepare(.shutdown(bad, how: Int32(SHUT_RDWR))))
                for outcome in try h.waitFor(tokens) { expectError(outcome, EBADF) }
            }
        }

        @Test(arguments: Backends.kinds)
        func `an fd that is not open is EBADF`(kind: BackendKind) throws {
            try Harness.run(kind) { h in
                // Open, then closed behind Plexus's back: the number is valid but not open.
                let pipe = try h.pipe()
                h.closeNow(pipe.read)
                let closed = pipe.read
                let never = FileDescriptor(rawValue: 987_654)
                for fd in [closed, never] {
                    expectError(try h.perform(.read(fd, IOBuffer(capacity: 8))), EBADF, "read fd \(fd.rawValue)")
                    expectError(try h.perform(.recv(fd, IOBuffer(capacity: 8))), EBADF, "recv fd \(fd.rawValue)")
                    expectError(try h.perform(.accept(fd)), EBADF, "accept fd \(fd.rawValue)")
                    expectError(try h.perform(.poll(fd, .readable)), EBADF, "poll fd \(fd.rawValue)")
                    expectError(try h.perform(.fsync(fd)), EBADF, "fsync fd \(fd.rawValue)")
                    expectError(try h.perform(.close(fd)), EBADF, "close fd \(fd.rawValue)")
                }
            }
        }

        @Test(arguments: Backends.kinds)
        func `zero-length buffers are EINVAL`(kind: BackendKind) throws {
            try Harness.run(kind) { h in
                let pipe = try h.pipe()
                let (a, _) = try h.socketPair()
                let file = try h.temporaryFile(contents: bytes("data"))
                var full = IOBuffer(capacity: 2)
                full.append(bytes("ab"))  // no spare capacity left: nothing to read into
                var empty = IOVector(capacity: 2)
                empty.append(IOBuffer(capacity: 0))
                empty.append(IOBuffer(capacity: 0))
                var emptyOut = IOVector(capacity: 1)
                emptyOut.append(IOBuffer(capacity: 4))
                let outcomes = try h.waitFor([
                    h.prepare(.read(pipe.read, IOBuffer(capacity: 0))),
                    h.prepare(.read(file.fd, full)),
                    h.prepare(.write(pipe.write, IOBuffer(capacity: 16))),
                    h.prepare(.readv(file.fd, empty)),
                    h.prepare(.writev(pipe.write, emptyOut)),
                    h.prepare(.recv(a, IOBuffer(capacity: 0))),
                    h.prepare(.send(a, IOBuffer(capacity: 0))),
                    h.prepare(.receiveMessage(a, Message(IOBuffer(capacity: 0)))),
                ])
                for outcome in outcomes {
                    expectError(outcome, EINVAL)
                    #expect(outcome.hadOperation, "a refused operation still hands its buffer back")
                }
                #expect(outcomes[1].string == "ab", "the refused read left the buffer as it was")
            }
        }

        @Test(arguments: Backends.kinds)
        func `negative offsets are EINVAL`(kind: BackendKind) throws {
            try Harness.run(kind) { h in
                let file = try h.temporaryFile(contents: bytes("0123456789"))
                var vector = IOVector(capacity: 1)
                vector.append(IOBuffer(capacity: 4))
                var gather = IOVector(capacity: 1)
                gather.append(IOBuffer("x"))
                let outcomes = try h.waitFor([
                    h.prepare(.read(file.fd, IOBuffer(capacity: 4), offset: -1)),
                    h.prepare(.read(file.fd, IOBuffer(capacity: 4), offset: -4096)),
                    h.prepare(.write(file.fd, IOBuffer("x"), offset: -1)),
                    h.prepare(.readv(file.fd, vector, offset: -2)),
                    h.prepare(.writev(file.fd, gather, offset: .min)),
                ])
                for outcome in outcomes { expectError(outcome, EINVAL) }
                var check = [UInt8](repeating: 0, count: 16)
                let n = check.withUnsafeMutableBytes { pread(file.fd.rawValue, $0.baseAddress, $0.count, 0) }
                #expect(Array(check[0..<max(n, 0)]).text == "0123456789", "nothing was written")
            }
        }

        @Test(arguments: Backends.kinds)
        func `a positional read or write on a pipe is ESPIPE`(kind: BackendKind) throws {
            try Harness.run(kind) { h in
                let pipe = try h.pipe()
                h.writeAll(pipe.write, "data")
                expectError(try h.perform(.read(pipe.read, IOBuffer(capacity: 8), offset: 0)), ESPIPE, "pread(2) on a pipe")
                expectError(try h.perform(.write(pipe.write, IOBuffer("x"), offset: 0)), ESPIPE, "pwrite(2) on a pipe")
                _ = h.readNow(pipe.read)
            }
        }

        @Test(arguments: Backends.kinds)
        func `operations on the wrong kind of fd or socket state`(kind: BackendKind) throws {
            try Harness.run(kind) { h in
                let pipe = try h.pipe()
                let listener = try h.tcpListener()
                let unconnected = try h.inetSocket()
                let address = listener.address
                expectError(try h.perform(.send(pipe.write, IOBuffer("x"))), ENOTSOCK, "send on a pipe")
                expectError(try h.perform(.recv(pipe.read, IOBuffer(capacity: 4))), ENOTSOCK, "recv on a pipe")
                expectError(try h.perform(.accept(pipe.read)), ENOTSOCK, "accept on a pipe")
                expectError(try h.perform(.connect(pipe.read, address)), ENOTSOCK, "connect on a pipe")
                expectError(try h.perform(.accept(unconnected)), EINVAL, "accept on a socket that is not listening")
                expectError(try h.perform(.read(listener.fd, IOBuffer(capacity: 4))), ENOTCONN, "read on a listening socket")
                expectError(try h.perform(.recv(unconnected, IOBuffer(capacity: 4))), ENOTCONN, "recv on an unconnected socket")
                expectError(try h.perform(.write(pipe.read, IOBuffer("x"))), EBADF, "write to the read end")
                expectError(try h.perform(.read(pipe.write, IOBuffer(capacity: 4))), EBADF, "read from the write end")
            }
        }

        @Test(arguments: Backends.kinds)
        func `writing to a pipe with no reader is EPIPE`(kind: BackendKind) throws {
            try Harness.run(kind) { h in
                let pipe = try h.pipe()
                h.closeNow(pipe.read)
                expectError(try h.perform(.write(pipe.write, IOBuffer("nobody"))), EPIPE)
                let (a, b) = try h.socketPair()
                h.closeNow(b)
                expectError(try h.perform(.send(a, IOBuffer("nobody"))), EPIPE)
            }
        }

        @Test func `a failed completion is a typed error naming the operation and errno`() throws {
            let completion = Completion(token: Token(rawValue: 7), result: -EBADF, flags: [], kind: .recv, operation: nil)
            #expect(throws: PlexusError(operation: "recv", errno: .badFileDescriptor)) { try completion.get() }
            let error = try #require(completion.value.failure)
            #expect(error.errno == .badFileDescriptor)
            #expect(error.description.contains("recv"))
            #expect(error.description.contains("\(EBADF)"))
            let success = Completion(token: Token(rawValue: 8), result: 5, flags: [], kind: .read, operation: nil)
            #expect(try success.get() == 5)
        }
    }

    /// What every in-flight operation costs.
    @Suite struct Layout {
        @Test func `the per-operation record size is pinned`() {
            // OperationRecord is what every prepared or in-flight operation occupies in a
            // backend's slab, on top of its plexus_op_scratch (the kernel-visible msghdr,
            // sockaddr, iovec and timespec). Growing either raises the memory of every pending
            // operation; change these numbers only on purpose, and say why in the commit.
            // 160 today: the record holds an `Operation?` inline (92 bytes; its largest payload
            // is a Message: a 32-byte IOBuffer and an optional 40-byte SocketAddress, IP
            // addresses inline, Unix paths out of line), and beside it the 32-byte IOBuffer and
            // the offset or flags of a read, write, send or recv, held apart so the backends
            // change them in place (112 before: the view, the result and the hand-back each
            // moved the whole operation, 34 instructions per read). It was 200 while
            // SocketAddress embedded a 128-byte sockaddr_storage, which every operation then
            // copied around.
            #expect(MemoryLayout<OperationRecord>.stride == 160, "OperationRecord is now \(MemoryLayout<OperationRecord>.stride) bytes")
            #expect(MemoryLayout<plexus_op_scratch>.stride == 232, "plexus_op_scratch is now \(MemoryLayout<plexus_op_scratch>.stride) bytes")
        }

        @Test func `an operation's error is two words and reads like the one it replaced`() {
            // Every callback gets a Result<Int, PlexusError>: with two Strings inline, copying
            // and destroying it went through the runtime's generic value witnesses.
            #expect(MemoryLayout<PlexusError>.size == 16, "PlexusError is now \(MemoryLayout<PlexusError>.size) bytes")
            let own = PlexusError(.recv, result: -EBADF)
            #expect(own.operation == "recv" && own.errno == .badFileDescriptor && own.message == Errno.badFileDescriptor.description)
            #expect(own == PlexusError(operation: "recv", errno: .badFileDescriptor))
            #expect(own != PlexusError(operation: "recv", errno: .badFileDescriptor, message: "other words"))
            #expect(own != PlexusError(.send, result: -EBADF))
            let named = PlexusError(operation: "io_uring_enter", errno: .interrupted, message: "why")
            #expect(named.operation == "io_uring_enter" && named.message == "why" && named.errno == .interrupted)
            #expect(named.description == "io_uring_enter failed: why (errno \(EINTR))")
            let kindWithMessage = PlexusError(operation: "connect", errno: .timedOut, message: "connect to x timed out")
            #expect(kindWithMessage.operation == "connect" && kindWithMessage.message == "connect to x timed out")
        }
    }
}

extension Result {
    var failure: Failure? {
        if case .failure(let error) = self { return error }
        return nil
    }
}
