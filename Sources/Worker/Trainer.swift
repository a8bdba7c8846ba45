import Coordinator
import Engine
import Foundation
import Logging

/// Wires the engine to the communicator: data, model, gradient check, the training loop and evaluation.
final class Trainer {
    let session: Session
    var config: Configuration { session.config }
    var logger: Logger { session.logger }
    var communicator: any Communicator { session.communicator }

    init(session: Session) {
        self.session = session
    }

    // MARK: - Setup

    struct Prepared {
        let train: Dataset
        let test: Dataset
        let model: Model<Float>
        let sampler: ShardSampler
        var totalSteps: Int { sampler.stepsPerEpoch * configEpochs }
        let configEpochs: Int
    }

    /// Loads data, builds the model and verifies that every rank built the same one. Each step is agreed on by
    /// all ranks, so bad input stops every rank with one message.
    /// - Parameter training: false for `gradcheck` and `eval`, which run no epochs: the remainder is wrapped so any
    ///   data set with a sample per rank will do, and the schedule is not consulted.
    func prepare(training: Bool = true) -> Prepared {
        session.agree("configuration") { try config.validateSettings() }
        let (train, test) = session.agree("data") { try loadData() }
        let classes = config.classes > 0 ? config.classes : train.classCount
        let spec = session.agree("model") {
            try train.validateLabels(classCount: classes)
            try test.validateLabels(classCount: classes)
            return try config.modelSpec(inputWidth: train.featureCount, classes: classes)
        }
        let sampler = session.agree("sharding") {
            try ShardSampler(datasetSize: train.count, rank: session.rank, worldSize: session.worldSize,
                             batchSize: config.batchSize, seed: UInt64(max(0, config.seed)),
                             remainder: config.remainder == .drop && training ? .drop : .wrap)
        }
        let model = session.agree("configuration") {
            if training {
                do { try config.learningRateSchedule(totalSteps: sampler.stepsPerEpoch * config.epochs).validate() } catch {
                    throw ConfigError(description: "schedule: \(error)")
                }
            }
            let model = try Model<Float>(spec: spec, batchCapacity: config.batchSize, seed: UInt64(config.seed),
                                         controlSlots: ControlSlot.count)
            // Each rank drops different units: its own dropout stream.
            model.dropoutGenerator = RandomGenerator(
                seed: UInt64(config.seed), stream: RandomGenerator.Stream.dropout.rawValue &+ UInt64(session.rank) << 32)
            model.gradientFault = try gradientFaultFromEnvironment()
            return model
        }
        // Layouts first: a broadcast between differently shaped models would be meaningless.
        verifyReplicas(model: model, sampler: sampler, checksum: false)
        session.agree("initial parameters") {
            // Rank 0's parameters are the truth, whatever the others initialised.
            try communicator.broadcast(model.parameters, root: 0)
        }
        verifyReplicas(model: model, sampler: sampler, checksum: true)
        return Prepared(train: train, test: test, model: model, sampler: sampler, configEpochs: config.epochs)
    }

    private func loadData() throws -> (Dataset, Dataset) {
        var train: Dataset
        var test: Dataset
        switch config.dataFormat {
        case .idx:
            train = try Dataset.loadIDX(images: config.trainFeatures, labels: config.trainLabels)
            test = try Dataset.loadIDX(images: config.testFeatures, labels: config.testLabels)
        case .npy:
            train = try Dataset.loadNPY(features: config.trainFeatures, labels: config.trainLabels)
            test = try Dataset.loadNPY(features: config.testFeatures, labels: config.testLabels)
        }
        if config.inputs > 0, config.inputs != train.featureCount {
            throw ConfigError(description: "model.inputs is \(config.inputs) but \(config.trainFeatures) has "
                + "\(train.featureCount) values per sample")
        }
        guard test.featureCount == train.featureCount else {
            throw ConfigError(description: "\(config.testFeatures) has \(test.featureCount) values per sample but "
                + "\(config.trainFeatures) has \(train.featureCount): the model's input layer takes \(train.featureCount)")
        }
        switch config.normalization {
        case .standardize: train.standardize()
        case .scale: break  // bytes arrive as x / 255, floats as they are
        case .none:
            train.scale = 1
            train.shift = 0
        }
        test.normalize(like: train)
        return (train, test)
    }

