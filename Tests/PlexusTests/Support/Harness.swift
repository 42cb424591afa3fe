import CPlexus
import Glibc
@testable import Plexus
import SystemPackage
import Testing

/// What an operation handed back on its final completion; tests take buffers from here.
final class Returned {
    var buffer: IOBuffer?
    var vector: IOVector?
    var message: Message?
    init() {}
}

/// One completion as the harness saw it.
struct Outcome: CustomStringConvertible {
    let token: Token
    let kind: OperationKind
    let result: Int32
    let flags: CompletionFlags
    /// When the harness received it (CLOCK_MONOTONIC).
    let at: Deadline
    /// True when the final completion carried the operation back.
    let hadOperation: Bool
    /// The readable bytes of the returned buffer (reads: what was read; writes: what was left).
    let bytes: [UInt8]?
    /// The readable bytes of each buffer of a returned IOVector.
    let vectorBytes: [[UInt8]]?
    /// The address of a returned Message.
    let address: SocketAddress?
    let returned: Returned
    /// The provided buffer a multishot receive filled.
    var bufferID: UInt16? = nil

    var isFinal: Bool { !flags.contains(.more) }
    /// The errno of a failed operation, nil on success.
    var errno: Int32? { result < 0 ? -result : nil }
    var string: String? { bytes.map { String(decoding: $0, as: UTF8.self) } }
    var error: PlexusError? { result < 0 ? PlexusError(kind, result: result) : nil }

    var description: String {
        let what = result >= 0 ? "\(result)" : "-\(Harness.errnoName(-result))"
        return "\(kind) \(token) -> \(what)\(flags.contains(.more) ? " [more]" : "")"
    }
}

/// Drives one backend for one test: tracks every token it prepares, checks that each
/// gets exactly one final completion (and nothing after it), bounds every wait with a
/// deadline, owns the fds and temp files the test creates, and at the end checks that
/// nothing is left pending.
///
/// Use it through `Harness.run(kind) { h in ... }`.
final class Harness {
    let selected: SelectedBackend
    let kind: BackendKind
    var backend: any IOBackend { selected.backend }

    /// Every completion, in arrival order.
    private(set) var log: [Outcome] = []
    /// Final completions by token.
    private(set) var finals: [Token: Outcome] = [:]
    /// Intermediate (multishot, `.more`) completions by token.
    private(set) var intermediates: [Token: [Outcome]] = [:]
    /// Prepared and not yet finally completed.
    private(set) var open: Set<Token> = []
    /// Called with each completion once it is recorded, inside the backend's `wait`: a
    /// test prepares here what a user's callback would.
    var onCompletion: ((Outcome) -> Void)?
    private var preparedKinds: [Token: OperationKind] = [:]
    private var closing: [Token: Int32] = [:]
    /// fds the test owns; closed at the end unless a Plexus `close` closed them.
    private(set) var ownedFDs: Set<Int32> = []
    private var tempDirectory: String?

    /// The default bound of one wait: generous, so only a hang trips it.
    static let defaultBound: Duration = .seconds(10)

    private init(_ selected: SelectedBackend) {
        self.selected = selected
        self.kind = selected.kind
    }

    /// Starts `kind`, runs `body`, then checks and cleans up (even when `body` throws).
    static func run(_ kind: BackendKind, entries: UInt32 = 256, _ body: (Harness) throws -> Void) throws {
        ignoreSIGPIPE
        let h = Harness(try Backends.start(kind, entries: entries))
        var failure: (any Error)?
        do { try body(h) } catch { failure = error }
        h.finish(bodyFailed: failure != nil)
        if let failure { throw failure }
    }

    /// Writes to a pipe or socket whose reader is gone must report EPIPE, not kill the runner.
    private static let ignoreSIGPIPE: Void = { _ = signal(SIGPIPE, SIG_IGN) }()

    // MARK: Operations

    /// Prepares `operation` and starts tracking its token.
    @discardableResult
    func prepare(_ operation: consuming Operation, sourceLocation: SourceLocation = #_sourceLocation) -> Token {
        let kind = operation.kind
        let closedFD = kind == .close ? operation.fileDescriptor?.rawValue : nil
        let token = backend.prepare(operation)
        track(token, kind, closedFD: closedFD, sourceLocation)
        return token
    }

