import Glibc
@testable import Plexus
import Synchronization
import Testing

/// Which backends this run of the suite tests, from `PLEXUS_BACKEND`.
///
/// - `io_uring`, `epoll` or `poll`: only that backend; if it cannot start, every test fails.
/// - unset, empty or `auto`: all three; a backend that cannot start on this machine is
///   skipped (the test case is cancelled, with the reason printed). io_uring is always
///   attempted, so a machine where it works always tests it.
/// - anything else: every test fails, naming the valid values.
enum Backends {
    enum Mode: Sendable, Equatable {
        case all
        case only(BackendKind)
        case invalid(String)
    }

    static let mode: Mode = {
        guard let raw = getenv(BackendChoice.environmentVariable) else { return .all }
        let name = String(cString: raw)
        if name.isEmpty || name.lowercased() == "auto" { return .all }
        if let kind = BackendKind(rawValue: name.lowercased()) { return .only(kind) }
        return .invalid(name)
    }()

    /// The arguments of every `@Test(arguments:)` in the suite.
    static let kinds: [BackendKind] = {
        if case .only(let kind) = mode { return [kind] }
        return BackendKind.allCases
    }()

    private static let reported = Mutex<Set<BackendKind>>([])

    /// The io_uring setup `PLEXUS_IO_URING_SETUP` names (make test runs the io_uring suite
    /// with each), nil when unset; every ring of the run must have been created with it.
    static let ringSetup: (name: String, flags: UInt32)? = {
        guard let raw = getenv(URingBackend.setupVariable), raw.pointee != 0 else { return nil }
        let name = String(cString: raw)
        return URingBackend.setups.first { $0.name == name }
    }()

    /// Starts `kind` through `BackendChoice.start()`, as a user would, and asserts that
    /// the backend that runs is the one asked for. Skips (cancels the test case) when
    /// all backends are under test and this one cannot start here.
    static func start(_ kind: BackendKind, entries: UInt32 = 256) throws -> SelectedBackend {
        if case .invalid(let name) = mode {
            Issue.record("PLEXUS_BACKEND=\(name) is not a backend; use io_uring, epoll, poll or auto (or leave it unset)")
            throw HarnessError.misconfigured
        }
        let choice = BackendChoice(rawValue: kind.rawValue)!
        let selected: SelectedBackend
        do {
            selected = try choice.start(entries: entries)
        } catch {
            let reason = "\(error)"
            if mode == .all {
                let first = reported.withLock { $0.insert(kind).inserted }
                if first { print("plexus-tests: skipping \(kind): \(reason)") }
                try Test.cancel("skipped: \(reason)")
            }
            Issue.record("PLEXUS_BACKEND=\(kind) but \(reason)")
            throw error
        }
        #expect(selected.backend.kind == kind, "asked for \(kind), got \(selected.backend.kind)")
        #expect(selected.kind == kind)
        #expect(selected.choice == choice)
        #expect(selected.fallbackReason == nil, "a named backend never falls back")
        if let ring = selected.backend as? URingBackend, let setup = ringSetup {
            #expect(ring.setupFlags == setup.flags, "\(URingBackend.setupVariable)=\(setup.name), got setup flags 0x\(String(ring.setupFlags, radix: 16))")
        }
        return selected
    }
}

/// A backend and the pipe its pipe tests use. io_uring serves a blocking pipe and an
/// O_NONBLOCK one by different syscalls (preadv2/pwritev2 with RWF_NOWAIT, or read/write),
/// so it is tested with both; epoll and poll, which take blocking pipes too (one call per
/// readiness report, ReadinessBackendSmokeTests), are tested here with O_NONBLOCK ones.
struct PipeCase: Sendable, CustomTestStringConvertible {
    let kind: BackendKind
    let nonBlocking: Bool

    var testDescription: String { "\(kind), \(nonBlocking ? "O_NONBLOCK" : "blocking") pipe" }

    static let all: [PipeCase] = Backends.kinds.flatMap { kind in
        kind == .ioUring ? [PipeCase(kind: kind, nonBlocking: false), PipeCase(kind: kind, nonBlocking: true)]
                         : [PipeCase(kind: kind, nonBlocking: true)]
    }
}

enum HarnessError: Error, CustomStringConvertible {
    case misconfigured
    case timedOut(String)
    case system(String, Int32)

    var description: String {
        switch self {
        case .misconfigured: "PLEXUS_BACKEND names no backend"
        case .timedOut(let what): "timed out waiting for \(what)"
        case .system(let call, let errno): "\(call) failed: \(String(cString: strerror(errno))) (errno \(errno))"
        }
    }
}
