import Coordinator
import Engine
import Foundation

/// What one training step came to. Every rank sees the same reduced control values, so every rank gets the same
/// outcome for the same step.
enum StepOutcome: Equatable {
    /// The update was applied.
    case completed
    /// The update was applied and some rank asked to stop (a signal): every rank stops after this step.
    case stopRequested
    /// A non-finite loss or gradient on some rank, dropped on every rank (numerics.policy=skip).
    case skipped
    /// A non-finite loss or gradient that the policy does not let pass: the update was not applied, so the
    /// parameters are the last good state. The message names the step and the ranks.
    case nonFinite(String)
}

/// Parameters an update made infinite or NaN, or a test loss that is, found before a checkpoint would have kept them.
struct ModelNotFinite: Error, CustomStringConvertible {
    let description: String
}

/// How a run ended: its final state in status.json, the message beside it, and the exit code of every rank.
struct RunOutcome: Equatable {
    let state: RunStatus.State
    let message: String?
    let exitCode: Int32

    static let finished = RunOutcome(state: .finished, message: nil, exitCode: 0)
    static func stopped(_ message: String) -> RunOutcome { RunOutcome(state: .stopped, message: message, exitCode: 0) }
    static func failed(_ message: String) -> RunOutcome { RunOutcome(state: .failed, message: message, exitCode: 1) }
}

/// The epochs of a run: steps, and between them progress reports, replica checks and checkpoints.
///
/// A step is: load the batch, forward, backward (overwriting the gradients) with the exchange overlapping it, wait
/// for the exchange, update. Each part runs as a `Phase`, so the watchdog watches what waits on other ranks and the
/// timeline records what it draws; the step allocates nothing.
final class TrainingLoop {
    let prepared: Prepared
    /// The training batches, gathered `data.prefetch` steps ahead on a background thread.
    let batches: BatchPrefetcher
    let progress: Progress
    let phases: PhaseRunner
    /// `--timeline`: opens and closes its window at the steps it chose (nil: nothing is recorded).
    let timeline: Timeline?
    let checkpoints: CheckpointExchange
    private let session: Session
    private let reducer: GradientReducer
    private let hooks: TestHooks
    private let schedule: LearningRateSchedule
    private let control: StepControl
    private var config: Configuration { session.config }
    private var model: Model<Float> { prepared.model }

    private(set) var position: TrainingPosition
    private(set) var lastCheckpoint: String?
    /// The model's buffers (batch norm's running statistics) before the current step: a step dropped for non-finite
    /// values must not keep what its forward pass did to them (a NaN batch makes them NaN). Allocated once.
    private let buffersBefore: UnsafeMutableBufferPointer<Float>
    /// When the last checkpoint was taken (or training began), by rank 0's monotonic clock; the other ranks never
    /// read theirs for this (see `StepControl.Slot.checkpointDue`).
    private var lastCheckpointUptime = TrainingLoop.uptimeSeconds()
    /// Rank 0's time-based checkpoint decision for the current step, as every rank received it.
    private var checkpointDue = false
    /// Checkpoints in a row that could not be written (every rank counts rank 0's verdicts).
    private var failedCheckpoints = 0

    deinit {
        buffersBefore.deallocate()
    }

    init(session: Session, prepared: Prepared, batches: BatchPrefetcher, reducer: GradientReducer, phases: PhaseRunner, timeline: Timeline?,
         checkpoints: CheckpointExchange, progress: Progress, hooks: TestHooks, position: TrainingPosition) {
        self.session = session
        self.prepared = prepared
        self.batches = batches
        self.reducer = reducer
        self.phases = phases
        self.timeline = timeline
        self.checkpoints = checkpoints
        self.progress = progress
        self.hooks = hooks
        self.position = position
        // A resumed run's last good state is the checkpoint it resumed from, until it writes one (failure messages said
        // "none" after a resume).
        lastCheckpoint = progress.status.resumedFrom
        schedule = session.config.learningRateSchedule(totalSteps: prepared.totalSteps)
        control = StepControl(prepared.model.control)
        buffersBefore = .allocate(capacity: prepared.model.buffers.count)
        buffersBefore.initialize(repeating: 0)
    }

