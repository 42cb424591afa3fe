import Glibc
import Synchronization

/// Which consumer a hand-off measurement drives.
public enum HandOffConsumer: String, Sendable, CaseIterable {
    /// `onBatch` on the loop thread.
    case callback
    /// `for await` in a task whose executor is the loop.
    case async
}

/// One message-queue hand-off measurement: producer timestamp (CLOCK_MONOTONIC, taken
/// just before the send) to the consumer's receipt on the loop thread.
public struct HandOffMeasurement: Sendable, CustomStringConvertible {
    public enum Mode: String, Sendable {
        /// Producers send as fast as the queue takes messages (`trySend`, `sched_yield`
        /// when full): throughput; latency then includes the time spent queued.
        case throughput
        /// One message in flight: the producer waits for each receipt, then sends the
        /// next at once; the consumer may not have gone back to sleep yet.
        case pingPong = "ping-pong"
        /// Like ping-pong, but the producer lets 50 us pass after each receipt, so the
        /// consumer's loop is asleep in its wait: the wake-up latency of an idle consumer.
        case idleWake = "idle-wake"
    }
    public let backend: BackendKind
    public let wake: MessageQueueWake
    public let consumer: HandOffConsumer
    public let mode: Mode
    public let producers: Int
    public let messages: Int
    public let capacity: Int
    public let seconds: Double
    public let p50Nanoseconds: UInt64
    public let p99Nanoseconds: UInt64
    /// Consumer wake-ups that took messages (batches).
    public let batches: Int
    /// What `countAllocations` advanced by from the first message sent to the last one
    /// received (set-up and teardown left out); nil without a counter.
    public var allocations: UInt64? = nil

    public var messagesPerSecond: Double { Double(messages) / seconds }
    public var nanosecondsPerMessage: Double { seconds * 1e9 / Double(messages) }

    public var description: String {
        let rate = messagesPerSecond >= 1e6 ? "\(rounded(messagesPerSecond / 1e6)) M msg/s" : "\(rounded(messagesPerSecond / 1e3)) k msg/s"
        return "queue hand-off \(backend.rawValue) \(wake.rawValue) \(consumer.rawValue) \(mode.rawValue): "
            + "\(producers)x\(messages / max(producers, 1)) cap \(capacity): \(rate), \(rounded(nanosecondsPerMessage)) ns/msg, "
            + "p50 \(p50Nanoseconds) ns, p99 \(p99Nanoseconds) ns, \(batches) batches (\(rounded(Double(messages) / Double(max(batches, 1)))) msg/batch)"
    }

    private func rounded(_ x: Double) -> String {
        let v = (x * 10).rounded() / 10
        return v == v.rounded() ? String(Int(v)) : String(v)
    }
}

