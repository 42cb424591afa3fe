import CPlexus
import Glibc
@testable import Plexus
import SystemPackage
import Testing

/// A final completion hands the operation back as it was prepared. The backends keep a
/// read's, write's, send's or recv's buffer, offset or flags and fd apart in the record
/// (`OperationRecord`) and rebuild the operation at the end: an offset of 0 must not come
/// back as none, a negative one must come back as given, flags must keep every bit (and
/// not gain the MSG_NOSIGNAL the backends add for the kernel).
extension PlexusTests {
@Suite struct HandBackTests {
    /// What came back in a completion's operation.
    struct Back: Equatable, CustomStringConvertible {
        var kind: OperationKind
        var fd: Int32
        var offset: Int64? = nil
        var flags: Int32? = nil
        var bytes: [UInt8] = []
        var result: Int32 = 0

        var description: String {
            "\(kind) fd \(fd) offset \(offset.map(String.init) ?? "none") flags \(flags.map(String.init) ?? "none") bytes \(bytes) result \(result)"
        }
    }

    static func back(_ completion: consuming Completion) -> Back? {
        let result = completion.result
        guard let operation = completion.operation.take() else { return nil }
        switch consume operation {
        case .read(let fd, let b, let offset):
            return Back(kind: .read, fd: fd.rawValue, offset: offset, bytes: b.bytes, result: result)
        case .write(let fd, let b, let offset):
            return Back(kind: .write, fd: fd.rawValue, offset: offset, bytes: b.bytes, result: result)
        case .send(let fd, let b, let flags):
            return Back(kind: .send, fd: fd.rawValue, flags: flags, bytes: b.bytes, result: result)
        case .recv(let fd, let b, let flags):
            return Back(kind: .recv, fd: fd.rawValue, flags: flags, bytes: b.bytes, result: result)
        case let other:
            other.discard()
            return nil
        }
    }

    @Test(arguments: Backends.kinds)
    func singleBufferOperationsComeBackAsTheyWerePrepared(_ kind: BackendKind) throws {
        try Harness.run(kind) { h in
            #expect(h.backend.kind == kind)
            let file = try h.temporaryFile(contents: Array("0123456789".utf8))
            let (a, b) = try h.socketPair()
            let (r, w) = try h.pipe()
            let (_, w2) = try h.pipe()  // written at its position: not `w`, whose read would take it too
            #expect(Glibc.write(w.rawValue, "pipe", 4) == 4)
            #expect(Glibc.write(b.rawValue, "sock", 4) == 4)
            // The sign bit and MSG_DONTWAIT: refused before any syscall (a bad fd), so the
            // kernel never sees the unknown bit; the flags must still come back whole.
            let signed = Int32(bitPattern: 0x8000_0000) | Int32(MSG_DONTWAIT)
            let bad = FileDescriptor(rawValue: -1)
            var expected: [Token: Back] = [:]
            func add(_ operation: consuming Operation, _ back: Back) {
                expected[h.backend.prepare(operation)] = back
            }
            add(.read(file.fd, IOBuffer(capacity: 4), offset: 3),
                Back(kind: .read, fd: file.fd.rawValue, offset: 3, bytes: Array("3456".utf8), result: 4))
            add(.read(r, IOBuffer(capacity: 16)),
                Back(kind: .read, fd: r.rawValue, bytes: Array("pipe".utf8), result: 4))
            add(.read(file.fd, IOBuffer(capacity: 4), offset: -2),
                Back(kind: .read, fd: file.fd.rawValue, offset: -2, result: -EINVAL))
            add(.write(file.fd, IOBuffer("ab"), offset: 0),
                Back(kind: .write, fd: file.fd.rawValue, offset: 0, result: 2))
            add(.write(w2, IOBuffer("zz")),
                Back(kind: .write, fd: w2.rawValue, result: 2))
            add(.send(a, IOBuffer("hi"), flags: Int32(MSG_DONTWAIT)),
                Back(kind: .send, fd: a.rawValue, flags: Int32(MSG_DONTWAIT), result: 2))
            add(.recv(a, IOBuffer(capacity: 8), flags: Int32(MSG_PEEK)),
                Back(kind: .recv, fd: a.rawValue, flags: Int32(MSG_PEEK), bytes: Array("sock".utf8), result: 4))
            add(.send(bad, IOBuffer("x"), flags: signed),
                Back(kind: .send, fd: -1, flags: signed, bytes: Array("x".utf8), result: -EBADF))
            add(.recv(bad, IOBuffer(capacity: 1), flags: signed),
                Back(kind: .recv, fd: -1, flags: signed, result: -EBADF))

            var got: [Token: Back] = [:]
            var handedBackNothing: [Token] = []
            let deadline = Deadline.now + .seconds(10)
            while got.count + handedBackNothing.count < expected.count && Deadline.now < deadline {
                _ = try h.backend.wait(timeout: .milliseconds(100)) { completion in
                    let token = completion.token
                    if let back = Self.back(completion) { got[token] = back } else { handedBackNothing.append(token) }
                }
            }
            #expect(handedBackNothing.isEmpty, "final completions without their operation: \(handedBackNothing)")
            for (token, want) in expected {
                #expect(got[token] == want, "\(kind): \(want.kind) came back as \(got[token].map(String.init(describing:)) ?? "nothing"), prepared as \(want)")
            }
            #expect(h.backend.pendingCount == 0)
        }
    }

