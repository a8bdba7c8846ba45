import Coordinator
import Engine
import Foundation

/// What a job has once setup has succeeded on every rank: data, model and sampler, the same on every rank.
struct Prepared {
    let train: Dataset
    let test: Dataset
    let model: Model<Float>
    let sampler: ShardSampler
    /// `data.augment`: applied to training batches only, never to evaluation or the gradient check.
    let augmentation: Augmentation?
    let epochs: Int
    /// This rank's expected peak memory, checked against its node's limits before the model was allocated.
    let memory: MemoryEstimate
    /// The test hooks the environment switches on for this rank (none in real runs).
    let hooks: TestHooks
    var totalSteps: Int { sampler.stepsPerEpoch * epochs }
}

/// Loads data, builds the model and verifies that every rank built the same one. Each step is agreed on by all
/// ranks (`Session.agree`), so bad input stops every rank with one message, and nothing is written anywhere.
enum Setup {
    /// What every rank has agreed on before anything large is allocated: the data, the model's layout, the sampler
    /// and the memory the run will need.
    struct Plan {
        let train: Dataset
        let test: Dataset
        let spec: ModelSpec
        let sampler: ShardSampler
        let augmentation: Augmentation?
        let memory: MemoryEstimate
        /// The test-only switches (`BPWORKER_TEST_*`), read once here.
        let hooks: TestHooks
    }

    /// Every rank must train with rank 0's settings: each node reads its own `-c FILE` (or gets its own `--set`), and
    /// a rank with another learning rate or seed trained a wrong model without a word, another `training.epochs`
    /// hung the job at the end, another reduction or bucket size crashed it in MPI. Rank 0's resolved configuration
    /// goes to every rank; a rank whose differs, in any key but `Configuration.perRankKeys`, ends the job naming them.
    static func requireSameSettings(_ session: Session) {
        var rankZero = Array(session.config.yaml.utf8)
        session.agree("configuration") { try session.communicator.broadcast(bytes: &rankZero, root: 0) }
        session.agree("configuration") {
            guard !session.isRoot else { return }
            let settings = try Configuration.load(text: String(decoding: rankZero, as: UTF8.self), origin: "rank 0's configuration",
                                                  overrides: [])
            let differences = session.config.differences(from: settings).filter { !Configuration.perRankKeys.contains($0.key) }
            guard differences.isEmpty else {
                throw ConfigError(description: "rank \(session.rank)'s settings differ from rank 0's, and every rank must train "
                    + "with the same: " + differences.map { "\($0.key) is \($0.now) here, \($0.earlier) on rank 0" }.joined(separator: "; "))
            }
        }
    }

    /// `plan`, then `build`: for the commands that need nothing between the two.
    /// - Parameters: `extraReads`: what is read whole after the memory check and counted in it (`eval`'s parameters
    ///   file, on rank 0); `checksOnEveryRank`: the gradient check runs on every rank (`gradcheck --distributed`).
    static func prepare(_ session: Session, training: Bool = true, extraReads: [MemoryEstimate.Item] = [],
                        checksOnEveryRank: Bool = false) -> Prepared {
        build(session, plan(session, training: training, extraReads: extraReads, checksOnEveryRank: checksOnEveryRank),
              crossRankReducer: nil)
    }

