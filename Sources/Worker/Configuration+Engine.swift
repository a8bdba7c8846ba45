import Engine

/// Turns the `model.*`, `optimizer.*`, `schedule.*` and `gradcheck.*` keys into engine types. Errors name the key.
extension Configuration {
    func modelSpec(inputWidth: Int, classes: Int) throws -> ModelSpec {
        var layers: [LayerSpec] = []
        var width = inputWidth
        if self.layers.isEmpty {
            let activation = try parseActivation(self.activation, key: "model.activation")
            for (i, hiddenWidth) in hidden.enumerated() {
                guard hiddenWidth > 0 else { throw ConfigError(description: "model.hidden[\(i)]: widths must be positive, got \(hiddenWidth)") }
                layers.append(.linear(inputs: width, outputs: hiddenWidth))
                layers.append(activation)
                if dropout > 0 { layers.append(.dropout(probability: dropout)) }
                width = hiddenWidth
            }
        } else {
            for (i, item) in self.layers.enumerated() {
                let words = item.split(separator: " ").map(String.init)
                let key = "model.layers[\(i)]"
                guard let name = words.first else { throw ConfigError(description: "\(key): empty layer") }
                func argument() throws -> Double {
                    guard words.count == 2, let v = Double(words[1]) else {
                        throw ConfigError(description: "\(key): '\(item)' needs one number, e.g. '\(name) 0.1'")
                    }
                    return v
                }
                switch name {
                case "linear":
                    let outputs = try argument()
                    guard outputs >= 1, outputs == outputs.rounded() else {
                        throw ConfigError(description: "\(key): linear width must be a positive integer, got \(words[1])")
                    }
                    layers.append(.linear(inputs: width, outputs: Int(outputs)))
                    width = Int(outputs)
                case "dropout": layers.append(.dropout(probability: try argument()))
                case "leaky_relu": layers.append(.leakyReLU(slope: words.count == 1 ? 0.01 : try argument()))
                default:
                    guard words.count == 1 else { throw ConfigError(description: "\(key): '\(name)' takes no argument") }
                    layers.append(try parseActivation(name, key: key))
                }
            }
        }
        layers.append(.linear(inputs: width, outputs: classes))
        let spec = ModelSpec(layers: layers, loss: loss, initialization: initialization)
        do { try spec.validate() } catch { throw ConfigError(description: "model: \(error)") }
        return spec
    }

    private func parseActivation(_ name: String, key: String) throws -> LayerSpec {
        switch name {
        case "relu": .relu
        case "leaky_relu": .leakyReLU(slope: 0.01)
        case "tanh": .tanh
        case "sigmoid": .sigmoid
        case "gelu": .gelu
        default: throw ConfigError(description: "\(key): unknown layer '\(name)' (relu, leaky_relu, tanh, sigmoid, gelu, dropout P, linear N)")
        }
    }

    var optimizerConfig: OptimizerConfig {
        OptimizerConfig(kind: optimizer, momentum: optimizer == .sgd ? momentum : 0, nesterov: optimizer == .sgd && nesterov,
                        beta1: beta1, beta2: beta2, epsilon: epsilon, weightDecay: weightDecay)
    }

    func learningRateSchedule(totalSteps: Int) -> LearningRateSchedule {
        let kind: LearningRateSchedule.Kind = switch schedule {
        case .constant: .constant
        case .step: .step(every: stepSize, gamma: gamma)
        case .cosine: .cosine(totalSteps: totalSteps, minimum: minimumLearningRate)
        }
        return LearningRateSchedule(base: learningRate, kind: kind, warmupSteps: warmupSteps)
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
        try require(checkpointEverySteps >= 0, "checkpoint.every_steps must be >= 0, got \(checkpointEverySteps)")
        try require(checkpointKeep >= 1, "checkpoint.keep must be at least 1, got \(checkpointKeep)")
        try require(maxSkippedSteps >= 0, "numerics.max_skips must be >= 0, got \(maxSkippedSteps)")
        try require(replicaCheckEvery >= 0, "training.replica_check_every must be >= 0, got \(replicaCheckEvery)")
        try require(watchdogSeconds >= 0, "watchdog.timeout_seconds must be >= 0, got \(watchdogSeconds)")
        do {
            try optimizerConfig.validate()
            try gradientCheckOptions.validate()
        } catch {
            throw ConfigError(description: "\(error)")
        }
    }
}
