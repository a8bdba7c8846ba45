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

    let statistics: BatchNormStatistics<T>
    override var normalization: BatchNormStatistics<T>? { statistics }

    override init(_ placement: LayerPlacement, spec: LayerSpec) {
        statistics = BatchNormStatistics(features: placement.inputShape[0],
                                         positions: placement.inputShape.dropFirst().reduce(1, *))
        super.init(placement, spec: spec)
    }

    override func attach(to model: Model<T>) { statistics.reducer = model.crossRankReducer }

    /// The forward pass. The reduction across ranks can fail (MPI); the model reports that as the pass's error.
    override func forward(count: Int, mode: ForwardMode) {
        statistics.update(x, count: count, mode: mode, parameters: parameters!, buffers: buffers!)
        normalizeFeatures(x, y, samples: count, features: statistics.features, positions: statistics.positions,
                          scale: statistics.scale, shift: statistics.shift)
    }

    override func backwardParameters(count: Int, accumulate: Bool) {
        // dbeta[c] = sum dy, dgamma[c] = sum dy xhat: the named reductions, kept in `sums` for the input gradient.
        featureGradientSums(x, dy, samples: count, features: statistics.features, positions: statistics.positions,
                            mean: statistics.mean, inverseDeviation: statistics.inverseDeviation,
                            into: statistics.sums.baseAddress!)
        statistics.writeParameterGradients(gradients!, accumulate: accumulate)
        provenFinite = false
    }

    override func backwardInput(count: Int, accumulate: Bool) {
        guard let dx else { return }
        normalizeBackward(x, dy, dx, samples: count, features: statistics.features, positions: statistics.positions,
                          factors: statistics.inputGradientFactors(gamma: parameters!))
    }

    override func initialize(scheme: Initialization, gain: Double, generator: inout RandomGenerator) {
        statistics.initialize(parameters: parameters!, buffers: buffers!)
    }
}

/// What a batch norm keeps between its passes, and the arithmetic around its kernels: the statistics of the forward
/// pass, the reductions of the backward pass, the parameter gradients from them and the running statistics. The
/// batch norm layer owns one, and so does a batch norm run fused with the ReLU and max pooling after it
/// (BatchNormReLUPool.swift): the two differ only in the passes over the activations.
///
/// The layer's tensors, as `parameterShapes` and `bufferShapes` lay them out: parameters [gamma F, beta F], buffers
/// [running mean F, running variance F, num_batches_tracked].
final class BatchNormStatistics<T: Scalar> {
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
    /// Set by the layer before (a convolution, `Conv2d.outputStatistics`) when its forward pass has written the
    /// forward sums of its output, which is this batch norm's input, into `sums` (`startSums`, then `addFeatureSums`
    /// as each sample left its kernels, still in the cache): `update` takes them instead of reading x again, and
    /// clears this. Bit for bit the sums `update` finds itself; a pass that starts at this layer (the gradient check
    /// recomputes from a perturbed layer on) finds it clear.
    var sumsArrived = false

    init(features: Int, positions: Int) {
        self.features = features
        self.positions = positions
        sums = .allocate(capacity: 2 * features + 1)
        sums.initialize(repeating: 0)
        mean = .allocate(capacity: features)
        mean.initialize(repeating: 0, count: features)
        inverseDeviation = .allocate(capacity: features)
        inverseDeviation.initialize(repeating: 1, count: features)
        scale = .allocate(capacity: features)
        scale.initialize(repeating: 1, count: features)
        shift = .allocate(capacity: features)
        shift.initialize(repeating: 0, count: features)
    }

    deinit {
        sums.deallocate()
        mean.deallocate()
        inverseDeviation.deallocate()
        scale.deallocate()
        shift.deallocate()
    }

    /// Double input (the float64 gradient check): replaces the sums of squares with the sums of (x - mean)^2, summed
    /// across ranks like the first sums (a second collective, which every rank of the check makes). E[x^2] - mean^2
    /// loses digits where a feature's values nearly agree, as in a check batch of 2, and the cost's rounding then
    /// exceeded what the check allows: correct models failed (docs/gradient-checking.md).
    private func centredSquares(_ x: UnsafePointer<T>, count: Int, n: Double) {
        let squares = UnsafeMutableBufferPointer(rebasing: sums[features..<(2 * features)])
        squares.update(repeating: 0)
        for b in 0..<count {
            for c in 0..<features {
                let m = sums[c] / n, run = x + (b * features + c) * positions
                var q = 0.0
                for i in 0..<positions {
                    let d = Double(run[i]) - m
                    q += d * d
                }
                squares[c] += q
            }
        }
        reducer?.sumAcrossRanks(squares)
    }

