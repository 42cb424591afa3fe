import CPlexus
import Glibc
@testable import Plexus
import SystemPackage
import Testing

extension PlexusTests {
    /// send/recv, sendmsg/recvmsg, accept, connect and shutdown on real sockets.
    @Suite struct Sockets {
        @Test(arguments: Backends.kinds)
        func `send and recv on a socketpair`(kind: BackendKind) throws {
            try Harness.run(kind) { h in
                let (a, b) = try h.socketPair()
                let sent = try h.perform(.send(a, IOBuffer("ping")))
                expectResult(sent, 4)
                #expect(sent.bytes == [])
                let received = try h.perform(.recv(b, IOBuffer(capacity: 16)))
                expectResult(received, 4)
                #expect(received.string == "ping")
            }
        }

        @Test(arguments: Backends.kinds)
        func `a pending recv completes when the peer sends`(kind: BackendKind) throws {
            try Harness.run(kind) { h in
                let (a, b) = try h.socketPair()
                let token = h.prepare(.recv(b, IOBuffer(capacity: 16)))
                try h.submit()
                try h.idle(for: .milliseconds(20))
                #expect(h.isPending(token))
                h.writeAll(a, "pong")
                let received = try h.waitFor(token)
                expectResult(received, 4)
                #expect(received.string == "pong")
            }
        }

        @Test(arguments: Backends.kinds)
        func `sendmsg and recvmsg on a socketpair`(kind: BackendKind) throws {
            try Harness.run(kind) { h in
                let (a, b) = try h.socketPair()
                let receiving = h.prepare(.receiveMessage(b, Message(IOBuffer(capacity: 32))))
                let sent = try h.perform(.sendMessage(a, Message(IOBuffer("over a pair"))))
                expectResult(sent, 11)
                let received = try h.waitFor(receiving)
                expectResult(received, 11)
                #expect(received.string == "over a pair")
                #expect(received.address == nil, "an unnamed socketpair peer has no address")
            }
        }

        @Test(arguments: Backends.kinds)
        func `sendmsg and recvmsg on UDP loopback carry addresses`(kind: BackendKind) throws {
            try Harness.run(kind) { h in
                let a = try h.udpSocket()
                let b = try h.udpSocket()
                let receiving = h.prepare(.receiveMessage(b.fd, Message(IOBuffer(capacity: 64))))
                try h.submit()
                try h.idle(for: .milliseconds(10))
                #expect(h.isPending(receiving))
                let sent = try h.perform(.sendMessage(a.fd, Message(IOBuffer("datagram"), address: b.address)))
                expectResult(sent, 8)
                let received = try h.waitFor(receiving)
                expectResult(received, 8)
                #expect(received.string == "datagram")
                #expect(received.address == a.address, "sender \(String(describing: received.address)), expected \(a.address)")

                // And back, to the address recvmsg reported.
                let back = try h.perform(.sendMessage(b.fd, Message(IOBuffer("reply"), address: received.address)))
                expectResult(back, 5)
                let reply = try h.perform(.receiveMessage(a.fd, Message(IOBuffer(capacity: 64))))
                #expect(reply.string == "reply")
                #expect(reply.address == b.address)
            }
        }

        @Test(arguments: Backends.kinds)
        func `sendmsg on an unconnected UDP socket without an address fails`(kind: BackendKind) throws {
            try Harness.run(kind) { h in
                let a = try h.udpSocket()
                expectError(try h.perform(.sendMessage(a.fd, Message(IOBuffer("nowhere")))), EDESTADDRREQ)
            }
        }

        @Test(arguments: Backends.kinds)
        func `one-shot accept returns a CLOEXEC non-blocking fd`(kind: BackendKind) throws {
            try Harness.run(kind) { h in
                let listener = try h.tcpListener()
                let token = h.prepare(.accept(listener.fd))
                try h.submit()
                try h.idle(for: .milliseconds(20))
                #expect(h.isPending(token), "accept must wait for a connection")
                let client = try h.tcpClient(port: listener.port)
                let accepted = try h.waitFor(token)
                #expect(accepted.result >= 0, "\(accepted)")
                guard accepted.result >= 0 else { return }
                #expect(isCloseOnExec(accepted.result), "accepted fds must be O_CLOEXEC")
                #expect(isNonBlocking(accepted.result), "accepted fds must be O_NONBLOCK")
                // It is the client's peer.
                h.writeAll(client, "hi")
                let greeting = try h.readExactly(FileDescriptor(rawValue: accepted.result), count: 2)
                #expect(greeting.text == "hi")

                // A connection already queued is accepted at once.
                _ = try h.tcpClient(port: listener.port)
                let second = try h.perform(.accept(listener.fd))
                #expect(second.result >= 0, "\(second)")
            }
        }

        @Test(arguments: Backends.kinds)
        func `multishot accept yields 100 connections, each with more`(kind: BackendKind) throws {
            try Harness.run(kind) { h in
                let listener = try h.tcpListener(backlog: 128)
                let token = h.prepare(.accept(listener.fd, multishot: true))
                try h.submit()
                var clients: [FileDescriptor] = []
                for batch in 0..<10 {
                    for _ in 0..<10 { clients.append(try h.tcpClient(port: listener.port)) }
                    try h.waitForIntermediates(token, count: (batch + 1) * 10)
                }
                let accepted = h.intermediates[token] ?? []
                #expect(accepted.count == 100)
                #expect(h.isPending(token), "multishot accept must stay armed")
                let fds = accepted.map(\.result)
                #expect(fds.allSatisfy { $0 >= 0 }, "\(accepted.filter { $0.result < 0 })")
                #expect(Set(fds).count == 100, "every connection gets its own fd")
                #expect(accepted.allSatisfy { $0.flags.contains(.more) })
                #expect(fds.filter { $0 >= 0 }.allSatisfy { isCloseOnExec($0) && isNonBlocking($0) })

                let cancel = h.prepare(.cancel(token))
                let outcomes = try h.waitFor([cancel, token])
                expectResult(outcomes[0], 0)
                expectError(outcomes[1], ECANCELED, "a cancelled multishot ends with one final completion")
                #expect(h.intermediates[token]?.count == 100, "nothing after the final completion")
            }
        }

