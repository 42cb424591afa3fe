import CPlexus
import Glibc
import Synchronization
import SystemPackage
import Testing
@testable import Plexus

extension PlexusTests {
/// The async/await adapter on every backend that runs here.
@Suite struct AsyncAdapterTests {

    @Test(arguments: Backends.kinds)
    func tasksPreferringTheLoopRunOnTheLoopThread(_ kind: BackendKind) async throws {
        let loop = try Backends.loopThread(kind)
        defer { loop.shutdownAndWait() }
                let (onLoop, afterAwait) = await Task(executorPreference: loop) {
            let before = loop.inLoop
            _ = try? await loop.nop()
            return (before, loop.inLoop)
        }.value
        #expect(onLoop)
        #expect(afterAwait)
    }

    /// An actor whose executor is the loop, called from a task that prefers the loop: its
    /// awaits of loop operations resume on the loop thread, and none goes through another
    /// thread (a hop would queue the actor's job on the loop from outside, once per await:
    /// what happens when the calling task has no preference, whose continuations the
    /// runtime resumes on the global pool first; README, "Async").
    @Test(arguments: Backends.kinds)
    func actorsPinnedToTheLoopAwaitWithoutAHop(_ kind: BackendKind) async throws {
        let loop = try Backends.loopThread(kind)
        defer { loop.shutdownAndWait() }
        var p: [Int32] = [0, 0]
        #expect(plexus_pipe2(&p, O_CLOEXEC | O_NONBLOCK) == 0)
        defer { Glibc.close(p[0]); Glibc.close(p[1]) }
        let actor = LoopPinnedReader(loop)
        let (r, w) = (FileDescriptor(rawValue: p[0]), FileDescriptor(rawValue: p[1]))
        let pushesBefore = loop.remote.taskPushes
        let (onLoop, bytes) = try await Task(executorPreference: loop) {
            try await actor.readAndWrite(r, w, rounds: 200)
        }.value
        let hops = loop.remote.taskPushes - pushesBefore
        #expect(onLoop, "\(kind): an await resumed off the loop thread")
        #expect(bytes == 200)
        #expect(hops <= 2, "\(kind): \(hops) jobs came back to the loop from another thread for 400 awaits")
    }

    @Test(arguments: Backends.kinds)
    func awaitingFromAnotherExecutorHopsToTheLoop(_ kind: BackendKind) async throws {
        do {
            let loop = try Backends.loopThread(kind)
            defer { loop.shutdownAndWait() }
            var p: [Int32] = [0, 0]
            #expect(plexus_pipe2(&p, O_CLOEXEC) == 0)
            defer { Glibc.close(p[0]); Glibc.close(p[1]) }
            let written = try await loop.write(FileDescriptor(rawValue: p[1]), IOBuffer("ping"))
            #expect(written.count == 4)
            let drained = written.buffer.isEmpty
            #expect(drained)
            let read = try await loop.read(FileDescriptor(rawValue: p[0]), into: IOBuffer(capacity: 16))
            #expect(read.count == 4)
            let text = read.buffer.string
            #expect(text == "ping")
            try await loop.sleep(for: .milliseconds(2))
        }
    }

