/// The largest value of each window: PyTorch `nn.MaxPool2d(kernel, stride)`, the entry `maxpool K [stride S]` (stride
/// defaults to K; no padding; windows that do not fit are dropped, as with ceil_mode=False).
public struct MaxPool2dKind: StatelessKind {
    public let kernel: Int, stride: Int

    public static var syntax: String { "maxpool K [stride S]" }
    public static var isSpatial: Bool { true }
    public static func parse(_ entry: LayerEntry, input: [Int]) throws(LayerEntryError) -> Self {
        try parseWindow(entry, Self.init)
    }
    public var entry: String { "maxpool \(kernel)" + (stride != kernel ? " stride \(stride)" : "") }
    public var description: String { "MaxPool2d(\(kernel)" + (stride != kernel ? ", stride=\(stride)" : "") + ")" }

    public func outputShape(input: [Int]) throws(ModelSpecError) -> [Int] {
        try pooledShape(input, kernel: kernel, stride: stride)
    }
    public func workspace(input: [Int], output: [Int], batchCapacity rows: Double, scalarBytes: Double) -> LayerWorkspace {
        (rows * output.reduce(1.0) { $0 * Double($1) } * 4, 0)  // Int32 winners
    }

    /// Which input wins a window changes where two are equal.
    public var hasKink: Bool { true }
    public var initializationRole: InitializationRole { .transparent }
    /// Fused with a batch norm and a ReLU before it (BatchNormReLUPool.swift), the block's backward pass reads its
    /// output: what follows a max pooling leaves it alone either way.
    public var outputMayBeOverwritten: Bool { false }
    public func runsInPlace(after previous: LayerSpec?) -> Bool { false }
    public func torchModule(input: [Int]) -> TorchModule { TorchModule("MaxPool2d", [.int(kernel)], ["stride": .int(stride)]) }
    public func makeLayer<T: Scalar>(_ placement: LayerPlacement) -> Layer<T> { MaxPool2d<T>(self, placement) }
}

extension LayerSpec {
    public static func maxPool2d(kernel: Int, stride: Int) -> LayerSpec { LayerSpec(MaxPool2dKind(kernel: kernel, stride: stride)) }
}

/// y[c, i, j] = the largest x[c, i s + p, j s + q] over the window; the first largest wins a tie, as in PyTorch.
/// Backward routes each dy to the input that won its window (`winners`, kept from the last forward pass). Which
/// input wins is the gradient checker's kink: a perturbation that changes a winner straddles one.
final class MaxPool2d<T: Scalar>: Layer<T> {
    let kernel: Int, stride: Int
    /// For each output value of the last forward pass, the index within its sample of the input that won.
    let winners: UnsafeMutablePointer<Int32>

    init(_ kind: MaxPool2dKind, _ placement: LayerPlacement) {
        (kernel, stride) = (kind.kernel, kind.stride)
        let elements = placement.batchCapacity * placement.outputShape.reduce(1, *)
        winners = .allocate(capacity: elements)
        winners.initialize(repeating: 0, count: elements)
        super.init(placement, spec: LayerSpec(kind))
    }

    deinit { winners.deallocate() }


    override func forward(count: Int, mode: ForwardMode) {
        maxPoolForward(x, y, winners: winners, samples: count, channels: inputShape[0], height: inputShape[1],
                       width: inputShape[2], kernel: kernel, stride: stride, outHeight: outputShape[1],
                       outWidth: outputShape[2])
    }

    override func backwardInput(count: Int, accumulate: Bool) {
        guard let dx else { return }
        maxPoolBackward(dy, winners: winners, into: dx, samples: count, inputCount: inputCount, outputCount: outputCount)
    }

    override func appendKinkPattern(count: Int, to pattern: inout [Int32]) {
        appendPoolKinkPattern(x, samples: count, channels: inputShape[0], height: inputShape[1], width: inputShape[2],
                              kernel: kernel, stride: stride, outHeight: outputShape[1], outWidth: outputShape[2],
                              normalization: nil, to: &pattern)
    }
}

/// A pooling entry, `NAME K [stride S]`: the window and its stride (K by default).
func parseWindow<K>(_ entry: LayerEntry, _ make: (Int, Int) -> K) throws(LayerEntryError) -> K {
    guard entry.words.count >= 2 else { throw entry.fail("\(entry.name) needs its window size, e.g. '\(entry.name) 2'") }
    let kernel = try entry.integer(entry.words[1], "window size", minimum: 1)
    let stride = try entry.options(from: 2, allowed: ["stride"])["stride"] ?? kernel
    return make(kernel, stride)
}

/// The output of a pooling of `kernel` by `stride` over image samples `input`.
func pooledShape(_ input: [Int], kernel: Int, stride: Int) throws(ModelSpecError) -> [Int] {
    let (c, h, w) = try imageShape(input, "pooling")
    guard kernel > 0, stride > 0 else { throw ModelSpecError("kernel and stride must be positive") }
    guard kernel <= h, kernel <= w else { throw ModelSpecError("window \(kernel) is larger than its input \(h)x\(w)") }
    return [c, windowCount(h, kernel: kernel, stride: stride, padding: 0), windowCount(w, kernel: kernel, stride: stride, padding: 0)]
}
