import Coordinator
import Engine

/// Turns the `model.*`, `optimizer.*`, `schedule.*` and `gradcheck.*` keys into engine types. Errors name the key.
extension Configuration {
    /// The model for samples of `sampleShape` (as stored: [F], [H, W] or [C, H, W]) and `classes` outputs:
    /// `model.layers` when given, else the MLP of `model.hidden`, `model.activation` and `model.dropout`; the output
    /// layer `linear classes` is added. A model with a kind that works on images only (`LayerKind.isSpatial`:
    /// convolutions, pooling, dropout2d) sees images [C, H, W] (an [H, W] sample is one channel); any other model
    /// sees flat samples.
    func modelSpec(sampleShape: [Int], classes: Int) throws -> ModelSpec {
        var layers: [LayerSpec] = []
        var words: [[String]] = []
        if self.layers.isEmpty {
            let activation = try Self.layerWords(self.activation, key: "model.activation")
            // An element-wise nonlinearity: any other entry (linear 3, batchnorm, flatten, dropout) built another network
            // than the key says, without a word.
            let kind = try Self.layer(activation, input: [max(1, hidden.first ?? 1)], key: "model.activation").kind
            guard type(of: kind).isActivation else {
                throw ConfigError(description: "model.activation: '\(activation.joined(separator: " "))' is not an activation ("
                    + LayerKinds.activationNames.joined(separator: ", ") + "); other layers go in model.layers")
            }
            for (i, hiddenWidth) in hidden.enumerated() {
                guard hiddenWidth > 0 else { throw ConfigError(description: "model.hidden[\(i)]: widths must be positive, got \(hiddenWidth)") }
                words += [["linear", "\(hiddenWidth)"], activation]
                if dropout > 0 { words.append(["dropout", "\(dropout)"]) }
            }
        } else {
            for (i, item) in self.layers.enumerated() { words.append(try Self.layerWords(item, key: "model.layers[\(i)]")) }
        }
        var shape: [Int]
        if let spatial = words.firstIndex(where: LayerKinds.entryIsSpatial) {
            switch sampleShape.count {
            case 2: shape = [1] + sampleShape
            case 3: shape = sampleShape
            default:
                let key = self.layers.isEmpty ? "model.activation" : "model.layers[\(spatial)]"
                throw ConfigError(description: "\(key): '\(words[spatial].joined(separator: " "))' needs image samples [H, W] or "
                    + "[C, H, W], but the data's samples are \(sampleShape)")
            }
        } else {
            shape = [sampleShape.reduce(1, *)]
        }
        let inputShape = shape
        for (i, layerWords) in words.enumerated() {
            let key = self.layers.isEmpty ? (layerWords[0] == "linear" ? "model.hidden" : "model.activation") : "model.layers[\(i)]"
            let layer = try Self.layer(layerWords, input: shape, key: key)
            do { shape = try layer.outputShape(input: shape) } catch {
                throw ConfigError(description: "\(key) '\(layerWords.joined(separator: " "))' (layer \(i) \(layer)): \(error.description)")
            }
            layers.append(layer)
        }
        guard shape.count == 1 else {
            throw ConfigError(description: "model.layers: the last layer gives \(shape) per sample; the output layer takes flat "
                + "samples: end the list with flatten (or with global pooling and flatten)")
        }
        layers.append(.linear(inputs: shape[0], outputs: classes))
        let spec = ModelSpec(layers: layers, loss: loss, labelSmoothing: labelSmoothing, initialization: initialization,
                             inputShape: inputShape)
        do { try spec.validate() } catch { throw ConfigError(description: "\(error)") }
        return spec
    }

    /// The words of one `model.layers` entry, checked against the grammar (each kind's `syntax`, listed in
    /// docs/convolutional-networks.md): its first word must name a kind of `LayerKinds`.
    static func layerWords(_ item: String, key: String) throws -> [String] {
        let words = item.split(separator: " ").map(String.init)
        guard let name = words.first else { throw ConfigError(description: "\(key): empty layer") }
        guard LayerKinds.named(name) != nil else { throw unknownLayer(name, key: key) }
        return words
    }

    private static func unknownLayer(_ name: String, key: String) -> ConfigError {
        ConfigError(description: "\(key): " + LayerKinds.unknownEntry(name))
    }

