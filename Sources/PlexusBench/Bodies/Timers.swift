import CPlexus
import Glibc
import Plexus

// Timer schedule/fire/cancel churn. One step is one turn of the loop with 64 timer
// operations: 32 timers scheduled due now and 32 scheduled an hour out, the far 32
// cancelled, then one turn fires the 32 due ones (in scheduling order) and waits with a
// zero timeout. 64 operations per step: 32 fired + 32 cancelled.
//
// Plexus:
//   callback  loop.schedule(after: .zero / .seconds(3600)) { event in }, loop.cancel(handle),
//             loop.runOnce(timeout: .zero). Each callback captures one preallocated probe
//             object (one reference: the closure needs no allocation).
//   raw       no body: the backend layer has no timer heap (IORING_OP_TIMEOUT per timer
//             is a different thing); `async` (loop.sleep) lands with issue 4.
// Baselines: the least a loop must do for the same churn: a binary heap of (deadline,
// sequence, slot) on preallocated memory, a generation per slot for cancel, a clock read
// per schedule and per turn, plain counters instead of callbacks, and the mechanism's
// zero-timeout wait once per turn:
//   raw-io_uring  io_uring_submit_and_get_events
//   raw-epoll     epoll_wait with a zero timeout (one idle eventfd in the set)
//   raw-poll      poll with a zero timeout on that eventfd
// Checked: every turn fires exactly the 32 due timers in the order they were scheduled,
// and cancels exactly the 32 others, each once.

let timersPerTurn = 64

func makeTimerBody(_ c: BenchmarkCase) throws -> BenchmarkBody? {
    switch c.backend {
    case .rawIoUring, .rawEpoll, .rawPoll: return try RawTimers(c.backend.mechanism)
    default: return c.adapter == .callback ? try LoopTimers(choice: c.backend.choice!) : nil
    }
}

/// Counts firings and cancellations and checks the firing order.
final class TimerTally {
    var fired = 0
    var cancelled = 0
    var nextExpected = 0
    var outOfOrder = 0

    @inline(__always)
    func fire(_ index: Int) {
        if index != nextExpected { outOfOrder += 1 }
        nextExpected = index + 2
        fired += 1
    }

    func checkTurn(firedBefore: Int, cancelledBefore: Int) throws {
        let half = timersPerTurn / 2
        guard fired - firedBefore == half, cancelled - cancelledBefore == half, outOfOrder == 0 else {
            throw BenchmarkError.wrong("turn fired \(fired - firedBefore) and cancelled \(cancelled - cancelledBefore) of \(half) + \(half), \(outOfOrder) out of order")
        }
    }
}

final class TimerProbe {
    let index: Int
    let tally: TimerTally
    init(index: Int, tally: TimerTally) {
        self.index = index
        self.tally = tally
    }

    @inline(__always)
    func handle(_ event: TimerEvent) {
        if event == .fired { tally.fire(index) } else { tally.cancelled += 1 }
    }
}

final class LoopTimers: BenchmarkBody {
    let loop: EventLoop
    let tally = TimerTally()
    let probes: [TimerProbe]
    let handles: UnsafeMutablePointer<TimerHandle>

    init(choice: BackendChoice) throws {
        loop = try EventLoop(backend: choice)
        probes = (0..<timersPerTurn).map { [tally] in TimerProbe(index: $0, tally: tally) }
        handles = .allocate(capacity: timersPerTurn / 2)
    }

    deinit { handles.deallocate() }

    func step() throws -> Int {
        let firedBefore = tally.fired
        let cancelledBefore = tally.cancelled
        tally.nextExpected = 0
        for i in 0..<timersPerTurn {
            let probe = probes[i]
            if i & 1 == 0 {
                loop.schedule(after: .zero) { [probe] event in probe.handle(event) }
            } else {
                handles[i >> 1] = loop.schedule(after: .seconds(3600)) { [probe] event in probe.handle(event) }
            }
        }
        for i in 0..<timersPerTurn / 2 { loop.cancel(handles[i]) }
        loop.runOnce(timeout: .zero)
        while tally.fired - firedBefore < timersPerTurn / 2 { loop.runOnce(timeout: .zero) }
        try tally.checkTurn(firedBefore: firedBefore, cancelledBefore: cancelledBefore)
        return timersPerTurn
    }

