/// PyTorch `nn.LayerNorm(features)` over the last dimension of each sample, eps 1e-5, with weight and bias: the
/// entry `layernorm` (the features are the last dimension of the input).
public struct LayerNormKind: LayerKind {
    public let features: Int

    public static var syntax: String { "layernorm" }
    public static var isSpatial: Bool { false }
    public static func parse(_ entry: LayerEntry, input: [Int]) throws(LayerEntryError) -> Self {
        try entry.expectCount(1)
        return Self(features: input.last ?? 0)
    }
    public var entry: String { "layernorm" }
    public var description: String { "LayerNorm(\(features))" }

    public func outputShape(input: [Int]) throws(ModelSpecError) -> [Int] {
        guard let last = input.last, last == features else {
            throw ModelSpecError("normalises the last dimension of \(features), but its input is \(input)")
        }
        return input
    }
    public func parameterShapes(input: [Int]) -> [(String, [Int])] { [("weight", [features]), ("bias", [features])] }
    public var bufferShapes: [(String, [Int])] { [] }
    public func workspace(input: [Int], output: [Int], batchCapacity rows: Double, scalarBytes: Double) -> LayerWorkspace {
        let inputCount = input.reduce(1.0) { $0 * Double($1) }
        return (2 * rows * (inputCount / Double(input.last ?? 1)) * 8, 0)  // mean, inverse deviation per run
    }

    public var hasKink: Bool { false }
    public var initializationRole: InitializationRole { .transparent }
    public var outputMayBeOverwritten: Bool { false }
    public func runsInPlace(after previous: LayerSpec?) -> Bool { false }
    public func torchModule(input: [Int]) -> TorchModule {
        TorchModule("LayerNorm", [.int(features)], ["eps": .number(1e-5)])  // layerNormForward's
    }
    public func makeLayer<T: Scalar>(_ placement: LayerPlacement) -> Layer<T> { LayerNorm<T>(placement, spec: LayerSpec(self)) }
}

extension LayerSpec {
    public static func layerNorm(features: Int) -> LayerSpec { LayerSpec(LayerNormKind(features: features)) }
}

/// PyTorch `nn.LayerNorm(L)` over the last dimension: each run of L values is normalised by its own mean and
/// (biased) variance, eps 1e-5, then scaled by weight[L] and shifted by bias[L]. Backward, per run:
/// dx = (dxhat - mean(dxhat) - xhat mean(dxhat xhat)) / sqrt(var + eps) with dxhat = dy weight;
/// dweight += sum over runs of dy xhat, dbias += sum of dy.
final class LayerNorm<T: Scalar>: Layer<T> {
    let length: Int
    /// Per run of the last forward pass: its mean and 1 / sqrt(var + eps), [B * runs per sample].
    private let mean: UnsafeMutablePointer<Double>
    private let inverseDeviation: UnsafeMutablePointer<Double>

    override init(_ placement: LayerPlacement, spec: LayerSpec) {
        let inputShape = placement.inputShape, batchCapacity = placement.batchCapacity
        length = inputShape.last!
        let runs = batchCapacity * inputShape.reduce(1, *) / inputShape.last!
        mean = .allocate(capacity: runs)
        mean.initialize(repeating: 0, count: runs)
        inverseDeviation = .allocate(capacity: runs)
        inverseDeviation.initialize(repeating: 1, count: runs)
        super.init(placement, spec: spec)
    }

    deinit {
        mean.deallocate()
        inverseDeviation.deallocate()
    }


    override func forward(count: Int, mode: ForwardMode) {
        layerNormForward(x, y, runs: count * inputCount / length, length: length, mean: mean,
                         inverseDeviation: inverseDeviation, gamma: parameters!, beta: parameters! + length)
    }

    override func backwardParameters(count: Int, accumulate: Bool) {
        layerNormParameterGradients(x, dy, runs: count * inputCount / length, length: length, mean: mean,
                                    inverseDeviation: inverseDeviation, into: gradients!, accumulate: accumulate)
        provenFinite = false
    }

    override func backwardInput(count: Int, accumulate: Bool) {
        guard let dx else { return }
        layerNormBackward(x, dy, dx, runs: count * inputCount / length, length: length, mean: mean,
                          inverseDeviation: inverseDeviation, gamma: parameters!)
    }

    override func initialize(scheme: Initialization, gain: Double, generator: inout RandomGenerator) {
        parameters!.update(repeating: 1, count: length)
        (parameters! + length).update(repeating: 0, count: length)
    }
}
