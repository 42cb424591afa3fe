import CPlexus
import Glibc
import Synchronization
import SystemPackage

/// The io_uring backend: native completions through liburing.
///
/// Set-up asks for the best ring the kernel gives and degrades one feature at a time:
/// SINGLE_ISSUER + DEFER_TASKRUN (completion work runs only when the loop waits), then
/// COOP_TASKRUN, then a plain ring. The CQ is four times the SQ so multishot operations
/// have room, the kernel keeps CQEs that still do not fit (IORING_FEAT_NODROP), and a
/// full SQ is flushed with io_uring_submit before the next SQE is taken, so no
/// operation and no completion is lost. Multishot accept and poll are native where the
/// kernel has them and re-armed when the kernel ends them without IORING_CQE_F_MORE.
public final class URingBackend: IOBackend, PreparesBufferOperations {
    public let kind = BackendKind.ioUring
    public let capabilities: Capabilities
    /// The IORING_SETUP_* flags the ring was created with.
    public let setupFlags: UInt32

    /// The ring setups tried, newest first, each when the kernel refused the one before:
    /// DEFER_TASKRUN (Linux 6.1), COOP_TASKRUN (5.19), and a plain ring.
    static let setups: [(name: String, flags: UInt32)] = [
        ("defer-taskrun", IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN | IORING_SETUP_R_DISABLED | IORING_SETUP_SUBMIT_ALL),
        ("coop-taskrun", IORING_SETUP_COOP_TASKRUN | IORING_SETUP_SUBMIT_ALL),
        ("plain", 0),
    ]

    /// `PLEXUS_IO_URING_SETUP` names the first setup to try (`defer-taskrun`, the default,
    /// `coop-taskrun` or `plain`): a newer kernel then runs the paths an older one takes,
    /// for testing them (docs/design.md says what does not pass there yet). Ignored by
    /// setuid programs.
    public static let setupVariable = "PLEXUS_IO_URING_SETUP"

    /// The setups to try: from the one `PLEXUS_IO_URING_SETUP` names, or all of them.
    static func setupsToTry() throws(PlexusError) -> ArraySlice<(name: String, flags: UInt32)> {
        guard let raw = plexus_secure_getenv(setupVariable), raw.pointee != 0 else { return setups[...] }
        let name = String(cString: raw)
        guard let first = setups.firstIndex(where: { $0.name == name }) else {
            throw PlexusError(operation: "io_uring_queue_init", errno: .invalidArgument,
                              message: "\(setupVariable)=\(name): use \(setups.map(\.name).joined(separator: ", ")), or leave it unset")
        }
        return setups[first...]
    }
    /// The ring is enabled: R_DISABLED rings are enabled by the first thread that
    /// submits, which becomes the single issuer, whichever thread created the backend.
    /// Atomic because other threads read it too: a ring not yet enabled answers
    /// IORING_OP_MSG_RING with EBADFD (on the sender's ring).
    let takesRingMessages = Atomic<Bool>(false)
    /// `takesRingMessages`, on the ring's own thread.
    private var enabled: Bool { takesRingMessages.load(ordering: .relaxed) }

    private let ring: UnsafeMutablePointer<io_uring>
    private let table = OperationTable()
    /// `PreparesBufferOperations.handBackTarget`.
    @exclusivity(unchecked) var handBackTarget: Unmanaged<BufferHandBack>?
    /// Results known without the kernel (a cached read, a pipe write done at once, invalid
    /// input, a cancel of a dead token), in order; those before `State.immediateHead` are
    /// delivered. Raw memory, not a Swift array: an append there paid a uniqueness and a
    /// capacity check, and emptying it a call (file-qd1 queues one per read).
    private let immediate = RawArray<Immediate>(capacity: 64)

    private struct Immediate {
        var index: Int
        var result: Int32
        init(_ index: Int, _ result: Int32) { self.index = index; self.result = result }
    }
    private let state: UnsafeMutablePointer<State>
    /// The CQ ring's size: a reap takes at least this many CQEs when they are there.
    private let cqeBatch: Int

    private struct State {
        var statistics = BackendStatistics()
        /// Operations whose SQE could not be had yet (SQ full and the kernel busy).
        var backlog: [Int] = []
        /// The first of `immediate` not yet delivered (see `deliverImmediateNow`).
        var immediateHead = 0
        /// Per fd number: 0 unknown, 1 seekable, 2 a stream (pipe, socket, tty). io_uring
        /// ignores the offset of a stream where pread(2) fails with ESPIPE; this keeps the
        /// backends alike at one lseek per fd. Forgotten when the fd is closed through Plexus.
        var positional: [UInt8] = []
        /// Consecutive waits that skipped io_uring_enter (see `wait`).
        var skippedEnters = 0
        /// `attempt` is preparing: its caller wants a result at once, so a cached read is
        /// done with preadv2 even when the SQ holds other entries (see `prep`).
        var attempting = false
        /// Provided buffer rings by group id, and the multishot receives that ran out of
        /// buffers (ENOBUFS) and wait for a recycle to be re-armed.
        var bufferRings: [UInt16: (ring: UnsafeMutablePointer<io_uring_buf_ring>, group: BufferGroup)] = [:]
        var nextGroup: UInt16 = 0
        var starved: [UInt16: [Token]] = [:]
        /// Per fd number: reads of empty pipes (`parkOnPipe`) and the order of a byte
        /// stream's reads and writes (`orderedRead`, `orderedWrite`).
        var pipes = PipeWatches()
        var pipeArmings: UInt32 = 0
        /// Hands each forgotten fd's new PipeWatch a generation of its own.
        var pipeGenerations: UInt32 = 0
        /// `prepare(_:deadline:)` is preparing: a read of an empty pipe goes to the ring, so
        /// that its SQE takes the linked timeout, instead of parking on the pipe's poll.
        var noParking = false
        /// Deadlines that could not be linked to their operation's SQE because it had none
        /// yet (it waits behind another on its byte stream, or for SQ space): a standalone
        /// IORING_OP_TIMEOUT (user_data `deadlineIndex | id << 32`) that cancels the
        /// operation wherever it is then. Keyed by id; `deadlineOf` maps a record to its id.
        var deadlines: [UInt32: (token: Token, timespec: UnsafeMutablePointer<__kernel_timespec>)] = [:]
        var deadlineOf: [Int: UInt32] = [:]
        var deadlineSequence: UInt32 = 0
        /// Ids whose TIMEOUT found no SQE (submit failed): armed on the next submit.
        var unarmedDeadlines: [UInt32] = []
        /// Fds with a close prepared and not completed: the close's record index.
        var closing: [Int32: Int] = [:]
        /// Closes prepared while another close of their fd was under way (`closing`): they
        /// end with EBADF when it ends, and never reach the kernel.
        var repeatedCloses: [Int] = []
        /// Operations ended here, cancelled, because a cancel of them was on its way to the
        /// kernel when the kernel ended them (`rearm`): that cancel finds nothing there
        /// (ENOENT) and reports 0, as it would have had it come first.
        var endedForCancel: [Token] = []
    }

    /// How reads of one pipe go. An IORING_OP_READ of an empty pipe is the kernel's slow
    /// path: it fails inside, arms a poll, and reruns the read from task work (pingpong
    /// raw-io_uring 1.39 us per round trip). So once a read of a pipe came back short (the
    /// pipe is empty now), the next reads of it park here instead, and one multishot
    /// POLL_ADD, armed once and kept, reports when data comes; they then run at once as
    /// preadv2(RWF_NOWAIT). Measured in the raw baseline's shape: 1.02 us per round trip.
    /// It also keeps the order of reads and writes on a pipe or socket (stream or
    /// datagram): one of each in the ring, the later ones waiting (see `writesInRing`).
    private struct PipeWatch {
        /// 0 not looked at, 1 a pipe (FIFO), 2 not a pipe.
        var kind: UInt8 = 0
        /// The last read came back short and no poll report came since.
        var drained = false
        /// A multishot poll is armed under `tag` (user_data: pipePollIndex | tag << 32).
        var armed = false
        var tag: UInt32 = 0
        /// Parked reads, oldest first.
        var parked: [Int] = []
        /// 0 not looked at, 1 ordered (pipe, FIFO, any socket: io_uring keeps no order
        /// between two receives or two blocked sends of a datagram socket either; a
        /// regular file or block device, whose reads and writes at the file position take
        /// f_pos when they are issued: two in the ring read the same bytes), 2 not.
        var stream: UInt8 = 0
        /// Stream writes to this fd sent to the ring and not completed. io_uring keeps no
        /// order between two writes to a full pipe or socket (on 6.18 the later ones land
        /// first), so while there is one, later writes wait in `waitingWrites` and go on,
        /// in order, when it completes.
        var writesInRing: Int32 = 0
        /// Writes waiting behind the one in the ring, oldest first.
        var waitingWrites: [Int] = []
        /// The same for reads of a byte stream (two recvs in the ring of an empty socket
        /// get its data in reverse): one in the ring, the later ones waiting.
        var readsInRing: Int32 = 0
        var waitingReads: [Int] = []
        /// Stamped on the records counted in readsInRing or writesInRing (in their unused
        /// `next`): a late completion of an operation of a closed fd whose number came back
        /// must not uncount the new fd's.
        var generation: UInt32 = 0
        /// pwritev2(RWF_NOWAIT) was refused (EOPNOTSUPP): writes go to the ring, one at a time.
        var noWaitRefused = false
        /// A pipe that was O_NONBLOCK when first seen (as the readiness backends, Plexus
        /// reads the flag once): its reads and writes done at once are plain read(2) and
        /// write(2), which cannot block it either. They cost ~65 ns less each than
        /// preadv2/pwritev2 (a pipe ping-pong in C, 3M round trips: 475 against 610 ns per
        /// write and read), which import an iovec.
        var nonBlocking = false
        /// A socket (stream or datagram): `attempt` sends to it at once (`sendNow`).
        var socket = false
    }

    /// The per-fd watches, in memory of their own: `pipes[i].field = x` through an array
    /// checked the array's uniqueness and bounds on every access, five to ten times per
    /// ping-pong round trip. A struct over a raw pointer (a class would be retained and
    /// released around each access); `destroy` frees it. Callers check `i < count` where
    /// an fd may be unseen.
    private struct PipeWatches {
        private var base = UnsafeMutablePointer<PipeWatch>.allocate(capacity: 0)
        private(set) var count = 0
        private var capacity = 0

        subscript(i: Int) -> PipeWatch {
            @inline(__always) unsafeAddress {
                assert(i >= 0 && i < count)
                return UnsafePointer(base + i)
            }
            @inline(__always) nonmutating unsafeMutableAddress {
                assert(i >= 0 && i < count)
                return base + i
            }
        }

        /// Adds fresh watches up to `count` n.
        mutating func grow(to n: Int) {
            guard n > count else { return }
            if n > capacity {
                let newCapacity = max(n, capacity * 2, 16)
                let bigger = UnsafeMutablePointer<PipeWatch>.allocate(capacity: newCapacity)
                bigger.moveInitialize(from: base, count: count)
                base.deallocate()
                base = bigger
                capacity = newCapacity
            }
            (base + count).initialize(repeating: PipeWatch(), count: n - count)
            count = n
        }

        func destroy() {
            base.deinitialize(count: count)
            base.deallocate()
        }
    }

