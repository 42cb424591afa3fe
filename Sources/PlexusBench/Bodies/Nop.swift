import CPlexus
import Glibc
import Plexus

// NOP submit/complete, `batch` NOPs per submission (nop-1, nop-32).
//
// Plexus:
//   raw       `batch` × backend.prepare(.nop), then backend.wait until `batch` completions.
//   callback  `batch` × loop.nop { }, then loop.runOnce until every callback ran.
// Baselines (the least the mechanism must do for a NOP):
//   raw-io_uring  `batch` × io_uring_prep_nop, one io_uring_submit_and_wait(batch), reap.
//   raw-epoll     a readiness loop has no NOP syscall: a NOP is an entry in its ready queue
//                 (`RawReadyQueue`), completed by the loop's next turn, which hands each
//                 entry to a closure in order, as raw-io_uring hands each CQE to one. Its
//                 epoll set holds one idle eventfd (like a loop's wake-up fd), which the turn
//                 must not starve: with entries queued it skips the zero-timeout epoll_wait
//                 but makes it every 8th turn, the policy the readiness engine follows
//                 (`pollsSkippable`). A baseline that waited every turn measured the policy,
//                 not the layers: Plexus, skipping 7 of 8, ran at 1.35x (epoll) and 1.95x
//                 (poll) of it on nop-1.
//   raw-poll      the same with a zero-timeout poll on that one fd.
// Checked: every NOP completes exactly once, with result 0.

func makeNopBody(_ c: BenchmarkCase, batch: Int) throws -> BenchmarkBody {
    switch (c.backend, c.adapter) {
    case (.rawIoUring, _): return try RawURingNop(batch: batch)
    case (.rawEpoll, _): return try RawReadinessNop(batch: batch, epoll: true)
    case (.rawPoll, _): return try RawReadinessNop(batch: batch, epoll: false)
    case (_, .raw): return BackendNop(backend: try startBackend(c.backend), batch: batch)
    default: return try LoopNop(choice: c.backend.choice!, batch: batch)
    }
}

final class RawURingNop: BenchmarkBody {
    let ring: RawRing
    let batch: Int
    @exclusivity(unchecked) var submitted = 0
    @exclusivity(unchecked) var completed = 0
    @exclusivity(unchecked) var bad = 0

    init(batch: Int) throws {
        ring = try RawRing()
        self.batch = batch
    }

    func step() throws -> Int {
        for _ in 0..<batch {
            let sqe = ring.sqe()
            io_uring_prep_nop(sqe)
            io_uring_sqe_set_data64(sqe, 1)
        }
        submitted += batch
        try ring.submitAndWait(UInt32(batch))
        var n = 0
        while n < batch {
            n += ring.reap { _, res in if res != 0 { bad += 1 } }
            if n < batch { try ring.submitAndWait(1) }
        }
        completed += n
        return n
    }

    func finish() throws {
        if bad > 0 || completed != submitted { throw BenchmarkError.wrong("\(completed)/\(submitted) NOPs, \(bad) failed") }
    }
}

final class RawReadinessNop: BenchmarkBody {
    let batch: Int
    let idleFD: Int32
    let epoll: RawEpoll?
    let poll: RawPoll?
    let ready: RawReadyQueue
    @exclusivity(unchecked) var submitted = 0
    @exclusivity(unchecked) var completed = 0
    @exclusivity(unchecked) var bad = 0
    /// Turns since the last zero-timeout wait.
    @exclusivity(unchecked) var skippedWaits = 0

    init(batch: Int, epoll useEpoll: Bool) throws {
        self.batch = batch
        ready = RawReadyQueue(capacity: batch)
        idleFD = try makeEventFD(nonBlocking: true)
        if useEpoll {
            epoll = try RawEpoll()
            poll = nil
            try epoll!.add(idleFD, data: 0)
        } else {
            epoll = nil
            poll = RawPoll(capacity: 1)
            poll!.add(idleFD)
        }
    }

    func step() throws -> Int {
        for i in 0..<batch { ready.push(UInt64(i), 0) }
        submitted += batch
        if skippedWaits < 7 {
            skippedWaits += 1
        } else {
            skippedWaits = 0
            let events = try epoll?.wait(timeoutNanoseconds: 0) ?? poll!.wait(timeoutNanoseconds: 0)
            if events != 0 { throw BenchmarkError.wrong("the idle eventfd became ready") }
        }
        // The turn completes the queue.
        let n = ready.drain { _, result in if result != 0 { bad += 1 } }
        completed += n
        return n
    }

    func finish() throws {
        Glibc.close(idleFD)
        if bad > 0 || completed != submitted { throw BenchmarkError.wrong("\(completed)/\(submitted) NOPs, \(bad) failed") }
    }
}

final class BackendNop: BenchmarkBody {
    let backend: any IOBackend
    let batch: Int
    @exclusivity(unchecked) var submitted = 0
    @exclusivity(unchecked) var completed = 0
    @exclusivity(unchecked) var bad = 0

    init(backend: any IOBackend, batch: Int) {
        self.backend = backend
        self.batch = batch
    }

    func step() throws -> Int {
        for _ in 0..<batch { _ = backend.prepare(.nop) }
        submitted += batch
        var n = 0
        while n < batch {
            try backend.wait(timeout: nil) { completion in
                if completion.result != 0 || completion.kind != .nop { bad += 1 }
                n += 1
            }
        }
        completed += n
        return n
    }

    func finish() throws {
        let pending = backend.pendingCount
        if bad > 0 || completed != submitted || pending != 0 {
            throw BenchmarkError.wrong("\(completed)/\(submitted) NOPs, \(bad) failed, \(pending) pending")
        }
    }
}

final class LoopNop: BenchmarkBody {
    let loop: EventLoop
    let batch: Int
    @exclusivity(unchecked) var submitted = 0
    @exclusivity(unchecked) var completed = 0
    @exclusivity(unchecked) var bad = 0

    init(choice: BackendChoice, batch: Int) throws {
        loop = try EventLoop(backend: choice)
        self.batch = batch
    }

    @inline(__always)
    func done(_ result: Result<Int, PlexusError>) {
        if case .success(0) = result {} else { bad += 1 }
        completed += 1
    }

    func step() throws -> Int {
        let target = completed + batch
        for _ in 0..<batch {
            loop.nop { [self] result in done(result) }  // captures one reference: no allocation
        }
        submitted += batch
        while completed < target { loop.runOnce(timeout: nil) }
        return batch
    }

    func finish() throws {
        loop.shutdown()
        loop.run()
        if bad > 0 || completed != submitted { throw BenchmarkError.wrong("\(completed)/\(submitted) NOPs, \(bad) failed") }
    }
}