    // MARK: - The epochs

    /// Trains from `position` to the last epoch, a stop request, a target accuracy or a failure. Throws only for
    /// communication and file failures, which end the job.
    func run() throws -> RunOutcome {
        do {
            return try trainEpochs()
        } catch let error as ModelNotFinite {
            let message = "\(error.description); no checkpoint written. Last good state: \(lastCheckpoint ?? "none")"
            if session.isRoot { session.logger.error("\(message)") }
            return .failed(message)
        }
    }

    private func trainEpochs() throws -> RunOutcome {
        // A resume of a run that reached its target at the checkpoint's epoch end trains nothing more, as a finished one.
        if position.epochStep == 0, let accuracy = position.testAccuracy, config.targetAccuracy > 0 {
            if reachedTargetAccuracy(accuracy, after: position.epoch - 1) { return .finished }
        }
        // A resume with fewer epochs than the checkpoint has done trains nothing more (the range would be inverted).
        for epoch in position.epoch..<max(position.epoch, config.epochs) {
            beginEpoch(epoch)
            for step in position.epochStep..<prepared.sampler.stepsPerEpoch {
                let (outcome, result) = try self.step(step)
                if let ended = try afterStep(step, outcome, result) { return ended }
            }
            let (accuracy, ended) = try endEpoch(epoch)
            if let ended { return ended }
            if reachedTargetAccuracy(accuracy, after: epoch) { break }
        }
        return .finished
    }

    /// This rank's samples of `epoch`, in step order, for the steps to gather from, from the position's step on.
    func beginEpoch(_ epoch: Int) {
        prepared.sampler.indices(epoch: epoch).withUnsafeBufferPointer {
            batches.begin(epoch: epoch, indices: $0, firstStep: position.epochStep, globalStep: position.globalStep)
        }
    }

    // MARK: - One step

    /// Step `step` of the current epoch. Throws only for communication failures, which end the job.
    func step(_ step: Int) throws -> (StepOutcome, BatchResult) {
        phases.beginStep(position.globalStep)
        if let timeline { try phases.watched(.timeline) { try timeline.beforeStep(globalStep: position.globalStep) } }
        return try phases.watched(.step) {
            try phases.watched(.loadBatch) { try loadBatch(step) }
            hooks.beforeStep(step: position.globalStep, model: model)
            keepBuffers()
            var result = phases.watched(.forward) { model.forward(count: config.batchSize, mode: .train) }
            hooks.afterForward(step: position.globalStep, result: &result)
            control.post(stopSignal: StopSignals.requested, rank: session.rank, nonFiniteLoss: !result.lossSum.isFinite,
                         checkpointDue: session.isRoot && checkpointIntervalElapsed())
            try phases.watched(.backward) {
                try model.backward(count: config.batchSize, accumulate: false) { try reducer.gradientsReady(from: $0) }
            }
            try phases.watched(.gradientExchange) { try reducer.finish() }
            hooks.afterExchange(step: position.globalStep)
            position.epochStep = step + 1
            position.testAccuracy = nil
            checkpointDue = control.checkpointDue
            if control.anyNonFinite {
                return (try dropNonFiniteStep(step, nonFiniteLoss: !result.lossSum.isFinite), result)
            }
            try update()
            position.globalStep += 1
            return (control.stopRequested ? .stopRequested : .completed, result)
        }
    }

    /// The step's batch, and its samples' keys for dropout (per epoch and sample, as augmentation).
    private func loadBatch(_ step: Int) throws {
        try batches.take(step: step, into: model.inputs, labels: model.labels)
        model.setSamples(epoch: position.epoch, indices: batches.indices(ofStep: step))
    }

    /// The update reads the sum over ranks: averaging and clipping are one factor of it. Sharded, the clipping norm
    /// and the parameter gather are collectives.
    private func update() throws {
        var gradientScale = reducer.gradientScale
        if config.clipNorm > 0 {
            let norm = try phases.watched(.gradientNorm) { try reducer.gradientNorm(scale: gradientScale) }
            gradientScale *= gradientClipFactor(norm: norm, maxNorm: config.clipNorm)
        }
        let learningRate = schedule.learningRate(atStep: position.globalStep)
        try phases.watched(.update) { try reducer.update(learningRate: learningRate, gradientScale: gradientScale) }
    }

