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