        @Test(arguments: Backends.kinds)
        func `connect succeeds to a listener`(kind: BackendKind) throws {
            try Harness.run(kind) { h in
                let listener = try h.tcpListener()
                let socket = try h.inetSocket()
                expectResult(try h.perform(.connect(socket, listener.address)), 0)
                let accepted = try h.perform(.accept(listener.fd))
                #expect(accepted.result >= 0, "\(accepted)")
                expectResult(try h.perform(.send(socket, IOBuffer("x"))), 1)
                expectError(try h.perform(.connect(socket, listener.address)), EISCONN)
            }
        }

        @Test(arguments: Backends.kinds)
        func `connect to a port nobody listens on is ECONNREFUSED`(kind: BackendKind) throws {
            try Harness.run(kind) { h in
                // A bound, not listening socket holds the port so nothing else takes it.
                let holder = try h.inetSocket()
                let port = try h.bindLoopback(holder)
                let socket = try h.inetSocket()
                let outcome = try h.perform(.connect(socket, SocketAddress(ipv4: "127.0.0.1", port: port)!))
                expectError(outcome, ECONNREFUSED)
            }
        }

        @Test(arguments: Backends.kinds)
        func `shutdown for writing makes the peer read end of file`(kind: BackendKind) throws {
            try Harness.run(kind) { h in
                let (a, b) = try h.socketPair()
                let pending = h.prepare(.recv(b, IOBuffer(capacity: 8)))
                try h.submit()
                expectResult(try h.perform(.shutdown(a, how: Int32(SHUT_WR))), 0)
                expectResult(try h.waitFor(pending), 0, "the peer sees end of file")
                expectError(try h.perform(.send(a, IOBuffer("late"))), EPIPE)
                // The other direction still works.
                h.writeAll(b, "still")
                let still = try h.perform(.recv(a, IOBuffer(capacity: 8)))
                #expect(still.string == "still")
            }
        }

        @Test(arguments: Backends.kinds)
        func `shutdown on the wrong kind of fd fails`(kind: BackendKind) throws {
            try Harness.run(kind) { h in
                let pipe = try h.pipe()
                expectError(try h.perform(.shutdown(pipe.read, how: Int32(SHUT_RDWR))), ENOTSOCK)
                let unconnected = try h.inetSocket()
                expectError(try h.perform(.shutdown(unconnected, how: Int32(SHUT_RDWR))), ENOTCONN)
            }
        }

        @Test(arguments: Backends.kinds)
        func `a recv and a send in flight on one socket`(kind: BackendKind) throws {
            try Harness.run(kind) { h in
                let (a, b) = try h.socketPair()
                let receiving = h.prepare(.recv(a, IOBuffer(capacity: 16)))
                let sending = h.prepare(.send(a, IOBuffer("to b")))
                try h.submit()
                expectResult(try h.waitFor(sending), 4)
                #expect(h.isPending(receiving), "the recv waits while the send completes")
                let toB = try h.readExactly(b, count: 4)
                #expect(toB.text == "to b")
                h.writeAll(b, "to a")
                let received = try h.waitFor(receiving)
                expectResult(received, 4)
                #expect(received.string == "to a")
            }
        }

        @Test(arguments: Backends.kinds)
        func `two reads in flight on one pipe both complete`(kind: BackendKind) throws {
            try Harness.run(kind) { h in
                let pipe = try h.pipe()
                let first = h.prepare(.read(pipe.read, IOBuffer(capacity: 8)))
                let second = h.prepare(.read(pipe.read, IOBuffer(capacity: 8)))
                try h.submit()
                try h.idle(for: .milliseconds(10))
                #expect(h.backend.pendingCount == 2)
                h.writeAll(pipe.write, "1")
                try h.runUntil("one of two reads") { !h.isPending(first) || !h.isPending(second) }
                h.writeAll(pipe.write, "2")
                let outcomes = try h.waitFor([first, second])
                #expect(outcomes.map(\.result) == [1, 1], "\(outcomes)")
                #expect(Set(outcomes.compactMap(\.string)) == ["1", "2"])
            }
        }

        @Test(arguments: Backends.kinds)
        func `a read, a write and a poll in flight on one socket`(kind: BackendKind) throws {
            try Harness.run(kind) { h in
                let (a, b) = try h.socketPair()
                // The read takes one byte of two, so the poll still sees data, whichever runs first.
                let reading = h.prepare(.read(a, IOBuffer(capacity: 1)))
                let polling = h.prepare(.poll(a, .readable))
                let writing = h.prepare(.write(a, IOBuffer("out")))
                try h.submit()
                expectResult(try h.waitFor(writing), 3)
                h.writeAll(b, "in")
                let outcomes = try h.waitFor([reading, polling])
                expectResult(outcomes[0], 1)
                #expect(outcomes[0].string == "i")
                #expect(outcomes[1].result > 0 && UInt32(outcomes[1].result) & PollEvents.readable.rawValue != 0,
                        "\(outcomes[1])")
            }
        }
    }
}