    @Test(arguments: Backends.kinds)
    func echoWithOneHundredConcurrentClients(_ kind: BackendKind) async throws {
        do {
            let loop = try Backends.loopThread(kind)
            defer { loop.shutdownAndWait() }
                        let listener = try LoopTestSupport.listener()
            let server = Task(executorPreference: loop) {
                try await withThrowingTaskGroup(of: Void.self) { group in
                    for _ in 0..<100 {
                        let fd = try await loop.accept(FileDescriptor(rawValue: listener.fd))
                        group.addTask(executorPreference: loop) {
                            var buffer = IOBuffer(capacity: 256)
                            while true {
                                let got = try await loop.recv(fd, into: buffer)
                                let n = got.count
                                buffer = got.takeBuffer()
                                if n == 0 { break }
                                buffer = try await loop.writeAll(fd, buffer)
                            }
                            try await loop.close(fd)
                        }
                    }
                    try await group.waitForAll()
                }
            }
            try await withThrowingTaskGroup(of: Bool.self) { group in
                for i in 0..<100 {
                    group.addTask(executorPreference: loop) {
                        let fd = FileDescriptor(rawValue: socket(AF_INET, Int32(SOCK_STREAM.rawValue | SOCK_CLOEXEC.rawValue | SOCK_NONBLOCK.rawValue), 0))
                        try await loop.connect(fd, to: listener.address)
                        let text = "hello \(i) " + String(repeating: "x", count: i)
                        _ = try await loop.writeAll(fd, IOBuffer(text))
                        var buffer = IOBuffer(capacity: 256)
                        while buffer.count < text.utf8.count {
                            let got = try await loop.recv(fd, into: buffer)
                            let n = got.count
                            buffer = got.takeBuffer()
                            if n == 0 { break }
                        }
                        try await loop.close(fd)
                        return buffer.string == text
                    }
                }
                var ok = 0
                for try await matched in group where matched { ok += 1 }
                #expect(ok == 100)
            }
            try await server.value
            Glibc.close(listener.fd)
        }
    }

    @Test(arguments: Backends.kinds)
    func cancellingATaskCancelsItsPendingRead(_ kind: BackendKind) async throws {
        do {
            let loop = try Backends.loopThread(kind)
            defer { loop.shutdownAndWait() }
            var p: [Int32] = [0, 0]
            #expect(plexus_pipe2(&p, O_CLOEXEC) == 0)
            defer { Glibc.close(p[0]); Glibc.close(p[1]) }
            let readEnd = FileDescriptor(rawValue: p[0])
            let reader = Task(executorPreference: loop) {
                try await loop.read(readEnd, into: IOBuffer(capacity: 16)).count
            }
            try await loop.sleep(for: .milliseconds(20))
            reader.cancel()
            await #expect(throws: CancellationError.self) { try await reader.value }
            // pendingOperations is the backend's counter: read it on the loop thread.
            let pending = await Task(executorPreference: loop) { loop.pendingOperations }.value
            #expect(pending == 1, "only the loop's own wake-up read is left")
        }
    }

    @Test(arguments: Backends.kinds)
    func cancellingATaskCancelsItsPendingAcceptAndConnect(_ kind: BackendKind) async throws {
        do {
            let loop = try Backends.loopThread(kind)
            defer { loop.shutdownAndWait() }
            let listener = try LoopTestSupport.listener()
            defer { Glibc.close(listener.fd) }
            let acceptor = Task(executorPreference: loop) {
                try await loop.accept(FileDescriptor(rawValue: listener.fd))
            }
            try await loop.sleep(for: .milliseconds(20))
            acceptor.cancel()
            await #expect(throws: CancellationError.self) { try await acceptor.value }

            // A listener with a full backlog leaves the next connect pending (SYNs dropped).
            let full = try LoopTestSupport.listener(backlog: 0)
            defer { Glibc.close(full.fd) }
            var queued: [Int32] = []
            defer { for fd in queued { Glibc.close(fd) } }
            for _ in 0..<2 { queued.append(LoopTestSupport.connectWithoutWaiting(to: full.address)) }
            let socketFD = socket(AF_INET, Int32(SOCK_STREAM.rawValue | SOCK_CLOEXEC.rawValue | SOCK_NONBLOCK.rawValue), 0)
            defer { Glibc.close(socketFD) }
            let connector = Task(executorPreference: loop) {
                try await loop.connect(FileDescriptor(rawValue: socketFD), to: full.address)
            }
            try await loop.sleep(for: .milliseconds(50))
            connector.cancel()
            await #expect(throws: CancellationError.self) { try await connector.value }
        }
    }