    /// The token index of pipe polls' user_data (never a record's: slabs are far smaller).
    private static let pipePollIndex = UInt32.max - 2
    /// The token index of standalone deadline timeouts' user_data (see `State.deadlines`).
    private static let deadlineIndex = UInt32.max - 3
    /// fd numbers the pipe path serves (tag = arming << 20 | fd).
    private static let pipeFDLimit = 1 << 20

    /// Opcodes every operation needs; a kernel without one of them is not used.
    static let requiredOpcodes: [(opcode: io_uring_op, name: String)] = [
        (IORING_OP_NOP, "NOP"), (IORING_OP_READ, "READ"), (IORING_OP_WRITE, "WRITE"),
        (IORING_OP_READV, "READV"), (IORING_OP_WRITEV, "WRITEV"), (IORING_OP_SEND, "SEND"),
        (IORING_OP_RECV, "RECV"), (IORING_OP_SENDMSG, "SENDMSG"), (IORING_OP_RECVMSG, "RECVMSG"),
        (IORING_OP_ACCEPT, "ACCEPT"), (IORING_OP_CONNECT, "CONNECT"), (IORING_OP_POLL_ADD, "POLL_ADD"),
        (IORING_OP_TIMEOUT, "TIMEOUT"), (IORING_OP_ASYNC_CANCEL, "ASYNC_CANCEL"),
        (IORING_OP_CLOSE, "CLOSE"), (IORING_OP_OPENAT, "OPENAT"), (IORING_OP_FSYNC, "FSYNC"),
        (IORING_OP_SHUTDOWN, "SHUTDOWN"),
    ]

    /// Creates a ring with `entries` SQEs (io_uring_queue_init_params).
    ///
    /// Throws when io_uring cannot start: ENOSYS (no io_uring), EPERM or EACCES (seccomp,
    /// `kernel.io_uring_disabled`; operation `io_uring_register` when only the probe is
    /// refused), ENOMEM (locked-memory limit), EINVAL (no ring setup accepted), or
    /// EOPNOTSUPP (a required opcode missing from this kernel). `entries` is a hint: 0 is
    /// the smallest ring, and sizes above the kernel's maximum are clamped to it.
    public init(entries: UInt32 = 256) throws(PlexusError) {
        // A size hint, as for epoll and poll: 0 asks for the smallest ring, not EINVAL.
        let entries = max(entries, 1)
        let attempts: ArraySlice<(name: String, flags: UInt32)>
        do { attempts = try Self.setupsToTry() } catch {
            table.destroy()
            immediate.destroy()
            throw error
        }
        ring = .allocate(capacity: 1)
        ring.initialize(to: io_uring())
        var result: Int32 = -EINVAL
        var flags: UInt32 = 0
        for (_, attempt) in attempts {
            var params = io_uring_params()
            params.flags = attempt | IORING_SETUP_CQSIZE | IORING_SETUP_CLAMP
            // Saturating (`&* 4` wrapped from 2^30 on: a CQ smaller than the SQ, EINVAL);
            // IORING_SETUP_CLAMP brings both down to the kernel's maxima.
            params.cq_entries = entries > UInt32.max / 4 ? UInt32.max : entries * 4
            result = io_uring_queue_init_params(entries, ring, &params)
            flags = attempt
            // EINVAL means "this flag is too new"; anything else is final.
            if result != -EINVAL { break }
        }
        guard result == 0 else {
            ring.deallocate()
            table.destroy()
            immediate.destroy()
            throw PlexusError(operation: "io_uring_queue_init", errno: Errno(rawValue: -result),
                              message: "io_uring_setup failed: \(Errno(rawValue: -result))")
        }
        // One probe. A probe the kernel refused (a seccomp profile: EPERM) is not a missing
        // opcode, and says so.
        var supported = [UInt8](repeating: 0, count: 256)
        let probed = plexus_probe_opcodes(ring, &supported)
        let missing = Self.requiredOpcodes.first { supported[Int($0.opcode.rawValue)] == 0 }
        guard probed == 0, missing == nil else {
            io_uring_queue_exit(ring)
            ring.deallocate()
            table.destroy()
            immediate.destroy()
            if probed != 0 {
                throw PlexusError(operation: "io_uring_register", errno: Errno(rawValue: -probed),
                                  message: "io_uring_register(IORING_REGISTER_PROBE) failed: \(Errno(rawValue: -probed))")
            }
            throw PlexusError(operation: "io_uring_register_probe", errno: .notSupported,
                              message: "this kernel's io_uring lacks IORING_OP_\(missing!.name)")
        }
        setupFlags = flags
        let has = { (op: io_uring_op) in supported[Int(op.rawValue)] != 0 }
        var caps: Capabilities = [.nativeCompletions, .linkedOperations, .nonBlockingFileIO]
        // The probe lists opcodes, not flags; an opcode of the same kernel release stands in.
        if has(IORING_OP_SOCKET) { caps.formUnion([.multishotAccept, .cancelByFileDescriptor]) }  // 5.19
        if has(IORING_OP_MKDIRAT) { caps.insert(.multishotPoll) }  // 5.15 (multishot poll: 5.13)
        if has(IORING_OP_SEND_ZC) { caps.formUnion([.multishotReceive, .providedBufferRings]) }  // 6.0
        if has(IORING_OP_MSG_RING) { caps.insert(.messageRing) }  // 5.18
        if flags & IORING_SETUP_DEFER_TASKRUN != 0 { caps.insert(.deferredTaskRun) }
        if ring.pointee.features & IORING_FEAT_NODROP != 0 { caps.insert(.noDrop) }
        capabilities = caps
        state = .allocate(capacity: 1)
        state.initialize(to: State())
        state.pointee.backlog.reserveCapacity(64)
        cqeBatch = Int(ring.pointee.cq.ring_entries)
        takesRingMessages.store(flags & IORING_SETUP_R_DISABLED == 0, ordering: .releasing)
    }

    deinit {
        let ran = enabled
        if ran { cancelAll { _ in } }
        // A ring never enabled never ran anything: its records only need their buffers
        // freed, but for its closes, which closed their fds for their callers when they
        // were prepared (`beginClose`): they run now, as on epoll and poll, or the fds leak.
        for index in table.liveIndices() {
            let record = table.record(index)
            if !ran, record.pointee.kind == .close, state.pointee.closing[record.pointee.fd] == index {
                _ = Sys.close(record.pointee.fd)
            }
            release(index)
            _ = table.remove(index)
        }
        for (id, entry) in state.pointee.bufferRings {
            _ = plexus_free_buf_ring(ring, entry.ring, UInt32(entry.group.count), Int32(id))
        }
        io_uring_queue_exit(ring)
        for entry in state.pointee.deadlines.values { entry.timespec.deallocate() }
        state.pointee.pipes.destroy()
        ring.deallocate()
        state.deinitialize(count: 1)
        state.deallocate()
        table.destroy()
        immediate.destroy()
        plexus_release_sigpipe()  // the caller's thread gets its signal mask back
    }

    public var pendingCount: Int { table.liveCount }
    /// Standalone deadline timeouts not yet reported back (`State.deadlines`; for tests).
    var standaloneDeadlines: Int { state.pointee.deadlines.count }
    /// Whether pipe `fd` is served as O_NONBLOCK (read/write), as blocking (preadv2/pwritev2
    /// with RWF_NOWAIT), or nil when it is no pipe seen so far (`PipeWatch`; for tests).
    func pipeIsNonBlocking(_ fd: FileDescriptor) -> Bool? {
        let i = Int(fd.rawValue)
        guard i >= 0, i < state.pointee.pipes.count, state.pointee.pipes[i].kind == 1 else { return nil }
        return state.pointee.pipes[i].nonBlocking
    }
    public var statistics: BackendStatistics {
        var s = state.pointee.statistics
        s.completionQueueOverflows = UInt64(plexus_cq_overflow(ring))
        return s
    }

    // MARK: prepare / submit / wait

    public func prepare(_ operation: consuming Operation) -> Token {
        let token = table.insert(operation)
        state.pointee.statistics.prepared &+= 1
        prep(token.index)
        return token
    }

    func prepare(_ kind: OperationKind, _ fd: FileDescriptor, _ buffer: consuming IOBuffer, offset: Int64?,
                 flags: Int32) -> Token {
        let token = table.insert(kind, fd, buffer, offset: offset, flags: flags)
        state.pointee.statistics.prepared &+= 1
        prep(token.index)
        return token
    }

    func prepareHandingBack(_ kind: OperationKind, _ fd: FileDescriptor, _ buffer: consuming IOBuffer,
                            offset: Int64?, flags: Int32) -> Token {
        let token = table.insert(kind, fd, buffer, offset: offset, flags: flags, handsBackBuffer: true)
        state.pointee.statistics.prepared &+= 1
        prep(token.index)
        return token
    }

    /// The operation's SQE with IOSQE_IO_LINK, then an IORING_OP_LINK_TIMEOUT at
    /// `deadline` (IORING_TIMEOUT_ABS): the kernel cancels the operation when it passes.
    /// The timeout's own CQE is internal.
    public func prepare(_ operation: consuming Operation, deadline: Deadline) -> Token {
        guard operation.kind.takesDeadline else { return prepare(operation) }
        makeRoom(for: 2)  // the operation and its timeout go into the SQ together
        let tailBefore = ring.pointee.sq.sqe_tail
        let immediateBefore = immediate.count
        state.pointee.noParking = true
        let token = prepare(operation)
        state.pointee.noParking = false
        let index = Int(token.index)
        if immediate.count > immediateBefore, immediate.last?.index == index {
            return token  // finished at once (a cached read, a pipe write, refused input)
        }
        let tail = ring.pointee.sq.sqe_tail
        let operationSQE = ring.pointee.sq.sqes + Int((tail &- 1) & ring.pointee.sq.ring_mask)
        guard tail == tailBefore &+ 1, operationSQE.pointee.user_data == token.rawValue,
              let timeoutSQE = io_uring_get_sqe(ring) else {
            // No SQE of its own yet: it waits behind another operation on its byte stream
            // (io_uring would reorder them) or for SQ space. Its deadline runs apart.
            armDeadline(token, deadline)
            return token
        }
        let scratch = table.scratch(Int(token.index))
        scratch.pointee.timeout = __kernel_timespec(nanoseconds: deadline.nanoseconds)
        table.record(Int(token.index)).pointee.deadline = .linked
        linkTimeout(timeoutSQE, to: operationSQE, at: scratch)
        return token
    }

    /// Links `sqe` to an IORING_OP_LINK_TIMEOUT at the instant in `scratch`
    /// (IORING_TIMEOUT_ABS) in `timeoutSQE`, the next one; the timeout's own CQE is internal.
    private func linkTimeout(_ timeoutSQE: UnsafeMutablePointer<io_uring_sqe>, to sqe: UnsafeMutablePointer<io_uring_sqe>,
                             at scratch: UnsafeMutablePointer<plexus_op_scratch>) {
        sqe.pointee.flags |= UInt8(PLEXUS_IOSQE_IO_LINK)
        io_uring_prep_link_timeout(timeoutSQE, &scratch.pointee.timeout, IORING_TIMEOUT_ABS)
        io_uring_sqe_set_data64(timeoutSQE, Token.internalOperation.rawValue)
    }

