import CPlexus
import Glibc
@testable import Plexus
import Synchronization
import SystemPackage
import Testing

/// The echo path of the load test, on the loop thread only: a multishot accept, then per
/// connection recv -> send (all of it) -> recv until EOF, then close through Plexus.
final class LoadEchoServer: @unchecked Sendable {
    let loop: EventLoop
    let listener: FileDescriptor
    /// Written on the loop thread; read by other threads through the atomics.
    let open = Atomic<Int>(0)
    let accepted = Atomic<Int>(0)
    let echoed = Atomic<Int>(0)
    let errors = Atomic<Int>(0)
    var acceptToken: Token?

    init(loop: EventLoop, listener: FileDescriptor) {
        self.loop = loop
        self.listener = listener
    }

    func start() {
        acceptToken = loop.acceptMultishot(listener) { [self] result in
            switch result {
            case .success(let fd):
                open.add(1, ordering: .relaxed)
                accepted.add(1, ordering: .relaxed)
                receive(fd, IOBuffer(capacity: 4096))
            case .failure(let error):
                if error.errno != .canceled { errors.add(1, ordering: .relaxed) }
            }
        }
    }

    func stop() { if let acceptToken { loop.cancel(acceptToken) } }

    private func receive(_ fd: FileDescriptor, _ buffer: consuming IOBuffer) {
        buffer.clear()
        loop.recv(fd, buffer) { [self] result, buffer in
            switch result {
            case .success(0):
                finish(fd)
            case .success:
                send(fd, buffer)
            case .failure:
                errors.add(1, ordering: .relaxed)
                finish(fd)
            }
        }
    }

    private func send(_ fd: FileDescriptor, _ buffer: consuming IOBuffer) {
        loop.send(fd, buffer) { [self] result, buffer in
            switch result {
            case .success(let n):
                echoed.add(n, ordering: .relaxed)
                if buffer.isEmpty { receive(fd, buffer) } else { send(fd, buffer) }
            case .failure:
                errors.add(1, ordering: .relaxed)
                finish(fd)
            }
        }
    }

    private func finish(_ fd: FileDescriptor) {
        loop.close(fd) { [self] result in
            if case .failure = result { errors.add(1, ordering: .relaxed) }
            open.add(-1, ordering: .relaxed)
        }
    }
}

extension PlexusTests {
    /// Many connections at once through the event loop's echo path.
    @Suite struct Load {
        static let connections = 1000
        static let duration: Duration = .seconds(2)
        static let message = 64

        @Test(arguments: Backends.kinds)
        func `1000 concurrent loopback connections echo for 2 s; bytes match, fds and RSS come back`(kind: BackendKind) throws {
            var limits = rlimit()
            #expect(getrlimit(Faults.fileLimit, &limits) == 0)
            // 2 fds per connection plus the runner's: raise the soft limit to the hard one for the test.
            try Faults.withSoftLimit(Faults.fileLimit, limits.rlim_max) {
                var now = rlimit()
                _ = getrlimit(Faults.fileLimit, &now)
                if now.rlim_cur < rlim_t(2 * Self.connections + 200) {
                    try Test.cancel("skipped: RLIMIT_NOFILE hard limit \(now.rlim_max) is below \(2 * Self.connections + 200)")
                }
                let fdsBefore = openFileDescriptors().count
                let rssBefore = Faults.residentKiB()
                let rssPeak = try run(kind)
                // The loop, its backend and every connection are gone now.
                let fdsAfter = openFileDescriptors().count
                let rssAfter = Faults.residentKiB()
                let grew = rssAfter - rssBefore
                print("plexus-tests: load on \(kind): RSS \(rssBefore) KiB before, \(rssPeak) KiB peak, \(rssAfter) KiB after (\(grew >= 0 ? "+" : "")\(grew) KiB); fds \(fdsBefore) -> \(fdsAfter)")
                #expect(fdsAfter == fdsBefore, "fds: \(fdsBefore) before, \(fdsAfter) after")
                // The memory bound: what stays resident after everything closed, beyond the start.
                #expect(grew < 64 * 1024, "RSS grew by \(grew) KiB and stayed")
            }
        }