    /// Prepares `operation` with a deadline (`IOBackend.prepare(_:deadline:)`), tracked
    /// like `prepare`.
    @discardableResult
    func prepare(_ operation: consuming Operation, deadline: Deadline,
                 sourceLocation: SourceLocation = #_sourceLocation) -> Token {
        let kind = operation.kind
        let token = backend.prepare(operation, deadline: deadline)
        track(token, kind, closedFD: nil, sourceLocation)
        return token
    }

    /// `IOBackend.attempt`, tracked like `prepare`; `atOnce`: it finished at once, and its
    /// final completion is already recorded (`waitFor` returns it).
    func attempt(_ operation: consuming Operation,
                 sourceLocation: SourceLocation = #_sourceLocation) -> (token: Token, atOnce: Bool) {
        let kind = operation.kind
        let closedFD = kind == .close ? operation.fileDescriptor?.rawValue : nil
        switch backend.attempt(operation) {
        case .completed(let completion):
            let token = completion.token
            track(token, kind, closedFD: closedFD, sourceLocation)
            receive(completion)
            return (token, true)
        case .prepared(let token):
            track(token, kind, closedFD: closedFD, sourceLocation)
            return (token, false)
        }
    }

    private func track(_ token: Token, _ kind: OperationKind, closedFD: Int32?, _ sourceLocation: SourceLocation) {
        if open.contains(token) || finals[token] != nil {
            Issue.record("prepare returned token \(token) which is already in use or was used before", sourceLocation: sourceLocation)
        }
        open.insert(token)
        preparedKinds[token] = kind
        if let closedFD { closing[token] = closedFD }
    }

    /// Submits what was prepared.
    @discardableResult
    func submit(sourceLocation: SourceLocation = #_sourceLocation) throws -> Int {
        do { return try backend.submit() } catch {
            Issue.record("submit failed: \(error)", sourceLocation: sourceLocation)
            throw error
        }
    }

    /// Prepares, submits and waits for the final completion of one operation.
    @discardableResult
    func perform(_ operation: consuming Operation, within bound: Duration = defaultBound,
                 sourceLocation: SourceLocation = #_sourceLocation) throws -> Outcome {
        let token = prepare(operation, sourceLocation: sourceLocation)
        try submit(sourceLocation: sourceLocation)
        return try waitFor(token, within: bound, sourceLocation: sourceLocation)
    }

    // MARK: Waiting (every loop has a deadline)

    /// One call of `wait`, every completion recorded. Returns how many arrived.
    @discardableResult
    func waitOnce(timeout: Duration?, sourceLocation: SourceLocation = #_sourceLocation) throws -> Int {
        do {
            return try backend.wait(timeout: timeout) { completion in self.receive(completion) }
        } catch {
            Issue.record("wait failed: \(error)", sourceLocation: sourceLocation)
            throw error
        }
    }

    /// Waits until `condition` holds, failing (and throwing) after `bound`.
    func runUntil(_ what: @autoclosure () -> String, within bound: Duration = defaultBound,
                  sourceLocation: SourceLocation = #_sourceLocation, _ condition: () -> Bool) throws {
        let deadline = Deadline.now + bound
        while !condition() {
            let now = Deadline.now
            if now >= deadline {
                let pending = open.map { "\(preparedKinds[$0]?.rawValue ?? "?") \($0)" }.sorted()
                let description = what()
                Issue.record(
                    "timed out after \(bound) on \(kind) waiting for \(description); still pending: \(pending)",
                    sourceLocation: sourceLocation)
                throw HarnessError.timedOut(description)
            }
            let left = Duration.nanoseconds(Int64(deadline.remaining(from: now)))
            try waitOnce(timeout: min(left, .milliseconds(100)), sourceLocation: sourceLocation)
        }
    }

    /// Waits for the final completion of `token`.
    @discardableResult
    func waitFor(_ token: Token, within bound: Duration = defaultBound,
                 sourceLocation: SourceLocation = #_sourceLocation) throws -> Outcome {
        let kind = preparedKinds[token]?.rawValue ?? "?"
        try runUntil("\(kind) \(token)", within: bound, sourceLocation: sourceLocation) { finals[token] != nil }
        return finals[token]!
    }