    /// `numerics.policy` for a step in which some rank saw a non-finite loss or gradient: skip it on every rank (within
    /// `numerics.max_skips`) or stop. Either way the update is not applied. Every rank saw the same sums, so every rank
    /// takes the same branch.
    private func dropNonFiniteStep(_ step: Int, nonFiniteLoss: Bool) throws -> StepOutcome {
        restoreBuffers()
        let local = (nonFiniteLoss ? 1 : 0) + reducer.localNonFiniteCount
        let ranks = try phases.watched(.gradientExchange) { try faultyRanks(local: local) }
        let input = try phases.watched(.gradientExchange) { try nonFiniteInput(step) }
        let what = "non-finite loss or gradient at step \(position.globalStep + 1) on rank\(ranks.count == 1 ? "" : "s") "
            + ranks.map(String.init).joined(separator: ", ") + (input.map { " (\($0))" } ?? "")
        if config.numericsPolicy == .skip && position.skippedSteps < config.maxSkippedSteps {
            position.skippedSteps += 1
            position.globalStep += 1
            if session.isRoot {
                let message = "\(what): step skipped on every rank (\(position.skippedSteps) of at most "
                    + "\(config.maxSkippedSteps), numerics.policy=skip)"
                session.logger.warning("\(message)")
            }
            return .skipped
        }
        // The update was not applied: the position stays before this step.
        position.epochStep = step
        let reason = config.numericsPolicy == .skip
            ? "more than \(config.maxSkippedSteps) skipped steps (numerics.max_skips)" : "numerics.policy=stop"
        return .nonFinite("\(what); stopped (\(reason))")
    }

    private func keepBuffers() {
        guard !model.bufferTable.isEmpty else { return }
        buffersBefore.baseAddress!.update(from: model.buffers.baseAddress!, count: buffersBefore.count)
    }

    /// The step is dropped: so is what its forward pass did to the running statistics.
    private func restoreBuffers() {
        guard !model.bufferTable.isEmpty else { return }
        model.buffers.baseAddress!.update(from: buffersBefore.baseAddress!, count: buffersBefore.count)
    }

    // MARK: - Between steps

    /// What follows a step: its metrics, then whichever is due of the progress report, the replica check, a stop and
    /// a checkpoint. Returns how the run ended, if it did.
    private func afterStep(_ step: Int, _ outcome: StepOutcome, _ result: BatchResult) throws -> RunOutcome? {
        switch outcome {
        case .skipped:
            progress.recordEvent(.skip, step: position.globalStep)
            return nil
        case let .nonFinite(message):
            do {
                _ = try checkpoint()
            } catch let error as ModelNotFinite {
                throw ModelNotFinite(description: "\(message); \(error.description)")
            }
            if session.isRoot { session.logger.error("\(message). Last good state: \(lastCheckpoint ?? "?")") }
            return .failed(message)
        case .completed, .stopRequested:
            break
        }
        progress.record(result, globalStep: position.globalStep)
        let lastOfEpoch = step == prepared.sampler.stepsPerEpoch - 1
        if position.globalStep % config.logInterval == 0 || lastOfEpoch {
            let learningRate = schedule.learningRate(atStep: position.globalStep - 1)
            try phases.watched(.progressReport) {
                try progress.report(epoch: position.epoch, step: step, globalStep: position.globalStep, learningRate: learningRate,
                                    reducer: reducer, batches: batches)
            }
        }
        if config.replicaCheckEvery > 0 && position.globalStep % config.replicaCheckEvery == 0, let ended = try checkReplicas() {
            return ended
        }
        if outcome == .stopRequested { return try stop() }
        if checkpointIsDue(lastOfEpoch: lastOfEpoch) { return try checkpointOrGiveUp() }
        return nil
    }

