import Engine
import Foundation

/// What a run directory records, read back for the report: metrics.jsonl (training and test records and the
/// markers), status.json, gradcheck.json and config.yaml. Reads only; a report never changes a run.
struct RunRecords {
    typealias Train = MetricsRecord.Train
    typealias Eval = MetricsRecord.Eval
    typealias Event = MetricsRecord.Event

    let directory: String
    var train: [Train] = []
    var eval: [Eval] = []
    var events: [Event] = []
    var status: RunStatus?
    var gradientCheck: GradientCheckReport?
    var configuration: String?
    /// Lines of metrics.jsonl that could not be read (a process killed in the middle of a line leaves one).
    var unreadableLines = 0

    init(directory: String) {
        self.directory = directory
    }

    /// Steps where a resume on another world size restarted the count of global steps (it continues from the samples
    /// seen, so steps jump): curves break there instead of drawing a line across the jump.
    var restarts: [Double] {
        var out: [Double] = []
        var worldSize: Int? = nil
        for event in events where event.isStart {
            if event.kind == .resume, let previous = worldSize, event.worldSize != previous { out.append(Double(event.step)) }
            worldSize = event.worldSize
        }
        return out
    }

    var name: String { URL(fileURLWithPath: directory).standardizedFileURL.lastPathComponent }
    /// The last `start` or `resume` marker: the machine and model this run last ran on.
    var lastStart: Event? { events.last { $0.isStart } }

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
        if let data = files.contents(atPath: metricsPath) { records.add(lines: data) }
        records.status = try? RunStatus.read(directory)
        records.readSideFiles()
        return records
    }

    /// Reads gradcheck.json and config.yaml, which are small and written apart from metrics.jsonl.
    mutating func readSideFiles() {
        if let data = FileManager.default.contents(atPath: directory + "/gradcheck.json") {
            let decoder = JSONDecoder()
            decoder.nonConformingFloatDecodingStrategy = .convertFromString(
                positiveInfinity: "inf", negativeInfinity: "-inf", nan: "nan")
            gradientCheck = try? decoder.decode(GradientCheckReport.self, from: data)
        }
        configuration = try? String(contentsOfFile: directory + "/config.yaml", encoding: .utf8)
    }

    /// Adds the records of metrics.jsonl's lines, in order.
    mutating func add(lines data: Data) {
        for line in data.split(separator: UInt8(ascii: "\n")) where !line.isEmpty {
            guard let record = MetricsRecord(line: line) else {
                unreadableLines += 1
                continue
            }
            add(record)
        }
    }

    /// Adds one metrics.jsonl record. A resume continues from its checkpoint's step: what the previous process
    /// logged after that step was lost with it and is repeated, so it is dropped here (as TensorBoard drops it).
    mutating func add(_ record: MetricsRecord) {
        switch record {
        case .train(let record): train.append(record)
        case .eval(let record): eval.append(record)
        case .event(let event):
            if event.kind == .resume {
                let step = event.step
                train.removeAll { $0.step > step }
                eval.removeAll { $0.step > step }
                events.removeAll { $0.step > step && $0.kind != .end }
            }
            events.append(event)
        }
    }
}

/// A report that cannot be made: names the directory or file and the reason.
struct ReportError: Error, CustomStringConvertible, Equatable {
    let description: String
}
