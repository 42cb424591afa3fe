import Glibc
import SystemPackage

extension EventLoop {
    /// The connections a listening socket accepts, as an `AsyncSequence`:
    /// `for try await fd in loop.connections(listener) { ... }`.
    ///
    /// One multishot accept feeds the sequence (native on io_uring, emulated on epoll and
    /// poll). At most `bufferLimit` accepted fds wait for the consumer: when that many are
    /// waiting the accept is cancelled and further connections wait in the kernel's
    /// backlog, so a slow consumer does not make memory or fds grow. Ending the loop (or
    /// cancelling the task) cancels the accept and closes the fds nobody took.
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
        Iterator(state: AcceptStream(loop: loop, listener: listener, bufferLimit: bufferLimit))
    }

    public struct Iterator: AsyncIteratorProtocol {
        let state: AcceptStream

        public mutating func next() async throws -> FileDescriptor? {
            try await state.next()
        }
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
    private var waiter: UnsafeContinuation<Void, Never>?

    init(loop: EventLoop, listener: FileDescriptor, bufferLimit: Int) {
        self.loop = loop
        self.listener = listener
        self.bufferLimit = bufferLimit
    }

    deinit {
        // The accept callback holds `self` while armed, so here nothing is in flight;
        // the fds nobody took are closed, never leaked.
        for fd in ready[head...] { _ = Glibc.close(fd.rawValue) }
    }

    func next() async throws -> FileDescriptor? {
        if !loop.inLoop {
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
            if finished { return nil }
            if Task.isCancelled { stop(); throw CancellationError() }
            arm()
            await withTaskCancellationHandler {
                await withUnsafeContinuation { self.waiter = $0 }
            } onCancel: {
                self.loop.execute { self.stop() }
            }
        }
    }

    private func arm() {
        guard token == nil else { return }
        token = loop.acceptMultishot(listener) { [self] result in
            switch result {
            case .success(let fd):
                ready.append(fd)
                // Backpressure: enough fds wait; let the kernel's backlog hold the rest.
                if ready.count - head >= bufferLimit, let t = token { loop.cancel(t) }
            case .failure(let error):
                token = nil
                if error.errno != .canceled { failure = error }
            }
            wake()
        }
    }

    /// Ends the stream: cancels the accept and wakes the consumer.
    private func stop() {
        finished = true
        if let t = token { loop.cancel(t) }
        wake()
    }

    private func wake() {
        waiter.take()?.resume()
    }
}
