import Engine
import Foundation

/// RUN_DIR/status.json: what an operator wants to know about a run without reading its log. Rank 0 replaces it
/// atomically at every log interval, checkpoint and change of state.
struct RunStatus: Codable, Equatable {
    enum State: String, Codable { case starting, training, stopped, finished, failed }
    var state: State
    var step: Int
    var totalSteps: Int
    var epoch: Int
    var epochs: Int
    var loss: Double?
    var accuracy: Double?
    var testAccuracy: Double?
    var samplesPerSecond: Double?
    var etaSeconds: Double?
    var lastCheckpoint: String?
    /// The checkpoint this process resumed from, and the newer ones it skipped as damaged ("path: reason" each).
    var resumedFrom: String?
    var skippedCheckpoints: [String]?
    var worldSize: Int
    var message: String?
    var updated: String

    static func path(_ runDirectory: String) -> String { runDirectory + "/status.json" }

    /// Returns false when neither way of writing worked (the caller may say so once).
    @discardableResult
    func write(to runDirectory: String) -> Bool {
        // A run directory moved away while the job ran: its status goes where the directory went (rank 0 holds its
        // lock file open), never into whatever now has its path.
        var runDirectory = runDirectory
        if !RunDirectoryIdentity.allowsWrite(to: Self.path(runDirectory)) {
            guard let moved = RunDirectoryLock.movedDirectory() else { return false }
            runDirectory = moved
        }
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        guard let data = try? encoder.encode(self) else { return false }
        // Status is informative: a failed write must not stop training, and it need not survive a power loss
        // (the next interval rewrites it), so it skips the fsyncs that made every log interval 2 ms longer.
        if (try? writeAtomically(data, to: Self.path(runDirectory), durable: false)) != nil { return true }
        // A full disk refuses the new file an atomic replace needs, and the run's end ("failed: checkpoints could not be
        // written") was lost, leaving "training". The file's own block holds a status: rewrite it in place.
        let fd = open(Self.path(runDirectory), O_WRONLY | O_CLOEXEC)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        let written = data.withUnsafeBytes { pwrite(fd, $0.baseAddress!, $0.count, 0) }
        return written == data.count && ftruncate(fd, off_t(data.count)) == 0
    }

    static func read(_ runDirectory: String) throws -> RunStatus {
        let path = path(runDirectory)
        var isDirectory: ObjCBool = false
        guard FileManager.default.fileExists(atPath: runDirectory, isDirectory: &isDirectory), isDirectory.boolValue else {
            throw RunStatusError(description: "\(runDirectory): no such run directory")
        }
        guard let data = FileManager.default.contents(atPath: path) else {
            throw RunStatusError(description: "\(path): no status (is this a bpworker run directory?)")
        }
        do { return try JSONDecoder().decode(RunStatus.self, from: data) } catch let error as DecodingError {
            throw RunStatusError(description: "\(path): unreadable status: \(Self.reason(error))")
        }
    }

    /// What is wrong with a status file, in words rather than the decoder's.
    private static func reason(_ error: DecodingError) -> String {
        func at(_ path: [CodingKey]) -> String { path.map(\.stringValue).joined(separator: ".") }
        switch error {
        case .dataCorrupted(let context) where context.codingPath.isEmpty: return "not valid JSON (truncated or damaged?)"
        case .dataCorrupted(let context): return "'\(at(context.codingPath))' has a value it cannot have"
        case .keyNotFound(let key, let context): return "'\(at(context.codingPath + [key]))' is missing"
        case .typeMismatch(_, let context), .valueNotFound(_, let context):
            return context.codingPath.isEmpty ? "not a JSON object" : "'\(at(context.codingPath))' has the wrong type"
        @unknown default: return "\(error)"
        }
    }

    /// Marks the run in `runDirectory` failed with `message`, keeping what status.json said otherwise: for a rank
    /// other than 0, or the watchdog thread, that ends the job and has no fresher status of its own. Best effort:
    /// the job is being torn down.
    static func markFailed(_ runDirectory: String, message: String, stepsDone: Int? = nil) {
        guard var status = try? read(runDirectory) else { return }
        guard status.state == .training || status.state == .starting else { return }
        if let stepsDone { status.step = max(status.step, stepsDone) }
        status.state = .failed
        status.message = message
        status.etaSeconds = nil
        status.updated = now
        status.write(to: runDirectory)
    }

    /// The epoch the run is in (1-based), or last finished: from the steps done, as `epoch` means the epoch under way
    /// while training and the next one after an evaluation (a run that ended on its target after epoch 1 of 5 showed
    /// "epoch 2/5"). Never overflows, whatever a damaged file holds.
    var shownEpoch: Int {
        guard epochs > 0, totalSteps > 0, step >= 0 else { return max(0, min(epoch, max(epochs, 0) - 1)) + 1 }
        let perEpoch = max(1, totalSteps / epochs)
        let (whole, part) = step.quotientAndRemainder(dividingBy: perEpoch)
        return max(1, min(epochs, whole + (part == 0 ? 0 : 1)))
    }

    /// A few lines for people.
    var text: String {
        var lines = ["state: \(state.rawValue)\(message.map { " (\($0))" } ?? "")",
                     "step \(grouped(step))/\(grouped(totalSteps)), epoch \(shownEpoch)/\(epochs), "
                        + "\(worldSize) rank\(worldSize == 1 ? "" : "s")"]
        var progress: [String] = []
        if let loss { progress.append("loss \(lossText(loss))") }
        if let accuracy { progress.append("train accuracy \(percent(accuracy))") }
        if let testAccuracy { progress.append("test accuracy \(percent(testAccuracy))") }
        if let samplesPerSecond { progress.append("\(groupedRounded(samplesPerSecond)) samples/s") }
        if let etaSeconds, state == .training { progress.append("ETA \(duration(etaSeconds))") }
        if !progress.isEmpty { lines.append(progress.joined(separator: ", ")) }
        lines.append("last checkpoint: \(lastCheckpoint ?? "none")")
        lines.append("updated: \(updated)")
        return lines.joined(separator: "\n")
    }

    static var now: String { timestamp(Date()) }

    /// `date` as status.json writes it (ISO 8601), through one formatter: making one costs more than a status
    /// write. Only rank 0's training thread writes the status.
    static func timestamp(_ date: Date) -> String { timestampFormatter.string(from: date) }
    nonisolated(unsafe) private static let timestampFormatter = ISO8601DateFormatter()
}

/// A status.json that is missing or cannot be read.
struct RunStatusError: Error, CustomStringConvertible, Equatable {
    let description: String
}
