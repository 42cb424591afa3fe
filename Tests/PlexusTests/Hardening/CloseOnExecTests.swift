import CPlexus
import Glibc
@testable import Plexus
import SystemPackage
import Testing

extension PlexusTests {
    /// Invariant 5: every fd Plexus creates is O_CLOEXEC, and none outlives its owner.
    @Suite struct CloseOnExec {
        @Test(arguments: Backends.kinds)
        func `the fds of a backend and of a running loop are all O_CLOEXEC and go away with them`(kind: BackendKind) throws {
            let before = openFileDescriptors()
            do {
                let selected = try Backends.start(kind)
                let loop = try Backends.loopThread(kind)
                let created = openFileDescriptors().filter { before[$0.key] == nil }
                #expect(!created.isEmpty, "a backend and a loop open at least one fd")
                for (fd, what) in created {
                    #expect(isCloseOnExec(fd), "fd \(fd) (\(what)) opened by the \(kind) backend or loop lacks FD_CLOEXEC")
                }
                loop.shutdownAndWait()
                _ = selected
            }
            let after = openFileDescriptors()
            #expect(Set(after.keys) == Set(before.keys), "left open: \(after.filter { before[$0.key] == nil })")
        }

        @Test(arguments: Backends.kinds)
        func `accepted and opened fds are O_CLOEXEC, even when the caller asked for neither`(kind: BackendKind) throws {
            try Harness.run(kind) { h in
                let listener = try h.tcpListener()
                _ = try h.tcpClient(port: listener.port)
                _ = try h.tcpClient(port: listener.port)
                let one = try h.perform(.accept(listener.fd))
                let multi = h.prepare(.accept(listener.fd, multishot: true))
                try h.submit()
                let more = try h.waitForIntermediates(multi, count: 1)
                expectResult(try h.perform(.cancel(multi)), 0)
                _ = try h.waitFor(multi)
                let opened = try h.perform(.open(FilePath(try h.temporaryPath("f")), flags: O_RDWR | O_CREAT, mode: 0o600))
                let directory = try h.perform(.open(FilePath(try h.temporaryDirectory()), flags: O_RDONLY | O_DIRECTORY))
                for fd in [one.result, opened.result, directory.result] + more.map(\.result) {
                    #expect(fd >= 0)
                    if fd >= 0 { #expect(isCloseOnExec(fd), "fd \(fd) from Plexus lacks FD_CLOEXEC on \(kind)") }
                }
            }
        }
    }
}