    /// A checkpoint that may fail (a full disk): the run goes on and tries again at the next one, until
    /// `checkpoint.max_failures` in a row, when it ends failed: a run that cannot checkpoint is one preemption away
    /// from losing everything since its last one.
    private func checkpointOrGiveUp() throws -> RunOutcome? {
        guard try !checkpoint(), failedCheckpoints > config.checkpointMaxFailures else { return nil }
        let message = "checkpoints could not be written \(failedCheckpoints) time\(failedCheckpoints == 1 ? "" : "s") in a row "
            + "(checkpoint.max_failures=\(config.checkpointMaxFailures)); the last one is \(lastCheckpoint ?? "none")"
        if session.isRoot { session.logger.error("\(message)") }
        return .failed(message)
    }

    /// `checkpoint.every_steps`, or rank 0's `checkpoint.every_seconds` decision as every rank received it with the
    /// step's control values. Not after an epoch's last step: the epoch's end checkpoints anyway.
    private func checkpointIsDue(lastOfEpoch: Bool) -> Bool {
        let stepsDue = config.checkpointEverySteps > 0 && position.globalStep % config.checkpointEverySteps == 0
        return (stepsDue || checkpointDue) && !lastOfEpoch
    }

    /// The end of an epoch: the exact test accuracy over every rank's share of the test set, the report, then a
    /// checkpoint (which checks the mapped data files first). Returns the accuracy, which every rank received, and the
    /// run's end when checkpoints keep failing.
    private func endEpoch(_ epoch: Int) throws -> (accuracy: Double, ended: RunOutcome?) {
        let evaluation = try phases.watched(.evaluation) {
            try shareBuffers(session, model)
            return try Evaluation.evaluate(session, model, on: prepared.test) {
                hooks.afterEvaluationBatch()
                phases.progressed(in: .evaluation)
            }
        }
        progress.reportEvaluation(evaluation, epoch: epoch, globalStep: position.globalStep)
        phases.watched(.report) { progress.writeReport() }
        // Every rank received the same sums. Finite parameters can still overflow the logits (lr=3e38 ended "finished"
        // with a test loss of NaN and 10%): that model is no good state to keep either.
        guard evaluation.lossSum.isFinite else {
            throw ModelNotFinite(description: "the test loss is not finite after epoch \(epoch + 1) (step "
                + "\(position.globalStep)): the model's outputs overflow")
        }
        position.epoch = epoch + 1
        position.epochStep = 0
        let accuracy = Double(evaluation.correct) / Double(max(evaluation.count, 1))
        position.testAccuracy = accuracy
        return (accuracy, try checkpointOrGiveUp())
    }

    /// Every rank saw the same reduced evaluation, so every rank stops here together.
    private func reachedTargetAccuracy(_ accuracy: Double, after epoch: Int) -> Bool {
        guard config.targetAccuracy > 0 && accuracy >= config.targetAccuracy else { return false }
        if session.isRoot { session.logger.info("reached training.target_accuracy=\(config.targetAccuracy) after epoch \(epoch + 1)") }
        return true
    }

    /// A stop signal reached some rank: checkpoint, and end the run as stopped (failed, when the checkpoint could not
    /// be written: the work since the last one is lost, and the launcher must know).
    private func stop() throws -> RunOutcome {
        let saved = try checkpoint()
        // What asked: this rank's own signal, else the one rank the step's sums name, else how many asked.
        let source = StopSignals.requested.map(StopSignals.name)
            ?? control.stopSource.map { "\(StopSignals.name($0.signal)) on rank \($0.rank)" }
            ?? "signals on \(control.stopRequests) ranks"
        guard saved else {
            let message = "stopped by \(source) after step \(position.globalStep), but its checkpoint could not be written; "
                + "the last one is \(lastCheckpoint ?? "none")"
            if session.isRoot { session.logger.error("\(message)") }
            return .failed(message)
        }
        let message = "stopped by \(source) after step \(position.globalStep); checkpoint "
            + "\(lastCheckpoint ?? "?"); resume with: bpworker train --resume --run-dir \(session.runDirectory)"
        if session.isRoot { session.logger.info("\(message)") }
        return .stopped("stop requested by \(source)")
    }

