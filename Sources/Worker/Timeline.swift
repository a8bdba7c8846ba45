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
    private let reducer: GradientReducer
    private let warmup: Int
    private let steps: Int
    /// Steps this process has begun.
    private var stepsBegun = 0
    private enum State { case waiting, recording, written }
    private var state = State.waiting
    private var alignedAtOpen: [ClockOffset] = []
    private let layerTimer: (Int, Model<Float>.Pass, UInt64, UInt64) -> Void
    /// Nanoseconds this rank's timeline clock runs ahead (`TestHooks.clockSkewSeconds`, tests only), as a clock on
    /// another host may, so a test can see that alignment undoes it.
    private let skew: Int64

    var path: String { session.runDirectory + "/timeline.json" }

    /// - Parameter runSteps: steps the run has in all: a window longer than the run needs no room beyond it.
    /// - Parameter clockSkewSeconds: `TestHooks.clockSkewSeconds`, 0 in real runs.
    init(session: Session, model: Model<Float>, reducer: GradientReducer, runSteps: Int, clockSkewSeconds: Double = 0) {
        let config = session.config
        self.session = session
        self.model = model
        self.reducer = reducer
        steps = config.timelineSteps
        warmup = config.timelineWarmupSteps
        recorder = TimelineRecorder(capacity: min(steps, max(runSteps, 1)) * Self.eventsPerStep(model: model, buckets: reducer.buckets.count) + 64)
        reducer.timeline = recorder
        layerTimer = { [recorder] layer, pass, start, end in
            recorder.record(pass == .forward ? .layerForward : .layerBackward, layer, start: Int64(start), end: Int64(end))
        }
        skew = Int64(clockSkewSeconds * 1e9)
    }

    /// Room for a step's events: the step and its parts (load, forward, backward, wait, norm, update), each layer in
    /// both passes and the loss, per bucket its posting, send, receive or allreduce, completion and parameter gather,
    /// synchronized batch norm's two reductions per layer, and what may happen between two steps.
    static func eventsPerStep(model: Model<Float>, buckets: Int) -> Int {
        let layers = model.spec.layers.count
        return 16 + 4 * (layers + 1) + 6 * buckets
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

    @inline(__always) func begin() -> Int64 { recorder.begin() }
    @inline(__always) func end(_ kind: TimelineEvent.Kind, _ index: Int = 0, since start: Int64) {
        recorder.end(kind, index, since: start)
    }

    /// Between steps: the model's layer timer is detached, so an evaluation's forward passes are one event.
    func beginBetweenSteps() -> Int64 {
        model.layerTimer = nil
        return recorder.begin()
    }

    func endBetweenSteps(_ kind: TimelineEvent.Kind, since start: Int64) {
        recorder.end(kind, since: start)
        if state == .recording { model.layerTimer = layerTimer }
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
                session.logger.warning("timeline: the run ended within the \(warmup) steps before recording (timeline.warmup_steps); no timeline.json written")
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
                              strategy: reducer.strategy.rawValue)
        do {
            try writeAtomically(Data(trace.json.utf8), to: path, durable: false)
        } catch {
            session.logger.error("timeline: cannot write \(path): \(error)")
            return
        }
        let offsets = alignedAtClose.enumerated().dropFirst().map { rank, clock in
            "rank \(rank) \(String(format: "%+.1f", Double(clock.offset) * 1e-3)) µs ± \(String(format: "%.1f", Double(clock.roundTrip) * 5e-4))"
        }.joined(separator: ", ")
        let lost = dropped.reduce(0, +)
        let line = "timeline: \(grouped(trace.eventCount)) events of \(session.worldSize) rank\(session.worldSize == 1 ? "" : "s") in \(path) (open it in ui.perfetto.dev or chrome://tracing)"
            + (offsets.isEmpty ? "" : "; clocks against rank 0's: \(offsets)")
            + (lost > 0 ? "; \(lost) events did not fit the buffer and are missing" : "")
        session.logger.info("\(line)")
    }

    /// What each event is called in the file, from the model and the reducer of this run.
    private func names() -> TraceFile.Names {
        let layers = model.spec.layers.map { "\($0)" }
        let buckets = reducer.buckets.map { range -> String in
            let tensors = model.parameterTable.filter { range.contains($0.offset) }.map(\.name)
            let span = tensors.count > 1 ? "\(tensors.last!)..\(tensors.first!)" : tensors.first ?? "?"
            return "\(span), \(bytesText(Double(range.count * MemoryLayout<Float>.stride)))"
        }
        let bucketBytes = reducer.buckets.map { $0.count * MemoryLayout<Float>.stride }
        return TraceFile.Names(layers: layers, buckets: buckets, bucketBytes: bucketBytes,
                               sharded: reducer.strategy == .sharded)
    }
}

