import CPlexus
import Glibc
import SystemPackage

/// An open file on a loop: positional reads and writes, readv/writev, fsync, close.
///
/// Opened through the loop (openat with O_CLOEXEC). An offset of nil reads or writes at
/// the file position (for pipes, ttys and stdin). Callback methods: loop thread; async: any task.
public struct File: Sendable {
    public let fd: FileDescriptor
    public let loop: EventLoop

    /// Wraps an fd the caller opened (stdin: `File(fd: .standardInput, loop: loop)`).
    public init(fd: FileDescriptor, loop: EventLoop) {
        self.fd = fd
        self.loop = loop
    }

    /// How a file is opened: O_RDONLY, O_WRONLY or O_RDWR.
    public enum Access: Sendable {
        case readOnly, writeOnly, readWrite
        var flags: Int32 {
            switch self {
            case .readOnly: O_RDONLY
            case .writeOnly: O_WRONLY
            case .readWrite: O_RDWR
            }
        }
    }

    /// Extra open(2) flags.
    public struct Options: OptionSet, Sendable {
        public let rawValue: Int32
        public init(rawValue: Int32) { self.rawValue = rawValue }
        public static let create = Options(rawValue: O_CREAT)
        public static let truncate = Options(rawValue: O_TRUNC)
        public static let append = Options(rawValue: O_APPEND)
        /// With `.create`: fail with EEXIST if the file exists.
        public static let exclusive = Options(rawValue: O_EXCL)
        public static let dataSync = Options(rawValue: O_DSYNC)
        public static let noFollow = Options(rawValue: O_NOFOLLOW)
    }

    // MARK: Callbacks (loop thread)

    /// openat(2) with O_CLOEXEC.
    @discardableResult
    public static func open(_ path: FilePath, _ access: Access = .readOnly, options: Options = [], mode: mode_t = 0o644,
                            on loop: EventLoop, _ callback: @escaping (Result<File, PlexusError>) throws -> Void) -> Token {
        loop.open(path, flags: access.flags | options.rawValue, mode: mode) { result in
            try callback(result.map { File(fd: $0, loop: loop) })
        }
    }

    /// pread(2) (read(2) when `offset` is nil) into the spare capacity; 0 is end of file.
    @discardableResult
    public func read(into buffer: consuming IOBuffer, at offset: Int64?,
                     _ callback: @escaping (Result<Int, PlexusError>, consuming IOBuffer) throws -> Void) -> Token {
        loop.read(fd, buffer, offset: offset, callback)
    }

    /// pwrite(2) (write(2) when `offset` is nil) of the readable bytes; may be short.
    @discardableResult
    public func write(_ buffer: consuming IOBuffer, at offset: Int64?,
                      _ callback: @escaping (Result<Int, PlexusError>, consuming IOBuffer) throws -> Void) -> Token {
        loop.write(fd, buffer, offset: offset, callback)
    }

    /// Writes every readable byte from `offset` on, resubmitting after short writes.
    public func writeAll(_ buffer: consuming IOBuffer, at offset: Int64?,
                         _ callback: @escaping (Result<Int, PlexusError>, consuming IOBuffer) throws -> Void) {
        Self.writeAll(loop, fd, buffer, offset: offset, written: 0, callback)
    }

    private static func writeAll(_ loop: EventLoop, _ fd: FileDescriptor, _ buffer: consuming IOBuffer, offset: Int64?,
                                 written: Int, _ callback: @escaping (Result<Int, PlexusError>, consuming IOBuffer) throws -> Void) {
        loop.write(fd, buffer, offset: offset) { result, buffer in
            switch result {
            case .success(let n) where n > 0 && !buffer.isEmpty:
                writeAll(loop, fd, buffer, offset: offset.map { $0 + Int64(n) }, written: written + n, callback)
            case .success(let n):
                try callback(.success(written + n), buffer)
            case .failure(let error) where error.errno == .invalidArgument && buffer.isEmpty && (offset ?? 0) >= 0:
                // Nothing to write (a write of no bytes is EINVAL): done, as the async writeAll is.
                try callback(.success(written), buffer)
            case .failure(let error):
                try callback(.failure(error), buffer)
            }
        }
    }

