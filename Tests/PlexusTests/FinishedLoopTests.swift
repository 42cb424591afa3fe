import CPlexus
import Glibc
import Synchronization
import SystemPackage
import Testing
@testable import Plexus

extension PlexusTests {
/// Work that reaches a loop after its `run()` returned, on every backend: it ends, on a
/// thread Plexus starts for it (`OrphanJobs`), and nothing hangs, spins or grows. Every
/// wait here is bounded, so a regression fails instead of hanging the suite.
@Suite struct FinishedLoopTests {

    /// A task whose executor is the loop, suspended elsewhere (Task.sleep) while the loop
    /// shuts down, still runs to its end once it resumes: its loop operation then fails
    /// with ECANCELED. Before, its job was queued on the finished loop, which never ran
    /// it: the task hung, and kept the loop and its fds alive.
    @Test(arguments: Backends.kinds)
    func aTaskResumedAfterItsLoopFinishedRunsToItsEnd(_ kind: BackendKind) async throws {
        let loop = try Backends.loopThread(kind)
        let started = Semaphore()
        let ended = Countdown(1)
        let task = Task(executorPreference: loop) { () -> Errno? in
            started.signal()
            try? await Task.sleep(for: .milliseconds(50))
            defer { ended.done() }
            do {
                _ = try await loop.nop()
                return nil
            } catch {
                return (error as? PlexusError)?.errno
            }
        }
        started.wait()
        loop.shutdownAndWait()
        try #require(await ended.wait(seconds: 5), "\(kind): the task never resumed")
        #expect(await task.value == .canceled, "\(kind)")
        try await Self.expectIdle(loop, kind)
    }

