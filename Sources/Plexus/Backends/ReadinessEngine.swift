import CPlexus
import Glibc
import HeapModule
import SystemPackage

// The completion engine shared by the epoll and poll backends: the reactor-as-proactor
// of libxev and Asio. Each operation is first tried directly; when the syscall says
// EAGAIN the record is parked on its fd's read or write FIFO, and when the poller
// reports readiness the parked records are retried in order. What differs between
// epoll and poll (how interest is registered, how readiness is collected) is a
// `ReadinessPoller`; everything else lives here once.
//
// Limits, as in libuv and libxev: regular-file I/O runs on the loop thread (it does
// not return EAGAIN); connect(2) on a socket without O_NONBLOCK blocks until the
// kernel answers. The per-fd cache (file type, O_NONBLOCK, registration) is dropped
// when Plexus closes an fd or hands out a new fd with the same number (accept, open),
// and a lost epoll registration is noticed and redone; an fd closed outside Plexus and
// replaced by one of a different kind (a blocking pipe where a nonblocking one was)
// keeps the old cache until Plexus closes it. epoll notices such a close only when it
// next asks the kernel about the fd (EPOLL_CTL_MOD: when a record parks with a rearm, or
// the first time the engine would block after a read parked without one): operations
// parked on an fd that epoll checked already and that is then closed outside Plexus wait
// for ever, as the kernel dropped its registration with the file.

/// The epoll and poll backends: a `ReadinessEngine` behind each one's public face. The
/// internal entry points the loop uses go straight to the engine, once for both.
protocol ReadinessBackend: PreparesBufferOperations {
    associatedtype Poller: ReadinessPoller
    var engine: ReadinessEngine<Poller> { get }
}

extension ReadinessBackend {
    @inline(__always)
    func prepare(_ kind: OperationKind, _ fd: FileDescriptor, _ buffer: consuming IOBuffer, offset: Int64?,
                 flags: Int32) -> Token {
        engine.prepare(kind, fd, buffer, offset: offset, flags: flags)
    }

    @inline(__always)
    func prepareHandingBack(_ kind: OperationKind, _ fd: FileDescriptor, _ buffer: consuming IOBuffer,
                            offset: Int64?, flags: Int32) -> Token {
        engine.prepareHandingBack(kind, fd, buffer, offset: offset, flags: flags)
    }

    var handBackTarget: Unmanaged<BufferHandBack>? {
        get { engine.handBackTarget }
        set { engine.handBackTarget = newValue }
    }
}

/// How a readiness backend learns which fds are ready. Implementations hold only
/// pointers and fds, so the engine keeps them in a `let` and calls them without
/// exclusivity checks.
protocol ReadinessPoller {
    static var backendKind: BackendKind { get }
    /// The wait call, for errors ("epoll_wait", "poll").
    static var waitCallName: String { get }
    /// `update(rearm: true)` is a syscall (EPOLL_CTL_MOD), which the engine puts off for
    /// reads that wait after a short read (see `ReadinessEngine.park`). poll(2) looks at
    /// every fd on every call, so it has nothing to put off.
    static var rearmIsASyscall: Bool { get }

    init(entries: UInt32) throws(PlexusError)
    /// Releases the poller's fd and memory.
    func destroy()

    /// First sight of a pollable-looking fd. Returns 0, or -errno; -EPERM means the fd
    /// cannot be polled at all (regular files under epoll) and is run directly.
    func register(_ fd: Int32) -> Int32

    /// The parked operations of `fd` now want `interest` (POLLIN/POLLOUT/... bits; 0 when
    /// none are parked). `rearm` asks for a fresh report of the fd's current readiness
    /// (edge-triggered pollers would otherwise miss a state that has not changed).
    /// Returns 0, -EBADF when the fd was closed outside Plexus, -ENOENT when the fd's
    /// registration was lost (the fd was closed outside Plexus and its number reused) and
    /// it must be registered again, or -EPERM when the number was reused by an fd the
    /// poller cannot watch (a regular file under epoll).
    func update(_ fd: Int32, interest: UInt32, rearm: Bool, states: RawArray<FDState>) -> Int32

    /// Forgets `fd` before it is closed.
    func remove(_ fd: Int32, states: RawArray<FDState>)

    /// Waits for readiness for at most `timeout` (nil: without limit). Returns the number
    /// of ready fds, or -errno.
    func wait(_ timeout: UnsafePointer<timespec>?) -> Int32

    /// Ready fd `i` (below the count `wait` returned) and its poll(2)-style event bits.
    func event(_ i: Int) -> (fd: Int32, events: UInt32)

    /// Why `wait` failed with `errno`, when there is more to say than the errno.
    func explain(_ errno: Int32) -> String?
}

extension ReadinessPoller {
    func explain(_ errno: Int32) -> String? { nil }
}

/// What the engine knows about one fd number, filled on first sight (fstat + F_GETFL)
/// and forgotten when Plexus closes the fd or hands out a new fd with the same number.
struct FDState {
    enum Mode: UInt8 {
        /// Not seen yet (or forgotten).
        case unknown
        /// Regular file, directory, block device, or anything the poller rejects: the
        /// syscall is run directly (it does not wait for readiness).
        case direct
        /// A socket with O_NONBLOCK.
        case socket
        /// A socket without O_NONBLOCK: data calls go through recv/send with MSG_DONTWAIT;
        /// accept waits for readiness first.
        case blockingSocket
        /// A pollable fd with O_NONBLOCK (pipe, eventfd, tty...): try first.
        case nonBlocking
        /// A pollable fd without O_NONBLOCK: wait for readiness, then one call per report
        /// (a write capped at PIPE_BUF), so the loop thread never blocks.
        case blocking
    }

    var mode: Mode = .unknown
    /// Known to the poller (epoll: added to the interest list).
    var registered = false
    var readHead = OperationTable.none
    var readTail = OperationTable.none
    var writeHead = OperationTable.none
    var writeTail = OperationTable.none
    /// `Operation.poll` records (one-shot and multishot).
    var pollHead = OperationTable.none
    var pollTail = OperationTable.none
    /// The poll backend's slot in its pollfd array, -1 when it has none.
    var slot: Int32 = -1
    /// A byte stream (pipe, FIFO, stream socket): a read that returns fewer bytes than
    /// asked for has emptied its buffer. Not so for datagrams.
    var isStream = false
    /// A read of this stream came back short and no read-readiness report came since:
    /// its buffer is empty, so the next read waits for the report instead of trying a
    /// syscall that would say EAGAIN (Tokio's rule over edge-triggered epoll).
    var readDrained = false
    /// A read parked on this fd without the poller's rearm, which also proves the fd is
    /// still the one registered; it is in the engine's `unverified` list.
    var unverified = false
    /// A Unix stream or seqpacket socket: its peer's shutdown(SHUT_RD) ends the writes
    /// parked here (EPIPE) without a readiness report. Nil until a write first parks on
    /// the socket (getsockopt then, not for every accepted TCP connection).
    var isUnixConnection: Bool? = nil
    /// Writes are parked here and the fd is in the engine's `unixWriters` list.
    var inUnixWriters = false
    /// When its parked writes are next retried without a report (CLOCK_MONOTONIC ns),
    /// and the interval after that one (ms, doubling from 100 to 1600).
    var unixRetryDue: UInt64 = 0
    var unixRetryInterval: UInt32 = 0

    var isIdle: Bool {
        readHead == OperationTable.none && writeHead == OperationTable.none && pollHead == OperationTable.none
    }
}

/// Where a record is while the engine owns it.
enum RecordPlace: UInt8 {
    /// Not queued anywhere (free, or being started).
    case none
    /// In the prepared FIFO, not started.
    case prepared
    /// Parked on its fd's read, write or poll FIFO.
    case read, write, poll
    /// In the timer heap.
    case timer
    /// Its final completion is queued; it can no longer be cancelled.
    case done
}