    func finish() throws {
        let pending = loop.pendingTimers
        loop.shutdown()
        loop.run()
        if pending != 0 { throw BenchmarkError.wrong("\(pending) timers still pending") }
    }
}

final class RawTimers: BenchmarkBody {
    struct Entry {
        var deadline: UInt64
        var sequence: UInt64
        var slot: Int32
        var generation: UInt32
        @inline(__always)
        static func < (a: Entry, b: Entry) -> Bool {
            a.deadline != b.deadline ? a.deadline < b.deadline : a.sequence < b.sequence
        }
    }

    let mechanism: Mechanism
    let heap: UnsafeMutablePointer<Entry>
    var heapCount = 0
    let generations: UnsafeMutablePointer<UInt32>
    let live: UnsafeMutablePointer<Bool>
    var sequence: UInt64 = 0
    let tally = TimerTally()
    let ring: RawRing?
    let epoll: RawEpoll?
    let poll: RawPoll?
    let idleFD: Int32

    init(_ mechanism: Mechanism) throws {
        self.mechanism = mechanism
        heap = .allocate(capacity: timersPerTurn * 2)
        generations = .allocate(capacity: timersPerTurn)
        generations.initialize(repeating: 0, count: timersPerTurn)
        live = .allocate(capacity: timersPerTurn)
        live.initialize(repeating: false, count: timersPerTurn)
        idleFD = try makeEventFD(nonBlocking: true)
        ring = mechanism == .ioUring ? try RawRing() : nil
        epoll = mechanism == .epoll ? try RawEpoll() : nil
        try epoll?.add(idleFD, data: 0)
        poll = mechanism == .poll ? RawPoll(capacity: 1) : nil
        poll?.add(idleFD)
    }

    deinit {
        heap.deallocate()
        generations.deallocate()
        live.deallocate()
        Glibc.close(idleFD)
    }

    @inline(__always)
    private func push(_ e: Entry) {
        var i = heapCount
        heapCount += 1
        while i > 0 {
            let parent = (i - 1) >> 1
            if !(e < heap[parent]) { break }
            heap[i] = heap[parent]
            i = parent
        }
        heap[i] = e
    }

    @inline(__always)
    private func popMin() {
        heapCount -= 1
        let last = heap[heapCount]
        var i = 0
        while true {
            var child = 2 * i + 1
            if child >= heapCount { break }
            if child + 1 < heapCount && heap[child + 1] < heap[child] { child += 1 }
            if !(heap[child] < last) { break }
            heap[i] = heap[child]
            i = child
        }
        if heapCount > 0 { heap[i] = last }
    }

    @inline(__always)
    private func isLive(_ e: Entry) -> Bool {
        live[Int(e.slot)] && generations[Int(e.slot)] == e.generation
    }

    func step() throws -> Int {
        let firedBefore = tally.fired
        let cancelledBefore = tally.cancelled
        tally.nextExpected = 0
        for i in 0..<timersPerTurn {
            let delay: UInt64 = i & 1 == 0 ? 0 : 3_600_000_000_000
            sequence &+= 1
            live[i] = true
            push(Entry(deadline: monotonicNanoseconds() &+ delay, sequence: sequence, slot: Int32(i), generation: generations[i]))
        }
        for i in stride(from: 1, to: timersPerTurn, by: 2) {  // cancel: the slot's generation moves on
            live[i] = false
            generations[i] &+= 1
            tally.cancelled += 1
        }
        // The turn: fire what is due, drop cancelled entries at the top, wait with zero timeout.
        let now = monotonicNanoseconds()
        while heapCount > 0 {
            let top = heap[0]
            if isLive(top) {
                if top.deadline > now { break }
                popMin()
                live[Int(top.slot)] = false
                generations[Int(top.slot)] &+= 1
                tally.fire(Int(top.slot))
            } else {
                popMin()
            }
        }
        switch mechanism {
        case .ioUring:
            try ring!.submitAndPoll()
            _ = ring!.reap { _, _ in }
        case .epoll: _ = try epoll!.wait(timeoutNanoseconds: 0)
        case .poll: _ = try poll!.wait(timeoutNanoseconds: 0)
        }
        try tally.checkTurn(firedBefore: firedBefore, cancelledBefore: cancelledBefore)
        return timersPerTurn
    }

    func finish() throws {
        if heapCount != 0 { throw BenchmarkError.wrong("\(heapCount) timers left in the heap") }
    }
}
