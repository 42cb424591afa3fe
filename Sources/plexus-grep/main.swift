// plexus-grep: the classic coroutine grep, written with Plexus.
//
//   plexus-grep [-n] [-i] PATTERN [FILE...]
//
// A reader task on one event loop reads each file (or stdin) through the loop, 64 KiB at
// a time, splits it into lines and sends every line through a bounded MessageQueue
// (backpressure: the reader waits when the consumer is behind). The consumer, a
// callback on a second loop, takes the lines a batch at a time and prints the ones that
// contain PATTERN: a plain substring match (no regular expressions).
import CPlexus
import Glibc
import Plexus
import SystemPackage

/// One line of input, without its newline.
struct Line: Sendable {
    let file: Int
    let number: Int
    let bytes: [UInt8]
}

/// write(2) until every byte is written; the errno when a write fails.
@discardableResult
func writeAll(_ fd: Int32, _ bytes: UnsafeRawBufferPointer) -> Int32? {
    var left = bytes
    while !left.isEmpty {
        let n = Glibc.write(fd, left.baseAddress, left.count)
        if n < 0 && plexus_errno() == EINTR { continue }
        if n < 0 { return plexus_errno() }
        left = UnsafeRawBufferPointer(rebasing: left[n...])
    }
    return nil
}

func writeLine(_ fd: Int32, _ text: String) {
    var line = text + "\n"
    _ = line.withUTF8 { writeAll(fd, UnsafeRawBufferPointer($0)) }
}

/// Ends the program when stdout cannot take the output. The loops' threads block SIGPIPE
/// (a closed socket must not kill a server), so a reader that went away (`| head`) shows
/// as EPIPE: end as grep does then, killed by SIGPIPE, without a message. Any other
/// error is reported, with grep's status for trouble, 2.
func outputFailed(_ errno: Int32) -> Never {
    if errno == EPIPE {
        signal(SIGPIPE, SIG_DFL)
        var pipeSignal = sigset_t()
        sigemptyset(&pipeSignal)
        sigaddset(&pipeSignal, SIGPIPE)
        pthread_sigmask(SIG_UNBLOCK, &pipeSignal, nil)
        raise(SIGPIPE)
    }
    writeLine(2, "plexus-grep: write error: \(String(cString: strerror(errno)))")
    exit(2)
}

func usage(_ code: Int32) -> Never {
    writeLine(code == 0 ? 1 : 2, """
        usage: plexus-grep [-n] [-i] PATTERN [FILE...]

        Prints the lines of each FILE (or of stdin, when there is none or FILE is -)
        that contain PATTERN. PATTERN is a plain substring, not a regular expression.

          -n    prefix each line with its line number
          -i    ignore ASCII case
        With more than one FILE each line is prefixed with its file name.
        Exit status: 0 if a line matched, 1 if none did, 2 if a file could not be read.

        Files are read through a Plexus event loop (PLEXUS_BACKEND=io_uring|epoll|poll|auto)
        and the lines go through a MessageQueue to a consumer on a second loop.
        """)
    exit(code)
}

// MARK: Arguments

var numberLines = false
var ignoreCase = false
var operands: [String] = []
var optionsEnded = false
for argument in CommandLine.arguments.dropFirst() {
    if !optionsEnded && argument.hasPrefix("-") && argument.count > 1 {
        switch argument {
        case "--": optionsEnded = true
        case "-h", "--help": usage(0)
        case "-n": numberLines = true
        case "-i": ignoreCase = true
        case "-ni", "-in": numberLines = true; ignoreCase = true
        default:
            writeLine(2, "plexus-grep: unknown option \(argument)")
            usage(2)
        }
    } else {
        operands.append(argument)
    }
}
guard let patternText = operands.first else { usage(2) }
let files = operands.count > 1 ? Array(operands.dropFirst()) : ["-"]

// MARK: Matching

/// A plain substring search, optionally ignoring ASCII case.
struct Matcher: Sendable {
    let pattern: [UInt8]
    let ignoreCase: Bool

    init(_ text: String, ignoreCase: Bool) {
        self.ignoreCase = ignoreCase
        pattern = ignoreCase ? text.utf8.map(Matcher.folded) : Array(text.utf8)
    }

    @inline(__always)
    static func folded(_ byte: UInt8) -> UInt8 {
        byte >= UInt8(ascii: "A") && byte <= UInt8(ascii: "Z") ? byte | 0x20 : byte
    }

    /// True if `line` contains the pattern (memchr finds candidates when case matters).
    func matches(_ line: [UInt8]) -> Bool {
        let m = pattern.count
        if m == 0 { return true }
        if m > line.count { return false }
        return line.withUnsafeBufferPointer { l in
            pattern.withUnsafeBufferPointer { p in
                let last = l.count - m
                var i = 0
                while i <= last {
                    if ignoreCase {
                        if Matcher.folded(l[i]) != p[0] { i += 1; continue }
                    } else {
                        guard let hit = memchr(l.baseAddress! + i, Int32(p[0]), last - i + 1) else { return false }
                        i = UnsafeRawPointer(l.baseAddress!).distance(to: UnsafeRawPointer(hit))
                    }
                    var k = 1
                    while k < m && (ignoreCase ? Matcher.folded(l[i + k]) : l[i + k]) == p[k] { k += 1 }
                    if k == m { return true }
                    i += 1
                }
                return false
            }
        }
    }
}