    /// Takes what `prepareHandingBack`'s operations hand back.
    final class Target: BufferHandBack {
        var got: [Token: Back] = [:]
        override func handBack(_ token: Token, _ result: Int32, _ kind: OperationKind, _ buffer: consuming IOBuffer) {
            got[token] = Back(kind: kind, fd: -1, bytes: buffer.bytes, result: result)
        }
    }

    /// The loop prepares its callbacks' reads, writes, sends and receives with
    /// `prepareHandingBack`: their final completions go to the backend's `handBackTarget`
    /// as token, result and buffer (the result applied), from `wait` and from `cancelAll`,
    /// and never to the body; without a target, to the body as a whole `Completion`.
    @Test(arguments: Backends.kinds)
    func buffersPreparedToComeBackAloneGoToTheTarget(_ kind: BackendKind) throws {
        try Harness.run(kind) { h in
            let backend = h.selected.started
            #expect(backend.kind == kind)
            let target = Target()
            backend.handBackTarget = .passUnretained(target)
            defer { backend.handBackTarget = nil }
            let file = try h.temporaryFile(contents: Array("0123456789".utf8))
            let (r, w) = try h.pipe()
            let (idle, _) = try h.pipe()
            let (_, w2) = try h.pipe()  // written: not `w`, whose read would take it too
            let (a, b) = try h.socketPair()
            #expect(Glibc.write(w.rawValue, "pipe", 4) == 4)
            #expect(Glibc.write(b.rawValue, "sock", 4) == 4)
            let read = backend.prepareHandingBack(.read, r, IOBuffer(capacity: 16), offset: nil, flags: 0)
            let at = backend.prepareHandingBack(.read, file.fd, IOBuffer(capacity: 4), offset: 2, flags: 0)
            let write = backend.prepareHandingBack(.write, w2, IOBuffer("xy"), offset: nil, flags: 0)
            let send = backend.prepareHandingBack(.send, a, IOBuffer("hi"), offset: nil, flags: 0)
            let recv = backend.prepareHandingBack(.recv, a, IOBuffer(capacity: 8), offset: nil, flags: 0)
            let refused = backend.prepareHandingBack(.read, file.fd, IOBuffer(capacity: 4), offset: -1, flags: 0)
            let plain = backend.prepare(.read(file.fd, IOBuffer(capacity: 2), offset: 0))
            var bodies: [Token: Back] = [:]
            let deadline = Deadline.now + .seconds(10)
            while (target.got.count < 6 || bodies.isEmpty) && Deadline.now < deadline {
                _ = try backend.wait(timeout: .milliseconds(100)) { completion in
                    let token = completion.token
                    bodies[token] = Self.back(completion)
                }
            }
            let want: [Token: Back] = [
                read: Back(kind: .read, fd: -1, bytes: Array("pipe".utf8), result: 4),
                at: Back(kind: .read, fd: -1, bytes: Array("2345".utf8), result: 4),
                write: Back(kind: .write, fd: -1, bytes: [], result: 2),
                send: Back(kind: .send, fd: -1, bytes: [], result: 2),
                recv: Back(kind: .recv, fd: -1, bytes: Array("sock".utf8), result: 4),
                refused: Back(kind: .read, fd: -1, bytes: [], result: -EINVAL),
            ]
            #expect(target.got == want, "\(kind)")
            #expect(bodies.keys.sorted(by: { $0.rawValue < $1.rawValue }) == [plain], "\(kind): \(bodies)")
            #expect(bodies[plain] == Back(kind: .read, fd: file.fd.rawValue, offset: 0, bytes: Array("01".utf8), result: 2))

            // Cancelled by cancelAll: handed back too.
            let parked = backend.prepareHandingBack(.read, idle, IOBuffer(capacity: 4), offset: nil, flags: 0)
            _ = try backend.wait(timeout: .milliseconds(10)) { c in Issue.record("\(kind): \(c.token) ended early") }
            backend.cancelAll { c in Issue.record("\(kind): cancelAll gave \(c.token) to its body") }
            #expect(target.got[parked] == Back(kind: .read, fd: -1, bytes: [], result: -ECANCELED), "\(kind)")

            // Without a target: the whole operation, in a Completion.
            backend.handBackTarget = nil
            let lone = backend.prepareHandingBack(.read, file.fd, IOBuffer(capacity: 3), offset: 0, flags: 0)
            var last: [Token: Back] = [:]
            while last.isEmpty && Deadline.now < deadline {
                _ = try backend.wait(timeout: .milliseconds(100)) { completion in
                    let token = completion.token
                    last[token] = Self.back(completion)
                }
            }
            #expect(last == [lone: Back(kind: .read, fd: file.fd.rawValue, offset: 0, bytes: Array("012".utf8), result: 3)])
            #expect(target.got.count == 7)
            #expect(backend.pendingCount == 0)
            withExtendedLifetime(target) {}  // held unmanaged by the backend until here
        }
    }