    /// - Parameter training: false for `gradcheck` and `eval`, which run no epochs: the remainder is wrapped so any
    ///   data set with a sample per rank will do, and the schedule is not consulted.
    static func plan(_ session: Session, training: Bool = true, extraReads: [MemoryEstimate.Item] = [],
                     checksOnEveryRank: Bool = false) -> Plan {
        let config = session.config
        session.agree("configuration") { try config.validateSettings() }
        requireSameSettings(session)
        let hooks = session.agree("configuration") { () throws -> TestHooks in try TestHooks.fromEnvironment(rank: session.rank) }
        hooks.duringSetup()
        DataReadCheck.require(session, features: [config.trainFeatures, config.testFeatures], mapped: config.dataMmap)
        var (train, test) = session.agree("data") { try loadData(config) }
        let augmentation = session.agree("data") { training ? try config.augmentation(sampleShape: train.sampleShape) : nil }
        let classes = config.classes > 0 ? config.classes : train.classCount
        let spec = session.agree("model") {
            try train.validateLabels(classCount: classes)
            try test.validateLabels(classCount: classes)
            return try config.modelSpec(sampleShape: train.sampleShape, classes: classes)
        }
        // Before anything large is allocated: a model that cannot fit ends every rank here, with the biggest items.
        let memory = session.agree("memory check") { () throws -> MemoryEstimate in
            var estimate = MemoryEstimate.estimate(config: config, spec: spec, datasets: [train, test], rank: session.rank,
                                                   worldSize: session.worldSize, usage: .current(), training: training,
                                                   checksOnEveryRank: checksOnEveryRank)
            if session.isRoot { estimate.items += extraReads }
            try estimate.check(against: .read(), ranksOnNode: session.layout.localSize)
            return estimate
        }
        checkSameData(session, train)
        checkSameContents(session, train: train, test: test)
        normalize(session, train: &train, test: &test)
        let sampler = session.agree("sharding") {
            try ShardSampler(datasetSize: train.count, rank: session.rank, worldSize: session.worldSize,
                             batchSize: config.batchSize, seed: UInt64(max(0, config.seed)),
                             remainder: training ? config.resolvedRemainder(samples: train.count, globalBatch: config.batchSize
                                                                              * session.worldSize) : .wrap)
        }
        session.agree("model") { try checkBatchNormBatches(spec, config: config, ranks: session.worldSize, training: training) }
        if training {
            session.agree("configuration") {
                try config.validateSchedule(stepsPerEpoch: sampler.stepsPerEpoch)
            }
        }
        return Plan(train: train, test: test, spec: spec, sampler: sampler, augmentation: augmentation, memory: memory,
                    hooks: hooks)
    }

    /// Builds the model of `plan`, gives every rank rank 0's parameters and verifies that every rank built the same.
    /// - Parameter crossRankReducer: synchronized batch norm's sums over the ranks; nil normalises each rank's batch.
    static func build(_ session: Session, _ plan: Plan, crossRankReducer: CrossRankReducer?) -> Prepared {
        let config = session.config
        let model = session.agree("configuration") {
            // Dropout masks are drawn per (seed, epoch, sample): every rank the same seed.
            let model = try Model<Float>(spec: plan.spec, batchCapacity: config.batchSize, seed: UInt64(config.seed),
                                         controlSlots: StepControl.slotCount, crossRankReducer: crossRankReducer)
            if let fault = plan.hooks.gradientFault {
                // A fault the model cannot carry would leave backpropagation correct: a test planting it would prove
                // nothing.
                if let problem = model.whyGradientFaultCannotBePlanted(fault) {
                    throw TestHookError(description: "BPWORKER_TEST_GRADIENT_FAULT: \(problem)")
                }
                if case .batchNormLocalSums = fault, config.batchNorm != .sync {
                    throw TestHookError(description: "BPWORKER_TEST_GRADIENT_FAULT: local sums need synchronized batch norm "
                        + "(model.batchnorm=sync); this run's is \(config.batchNorm.rawValue)")
                }
                model.installGradientFault(fault)
            }
            return model
        }
        // Layouts first: a broadcast between differently shaped models would be meaningless.
        verifyReplicas(session, model: model, sampler: plan.sampler, checksum: false)
        session.agree("initial parameters") {
            // Rank 0's parameters are the truth, whatever the others initialised.
            try broadcastState(session, model)
        }
        verifyReplicas(session, model: model, sampler: plan.sampler, checksum: true)
        return Prepared(train: plan.train, test: plan.test, model: model, sampler: plan.sampler, augmentation: plan.augmentation,
                        epochs: config.epochs, memory: plan.memory, hooks: plan.hooks)
    }