    /// All ranks compare the model layout, batch size, steps per epoch and a checksum of the parameters, and
    /// refuse to start on any difference, naming both sides.
    private func verifyReplicas(model: Model<Float>, sampler: ShardSampler, checksum: Bool) {
        var fields: [(String, Int64)] = [
            ("parameters", Int64(model.parameterCount)),
            ("model layout hash", Int64(bitPattern: layoutHash(model))),
            ("batch size", Int64(sampler.batchSize)),
            ("steps per epoch", Int64(sampler.stepsPerEpoch)),
        ]
        if checksum {
            fields = [("parameter checksum", Int64(bitPattern: fnv1a(UnsafeRawBufferPointer(model.parameters))))]
        }
        let w = session.worldSize
        var table = [Int64](repeating: 0, count: w * fields.count)
        for (i, field) in fields.enumerated() { table[session.rank * fields.count + i] = field.1 }
        session.agree("replica check") {
            try table.withUnsafeMutableBufferPointer { (buffer) throws(MPIError) in
                try communicator.allreduce(buffer, op: .sum)
            }
        }
        session.agree("replica check") {
            for (i, field) in fields.enumerated() {
                for r in 1..<max(1, w) where table[r * fields.count + i] != table[i] {
                    throw ConfigError(description: "ranks disagree on \(field.0): rank 0 has "
                        + "\(grouped(table[i])) \(field.0), rank \(r) has \(grouped(table[r * fields.count + i]))")
                }
            }
        }
    }

    // MARK: - Gradient check

    /// Rank 0 checks backpropagation on a small batch of its own shard in float64; the others wait for the
    /// verdict. Returns whether the job may go on (pass, or warn, or fail under the `warn` policy).
    @discardableResult
    func gradientCheck(_ prepared: Prepared, printJSON: Bool = false) -> Bool {
        var verdict: [Int32] = [0]
        if session.isRoot {
            let count = min(config.gradcheckBatch, prepared.train.count)
            let indices = Array(prepared.sampler.indices(epoch: 0).prefix(count))
            let copy = prepared.model.float64Copy(batchCapacity: count)
            indices.withUnsafeBufferPointer { prepared.train.gather(indices: $0, into: copy.inputs, labels: copy.labels) }
            let report = checkGradients(model: copy, count: count, options: config.gradientCheckOptions)
            if printJSON { print(report.json) } else {
                logger.info("\(report.text)")
                if !report.passed { FileHandle.standardError.write(Data("gradient check failed: \(report.failures.joined(separator: "; "))\n".utf8)) }
            }
            try? Data(report.json.utf8).write(to: URL(fileURLWithPath: session.runDirectory + "/gradcheck.json"))
            verdict[0] = report.verdict == .fail ? 2 : report.verdict == .warn ? 1 : 0
        }
        do {
            try verdict.withUnsafeMutableBufferPointer { (buffer) throws(MPIError) in
                try communicator.broadcast(buffer, root: 0)
            }
        } catch {
            session.abort("gradient check verdict: \(error)")
        }
        if verdict[0] == 2 && config.gradcheckPolicy == .abort {
            logger.error("gradient check failed on rank 0; stopping every rank (gradcheck.policy=abort)")
            return false
        }
        return true
    }

    func runGradientCheck(printJSON: Bool) -> Bool {
        let prepared = prepare(training: false)
        return gradientCheck(prepared, printJSON: printJSON)
    }

    // MARK: - Training

    /// Control slots that travel in front of the gradients in the last bucket of every step's allreduce.
    enum ControlSlot {
        /// Ranks asking to stop (a signal arrived).
        static let stopRequests = 0
        /// Non-finite values in this step's losses and gradients.
        static let nonFinite = 1
        static let count = 2
    }

