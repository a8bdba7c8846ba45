/// The element-wise activations: y = f(x) on any shape, dx = dy * f'(.). Each kernel is a branch-free loop in
/// Kernels.swift, specialised for Float and Double (the layers themselves run as unspecialised generic code).

/// y = max(x, 0). Right after a layer whose backward pass does not read its own output (linear, convolution, batch
/// norm), it runs in place, forward and backward: its mask y > 0 is the same as x > 0, and its input gradient can
/// overwrite its output gradient. Two buffers fewer per hidden layer. In place and in Float, its kernels also sum the
/// squares they write, for the linear layers' finiteness proof.
final class ReLU<T: Scalar>: Layer<T> {
    /// Sums squares as it writes (in place, Float); set by the model.
    var sumsSquares = false
    /// Between a batch norm and a max pooling that run as one block (BatchNormReLUPool.swift), which do its work:
    /// then its passes do nothing. Set by the model.
    var fused = false

    override func forward(count: Int, mode: ForwardMode) {
        let n = count * outputCount
        if fused {
            outputSquares = nil
        } else if sumsSquares && mode == .train {
            outputSquares = T(reluForwardSquares(floats(x), floats(y), n))
        } else {
            reluForward(x, y, n)
            outputSquares = nil
        }
    }

    override func backwardInput(count: Int, accumulate: Bool) {
        inputGradientSquares = nil
        guard let dx, !fused else { return }
        let n = count * inputCount
        // In place, x is y: the mask y > 0 is x > 0.
        if sumsSquares && !accumulate {
            inputGradientSquares = T(reluBackwardSquares(floats(x), floats(dy), floats(dx), n))
        } else {
            reluBackward(x, dy, dx, n)
        }
    }

    override func appendKinkPattern(count: Int, to pattern: inout [Int32]) {
        // Fused, the pooling appends the signs that matter.
        if !fused { appendSigns(x, count * inputCount, to: &pattern) }
    }
}

/// y = x for x > 0, slope * x otherwise.
final class LeakyReLU<T: Scalar>: Layer<T> {
    private var slope: T {
        guard case let .leakyReLU(s) = spec else { return 0.01 }
        return T(s)
    }

    override func forward(count: Int, mode: ForwardMode) { leakyReLUForward(x, y, count * outputCount, slope: slope) }

    override func backwardInput(count: Int, accumulate: Bool) {
        if let dx { leakyReLUBackward(x, dy, dx, count * inputCount, slope: slope) }
    }

    override func appendKinkPattern(count: Int, to pattern: inout [Int32]) {
        appendSigns(x, count * inputCount, to: &pattern)
    }
}

/// y = tanh(x); dx = dy (1 - y^2) from the saved output.
final class Tanh<T: Scalar>: Layer<T> {
    override func forward(count: Int, mode: ForwardMode) { tanhForward(x, y, count * outputCount) }
    override func backwardInput(count: Int, accumulate: Bool) {
        if let dx { tanhBackward(y, dy, dx, count * inputCount) }
    }
}

/// y = 1 / (1 + e^-x); dx = dy y (1 - y) from the saved output.
final class Sigmoid<T: Scalar>: Layer<T> {
    override func forward(count: Int, mode: ForwardMode) { sigmoidForward(x, y, count * outputCount) }
    override func backwardInput(count: Int, accumulate: Bool) {
        if let dx { sigmoidBackward(y, dy, dx, count * inputCount) }
    }
}

/// Exact GELU, y = x Phi(x); dx = dy (Phi(x) + x phi(x)).
final class GELU<T: Scalar>: Layer<T> {
    override func forward(count: Int, mode: ForwardMode) { geluForward(x, y, count * outputCount) }
    override func backwardInput(count: Int, accumulate: Bool) {
        if let dx { geluBackward(x, dy, dx, count * inputCount) }
    }
}

/// Inverted dropout: in training each unit is kept with probability 1 - p and scaled by 1 / (1 - p), with the
/// mask drawn from the model's dropout generator; otherwise y = x.
final class Dropout<T: Scalar>: Layer<T> {
    /// The mask of the last training pass, [B, outputCount]: 0 or 1 / (1 - p).
    private let mask: UnsafeMutablePointer<T>
    private var lastForwardDropped = false
    /// The model, whose seed and per-row sample streams the masks are drawn from.
    unowned(unsafe) var model: Model<T>?

    required init(index: Int, spec: LayerSpec, inputShape: [Int], outputShape: [Int], batchCapacity: Int) {
        let elements = batchCapacity * outputShape.reduce(1, *)
        mask = .allocate(capacity: elements)
        mask.initialize(repeating: 0, count: elements)
        super.init(index: index, spec: spec, inputShape: inputShape, outputShape: outputShape, batchCapacity: batchCapacity)
    }

    deinit { mask.deallocate() }


    private var probability: Double {
        guard case let .dropout(p) = spec else { return 0 }
        return p
    }

    override func forward(count: Int, mode: ForwardMode) {
        let n = count * outputCount
        lastForwardDropped = mode.dropsUnits && probability > 0
        if lastForwardDropped, let model {
            drawMasks(count: count, seed: model.dropoutSeed, streams: model.sampleStreams)
        } else {
            Elementwise.copy(x, into: y, n)
        }
    }

    /// Each row's mask from a generator of its own, seeded from (seed, the row's sample stream, this layer's index):
    /// the same sample in the same epoch gets the same mask wherever it is trained.
    private func drawMasks(count: Int, seed: UInt64, streams: UnsafePointer<UInt64>) {
        let keep = 1 - probability, width = outputCount
        let layer = RandomGenerator.mix(UInt64(index))
        for row in 0..<count {
            var generator = RandomGenerator(seed: seed, stream: RandomGenerator.mix(streams[row] ^ layer))
            dropoutForward(x + row * width, y + row * width, mask: mask + row * width, width, keep: keep, generator: &generator)
        }
    }

    override func backwardInput(count: Int, accumulate: Bool) {
        guard let dx else { return }
        let n = count * inputCount
        if lastForwardDropped {
            Elementwise.multiply(dy, mask, into: dx, n)
        } else {
            Elementwise.copy(dy, into: dx, n)
        }
    }
}

/// A buffer of T seen as Float, for the Float-only kernels; only called when T is Float.
@inline(__always)
func floats<T>(_ p: UnsafeMutablePointer<T>) -> UnsafeMutablePointer<Float> {
    UnsafeMutableRawPointer(p).assumingMemoryBound(to: Float.self)
}

/// `floats` for a buffer only read.
@inline(__always)
func readingFloats<T>(_ p: UnsafePointer<T>) -> UnsafePointer<Float> {
    UnsafeRawPointer(p).assumingMemoryBound(to: Float.self)
}

/// Appends x[i] > 0 for each of `n` values: which side of ReLU's kink each input is on.
@_specialize(where T == Float) @_specialize(where T == Double)
func appendSigns<T: Scalar>(_ x: UnsafePointer<T>, _ n: Int, to pattern: inout [Int32]) {
    for i in 0..<n { pattern.append(x[i] > 0 ? 1 : 0) }
}