    /// Waits for the final completions of all `tokens`, returned in the same order.
    @discardableResult
    func waitFor(_ tokens: [Token], within bound: Duration = defaultBound,
                 sourceLocation: SourceLocation = #_sourceLocation) throws -> [Outcome] {
        try runUntil("\(tokens.count) operations", within: bound, sourceLocation: sourceLocation) {
            tokens.allSatisfy { finals[$0] != nil }
        }
        return tokens.map { finals[$0]! }
    }

    /// Waits until `count` intermediate completions of multishot `token` have arrived.
    @discardableResult
    func waitForIntermediates(_ token: Token, count: Int, within bound: Duration = defaultBound,
                              sourceLocation: SourceLocation = #_sourceLocation) throws -> [Outcome] {
        try runUntil("\(count) completions of \(token)", within: bound, sourceLocation: sourceLocation) {
            (intermediates[token]?.count ?? 0) >= count || finals[token] != nil
        }
        return intermediates[token] ?? []
    }

    /// Waits until nothing the test prepared is pending.
    func drain(within bound: Duration = defaultBound, sourceLocation: SourceLocation = #_sourceLocation) throws {
        try runUntil("every pending operation", within: bound, sourceLocation: sourceLocation) { open.isEmpty }
    }

    /// Waits `duration` while recording whatever completes meanwhile.
    func idle(for duration: Duration) throws {
        let deadline = Deadline.now + duration
        while Deadline.now < deadline {
            let left = Duration.nanoseconds(Int64(deadline.remaining(from: .now)))
            try waitOnce(timeout: left)
        }
    }

    /// Calls `cancelAll`, recording every completion it hands over.
    func cancelAll() {
        backend.cancelAll { completion in self.receive(completion) }
    }

    func isPending(_ token: Token) -> Bool { open.contains(token) }

    // MARK: Completions

    func receive(_ completion: consuming Completion) {
        let token = completion.token, result = completion.result, flags = completion.flags, kind = completion.kind
        let bufferID = completion.bufferID
        let returned = Returned()
        var hadOperation = false
        var bytes: [UInt8]?
        var vectorBytes: [[UInt8]]?
        var address: SocketAddress?
        if let operation = completion.operation.take() {
            hadOperation = true
            switch kind {
            case .readv, .writev:
                if let vector = operation.takeVector() {
                    vectorBytes = (0..<vector.count).map { i in vector.withBuffer(at: i) { $0.bytes } }
                    returned.vector = .some(vector)
                }
            case .sendMessage, .receiveMessage:
                if let message = operation.takeMessage() {
                    bytes = message.buffer.bytes
                    address = message.address
                    returned.message = .some(message)
                }
            default:
                if let buffer = operation.takeBuffer() {
                    bytes = buffer.bytes
                    returned.buffer = .some(buffer)
                }
            }
        }
        let outcome = Outcome(token: token, kind: kind, result: result, flags: flags, at: .now,
                              hadOperation: hadOperation, bytes: bytes, vectorBytes: vectorBytes,
                              address: address, returned: returned, bufferID: bufferID)
        log.append(outcome)

        guard open.contains(token) else {
            if let first = finals[token] {
                Issue.record("token \(token) completed again after its final completion: first \(first), now \(outcome)")
            } else {
                Issue.record("completion for token \(token) that was never prepared: \(outcome)")
            }
            return
        }
        if let expected = preparedKinds[token], expected != kind {
            Issue.record("completion of \(token) says \(kind), the operation was \(expected)")
        }
        if outcome.isFinal {
            open.remove(token)
            finals[token] = outcome
            if hadOperation == false, kind.carriesBuffers {
                Issue.record("final completion of \(kind) \(token) did not hand the operation back")
            }
            if let fd = closing.removeValue(forKey: token), result == 0 { ownedFDs.remove(fd) }
        } else {
            if !kind.isMultishot { Issue.record("one-shot \(kind) \(token) reported .more") }
            if hadOperation { Issue.record("intermediate completion of \(token) handed the operation back") }
            intermediates[token, default: []].append(outcome)
        }
        // New fds from accept and open belong to the test now.
        if result >= 0, kind == .accept || kind == .acceptMultishot || kind == .open {
            if ownedFDs.contains(result) { Issue.record("\(kind) returned fd \(result), which is already open and owned") }
            ownedFDs.insert(result)
        }
        onCompletion?(outcome)
    }

    // MARK: End of test

