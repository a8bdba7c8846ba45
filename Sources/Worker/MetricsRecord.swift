import Foundation

/// One line of RUN_DIR/metrics.jsonl: a training window's averages (`"type": "train"`), a test-set evaluation
/// (`"eval"`) or a marker (`"event"`). The coding keys below are the only place the file's keys are spelled: the
/// writer (`MetricsLog`), the reader (`RunRecords`) and TensorBoard's tags (`TensorBoardWriter.scalars`) all go
/// through these types. Users read the file too, so a key, once written, keeps its name.
enum MetricsRecord: Codable, Equatable {
    case train(Train)
    case eval(Eval)
    case event(Event)

    /// The averages over the ranks and steps of one logging window, at its last step.
    struct Train: Codable, Equatable {
        var epoch, step: Int
        var loss, accuracy, learningRate, samplesPerSecond: Double
        /// The share of the window's time the ranks spent waiting on communication, 0 to 1.
        var commWaitFraction: Double
        /// The share of the window's time the ranks' steps spent waiting for their batches (for the prefetch thread,
        /// or gathering it themselves with `data.prefetch=0`), 0 to 1 (absent in files of older versions).
        var dataWaitFraction: Double?
        /// Since this process started (absent in files of older versions).
        var elapsedSeconds: Double?

        enum CodingKeys: String, CodingKey {
            case epoch, step, loss, accuracy, learningRate = "lr", samplesPerSecond = "samples_per_second",
                 commWaitFraction = "comm_wait_fraction", dataWaitFraction = "data_wait_fraction", elapsedSeconds = "elapsed_seconds"
        }
    }

    /// A test-set evaluation at the end of an epoch.
    struct Eval: Codable, Equatable {
        var epoch, step: Int
        var loss, accuracy: Double
        var samples: Int
        var elapsedSeconds: Double?

        enum CodingKeys: String, CodingKey { case epoch, step, loss, accuracy, samples, elapsedSeconds = "elapsed_seconds" }
    }

    /// A marker for the report: `start` or `resume` carry the machine and the model, `end` the final state.
    struct Event: Codable, Equatable {
        enum Kind: String, Codable { case start, resume, checkpoint, skip, end }

        var kind: Kind
        var step: Int
        var elapsedSeconds: Double?
        // start and resume: the machine and the model
        var worldSize, nodes, blasThreads, parameters, totalSteps, epochs: Int?
        var blas, model: String?
        var layers: [String]?
        // end
        var state: RunStatus.State?
        var message: String?

        var isStart: Bool { kind == .start || kind == .resume }

        init(kind: Kind, step: Int, elapsedSeconds: Double? = nil) {
            self.kind = kind
            self.step = step
            self.elapsedSeconds = elapsedSeconds
        }

        enum CodingKeys: String, CodingKey {
            case kind = "event", step, elapsedSeconds = "elapsed_seconds", worldSize = "world_size", nodes, blas,
                 blasThreads = "blas_threads", model, parameters, layers, totalSteps = "total_steps", epochs, state, message
        }
    }

    private enum Kind: String, Codable { case train, eval, event }
    private enum TypeKey: String, CodingKey { case type }

    var step: Int {
        switch self {
        case .train(let record): record.step
        case .eval(let record): record.step
        case .event(let record): record.step
        }
    }

    /// Reads the `type` and then the record's own keys, all from the same JSON object.
    init(from decoder: Decoder) throws {
        switch try decoder.container(keyedBy: TypeKey.self).decode(Kind.self, forKey: .type) {
        case .train: self = .train(try Train(from: decoder))
        case .eval: self = .eval(try Eval(from: decoder))
        case .event: self = .event(try Event(from: decoder))
        }
    }

    /// Writes the record's keys and its `type` into one JSON object.
    func encode(to encoder: Encoder) throws {
        var container = encoder.container(keyedBy: TypeKey.self)
        switch self {
        case .train(let record):
            try container.encode(Kind.train, forKey: .type)
            try record.encode(to: encoder)
        case .eval(let record):
            try container.encode(Kind.eval, forKey: .type)
            try record.encode(to: encoder)
        case .event(let record):
            try container.encode(Kind.event, forKey: .type)
            try record.encode(to: encoder)
        }
    }

    /// The record as one line of metrics.jsonl, newline included, keys sorted. Throws for a non-finite number, which
    /// JSON cannot hold.
    func line() throws -> Data {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        return try encoder.encode(self) + Data("\n".utf8)
    }

    /// One line of metrics.jsonl; nil for a line that is not a record (a process killed mid-line leaves one).
    init?(line: some DataProtocol) {
        guard let record = try? JSONDecoder().decode(Self.self, from: Data(line)) else { return nil }
        self = record
    }
}
