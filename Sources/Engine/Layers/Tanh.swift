/// y = tanh(x): PyTorch `nn.Tanh`, the entry `tanh`.
public struct TanhKind: ElementwiseKind {
    public static var isActivation: Bool { true }
    public static var syntax: String { "tanh" }
    public static func parse(_ entry: LayerEntry, input: [Int]) throws(LayerEntryError) -> Self {
        try entry.expectCount(1)
        return Self()
    }
    public var entry: String { "tanh" }
    public var description: String { "Tanh" }
    public var hasKink: Bool { false }
    public var initializationRole: InitializationRole { .xavier }
    public var outputMayBeOverwritten: Bool { false }
    public func runsInPlace(after previous: LayerSpec?) -> Bool { false }
    public func torchModule(input: [Int]) -> TorchModule { TorchModule("Tanh") }
    public func makeLayer<T: Scalar>(_ placement: LayerPlacement) -> Layer<T> { Tanh<T>(placement, spec: LayerSpec(self)) }
}

extension LayerSpec {
    public static var tanh: LayerSpec { LayerSpec(TanhKind()) }
}

/// y = tanh(x); dx = dy (1 - y^2) from the saved output.
final class Tanh<T: Scalar>: Layer<T> {
    override func forward(count: Int, mode: ForwardMode) { tanhForward(x, y, count * outputCount) }
    override func backwardInput(count: Int, accumulate: Bool) {
        if let dx { tanhBackward(y, dy, dx, count * inputCount) }
    }
}