    /// Reads the training and test sets and normalises them as `data.normalize` says (statistics from the
    /// training set, applied to both).
    static func loadData(_ config: Configuration) throws -> (Dataset, Dataset) {
        var train: Dataset
        var test: Dataset
        switch config.dataFormat {
        case .idx:
            train = try Dataset.loadIDX(images: config.trainFeatures, labels: config.trainLabels)
            test = try Dataset.loadIDX(images: config.testFeatures, labels: config.testLabels)
        case .npy:
            train = try Dataset.loadNPY(features: config.trainFeatures, labels: config.trainLabels, mapped: config.dataMmap)
            test = try Dataset.loadNPY(features: config.testFeatures, labels: config.testLabels, mapped: config.dataMmap)
        case .hdf5:
            train = try Dataset.loadHDF5(features: config.trainFeatures, labels: config.trainLabels)
            test = try Dataset.loadHDF5(features: config.testFeatures, labels: config.testLabels)
        }
        if config.inputs > 0, config.inputs != train.featureCount {
            throw DataError(path: config.trainFeatures, reason: "has \(train.featureCount) values per sample but "
                + "model.inputs is \(config.inputs)")
        }
        // Before anything reads its labels: an empty training set was reported as a test label out of range for its 0
        // classes, or as a sharding error that named no file.
        guard train.count > 0 else { throw DataError(path: config.trainFeatures, reason: "holds no samples: there is nothing to train on") }
        try requireTestSamples(test, config)
        guard test.featureCount == train.featureCount else {
            throw DataError(path: config.testFeatures, reason: "has \(test.featureCount) values per sample but "
                + "\(config.trainFeatures) has \(train.featureCount): the model's input layer takes \(train.featureCount)")
        }
        // The test set is evaluated by the model of the training set's samples, normalised by its statistics: as
        // `eval --model` and `predict` hold their inputs to a model file's.
        guard samplesMatch(test.sampleShape, train.sampleShape) else {
            throw DataError(path: config.testFeatures, reason: "samples are shaped \(test.sampleShape) but \(config.trainFeatures)'s "
                + "are \(train.sampleShape): the model takes the training set's")
        }
        guard test.features.element == train.features.element else {
            throw DataError(path: config.testFeatures, reason: "holds \(ModelDescription.InputType(test).values) but "
                + "\(config.trainFeatures) holds \(ModelDescription.InputType(train).values), and the training set's "
                + "normalisation (\(config.normalization.rawValue)) applies to those")
        }
        return (train, test)
    }

    /// `data.normalize`, the training set's normalisation applied to both sets. `standardize` splits the pass over the
    /// training set between the ranks: each computes the statistics of every `worldSize`-th chunk and the parts are
    /// summed across ranks, added in chunk order, so every rank, and any number of ranks, gets the same numbers
    /// (`Dataset.standardize` in one process). Collective.
    static func normalize(_ session: Session, train: inout Dataset, test: inout Dataset) {
        switch session.config.normalization {
        case .standardize: standardize(session, &train)  // its sums refuse a NaN or an infinity
        case .scale: break  // bytes arrive as x / 255, floats as they are
        case .none:
            train.scale = 1
            train.shift = 0
        }
        // The training set is read ahead only for statistics; without them, the step whose batch holds a NaN stops
        // and names the sample (numerics). The test set has no such check: a NaN there made every evaluation's loss NaN
        // and its accuracy whatever the NaN rows' scores gave, so it is read once here.
        if test.features.element == .float32 { _ = finiteChunkSums(session, test) }
        test.normalize(like: train)
    }

    /// float32 features: the sum of every chunk of 4,096 samples, each rank summing every `worldSize`-th chunk (the
    /// others add 0, so the allreduce gathers them exactly); a set that holds a NaN or an infinity is refused on every
    /// rank, naming the sample, since every rank then has every chunk's sum.
    private static func finiteChunkSums(_ session: Session, _ data: Dataset) -> [Double] {
        let mine = stride(from: session.rank, to: data.statisticsChunks, by: session.worldSize)
        let sums = summedAcrossRanks(session, session.agree("data statistics") { try data.chunkSums(chunks: mine, center: 0, squared: false) })
        session.agree("data") { try data.requireFinite(chunkSums: sums) }
        return sums
    }

    /// `values` summed over the ranks; a failed allreduce ends the job.
    private static func summedAcrossRanks<T: MPIScalar>(_ session: Session, _ values: [T]) -> [T] {
        var values = values
        do {
            try values.withUnsafeMutableBufferPointer { (b) throws(MPIError) in try session.communicator.allreduce(b, op: .sum) }
        } catch {
            session.abort("data statistics: \(error)")
        }
        return values
    }

    /// Every rank must have read the same training set before they split work over it: its samples and their values.
    private static func checkSameData(_ session: Session, _ train: Dataset) {
        var low = [Int64(train.count), Int64(train.featureCount)], high = low
        session.agree("data") {
            try low.withUnsafeMutableBufferPointer { (b) throws(MPIError) in try session.communicator.allreduce(b, op: .min) }
            try high.withUnsafeMutableBufferPointer { (b) throws(MPIError) in try session.communicator.allreduce(b, op: .max) }
        }
        session.agree("data") {
            guard low == high else {
                throw ReplicaError(description: "ranks read different training sets from \(train.name): between \(grouped(low[0])) and "
                    + "\(grouped(high[0])) samples of \(low[1]) to \(high[1]) values (rank \(session.rank) has \(grouped(train.count)) of "
                    + "\(train.featureCount))")
            }
        }
    }