    /// A checkpoint of the current position (collective), recorded in status.json. The mapped data files are checked
    /// first and recorded in it, so a resume can refuse files that changed. Returns whether it was written; one that
    /// was not (a full disk) is said on rank 0 and counted in `failedCheckpoints`, the previous ones kept.
    @discardableResult
    func checkpoint() throws -> Bool {
        hooks.beforeCheckpoint(step: position.globalStep)
        try requireFiniteParameters()
        checkDataUnchanged()
        let files = (prepared.train.mappedFiles + prepared.test.mappedFiles).map { DataFileRecord(path: $0.path, identity: $0.identity) }
        position.dataFiles = files.isEmpty ? nil : files
        lastCheckpointUptime = Self.uptimeSeconds()
        switch try phases.watched(.checkpoint, { try checkpoints.save(&position, reducer: reducer) }) {
        case .failure(let error):
            failedCheckpoints += 1
            if session.isRoot {
                let next = failedCheckpoints <= config.checkpointMaxFailures ? "; trying again at the next one" : ""
                let message = "checkpoint at step \(position.globalStep) not written: \(error); the previous checkpoints are kept "
                    + "(latest: \(lastCheckpoint ?? "none"))\(next) (\(failedCheckpoints) in a row, at most \(config.checkpointMaxFailures))"
                session.logger.warning("\(message)")
            }
            return false
        case .success(let path):
            failedCheckpoints = 0
            lastCheckpoint = path
        }
        progress.status.lastCheckpoint = lastCheckpoint
        progress.recordEvent(.checkpoint, step: position.globalStep)
        progress.status.step = position.globalStep
        progress.writeStatus()
        return true
    }

    /// Throws when an update made parameters infinite or NaN (a learning rate that overflows, an epsilon of zero): the
    /// numerics check reads the loss and gradients, and an update after the last step, or before a checkpoint, left a
    /// "finished" model or a "last good state" that was neither. Every rank holds the same parameters, so every rank
    /// finds the same. One pass over the parameters per checkpoint.
    ///
    /// Batch norm's running statistics too: a variance above float32's range (3e38) was stored as inf, and the run ended
    /// "finished" with a model that evaluates to chance. They are rank 0's on every rank first (one broadcast, which the
    /// checkpoint's own would make anyway: it saves rank 0's), so every rank judges the same values.
    private func requireFiniteParameters() throws {
        let parameters = model.parameters.baseAddress!, buffers = model.buffers.baseAddress
        if !model.bufferTable.isEmpty { try phases.watched(.checkpoint) { try shareBuffers(session, model) } }
        let bufferCount = model.bufferTable.last.map { $0.offset + $0.count } ?? 0
        guard nonFiniteCount(parameters, model.parameterCount) > 0 || (buffers.map { nonFiniteCount($0, bufferCount) } ?? 0) > 0
        else { return }
        let tensors = model.parameterTable.map { ($0, parameters) } + (buffers.map { b in model.bufferTable.map { ($0, b) } } ?? [])
        let named = tensors.compactMap { info, base -> (String, Bool)? in
            let count = nonFiniteCount(base + info.offset, info.count)
            return count > 0 ? ("\(info.name) (\(count) of \(info.count) values)", base == parameters) : nil
        }
        let shown = named.prefix(4).map(\.0).joined(separator: ", ") + (named.count > 4 ? " and \(named.count - 4) more tensors" : "")
        let what = switch (named.contains { $0.1 }, named.contains { !$0.1 }) {
        case (true, true): "the parameters and batch norm's running statistics are"
        case (false, _): "batch norm's running statistics are"
        case (true, false): "the parameters are"
        }
        throw ModelNotFinite(description: "\(what) not finite after step \(position.globalStep)'s update: \(shown)")
    }

    /// A mapped data file that changed underneath the run (truncated, rewritten, replaced) ends it on every rank with
    /// one message naming the file, before a read of it can raise SIGBUS or return other values.
    private func checkDataUnchanged() {
        // The run directory too, in the same agreement: removed or replaced under a running job, it went unnoticed, the
        // checkpoints went on into a new directory without config or metrics, and the lock went with it (a second job
        // could start there).
        // Watched like the checkpoint itself: the agreement waits for every rank, and outside a watched phase a rank
        // frozen before it (SIGSTOP) left the others waiting there for ever, in "computing" (a chaos run found it).
        phases.watched(.checkpoint) {
            checkpoints.failure.agree("data and run directory") {
                try prepared.train.checkUnchanged()
                try prepared.test.checkUnchanged()
                if session.isRoot, let problem = RunDirectoryLock.lost() { throw RunDirectoryError(description: problem) }
            }
        }
    }

