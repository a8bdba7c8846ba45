/// SiLU (swish), y = x sigmoid(x): PyTorch `nn.SiLU`, the entry `silu`.
public struct SiLUKind: ElementwiseKind {
    public static var isActivation: Bool { true }
    public static var syntax: String { "silu" }
    public static func parse(_ entry: LayerEntry, input: [Int]) throws(LayerEntryError) -> Self {
        try entry.expectCount(1)
        return Self()
    }
    public var entry: String { "silu" }
    public var description: String { "SiLU" }
    /// Smooth everywhere.
    public var hasKink: Bool { false }
    /// Rectifier-like (x sigmoid(x) tends to max(x, 0)), as GELU is: Kaiming.
    public var initializationRole: InitializationRole { .kaiming(gain: 1) }
    public var outputMayBeOverwritten: Bool { false }
    public func runsInPlace(after previous: LayerSpec?) -> Bool { false }
    public func torchModule(input: [Int]) -> TorchModule { TorchModule("SiLU") }
    public func makeLayer<T: Scalar>(_ placement: LayerPlacement) -> Layer<T> { SiLU<T>(placement, spec: LayerSpec(self)) }
}

extension LayerSpec {
    public static var silu: LayerSpec { LayerSpec(SiLUKind()) }
}

/// y = x s(x) with s the logistic sigmoid; dx = dy (s(x) + y (1 - s(x))), from the saved input.
final class SiLU<T: Scalar>: Layer<T> {
    override func forward(count: Int, mode: ForwardMode) { siluForward(x, y, count * outputCount) }
    override func backwardInput(count: Int, accumulate: Bool) {
        if let dx { siluBackward(x, dy, dx, count * inputCount) }
    }
}

/// y = x / (1 + exp(-x)). For very negative x, exp(-x) = inf and y = -0, the right limit; for large x, y = x.
@_specialize(where T == Float) @_specialize(where T == Double)
public func siluForward<T: Scalar>(_ x: UnsafePointer<T>, _ y: UnsafeMutablePointer<T>, _ n: Int) {
    for i in 0..<n { y[i] = x[i] / (1 + T.exp(-x[i])) }
}

/// dx = dy (s + x s (1 - s)), s = 1 / (1 + exp(-x)): d/dx of x s(x) = s + x s'(x), s' = s (1 - s). Where exp(-x)
/// overflows, s = 0 and so is the derivative (x s is then 0 times a finite x).
@_specialize(where T == Float) @_specialize(where T == Double)
public func siluBackward<T: Scalar>(
    _ x: UnsafePointer<T>, _ dy: UnsafePointer<T>, _ dx: UnsafeMutablePointer<T>, _ n: Int
) {
    for i in 0..<n {
        let s = 1 / (1 + T.exp(-x[i]))
        dx[i] = dy[i] * (s + x[i] * s * (1 - s))
    }
}
