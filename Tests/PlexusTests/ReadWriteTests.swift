import Glibc
@testable import Plexus
import SystemPackage
import Testing

extension PlexusTests {
    /// nop, read, write, readv and writev on pipes and files, with and without offsets.
    @Suite struct ReadWrite {
        @Test(arguments: Backends.kinds)
        func nop(kind: BackendKind) throws {
            try Harness.run(kind) { h in
                #expect(h.backend.kind == kind)
                let outcomes = try h.waitFor((0..<16).map { _ in h.prepare(.nop) })
                for outcome in outcomes { expectResult(outcome, 0) }
                #expect(h.backend.pendingCount == 0)
                #expect(h.backend.statistics.prepared >= 16)
            }
        }

        @Test(arguments: Backends.kinds)
        func `capabilities say what is native`(kind: BackendKind) throws {
            try Harness.run(kind) { h in
                let native = h.backend.capabilities.contains(.nativeCompletions)
                #expect(native == (kind == .ioUring), "\(kind): \(h.backend.capabilities)")
            }
        }

        @Test(arguments: Backends.kinds)
        func `write then read on a pipe`(kind: BackendKind) throws {
            try Harness.run(kind) { h in
                let pipe = try h.pipe()
                let written = try h.perform(.write(pipe.write, IOBuffer("hello, pipe")))
                expectResult(written, 11)
                #expect(written.bytes == [], "a completed write consumes what it wrote")
                let read = try h.perform(.read(pipe.read, IOBuffer(capacity: 64)))
                expectResult(read, 11)
                #expect(read.string == "hello, pipe")
            }
        }

        @Test(arguments: Backends.kinds)
        func `a pending read completes when data arrives`(kind: BackendKind) throws {
            try Harness.run(kind) { h in
                let pipe = try h.pipe()
                let token = h.prepare(.read(pipe.read, IOBuffer(capacity: 64)))
                try h.submit()
                try h.idle(for: .milliseconds(30))
                #expect(h.isPending(token), "a read on an empty pipe must wait")
                #expect(h.backend.pendingCount == 1)
                h.writeAll(pipe.write, "late")
                let read = try h.waitFor(token)
                expectResult(read, 4)
                #expect(read.string == "late")
            }
        }

        @Test(arguments: Backends.kinds)
        func `a read appends to what the buffer already holds`(kind: BackendKind) throws {
            try Harness.run(kind) { h in
                let pipe = try h.pipe()
                h.writeAll(pipe.write, "cd")
                var buffer = IOBuffer(capacity: 16)
                buffer.append(bytes("ab"))
                let read = try h.perform(.read(pipe.read, buffer))
                expectResult(read, 2)
                #expect(read.string == "abcd")
            }
        }

        @Test(arguments: Backends.kinds)
        func `read at end of file returns 0`(kind: BackendKind) throws {
            try Harness.run(kind) { h in
                let pipe = try h.pipe()
                h.closeNow(pipe.write)
                let read = try h.perform(.read(pipe.read, IOBuffer(capacity: 8)))
                expectResult(read, 0)
                #expect(read.bytes == [])
            }
        }

        @Test(arguments: Backends.kinds)
        func `a short write consumes only what was written`(kind: BackendKind) throws {
            try Harness.run(kind) { h in
                let pipe = try h.pipe()
                let size = 1 << 20  // more than a pipe holds (64 KiB by default)
                let written = try h.perform(.write(pipe.write, IOBuffer(bytes: [UInt8](repeating: 7, count: size))))
                #expect(written.result > 0 && written.result < size, "\(written)")
                #expect(written.bytes?.count == size - Int(max(written.result, 0)))
            }
        }