    /// Rank 0 only: whether `checkpoint.every_seconds` have passed since the last checkpoint. The test hook
    /// BPWORKER_TEST_CLOCK_OFFSET moves a rank's clock, to show that no other rank's clock takes part.
    private func checkpointIntervalElapsed() -> Bool {
        config.checkpointEverySeconds > 0
            && Self.uptimeSeconds() + hooks.clockOffsetSeconds - lastCheckpointUptime >= config.checkpointEverySeconds
    }

    private static func uptimeSeconds() -> Double { Double(DispatchTime.now().uptimeNanoseconds) * 1e-9 }

    /// The first sample of this step's batch, over every rank, whose gathered input holds a NaN or an infinity, named
    /// with the file it came from; nil when every input is finite (the value arose in the model). With
    /// `data.normalize=standardize` the setup refuses such data; with `scale` or `none` nothing reads it ahead, and
    /// this says where it is. One collective, paid only when something went wrong.
    private func nonFiniteInput(_ step: Int) throws -> String? {
        let width = prepared.train.featureCount, inputs = model.inputs
        let samples = batches.indices(ofStep: step)
        var first = [Int64.max]
        rows: for row in 0..<config.batchSize {
            for j in 0..<width where !inputs[row * width + j].isFinite {
                first[0] = Int64(samples[row])
                break rows
            }
        }
        try first.withUnsafeMutableBufferPointer { (buffer) throws(MPIError) in try session.communicator.allreduce(buffer, op: .min) }
        guard first[0] != .max else { return nil }
        let sample = Int(first[0])
        return "the input of sample \(sample) of data.train_features, in \(prepared.train.file(ofSample: sample)), is not finite"
    }

    /// Which ranks had non-finite values this step: one extra collective, paid only when something went wrong.
    private func faultyRanks(local: Int) throws -> [Int] {
        var flags = [Int32](repeating: 0, count: session.worldSize)
        flags[session.rank] = local > 0 ? 1 : 0
        try flags.withUnsafeMutableBufferPointer { (buffer) throws(MPIError) in try session.communicator.allreduce(buffer, op: .sum) }
        return flags.indices.filter { flags[$0] > 0 }
    }

    /// Every rank's parameters must stay bitwise identical: a failed run when some rank's differ from rank 0's.
    private func checkReplicas() throws -> RunOutcome? {
        let diverged = try phases.watched(.replicaCheck) { () throws -> [Int] in
            try shareBuffers(session, model)
            return try divergedReplicas()
        }
        guard !diverged.isEmpty else { return nil }
        let message = "replicas diverged at step \(position.globalStep): the parameters of rank\(diverged.count == 1 ? "" : "s") "
            + "\(diverged.map(String.init).joined(separator: ", ")) differ from rank 0's"
        if session.isRoot { session.logger.error("\(message)") }
        return .failed(message)
    }

    /// The ranks whose checksum differs from rank 0's (none when all agree, the common case, which costs two one-word
    /// allreduces).
    private func divergedReplicas() throws -> [Int] {
        let communicator = session.communicator
        let checksum = replicaChecksum(model)
        var low = [checksum], high = [checksum]
        try low.withUnsafeMutableBufferPointer { (buffer) throws(MPIError) in try communicator.allreduce(buffer, op: .min) }
        try high.withUnsafeMutableBufferPointer { (buffer) throws(MPIError) in try communicator.allreduce(buffer, op: .max) }
        guard low[0] != high[0] else { return [] }
        var all = [UInt64](repeating: 0, count: session.worldSize)
        all[session.rank] = checksum
        try all.withUnsafeMutableBufferPointer { (buffer) throws(MPIError) in try communicator.allreduce(buffer, op: .sum) }
        return all.indices.filter { all[$0] != all[0] }
    }
}
