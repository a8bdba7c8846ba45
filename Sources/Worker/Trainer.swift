import Coordinator
import Engine
import Foundation
import Logging

/// `bpworker train`, from setup to the final status: every way a run can end comes back here as a `RunOutcome`,
/// and `finish` writes it to status.json, so a monitor always sees how a run ended. (Only a process killed
/// outright, or a job torn down by MPI_Abort from a rank that could not write, leaves `training` behind; then the
/// heartbeat files stop.)
enum Trainer {
    /// Builds the run, checks its gradients if asked, runs it and returns how it ended. Setup failures (bad
    /// configuration, data, checkpoint, a run directory that holds a run, ranks that disagree) end every rank during
    /// setup with exit 1 and write nothing.
    static func train(_ session: Session, resume: String?, overwrite: Bool) -> (RunOutcome, TrainingLoop) {
        let (loop, failure) = setUp(session, resume: resume, overwrite: overwrite)
        if let failed = checkGradients(session, loop.prepared, resumed: resume != nil, phases: loop.phases, failure: failure) {
            return (failed, loop)
        }
        do {
            return (try loop.run(), loop)
        } catch {
            failure.abort("training failed at step \(loop.position.globalStep): \(error)")
        }
    }

    /// Builds every part of the run, in order, each through its initialiser with what it needs; from the run
    /// directory's commit on, failures are recorded through the returned `RunFailure`.
    static func setUp(_ session: Session, resume: String?, overwrite: Bool) -> (TrainingLoop, RunFailure) {
        let config = session.config
        // Until the run's Watchdog starts (it needs the run directory for its heartbeats), setup's waits are timed.
        session.setupWatch = SetupWatch(timeout: config.watchdogSeconds, rank: session.rank, communicator: session.communicator)
        let mode: RunDirectory.StartMode = resume != nil ? .resume : overwrite ? .overwrite : .fresh
        let existing = session.agree("run directory") { () throws -> RunDirectory? in
            guard session.isRoot else { return nil }
            try RunDirectoryLock.takeIfPresent(session.runDirectory)
            let directory = RunDirectory.inspect(session.runDirectory)
            try directory.checkStart(mode)
            return directory
        }
        let plan = Setup.plan(session)
        // The watchdog and the timeline's recorder come before the model: synchronized batch norm's sums, inside its
        // passes, report to both. Neither writes anything before it is started.
        let aborter = Aborter(communicator: session.communicator, runDirectory: session.runDirectory)
        let watchdog = Watchdog(timeout: config.watchdogSeconds, rank: session.rank, worldSize: session.worldSize,
                                runDirectory: session.runDirectory) { report, step in aborter.abort(report, stepsDone: step) }
        let buckets = gradientBuckets(config, plan.spec)
        let recorder = timelineRecorder(config, plan, buckets: buckets)
        let phases = PhaseRunner(watchdog: watchdog, recorder: recorder)
        let prepared = Setup.build(session, plan, crossRankReducer: batchNormSums(session, plan, phases, aborter))
        let model = prepared.model
        let optimizer = session.agree("optimizer") {
            try Optimizer<Float>(config: config.optimizerConfig, parameterCount: model.parameterCount)
        }
        let restored = resume.map { restore(session, from: $0, prepared, optimizer) }
        let position = restored?.position ?? TrainingPosition(worldSize: session.worldSize, batchSize: config.batchSize)
        commitRunDirectory(session, previous: existing, mode: mode)
        RunDirectoryIdentity.record(session.runDirectory)
        announce(session, prepared, buckets: buckets)

        let reducer = makeGradientReducer(
            strategy: config.reduction, communicator: session.communicator, buckets: buckets, gradients: model.gradients,
            parameters: model.parameters, update: optimizer, control: model.control,
            nonFiniteSlot: StepControl.Slot.nonFinite.rawValue, provenFinite: { model.gradientsProvenFinite(in: $0) },
            observer: recorder.map { BucketTimes(recorder: $0, buckets: buckets.count, ranks: session.worldSize) })
        let progress = startProgress(session, prepared, resuming: restored.map { ($0.choice, $0.checkpointStep) }, at: position)
        let failure = RunFailure(session: session, progress: progress)
        aborter.recordFailures(with: failure)
        let hooks = prepared.hooks
        let cursor = ReadCursor()
        let batches = BatchPrefetcher(dataset: prepared.train, batchSize: config.batchSize, stepsPerEpoch: prepared.sampler.stepsPerEpoch,
                                      depth: config.dataPrefetch, augmentation: prepared.augmentation, cursor: cursor,
                                      beforeRead: { hooks.duringRead(step: $0) })
        watchdog.start(dataRead: { [train = prepared.train] in describeRead(of: train, at: cursor) })
        session.setupWatch?.stop()
        session.setupWatch = nil
        let timeline = recorder.map {
            Timeline(session: session, recorder: $0, model: model, buckets: buckets, clockSkewSeconds: hooks.clockSkewSeconds)
        }
        let checkpointer = Checkpointer(runDirectory: session.runDirectory, keep: config.checkpointKeep,
                                        modelMetadata: modelDescription(session, prepared).metadata,
                                        crashAtStep: hooks.checkpointCrashStep, corruptAtStep: hooks.checkpointCorruptStep)
        let loop = TrainingLoop(
            session: session, prepared: prepared, batches: batches, reducer: reducer, phases: phases, timeline: timeline,
            checkpoints: CheckpointExchange(failure: failure, checkpointer: checkpointer, model: model, optimizer: optimizer),
            progress: progress, hooks: hooks, position: position)
        return (loop, failure)
    }

