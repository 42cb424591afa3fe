import CPlexus
import CPlexusMallocCounter
import Foundation
import Glibc
@testable import Plexus
import Synchronization
import SystemPackage
import Testing

/// Threads of this process whose name starts with `prefix` (/proc/self/task/*/comm).
func threadCount(named prefix: String) -> Int {
    guard let dir = opendir("/proc/self/task") else { return -1 }
    defer { closedir(dir) }
    var n = 0
    while let entry = readdir(dir) {
        let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in
            String(decoding: raw.prefix { $0 != 0 }, as: UTF8.self)
        }
        guard Int(name) != nil else { continue }
        if readWholeFile("/proc/self/task/\(name)/comm").hasPrefix(prefix) { n += 1 }
    }
    return n
}

/// EventLoopGroup, backend selection and PLEXUS_BACKEND parsing: real loops, real threads,
/// real fds, on every backend of the run.
extension PlexusTests {
    @Suite struct GroupSelectionTests {
        // MARK: Helpers

        /// Waits up to `seconds` for `condition`.
        static func eventually(within seconds: Double = 5, _ condition: () -> Bool) -> Bool {
            let end = ContinuousClock.now + .milliseconds(Int(seconds * 1000))
            while ContinuousClock.now < end {
                if condition() { return true }
                usleep(2000)
            }
            return condition()
        }

        /// Runs `body` on its own thread; true when it returned within `seconds`. The thread
        /// lets go of `body` (and what it captured: a group, its loops) before it says so,
        /// not when the thread ends, which may be after the test and its fd check.
        static func returns(within seconds: Double, _ body: @escaping @Sendable () -> Void) -> Bool {
            let box = DoneBox(body)
            Thread { box.run() }.start()
            return eventually(within: seconds) { box.done.load(ordering: .acquiring) }
        }

        final class Counter: Sendable {
            let value = Atomic<Int>(0)
        }

        final class DoneBox: @unchecked Sendable {
            let done = Atomic<Bool>(false)
            /// Set at init, run and dropped by the one thread that calls `run`.
            private var body: (@Sendable () -> Void)?
            init(_ body: @escaping @Sendable () -> Void) { self.body = body }
            func run() {
                body?()
                body = nil
                done.store(true, ordering: .releasing)
            }
        }

        static func choice(_ kind: BackendKind) -> BackendChoice { BackendChoice(rawValue: kind.rawValue)! }

