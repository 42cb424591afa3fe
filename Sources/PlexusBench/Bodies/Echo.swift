import CPlexus
import Glibc
import Plexus
import SystemPackage

// TCP echo on loopback (echo-1, echo-50): N connected pairs, client and server ends on
// the same thread and the same loop. Each client sends a 64-byte message, the server
// echoes what it receives, the client reads until it has all 64 bytes, checks them and
// sends the next message. One operation = one request/echo round trip. Latency is per
// request, from the client's send to the last echoed byte (one clock read per request).
// One step = one turn of the loop (one wait).
//
// Plexus:
//   raw       backend.prepare(.send/.recv); the client posts its send and its recv
//             together, the server posts recv, then send on receipt, then recv again.
//   callback  the same with loop.send / loop.recv callbacks; each captures one
//             per-connection object (no allocation for the closure).
// Baselines (same fds: blocking on io_uring, O_NONBLOCK on epoll/poll):
//   raw-io_uring  the same SEND/RECV sequence as SQEs, io_uring_submit_and_wait(1) per turn.
//   raw-epoll     every fd registered once (EPOLLIN, level-triggered); a readiness loop
//                 writes a 64-byte message straight away (a fresh socket is writable), so per
//                 request: client write(2), server read(2)+write(2), client read(2), plus
//                 epoll_wait turns.
//   raw-poll      the same with poll over all 2N fds.
// Checked: every echo carries the sequence number and connection index the client sent
// and exactly 64 bytes, in order.

let echoMessageSize = 64

/// The 64-byte message: word 0 names the connection and the request, the rest is a pattern.
@inline(__always)
func fillEchoMessage(_ p: UnsafeMutableRawPointer, connection: Int, sequence: UInt64) {
    p.storeBytes(of: UInt64(connection) << 48 | sequence, as: UInt64.self)
    for i in 8..<echoMessageSize { p.storeBytes(of: UInt8(truncatingIfNeeded: i &+ connection), toByteOffset: i, as: UInt8.self) }
}

@inline(__always)
func checkEchoMessage(_ p: UnsafeRawPointer, count: Int, connection: Int, sequence: UInt64) throws {
    guard count == echoMessageSize,
          p.loadUnaligned(as: UInt64.self) == UInt64(connection) << 48 | sequence,
          p.load(fromByteOffset: echoMessageSize - 1, as: UInt8.self) == UInt8(truncatingIfNeeded: echoMessageSize - 1 + connection)
    else {
        throw BenchmarkError.wrong("connection \(connection) request \(sequence): echo of \(count) bytes does not match")
    }
}

func makeEchoBody(_ c: BenchmarkCase, connections: Int, sampler: LatencySampler) throws -> BenchmarkBody {
    let pairs = try makeTCPPairs(connections, nonBlocking: c.backend.mechanism.wantsNonBlockingFDs)
    do {
        switch (c.backend, c.adapter) {
        case (.rawIoUring, _): return try RawURingEcho(pairs, sampler: sampler)
        case (.rawEpoll, _), (.rawPoll, _): return try RawReadinessEcho(pairs, sampler: sampler, epoll: c.backend == .rawEpoll)
        case (_, .raw): return BackendEcho(pairs, sampler: sampler, backend: try startBackend(c.backend))
        default: return try LoopEcho(pairs, sampler: sampler, choice: c.backend.choice!)
        }
    } catch {
        for pair in pairs { Glibc.close(pair.client); Glibc.close(pair.server) }
        throw error
    }
}

/// Counts requests and records their latencies; remembers the first failure.
final class EchoStats {
    let sampler: LatencySampler
    @exclusivity(unchecked) var requests = 0
    @exclusivity(unchecked) var failure: (any Error)?
    @exclusivity(unchecked) var stopping = false

    init(sampler: LatencySampler) { self.sampler = sampler }

    @inline(__always)
    func completed(sentAt: UInt64, now: UInt64) {
        requests += 1
        sampler.record(now &- sentAt)
    }

