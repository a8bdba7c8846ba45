import Engine
import Foundation

/// What a run directory records, read back for the report: metrics.jsonl (training and test records and the
/// markers), status.json, gradcheck.json and config.yaml. Reads only; a report never changes a run.
struct RunRecords {
    struct Train {
        var step: Int
        var epoch: Int
        var loss: Double
        var accuracy: Double
        var learningRate: Double
        var samplesPerSecond: Double
        var commWaitFraction: Double
    }

    struct Eval {
        var step: Int
        var epoch: Int
        var loss: Double
        var accuracy: Double
        var samples: Int
    }

    /// A `"type": "event"` record: start, resume, checkpoint, skip or end.
    struct Event {
        var kind: String
        var step: Int
        var fields: [String: Any]
        var worldSize: Int? { fields["world_size"] as? Int }
        var state: String? { fields["state"] as? String }
    }

    let directory: String
    var train: [Train] = []
    var eval: [Eval] = []
    var events: [Event] = []
    var status: RunStatus?
    var gradientCheck: GradientCheckReport?
    var configuration: String?
    /// Lines of metrics.jsonl that could not be read (a process killed in the middle of a line leaves one).
    var unreadableLines = 0

    /// Steps where a resume on another world size restarted the count of global steps (it continues from the samples
    /// seen, so steps jump): curves break there instead of drawing a line across the jump.
    var restarts: [Double] {
        var out: [Double] = []
        var worldSize: Int? = nil
        for event in events where event.kind == "start" || event.kind == "resume" {
            if event.kind == "resume", let previous = worldSize, event.worldSize != previous { out.append(Double(event.step)) }
            worldSize = event.worldSize
        }
        return out
    }

    var name: String { URL(fileURLWithPath: directory).standardizedFileURL.lastPathComponent }
    /// The last `start` or `resume` marker: the machine and model this run last ran on.
    var lastStart: Event? { events.last { $0.kind == "start" || $0.kind == "resume" } }

    static func read(_ directory: String) throws(ReportError) -> RunRecords {
        var records = RunRecords(directory: directory)
        let files = FileManager.default
        var isDirectory: ObjCBool = false
        guard files.fileExists(atPath: directory, isDirectory: &isDirectory), isDirectory.boolValue else {
            throw ReportError(description: "\(directory): no such run directory")
        }
        let metricsPath = directory + "/metrics.jsonl"
        let statusPath = RunStatus.path(directory)
        guard files.fileExists(atPath: metricsPath) || files.fileExists(atPath: statusPath) else {
            throw ReportError(description: "\(directory): not a bpworker run directory (no metrics.jsonl or status.json)")
        }
        if let data = files.contents(atPath: metricsPath) {
            for line in data.split(separator: UInt8(ascii: "\n")) where !line.isEmpty {
                guard let object = try? JSONSerialization.jsonObject(with: Data(line)) as? [String: Any] else {
                    records.unreadableLines += 1
                    continue
                }
                records.add(object)
            }
        }
        records.status = try? RunStatus.read(directory)
        if let data = files.contents(atPath: directory + "/gradcheck.json") {
            let decoder = JSONDecoder()
            decoder.nonConformingFloatDecodingStrategy = .convertFromString(
                positiveInfinity: "inf", negativeInfinity: "-inf", nan: "nan")
            records.gradientCheck = try? decoder.decode(GradientCheckReport.self, from: data)
        }
        records.configuration = try? String(contentsOfFile: directory + "/config.yaml", encoding: .utf8)
        return records
    }

    /// Adds one metrics.jsonl record. A resume continues from its checkpoint's step: what the previous process
    /// logged after that step was lost with it and is repeated, so it is dropped here (as TensorBoard drops it).
    mutating func add(_ record: [String: Any]) {
        func number(_ key: String) -> Double { (record[key] as? NSNumber)?.doubleValue ?? .nan }
        func integer(_ key: String) -> Int { (record[key] as? NSNumber)?.intValue ?? 0 }
        let step = integer("step")
        switch record["type"] as? String {
        case "train":
            train.append(Train(step: step, epoch: integer("epoch"), loss: number("loss"), accuracy: number("accuracy"),
                               learningRate: number("lr"), samplesPerSecond: number("samples_per_second"),
                               commWaitFraction: number("comm_wait_fraction")))
        case "eval":
            eval.append(Eval(step: step, epoch: integer("epoch"), loss: number("loss"), accuracy: number("accuracy"),
                             samples: integer("samples")))
        case "event":
            let kind = record["event"] as? String ?? "?"
            if kind == "resume" {
                train.removeAll { $0.step > step }
                eval.removeAll { $0.step > step }
                events.removeAll { $0.step > step && $0.kind != "end" }
            }
            events.append(Event(kind: kind, step: step, fields: record))
        default:
            unreadableLines += 1
        }
    }
}

/// A report that cannot be made: names the directory or file and the reason.
struct ReportError: Error, CustomStringConvertible, Equatable {
    let description: String
}
