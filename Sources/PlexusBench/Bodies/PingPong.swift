import CPlexus
import Glibc
import Plexus
import SystemPackage

// Pipe ping-pong on one thread. One round trip: a read of up to 64 bytes is waiting on
// the empty pipe, 1 byte is written, the read returns that byte.
//
// Plexus (in the order a peer waiting for a message issues them):
//   raw       backend.prepare(.read(r)), backend.prepare(.write(w, 1 byte)), wait for both.
//   callback  loop.read(r) { }, loop.write(w) { }, loop.runOnce until both callbacks ran.
// Every Plexus row's pipe is O_NONBLOCK, as a loop's user makes it (one pipe kind for
// io_uring and epoll; see `BackendName.wantsNonBlockingPipe`).
// Baselines:
//   raw-io_uring  READ sqe then WRITE sqe, one io_uring_submit_and_wait(2): the read meets the
//                 empty pipe first, as it does through the backend (blocking pipe: the kernel
//                 parks the read in its own poll and completes it once, on every kernel).
//   raw-epoll     the read end is registered once (level-triggered); write(2), epoll_wait
//                 until readable, read(2): a readiness loop need not try the read before the
//                 data is there (non-blocking pipe).
//   raw-poll      write(2), poll on the read end, read(2) (non-blocking pipe).
// Checked: each read returns exactly the byte just written.

func makePingPongBody(_ c: BenchmarkCase) throws -> BenchmarkBody {
    let pipe = try makePipe(nonBlocking: c.backend.wantsNonBlockingPipe)
    do {
        switch (c.backend, c.adapter) {
        case (.rawIoUring, _): return try RawURingPingPong(pipe)
        case (.rawEpoll, _), (.rawPoll, _): return try RawReadinessPingPong(pipe, epoll: c.backend == .rawEpoll)
        case (_, .raw): return BackendPingPong(pipe, backend: try startBackend(c.backend))
        default: return try LoopPingPong(pipe, choice: c.backend.choice!)
        }
    } catch {
        Glibc.close(pipe.read)
        Glibc.close(pipe.write)
        throw error
    }
}

/// What every ping-pong body checks and owns.
class PingPongState {
    let readFD: Int32
    let writeFD: Int32
    @exclusivity(unchecked) var sequence: UInt8 = 0
    @exclusivity(unchecked) var roundTrips = 0

    init(pipe: (read: Int32, write: Int32)) {
        readFD = pipe.read
        writeFD = pipe.write
    }

    @inline(__always)
    func check(read count: Int, byte: UInt8) throws {
        guard count == 1, byte == sequence else {
            throw BenchmarkError.wrong("round trip \(roundTrips): read \(count) byte(s) \(byte), expected 1 byte \(sequence)")
        }
        roundTrips += 1
        sequence &+= 1
    }

    func closeFDs() {
        Glibc.close(readFD)
        Glibc.close(writeFD)
    }
}

final class RawURingPingPong: PingPongState, BenchmarkBody {
    let ring: RawRing
    let readBuffer = UnsafeMutableRawPointer.allocate(byteCount: 64, alignment: 64)
    let writeBuffer = UnsafeMutableRawPointer.allocate(byteCount: 64, alignment: 64)

    init(_ pipe: (read: Int32, write: Int32)) throws {
        ring = try RawRing()
        super.init(pipe: pipe)
    }

    deinit {
        readBuffer.deallocate()
        writeBuffer.deallocate()
    }

    func step() throws -> Int {
        let read = ring.sqe()
        io_uring_prep_read(read, readFD, readBuffer, 64, UInt64.max)  // -1: the file position
        io_uring_sqe_set_data64(read, 1)
        writeBuffer.storeBytes(of: sequence, as: UInt8.self)
        let write = ring.sqe()
        io_uring_prep_write(write, writeFD, writeBuffer, 1, UInt64.max)
        io_uring_sqe_set_data64(write, 2)
        var readResult: Int32 = -1
        var writeResult: Int32 = -1
        var n = 0
        try ring.submitAndWait(2)
        while n < 2 {
            n += ring.reap { data, res in if data == 1 { readResult = res } else { writeResult = res } }
            if n < 2 { try ring.submitAndWait(1) }
        }
        if writeResult != 1 { throw BenchmarkError.wrong("write returned \(writeResult)") }
        try check(read: Int(readResult), byte: readBuffer.load(as: UInt8.self))
        return 1
    }

    func finish() throws { closeFDs() }
}

final class RawReadinessPingPong: PingPongState, BenchmarkBody {
    let epoll: RawEpoll?
    let poll: RawPoll?
    @exclusivity(unchecked) var byte: UInt8 = 0
    let readBuffer = UnsafeMutableRawPointer.allocate(byteCount: 64, alignment: 64)

