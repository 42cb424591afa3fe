import Glibc
import SystemPackage

/// The callback adapter: every operation as `loop.op(...) { result in }`.
///
/// Call these on the loop thread (from a callback, or inside `execute { }`); callbacks
/// run on the loop thread. A callback runs exactly once per operation (multishot ones
/// once per result, the last with `isFinal`), and buffers come back through it. A
/// callback that throws reports to `errorHandler` with its operation; the loop goes on.
/// Each returns the operation's token, for `cancel`.
extension EventLoop {
    /// Any operation, with the raw completion.
    @discardableResult
    public func submit(_ operation: consuming Operation, _ callback: consuming @escaping (consuming Completion) throws -> Void) -> Token {
        submit(operation, .completion(callback))
    }

    /// IORING_OP_NOP: completes with 0.
    @discardableResult
    public func nop(_ callback: consuming @escaping (Result<Int, PlexusError>) throws -> Void) -> Token {
        submit(.nop, .count(callback))
    }

    /// read(2)/pread(2) into `buffer`'s spare capacity; the count read, and the buffer back.
    @discardableResult
    public func read(_ fd: FileDescriptor, _ buffer: consuming IOBuffer, offset: Int64? = nil,
                     _ callback: consuming @escaping (Result<Int, PlexusError>, consuming IOBuffer) throws -> Void) -> Token {
        submit(.read, fd, buffer, offset: offset, .buffer(callback))
    }

    /// write(2)/pwrite(2) of `buffer`'s readable bytes; the count written (consumed from the buffer).
    @discardableResult
    public func write(_ fd: FileDescriptor, _ buffer: consuming IOBuffer, offset: Int64? = nil,
                      _ callback: consuming @escaping (Result<Int, PlexusError>, consuming IOBuffer) throws -> Void) -> Token {
        submit(.write, fd, buffer, offset: offset, .buffer(callback))
    }

    /// readv(2)/preadv(2).
    @discardableResult
    public func readv(_ fd: FileDescriptor, _ vector: consuming IOVector, offset: Int64? = nil,
                      _ callback: consuming @escaping (Result<Int, PlexusError>, consuming IOVector) throws -> Void) -> Token {
        submit(.readv(fd, vector, offset: offset), .vector(callback))
    }

    /// writev(2)/pwritev(2).
    @discardableResult
    public func writev(_ fd: FileDescriptor, _ vector: consuming IOVector, offset: Int64? = nil,
                       _ callback: consuming @escaping (Result<Int, PlexusError>, consuming IOVector) throws -> Void) -> Token {
        submit(.writev(fd, vector, offset: offset), .vector(callback))
    }

    /// send(2) with MSG_NOSIGNAL.
    @discardableResult
    public func send(_ fd: FileDescriptor, _ buffer: consuming IOBuffer, flags: Int32 = 0,
                     _ callback: consuming @escaping (Result<Int, PlexusError>, consuming IOBuffer) throws -> Void) -> Token {
        submit(.send, fd, buffer, flags: flags, .buffer(callback))
    }

    /// recv(2).
    @discardableResult
    public func recv(_ fd: FileDescriptor, _ buffer: consuming IOBuffer, flags: Int32 = 0,
                     _ callback: consuming @escaping (Result<Int, PlexusError>, consuming IOBuffer) throws -> Void) -> Token {
        submit(.recv, fd, buffer, flags: flags, .buffer(callback))
    }

    /// sendmsg(2).
    @discardableResult
    public func sendMessage(_ fd: FileDescriptor, _ message: consuming Message, flags: Int32 = 0,
                            _ callback: consuming @escaping (Result<Int, PlexusError>, consuming Message) throws -> Void) -> Token {
        submit(.sendMessage(fd, message, flags: flags), .message(callback))
    }

    /// recvmsg(2); the message comes back with the sender's address.
    @discardableResult
    public func receiveMessage(_ fd: FileDescriptor, _ message: consuming Message, flags: Int32 = 0,
                               _ callback: consuming @escaping (Result<Int, PlexusError>, consuming Message) throws -> Void) -> Token {
        submit(.receiveMessage(fd, message, flags: flags), .message(callback))
    }

    /// accept4(2): one connection (CLOEXEC, non-blocking).
    @discardableResult
    public func accept(_ fd: FileDescriptor, _ callback: consuming @escaping (Result<FileDescriptor, PlexusError>) throws -> Void) -> Token {
        submit(.accept(fd), .descriptor(callback))
    }

    /// Multishot accept: the callback runs once per connection until `cancel` or an error.
    @discardableResult
    public func acceptMultishot(_ fd: FileDescriptor,
                                _ callback: consuming @escaping (Result<FileDescriptor, PlexusError>) throws -> Void) -> Token {
        submit(.accept(fd, multishot: true), .descriptor(callback))
    }

    /// connect(2).
    @discardableResult
    public func connect(_ fd: FileDescriptor, to address: SocketAddress,
                        _ callback: consuming @escaping (Result<Void, PlexusError>) throws -> Void) -> Token {
        submit(.connect(fd, address), .done(callback))
    }

    /// Readiness: the ready events, once (or on every readiness with `multishot`).
    @discardableResult
    public func poll(_ fd: FileDescriptor, _ events: PollEvents, multishot: Bool = false,
                     _ callback: consuming @escaping (Result<PollEvents, PlexusError>) throws -> Void) -> Token {
        submit(.poll(fd, events, multishot: multishot), .events(callback))
    }

    /// A timeout as a backend operation (IORING_OP_TIMEOUT; the timer heap on epoll and
    /// poll). For many timers, `schedule(after:)` is cheaper.
    @discardableResult
    public func timeout(_ duration: Duration, _ callback: consuming @escaping (Result<Void, PlexusError>) throws -> Void) -> Token {
        submit(.timeout(duration), .done(callback))
    }

    /// Cancels the fd's pending operations (each reports -ECANCELED), then close(2).
    @discardableResult
    public func close(_ fd: FileDescriptor, _ callback: consuming @escaping (Result<Void, PlexusError>) throws -> Void) -> Token {
        submit(.close(fd), .done(callback))
    }

    /// openat(2) with O_CLOEXEC.
    @discardableResult
    public func open(_ path: FilePath, flags: Int32, mode: mode_t = 0o644, directory: FileDescriptor? = nil,
                     _ callback: consuming @escaping (Result<FileDescriptor, PlexusError>) throws -> Void) -> Token {
        submit(.open(path, flags: flags, mode: mode, directory: directory), .descriptor(callback))
    }

    /// fsync(2) or fdatasync(2).
    @discardableResult
    public func fsync(_ fd: FileDescriptor, dataOnly: Bool = false,
                      _ callback: consuming @escaping (Result<Void, PlexusError>) throws -> Void) -> Token {
        submit(.fsync(fd, dataOnly: dataOnly), .done(callback))
    }

    /// shutdown(2).
    @discardableResult
    public func shutdown(_ fd: FileDescriptor, how: Int32,
                         _ callback: consuming @escaping (Result<Void, PlexusError>) throws -> Void) -> Token {
        submit(.shutdown(fd, how: how), .done(callback))
    }
}
