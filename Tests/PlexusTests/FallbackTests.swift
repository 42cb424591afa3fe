import Glibc
@testable import Plexus
import Testing

extension PlexusTests {
    /// Backend selection seen from outside: the real `plexus-demo` executable, run under
    /// `plexus-nouring` (a seccomp filter that makes io_uring_setup fail, as Docker's
    /// default profile does), with posix_spawn.
    @Suite struct Fallback {
        /// The fallback target must work in this process, or there is nothing to fall back to.
        func requireEpoll() throws {
            do { _ = try BackendChoice.epoll.start() } catch {
                if Backends.mode == .all { try Test.cancel("skipped: epoll cannot start here: \(error)") }
                Issue.record("epoll cannot start here: \(error)")
                throw error
            }
        }

        @Test func `swift build --build-tests puts the executables next to the tests`() throws {
            let directory = buildProductsDirectory()
            #expect(!directory.isEmpty)
            for name in ["plexus-demo", "plexus-nouring"] {
                let path = try builtExecutable(name)
                #expect(path.hasPrefix(directory))
            }
        }

        @Test(arguments: [(EPERM, "EPERM"), (ENOSYS, "ENOSYS"), (EACCES, "EACCES"), (EINVAL, "EINVAL")])
        func `auto falls back to epoll when io_uring_setup fails, and says why`(errno: Int32, name: String) throws {
            try requireEpoll()
            let nouring = try builtExecutable("plexus-nouring")
            let demo = try builtExecutable("plexus-demo")
            let setting = errno == EPERM ? [:] : ["PLEXUS_NOURING_ERRNO": "\(errno)"]
            let child = try runChild([nouring, demo, "--backend-info"], setting: setting, removing: ["PLEXUS_BACKEND"])
            #expect(child.exitCode == 0, "\(child)")
            #expect(child.stdout.contains("backend: epoll"), "\(child)")
            #expect(child.stdout.contains("requested: auto"), "\(child)")
            let reason = child.stdout.split(separator: "\n").first { $0.hasPrefix("fallback reason:") }.map(String.init) ?? ""
            #expect(reason.contains("io_uring"), "the fallback reason must name io_uring: \(child)")
            #expect(reason.contains(name), "the fallback reason must name \(name): \(child)")
            #expect(child.stderr.isEmpty, "\(child)")
        }

        @Test func `PLEXUS_BACKEND=auto under seccomp behaves as unset`() throws {
            try requireEpoll()
            let child = try runChild(
                [try builtExecutable("plexus-nouring"), try builtExecutable("plexus-demo"), "--backend-info"],
                setting: ["PLEXUS_BACKEND": "auto"])
            #expect(child.exitCode == 0, "\(child)")
            #expect(child.stdout.contains("backend: epoll"), "\(child)")
            #expect(child.stdout.contains("EPERM"), "\(child)")
        }

        @Test func `PLEXUS_BACKEND=io_uring under seccomp fails with a clear error`() throws {
            let child = try runChild(
                [try builtExecutable("plexus-nouring"), try builtExecutable("plexus-demo"), "--backend-info"],
                setting: ["PLEXUS_BACKEND": "io_uring"])
            #expect(child.exitCode == 1, "\(child)")
            #expect(!child.stdout.contains("backend:"), "nothing may be selected: \(child)")
            #expect(child.stderr.contains("io_uring backend cannot start"), "\(child)")
            #expect(child.stderr.contains("EPERM") || child.stderr.contains("not permitted"), "\(child)")
            #expect(child.stderr.contains("PLEXUS_BACKEND=epoll"), "the error must say what to do: \(child)")
        }

        @Test func `an unknown PLEXUS_BACKEND is an error listing the valid names`() throws {
            let child = try runChild([try builtExecutable("plexus-demo"), "--backend-info"],
                                     setting: ["PLEXUS_BACKEND": "bogus"])
            #expect(child.exitCode == 1, "\(child)")
            #expect(child.stderr.contains("bogus"), "\(child)")
            for valid in ["io_uring", "epoll", "poll", "auto"] {
                #expect(child.stderr.contains(valid), "the error must list \(valid): \(child)")
            }
        }

        @Test(arguments: Backends.kinds)
        func `a named backend is the one that runs`(kind: BackendKind) throws {
            _ = try Backends.start(kind)  // skips when it cannot start here
            let child = try runChild([try builtExecutable("plexus-demo"), "--backend-info"],
                                     setting: ["PLEXUS_BACKEND": kind.rawValue])
            #expect(child.exitCode == 0, "\(child)")
            #expect(child.stdout.contains("backend: \(kind)\n"), "\(child)")
            #expect(child.stdout.contains("requested: \(kind)\n"), "\(child)")
            #expect(child.stdout.contains("fallback reason: none"), "\(child)")
        }

        @Test func `auto picks io_uring where it can start`() throws {
            let inProcess: SelectedBackend
            do { inProcess = try BackendChoice.automatic.start() } catch {
                try Test.cancel("skipped: no backend starts here: \(error)")
            }
            let child = try runChild([try builtExecutable("plexus-demo"), "--backend-info"], removing: ["PLEXUS_BACKEND"])
            #expect(child.exitCode == 0, "\(child)")
            #expect(child.stdout.contains("backend: \(inProcess.kind)\n"), "\(child)")
            if inProcess.kind == .ioUring {
                #expect(inProcess.fallbackReason == nil)
                #expect(child.stdout.contains("fallback reason: none"), "\(child)")
            } else {
                #expect(inProcess.kind == .epoll)
                #expect(inProcess.fallbackReason != nil, "auto chose epoll without saying why")
            }
        }

        @Test(arguments: Backends.kinds)
        func `the demo ping-pong runs on every backend`(kind: BackendKind) throws {
            _ = try Backends.start(kind)
            let child = try runChild([try builtExecutable("plexus-demo"), "--round-trips", "2000"],
                                     setting: ["PLEXUS_BACKEND": kind.rawValue])
            #expect(child.exitCode == 0, "\(child)")
            #expect(child.stdout.contains("pipe ping-pong on \(kind): 2000 round trips"), "\(child)")
        }
    }
}
