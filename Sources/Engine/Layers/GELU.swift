/// Exact GELU, y = x Phi(x): PyTorch `nn.GELU` (approximate='none'), the entry `gelu`.
public struct GELUKind: ElementwiseKind {
    public static var isActivation: Bool { true }
    public static var syntax: String { "gelu" }
    public static func parse(_ entry: LayerEntry, input: [Int]) throws(LayerEntryError) -> Self {
        try entry.expectCount(1)
        return Self()
    }
    public var entry: String { "gelu" }
    public var description: String { "GELU" }
    public var hasKink: Bool { false }
    public var initializationRole: InitializationRole { .kaiming(gain: 1) }
    public var outputMayBeOverwritten: Bool { false }
    public func runsInPlace(after previous: LayerSpec?) -> Bool { false }
    public func torchModule(input: [Int]) -> TorchModule { TorchModule("GELU") }
    public func makeLayer<T: Scalar>(_ placement: LayerPlacement) -> Layer<T> { GELU<T>(placement, spec: LayerSpec(self)) }
}

extension LayerSpec {
    public static var gelu: LayerSpec { LayerSpec(GELUKind()) }
}

/// Exact GELU, y = x Phi(x); dx = dy (Phi(x) + x phi(x)).
final class GELU<T: Scalar>: Layer<T> {
    override func forward(count: Int, mode: ForwardMode) { geluForward(x, y, count * outputCount) }
    override func backwardInput(count: Int, accumulate: Bool) {
        if let dx { geluBackward(x, dy, dx, count * inputCount) }
    }
}
