import Engine

/// Turns the `model.*`, `optimizer.*`, `schedule.*` and `gradcheck.*` keys into engine types. Errors name the key.
extension Configuration {
    /// The model for samples of `sampleShape` (as stored: [F], [H, W] or [C, H, W]) and `classes` outputs:
    /// `model.layers` when given, else the MLP of `model.hidden`, `model.activation` and `model.dropout`; the output
    /// layer `linear classes` is added. A model with convolutions or pooling sees images [C, H, W] (an [H, W]
    /// sample is one channel); any other model sees flat samples.
    func modelSpec(sampleShape: [Int], classes: Int) throws -> ModelSpec {
        var layers: [LayerSpec] = []
        var words: [[String]] = []
        if self.layers.isEmpty {
            let activation = try Self.layerWords(self.activation, key: "model.activation")
            for (i, hiddenWidth) in hidden.enumerated() {
                guard hiddenWidth > 0 else { throw ConfigError(description: "model.hidden[\(i)]: widths must be positive, got \(hiddenWidth)") }
                words += [["linear", "\(hiddenWidth)"], activation]
                if dropout > 0 { words.append(["dropout", "\(dropout)"]) }
            }
        } else {
            for (i, item) in self.layers.enumerated() { words.append(try Self.layerWords(item, key: "model.layers[\(i)]")) }
        }
        let spatial = words.contains { ["conv", "maxpool", "avgpool", "globalavgpool"].contains($0[0]) }
        var shape: [Int]
        if spatial {
            switch sampleShape.count {
            case 2: shape = [1] + sampleShape
            case 3: shape = sampleShape
            default:
                throw ConfigError(description: "model.layers: convolutions and pooling need image samples [H, W] or [C, H, W], "
                    + "but the data's samples are \(sampleShape)")
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
        let spec = ModelSpec(layers: layers, loss: loss, initialization: initialization, inputShape: inputShape)
        do { try spec.validate() } catch { throw ConfigError(description: "model: \(error)") }
        return spec
    }

    /// The words of one `model.layers` entry, checked against the grammar (docs/convolutional-networks.md):
    ///   linear N | conv OUT K [stride S] [pad P] [nobias] | maxpool K [stride S] | avgpool K [stride S] |
    ///   globalavgpool | flatten | batchnorm | layernorm | relu | leaky_relu [SLOPE] | tanh | sigmoid | gelu | dropout P
    static func layerWords(_ item: String, key: String) throws -> [String] {
        let words = item.split(separator: " ").map(String.init)
        guard let name = words.first else { throw ConfigError(description: "\(key): empty layer") }
        let grammar: [String: String] = [
            "linear": "linear N", "conv": "conv OUT K [stride S] [pad P] [nobias]", "maxpool": "maxpool K [stride S]",
            "avgpool": "avgpool K [stride S]", "globalavgpool": "globalavgpool", "flatten": "flatten",
            "batchnorm": "batchnorm", "layernorm": "layernorm", "relu": "relu", "leaky_relu": "leaky_relu [SLOPE]",
            "tanh": "tanh", "sigmoid": "sigmoid", "gelu": "gelu", "dropout": "dropout P",
        ]
        guard grammar[name] != nil else {
            throw ConfigError(description: "\(key): unknown layer '\(name)' (" + grammar.keys.sorted().joined(separator: ", ") + ")")
        }
        return words
    }

    /// One layer from its words, for input samples of `input` (which fixes a linear layer's inputs and the
    /// channels of a convolution or a normalisation).
    static func layer(_ words: [String], input: [Int], key: String) throws -> LayerSpec {
        let parsed = LayerWords(words: words, key: key), name = words[0]
        let flat = input.count == 1 ? input[0] : 0
        switch name {
        case "linear":
            try parsed.expectCount(2)
            guard input.count == 1 else { throw parsed.fail("takes flat samples, but its input is \(input): put a flatten before it") }
            guard let width = Double(words[1]), width >= 1, width == width.rounded(), width < 1e15 else {
                throw parsed.fail("linear width must be a positive integer, got \(words[1])")
            }
            return .linear(inputs: flat, outputs: Int(width))
        case "conv":
            guard words.count >= 3 else { throw parsed.fail("conv needs its output channels and kernel size, e.g. 'conv 32 3 pad 1'") }
            let outChannels = try parsed.integer(words[1], "output channels", minimum: 1)
            let kernel = try parsed.integer(words[2], "kernel size", minimum: 1)
            let o = try parsed.options(from: 3, allowed: ["stride", "pad", "nobias"])
            return .conv2d(inChannels: input.count == 3 ? input[0] : 0, outChannels: outChannels, kernel: kernel,
                           stride: o["stride"] ?? 1, padding: o["pad"] ?? 0, bias: o["nobias"] == nil)
        case "maxpool", "avgpool":
            guard words.count >= 2 else { throw parsed.fail("\(name) needs its window size, e.g. '\(name) 2'") }
            let kernel = try parsed.integer(words[1], "window size", minimum: 1)
            let stride = try parsed.options(from: 2, allowed: ["stride"])["stride"] ?? kernel
            return name == "maxpool" ? .maxPool2d(kernel: kernel, stride: stride) : .avgPool2d(kernel: kernel, stride: stride)
        case "globalavgpool":
            try parsed.expectCount(1)
            return .globalAvgPool2d
        case "flatten":
            try parsed.expectCount(1)
            return .flatten
        case "batchnorm":
            try parsed.expectCount(1)
            return .batchNorm(features: input.first ?? 0)
        case "layernorm":
            try parsed.expectCount(1)
            return .layerNorm(features: input.last ?? 0)
        case "dropout":
            try parsed.expectCount(2)
            return .dropout(probability: try parsed.number(words[1]))
        case "leaky_relu":
            guard words.count <= 2 else { throw parsed.fail("'leaky_relu' takes at most one number, its slope") }
            return .leakyReLU(slope: words.count == 2 ? try parsed.number(words[1]) : 0.01)
        default:
            try parsed.expectCount(1)
            switch name {
            case "relu": return .relu
            case "tanh": return .tanh
            case "sigmoid": return .sigmoid
            default: return .gelu
            }
        }
    }

    /// One layer in `model.layers` syntax, the inverse of `layer(_:input:key:)` (model files record their layers so).
    static func layerText(_ layer: LayerSpec) -> String {
        switch layer {
        case let .linear(_, outputs): "linear \(outputs)"
        case let .conv2d(_, o, k, s, p, bias):
            "conv \(o) \(k)" + (s != 1 ? " stride \(s)" : "") + (p != 0 ? " pad \(p)" : "") + (bias ? "" : " nobias")
        case let .maxPool2d(k, s): "maxpool \(k)" + (s != k ? " stride \(s)" : "")
        case let .avgPool2d(k, s): "avgpool \(k)" + (s != k ? " stride \(s)" : "")
        case .globalAvgPool2d: "globalavgpool"
        case .flatten: "flatten"
        case .batchNorm: "batchnorm"
        case .layerNorm: "layernorm"
        case .relu: "relu"
        case let .leakyReLU(slope): "leaky_relu \(slope)"
        case .tanh: "tanh"
        case .sigmoid: "sigmoid"
        case .gelu: "gelu"
        case let .dropout(p): "dropout \(p)"
        }
    }

    /// `data.augment.*` for training samples of `sampleShape` (as stored); nil when both are off. Errors name the key.
    func augmentation(sampleShape: [Int]) throws -> Augmentation? {
        guard augmentCropPadding != 0 || augmentFlip else { return nil }
        do {
            return try Augmentation(cropPadding: augmentCropPadding, flip: augmentFlip, seed: UInt64(max(0, seed)),
                                    sampleShape: sampleShape)
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

    /// Checks the settings that no single engine type sees; the message names the key.
    func validateSettings() throws {
        func require(_ ok: Bool, _ message: String) throws { if !ok { throw ConfigError(description: message) } }
        try require(batchSize >= 1, "training.batch_size must be at least 1, got \(batchSize)")
        try require(epochs >= 1, "training.epochs must be at least 1, got \(epochs)")
        try require(bucketKiB >= 0, "training.bucket_kib must be >= 0 (0 = one fused allreduce), got \(bucketKiB)")
        try require(targetAccuracy >= 0 && targetAccuracy <= 1, "training.target_accuracy must be in [0, 1], got \(targetAccuracy)")
        try require(blasThreads >= 0, "training.blas_threads must be >= 0, got \(blasThreads)")
        try require(logInterval >= 1, "logging.interval must be at least 1, got \(logInterval)")
        try require(clipNorm >= 0, "optimizer.clip_norm must be >= 0 (0 = off), got \(clipNorm)")
        try require(gradcheckBatch >= 1, "gradcheck.batch must be at least 1, got \(gradcheckBatch)")
        try require(dropout >= 0 && dropout < 1, "model.dropout must be in [0, 1), got \(dropout)")
        try require(seed >= 0, "seed must be >= 0, got \(seed)")
        try require(dataPrefetch >= 0 && dataPrefetch <= 1024,
                    "data.prefetch must be in 0...1024 (batches gathered ahead; 0 = in the step), got \(dataPrefetch)")
        try require(augmentCropPadding >= 0, "data.augment.crop_padding must be >= 0 (0 = no cropping), got \(augmentCropPadding)")
        try require(checkpointEverySteps >= 0, "checkpoint.every_steps must be >= 0, got \(checkpointEverySteps)")
        try require(checkpointEverySeconds >= 0 && checkpointEverySeconds.isFinite,
                    "checkpoint.every_seconds must be >= 0 (0 = off), got \(checkpointEverySeconds)")
        try require(checkpointKeep >= 1, "checkpoint.keep must be at least 1, got \(checkpointKeep)")
        try require(checkpointMaxFailures >= 0, "checkpoint.max_failures must be >= 0, got \(checkpointMaxFailures)")
        try require(maxSkippedSteps >= 0, "numerics.max_skips must be >= 0, got \(maxSkippedSteps)")
        try require(replicaCheckEvery >= 0, "training.replica_check_every must be >= 0, got \(replicaCheckEvery)")
        try require(watchdogSeconds >= 0, "watchdog.timeout_seconds must be >= 0, got \(watchdogSeconds)")
        try require(timelineSteps >= 0, "timeline.steps must be >= 0 (0 = off), got \(timelineSteps)")
        try require(timelineWarmupSteps >= 0, "timeline.warmup_steps must be >= 0, got \(timelineWarmupSteps)")
        do {
            try optimizerConfig.validate()
            try gradientCheckOptions.validate()
        } catch {
            throw ConfigError(description: "\(error)")
        }
    }
}

/// The words of one item of `model.layers`, and the checks `Configuration.layer` makes on them; every error names
/// the key and the item.
private struct LayerWords {
    let words: [String]
    let key: String

    func fail(_ reason: String) -> ConfigError {
        ConfigError(description: "\(key): '\(words.joined(separator: " "))': \(reason)")
    }

    func integer(_ text: String, _ what: String, minimum: Int) throws -> Int {
        guard let v = Int(text), v >= minimum else { throw fail("\(what) must be an integer >= \(minimum), got \(text)") }
        return v
    }

    func number(_ text: String) throws -> Double {
        guard let v = Double(text), v.isFinite else { throw fail("expected a number, got \(text)") }
        return v
    }

    /// Options after the positional words: "stride 2", "pad 1", "nobias".
    func options(from start: Int, allowed: Set<String>) throws -> [String: Int] {
        var result: [String: Int] = [:]
        var i = start
        while i < words.count {
            let option = words[i]
            guard allowed.contains(option) else {
                throw fail("unknown option '\(option)' (\(allowed.sorted().joined(separator: ", ")))")
            }
            if option == "nobias" {
                result[option] = 1
                i += 1
                continue
            }
            guard i + 1 < words.count else { throw fail("'\(option)' needs a number") }
            result[option] = try integer(words[i + 1], option, minimum: option == "pad" ? 0 : 1)
            i += 2
        }
        return result
    }

    /// The item has exactly `expected` words, its name included.
    func expectCount(_ expected: Int) throws {
        let name = words[0]
        if words.count != expected {
            throw fail(expected == 1 ? "'\(name)' takes no argument"
                : "'\(name)' needs \(expected - 1) argument\(expected == 2 ? "" : "s")")
        }
    }
}
