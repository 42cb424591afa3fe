import CPlexus
import Glibc
import Plexus
import SystemPackage

// 4 KiB reads at random 4 KiB-aligned offsets of a page-cached 8 MiB temp file, `depth`
// reads per submission (file-qd1, file-qd32). The file is written just before the run
// (so it is in the page cache) and unlinked at once. Every 8-byte word of the file holds
// its own offset, so each read is checked. The offsets come from a fixed xorshift
// sequence, the same for every variant.
//
// Plexus:
//   raw       `depth` × backend.prepare(.read(fd, buffer, offset:)), wait for `depth` completions.
//   callback  `depth` × loop.read(fd, buffer, offset:) { }, loop.runOnce until all ran.
// Baselines:
//   raw-io_uring  `depth` × io_uring_prep_read, one io_uring_submit_and_wait(depth), reap.
//   raw-epoll     a regular file is always "ready" (epoll rejects it, poll reports it
//   raw-poll      readable), so a readiness loop just calls pread(2) `depth` times; both
//                 baselines are that plain pread loop.
// Checked: each read returns 4096 bytes whose first and last words are the offset read.

let fileBlockSize = 4096
let fileBlocks = 2048  // 8 MiB

/// The temp file, open for reading and writing, already unlinked.
func makeBenchmarkFile() throws -> Int32 {
    let directory = plexus_secure_getenv("TMPDIR").map { String(cString: $0) } ?? "/tmp"
    var template = Array("\(directory)/plexus-bench-XXXXXX".utf8CString)
    let fd = try template.withUnsafeMutableBufferPointer { try check(mkstemp($0.baseAddress!), "mkstemp") }
    template.withUnsafeBufferPointer { _ = unlink($0.baseAddress!) }
    _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
    let block = UnsafeMutableRawPointer.allocate(byteCount: fileBlockSize, alignment: 64)
    defer { block.deallocate() }
    for b in 0..<fileBlocks {
        for w in 0..<(fileBlockSize / 8) {
            block.storeBytes(of: UInt64(b * fileBlockSize + w * 8), toByteOffset: w * 8, as: UInt64.self)
        }
        let n = pwrite(fd, block, fileBlockSize, off_t(b * fileBlockSize))
        if n != fileBlockSize { Glibc.close(fd); throw BenchmarkError.system("pwrite") }
    }
    return fd
}

@inline(__always)
func checkFileBlock(_ p: UnsafeRawPointer, count: Int, offset: Int64) throws {
    guard count == fileBlockSize,
          p.load(as: UInt64.self) == UInt64(offset),
          p.load(fromByteOffset: fileBlockSize - 8, as: UInt64.self) == UInt64(offset) + UInt64(fileBlockSize - 8)
    else { throw BenchmarkError.wrong("read of \(count) bytes at offset \(offset) does not hold that offset") }
}

func makeFileBody(_ c: BenchmarkCase, depth: Int) throws -> BenchmarkBody {
    let fd = try makeBenchmarkFile()
    do {
        switch (c.backend, c.adapter) {
        case (.rawIoUring, _): return try RawURingFileRead(fd: fd, depth: depth)
        case (.rawEpoll, _), (.rawPoll, _): return RawPreadFileRead(fd: fd, depth: depth)
        case (_, .raw): return BackendFileRead(fd: fd, depth: depth, backend: try startBackend(c.backend))
        default: return try LoopFileRead(fd: fd, depth: depth, choice: c.backend.choice!)
        }
    } catch {
        Glibc.close(fd)
        throw error
    }
}

/// The fd, the offsets and the count every file body shares.
class FileReadState {
    let fd: Int32
    let depth: Int
    let offsets: [Int64]
    @exclusivity(unchecked) var next = 0
    @exclusivity(unchecked) var reads = 0

    init(file fd: Int32, depth: Int) {
        self.fd = fd
        self.depth = depth
        var random = XorShift(state: 0x9E37_79B9_7F4A_7C15)
        offsets = (0..<4096).map { _ in Int64(random.next() % UInt64(fileBlocks)) * Int64(fileBlockSize) }
    }

    @inline(__always)
    func nextOffset() -> Int64 {
        let offset = offsets[next]
        next = (next + 1) & (offsets.count - 1)
        return offset
    }
}

final class RawURingFileRead: FileReadState, BenchmarkBody {
    let ring: RawRing
    let buffers: UnsafeMutableRawPointer
    let slotOffsets: UnsafeMutablePointer<Int64>

    init(fd: Int32, depth: Int) throws {
        ring = try RawRing()
        buffers = .allocate(byteCount: depth * fileBlockSize, alignment: 4096)
        slotOffsets = .allocate(capacity: depth)
        super.init(file: fd, depth: depth)
    }

    deinit {
        buffers.deallocate()
        slotOffsets.deallocate()
    }

    func step() throws -> Int {
        for slot in 0..<depth {
            let offset = nextOffset()
            slotOffsets[slot] = offset
            let sqe = ring.sqe()
            io_uring_prep_read(sqe, fd, buffers + slot * fileBlockSize, UInt32(fileBlockSize), UInt64(offset))
            io_uring_sqe_set_data64(sqe, UInt64(slot))
        }
        try ring.submitAndWait(UInt32(depth))
        var n = 0
        while n < depth {
            n += try ring.reap { slot, res in
                try checkFileBlock(buffers + Int(slot) * fileBlockSize, count: Int(res), offset: slotOffsets[Int(slot)])
            }
            if n < depth { try ring.submitAndWait(1) }
        }
        reads += n
        return n
    }