    /// The statistics of input `x` (the batch's, summed across ranks under a reducer, or the running ones in
    /// evaluation), the running statistics moved in training, and `scale` and `shift` from them.
    func update(_ x: UnsafePointer<T>, count: Int, mode: ForwardMode, parameters: UnsafeMutablePointer<T>,
                buffers: UnsafeMutablePointer<T>) {
        let (gamma, beta) = (parameters, parameters + features)
        let (runningMean, runningVariance, batchesTracked) = (buffers, buffers + features, buffers + 2 * features)
        let (epsilon, momentum) = (BatchNorm<T>.epsilon, BatchNorm<T>.momentum)
        lastUsedBatchStatistics = mode.usesBatchStatistics
        if mode.usesBatchStatistics {
            if !sumsArrived {
                featureSums(x, samples: count, features: features, positions: positions, into: sums.baseAddress!)
            }
            sumsArrived = false
            sums[2 * features] = Double(count * positions)
            reducer?.sumAcrossRanks(sums)
            let n = sums[2 * features]
            lastCount = n
            if T.self == Double.self { centredSquares(x, count: count, n: n) }
            for c in 0..<features {
                let m = sums[c] / n
                // E[x^2] - m^2 in Double: the values are Float activations, far inside Double's precision. Double values
                // (the gradient check) are not: their sum of squares about the mean, taken apart.
                let variance = T.self == Double.self ? sums[features + c] / n : max(0, sums[features + c] / n - m * m)
                mean[c] = m
                inverseDeviation[c] = 1 / (variance + epsilon).squareRoot()
                if mode == .train {
                    let unbiased = n > 1 ? variance * n / (n - 1) : variance
                    runningMean[c] = T((1 - momentum) * Double(runningMean[c]) + momentum * m)
                    runningVariance[c] = T((1 - momentum) * Double(runningVariance[c]) + momentum * unbiased)
                }
            }
            if mode == .train { batchesTracked[0] += 1 }
        } else {
            for c in 0..<features {
                mean[c] = Double(runningMean[c])
                inverseDeviation[c] = 1 / (Double(runningVariance[c]) + epsilon).squareRoot()
            }
        }
        for c in 0..<features {
            scale[c] = T(Double(gamma[c]) * inverseDeviation[c])
            shift[c] = beta[c] - T(mean[c]) * scale[c]
        }
    }

    /// For the layer before, whose forward pass sums its output into `sums` as it writes it: zeroes the forward sums.
    /// It then adds every sample with `addFeatureSums` (into `sums`) and sets `sumsArrived`.
    func startSums() -> UnsafeMutablePointer<Double> {
        sums.baseAddress!.update(repeating: 0, count: 2 * features)
        return sums.baseAddress!
    }

    /// dgamma and dbeta from the reductions in `sums` ([sum dy, sum dy xhat]). They are this rank's: the gradient
    /// reduction averages them like every other.
    func writeParameterGradients(_ g: UnsafeMutablePointer<T>, accumulate: Bool) {
        for c in 0..<features {
            g[c] = T(sums[features + c]) + (accumulate ? g[c] : 0)            // dgamma
            g[features + c] = T(sums[c]) + (accumulate ? g[features + c] : 0)  // dbeta
        }
    }

    /// The factors of dx = a dy + k (x - mean) + c. With the batch's statistics they take the reductions of the
    /// global batch (synchronized: summed across ranks here, the count slot along); running statistics are
    /// constants, dx = dy gamma / sqrt(running var + eps).
    func inputGradientFactors(gamma: UnsafePointer<T>) -> GradientFactors<T> {
        if lastUsedBatchStatistics { reducer?.sumAcrossRanks(sums) }
        return GradientFactors(mean: mean, inverseDeviation: inverseDeviation, gamma: gamma,
                               sums: lastUsedBatchStatistics ? UnsafePointer(sums.baseAddress!) : nil,
                               count: lastUsedBatchStatistics ? lastCount : 1)
    }

    /// Weight 1, bias 0, running mean 0, running variance 1, no batches tracked.
    func initialize(parameters: UnsafeMutablePointer<T>, buffers: UnsafeMutablePointer<T>) {
        parameters.update(repeating: 1, count: features)
        (parameters + features).update(repeating: 0, count: features)
        buffers.update(repeating: 0, count: features)
        (buffers + features).update(repeating: 1, count: features)
        buffers[2 * features] = 0
    }
}