    func run(resume: String?) {
        let prepared = prepare()
        let model = prepared.model
        let sampler = prepared.sampler
        announce(prepared)
        if config.gradcheckEnabled {
            if resume != nil {
                logger.info("gradient check: skipped on resume (it runs only before a run's first step)")
            } else if !gradientCheck(prepared) {
                session.finish(exitCode: 1)
            }
        }

        let optimizer = session.agree("optimizer") {
            try Optimizer<Float>(config: config.optimizerConfig, parameterCount: model.parameterCount)
        }
        let checkpointer = Checkpointer(runDirectory: session.runDirectory, keep: config.checkpointKeep,
                                        modelMetadata: modelMetadata(prepared))
        var position = TrainingPosition(worldSize: session.worldSize, batchSize: config.batchSize)
        if let resume {
            let path = resume == "latest" ? session.agree("resume") { try checkpointer.latest() } : resume
            position = restore(from: path, model: model, optimizer: optimizer, sampler: sampler)
        }
        let schedule = config.learningRateSchedule(totalSteps: prepared.totalSteps)
        let reducer = GradientReducer(
            communicator: communicator, gradients: model.gradients,
            tensorRanges: model.parameterTable.map(\.range), bucketElements: config.bucketKiB * 1024 / MemoryLayout<Float>.stride,
            strategy: config.reduction, control: model.control, nonFiniteSlot: ControlSlot.nonFinite,
            provenFinite: { model.gradientsProvenFinite(in: $0) })
        let buckets = reducer.buckets.count
        let how = config.reduction == .sharded
            ? "each rank updates 1/\(session.worldSize) of the parameters, then they are gathered"
            : "every rank applies the summed gradients"
        logger.info("gradients: \(buckets) bucket\(buckets == 1 ? "" : "s") (training.bucket_kib=\(config.bucketKiB)), averaged over \(session.worldSize) rank\(session.worldSize == 1 ? "" : "s"); training.reduction=\(config.reduction.rawValue): \(how)")
        let metrics = session.isRoot ? MetricsLog(path: session.runDirectory + "/metrics.jsonl", append: resume != nil) : nil
        let progress = Progress(session: session, prepared: prepared, metrics: metrics)
        let aborter = Aborter(communicator: communicator)
        let watchdog = Watchdog(timeout: config.watchdogSeconds, rank: session.rank, worldSize: session.worldSize,
                                runDirectory: session.runDirectory) { report in
            FileHandle.standardError.write(Data("[rank \(aborter.communicator.rank)] error: \(report)\n".utf8))
            aborter.communicator.abort(code: 1)
        }
        watchdog.start()
        let hooks = TestHooks.fromEnvironment(rank: session.rank)

        let batch = config.batchSize
        var lastCheckpoint: String? = nil
        func checkpoint() throws {
            lastCheckpoint = try saveCheckpoint(checkpointer, model: model, optimizer: optimizer, reducer: reducer,
                                                position: &position, watchdog: watchdog)
            progress.status.lastCheckpoint = lastCheckpoint
            progress.writeStatus()
        }
        progress.status.step = position.globalStep
        progress.writeStatus()
        do {
            for epoch in position.epoch..<config.epochs {
                let indices = sampler.indices(epoch: epoch)
                var stopRequested = false
                try indices.withUnsafeBufferPointer { (all) throws in
                    for step in (epoch == position.epoch ? position.epochStep : 0)..<sampler.stepsPerEpoch {
                        // The step: next batch, forward, backward (overwriting the gradients) with the reduction
                        // overlapping, update.
                        prepared.train.gather(indices: sampler.batch(all, step: step), into: model.inputs, labels: model.labels)
                        watchdog.beginStep(position.globalStep)
                        hooks.beforeStep(step: position.globalStep, model: model)
                        let result = model.forward(count: batch, mode: .train)
                        let localNonFiniteLoss = result.lossSum.isFinite ? 0 : 1
                        model.control[ControlSlot.stopRequests] = StopSignals.requested == nil ? 0 : 1
                        model.control[ControlSlot.nonFinite] = Float(localNonFiniteLoss)
                        // accumulate: false overwrites every gradient: no zeroing pass needed.
                        try model.backward(count: batch, accumulate: false) { offset in try reducer.gradientsReady(from: offset) }
                        watchdog.enter(.gradientAllreduce, step: position.globalStep)
                        try reducer.finish()
                        watchdog.leave()
                        hooks.afterExchange(step: position.globalStep)
                        let stopRequests = model.control[ControlSlot.stopRequests]
                        let nonFinite = model.control[ControlSlot.nonFinite]
                        let learningRate = schedule.learningRate(atStep: position.globalStep)
                        position.epochStep = step + 1

                        if nonFinite > 0 {
                            // Every rank saw the same count, so every rank takes the same branch.
                            watchdog.enter(.gradientAllreduce, step: position.globalStep)
                            let ranks = try faultyRanks(local: localNonFiniteLoss + reducer.localNonFiniteCount)
                            watchdog.leave()
                            position.skippedSteps += 1
                            let what = "non-finite loss or gradient at step \(position.globalStep + 1) on rank\(ranks.count == 1 ? "" : "s") \(ranks.map(String.init).joined(separator: ", "))"
                            if config.numericsPolicy == .skip && position.skippedSteps <= config.maxSkippedSteps {
                                if session.isRoot {
                                    logger.warning("\(what): step skipped on every rank (\(position.skippedSteps) of at most \(config.maxSkippedSteps), numerics.policy=skip)")
                                }
                                position.globalStep += 1
                                continue
                            }
                            // The update was not applied: the parameters are the last good state, from before this step.
                            position.skippedSteps -= 1
                            position.epochStep = step
                            try checkpoint()
                            let reason = config.numericsPolicy == .skip ? "more than \(config.maxSkippedSteps) skipped steps (numerics.max_skips)" : "numerics.policy=stop"
                            progress.finish(state: .failed, message: what)
                            if session.isRoot {
                                logger.error("\(what); stopped (\(reason)). Last good state: \(lastCheckpoint ?? "?")")
                            }
                            session.finish(exitCode: 1)
                        }

                        // The update reads the sum over ranks: averaging and clipping are one factor of it. Sharded,
                        // the clipping norm and the parameter gather are collectives: watched like the exchange.
                        watchdog.enter(.parameterGather, step: position.globalStep)
                        var gradientScale = reducer.gradientScale
                        if config.clipNorm > 0 {
                            let norm = try reducer.gradientNorm(scale: gradientScale)
                            gradientScale *= gradientClipFactor(norm: norm, maxNorm: config.clipNorm)
                        }
                        try reducer.update(optimizer, parameters: model.parameters, learningRate: learningRate,
                                           gradientScale: gradientScale)
                        watchdog.leave()
                        position.globalStep += 1

                        progress.record(result)
                        if position.globalStep % config.logInterval == 0 || step == sampler.stepsPerEpoch - 1 {
                            watchdog.enter(.metricsAllreduce, step: position.globalStep)
                            try progress.report(epoch: epoch, step: step, globalStep: position.globalStep,
                                                learningRate: learningRate, reducer: reducer)
                            watchdog.leave()
                        }
                        if config.replicaCheckEvery > 0 && position.globalStep % config.replicaCheckEvery == 0 {
                            watchdog.enter(.replicaCheck, step: position.globalStep)
                            try checkReplicas(model, step: position.globalStep)
                            watchdog.leave()
                        }
                        if stopRequests > 0 {
                            stopRequested = true
                            break
                        }
                        if config.checkpointEverySteps > 0 && position.globalStep % config.checkpointEverySteps == 0
                            && step < sampler.stepsPerEpoch - 1 {
                            try checkpoint()
                        }
                    }
                }
                if stopRequested {
                    try checkpoint()
                    progress.status.step = position.globalStep
                    progress.finish(state: .stopped, message: "stop requested")
                    if session.isRoot {
                        let source = StopSignals.requested.map(StopSignals.name) ?? "another rank's signal"
                        let message = "stopped by \(source) after step \(position.globalStep); checkpoint "
                            + "\(lastCheckpoint ?? "?"); resume with: bpworker train --resume --run-dir \(session.runDirectory)"
                        logger.info("\(message)")
                    }
                    session.finish(exitCode: 0)
                }
                watchdog.enter(.evaluation, step: position.globalStep)
                let evaluation = try evaluate(model, on: prepared.test)
                watchdog.leave()
                progress.reportEvaluation(evaluation, epoch: epoch, globalStep: position.globalStep)
                position.epoch = epoch + 1
                position.epochStep = 0
                try checkpoint()
                // Every rank saw the same reduced evaluation, so every rank stops here together.
                let accuracy = Double(evaluation.correct) / Double(max(evaluation.count, 1))
                if config.targetAccuracy > 0 && accuracy >= config.targetAccuracy {
                    if session.isRoot {
                        logger.info("reached training.target_accuracy=\(config.targetAccuracy) after epoch \(epoch + 1)")
                    }
                    break
                }
            }
        } catch {
            session.abort("training failed at step \(position.globalStep): \(error)")
        }
        progress.finish(state: .finished, message: nil)
        reportPeakMemory()
        if session.isRoot { saveModel(model, step: position.globalStep, description: checkpointer.modelMetadata) }
        session.agree("saving the model") {}
    }

