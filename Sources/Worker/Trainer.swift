import Coordinator
import Engine
import Foundation
import Logging

/// `bpworker train`, from setup to the final status: every way a run can end comes back here as a `RunOutcome`,
/// and `finish` writes it to status.json, so a monitor always sees how a run ended. (Only a process killed
/// outright, or a job torn down by MPI_Abort from a rank that could not write, leaves `training` behind; then the
/// heartbeat files stop.)
enum Trainer {
    /// Runs the job and returns how it ended. Setup failures (bad configuration, data, checkpoint, a run
    /// directory that holds a run, ranks that disagree) end every rank during setup with exit 1 and write nothing.
    static func train(_ session: Session, resume: String?, overwrite: Bool) -> (RunOutcome, TrainingLoop?) {
        let config = session.config
        let mode: RunDirectory.StartMode = resume != nil ? .resume : overwrite ? .overwrite : .fresh
        let existing = session.agree("run directory") { () throws -> RunDirectory? in
            guard session.isRoot else { return nil }
            let directory = RunDirectory.inspect(session.runDirectory)
            try directory.checkStart(mode)
            return directory
        }
        let aborter = Aborter(communicator: session.communicator, runDirectory: session.runDirectory)
        // Synchronized batch norm's sums are built into the model; what watches them is attached below.
        let batchNormSums = config.batchNorm == .sync && session.worldSize > 1
            ? CrossRankSums(communicator: session.communicator) { error in aborter.abort("synchronized batch norm: \(error)") }
            : nil
        let prepared = Setup.prepare(session, crossRankReducer: batchNormSums)
        let model = prepared.model
        let optimizer = session.agree("optimizer") {
            try Optimizer<Float>(config: config.optimizerConfig, parameterCount: model.parameterCount)
        }
        // What it takes to use the model without this configuration, in model.safetensors and every checkpoint.
        let description = ModelDescription(spec: model.spec, data: prepared.train, normalization: config.normalization)
        let checkpointer = Checkpointer(runDirectory: session.runDirectory, keep: config.checkpointKeep,
                                        modelMetadata: description.metadata, crashAtStep: prepared.hooks.checkpointCrashStep)
        let exchange = CheckpointExchange(session: session, checkpointer: checkpointer, model: model, optimizer: optimizer)
        var position = TrainingPosition(worldSize: session.worldSize, batchSize: config.batchSize)
        if let resume {
            let path = resume == "latest" ? session.agree("resume") { try checkpointer.latest() } : resume
            position = exchange.restore(from: path, sampler: prepared.sampler)
        }
        commitRunDirectory(session, previous: existing, overwrite: mode == .overwrite)
        announce(session, prepared)

        let reducer = GradientReducer(
            communicator: session.communicator, gradients: model.gradients,
            tensorRanges: model.parameterTable.map(\.range), bucketElements: config.bucketKiB * 1024 / MemoryLayout<Float>.stride,
            strategy: config.reduction, control: model.control, nonFiniteSlot: Setup.ControlSlot.nonFinite,
            provenFinite: { model.gradientsProvenFinite(in: $0) })
        let buckets = reducer.buckets.count
        let how = config.reduction == .sharded
            ? "each rank updates 1/\(session.worldSize) of the parameters, then they are gathered"
            : "every rank applies the summed gradients"
        session.logger.info("gradients: \(buckets) bucket\(buckets == 1 ? "" : "s") (training.bucket_kib=\(config.bucketKiB)), averaged over \(session.worldSize) rank\(session.worldSize == 1 ? "" : "s"); training.reduction=\(config.reduction.rawValue): \(how)")

        let metrics = session.isRoot ? MetricsLog(path: session.runDirectory + "/metrics.jsonl", append: resume != nil,
                                                  tensorBoard: openTensorBoard(session)) : nil
        let progress = Progress(session: session, prepared: prepared, metrics: metrics)
        progress.recordStart(resumed: resume != nil, step: position.globalStep, model: model)
        progress.status.step = position.globalStep
        progress.writeStatus()
        // From here on an abort marks the run failed: rank 0 from what it knows, the others in the shared file.
        let runDirectory = session.runDirectory, rank = session.rank
        session.onAbort = session.isRoot
            ? { message in progress.finish(state: .failed, message: message) }
            : { message in RunStatus.markFailed(runDirectory, message: "rank \(rank): \(message)") }
        let watchdog = Watchdog(timeout: config.watchdogSeconds, rank: session.rank, worldSize: session.worldSize,
                                runDirectory: runDirectory) { report in aborter.abort(report) }
        watchdog.start()
        let timeline = config.timelineSteps > 0 ? Timeline(session: session, model: model, reducer: reducer, runSteps: prepared.totalSteps,
                                                                  clockSkewSeconds: prepared.hooks.clockSkewSeconds) : nil
        if let sums = batchNormSums, model.crossRankReducer != nil {
            // Synchronized batch norm: its sums are collectives inside the passes, watched like every other.
            var reducing: Int64 = 0
            sums.willReduce = {
                watchdog.enter(.batchNormSync)
                reducing = timeline?.begin() ?? 0
            }
            sums.didReduce = {
                timeline?.end(.batchNormSync, since: reducing)
                watchdog.leave()
            }
            session.logger.info("batch norm: synchronized over \(session.worldSize) ranks (model.batchnorm=sync)")
        } else if !model.bufferTable.isEmpty && session.worldSize > 1 {
            session.logger.info("batch norm: each rank normalises its own batch; rank 0's running statistics are evaluated, checkpointed and saved (model.batchnorm=local, as PyTorch DDP)")
        }
        let loop = TrainingLoop(session: session, prepared: prepared, optimizer: optimizer, reducer: reducer,
                                exchange: exchange, watchdog: watchdog, progress: progress,
                                hooks: prepared.hooks, position: position)
        loop.timeline = timeline

        if config.gradcheckEnabled {
            // Synchronized batch norm couples the ranks: a check on rank 0 alone would not reach its cross-rank terms.
            let distributed = model.crossRankReducer != nil
            if resume != nil {
                session.logger.info("gradient check: skipped on resume (it runs only before a run's first step)")
            } else {
                if distributed { session.logger.info("gradient check: distributed over every rank, since model.batchnorm=sync") }
                if GradientCheckRun.run(session, prepared, distributed: distributed, watchdog: watchdog, reportDirectory: runDirectory) == .fail
                    && config.gradcheckPolicy == .abort {
                    let message = "gradient check failed\(distributed ? "" : " on rank 0"); stopping every rank (gradcheck.policy=abort)"
                    session.logger.error("\(message)")
                    return (.failed("gradient check failed (gradcheck.policy=abort)"), loop)
                }
            }
        }
        do {
            return (try loop.run(), loop)
        } catch {
            session.abort("training failed at step \(loop.position.globalStep): \(error)")
        }
    }