/// The engine's per-record state, beside the table's record (indexed the same way).
struct RecordInfo {
    /// Set when the record starts (`start`), except for a read, write, send or recv done at
    /// once by `transferDirectly` or `transferReady`: valid only for records started the
    /// general way, or parked.
    var view = KernelView()
    var place: RecordPlace = .none
    /// connect: the first connect(2) has been made, so EISCONN now means success.
    var retried = false
    /// A deadline entry for this record is in the timer heap.
    var hasDeadline = false
}

/// A completion waiting to be delivered, kept as plain values until `wait` hands it out.
struct QueuedCompletion {
    var index: UInt32
    var generation: UInt32
    var result: Int32
    var flags: UInt32
    /// The provided buffer a multishot receive filled; `.max` for none (groups hold at most 32768).
    var bufferID: UInt16 = .max
}

/// A buffer group's free list: the ids a multishot receive may fill next.
struct ProvidedPool {
    let group: BufferGroup
    var free: [UInt16]
    /// Multishot receives parked for want of a buffer. Tokens, not indices: one may end
    /// (cancelled, closed) and its slot go to another operation before the next recycle.
    var starved: [Token] = []
}

/// One timeout in the heap; stale entries (cancelled, slot reused) are skipped by generation.
struct TimerEntry: Comparable {
    var deadline: UInt64
    var sequence: UInt64
    var index: UInt32
    var generation: UInt32
    /// A deadline of an I/O record (cancel it), not a timeout record (complete it).
    var cancels = false

    static func < (a: TimerEntry, b: TimerEntry) -> Bool {
        a.deadline != b.deadline ? a.deadline < b.deadline : a.sequence < b.sequence
    }
}

/// The completion protocol emulated over readiness; `EpollBackend` and `PollBackend` are
/// this engine with their poller.
final class ReadinessEngine<Poller: ReadinessPoller> {
    let table = OperationTable()
    let poller: Poller
    let infos = RawArray<RecordInfo>(capacity: OperationTable.chunkSize)
    /// Indexed by fd number; grows only when a larger fd appears.
    let fds = RawArray<FDState>(capacity: 64)
    let prepared = RawArray<UInt32>(capacity: 64)
    let completions = RawArray<QueuedCompletion>(capacity: 256)
    /// Next completion to deliver (kept in the engine so a nested `wait` from a
    /// completion handler never delivers one twice).
    @exclusivity(unchecked) var deliverHead = 0
    /// Records parked on some fd (0: there is nothing to poll for).
    @exclusivity(unchecked) var parkedCount = 0
    /// Turns in a row that delivered ready results without polling the parked fds.
    @exclusivity(unchecked) var skippedPolls = 0
    /// fds with a read parked without a rearm (`park`), verified before the engine blocks,
    /// or after `unverifiedPollsAllowed` polls.
    let unverified = RawArray<Int32>(capacity: 16)
    /// Polls since the oldest entry of `unverified` went in.
    @exclusivity(unchecked) var unverifiedPolls = 0
    /// Unix stream and seqpacket sockets with writes parked, each retried 100 ms after a
    /// write first parks there, then at doubling intervals up to 1.6 s while writes stay
    /// parked: a blocking send(2) there fails with EPIPE once the peer shuts down its read
    /// side (the kernel wakes it), but unix_poll reports no POLLOUT, POLLERR or POLLHUP for
    /// that, so no readiness report would ever end them. The backoff, per socket, bounds
    /// what a loop with many slow readers pays without delaying a socket parked later.
    let unixWriters = RawArray<Int32>(capacity: 8)
    /// The earliest `FDState.unixRetryDue` of the listed fds.
    @exclusivity(unchecked) var unixWritersDue: UInt64 = 0
    static var unixFirstRetryMilliseconds: UInt32 { 100 }
    static var unixLongestRetryMilliseconds: UInt32 { 1600 }
    static var unverifiedPollsAllowed: Int { 32 }
    static var pollsSkippable: Int { 7 }
    @exclusivity(unchecked) var timers = Heap<TimerEntry>()
    @exclusivity(unchecked) var timerSequence: UInt64 = 0
    /// Heap entries whose timer was cancelled (lazy deletion).
    @exclusivity(unchecked) var deadTimers = 0
    @exclusivity(unchecked) var statistics = BackendStatistics()
    @exclusivity(unchecked) var pools: [UInt16: ProvidedPool] = [:]
    @exclusivity(unchecked) var nextGroup: UInt16 = 0
    /// `PreparesBufferOperations.handBackTarget`.
    @exclusivity(unchecked) var handBackTarget: Unmanaged<BufferHandBack>?

    static var readEvents: UInt32 { UInt32(POLLIN | POLLPRI | POLLERR | POLLHUP) | UInt32(PLEXUS_POLLRDHUP) }
    static var writeEvents: UInt32 { UInt32(POLLOUT | POLLERR | POLLHUP) }
    static var moreFlag: UInt32 { CompletionFlags.more.rawValue }

    init(entries: UInt32) throws(PlexusError) {
        poller = try Poller(entries: entries)
        timers.reserveCapacity(64)
    }

    deinit {
        cancelAll { _ in }
        poller.destroy()
        table.destroy()
        infos.destroy()
        fds.destroy()
        prepared.destroy()
        completions.destroy()
        unverified.destroy()
        unixWriters.destroy()
        plexus_release_sigpipe()  // the caller's thread gets its signal mask back
    }

    var pendingCount: Int { table.liveCount }

    // MARK: Protocol

    @inline(__always)
    func prepare(_ operation: consuming Operation) -> Token {
        placed(table.insert(operation))
    }

    @inline(__always)
    func prepare(_ kind: OperationKind, _ fd: FileDescriptor, _ buffer: consuming IOBuffer, offset: Int64?,
                 flags: Int32) -> Token {
        placed(table.insert(kind, fd, buffer, offset: offset, flags: flags))
    }

    /// `prepare` of a read, write, send or recv whose final completion hands back only its
    /// buffer (`handsBackBuffer`).
    @inline(__always)
    func prepareHandingBack(_ kind: OperationKind, _ fd: FileDescriptor, _ buffer: consuming IOBuffer,
                            offset: Int64?, flags: Int32) -> Token {
        placed(table.insert(kind, fd, buffer, offset: offset, flags: flags, handsBackBuffer: true))
    }

    /// Puts a freshly inserted record in the prepared FIFO.
    @inline(__always)
    private func placed(_ token: Token) -> Token {
        if token.index >= infos.count { infos.grow(to: table.slotCount, filling: RecordInfo()) }
        infos.pointer(token.index).pointee.place = .prepared
        prepared.append(UInt32(token.index))
        statistics.prepared += 1
        return token
    }

    /// `prepare`, and a timer-heap entry that cancels the record at `deadline`.
    func prepare(_ operation: consuming Operation, deadline: Deadline) -> Token {
        guard operation.kind.takesDeadline else { return prepare(operation) }
        let token = prepare(operation)
        timerSequence &+= 1
        timers.insert(TimerEntry(deadline: deadline.nanoseconds, sequence: timerSequence, index: UInt32(token.index),
                                 generation: token.generation, cancels: true))
        infos.pointer(Int(token.index)).pointee.hasDeadline = true
        return token
    }

    /// Starts `operation` at once when it is one that tries its syscall first or runs on
    /// the loop thread anyway (nop, fsync, shutdown, open, close), after what was prepared
    /// before it (so writes to one fd keep their order).
    func attempt(_ operation: consuming Operation) -> Plexus.Attempt {
        switch operation.kind {
        case .read, .write, .readv, .writev, .send, .recv, .sendMessage, .receiveMessage, .accept: break
        case .nop, .fsync, .shutdown, .open, .close: break
        default: return .prepared(prepare(operation))
        }
        if !prepared.isEmpty { _ = submit() } else { plexus_block_sigpipe() }
        let token = prepare(operation)
        let index = Int(token.index)
        prepared.removeLast()
        start(index)
        guard infos[index].place == .done, completions.count > deliverHead,
              completions[completions.count - 1].index == UInt32(index) else { return .prepared(token) }
        let c = completions[completions.count - 1]
        completions.removeLast()
        if completions.count == deliverHead { completions.removeAll(); deliverHead = 0 }
        statistics.completed += 1
        return .completed(takeFinal(index, c))
    }