    func fail(_ error: any Error) {
        if failure == nil && !stopping { failure = error }
    }
}

// MARK: raw-io_uring

final class RawURingEcho: BenchmarkBody {
    struct Connection {
        let client: Int32
        let server: Int32
        let clientSend: UnsafeMutableRawPointer
        let clientRecv: UnsafeMutableRawPointer
        let serverBuffer: UnsafeMutableRawPointer
        var sequence: UInt64 = 0
        var sentAt: UInt64 = 0
        var received = 0
        var sendDone = true
        var echoed = false
    }

    static let clientSend: UInt64 = 0, clientRecv: UInt64 = 1, serverRecv: UInt64 = 2, serverSend: UInt64 = 3

    let ring: RawRing
    let stats: EchoStats
    @exclusivity(unchecked) var connections: [Connection]
    @exclusivity(unchecked) var outstanding = 0
    var recordsOwnLatency: Bool { true }

    init(_ pairs: [(client: Int32, server: Int32)], sampler: LatencySampler) throws {
        ring = try RawRing()
        stats = EchoStats(sampler: sampler)
        let memory = UnsafeMutableRawPointer.allocate(byteCount: pairs.count * 3 * echoMessageSize, alignment: 64)
        connections = pairs.enumerated().map { i, pair in
            Connection(client: pair.client, server: pair.server,
                       clientSend: memory + (3 * i) * echoMessageSize,
                       clientRecv: memory + (3 * i + 1) * echoMessageSize,
                       serverBuffer: memory + (3 * i + 2) * echoMessageSize)
        }
        for i in connections.indices {
            prepServerRecv(i)
            startRequest(i)
        }
    }

    @inline(__always)
    private func prep(_ data: UInt64, _ body: (UnsafeMutablePointer<io_uring_sqe>) -> Void) {
        let sqe = ring.sqe()
        body(sqe)
        io_uring_sqe_set_data64(sqe, data)
        outstanding += 1
    }

    private func prepServerRecv(_ i: Int) {
        let c = connections[i]
        prep(UInt64(i) << 2 | Self.serverRecv) { io_uring_prep_recv($0, c.server, c.serverBuffer, echoMessageSize, 0) }
    }

    private func startRequest(_ i: Int) {
        connections[i].sequence &+= 1
        connections[i].received = 0
        connections[i].sendDone = false
        connections[i].echoed = false
        let c = connections[i]
        fillEchoMessage(c.clientSend, connection: i, sequence: c.sequence)
        connections[i].sentAt = monotonicNanoseconds()
        prep(UInt64(i) << 2 | Self.clientSend) { io_uring_prep_send($0, c.client, c.clientSend, echoMessageSize, 0) }
        prep(UInt64(i) << 2 | Self.clientRecv) { io_uring_prep_recv($0, c.client, c.clientRecv, echoMessageSize, 0) }
    }

    private func complete(_ data: UInt64, _ res: Int32) throws {
        outstanding -= 1
        if stats.stopping { return }
        let i = Int(data >> 2)
        let c = connections[i]
        switch data & 3 {
        case Self.clientSend:
            guard res == Int32(echoMessageSize) else { throw BenchmarkError.wrong("client send returned \(res)") }
            connections[i].sendDone = true
            if connections[i].echoed { startRequest(i) }
        case Self.clientRecv:
            guard res > 0 else { throw BenchmarkError.wrong("client recv returned \(res)") }
            let received = c.received + Int(res)
            connections[i].received = received
            if received < echoMessageSize {
                prep(data) { io_uring_prep_recv($0, c.client, c.clientRecv + received, echoMessageSize - received, 0) }
                return
            }
            try checkEchoMessage(c.clientRecv, count: received, connection: i, sequence: c.sequence)
            let now = monotonicNanoseconds()
            stats.completed(sentAt: c.sentAt, now: now)
            connections[i].echoed = true
            if connections[i].sendDone { startRequest(i) }
        case Self.serverRecv:
            guard res > 0 else { throw BenchmarkError.wrong("server recv returned \(res)") }
            prep(UInt64(i) << 2 | Self.serverSend) { io_uring_prep_send($0, c.server, c.serverBuffer, Int(res), 0) }
        default:
            guard res > 0 else { throw BenchmarkError.wrong("server send returned \(res)") }
            prepServerRecv(i)
        }
    }