    @Test(arguments: Backends.kinds)
    func aDeadlineCancelsAPendingReadWithETIMEDOUT(_ kind: BackendKind) async throws {
        let loop = try Backends.loopThread(kind)
        defer { loop.shutdownAndWait() }
        var p: [Int32] = [0, 0]
        #expect(plexus_pipe2(&p, O_CLOEXEC) == 0)
        defer { Glibc.close(p[0]); Glibc.close(p[1]) }
        let readEnd = FileDescriptor(rawValue: p[0])
        let start = Deadline.now
        let error = await #expect(throws: PlexusError.self) {
            try await loop.withTimeout(.milliseconds(20)) {
                _ = try await loop.read(readEnd, into: IOBuffer(capacity: 8))
            }
        }
        #expect(error?.errno == .timedOut)
        #expect(error?.operation == "read")
        #expect(Deadline.now.nanoseconds - start.nanoseconds >= 20_000_000, "not before the deadline")
        // Within the deadline the result comes back as usual.
        var byte: UInt8 = 7
        _ = Glibc.write(p[1], &byte, 1)
        let n = try await loop.withTimeout(.seconds(5)) { try await loop.read(readEnd, into: IOBuffer(capacity: 8)).count }
        #expect(n == 1)
        let timersLeft = await Task(executorPreference: loop) { loop.pendingTimers }.value  // loop-thread state
        #expect(timersLeft == 0, "the deadline's timer is gone with its operation")
    }

    @Test(arguments: Backends.kinds)
    func connectionsAsAnAsyncSequenceWithBackpressure(_ kind: BackendKind) async throws {
        let loop = try Backends.loopThread(kind)
        defer { loop.shutdownAndWait() }
        let listener = try LoopTestSupport.listener()
        defer { Glibc.close(listener.fd) }
        var clients: [Int32] = []
        defer { for fd in clients { Glibc.close(fd) } }
        // More connections than the sequence buffers: the rest wait in the kernel's backlog.
        for _ in 0..<40 { clients.append(try LoopTestSupport.connect(to: listener.address)) }
        let accepted = try await Task(executorPreference: loop) { () throws -> [Int32] in
            var fds: [Int32] = []
            for try await fd in loop.connections(FileDescriptor(rawValue: listener.fd), bufferLimit: 4) {
                fds.append(fd.rawValue)
                if fds.count == 40 { break }
            }
            return fds
        }.value
        #expect(accepted.count == 40)
        #expect(Set(accepted).count == 40)
        #expect(accepted.allSatisfy { fcntl($0, F_GETFD) & FD_CLOEXEC != 0 })
        for fd in accepted { Glibc.close(fd) }
        // Ending the loop early cancels the accept and closes what was buffered.
        let extra = try LoopTestSupport.connect(to: listener.address)
        clients.append(extra)
        let first = try await Task(executorPreference: loop) { () throws -> Int32? in
            for try await fd in loop.connections(FileDescriptor(rawValue: listener.fd)) { return fd.rawValue }
            return nil
        }.value
        if let first { Glibc.close(first) }
        try await loop.sleep(for: .milliseconds(5))
        let left = await Task(executorPreference: loop) { loop.pendingOperations }.value  // loop-thread state
        #expect(left == 1, "only the loop's wake-up read is left")
    }