    /// The one way out of `train`: records the outcome in status.json (rank 0), saves the model of a finished run,
    /// and ends every rank with the outcome's exit code.
    static func finish(_ session: Session, _ outcome: RunOutcome, loop: TrainingLoop?) -> Never {
        if let loop, let timeline = loop.timeline {
            // A run that ended inside the timeline's window writes what it recorded (every outcome here is reached
            // by every rank at the same step, so the gather is safe).
            loop.watchdog.enter(.timeline, step: loop.position.globalStep)
            do { try timeline.close() } catch { session.abort("timeline: \(error)") }
            loop.watchdog.leave()
        }
        if let loop {
            if outcome.state == .finished {
                reportPeakMemory(session)
                if session.isRoot {
                    saveModel(session, loop.prepared.model, step: loop.position.globalStep,
                              description: loop.exchange.checkpointer.modelMetadata)
                }
                session.agree("saving the model") {}
            }
            loop.progress.status.step = loop.position.globalStep
            loop.progress.finish(state: outcome.state, message: outcome.message)
        }
        session.finish(exitCode: outcome.exitCode)
    }

    /// Once every rank has agreed that setup succeeded: rank 0 creates the run directory, removes the previous
    /// run's files under `--overwrite`, and writes the resolved configuration. Before this point a failed start
    /// has written nothing.
    private static func commitRunDirectory(_ session: Session, previous: RunDirectory?, overwrite: Bool) {
        session.agree("run directory \(session.runDirectory)") {
            guard session.isRoot else { return }
            try FileManager.default.createDirectory(atPath: session.runDirectory, withIntermediateDirectories: true)
            if overwrite, let previous, case let removed = try previous.removePreviousRun(), !removed.isEmpty {
                session.logger.info("--overwrite: removed the previous run's \(removed.joined(separator: ", ")) from \(session.runDirectory)")
            }
            try writeAtomically(Data(session.config.yaml.utf8), to: session.runDirectory + "/config.yaml")
        }
    }