    /// Writes a checkpoint of `position` (collective: the ranks gather the optimizer state, which a sharded
    /// update leaves current only in each rank's own part, and send their dropout generators to rank 0, which
    /// writes the file; the others wait for its verdict).
    private func saveCheckpoint(_ checkpointer: Checkpointer, model: Model<Float>, optimizer: Optimizer<Float>,
                                reducer: GradientReducer, position: inout TrainingPosition, watchdog: Watchdog) throws -> String {
        watchdog.enter(.checkpoint, step: position.globalStep)
        defer { watchdog.leave() }
        try reducer.gatherOptimizerState(optimizer)
        let w = session.worldSize
        var states = [UInt64](repeating: 0, count: 4 * w)
        let mine = model.dropoutGenerator.state
        states.replaceSubrange((4 * session.rank)..<(4 * session.rank + 4), with: [mine.0, mine.1, mine.2, mine.3])
        try states.withUnsafeMutableBufferPointer { (buffer) throws(MPIError) in try communicator.allreduce(buffer, op: .sum) }
        position.dropoutStates = (0..<w).map { r in (0..<4).map { String(states[4 * r + $0]) } }
        var path = ""
        let snapshot = position
        session.agree("checkpoint") {
            if session.isRoot { path = try checkpointer.save(model: model, optimizer: optimizer, position: snapshot, config: config) }
        }
        if session.isRoot { logger.info("checkpoint: \(path) (step \(position.globalStep))") }
        return session.isRoot ? path : checkpointer.directory
    }

