import CPlexus
import Foundation
import Glibc
import Testing

/// What a child process did.
struct ChildResult: CustomStringConvertible {
    /// Exit status, or nil when killed by a signal.
    let exitCode: Int32?
    let signal: Int32?
    let stdout: String
    let stderr: String

    var description: String {
        let how = exitCode.map { "exit \($0)" } ?? "signal \(signal ?? 0)"
        return "\(how); stdout: \(stdout.debugDescription); stderr: \(stderr.debugDescription)"
    }
}

/// The directory of the running test executable (/proc/self/exe), where SwiftPM also puts
/// the package's executables (`swift build --build-tests` builds them all).
func buildProductsDirectory() -> String {
    var path = [CChar](repeating: 0, count: 4096)
    let n = readlink("/proc/self/exe", &path, path.count - 1)
    let exe = n > 0 ? String(decoding: path[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self) : ""
    return String(exe[..<(exe.lastIndex(of: "/") ?? exe.endIndex)])
}

/// The path of executable product `name` next to the tests, or a recorded issue saying how to build it.
func builtExecutable(_ name: String, sourceLocation: SourceLocation = #_sourceLocation) throws -> String {
    let path = buildProductsDirectory() + "/" + name
    guard access(path, X_OK) == 0 else {
        Issue.record("\(path) is missing: build it with `swift build --build-tests` (make test does)", sourceLocation: sourceLocation)
        throw HarnessError.system("access \(path)", plexus_errno())
    }
    return path
}

/// Runs `arguments` with posix_spawn (never fork without exec: the test runner is
/// multi-threaded), with the environment of this process minus `removing` plus `setting`,
/// stdout and stderr captured through files, and a time bound after which it is killed.
func runChild(_ arguments: [String], setting: [String: String] = [:], removing: [String] = [],
              within bound: Duration = .seconds(60), sourceLocation: SourceLocation = #_sourceLocation) throws -> ChildResult {
    let directory = try makeOutputDirectory("plexus-child")
    let outPath = directory + "/stdout", errPath = directory + "/stderr"
    defer { unlink(outPath); unlink(errPath); rmdir(directory) }

    var environment = ProcessInfo.processInfo.environment
    for name in removing { environment[name] = nil }
    for (name, value) in setting { environment[name] = value }
    let pid: pid_t
    do {
        pid = try spawnChild(arguments, environment: environment, outputIn: directory)
    } catch {
        Issue.record("\(error)", sourceLocation: sourceLocation)
        throw error
    }

    var status: Int32 = 0
    let clock = ContinuousClock()
    let deadline = clock.now + bound
    while true {
        let r = waitpid(pid, &status, WNOHANG)
        if r == pid { break }
        if r < 0 && plexus_errno() != EINTR { throw HarnessError.system("waitpid", plexus_errno()) }
        if clock.now >= deadline {
            kill(pid, SIGKILL)
            _ = waitpid(pid, &status, 0)
            Issue.record("\(arguments.joined(separator: " ")) did not exit within \(bound); killed", sourceLocation: sourceLocation)
            throw HarnessError.timedOut(arguments.joined(separator: " "))
        }
        usleep(10_000)
    }
    let signal = status & 0x7f
    return ChildResult(
        exitCode: signal == 0 ? (status >> 8) & 0xff : nil,
        signal: signal == 0 ? nil : signal,
        stdout: readWholeFile(outPath), stderr: readWholeFile(errPath))
}

/// A new directory under /tmp for a child's output files.
func makeOutputDirectory(_ prefix: String) throws -> String {
    var template = Array("/tmp/\(prefix)-XXXXXX".utf8CString)
    guard mkdtemp(&template) != nil else { throw HarnessError.system("mkdtemp", plexus_errno()) }
    return String(decoding: template.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
}

/// posix_spawn of `arguments` with `environment`: stdin /dev/null, stdout and stderr into
/// `directory`/stdout and `directory`/stderr. Returns the child's pid.
func spawnChild(_ arguments: [String], environment: [String: String], outputIn directory: String) throws -> pid_t {
    let argv: [UnsafeMutablePointer<CChar>?] = arguments.map { strdup($0) } + [nil]
    let envp: [UnsafeMutablePointer<CChar>?] = environment.map { strdup("\($0.key)=\($0.value)") } + [nil]
    defer { argv.forEach { free($0) }; envp.forEach { free($0) } }
    var actions = posix_spawn_file_actions_t()
    posix_spawn_file_actions_init(&actions)
    defer { posix_spawn_file_actions_destroy(&actions) }
    posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
    posix_spawn_file_actions_addopen(&actions, 1, directory + "/stdout", O_WRONLY | O_CREAT | O_TRUNC, 0o600)
    posix_spawn_file_actions_addopen(&actions, 2, directory + "/stderr", O_WRONLY | O_CREAT | O_TRUNC, 0o600)
    var pid: pid_t = 0
    let spawned = posix_spawn(&pid, arguments[0], &actions, nil, argv, envp)
    guard spawned == 0 else {
        throw HarnessError.system("posix_spawn \(arguments[0]): \(String(cString: strerror(spawned)))", spawned)
    }
    return pid
}

func readWholeFile(_ path: String) -> String {
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { return "" }
    defer { close(fd) }
    var data: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 65536)
    while true {
        let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        if n <= 0 { break }
        data += chunk[0..<n]
    }
    return String(decoding: data, as: UTF8.self)
}

/// Where an exit test's child writes what went wrong, for the parent to show:
/// `#expect(processExitsWith:)` hands back nothing (not even observed output) when the
/// child's exit status is not the expected one, so output printed by the child was lost
/// exactly when it explained a failure.
struct ChildReport {
    let path: String

    init() {
        path = "/tmp/plexus-child-report-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        unlink(path)
    }

    /// In the child: appends `line`. Opens and closes the file each time, so it holds no
    /// fd while the child counts its fds.
    static func append(_ line: String, to path: String) {
        let fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o600)
        guard fd >= 0 else { return }
        let text = Array((line + "\n").utf8)
        _ = text.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
        close(fd)
    }

    /// In the parent, after the exit test: records what the child wrote when the exit
    /// test failed (`result` nil), and removes the file.
    func finish(_ result: ExitTest.Result?, sourceLocation: SourceLocation = #_sourceLocation) {
        if result == nil {
            Issue.record("the child said: \(readWholeFile(path))", sourceLocation: sourceLocation)
        }
        unlink(path)
    }
}