    /// The one way out of `train`: writes the timeline of a run that ended inside its window, records the outcome in
    /// status.json (rank 0), saves the model of a finished run, and ends every rank with the outcome's exit code.
    static func finish(_ session: Session, _ outcome: RunOutcome, loop: TrainingLoop) -> Never {
        let failure = loop.checkpoints.failure
        if let timeline = loop.timeline {
            // Every outcome here is reached by every rank at the same step, so the gather is safe.
            loop.phases.beginStep(loop.position.globalStep)
            do { try loop.phases.watched(.timeline) { try timeline.close() } } catch { failure.abort("timeline: \(error)") }
        }
        if outcome.state == .finished {
            // Watched, as every collective of the run: a rank stalled in the last checkpoint left rank 0 waiting here
            // for ever.
            loop.prepared.hooks.atFinish(step: loop.position.globalStep - 1)
            loop.phases.watched(.report) { reportPeakMemory(session) }
            if session.isRoot {
                saveModel(session, loop.prepared.model, step: loop.position.globalStep,
                          description: loop.checkpoints.checkpointer.modelMetadata, failure: failure)
            }
            loop.phases.watched(.checkpoint) { failure.agree("saving the model") {} }
        }
        loop.progress.status.step = loop.position.globalStep
        loop.prepared.hooks.atFinalize(step: loop.position.globalStep - 1)
        loop.progress.finish(state: outcome.state, message: outcome.message)
        // Watched to the end: a rank stalled in rank 0's last writes, or frozen before MPI_Finalize, left the others in
        // MPI_Finalize for ever.
        loop.phases.watched(.finalize) {
            do { try session.communicator.finalize() } catch { session.abort("MPI_Finalize: \(error)") }
        }
        exit(outcome.exitCode)
    }

    // MARK: - The parts of a run

    /// What a batch's read is reading, for the watchdog: the sample, the data set's key and the file that holds it.
    private static func describeRead(of train: Dataset, at cursor: ReadCursor) -> String {
        let sample = cursor.sample.load(ordering: .relaxed)
        guard sample >= 0 else { return "data.train_features=\(train.name)" }
        return "sample \(sample) of data.train_features, in \(train.file(ofSample: sample))"
    }

    /// The reducer's buckets, planned from the model's layout before the model exists (`training.bucket_kib`).
    private static func gradientBuckets(_ config: Configuration, _ spec: ModelSpec) -> GradientBuckets {
        let tensors = spec.parameterTable
        return GradientBuckets(tensorRanges: tensors.map(\.range), bucketElements: config.bucketKiB * 1024 / MemoryLayout<Float>.stride,
                               totalCount: tensors.last.map { $0.offset + $0.count } ?? 0)
    }

    /// `--timeline`'s recorder, sized for its window (nil without `timeline.steps`).
    private static func timelineRecorder(_ config: Configuration, _ plan: Setup.Plan, buckets: GradientBuckets) -> TimelineRecorder? {
        guard config.timelineSteps > 0 else { return nil }
        return TimelineRecorder(capacity: Timeline.capacity(steps: config.timelineSteps, runSteps: plan.sampler.stepsPerEpoch * config.epochs,
                                                            layers: plan.spec.layers.count, buckets: buckets.count))
    }

