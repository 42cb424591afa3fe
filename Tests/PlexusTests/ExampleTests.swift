import CPlexus
import Foundation
import Glibc
@testable import Plexus
import SystemPackage
import Testing

extension PlexusTests {
    /// The example executables, run as a user would: plexus-ping against raw RESP and the
    /// real redis-cli, plexus-grep on files. Built next to the tests (`swift build --build-tests`).
    @Suite struct ExampleTests {
        static let adapters = ["callback", "async"]

        /// Where `redis-cli` is on PATH, if it is installed.
        static let redisCli: String? = {
            let path = ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin"
            return path.split(separator: ":").map { "\($0)/redis-cli" }.first { access($0, X_OK) == 0 }
        }()

        // MARK: plexus-ping

        @Test(arguments: Backends.kinds, adapters)
        func `plexus-ping answers inline, multibulk, pipelined and partial commands`(kind: BackendKind, adapter: String) throws {
            _ = try Backends.start(kind)
            let server = try PingServer(kind: kind, adapter: adapter)
            defer { server.stop() }
            let client = try BlockingClient(port: server.port)
            defer { client.close() }

            try client.send("PING\r\n")
            #expect(try client.receive(7) == "+PONG\r\n")
            try client.send("*1\r\n$4\r\nPING\r\n")
            #expect(try client.receive(7) == "+PONG\r\n")

            // 100 pipelined commands in one write, inline and multibulk mixed: 100 answers.
            let burst = (0..<100).map { $0 % 2 == 0 ? "PING\r\n" : "*1\r\n$4\r\nping\r\n" }.joined()
            try client.send(burst)
            #expect(try client.receive(700) == String(repeating: "+PONG\r\n", count: 100))

            // 5000 in one write: more than one read's worth, and more answers than one output
            // buffer holds (answered in several writes, in order).
            try client.send(String(repeating: "*1\r\n$4\r\nPING\r\n", count: 2500) + String(repeating: "PING\r\n", count: 2500))
            #expect(try client.receive(5000 * 7) == String(repeating: "+PONG\r\n", count: 5000))

            // A command split over several writes is answered once it is complete.
            for piece in ["*1\r", "\n$4\r\nPI", "NG", "\r", "\n"] {
                try client.send(piece)
                usleep(20_000)
            }
            #expect(try client.receive(7) == "+PONG\r\n")
            for piece in ["PI", "NG\r\nPI", "NG\r\n"] {
                try client.send(piece)
                usleep(10_000)
            }
            #expect(try client.receive(14) == "+PONG\r\n+PONG\r\n")

            // PING with a message, ECHO, an unknown command.
            try client.send("*2\r\n$4\r\nPING\r\n$5\r\nhello\r\nECHO hi\r\nFLUSHALL\r\n")
            let expected = "$5\r\nhello\r\n$2\r\nhi\r\n-ERR unknown command 'FLUSHALL'\r\n"
            #expect(try client.receive(expected.utf8.count) == expected)

            // A command name holding CR LF: the error line names it with spaces instead, so
            // the next reply still starts on a line of its own.
            try client.send("*1\r\n$4\r\nA\r\nB\r\nPING\r\n")
            let unknown = "-ERR unknown command 'A  B'\r\n+PONG\r\n"
            #expect(try client.receive(unknown.utf8.count) == unknown)

            // A message bigger than the session's buffers, sent in pieces.
            let big = String(repeating: "z", count: 100_000)
            try client.send("*2\r\n$4\r\nPING\r\n$100000\r\n" + big + "\r\n")
            let answer = "$100000\r\n" + big + "\r\n"
            #expect(try client.receive(answer.utf8.count) == answer)

            // QUIT answers, then closes.
            try client.send("QUIT\r\n")
            #expect(try client.receive(5) == "+OK\r\n")
            #expect(try client.receiveToEnd() == "")

            // A protocol error is answered, then the connection closed (as redis does).
            let other = try BlockingClient(port: server.port)
            defer { other.close() }
            try other.send("*1\r\n%4\r\nPING\r\n")
            #expect(try other.receiveToEnd().hasPrefix("-ERR Protocol error"))
        }

