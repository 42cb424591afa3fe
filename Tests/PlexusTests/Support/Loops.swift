@testable import Plexus
import Testing

extension Backends {
    /// An event loop on `kind`, run by the test's thread (`runOnce`); skipped like
    /// `start` when every backend is under test and this one cannot start here.
    static func loop(_ kind: BackendKind) throws -> EventLoop {
        _ = try start(kind)  // skips or fails with the reason, and checks the kind
        let loop = try EventLoop(backend: BackendChoice(rawValue: kind.rawValue)!)
        #expect(loop.backendKind == kind, "asked for \(kind), the loop runs \(loop.backendKind)")
        return loop
    }

    /// An event loop on `kind` running on its own thread.
    static func loopThread(_ kind: BackendKind, idleSpin: Duration = .microseconds(2)) throws -> EventLoop {
        _ = try start(kind)
        let loop = try EventLoop.startThread(backend: BackendChoice(rawValue: kind.rawValue)!, idleSpin: idleSpin)
        #expect(loop.backendKind == kind, "asked for \(kind), the loop runs \(loop.backendKind)")
        return loop
    }
}

/// A value behind the project's `Lock` (a pthread mutex, which TSan understands; on this
/// toolchain it does not see `Synchronization.Mutex`'s futex, and reports the accesses
/// it orders as races). For state that loop threads and the test share.
final class Locked<Value>: @unchecked Sendable {
    private let lock = Lock()
    private var value: Value
    init(_ value: Value) { self.value = value }
    func withLock<R>(_ body: (inout Value) throws -> R) rethrows -> R {
        lock.lock()
        defer { lock.unlock() }
        return try body(&value)
    }
}