    /// Every rank must also have read the same values: ranks may name their data differently (an MPMD launch, a path
    /// per node), and one that read other images, other labels or another test set trained a wrong model, or measured a
    /// mixed accuracy, with exit 0. Each rank hashes its training and test set's sizes, all labels and 64 samples spread
    /// over each (read as they are gathered, before normalisation); the hashes are compared with rank 0's.
    private static func checkSameContents(_ session: Session, train: Dataset, test: Dataset) {
        let (rank, ranks) = (session.rank, session.worldSize)
        var hashes = [Int64](repeating: 0, count: 2 * ranks)
        let mine = session.agree("data") { try [contentHash(train), contentHash(test)] }
        (hashes[2 * rank], hashes[2 * rank + 1]) = (Int64(bitPattern: mine[0]), Int64(bitPattern: mine[1]))
        var rootNames = Array((train.name + "\n" + test.name).utf8)
        session.agree("data") {
            try hashes.withUnsafeMutableBufferPointer { (b) throws(MPIError) in try session.communicator.allreduce(b, op: .sum) }
            try session.communicator.broadcast(bytes: &rootNames, root: 0)
        }
        let rootName = String(decoding: rootNames, as: UTF8.self).split(separator: "\n", omittingEmptySubsequences: false)
        session.agree("data") {
            for (k, set, key) in [(0, train, "data.train_features"), (1, test, "data.test_features")] where hashes[2 * rank + k] != hashes[k] {
                let others = (1..<ranks).filter { hashes[2 * $0 + k] != hashes[k] }.map(String.init).joined(separator: ", ")
                throw ReplicaError(description: "ranks read different data: the \(k == 0 ? "training" : "test") set of rank \(rank) "
                    + "(\(key): \(set.name), labels \(set.labelsName)) differs from rank 0's (\(rootName.count > k ? rootName[k] : "?")) "
                    + "in its labels or values (ranks that differ: \(others)); every rank must read the same data")
            }
        }
    }

    /// A hash of a data set's sizes, its labels and 64 samples spread over it, as gathered (the same on every rank that
    /// read the same values, whatever the file's name or format).
    private static func contentHash(_ set: Dataset) throws -> UInt64 {
        // Sizes, not the sample's shape: the same values as 6x6 or 4x9 images are the replicas' layout check's to name.
        var hash = fnv1a(Array("\(set.count) \(set.featureCount)".utf8))
        set.labels.withUnsafeBytes { hash ^= fnv1a($0) &* 0x9E37_79B9_7F4A_7C15 }
        guard set.count > 0 else { return hash }
        // At most a million values (8 MB) however large a sample is.
        let samples = min(64, set.count, max(1, 1_000_000 / max(set.featureCount, 1)))
        let rows = (0..<samples).map { $0 * set.count / samples }
        var values = [Double](repeating: 0, count: samples * set.featureCount), labels = [Int32](repeating: 0, count: samples)
        try rows.withUnsafeBufferPointer { indices in
            try values.withUnsafeMutableBufferPointer { v in
                try labels.withUnsafeMutableBufferPointer { l in try set.gather(indices: indices, into: v.baseAddress!, labels: l.baseAddress!) }
            }
        }
        values.withUnsafeBytes { hash = (hash &* 31) ^ fnv1a($0) }
        return hash
    }

    /// Each rank reads its chunks inside `agree`, so a file that fails to read on one rank (a damaged HDF5 chunk) ends
    /// every rank with that rank's message, before any waits in the sums' allreduce for it.
    private static func standardize(_ session: Session, _ train: inout Dataset) {
        let mine = stride(from: session.rank, to: train.statisticsChunks, by: session.worldSize)
        let data = train
        switch train.features.element {
        case .uint8:
            let histogram = summedAcrossRanks(session, session.agree("data statistics") { try data.byteHistogram(chunks: mine) })
            train.standardize(histogram: histogram)
        case .float32:
            let n = Double(train.features.count)
            let sums = finiteChunkSums(session, data)
            let mean = n > 0 ? sums.reduce(0, +) / n : 0
            let squares = summedAcrossRanks(session, session.agree("data statistics") {
                try data.chunkSums(chunks: mine, center: mean, squared: true)
            })
            train.standardize(mean: mean, variance: n > 0 ? squares.reduce(0, +) / n : 0)
        }
    }

