import CPlexus
import Glibc
import SystemPackage
import Testing
@testable import Plexus

/// What only the io_uring backend does: ring set-up, a full SQ, the single issuer.
/// Skipped with the reason when io_uring cannot start here or PLEXUS_BACKEND names another.
extension PlexusTests {
@Suite struct URingBackendTests {
    static var ringOrSkip: String? {
        if !Backends.kinds.contains(.ioUring) { return "PLEXUS_BACKEND selects another backend" }
        do { _ = try URingBackend(entries: 4); return nil } catch { return "\(error)" }
    }

    static func drain(_ backend: URingBackend, expecting count: Int) throws -> [Token: Int32] {
        var results: [Token: Int32] = [:]
        let deadline = Deadline.now + .seconds(5)
        while results.count < count && Deadline.now < deadline {
            try backend.wait(timeout: .milliseconds(50)) { c in
                #expect(results[c.token] == nil, "token \(c.token) completed twice")
                results[c.token] = c.result
            }
        }
        return results
    }

    @Test(.enabled(if: ringOrSkip == nil, "io_uring unavailable or not selected"))
    func fullSubmissionQueueLosesNothing() throws {
        // 4 SQEs, 1000 nops: the SQ fills again and again and is flushed each time.
        let backend = try URingBackend(entries: 4)
        #expect(backend.kind == .ioUring)
        let tokens = (0..<1000).map { _ in backend.prepare(.nop) }
        let results = try Self.drain(backend, expecting: tokens.count)
        #expect(results.count == 1000)
        #expect(results.values.allSatisfy { $0 == 0 })
        #expect(backend.statistics.submissionQueueFull > 0)
        #expect(backend.statistics.completionQueueOverflows == 0)
        #expect(backend.pendingCount == 0)
    }

    @Test(.enabled(if: ringOrSkip == nil, "io_uring unavailable or not selected"))
    func createdOnOneThreadUsedOnAnother() throws {
        // R_DISABLED: the first thread that submits becomes the single issuer.
        let backend = try URingBackend()
        let box = UncheckedBox(backend)
        var thread = pthread_t()
        let rc = pthread_create(&thread, nil, { raw in
            let box = Unmanaged<UncheckedBox<URingBackend>>.fromOpaque(raw!).takeRetainedValue()
            _ = box.value.prepare(.nop)
            let n = (try? box.value.wait(timeout: .seconds(2)) { c in box.result = c.result }) ?? -1
            box.count = n
            return nil
        }, Unmanaged.passRetained(box).toOpaque())
        #expect(rc == 0)
        pthread_join(thread, nil)
        #expect(box.count == 1)
        #expect(box.result == 0)
    }

    @Test(.enabled(if: ringOrSkip == nil, "io_uring unavailable or not selected"))
    func capabilitiesOnThisKernel() throws {
        let backend = try URingBackend()
        #expect(backend.capabilities.contains(.nativeCompletions))
        #expect(backend.capabilities.contains(.linkedOperations))
        print("io_uring capabilities: \(backend.capabilities), setup flags 0x\(String(backend.setupFlags, radix: 16))")
    }

    /// `PLEXUS_IO_URING_SETUP` names the first ring setup tried: each one here, then a name
    /// that is none, which is a typed EINVAL naming the valid ones (and `auto` falls back to
    /// epoll saying so). The variable is put back as it was: make test sets it for a run.
    @Test(.enabled(if: ringOrSkip == nil, "io_uring unavailable or not selected"))
    func setupVariableChoosesTheFirstRingSetup() throws {
        let name = URingBackend.setupVariable
        let saved = getenv(name).map { String(cString: $0) }
        defer { if let saved { setenv(name, saved, 1) } else { unsetenv(name) } }
        for setup in URingBackend.setups {
            setenv(name, setup.name, 1)
            let backend = try URingBackend(entries: 4)
            #expect(backend.setupFlags == setup.flags, "\(setup.name): 0x\(String(backend.setupFlags, radix: 16))")
            _ = backend.prepare(.nop)
            #expect(try Self.drain(backend, expecting: 1).values.first == 0, "\(setup.name)")
        }
        setenv(name, "sqpoll", 1)
        #expect {
            _ = try URingBackend(entries: 4)
        } throws: { error in
            guard let error = error as? PlexusError else { return false }
            return error.operation == "io_uring_queue_init" && error.errno == .invalidArgument
                && "\(error)".contains("defer-taskrun, coop-taskrun, plain")
        }
        let selected = try BackendChoice.automatic.start()
        #expect(selected.kind == .epoll)
        #expect(selected.fallbackReason?.errno == .invalidArgument)
    }
}

}

final class UncheckedBox<T>: @unchecked Sendable {
    let value: T
    var result: Int32 = -1
    var count = -1
    init(_ value: T) { self.value = value }
}
