import CPlexus
import Glibc
@testable import Plexus
import Synchronization
import Testing

/// Signals the fault-injection tests count: their handlers only add to these.
let sigpipeCount = Atomic<Int>(0)
let sigusr1Count = Atomic<Int>(0)

enum Faults {
    /// <sys/resource.h>'s numbers (Linux, every architecture Plexus builds on); Swift
    /// imports the RLIMIT_* names inconsistently.
    static let fileLimit: Int32 = 7  // RLIMIT_NOFILE
    static let lockedMemoryLimit: Int32 = 8  // RLIMIT_MEMLOCK

    /// Installs `handler` for `signal` with sigaction and flags 0 (no SA_RESTART), runs
    /// `body`, and puts the previous disposition back.
    static func withSignalHandler<R>(_ signal: Int32, _ handler: @convention(c) (Int32) -> Void,
                                     _ body: () throws -> R) rethrows -> R {
        var old = installHandler(signal, handler)
        defer { _ = sigaction(signal, &old, nil) }
        return try body()
    }

    static func withSignalHandler<R>(_ signal: Int32, _ handler: @convention(c) (Int32) -> Void,
                                     _ body: () async throws -> R) async rethrows -> R {
        var old = installHandler(signal, handler)
        defer { _ = sigaction(signal, &old, nil) }
        return try await body()
    }

    /// sigaction(2) with `handler` and flags 0 (no SA_RESTART); returns the previous one.
    private static func installHandler(_ signal: Int32, _ handler: @convention(c) (Int32) -> Void) -> sigaction {
        var action = sigaction()
        action.__sigaction_handler.sa_handler = handler
        sigemptyset(&action.sa_mask)
        action.sa_flags = 0
        var old = sigaction()
        precondition(sigaction(signal, &action, &old) == 0)
        return old
    }

    /// Unblocks `signal` on the calling thread and returns the old mask for `restoreMask`.
    /// Threads of the Swift concurrency pool (where tests run, and which threads they
    /// create inherit from) block most signals, so a storm would otherwise never land.
    static func unblock(_ signal: Int32) -> sigset_t {
        var set = sigset_t(), old = sigset_t()
        sigemptyset(&set)
        sigaddset(&set, signal)
        precondition(pthread_sigmask(SIG_UNBLOCK, &set, &old) == 0)
        return old
    }

    static func restoreMask(_ old: sigset_t) {
        var old = old
        _ = pthread_sigmask(SIG_SETMASK, &old, nil)
    }

    /// Counts every SIGPIPE delivered to any thread of the process while `body` runs: a
    /// library that raises SIGPIPE kills a program that kept the default disposition.
    static func countingSIGPIPE<R>(_ body: () throws -> R) rethrows -> (R, sigpipes: Int) {
        let before = sigpipeCount.load(ordering: .sequentiallyConsistent)
        let r = try withSignalHandler(SIGPIPE, { _ in sigpipeCount.add(1, ordering: .sequentiallyConsistent) }, body)
        return (r, sigpipeCount.load(ordering: .sequentiallyConsistent) - before)
    }

    static func countingSIGPIPE<R>(_ body: () async throws -> R) async rethrows -> (R, sigpipes: Int) {
        let before = sigpipeCount.load(ordering: .sequentiallyConsistent)
        let r = try await withSignalHandler(SIGPIPE, { _ in sigpipeCount.add(1, ordering: .sequentiallyConsistent) }, body)
        return (r, sigpipeCount.load(ordering: .sequentiallyConsistent) - before)
    }

    /// Runs `body` with RLIMIT `resource`'s soft limit at `soft`, restoring the old limits
    /// after (the suite is serialized, so nothing else runs meanwhile).
    static func withSoftLimit<R>(_ resource: Int32, _ soft: rlim_t, _ body: () throws -> R) throws -> R {
        var old = rlimit()
        guard getrlimit(resource, &old) == 0 else { throw HarnessError.system("getrlimit", plexus_errno()) }
        var lowered = old
        lowered.rlim_cur = min(soft, old.rlim_max)
        guard setrlimit(resource, &lowered) == 0 else { throw HarnessError.system("setrlimit", plexus_errno()) }
        defer { precondition(setrlimit(resource, &old) == 0, "could not restore the rlimit") }
        return try body()
    }

    /// The highest open fd number of this process.
    static func highestOpenFD() -> Int32 { openFileDescriptors().keys.max() ?? 2 }

    /// Opens /dev/null until EMFILE, so no fd number below the soft RLIMIT_NOFILE is free.
    /// Returns the fillers; closing any of them frees a number again.
    static func exhaustFileDescriptors(max: Int = 100_000) -> [Int32] {
        var fillers: [Int32] = []
        while fillers.count < max {
            let fd = open("/dev/null", O_RDONLY | O_CLOEXEC)
            if fd < 0 {
                #expect(plexus_errno() == EMFILE, "filling the fd table stopped with errno \(plexus_errno())")
                break
            }
            fillers.append(fd)
        }
        return fillers
    }

    /// Resident set size of this process in KiB (/proc/self/statm).
    static func residentKiB() -> Int {
        let text = readWholeFile("/proc/self/statm").split(separator: " ")
        guard text.count > 1, let pages = Int(text[1]) else { return 0 }
        return pages * Int(getpagesize()) / 1024
    }

    /// The thread a started loop runs on.
    static func loopThreadID(_ loop: EventLoop) -> pthread_t {
        // pthread_t is an integer on Linux; 0 is never a running thread's.
        let box = AtomicThreadBox()
        loop.execute { box.id.store(UInt(pthread_self()), ordering: .releasing) }
        let deadline = Deadline.now + .seconds(10)
        while box.id.load(ordering: .acquiring) == 0 && Deadline.now < deadline { usleep(100) }
        let id = box.id.load(ordering: .acquiring)
        precondition(id != 0, "the loop did not run a job within 10 s")
        return pthread_t(id)
    }
}

final class AtomicThreadBox: Sendable {
    let id = Atomic<UInt>(0)
}

/// A value handed to another thread by a test that keeps it alive and synchronizes itself.
struct UncheckedSendable<T>: @unchecked Sendable {
    let value: T
    init(_ value: T) { self.value = value }
}

/// A thread that sends `signal` to `target` every `interval` until `stop()`.
final class SignalStorm: @unchecked Sendable {
    private let stopping = Atomic<Bool>(false)
    private let sentCount = Atomic<Int>(0)
    private var thread = pthread_t()

    init(_ target: pthread_t, _ signal: Int32, every interval: useconds_t) {
        let target = UncheckedSendable(target)
        thread = LoopTestSupport.spawn { [self] in
            while !stopping.load(ordering: .acquiring) {
                if pthread_kill(target.value, signal) == 0 { sentCount.add(1, ordering: .relaxed) }
                usleep(interval)
            }
        }
    }

    /// Stops and joins the thread; returns how many signals it sent.
    func stop() -> Int {
        stopping.store(true, ordering: .releasing)
        pthread_join(thread, nil)
        return sentCount.load(ordering: .acquiring)
    }
}