    /// Rank 0 reads and validates the checkpoint; every rank receives its state by broadcast.
    private func restore(from path: String, model: Model<Float>, optimizer: Optimizer<Float>, sampler: ShardSampler) -> TrainingPosition {
        var encoded: [UInt8] = []
        session.agree("resume") {
            if session.isRoot {
                let position = try Checkpointer.load(path: path, model: model, optimizer: optimizer)
                encoded = Array(try JSONEncoder().encode(position))
            }
        }
        var optimizerStep = [Int64(optimizer.stepCount)]
        session.agree("resume broadcast") {
            try communicator.broadcast(bytes: &encoded, root: 0)
            try communicator.broadcast(model.parameters, root: 0)
            for state in optimizer.state { try communicator.broadcast(state.buffer, root: 0) }
            try optimizerStep.withUnsafeMutableBufferPointer { (buffer) throws(MPIError) in try communicator.broadcast(buffer, root: 0) }
        }
        optimizer.stepCount = Int(optimizerStep[0])
        var position = session.agree("resume") { try JSONDecoder().decode(TrainingPosition.self, from: Data(encoded)) }
        let sameShape = position.worldSize == session.worldSize && position.batchSize == config.batchSize
        if sameShape {
            let words = position.dropoutStates[session.rank].compactMap { UInt64($0) }
            model.dropoutGenerator = RandomGenerator(state: (words[0], words[1], words[2], words[3]))
        } else {
            // Another world size: keep the samples seen this epoch, re-seed dropout per rank from the step.
            let samples = position.epochStep * position.batchSize * position.worldSize
            let oldGlobal = position.batchSize * position.worldSize
            position.epochStep = min(samples / sampler.globalBatchSize, sampler.stepsPerEpoch)
            position.globalStep = position.epoch * sampler.stepsPerEpoch + position.epochStep
            model.dropoutGenerator = RandomGenerator(
                seed: UInt64(config.seed) &+ UInt64(position.globalStep),
                stream: RandomGenerator.Stream.dropout.rawValue &+ UInt64(session.rank) << 32)
            let message = "resuming a \(position.worldSize)-rank checkpoint (batch \(position.batchSize) per rank) on \(session.worldSize) rank\(session.worldSize == 1 ? "" : "s") (batch \(config.batchSize)): global batch \(oldGlobal) -> \(sampler.globalBatchSize), \(sampler.stepsPerEpoch) steps per epoch; the learning rate stays as configured for the global batch; the epoch continues after its first \(position.epochStep * sampler.globalBatchSize) samples; dropout streams are re-seeded, so the run is not bitwise identical to an uninterrupted one"
            logger.info("\(message)")
            position.worldSize = session.worldSize
            position.batchSize = config.batchSize
        }
        if position.epochStep >= sampler.stepsPerEpoch {
            position.epoch += 1
            position.epochStep = 0
        }
        logger.info("resumed from \(path): step \(position.globalStep), epoch \(position.epoch + 1) at step \(position.epochStep)/\(sampler.stepsPerEpoch), optimizer step \(optimizer.stepCount)")
        return position
    }