        /// Returns the peak RSS in KiB.
        func run(_ kind: BackendKind) throws -> Int {
            let listener = try LoopTestSupport.listener(backlog: 4096)
            defer { Glibc.close(listener.fd) }
            let loop = try Backends.loopThread(kind)
            let server = LoadEchoServer(loop: loop, listener: FileDescriptor(rawValue: listener.fd))
            loop.execute { server.start() }

            // The clients: plain non-blocking sockets driven by poll(2) on this thread.
            var clients: [Int32] = []
            clients.reserveCapacity(Self.connections)
            defer { for fd in clients { Glibc.close(fd) } }
            for _ in 0..<Self.connections {
                let fd = try LoopTestSupport.connect(to: listener.address)
                let flags = fcntl(fd, F_GETFL)
                _ = fcntl(fd, F_SETFL, flags | O_NONBLOCK)
                clients.append(fd)
            }
            let acceptDeadline = Deadline.now + .seconds(10)
            while server.accepted.load(ordering: .relaxed) < Self.connections && Deadline.now < acceptDeadline { usleep(1000) }
            #expect(server.accepted.load(ordering: .relaxed) == Self.connections, "accepted \(server.accepted.load(ordering: .relaxed))")

            var outstanding = [Int](repeating: 0, count: Self.connections)
            var sent = 0, received = 0, rounds = 0
            var payload = [UInt8](repeating: 0, count: Self.message)
            var scratch = [UInt8](repeating: 0, count: 65536)
            var pollfds = clients.map { pollfd(fd: $0, events: Int16(POLLIN), revents: 0) }
            let stopSending = Deadline.now + Self.duration
            let hardStop = stopSending + .seconds(15)
            var rssPeak = 0
            while Deadline.now < hardStop {
                let sending = Deadline.now < stopSending
                if !sending && outstanding.allSatisfy({ $0 == 0 }) { break }
                if sending {
                    for i in 0..<clients.count where outstanding[i] == 0 {
                        for j in 0..<Self.message { payload[j] = UInt8(truncatingIfNeeded: i &+ j &+ rounds) }
                        let n = payload.withUnsafeBytes { Glibc.write(clients[i], $0.baseAddress, $0.count) }
                        if n > 0 { sent += n; outstanding[i] += n }
                    }
                    rounds += 1
                }
                _ = poll(&pollfds, nfds_t(pollfds.count), 10)
                for i in 0..<pollfds.count where pollfds[i].revents != 0 {
                    pollfds[i].revents = 0
                    while true {
                        let n = scratch.withUnsafeMutableBytes { Glibc.read(clients[i], $0.baseAddress, $0.count) }
                        if n <= 0 { break }
                        received += n
                        outstanding[i] -= n
                    }
                }
                if rounds % 16 == 0 { rssPeak = max(rssPeak, Faults.residentKiB()) }
            }
            rssPeak = max(rssPeak, Faults.residentKiB())
            #expect(outstanding.allSatisfy { $0 == 0 }, "connections still waiting for their echo: \(outstanding.filter { $0 != 0 }.count)")
            #expect(sent == received, "clients sent \(sent) bytes and received \(received)")
            #expect(sent >= Self.connections * Self.message, "every connection carried traffic")

            // Every connection closed: the server sees EOF and closes its side through Plexus.
            for fd in clients { Glibc.close(fd) }
            clients.removeAll()
            let closeDeadline = Deadline.now + .seconds(10)
            while server.open.load(ordering: .relaxed) > 0 && Deadline.now < closeDeadline { usleep(1000) }
            #expect(server.open.load(ordering: .relaxed) == 0, "server connections still open: \(server.open.load(ordering: .relaxed))")
            loop.execute { server.stop() }
            loop.shutdownAndWait()
            // Counted in the send callbacks, which may run after the client already read the echo.
            #expect(server.echoed.load(ordering: .relaxed) == sent, "the server echoed \(server.echoed.load(ordering: .relaxed)) of \(sent)")
            #expect(server.errors.load(ordering: .relaxed) == 0, "the echo path saw \(server.errors.load(ordering: .relaxed)) errors")
            print("plexus-tests: load on \(kind): \(Self.connections) connections, \(rounds) rounds, \(sent) bytes echoed in \(Self.duration)")
            return rssPeak
        }
    }
}
