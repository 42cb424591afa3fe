import Glibc

/// Where the `next()` of a multishot sequence (`connections`, `receives`) parks its task
/// until the stream has news for it: a result, an error, the end, or the deadline that
/// `withDeadline` set for the task. No single operation covers that wait, so the
/// deadline is a loop timer here, and cancelling the task stops the stream.
///
/// Loop thread only, like the stream that owns it.
final class SequenceWait: @unchecked Sendable {
    private let loop: EventLoop
    /// The multishot operation the stream runs, named in its ETIMEDOUT.
    private let kind: OperationKind
    private var waiter: UnsafeContinuation<Void, Never>?
    private var timedOut = false

    init(loop: EventLoop, kind: OperationKind) {
        self.loop = loop
        self.kind = kind
    }

    /// Resumes the parked task, if one is parked.
    func wake() {
        waiter.take()?.resume()
    }

    /// Parks until `wake()`, the task's deadline (ETIMEDOUT naming the operation) or its
    /// cancellation (`onCancel` runs on the loop thread; the stream then wakes it).
    /// `hasNews` is asked once more just before parking: the hop onto the loop on the way
    /// in is a suspension point, and the loop may have delivered something meanwhile.
    func park(unless hasNews: () -> Bool, onCancel: @escaping @Sendable () -> Void) async throws(PlexusError) {
        let timer = try loop.timerForCurrentDeadline(kind) { [self] in
            timedOut = true
            wake()
        }
        await withTaskCancellationHandler {
            await withUnsafeContinuation { continuation in
                if hasNews() || timedOut {
                    continuation.resume()
                } else {
                    waiter = continuation
                }
            }
        } onCancel: { [loop] in
            loop.execute(onCancel)
        }
        if let timer { loop.timers.discard(timer) }
        if timedOut {
            timedOut = false
            throw PlexusError(kind, result: -ETIMEDOUT)
        }
    }
}