    /// Submits what the SQ holds when fewer than `count` entries are free, so entries that
    /// must go in together (an operation and its linked timeout) find room.
    private func makeRoom(for count: UInt32) {
        if io_uring_sq_space_left(ring) < count, (try? enableIfNeeded()) != nil {
            plexus_block_sigpipe()
            _ = io_uring_submit(ring)
        }
    }

    /// A result known at prepare (a cached read, a refused fd) comes back here at once.
    public func attempt(_ operation: consuming Operation) -> Attempt {
        state.pointee.attempting = true
        let token = prepare(operation)
        state.pointee.attempting = false
        guard immediate.count > state.pointee.immediateHead, let last = immediate.last,
              last.index == Int(token.index) else { return .prepared(token) }
        immediate.removeLast()
        var completion: Completion? = nil
        _ = finish(last.index, result: last.result, flags: []) { (c: consuming Completion) in completion = .some(c) }
        return .completed(completion.take()!)
    }

    @discardableResult
    public func submit() throws(PlexusError) -> Int {
        plexus_block_sigpipe()  // an IORING_OP_WRITE to a pipe without a reader raises it on this thread
        try enableIfNeeded()
        drainBacklog()
        let n = io_uring_submit(ring)
        if n < 0 && n != -EINTR && n != -EAGAIN && n != -EBUSY {
            throw PlexusError(operation: "io_uring_submit", errno: Errno(rawValue: -n))
        }
        return Int(max(n, 0))
    }

    @discardableResult
    public func wait(timeout: Duration?, _ body: (consuming Completion) -> Void) throws(PlexusError) -> Int {
        plexus_block_sigpipe()
        try enableIfNeeded()
        drainBacklog()
        var delivered = deliverImmediate(body)
        var r: Int32
        if delivered > 0 && io_uring_sq_ready(ring) == 0 && state.pointee.skippedEnters < 8 {
            // Results known without the kernel (cached reads) and nothing to submit: skip
            // io_uring_enter this time; every 8th time it runs anyway, so the ring's own
            // completions (task work under DEFER_TASKRUN) are never starved.
            state.pointee.skippedEnters += 1
            return delivered + reap(body)
        }
        state.pointee.skippedEnters = 0
        if delivered > 0 || timeout.isZero {
            r = io_uring_submit_and_get_events(ring)
        } else if let timeout {
            var ts = __kernel_timespec(nanoseconds: timeout.nanosecondsClamped)
            var cqe: UnsafeMutablePointer<io_uring_cqe>?
            r = io_uring_submit_and_wait_timeout(ring, &cqe, 1, &ts, nil)
        } else {
            r = io_uring_submit_and_wait(ring, 1)
        }
        if r < 0 && r != -ETIME && r != -EINTR && r != -EAGAIN && r != -EBUSY {
            throw PlexusError(operation: "io_uring_enter", errno: Errno(rawValue: -r))
        }
        delivered += reap(body)
        return delivered
    }

    public func cancelAll(_ body: (consuming Completion) -> Void) {
        if !enabled { try? enableIfNeeded() }
        drainBacklog()
        endStarved { _ in true }
        for fd in 0..<state.pointee.pipes.count where state.pointee.pipes[fd].kind == 1 || state.pointee.pipes[fd].stream == 1 {
            endWaitingOperations(on: Int32(fd), result: -ECANCELED) { _ in true }
            forgetPipe(Int32(fd))  // the cancel below ends its poll
        }
        if let sqe = sqe() {
            io_uring_prep_cancel64(sqe, 0, Int32(IORING_ASYNC_CANCEL_ANY | IORING_ASYNC_CANCEL_ALL))
            io_uring_sqe_set_data64(sqe, Token.internalOperation.rawValue)
        }
        // Every cancelled operation still posts its CQE; wait for each one.
        var idle = 0
        while table.liveCount > 0 && idle < 1000 {
            let n = (try? wait(timeout: .milliseconds(10), body)) ?? 0
            idle = n == 0 ? idle + 1 : 0
            // Also after what callbacks prepared since the last cancel, behind it in the SQ: on
            // rings without DEFER_TASKRUN an echo's recv prepared there found its bytes and
            // went on for ever. (And, when nothing came, what was not yet cancellable: links,
            // re-arms.)
            if n == 0 || io_uring_sq_ready(ring) > 0, let sqe = sqe() {
                io_uring_prep_cancel64(sqe, 0, Int32(IORING_ASYNC_CANCEL_ANY | IORING_ASYNC_CANCEL_ALL))
                io_uring_sqe_set_data64(sqe, Token.internalOperation.rawValue)
            }
        }
    }

    /// The ring's fd, for IORING_OP_MSG_RING from other rings.
    public var ringFD: Int32 { ring.pointee.ring_fd }

    /// Wakes the ring `target` (another loop's) with IORING_OP_MSG_RING: its wait ends
    /// as if a completion arrived. Submitted at once; on this ring the success CQE is
    /// skipped. False when the kernel lacks MSG_RING or the SQ is full.
    func postWake(toRing target: Int32) -> Bool {
        guard capabilities.contains(.messageRing), enabled, let sqe = io_uring_get_sqe(ring) else {
            return false
        }
        io_uring_prep_msg_ring(sqe, target, 0, Token.ringWake.rawValue, 0)
        io_uring_sqe_set_flags(sqe, UInt32(PLEXUS_IOSQE_CQE_SKIP_SUCCESS))
        io_uring_sqe_set_data64(sqe, Token.internalOperation.rawValue)
        return io_uring_submit(ring) >= 0
    }

    // MARK: Internals

    // enableIfNeeded, drainBacklog and deliverImmediate run in every submit and wait and
    // almost never have work: each checks inline and calls out only when there is some.

    @inline(__always)
    private func enableIfNeeded() throws(PlexusError) {
        if _slowPath(!enabled) { try enableRings() }
    }

    @inline(never)
    private func enableRings() throws(PlexusError) {
        let r = plexus_enable_rings(ring)
        guard r == 0 else { throw PlexusError(operation: "io_uring_enable_rings", errno: Errno(rawValue: -r)) }
        takesRingMessages.store(true, ordering: .releasing)
    }

    /// An SQE, flushing a full SQ to the kernel first; nil only if the kernel takes nothing.
    @inline(__always)
    private func sqe() -> UnsafeMutablePointer<io_uring_sqe>? {
        if let sqe = io_uring_get_sqe(ring) { return sqe }
        state.pointee.statistics.submissionQueueFull &+= 1
        plexus_block_sigpipe()
        if enabled { _ = io_uring_submit(ring) }
        return io_uring_get_sqe(ring)
    }

    @inline(__always)
    private func drainBacklog() {
        if _slowPath(!state.pointee.backlog.isEmpty || !state.pointee.unarmedDeadlines.isEmpty) { drainBacklogNow() }
    }

    @inline(never)
    private func drainBacklogNow() {
        while !state.pointee.unarmedDeadlines.isEmpty, io_uring_sq_space_left(ring) > 0 {
            let id = state.pointee.unarmedDeadlines.removeOldest()
            if let entry = state.pointee.deadlines[id] { submitDeadline(id, entry.timespec) }
        }
        while !state.pointee.backlog.isEmpty, io_uring_sq_space_left(ring) > 0 {
            let index = state.pointee.backlog.removeOldest()
            prep(index)
        }
    }

    // MARK: Deadlines without a link

    /// Times `token`'s operation, which has no SQE to link a timeout to, with a standalone
    /// IORING_OP_TIMEOUT at `deadline` (IORING_TIMEOUT_ABS). The timespec lives apart from
    /// the record: the kernel reads it at submission, and the record may be gone by then.
    private func armDeadline(_ token: Token, _ deadline: Deadline) {
        let timespec = UnsafeMutablePointer<__kernel_timespec>.allocate(capacity: 1)
        timespec.initialize(to: __kernel_timespec(nanoseconds: deadline.nanoseconds))
        state.pointee.deadlineSequence &+= 1
        let id = state.pointee.deadlineSequence
        state.pointee.deadlines[id] = (token, timespec)
        state.pointee.deadlineOf[Int(token.index)] = id
        submitDeadline(id, timespec)
    }

    private func submitDeadline(_ id: UInt32, _ timespec: UnsafeMutablePointer<__kernel_timespec>) {
        guard let sqe = sqe() else {
            state.pointee.unarmedDeadlines.append(id)
            return
        }
        io_uring_prep_timeout(sqe, timespec, 0, IORING_TIMEOUT_ABS)
        io_uring_sqe_set_data64(sqe, UInt64(Self.deadlineIndex) | UInt64(id) << 32)
    }

    /// The standalone timeout `id` ended: -ETIME when its deadline passed (its operation,
    /// if still pending, is cancelled wherever it is), -ECANCELED when `disarmDeadline`
    /// removed it.
    private func deadlineReport(_ id: UInt32, _ res: Int32) {
        guard let entry = state.pointee.deadlines.removeValue(forKey: id) else { return }
        entry.timespec.deallocate()
        let index = Int(entry.token.index)
        guard res == -ETIME, let record = table.live(entry.token) else { return }
        if state.pointee.deadlineOf[index] == id { state.pointee.deadlineOf[index] = nil }
        if record.pointee.cancelRequested || closeBegan(on: record.pointee.fd) {
            // A cancel or close prepared before the deadline ends it (the timeout's CQE can
            // come first on rings without DEFER_TASKRUN): not the deadline.
            return
        }
        record.pointee.deadline = .fired
        switch record.pointee.state {
        case .awaitingPipe:  // waiting behind another operation, or parked on a pipe
            endWaitingOperations(on: record.pointee.fd, result: -ECANCELED) { $0 == index }
        case .prepared:
            if let i = state.pointee.backlog.firstIndex(of: index) {  // waiting for SQ space
                state.pointee.backlog.remove(at: i)
                immediate.append(Immediate(index, -ECANCELED))
            }
        case .inFlight, .awaitingReadiness:  // in the ring since: cancel it there
            if let sqe = sqe() {
                io_uring_prep_cancel64(sqe, entry.token.rawValue, 0)
                io_uring_sqe_set_data64(sqe, Token.internalOperation.rawValue)
            }
        default:
            break
        }
    }

    /// Record `index` is finishing before its standalone deadline: remove the timeout
    /// (IORING_OP_TIMEOUT_REMOVE), so deadlines far off do not pile up in the kernel.
    @inline(never)
    private func disarmDeadline(of index: Int) {
        guard let id = state.pointee.deadlineOf.removeValue(forKey: index) else { return }
        if let i = state.pointee.unarmedDeadlines.firstIndex(of: id) {
            state.pointee.unarmedDeadlines.remove(at: i)
            state.pointee.deadlines.removeValue(forKey: id)?.timespec.deallocate()
            return
        }
        guard let sqe = sqe() else { return }  // it fires later and finds the record gone
        io_uring_prep_timeout_remove(sqe, UInt64(Self.deadlineIndex) | UInt64(id) << 32, 0)
        io_uring_sqe_set_data64(sqe, Token.internalOperation.rawValue)
    }

