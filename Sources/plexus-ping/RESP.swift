import Glibc
import Plexus

// The RESP side of plexus-ping: parse every complete command in what arrived (inline
// `PING\r\n` or multibulk `*1\r\n$4\r\nPING\r\n`), answer each into the output buffer,
// leave a partial command where it is for the next read.

/// One parsed command: its argument count, and where its first three arguments are.
struct Command {
    var argc = 0
    var name = 0..<0
    var first = 0..<0
    var second = 0..<0
}

enum Parsed {
    /// A whole command, ending at `end`.
    case command(Command, end: Int)
    /// Something that asks nothing (an empty line, `*0`), ending at `end`.
    case nothing(end: Int)
    /// The command is not complete yet.
    case incomplete
    /// Not RESP: answered with an error, then the connection is closed (as redis does).
    case error(String)
}

/// What `RESP.process` did.
struct Processed {
    /// Input bytes consumed (complete commands answered).
    var consumed = 0
    /// Output bytes written.
    var written = 0
    /// The output filled up before every complete command was answered: write, then process again.
    var outputFull = false
    /// An answer needs this many bytes and the output buffer is smaller even when empty.
    var needsOutputCapacity = 0
    /// Close after writing the output (QUIT, protocol error).
    var close = false
}

enum RESP {
    static let maxInline = 64 * 1024
    static let maxBulk = 64 * 1024 * 1024
    static let maxArguments = 1024 * 1024

    private static let cr = UInt8(ascii: "\r"), lf = UInt8(ascii: "\n")

    /// Parses and answers every complete command of `input`, writing into `output`'s spare capacity.
    static func process(_ input: UnsafeRawBufferPointer, into output: inout IOBuffer) -> Processed {
        var result = Processed()
        let outputWasEmpty = output.isEmpty
        output.appendUnsafe { spare in
            var out = Writer(base: spare.baseAddress!, capacity: spare.count)
            var position = 0
            while position < input.count {
                switch parse(input, from: position) {
                case .incomplete:
                    result.written = out.count
                    result.consumed = position
                    return out.count
                case .nothing(let end):
                    position = end
                case .command(let command, let end):
                    let before = out.count
                    let fits = answer(command, input, &out)
                    if !fits {
                        out.count = before
                        result.outputFull = true
                        if before == 0 && outputWasEmpty { result.needsOutputCapacity = replySize(command, input) }
                        result.written = out.count
                        result.consumed = position
                        return out.count
                    }
                    position = end
                    if command.argc > 0 && matches(input, command.name, "QUIT") {
                        result.close = true
                        result.written = out.count
                        result.consumed = position
                        return out.count
                    }
                case .error(let message):
                    guard out.append("-ERR Protocol error: \(message)\r\n") else {
                        // No room beside the answers before it: send those, then parse
                        // again from here (an empty output always has room for it).
                        result.outputFull = true
                        if out.count == 0 && outputWasEmpty { result.needsOutputCapacity = 256 }
                        result.written = out.count
                        result.consumed = position
                        return out.count
                    }
                    result.close = true
                    result.written = out.count
                    result.consumed = input.count
                    return out.count
                }
            }
            result.written = out.count
            result.consumed = position
            return out.count
        }
        return result
    }

    // MARK: Parsing

    @inline(__always)
    static func parse(_ b: UnsafeRawBufferPointer, from start: Int) -> Parsed {
        b[start] == UInt8(ascii: "*") ? parseMultibulk(b, from: start) : parseInline(b, from: start)
    }

    /// An integer from `start` up to "\r\n": (value, index after the "\n"), nil when incomplete.
    @inline(__always)
    private static func integerLine(_ b: UnsafeRawBufferPointer, _ start: Int) -> (Int, Int)?? {
        var i = start
        var value = 0
        var negative = false
        if i < b.count && b[i] == UInt8(ascii: "-") { negative = true; i += 1 }
        let digitsStart = i
        while i < b.count {
            let c = b[i]
            if c == cr { break }
            guard c >= 0x30 && c <= 0x39, i - digitsStart < 18 else { return .some(nil) }
            value = value * 10 + Int(c - 0x30)
            i += 1
        }
        if i + 1 >= b.count { return nil }  // no "\r\n" yet
        guard i > digitsStart, b[i + 1] == lf else { return .some(nil) }
        return (negative ? -value : value, i + 2)
    }

    private static func parseMultibulk(_ b: UnsafeRawBufferPointer, from start: Int) -> Parsed {
        guard let header = integerLine(b, start + 1) else {
            return b.count - start > 32 ? .error("invalid multibulk length") : .incomplete
        }
        guard let (count, afterHeader) = header, count <= maxArguments else { return .error("invalid multibulk length") }
        if count <= 0 { return .nothing(end: afterHeader) }
        var command = Command(argc: count)
        var i = afterHeader
        for k in 0..<count {
            guard i < b.count else { return .incomplete }
            guard b[i] == UInt8(ascii: "$") else {
                return .error("expected '$', got '\(Character(Unicode.Scalar(b[i])))'")
            }
            guard let line = integerLine(b, i + 1) else {
                return b.count - i > 32 ? .error("invalid bulk length") : .incomplete
            }
            guard let (length, dataStart) = line, length >= 0, length <= maxBulk else { return .error("invalid bulk length") }
            let dataEnd = dataStart + length
            guard dataEnd + 2 <= b.count else { return .incomplete }
            guard b[dataEnd] == cr, b[dataEnd + 1] == lf else { return .error("bulk string not terminated by CRLF") }
            switch k {
            case 0: command.name = dataStart..<dataEnd
            case 1: command.first = dataStart..<dataEnd
            case 2: command.second = dataStart..<dataEnd
            default: break
            }
            i = dataEnd + 2
        }
        return .command(command, end: i)
    }