        @Test(arguments: Backends.kinds)
        func `file reads and writes with offsets`(kind: BackendKind) throws {
            try Harness.run(kind) { h in
                let file = try h.temporaryFile(contents: bytes("0123456789"))
                let middle = try h.perform(.read(file.fd, IOBuffer(capacity: 4), offset: 3))
                expectResult(middle, 4)
                #expect(middle.string == "3456")
                let tail = try h.perform(.read(file.fd, IOBuffer(capacity: 64), offset: 8))
                expectResult(tail, 2)
                #expect(tail.string == "89")
                let past = try h.perform(.read(file.fd, IOBuffer(capacity: 8), offset: 100))
                expectResult(past, 0, "a read past the end is end of file")

                let write = try h.perform(.write(file.fd, IOBuffer("abc"), offset: 10))
                expectResult(write, 3)
                let overwrite = try h.perform(.write(file.fd, IOBuffer("XY"), offset: 0))
                expectResult(overwrite, 2)
                var check = [UInt8](repeating: 0, count: 32)
                let n = check.withUnsafeMutableBytes { pread(file.fd.rawValue, $0.baseAddress, $0.count, 0) }
                #expect(Array(check[0..<max(n, 0)]).text == "XY23456789abc")
            }
        }

        @Test(arguments: Backends.kinds)
        func `reads without an offset use and advance the file position`(kind: BackendKind) throws {
            try Harness.run(kind) { h in
                let file = try h.temporaryFile(contents: bytes("0123456789"))
                let first = try h.perform(.read(file.fd, IOBuffer(capacity: 4)))
                let second = try h.perform(.read(file.fd, IOBuffer(capacity: 4)))
                #expect(first.string == "0123")
                #expect(second.string == "4567")
                // A positional read leaves the position alone.
                _ = try h.perform(.read(file.fd, IOBuffer(capacity: 4), offset: 0))
                let third = try h.perform(.read(file.fd, IOBuffer(capacity: 4)))
                #expect(third.string == "89")
            }
        }

        @Test(arguments: Backends.kinds)
        func `readv and writev on a pipe`(kind: BackendKind) throws {
            try Harness.run(kind) { h in
                let pipe = try h.pipe()
                var out = IOVector(capacity: 3)
                out.append(IOBuffer("ab"))
                out.append(IOBuffer("cde"))
                out.append(IOBuffer("f"))
                let written = try h.perform(.writev(pipe.write, out))
                expectResult(written, 6)
                #expect(written.vectorBytes == [[], [], []], "writev consumes every buffer it wrote")

                var into = IOVector(capacity: 2)
                into.append(IOBuffer(capacity: 4))
                into.append(IOBuffer(capacity: 4))
                let read = try h.perform(.readv(pipe.read, into))
                expectResult(read, 6)
                #expect(read.vectorBytes?.map(\.text) == ["abcd", "ef"])
            }
        }

        @Test(arguments: Backends.kinds)
        func `readv and writev on a file with offsets`(kind: BackendKind) throws {
            try Harness.run(kind) { h in
                let file = try h.temporaryFile(contents: bytes("0123456789"))
                var into = IOVector(capacity: 2)
                into.append(IOBuffer(capacity: 3))
                into.append(IOBuffer(capacity: 4))
                let read = try h.perform(.readv(file.fd, into, offset: 2))
                expectResult(read, 7)
                #expect(read.vectorBytes?.map(\.text) == ["234", "5678"])

                var out = IOVector(capacity: 2)
                out.append(IOBuffer("AB"))
                out.append(IOBuffer("CD"))
                expectResult(try h.perform(.writev(file.fd, out, offset: 8)), 4)
                var check = [UInt8](repeating: 0, count: 32)
                let n = check.withUnsafeMutableBytes { pread(file.fd.rawValue, $0.baseAddress, $0.count, 0) }
                #expect(Array(check[0..<max(n, 0)]).text == "01234567ABCD")
            }
        }

        @Test(arguments: Backends.kinds)
        func `a huge buffer is capped, not refused`(kind: BackendKind) throws {
            try Harness.run(kind) { h in
                let pipe = try h.pipe()
                h.writeAll(pipe.write, "small")
                // 256 MiB of address space; only the pages the kernel writes get touched.
                let read = try h.perform(.read(pipe.read, IOBuffer(capacity: 256 << 20)))
                expectResult(read, 5)
                #expect(read.string == "small")
            }
        }
    }
}
