import Glibc
import Plexus

/// Buffer sizes of a session. A pipelined burst bigger than the input buffer is answered
/// in pieces; a command bigger than it grows the buffer, up to `maxQuery`.
enum Session {
    static let inputCapacity = 16 * 1024
    static let outputCapacity = 16 * 1024
    /// Least spare room a read gets; below it the buffer is compacted, then grown.
    static let minimumSpare = 4 * 1024
    /// Most bytes of one unfinished command a connection may hold (`--max-query`; 1 GiB,
    /// redis-server's client-query-buffer-limit). Set before the loops serve.
    nonisolated(unsafe) static var maxQuery = 1 << 30

    /// Makes room behind a partial command for the next read. False, with a line on
    /// stderr, when that command already holds `maxQuery` bytes: the caller then closes
    /// the connection, as redis-server closes a client past its limit, instead of growing
    /// the buffer without bound (a client announcing arguments it never finishes could
    /// take all memory).
    static func makeRoom(_ buffer: inout IOBuffer) -> Bool {
        guard buffer.spareCapacity < minimumSpare else { return true }
        buffer.compact()
        if buffer.spareCapacity < minimumSpare {
            guard buffer.count < maxQuery else {
                writeLine(2, "plexus-ping: closing a connection whose unfinished command passed --max-query (\(maxQuery) bytes)")
                return false
            }
            buffer = buffer.copy(capacity: min(buffer.capacity * 2, maxQuery + minimumSpare))
        }
        return true
    }

    /// Parses what `input` holds and answers into `output`, growing the output for an
    /// answer bigger than it; returns what RESP.process reported.
    static func answer(_ input: inout IOBuffer, _ output: inout IOBuffer) -> Processed {
        while true {
            let processed = input.withUnsafeBytes { RESP.process($0, into: &output) }
            input.consume(processed.consumed)
            if processed.needsOutputCapacity > 0 {
                output = IOBuffer(capacity: max(processed.needsOutputCapacity, output.capacity * 2))
                continue
            }
            return processed
        }
    }
}

/// One connection served with callbacks: recv, answer everything complete in ONE send,
/// and post the next recv together with that send (both go to the kernel in the same
/// turn; on io_uring in the same submission), so the next request finds a read waiting.
/// Each callback captures only the session (no allocation per request).
final class CallbackSession {
    let connection: StreamConnection
    /// The input buffer when no recv holds it.
    private var input: IOBuffer?
    /// The output buffer when no send holds it.
    private var output: IOBuffer?
    /// A recv completed while the send was still out: process once the output is back.
    private var inputWaiting = false
    private var closeAfterWrite = false
    private var finished = false

    init(_ connection: StreamConnection) {
        self.connection = connection
        input = IOBuffer(capacity: Session.inputCapacity)
        output = IOBuffer(capacity: Session.outputCapacity)
    }

    func start() {
        receive(input.take()!)
    }

    private func receive(_ buffer: consuming IOBuffer) {
        var buffer = buffer
        guard Session.makeRoom(&buffer) else {
            finish()
            return
        }
        connection.read(buffer) { [self] result, buffer in
            guard case .success(let n) = result, n > 0 else {
                finish()
                return
            }
            if output == nil {  // the previous answers are still being sent
                input = consume buffer
                inputWaiting = true
                return
            }
            process(buffer)
        }
    }

    private func process(_ buffer: consuming IOBuffer) {
        var input = buffer
        var output = self.output.take()!
        let processed = Session.answer(&input, &output)
        if output.isEmpty {
            self.output = consume output
            if processed.close { finish() } else { receive(input) }
            return
        }
        closeAfterWrite = processed.close
        send(output)
        if processed.outputFull || processed.close {
            // More complete commands wait in the input (or the connection ends): no read yet.
            self.input = consume input
            inputWaiting = !processed.close
        } else {
            receive(input)
        }
    }

    private func send(_ buffer: consuming IOBuffer) {
        connection.write(buffer) { [self] result, buffer in
            guard case .success = result else {
                finish()
                return
            }
            if !buffer.isEmpty {  // short write: send the rest
                send(buffer)
                return
            }
            output = consume buffer
            if closeAfterWrite {
                finish()
            } else if inputWaiting {
                inputWaiting = false
                process(input.take()!)
            }
        }
    }

    private func finish() {
        guard !finished else { return }
        finished = true
        connection.close()
    }
}

/// One connection served by a task on the connection's loop: one await per read and one
/// per write of all the answers.
func serveAsync(_ connection: StreamConnection) async {
    var input = IOBuffer(capacity: Session.inputCapacity)
    var output = IOBuffer(capacity: Session.outputCapacity)
    do {
        session: while true {
            guard Session.makeRoom(&input) else { break session }
            let read = try await connection.read(into: input)
            let count = read.count
            input = read.takeBuffer()
            if count == 0 { break }
            while true {
                let processed = Session.answer(&input, &output)
                if output.isEmpty {
                    if processed.close { break session }
                    break
                }
                output = try await connection.writeAll(output)
                if processed.close { break session }
            }
        }
    } catch {
        // The peer went away (or the loop shuts down): close below.
    }
    try? await connection.close()
}
