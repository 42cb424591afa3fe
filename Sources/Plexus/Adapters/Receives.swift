import Glibc
import SystemPackage

extension EventLoop {
    /// Registers a buffer group on this loop's backend (see `BufferGroup`).
    public func registerBuffers(count: Int, size: Int) throws(PlexusError) -> BufferGroup {
        assertInLoop()
        return try backend.registerBuffers(count: count, size: size)
    }

    /// Gives buffer `id` of `group` back to the backend after its bytes were read.
    public func recycle(_ group: BufferGroup, id: UInt16) {
        assertInLoop()
        backend.recycle(group, id: id)
    }

    /// Multishot receive: the callback runs once per chunk with its byte count and the
    /// buffer of `group` that holds it (read it, then `recycle` it), and a last time with
    /// 0 (end of file), an error, or -ECANCELED.
    @discardableResult
    public func receiveMultishot(_ fd: FileDescriptor, into group: BufferGroup,
                                 _ callback: @escaping (consuming Completion) throws -> Void) -> Token {
        submit(.receiveMultishot(fd, group), .completion(callback))
    }

    /// What arrives on a stream socket, chunk by chunk, as an `AsyncSequence`:
    /// `for try await chunk in loop.receives(fd) { ... }`; the sequence ends at end of file.
    ///
    /// One multishot receive fills a group of `bufferCount` buffers of `bufferSize` bytes
    /// (a provided buffer ring on io_uring, emulated on epoll and poll). A buffer goes back
    /// to the kernel only when the consumer takes its chunk, so a slow consumer pauses the
    /// receive instead of letting memory grow. Shutting the loop down cancels the receive
    /// and ends the sequence (after the chunks already received).
    ///
    /// Leaving the loop early (`break`, a throw, the task's cancellation) cancels the
    /// receive and drops the chunks it had already read from the socket and the consumer
    /// had not taken, up to `bufferCount` of them: those bytes are gone from the socket.
    /// To read on after leaving, use one sequence for the socket's whole life.
    public func receives(_ fd: FileDescriptor, bufferCount: Int = 16, bufferSize: Int = 16384) -> Receives {
        Receives(loop: self, fd: fd, bufferCount: bufferCount, bufferSize: bufferSize)
    }
}

/// Chunks received on one socket; see `EventLoop.receives(_:)`.
public struct Receives: AsyncSequence, Sendable {
    public typealias Element = [UInt8]
    let loop: EventLoop
    let fd: FileDescriptor
    let bufferCount: Int
    let bufferSize: Int

    public func makeAsyncIterator() -> Iterator {
        Iterator(owner: ReceiveOwner(ReceiveStream(loop: loop, fd: fd, bufferCount: bufferCount, bufferSize: bufferSize)))
    }

    public struct Iterator: AsyncIteratorProtocol {
        let owner: ReceiveOwner

        public mutating func next() async throws -> [UInt8]? {
            try await owner.state.next()
        }
    }
}

/// Owned by the iterator alone: when iteration stops, the receive is cancelled.
final class ReceiveOwner: Sendable {
    let state: ReceiveStream
    init(_ state: ReceiveStream) { self.state = state }
    deinit {
        let state = self.state
        if state.loop.inLoop { state.stop() } else { state.loop.execute { state.stop() } }
    }
}

/// The state behind `Receives`, touched only on the loop thread.
final class ReceiveStream: @unchecked Sendable {
    let loop: EventLoop
    let fd: FileDescriptor
    let bufferCount: Int
    let bufferSize: Int
    private var group: BufferGroup?
    private var chunks: [(id: UInt16, count: Int)] = []
    private var head = 0
    private var token: Token?
    private var failure: PlexusError?
    private var ended = false
    private var stopped = false
    private let wait: SequenceWait

    init(loop: EventLoop, fd: FileDescriptor, bufferCount: Int, bufferSize: Int) {
        self.loop = loop
        self.fd = fd
        self.bufferCount = bufferCount
        self.bufferSize = bufferSize
        wait = SequenceWait(loop: loop, kind: .receiveMultishot)
    }

    func next() async throws -> [UInt8]? {
        // A loop whose run() returned runs nothing of ours again: end here, without a hop.
        if !loop.inLoop && !loop.hasFinished {
            return try await withTaskExecutorPreference(loop) { try await self.next() }
        }
        while true {
            if head < chunks.count, let group {
                let (id, count) = chunks[head]
                head += 1
                if head == chunks.count { chunks.removeAll(keepingCapacity: true); head = 0 }
                let bytes = group.withBuffer(id, length: count) { Array($0) }
                loop.recycle(group, id: id)  // only now may the kernel fill it again
                return bytes
            }
            if let failure { self.failure = nil; ended = true; throw failure }
            if Task.isCancelled { stop(); throw CancellationError() }
            if ended { release(); return nil }
            try start()
            if ended { continue }
            try await wait.park(unless: { head < chunks.count || failure != nil || ended },
                                onCancel: { self.stop() })
        }
    }

    private func start() throws {
        guard token == nil, !ended else { return }
        // A loop shutting down cancels every receive: the stream ends instead of starting one.
        if loop.isShuttingDown {
            ended = true
            return
        }
        let group = try self.group ?? loop.registerBuffers(count: bufferCount, size: bufferSize)
        self.group = group
        token = loop.receiveMultishot(fd, into: group) { [self] completion in
            if let id = completion.bufferID, completion.result > 0 {
                chunks.append((id, Int(completion.result)))
            } else if completion.isFinal {
                token = nil
                ended = true
                if completion.result < 0 && completion.result != -ECANCELED {
                    failure = PlexusError(.receiveMultishot, result: completion.result)
                }
                if stopped { release() }
            }
            wait.wake()
        }
    }

    /// Ends the stream: cancels the receive; the group is released once it ended.
    func stop() {
        guard !stopped else { return }
        stopped = true
        ended = true
        if let token { loop.cancel(token) } else { release() }
        wait.wake()
    }

    private func release() {
        guard token == nil, let group else { return }
        self.group = nil
        chunks.removeAll()
        loop.backend.unregisterBuffers(group)
    }

    deinit {
        // The receive's callback holds `self` until its final completion; by now nothing
        // is in flight, and the group can go (on the loop thread, where the last
        // reference is dropped by that callback or by the iterator).
        if let group, loop.inLoop { loop.backend.unregisterBuffers(group) }
    }
}