    func submit() -> Int {
        plexus_block_sigpipe()  // write(2) to a pipe without a reader raises it on this thread
        var started = 0
        var i = 0
        while i < prepared.count {
            let index = Int(prepared[i])
            i += 1
            // Cancelled before it started: its completion is already queued.
            guard infos[index].place == .prepared else { continue }
            start(index)
            started += 1
        }
        prepared.removeAll()
        return started
    }

    func wait(timeout: Duration?, _ body: (consuming Completion) -> Void) throws(PlexusError) -> Int {
        _ = submit()  // blocks SIGPIPE on this thread
        var limit: UInt64? = nil
        if let timeout {
            limit = Deadline.now.nanoseconds.addingSaturated(timeout.nanosecondsClamped)
        }
        while true {
            var interrupted = false
            let haveCompletions = completions.count > deliverHead
            if haveCompletions && (parkedCount == 0 || skippedPolls < Self.pollsSkippable) {
                // Nothing can become ready, or results are already here (operations that
                // finished at once): skip the zero-timeout poll, as the io_uring backend
                // skips io_uring_enter, but poll at least every 8th turn so parked
                // operations are never starved.
                if parkedCount > 0 { skippedPolls += 1 }
            } else {
                skippedPolls = 0
                var waitFor: UInt64? = nil
                if haveCompletions {
                    waitFor = 0
                } else {
                    let now = limit != nil || !timers.isEmpty || !unixWriters.isEmpty ? Deadline.now.nanoseconds : 0
                    if let limit { waitFor = limit > now ? limit - now : 0 }
                    if let next = timers.min {
                        let left = next.deadline > now ? next.deadline - now : 0
                        waitFor = min(waitFor ?? .max, left)
                    }
                    if !unixWriters.isEmpty {
                        waitFor = min(waitFor ?? .max, unixWritersDue > now ? unixWritersDue - now : 0)
                    }
                }
                if !unverified.isEmpty {
                    unverifiedPolls += 1
                    if unverifiedPolls > Self.unverifiedPollsAllowed {
                        // Reads unverified this long are verified now, busy loop or not.
                        verifyParkedReads()
                    } else if waitFor != 0 {
                        // About to block: first collect what is ready without waiting,
                        // which usually ends those reads; if nothing is, rearm the fds
                        // whose reads still wait before blocking on them.
                        try pollReady()
                        if completions.count == deliverHead { verifyParkedReads() }
                        continue
                    }
                }
                let n: Int32
                if let waitFor {
                    var ts = timespec(tv_sec: Int(min(waitFor / 1_000_000_000, UInt64(Int32.max))),
                                      tv_nsec: Int(waitFor % 1_000_000_000))
                    n = poller.wait(&ts)
                } else {
                    n = poller.wait(nil)
                }
                interrupted = try handleEvents(n)
                if !unixWriters.isEmpty { retryUnixWriters() }
            }
            if !timers.isEmpty { fireTimers() }
            if completions.count > deliverHead || interrupted { break }
            if let limit, Deadline.now.nanoseconds >= limit { break }
        }
        return deliver(body)
    }

    /// A zero-timeout poll; handles what it reports.
    private func pollReady() throws(PlexusError) {
        var zero = timespec(tv_sec: 0, tv_nsec: 0)
        _ = try handleEvents(poller.wait(&zero))
    }

    /// Handles the `n` events a poller wait returned. True when the wait was interrupted
    /// (EINTR); throws on any other error.
    @inline(__always)
    private func handleEvents(_ n: Int32) throws(PlexusError) -> Bool {
        if n == -EINTR { return true }
        if n < 0 { throw PlexusError(operation: Poller.waitCallName, errno: Errno(rawValue: -n), message: poller.explain(-n)) }
        for i in 0..<Int(n) {
            let (fd, events) = poller.event(i)
            handle(fd, events)
        }
        return false
    }

    /// Rearms every fd in `unverified` whose read still waits: EPOLL_CTL_MOD says ENOENT,
    /// EBADF or EPERM when the fd was closed outside Plexus since, and `refreshInterest`
    /// then registers the new one or ends the reads with EBADF, as a park's rearm would have.
    private func verifyParkedReads() {
        for i in 0..<unverified.count {
            let fd = unverified[i]
            guard Int(fd) < fds.count else { continue }
            let state = fds.pointer(Int(fd))
            guard state.pointee.unverified else { continue }  // forgotten or closed meanwhile
            state.pointee.unverified = false
            if state.pointee.readHead != OperationTable.none { refreshInterest(fd, rearm: true) }
        }
        unverified.removeAll()
        unverifiedPolls = 0
    }

    /// Starts what is prepared (as io_uring submits its SQ ahead of the cancel-all, so a
    /// prepared close still closes), then cancels everything still pending.
    func cancelAll(_ body: (consuming Completion) -> Void) {
        _ = submit()
        for index in table.liveIndices() {
            switch infos[index].place {
            case .done: break
            default: complete(index, -ECANCELED)
            }
        }
        for fd in 0..<fds.count {
            let s = fds.pointer(fd)
            if !s.pointee.isIdle {
                s.pointee.readHead = OperationTable.none; s.pointee.readTail = OperationTable.none
                s.pointee.writeHead = OperationTable.none; s.pointee.writeTail = OperationTable.none
                s.pointee.pollHead = OperationTable.none; s.pointee.pollTail = OperationTable.none
                _ = poller.update(Int32(fd), interest: 0, rearm: false, states: fds)
            }
        }
        parkedCount = 0
        timers.removeAll(where: { _ in true })
        deadTimers = 0
        _ = deliver(body)
    }

    // MARK: Completions

    @inline(__always)
    private func complete(_ index: Int, _ result: Int32, flags: CompletionFlags = []) {
        if result == -EPIPE { plexus_discard_sigpipe() }
        completions.append(QueuedCompletion(index: UInt32(index), generation: table.record(index).pointee.generation,
                                            result: result, flags: flags.rawValue))
        infos.pointer(index).pointee.place = .done
    }

    @inline(__always)
    private func completeMore(_ index: Int, _ result: Int32, bufferID: UInt16 = .max) {
        completions.append(QueuedCompletion(index: UInt32(index), generation: table.record(index).pointee.generation,
                                            result: result, flags: Self.moreFlag, bufferID: bufferID))
    }

    private func deliver(_ body: (consuming Completion) -> Void) -> Int {
        var delivered = 0
        while deliverHead < completions.count {
            let c = completions[deliverHead]
            deliverHead += 1
            let index = Int(c.index)
            let record = table.record(index)
            let token = Token(index: c.index, generation: c.generation)
            let kind = record.pointee.kind
            statistics.completed += 1
            delivered += 1
            if c.flags & Self.moreFlag != 0 {
                body(Completion(token: token, result: c.result, flags: CompletionFlags(rawValue: c.flags),
                                kind: kind, operation: nil, bufferID: c.bufferID == .max ? nil : c.bufferID))
            } else if record.pointee.handsBackBuffer, let target = handBackTarget {
                handBack(index, c, to: target)
            } else {
                body(takeFinal(index, c))
            }
        }
        completions.removeAll()
        deliverHead = 0
        return delivered
    }

    /// The final completion of record `index`, which leaves the table.
    @inline(__always)
    private func takeFinal(_ index: Int, _ c: QueuedCompletion) -> Completion {
        let kind = settle(index, c)
        return Completion(token: Token(index: c.index, generation: c.generation), result: c.result,
                          flags: CompletionFlags(rawValue: c.flags), kind: kind, operation: table.remove(index))
    }

    /// What every final completion does before its record leaves the table: off its place,
    /// its deadline entry dead, its result applied in the record (moved out once after).
    /// Returns the record's kind.
    @inline(__always)
    private func settle(_ index: Int, _ c: QueuedCompletion) -> OperationKind {
        let kind = table.record(index).pointee.kind
        infos.pointer(index).pointee.place = .none
        if _slowPath(infos[index].hasDeadline) {
            // Its deadline entry is dead now; dropTimer counts it (and may compact).
            infos.pointer(index).pointee.hasDeadline = false
            dropTimer(index)
        }
        table.record(index).pointee.apply(result: c.result, kind: kind, scratch: table.scratch(index))
        return kind
    }

