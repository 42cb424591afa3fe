// plexus-ping: a RESP server that answers PING, the way redis-server does, on Plexus.
//
//   plexus-ping [--port 6380] [--host 127.0.0.1] [--loops N] [--adapter callback|async] [--max-query BYTES]
//
// One event loop per core (an EventLoopGroup), each with its own SO_REUSEPORT listener
// on the same port: the kernel spreads connections over the loops. Every complete
// command in what a read returned is answered, and all the answers go out in one write
// (pipelining); a partial command waits in the buffer for the next read.
import CPlexus
import Glibc
import Plexus

enum Adapter: String {
    case callback, async
}

func writeLine(_ fd: Int32, _ text: String) {
    var line = text + "\n"
    line.withUTF8 { bytes in
        var left = UnsafeRawBufferPointer(bytes)
        while !left.isEmpty {
            let n = Glibc.write(fd, left.baseAddress, left.count)
            if n <= 0 { return }
            left = UnsafeRawBufferPointer(rebasing: left[n...])
        }
    }
}

func fail(_ text: String) -> Never {
    writeLine(2, "plexus-ping: error: \(text)")
    exit(2)
}

func usage() -> Never {
    writeLine(1, """
        usage: plexus-ping [--port PORT] [--host ADDRESS] [--loops N] [--adapter callback|async] [--max-query BYTES]

        A RESP server answering PING (inline and multibulk, pipelined) with +PONG, and
        PING <msg>/ECHO <msg> with the message, QUIT, and CONFIG GET save|appendonly (for
        redis-benchmark); anything else gets -ERR unknown command.

          --port PORT        TCP port (default 6380; 0 lets the kernel pick; the port is printed)
          --host ADDRESS     IPv4 or IPv6 address to listen on (default 127.0.0.1)
          --loops N          event loops, one thread each (default: one per CPU it may run on)
          --adapter A        callback (default) or async (one task per connection)
          --max-query BYTES  most bytes of one unfinished command a connection may hold
                             before it is closed (default 1073741824, redis-server's
                             client-query-buffer-limit)

        PLEXUS_BACKEND=io_uring|epoll|poll|auto picks the backend (unset = auto).
        Try it: redis-benchmark -t ping_inline,ping_mbulk -n 1000000 -c 50 -P 16 -p PORT -q
        """)
    exit(0)
}

var port: UInt16 = 6380
var host = "127.0.0.1"
var loopCount = EventLoopGroup.defaultLoopCount
var adapter = Adapter.callback

var arguments = CommandLine.arguments.dropFirst()
@MainActor func value(_ option: String) -> String {
    guard let v = arguments.popFirst() else { fail("\(option) needs a value") }
    return v
}
while let argument = arguments.popFirst() {
    switch argument {
    case "-h", "--help": usage()
    case "--port", "-p":
        guard let p = UInt16(value(argument)) else { fail("--port wants 0...65535") }
        port = p
    case "--host": host = value(argument)
    case "--loops":
        guard let n = Int(value(argument)), n >= 1 else { fail("--loops wants a positive number") }
        loopCount = n
    case "--max-query":
        guard let n = Int(value(argument)), n >= 1 else { fail("--max-query wants a positive number of bytes") }
        Session.maxQuery = n
    case "--adapter":
        let name = value(argument)
        guard let a = Adapter(rawValue: name) else { fail("--adapter is callback or async, not \(name)") }
        adapter = a
    default: fail("unknown argument \(argument) (see --help)")
    }
}

// SIGINT and SIGTERM end the server cleanly: blocked here (the loop threads inherit the
// mask), taken by sigwait below.
var stopSignals = sigset_t()
sigemptyset(&stopSignals)
sigaddset(&stopSignals, SIGINT)
sigaddset(&stopSignals, SIGTERM)
pthread_sigmask(SIG_BLOCK, &stopSignals, nil)
signal(SIGPIPE, SIG_IGN)

let group: EventLoopGroup
do {
    group = try EventLoopGroup(loops: loopCount)
} catch {
    fail("\(error)")
}

/// Accepts with one multishot accept; re-arms after an error such as EMFILE.
func acceptConnections(_ listener: StreamListener) {
    listener.acceptMultishot { result in
        switch result {
        case .success(let connection):
            try? connection.setNoDelay()
            CallbackSession(connection).start()
        case .failure(let error) where error.errno == .canceled:
            return
        case .failure(let error):
            writeLine(2, "plexus-ping: accept: \(error)")
            listener.loop.schedule(after: .milliseconds(100)) { event in
                if event == .fired { acceptConnections(listener) }
            }
        }
    }
}

var boundPort = port
var listeners: [StreamListener] = []
for loop in group.loops {
    do {
        let listener = try StreamListener.tcp(host: host, port: boundPort, on: loop, reusePort: true)
        if boundPort == 0 { boundPort = try listener.localAddress().port ?? 0 }
        listeners.append(listener)
    } catch {
        group.shutdownAndWait()
        fail("\(error)")
    }
}

for listener in listeners {
    let loop = listener.loop
    switch adapter {
    case .callback:
        loop.execute { acceptConnections(listener) }
    case .async:
        Task(executorPreference: loop) {
            // An error (EMFILE) ends the sequence: accept again after a pause, as the
            // callback path does. The sequence ends without one when the loop shuts down.
            while true {
                do {
                    for try await connection in listener.connections() {
                        try? connection.setNoDelay()
                        Task(executorPreference: loop) { await serveAsync(connection) }
                    }
                    return
                } catch {
                    if loop.isShuttingDown { return }
                    writeLine(2, "plexus-ping: accept: \(error)")
                    do { try await loop.sleep(for: .milliseconds(100)) } catch { return }
                }
            }
        }
    }
}

let backend = group.loops[0].backendKind
writeLine(1, "plexus-ping: listening on \(host):\(boundPort), \(loopCount) loop(s), backend \(backend), adapter \(adapter.rawValue)")

var received: Int32 = 0
sigwait(&stopSignals, &received)
group.shutdownAndWait()
for listener in listeners { _ = Glibc.close(listener.fd.rawValue) }
writeLine(1, "plexus-ping: stopped (signal \(received))")
