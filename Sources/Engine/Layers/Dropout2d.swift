/// Dropout of whole channels: PyTorch `nn.Dropout2d(p)`, the entry `dropout2d P`, on image samples [C, H, W]. In
/// training each (sample, channel) plane is zeroed with probability p and the others scaled by 1 / (1 - p);
/// otherwise (evaluation, the gradient check) y = x. Neighbouring values of a feature map are strongly correlated,
/// so dropping values one by one hardly regularises a convolution; dropping its channels does (Tompson et al. 2015).
public struct Dropout2dKind: StatelessKind {
    public let probability: Double

    public static var syntax: String { "dropout2d P" }
    public static var isSpatial: Bool { true }
    public static func parse(_ entry: LayerEntry, input: [Int]) throws(LayerEntryError) -> Self {
        try entry.expectCount(2)
        guard input.count == 3 else { throw entry.fail(Self.imagesOnly(input)) }
        return Self(probability: try entry.number(entry.words[1]))
    }
    public var entry: String { "dropout2d \(probability)" }
    public var description: String { "Dropout2d(\(probability))" }

    private static func imagesOnly(_ input: [Int]) -> String {
        "drops whole channels of image samples [C, H, W], but its input is \(input): use 'dropout P' on flat samples"
    }

    public func outputShape(input: [Int]) throws(ModelSpecError) -> [Int] {
        guard input.count == 3 else { throw ModelSpecError(Self.imagesOnly(input)) }
        guard probability >= 0, probability < 1 else { throw ModelSpecError("drop probability must be in [0, 1)") }
        return input
    }
    public func workspace(input: [Int], output: [Int], batchCapacity rows: Double, scalarBytes: Double) -> LayerWorkspace {
        (rows * Double(input.first ?? 0) * scalarBytes, 0)  // the mask, one value per channel of each sample
    }

    public var hasKink: Bool { false }
    public var initializationRole: InitializationRole { .transparent }
    public var outputMayBeOverwritten: Bool { false }
    public func runsInPlace(after previous: LayerSpec?) -> Bool { false }
    public func torchModule(input: [Int]) -> TorchModule { TorchModule("Dropout2d", [.number(probability)]) }
    public func makeLayer<T: Scalar>(_ placement: LayerPlacement) -> Layer<T> { Dropout2d<T>(self, placement) }
}

extension LayerSpec {
    public static func dropout2d(probability: Double) -> LayerSpec { LayerSpec(Dropout2dKind(probability: probability)) }
}

/// Channel dropout: y[b, c, :, :] = x[b, c, :, :] mask[b, c], the mask drawn in training from each row's own
/// generator (`Model.dropoutGenerator(row:layer:)`), one value per plane as `Dropout` draws one per unit; dx = dy mask
/// from the same mask.
final class Dropout2d<T: Scalar>: Layer<T> {
    /// The mask of the last training pass, [B, C]: 0 or 1 / (1 - p).
    let mask: UnsafeMutablePointer<T>
    private let probability: Double
    private let channels: Int, plane: Int
    private var lastForwardDropped = false
    /// The model, whose seed and per-row sample streams the masks are drawn from.
    private unowned(unsafe) var model: Model<T>?

    init(_ kind: Dropout2dKind, _ placement: LayerPlacement) {
        channels = placement.inputShape[0]
        plane = placement.inputShape[1] * placement.inputShape[2]
        mask = .allocate(capacity: placement.batchCapacity * channels)
        mask.initialize(repeating: 0, count: placement.batchCapacity * channels)
        probability = kind.probability
        super.init(placement, spec: LayerSpec(kind))
    }

    deinit { mask.deallocate() }

    override func attach(to model: Model<T>) { self.model = model }

    override func forward(count: Int, mode: ForwardMode) {
        lastForwardDropped = mode.dropsUnits && probability > 0 && model != nil
        if lastForwardDropped {
            drawMask(count: count)
            scalePlanes(x, by: mask, into: y, planes: count * channels, size: plane)
        } else {
            Elementwise.copy(x, into: y, count * outputCount)
        }
    }

    override func backwardInput(count: Int, accumulate: Bool) {
        guard let dx else { return }
        if lastForwardDropped {
            scalePlanes(dy, by: mask, into: dx, planes: count * channels, size: plane)
        } else {
            Elementwise.copy(dy, into: dx, count * inputCount)
        }
    }

    // MARK: - Drawing the mask

    /// Draws the mask of `count` samples, each from its row's own generator (`Model.dropoutGenerator(row:layer:)`),
    /// one value per channel. The one place this layer draws.
    private func drawMask(count: Int) {
        guard let model else { return }
        for row in 0..<count {
            var generator = model.dropoutGenerator(row: row, layer: index)
            drawChannelMask(mask + row * channels, planes: channels, keep: 1 - probability, generator: &generator)
        }
    }
}

/// One mask value per (sample, channel) plane, in that order: 1 / keep with probability keep, else 0, drawn exactly
/// as `dropoutForward` draws one per unit.
@_specialize(where T == Float) @_specialize(where T == Double)
func drawChannelMask<T: Scalar>(_ mask: UnsafeMutablePointer<T>, planes: Int, keep: Double, generator: inout RandomGenerator) {
    // Compare 53-bit integers: the draw is exact and independent of T.
    let threshold = UInt64(keep * 0x1.0p53), scale = T(1 / keep)
    for i in 0..<planes { mask[i] = (generator.next() >> 11) < threshold ? scale : 0 }
}

/// y[p, i] = x[p, i] factors[p] for each of `planes` planes of `size` values.
@_specialize(where T == Float) @_specialize(where T == Double)
func scalePlanes<T: Scalar>(_ x: UnsafePointer<T>, by factors: UnsafePointer<T>, into y: UnsafeMutablePointer<T>,
                            planes: Int, size: Int) {
    for p in 0..<planes {
        let factor = factors[p], xp = x + p * size, yp = y + p * size
        for i in 0..<size { yp[i] = xp[i] * factor }
    }
}