        /// A protocol error behind pipelined commands whose answers leave the output buffer
        /// almost full is still answered before the connection closes. Its error line
        /// used to be dropped when it did not fit beside them (n of 2335-2340 PINGs): the
        /// client saw the PONGs, then the connection end, and no error.
        @Test(arguments: Backends.kinds, adapters)
        func `plexus-ping answers a protocol error behind a burst that fills its output`(kind: BackendKind, adapter: String) throws {
            _ = try Backends.start(kind)
            let server = try PingServer(kind: kind, adapter: adapter, loops: 1)
            defer { server.stop() }
            for count in 2330...2342 {
                let client = try BlockingClient(port: server.port)
                defer { client.close() }
                try client.send(String(repeating: "PING\r\n", count: count) + "*1\r\n%4\r\nPING\r\n")
                let got = try client.receiveToEnd()
                let pongs = String(repeating: "+PONG\r\n", count: count)
                #expect(got.hasPrefix(pongs), "\(count) PINGs: \(got.utf8.count) bytes")
                #expect(String(decoding: got.utf8.dropFirst(pongs.utf8.count), as: UTF8.self).hasPrefix("-ERR Protocol error"),
                        "\(count) PINGs then a protocol error: the error was not answered")
            }
        }

        /// A client that announces a huge argument and keeps sending it is cut off once its
        /// unfinished command holds `--max-query` bytes; a command under the limit is
        /// answered, and the server serves on. The input buffer used to grow without bound:
        /// 160 MiB of three unfinished 64 MiB arguments took the server from 12 to 176 MB.
        @Test(arguments: Backends.kinds, adapters)
        func `plexus-ping closes a connection whose unfinished command passes --max-query`(kind: BackendKind, adapter: String) throws {
            _ = try Backends.start(kind)
            let server = try PingServer(kind: kind, adapter: adapter, loops: 1, options: ["--max-query", "65536"])
            defer { server.stop() }
            let big = String(repeating: "x", count: 60_000)
            let under = try BlockingClient(port: server.port)
            defer { under.close() }
            try under.send("*2\r\n$4\r\nPING\r\n$60000\r\n\(big)\r\n")
            #expect(try under.receive(60_000 + 10) == "$60000\r\n\(big)\r\n")

            let over = try BlockingClient(port: server.port)
            defer { over.close() }
            try over.send("*2\r\n$4\r\nPING\r\n$50000000\r\n")
            // Sends until the server closes (a reset ends the send early: that is the close).
            for _ in 0..<64 { if (try? over.send(String(repeating: "y", count: 16_384))) == nil { break } }
            // Closed: end of file, or a reset for the bytes it never read; not the 10 s
            // receive timeout (EAGAIN) of a connection still open.
            do {
                #expect(try over.receiveToEnd() == "", "no answer to a command cut off")
            } catch HarnessError.system(_, let e) {
                #expect(e == ECONNRESET, "the connection was not closed: \(String(cString: strerror(e)))")
            }

            let after = try BlockingClient(port: server.port)
            defer { after.close() }
            try after.send("PING\r\n")
            #expect(try after.receive(7) == "+PONG\r\n")
        }

        @Test(.enabled(if: redisCli != nil, "redis-cli is not installed (apt-get install redis-tools)"),
              arguments: Backends.kinds, adapters)
        func `plexus-ping answers a real redis-cli PING`(kind: BackendKind, adapter: String) throws {
            _ = try Backends.start(kind)
            let server = try PingServer(kind: kind, adapter: adapter)
            defer { server.stop() }
            let ping = try runChild([Self.redisCli!, "-p", String(server.port), "PING"], within: .seconds(20))
            #expect(ping.exitCode == 0, "\(ping)")
            #expect(ping.stdout == "PONG\n", "\(ping)")
            let echo = try runChild([Self.redisCli!, "-p", String(server.port), "PING", "plexus"], within: .seconds(20))
            #expect(echo.stdout == "plexus\n", "\(echo)")
        }