let matcher = Matcher(patternText, ignoreCase: ignoreCase)
let prefixNumbers = numberLines

// MARK: Loops and the queue

let reader: EventLoop
let printer: EventLoop
do {
    reader = try EventLoop.startThread(name: "grep-reader")
    printer = try EventLoop.startThread(name: "grep-printer")
} catch {
    writeLine(2, "plexus-grep: \(error)")
    exit(2)
}

let queue = MessageQueue<Line>(capacity: 4096, loop: printer)

/// Posted by the consumer once the queue closed and every line was printed.
final class Finished: @unchecked Sendable {
    private let semaphore = UnsafeMutablePointer<sem_t>.allocate(capacity: 1)
    init() { sem_init(semaphore, 0, 0) }
    func post() { sem_post(semaphore) }
    func wait() { while sem_wait(semaphore) != 0 && plexus_errno() == EINTR {} }
}
let finished = Finished()

/// Counts kept by the consumer (printer loop only), read by main after `finished`.
final class Tally: @unchecked Sendable {
    var matches = 0
    var failures = 0
}
let tally = Tally()

/// Starts the reader task; called once the consumer is attached (a queue closed
/// before it has a consumer hands its messages back to `close` instead).
@Sendable func startReader() {
    Task(executorPreference: reader) {
        for (index, path) in files.enumerated() {
            do {
                if path == "-" {
                    try await readLines(File(fd: .standardInput, loop: reader), index: index, positional: false)
                } else {
                    let file = try await File.open(FilePath(path), on: reader)
                    // A named file may be a pipe (a FIFO, `<(...)`, /dev/stdin): positional
                    // reads only where the file can seek, else ESPIPE.
                    let seekable = lseek(file.fd.rawValue, 0, SEEK_CUR) >= 0
                    do {
                        try await readLines(file, index: index, positional: seekable)
                    } catch {
                        try? await file.close()
                        throw error
                    }
                    try await file.close()
                }
            } catch {
                writeLine(2, "plexus-grep: \(path): \(error)")
                printer.execute { tally.failures += 1 }
            }
        }
        _ = queue.close()
    }
}

printer.execute {
    var output: [UInt8] = []
    output.reserveCapacity(64 * 1024)
    queue.onBatch({ batch in
        for line in batch where matcher.matches(line.bytes) {
            tally.matches += 1
            if files.count > 1 { output += files[line.file].utf8; output.append(UInt8(ascii: ":")) }
            if prefixNumbers { output += String(line.number).utf8; output.append(UInt8(ascii: ":")) }
            output += line.bytes
            output.append(UInt8(ascii: "\n"))
        }
        // One write per batch, straight to stdout (it may be a tty or a file).
        if let errno = output.withUnsafeBytes({ writeAll(1, $0) }) { outputFailed(errno) }
        output.removeAll(keepingCapacity: true)
    }, onClosed: {
        finished.post()
    })
    startReader()
}

/// Reads `file` through the loop and sends its lines, the last one even without a newline.
@Sendable func readLines(_ file: File, index: Int, positional: Bool) async throws {
    var buffer = IOBuffer(capacity: 64 * 1024)
    var offset: Int64 = 0
    var partial: [UInt8] = []
    var number = 0
    var lines: [Line] = []
    while true {
        let read = try await file.read(into: buffer, at: positional ? offset : nil)
        let count = read.count
        buffer = read.takeBuffer()
        if count == 0 { break }
        offset += Int64(count)
        buffer.withUnsafeBytes { bytes in
            var start = 0
            while start < bytes.count {
                guard let hit = memchr(bytes.baseAddress! + start, Int32(UInt8(ascii: "\n")), bytes.count - start) else {
                    partial += bytes[start...]
                    break
                }
                let end = bytes.baseAddress!.distance(to: UnsafeRawPointer(hit))
                number += 1
                lines.append(Line(file: index, number: number, bytes: partial + bytes[start..<end]))
                partial.removeAll(keepingCapacity: true)
                start = end + 1
            }
        }
        buffer.clear()
        for line in lines { try await queue.send(line) }
        lines.removeAll(keepingCapacity: true)
    }
    if !partial.isEmpty {
        number += 1
        try await queue.send(Line(file: index, number: number, bytes: partial))
    }
}

finished.wait()
reader.shutdownAndWait()
printer.shutdownAndWait()
exit(tally.failures > 0 ? 2 : tally.matches > 0 ? 0 : 1)