    /// Synchronized batch norm's sums over the ranks, watched and recorded as the phase `batchNormSync`; nil when each
    /// rank normalises its own batch (`model.batchnorm=local`, one rank, or no batch norm).
    private static func batchNormSums(_ session: Session, _ plan: Setup.Plan, _ phases: PhaseRunner,
                                      _ aborter: Aborter) -> CrossRankSums? {
        guard session.config.batchNorm == .sync, !plan.spec.bufferTable.isEmpty, session.worldSize > 1 else { return nil }
        var started: Int64 = 0
        return CrossRankSums(
            communicator: session.communicator,
            willReduce: { started = phases.enter(.batchNormSync) },
            didReduce: { phases.leave(.batchNormSync, since: started) },
            onFailure: { error in aborter.abort("synchronized batch norm: \(error)") })
    }

    /// `--resume PATH` or `--resume` (the run's newest checkpoint that verifies): the position to continue from, with
    /// the model's parameters and the optimizer's state restored on every rank, and what was skipped on the way.
    private static func restore(_ session: Session, from resume: String, _ prepared: Prepared,
                                _ optimizer: Optimizer<Float>) -> (position: TrainingPosition, choice: ResumeChoice, checkpointStep: Int) {
        let choice = chooseCheckpoint(session, resume)
        let path = choice.path
        let (position, checkpointStep) = CheckpointExchange.restore(session, model: prepared.model, optimizer: optimizer, from: path,
                                                                    sampler: prepared.sampler)
        session.agree("resume") {
            for file in position.dataFiles ?? [] {
                if let change = file.change() {
                    throw DataError(path: file.path, reason: "\(change) since the checkpoint \(path) was written: a resumed run "
                        + "must read the data it trained on")
                }
            }
        }
        return (position, choice, checkpointStep)
    }

    /// Rank 0 verifies the checkpoints (the others may not see the files) and every rank receives its choice: an
    /// explicit path only when it verifies, else the newest checkpoint that does, saying which were skipped and why.
    private static func chooseCheckpoint(_ session: Session, _ resume: String) -> ResumeChoice {
        let checkpointer = Checkpointer(runDirectory: session.runDirectory, keep: session.config.checkpointKeep)
        var encoded: [UInt8] = []
        session.agree("resume") {
            guard session.isRoot else { return }
            let choice = resume == "latest" ? try checkpointer.newestIntact(setAside: true) : try checkpointer.checkedExplicit(resume)
            encoded = Array(try JSONEncoder().encode(choice))
        }
        session.agree("resume") { try session.communicator.broadcast(bytes: &encoded, root: 0) }
        let choice = session.agree("resume") { try JSONDecoder().decode(ResumeChoice.self, from: Data(encoded)) }
        for skipped in choice.skipped { session.logger.warning("resume: skipped \(skipped.text)") }
        if !choice.skipped.isEmpty { session.logger.warning("resume: resuming from \(choice.path), the newest checkpoint that verifies") }
        return choice
    }

    /// What it takes to use the model without this configuration, in model.safetensors and every checkpoint.
    private static func modelDescription(_ session: Session, _ prepared: Prepared) -> ModelDescription {
        ModelDescription(spec: prepared.model.spec, data: prepared.train, normalization: session.config.normalization)
    }