    private func finish(bodyFailed: Bool) {
        if !open.isEmpty {
            if !bodyFailed {
                Issue.record("the test left \(open.count) operations pending on \(kind): \(open.sorted { $0.rawValue < $1.rawValue })")
            }
            let leftover = open
            cancelAll()
            for token in leftover where open.contains(token) {
                Issue.record("cancelAll did not complete \(token)")
            }
        }
        if backend.pendingCount != 0 {
            Issue.record("pendingCount is \(backend.pendingCount) on \(kind) after every operation completed")
        }
        for fd in ownedFDs { _ = Glibc.close(fd) }
        ownedFDs.removeAll()
        if let tempDirectory { removeTree(tempDirectory) }
    }

    // MARK: Real fds

    /// Takes ownership of `fd`: it is closed at the end of the test.
    @discardableResult
    func own(_ fd: Int32) -> FileDescriptor {
        ownedFDs.insert(fd)
        return FileDescriptor(rawValue: fd)
    }

    /// Closes `fd` with close(2), outside Plexus.
    func closeNow(_ fd: FileDescriptor) {
        ownedFDs.remove(fd.rawValue)
        _ = Glibc.close(fd.rawValue)
    }

    /// Stops owning an fd the test closed through Plexus or otherwise.
    func disown(_ fd: FileDescriptor) { ownedFDs.remove(fd.rawValue) }

    /// pipe2(O_CLOEXEC | O_NONBLOCK).
    func pipe(nonBlocking: Bool = true) throws -> (read: FileDescriptor, write: FileDescriptor) {
        var fds: [Int32] = [-1, -1]
        guard plexus_pipe2(&fds, O_CLOEXEC | (nonBlocking ? O_NONBLOCK : 0)) == 0 else {
            throw HarnessError.system("pipe2", plexus_errno())
        }
        return (own(fds[0]), own(fds[1]))
    }

    /// socketpair(AF_UNIX, type | SOCK_CLOEXEC | SOCK_NONBLOCK).
    func socketPair(type: Int32 = Int32(SOCK_STREAM.rawValue)) throws -> (FileDescriptor, FileDescriptor) {
        var fds: [Int32] = [-1, -1]
        let flags = Int32(SOCK_CLOEXEC.rawValue) | Int32(SOCK_NONBLOCK.rawValue)
        guard socketpair(AF_UNIX, type | flags, 0, &fds) == 0 else {
            throw HarnessError.system("socketpair", plexus_errno())
        }
        return (own(fds[0]), own(fds[1]))
    }