    func step() throws -> Int {
        let before = stats.requests
        try ring.submitAndWait(1)
        _ = try ring.reap { data, res in try complete(data, res) }
        return stats.requests - before
    }

    func finish() throws {
        stats.stopping = true
        for c in connections { Glibc.shutdown(c.client, Int32(SHUT_RDWR)); Glibc.shutdown(c.server, Int32(SHUT_RDWR)) }
        while outstanding > 0 {
            try ring.submitAndWait(1)
            _ = try ring.reap { data, res in try complete(data, res) }
        }
        for c in connections { Glibc.close(c.client); Glibc.close(c.server) }
        connections.first.map { $0.clientSend.deallocate() }
    }
}

// MARK: raw-epoll, raw-poll

final class RawReadinessEcho: BenchmarkBody {
    struct Connection {
        let client: Int32
        let server: Int32
        var sequence: UInt64 = 0
        var sentAt: UInt64 = 0
        var received = 0
    }

    let stats: EchoStats
    @exclusivity(unchecked) var connections: [Connection]
    let epoll: RawEpoll?
    let poll: RawPoll?
    let message = UnsafeMutableRawPointer.allocate(byteCount: echoMessageSize, alignment: 64)
    let receive: UnsafeMutableRawPointer
    let serverBuffer = UnsafeMutableRawPointer.allocate(byteCount: echoMessageSize, alignment: 64)
    var recordsOwnLatency: Bool { true }

    init(_ pairs: [(client: Int32, server: Int32)], sampler: LatencySampler, epoll useEpoll: Bool) throws {
        stats = EchoStats(sampler: sampler)
        connections = pairs.map { Connection(client: $0.client, server: $0.server) }
        receive = .allocate(byteCount: pairs.count * echoMessageSize, alignment: 64)
        if useEpoll {
            epoll = try RawEpoll(capacity: Int32(2 * pairs.count))
            poll = nil
            for (i, pair) in pairs.enumerated() {
                try epoll!.add(pair.client, data: UInt64(i) << 1)
                try epoll!.add(pair.server, data: UInt64(i) << 1 | 1)
            }
        } else {
            epoll = nil
            poll = RawPoll(capacity: 2 * pairs.count)
            for pair in pairs {
                poll!.add(pair.client)
                poll!.add(pair.server)
            }
        }
        for i in connections.indices { try startRequest(i) }
    }

    deinit {
        message.deallocate()
        receive.deallocate()
        serverBuffer.deallocate()
    }

    private func startRequest(_ i: Int) throws {
        connections[i].sequence &+= 1
        connections[i].received = 0
        fillEchoMessage(message, connection: i, sequence: connections[i].sequence)
        connections[i].sentAt = monotonicNanoseconds()
        let n = Glibc.write(connections[i].client, message, echoMessageSize)
        guard n == echoMessageSize else { throw BenchmarkError.wrong("client write returned \(n)") }
    }

