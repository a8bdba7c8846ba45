/// PyTorch `nn.BatchNorm1d(features)` on [F] samples or `nn.BatchNorm2d(features)` on [C, H, W], the entry `batchnorm`
/// (the features come from the layer before): normalise each feature (channel) over the batch (and the positions),
/// then scale by weight and shift by bias. eps 1e-5, momentum 0.1; running mean and (unbiased) variance are kept in
/// training and used in evaluation.
public struct BatchNormKind: LayerKind {
    public let features: Int

    public static var syntax: String { "batchnorm" }
    public static var isSpatial: Bool { false }
    public static func parse(_ entry: LayerEntry, input: [Int]) throws(LayerEntryError) -> Self {
        try entry.expectCount(1)
        return Self(features: input.first ?? 0)
    }
    public var entry: String { "batchnorm" }
    public var description: String { "BatchNorm(\(features))" }

    public func outputShape(input: [Int]) throws(ModelSpecError) -> [Int] {
        guard input.count == 1 || input.count == 3 else {
            throw ModelSpecError("batch norm takes [F] or [C, H, W] samples, its input is \(input)")
        }
        guard input[0] == features else { throw ModelSpecError("expects \(features) features (channels) but its input is \(input)") }
        return input
    }
    public func parameterShapes(input: [Int]) -> [(String, [Int])] { [("weight", [features]), ("bias", [features])] }
    public var bufferShapes: [(String, [Int])] {
        [("running_mean", [features]), ("running_var", [features]), ("num_batches_tracked", [])]
    }
    public func workspace(input: [Int], output: [Int], batchCapacity rows: Double, scalarBytes: Double) -> LayerWorkspace {
        (Double(4 * features + 1) * 8, 0)  // sums, mean, inverse deviation (Double)
    }

    public var hasKink: Bool { false }
    public var initializationRole: InitializationRole { .transparent }
    /// Its backward pass reads x and its saved statistics, never y.
    public var outputMayBeOverwritten: Bool { true }
    public func runsInPlace(after previous: LayerSpec?) -> Bool { false }
    public func torchModule(input: [Int]) -> TorchModule {
        TorchModule(input.count == 3 ? "BatchNorm2d" : "BatchNorm1d", [.int(features)],
                    ["eps": .number(BatchNorm<Double>.epsilon), "momentum": .number(BatchNorm<Double>.momentum)])
    }
    public func makeLayer<T: Scalar>(_ placement: LayerPlacement) -> Layer<T> { BatchNorm<T>(placement, spec: LayerSpec(self)) }
}

extension LayerSpec {
    public static func batchNorm(features: Int) -> LayerSpec { LayerSpec(BatchNormKind(features: features)) }
}

/// Batch norm, per feature c over the N = B S values of the batch (S = H W positions for images, 1 for features):
///
///     mean = sum x / N,  var = sum (x - mean)^2 / N,  xhat = (x - mean) / sqrt(var + eps),  y = gamma xhat + beta
///
/// and its backward pass is three named reductions, as in the derivation (and in Darknet's batchnorm_layer.c):
///
///     dbeta  = sum dy                          (`sumGradient`)
///     dgamma = sum dy xhat                     (`sumGradientXhat`)
///     dx     = gamma / sqrt(var + eps) (dy - dbeta / N - xhat dgamma / N)
///
/// The last line is what remains of the mean's and the variance's own dependence on x: leave out the dbeta / N
/// term and the gradient misses the mean (a test fault does exactly that: `GradientFault.batchNormWithoutMeanTerm`). Sums are in Double. In training
/// the running mean and the unbiased running variance move by momentum 0.1 and `num_batches_tracked` counts; in
/// evaluation they replace the batch's statistics. With a `CrossRankReducer` (synchronized batch norm) the forward
/// sums and the backward reductions are summed over the ranks first, so N is the global batch.
final class BatchNorm<T: Scalar>: Layer<T> {
    static var epsilon: Double { 1e-5 }
    static var momentum: Double { 0.1 }

    let features: Int
    /// Values per feature per sample: H W for images, 1 for flat features.
    let positions: Int
    /// Sums of the global batch: set for synchronized batch norm.
    unowned(unsafe) var reducer: CrossRankReducer?
    /// Per feature: [sum x, sum x^2] in forward, [sum dy, sum dy xhat] in backward, then the number of values they
    /// sum over (2 features + 1 values, Double): reduced together across ranks in one call.
    let sums: UnsafeMutableBufferPointer<Double>
    /// Per feature, from the last forward pass: the mean and 1 / sqrt(var + eps) it normalised with.
    let mean: UnsafeMutablePointer<Double>
    let inverseDeviation: UnsafeMutablePointer<Double>
    /// Per feature, from the last forward pass: y = x scale + shift (scale = gamma / sqrt(var + eps)).
    let scale: UnsafeMutablePointer<T>
    let shift: UnsafeMutablePointer<T>
    /// The values the last forward pass normalised over (the global batch under a reducer), and whether it used the
    /// batch's statistics (not the running ones).
    private(set) var lastCount = 0.0
    private(set) var lastUsedBatchStatistics = true
    /// The max pooling after this layer and a ReLU, when the three run as one block (see BatchNormReLUPool.swift):
    /// then this layer's forward pass only computes the statistics, and its backward pass reads the reductions the
    /// pooling computed. Set by the model.
    unowned(unsafe) var fusedPool: MaxPool2d<T>?