        /// Out of fds (EMFILE) for a while, plexus-ping goes on accepting once some are
        /// free again, with either adapter. Before, the async adapter's accept loop ended
        /// at the first error and no later connection was ever served.
        @Test(arguments: Backends.kinds, adapters)
        func `plexus-ping accepts again after running out of fds`(kind: BackendKind, adapter: String) throws {
            _ = try Backends.start(kind)
            let server = try PingServer(kind: kind, adapter: adapter, loops: 1, fdLimit: 32)
            defer { server.stop() }
            // More connections than the server has fds: its accepts fail with EMFILE.
            var crowd: [BlockingClient] = []
            for _ in 0..<48 { crowd.append(try BlockingClient(port: server.port)) }
            usleep(200_000)
            for client in crowd { client.close() }
            usleep(300_000)  // the server's fds close; the callback adapter pauses 100 ms
            let client = try BlockingClient(port: server.port)
            defer { client.close() }
            try client.send("PING\r\n")
            #expect(try client.receive(7) == "+PONG\r\n")
            #expect(readWholeFile(server.directory + "/stderr").contains("Too many open files"),
                    "the server never ran out of fds: the test proves nothing")
        }

        /// accept(2) errors that end one connection, not the listener (ECONNABORTED, EPROTO)
        /// do not stop a multishot accept: plexus-ping serves on without a word. Once failed
        /// on epoll and poll: the first such error ended the accept (the callback adapter's
        /// multishot, the async adapter's `connections()`), and plexus-ping had to log it
        /// and start accepting again after a pause. The errors come from an LD_PRELOAD
        /// library (scripts/fail-accept4.c); io_uring accepts in the kernel, out of its reach.
        @Test(arguments: Backends.kinds, adapters)
        func `plexus-ping accepts on past an aborted connection`(kind: BackendKind, adapter: String) throws {
            _ = try Backends.start(kind)
            guard kind != .ioUring else { try Test.cancel("skipped: io_uring accepts in the kernel, where LD_PRELOAD cannot fail it") }
            guard getenv("PLEXUS_SANITIZER") == nil else { try Test.cancel("skipped: a sanitizer runtime must be the first preloaded library") }
            let library = try Self.failAccept4Library()
            defer { unlink(library) }
            for code in [ECONNABORTED, EPROTO] {
                // The server's first accept4 calls (its start-up probe's connection) fail.
                let server = try PingServer(kind: kind, adapter: adapter, loops: 1, setting: [
                    "LD_PRELOAD": library, "PLEXUS_FAIL_FROM": "1", "PLEXUS_FAIL_COUNT": "3", "PLEXUS_FAIL_ERRNO": String(code),
                ])
                defer { server.stop() }
                let client = try BlockingClient(port: server.port)
                defer { client.close() }
                try client.send("PING\r\n")
                #expect(try client.receive(7) == "+PONG\r\n")
                let log = readWholeFile(server.directory + "/stderr")
                #expect(!log.contains("accept"), "errno \(code) stopped the accept: \(log)")
            }
        }

        /// scripts/fail-accept4.c built with the toolchain's clang (or cc) into a temp file.
        static func failAccept4Library() throws -> String {
            let source = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
                .deletingLastPathComponent().appendingPathComponent("scripts/fail-accept4.c").path
            // The Swift toolchain ships clang; PATH usually has it (or cc).
            let path = ProcessInfo.processInfo.environment["PATH"] ?? ""
            let compilers = path.split(separator: ":").flatMap { ["\($0)/clang", "\($0)/cc"] } + ["/opt/swift/usr/bin/clang", "/usr/bin/cc"]
            guard let compiler = compilers.first(where: { access($0, X_OK) == 0 }) else {
                try Test.cancel("skipped: no C compiler to build \(source)")
            }
            let library = "/tmp/plexus-fail-accept4-\(getpid()).so"
            let built = try runChild([compiler, "-shared", "-fPIC", "-O1", "-o", library, source, "-ldl"])
            try #require(built.exitCode == 0, "\(built)")
            return library
        }

        // MARK: plexus-grep

        @Test(arguments: Backends.kinds)
        func `plexus-grep prints the matching lines of files`(kind: BackendKind) throws {
            _ = try Backends.start(kind)
            let grep = try builtExecutable("plexus-grep")
            let first = "/tmp/plexus-grep-\(getpid())-a.txt"
            let second = "/tmp/plexus-grep-\(getpid())-b.txt"
            defer { unlink(first); unlink(second) }
            // Enough lines to span several 64 KiB reads, and a last line without a newline.
            var text = (1...20_000).map { $0 % 1000 == 0 ? "line \($0) has the needle" : "line \($0) has nothing" }
                .joined(separator: "\n")
            text += "\nlast needle"
            try text.write(toFile: first, atomically: false, encoding: .utf8)
            try "Needle in caps\nno match\n".write(toFile: second, atomically: false, encoding: .utf8)

            let one = try runChild([grep, "-n", "needle", first], setting: ["PLEXUS_BACKEND": kind.rawValue])
            #expect(one.exitCode == 0, "\(one)")
            let expected = (1...20).map { "\($0 * 1000):line \($0 * 1000) has the needle\n" }.joined() + "20001:last needle\n"
            #expect(one.stdout == expected)

            let two = try runChild([grep, "-i", "NEEDLE", second, first], setting: ["PLEXUS_BACKEND": kind.rawValue])
            #expect(two.exitCode == 0, "\(two)")
            let lines = two.stdout.split(separator: "\n")
            #expect(lines.count == 22)
            #expect(lines.first == "\(second):Needle in caps")
            #expect(lines.last == "\(first):last needle")

            let none = try runChild([grep, "absent", second], setting: ["PLEXUS_BACKEND": kind.rawValue])
            #expect(none.exitCode == 1, "\(none)")
            #expect(none.stdout == "")

            let missing = try runChild([grep, "x", first + "-missing"], setting: ["PLEXUS_BACKEND": kind.rawValue])
            #expect(missing.exitCode == 2, "\(missing)")
            #expect(missing.stderr.contains("No such file"))

            // stdin is /dev/null here: nothing matches.
            let empty = try runChild([grep, "x"], setting: ["PLEXUS_BACKEND": kind.rawValue])
            #expect(empty.exitCode == 1, "\(empty)")
        }

        /// Files that are pipes are read too, as grep reads them: a process substitution
        /// (`<(...)`, a pipe under /dev/fd) and /dev/stdin when stdin is a pipe. They
        /// used to fail with ESPIPE ("Illegal seek", status 2): every named file was read
        /// with positional reads.
        @Test(arguments: Backends.kinds)
        func `plexus-grep reads files that are pipes`(kind: BackendKind) throws {
            _ = try Backends.start(kind)
            let grep = try builtExecutable("plexus-grep")
            let substituted = try runChild(["/bin/bash", "-c", #""$0" -n a <(printf 'xa\nb\nab\n')"#, grep],
                                           setting: ["PLEXUS_BACKEND": kind.rawValue])
            #expect(substituted.exitCode == 0, "\(substituted)")
            #expect(substituted.stdout == "1:xa\n3:ab\n", "\(substituted)")
            let stdin = try runChild(["/bin/bash", "-c", #"printf 'xa\nb\n' | "$0" a /dev/stdin"#, grep],
                                     setting: ["PLEXUS_BACKEND": kind.rawValue])
            #expect(stdin.exitCode == 0, "\(stdin)")
            #expect(stdin.stdout == "xa\n", "\(stdin)")
        }

        /// When the reader of its output goes away (`| head -1`), plexus-grep ends as grep
        /// does, killed by SIGPIPE (status 141 in a shell). Before, its loop threads, which
        /// block SIGPIPE, took the EPIPE for nothing and read the whole input (exit 0).
        @Test(arguments: Backends.kinds)
        func `plexus-grep ends by SIGPIPE when its reader leaves`(kind: BackendKind) throws {
            _ = try Backends.start(kind)
            let grep = try builtExecutable("plexus-grep")
            let file = "/tmp/plexus-grep-\(getpid())-pipe.txt"
            defer { unlink(file) }
            // Far more than a pipe holds, so plexus-grep writes after head has left.
            try (1...200_000).map { "line \($0)" }.joined(separator: "\n").write(toFile: file, atomically: false, encoding: .utf8)
            let run = try runChild(["/bin/bash", "-c", #""$0" line "$1" | head -1; echo "status ${PIPESTATUS[0]}" >&2"#, grep, file],
                                   setting: ["PLEXUS_BACKEND": kind.rawValue])
            #expect(run.stdout == "line 1\n", "\(run)")
            #expect(run.stderr.hasSuffix("status 141\n"), "\(run)")
        }
    }
}

/// plexus-ping running in the background on a free port; `stop()` ends it with SIGTERM.
private struct PingServer {
    let pid: pid_t
    let port: UInt16
    let directory: String

    /// `fdLimit`: started through bash with `ulimit -n` set to it.
    init(kind: BackendKind, adapter: String, loops: Int = 2, fdLimit: Int? = nil, setting: [String: String] = [:],
         options: [String] = [], sourceLocation: SourceLocation = #_sourceLocation) throws {
        let executable = try builtExecutable("plexus-ping", sourceLocation: sourceLocation)
        port = try Self.freePort()
        directory = try makeOutputDirectory("plexus-ping")
        var environment = ProcessInfo.processInfo.environment
        environment["PLEXUS_BACKEND"] = kind.rawValue
        environment.merge(setting) { _, new in new }
        var arguments = [executable, "--port", String(port), "--loops", String(loops), "--adapter", adapter] + options
        if let fdLimit { arguments = ["/bin/bash", "-c", "ulimit -n \(fdLimit) && exec \"$@\"", "bash"] + arguments }
        pid = try spawnChild(arguments, environment: environment, outputIn: directory)

        // Up when a connect succeeds (at most 10 s).
        for _ in 0..<1000 {
            if let client = try? BlockingClient(port: port) {
                client.close()
                return
            }
            var status: Int32 = 0
            if waitpid(pid, &status, WNOHANG) == pid {
                Issue.record("plexus-ping exited early: \(readWholeFile(directory + "/stderr"))", sourceLocation: sourceLocation)
                throw HarnessError.timedOut("plexus-ping to start")
            }
            usleep(10_000)
        }
        stop()
        throw HarnessError.timedOut("plexus-ping to listen on \(port)")
    }

    /// SIGTERM, then wait (SIGKILL after 10 s); a clean stop exits 0.
    func stop(sourceLocation: SourceLocation = #_sourceLocation) {
        kill(pid, SIGTERM)
        var status: Int32 = 0
        var exited = false
        for _ in 0..<1000 {
            if waitpid(pid, &status, WNOHANG) == pid { exited = true; break }
            usleep(10_000)
        }
        if !exited {
            kill(pid, SIGKILL)
            _ = waitpid(pid, &status, 0)
            Issue.record("plexus-ping did not stop on SIGTERM", sourceLocation: sourceLocation)
        } else {
            #expect(status & 0x7f == 0 && (status >> 8) & 0xff == 0,
                    "plexus-ping exit status \(status): \(readWholeFile(directory + "/stderr"))", sourceLocation: sourceLocation)
        }
        unlink(directory + "/stdout")
        unlink(directory + "/stderr")
        rmdir(directory)
    }

    /// A port nothing listens on now (bound to port 0, then released).
    static func freePort() throws -> UInt16 {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue | SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw HarnessError.system("socket", plexus_errno()) }
        defer { Glibc.close(fd) }
        var address = SocketAddress.loopback(port: 0)
        guard address.withSockaddr({ Glibc.bind(fd, $0, $1) }) == 0 else { throw HarnessError.system("bind", plexus_errno()) }
        address = try Socket.address(FileDescriptor(rawValue: fd), peer: false)
        return address.port!
    }
}

