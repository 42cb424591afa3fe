// plexus-demo: starts the backend PLEXUS_BACKEND selects and shows it working.
//
//   plexus-demo --backend-info        what runs here, and why (exit 1 if nothing can)
//   plexus-demo [--round-trips N]     pipe ping-pong through the backend, round trips/s
import CPlexus
import Glibc
import Plexus
import SystemPackage

/// Writes to fd 2 (in Swift 6 mode the C `stderr` global is an error).
func printError(_ text: String) {
    var line = text + "\n"
    line.withUTF8 { bytes in
        var left = UnsafeRawBufferPointer(bytes)
        while !left.isEmpty {
            let n = Glibc.write(2, left.baseAddress, left.count)
            if n <= 0 { return }
            left = UnsafeRawBufferPointer(rebasing: left[n...])
        }
    }
}

func fail(_ text: String) -> Never {
    printError("plexus-demo: error: \(text)")
    exit(1)
}

func usage() -> Never {
    print("""
        usage: plexus-demo [--backend-info] [--round-trips N]

          --backend-info     print the selected backend, how it was chosen and what it
                             does natively, then exit (1 if no backend can start)
          --round-trips N    pipe ping-pong round trips to run (default 100000)

        PLEXUS_BACKEND=io_uring|epoll|poll|auto picks the backend (unset = auto:
        io_uring, or epoll when io_uring cannot start here).
        """)
    exit(0)
}

/// The symbolic name of an errno, so a fallback reason says "EPERM", not only prose.
func errnoName(_ errno: Errno) -> String {
    let names: [Int32: String] = [
        EPERM: "EPERM", ENOENT: "ENOENT", EINTR: "EINTR", EBADF: "EBADF", ENOMEM: "ENOMEM",
        EACCES: "EACCES", EFAULT: "EFAULT", EINVAL: "EINVAL", EMFILE: "EMFILE", ENFILE: "ENFILE",
        ENOSYS: "ENOSYS", EOPNOTSUPP: "EOPNOTSUPP", EAGAIN: "EAGAIN", EBUSY: "EBUSY",
    ]
    return names[errno.rawValue] ?? "errno \(errno.rawValue)"
}

func describe(_ error: BackendSelectionError) -> String {
    switch error {
    case .unknownName: return error.description
    case .unavailable(_, let cause): return "\(error) [\(errnoName(cause.errno))]"
    }
}

// MARK: Arguments

var showInfo = false
var roundTrips = 100_000
var arguments = CommandLine.arguments.dropFirst()
while let argument = arguments.popFirst() {
    switch argument {
    case "--backend-info": showInfo = true
    case "--round-trips":
        guard let text = arguments.popFirst(), let n = Int(text), n > 0 else { fail("--round-trips needs a positive number") }
        roundTrips = n
    case "-h", "--help": usage()
    default: fail("unknown argument '\(argument)' (try --help)")
    }
}

// MARK: Backend selection

let selected: SelectedBackend
do {
    selected = try BackendChoice.fromEnvironment().start()
} catch {
    fail(describe(error))
}

if showInfo {
    print("backend: \(selected.kind)")
    print("requested: \(selected.choice)")
    if let reason = selected.fallbackReason {
        print("fallback reason: io_uring unavailable: \(reason) [\(errnoName(reason.errno))]")
    } else {
        print("fallback reason: none")
    }
    print("capabilities: \(selected.backend.capabilities)")
    print("summary: \(selected.summary)")
    exit(0)
}

// MARK: Pipe ping-pong

/// Two pipes and two one-byte buffers; each round trip is a write and a read on each pipe,
/// all through the backend, with the buffers handed back by the completions and reused.
final class PingPong {
    let backend: any IOBackend
    let ping: (read: FileDescriptor, write: FileDescriptor)
    let pong: (read: FileDescriptor, write: FileDescriptor)
    var readBuffer: IOBuffer? = IOBuffer(capacity: 64)
    var writeBuffer: IOBuffer? = IOBuffer(capacity: 1)

    init(backend: any IOBackend) {
        self.backend = backend
        ping = PingPong.pipe()
        pong = PingPong.pipe()
    }

    static func pipe() -> (read: FileDescriptor, write: FileDescriptor) {
        var fds: [Int32] = [-1, -1]
        guard plexus_pipe2(&fds, O_CLOEXEC | O_NONBLOCK) == 0 else { fail("pipe2: errno \(plexus_errno())") }
        return (FileDescriptor(rawValue: fds[0]), FileDescriptor(rawValue: fds[1]))
    }

    func close() {
        for fd in [ping.read, ping.write, pong.read, pong.write] { _ = Glibc.close(fd.rawValue) }
    }

    /// One byte through one pipe: a read waits, a write feeds it.
    func leg(from writeEnd: FileDescriptor, to readEnd: FileDescriptor) throws(PlexusError) {
        var input = readBuffer.take()!
        input.clear()
        var output = writeBuffer.take()!
        output.clear()
        output.append(CollectionOfOne(0x2a))
        let reading = backend.prepare(.read(readEnd, input))
        _ = backend.prepare(.write(writeEnd, output))
        var done = 0
        var failure: PlexusError?
        while done < 2 {
            try backend.wait(timeout: .seconds(5)) { completion in
                var completion = completion
                done += 1
                if completion.result <= 0 {
                    failure = PlexusError(completion.kind, result: completion.result == 0 ? -EIO : completion.result)
                }
                if completion.token == reading {
                    readBuffer = completion.takeBuffer()
                } else {
                    writeBuffer = completion.takeBuffer()
                }
            }
        }
        if let failure { throw failure }
    }

    func roundTrip() throws(PlexusError) {
        try leg(from: ping.write, to: ping.read)
        try leg(from: pong.write, to: pong.read)
    }
}

let demo = PingPong(backend: selected.backend)
print(selected.summary)
do {
    for _ in 0..<min(1000, roundTrips) { try demo.roundTrip() }  // warm-up
    let clock = ContinuousClock()
    let start = clock.now
    for _ in 0..<roundTrips { try demo.roundTrip() }
    let elapsed = clock.now - start
    let seconds = Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18
    let rate = Double(roundTrips) / seconds
    let micros = seconds * 1e6 / Double(roundTrips)
    print("pipe ping-pong on \(selected.kind): \(roundTrips) round trips in \(format3(seconds)) s: "
        + "\(Int(rate)) round trips/s, \(format3(micros)) us per round trip (4 operations)")
} catch {
    demo.close()
    fail("ping-pong on \(selected.kind): \(error)")
}
demo.close()

func format3(_ x: Double) -> String {
    let scaled = (x * 1000).rounded() / 1000
    return "\(scaled)"
}