    /// The largest peak resident set size of any rank (getrusage), for capacity planning and the benchmarks.
    private func reportPeakMemory() {
        var usage = rusage()
        getrusage(RUSAGE_SELF.rawValue, &usage)
        var peak = [Int64(usage.ru_maxrss) * 1024, Int64(usage.ru_maxrss) * 1024]
        do {
            try peak.withUnsafeMutableBufferPointer { (b) throws(MPIError) in try communicator.allreduce(b, op: .max) }
        } catch {
            return
        }
        let mine = Double(usage.ru_maxrss) / 1024
        if session.isRoot {
            logger.info("peak memory: \(String(format: "%.0f", Double(peak[0]) / 1_048_576)) MiB on the largest rank (rank 0: \(String(format: "%.0f", mine)) MiB)")
        }
    }

    /// Which ranks had non-finite values this step: one extra collective, paid only when something went wrong.
    private func faultyRanks(local: Int) throws -> [Int] {
        var flags = [Int32](repeating: 0, count: session.worldSize)
        flags[session.rank] = local > 0 ? 1 : 0
        try flags.withUnsafeMutableBufferPointer { (buffer) throws(MPIError) in try communicator.allreduce(buffer, op: .sum) }
        return flags.indices.filter { flags[$0] > 0 }
    }

    /// Every rank's parameters must stay bitwise identical; a diverged replica stops the job, naming the ranks.
    private func checkReplicas(_ model: Model<Float>, step: Int) throws {
        let checksum = fnv1a(UnsafeRawBufferPointer(model.parameters))
        var low = [checksum], high = [checksum]
        try low.withUnsafeMutableBufferPointer { (buffer) throws(MPIError) in try communicator.allreduce(buffer, op: .min) }
        try high.withUnsafeMutableBufferPointer { (buffer) throws(MPIError) in try communicator.allreduce(buffer, op: .max) }
        guard low[0] != high[0] else { return }
        var all = [UInt64](repeating: 0, count: session.worldSize)
        all[session.rank] = checksum
        try all.withUnsafeMutableBufferPointer { (buffer) throws(MPIError) in try communicator.allreduce(buffer, op: .sum) }
        let diverged = all.indices.filter { all[$0] != all[0] }
        if session.isRoot {
            logger.error("replicas diverged at step \(step): the parameters of rank\(diverged.count == 1 ? "" : "s") \(diverged.map(String.init).joined(separator: ", ")) differ from rank 0's")
        }
        session.finish(exitCode: 1)
    }

    private func announce(_ prepared: Prepared) {
        let resolved = config.yaml.split(separator: "\n").map { "  " + $0 }.joined(separator: "\n")
        logger.info("configuration (also in \(session.runDirectory)/config.yaml):\n\(resolved)")
        let layout = session.layout
        let nodes = Dictionary(grouping: layout.nodeNames, by: { $0 }).sorted { $0.key < $1.key }
            .map { "\($0.key): \($0.value.count)" }.joined(separator: ", ")
        let mode = session.isLocal ? "local mode (no MPI launcher)" : "MPI"
        logger.info("bpworker: \(session.worldSize) rank\(session.worldSize == 1 ? "" : "s") on \(layout.nodeCount) node\(layout.nodeCount == 1 ? "" : "s") (\(nodes)), \(mode), \(session.blasThreads) BLAS thread\(session.blasThreads == 1 ? "" : "s") per rank, \(BLASKernels.description)")
        logger.info("data: \(grouped(prepared.train.count)) training samples (\(config.trainFeatures)), \(grouped(prepared.test.count)) test samples, \(prepared.model.outputWidth) classes, \(prepared.train.featureCount) inputs")
        logger.info("model: \(prepared.model.spec.summary), \(grouped(prepared.model.parameterCount)) parameters")
        logger.info("batch: \(config.batchSize) per rank x \(session.worldSize) rank\(session.worldSize == 1 ? "" : "s") = global batch \(prepared.sampler.globalBatchSize); \(prepared.sampler.stepsPerEpoch) steps per epoch (\(config.remainder.rawValue) remainder), \(config.epochs) epochs")
        logger.info("optimizer: \(config.optimizer.rawValue), lr \(config.learningRate) for the global batch, \(config.schedule.rawValue) schedule")
        logger.info("run directory: \(session.runDirectory)")
    }