    /// Progress reports, metrics.jsonl and TensorBoard (rank 0), with the run's start or resume marker written.
    /// - Parameter resuming: the checkpoint a resumed run continues from and its own global step (nil for a new run).
    ///   The earlier records end there, or at this process's first step if that is smaller: on another world size the
    ///   steps are numbered anew, and the earlier process's records after the checkpoint's step (in its numbering) were
    ///   trained again, and on more ranks those after the new first step overlap the new numbering: neither is kept.
    private static func startProgress(_ session: Session, _ prepared: Prepared,
                                      resuming: (choice: ResumeChoice, checkpointStep: Int)?, at position: TrainingPosition) -> Progress {
        let resumed = resuming?.choice
        // Where the earlier records end: the checkpoint's step, or this process's first step where that is smaller (a
        // resume on more ranks numbers the same samples with smaller steps, and the earlier records past it, kept, ran
        // each curve back over itself in TensorBoard and the report).
        let cut = resuming.map { min($0.checkpointStep, position.globalStep) }
        let tensorBoard = session.isRoot ? openTensorBoard(session) : nil
        if let cut { tensorBoard?.markRestart(atStep: cut + 1) }
        let metrics = session.isRoot ? MetricsLog(path: session.runDirectory + "/metrics.jsonl", append: resumed != nil,
                                                  tensorBoard: tensorBoard) { session.logger.warning("\($0)") } : nil
        let progress = Progress(session: session, prepared: prepared, metrics: metrics)
        if resumed != nil {
            if session.isRoot && position.epoch >= session.config.epochs {
                let done = position.epochStep == 0 ? "has done \(counted(position.epoch, "epoch"))"
                    : "is in epoch \(position.epoch + 1)"
                let note = "the checkpoint \(done) (\(counted(position.globalStep, "step"))), and training.epochs=\(session.config.epochs): "
                    + "nothing more to train; set training.epochs above \(position.epoch) to go on"
                session.logger.notice("\(note)")
            }
            progress.cover(position)
        }
        progress.recordStart(resumed: resumed, step: cut ?? position.globalStep, model: prepared.model)
        progress.status.resumedFrom = resumed?.path
        progress.status.skippedCheckpoints = resumed.flatMap { $0.skipped.isEmpty ? nil : $0.skipped.map(\.text) }
        progress.status.step = position.globalStep
        if let resumed {
            // Where the run stands, and what it last measured, until this process measures anew: a resume of a finished
            // run (nothing left to train) rewrote the status as epoch 0, no checkpoint, no loss or accuracy.
            progress.status.epoch = position.epoch
            progress.status.lastCheckpoint = resumed.path
            if session.isRoot, let earlier = try? RunStatus.read(session.runDirectory) {
                progress.status.loss = earlier.loss
                progress.status.accuracy = earlier.accuracy
                progress.status.testAccuracy = earlier.testAccuracy
                progress.status.samplesPerSecond = earlier.samplesPerSecond
            }
        }
        progress.writeStatus()
        return progress
    }

    /// status.json's message when a stop signal ended the gradient check (the report says so of its check).
    static let stoppedInGradientCheck = "stop requested during the gradient check, before the first step"

    /// `gradcheck.enabled`: the check before the first step (not on resume). Returns the failed outcome when the check
    /// fails under `gradcheck.policy=abort`, the stopped one when a stop signal ended it, else nil. Synchronized batch
    /// norm couples the ranks: a check on rank 0 alone would not reach its cross-rank terms, so the check is
    /// distributed then.
    private static func checkGradients(_ session: Session, _ prepared: Prepared, resumed: Bool, phases: PhaseRunner,
                                       failure: RunFailure) -> RunOutcome? {
        guard session.config.gradcheckEnabled else { return nil }
        guard !resumed else {
            session.logger.info("gradient check: skipped on resume (it runs only before a run's first step)")
            return nil
        }
        let distributed = prepared.model.crossRankReducer != nil
        if distributed { session.logger.info("gradient check: distributed over every rank, since model.batchnorm=sync") }
        let verdict = GradientCheckRun.run(session, prepared, distributed: distributed, phases: phases, failure: failure,
                                           reportDirectory: session.runDirectory)
        if verdict == .stopped {
            // Before the first step: no checkpoint to write, nothing trained. The run directory holds no run, so the same
            // command starts it again, check first (a resume would skip the check, which never reached its verdict).
            let message = "stopped during the gradient check, before the first step; nothing trained and no checkpoint. Run the "
                + "same command again to start over, check first"
            if session.isRoot { session.logger.info("\(message)") }
            return .stopped(stoppedInGradientCheck)
        }
        guard verdict == .fail && session.config.gradcheckPolicy == .abort else { return nil }
        session.logger.error("gradient check failed\(distributed ? "" : " on rank 0"); stopping every rank (gradcheck.policy=abort)")
        return .failed("gradient check failed (gradcheck.policy=abort)")
    }

