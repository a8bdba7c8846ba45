/// The mean of each channel, [C, H, W] -> [C, 1, 1]: PyTorch `nn.AdaptiveAvgPool2d(1)`, the entry `globalavgpool`.
public struct GlobalAvgPool2dKind: StatelessKind {
    public static var syntax: String { "globalavgpool" }
    public static var isSpatial: Bool { true }
    public static func parse(_ entry: LayerEntry, input: [Int]) throws(LayerEntryError) -> Self {
        try entry.expectCount(1)
        return Self()
    }
    public var entry: String { "globalavgpool" }
    public var description: String { "AdaptiveAvgPool2d(1)" }

    public func outputShape(input: [Int]) throws(ModelSpecError) -> [Int] {
        let (c, _, _) = try imageShape(input, "global average pooling")
        return [c, 1, 1]
    }

    public var hasKink: Bool { false }
    public var initializationRole: InitializationRole { .transparent }
    public var outputMayBeOverwritten: Bool { false }
    public func runsInPlace(after previous: LayerSpec?) -> Bool { false }
    public func torchModule(input: [Int]) -> TorchModule { TorchModule("AdaptiveAvgPool2d", [.int(1)]) }
    public func makeLayer<T: Scalar>(_ placement: LayerPlacement) -> Layer<T> {
        GlobalAvgPool2d<T>(placement, spec: LayerSpec(self))
    }
}

extension LayerSpec {
    public static var globalAvgPool2d: LayerSpec { LayerSpec(GlobalAvgPool2dKind()) }
}

/// y[c] = the mean of x[c, :, :]; dx[c, h, w] = dy[c] / (H W).
final class GlobalAvgPool2d<T: Scalar>: Layer<T> {
    override func forward(count: Int, mode: ForwardMode) {
        planeMeans(x, y, planes: count * inputShape[0], size: inputShape[1] * inputShape[2])
    }

    override func backwardInput(count: Int, accumulate: Bool) {
        guard let dx else { return }
        planeMeansBackward(dy, into: dx, planes: count * inputShape[0], size: inputShape[1] * inputShape[2])
    }
}