    /// `takeFinal` of a record that hands back only its buffer, and the hand-back. Out of
    /// line: inlined, it took registers from `deliver`'s loop, and every other completion
    /// paid for the spills (a NOP on epoll, 17-33 instructions).
    @inline(never)
    private func handBack(_ index: Int, _ c: QueuedCompletion, to target: Unmanaged<BufferHandBack>) {
        let kind = settle(index, c)
        target.handBack(Token(index: c.index, generation: c.generation), c.result, kind, table.removeBuffer(index))
    }

    // MARK: Starting operations

    private func start(_ index: Int) {
        let record = table.record(index)
        let info = infos.pointer(index)
        record.pointee.state = .inFlight
        info.pointee.place = .none
        info.pointee.retried = false
        let kind = record.pointee.kind
        if kind == .nop {
            complete(index, 0)  // nothing to read from the operation
            return
        }
        if kind == .read || kind == .write, let result = transferDirectly(record, kind) {
            complete(index, result)
            return
        }
        if kind == .read || kind == .write || kind == .send || kind == .recv, transferReady(index, record, kind) {
            return
        }
        let view = record.pointee.kernelView(scratch: table.scratch(index))
        info.pointee.view = view
        if let invalid = view.invalid {
            complete(index, invalid)
            return
        }
        // The kinds whose payload the view does not carry.
        switch kind {
        case .open:
            var operation = record.pointee.operation.take()!
            var result: Int32 = -EINVAL
            switch consume operation {
            case .open(let path, let flags, let mode, let directory):
                result = path.withPlatformString { Sys.openatNoWait(view.fd, $0, view.flags, mode) }
                operation = .open(path, flags: flags, mode: mode, directory: directory)
            case let other:
                operation = other
            }
            record.pointee.operation = consume operation
            if result >= 0 { forget(result) }
            complete(index, result)
            return
        case .timeout:
            var operation = record.pointee.operation.take()!
            var deadline: UInt64 = 0
            switch consume operation {
            case .timeout(let duration):
                deadline = Deadline.now.nanoseconds.addingSaturated(duration.nanosecondsClamped)
                operation = .timeout(duration)
            case .deadline(let d):
                deadline = d.nanoseconds
                operation = .deadline(d)
            case let other:
                operation = other
            }
            record.pointee.operation = consume operation
            timerSequence &+= 1
            timers.insert(TimerEntry(deadline: deadline, sequence: timerSequence, index: UInt32(index),
                                     generation: record.pointee.generation))
            info.pointee.place = .timer
            return
        case .cancel:
            var operation = record.pointee.operation.take()!
            var target = Token.internalOperation
            switch consume operation {
            case .cancel(let t):
                target = t
                operation = .cancel(t)
            case let other:
                operation = other
            }
            record.pointee.operation = consume operation
            complete(index, cancel(target))
            return
        default:
            break
        }

        let fd = view.fd
        switch kind {
        case .fsync:
            complete(index, view.flags & 1 != 0 ? Sys.fdatasync(fd) : Sys.fsync(fd))
        case .shutdown:
            let result = Sys.shutdown(fd, view.flags)
            if result == 0 && view.flags != Int32(SHUT_RD) { retryWritesAfterShutdown(fd) }
            complete(index, result)  // last, so `attempt` finds it
        case .close:
            close(index, fd)
        case .poll, .pollMultishot:
            startPoll(index, fd, view.flags)
        default:
            startIO(index, kind, fd)
        }
    }

    /// A read or write of an fd the engine knows to serve directly (a regular file, a
    /// directory, a block device, one the poller refuses): the syscall at once, from the
    /// record's fields, without the kernel view, the classification and the checks for
    /// parking that every other fd needs (file-qd1 on epoll: 1266 -> 1061 instructions a
    /// read). It does what `startIO` and `perform` do for such an fd, which they still do
    /// the first time one is seen. Nil sends it the general way (an fd not seen yet,
    /// input to refuse). Leaves `RecordInfo.view` unset.
    @inline(__always)
    private func transferDirectly(_ record: UnsafeMutablePointer<OperationRecord>, _ kind: OperationKind) -> Int32? {
        let fd = record.pointee.fd
        guard fd >= 0, Int(fd) < fds.count, fds.pointer(Int(fd)).pointee.mode == .direct else { return nil }
        let positional = record.pointee.hasOffset, offset = record.pointee.argument
        if positional && offset < 0 { return nil }
        let (base, length) = record.pointee.transfer
        if length == 0 { return nil }
        let n: Int
        if kind == .read {
            n = positional ? Sys.pread(fd, base, length, offset) : Sys.read(fd, base, length)
        } else {
            n = positional ? Sys.pwrite(fd, base, length, offset) : Sys.write(fd, base, length)
        }
        return Int32(truncatingIfNeeded: n)
    }

    /// A read, write, send or recv of a socket or a non-blocking pipe the engine knows,
    /// started from the record's fields as `startIO` and `attempt` would, without the
    /// kernel view, the classification and their checks: the syscall is tried when nothing
    /// is parked on that side (and, for a read, the fd is not known to be drained), and the
    /// record parks, with its view, behind the parked ones, for a drained fd or on EAGAIN
    /// (pingpong on epoll: 2948 -> 2696 instructions a round trip). False sends it the
    /// general way: an fd not seen yet, a blocking fd, a read or write with an offset
    /// (ESPIPE there), an empty buffer (EINVAL). Leaves `RecordInfo.view` unset when it
    /// completes at once. Out of line, and apart from `transferDirectly`: one inlined
    /// function for both cost a direct read 44 instructions (file-qd1 on epoll, 1016 -> 1060).
    @inline(never)
    private func transferReady(_ index: Int, _ record: UnsafeMutablePointer<OperationRecord>,
                               _ kind: OperationKind) -> Bool {
        let fd = record.pointee.fd
        guard fd >= 0, Int(fd) < fds.count else { return false }
        let state = fds.pointer(Int(fd))
        let mode = state.pointee.mode
        guard mode == .socket || mode == .nonBlocking else { return false }
        // send and recv keep their flags in the argument, read and write their offset.
        if (kind == .read || kind == .write) && record.pointee.hasOffset { return false }
        let (base, length) = record.pointee.transfer
        if length == 0 { return false }
        let reads = kind == .read || kind == .recv
        if reads ? state.pointee.readDrained || state.pointee.readHead != OperationTable.none
            : state.pointee.writeHead != OperationTable.none {
            infos.pointer(index).pointee.view = record.pointee.kernelView(scratch: table.scratch(index))
            parkToWait(index, fd, reads ? .read : .write, state)
            return true
        }
        let flags = Int32(truncatingIfNeeded: record.pointee.argument)
        let dontWait = Int32(MSG_DONTWAIT)
        let n: Int
        switch kind {
        case .read:
            n = mode == .socket ? Sys.recv(fd, base, length, dontWait) : Sys.read(fd, base, length)
        case .write:
            n = mode == .socket ? Sys.send(fd, base, length, dontWait | Int32(MSG_NOSIGNAL))
                : Sys.write(fd, base, length)
        case .recv:
            n = Sys.recv(fd, base, length, flags | dontWait)
        default:
            n = Sys.send(fd, base, length, flags | dontWait | Int32(MSG_NOSIGNAL))
        }
        if n == -Int(EAGAIN) {
            statistics.wouldBlock += 1
            infos.pointer(index).pointee.view = record.pointee.kernelView(scratch: table.scratch(index))
            park(index, fd, reads ? .read : .write, emptied: reads)
            return true
        }
        if reads { noteRead(fd, kind, result: n, length: length, flags: flags) }
        complete(index, Int32(truncatingIfNeeded: n))
        return true
    }

