import Glibc
import Testing

/// The open fds of this process, read from /proc/self/fd, with what each one is.
func openFileDescriptors() -> [Int32: String] {
    guard let dir = opendir("/proc/self/fd") else { return [:] }
    defer { closedir(dir) }
    let own = dirfd(dir)
    var result: [Int32: String] = [:]
    while let entry = readdir(dir) {
        let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in
            String(decoding: raw.prefix { $0 != 0 }, as: UTF8.self)
        }
        guard let fd = Int32(name), fd != own else { continue }
        var target = [CChar](repeating: 0, count: 512)
        let n = readlink("/proc/self/fd/\(fd)", &target, target.count - 1)
        result[fd] = n > 0 ? String(decoding: target[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self) : "?"
    }
    return result
}

/// Counts /proc/self/fd before and after every test case below the suite it is applied
/// to, and records an issue naming each fd that appeared or vanished.
///
/// fd numbers are process-wide, so the check is only meaningful when nothing else runs
/// at the same time: it is applied to the one `.serialized` root suite (`PlexusTests`).
struct FileDescriptorLeakCheck: SuiteTrait, TestTrait, TestScoping {
    /// Dispatch opens a timerfd per clock on the process's first real sleep on it and keeps
    /// it: the runtime's, not a test's. Opened here once, before any count (a sleep too
    /// short to arm a timer opens nothing, hence a millisecond).
    private static let warmUp: Task<Void, Never> = Task {
        try? await Task.sleep(nanoseconds: 1_000_000)
        try? await Task.sleep(for: .milliseconds(1))
        try? await SuspendingClock().sleep(for: .milliseconds(1))
    }

    /// scripts/ci-sanitizers.sh sets PLEXUS_SANITIZER=tsan for its TSan runs.
    private static let underThreadSanitizer: Bool = {
        guard let raw = getenv("PLEXUS_SANITIZER") else { return false }
        return String(cString: raw) == "tsan"
    }()

    var isRecursive: Bool { true }

    func scopeProvider(for test: Test, testCase: Test.Case?) -> Self? {
        // Once per test case (each backend of a parameterized test), never per suite.
        testCase == nil ? nil : self
    }

    func provideScope(
        for test: Test, testCase: Test.Case?, performing function: @Sendable () async throws -> Void
    ) async throws {
        await Self.warmUp.value
        let before = openFileDescriptors()
        defer {
            var after = openFileDescriptors()
            if Self.underThreadSanitizer {
                // TSan's first symbolized report (even a suppressed one) starts
                // llvm-symbolizer and keeps two pipes to it: the sanitizer's, not the test's.
                after = after.filter { before[$0.key] != nil || !$0.value.hasPrefix("pipe:") }
            }
            if after.count != before.count || Set(after.keys) != Set(before.keys) {
                let opened = after.filter { before[$0.key] == nil }.sorted { $0.key < $1.key }
                    .map { "\($0.key) -> \($0.value)" }
                let closed = before.filter { after[$0.key] == nil }.sorted { $0.key < $1.key }
                    .map { "\($0.key) -> \($0.value)" }
                Issue.record(
                    """
                    fd count changed across the test: \(before.count) before, \(after.count) after; \
                    left open: \(opened), closed but not opened by the test: \(closed)
                    """)
            }
        }
        try await function()
    }
}

extension Trait where Self == FileDescriptorLeakCheck {
    /// Requires the same set of open fds before and after every test case.
    static var checksFileDescriptors: Self { Self() }
}

/// Waits until the open fds stop changing (two readings 10 ms apart agree, for at most
/// 2 s), for a child process that counts its fds right after it starts: the runtime
/// starting up beside it opens and closes fds of its own (an eventfd at fd 3 was seen
/// open in the first reading and gone by the next, under load, with no Plexus code run).
func waitUntilFileDescriptorsSettle() {
    var last = openFileDescriptors()
    for _ in 0..<200 {
        usleep(10_000)
        let now = openFileDescriptors()
        if now == last { return }
        last = now
    }
}