    init(_ pipe: (read: Int32, write: Int32), epoll useEpoll: Bool) throws {
        if useEpoll {
            epoll = try RawEpoll()
            poll = nil
            try epoll!.add(pipe.read, data: 1)
        } else {
            epoll = nil
            poll = RawPoll(capacity: 1)
            poll!.add(pipe.read)
        }
        super.init(pipe: pipe)
    }

    deinit { readBuffer.deallocate() }

    func step() throws -> Int {
        var out = sequence
        guard Glibc.write(writeFD, &out, 1) == 1 else { throw BenchmarkError.system("write") }
        var ready = 0
        while ready == 0 { ready = try epoll?.wait() ?? poll!.wait() }
        let n = Glibc.read(readFD, readBuffer, 64)
        try check(read: n, byte: readBuffer.load(as: UInt8.self))
        return 1
    }

    func finish() throws { closeFDs() }
}

final class BackendPingPong: PingPongState, BenchmarkBody {
    let backend: any IOBackend
    @exclusivity(unchecked) var readBuffer: IOBuffer? = IOBuffer(capacity: 64)
    @exclusivity(unchecked) var writeBuffer: IOBuffer? = IOBuffer(capacity: 64)

    init(_ pipe: (read: Int32, write: Int32), backend: any IOBackend) {
        self.backend = backend
        super.init(pipe: pipe)
    }

    func step() throws -> Int {
        var out = writeBuffer.take()!
        let byte = sequence
        out.appendUnsafe { $0[0] = byte; return 1 }
        _ = backend.prepare(.read(FileDescriptor(rawValue: readFD), readBuffer.take()!))
        _ = backend.prepare(.write(FileDescriptor(rawValue: writeFD), out))
        var readResult: Int32 = -1
        var writeResult: Int32 = -1
        var finals = 0
        while finals < 2 {
            try backend.wait(timeout: nil) { completion in
                var completion = completion
                let isRead = completion.kind == .read
                if isRead { readResult = completion.result } else { writeResult = completion.result }
                readOrWrite(isRead, completion.takeBuffer()!)
                finals += 1
            }
        }
        if writeResult != 1 { throw BenchmarkError.wrong("write returned \(writeResult)") }
        let got = readBuffer!.withUnsafeBytes { $0.first ?? 0 }
        readBuffer!.clear()
        try check(read: Int(readResult), byte: got)
        return 1
    }

    @inline(__always)
    private func readOrWrite(_ isRead: Bool, _ buffer: consuming IOBuffer) {
        if isRead { readBuffer = consume buffer } else { writeBuffer = consume buffer }
    }

    func finish() throws {
        closeFDs()
        if backend.pendingCount != 0 { throw BenchmarkError.wrong("\(backend.pendingCount) operations still pending") }
    }
}

final class LoopPingPong: PingPongState, BenchmarkBody {
    let loop: EventLoop
    @exclusivity(unchecked) var readBuffer: IOBuffer? = IOBuffer(capacity: 64)
    @exclusivity(unchecked) var writeBuffer: IOBuffer? = IOBuffer(capacity: 64)
    @exclusivity(unchecked) var readResult: Result<Int, PlexusError>?
    @exclusivity(unchecked) var writeResult: Result<Int, PlexusError>?

    init(_ pipe: (read: Int32, write: Int32), choice: BackendChoice) throws {
        loop = try EventLoop(backend: choice)
        super.init(pipe: pipe)
    }

    func onRead(_ result: Result<Int, PlexusError>, _ buffer: consuming IOBuffer) {
        readResult = result
        readBuffer = consume buffer
    }

    func onWrite(_ result: Result<Int, PlexusError>, _ buffer: consuming IOBuffer) {
        writeResult = result
        writeBuffer = consume buffer
    }

    func step() throws -> Int {
        var out = writeBuffer.take()!
        let byte = sequence
        out.appendUnsafe { $0[0] = byte; return 1 }
        readResult = nil
        writeResult = nil
        // Each callback captures one reference: no allocation.
        loop.read(FileDescriptor(rawValue: readFD), readBuffer.take()!) { [self] result, buffer in onRead(result, buffer) }
        loop.write(FileDescriptor(rawValue: writeFD), out) { [self] result, buffer in onWrite(result, buffer) }
        while readResult == nil || writeResult == nil { loop.runOnce(timeout: nil) }
        guard case .success(1) = writeResult! else { throw BenchmarkError.wrong("write: \(writeResult!)") }
        let count: Int
        switch readResult! {
        case .success(let n): count = n
        case .failure(let error): throw BenchmarkError.wrong("read: \(error)")
        }
        let got = readBuffer!.withUnsafeBytes { $0.first ?? 0 }
        readBuffer!.clear()
        try check(read: count, byte: got)
        return 1
    }

    func finish() throws {
        loop.shutdown()
        loop.run()
        closeFDs()
    }
}
