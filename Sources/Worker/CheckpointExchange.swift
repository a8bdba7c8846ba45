import Coordinator
import Engine
import Foundation

/// The collective side of checkpoints: what every rank contributes to the file rank 0 writes, and how every rank
/// receives the state rank 0 reads back. The file format itself is `Checkpointer`'s.
struct CheckpointExchange {
    let failure: RunFailure
    let checkpointer: Checkpointer
    let model: Model<Float>
    let optimizer: Optimizer<Float>
    private var session: Session { failure.session }

    /// Writes a checkpoint of `position` and returns its path (on rank 0; the directory on the others). The ranks
    /// gather the optimizer state, which a sharded update leaves current only in each rank's own part, and rank 0
    /// writes the file; the others wait for its verdict. Dropout keeps no state: its masks are drawn per (seed,
    /// epoch, sample).
    ///
    /// A checkpoint that cannot be written (a full disk, a quota, an I/O error, a file that does not verify when read
    /// back) is not fatal here: every rank receives rank 0's reason and the caller decides (`TrainingLoop.checkpoint`).
    /// The previous checkpoints and `latest` are untouched then.
    func save(_ position: inout TrainingPosition, reducer: GradientReducer) throws -> Result<String, CheckpointError> {
        try reducer.gatherUpdateState()
        try shareBuffers(session, model)  // rank 0's running statistics are the ones saved
        var outcome: [UInt8] = []
        if session.isRoot {
            do {
                let path = try checkpointer.save(model: model, optimizer: optimizer, position: position, config: session.config)
                outcome = Array(("+" + path).utf8)
            } catch {
                outcome = Array(("-" + "\(error)").utf8)
            }
        }
        try session.communicator.broadcast(bytes: &outcome, root: 0)
        let text = String(decoding: outcome.dropFirst(), as: UTF8.self)
        guard outcome.first == UInt8(ascii: "+") else { return .failure(CheckpointError(description: text)) }
        if session.isRoot { session.logger.info("checkpoint: \(text) (step \(position.globalStep))") }
        return .success(session.isRoot ? text : checkpointer.directory)
    }

    /// Rank 0 reads and validates the checkpoint at `path`; every rank receives its parameters, optimizer state and
    /// position by broadcast. On another world size or batch the position is carried over by
    /// `TrainingPosition.continued`. A bad file stops every rank during setup.
    /// Returns the position continued here and the checkpoint's own global step (its numbering, which another world
    /// size changes: where the earlier records end).
    static func restore(_ session: Session, model: Model<Float>, optimizer: Optimizer<Float>, from path: String,
                        sampler: ShardSampler) -> (position: TrainingPosition, checkpointStep: Int) {
        var encoded: [UInt8] = []
        session.agree("resume") {
            if session.isRoot {
                let (position, unverified, configuration) = try Checkpointer.load(path: path, model: model, optimizer: optimizer)
                if let mismatch = position.mismatch(worldSize: session.worldSize, batchSize: session.config.batchSize,
                                                    stepsPerEpoch: sampler.stepsPerEpoch, datasetSize: sampler.datasetSize) {
                    throw CheckpointError(description: "\(path): not resumed from it: \(mismatch) (a checkpoint of other data?)")
                }
                if let unverified { session.logger.notice("\(unverified)") }
                // A setting changed on resume (`--set`, or `-c` another file) is the user's to make, but it changes
                // what the rest of the run trains: said, not done silently.
                if let configuration, let saved = try? Configuration.load(text: configuration, origin: path, overrides: []) {
                    let changes = session.config.changes(since: saved)
                    if !changes.isEmpty {
                        let message = "resume: settings differ from the checkpoint's, and the run continues with the new ones: "
                            + changes.joined(separator: ", ")
                        session.logger.notice("\(message)")
                    }
                }
                encoded = Array(try JSONEncoder().encode(position))
            }
        }
        var optimizerStep = [Int64(optimizer.stepCount)]
        session.agree("resume broadcast") {
            try session.communicator.broadcast(bytes: &encoded, root: 0)
            try broadcastState(session, model)
            for state in optimizer.state { try session.communicator.broadcast(state.buffer, root: 0) }
            try optimizerStep.withUnsafeMutableBufferPointer { (buffer) throws(MPIError) in
                try session.communicator.broadcast(buffer, root: 0)
            }
        }
        optimizer.stepCount = Int(optimizerStep[0])
        let saved = session.agree("resume") { try JSONDecoder().decode(TrainingPosition.self, from: Data(encoded)) }
        let config = session.config
        let (position, sameShape) = saved.continued(worldSize: session.worldSize, batchSize: config.batchSize,
                                                    stepsPerEpoch: sampler.stepsPerEpoch)
        if !sameShape {
            let oldGlobal = saved.batchSize * saved.worldSize
            let ranks = session.worldSize == 1 ? "1 rank" : "\(session.worldSize) ranks"
            let message = "resuming a \(saved.worldSize)-rank checkpoint (batch \(saved.batchSize) per rank) on \(ranks) "
                + "(batch \(config.batchSize)): global batch \(oldGlobal) -> \(sampler.globalBatchSize), "
                + "\(sampler.stepsPerEpoch) steps per epoch; the learning rate stays as configured for the global batch; "
                + "the epoch continues after its first \(position.epochStep * sampler.globalBatchSize) samples"
            session.logger.info("\(message)")
            if !model.bufferTable.isEmpty && config.batchNorm == .local && saved.batchSize != config.batchSize {
                let note = "model.batchnorm=local: each rank now normalises batches of \(config.batchSize), not "
                    + "\(saved.batchSize), so the run continues but not as it would have on \(saved.worldSize) "
                    + "rank\(saved.worldSize == 1 ? "" : "s") (model.batchnorm=sync normalises over the global batch)"
                session.logger.notice("\(note)")
            }
        }
        if sameShape && position.globalStep != saved.globalStep {
            let message = "the checkpoint's step \(saved.globalStep) is epoch \(saved.epoch + 1) at step \(saved.epochStep) of "
                + "another training set's epochs; with \(sampler.stepsPerEpoch) steps per epoch here the run continues at step "
                + "\(position.globalStep) of \(config.epochs * sampler.stepsPerEpoch), and the schedule with it"
            session.logger.notice("\(message)")
        }
        let resumed = "resumed from \(path): step \(position.globalStep), epoch \(position.epoch + 1) at step "
            + "\(position.epochStep)/\(sampler.stepsPerEpoch)" + (position.epochStep == sampler.stepsPerEpoch ? " (its evaluation next)" : "")
            + ", optimizer step \(optimizer.stepCount)"
        session.logger.info("\(resumed)")
        return (position, saved.globalStep)
    }
}
