import Glibc
import SystemPackage

extension EventLoop {
    /// The connections a listening socket accepts, as an `AsyncSequence`:
    /// `for try await fd in loop.connections(listener) { ... }`.
    ///
    /// One multishot accept feeds the sequence (native on io_uring, emulated on epoll and
    /// poll). At most `bufferLimit` accepted fds wait for the consumer: when that many are
    /// waiting the accept is cancelled and further connections wait in the kernel's
    /// backlog, so a slow consumer does not make memory or fds grow. Shutting the loop
    /// down ends the sequence (after the fds already accepted); cancelling the task
    /// cancels the accept; the fds nobody took are closed.
    public func connections(_ listener: FileDescriptor, bufferLimit: Int = 64) -> Connections {
        Connections(loop: self, listener: listener, bufferLimit: max(bufferLimit, 1))
    }
}

/// Accepted connections of one listening socket; see `EventLoop.connections(_:)`.
public struct Connections: AsyncSequence, Sendable {
    public typealias Element = FileDescriptor
    let loop: EventLoop
    let listener: FileDescriptor
    let bufferLimit: Int

    public func makeAsyncIterator() -> Iterator {
        Iterator(owner: IterationOwner(AcceptStream(loop: loop, listener: listener, bufferLimit: bufferLimit)))
    }

    public struct Iterator: AsyncIteratorProtocol {
        let owner: IterationOwner

        public mutating func next() async throws -> FileDescriptor? {
            try await owner.state.next()
        }
    }
}

/// Owned by the iterator alone: when the consumer stops iterating (break, return, throw),
/// the iterator and this object go away, and the accept is cancelled.
final class IterationOwner: Sendable {
    let state: AcceptStream
    init(_ state: AcceptStream) { self.state = state }
    deinit {
        let state = self.state
        if state.loop.inLoop { state.stop() } else { state.loop.execute { state.stop() } }
    }
}

/// The state behind `Connections`, touched only on the loop thread.
final class AcceptStream: @unchecked Sendable {
    let loop: EventLoop
    let listener: FileDescriptor
    let bufferLimit: Int
    private var ready: [FileDescriptor] = []
    private var head = 0
    private var token: Token?
    private var failure: PlexusError?
    private var finished = false
    /// The accept is being cancelled because enough fds wait.
    private var pausing = false
    private let wait: SequenceWait

    init(loop: EventLoop, listener: FileDescriptor, bufferLimit: Int) {
        self.loop = loop
        self.listener = listener
        self.bufferLimit = bufferLimit
        wait = SequenceWait(loop: loop, kind: .acceptMultishot)
    }

    deinit {
        // The accept callback holds `self` while armed, so here nothing is in flight;
        // the fds nobody took are closed, never leaked.
        for fd in ready[head...] { _ = Glibc.close(fd.rawValue) }
    }

    func next() async throws -> FileDescriptor? {
        // A loop whose run() returned runs nothing of ours again: end here, without a hop.
        if !loop.inLoop && !loop.hasFinished {
            return try await withTaskExecutorPreference(loop) { try await self.next() }
        }
        while true {
            if head < ready.count {
                let fd = ready[head]
                head += 1
                if head == ready.count { ready.removeAll(keepingCapacity: true); head = 0 }
                return fd
            }
            if let failure { self.failure = nil; finished = true; throw failure }
            if Task.isCancelled { stop(); throw CancellationError() }
            if finished { return nil }
            arm()
            if finished { continue }
            try await wait.park(unless: { head < ready.count || failure != nil || finished || token == nil },
                                onCancel: { self.stop() })
        }
    }

    private func arm() {
        guard token == nil else { return }
        // A loop shutting down cancels every accept: re-arming would only be cancelled
        // again (and keep its shutdown from ending). The stream ends instead.
        if loop.isShuttingDown {
            finished = true
            return
        }
        token = loop.acceptMultishot(listener) { [self] result in
            switch result {
            case .success(let fd):
                ready.append(fd)
                // Backpressure: enough fds wait; let the kernel's backlog hold the rest.
                if ready.count - head >= bufferLimit, !pausing, let t = token {
                    pausing = true
                    loop.cancel(t, discardingDescriptors: false)
                }
            case .failure(let error):
                token = nil
                // ECANCELED is the pause this stream asked for, unless the loop shuts down.
                if error.errno != .canceled {
                    failure = error
                } else if !pausing || loop.isShuttingDown {
                    finished = true
                }
                pausing = false
            }
            wait.wake()
        }
    }

    /// Ends the stream: cancels the accept and wakes the consumer.
    func stop() {
        finished = true
        if let t = token { loop.cancel(t, discardingDescriptors: false) }
        wait.wake()
    }
}