    /// Sends zeros on stream socket `fd` until its send buffer (and its peer's receive
    /// buffer) is full; returns how many bytes that took.
    func fillSendBuffer(_ fd: FileDescriptor) -> Int {
        var filled = 0
        let chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = Glibc.send(fd.rawValue, chunk, chunk.count, Int32(MSG_DONTWAIT))
            if n <= 0 { return filled }
            filled += n
        }
    }

    /// A non-blocking socket of `type` on AF_INET, owned.
    func inetSocket(type: Int32 = Int32(SOCK_STREAM.rawValue), nonBlocking: Bool = true) throws -> FileDescriptor {
        let flags = Int32(SOCK_CLOEXEC.rawValue) | (nonBlocking ? Int32(SOCK_NONBLOCK.rawValue) : 0)
        let fd = socket(AF_INET, type | flags, 0)
        guard fd >= 0 else { throw HarnessError.system("socket", plexus_errno()) }
        return own(fd)
    }

    /// Binds `fd` to 127.0.0.1 port 0 and returns the port the kernel chose (getsockname).
    func bindLoopback(_ fd: FileDescriptor) throws -> UInt16 {
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = UInt32(0x7f00_0001).bigEndian
        address.sin_port = 0
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                bind(fd.rawValue, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
            }
        }
        guard bound == 0 else { throw HarnessError.system("bind", plexus_errno()) }
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        let named = withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd.rawValue, $0, &length) }
        }
        guard named == 0 else { throw HarnessError.system("getsockname", plexus_errno()) }
        return UInt16(bigEndian: address.sin_port)
    }

    /// A non-blocking TCP listener on 127.0.0.1 and an ephemeral port.
    func tcpListener(backlog: Int32 = 512) throws -> (fd: FileDescriptor, port: UInt16, address: SocketAddress) {
        let fd = try inetSocket()
        var one: Int32 = 1
        _ = setsockopt(fd.rawValue, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        let port = try bindLoopback(fd)
        guard listen(fd.rawValue, backlog) == 0 else { throw HarnessError.system("listen", plexus_errno()) }
        return (fd, port, SocketAddress(ipv4: "127.0.0.1", port: port)!)
    }

    /// A TCP client connected to 127.0.0.1:`port` with a blocking connect(2), then made non-blocking.
    func tcpClient(port: UInt16) throws -> FileDescriptor {
        let fd = try inetSocket(nonBlocking: false)
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = UInt32(0x7f00_0001).bigEndian
        address.sin_port = port.bigEndian
        let connected = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                connect(fd.rawValue, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
            }
        }
        guard connected == 0 else { throw HarnessError.system("connect", plexus_errno()) }
        setNonBlocking(fd)
        return fd
    }

    /// A non-blocking UDP socket bound to 127.0.0.1 and an ephemeral port.
    func udpSocket() throws -> (fd: FileDescriptor, address: SocketAddress) {
        let fd = try inetSocket(type: Int32(SOCK_DGRAM.rawValue))
        let port = try bindLoopback(fd)
        return (fd, SocketAddress(ipv4: "127.0.0.1", port: port)!)
    }

    func setNonBlocking(_ fd: FileDescriptor) {
        let flags = fcntl(fd.rawValue, F_GETFL)
        _ = fcntl(fd.rawValue, F_SETFL, flags | O_NONBLOCK)
    }

    /// A directory made with mkdtemp for this test; removed at the end.
    func temporaryDirectory() throws -> String {
        if let tempDirectory { return tempDirectory }
        var template = Array("/tmp/plexus-tests-XXXXXX".utf8CString)
        guard mkdtemp(&template) != nil else { throw HarnessError.system("mkdtemp", plexus_errno()) }
        let path = String(decoding: template.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        tempDirectory = path
        return path
    }

    /// A path in the temp directory (the file is not created).
    func temporaryPath(_ name: String) throws -> String { try temporaryDirectory() + "/" + name }

    /// A file in the temp directory holding `contents`, opened O_RDWR | O_CLOEXEC, owned.
    func temporaryFile(_ name: String = "file", contents: [UInt8] = []) throws -> (fd: FileDescriptor, path: String) {
        let path = try temporaryPath(name)
        let fd = Glibc.open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw HarnessError.system("open \(path)", plexus_errno()) }
        if !contents.isEmpty {
            let n = contents.withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) }
            guard n == contents.count else { throw HarnessError.system("write", plexus_errno()) }
            _ = lseek(fd, 0, SEEK_SET)  // the test starts at the beginning of the file
        }
        return (own(fd), path)
    }

    private func removeTree(_ path: String) {
        guard let dir = opendir(path) else { return }
        while let entry = readdir(dir) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in
                String(decoding: raw.prefix { $0 != 0 }, as: UTF8.self)
            }
            if name == "." || name == ".." { continue }
            let child = path + "/" + name
            if entry.pointee.d_type == UInt8(DT_DIR) { removeTree(child) } else { unlink(child) }
        }
        closedir(dir)
        rmdir(path)
    }

    // MARK: Plain syscalls for the other side of a test

    /// write(2) of `bytes`, which must all be written.
    func writeAll(_ fd: FileDescriptor, _ bytes: [UInt8], sourceLocation: SourceLocation = #_sourceLocation) {
        let n = bytes.withUnsafeBytes { Glibc.write(fd.rawValue, $0.baseAddress, $0.count) }
        #expect(n == bytes.count, "write(2) on fd \(fd.rawValue): \(n), errno \(plexus_errno())", sourceLocation: sourceLocation)
    }

    func writeAll(_ fd: FileDescriptor, _ text: String, sourceLocation: SourceLocation = #_sourceLocation) {
        writeAll(fd, Array(text.utf8), sourceLocation: sourceLocation)
    }

    /// read(2) of whatever is there (non-blocking fds: [] when nothing is).
    func readNow(_ fd: FileDescriptor, max: Int = 65536) -> [UInt8] {
        var buffer = [UInt8](repeating: 0, count: max)
        let n = buffer.withUnsafeMutableBytes { Glibc.read(fd.rawValue, $0.baseAddress, $0.count) }
        return n > 0 ? Array(buffer[0..<n]) : []
    }

    /// Reads until `count` bytes arrived or `bound` passed (for fds outside the backend).
    func readExactly(_ fd: FileDescriptor, count: Int, within bound: Duration = defaultBound) throws -> [UInt8] {
        let deadline = Deadline.now + bound
        var data: [UInt8] = []
        while data.count < count {
            if Deadline.now >= deadline {
                Issue.record("read(2) of \(count) bytes from fd \(fd.rawValue) timed out with \(data.count)")
                throw HarnessError.timedOut("read(2)")
            }
            var pfd = pollfd(fd: fd.rawValue, events: Int16(POLLIN), revents: 0)
            _ = poll(&pfd, 1, 50)
            let chunk = readNow(fd, max: count - data.count)
            data += chunk
        }
        return data
    }

    // MARK: Names

    static func errnoName(_ code: Int32) -> String {
        let names: [Int32: String] = [
            EPERM: "EPERM", ENOENT: "ENOENT", EINTR: "EINTR", EBADF: "EBADF", EAGAIN: "EAGAIN",
            ENOMEM: "ENOMEM", EACCES: "EACCES", EFAULT: "EFAULT", EEXIST: "EEXIST", EINVAL: "EINVAL",
            EMFILE: "EMFILE", ESPIPE: "ESPIPE", EPIPE: "EPIPE", ENOSYS: "ENOSYS", ENOTSOCK: "ENOTSOCK",
            EOPNOTSUPP: "EOPNOTSUPP", EISCONN: "EISCONN", ENOTCONN: "ENOTCONN", ETIME: "ETIME",
            ECONNREFUSED: "ECONNREFUSED", ECONNRESET: "ECONNRESET", EALREADY: "EALREADY",
            EINPROGRESS: "EINPROGRESS", ECANCELED: "ECANCELED", EISDIR: "EISDIR", ENOTDIR: "ENOTDIR",
            EDESTADDRREQ: "EDESTADDRREQ", EMSGSIZE: "EMSGSIZE", ETIMEDOUT: "ETIMEDOUT",
        ]
        return names[code] ?? "errno \(code)"
    }
}

