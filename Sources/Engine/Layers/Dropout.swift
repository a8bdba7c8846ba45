/// Inverted dropout with drop probability p: PyTorch `nn.Dropout(p)`, the entry `dropout P`; active in training only.
public struct DropoutKind: ElementwiseKind {
    public let probability: Double

    public static var syntax: String { "dropout P" }
    public static func parse(_ entry: LayerEntry, input: [Int]) throws(LayerEntryError) -> Self {
        try entry.expectCount(2)
        return Self(probability: try entry.number(entry.words[1]))
    }
    public var entry: String { "dropout \(probability)" }
    public var description: String { "Dropout(\(probability))" }

    public func outputShape(input: [Int]) throws(ModelSpecError) -> [Int] {
        guard probability >= 0, probability < 1 else { throw ModelSpecError("drop probability must be in [0, 1)") }
        return input
    }

    public func workspace(input: [Int], output: [Int], batchCapacity rows: Double, scalarBytes: Double) -> LayerWorkspace {
        (rows * output.reduce(1.0) { $0 * Double($1) } * scalarBytes, 0)  // the mask
    }

    public var hasKink: Bool { false }
    public var initializationRole: InitializationRole { .transparent }
    public var outputMayBeOverwritten: Bool { false }
    public func runsInPlace(after previous: LayerSpec?) -> Bool { false }
    public func torchModule(input: [Int]) -> TorchModule { TorchModule("Dropout", [.number(probability)]) }
    public func makeLayer<T: Scalar>(_ placement: LayerPlacement) -> Layer<T> { Dropout<T>(self, placement) }
}

extension LayerSpec {
    public static func dropout(probability: Double) -> LayerSpec { LayerSpec(DropoutKind(probability: probability)) }
}

/// Inverted dropout: in training each unit is kept with probability 1 - p and scaled by 1 / (1 - p), each row's
/// mask drawn from a generator of its own (`dropoutGenerator(row:)`); otherwise y = x.
final class Dropout<T: Scalar>: Layer<T> {
    /// The mask of the last training pass, [B, outputCount]: 0 or 1 / (1 - p).
    private let mask: UnsafeMutablePointer<T>
    private let probability: Double
    private var lastForwardDropped = false
    /// The model, whose seed and per-row sample streams the masks are drawn from.
    private unowned(unsafe) var model: Model<T>?

    init(_ kind: DropoutKind, _ placement: LayerPlacement) {
        let elements = placement.batchCapacity * placement.outputShape.reduce(1, *)
        mask = .allocate(capacity: elements)
        mask.initialize(repeating: 0, count: elements)
        probability = kind.probability
        super.init(placement, spec: LayerSpec(kind))
    }

    deinit { mask.deallocate() }

    override func attach(to model: Model<T>) { self.model = model }

    override func forward(count: Int, mode: ForwardMode) {
        lastForwardDropped = mode.dropsUnits && probability > 0
        if lastForwardDropped {
            drawMaskAndApply(count: count)
        } else {
            Elementwise.copy(x, into: y, count * outputCount)
        }
    }

    override func backwardInput(count: Int, accumulate: Bool) {
        guard let dx else { return }
        let n = count * inputCount
        if lastForwardDropped {
            Elementwise.multiply(dy, mask, into: dx, n)
        } else {
            Elementwise.copy(dy, into: dx, n)
        }
    }

    // MARK: - Drawing the mask

    /// Draws the mask of `count` rows, one value per unit, each row from its own generator, and applies it:
    /// y = x * mask. The one place this layer draws.
    private func drawMaskAndApply(count: Int) {
        guard let model else { return Elementwise.copy(x, into: y, count * outputCount) }
        let width = outputCount
        for row in 0..<count {
            var generator = model.dropoutGenerator(row: row, layer: index)
            dropoutForward(x + row * width, y + row * width, mask: mask + row * width, width, keep: 1 - probability, generator: &generator)
        }
    }
}

extension Model {
    /// The generator of row `row`'s dropout mask in layer `layer`: seeded from (the model's seed, the row's sample
    /// stream as `setSamples` keyed it, the layer), so the same sample in the same epoch gets the same mask wherever,
    /// and by whichever rank, it is trained. A layer inside a block has a negative identity of its own
    /// (`Residual.innerIdentity`).
    @inline(__always)
    func dropoutGenerator(row: Int, layer: Int) -> RandomGenerator {
        RandomGenerator(seed: dropoutSeed, stream: RandomGenerator.mix(sampleStreams[row] ^ RandomGenerator.mix(UInt64(truncatingIfNeeded: layer))))
    }
}