    /// Once every rank has agreed that setup succeeded: rank 0 creates the run directory, removes the previous
    /// run's files under `--overwrite`, and writes the resolved configuration. Before this point a failed start
    /// has written nothing.
    private static func commitRunDirectory(_ session: Session, previous: RunDirectory?, mode: RunDirectory.StartMode) {
        session.agree("run directory \(session.runDirectory)") {
            guard session.isRoot else { return }
            try RunDirectory.create(session.runDirectory)
            try RunDirectoryLock.takeAndRecord(session.runDirectory)
            // A fresh start is only allowed where no run trained (`checkStart`), but what an attempt that never trained
            // left is there: its gradcheck.json (or `bpworker gradcheck`'s, of another model) showed in this run's
            // report as its own check, and its TensorBoard files and timeline as this run's.
            if mode != .resume, let previous, case let removed = try previous.removePreviousRun(directories: mode == .overwrite),
               !removed.isEmpty {
                let whose = mode == .overwrite ? "--overwrite: removed the previous run's" : "removed what an earlier attempt left:"
                session.logger.info("\(whose) \(removed.joined(separator: ", ")) from \(session.runDirectory)")
            }
            try writeAtomically(Data(session.config.yaml.utf8), to: session.runDirectory + "/config.yaml")
        }
    }

    /// What rank 0 says before the first step: the configuration, the ranks, the data, the model, the memory, the
    /// batch, the optimizer and the exchange.
    private static func announce(_ session: Session, _ prepared: Prepared, buckets: GradientBuckets) {
        let config = session.config, logger = session.logger, model = prepared.model
        let resolved = config.yaml.split(separator: "\n").map { "  " + $0 }.joined(separator: "\n")
        logger.info("configuration (also in \(session.runDirectory)/config.yaml):\n\(resolved)")
        let layout = session.layout
        let nodes = Dictionary(grouping: layout.nodeNames, by: { $0 }).sorted { $0.key < $1.key }
            .map { "\($0.key): \($0.value.count)" }.joined(separator: ", ")
        let mode = session.isLocal ? "local mode (no MPI launcher)" : "MPI"
        let ranks = "bpworker: \(counted(session.worldSize, "rank")) on \(counted(layout.nodeCount, "node")) (\(nodes)), \(mode), "
            + "\(counted(session.blasThreads, "BLAS thread")) per rank, \(BLASKernels.description)"
        logger.info("\(ranks)")
        let data = "data: \(grouped(prepared.train.count)) training samples (\(config.trainFeatures)), "
            + "\(grouped(prepared.test.count)) test samples, \(model.outputWidth) classes, \(prepared.train.featureCount) inputs"
        logger.info("\(data)")
        logger.info("model: \(model.spec.summary), \(grouped(model.parameterCount)) parameters")
        if model.spec.layers.contains(where: { $0.isSpatial || $0 == .flatten }) || model.spec.inputShape.count > 1 {
            // One line per layer with its output shape, as torchinfo prints it.
            let input = model.spec.inputShape.map(String.init).joined(separator: ", ")
            let lines = model.layerSummary.map { "  " + $0 }.joined(separator: "\n")
            logger.info("layers (input [\(config.batchSize), \(input)]):\n\(lines)")
        }
        logger.info("memory: rank 0 expects \(prepared.memory.summary)")
        let batch = "batch: \(config.batchSize) per rank x \(counted(session.worldSize, "rank")) = global batch "
            + "\(prepared.sampler.globalBatchSize); \(counted(prepared.sampler.stepsPerEpoch, "step")) per epoch "
            + "(\(prepared.sampler.remainder.rawValue) remainder), \(config.epochs) epochs"
        logger.info("\(batch)")
        let globalBatch = prepared.sampler.globalBatchSize
        if let wrapped = config.wrappedRemainderNote(samples: prepared.train.count, globalBatch: globalBatch) { logger.info("\(wrapped)") }
        if let augmentation = prepared.augmentation {
            let crops = "random \(augmentation.height)x\(augmentation.width) crops of the image padded with "
                + "\(augmentation.cropPadding) zeros"
            let erasing = "random erasing of \(Int((100 * augmentation.erase).rounded()))% of the samples"
            let what = [augmentation.cropPadding > 0 ? crops : nil, augmentation.flip ? "random horizontal flips" : nil,
                        augmentation.erase > 0 ? erasing : nil]
                .compactMap { $0 }.joined(separator: ", ")
            logger.info("augmentation: \(what), drawn per (seed, epoch, sample); training batches only")
        }
        let optimizer = "optimizer: \(config.optimizer.rawValue), lr \(config.learningRate) for the global batch, "
            + "\(config.schedule.rawValue) schedule"
        logger.info("\(optimizer)")
        if let capped = config.cappedWarmupNote(totalSteps: prepared.totalSteps) { logger.info("\(capped)") }
        announceExchange(session, prepared, buckets: buckets)
        logger.info("run directory: \(session.runDirectory)")
    }

