import Coordinator
import Engine
import Foundation

/// `--timeline STEPS` (`timeline.steps`): what every rank does during STEPS steps after `timeline.warmup_steps`,
/// written by rank 0 to RUN_DIR/timeline.json as one Chrome trace-event file that Perfetto (ui.perfetto.dev) and
/// chrome://tracing open, as Horovod's timeline and PyTorch's profiler trace are.
///
/// Each rank records into a `TimelineRecorder` sized for the window, so a recorded step allocates nothing: the
/// step and its parts on the main thread (loading the batch, forward and backward per layer, posting each gradient
/// bucket, the wait after backward, the update and each bucket's parameter gather), each bucket's send, receive
/// and completion on tracks of their own, and between steps the progress reports, replica checks, checkpoints and
/// evaluations. The window opens and closes at the same step on every rank, both times with a clock alignment
/// (`ClockAlignment`); at the close the events are gathered to rank 0, which maps every rank's times onto its own
/// clock (the offset interpolated between the two alignments, which also corrects a drift between them) and writes
/// the file. Outside the window nothing is recorded and no clock is read.
final class Timeline {
    let recorder: TimelineRecorder
    private let session: Session
    private let model: Model<Float>
    private let buckets: GradientBuckets
    private let strategy: ReductionStrategy
    private let warmup: Int
    private let steps: Int
    /// Steps this process has begun.
    private var stepsBegun = 0
    private enum State { case waiting, recording, written }
    private var state = State.waiting
    private var alignedAtOpen: [ClockOffset] = []
    private let layerTimer: (Int, Model<Float>.Pass, UInt64, UInt64) -> Void
    /// `TestHooks.clockSkewSeconds` (tests only): this rank's timeline clock runs this far ahead, as a clock on another
    /// host may, so a test can see that alignment undoes it.
    private let skew: Int64

    var path: String { session.runDirectory + "/timeline.json" }

    /// - Parameters:
    ///   - recorder: sized by `capacity(steps:runSteps:layers:buckets:)`; the reducer's `BucketTimes` records into it too.
    ///   - model: its layers' passes are timed while the window is open.
    ///   - buckets: the gradient reducer's buckets, for the events' names (its strategy is the configuration's).
    init(session: Session, recorder: TimelineRecorder, model: Model<Float>, buckets: GradientBuckets, clockSkewSeconds: Double) {
        self.session = session
        self.recorder = recorder
        self.model = model
        self.buckets = buckets
        strategy = session.config.reduction
        steps = session.config.timelineSteps
        warmup = session.config.timelineWarmupSteps
        layerTimer = { [recorder] layer, pass, start, end in
            guard recorder.recordsLayers else { return }
            recorder.record(pass == .forward ? .layerForward : .layerBackward, layer, start: Int64(start), end: Int64(end))
        }
        skew = Int64(clockSkewSeconds * 1e9)
    }

    /// Events the recorder needs room for: `steps` steps (no more than the run has), and what happens around them.
    static func capacity(steps: Int, runSteps: Int, layers: Int, buckets: Int) -> Int {
        min(steps, max(runSteps, 1)) * eventsPerStep(layers: layers, buckets: buckets) + 64
    }

    /// Room for a step's events: the step and its parts (load, forward, backward, wait, norm, update), each layer in
    /// both passes and the loss, per bucket its posting, send, receive or allreduce, completion and parameter gather,
    /// synchronized batch norm's two reductions per layer, and what may happen between two steps.
    static func eventsPerStep(layers: Int, buckets: Int) -> Int {
        16 + 4 * (layers + 1) + 6 * buckets
    }

    /// At the start of every step, before anything else in it. The window opens after the warm-up and closes when
    /// the step after the last recorded one begins (so what follows that step is recorded too); both are
    /// collectives that every rank reaches at the same step.
    func beforeStep(globalStep: Int) throws {
        if state == .waiting && stepsBegun == warmup {
            try open()
        } else if state == .recording && stepsBegun == warmup + steps {
            try close()
        }
        stepsBegun += 1
        recorder.step = Int32(truncatingIfNeeded: globalStep + 1)
    }