    @inline(__always)
    private func ready(_ i: Int, server: Bool) throws {
        let c = connections[i]
        if server {
            let n = Glibc.read(c.server, serverBuffer, echoMessageSize)
            if n < 0 && plexus_errno() == EAGAIN { return }
            guard n > 0 else { throw BenchmarkError.wrong("server read returned \(n)") }
            let w = Glibc.write(c.server, serverBuffer, n)
            guard w == n else { throw BenchmarkError.wrong("server write returned \(w) of \(n)") }
        } else {
            let buffer = receive + i * echoMessageSize
            let n = Glibc.read(c.client, buffer + c.received, echoMessageSize - c.received)
            if n < 0 && plexus_errno() == EAGAIN { return }
            guard n > 0 else { throw BenchmarkError.wrong("client read returned \(n)") }
            let received = c.received + n
            connections[i].received = received
            if received < echoMessageSize { return }
            try checkEchoMessage(buffer, count: received, connection: i, sequence: c.sequence)
            stats.completed(sentAt: c.sentAt, now: monotonicNanoseconds())
            try startRequest(i)
        }
    }

    func step() throws -> Int {
        let before = stats.requests
        if let epoll {
            let n = try epoll.wait()
            for k in 0..<n {
                let data = epoll.data(k)
                try ready(Int(data >> 1), server: data & 1 == 1)
            }
        } else if let poll {
            var n = try poll.wait()
            var k = 0
            while n > 0 && k < poll.count {
                if poll.fds[k].revents != 0 {
                    n -= 1
                    try ready(k >> 1, server: k & 1 == 1)
                }
                k += 1
            }
        }
        return stats.requests - before
    }

    func finish() throws {
        for c in connections { Glibc.close(c.client); Glibc.close(c.server) }
    }
}

// MARK: Plexus, backend layer

/// One loopback connection's two ends and the buffers the backend and async echo bodies
/// move through them (each body adds its own bookkeeping).
class EchoBuffers {
    let client: FileDescriptor
    let server: FileDescriptor
    @exclusivity(unchecked) var clientSend: IOBuffer? = IOBuffer(capacity: echoMessageSize)
    @exclusivity(unchecked) var clientRecv: IOBuffer? = IOBuffer(capacity: echoMessageSize)
    @exclusivity(unchecked) var serverBuffer: IOBuffer? = IOBuffer(capacity: echoMessageSize)
    @exclusivity(unchecked) var sequence: UInt64 = 0

    init(pair: (client: Int32, server: Int32)) {
        client = FileDescriptor(rawValue: pair.client)
        server = FileDescriptor(rawValue: pair.server)
    }
}

final class BackendEcho: BenchmarkBody {
    final class Connection: EchoBuffers {
        @exclusivity(unchecked) var sentAt: UInt64 = 0
        @exclusivity(unchecked) var echoed = false
    }

    enum Role: UInt8 { case clientSend, clientRecv, serverRecv, serverSend }

    let backend: any IOBackend
    let stats: EchoStats
    let connections: [Connection]
    let count: Int
    /// Per token index: connection << 2 | role.
    @exclusivity(unchecked) var roles: [Int32] = Array(repeating: -1, count: 1024)
    var recordsOwnLatency: Bool { true }

    init(_ pairs: [(client: Int32, server: Int32)], sampler: LatencySampler, backend: any IOBackend) {
        self.backend = backend
        stats = EchoStats(sampler: sampler)
        count = pairs.count
        connections = pairs.map { Connection(pair: $0) }
        for i in 0..<count {
            serverRecv(i, connections[i].serverBuffer.take()!)
            startRequest(i)
        }
    }

    @inline(__always)
    private func track(_ token: Token, _ i: Int, _ role: Role) {
        let index = token.index
        if index >= roles.count { roles.append(contentsOf: repeatElement(-1, count: index + 1 - roles.count + 256)) }
        roles[index] = Int32(i) << 2 | Int32(role.rawValue)
    }

    private func serverRecv(_ i: Int, _ buffer: consuming IOBuffer) {
        track(backend.prepare(.recv(connections[i].server, buffer)), i, .serverRecv)
    }

    private func startRequest(_ i: Int) {
        connections[i].sequence &+= 1
        connections[i].echoed = false
        var message = connections[i].clientSend.take()!
        let sequence = connections[i].sequence
        message.appendUnsafe { fillEchoMessage($0.baseAddress!, connection: i, sequence: sequence); return echoMessageSize }
        connections[i].sentAt = monotonicNanoseconds()
        track(backend.prepare(.send(connections[i].client, message)), i, .clientSend)
        track(backend.prepare(.recv(connections[i].client, connections[i].clientRecv.take()!)), i, .clientRecv)
    }

