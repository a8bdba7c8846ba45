/// [C, H, W] -> [C * H * W], no computation: PyTorch `nn.Flatten()`, the entry `flatten`.
public struct FlattenKind: StatelessKind {
    public static var syntax: String { "flatten" }
    public static var isSpatial: Bool { false }
    public static func parse(_ entry: LayerEntry, input: [Int]) throws(LayerEntryError) -> Self {
        try entry.expectCount(1)
        return Self()
    }
    public var entry: String { "flatten" }
    public var description: String { "Flatten" }

    public func outputShape(input: [Int]) throws(ModelSpecError) -> [Int] { [input.reduce(1, *)] }

    public var hasKink: Bool { false }
    public var initializationRole: InitializationRole { .transparent }
    public var outputMayBeOverwritten: Bool { false }
    /// In place after any layer: it moves nothing. (The first layer's input has no gradient buffer to share.)
    public func runsInPlace(after previous: LayerSpec?) -> Bool { previous != nil }
    public func torchModule(input: [Int]) -> TorchModule { TorchModule("Flatten") }
    public func makeLayer<T: Scalar>(_ placement: LayerPlacement) -> Layer<T> { Flatten<T>(placement, spec: LayerSpec(self)) }
}

extension LayerSpec {
    public static var flatten: LayerSpec { LayerSpec(FlattenKind()) }
}

/// NCHW samples are contiguous, so flattening moves nothing: the model runs it in place (its output is its input's
/// buffer, its input gradient its output gradient's).
final class Flatten<T: Scalar>: Layer<T> {
    override func forward(count: Int, mode: ForwardMode) {
        // In place there is nothing to do; a model that could not run it in place gave it its own output.
        if y != x { Elementwise.copy(x, into: y, count * outputCount) }
    }

    override func backwardInput(count: Int, accumulate: Bool) {
        if let dx, dx != dy { Elementwise.copy(dy, into: dx, count * inputCount) }
    }
}