/// A plain blocking TCP client with a receive timeout: the test's side of the conversation.
/// Calls interrupted by a signal (EINTR) are retried.
private struct BlockingClient {
    let fd: Int32

    init(port: UInt16) throws {
        fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue | SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw HarnessError.system("socket", plexus_errno()) }
        var timeout = timeval(tv_sec: 10, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        let address = SocketAddress.loopback(port: port)
        guard address.withSockaddr({ Glibc.connect(fd, $0, $1) }) == 0 else {
            let e = plexus_errno()
            Glibc.close(fd)
            throw HarnessError.system("connect", e)
        }
    }

    func send(_ text: String) throws {
        var bytes = Array(text.utf8)[...]
        while !bytes.isEmpty {
            let n = bytes.withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            if n < 0 && plexus_errno() == EINTR { continue }
            guard n > 0 else { throw HarnessError.system("send", plexus_errno()) }
            bytes = bytes.dropFirst(n)
        }
    }

    /// Exactly `count` bytes (fails after the receive timeout).
    func receive(_ count: Int) throws -> String {
        var data: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 65536)
        while data.count < count {
            let n = chunk.withUnsafeMutableBytes { Glibc.recv(fd, $0.baseAddress, min($0.count, count - data.count), 0) }
            if n < 0 && plexus_errno() == EINTR { continue }
            guard n > 0 else { throw HarnessError.system("recv (\(data.count) of \(count) bytes)", n == 0 ? ECONNRESET : plexus_errno()) }
            data += chunk[0..<n]
        }
        return String(decoding: data, as: UTF8.self)
    }

    /// Everything until the server closes.
    func receiveToEnd() throws -> String {
        var data: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = chunk.withUnsafeMutableBytes { Glibc.recv(fd, $0.baseAddress, $0.count, 0) }
            if n == 0 { break }
            if n < 0 && plexus_errno() == EINTR { continue }
            guard n > 0 else { throw HarnessError.system("recv", plexus_errno()) }
            data += chunk[0..<n]
        }
        return String(decoding: data, as: UTF8.self)
    }

    func close() { Glibc.close(fd) }
}