    private static func parseInline(_ b: UnsafeRawBufferPointer, from start: Int) -> Parsed {
        guard let found = memchr(b.baseAddress! + start, Int32(lf), b.count - start) else {
            return b.count - start > maxInline ? .error("too big inline request") : .incomplete
        }
        let newline = b.baseAddress!.distance(to: UnsafeRawPointer(found))
        var lineEnd = newline
        if lineEnd > start && b[lineEnd - 1] == cr { lineEnd -= 1 }
        var command = Command()
        var i = start
        while i < lineEnd {
            while i < lineEnd && (b[i] == UInt8(ascii: " ") || b[i] == UInt8(ascii: "\t")) { i += 1 }
            if i == lineEnd { break }
            let tokenStart = i
            while i < lineEnd && b[i] != UInt8(ascii: " ") && b[i] != UInt8(ascii: "\t") { i += 1 }
            switch command.argc {
            case 0: command.name = tokenStart..<i
            case 1: command.first = tokenStart..<i
            case 2: command.second = tokenStart..<i
            default: break
            }
            command.argc += 1
        }
        return command.argc == 0 ? .nothing(end: newline + 1) : .command(command, end: newline + 1)
    }

    /// Case-insensitive comparison of an argument with an upper-case ASCII word.
    @inline(__always)
    static func matches(_ b: UnsafeRawBufferPointer, _ range: Range<Int>, _ word: StaticString) -> Bool {
        guard range.count == word.utf8CodeUnitCount else { return false }
        let w = word.utf8Start
        for k in 0..<range.count where b[range.lowerBound + k] & 0xDF != w[k] { return false }
        return true
    }

    // MARK: Answers

    private static let pong: StaticString = "+PONG\r\n"

    /// Writes the answer to `command`; false if it does not fit.
    @inline(__always)
    static func answer(_ command: Command, _ b: UnsafeRawBufferPointer, _ out: inout Writer) -> Bool {
        if matches(b, command.name, "PING") {
            switch command.argc {
            case 1: return out.append(pong)
            case 2: return out.appendBulk(UnsafeRawBufferPointer(rebasing: b[command.first]))
            default: return out.append("-ERR wrong number of arguments for 'ping' command\r\n")
            }
        }
        if matches(b, command.name, "ECHO") {
            return command.argc == 2 ? out.appendBulk(UnsafeRawBufferPointer(rebasing: b[command.first]))
                : out.append("-ERR wrong number of arguments for 'echo' command\r\n")
        }
        if matches(b, command.name, "QUIT") { return out.append("+OK\r\n") }
        if matches(b, command.name, "COMMAND") { return out.append("*0\r\n") }
        if matches(b, command.name, "CONFIG") {
            // redis-benchmark asks CONFIG GET save / appendonly: a server without persistence.
            guard command.argc == 3, matches(b, command.first, "GET") else {
                return out.append("-ERR only CONFIG GET save|appendonly is supported\r\n")
            }
            if matches(b, command.second, "APPENDONLY") {
                return out.append("*2\r\n$10\r\nappendonly\r\n$2\r\nno\r\n")
            }
            if matches(b, command.second, "SAVE") {
                return out.append("*2\r\n$4\r\nsave\r\n$0\r\n\r\n")
            }
            return out.append("*0\r\n")
        }
        // A CR or LF from the client inside the error line would end it early and put
        // every later reply out of step: control bytes become spaces, as Redis does.
        let printable = b[command.name.prefix(64)].map { $0 < 0x20 || $0 == 0x7f ? UInt8(ascii: " ") : $0 }
        let name = String(decoding: printable, as: UTF8.self)
        return out.append("-ERR unknown command '\(name)'\r\n")
    }

    /// An upper bound of the answer's size.
    static func replySize(_ command: Command, _ b: UnsafeRawBufferPointer) -> Int {
        command.first.count + 256
    }
}

/// Appends replies to raw memory, never past `capacity`.
struct Writer {
    let base: UnsafeMutableRawPointer
    let capacity: Int
    var count = 0

    @inline(__always)
    mutating func append(_ text: StaticString) -> Bool {
        let n = text.utf8CodeUnitCount
        guard count + n <= capacity else { return false }
        (base + count).copyMemory(from: text.utf8Start, byteCount: n)
        count += n
        return true
    }

    mutating func append(_ text: String) -> Bool {
        var text = text
        return text.withUTF8 { bytes in
            guard count + bytes.count <= capacity else { return false }
            (base + count).copyMemory(from: bytes.baseAddress!, byteCount: bytes.count)
            count += bytes.count
            return true
        }
    }

    /// `$<length>\r\n<bytes>\r\n`.
    mutating func appendBulk(_ bytes: UnsafeRawBufferPointer) -> Bool {
        let header = "$\(bytes.count)\r\n"
        guard count + header.utf8.count + bytes.count + 2 <= capacity else { return false }
        _ = append(header)
        if bytes.count > 0 { (base + count).copyMemory(from: bytes.baseAddress!, byteCount: bytes.count) }
        count += bytes.count
        return append("\r\n" as StaticString)
    }
}
