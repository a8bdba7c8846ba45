/// y = x for x > 0, slope * x otherwise: PyTorch `nn.LeakyReLU(slope)`, the entry `leaky_relu [SLOPE]` (PyTorch's
/// default slope is 0.01).
public struct LeakyReLUKind: ElementwiseKind {
    public static var isActivation: Bool { true }
    public let slope: Double

    public static var syntax: String { "leaky_relu [SLOPE]" }
    public static func parse(_ entry: LayerEntry, input: [Int]) throws(LayerEntryError) -> Self {
        guard entry.words.count <= 2 else { throw entry.fail("'leaky_relu' takes at most one number, its slope") }
        return Self(slope: entry.words.count == 2 ? try entry.number(entry.words[1]) : 0.01)
    }
    public var entry: String { "leaky_relu \(slope)" }
    public var description: String { "LeakyReLU(\(slope))" }

    public func outputShape(input: [Int]) throws(ModelSpecError) -> [Int] {
        guard slope.isFinite else { throw ModelSpecError("slope must be finite") }
        return input
    }

    public var hasKink: Bool { true }
    public var initializationRole: InitializationRole { .kaiming(gain: 1 / (1 + slope * slope)) }
    public var outputMayBeOverwritten: Bool { false }
    public func runsInPlace(after previous: LayerSpec?) -> Bool { false }
    public func torchModule(input: [Int]) -> TorchModule { TorchModule("LeakyReLU", [.number(slope)]) }
    public func makeLayer<T: Scalar>(_ placement: LayerPlacement) -> Layer<T> { LeakyReLU<T>(self, placement) }
}

extension LayerSpec {
    public static func leakyReLU(slope: Double) -> LayerSpec { LayerSpec(LeakyReLUKind(slope: slope)) }
}

/// y = x for x > 0, slope * x otherwise.
final class LeakyReLU<T: Scalar>: Layer<T> {
    private let slope: T

    init(_ kind: LeakyReLUKind, _ placement: LayerPlacement) {
        slope = T(kind.slope)
        super.init(placement, spec: LayerSpec(kind))
    }

    override func forward(count: Int, mode: ForwardMode) { leakyReLUForward(x, y, count * outputCount, slope: slope) }

    override func backwardInput(count: Int, accumulate: Bool) {
        if let dx { leakyReLUBackward(x, dy, dx, count * inputCount, slope: slope) }
    }

    override func appendKinkPattern(count: Int, to pattern: inout [Int32]) {
        appendSigns(x, count * inputCount, to: &pattern)
    }
}