    private func open() throws {
        let started = TimelineRecorder.now()
        alignedAtOpen = try ClockAlignment.measure(session.communicator, clock: { TimelineRecorder.now() + skew })
        recorder.removeAll()
        recorder.startRecording()
        recorder.record(.clockSync, start: started, end: TimelineRecorder.now())
        model.layerTimer = layerTimer
        state = .recording
        if session.isRoot {
            session.logger.info("timeline: recording \(steps) step\(steps == 1 ? "" : "s") from step \(recorder.step + 1) into \(path)")
        }
    }

    /// Ends the window if it is open (at the end of a run that ended inside it too): every rank's events go to rank
    /// 0, which writes the file. Collective. A file that cannot be written is reported and the run goes on.
    func close() throws {
        guard state == .recording else {
            if state == .waiting && session.isRoot {
                let message = "timeline: the run ended within the \(warmup) steps before recording "
                    + "(timeline.warmup_steps); no timeline.json written"
                session.logger.warning("\(message)")
            }
            return
        }
        recorder.stopRecording()
        model.layerTimer = nil
        state = .written
        let communicator = session.communicator
        let alignedAtClose = try ClockAlignment.measure(communicator, clock: { TimelineRecorder.now() + skew })
        var flat: [Int64] = [Int64(recorder.dropped)]
        flat.reserveCapacity(1 + recorder.count * TimelineEvent.fields)
        for var event in recorder.recorded {
            event.start += skew
            event.end += skew
            flat += event.flattened
        }
        let gathered = try flat.withUnsafeBufferPointer { (buffer) throws(MPIError) in try communicator.gather(buffer, root: 0) }
        guard session.isRoot else { return }
        var ranks: [[TimelineEvent]] = []
        var dropped: [Int] = []
        for values in gathered {
            dropped.append(Int(values.first ?? 0))
            let body = values.dropFirst()
            ranks.append(stride(from: body.startIndex, to: body.endIndex, by: TimelineEvent.fields).compactMap {
                TimelineEvent(flattened: body[$0..<min($0 + TimelineEvent.fields, body.endIndex)])
            })
        }
        let trace = TraceFile(ranks: ranks, dropped: dropped, alignedAtOpen: alignedAtOpen, alignedAtClose: alignedAtClose,
                              hosts: session.layout.nodeNames, names: names(), steps: steps, warmup: warmup,
                              strategy: strategy.rawValue)
        do {
            try RunDirectoryIdentity.requireWritable(path)
            try writeAtomically(trace.json, to: path, durable: false)
        } catch {
            session.logger.error("timeline: cannot write \(path): \(error)")
            return
        }
        let offsets = alignedAtClose.enumerated().dropFirst().map { rank, clock in
            "rank \(rank) \(String(format: "%+.1f", Double(clock.offset) * 1e-3)) µs ± \(String(format: "%.1f", Double(clock.roundTrip) * 5e-4))"
        }.joined(separator: ", ")
        let lost = dropped.reduce(0, +)
        let line = "timeline: \(grouped(trace.eventCount)) events of \(counted(session.worldSize, "rank")) in \(path) "
            + "(open it in ui.perfetto.dev or chrome://tracing)"
            + (offsets.isEmpty ? "" : "; clocks against rank 0's: \(offsets)")
            + (lost > 0 ? "; \(lost) events did not fit the buffer and are missing" : "")
        session.logger.info("\(line)")
    }

    /// What each event is called in the file, from the model and the reducer of this run.
    private func names() -> TraceFile.Names {
        let layers = model.timedLayerNames
        let names = buckets.ranges.map { range -> String in
            let tensors = model.parameterTable.filter { range.contains($0.offset) }.map(\.name)
            let span = tensors.count > 1 ? "\(tensors.last!)..\(tensors.first!)" : tensors.first ?? "?"
            return "\(span), \(bytesText(Double(range.count * MemoryLayout<Float>.stride)))"
        }
        let bucketBytes = buckets.ranges.map { $0.count * MemoryLayout<Float>.stride }
        return TraceFile.Names(layers: layers, buckets: names, bucketBytes: bucketBytes, sharded: strategy == .sharded)
    }
}