/// A Chrome trace-event file (the JSON object format: `traceEvents`, timestamps in microseconds), laid out for
/// Perfetto: process ids start at 1 (Perfetto treats pid 0 as the kernel's swapper), every process and thread is
/// named by a metadata event without a timestamp, complete events ("X") nest on each thread, and events are sorted
/// by start with parents before children.
struct TraceFile {
    struct Names {
        let layers: [String]
        let buckets: [String]
        let bucketBytes: [Int]
        let sharded: Bool
    }

    let ranks: [[TimelineEvent]]
    let dropped: [Int]
    let alignedAtOpen: [ClockOffset]
    let alignedAtClose: [ClockOffset]
    let hosts: [String]
    let names: Names
    let steps: Int
    let warmup: Int
    let strategy: String

    var eventCount: Int { ranks.reduce(0) { $0 + $1.count } }

    /// Threads of a rank's process: the main thread, the control values' allreduce, then two per bucket.
    static let mainThread = 1, controlThread = 2
    static func bucketThread(_ bucket: Int, receive: Bool) -> Int { 10 + 2 * bucket + (receive ? 1 : 0) }

    /// Rank `rank`'s time `t` (its own clock, ns) on rank 0's clock: the offset measured at the open and at the
    /// close, interpolated linearly in between (a clock that runs fast drifts linearly).
    func alignedTime(_ t: Int64, rank: Int) -> Int64 {
        guard rank < alignedAtOpen.count, rank < alignedAtClose.count else { return t }
        let a = alignedAtOpen[rank], b = alignedAtClose[rank]
        var offset = Double(a.offset)
        if b.at > a.at {
            let fraction = Double(t - a.at) / Double(b.at - a.at)
            offset += (Double(b.offset) - Double(a.offset)) * fraction
        }
        return t - Int64(offset.rounded())
    }