    /// read/write/readv/writev/send/recv/sendmsg/recvmsg/accept/connect: try the syscall,
    /// park on EAGAIN.
    private func startIO(_ index: Int, _ kind: OperationKind, _ fd: Int32) {
        let classified = classify(fd)
        guard classified == 0 else { complete(index, classified); return }
        let state = fds.pointer(Int(fd))
        let place: RecordPlace = Self.isReadSide(kind) ? .read : .write
        let mode = state.pointee.mode
        if mode == .direct {
            // (A multishot accept here reports one connection and ends: nothing to poll.)
            let result = Self.final(perform(index, kind, mode))
            if (kind == .accept || kind == .acceptMultishot) && result >= 0 { forget(result) }
            complete(index, result)
            return
        }
        if infos[index].view.offset >= 0, kind.takesOffset,
           mode == .socket || mode == .blockingSocket || state.pointee.isStream {
            // A socket or a pipe cannot seek: ESPIPE, as pread(2) and io_uring say (recv and
            // send would silently ignore the offset), at once: not after waiting for
            // readiness (a blocking pipe, a drained stream) or behind parked records, which
            // on a pipe nobody writes would be for ever. No record with an offset is ever
            // parked on such an fd, so `perform` need not check again.
            complete(index, -ESPIPE)
            return
        }
        let waitFirst = mode == .blocking && kind != .connect && kind != .accept && kind != .acceptMultishot
            || mode == .blockingSocket && (kind == .accept || kind == .acceptMultishot)
            || state.pointee.readDrained && (kind == .read || kind == .recv)
        let queueHead = place == .read ? state.pointee.readHead : state.pointee.writeHead
        if waitFirst || queueHead != OperationTable.none {
            parkToWait(index, fd, place, state)
            return
        }
        switch attempt(index, kind, mode) {
        case .finished:
            break
        case .blocked:
            statistics.wouldBlock += 1
            park(index, fd, place, emptied: place == .read)  // EAGAIN: nothing to read now
        case .continuing:
            statistics.wouldBlock += 1
            park(index, fd, place)
        }
    }

    /// Parks `index` to wait for readiness, or behind the records parked on that side of
    /// `fd` (FIFO order; `state` is the fd's). A read of a stream a short read left
    /// drained waits for a report; the short read only suggests its buffer is empty (a
    /// unix socket's read also stops at a message carrying fds), so the poller is asked to
    /// confirm it (`unconfirmed`).
    @inline(__always)
    private func parkToWait(_ index: Int, _ fd: Int32, _ place: RecordPlace, _ state: UnsafeMutablePointer<FDState>) {
        let drained = place == .read && state.pointee.readDrained
        park(index, fd, place, emptied: drained, unconfirmed: drained)
    }

    /// After a read or recv of `fd` that moved `result` of the `length` bytes asked for: a
    /// short read of a stream emptied it, so the next read waits for a readiness report
    /// instead of trying a syscall that would say EAGAIN (a peek leaves the bytes where
    /// they were).
    @inline(__always)
    private func noteRead(_ fd: Int32, _ kind: OperationKind, result: Int, length: Int, flags: Int32) {
        let state = fds.pointer(Int(fd))
        if result > 0 && result < length && state.pointee.isStream
            && !(kind == .recv && flags & Int32(MSG_PEEK) != 0) {
            state.pointee.readDrained = true
        }
    }

    private func startPoll(_ index: Int, _ fd: Int32, _ events: Int32) {
        let classified = classify(fd)
        guard classified == 0 else { complete(index, classified); return }
        if fds[Int(fd)].mode == .direct {
            // Files are always ready (poll(2) reports POLLIN|POLLOUT for them).
            let ready = UInt32(bitPattern: events) & UInt32(POLLIN | POLLOUT)
            complete(index, Int32(bitPattern: ready))
            return
        }
        park(index, fd, .poll)
    }

    private enum Attempt { case finished, blocked, continuing }

    /// One try (or, for a multishot accept, a loop until EAGAIN) of a parked or new record.
    @inline(__always)
    private func attempt(_ index: Int, _ kind: OperationKind, _ mode: FDState.Mode) -> Attempt {
        if kind == .receiveMultishot { return receiveChunks(index, mode) }
        if kind == .acceptMultishot {
            while true {
                let result = perform(index, kind, mode)
                if result == -EAGAIN { return .blocked }
                if OperationKind.endsOnlyOneConnection(result) { continue }
                if result < 0 {
                    complete(index, result)
                    return .finished
                }
                forget(result)
                completeMore(index, result)
                // Without O_NONBLOCK another accept could block: one per readiness report.
                if mode == .blockingSocket { return .continuing }
            }
        }
        let performed = perform(index, kind, mode)
        if performed == -EAGAIN { return .blocked }
        let result = Self.final(performed)
        if kind == .accept && result >= 0 { forget(result) }
        if (kind == .read || kind == .recv) && result > 0 {
            let view = infos[index].view
            noteRead(view.fd, kind, result: Int(result), length: view.length, flags: view.flags)
        }
        complete(index, result)
        return .finished
    }

    /// A multishot receive: recv(2) into free buffers of its group until EAGAIN, end of
    /// file, an error, or no free buffer (then it stays parked until `recycle`).
    private func receiveChunks(_ index: Int, _ mode: FDState.Mode) -> Attempt {
        let group = table.record(index).pointee.operation.bufferGroup!
        let groupID = group.id
        let fd = infos[index].view.fd
        guard pools[groupID]?.group == group else {  // the group was unregistered under it
            complete(index, -EINVAL)
            return .finished
        }
        while true {
            guard let id = pools[groupID]!.free.popLast() else {
                let token = Token(index: UInt32(index), generation: table.record(index).pointee.generation)
                if !pools[groupID]!.starved.contains(token) { pools[groupID]!.starved.append(token) }
                return .blocked
            }
            let n = Sys.recv(fd, group.address(of: id), group.size, Int32(MSG_DONTWAIT))
            if n > 0 {
                group.handOut(id)
                completeMore(index, Int32(n), bufferID: id)
                if mode == .blockingSocket || mode == .blocking { return .continuing }
                continue
            }
            pools[groupID]!.free.append(id)
            if n == -Int(EAGAIN) { return .blocked }
            complete(index, Int32(truncatingIfNeeded: n))  // 0: end of file; < 0: the error
            return .finished
        }
    }

    func registerBuffers(count: Int, size: Int) throws(PlexusError) -> BufferGroup {
        guard count > 0, count <= 32768, count & (count - 1) == 0, size > 0, size <= Operation.maxTransfer else {
            throw PlexusError(operation: "registerBuffers", errno: .invalidArgument,
                              message: "a buffer group needs a power-of-two count up to 32768 and a positive size")
        }
        guard let id = BufferGroup.freeID(from: nextGroup, inUse: { pools[$0] != nil }) else {
            throw PlexusError(operation: "registerBuffers", errno: .fileExists, message: "all 65536 buffer group ids are in use")
        }
        let group = BufferGroup(id: id, count: count, size: size)
        nextGroup = id &+ 1
        pools[group.id] = ProvidedPool(group: group, free: (0..<UInt16(count)).reversed().map { $0 })
        return group
    }

    func unregisterBuffers(_ group: BufferGroup) {
        guard let pool = pools[group.id], pool.group == group else { return }
        pools[group.id] = nil
        // Receives parked for its buffers would wait for a recycle that cannot come (on
        // epoll no new edge comes either): they end, as on io_uring.
        for token in pool.starved {
            guard table.live(token) != nil, infos[token.index].place == .read else { continue }
            let fd = infos[token.index].view.fd
            unlink(token.index, fd, .read)
            complete(token.index, -EINVAL)
            refreshAfterRemovingRead(fd)
        }
    }

    func recycle(_ group: BufferGroup, id: UInt16) {
        guard pools[group.id]?.group == group, Int(id) < group.count else {
            preconditionFailure("buffer \(id) does not belong to a group of this backend")
        }
        guard group.takeBack(id) else { return }  // not out: it is free already
        pools[group.id]!.free.append(id)
        // Receives that ran dry go on (edge-triggered epoll would not report the data again).
        let starved = pools[group.id]!.starved
        guard !starved.isEmpty else { return }
        pools[group.id]!.starved.removeAll()
        for token in starved {
            // Still that receive, parked at the head of its fd's reads: a read behind it,
            // or one that took its slot, must not be tried without a readiness report (a
            // blocking fd's read(2) would block the loop).
            guard table.live(token) != nil, infos[token.index].place == .read else { continue }
            let fd = infos[token.index].view.fd
            guard fds[Int(fd)].readHead == UInt32(token.index) else { continue }
            if retry(fd, .read) { refreshInterest(fd, rearm: false) }
        }
    }