    private func complete(_ completion: consuming Completion) throws {
        let code = roles[completion.token.index]
        let result = completion.result
        var buffer = completion.takeBuffer()!
        let i = Int(code >> 2)
        if stats.stopping {
            return
        }
        switch Role(rawValue: UInt8(code & 3))! {
        case .clientSend:
            guard result == Int32(echoMessageSize), buffer.isEmpty else { throw BenchmarkError.wrong("client send returned \(result)") }
            connections[i].clientSend = consume buffer
            if connections[i].echoed { startRequest(i) }
        case .clientRecv:
            guard result > 0 else { throw BenchmarkError.wrong("client recv returned \(result)") }
            if buffer.count < echoMessageSize {
                track(backend.prepare(.recv(connections[i].client, buffer)), i, .clientRecv)
                return
            }
            let sequence = connections[i].sequence
            try buffer.withUnsafeBytes { try checkEchoMessage($0.baseAddress!, count: $0.count, connection: i, sequence: sequence) }
            stats.completed(sentAt: connections[i].sentAt, now: monotonicNanoseconds())
            buffer.clear()
            connections[i].clientRecv = consume buffer
            connections[i].echoed = true
            if connections[i].clientSend != nil { startRequest(i) }
        case .serverRecv:
            guard result > 0 else { throw BenchmarkError.wrong("server recv returned \(result)") }
            track(backend.prepare(.send(connections[i].server, buffer)), i, .serverSend)
        case .serverSend:
            guard result > 0 else { throw BenchmarkError.wrong("server send returned \(result)") }
            if !buffer.isEmpty {  // short write: send the rest
                track(backend.prepare(.send(connections[i].server, buffer)), i, .serverSend)
            } else {
                buffer.clear()
                serverRecv(i, buffer)
            }
        }
    }

    func step() throws -> Int {
        let before = stats.requests
        try backend.wait(timeout: nil) { completion in
            do { try complete(completion) } catch { stats.fail(error) }
        }
        if let failure = stats.failure { throw failure }
        return stats.requests - before
    }

    func finish() throws {
        stats.stopping = true
        for i in 0..<count {
            Glibc.shutdown(connections[i].client.rawValue, Int32(SHUT_RDWR))
            Glibc.shutdown(connections[i].server.rawValue, Int32(SHUT_RDWR))
        }
        var idle = 0
        while backend.pendingCount > 0 && idle < 100 {
            let n = try backend.wait(timeout: .milliseconds(10)) { _ in }
            idle = n == 0 ? idle + 1 : 0
        }
        if backend.pendingCount > 0 { backend.cancelAll { _ in } }
        for i in 0..<count {
            Glibc.close(connections[i].client.rawValue)
            Glibc.close(connections[i].server.rawValue)
        }
    }
}

// MARK: Plexus, callback adapter

/// One connection of the callback echo: every callback captures only this object.
final class LoopEchoConnection {
    let index: Int
    let client: FileDescriptor
    let server: FileDescriptor
    let loop: EventLoop
    let stats: EchoStats
    @exclusivity(unchecked) var clientSend: IOBuffer? = IOBuffer(capacity: echoMessageSize)
    @exclusivity(unchecked) var clientRecv: IOBuffer? = IOBuffer(capacity: echoMessageSize)
    @exclusivity(unchecked) var sequence: UInt64 = 0
    @exclusivity(unchecked) var sentAt: UInt64 = 0
    @exclusivity(unchecked) var echoed = false

    init(index: Int, pair: (client: Int32, server: Int32), loop: EventLoop, stats: EchoStats) {
        self.index = index
        client = FileDescriptor(rawValue: pair.client)
        server = FileDescriptor(rawValue: pair.server)
        self.loop = loop
        self.stats = stats
    }

