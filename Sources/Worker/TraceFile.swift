import Coordinator
import Engine
import Foundation

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

    /// The file's content: JSON, every name escaped by `JSONEncoder`, one event at a time. The whole document through
    /// the encoder at once held a tree of every event, about 1.7 KB each beside the file's 160 bytes: a 1,000-step
    /// window of the ResNet on 2 ranks took 219 MiB on rank 0 where the memory check counted 153.
    var json: Data {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        // Every value is an integer, a string or a decimal: nothing the encoder can refuse.
        func encoded(_ value: some Encodable) -> Data { (try? encoder.encode(value)) ?? Data("null".utf8) }
        let document = self.document
        // The document's keys in sorted order, as the encoder writes them.
        var out = Data("{\"displayTimeUnit\":".utf8) + encoded(document.displayTimeUnit)
        out += Data(",\"otherData\":".utf8) + encoded(document.otherData) + Data(",\"traceEvents\":[".utf8)
        for (i, event) in document.traceEvents.enumerated() {
            if i > 0 { out.append(UInt8(ascii: ",")) }
            out += encoded(event)
        }
        out += Data("]}\n".utf8)
        return out
    }

    /// The trace as typed events: per rank its metadata, then its events with times in µs from the earliest event
    /// of any rank.
    var document: TraceDocument {
        let aligned = ranks.enumerated().map { rank, events in
            events.map { (event: $0, start: alignedTime($0.start, rank: rank), end: alignedTime($0.end, rank: rank)) }
        }
        let origin = aligned.flatMap { $0.map(\.start) }.min() ?? 0
        var traceEvents: [TraceEvent] = []
        for (rank, events) in aligned.enumerated() {
            let pid = rank + 1
            traceEvents += metadata(rank: rank, events: events.map(\.event))
            // Parents first: by start, then longest first.
            let sorted = events.sorted { $0.start != $1.start ? $0.start < $1.start : $0.end - $0.start > $1.end - $1.start }
            for (event, start, end) in sorted {
                let (tid, _) = thread(of: event)
                let (name, category, args) = describe(event)
                let instant = event.kind == .bucketComplete
                traceEvents.append(TraceEvent(name: name, category: category, phase: instant ? .instant : .complete,
                                              scope: instant ? "t" : nil, pid: pid, tid: tid,
                                              ts: Microseconds(start - origin),
                                              dur: instant ? nil : Microseconds(max(0, end - start)), args: args))
            }
        }
        let clocks = alignedAtClose.indices.map { rank in
            let open = rank < alignedAtOpen.count ? alignedAtOpen[rank] : alignedAtClose[rank], close = alignedAtClose[rank]
            return TraceDocument.ClockAlignment(rank: rank, offsetAtOpen: Microseconds(open.offset),
                                                offsetAtClose: Microseconds(close.offset),
                                                roundTrip: Microseconds(max(open.roundTrip, close.roundTrip)))
        }
        let other = TraceDocument.OtherData(steps: steps, warmupSteps: warmup, worldSize: ranks.count, reduction: strategy,
                                            droppedEvents: dropped.reduce(0, +), clockAlignment: clocks)
        return TraceDocument(otherData: other, traceEvents: traceEvents)
    }

    /// A rank's process and thread names and sort order.
    private func metadata(rank: Int, events: [TimelineEvent]) -> [TraceEvent] {
        let pid = rank + 1
        let host = rank < hosts.count ? hosts[rank] : "?"
        func named(_ name: String, tid: Int, _ args: TraceEvent.Args) -> TraceEvent {
            TraceEvent(name: name, phase: .metadata, pid: pid, tid: tid, args: args)
        }
        var out = [
            named("process_name", tid: Self.mainThread, .init(name: "rank \(rank) (\(host))")),
            named("process_sort_index", tid: Self.mainThread, .init(sortIndex: rank)),
            named("process_labels", tid: Self.mainThread, .init(labels: "rank \(rank)")),
        ]
        var threads: [Int: String] = [Self.mainThread: "training step"]
        for event in events {
            let (tid, name) = thread(of: event)
            threads[tid] = name
        }
        for (tid, name) in threads.sorted(by: { $0.key < $1.key }) {
            out.append(named("thread_name", tid: tid, .init(name: name)))
            out.append(named("thread_sort_index", tid: tid, .init(sortIndex: tid)))
        }
        return out
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

    /// Name, category and arguments of an event.
    private func describe(_ event: TimelineEvent) -> (String, String, TraceEvent.Args) {
        let i = Int(event.index)
        let layer = i < names.layers.count ? "\(i) \(names.layers[i])" : "loss"
        let step = TraceEvent.Args(step: Int(event.step))
        let bytes = TraceEvent.Args(step: Int(event.step), bytes: i >= 0 && i < names.bucketBytes.count ? names.bucketBytes[i] : nil)
        let inLayer = TraceEvent.Args(step: Int(event.step), layer: i)
        switch event.kind {
        case .step: return ("step \(event.step)", "step", step)
        case .loadBatch: return ("load batch", "data", step)
        case .forward: return ("forward", "compute", step)
        case .layerForward: return ("forward \(layer)", "compute", inLayer)
        case .backward: return ("backward", "compute", step)
        case .layerBackward: return ("backward \(layer)", "compute", inLayer)
        case .bucketStart: return ("post bucket \(i)", "communication", bytes)
        case .exchangeWait: return ("wait for gradients", "wait", step)
        case .gradientNorm: return ("gradient norm (clipping)", "communication", step)
        case .update: return ("optimizer update", "compute", step)
        case .parameterGather: return ("gather parameters, bucket \(i)", "communication", bytes)
        case .batchNormSync: return ("batch norm sync", "communication", step)
        case .progressReport: return ("progress report", "between steps", step)
        case .replicaCheck: return ("replica check", "between steps", step)
        case .checkpoint: return ("checkpoint", "io", step)
        case .evaluation: return ("evaluation", "between steps", step)
        case .clockSync: return ("clock alignment", "between steps", step)
        case .bucketSend: return ("bucket \(i) send", "communication", bytes)
        case .bucketReceive: return ("bucket \(i) receive", "communication", bytes)
        case .bucketAllreduce: return ("bucket \(i) allreduce", "communication", bytes)
        case .bucketComplete: return ("bucket \(i) complete", "communication", bytes)
        case .controlAllreduce: return ("control values allreduce", "communication", step)
        case .report: return ("report", "between steps", step)
        }
    }
}

