/// y = max(x, 0): PyTorch `nn.ReLU`, the entry `relu`.
public struct ReLUKind: ElementwiseKind {
    public static var isActivation: Bool { true }
    public static var syntax: String { "relu" }
    public static func parse(_ entry: LayerEntry, input: [Int]) throws(LayerEntryError) -> Self {
        try entry.expectCount(1)
        return Self()
    }
    public var entry: String { "relu" }
    public var description: String { "ReLU" }
    public var hasKink: Bool { true }
    public var initializationRole: InitializationRole { .kaiming(gain: 1) }
    /// Its backward pass reads its input's sign, which is its output's: a ReLU after it could run in place, but
    /// two ReLUs in a row are not worth a rule.
    public var outputMayBeOverwritten: Bool { false }
    /// In place after a layer that lets its output be overwritten (linear, convolution, batch norm).
    public func runsInPlace(after previous: LayerSpec?) -> Bool { previous?.kind.outputMayBeOverwritten ?? false }
    public func torchModule(input: [Int]) -> TorchModule { TorchModule("ReLU") }
    public func makeLayer<T: Scalar>(_ placement: LayerPlacement) -> Layer<T> { ReLU<T>(placement, spec: LayerSpec(self)) }
}

extension LayerSpec {
    public static var relu: LayerSpec { LayerSpec(ReLUKind()) }
}

/// y = max(x, 0). Right after a layer whose backward pass does not read its own output (linear, convolution, batch
/// norm), it runs in place, forward and backward: its mask y > 0 is the same as x > 0, and its input gradient can
/// overwrite its output gradient. Two buffers fewer per hidden layer. In place and in Float, its kernels also sum the
/// squares they write, for the linear layers' finiteness proof. Each kernel is a branch-free loop in Kernels.swift,
/// specialised for Float and Double (the layers themselves run as unspecialised generic code).
final class ReLU<T: Scalar>: Layer<T> {
    /// Sums squares as it writes: in place, in Float.
    private(set) var sumsSquares = false
    override var runsInPlace: Bool {
        didSet { sumsSquares = runsInPlace && T.self == Float.self }
    }

    override func forward(count: Int, mode: ForwardMode) {
        let n = count * outputCount
        if sumsSquares && mode == .train {
            outputSquares = T(reluForwardSquares(floats(x), floats(y), n))
        } else {
            reluForward(x, y, n)
            outputSquares = nil
        }
    }

    override func backwardInput(count: Int, accumulate: Bool) {
        inputGradientSquares = nil
        guard let dx else { return }
        let n = count * inputCount
        // In place, x is y: the mask y > 0 is x > 0.
        if sumsSquares && !accumulate {
            inputGradientSquares = T(reluBackwardSquares(floats(x), floats(dy), floats(dx), n))
        } else {
            reluBackward(x, dy, dx, n)
        }
    }

    override func appendKinkPattern(count: Int, to pattern: inout [Int32]) {
        appendSigns(x, count * inputCount, to: &pattern)
    }
}