    func start() {
        serverRecv(IOBuffer(capacity: echoMessageSize))
        startRequest()
    }

    func startRequest() {
        sequence &+= 1
        echoed = false
        var message = clientSend.take()!
        let (i, sequence) = (index, sequence)
        message.appendUnsafe { fillEchoMessage($0.baseAddress!, connection: i, sequence: sequence); return echoMessageSize }
        sentAt = monotonicNanoseconds()
        loop.send(client, message) { [self] result, buffer in clientSent(result, buffer) }
        loop.recv(client, clientRecv.take()!) { [self] result, buffer in clientReceived(result, buffer) }
    }

    func clientSent(_ result: Result<Int, PlexusError>, _ buffer: consuming IOBuffer) {
        guard case .success(echoMessageSize) = result, buffer.isEmpty else {
            return stats.fail(BenchmarkError.wrong("client send: \(result)"))
        }
        clientSend = consume buffer
        if echoed { startRequest() }
    }

    func clientReceived(_ result: Result<Int, PlexusError>, _ buffer: consuming IOBuffer) {
        guard case .success(let n) = result, n > 0 else {
            return stats.fail(BenchmarkError.wrong("client recv: \(result)"))
        }
        if buffer.count < echoMessageSize {
            loop.recv(client, buffer) { [self] result, buffer in clientReceived(result, buffer) }
            return
        }
        do {
            let (i, sequence) = (index, sequence)
            try buffer.withUnsafeBytes { try checkEchoMessage($0.baseAddress!, count: $0.count, connection: i, sequence: sequence) }
        } catch {
            return stats.fail(error)
        }
        stats.completed(sentAt: sentAt, now: monotonicNanoseconds())
        buffer.clear()
        clientRecv = consume buffer
        echoed = true
        if clientSend != nil { startRequest() }
    }

    func serverRecv(_ buffer: consuming IOBuffer) {
        loop.recv(server, buffer) { [self] result, buffer in serverReceived(result, buffer) }
    }

    func serverReceived(_ result: Result<Int, PlexusError>, _ buffer: consuming IOBuffer) {
        guard case .success(let n) = result, n > 0 else {
            return stats.fail(BenchmarkError.wrong("server recv: \(result)"))
        }
        loop.send(server, buffer) { [self] result, buffer in serverSent(result, buffer) }
    }

    func serverSent(_ result: Result<Int, PlexusError>, _ buffer: consuming IOBuffer) {
        guard case .success(let n) = result, n > 0 else {
            return stats.fail(BenchmarkError.wrong("server send: \(result)"))
        }
        if !buffer.isEmpty {
            loop.send(server, buffer) { [self] result, buffer in serverSent(result, buffer) }
        } else {
            buffer.clear()
            serverRecv(buffer)
        }
    }
}

final class LoopEcho: BenchmarkBody {
    let loop: EventLoop
    let stats: EchoStats
    let connections: [LoopEchoConnection]
    var recordsOwnLatency: Bool { true }

    init(_ pairs: [(client: Int32, server: Int32)], sampler: LatencySampler, choice: BackendChoice) throws {
        let loop = try EventLoop(backend: choice)
        let stats = EchoStats(sampler: sampler)
        self.loop = loop
        self.stats = stats
        connections = pairs.enumerated().map { LoopEchoConnection(index: $0, pair: $1, loop: loop, stats: stats) }
        for c in connections { c.start() }
    }

    func step() throws -> Int {
        let before = stats.requests
        loop.runOnce(timeout: nil)
        if let failure = stats.failure { throw failure }
        return stats.requests - before
    }

    func finish() throws {
        stats.stopping = true
        loop.shutdown()
        loop.run()
        for c in connections {
            Glibc.close(c.client.rawValue)
            Glibc.close(c.server.rawValue)
        }
    }
}
