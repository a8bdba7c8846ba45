/// y = 1 / (1 + e^-x): PyTorch `nn.Sigmoid`, the entry `sigmoid`.
public struct SigmoidKind: ElementwiseKind {
    public static var isActivation: Bool { true }
    public static var syntax: String { "sigmoid" }
    public static func parse(_ entry: LayerEntry, input: [Int]) throws(LayerEntryError) -> Self {
        try entry.expectCount(1)
        return Self()
    }
    public var entry: String { "sigmoid" }
    public var description: String { "Sigmoid" }
    public var hasKink: Bool { false }
    public var initializationRole: InitializationRole { .xavier }
    public var outputMayBeOverwritten: Bool { false }
    public func runsInPlace(after previous: LayerSpec?) -> Bool { false }
    public func torchModule(input: [Int]) -> TorchModule { TorchModule("Sigmoid") }
    public func makeLayer<T: Scalar>(_ placement: LayerPlacement) -> Layer<T> { Sigmoid<T>(placement, spec: LayerSpec(self)) }
}

extension LayerSpec {
    public static var sigmoid: LayerSpec { LayerSpec(SigmoidKind()) }
}

/// y = 1 / (1 + e^-x); dx = dy y (1 - y) from the saved output.
final class Sigmoid<T: Scalar>: Layer<T> {
    override func forward(count: Int, mode: ForwardMode) { sigmoidForward(x, y, count * outputCount) }
    override func backwardInput(count: Int, accumulate: Bool) {
        if let dx { sigmoidBackward(y, dy, dx, count * inputCount) }
    }
}