    /// One layer from its words, for input samples of `input` (which fixes a linear layer's inputs and the
    /// channels of a convolution or a normalisation): its kind parses it.
    static func layer(_ words: [String], input: [Int], key: String) throws -> LayerSpec {
        let parsed: LayerSpec?
        do { parsed = try LayerSpec.parse(words, input: input) } catch {
            // An entry inside a block is named by its place in it, model.layers[3].residual[1].
            // The entry as written, up to 120 characters (a forged one ran to 140 KB).
            let shown = LayerEntry.shown(words.joined(separator: " "))
            throw ConfigError(description: error.path.isEmpty ? "\(key): '\(shown)': \(error.reason)"
                : "\(key).\(error.path): \(error.reason)")
        }
        guard let parsed else { throw unknownLayer(words.first ?? "", key: key) }
        return parsed
    }

    /// One layer in `model.layers` syntax, the inverse of `layer(_:input:key:)` (model files record their layers so).
    static func layerText(_ layer: LayerSpec) -> String { layer.entry }

    /// `data.augment.*` for training samples of `sampleShape` (as stored); nil when all are off. Errors name the key.
    func augmentation(sampleShape: [Int]) throws -> Augmentation? {
        guard augmentCropPadding != 0 || augmentFlip || augmentErase > 0 else { return nil }
        do {
            return try Augmentation(cropPadding: augmentCropPadding, flip: augmentFlip, erase: augmentErase,
                                    seed: UInt64(max(0, seed)), sampleShape: sampleShape)
        } catch {
            throw ConfigError(description: "data.augment: \(error.description) (\(trainFeatures))")
        }
    }

    var optimizerConfig: OptimizerConfig {
        OptimizerConfig(kind: optimizer, momentum: optimizer == .sgd ? momentum : 0, nesterov: optimizer == .sgd && nesterov,
                        beta1: beta1, beta2: beta2, epsilon: epsilon, weightDecay: weightDecay)
    }

    /// The schedule of a run of `totalSteps` steps (`training.epochs` times the steps per epoch).
    func learningRateSchedule(totalSteps: Int) -> LearningRateSchedule {
        let kind: LearningRateSchedule.Kind = switch schedule {
        case .constant: .constant
        case .step: .step(every: stepSize, gamma: gamma)
        case .cosine: .cosine(totalSteps: totalSteps, minimum: minimumLearningRate)
        }
        return LearningRateSchedule(base: learningRate, kind: kind, warmupSteps: resolvedWarmupSteps(totalSteps: totalSteps))
    }

    /// `schedule.warmup_steps` for a run of `totalSteps` steps: a set value as it is; `auto` is
    /// `defaultWarmupSteps`, capped to a tenth of the run (`autoWarmupRunDivisor`). The cap depends on the run's
    /// total steps alone, as the cosine schedule does, so a resume that keeps the schedule keeps the warmup.
    func resolvedWarmupSteps(totalSteps: Int) -> Int {
        switch warmupSteps {
        case let .steps(steps): steps
        case .auto: min(Self.defaultWarmupSteps, totalSteps / Self.autoWarmupRunDivisor)
        }
    }

    /// `data.remainder` for a training set of `samples` and a global batch of `globalBatch`: a set value as it is;
    /// `auto` drops, unless the set does not fill one global batch, where dropping would leave no step: it wraps.
    /// A default must not make a valid run an error; `drop` set on such a set is refused with the reason.
    func resolvedRemainder(samples: Int, globalBatch: Int) -> ShardSampler.Remainder {
        switch remainder {
        case .drop: .drop
        case .wrap: .wrap
        case .auto: samples >= globalBatch ? .drop : .wrap
        }
    }

    /// Rank 0's line when `auto` wraps the remainder; nil when it does not.
    func wrappedRemainderNote(samples: Int, globalBatch: Int) -> String? {
        guard remainder == .auto, resolvedRemainder(samples: samples, globalBatch: globalBatch) == .wrap else { return nil }
        return "data.remainder: auto wraps the samples around (the training set's \(samples) do not fill one global batch of "
            + "\(globalBatch), and dropping them would leave no step; set data.remainder to choose)"
    }