    // MARK: - Evaluation

    /// Exact evaluation: every test sample once across all ranks, sums and counts reduced once.
    func evaluate(_ model: Model<Float>, on data: Dataset) throws -> BatchResult {
        let indices = ShardSampler.evaluationIndices(datasetSize: data.count, rank: session.rank, worldSize: session.worldSize)
        var local = BatchResult()
        indices.withUnsafeBufferPointer { all in
            var start = 0
            while start < all.count {
                let count = min(model.batchCapacity, all.count - start)
                data.gather(indices: UnsafeBufferPointer(rebasing: all[start..<(start + count)]), into: model.inputs, labels: model.labels)
                local = local + model.forward(count: count, mode: .eval)
                start += count
            }
        }
        var totals = [local.lossSum, Double(local.correct), Double(local.count)]
        try totals.withUnsafeMutableBufferPointer { (buffer) throws(MPIError) in
            try communicator.allreduce(buffer, op: .sum)
        }
        return BatchResult(lossSum: totals[0], correct: Int(totals[1]), count: Int(totals[2]))
    }

    func runEvaluation(parametersPath: String) {
        let prepared = prepare(training: false)
        let model = prepared.model
        session.agree("parameters \(parametersPath)") {
            if session.isRoot { try loadParameters(into: model, from: parametersPath) }
        }
        session.agree("parameters") { try communicator.broadcast(model.parameters, root: 0) }
        let test = preprocessingForEvaluation(of: parametersPath, model: model, test: prepared.test)
        do {
            let result = try evaluate(model, on: test)
            logger.info("eval: test accuracy \(percent(Double(result.correct) / Double(result.count))) (\(grouped(result.correct))/\(grouped(result.count))), loss \(String(format: "%.4f", result.loss)), parameters \(parametersPath)")
        } catch {
            session.abort("evaluation failed: \(error)")
        }
    }

    // MARK: - Saving

    private func saveModel(_ model: Model<Float>, step: Int, description: [String: String]) {
        let path = session.runDirectory + "/model.safetensors"
        do {
            try writeParameters(of: model, to: path, metadata: description.merging([
                "format": ModelDescription.modelFormat, "format_version": ModelDescription.modelFormatVersion, "step": "\(step)",
                "world_size": "\(session.worldSize)", "model": model.spec.summary, "config": config.yaml,
            ]) { _, own in own })
            logger.info("saved parameters to \(path) (PyTorch nn.Sequential state_dict names)")
        } catch {
            session.abort("saving \(path): \(error)")
        }
    }
}

// MARK: - Formatting

func fnv1a<C: Collection>(_ bytes: C) -> UInt64 where C.Element == UInt8 {
    var hash: UInt64 = 0xcbf2_9ce4_8422_2325
    for byte in bytes { hash = (hash ^ UInt64(byte)) &* 0x100_0000_01b3 }
    return hash
}

func grouped<I: BinaryInteger>(_ value: I) -> String {
    let digits = String(value.magnitude)
    var out = ""
    for (i, c) in digits.enumerated() {
        if i > 0 && (digits.count - i) % 3 == 0 { out.append(",") }
        out.append(c)
    }
    return (value < 0 ? "-" : "") + out
}

func percent(_ x: Double) -> String { String(format: "%.2f%%", 100 * x) }

func duration(_ seconds: Double) -> String {
    guard seconds.isFinite, seconds >= 0 else { return "?" }
    let s = Int(seconds.rounded())
    return s >= 3600 ? "\(s / 3600)h\(String(format: "%02d", s / 60 % 60))m" : s >= 60 ? "\(s / 60)m\(String(format: "%02d", s % 60))s" : "\(s)s"
}

/// Lets the watchdog thread end the job. @unchecked Sendable: the watchdog only reads `rank` (immutable) and calls
/// `abort`, which is MPI_Abort, meant precisely for ending a job from wherever the trouble is seen, or exit().
struct Aborter: @unchecked Sendable {
    let communicator: any Communicator
}
