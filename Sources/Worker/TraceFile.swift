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
        case .report: return ("report", "between steps", "")
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