    /// connect(2)'s own EAGAIN, which is no "would block" (that is EINPROGRESS): a Unix
    /// listener's backlog is full, or no local port is free. No readiness report ever
    /// follows it, so it is the result (as on io_uring), not a reason to park.
    private static var connectEAGAIN: Int32 { Int32.min }

    /// `perform`'s result as the record's final result.
    @inline(__always)
    private static func final(_ result: Int32) -> Int32 { result == connectEAGAIN ? -EAGAIN : result }

    /// The syscall for a data, accept or connect record; -EAGAIN when it would block
    /// (`connectEAGAIN` when connect(2) itself said EAGAIN).
    @inline(__always)
    private func perform(_ index: Int, _ kind: OperationKind, _ mode: FDState.Mode) -> Int32 {
        let info = infos.pointer(index)
        let v = info.pointee.view
        let fd = v.fd
        let socket = mode == .socket || mode == .blockingSocket
        let dontWait = Int32(MSG_DONTWAIT)
        let result: Int
        // (`transferDirectly` and `transferReady` do a known fd's read, write, send or recv
        // the same way.)
        switch kind {
        case .read:
            if socket {
                result = Sys.recv(fd, v.base, v.length, dontWait)
            } else if v.offset >= 0 {
                result = Sys.pread(fd, v.base, v.length, v.offset)
            } else {
                result = Sys.read(fd, v.base, v.length)
            }
        case .write:
            if socket {
                result = Sys.send(fd, v.base, v.length, dontWait | Int32(MSG_NOSIGNAL))
            } else {
                let length = mode == .blocking ? min(v.length, Int(PIPE_BUF)) : v.length
                result = v.offset >= 0 ? Sys.pwrite(fd, v.base, length, v.offset) : Sys.write(fd, v.base, length)
            }
        case .readv:
            if socket {
                result = Sys.recvmsg(fd, &vectorMessage(index, v).pointee.message, dontWait)
            } else if v.offset >= 0 {
                result = Sys.preadv(fd, v.vectors, v.vectorCount, v.offset)
            } else {
                result = Sys.readv(fd, v.vectors, v.vectorCount)
            }
        case .writev:
            if socket {
                result = Sys.sendmsg(fd, &vectorMessage(index, v).pointee.message, dontWait | Int32(MSG_NOSIGNAL))
            } else if mode == .blocking {
                // At most PIPE_BUF bytes of the first non-empty buffer: cannot block after POLLOUT.
                var chosen = iovec()
                for i in 0..<v.vectorCount where v.vectors![i].iov_len > 0 {
                    chosen = v.vectors![i]
                    break
                }
                let length = min(chosen.iov_len, Int(PIPE_BUF))
                result = v.offset >= 0 ? Sys.pwrite(fd, chosen.iov_base, length, v.offset)
                    : Sys.write(fd, chosen.iov_base, length)
            } else if v.offset >= 0 {
                result = Sys.pwritev(fd, v.vectors, v.vectorCount, v.offset)
            } else {
                result = Sys.writev(fd, v.vectors, v.vectorCount)
            }
        case .recv:
            result = Sys.recv(fd, v.base, v.length, v.flags | dontWait)
        case .send:
            result = Sys.send(fd, v.base, v.length, v.flags | dontWait)
        case .receiveMessage:
            let scratch = table.scratch(index)
            scratch.pointee.message.msg_namelen = socklen_t(MemoryLayout<sockaddr_storage>.size)
            result = Sys.recvmsg(fd, &scratch.pointee.message, v.flags | dontWait)
        case .sendMessage:
            let scratch = table.scratch(index)
            result = Sys.sendmsg(fd, &scratch.pointee.message, v.flags | dontWait)
        case .accept, .acceptMultishot:
            result = Int(Sys.accept4(fd))
        case .connect:
            let scratch = table.scratch(index)
            let called = Sys.connect(fd, &scratch.pointee.address, scratch.pointee.address_length)
            let r = called == -EAGAIN ? Self.connectEAGAIN : called  // its own EAGAIN is a result
            if !info.pointee.retried {
                info.pointee.retried = true
                result = Int(r == -EINPROGRESS || r == -EINTR ? -EAGAIN : r)
            } else if r == 0 || r == -EISCONN {
                result = 0
            } else {
                result = Int(r == -EALREADY || r == -EINPROGRESS || r == -EINTR ? -EAGAIN : r)
            }
        default:
            result = Int(-EINVAL)
        }
        return Int32(truncatingIfNeeded: result)
    }

    /// A msghdr over the record's iovecs, for readv/writev on a socket (recvmsg/sendmsg
    /// take MSG_DONTWAIT; readv/writev would block on a socket without O_NONBLOCK).
    @inline(__always)
    private func vectorMessage(_ index: Int, _ v: KernelView) -> UnsafeMutablePointer<plexus_op_scratch> {
        let scratch = table.scratch(index)
        var header = msghdr()
        header.msg_iov = v.vectors
        header.msg_iovlen = v.vectorCount
        scratch.pointee.message = header
        return scratch
    }

    @inline(__always)
    private static func isReadSide(_ kind: OperationKind) -> Bool {
        switch kind {
        case .read, .readv, .recv, .receiveMessage, .accept, .acceptMultishot, .receiveMultishot: true
        default: false
        }
    }

    // MARK: Per-fd state

    /// Makes sure `fd` has a cached state; 0, or -errno when the fd is not usable.
    private func classify(_ fd: Int32) -> Int32 {
        if Int(fd) >= fds.count { fds.grow(to: max(Int(fd) + 1, fds.count * 2), filling: FDState()) }
        let state = fds.pointer(Int(fd))
        if state.pointee.mode != .unknown { return 0 }
        let type = Sys.fileType(fd)
        if type < 0 { return type }
        if type == Int32(Glibc.S_IFREG) || type == Int32(Glibc.S_IFDIR) || type == Int32(Glibc.S_IFBLK) {
            state.pointee.mode = .direct
            return 0
        }
        let flags = Sys.statusFlags(fd)
        if flags < 0 { return flags }
        let nonBlocking = flags & O_NONBLOCK != 0
        let mode: FDState.Mode = type == Int32(Glibc.S_IFSOCK) ? (nonBlocking ? .socket : .blockingSocket)
            : (nonBlocking ? .nonBlocking : .blocking)
        state.pointee.isStream = type == Int32(Glibc.S_IFIFO)
            || type == Int32(Glibc.S_IFSOCK) && Sys.socketType(fd) == Int32(SOCK_STREAM.rawValue)
        let registered = poller.register(fd)
        if registered == -EPERM {
            state.pointee.mode = .direct
            return 0
        }
        if registered < 0 { return registered }
        state.pointee.mode = mode
        state.pointee.registered = true
        return 0
    }

    /// Drops what the engine knew about fd number `fd` (a new fd now has that number).
    private func forget(_ fd: Int32, ending result: Int32 = -EBADF) {
        guard Int(fd) < fds.count else { return }
        let state = fds.pointer(Int(fd))
        // Operations parked under the old fd can no longer be reported: end them.
        if !state.pointee.isIdle { cancelParked(fd, result: result) }
        if state.pointee.slot >= 0 { _ = poller.update(fd, interest: 0, rearm: false, states: fds) }
        state.pointee = FDState()
    }

    /// The events the parked records of `fd` wait for.
    private func interest(_ fd: Int32) -> UInt32 {
        let state = fds.pointer(Int(fd))
        var events: UInt32 = 0
        if state.pointee.readHead != OperationTable.none { events |= UInt32(POLLIN) }
        if state.pointee.writeHead != OperationTable.none { events |= UInt32(POLLOUT) }
        var i = state.pointee.pollHead
        while i != OperationTable.none {
            events |= UInt32(bitPattern: infos[Int(i)].view.flags)
            i = table.record(Int(i)).pointee.next
        }
        return events
    }