    func finish() throws { Glibc.close(fd) }
}

final class RawPreadFileRead: FileReadState, BenchmarkBody {
    let buffers: UnsafeMutableRawPointer

    init(fd: Int32, depth: Int) {
        buffers = .allocate(byteCount: depth * fileBlockSize, alignment: 4096)
        super.init(file: fd, depth: depth)
    }

    deinit { buffers.deallocate() }

    func step() throws -> Int {
        for slot in 0..<depth {
            let offset = nextOffset()
            let buffer = buffers + slot * fileBlockSize
            let n = pread(fd, buffer, fileBlockSize, off_t(offset))
            try checkFileBlock(buffer, count: n, offset: offset)
        }
        reads += depth
        return depth
    }

    func finish() throws { Glibc.close(fd) }
}

final class BackendFileRead: FileReadState, BenchmarkBody {
    let backend: any IOBackend
    let buffers: UnsafeMutablePointer<IOBuffer?>
    let slotOffsets: UnsafeMutablePointer<Int64>
    /// Per token index: the slot.
    @exclusivity(unchecked) var slots: [Int] = Array(repeating: -1, count: 256)

    init(fd: Int32, depth: Int, backend: any IOBackend) {
        self.backend = backend
        buffers = .allocate(capacity: depth)
        for slot in 0..<depth { (buffers + slot).initialize(to: IOBuffer(capacity: fileBlockSize)) }
        slotOffsets = .allocate(capacity: depth)
        super.init(file: fd, depth: depth)
    }

    deinit {
        slotOffsets.deallocate()
        buffers.deinitialize(count: depth)
        buffers.deallocate()
    }

    func step() throws -> Int {
        let file = FileDescriptor(rawValue: fd)
        for slot in 0..<depth {
            let offset = nextOffset()
            slotOffsets[slot] = offset
            let token = backend.prepare(.read(file, buffers[slot].take()!, offset: offset))
            if token.index >= slots.count { slots.append(contentsOf: repeatElement(-1, count: token.index + 1 - slots.count + 256)) }
            slots[token.index] = slot
        }
        var n = 0
        var failure: (any Error)?
        while n < depth {
            try backend.wait(timeout: nil) { completion in
                var completion = completion
                let slot = slots[completion.token.index]
                let result = completion.result
                var buffer = completion.takeBuffer()!
                do {
                    try buffer.withUnsafeBytes { try checkFileBlock($0.baseAddress!, count: Int(result), offset: slotOffsets[slot]) }
                } catch { failure = failure ?? error }
                buffer.clear()
                buffers[slot] = consume buffer
                n += 1
            }
        }
        if let failure { throw failure }
        reads += n
        return n
    }

    func finish() throws {
        Glibc.close(fd)
        if backend.pendingCount != 0 { throw BenchmarkError.wrong("\(backend.pendingCount) reads still pending") }
    }
}

/// One read slot of the callback variant: its callback captures only this object.
final class LoopFileSlot {
    let tally: LoopFileTally
    @exclusivity(unchecked) var buffer: IOBuffer? = IOBuffer(capacity: fileBlockSize)
    @exclusivity(unchecked) var offset: Int64 = 0

    init(tally: LoopFileTally) { self.tally = tally }

    func done(_ result: Result<Int, PlexusError>, _ buffer: consuming IOBuffer) {
        do {
            guard case .success(let n) = result else { throw BenchmarkError.wrong("read: \(result)") }
            let offset = offset
            try buffer.withUnsafeBytes { try checkFileBlock($0.baseAddress!, count: n, offset: offset) }
        } catch { tally.failure = tally.failure ?? error }
        buffer.clear()
        self.buffer = consume buffer
        tally.completed += 1
    }
}

final class LoopFileTally {
    @exclusivity(unchecked) var completed = 0
    @exclusivity(unchecked) var failure: (any Error)?
}

final class LoopFileRead: FileReadState, BenchmarkBody {
    let loop: EventLoop
    let tally = LoopFileTally()
    let slots: [LoopFileSlot]

    init(fd: Int32, depth: Int, choice: BackendChoice) throws {
        loop = try EventLoop(backend: choice)
        slots = (0..<depth).map { [tally] _ in LoopFileSlot(tally: tally) }
        super.init(file: fd, depth: depth)
    }

    func step() throws -> Int {
        let file = FileDescriptor(rawValue: fd)
        let target = tally.completed + depth
        for slot in slots {
            slot.offset = nextOffset()
            loop.read(file, slot.buffer.take()!, offset: slot.offset) { [slot] result, buffer in slot.done(result, buffer) }
        }
        while tally.completed < target { loop.runOnce(timeout: nil) }
        if let failure = tally.failure { throw failure }
        reads += depth
        return depth
    }

    func finish() throws {
        loop.shutdown()
        loop.run()
        Glibc.close(fd)
    }
}
