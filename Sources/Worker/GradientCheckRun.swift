import Coordinator
import Engine
import Foundation

/// The gradient-check handshake: rank 0 checks backpropagation in float64 on a small batch of its own shard while
/// the others wait for its verdict, so every rank goes on or stops together.
enum GradientCheckRun {
    enum Verdict: Int32 { case pass = 0, warn = 1, fail = 2 }

    /// Returns the verdict every rank received. `reportDirectory`: where rank 0 writes gradcheck.json (nil: nowhere).
    static func run(_ session: Session, _ prepared: Prepared, printJSON: Bool = false, reportDirectory: String?) -> Verdict {
        let config = session.config
        var verdict: [Int32] = [Verdict.pass.rawValue]
        if session.isRoot {
            let count = min(config.gradcheckBatch, prepared.train.count)
            let indices = Array(prepared.sampler.indices(epoch: 0).prefix(count))
            let copy = prepared.model.float64Copy(batchCapacity: count)
            indices.withUnsafeBufferPointer { prepared.train.gather(indices: $0, into: copy.inputs, labels: copy.labels) }
            let report = checkGradients(model: copy, count: count, options: config.gradientCheckOptions)
            if printJSON { print(report.json) } else {
                session.logger.info("\(report.text)")
                if !report.passed {
                    FileHandle.standardError.write(Data("gradient check failed: \(report.failures.joined(separator: "; "))\n".utf8))
                }
            }
            if let reportDirectory {
                try? writeAtomically(Data(report.json.utf8), to: reportDirectory + "/gradcheck.json", durable: false)
            }
            verdict[0] = (report.verdict == .fail ? Verdict.fail : report.verdict == .warn ? .warn : .pass).rawValue
        }
        do {
            try verdict.withUnsafeMutableBufferPointer { (buffer) throws(MPIError) in
                try session.communicator.broadcast(buffer, root: 0)
            }
        } catch {
            session.abort("gradient check verdict: \(error)")
        }
        return Verdict(rawValue: verdict[0]) ?? .fail
    }
}