    private static func announce(_ session: Session, _ prepared: Prepared) {
        let config = session.config
        let logger = session.logger
        let resolved = config.yaml.split(separator: "\n").map { "  " + $0 }.joined(separator: "\n")
        logger.info("configuration (also in \(session.runDirectory)/config.yaml):\n\(resolved)")
        let layout = session.layout
        let nodes = Dictionary(grouping: layout.nodeNames, by: { $0 }).sorted { $0.key < $1.key }
            .map { "\($0.key): \($0.value.count)" }.joined(separator: ", ")
        let mode = session.isLocal ? "local mode (no MPI launcher)" : "MPI"
        logger.info("bpworker: \(session.worldSize) rank\(session.worldSize == 1 ? "" : "s") on \(layout.nodeCount) node\(layout.nodeCount == 1 ? "" : "s") (\(nodes)), \(mode), \(session.blasThreads) BLAS thread\(session.blasThreads == 1 ? "" : "s") per rank, \(BLASKernels.description)")
        logger.info("data: \(grouped(prepared.train.count)) training samples (\(config.trainFeatures)), \(grouped(prepared.test.count)) test samples, \(prepared.model.outputWidth) classes, \(prepared.train.featureCount) inputs")
        logger.info("model: \(prepared.model.spec.summary), \(grouped(prepared.model.parameterCount)) parameters")
        if prepared.model.spec.layers.contains(where: { $0.isSpatial || $0 == .flatten }) || prepared.model.spec.inputShape.count > 1 {
            // One line per layer with its output shape, as torchinfo prints it.
            let input = prepared.model.spec.inputShape.map(String.init).joined(separator: ", ")
            let lines = prepared.model.layerSummary.map { "  " + $0 }.joined(separator: "\n")
            logger.info("layers (input [\(config.batchSize), \(input)]):\n\(lines)")
        }
        logger.info("memory: rank 0 expects \(prepared.memory.summary)")
        logger.info("batch: \(config.batchSize) per rank x \(session.worldSize) rank\(session.worldSize == 1 ? "" : "s") = global batch \(prepared.sampler.globalBatchSize); \(prepared.sampler.stepsPerEpoch) steps per epoch (\(config.remainder.rawValue) remainder), \(config.epochs) epochs")
        if let augmentation = prepared.augmentation {
            let what = [augmentation.cropPadding > 0 ? "random \(augmentation.height)x\(augmentation.width) crops of the image padded with \(augmentation.cropPadding) zeros" : nil,
                        augmentation.flip ? "random horizontal flips" : nil].compactMap { $0 }.joined(separator: ", ")
            logger.info("augmentation: \(what), drawn per (seed, epoch, sample); training batches only")
        }
        logger.info("optimizer: \(config.optimizer.rawValue), lr \(config.learningRate) for the global batch, \(config.schedule.rawValue) schedule")
        logger.info("run directory: \(session.runDirectory)")
    }

    /// Rank 0's TensorBoard event file for this process start; a run goes on without one (with a warning) when it
    /// cannot be created: TensorBoard is a view, metrics.jsonl the record.
    private static func openTensorBoard(_ session: Session) -> TensorBoardWriter? {
        do { return try TensorBoardWriter(directory: session.runDirectory + "/tensorboard") } catch {
            session.logger.warning("TensorBoard event file not written: \(error)")
            return nil
        }
    }

    /// The largest peak resident set size of any rank (getrusage), for capacity planning and the benchmarks.
    private static func reportPeakMemory(_ session: Session) {
        var usage = rusage()
        getrusage(RUSAGE_SELF.rawValue, &usage)
        var peak = [Int64(usage.ru_maxrss) * 1024]
        do {
            try peak.withUnsafeMutableBufferPointer { (b) throws(MPIError) in try session.communicator.allreduce(b, op: .max) }
        } catch {
            return
        }
        let mine = Double(usage.ru_maxrss) / 1024
        if session.isRoot {
            session.logger.info("peak memory: \(String(format: "%.0f", Double(peak[0]) / 1_048_576)) MiB on the largest rank (rank 0: \(String(format: "%.0f", mine)) MiB)")
        }
    }

    private static func saveModel(_ session: Session, _ model: Model<Float>, step: Int, description: [String: String]) {
        let path = session.runDirectory + "/model.safetensors"
        do {
            try writeParameters(of: model, to: path, metadata: description.merging([
                "format": ModelDescription.modelFormat, "format_version": ModelDescription.modelFormatVersion, "step": "\(step)",
                "world_size": "\(session.worldSize)", "model": model.spec.summary, "config": session.config.yaml,
            ]) { _, own in own })
            session.logger.info("saved parameters to \(path) (PyTorch nn.Sequential state_dict names)")
        } catch {
            session.abort("saving \(path): \(error)")
        }
    }
}

/// Lets the watchdog thread end the job. @unchecked Sendable: the watchdog only reads `rank` (immutable) and calls
/// `abort`, which marks the run failed and calls MPI_Abort, meant precisely for ending a job from wherever the
/// trouble is seen.
struct Aborter: @unchecked Sendable {
    let communicator: any Communicator
    let runDirectory: String

    func abort(_ report: String) -> Never {
        FileHandle.standardError.write(Data("[rank \(communicator.rank)] error: \(report)\n".utf8))
        RunStatus.markFailed(runDirectory, message: "rank \(communicator.rank): \(report)")
        communicator.abort(code: 1)
    }
}