    /// A loop dropped with a callback's read still pending: its backend ends the read in
    /// its own deinit, after the loop is gone, and must not hand the buffer to it (the
    /// loop clears `handBackTarget` as it goes; the backend does not retain it).
    @Test(arguments: Backends.kinds)
    func aLoopDroppedWithReadsPendingDoesNotGetTheirBuffers(_ kind: BackendKind) throws {
        var fds: [Int32] = [-1, -1]
        #expect(plexus_pipe2(&fds, O_CLOEXEC | O_NONBLOCK) == 0)
        defer { Glibc.close(fds[0]); Glibc.close(fds[1]) }
        weak var gone: EventLoop?
        do {
            let loop = try Backends.loop(kind)
            gone = loop
            loop.read(FileDescriptor(rawValue: fds[0]), IOBuffer(capacity: 8)) { result, _ in
                Issue.record("\(kind): the callback ran after its loop was dropped: \(result)")
            }
            loop.runOnce(timeout: .zero)  // started: parked on the empty pipe, or in the ring
            #expect(loop.pendingOperations >= 1)
        }
        #expect(gone == nil, "the loop outlived its last reference")
    }

    /// The callback adapter's read, write, send and recv hand the backend their parts
    /// (`EventLoop.submit(_:_:_:offset:flags:_:)`): the offset and the flags must reach
    /// the syscall, and the buffer come back through the callback.
    @Test(arguments: Backends.kinds)
    func theCallbackAdapterPassesOffsetsAndFlagsThrough(_ kind: BackendKind) throws {
        let loop = try Backends.loop(kind)
        let dir = "/tmp/plexus-handback-\(getpid())-\(kind)"
        mkdir(dir, 0o700)
        let path = dir + "/file"
        let file = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        #expect(file >= 0)
        #expect(Glibc.write(file, "0123456789", 10) == 10)
        var pair: [Int32] = [-1, -1]
        #expect(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue | SOCK_CLOEXEC.rawValue | SOCK_NONBLOCK.rawValue), 0, &pair) == 0)
        defer {
            Glibc.close(file); Glibc.close(pair[0]); Glibc.close(pair[1])
            unlink(path); rmdir(dir)
        }
        let fd = FileDescriptor(rawValue: file), a = FileDescriptor(rawValue: pair[0]), b = FileDescriptor(rawValue: pair[1])
        var outcomes: [String: String] = [:]
        func record(_ name: String, _ result: Result<Int, PlexusError>, _ buffer: borrowing IOBuffer) {
            switch result {
            case .success(let n): outcomes[name] = "\(n) \(buffer.string)"
            case .failure(let e): outcomes[name] = "\(e.operation) \(e.errno)"
            }
        }
        #expect(Glibc.write(b.rawValue, "sock", 4) == 4)
        loop.read(fd, IOBuffer(capacity: 4), offset: 3) { r, buffer in record("read@3", r, buffer) }
        loop.read(fd, IOBuffer(capacity: 4), offset: -1) { r, buffer in record("read@-1", r, buffer) }
        loop.write(fd, IOBuffer("AB"), offset: 8) { r, buffer in record("write@8", r, buffer) }
        // Peeked, the bytes stay for the plain recv after it.
        loop.recv(a, IOBuffer(capacity: 8), flags: Int32(MSG_PEEK)) { r, buffer in record("peek", r, buffer) }
        LoopTestSupport.turn(loop, until: { outcomes.count == 4 })
        loop.recv(a, IOBuffer(capacity: 8)) { r, buffer in record("recv", r, buffer) }
        loop.send(a, IOBuffer("hi"), flags: Int32(MSG_DONTWAIT)) { r, buffer in record("send", r, buffer) }
        LoopTestSupport.turn(loop, until: { outcomes.count == 6 })
        #expect(outcomes["read@3"] == "4 3456")
        #expect(outcomes["read@-1"] == "read \(Errno.invalidArgument)")
        #expect(outcomes["write@8"] == "2 ")  // written bytes are consumed from the buffer
        #expect(outcomes["peek"] == "4 sock")
        #expect(outcomes["recv"] == "4 sock")
        #expect(outcomes["send"] == "2 ")
        var tail = [UInt8](repeating: 0, count: 4)
        #expect(pread(file, &tail, 4, 6) == 4 && tail == Array("67AB".utf8), "the write did not land at offset 8")
        var peer = [UInt8](repeating: 0, count: 2)
        #expect(Glibc.read(b.rawValue, &peer, 2) == 2 && peer == Array("hi".utf8))
        loop.shutdown(); loop.run()
    }
}
}