    /// Writes the record's SQE(s). Input that must not reach the kernel completes at once.
    private func prep(_ index: Int) {
        let record = table.record(index)
        let kind = record.pointee.kind
        if kind == .nop, let sqe = io_uring_get_sqe(ring) {
            // Nothing to check, order or point at: the view and the checks below were
            // two thirds of a NOP's preparation (183 instructions; plexus-bench nop-32).
            record.pointee.state = .inFlight
            io_uring_prep_nop(sqe)
            io_uring_sqe_set_data64(sqe, Token(index: UInt32(index), generation: record.pointee.generation).rawValue)
            return
        }
        if kind == .read || kind == .write, !record.pointee.hasOffset, startOnPipe(index, record, kind) { return }
        let scratch = table.scratch(index)
        let view = record.pointee.kernelView(scratch: scratch)
        let token = Token(index: UInt32(index), generation: record.pointee.generation)
        if let invalid = view.invalid {
            immediate.append(Immediate(index, invalid))
            return
        }
        if kind != .close, closeBegan(on: view.fd) {
            // Prepared after a close of its fd that has not completed: in the ring it could
            // take the file before the close runs and then wait on it forever. The fd is
            // closed for its caller already, as on epoll and poll.
            immediate.append(Immediate(index, -EBADF))
            return
        }
        if kind == .cancel, let target = record.pointee.operation.cancelTarget {
            guard let targetRecord = table.live(target) else {
                immediate.append(Immediate(index, -ENOENT))
                return
            }
            if targetRecord.pointee.kind == .close, closeBegan(on: targetRecord.pointee.fd) {
                // The fd is closed for its caller since the close was prepared (`beginClose`
                // ended and forgot what was on it; a repeated close waits for its EBADF): too
                // late to cancel, as on epoll and poll, where a close runs at once.
                immediate.append(Immediate(index, -ENOENT))
                return
            }
            if targetRecord.pointee.state == .awaitingBuffers {
                // Nothing of it is in the kernel: it ends here.
                endStarved { $0 == target.index }
                immediate.append(Immediate(index, 0))
                return
            }
            if targetRecord.pointee.state == .awaitingPipe {
                endWaitingOperations(on: targetRecord.pointee.fd, result: -ECANCELED) { $0 == target.index }
                immediate.append(Immediate(index, 0))
                return
            }
            if let waiting = state.pointee.backlog.firstIndex(of: target.index) {
                // Still waiting for SQ space: nothing of it is in the kernel, which would
                // see this cancel first and answer ENOENT.
                state.pointee.backlog.remove(at: waiting)
                immediate.append(Immediate(target.index, -ECANCELED))
                immediate.append(Immediate(index, 0))
                return
            }
            targetRecord.pointee.cancelRequested = true
        }
        if kind == .receiveMultishot && !capabilities.contains(.multishotReceive) {
            immediate.append(Immediate(index, -EOPNOTSUPP))
            return
        }
        if view.offset >= 0, kind.takesOffset, !isSeekable(view.fd) {
            immediate.append(Immediate(index, -ESPIPE))
            return
        }
        // A cached read costs a syscall of its own through preadv2, where in the ring it
        // shares io_uring_enter with the rest of the turn's entries: the shortcut is taken
        // only for the first thing of a turn (nothing to submit, no result waiting), or for
        // `attempt`, which wants the result now. (file-qd32 on 6.18: 32 reads per enter
        // cost 421 ns each, 32 preadv2 555 ns.)
        if kind == .read, view.offset >= 0, state.pointee.attempting || isFirstOfTurn, let n = readIfCached(view) {
            immediate.append(Immediate(index, n))
            return
        }
        if Self.isStreamRead(kind, view), orderedRead(index, kind, view) { return }
        if Self.isStreamWrite(kind, view) {
            switch orderedWrite(index, kind, view) {
            case .done(let n):
                immediate.append(Immediate(index, n))
                return
            case .waits:
                return
            case .ring:
                break
            }
        }
        if kind == .shutdown, view.flags != Int32(SHUT_RD), record.pointee.state != .inFlight,
           let i = watch(view.fd), state.pointee.pipes[i].stream == 1 {
            // io_uring runs a SHUTDOWN in its workers (REQ_F_FORCE_ASYNC): a send after it
            // in the SQ ran first. Counted as the stream's write in the ring, so the writes
            // prepared after it wait for it (and those before it do not hold it back: they
            // end with EPIPE, as on epoll and poll).
            countInRing(index, view.fd, write: true)
        }
        if kind == .close {
            switch state.pointee.closing[view.fd] {
            case nil:
                // Closed for its caller from here on, with its SQE or waiting for SQ space,
                // as on epoll and poll, where a close runs at once.
                beginClose(of: view.fd, by: index)
            case index?:
                break  // back from the backlog: it began already
            case _?:
                // The fd is closed already for its caller: EBADF, as on epoll and poll, once
                // the close under way ends (its result comes first). In the ring it would
                // close whatever took the number in between (an open in the first's callback).
                state.pointee.repeatedCloses.append(index)
                return
            }
        }
        guard let sqe = sqe() else {
            state.pointee.backlog.append(index)
            return
        }
        record.pointee.state = .inFlight
        let offset = UInt64(bitPattern: view.offset)
        switch kind {
        case .nop:
            io_uring_prep_nop(sqe)
        case .read:
            io_uring_prep_read(sqe, view.fd, view.base, UInt32(view.length), offset)
        case .write:
            io_uring_prep_write(sqe, view.fd, view.base, UInt32(view.length), offset)
        case .readv:
            io_uring_prep_readv(sqe, view.fd, view.vectors, UInt32(view.vectorCount), offset)
        case .writev:
            io_uring_prep_writev(sqe, view.fd, view.vectors, UInt32(view.vectorCount), offset)
        case .receiveMultishot:
            let group = record.pointee.operation.bufferGroup!
            io_uring_prep_recv_multishot(sqe, view.fd, nil, 0, 0)
            io_uring_sqe_set_flags(sqe, UInt32(PLEXUS_IOSQE_BUFFER_SELECT))
            sqe.pointee.buf_group = group.id
        case .send:
            io_uring_prep_send(sqe, view.fd, view.base, view.length, view.flags)
        case .recv:
            io_uring_prep_recv(sqe, view.fd, view.base, view.length, view.flags)
        case .sendMessage:
            io_uring_prep_sendmsg(sqe, view.fd, &scratch.pointee.message, UInt32(bitPattern: view.flags))
        case .receiveMessage:
            io_uring_prep_recvmsg(sqe, view.fd, &scratch.pointee.message, UInt32(bitPattern: view.flags))
        case .accept:
            io_uring_prep_accept(sqe, view.fd, nil, nil, Self.acceptFlags)
        case .acceptMultishot:
            if capabilities.contains(.multishotAccept) {
                io_uring_prep_multishot_accept(sqe, view.fd, nil, nil, Self.acceptFlags)
            } else {  // re-armed after every connection in `complete`
                io_uring_prep_accept(sqe, view.fd, nil, nil, Self.acceptFlags)
            }
        case .connect:
            withUnsafeMutablePointer(to: &scratch.pointee.address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                    io_uring_prep_connect(sqe, view.fd, $0, scratch.pointee.address_length)
                }
            }
        case .poll:
            io_uring_prep_poll_add(sqe, view.fd, UInt32(bitPattern: view.flags))
        case .pollMultishot:
            if capabilities.contains(.multishotPoll) {
                io_uring_prep_poll_multishot(sqe, view.fd, UInt32(bitPattern: view.flags))
            } else {
                io_uring_prep_poll_add(sqe, view.fd, UInt32(bitPattern: view.flags))
            }
        case .timeout:
            let absolute: UInt32
            absolute = record.pointee.operation.isDeadline ? IORING_TIMEOUT_ABS : 0
            io_uring_prep_timeout(sqe, &scratch.pointee.timeout, 0, absolute)
        case .cancel:
            io_uring_prep_cancel64(sqe, record.pointee.operation.cancelTarget!.rawValue, 0)
        case .close:
            // Cancel what is pending on the fd first (the pipe's poll too: `beginClose` forgot
            // it); the hard link runs the close either way.
            if capabilities.contains(.cancelByFileDescriptor) {
                io_uring_prep_cancel_fd(sqe, view.fd, UInt32(IORING_ASYNC_CANCEL_ALL))
                io_uring_sqe_set_flags(sqe, UInt32(PLEXUS_IOSQE_IO_HARDLINK))
                io_uring_sqe_set_data64(sqe, Token.internalOperation.rawValue)
                // Not `sqe()`: a submit for room here would cut the link, and a link cut at
                // the end of a submit runs its cancel in io-wq, after the close (EBADF), so
                // what it was to cancel waits for ever.
                guard let close = io_uring_get_sqe(ring) else {
                    // No room after the cancel: let the cancel run alone, the close follows later.
                    io_uring_sqe_set_flags(sqe, 0)
                    state.pointee.backlog.append(index)
                    return
                }
                io_uring_prep_close(close, view.fd)
                io_uring_sqe_set_data64(close, token.rawValue)
                return
            } else {
                cancelPending(on: view.fd, except: index)
                io_uring_prep_close(sqe, view.fd)
            }
        case .open:
            let (path, mode) = record.pointee.operation.openArguments!
            if scratch.pointee.path == nil { scratch.pointee.path = path.withPlatformString { strdup($0) } }
            io_uring_prep_openat(sqe, view.fd, scratch.pointee.path, view.flags, mode)
        case .fsync:
            io_uring_prep_fsync(sqe, view.fd, view.flags != 0 ? UInt32(IORING_FSYNC_DATASYNC) : 0)
        case .shutdown:
            io_uring_prep_shutdown(sqe, view.fd, view.flags)
        }
        io_uring_sqe_set_data64(sqe, token.rawValue)
    }

    /// Kernels before 5.19 cannot cancel by fd: cancel each pending operation on `fd` by token.
    private func cancelPending(on fd: Int32, except: Int) {
        for index in table.liveIndices() where index != except {
            let record = table.record(index)
            guard record.pointee.state == .inFlight || record.pointee.state == .awaitingReadiness,
                  record.pointee.fd == fd,
                  let sqe = sqe() else { continue }
            io_uring_prep_cancel64(sqe, Token(index: UInt32(index), generation: record.pointee.generation).rawValue, 0)
            io_uring_sqe_set_data64(sqe, Token.internalOperation.rawValue)
        }
    }

    @inline(__always)
    private func deliverImmediate(_ body: (consuming Completion) -> Void) -> Int {
        state.pointee.immediateHead < immediate.count ? deliverImmediateNow(body) : 0
    }

    /// Delivers the immediate results queued so far, in order (see the budget below).
    /// A head index walks the array, which is emptied once all are delivered:
    /// `removeFirst` moved every later element per result (file-qd32 queues 32 cached
    /// reads a turn). The delivered prefix is dropped every 256 results, so callbacks that
    /// keep adding results do not grow the array without bound. A callback may re-enter
    /// (a nested `wait`): it goes on from the same head, which is why the loop also checks
    /// the head against the count, not only the budget.
    @inline(never)
    private func deliverImmediateNow(_ body: (consuming Completion) -> Void) -> Int {
        var n = 0
        // Only the results queued before this call: those the callbacks add on the way
        // wait for the next call (the next turn), or a callback chain of operations that
        // finish at once (cached file reads, refused input) would keep the loop in this
        // wait for ever, its timers and jobs starved. The next wait delivers them first
        // and, having delivered, does not block.
        var budget = immediate.count - state.pointee.immediateHead
        while budget > 0 && state.pointee.immediateHead < immediate.count {
            if state.pointee.immediateHead == 256 {
                immediate.removeFirst(256)
                state.pointee.immediateHead = 0
            }
            let entry = immediate[state.pointee.immediateHead]
            state.pointee.immediateHead += 1
            budget -= 1
            n += finish(entry.index, result: entry.result, flags: [], body)
        }
        if state.pointee.immediateHead >= immediate.count {
            immediate.removeAll()
            state.pointee.immediateHead = 0
        }
        return n
    }

    /// Hands the CQEs in the ring to `complete`, one at a time, straight from the ring.
    ///
    /// Each CQE leaves the ring (its head moves on) before its completion is delivered: a
    /// callback may re-enter (a nested `runOnce`), and the nested reap then goes on from the
    /// next CQE. Advancing after a batch instead had the nested reap deliver the rest of the
    /// batch, find the first one's record gone, and advance the head over CQEs nobody had
    /// seen, which were lost. (Reading the ring directly also saves io_uring_peek_batch_cqe's
    /// call and its pointer array: the CQ ring is this thread's alone.)
    private func reap(_ body: (consuming Completion) -> Void) -> Int {
        var delivered = 0
        // At most the CQEs there are now (at least a batch): callbacks that submit NOPs or
        // anything else the kernel completes inline (when a full SQ is flushed) add CQEs as
        // fast as they are reaped, and reaping until none is left kept the loop here for
        // ever, its timers and jobs starved. The rest waits for the next turn's wait,
        // which returns at once for them.
        var left = max(Int(io_uring_cq_ready(ring)), cqeBatch)
        while left > 0 && io_uring_cq_ready(ring) > 0 {
            let head = ring.pointee.cq.khead.pointee
            let cqe = ring.pointee.cq.cqes + Int(head & ring.pointee.cq.ring_mask)
            let userData = cqe.pointee.user_data, res = cqe.pointee.res, flags = cqe.pointee.flags
            io_uring_cq_advance(ring, 1)
            left -= 1
            delivered += complete(userData, res, flags, body)
        }
        delivered += deliverImmediate(body)
        return delivered
    }

    @inline(__always)
    private func complete(_ userData: UInt64, _ res: Int32, _ cqeFlags: UInt32,
                          _ body: (consuming Completion) -> Void) -> Int {
        if userData == Token.internalOperation.rawValue || userData == Token.ringWake.rawValue { return 0 }
        if UInt32(truncatingIfNeeded: userData) == Self.pipePollIndex {
            return pipeReport(UInt32(truncatingIfNeeded: userData >> 32), res, cqeFlags, body)
        }
        if UInt32(truncatingIfNeeded: userData) == Self.deadlineIndex {
            deadlineReport(UInt32(truncatingIfNeeded: userData >> 32), res)
            return 0
        }
        let token = Token(rawValue: userData)
        guard let record = table.live(token) else {
            assertionFailure("CQE for a token that is not live: \(token)")
            return 0
        }
        let kind = record.pointee.kind
        var flags = CompletionFlags(rawValue: cqeFlags & IORING_CQE_F_SOCK_NONEMPTY)
        if record.pointee.state == .awaitingReadiness {
            // The readiness poll of an operation that got EAGAIN: run the operation again,
            // unless it ends (at once: before what was prepared after it, a close say). It
            // is in flight again either way: `finish` uncounts only an .inFlight record from
            // its stream's reads or writes in the ring, and a count left at 1 would park
            // every later recv or send of the socket for ever.
            record.pointee.state = .inFlight
            if res >= 0 {
                if endsInsteadOfRearm(token.index, record) { return finish(token.index, result: -ECANCELED, flags: [], body) }
                prep(token.index)  // `rearm` without its check, made just above
                return 0
            }
            return finish(token.index, result: res, flags: flags, body)
        }
        if res == -EAGAIN && !kind.isMultishot && Self.waitsForReadiness(kind) {
            // Old kernels return EAGAIN for O_NONBLOCK files: poll, then retry under the same
            // token; unless it was cancelled, its fd's close began or its deadline passed
            // since (a readiness the retry keeps answering EAGAIN, POLLERR, would spin).
            if endsInsteadOfRearm(token.index, record) || deadlineCameWhileInFlight(record, token.index) {
                return finish(token.index, result: -ECANCELED, flags: [], body)
            }
            if prepareReadinessPoll(token, record) { return 0 }
        }
        if kind == .receiveMultishot {
            return completeReceive(token, record, res, cqeFlags, body)
        }
        if res >= 0, kind == .accept || kind == .acceptMultishot || kind == .open { forgetFormer(res) }
        if kind.isMultishot {
            let more = cqeFlags & IORING_CQE_F_MORE != 0
            if res >= 0 {
                // Ended by the kernel (CQ overflow, or a one-shot stand-in): re-arm it.
                if !more { rearm(token.index, multishot: true) }
                flags.insert(.more)
                state.pointee.statistics.completed &+= 1
                body(Completion(token: token, result: res, flags: flags, kind: kind, operation: nil))
                return 1
            }
            if kind == .acceptMultishot && OperationKind.endsOnlyOneConnection(res) {
                // One connection lost, not the listener: go on accepting.
                if !more { rearm(token.index, multishot: true) }
                return 0
            }
            if more {  // an error the kernel reports without ending the operation
                state.pointee.statistics.completed &+= 1
                body(Completion(token: token, result: res, flags: .more, kind: kind, operation: nil))
                return 1
            }
        }
        if _slowPath(kind == .cancel) && !state.pointee.endedForCancel.isEmpty,
           let target = record.pointee.operation.cancelTarget,
           let i = state.pointee.endedForCancel.firstIndex(of: target) {
            state.pointee.endedForCancel.remove(at: i)
            return finish(token.index, result: res == -ENOENT ? 0 : res, flags: flags, body)
        }
        let result = kind == .timeout && res == -ETIME ? 0 : res
        return finish(token.index, result: result, flags: flags, body)
    }

    /// A multishot receive's CQE: a chunk in a provided buffer, the end (0 or an error),
    /// or ENOBUFS, which parks the receive until a buffer of its group is recycled.
    private func completeReceive(_ token: Token, _ record: UnsafeMutablePointer<OperationRecord>, _ res: Int32,
                                 _ cqeFlags: UInt32, _ body: (consuming Completion) -> Void) -> Int {
        let more = cqeFlags & IORING_CQE_F_MORE != 0
        let bufferID: UInt16? = cqeFlags & IORING_CQE_F_BUFFER != 0 ? UInt16(truncatingIfNeeded: cqeFlags >> 16) : nil
        if res == -ENOBUFS && !more {
            let group = record.pointee.operation.bufferGroup!
            if state.pointee.bufferRings[group.id]?.group != group {
                // Its group was unregistered under it: the kernel has no buffers for it now.
                return finish(token.index, result: -EINVAL, flags: [], body)
            }
            // Cancelled (re-armed by a recycle in the same turn) or its fd's close began
            // since the kernel ended it: it ends here, as parking would outlive both.
            if endsInsteadOfRearm(token.index, record) { return finish(token.index, result: -ECANCELED, flags: [], body) }
            if group.outstanding < group.count {
                // Buffers came back between the kernel running dry and this CQE: go on now,
                // or no later recycle would ever wake it.
                rearm(token.index, multishot: true)
            } else {
                state.pointee.starved[group.id, default: []].append(token)
                record.pointee.state = .awaitingBuffers
            }
            return 0
        }
        if res > 0 {
            if !more { rearm(token.index, multishot: true) }  // ended with data left to read
            var flags = CompletionFlags(rawValue: cqeFlags & IORING_CQE_F_SOCK_NONEMPTY)
            flags.insert(.more)
            state.pointee.statistics.completed &+= 1
            if let bufferID, let group = record.pointee.operation.bufferGroup { group.handOut(bufferID) }
            body(Completion(token: token, result: res, flags: flags, kind: .receiveMultishot, operation: nil,
                            bufferID: bufferID))
            return 1
        }
        if more {
            state.pointee.statistics.completed &+= 1
            body(Completion(token: token, result: res, flags: .more, kind: .receiveMultishot, operation: nil))
            return 1
        }
        return finish(token.index, result: res, flags: [], body)  // end of file (0) or an error
    }

    /// Prepares the readiness poll of `token`'s operation, which the kernel answered
    /// EAGAIN; false when the SQ has no room. A linked deadline ended with the operation,
    /// so the poll takes one at the same instant (the timespec stays in its scratch); with
    /// no SQE for that, a standalone one.
    private func prepareReadinessPoll(_ token: Token, _ record: UnsafeMutablePointer<OperationRecord>) -> Bool {
        let linked = _slowPath(record.pointee.deadline == .linked)
        if linked { makeRoom(for: 2) }
        guard let sqe = sqe() else { return false }
        io_uring_prep_poll_add(sqe, record.pointee.fd, Self.writes(record.pointee.kind) ? UInt32(POLLOUT) : UInt32(POLLIN))
        io_uring_sqe_set_data64(sqe, token.rawValue)
        record.pointee.state = .awaitingReadiness
        state.pointee.statistics.wouldBlock &+= 1
        guard linked else { return true }
        let index = Int(token.index)
        let scratch = table.scratch(index)
        if let timeoutSQE = io_uring_get_sqe(ring) {
            linkTimeout(timeoutSQE, to: sqe, at: scratch)
        } else if state.pointee.deadlineOf[index] == nil {
            armDeadline(token, Deadline(nanoseconds: scratch.pointee.timeout.nanoseconds))
        }
        return true
    }

    /// Prepares again, under its token, an operation the kernel answered EAGAIN or (a
    /// multishot one, counted) ended: CQ overflow, no buffers left, a one-shot stand-in;
    /// unless it ends instead (`endsInsteadOfRearm`).
    private func rearm(_ index: Int, multishot: Bool = false) {
        if endsInsteadOfRearm(index, table.record(index)) {
            immediate.append(Immediate(index, -ECANCELED))
            return
        }
        if multishot { state.pointee.statistics.multishotRearms &+= 1 }
        prep(index)
    }

    /// Whether an operation the kernel answered EAGAIN or ended, which Plexus would
    /// otherwise arm again or park, ends with ECANCELED instead (the caller ends it, at
    /// once where it can, so it comes before what was prepared after it, as on epoll):
    /// - when a cancel of it is in the SQ, ahead of where its new SQE would go: armed again
    ///   it would run on past the cancel, which reports 0 when its ENOENT comes back
    ///   (`endedForCancel`);
    /// - when a close of its fd was prepared: it ends as an operation prepared before the
    ///   close ends (`beginClose`), not with the EBADF of one prepared after it (`prep`),
    ///   and is not armed on an fd number that may name another file.
    private func endsInsteadOfRearm(_ index: Int, _ record: UnsafeMutablePointer<OperationRecord>) -> Bool {
        if record.pointee.cancelRequested {
            state.pointee.endedForCancel.append(Token(index: UInt32(index), generation: record.pointee.generation))
            return true
        }
        return closeBegan(on: record.pointee.fd)
    }

    /// Whether the deadline of an operation the kernel answered EAGAIN passed while it
    /// was in the kernel: its linked timeout's instant is gone (a readiness poll that
    /// completes at once never arms the timeout linked to it), or its standalone one
    /// fired and the cancel it sent found nothing to cancel.
    private func deadlineCameWhileInFlight(_ record: UnsafeMutablePointer<OperationRecord>, _ index: Int) -> Bool {
        _slowPath(record.pointee.deadline != .none) && !deadlinePassed(record, table.scratch(index)).isEmpty
    }

    /// A close may wait in the SQ: a write Plexus would do at once with a syscall (a pipe
    /// write, a send) goes to the ring instead, behind it. Done at once, its return from
    /// the kernel runs task work on rings without DEFER_TASKRUN: a read of the pipe's other
    /// end in the ring took the byte before the close that was to cancel it was submitted.
    private var closeUnsubmitted: Bool {
        _slowPath(!state.pointee.closing.isEmpty) && io_uring_sq_ready(ring) > 0
    }

    /// A close of `fd` was prepared and has not completed (`beginClose`, `closed`).
    @inline(__always)
    private func closeBegan(on fd: Int32) -> Bool {
        _slowPath(!state.pointee.closing.isEmpty) && state.pointee.closing[fd] != nil
    }

    /// Ends the starved multishot receives `matching` picks (of every group, or of one)
    /// with `result`: they have nothing in the kernel to cancel.
    private func endStarved(result: Int32 = -ECANCELED, inGroup only: UInt16? = nil, _ matching: (Int) -> Bool) {
        for (group, tokens) in state.pointee.starved where only == nil || only == group {
            var kept: [Token] = []
            for token in tokens {
                guard let record = table.live(token), record.pointee.state == .awaitingBuffers else { continue }
                if matching(token.index) {
                    record.pointee.state = .inFlight
                    immediate.append(Immediate(token.index, result))
                } else {
                    kept.append(token)
                }
            }
            state.pointee.starved[group] = kept.isEmpty ? nil : kept
        }
    }

    public func registerBuffers(count: Int, size: Int) throws(PlexusError) -> BufferGroup {
        guard count > 0, count <= 32768, count & (count - 1) == 0, size > 0, size <= Operation.maxTransfer else {
            throw PlexusError(operation: "io_uring_register_buf_ring", errno: .invalidArgument,
                              message: "a buffer group needs a power-of-two count up to 32768 and a positive size")
        }
        guard capabilities.contains(.providedBufferRings) else {
            throw PlexusError(operation: "io_uring_register_buf_ring", errno: .notSupported,
                              message: "this kernel has no provided buffer rings with multishot receive (Linux 6.0+): use epoll or poll")
        }
        guard let id = BufferGroup.freeID(from: state.pointee.nextGroup, inUse: { state.pointee.bufferRings[$0] != nil }) else {
            throw PlexusError(operation: "io_uring_register_buf_ring", errno: .fileExists,
                              message: "all 65536 buffer group ids are in use")
        }
        var error: Int32 = 0
        guard let br = plexus_setup_buf_ring(ring, UInt32(count), Int32(id), &error) else {
            throw PlexusError(operation: "io_uring_register_buf_ring", errno: Errno(rawValue: -error))
        }
        state.pointee.nextGroup = id &+ 1
        let group = BufferGroup(id: id, count: count, size: size)
        let mask = io_uring_buf_ring_mask(UInt32(count))
        for bid in 0..<count {
            io_uring_buf_ring_add(br, group.address(of: UInt16(bid)), UInt32(size), UInt16(bid), mask, Int32(bid))
        }
        io_uring_buf_ring_advance(br, Int32(count))
        state.pointee.bufferRings[id] = (br, group)
        return group
    }

    public func unregisterBuffers(_ group: BufferGroup) {
        guard let entry = state.pointee.bufferRings[group.id], entry.group == group else { return }
        _ = plexus_free_buf_ring(ring, entry.ring, UInt32(group.count), Int32(group.id))
        state.pointee.bufferRings[group.id] = nil
        // Receives parked for its buffers would wait forever: they end, as on epoll and poll.
        endStarved(result: -EINVAL, inGroup: group.id) { _ in true }
    }

    public func recycle(_ group: BufferGroup, id: UInt16) {
        guard let entry = state.pointee.bufferRings[group.id], entry.group == group, Int(id) < group.count else {
            preconditionFailure("buffer \(id) does not belong to a group of this backend")
        }
        guard group.takeBack(id) else { return }  // not out: it is in the ring already
        io_uring_buf_ring_add(entry.ring, group.address(of: id), UInt32(group.size), id,
                              io_uring_buf_ring_mask(UInt32(group.count)), 0)
        io_uring_buf_ring_advance(entry.ring, 1)
        // Receives that ran dry resume now that there is a buffer.
        if let waiting = state.pointee.starved.removeValue(forKey: group.id) {
            for token in waiting {
                guard let record = table.live(token), record.pointee.state == .awaitingBuffers else { continue }
                record.pointee.state = .inFlight
                prep(token.index)
            }
        }
    }

    /// The final completion: apply the result to the buffers, free the record, deliver.
    @inline(__always)
    private func finish(_ index: Int, result: Int32, flags: CompletionFlags,
                        _ body: (consuming Completion) -> Void) -> Int {
        let record = table.record(index)
        let token = Token(index: UInt32(index), generation: record.pointee.generation)
        let kind = record.pointee.kind
        let scratch = table.scratch(index)
        // (A positional read is no pipe's: pipes refuse offsets with ESPIPE.)
        if kind == .read, result > 0, !record.pointee.hasOffset { notePipeRead(record, result) }
        if record.pointee.state == .inFlight {
            if Self.writes(kind) || kind == .shutdown { streamWriteDone(record.pointee.fd, stamp: record.pointee.next) }
            if Self.isReadSide(kind) { streamReadDone(record.pointee.fd, stamp: record.pointee.next) }
        }
        record.pointee.apply(result: result, kind: kind, scratch: scratch)
        if result == -EPIPE { plexus_discard_sigpipe() }
        let deadlineCause: CompletionFlags = _slowPath(record.pointee.deadline != .none) && result == -ECANCELED
            ? deadlinePassed(record, scratch) : []
        if _slowPath(kind == .close) { closed(record.pointee.fd, by: index) }
        if _slowPath(!state.pointee.deadlineOf.isEmpty) { disarmDeadline(of: index) }
        release(index)
        state.pointee.statistics.completed &+= 1
        if record.pointee.handsBackBuffer, let target = handBackTarget {
            // (No deadline: `prepareHandingBack` takes none, so no flag is lost here.)
            target.handBack(token, result, kind, table.removeBuffer(index))
            return 1
        }
        let operation = table.remove(index)
        body(Completion(token: token, result: result, flags: flags.union(deadlineCause), kind: kind, operation: operation))
        return 1
    }

    /// Close `index` of `fd` is prepared (with its SQE or waiting for one): the fd is closed
    /// for its caller. What is prepared on it from now on ends with EBADF (`prep`), until
    /// the close ends (`closed`); what Plexus still holds of the operations prepared
    /// before it (waiting for SQ space, parked on the pipe, waiting on the stream, starved
    /// of buffers) ends with ECANCELED, as the close's cancel ends those in the kernel; and
    /// what was known of the fd is forgotten.
    private func beginClose(of fd: Int32, by index: Int) {
        state.pointee.closing[fd] = index
        endBacklogged(on: fd, result: -ECANCELED)
        forgetPositional(fd)
        endStarved { table.record($0).pointee.fd == fd }
        endWaitingOperations(on: fd, result: -ECANCELED) { _ in true }
        forgetPipe(fd)
    }

    /// The close in record `index` of `fd` completed: operations prepared on the fd from
    /// now on go to the kernel (unless a later close of it is still on its way).
    @inline(never)
    private func closed(_ fd: Int32, by index: Int) {
        guard state.pointee.closing[fd] == index else { return }
        state.pointee.closing[fd] = nil
        if state.pointee.repeatedCloses.isEmpty { return }
        state.pointee.repeatedCloses.removeAll { other in
            guard table.record(other).pointee.fd == fd else { return false }
            immediate.append(Immediate(other, -EBADF))
            return true
        }
    }

    /// Ends the operations on `fd` waiting in the backlog for SQ space with `result`.
    private func endBacklogged(on fd: Int32, result: Int32) {
        guard !state.pointee.backlog.isEmpty else { return }
        state.pointee.backlog.removeAll { index in
            let record = table.record(index)
            guard record.pointee.fd == fd, record.pointee.kind != .close else { return false }
            immediate.append(Immediate(index, result))
            return true
        }
    }

    /// Whether a cancelled operation with a deadline was cancelled by it: its standalone
    /// timeout fired, or its linked one was due when the CQE came in (the kernel cancels a
    /// linked operation at the instant; a cancel or close before it is reaped in time).
    @inline(never)
    private func deadlinePassed(_ record: UnsafeMutablePointer<OperationRecord>,
                                _ scratch: UnsafeMutablePointer<plexus_op_scratch>) -> CompletionFlags {
        switch record.pointee.deadline {
        case .fired: return .deadlinePassed
        case .linked:
            return Deadline.now.nanoseconds >= scratch.pointee.timeout.nanoseconds ? .deadlinePassed : []
        case .none: return []
        }
    }

    /// Frees what the record borrowed from the C heap.
    private func release(_ index: Int) {
        let scratch = table.scratch(index)
        if let path = scratch.pointee.path {
            free(path)
            scratch.pointee.path = nil
        }
    }

    /// Every fd Plexus creates is close-on-exec; accepted sockets are also non-blocking.
    private static let acceptFlags = Int32(SOCK_CLOEXEC.rawValue | SOCK_NONBLOCK.rawValue)

    private static func waitsForReadiness(_ kind: OperationKind) -> Bool {
        switch kind {
        case .read, .write, .readv, .writev, .send, .recv, .sendMessage, .receiveMessage, .accept: true
        default: false
        }
    }

    /// Nothing is waiting to be submitted and no result to be delivered: the next wait
    /// would enter the kernel for this operation alone.
    private var isFirstOfTurn: Bool {
        io_uring_sq_ready(ring) == 0 && state.pointee.immediateHead == immediate.count
    }

    /// lseek(2) answers ESPIPE for exactly the fds pread(2) refuses; asked once per fd.
    @inline(__always)
    private func isSeekable(_ fd: Int32) -> Bool {
        let i = Int(fd)
        if i < state.pointee.positional.count, case let known = state.pointee.positional[i], known != 0 {
            return known != 2  // 1 or 3: seekable
        }
        return learnSeekable(fd)
    }

    @inline(never)
    private func learnSeekable(_ fd: Int32) -> Bool {
        let i = Int(fd)
        let seekable = lseek(fd, 0, SEEK_CUR) >= 0 || plexus_errno() != ESPIPE
        if i >= state.pointee.positional.count {
            state.pointee.positional.append(contentsOf: repeatElement(0, count: i + 1 - state.pointee.positional.count))
        }
        state.pointee.positional[i] = seekable ? 1 : 2
        return seekable
    }

    /// A positional read of page-cached data, done at once with preadv2(RWF_NOWAIT): the
    /// kernel answers from the cache or says EAGAIN (then the read goes to the ring). A
    /// cached 4 KiB read costs one syscall this way instead of a ring round trip. An fd
    /// whose file system refuses RWF_NOWAIT is not asked again.
    private func readIfCached(_ view: KernelView) -> Int32? {
        let i = Int(view.fd)
        guard i < state.pointee.positional.count, state.pointee.positional[i] == 1 else { return nil }
        let n = Sys.readNoWait(view.fd, view.base, view.length, view.offset)
        if n >= 0 { return Int32(n) }
        if n == -Int(EOPNOTSUPP) { state.pointee.positional[i] = 3 }
        return nil
    }

    // MARK: Pipes

    /// After a read at the position of `record`'s fd returned `result` > 0 bytes, before
    /// the result is applied to its buffer: a short read of a pipe leaves it empty.
    private func notePipeRead(_ record: UnsafeMutablePointer<OperationRecord>, _ result: Int32) {
        // Looked up, not made: a read at a pipe's position made its watch when it was
        // prepared (`orderedRead`), and every other read (a file's, a positional one) need
        // not pay for a watch here. (A parked read's pipeReport has judged it already.)
        let fd = record.pointee.fd, i = Int(fd)
        guard fd >= 0, i < state.pointee.pipes.count, state.pointee.pipes[i].kind == 1,
              record.pointee.state != .awaitingPipe,
              capabilities.isSuperset(of: [.multishotPoll, .cancelByFileDescriptor]) else { return }
        // The spare capacity is still what the read asked for (capped as in its view).
        if Int(result) < record.pointee.transfer.length {
            state.pointee.pipes[i].drained = true
        }
    }

    private enum OrderedWrite { case done(Int32), waits, ring }

    /// Writes at the file position (write, writev) and sends: the ones that could land out
    /// of order on a byte stream.
    private static func isStreamWrite(_ kind: OperationKind, _ view: KernelView) -> Bool {
        switch kind {
        case .write, .writev: view.offset < 0
        case .send, .sendMessage: true
        default: false
        }
    }

    /// A write to a byte stream goes to the ring only when no earlier one to the same fd is
    /// there; else it waits behind it (io_uring would keep no order between them). A write
    /// to a pipe is first done at once with pwritev2(RWF_NOWAIT) (write(2) if the pipe is
    /// O_NONBLOCK, see `PipeWatch.nonBlocking`): the kernel takes what fits or says
    /// EAGAIN, and then the write goes to the ring. Measured in the raw
    /// ping-pong shape (one multishot poll on the read end, preadv2 reads): 935-960 ns per
    /// round trip against 1056-1100 ns with IORING_OP_WRITE, whose submission, pipe write
    /// and task work cost more inside io_uring_enter than the syscall alone. RWF_NOWAIT
    /// keeps a pipe without O_NONBLOCK from blocking the loop.
    private func orderedWrite(_ index: Int, _ kind: OperationKind, _ view: KernelView) -> OrderedWrite {
        let fd = view.fd
        let record = table.record(index)
        // Already counted in writesInRing (a write from `waitingWrites`, or from the backlog).
        if record.pointee.state == .inFlight { return .ring }
        guard let i = watch(fd), state.pointee.pipes[i].stream == 1 else { return .ring }
        if state.pointee.pipes[i].writesInRing > 0 || !state.pointee.pipes[i].waitingWrites.isEmpty {
            // (A write with a deadline waits too; `prepare(_:deadline:)` times it apart.)
            record.pointee.state = .awaitingPipe
            state.pointee.pipes[i].waitingWrites.append(index)
            state.pointee.statistics.wouldBlock &+= 1
            return .waits
        }
        if kind == .write, state.pointee.pipes[i].kind == 1, let n = writeToPipeNow(fd, view.base, view.length) {
            return .done(n)
        }
        // Only with nothing of this socket prepared before it and still unsubmitted (in
        // the SQ or the backlog): a connect or shutdown there must run first.
        if state.pointee.attempting, state.pointee.pipes[i].socket, kind == .send || kind == .write,
           nothingUnsubmitted(on: fd), let n = sendNow(fd, view) {
            return .done(n)
        }
        countInRing(index, fd, write: true)
        return .ring
    }

    /// No SQE for `fd` waits to be submitted (between liburing's sqe_head and sqe_tail)
    /// and no operation on it waits for SQ space.
    private func nothingUnsubmitted(on fd: Int32) -> Bool {
        let sq = ring.pointee.sq
        var head = sq.sqe_head
        while head != sq.sqe_tail {
            if sq.sqes[Int(head & sq.ring_mask)].fd == fd { return false }
            head &+= 1
        }
        return state.pointee.backlog.isEmpty || !state.pointee.backlog.contains { table.record($0).pointee.fd == fd }
    }

    /// An awaited send (or write) to a socket with nothing of its writes in the ring and
    /// nothing of it unsubmitted, done at once with send(2) and MSG_DONTWAIT, as epoll and poll try it first: the
    /// task need not suspend for a send the socket buffer takes. nil on EAGAIN: then it
    /// goes to the ring. (write(2) on a socket is send(2) without flags; MSG_NOSIGNAL
    /// makes a reset peer EPIPE without the signal, as the ring's SIGPIPE is discarded.)
    private func sendNow(_ fd: Int32, _ view: KernelView) -> Int32? {
        if closeUnsubmitted { return nil }
        let result = Sys.send(fd, view.base, view.length, view.flags | Int32(MSG_DONTWAIT) | Int32(MSG_NOSIGNAL))
        if result == -Int(EAGAIN) || result == -Int(EWOULDBLOCK) { return nil }
        return Int32(truncatingIfNeeded: result)
    }

    /// Reads at the file position (read, readv) and receives: the ones that could take a
    /// byte stream's data out of order.
    private static func isStreamRead(_ kind: OperationKind, _ view: KernelView) -> Bool {
        switch kind {
        case .read, .readv: view.offset < 0
        case .recv, .receiveMessage, .receiveMultishot: true
        default: false
        }
    }

    /// A multishot receive counts as the stream's read in the ring until its final
    /// completion: a receive behind it waits, as it does behind a parked one on epoll and
    /// poll (else the kernel hands the data to either).
    private static func isReadSide(_ kind: OperationKind) -> Bool {
        kind == .read || kind == .readv || kind == .recv || kind == .receiveMessage || kind == .receiveMultishot
    }

    /// A read of a byte stream waits behind an earlier one in the ring, or (a pipe found
    /// empty) parks on the pipe's poll; else it goes to the ring, counted. True when it
    /// waits or is parked.
    private func orderedRead(_ index: Int, _ kind: OperationKind, _ view: KernelView) -> Bool {
        let fd = view.fd
        let record = table.record(index)
        // Already counted in readsInRing (from `waitingReads`, or from the backlog).
        if record.pointee.state == .inFlight { return false }
        guard let i = watch(fd), state.pointee.pipes[i].stream == 1 else { return false }
        let parksToo = kind == .read && !state.pointee.noParking
        if state.pointee.pipes[i].readsInRing > 0 || !state.pointee.pipes[i].waitingReads.isEmpty
            || !state.pointee.pipes[i].parked.isEmpty && !parksToo {
            // (A read with a deadline waits too; `prepare(_:deadline:)` times it apart.
            // One that cannot park on the pipe waits behind the parked ones: in the ring
            // it would take their bytes.)
            record.pointee.state = .awaitingPipe
            state.pointee.pipes[i].waitingReads.append(index)
            state.pointee.statistics.wouldBlock &+= 1
            return true
        } else if kind == .read, parkOnPipe(index, fd, view.base, view.length) {
            return true
        }
        countInRing(index, fd, write: false)
        return false
    }

    /// A read or write at the position of a pipe already watched, started from its record:
    /// what `prep` would find on its way (a valid view, no close of the fd under way, a
    /// stream with nothing of this side in the ring or waiting) is checked here on the
    /// record's fields, and the read parks on the pipe's poll (`parkOnPipe`) or the write
    /// is done at once (`writeToPipeNow`), as `orderedRead` and `orderedWrite` do. The
    /// view, the checks for other kinds and the watch's lookup were 300 of the 2518
    /// instructions of a callback ping-pong round trip on io_uring. False: `prep` goes on
    /// and comes to the same; a write the pipe did not take is counted in the ring first,
    /// so that `orderedWrite` sends it there without a second syscall.
    @inline(never)
    private func startOnPipe(_ index: Int, _ record: UnsafeMutablePointer<OperationRecord>,
                             _ kind: OperationKind) -> Bool {
        let fd = record.pointee.fd, i = Int(fd)
        // (A close of the fd prepared, with its SQE or waiting for one, forgot its watch in
        // `beginClose`: a known pipe has no close under way.)
        guard fd >= 0, i < state.pointee.pipes.count, state.pointee.pipes[i].kind == 1,
              record.pointee.state != .inFlight else { return false }
        let (base, length) = record.pointee.transfer
        guard length > 0 else { return false }  // EINVAL, from the view
        if kind == .read {
            guard state.pointee.pipes[i].readsInRing == 0, state.pointee.pipes[i].waitingReads.isEmpty else {
                return false
            }
            return parkOnPipe(index, fd, base, length)
        }
        guard state.pointee.pipes[i].writesInRing == 0, state.pointee.pipes[i].waitingWrites.isEmpty else {
            return false
        }
        guard let n = writeToPipeNow(fd, base, length) else {
            countInRing(index, fd, write: true)
            return false
        }
        immediate.append(Immediate(index, n))
        return true
    }

    /// A stream read that went to the ring completed: the next waiting ones go on.
    private func streamReadDone(_ fd: Int32, stamp: UInt32) {
        guard uncount(fd, stamp: stamp, write: false) else { return }
        startWaitingReads(fd, parking: true)
    }

    /// Starts the waiting reads of `fd` in order while none is in the ring: each parks on
    /// the pipe's poll (when `parking` and the pipe was found empty) or goes to the ring.
    private func startWaitingReads(_ fd: Int32, parking: Bool) {
        let i = Int(fd)
        while state.pointee.pipes[i].readsInRing == 0, let index = state.pointee.pipes[i].waitingReads.first {
            let record = table.record(index)
            // Behind reads parked on the pipe, only another parking read may go on.
            if !state.pointee.pipes[i].parked.isEmpty && !(parking && record.pointee.kind == .read) { break }
            _ = state.pointee.pipes[i].waitingReads.removeOldest()
            record.pointee.state = .prepared
            if parking, record.pointee.kind == .read,
               case let target = record.pointee.transfer, parkOnPipe(index, fd, target.base, target.length) { continue }
            countInRing(index, fd, write: false)
            prep(index)
        }
    }

    /// The index of `fd`'s watch, made and classified (pipe, byte stream) on first sight;
    /// nil for fd numbers the per-fd paths do not serve.
    private func watch(_ fd: Int32) -> Int? {
        guard fd >= 0, Int(fd) < Self.pipeFDLimit else { return nil }
        let i = Int(fd)
        if i >= state.pointee.pipes.count { state.pointee.pipes.grow(to: i + 1) }
        if state.pointee.pipes[i].stream == 0 {  // (kind and stream are unknown together)
            let type = Sys.fileType(fd)
            let fifo = type == Int32(Glibc.S_IFIFO)
            state.pointee.pipes[i].kind = fifo ? 1 : 2
            if fifo {
                let flags = Sys.statusFlags(fd)
                state.pointee.pipes[i].nonBlocking = flags >= 0 && flags & O_NONBLOCK != 0
            }
            // Every socket, datagram ones too: four receives parked on a UDP socket got its
            // datagrams in reverse. Files too, for their reads and writes at the file
            // position (offset nil; positional ones are never ordered): io_uring takes
            // f_pos when a read is issued and moves it when it completes, so reads of
            // uncached pages, punted to its workers together, all read the same bytes.
            let socket = type == Int32(Glibc.S_IFSOCK)
            let stream = fifo || socket || type == Int32(Glibc.S_IFREG) || type == Int32(Glibc.S_IFBLK)
            state.pointee.pipes[i].stream = stream ? 1 : 2
            state.pointee.pipes[i].socket = socket
        }
        return i
    }

    /// Uncounts a read or write of stream `fd` that was in the ring. False when it was not
    /// counted under the fd's current watch (not a stream, or the fd was forgotten since).
    private func uncount(_ fd: Int32, stamp: UInt32, write: Bool) -> Bool {
        let i = Int(fd)
        guard fd >= 0, i < state.pointee.pipes.count, state.pointee.pipes[i].generation == stamp else { return false }
        if write {
            guard state.pointee.pipes[i].writesInRing > 0 else { return false }
            state.pointee.pipes[i].writesInRing -= 1
        } else {
            guard state.pointee.pipes[i].readsInRing > 0 else { return false }
            state.pointee.pipes[i].readsInRing -= 1
        }
        return true
    }

    /// pwritev2(RWF_NOWAIT) of the view's bytes to pipe `fd` (write(2) if it is
    /// O_NONBLOCK): the result, or nil when the write must go to the ring (EAGAIN;
    /// EOPNOTSUPP, remembered; any other error, which the ring reports as it always did).
    /// EPIPE is the write's result.
    private func writeToPipeNow(_ fd: Int32, _ base: UnsafeMutableRawPointer?, _ length: Int) -> Int32? {
        guard !state.pointee.pipes[Int(fd)].noWaitRefused, !closeUnsubmitted else { return nil }
        plexus_block_sigpipe()  // a pipe without a reader raises SIGPIPE on this thread
        let result = state.pointee.pipes[Int(fd)].nonBlocking ? Sys.write(fd, base, length)
                                                               : Sys.writeNoWait(fd, base, length, -1)
        if result >= 0 { return Int32(result) }
        if result == -Int(EPIPE) { return -EPIPE }
        if result == -Int(EOPNOTSUPP) { state.pointee.pipes[Int(fd)].noWaitRefused = true }
        return nil
    }

    /// A stream write that went to the ring completed: the writes waiting behind it go on,
    /// in order: to a pipe at once while it takes them, then the next one to the ring.
    private func streamWriteDone(_ fd: Int32, stamp: UInt32) {
        guard uncount(fd, stamp: stamp, write: true) else { return }
        let i = Int(fd)
        while state.pointee.pipes[i].writesInRing == 0, !state.pointee.pipes[i].waitingWrites.isEmpty {
            let index = state.pointee.pipes[i].waitingWrites.removeOldest()
            let record = table.record(index)
            record.pointee.state = .prepared
            if record.pointee.kind == .write, state.pointee.pipes[i].kind == 1,
               case let source = record.pointee.transfer, let n = writeToPipeNow(fd, source.base, source.length) {
                immediate.append(Immediate(index, n))
                continue
            }
            countInRing(index, fd, write: true)
            prep(index)
        }
    }

    /// Parks a read of an empty pipe (or one behind parked reads) until the pipe's poll
    /// reports data, arming the poll if it is not. False: the read goes to the ring.
    /// The read's target (`base`, `length`) is kept in its scratch's iovec, unused by a read, for the
    /// preadv2 (read(2) if the pipe is O_NONBLOCK) that `pipeReport` runs: the buffer stays
    /// with the parked operation.
    private func parkOnPipe(_ index: Int, _ fd: Int32, _ base: UnsafeMutableRawPointer?, _ length: Int) -> Bool {
        let i = Int(fd)
        guard !state.pointee.noParking, fd >= 0, i < state.pointee.pipes.count, state.pointee.pipes[i].kind == 1,
              state.pointee.pipes[i].drained || !state.pointee.pipes[i].parked.isEmpty else { return false }
        if !state.pointee.pipes[i].armed {
            guard let sqe = sqe() else { return false }
            armPipePoll(sqe, fd)
        }
        table.scratch(index).pointee.vector = iovec(iov_base: base, iov_len: length)
        table.record(index).pointee.state = .awaitingPipe
        state.pointee.pipes[i].parked.append(index)
        state.pointee.statistics.wouldBlock &+= 1
        return true
    }

    private func armPipePoll(_ sqe: UnsafeMutablePointer<io_uring_sqe>, _ fd: Int32) {
        state.pointee.pipeArmings &+= 1
        let tag = (state.pointee.pipeArmings << 20) | UInt32(fd)
        io_uring_prep_poll_multishot(sqe, fd, UInt32(POLLIN))
        io_uring_sqe_set_data64(sqe, Token(index: Self.pipePollIndex, generation: tag).rawValue)
        state.pointee.pipes[Int(fd)].armed = true
        state.pointee.pipes[Int(fd)].tag = tag
    }

    /// A pipe poll's CQE: data (or the writer's end) is there, so the parked reads run now,
    /// oldest first, until one finds the pipe empty again.
    private func pipeReport(_ tag: UInt32, _ res: Int32, _ cqeFlags: UInt32,
                            _ body: (consuming Completion) -> Void) -> Int {
        let fd = Int32(tag & UInt32(Self.pipeFDLimit - 1))
        let i = Int(fd)
        guard i < state.pointee.pipes.count, state.pointee.pipes[i].armed, state.pointee.pipes[i].tag == tag else {
            return 0  // a poll this backend already gave up (closed, cancelled)
        }
        if cqeFlags & IORING_CQE_F_MORE == 0 { state.pointee.pipes[i].armed = false }
        if res < 0 {
            // The poll itself failed: the parked reads go to the ring, which reports why.
            state.pointee.pipes[i].drained = false
            requeuePipeReads(fd)
            return 0
        }
        state.pointee.pipes[i].drained = false
        var delivered = 0
        while let index = state.pointee.pipes[i].parked.first {
            let target = table.scratch(index).pointee.vector  // set by parkOnPipe
            let length = target.iov_len
            let result = Int32(truncatingIfNeeded: state.pointee.pipes[i].nonBlocking
                ? Sys.read(fd, target.iov_base, length) : Sys.readNoWait(fd, target.iov_base, length, -1))
            if result == -EAGAIN {
                state.pointee.pipes[i].drained = true
                break
            }
            if result == -EOPNOTSUPP || result == -EINVAL {
                // RWF_NOWAIT refused here: this pipe's reads stay on the ring.
                state.pointee.pipes[i].kind = 2
                requeuePipeReads(fd)
                return delivered
            }
            _ = state.pointee.pipes[i].parked.removeOldest()
            // A short read suggests the pipe is empty, but the next parked read still
            // tries: at end of file every read gets its 0 now, and the writer's close
            // woke the poll only once (it meets EAGAIN, above, when the pipe is empty).
            state.pointee.pipes[i].drained = result > 0 && Int(result) < length
            delivered += finish(index, result: result, flags: [], body)
        }
        resumeWaitingReads(fd)
        if !state.pointee.pipes[i].parked.isEmpty && !state.pointee.pipes[i].armed {
            // The kernel ended the poll (CQ overflow; or this fd number is no pipe any
            // more, whose poll reports once): what still waits goes to the ring, so an
            // fd that is never pollable cannot keep re-arming; a later short read arms anew.
            requeuePipeReads(fd)
        }
        return delivered
    }

    /// Starts what waited behind the parked reads of `fd` once none is left parked.
    private func resumeWaitingReads(_ fd: Int32) {
        let i = Int(fd)
        guard i < state.pointee.pipes.count, state.pointee.pipes[i].parked.isEmpty,
              !state.pointee.pipes[i].waitingReads.isEmpty else { return }
        startWaitingReads(fd, parking: true)
    }

    /// Sends the parked reads of `fd` to the ring as ordinary reads.
    private func requeuePipeReads(_ fd: Int32) {
        let parked = state.pointee.pipes[Int(fd)].parked
        state.pointee.pipes[Int(fd)].parked.removeAll()
        // Oldest first, and one at a time, like any stream read.
        state.pointee.pipes[Int(fd)].waitingReads.insert(contentsOf: parked, at: 0)
        startWaitingReads(fd, parking: false)
    }

    /// Ends the parked reads, waiting reads and waiting writes of `fd` that `matching` picks
    /// with `result`.
    private func endWaitingOperations(on fd: Int32, result: Int32, _ matching: (Int) -> Bool) {
        let i = Int(fd)
        guard fd >= 0, i < state.pointee.pipes.count else { return }
        state.pointee.pipes[i].parked = endMatching(state.pointee.pipes[i].parked, result, matching)
        state.pointee.pipes[i].waitingWrites = endMatching(state.pointee.pipes[i].waitingWrites, result, matching)
        state.pointee.pipes[i].waitingReads = endMatching(state.pointee.pipes[i].waitingReads, result, matching)
        resumeWaitingReads(fd)
    }

    /// Ends the records of `waiting` that `matching` picks with `result`; returns the rest.
    private func endMatching(_ waiting: [Int], _ result: Int32, _ matching: (Int) -> Bool) -> [Int] {
        guard !waiting.isEmpty else { return waiting }
        var kept: [Int] = []
        for index in waiting {
            if matching(index) {
                table.record(index).pointee.state = .prepared  // never in the ring: not counted
                immediate.append(Immediate(index, result))
            } else {
                kept.append(index)
            }
        }
        return kept
    }

    /// A new fd (accepted or opened) has number `fd`: what was known of a former fd of
    /// that number, closed outside Plexus, no longer holds (a cached O_NONBLOCK would let
    /// read(2) or write(2) block the loop). Operations still waiting under the former one
    /// end with EBADF, as the readiness backends end theirs.
    private func forgetFormer(_ fd: Int32) {
        forgetPositional(fd)
        guard Int(fd) < state.pointee.pipes.count, state.pointee.pipes[Int(fd)].stream != 0 else { return }
        endWaitingOperations(on: fd, result: -EBADF) { _ in true }
        forgetPipe(fd)
    }

    /// Forgets what was known of fd number `fd` (closed; the number may come back as
    /// anything). An armed poll's late CQE no longer matches and is dropped.
    private func forgetPipe(_ fd: Int32) {
        guard fd >= 0, Int(fd) < state.pointee.pipes.count else { return }
        state.pointee.pipeGenerations &+= 1
        var fresh = PipeWatch()
        fresh.generation = state.pointee.pipeGenerations
        state.pointee.pipes[Int(fd)] = fresh
    }

    /// Counts record `index` as the read or write of stream `fd` in the ring (it goes there
    /// now or from the backlog); `finish` uncounts it, if the fd was not forgotten since.
    private func countInRing(_ index: Int, _ fd: Int32, write: Bool) {
        let record = table.record(index)
        record.pointee.state = .inFlight
        record.pointee.next = state.pointee.pipes[Int(fd)].generation
        if write { state.pointee.pipes[Int(fd)].writesInRing += 1 } else { state.pointee.pipes[Int(fd)].readsInRing += 1 }
    }

    private func forgetPositional(_ fd: Int32) {
        if Int(fd) < state.pointee.positional.count { state.pointee.positional[Int(fd)] = 0 }
    }

    private static func writes(_ kind: OperationKind) -> Bool {
        kind == .write || kind == .writev || kind == .send || kind == .sendMessage
    }
}