extension OperationKind {
    /// Kinds whose final completion must hand a buffer, vector or message back.
    var carriesBuffers: Bool {
        switch self {
        case .read, .write, .readv, .writev, .send, .recv, .sendMessage, .receiveMessage: true
        default: false
        }
    }
}

/// fcntl(F_GETFD) has FD_CLOEXEC.
func isCloseOnExec(_ fd: Int32) -> Bool { fcntl(fd, F_GETFD) & FD_CLOEXEC != 0 }
/// fcntl(F_GETFL) has O_NONBLOCK.
func isNonBlocking(_ fd: Int32) -> Bool { fcntl(fd, F_GETFL) & O_NONBLOCK != 0 }
/// fcntl(F_GETFD) says the fd is open.
func isOpen(_ fd: Int32) -> Bool { fcntl(fd, F_GETFD) >= 0 }

// MARK: Expectations

/// The operation failed with exactly `errno`, and its typed error names the operation and errno.
func expectError(_ outcome: Outcome, _ errno: Int32, _ comment: @autoclosure () -> String = "",
                 sourceLocation: SourceLocation = #_sourceLocation) {
    let note = comment().isEmpty ? "" : " (\(comment()))"
    #expect(outcome.result == -errno,
            "\(outcome.kind) should fail with \(Harness.errnoName(errno)), got \(outcome)\(note)",
            sourceLocation: sourceLocation)
    if let error = outcome.error {
        #expect(error.operation == outcome.kind.rawValue, sourceLocation: sourceLocation)
        #expect(error.errno.rawValue == -outcome.result, sourceLocation: sourceLocation)
        #expect(!error.message.isEmpty, sourceLocation: sourceLocation)
    }
}

/// The operation succeeded with `value`.
func expectResult(_ outcome: Outcome, _ value: Int32, _ comment: @autoclosure () -> String = "",
                  sourceLocation: SourceLocation = #_sourceLocation) {
    let note = comment().isEmpty ? "" : " (\(comment()))"
    #expect(outcome.result == value, "\(outcome.kind) should return \(value), got \(outcome)\(note)",
            sourceLocation: sourceLocation)
}

extension Array where Element == UInt8 {
    var text: String { String(decoding: self, as: UTF8.self) }
}

func bytes(_ text: String) -> [UInt8] { Array(text.utf8) }