    /// Rank 0's line when `auto` caps the warmup of a run of `totalSteps` steps; nil when it does not.
    func cappedWarmupNote(totalSteps: Int) -> String? {
        let warmup = resolvedWarmupSteps(totalSteps: totalSteps)
        guard warmupSteps == .auto, warmup < Self.defaultWarmupSteps else { return nil }
        return "schedule.warmup_steps: default \(Self.defaultWarmupSteps) capped to \(warmup) of the run's \(totalSteps) steps "
            + "(auto warms up over at most a tenth of the run; set schedule.warmup_steps to choose)"
    }

    /// Checks the schedule of a training run of `stepsPerEpoch` steps per epoch (`gradcheck` and `eval` run no schedule
    /// and do not ask). A set warmup the run cannot hold is refused, naming the key, its value and the run's steps;
    /// `auto` always fits.
    func validateSchedule(stepsPerEpoch: Int) throws {
        let totalSteps = stepsPerEpoch * epochs
        if case let .steps(steps) = warmupSteps {
            guard steps >= 0 else { throw ConfigError(description: "schedule.warmup_steps must be >= 0 or auto, got \(steps)") }
            guard schedule != .cosine || steps < totalSteps else {
                throw ConfigError(description: "schedule.warmup_steps=\(steps) does not fit this run: the cosine schedule needs "
                    + "steps after its warmup, and the run has \(totalSteps) (\(counted(epochs, "epoch")) of \(stepsPerEpoch)); set "
                    + "schedule.warmup_steps below \(totalSteps), remove it (auto: at most a tenth of the run), or train longer "
                    + "(training.epochs)")
            }
        }
        do { try learningRateSchedule(totalSteps: totalSteps).validate() } catch {
            throw ConfigError(description: "schedule: \(error)")
        }
    }

    var gradientCheckOptions: GradientCheckOptions {
        var options = GradientCheckOptions()
        options.epsilon = gradcheckEpsilon
        options.samplesPerTensor = gradcheckSamples
        options.checkAllCoordinates = gradcheckAll
        options.seed = UInt64(truncatingIfNeeded: seed)
        return options
    }

    /// `training.blas_threads`, which a session sets before the other settings are checked.
    func validateBLASThreads() throws {
        guard (0...1024).contains(blasThreads) else {
            throw ConfigError(description: "training.blas_threads must be in 0...1024 (0 = automatic), got \(blasThreads)")
        }
    }

