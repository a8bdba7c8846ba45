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
/// The step reads like the pseudocode it is: next batch, forward, backward (overwriting the gradients) with the
/// reduction overlapping, update. It allocates nothing; every collective in it is watched by the watchdog.
final class TrainingLoop {
    let session: Session
    let prepared: Prepared
    let optimizer: Optimizer<Float>
    let reducer: GradientReducer
    let exchange: CheckpointExchange
    let watchdog: Watchdog
    let progress: Progress
    let hooks: TestHooks
    private let schedule: LearningRateSchedule
    private var config: Configuration { session.config }
    private var model: Model<Float> { prepared.model }

    private(set) var position: TrainingPosition
    private(set) var lastCheckpoint: String?
    /// `--timeline`: records the steps of its window (nil: nothing is recorded, no clock is read).
    var timeline: Timeline?
    /// The model's buffers (batch norm's running statistics) before the current step: a step dropped for non-finite
    /// values must not keep what its forward pass did to them (a NaN batch makes them NaN). Allocated once.
    private let buffersBefore: UnsafeMutableBufferPointer<Float>
    /// When the last checkpoint was taken (or training began), by rank 0's monotonic clock; the other ranks never
    /// read theirs for this (see `ControlSlot.checkpointDue`).
    private var lastCheckpointUptime = TrainingLoop.uptimeSeconds()
    /// Rank 0's time-based checkpoint decision for the current step, as every rank received it.
    private(set) var checkpointDue = false

    deinit { buffersBefore.deallocate() }

    init(session: Session, prepared: Prepared, optimizer: Optimizer<Float>, reducer: GradientReducer,
         exchange: CheckpointExchange, watchdog: Watchdog, progress: Progress, hooks: TestHooks, position: TrainingPosition) {
        self.session = session
        self.prepared = prepared
        self.optimizer = optimizer
        self.reducer = reducer
        self.exchange = exchange
        self.watchdog = watchdog
        self.progress = progress
        self.hooks = hooks
        self.position = position
        schedule = session.config.learningRateSchedule(totalSteps: prepared.totalSteps)
        buffersBefore = .allocate(capacity: prepared.model.buffers.count)
        buffersBefore.initialize(repeating: 0)
    }

    // MARK: - One step