    override init(_ placement: LayerPlacement, spec: LayerSpec) {
        let inputShape = placement.inputShape
        features = inputShape[0]
        positions = inputShape.dropFirst().reduce(1, *)
        sums = .allocate(capacity: 2 * inputShape[0] + 1)
        sums.initialize(repeating: 0)
        mean = .allocate(capacity: inputShape[0])
        mean.initialize(repeating: 0, count: inputShape[0])
        inverseDeviation = .allocate(capacity: inputShape[0])
        inverseDeviation.initialize(repeating: 1, count: inputShape[0])
        scale = .allocate(capacity: inputShape[0])
        scale.initialize(repeating: 1, count: inputShape[0])
        shift = .allocate(capacity: inputShape[0])
        shift.initialize(repeating: 0, count: inputShape[0])
        super.init(placement, spec: spec)
    }

    override func attach(to model: Model<T>) { reducer = model.crossRankReducer }

    deinit {
        sums.deallocate()
        mean.deallocate()
        inverseDeviation.deallocate()
        scale.deallocate()
        shift.deallocate()
    }


    private var gamma: UnsafeMutablePointer<T> { parameters! }
    private var beta: UnsafeMutablePointer<T> { parameters! + features }
    private var runningMean: UnsafeMutablePointer<T> { buffers! }
    private var runningVariance: UnsafeMutablePointer<T> { buffers! + features }
    private var batchesTracked: UnsafeMutablePointer<T> { buffers! + 2 * features }

    /// The forward pass. The reduction across ranks can fail (MPI); the model reports that as the pass's error.
    override func forward(count: Int, mode: ForwardMode) {
        lastUsedBatchStatistics = mode.usesBatchStatistics
        if mode.usesBatchStatistics {
            featureSums(x, samples: count, features: features, positions: positions, into: sums.baseAddress!)
            sums[2 * features] = Double(count * positions)
            reducer?.sumAcrossRanks(sums)
            let n = sums[2 * features]
            lastCount = n
            for c in 0..<features {
                let m = sums[c] / n
                // E[x^2] - m^2 in Double: the values are Float activations, far inside Double's precision.
                let variance = max(0, sums[features + c] / n - m * m)
                mean[c] = m
                inverseDeviation[c] = 1 / (variance + Self.epsilon).squareRoot()
                if mode == .train {
                    let unbiased = n > 1 ? variance * n / (n - 1) : variance
                    runningMean[c] = T((1 - Self.momentum) * Double(runningMean[c]) + Self.momentum * m)
                    runningVariance[c] = T((1 - Self.momentum) * Double(runningVariance[c]) + Self.momentum * unbiased)
                }
            }
            if mode == .train { batchesTracked[0] += 1 }
        } else {
            for c in 0..<features {
                mean[c] = Double(runningMean[c])
                inverseDeviation[c] = 1 / (Double(runningVariance[c]) + Self.epsilon).squareRoot()
            }
        }
        for c in 0..<features {
            scale[c] = T(Double(gamma[c]) * inverseDeviation[c])
            shift[c] = beta[c] - T(mean[c]) * scale[c]
        }
        // Fused, the pooling normalises as it pools.
        if fusedPool == nil {
            normalizeFeatures(x, y, samples: count, features: features, positions: positions, scale: scale, shift: shift)
        }
    }

    override func backwardParameters(count: Int, accumulate: Bool) {
        // dbeta[c] = sum dy, dgamma[c] = sum dy xhat: the named reductions, kept in `sums` for the input gradient.
        // The parameter gradients are this rank's (the gradient reduction averages them like every other). Fused,
        // the pooling's backward pass has summed them already, over its winners (every other dy is zero).
        if fusedPool == nil {
            featureGradientSums(x, dy, samples: count, features: features, positions: positions, mean: mean,
                                inverseDeviation: inverseDeviation, into: sums.baseAddress!)
        }
        let g = gradients!
        for c in 0..<features {
            g[c] = T(sums[features + c]) + (accumulate ? g[c] : 0)            // dgamma
            g[features + c] = T(sums[c]) + (accumulate ? g[features + c] : 0)  // dbeta
        }
        provenFinite = false
    }

    override func backwardInput(count: Int, accumulate: Bool) {
        guard let dx else { return }
        if lastUsedBatchStatistics {
            // Synchronized: the input gradient needs the global batch's reductions (the count slot is reduced along).
            reducer?.sumAcrossRanks(sums)
            inputGradient(count: count, dx: dx, sums: sums.baseAddress!)
        } else {
            // Running statistics are constants: dx = dy gamma / sqrt(running var + eps).
            inputGradient(count: count, dx: dx, sums: nil)
        }
    }

    /// dx from the reductions (`sums`, nil for running statistics): over this layer's own dy, or fused, from the
    /// pooling's dy routed to its winners.
    private func inputGradient(count: Int, dx: UnsafeMutablePointer<T>, sums: UnsafePointer<Double>?) {
        let factors = GradientFactors(mean: mean, inverseDeviation: inverseDeviation, gamma: gamma, sums: sums,
                                      count: sums == nil ? 1 : lastCount)
        if let pool = fusedPool {
            normalizeReLUPoolBackward(x, dx, pool: pool, samples: count, factors: factors)
        } else {
            normalizeBackward(x, dy, dx, samples: count, features: features, positions: positions, factors: factors)
        }
    }

    override func initialize(scheme: Initialization, gain: Double, generator: inout RandomGenerator) {
        gamma.update(repeating: 1, count: features)
        beta.update(repeating: 0, count: features)
        runningMean.update(repeating: 0, count: features)
        runningVariance.update(repeating: 1, count: features)
        batchesTracked[0] = 0
    }
}