    @Test(arguments: Backends.kinds)
    func receivesYieldsEveryByteInOrderThroughASmallBufferGroup(_ kind: BackendKind) async throws {
        let loop = try Backends.loopThread(kind)
        defer { loop.shutdownAndWait() }
        var pair: [Int32] = [0, 0]
        #expect(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue | SOCK_CLOEXEC.rawValue | SOCK_NONBLOCK.rawValue), 0, &pair) == 0)
        defer { Glibc.close(pair[0]) }
        let reader = FileDescriptor(rawValue: pair[0]), writer = FileDescriptor(rawValue: pair[1])
        let total = 1 << 20
        let sent = (0..<total).map { UInt8(truncatingIfNeeded: $0 &* 7) }
        // 4 buffers of 4 KiB for 1 MiB: the receive pauses and resumes many times.
        let consumer = Task(executorPreference: loop) { () throws -> [UInt8] in
            var got: [UInt8] = []
            for try await chunk in loop.receives(reader, bufferCount: 4, bufferSize: 4096) { got += chunk }
            return got
        }
        _ = try await Task(executorPreference: loop) {
            _ = try await loop.writeAll(writer, IOBuffer(bytes: sent))
            try await loop.close(writer)
        }.value
        let got = try await consumer.value
        #expect(got.count == total)
        #expect(got == sent)
        try await loop.sleep(for: .milliseconds(2))
        let left = await Task(executorPreference: loop) { loop.pendingOperations }.value  // loop-thread state
        #expect(left == 1, "only the loop's wake-up read is left")
    }

    /// Cancel racing completion: whichever wins, the call ends exactly once, and a
    /// finished read returns its buffer with the data.
    @Test(arguments: Backends.kinds)
    func cancellationRacingCompletion(_ kind: BackendKind) async throws {
        do {
            let loop = try Backends.loopThread(kind)
            defer { loop.shutdownAndWait() }
            var p: [Int32] = [0, 0]
            #expect(plexus_pipe2(&p, O_CLOEXEC | O_NONBLOCK) == 0)
            defer { Glibc.close(p[0]); Glibc.close(p[1]) }
            var completed = 0, cancelled = 0
            let readEnd = FileDescriptor(rawValue: p[0])
            for i in 0..<2000 {
                let reader = Task(executorPreference: loop) { () throws -> String in
                    let t = try await loop.read(readEnd, into: IOBuffer(capacity: 8))
                    return t.buffer.string
                }
                var byte: UInt8 = 65
                if i % 2 == 0 { _ = Glibc.write(p[1], &byte, 1) }
                reader.cancel()
                if i % 2 == 1 { _ = Glibc.write(p[1], &byte, 1) }
                do {
                    let text = try await reader.value
                    #expect(text == "A")
                    completed += 1
                } catch is CancellationError {
                    cancelled += 1
                    // The byte stays in the pipe: drain it so the next round starts empty.
                    var sink: UInt8 = 0
                    while Glibc.read(p[0], &sink, 1) == 1 {}
                }
            }
            #expect(completed + cancelled == 2000)
            let left = await Task(executorPreference: loop) { loop.pendingOperations }.value
            #expect(left == 1)
        }
    }
}
}

extension LoopTestSupport {
    /// A connect that is left in flight (non-blocking socket, EINPROGRESS).
    static func connectWithoutWaiting(to address: SocketAddress) -> Int32 {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue | SOCK_CLOEXEC.rawValue | SOCK_NONBLOCK.rawValue), 0)
        _ = address.withUnsafeSockaddr { Glibc.connect(fd, $0, $1) }
        return fd
    }

    static func listener(backlog: Int32) throws -> (fd: Int32, address: SocketAddress) {
        let l = try listener()
        listen(l.fd, backlog)
        return l
    }
}


/// An actor on a loop's serial executor, as a user pins one.
actor LoopPinnedReader {
    let loop: EventLoop
    init(_ loop: EventLoop) { self.loop = loop }
    nonisolated var unownedExecutor: UnownedSerialExecutor { loop.asUnownedSerialExecutor() }

    /// `rounds` times: write one byte, await its read; true when every await resumed on the loop thread.
    func readAndWrite(_ r: FileDescriptor, _ w: FileDescriptor, rounds: Int) async throws -> (Bool, Int) {
        var onLoop = loop.inLoop
        var bytes = 0
        for _ in 0..<rounds {
            _ = try await loop.write(w, IOBuffer("x"))
            onLoop = onLoop && loop.inLoop
            bytes += try await loop.read(r, into: IOBuffer(capacity: 8)).count
            onLoop = onLoop && loop.inLoop
        }
        return (onLoop, bytes)
    }
}