    /// Step `step` of the current epoch, whose sample indices are `epochIndices`. Throws only for communication
    /// failures, which end the job.
    func step(_ step: Int, of epochIndices: UnsafeBufferPointer<Int>) throws -> (StepOutcome, BatchResult) {
        let batch = config.batchSize
        let slot = Setup.ControlSlot.self
        if let timeline {
            watchdog.enter(.timeline, step: position.globalStep)
            try timeline.beforeStep(globalStep: position.globalStep)
            watchdog.leave()
        }
        let stepStarted = timeline?.begin() ?? 0
        defer { timeline?.end(.step, since: stepStarted) }
        prepared.train.gather(indices: prepared.sampler.batch(epochIndices, step: step), into: model.inputs, labels: model.labels,
                              augmentation: prepared.augmentation, epoch: position.epoch)
        timeline?.end(.loadBatch, since: stepStarted)
        watchdog.beginStep(position.globalStep)
        hooks.beforeStep(step: position.globalStep, model: model)
        let keepsBuffers = !model.bufferTable.isEmpty
        if keepsBuffers { buffersBefore.baseAddress!.update(from: model.buffers.baseAddress!, count: buffersBefore.count) }
        let forwardStarted = timeline?.begin() ?? 0
        var result = model.forward(count: batch, mode: .train)
        timeline?.end(.forward, since: forwardStarted)
        hooks.afterForward(step: position.globalStep, result: &result)
        let localNonFiniteLoss = result.lossSum.isFinite ? 0 : 1
        model.control[slot.stopRequests] = StopSignals.requested == nil ? 0 : 1
        model.control[slot.nonFinite] = Float(localNonFiniteLoss)
        model.control[slot.checkpointDue] = session.isRoot && checkpointIntervalElapsed() ? 1 : 0
        // accumulate: false overwrites every gradient: no zeroing pass needed.
        let backwardStarted = timeline?.begin() ?? 0
        try model.backward(count: batch, accumulate: false) { offset in try reducer.gradientsReady(from: offset) }
        timeline?.end(.backward, since: backwardStarted)
        watchdog.enter(.gradientAllreduce, step: position.globalStep)
        try reducer.finish()
        watchdog.leave()
        hooks.afterExchange(step: position.globalStep)
        let stopRequests = model.control[slot.stopRequests]
        checkpointDue = model.control[slot.checkpointDue] > 0
        position.epochStep = step + 1

        if model.control[slot.nonFinite] > 0 {
            // The step is dropped: so is what its forward pass did to the running statistics.
            if keepsBuffers { model.buffers.baseAddress!.update(from: buffersBefore.baseAddress!, count: buffersBefore.count) }
            // Every rank saw the same count, so every rank takes the same branch.
            watchdog.enter(.gradientAllreduce, step: position.globalStep)
            let ranks = try faultyRanks(local: localNonFiniteLoss + reducer.localNonFiniteCount)
            watchdog.leave()
            let what = "non-finite loss or gradient at step \(position.globalStep + 1) on rank\(ranks.count == 1 ? "" : "s") "
                + ranks.map(String.init).joined(separator: ", ")
            if config.numericsPolicy == .skip && position.skippedSteps < config.maxSkippedSteps {
                position.skippedSteps += 1
                if session.isRoot {
                    session.logger.warning("\(what): step skipped on every rank (\(position.skippedSteps) of at most \(config.maxSkippedSteps), numerics.policy=skip)")
                }
                position.globalStep += 1
                return (.skipped, result)
            }
            // The update was not applied: the position stays before this step.
            position.epochStep = step
            let reason = config.numericsPolicy == .skip
                ? "more than \(config.maxSkippedSteps) skipped steps (numerics.max_skips)" : "numerics.policy=stop"
            return (.nonFinite("\(what); stopped (\(reason))"), result)
        }

        // The update reads the sum over ranks: averaging and clipping are one factor of it. Sharded, the clipping
        // norm and the parameter gather are collectives: watched like the exchange.
        watchdog.enter(.parameterGather, step: position.globalStep)
        var gradientScale = reducer.gradientScale
        if config.clipNorm > 0 {
            let normStarted = timeline?.begin() ?? 0
            defer { timeline?.end(.gradientNorm, since: normStarted) }
            let norm = try reducer.gradientNorm(scale: gradientScale)
            gradientScale *= gradientClipFactor(norm: norm, maxNorm: config.clipNorm)
        }
        try reducer.update(optimizer, parameters: model.parameters, learningRate: schedule.learningRate(atStep: position.globalStep),
                           gradientScale: gradientScale)
        watchdog.leave()
        position.globalStep += 1
        return (stopRequests > 0 ? .stopRequested : .completed, result)
    }

    // MARK: - The epochs

