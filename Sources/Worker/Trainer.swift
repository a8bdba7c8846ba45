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
            let model = try Model<Float>(spec: spec, batchCapacity: config.batchSize, seed: UInt64(config.seed))
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
        let layout = model.parameterTable.map { "\($0.name)\($0.shape)" }.joined(separator: ";") + model.spec.summary
        var fields: [(String, Int64)] = [
            ("parameters", Int64(model.parameterCount)),
            ("model layout hash", Int64(bitPattern: fnv1a(Array(layout.utf8)))),
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

    func run() {
        let prepared = prepare()
        let model = prepared.model
        let sampler = prepared.sampler
        announce(prepared)
        if config.gradcheckEnabled && !gradientCheck(prepared) { session.finish(exitCode: 1) }

        let optimizer = session.agree("optimizer") {
            try Optimizer<Float>(config: config.optimizerConfig, parameterCount: model.parameterCount)
        }
        let schedule = config.learningRateSchedule(totalSteps: prepared.totalSteps)
        let reducer = GradientReducer(
            communicator: communicator, gradients: model.gradients,
            tensorRanges: model.parameterTable.map(\.range), bucketElements: config.bucketKiB * 1024 / MemoryLayout<Float>.stride)
        let buckets = reducer.buckets.count
        logger.info("allreduce: \(buckets) gradient bucket\(buckets == 1 ? "" : "s") (training.bucket_kib=\(config.bucketKiB)), averaged over \(session.worldSize) rank\(session.worldSize == 1 ? "" : "s")")
        let metrics = session.isRoot ? MetricsLog(path: session.runDirectory + "/metrics.jsonl") : nil
        let progress = Progress(session: session, prepared: prepared, metrics: metrics)

        let batch = config.batchSize
        var globalStep = 0
        do {
            for epoch in 0..<config.epochs {
                let indices = sampler.indices(epoch: epoch)
                try indices.withUnsafeBufferPointer { (all) throws in
                    for step in 0..<sampler.stepsPerEpoch {
                        // The step: next batch, forward, zero grad, backward with the reduction overlapping, update.
                        prepared.train.gather(indices: sampler.batch(all, step: step), into: model.inputs, labels: model.labels)
                        model.zeroGradients()
                        let result = model.forward(count: batch, mode: .train)
                        try model.backward(count: batch) { offset in try reducer.gradientsReady(from: offset) }
                        try reducer.finish()
                        if config.clipNorm > 0 { clipGradientNorm(model.gradients, maxNorm: config.clipNorm) }
                        let learningRate = schedule.learningRate(atStep: globalStep)
                        optimizer.update(parameters: model.parameters, gradients: model.gradients, learningRate: learningRate)
                        globalStep += 1

                        progress.record(result)
                        if globalStep % config.logInterval == 0 || step == sampler.stepsPerEpoch - 1 {
                            try progress.report(epoch: epoch, step: step, globalStep: globalStep,
                                                learningRate: learningRate, reducer: reducer)
                        }
                    }
                }
                let evaluation = try evaluate(model, on: prepared.test)
                progress.reportEvaluation(evaluation, epoch: epoch, globalStep: globalStep)
            }
        } catch {
            session.abort("training failed at step \(globalStep): \(error)")
        }
        progress.finish()
        if session.isRoot { saveModel(model, step: globalStep) }
        session.agree("saving the model") {}
    }

    private func announce(_ prepared: Prepared) {
        let resolved = config.yaml.split(separator: "\n").map { "  " + $0 }.joined(separator: "\n")
        logger.info("configuration (also in \(session.runDirectory)/config.yaml):\n\(resolved)")
        let layout = session.layout
        let nodes = Dictionary(grouping: layout.nodeNames, by: { $0 }).sorted { $0.key < $1.key }
            .map { "\($0.key): \($0.value.count)" }.joined(separator: ", ")
        let mode = session.isLocal ? "local mode (no MPI launcher)" : "MPI"
        logger.info("bpworker: \(session.worldSize) rank\(session.worldSize == 1 ? "" : "s") on \(layout.nodeCount) node\(layout.nodeCount == 1 ? "" : "s") (\(nodes)), \(mode), \(session.blasThreads) BLAS thread\(session.blasThreads == 1 ? "" : "s") per rank")
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
        do {
            let result = try evaluate(model, on: prepared.test)
            logger.info("eval: test accuracy \(percent(Double(result.correct) / Double(result.count))) (\(grouped(result.correct))/\(grouped(result.count))), loss \(String(format: "%.4f", result.loss)), parameters \(parametersPath)")
        } catch {
            session.abort("evaluation failed: \(error)")
        }
    }

    // MARK: - Saving

    private func saveModel(_ model: Model<Float>, step: Int) {
        let path = session.runDirectory + "/model.safetensors"
        do {
            try writeParameters(of: model, to: path, metadata: [
                "format": "bpworker-model", "format_version": "1", "step": "\(step)",
                "world_size": "\(session.worldSize)", "model": model.spec.summary, "config": config.yaml,
            ])
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