    /// Checks the settings that no single engine type sees; the message names the key.
    func validateSettings() throws {
        func require(_ ok: Bool, _ message: String) throws { if !ok { throw ConfigError(description: message) } }
        try require(batchSize >= 1, "training.batch_size must be at least 1, got \(batchSize)")
        // So that batch x ranks x sample values cannot overflow before the memory check refuses what does not fit.
        try require(batchSize <= 1 << 24, "training.batch_size must be at most 16777216, got \(batchSize)")
        try require(epochs >= 1, "training.epochs must be at least 1, got \(epochs)")
        try require(epochs <= 1 << 24, "training.epochs must be at most 16777216, got \(epochs)")
        try require(inputs >= 0, "model.inputs must be >= 0 (0 = from the data), got \(inputs)")
        try require(classes >= 0, "model.classes must be >= 0 (0 = from the labels), got \(classes)")
        try require(bucketKiB >= 0 && bucketKiB <= 1 << 24,
                    "training.bucket_kib must be in 0...16777216 (0 = one fused allreduce), got \(bucketKiB)")
        try require(targetAccuracy >= 0 && targetAccuracy <= 1, "training.target_accuracy must be in [0, 1], got \(targetAccuracy)")
        try validateBLASThreads()
        try require(logInterval >= 1, "logging.interval must be at least 1, got \(logInterval)")
        try require(clipNorm >= 0, "optimizer.clip_norm must be >= 0 (0 = off), got \(clipNorm)")
        try require(gradcheckBatch >= 1, "gradcheck.batch must be at least 1, got \(gradcheckBatch)")
        try require(dropout >= 0 && dropout < 1, "model.dropout must be in [0, 1), got \(dropout)")
        try require(labelSmoothing >= 0 && labelSmoothing < 1,
                    "model.label_smoothing must be in [0, 1) (0 = off; 1 would make every target uniform), got \(labelSmoothing)")
        try require(labelSmoothing == 0 || loss == .softmaxCrossEntropy,
                    "model.label_smoothing applies to model.loss cross_entropy only, the loss is \(loss.rawValue)")
        try require(seed >= 0, "seed must be >= 0, got \(seed)")
        try require(dataPrefetch >= 0 && dataPrefetch <= 1024,
                    "data.prefetch must be in 0...1024 (batches gathered ahead; 0 = in the step), got \(dataPrefetch)")
        try require(augmentCropPadding >= 0, "data.augment.crop_padding must be >= 0 (0 = no cropping), got \(augmentCropPadding)")
        try require(augmentErase >= 0 && augmentErase <= 1,
                    "data.augment.erase must be a probability in [0, 1] (0 = off), got \(augmentErase)")
        try require(checkpointEverySteps >= 0, "checkpoint.every_steps must be >= 0, got \(checkpointEverySteps)")
        try require(checkpointEverySeconds >= 0 && checkpointEverySeconds.isFinite,
                    "checkpoint.every_seconds must be >= 0 (0 = off), got \(checkpointEverySeconds)")
        try require(checkpointKeep >= 1, "checkpoint.keep must be at least 1, got \(checkpointKeep)")
        try require(checkpointMaxFailures >= 0, "checkpoint.max_failures must be >= 0, got \(checkpointMaxFailures)")
        try require(maxSkippedSteps >= 0, "numerics.max_skips must be >= 0, got \(maxSkippedSteps)")
        try require(replicaCheckEvery >= 0, "training.replica_check_every must be >= 0, got \(replicaCheckEvery)")
        try require(watchdogSeconds >= 0, "watchdog.timeout_seconds must be >= 0, got \(watchdogSeconds)")
        try require(timelineSteps >= 0 && timelineSteps <= 1 << 24, "timeline.steps must be in 0...16777216 (0 = off), got \(timelineSteps)")
        try require(timelineWarmupSteps >= 0, "timeline.warmup_steps must be >= 0, got \(timelineWarmupSteps)")
        // The optimizer's keys by name (the engine's own checks below say "momentum", not which key to change).
        try require(learningRate > 0 && learningRate.isFinite, "optimizer.lr must be positive and finite, got \(learningRate)")
        // Training runs in float32: a value the checks above accept in float64 must survive the conversion, or the
        // run trains on infinity, zero or a momentum of 1 without a word (lr=1e300 ended "finished" with every
        // weight inf).
        try require(Float(learningRate).isFinite && Float(learningRate) > 0,
                    "optimizer.lr=\(learningRate) is \(Float(learningRate)) in float32, the precision training runs in")
        try require(momentum >= 0 && momentum < 1, "optimizer.momentum must be in [0, 1), got \(momentum)")
        try require(Float(momentum) < 1, "optimizer.momentum=\(momentum) rounds to 1 in float32, the precision training runs in")
        try require(!(optimizer == .sgd && nesterov && momentum == 0),
                    "optimizer.nesterov (on by default) needs optimizer.momentum > 0; for plain SGD set optimizer.nesterov=false")
        try require(beta1 >= 0 && beta1 < 1, "optimizer.beta1 must be in [0, 1), got \(beta1)")
        try require(beta2 >= 0 && beta2 < 1, "optimizer.beta2 must be in [0, 1), got \(beta2)")
        // An infinite epsilon divides every Adam step to zero: the model silently stops learning.
        try require(epsilon > 0 && epsilon.isFinite, "optimizer.eps must be positive and finite, got \(epsilon)")
        // Zero in float32, it divides 0 by 0 for every coordinate with no gradient.
        try require(Float(epsilon) > 0 && Float(epsilon).isFinite,
                    "optimizer.eps=\(epsilon) is \(Float(epsilon)) in float32, the precision training runs in")
        try require(weightDecay >= 0 && weightDecay.isFinite, "optimizer.weight_decay must be finite and >= 0, got \(weightDecay)")
        try require(Float(weightDecay).isFinite,
                    "optimizer.weight_decay=\(weightDecay) is \(Float(weightDecay)) in float32, the precision training runs in")
        try require(clipNorm.isFinite, "optimizer.clip_norm must be finite (0 = off), got \(clipNorm)")
        try require(watchdogSeconds.isFinite, "watchdog.timeout_seconds must be finite (0 = off), got \(watchdogSeconds)")
        do {
            try optimizerConfig.validate()
            try gradientCheckOptions.validate()
        } catch {
            throw ConfigError(description: "\(error)")
        }
    }
}