    /// All ranks compare the model layout, batch size, steps per epoch (or a checksum of the parameters), and
    /// refuse to start on any difference, naming both sides.
    private static func verifyReplicas(_ session: Session, model: Model<Float>, sampler: ShardSampler, checksum: Bool) {
        var fields: [(String, Int64)] = [
            ("parameters", Int64(model.parameterCount)),
            ("model layout hash", Int64(bitPattern: layoutHash(model))),
            ("batch size", Int64(sampler.batchSize)),
            ("steps per epoch", Int64(sampler.stepsPerEpoch)),
        ]
        if checksum {
            fields = [("parameter checksum", Int64(bitPattern: replicaChecksum(model)))]
        }
        let w = session.worldSize
        var table = [Int64](repeating: 0, count: w * fields.count)
        for (i, field) in fields.enumerated() { table[session.rank * fields.count + i] = field.1 }
        session.agree("replica check") {
            try table.withUnsafeMutableBufferPointer { (buffer) throws(MPIError) in
                try session.communicator.allreduce(buffer, op: .sum)
            }
        }
        session.agree("replica check") {
            for (i, field) in fields.enumerated() {
                for r in 1..<max(1, w) where table[r * fields.count + i] != table[i] {
                    throw ReplicaError(description: "ranks disagree on \(field.0): rank 0 has "
                        + "\(grouped(table[i])) \(field.0), rank \(r) has \(grouped(table[r * fields.count + i]))")
                }
            }
        }
    }
}

/// A test set of no samples has no accuracy (0/0 printed as -nan%, and a target accuracy never reached): refused.
func requireTestSamples(_ test: Dataset, _ config: Configuration) throws {
    guard test.count > 0 else { throw DataError(path: config.testFeatures, reason: "holds no samples: there is nothing to evaluate") }
}

/// Batch norm in training needs more than one value per feature to normalise over (PyTorch: "Expected more than 1
/// value per channel when training"): the batch (over all ranks when synchronized) times the feature's positions,
/// which is 1 only when both are. Inner layers of residual blocks too ("layer 3.residual[1]").
func checkBatchNormBatches(_ spec: ModelSpec, config: Configuration, ranks: Int, training: Bool) throws {
    guard training, config.batchSize == 1, config.batchNorm != .sync || ranks == 1 else { return }
    if let (place, layer) = degenerateBatchNorm(spec) {
        throw ConfigError(description: "layer \(place) \(layer) would normalise each feature over 1 "
            + "value per step (training.batch_size=\(config.batchSize)"
            + (config.batchNorm == .sync ? " x \(ranks) ranks" : ", model.batchnorm=local") + "): batch norm in training "
            + "needs more than 1 value per channel; raise training.batch_size or use model.batchnorm=sync")
    }
}

/// The same for the gradient check's batch of `samples` (over every rank when they normalise together): there batch
/// norm of one value gives x̂ = 0, every gradient through it is 0, and the check called the correct backward pass
/// "a missing backward write".
func checkGradientCheckBatch(_ spec: ModelSpec, samples: Int) throws {
    guard samples == 1, let (place, layer) = degenerateBatchNorm(spec) else { return }
    throw ConfigError(description: "layer \(place) \(layer) would normalise each feature over the check "
        + "batch's 1 value: batch norm needs more than 1 value per channel, and every gradient through it would be 0; "
        + "raise gradcheck.batch (or training.batch_size, when a rank's share of an epoch is 1 sample)")
}

/// The first batch norm layer (inner layers of blocks too) whose features have one position each: it normalises over
/// the batch alone.
private func degenerateBatchNorm(_ spec: ModelSpec) -> (String, LayerSpec)? {
    for (place, layer, input) in spec.placedLayers() where layer.as(BatchNormKind.self) != nil {
        if input.dropFirst().allSatisfy({ $0 == 1 }) { return (place, layer) }
    }
    return nil
}

/// Ranks whose models or data differ where they must be identical.
struct ReplicaError: Error, CustomStringConvertible, Equatable {
    let description: String
}

/// Rank 0's parameters and buffers to every rank.
func broadcastState(_ session: Session, _ model: Model<Float>) throws(MPIError) {
    try session.communicator.broadcast(model.parameters, root: 0)
    try shareBuffers(session, model)
}

/// Rank 0's buffers (batch norm's running statistics) to every rank, before they are evaluated, checkpointed,
/// compared or saved: with `model.batchnorm=local` each rank's drift apart in training, and like PyTorch DDP, which
/// broadcasts rank 0's buffers, bpworker uses rank 0's. Nothing to send for a model without buffers.
func shareBuffers(_ session: Session, _ model: Model<Float>) throws(MPIError) {
    if !model.bufferTable.isEmpty { try session.communicator.broadcast(model.buffers, root: 0) }
}