    var json: String {
        // Times in µs from the earliest event of any rank, from integer nanoseconds (exact, three decimals).
        let aligned = ranks.enumerated().map { rank, events in
            events.map { (event: $0, start: alignedTime($0.start, rank: rank), end: alignedTime($0.end, rank: rank)) }
        }
        let origin = aligned.flatMap { $0.map(\.start) }.min() ?? 0
        var lines: [String] = []
        for (rank, events) in aligned.enumerated() {
            let pid = rank + 1
            let host = rank < hosts.count ? hosts[rank] : "?"
            lines.append(#"{"name":"process_name","ph":"M","pid":\#(pid),"tid":\#(Self.mainThread),"args":{"name":\#(quoted("rank \(rank) (\(host))"))}}"#)
            lines.append(#"{"name":"process_sort_index","ph":"M","pid":\#(pid),"tid":\#(Self.mainThread),"args":{"sort_index":\#(rank)}}"#)
            lines.append(#"{"name":"process_labels","ph":"M","pid":\#(pid),"tid":\#(Self.mainThread),"args":{"labels":\#(quoted("rank \(rank)"))}}"#)
            var threads: [Int: String] = [Self.mainThread: "training step"]
            for (event, _, _) in events {
                let (tid, name) = thread(of: event)
                threads[tid] = name
            }
            for (tid, name) in threads.sorted(by: { $0.key < $1.key }) {
                lines.append(#"{"name":"thread_name","ph":"M","pid":\#(pid),"tid":\#(tid),"args":{"name":\#(quoted(name))}}"#)
                lines.append(#"{"name":"thread_sort_index","ph":"M","pid":\#(pid),"tid":\#(tid),"args":{"sort_index":\#(tid)}}"#)
            }
            // Parents first: by start, then longest first.
            let sorted = events.sorted { $0.start != $1.start ? $0.start < $1.start : $0.end - $0.start > $1.end - $1.start }
            for (event, start, end) in sorted {
                let (tid, _) = thread(of: event)
                let (name, category, extra) = describe(event)
                let args = #"{"step":\#(event.step)\#(extra)}"#
                if event.kind == .bucketComplete {
                    lines.append(#"{"name":\#(quoted(name)),"cat":"\#(category)","ph":"i","s":"t","pid":\#(pid),"tid":\#(tid),"ts":\#(microseconds(start - origin)),"args":\#(args)}"#)
                } else {
                    lines.append(#"{"name":\#(quoted(name)),"cat":"\#(category)","ph":"X","pid":\#(pid),"tid":\#(tid),"ts":\#(microseconds(start - origin)),"dur":\#(microseconds(max(0, end - start))),"args":\#(args)}"#)
                }
            }
        }
        let clocks = alignedAtClose.indices.map { rank -> String in
            let open = rank < alignedAtOpen.count ? alignedAtOpen[rank] : alignedAtClose[rank], close = alignedAtClose[rank]
            return #"{"rank":\#(rank),"offset_us_at_open":\#(microseconds(open.offset)),"offset_us_at_close":\#(microseconds(close.offset)),"round_trip_us":\#(microseconds(max(open.roundTrip, close.roundTrip)))}"#
        }
        let other = #"{"producer":"bpworker --timeline","steps":\#(steps),"warmup_steps":\#(warmup),"world_size":\#(ranks.count),"reduction":\#(quoted(strategy)),"dropped_events":\#(dropped.reduce(0, +)),"clock_alignment":[\#(clocks.joined(separator: ","))]}"#
        return "{\"displayTimeUnit\":\"ms\",\"otherData\":\(other),\"traceEvents\":[\n" + lines.joined(separator: ",\n") + "\n]}\n"
    }

    private func thread(of event: TimelineEvent) -> (Int, String) {
        let b = Int(event.index)
        let bucket = b >= 0 && b < names.buckets.count ? "bucket \(b) (\(names.buckets[b]))" : "bucket \(b)"
        switch event.kind {
        case .bucketSend, .bucketAllreduce, .bucketComplete:
            return (Self.bucketThread(b, receive: false), bucket + (names.sharded ? ": sent" : ": allreduce"))
        case .bucketReceive: return (Self.bucketThread(b, receive: true), bucket + ": received")
        case .controlAllreduce: return (Self.controlThread, "control values (stop requests, non-finite counts)")
        default: return (Self.mainThread, "training step")
        }
    }

    /// Name, category and extra arguments of an event.
    private func describe(_ event: TimelineEvent) -> (String, String, String) {
        let i = Int(event.index)
        let layer = i < names.layers.count ? "\(i) \(names.layers[i])" : "loss"
        let bytes = i >= 0 && i < names.bucketBytes.count ? #","bytes":\#(names.bucketBytes[i])"# : ""
        switch event.kind {
        case .step: return ("step \(event.step)", "step", "")
        case .loadBatch: return ("load batch", "data", "")
        case .forward: return ("forward", "compute", "")
        case .layerForward: return ("forward \(layer)", "compute", #","layer":\#(i)"#)
        case .backward: return ("backward", "compute", "")
        case .layerBackward: return ("backward \(layer)", "compute", #","layer":\#(i)"#)
        case .bucketStart: return ("post bucket \(i)", "communication", bytes)
        case .exchangeWait: return ("wait for gradients", "wait", "")
        case .gradientNorm: return ("gradient norm (clipping)", "communication", "")
        case .update: return ("optimizer update", "compute", "")
        case .parameterGather: return ("gather parameters, bucket \(i)", "communication", bytes)
        case .batchNormSync: return ("batch norm sync", "communication", "")
        case .progressReport: return ("progress report", "between steps", "")
        case .replicaCheck: return ("replica check", "between steps", "")
        case .checkpoint: return ("checkpoint", "io", "")
        case .evaluation: return ("evaluation", "between steps", "")
        case .clockSync: return ("clock alignment", "between steps", "")
        case .bucketSend: return ("bucket \(i) send", "communication", bytes)
        case .bucketReceive: return ("bucket \(i) receive", "communication", bytes)
        case .bucketAllreduce: return ("bucket \(i) allreduce", "communication", bytes)
        case .bucketComplete: return ("bucket \(i) complete", "communication", bytes)
        case .controlAllreduce: return ("control values allreduce", "communication", "")
        }
    }

    private func microseconds(_ nanoseconds: Int64) -> String {
        let sign = nanoseconds < 0 ? "-" : ""
        let n = nanoseconds.magnitude
        let fraction = String(n % 1000)
        return "\(sign)\(n / 1000).\(String(repeating: "0", count: 3 - fraction.count))\(fraction)"
    }

    private func quoted(_ text: String) -> String {
        var out = "\""
        for scalar in text.unicodeScalars {
            switch scalar {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case _ where scalar.value < 0x20: out += String(format: "\\u%04x", scalar.value)
            default: out.unicodeScalars.append(scalar)
            }
        }
        return out + "\""
    }
}