    /// Calls of an actor pinned to a finished loop run, each job alone: eight callers,
    /// each call three synchronous sections apart by yields, and no section overlaps
    /// another (the actor counts it). Its loop operations throw ECANCELED.
    @Test(arguments: Backends.kinds)
    func anActorPinnedToAFinishedLoopRunsOneJobAtATime(_ kind: BackendKind) async throws {
        let loop = try Backends.loopThread(kind)
        loop.shutdownAndWait()
        let actor = SectionCounter(loop)
        let calls = Countdown(8)
        let callers = (0..<8).map { i in
            // Half prefer the finished loop as their executor, half do not.
            Task(executorPreference: i % 2 == 0 ? loop : nil) { () -> Bool in
                defer { calls.done() }
                return await actor.sectionsThenNop()
            }
        }
        try #require(await calls.wait(seconds: 5), "\(kind): an actor call never ran")
        for caller in callers { #expect(await caller.value, "\(kind): a NOP did not throw ECANCELED") }
        #expect(actor.overlaps.load(ordering: .sequentiallyConsistent) == 0, "\(kind): two jobs of the actor ran at once")
        #expect(actor.sections.load(ordering: .sequentiallyConsistent) == 24, "\(kind)")
        try await Self.expectIdle(loop, kind)
    }

    /// `receives` and `connections` end when their loop shuts down: iterated after it
    /// finished (`waiting` false), or waiting in `next()` when it shuts down (true).
    /// Before, iterated after, their `next()` hopped to the loop, which ran it on the
    /// orphaned jobs' thread, off the loop, where it hopped again: without end, about
    /// 400 MB a second. Waiting, the accept stream took the shutdown's ECANCELED for its
    /// own pause and armed again, each time cancelled again, until the shutdown gave up
    /// after 10000 rounds ("callbacks keep submitting during shutdown") and left it waiting.
    @Test(arguments: Backends.kinds, [false, true])
    func sequencesEndWhenTheLoopShutsDown(_ kind: BackendKind, waiting: Bool) async throws {
        let loop = try Backends.loopThread(kind)
        let errors = Box<[String]>([])
        _ = await Task(executorPreference: loop) { loop.errorHandler = { errors.value.append("\($0)") } }.value
        var fds: [Int32] = [-1, -1]
        #expect(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue | SOCK_CLOEXEC.rawValue | SOCK_NONBLOCK.rawValue), 0, &fds) == 0)
        defer { Glibc.close(fds[0]); Glibc.close(fds[1]) }
        let socketEnd = FileDescriptor(rawValue: fds[0])
        let listener = try LoopTestSupport.listener()
        defer { Glibc.close(listener.fd) }
        let listening = FileDescriptor(rawValue: listener.fd)
        if !waiting { loop.shutdownAndWait() }
        let started = Countdown(2)
        let ended = Countdown(2)
        // One task prefers the loop as its executor, the other does not.
        let receiving = Task { () -> Int in
            defer { ended.done() }
            var chunks = 0
            started.done()
            do { for try await _ in loop.receives(socketEnd) { chunks += 1 } } catch {}
            return chunks
        }
        let accepting = Task(executorPreference: loop) { () -> Int in
            defer { ended.done() }
            var accepted = 0
            started.done()
            do { for try await _ in loop.connections(listening) { accepted += 1 } } catch {}
            return accepted
        }
        if waiting {
            try #require(await started.wait(seconds: 5))
            try await Task.sleep(for: .milliseconds(20))  // both iterators are parked in next()
            loop.shutdownAndWait()
        }
        try #require(await ended.wait(seconds: 5), "\(kind), waiting \(waiting): a sequence did not end")
        #expect(await receiving.value == 0)
        #expect(await accepting.value == 0)
        #expect(errors.value.isEmpty, "\(kind): \(errors.value)")
        try await Self.expectIdle(loop, kind)
    }

    /// An actor and a task calling each other on a finished loop never let the orphaned
    /// jobs run out, and the queue still stays the size of one batch. Before, it kept
    /// every job it had run: a million calls took 35 MB.
    @Test(arguments: Backends.kinds)
    func theOrphanedJobsQueueStaysBounded(_ kind: BackendKind) async throws {
        let loop = try Backends.loopThread(kind)
        loop.shutdownAndWait()
        let actor = SectionCounter(loop)
        let calls = 20_000
        let done = Countdown(1)
        let task = Task(executorPreference: loop) { () -> Int in
            defer { done.done() }
            var largest = 0  // the queue's capacity, looked at while the jobs run
            for i in 0..<calls {
                await actor.touch()
                if i % 1000 == 0 { largest = max(largest, loop.orphans.capacity) }
            }
            return largest
        }
        try #require(await done.wait(seconds: 20), "\(kind): \(calls) actor calls on a finished loop did not end")
        let largest = await task.value
        #expect(actor.sections.load(ordering: .sequentiallyConsistent) == calls)
        #expect(largest <= 64, "\(kind): the queue grew to hold \(largest) jobs")
        try await Self.expectIdle(loop, kind)
    }

    /// A task that keeps yielding through the shutdown ends once it stops. Before, the
    /// shutdown spun 10000 rounds on its jobs, reported "callbacks keep submitting during
    /// shutdown", and dropped the last one: the task never ended and kept the loop's fds.
    @Test(arguments: Backends.kinds)
    func aTaskYieldingThroughTheShutdownEnds(_ kind: BackendKind) async throws {
        let loop = try Backends.loopThread(kind)
        let errors = Box<[String]>([])
        _ = await Task(executorPreference: loop) { loop.errorHandler = { errors.value.append("\($0)") } }.value
        let stop = Atomic<Bool>(false)
        let started = Countdown(1), ended = Countdown(1)
        let spinner = Task(executorPreference: loop) {
            started.done()
            while !stop.load(ordering: .sequentiallyConsistent) { await Task.yield() }
            ended.done()
        }
        try #require(await started.wait(seconds: 5))
        loop.shutdownAndWait()
        stop.store(true, ordering: .sequentiallyConsistent)
        try #require(await ended.wait(seconds: 5), "\(kind): the yielding task never ended")
        await spinner.value
        #expect(errors.value.isEmpty, "\(kind): \(errors.value)")
        try await Self.expectIdle(loop, kind)
    }

    /// A callback consumer that attaches to a message queue while the loop shuts down
    /// (from a task the shutdown's cancel resumed) still gets the queued messages and
    /// its onClosed. Before, its request for a turn came after the shutdown's last drain
    /// and was dropped: nothing delivered, onClosed never called.
    @Test(arguments: Backends.kinds)
    func aConsumerAttachingDuringTheShutdownGetsTheEnd(_ kind: BackendKind) async throws {
        let loop = try Backends.loopThread(kind)
        let queue = MessageQueue<Int>(capacity: 4, loop: loop)
        for i in 1...3 { #expect(queue.trySend(i).isSent) }
        let got = Box<[Int]>([])
        let closed = Countdown(1)
        let parked = Countdown(1)
        var fds: [Int32] = [-1, -1]
        #expect(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue | SOCK_CLOEXEC.rawValue | SOCK_NONBLOCK.rawValue), 0, &fds) == 0)
        defer { Glibc.close(fds[0]); Glibc.close(fds[1]) }
        let readEnd = FileDescriptor(rawValue: fds[0])
        let task = Task(executorPreference: loop) {
            parked.done()
            do { _ = try await loop.read(readEnd, into: IOBuffer(capacity: 16)) } catch {}  // the shutdown cancels it
            queue.onMessage({ got.value.append($0) }, onClosed: { closed.done() })
        }
        try #require(await parked.wait(seconds: 5))
        try await Task.sleep(for: .milliseconds(20))  // the read waits
        loop.shutdownAndWait()
        await task.value
        #expect(await closed.wait(seconds: 5), "\(kind): onClosed never ran")
        #expect(got.value == [1, 2, 3], "\(kind)")
        #expect(queue.close().isEmpty)
        try await Self.expectIdle(loop, kind)
    }

    /// A callback consumer attaching to a queue whose loop has finished gets what is left
    /// and its onClosed at once, before `onMessage` returns. Before, its request for a turn
    /// was refused by the finished loop and dropped: nothing delivered, onClosed never called.
    @Test(arguments: Backends.kinds)
    func aConsumerAttachingAfterTheLoopFinishedGetsTheRestAndTheEnd(_ kind: BackendKind) async throws {
        let loop = try Backends.loopThread(kind)
        let queue = MessageQueue<Int>(capacity: 4, loop: loop)
        for i in 1...3 { #expect(queue.trySend(i).isSent) }
        loop.shutdownAndWait()
        #expect(queue.isClosed, "\(kind): the shutdown closes the queue")
        let got = Box<[Int]>([])
        let ended = Box(false)
        queue.onMessage({ got.value.append($0) }, onClosed: { ended.value = true })
        #expect(got.value == [1, 2, 3], "\(kind)")
        #expect(ended.value, "\(kind): onClosed never ran")
        #expect(queue.close().isEmpty)
        try await Self.expectIdle(loop, kind)
    }

    /// shutdownAndWait() on the loop's own thread would wait for itself forever: it stops
    /// the process with a message instead (run in a child process).
    @Test func shutdownAndWaitOnTheLoopThreadStopsWithAMessage() async {
        await #expect(processExitsWith: .failure) {
            let loop = try EventLoop.startThread(name: "plexus-exit-test")
            loop.execute { loop.shutdownAndWait() }
            sleep(10)  // the child ends long before: the precondition stops it
        }
    }

    /// Waits until no thread of the loop's orphaned jobs holds the loop, so the loop's
    /// fds close when the test drops it (the suite's fd check runs after each test).
    static func expectIdle(_ loop: EventLoop, _ kind: BackendKind) async throws {
        for _ in 0..<500 where !loop.orphans.isIdle { try await Task.sleep(for: .milliseconds(10)) }
        #expect(loop.orphans.isIdle, "\(kind): the orphaned jobs' thread still holds the loop")
    }
}
}

/// An actor on a loop's serial executor that counts its synchronous sections and any
/// two that overlap: jobs of one actor must never run at once.
actor SectionCounter {
    let loop: EventLoop
    nonisolated let sections = Atomic<Int>(0)
    nonisolated let overlaps = Atomic<Int>(0)
    private nonisolated let inside = Atomic<Bool>(false)
    init(_ loop: EventLoop) { self.loop = loop }
    nonisolated var unownedExecutor: UnownedSerialExecutor { loop.asUnownedSerialExecutor() }

    /// One synchronous section: marks itself inside, spins 20 us, leaves.
    private func section() {
        if inside.exchange(true, ordering: .sequentiallyConsistent) { overlaps.add(1, ordering: .sequentiallyConsistent) }
        let end = Deadline.now + .microseconds(20)
        while Deadline.now < end {}
        inside.store(false, ordering: .sequentiallyConsistent)
        sections.add(1, ordering: .sequentiallyConsistent)
    }

    /// Three sections with a yield between each (other calls run there), then a loop NOP:
    /// true when the NOP threw ECANCELED.
    func sectionsThenNop() async -> Bool {
        for i in 0..<3 {
            if i > 0 { await Task.yield() }
            section()
        }
        do {
            _ = try await loop.nop()
            return false
        } catch {
            return (error as? PlexusError)?.errno == .canceled
        }
    }

    /// A call that only counts.
    func touch() { sections.add(1, ordering: .relaxed) }
}

/// Counts `done()` calls down from `count`; `wait` gives up after a while instead of
/// hanging, and sleeps between looks instead of blocking its thread.
final class Countdown: Sendable {
    private let left: Atomic<Int>
    init(_ count: Int) { left = Atomic(count) }
    func done() { left.subtract(1, ordering: .sequentiallyConsistent) }
    /// True once every `done()` came, false after `seconds` without.
    func wait(seconds: Int) async -> Bool {
        for _ in 0..<seconds * 100 {
            if left.load(ordering: .sequentiallyConsistent) <= 0 { return true }
            try? await Task.sleep(for: .milliseconds(10))
        }
        return left.load(ordering: .sequentiallyConsistent) <= 0
    }
}