    /// How gradients travel, and how batch norm treats the ranks' batches.
    private static func announceExchange(_ session: Session, _ prepared: Prepared, buckets: GradientBuckets) {
        let config = session.config, ranks = session.worldSize
        let how = config.reduction == .sharded
            ? "each rank updates 1/\(ranks) of the parameters, then they are gathered"
            : "every rank applies the summed gradients"
        let count = buckets.ranges.count
        let message = "gradients: \(counted(count, "bucket")) (training.bucket_kib=\(config.bucketKiB)), "
            + "averaged over \(counted(ranks, "rank")); training.reduction=\(config.reduction.rawValue): \(how)"
        session.logger.info("\(message)")
        guard !prepared.model.bufferTable.isEmpty && ranks > 1 else { return }
        if prepared.model.crossRankReducer != nil {
            session.logger.info("batch norm: synchronized over \(ranks) ranks (model.batchnorm=sync)")
        } else {
            let message = "batch norm: each rank normalises its own batch; rank 0's running statistics are evaluated, "
                + "checkpointed and saved (model.batchnorm=local, as PyTorch DDP)"
            session.logger.info("\(message)")
        }
    }

    /// Rank 0's TensorBoard event file for this process start; a run goes on without one (with a warning) when it
    /// cannot be created: TensorBoard is a view, metrics.jsonl the record.
    private static func openTensorBoard(_ session: Session) -> TensorBoardWriter? {
        do { return try TensorBoardWriter(directory: session.runDirectory + "/tensorboard") { session.logger.warning("\($0)") } } catch {
            session.logger.warning("TensorBoard event file not written: \(error)")
            return nil
        }
    }

    /// The largest peak resident set size of any rank (getrusage), for capacity planning and the benchmarks, and how
    /// much of each rank's memory is its own (RssAnon) and how much is file pages (RssFile: libraries, mapped data,
    /// which the page cache shares between the ranks of a node and may evict).
    private static func reportPeakMemory(_ session: Session) {
        var usage = rusage()
        getrusage(RUSAGE_SELF.rawValue, &usage)
        let now = ProcessMemory.current()
        var largest = [Int64(usage.ru_maxrss) * 1024, Int64(now.privateResident), Int64(now.fileResident)]
        do {
            try largest.withUnsafeMutableBufferPointer { (b) throws(MPIError) in try session.communicator.allreduce(b, op: .max) }
        } catch {
            return
        }
        guard session.isRoot else { return }
        let mebibytes = { (bytes: Double) in String(format: "%.0f", bytes / 1_048_576) }
        let message = "peak memory: \(mebibytes(Double(largest[0]))) MiB on the largest rank (rank 0: "
            + "\(mebibytes(Double(usage.ru_maxrss) * 1024)) MiB); at the end, private (RssAnon) \(mebibytes(Double(largest[1]))) MiB "
            + "and file pages (RssFile: libraries, mapped data) \(mebibytes(Double(largest[2]))) MiB on the largest rank"
        session.logger.info("\(message)")
    }

    private static func saveModel(_ session: Session, _ model: Model<Float>, step: Int, description: [String: String],
                                  failure: RunFailure) {
        let path = session.runDirectory + "/model.safetensors"
        do {
            try RunDirectoryIdentity.requireWritable(path)
            try writeParameters(of: model, to: path, metadata: description.merging([
                "format": ModelDescription.modelFormat, "format_version": ModelDescription.modelFormatVersion, "step": "\(step)",
                "world_size": "\(session.worldSize)", "model": model.spec.summary, "config": session.config.yaml,
            ]) { _, own in own })
            session.logger.info("saved parameters to \(path) (PyTorch nn.Sequential state_dict names)")
        } catch {
            failure.abort("saving \(path): \(error)")
        }
    }
}
