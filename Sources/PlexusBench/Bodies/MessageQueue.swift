import Plexus

// The message-queue rows (mq-handoff, mq-pingpong): MessageQueueBenchmark.measureHandOff
// from the library, which runs a whole measurement on a fresh loop thread with producer
// threads and returns throughput and the producer-send to consumer-receipt latency
// percentiles of every message. The consumer is the adapter: `callback` (`onBatch` on the
// loop thread) or `async` (`for await` in a task whose executor is the loop). The wake is
// the loop signal (the only `MessageQueueWake`: the queue goes into the loop's remote-job
// queue and the loop's eventfd is written only when it sleeps).
//
// The measurement runs a fixed message count, so the window is sized from a warm-up run:
// count = rate in the warm-up × duration. Allocations are counted from the first message
// sent to the last one received (measureHandOff's `countAllocations`): the set-up (a loop
// thread, the queue, the latency table, producer threads) is left out, as the stepped
// rows leave theirs out; counted around the whole call it showed as 0.01 per message at
// --duration 100ms. No raw baseline.
// Checked by measureHandOff itself: every message is received (it waits for all of them)
// and none is left when the queue closes.

func makeMessageQueueBody(_ c: BenchmarkCase) throws -> WindowBody? {
    guard let choice = c.backend.choice else { return nil }
    let consumer: HandOffConsumer
    switch c.adapter {
    case .callback: consumer = .callback
    case .async: consumer = .async
    case .raw: return nil
    }
    return MessageQueueBody(choice: choice, consumer: consumer,
                            mode: c.benchmark == .messageQueue ? .throughput : .pingPong)
}

final class MessageQueueBody: WindowBody {
    static let producers = 2
    let choice: BackendChoice
    let consumer: HandOffConsumer
    let mode: HandOffMeasurement.Mode

    init(choice: BackendChoice, consumer: HandOffConsumer, mode: HandOffMeasurement.Mode) {
        self.choice = choice
        self.consumer = consumer
        self.mode = mode
    }

    private func measure(messagesPerProducer: Int) throws -> HandOffMeasurement {
        try MessageQueueBenchmark.measureHandOff(backend: choice, wake: .loopSignal, consumer: consumer, mode: mode,
                                                 producers: Self.producers, messagesPerProducer: messagesPerProducer,
                                                 countAllocations: { MallocCounter.count })
    }

    func runWindow(duration: Duration, warmup: Duration, sampler: LatencySampler) throws -> WindowFigures {
        let producers = mode == .throughput ? Self.producers : 1
        // Warm-up and calibration: a short run, its rate sizes the measured one.
        let probeMessages = mode == .throughput ? 20_000 : 2_000
        let probe = try measure(messagesPerProducer: probeMessages / producers)
        let seconds = Double(duration.nanosecondsForBench) / 1e9
        let perProducer = max(1_000, Int(probe.messagesPerSecond * seconds) / producers)
        let m = try measure(messagesPerProducer: perProducer)
        return WindowFigures(operations: m.messages, nanoseconds: UInt64(m.seconds * 1e9), allocations: m.allocations ?? 0,
                             p50: Double(m.p50Nanoseconds), p99: Double(m.p99Nanoseconds))
    }

    func finish() throws {}
}