    /// Trains from `position` to the last epoch, a stop request, a target accuracy or a failure. Throws only for
    /// communication and file failures, which end the job.
    func run() throws -> RunOutcome {
        let sampler = prepared.sampler
        for epoch in position.epoch..<config.epochs {
            let indices = sampler.indices(epoch: epoch)
            var ended: RunOutcome? = nil
            try indices.withUnsafeBufferPointer { (all) throws in
                for step in (epoch == position.epoch ? position.epochStep : 0)..<sampler.stepsPerEpoch {
                    let (outcome, result) = try self.step(step, of: all)
                    switch outcome {
                    case .skipped:
                        progress.recordEvent(.skip, step: position.globalStep)
                        continue
                    case let .nonFinite(message):
                        try checkpoint()
                        if session.isRoot { session.logger.error("\(message). Last good state: \(lastCheckpoint ?? "?")") }
                        ended = .failed(message)
                        return
                    case .completed, .stopRequested:
                        break
                    }
                    progress.record(result)
                    if position.globalStep % config.logInterval == 0 || step == sampler.stepsPerEpoch - 1 {
                        watchdog.enter(.metricsAllreduce, step: position.globalStep)
                        let reporting = timeline?.beginBetweenSteps() ?? 0
                        try progress.report(epoch: epoch, step: step, globalStep: position.globalStep,
                                            learningRate: schedule.learningRate(atStep: position.globalStep - 1), reducer: reducer)
                        timeline?.endBetweenSteps(.progressReport, since: reporting)
                        watchdog.leave()
                    }
                    if config.replicaCheckEvery > 0 && position.globalStep % config.replicaCheckEvery == 0 {
                        watchdog.enter(.replicaCheck, step: position.globalStep)
                        let checking = timeline?.beginBetweenSteps() ?? 0
                        try shareBuffers(session, model)
                        let diverged = try divergedReplicas()
                        timeline?.endBetweenSteps(.replicaCheck, since: checking)
                        watchdog.leave()
                        if !diverged.isEmpty {
                            let message = "replicas diverged at step \(position.globalStep): the parameters of rank\(diverged.count == 1 ? "" : "s") \(diverged.map(String.init).joined(separator: ", ")) differ from rank 0's"
                            if session.isRoot { session.logger.error("\(message)") }
                            ended = .failed(message)
                            return
                        }
                    }
                    if outcome == .stopRequested {
                        try checkpoint()
                        let source = StopSignals.requested.map(StopSignals.name) ?? "another rank's signal"
                        let message = "stopped by \(source) after step \(position.globalStep); checkpoint "
                            + "\(lastCheckpoint ?? "?"); resume with: bpworker train --resume --run-dir \(session.runDirectory)"
                        if session.isRoot { session.logger.info("\(message)") }
                        ended = .stopped("stop requested by \(source)")
                        return
                    }
                    let stepsDue = config.checkpointEverySteps > 0 && position.globalStep % config.checkpointEverySteps == 0
                    if (stepsDue || checkpointDue) && step < sampler.stepsPerEpoch - 1 {
                        try checkpoint()
                    }
                }
            }
            if let ended { return ended }
            watchdog.enter(.evaluation, step: position.globalStep)
            let evaluating = timeline?.beginBetweenSteps() ?? 0
            try shareBuffers(session, model)
            let evaluation = try Evaluation.evaluate(session, model, on: prepared.test)
            timeline?.endBetweenSteps(.evaluation, since: evaluating)
            watchdog.leave()
            progress.reportEvaluation(evaluation, epoch: epoch, globalStep: position.globalStep)
            position.epoch = epoch + 1
            position.epochStep = 0
            try checkpoint()
            // Every rank saw the same reduced evaluation, so every rank stops here together.
            let accuracy = Double(evaluation.correct) / Double(max(evaluation.count, 1))
            if config.targetAccuracy > 0 && accuracy >= config.targetAccuracy {
                if session.isRoot {
                    session.logger.info("reached training.target_accuracy=\(config.targetAccuracy) after epoch \(epoch + 1)")
                }
                break
            }
        }
        return .finished
    }

    /// A checkpoint of the current position (collective), recorded in status.json.
    func checkpoint() throws {
        watchdog.enter(.checkpoint, step: position.globalStep)
        defer { watchdog.leave() }
        let saving = timeline?.beginBetweenSteps() ?? 0
        lastCheckpoint = try exchange.save(&position, reducer: reducer)
        timeline?.endBetweenSteps(.checkpoint, since: saving)
        lastCheckpointUptime = Self.uptimeSeconds()
        progress.status.lastCheckpoint = lastCheckpoint
        progress.recordEvent(.checkpoint, step: position.globalStep)
        progress.status.step = position.globalStep
        progress.writeStatus()
    }

    /// Rank 0 only: whether `checkpoint.every_seconds` have passed since the last checkpoint. The test hook
    /// BPWORKER_TEST_CLOCK_OFFSET moves a rank's clock, to show that no other rank's clock takes part.
    private func checkpointIntervalElapsed() -> Bool {
        config.checkpointEverySeconds > 0
            && Self.uptimeSeconds() + hooks.clockOffsetSeconds - lastCheckpointUptime >= config.checkpointEverySeconds
    }

    private static func uptimeSeconds() -> Double { Double(DispatchTime.now().uptimeNanoseconds) * 1e-9 }

    /// Which ranks had non-finite values this step: one extra collective, paid only when something went wrong.
    private func faultyRanks(local: Int) throws -> [Int] {
        var flags = [Int32](repeating: 0, count: session.worldSize)
        flags[session.rank] = local > 0 ? 1 : 0
        try flags.withUnsafeMutableBufferPointer { (buffer) throws(MPIError) in try session.communicator.allreduce(buffer, op: .sum) }
        return flags.indices.filter { flags[$0] > 0 }
    }

    /// Every rank's parameters must stay bitwise identical: the ranks whose checksum differs from rank 0's (none
    /// when all agree, the common case, which costs two one-word allreduces).
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