/// The message-queue microbenchmarks, callable from tests and from `plexus-bench`.
public enum MessageQueueBenchmark {
    /// Measures the hand-off on a fresh loop thread over `backend` and returns throughput
    /// and latency percentiles. Producers are threads; the consumer is `consumer` on the
    /// loop. Allocates its latency table (8 bytes a message) up front. Never asserts a timing.
    /// `countAllocations` (a process-wide malloc count) is read when the producers, already
    /// started, are let go and when the last message is received: `allocations`.
    public static func measureHandOff(backend: BackendChoice, wake: MessageQueueWake = .loopSignal,
                                      consumer: HandOffConsumer = .callback, mode: HandOffMeasurement.Mode = .throughput,
                                      producers: Int = 4, messagesPerProducer: Int = 250_000,
                                      capacity: Int = 64,
                                      countAllocations: (@Sendable () -> UInt64)? = nil) throws -> HandOffMeasurement {
        let producers = mode == .throughput ? max(1, producers) : 1
        let total = producers * messagesPerProducer
        let loop = try EventLoop.startThread(name: "plexus-qbench", backend: backend)
        defer { loop.shutdownAndWait() }
        let queue = MessageQueue<UInt64>(capacity: capacity, loop: loop, wake: wake)
        let sink = LatencySink(count: total)
        let finished = Semaphore()

        switch consumer {
        case .callback:
            loop.execute {
                queue.onBatch { batch in
                    let now = monotonicNanoseconds()
                    for sent in batch { sink.record(now &- sent) }
                    if sink.received == total { finished.signal() }
                }
            }
        case .async:
            Task(executorPreference: loop) {
                for await sent in queue {
                    sink.record(monotonicNanoseconds() &- sent)
                    if sink.received == total { finished.signal(); break }
                }
            }
        }

        // The producer threads start first and wait for `go`: their creation is set-up.
        let go = Atomic<Bool>(false)
        let threads = (0..<producers).map { _ in
            spawnThread {
                while !go.load(ordering: .acquiring) { sched_yield() }
                for i in 0..<messagesPerProducer {
                    var message = monotonicNanoseconds()
                    while true {
                        switch queue.trySend(message) {
                        case .sent: break
                        case .full(let back): message = back; sched_yield(); continue
                        case .closed: fatalError("the benchmark queue closed")
                        }
                        break
                    }
                    if mode != .throughput {
                        while sink.published.load(ordering: .acquiring) <= i { /* spin: measuring the consumer's wake */ }
                        if mode == .idleWake {
                            let resume = monotonicNanoseconds() &+ 50_000
                            while monotonicNanoseconds() < resume {}
                        }
                    }
                }
            }
        }
        let allocationsBefore = countAllocations?() ?? 0
        let start = monotonicNanoseconds()
        go.store(true, ordering: .releasing)
        finished.wait()
        let seconds = Double(monotonicNanoseconds() - start) / 1e9
        let allocations = countAllocations.map { $0() &- allocationsBefore }
        for t in threads { pthread_join(t, nil) }
        let leftover = queue.close()
        precondition(leftover.isEmpty)
        let (p50, p99) = sink.percentiles()
        var measurement = HandOffMeasurement(backend: loop.backendKind, wake: wake, consumer: consumer, mode: mode,
                                             producers: producers, messages: total, capacity: capacity, seconds: seconds,
                                             p50Nanoseconds: p50, p99Nanoseconds: p99, batches: queue.batchCount)
        measurement.allocations = allocations
        return measurement
    }
}

/// Latencies written by the loop thread only; `published` lets a ping-pong producer see receipts.
private final class LatencySink: @unchecked Sendable {
    let samples: UnsafeMutableBufferPointer<UInt64>
    private(set) var received = 0
    let published = Atomic<Int>(0)

    init(count: Int) {
        samples = .allocate(capacity: count)
        samples.initialize(repeating: 0)
    }

    deinit { samples.deallocate() }

    @inline(__always)
    func record(_ latency: UInt64) {
        samples[received] = latency
        received += 1
        published.store(received, ordering: .releasing)
    }

    /// (p50, p99), nearest rank: ceil(n × p / 100) - 1 of the sorted samples, as
    /// plexus-bench's LatencySampler (`n * 99 / 100` is one too high when that is whole).
    func percentiles() -> (UInt64, UInt64) {
        guard received > 0 else { return (0, 0) }
        let sorted = samples[0..<received].sorted()
        func rank(_ percent: Int) -> Int { max(0, (received * percent + 99) / 100 - 1) }
        return (sorted[rank(50)], sorted[rank(99)])
    }
}

@inline(__always)
func monotonicNanoseconds() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return UInt64(ts.tv_sec) &* 1_000_000_000 &+ UInt64(ts.tv_nsec)
}

private func spawnThread(_ body: @escaping @Sendable () -> Void) -> pthread_t {
    final class Job { let body: @Sendable () -> Void; init(_ b: @escaping @Sendable () -> Void) { body = b } }
    var thread = pthread_t()
    let rc = pthread_create(&thread, nil, { raw in
        Unmanaged<Job>.fromOpaque(raw!).takeRetainedValue().body()
        return nil
    }, Unmanaged.passRetained(Job(body)).toOpaque())
    precondition(rc == 0, "pthread_create failed: \(rc)")
    return thread
}