    @inline(__always)
    private func refreshInterest(_ fd: Int32, rearm: Bool) {
        let r = poller.update(fd, interest: interest(fd), rearm: rearm, states: fds)
        if r == -EBADF || r == -EPERM {
            // Closed outside Plexus: no readiness will ever be reported for what is parked
            // on it. EPERM: its number was reused by something epoll cannot watch (a regular
            // file), which would report nothing either; what is parked ends with EBADF and
            // the next operation on the number classifies it afresh.
            forget(fd)
            return
        }
        if r == -ENOENT {
            // The fd was closed outside Plexus and its number reused: register the new one,
            // if it can be watched; else end what is parked, as for EPERM.
            let state = fds.pointer(Int(fd))
            state.pointee.mode = .unknown
            state.pointee.registered = false
            state.pointee.isUnixConnection = nil
            let classified = classify(fd)
            if classified != 0 || state.pointee.mode == .direct {
                forget(fd, ending: classified != 0 ? classified : -EBADF)  // (EMFILE, ENOSPC: the watch limit)
                return
            }
            _ = poller.update(fd, interest: interest(fd), rearm: true, states: fds)
        }
    }

    // MARK: Parking

    /// `emptied`: the fd's read side is known to have nothing to read, and no read report
    /// came since (a short read of a stream, or EAGAIN just now). `unconfirmed`: known only
    /// from a short read, which may have left bytes behind: if the fd is busy (no rearm
    /// below otherwise), the poller is asked again, so bytes already there are reported.
    private func park(_ index: Int, _ fd: Int32, _ place: RecordPlace, emptied: Bool = false, unconfirmed: Bool = false) {
        let state = fds.pointer(Int(fd))
        let wasIdle = state.pointee.isIdle
        let record = table.record(index)
        record.pointee.next = OperationTable.none
        let i = UInt32(index)
        switch place {
        case .read:
            if state.pointee.readTail == OperationTable.none { state.pointee.readHead = i }
            else { table.record(Int(state.pointee.readTail)).pointee.next = i }
            state.pointee.readTail = i
        case .write:
            if state.pointee.writeTail == OperationTable.none { state.pointee.writeHead = i }
            else { table.record(Int(state.pointee.writeTail)).pointee.next = i }
            state.pointee.writeTail = i
            if _slowPath(state.pointee.mode == .socket || state.pointee.mode == .blockingSocket),
               state.pointee.isUnixConnection != false, !state.pointee.inUnixWriters {
                watchUnixWriter(fd)
            }
        default:
            if state.pointee.pollTail == OperationTable.none { state.pointee.pollHead = i }
            else { table.record(Int(state.pointee.pollTail)).pointee.next = i }
            state.pointee.pollTail = i
        }
        infos.pointer(index).pointee.place = place
        parkedCount += 1
        let mode = state.pointee.mode
        if Poller.rearmIsASyscall, wasIdle, emptied, mode == .nonBlocking || mode == .socket {
            // A read of an fd with nothing to read, and no read report since: the next
            // data's edge is still to come, so no rearm is needed to see it. The rearm
            // would also prove the fd is still the one registered (not closed outside
            // Plexus and its number reused); that proof is put off until the engine would
            // block, when most such reads have their data already (a request/response
            // peer), saving an EPOLL_CTL_MOD per read (plexus-bench pingpong and echo,
            // epoll).
            refreshInterest(fd, rearm: false)
            if !state.pointee.unverified {
                state.pointee.unverified = true
                if unverified.isEmpty { unverifiedPolls = 0 }
                unverified.append(fd)
            }
            return
        }
        // A fresh report is needed when the fd was idle (its last edge may have gone
        // unused), for readiness operations, and whenever the fd is waited on first.
        let rearm = wasIdle || unconfirmed || place == .poll || mode == .blocking || mode == .blockingSocket
        refreshInterest(fd, rearm: rearm)
    }

    /// Removes `index` from the FIFO it is parked on. Does not update the poller.
    private func unlink(_ index: Int, _ fd: Int32, _ place: RecordPlace) {
        let state = fds.pointer(Int(fd))
        let target = UInt32(index)
        var prev = OperationTable.none
        var i: UInt32
        switch place {
        case .read: i = state.pointee.readHead
        case .write: i = state.pointee.writeHead
        default: i = state.pointee.pollHead
        }
        while i != OperationTable.none && i != target {
            prev = i
            i = table.record(Int(i)).pointee.next
        }
        guard i == target else { return }
        let next = table.record(index).pointee.next
        if prev != OperationTable.none { table.record(Int(prev)).pointee.next = next }
        switch place {
        case .read:
            if prev == OperationTable.none { state.pointee.readHead = next }
            if state.pointee.readTail == target { state.pointee.readTail = prev }
        case .write:
            if prev == OperationTable.none { state.pointee.writeHead = next }
            if state.pointee.writeTail == target { state.pointee.writeTail = prev }
        default:
            if prev == OperationTable.none { state.pointee.pollHead = next }
            if state.pointee.pollTail == target { state.pointee.pollTail = prev }
        }
        table.record(index).pointee.next = OperationTable.none
        infos.pointer(index).pointee.place = .none
        parkedCount -= 1
    }

    /// Completes every record parked on `fd` with `result`, in FIFO order (reads, writes, polls).
    private func cancelParked(_ fd: Int32, result: Int32) {
        let state = fds.pointer(Int(fd))
        for place in [RecordPlace.read, .write, .poll] {
            while true {
                let head: UInt32
                switch place {
                case .read: head = state.pointee.readHead
                case .write: head = state.pointee.writeHead
                default: head = state.pointee.pollHead
                }
                if head == OperationTable.none { break }
                unlink(Int(head), fd, place)
                complete(Int(head), result)
            }
        }
    }

    // MARK: Readiness

    private func handle(_ fd: Int32, _ events: UInt32) {
        guard fd >= 0, Int(fd) < fds.count else { return }
        let state = fds.pointer(Int(fd))
        if events & Self.readEvents != 0 { state.pointee.readDrained = false }
        if state.pointee.isIdle { return }
        if events & UInt32(POLLNVAL) != 0 {
            // Closed behind Plexus's back (poll only reports this).
            cancelParked(fd, result: -EBADF)
            _ = poller.update(fd, interest: 0, rearm: false, states: fds)
            state.pointee = FDState()
            return
        }
        var changed = false
        if events & Self.readEvents != 0 && state.pointee.readHead != OperationTable.none {
            changed = retry(fd, .read) || changed
        }
        if events & Self.writeEvents != 0 && state.pointee.writeHead != OperationTable.none {
            changed = retry(fd, .write) || changed
        }
        if state.pointee.pollHead != OperationTable.none {
            changed = firePolls(fd, events) || changed
        }
        if changed { refreshInterest(fd, rearm: state.pointee.mode == .blocking || state.pointee.mode == .blockingSocket) }
    }

    /// Retries the records parked on one side of `fd` in FIFO order until one would
    /// block again. Returns true when the FIFO changed.
    private func retry(_ fd: Int32, _ place: RecordPlace) -> Bool {
        let state = fds.pointer(Int(fd))
        let mode = state.pointee.mode
        var changed = false
        var blockingCalls = 0
        while true {
            let head = place == .read ? state.pointee.readHead : state.pointee.writeHead
            if head == OperationTable.none { break }
            let index = Int(head)
            let kind = table.record(index).pointee.kind
            // Without O_NONBLOCK only one call per readiness report is sure not to block.
            if mode == .blocking || mode == .blockingSocket && (kind == .accept || kind == .acceptMultishot) {
                if blockingCalls > 0 { break }
                blockingCalls += 1
            }
            let outcome = attempt(index, kind, mode)
            if outcome == .blocked { break }
            if outcome == .continuing { changed = true; break }
            // Finished: its completion is queued; take it off the FIFO.
            unlink(index, fd, place)
            infos.pointer(index).pointee.place = .done
            changed = true
        }
        return changed
    }