        static func group(_ kind: BackendKind, loops: Int) throws -> EventLoopGroup {
            _ = try Backends.start(kind)  // skips or fails with the reason
            let g = try EventLoopGroup(loops: loops, backend: choice(kind))
            for loop in g.loops { #expect(loop.backendKind == kind) }
            return g
        }

        // MARK: next()

        /// next() is exact round robin from one thread, and from four threads at once each
        /// loop is handed out the same number of times.
        @Test(arguments: Backends.kinds)
        func nextIsExactRoundRobin(kind: BackendKind) throws {
            let g = try Self.group(kind, loops: 3)
            defer { g.shutdownAndWait() }
            #expect(g.loops.count == 3)
            #expect(Set(g.loops.map { ObjectIdentifier($0) }).count == 3, "three distinct loops")
            for i in 0..<9 { #expect(g.next() === g.loops[i % 3]) }
            let counts = Locked<[ObjectIdentifier: Int]>([:])
            let threads = 4, per = 3000
            let finished = Atomic<Int>(0)
            for _ in 0..<threads {
                Thread {
                    var local: [ObjectIdentifier: Int] = [:]
                    for _ in 0..<per { local[ObjectIdentifier(g.next()), default: 0] += 1 }
                    counts.withLock { all in for (k, v) in local { all[k, default: 0] += v } }
                    finished.add(1, ordering: .releasing)
                }.start()
            }
            #expect(Self.eventually(within: 20) { finished.load(ordering: .acquiring) == threads })
            let got = counts.withLock { $0 }
            #expect(got.count == 3)
            #expect(got.values.allSatisfy { $0 == threads * per / 3 }, "\(got.values.sorted())")
        }

        /// The cursor is an Int that wraps. Once failed: after Int.max calls,
        /// `oldValue % loops.count` was negative and next() trapped on the array index.
        @Test(arguments: Backends.kinds)
        func nextSurvivesTheCursorWrappingAround(kind: BackendKind) throws {
            let g = try Self.group(kind, loops: 3)
            defer { g.shutdownAndWait() }
            g.cursor.store(Int.max - 1, ordering: .relaxed)
            let seen = (0..<6).map { _ in ObjectIdentifier(g.next()) }  // crosses Int.max -> Int.min
            #expect(Set(seen).count == 3, "still a rotation over all three loops")
        }

        /// The default count follows the CPU affinity (taskset, cpusets). Once failed: it was
        /// one loop per online core of the machine, also for a process confined to one CPU.
        @Test func defaultCountFollowsTheCPUAffinity() async {
            await #expect(processExitsWith: .success) {
                alarm(20)
                var saved = [UInt8](repeating: 0, count: 1024)
                guard plexus_bench_pin_to_current_cpu(&saved) >= 0 else { exit(30) }
                guard EventLoopGroup.defaultLoopCount == 1 else { exit(31) }
                let g = try EventLoopGroup(backend: .poll)
                let count = g.loops.count
                g.shutdownAndWait()
                exit(count == 1 ? 0 : 32)
            }
        }

        /// Threads that cannot be created (address space exhausted: pthread_create's stack
        /// mmap fails): a typed error naming pthread_create (or the backend's call) and its
        /// errno, and the loops started before are stopped, their fds closed.
        @Test(arguments: Backends.kinds)
        func aGroupWhoseThreadsCannotStartFailsTypedAndLeaksNothing(kind: BackendKind) async throws {
            _ = try Backends.start(kind)
            guard getenv("PLEXUS_SANITIZER") == nil else { try Test.cancel("skipped: sanitizers reserve address space") }
            let name = kind.rawValue
            let report = ChildReport()
            let result = await #expect(processExitsWith: .success) { [name = name as String, report = report.path as String] in
                func print(_ line: String) { ChildReport.append(line, to: report) }
                alarm(60)
                func fds() -> Int { openFileDescriptors().filter { !$0.value.contains("timerfd") }.count }
                func vmSize() -> Int {
                    let status = readWholeFile("/proc/self/status")
                    for line in status.split(separator: "\n") where line.hasPrefix("VmSize:") {
                        return Int(line.split(separator: " ", omittingEmptySubsequences: true)[1])! * 1024
                    }
                    return 0
                }
                // Warm up: the /proc reading below allocates once, and the runtime's start-up fds settle.
                waitUntilFileDescriptorsSettle()
                let before = fds()
                var limit = rlimit(), saved = rlimit()
                getrlimit(Int32(RLIMIT_AS.rawValue), &saved)
                limit = saved
                limit.rlim_cur = rlim_t(vmSize() + 96 << 20)
                setrlimit(Int32(RLIMIT_AS.rawValue), &limit)
                var outcome = ""
                do {
                    let g = try EventLoopGroup(loops: 100, backend: BackendChoice(rawValue: name)!)
                    setrlimit(Int32(RLIMIT_AS.rawValue), &saved)
                    print("started all \(g.loops.count)")
                    g.shutdownAndWait()
                    exit(10)
                } catch let e as PlexusError {
                    setrlimit(Int32(RLIMIT_AS.rawValue), &saved)
                    outcome = "PlexusError \(e.operation) \(e.errno.rawValue): \(e)"
                } catch let e as BackendSelectionError {
                    setrlimit(Int32(RLIMIT_AS.rawValue), &saved)
                    outcome = "BackendSelectionError \(e)"
                } catch {
                    setrlimit(Int32(RLIMIT_AS.rawValue), &saved)
                    print("untyped \(error)"); exit(11)
                }
                print(outcome)
                var after = fds()
                for _ in 0..<100 where after != before { usleep(10_000); after = fds() }
                guard after == before else { print("fds \(before) -> \(after)"); exit(12) }
                guard outcome.contains("errno") else { exit(13) }
                exit(0)
            }
            report.finish(result)
        }

        // MARK: Construction edges

        @Test func aGroupOfANegativeCountTrapsWithoutStartingAThread() async {
            for count in [-1, Int.min] {
                await #expect(processExitsWith: .failure) { [count = count as Int] in
                    alarm(10)
                    _ = try EventLoopGroup(loops: count, backend: .poll)
                    exit(0)
                }
            }
        }