/// The top level of a trace file: events, and what Perfetto shows as the trace's metadata (`otherData`).
struct TraceDocument: Encodable {
    struct ClockAlignment: Encodable {
        let rank: Int
        let offsetAtOpen: Microseconds
        let offsetAtClose: Microseconds
        let roundTrip: Microseconds

        enum CodingKeys: String, CodingKey {
            case rank, offsetAtOpen = "offset_us_at_open", offsetAtClose = "offset_us_at_close", roundTrip = "round_trip_us"
        }
    }

    struct OtherData: Encodable {
        var producer = "bpworker --timeline"
        let steps, warmupSteps, worldSize: Int
        let reduction: String
        let droppedEvents: Int
        let clockAlignment: [ClockAlignment]

        enum CodingKeys: String, CodingKey {
            case producer, steps, warmupSteps = "warmup_steps", worldSize = "world_size", reduction,
                 droppedEvents = "dropped_events", clockAlignment = "clock_alignment"
        }
    }

    var displayTimeUnit = "ms"
    let otherData: OtherData
    let traceEvents: [TraceEvent]
}

/// One trace event: metadata ("M", naming a process or thread, no time), complete ("X", a start and a duration) or
/// instant ("i", scoped to its thread by `s: "t"`). Absent fields are left out of the file.
struct TraceEvent: Encodable {
    enum Phase: String, Encodable { case metadata = "M", complete = "X", instant = "i" }

    /// A metadata event's value (`name`, `sort_index` or `labels`), or a timed event's step and what it concerns.
    struct Args: Encodable {
        var name, labels: String?
        var sortIndex, step, layer, bytes: Int?

        enum CodingKeys: String, CodingKey { case name, sortIndex = "sort_index", labels, step, layer, bytes }
    }

    let name: String
    var category: String?
    let phase: Phase
    var scope: String?
    let pid: Int
    let tid: Int
    var ts: Microseconds?
    var dur: Microseconds?
    let args: Args

    enum CodingKeys: String, CodingKey { case name, category = "cat", phase = "ph", scope = "s", pid, tid, ts, dur, args }
}

/// A time in the file: integer nanoseconds written as microseconds with the decimal point moved, so the text is
/// the exact value (a Double of µs holds most thousandths only approximately).
struct Microseconds: Encodable, Equatable {
    let nanoseconds: Int64

    init(_ nanoseconds: Int64) { self.nanoseconds = nanoseconds }

    func encode(to encoder: Encoder) throws {
        var container = encoder.singleValueContainer()
        let magnitude = Decimal(nanoseconds.magnitude)
        try container.encode(Decimal(sign: nanoseconds < 0 ? .minus : .plus, exponent: -3, significand: magnitude))
    }
}