    /// Puts `fd`, a socket with a write just parked, in `unixWriters` if it is a Unix
    /// stream or seqpacket socket.
    @inline(never)
    private func watchUnixWriter(_ fd: Int32) {
        let state = fds.pointer(Int(fd))
        if state.pointee.isUnixConnection == nil {
            let type = state.pointee.isStream ? Int32(SOCK_STREAM.rawValue) : Sys.socketType(fd)  // classify read it
            state.pointee.isUnixConnection = (type == Int32(SOCK_STREAM.rawValue) || type == Int32(SOCK_SEQPACKET.rawValue))
                && Sys.socketDomain(fd) == AF_UNIX
        }
        guard state.pointee.isUnixConnection == true else { return }
        let interval = Self.unixFirstRetryMilliseconds
        let due = Deadline.now.nanoseconds.addingSaturated(UInt64(interval) * 1_000_000)
        state.pointee.unixRetryInterval = interval
        state.pointee.unixRetryDue = due
        if unixWriters.isEmpty || due < unixWritersDue { unixWritersDue = due }
        state.pointee.inUnixWriters = true
        unixWriters.append(fd)
    }

    /// Retries the writes parked on the listed fds that are due; keeps the fds whose writes
    /// still wait. Nothing here parks or lists a write, so the list is rewritten in place.
    @inline(never)
    private func retryUnixWriters() {
        let now = Deadline.now.nanoseconds
        guard now >= unixWritersDue else { return }
        // An fd number forgotten and reused may be listed twice: the first entry takes the
        // mark, so each fd is retried once.
        var listed = 0
        for i in 0..<unixWriters.count {
            let fd = unixWriters[i]
            guard Int(fd) < fds.count, fds[Int(fd)].inUnixWriters else { continue }
            fds.pointer(Int(fd)).pointee.inUnixWriters = false
            unixWriters[listed] = fd
            listed += 1
        }
        var kept = 0
        var nextDue = UInt64.max
        for i in 0..<listed {
            let fd = unixWriters[i]
            let state = fds.pointer(Int(fd))
            guard state.pointee.isUnixConnection == true, state.pointee.writeHead != OperationTable.none else { continue }
            if now >= state.pointee.unixRetryDue {
                // First prove the fd is still the socket the writes were made on (epoll:
                // EPOLL_CTL_MOD; poll(2) has no such check). Closed outside Plexus, or closed
                // and its number reused, its writes end with EBADF: their bytes must not go to
                // whatever the number names now.
                let r = poller.update(fd, interest: interest(fd), rearm: true, states: fds)
                if r == -EBADF || r == -ENOENT || r == -EPERM {
                    forget(fd)
                    continue
                }
                statistics.unreportedRetries += 1
                if retry(fd, .write) { refreshInterest(fd, rearm: state.pointee.mode == .blockingSocket) }
                guard state.pointee.isUnixConnection == true, state.pointee.writeHead != OperationTable.none else { continue }
                let interval = min(state.pointee.unixRetryInterval * 2, Self.unixLongestRetryMilliseconds)
                state.pointee.unixRetryInterval = interval
                state.pointee.unixRetryDue = now.addingSaturated(UInt64(interval) * 1_000_000)
            }
            nextDue = min(nextDue, state.pointee.unixRetryDue)
            state.pointee.inUnixWriters = true
            unixWriters[kept] = fd
            kept += 1
        }
        while unixWriters.count > kept { unixWriters.removeLast() }
        unixWritersDue = nextDue
    }

    /// The fd's write side was shut down through Plexus: its parked writes end now (EPIPE).
    /// No readiness report would say so for a Unix stream socket: unix_poll reports no
    /// POLLOUT (nor POLLHUP) for a send side shut down while the peer's buffer is full, so
    /// they would wait for ever (io_uring's retry after the wake-up sees EPIPE).
    private func retryWritesAfterShutdown(_ fd: Int32) {
        guard Int(fd) < fds.count else { return }
        let state = fds.pointer(Int(fd))
        // Sockets only (a shutdown of anything else fails). A send never blocks here
        // (MSG_DONTWAIT); a parked connect asks again and, still in progress, stays parked.
        guard state.pointee.mode == .socket || state.pointee.mode == .blockingSocket,
              state.pointee.writeHead != OperationTable.none else { return }
        if retry(fd, .write) { refreshInterest(fd, rearm: false) }
    }

    /// Reports readiness to the parked poll records of `fd`. Returns true when one ended.
    private func firePolls(_ fd: Int32, _ events: UInt32) -> Bool {
        let state = fds.pointer(Int(fd))
        var changed = false
        var i = state.pointee.pollHead
        while i != OperationTable.none {
            let index = Int(i)
            let record = table.record(index)
            i = record.pointee.next
            let wanted = UInt32(bitPattern: infos[index].view.flags) | UInt32(POLLERR | POLLHUP)
            let ready = events & wanted
            if ready == 0 { continue }
            if record.pointee.kind == .pollMultishot {
                completeMore(index, Int32(bitPattern: ready))
            } else {
                unlink(index, fd, .poll)
                complete(index, Int32(bitPattern: ready))
                changed = true
            }
        }
        return changed
    }

    // MARK: Timers

    private func fireTimers() {
        let now = Deadline.now.nanoseconds
        while let first = timers.min, first.deadline <= now {
            _ = timers.popMin()
            let index = Int(first.index)
            let token = Token(index: first.index, generation: first.generation)
            if first.cancels {
                if table.live(token) != nil, infos[index].hasDeadline {
                    // Still pending at its deadline.
                    infos.pointer(index).pointee.hasDeadline = false
                    _ = cancel(token, by: .deadlinePassed)
                } else {
                    deadTimers -= 1
                }
                continue
            }
            if let record = table.live(token),
               infos[index].place == .timer, record.pointee.kind == .timeout {
                complete(index, 0)
            } else {
                deadTimers -= 1
            }
        }
    }

    private func dropTimer(_ index: Int) {
        deadTimers += 1
        if deadTimers > 64 && deadTimers > timers.count / 2 {
            let table = table, infos = infos
            timers.removeAll { entry in
                table.live(Token(index: entry.index, generation: entry.generation)) == nil
                    || (entry.cancels ? !infos[Int(entry.index)].hasDeadline : infos[Int(entry.index)].place != .timer)
            }
            deadTimers = 0
        }
    }

    // MARK: Cancel and close

    /// Cancels the record `target` names; the cancel's own result. `cause` goes into the
    /// completion's flags (`.deadlinePassed` from the timer heap).
    private func cancel(_ target: Token, by cause: CompletionFlags = []) -> Int32 {
        guard table.live(target) != nil else { return -ENOENT }
        let index = target.index
        let info = infos.pointer(index)
        switch info.pointee.place {
        case .none, .done:
            return -ENOENT
        case .prepared:
            complete(index, -ECANCELED, flags: cause)
        case .timer:
            // Completed now; the heap entry is skipped when it comes up.
            complete(index, -ECANCELED, flags: cause)
            dropTimer(index)
        case .read, .write, .poll:
            let fd = info.pointee.view.fd
            let place = info.pointee.place
            unlink(index, fd, place)
            complete(index, -ECANCELED, flags: cause)
            if place == .read { refreshAfterRemovingRead(fd) } else { refreshInterest(fd, rearm: false) }
        }
        return 0
    }

    /// A parked read of `fd` was taken off its FIFO without finishing there: a read behind
    /// it gets a fresh report. The removed one may have taken the last edge without
    /// meeting EAGAIN (a multishot receive out of buffers), and no new edge comes for
    /// bytes already there.
    private func refreshAfterRemovingRead(_ fd: Int32) {
        refreshInterest(fd, rearm: fds[Int(fd)].readHead != OperationTable.none)
    }

    /// close: cancels what is parked on the fd, forgets it, then close(2).
    private func close(_ index: Int, _ fd: Int32) {
        if Int(fd) < fds.count {
            let state = fds.pointer(Int(fd))
            cancelParked(fd, result: -ECANCELED)
            poller.remove(fd, states: fds)
            state.pointee = FDState()
        }
        complete(index, Sys.close(fd))
    }
}
