/// The mean of each window: PyTorch `nn.AvgPool2d(kernel, stride)`, the entry `avgpool K [stride S]` (stride defaults
/// to K; no padding; windows that do not fit are dropped).
public struct AvgPool2dKind: StatelessKind {
    public let kernel: Int, stride: Int

    public static var syntax: String { "avgpool K [stride S]" }
    public static var isSpatial: Bool { true }
    public static func parse(_ entry: LayerEntry, input: [Int]) throws(LayerEntryError) -> Self {
        try parseWindow(entry, Self.init)
    }
    public var entry: String { "avgpool \(kernel)" + (stride != kernel ? " stride \(stride)" : "") }
    public var description: String { "AvgPool2d(\(kernel)" + (stride != kernel ? ", stride=\(stride)" : "") + ")" }

    public func outputShape(input: [Int]) throws(ModelSpecError) -> [Int] {
        try pooledShape(input, kernel: kernel, stride: stride)
    }

    public var hasKink: Bool { false }
    public var initializationRole: InitializationRole { .transparent }
    public var outputMayBeOverwritten: Bool { false }
    public func runsInPlace(after previous: LayerSpec?) -> Bool { false }
    public func torchModule(input: [Int]) -> TorchModule { TorchModule("AvgPool2d", [.int(kernel)], ["stride": .int(stride)]) }
    public func makeLayer<T: Scalar>(_ placement: LayerPlacement) -> Layer<T> { AvgPool2d<T>(self, placement) }
}

extension LayerSpec {
    public static func avgPool2d(kernel: Int, stride: Int) -> LayerSpec { LayerSpec(AvgPool2dKind(kernel: kernel, stride: stride)) }
}

/// y[c, i, j] = the mean of x[c, i s + p, j s + q] over the window; backward spreads dy / k^2 over it.
final class AvgPool2d<T: Scalar>: Layer<T> {
    let kernel: Int, stride: Int

    init(_ kind: AvgPool2dKind, _ placement: LayerPlacement) {
        (kernel, stride) = (kind.kernel, kind.stride)
        super.init(placement, spec: LayerSpec(kind))
    }

    override func forward(count: Int, mode: ForwardMode) {
        avgPoolForward(x, y, samples: count, channels: inputShape[0], height: inputShape[1], width: inputShape[2],
                       kernel: kernel, stride: stride, outHeight: outputShape[1], outWidth: outputShape[2])
    }

    override func backwardInput(count: Int, accumulate: Bool) {
        guard let dx else { return }
        avgPoolBackward(dy, into: dx, samples: count, channels: inputShape[0], height: inputShape[1], width: inputShape[2],
                        kernel: kernel, stride: stride, outHeight: outputShape[1], outWidth: outputShape[2])
    }
}