    /// preadv(2) (readv(2) when `offset` is nil).
    @discardableResult
    public func readv(into vector: consuming IOVector, at offset: Int64?,
                      _ callback: @escaping (Result<Int, PlexusError>, consuming IOVector) throws -> Void) -> Token {
        loop.readv(fd, vector, offset: offset, callback)
    }

    /// pwritev(2) (writev(2) when `offset` is nil); may be short.
    @discardableResult
    public func writev(_ vector: consuming IOVector, at offset: Int64?,
                       _ callback: @escaping (Result<Int, PlexusError>, consuming IOVector) throws -> Void) -> Token {
        loop.writev(fd, vector, offset: offset, callback)
    }

    /// fsync(2), or fdatasync(2) when `dataOnly`.
    @discardableResult
    public func sync(dataOnly: Bool = false, _ callback: @escaping (Result<Void, PlexusError>) throws -> Void) -> Token {
        loop.fsync(fd, dataOnly: dataOnly, callback)
    }

    /// Cancels pending operations on the file, then closes it.
    @discardableResult
    public func close(_ callback: @escaping (Result<Void, PlexusError>) throws -> Void = { _ in }) -> Token {
        loop.close(fd, callback)
    }

    // MARK: Async

    /// openat(2) with O_CLOEXEC.
    public static func open(_ path: FilePath, _ access: Access = .readOnly, options: Options = [], mode: mode_t = 0o644,
                            on loop: EventLoop) async throws -> File {
        File(fd: try await loop.open(path, flags: access.flags | options.rawValue, mode: mode), loop: loop)
    }

    /// pread(2) (read(2) when `offset` is nil) into the spare capacity; 0 is end of file.
    public func read(into buffer: consuming IOBuffer, at offset: Int64?) async throws -> Transfer {
        try await loop.read(fd, into: buffer, offset: offset)
    }

    /// pwrite(2) (write(2) when `offset` is nil); may be short.
    public func write(_ buffer: consuming IOBuffer, at offset: Int64?) async throws -> Transfer {
        try await loop.write(fd, buffer, offset: offset)
    }

    /// Writes every readable byte from `offset` on; returns the emptied buffer.
    public func writeAll(_ buffer: consuming IOBuffer, at offset: Int64?) async throws -> IOBuffer {
        try await loop.writeAll(fd, buffer, offset: offset)
    }

    /// preadv(2) (readv(2) when `offset` is nil).
    public func readv(into vector: consuming IOVector, at offset: Int64?) async throws -> VectorTransfer {
        try await loop.readv(fd, into: vector, offset: offset)
    }

    /// pwritev(2) (writev(2) when `offset` is nil); may be short.
    public func writev(_ vector: consuming IOVector, at offset: Int64?) async throws -> VectorTransfer {
        try await loop.writev(fd, vector, offset: offset)
    }

    /// fsync(2), or fdatasync(2) when `dataOnly`.
    public func sync(dataOnly: Bool = false) async throws {
        try await loop.fsync(fd, dataOnly: dataOnly)
    }

    /// Cancels pending operations on the file, then closes it.
    public func close() async throws {
        try await loop.close(fd)
    }

    /// The file's size (fstat(2); synchronous, never blocks on I/O).
    public func size() throws(PlexusError) -> Int64 {
        var st = stat()
        guard fstat(fd.rawValue, &st) == 0 else { throw Socket.error("fstat") }
        return Int64(st.st_size)
    }
}

extension IOBuffer {
    /// Moves the readable bytes to the front, so the spare capacity is everything after
    /// them (for a parser that keeps a partial message and reads more behind it).
    public mutating func compact() {
        let start = readerIndex
        let n = count
        guard start > 0 else { return }
        clear()
        appendUnsafe { spare in
            // After clear() the spare region starts at the buffer's base, where the readable
            // bytes still lie at `start`: memmove handles the overlap.
            memmove(spare.baseAddress!, spare.baseAddress! + start, n)
            return n
        }
    }

    /// A buffer of `capacity` (at least `count`) holding a copy of the readable bytes.
    public func copy(capacity: Int) -> IOBuffer {
        var other = IOBuffer(capacity: Swift.max(capacity, count))
        withUnsafeBytes { bytes in
            other.appendUnsafe { spare in
                spare.copyMemory(from: bytes)
                return bytes.count
            }
        }
        return other
    }
}