        /// A huge count under a low fd limit: a typed error that names the call and EMFILE,
        /// and every loop already started is stopped: no fd and no loop thread is left.
        /// The limit is set 0...5 fds above what is open, so each step of starting a loop
        /// (backend fd(s), the loop's eventfd) is the one that fails in one of the rounds.
        @Test(arguments: Backends.kinds)
        func aGroupThatFailsMidwayLeavesNoFdNorThreadAndSaysWhy(kind: BackendKind) async throws {
            _ = try Backends.start(kind)
            let name = kind.rawValue
            let report = ChildReport()
            let result = await #expect(processExitsWith: .success) { [name = name as String, report = report.path as String] in
                func print(_ line: String) { ChildReport.append(line, to: report) }
                alarm(60)
                func fds() -> [Int32: String] { openFileDescriptors().filter { !$0.value.contains("timerfd") } }
                waitUntilFileDescriptorsSettle()
                var limit = rlimit()
                getrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit)
                let saved = limit
                for extra in 0...5 {
                    for count in [300, Int.max] {
                        let before = fds()
                        var lowered = saved
                        // The highest fd open + 1 + extra: open() takes the lowest free number.
                        lowered.rlim_cur = rlim_t(Int(before.keys.max() ?? 2) + 1 + extra)
                        setrlimit(Int32(RLIMIT_NOFILE.rawValue), &lowered)
                        var described = ""
                        do {
                            let g = try EventLoopGroup(loops: count, backend: BackendChoice(rawValue: name)!)
                            setrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit)
                            print("\(name) extra \(extra) count \(count): started \(g.loops.count) loops")
                            g.shutdownAndWait()
                            exit(10)
                        } catch let e as PlexusError {
                            described = "\(e)"
                            guard e.errno == .tooManyOpenFiles, !e.operation.isEmpty else { print("\(name) extra \(extra): \(e)"); exit(11) }
                        } catch let e as BackendSelectionError {
                            described = "\(e)"
                            guard case .unavailable(_, let inner) = e, inner.errno == .tooManyOpenFiles else {
                                print("\(name) extra \(extra): \(e)"); exit(12)
                            }
                        } catch {
                            print("\(name) extra \(extra): untyped \(error)"); exit(13)
                        }
                        setrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit)
                        guard described.contains("errno \(EMFILE)") else { print("no errno in: \(described)"); exit(14) }
                        var after = fds()
                        for _ in 0..<100 where after.count != before.count { usleep(10_000); after = fds() }
                        guard after.count == before.count || getenv("PLEXUS_SANITIZER") != nil else {
                            print("\(name) extra \(extra) count \(count): \(before.count) fds before, \(after.count) after: new \(after.filter { before[$0.key] == nil }), gone \(before.filter { after[$0.key] == nil })")
                            exit(15)
                        }
                        var threads = threadCount(named: "plexus-loop")
                        for _ in 0..<200 where threads != 0 { usleep(10_000); threads = threadCount(named: "plexus-loop") }
                        guard threads == 0 else { print("\(name) extra \(extra): \(threads) loop threads left"); exit(16) }
                    }
                }
                exit(0)
            }
            report.finish(result)
        }

        /// `entries` is a size that io_uring clamps (the backend sets IORING_SETUP_CLAMP) and
        /// epoll/poll clamp to 16...4096: every value must start every backend. Once failed
        /// on io_uring: the CQ size `entries &* 4` wrapped for entries >= 2^30 (EINVAL), and
        /// auto silently fell back to epoll.
        @Test(arguments: Backends.kinds)
        func hugeEntriesStartLikeAnyOtherSize(kind: BackendKind) throws {
            _ = try Backends.start(kind)
            for entries: UInt32 in [1, 4096, 32768, 1 << 20, (1 << 30) - 1, 1 << 30, (1 << 30) + 1, 1 << 31, UInt32.max] {
                do {
                    let loop = try EventLoop(backend: Self.choice(kind), entries: entries)
                    #expect(loop.backendKind == kind)
                } catch {
                    Issue.record("entries \(entries) on \(kind): \(error)")
                }
                // auto must not fall back for a size it accepts on either side of the wrap.
                if kind == .ioUring {
                    let auto = try BackendChoice.automatic.start(entries: entries)
                    #expect(auto.kind == .ioUring, "entries \(entries): auto fell back: \(String(describing: auto.fallbackReason))")
                }
            }
        }

        /// entries 0: epoll and poll clamp it (to 16), io_uring refuses it with EINVAL, whose
        /// message blames a disabled or missing io_uring, and auto then falls back to epoll
        /// for a size argument rather than for io_uring being unavailable.
        @Test(arguments: Backends.kinds)
        func entriesZeroStartsEveryBackendAlike(kind: BackendKind) throws {
            _ = try Backends.start(kind)
            do {
                let loop = try EventLoop(backend: Self.choice(kind), entries: 0)
                #expect(loop.backendKind == kind)
            } catch {
                Issue.record("entries 0 on \(kind): \(error)")
            }
            if kind == .ioUring {
                let auto = try BackendChoice.automatic.start(entries: 0)
                #expect(auto.kind == .ioUring, "auto fell back for entries 0: \(String(describing: auto.fallbackReason))")
            }
        }

        /// auto's fallback reason must be the real one. Under a seccomp profile that allows
        /// io_uring_setup but refuses io_uring_register with EPERM (plexus-nouring with
        /// PLEXUS_NOURING_CALL=register), the opcode probe fails. Once failed: the reason
        /// given was "this kernel's io_uring lacks IORING_OP_NOP (EOPNOTSUPP)", which is false.
        @Test func theFallbackReasonNamesARefusedIoUringRegister() throws {
            let nouring = try builtExecutable("plexus-nouring"), demo = try builtExecutable("plexus-demo")
            let auto = try runChild([nouring, demo, "--backend-info"], setting: ["PLEXUS_NOURING_CALL": "register"],
                                    removing: ["PLEXUS_BACKEND"])
            #expect(auto.exitCode == 0, "\(auto)")
            #expect(auto.stdout.contains("backend: epoll"), "\(auto)")
            let reason = auto.stdout.split(separator: "\n").first { $0.hasPrefix("fallback reason:") }.map(String.init) ?? ""
            #expect(reason.contains("io_uring_register") && reason.contains("EPERM"), "the refusal was EPERM: \(reason)")
            #expect(!reason.contains("lacks"), "no opcode is missing: \(reason)")
            let named = try runChild([nouring, demo, "--backend-info"],
                                     setting: ["PLEXUS_NOURING_CALL": "register", "PLEXUS_BACKEND": "io_uring"])
            #expect(named.exitCode == 1, "\(named)")
            #expect(named.stderr.contains("EPERM"), "\(named)")
        }

        // MARK: Shutdown of a busy group

        /// Jobs hop from loop to loop through next() without end, each loop has a read
        /// pending on a pipe and a repeating timer: the group's shutdown returns, every read
        /// callback runs once with ECANCELED, every timer ends with .cancelled.
        @Test(arguments: Backends.kinds)
        func shutdownOfAGroupWithJobsHoppingBetweenLoopsReturns(kind: BackendKind) throws {
            let g = try Self.group(kind, loops: 3)
            let pipes = try (0..<3).map { _ in try APIEdgeTests.pipe() }
            defer { for p in pipes { close(p.r.rawValue); close(p.w.rawValue) } }
            let readEnds = Locked<[String]>([])
            let timerEnds = Locked<[TimerEvent]>([])
            let hops = Atomic<Int>(0)
            for (i, loop) in g.loops.enumerated() {
                let fd = pipes[i].r
                #expect(loop.execute {
                    loop.read(fd, IOBuffer(capacity: 16)) { result, _ in
                        let text: String
                        switch result {
                        case .success(let n): text = "ok \(n)"
                        case .failure(let e): text = "\(e.operation) \(e.errno.rawValue)"
                        }
                        readEnds.withLock { $0.append(text) }
                    }
                    loop.scheduleRepeating(every: .milliseconds(1)) { event in
                        if event == .cancelled { timerEnds.withLock { $0.append(event) } }
                    }
                })
            }
            @Sendable func hop() {
                hops.add(1, ordering: .relaxed)
                _ = g.next().execute { hop() }
            }
            for _ in 0..<6 { _ = g.next().execute { hop() } }
            #expect(Self.eventually { hops.load(ordering: .relaxed) > 3000 })
            let returned = Self.returns(within: 15) { g.shutdownAndWait() }
            #expect(returned, "the group's shutdown did not return")
            guard returned else { return }
            let ends = readEnds.withLock { $0 }
            #expect(ends.count == 3, "\(ends)")
            #expect(ends.allSatisfy { $0 == "read \(ECANCELED)" }, "\(ends)")
            #expect(timerEnds.withLock { $0.count } == 3)
            for loop in g.loops { #expect(!loop.execute {}) }
            let settled = hops.load(ordering: .relaxed)
            usleep(20_000)
            #expect(hops.load(ordering: .relaxed) == settled, "jobs still run after the group's shutdown returned")
        }

        /// Tasks on each loop await a read served by another loop of the group; the group
        /// shuts down under them: each task ends with a typed ECANCELED naming the read.
        @Test(arguments: Backends.kinds)
        func tasksAwaitingOtherLoopsEndWhenTheGroupShutsDown(kind: BackendKind) async throws {
            var weakLoops: [WeakLoop] = []
            do {
                let g = try Self.group(kind, loops: 3)
                weakLoops = g.loops.map(WeakLoop.init)
                let pipes = try (0..<6).map { _ in try APIEdgeTests.pipe() }
                defer { for p in pipes { close(p.r.rawValue); close(p.w.rawValue) } }
                let started = Counter()
                var tasks: [Task<String, Never>] = []
                for i in 0..<6 {
                    let home = g.loops[i % 3], other = g.loops[(i + 1) % 3], fd = pipes[i].r
                    tasks.append(Task(executorPreference: home) {
                        started.value.add(1, ordering: .relaxed)
                        do {
                            _ = try await other.read(fd, into: IOBuffer(capacity: 8))
                            return "read returned"
                        } catch let e as PlexusError {
                            return "\(e.operation) \(e.errno.rawValue)"
                        } catch {
                            return "untyped \(error)"
                        }
                    })
                }
                #expect(Self.eventually { started.value.load(ordering: .relaxed) == 6 })
                usleep(50_000)  // the reads are in flight
                #expect(Self.returns(within: 15) { g.shutdownAndWait() }, "the group's shutdown did not return")
                for task in tasks {
                    let outcome = await task.value
                    #expect(outcome == "read \(ECANCELED)", "\(outcome)")
                }
            }
            // The last references to a loop (a task's executor preference, the closure of the
            // thread that ran the shutdown) go with the threads that held them, a moment
            // after the tasks' values arrive: each loop closes its fds then, and the fd check
            // after the test saw one still open once (CI, a loaded machine).
            #expect(Self.eventually { weakLoops.allSatisfy { $0.loop == nil } }, "a loop outlived its group and its tasks")
        }

        final class WeakLoop {
            weak var loop: EventLoop?
            init(_ loop: EventLoop) { self.loop = loop }
        }

        /// Four threads shut the same group down at once, then once more each: all return.
        @Test(arguments: Backends.kinds)
        func concurrentAndRepeatedGroupShutdownsReturn(kind: BackendKind) throws {
            let g = try Self.group(kind, loops: 3)
            g.loops[1].shutdownAndWait()  // one loop already stopped on its own
            let done = Atomic<Int>(0)
            for _ in 0..<4 {
                Thread {
                    g.shutdownAndWait()
                    g.shutdownAndWait()
                    done.add(1, ordering: .releasing)
                }.start()
            }
            #expect(Self.eventually(within: 15) { done.load(ordering: .acquiring) == 4 }, "a shutdown hung")
            #expect(Self.eventually { threadCount(named: "plexus-loop-") == 0 }, "loop threads outlived the shutdown")
        }

        /// group.shutdownAndWait() from a callback on one of its loops cannot wait for
        /// itself: it must trap (as EventLoop.shutdownAndWait does), never hang.
        @Test(arguments: Backends.kinds)
        func groupShutdownFromItsOwnLoopTrapsRatherThanHangs(kind: BackendKind) async throws {
            _ = try Backends.start(kind)
            let name = kind.rawValue
            let result = await #expect(processExitsWith: .failure, observing: [\.exitStatus]) { [name = name as String] in
                alarm(10)
                let g = try EventLoopGroup(loops: 2, backend: BackendChoice(rawValue: name)!)
                g.loops[1].execute { g.shutdownAndWait() }
                sleep(8)
                exit(0)
            }
            if let result { #expect(result.exitStatus != .signal(SIGALRM), "a hang, not a trap") }
        }

        /// Twenty groups of four loops started and shut down: no loop thread and no fd left.
        @Test(arguments: Backends.kinds)
        func groupLoopsAreGoneAfterShutdownAndTheirFdsClosed(kind: BackendKind) throws {
            _ = try Backends.start(kind)
            let before = openFileDescriptors().count
            for _ in 0..<20 {
                let g = try EventLoopGroup(loops: 4, backend: Self.choice(kind))
                g.shutdownAndWait()
            }
            #expect(Self.eventually { threadCount(named: "plexus-loop-") == 0 })
            #expect(openFileDescriptors().count == before)
        }

        // MARK: PLEXUS_BACKEND

        /// PLEXUS_BACKEND as README.md documents it, for a group (backend: nil) and a loop.
        @Test(arguments: Backends.kinds)
        func plexusBackendValuesForAGroup(kind: BackendKind) async throws {
            _ = try Backends.start(kind)
            let name = kind.rawValue
            let report = ChildReport()
            let result = await #expect(processExitsWith: .success) { [name = name as String, report = report.path as String] in
                func print(_ line: String) { ChildReport.append(line, to: report) }
                alarm(30)
                // Mixed case names the backend.
                for spelled in [name.uppercased(), name.prefix(1).uppercased() + name.dropFirst()] {
                    setenv("PLEXUS_BACKEND", spelled, 1)
                    guard (try? BackendChoice.fromEnvironment()) == BackendChoice(rawValue: name) else { print("\(spelled)"); exit(20) }
                    let g = try EventLoopGroup(loops: 2)
                    let kinds = g.loops.map(\.backendKind.rawValue)
                    g.shutdownAndWait()
                    guard kinds == [name, name] else { print("\(spelled): \(kinds)"); exit(21) }
                    guard g.loops.allSatisfy({ $0.selection.fallbackReason == nil }) else { exit(22) }
                }
                // Unset and empty are auto.
                unsetenv("PLEXUS_BACKEND")
                guard (try? BackendChoice.fromEnvironment()) == .automatic else { exit(23) }
                setenv("PLEXUS_BACKEND", "", 1)
                guard (try? BackendChoice.fromEnvironment()) == .automatic else { exit(24) }
                setenv("PLEXUS_BACKEND", "AuTo", 1)
                guard (try? BackendChoice.fromEnvironment()) == .automatic else { exit(25) }
                // Whitespace and unknown names are errors that list the valid names; a group
                // then starts no thread and opens no fd.
                let fdsBefore = openFileDescriptors().count
                for bad in [" \(name)", "\(name) ", "\(name)\n", "\t", "kqueue", "io-uring", "\(name),epoll"] {
                    setenv("PLEXUS_BACKEND", bad, 1)
                    do {
                        let g = try EventLoopGroup(loops: 3)
                        g.shutdownAndWait()
                        print("'\(bad)' was taken"); exit(26)
                    } catch let e as BackendSelectionError {
                        guard case .unknownName(let got, let valid) = e, got == bad,
                              Set(valid) == ["auto", "io_uring", "epoll", "poll"] else { print("\(e)"); exit(27) }
                        let text = "\(e)"
                        guard text.contains("PLEXUS_BACKEND"), text.contains("io_uring, epoll, poll") || text.contains("auto, io_uring") else {
                            print(text); exit(28)
                        }
                    } catch { print("untyped \(error)"); exit(29) }
                }
                guard openFileDescriptors().count == fdsBefore else { exit(30) }
                exit(0)
            }
            report.finish(result)
        }

        /// A backend named in code wins over PLEXUS_BACKEND, even an invalid one.
        @Test(arguments: Backends.kinds)
        func aBackendNamedInCodeIgnoresTheEnvironment(kind: BackendKind) async throws {
            _ = try Backends.start(kind)
            let name = kind.rawValue
            await #expect(processExitsWith: .success) { [name = name as String] in
                alarm(30)
                setenv("PLEXUS_BACKEND", "bogus", 1)
                let g = try EventLoopGroup(loops: 2, backend: BackendChoice(rawValue: name)!)
                let kinds = g.loops.map(\.backendKind.rawValue)
                g.shutdownAndWait()
                exit(kinds == [name, name] ? 0 : 1)
            }
        }

        /// auto in a group: every loop runs the same backend, and says why when it is epoll.
        @Test func autoGivesEveryLoopOfAGroupTheSameBackend() throws {
            let g: EventLoopGroup
            do { g = try EventLoopGroup(loops: 4, backend: .automatic) } catch {
                try Test.cancel("skipped: no backend starts here: \(error)")
            }
            defer { g.shutdownAndWait() }
            let kinds = Set(g.loops.map(\.backendKind))
            #expect(kinds.count == 1, "\(kinds)")
            for loop in g.loops {
                #expect(loop.selection.choice == .automatic)
                if loop.backendKind == .epoll { #expect(loop.selection.fallbackReason != nil) }
                if loop.backendKind == .ioUring { #expect(loop.selection.fallbackReason == nil) }
            }
        }
    }
}