extension PlexusTests.HandBackTests {
    /// Reads and writes of a file the readiness engine has seen already skip its general
    /// path (`ReadinessEngine.transferDirectly`); the answers must be the general path's,
    /// which the first operation on the fd still takes. io_uring runs the same operations.
    @Test(arguments: Backends.kinds)
    func operationsOnAKnownFileAnswerAsTheFirstOneDid(_ kind: BackendKind) throws {
        try Harness.run(kind) { h in
            #expect(h.backend.kind == kind)
            let file = try h.temporaryFile(contents: Array("0123456789".utf8))
            // The first operation classifies the fd (fstat); everything after it is direct.
            let first = h.prepare(.read(file.fd, IOBuffer(capacity: 2), offset: 0))
            #expect(try h.waitFor(first).bytes == Array("01".utf8))
            let empty = h.prepare(.read(file.fd, IOBuffer(capacity: 0), offset: 0))
            let negative = h.prepare(.write(file.fd, IOBuffer("x"), offset: -1))
            let atPosition = h.prepare(.read(file.fd, IOBuffer(capacity: 3)))
            let written = h.prepare(.write(file.fd, IOBuffer("AB"), offset: 8))
            try h.waitFor([empty, negative, atPosition, written])
            #expect(h.finals[empty]?.result == -EINVAL)
            #expect(h.finals[negative]?.result == -EINVAL)
            #expect(h.finals[negative]?.bytes == Array("x".utf8), "a refused write keeps its bytes")
            // The file position is untouched by the positional operations: 0.
            #expect(h.finals[atPosition]?.result == 3)
            #expect(h.finals[atPosition]?.bytes == Array("012".utf8))
            #expect(h.finals[written]?.result == 2)
            let reread = h.prepare(.read(file.fd, IOBuffer(capacity: 16), offset: 6))
            #expect(try h.waitFor(reread).bytes == Array("67AB".utf8))
            // A read at the file position goes on from where the last one ended.
            let next = h.prepare(.read(file.fd, IOBuffer(capacity: 2)))
            #expect(try h.waitFor(next).bytes == Array("34".utf8))
            // Closed through Plexus, the fd is forgotten: a read after it is EBADF.
            let close = h.prepare(.close(file.fd))
            #expect(try h.waitFor(close).result == 0)
            h.disown(file.fd)
            let late = h.prepare(.read(file.fd, IOBuffer(capacity: 2), offset: 0))
            #expect(try h.waitFor(late).result == -EBADF)
        }
    }
}
