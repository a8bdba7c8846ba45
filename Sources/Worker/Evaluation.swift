import Coordinator
import Engine
import Foundation

/// Exact evaluation: every test sample once across all ranks, sums and counts reduced once.
enum Evaluation {
    /// - Parameter progressed: called after each batch (the watchdog's clock restarts there: `PhaseRunner.progressed`).
    /// - Parameter beforeSums: a test hook's stall (`BPWORKER_TEST_STALL=RANK:0:SECONDS:eval`).
    static func evaluate(_ session: Session, _ model: Model<Float>, on data: Dataset, progressed: () -> Void = {},
                         beforeSums: () -> Void = {}) throws -> BatchResult {
        let indices = ShardSampler.evaluationIndices(datasetSize: data.count, rank: session.rank, worldSize: session.worldSize)
        var local = BatchResult()
        try indices.withUnsafeBufferPointer { all in
            var start = 0
            while start < all.count {
                let count = min(model.batchCapacity, all.count - start)
                try data.gather(indices: UnsafeBufferPointer(rebasing: all[start..<(start + count)]), into: model.inputs, labels: model.labels)
                local = local + model.forward(count: count, mode: .eval)
                start += count
                progressed()
            }
        }
        beforeSums()
        var totals = [local.lossSum, Double(local.correct), Double(local.count)]
        try totals.withUnsafeMutableBufferPointer { (buffer) throws(MPIError) in
            // Under `eval`, the watch times the wait for the other ranks (in training, the Watchdog does).
            try SetupWatch.waiting(session.setupWatch, in: "evaluation sums") { () throws(MPIError) in
                try session.communicator.allreduce(buffer, op: .sum)
            }
        }
        return BatchResult(lossSum: totals[0], correct: Int(totals[1]), count: Int(totals[2]))
    }

    /// `bpworker eval`: loads saved parameters on rank 0, broadcasts them and evaluates on the test set.
    static func run(_ session: Session, parametersPath: String) {
        // Rank 0 reads the parameters file whole (a checkpoint with its optimizer state) after the memory check.
        let size = (try? FileManager.default.attributesOfItem(atPath: parametersPath)[.size] as? Int) ?? 0
        let prepared = Setup.prepare(session, training: false,
                                     extraReads: [.init(name: "the parameters file, read whole", bytes: Double(size))])
        let model = prepared.model
        session.agree("parameters \(parametersPath)") {
            if session.isRoot, let note = try loadParameters(into: model, from: parametersPath) { session.logger.notice("\(note)") }
        }
        session.agree("parameters") { try broadcastState(session, model) }
        let test = preprocessing(session, of: parametersPath, model: model, test: prepared.test)
        report(session, model, on: test, source: "parameters \(parametersPath)")
    }

    /// `bpworker eval` runs under a `SetupWatch` from its start to its sums: no Watchdog runs there, and a rank frozen
    /// in its setup or its evaluation left the others waiting for ever.
    static func watch(_ session: Session) {
        session.setupWatch = SetupWatch(timeout: session.config.watchdogSeconds, rank: session.rank,
                                        communicator: session.communicator, stage: "eval")
    }

    /// `bpworker eval`'s result line: the exact test accuracy and loss of `model` on `test`, and where the model came from.
    static func report(_ session: Session, _ model: Model<Float>, on test: Dataset, source: String) {
        do {
            let hooks = (try? TestHooks.fromEnvironment(rank: session.rank)) ?? TestHooks()
            let result = try evaluate(session, model, on: test, beforeSums: { hooks.beforeEvaluationSums() })
            let summary = "eval: test accuracy \(percent(Double(result.correct) / Double(result.count))) "
                + "(\(grouped(result.correct))/\(grouped(result.count))), loss \(String(format: "%.4f", result.loss)), \(source)"
            session.logger.info("\(summary)")
        } catch {
            session.abort("evaluation failed: \(error)")
        }
    }
}
