import Foundation
import RealModule

// Element-wise kernels. Each loop runs over raw buffer pointers taken once by the caller, allocates nothing and
// has no data-dependent branch: selects (`c ? a : b` on values) compile to blend/and instructions.
//
// Every generic kernel carries `@_specialize` for Float and Double. The model code that calls these is generic
// and, called from another module, runs unspecialised; without these attributes the loops below would go
// through witness tables per element, measured at ~70x slower. With them, the generic entry point checks the
// type once and jumps to the concrete loop.
//
// Dimension legend: B = rows in the batch, N = elements, C = classes (outputs).

// MARK: - Activations

/// y = max(x, 0)
@_specialize(where T == Float) @_specialize(where T == Double)
public func reluForward<T: Scalar>(_ x: UnsafePointer<T>, _ y: UnsafeMutablePointer<T>, _ n: Int) {
    for i in 0..<n { y[i] = Swift.max(x[i], 0) }
}

/// dx = dy where x > 0, else 0 (the derivative at the kink x = 0 is taken as 0, as PyTorch does).
@_specialize(where T == Float) @_specialize(where T == Double)
public func reluBackward<T: Scalar>(
    _ x: UnsafePointer<T>, _ dy: UnsafePointer<T>, _ dx: UnsafeMutablePointer<T>, _ n: Int
) {
    // Both operands are loaded unconditionally so the compiler emits a vector select, not a branch: the signs
    // of real activations are random, and a branch mispredicted on half the elements made this kernel 6x slower
    // (BENCHMARKS.md, "Measurements behind comments in the code").
    for i in 0..<n {
        let g = dy[i]
        dx[i] = x[i] > 0 ? g : 0
    }
}

/// `reluForward` for Float that also returns the sum of the squared outputs (NaN or infinite when any output
/// is): a training step uses it to prove the next linear layer's weight gradient finite without reading it (see
/// `Model.gradientsProvenFinite(in:)`). Written with explicit SIMD accumulators because the compiler keeps a
/// floating-point reduction in order, one element at a time, which would make the loop 10x slower; with them
/// it costs half as much again as the plain kernel (BENCHMARKS.md, "Measurements behind comments in the code").
/// Same results as `reluForward`,
/// including NaN passing through. In place (`x == y`) is fine.
public func reluForwardSquares(_ x: UnsafePointer<Float>, _ y: UnsafeMutablePointer<Float>, _ n: Int) -> Float {
    typealias V = SIMD8<Float>
    let zero = V()
    var s0 = V(), s1 = V()
    var i = 0
    while i &+ 16 <= n {
        let a = UnsafeRawPointer(x + i).loadUnaligned(as: V.self)
        let b = UnsafeRawPointer(x + i + 8).loadUnaligned(as: V.self)
        // Swift.max(v, 0) is `0 >= v ? 0 : v`: NaN stays NaN, -0 becomes +0.
        let ra = a.replacing(with: zero, where: zero .>= a)
        let rb = b.replacing(with: zero, where: zero .>= b)
        UnsafeMutableRawPointer(y + i).storeBytes(of: ra, as: V.self)
        UnsafeMutableRawPointer(y + i + 8).storeBytes(of: rb, as: V.self)
        s0 += ra * ra
        s1 += rb * rb
        i &+= 16
    }
    var sum = (s0 + s1).sum()
    while i < n {
        let v = Swift.max(x[i], 0)
        y[i] = v
        sum += v * v
        i &+= 1
    }
    return sum
}

/// `reluBackward` for Float that also returns the sum of the squared input gradients, for the same proof as
/// `reluForwardSquares`; as fast as the plain kernel. In place (`dy == dx`) is fine. Its loop repeats
/// `reluForwardSquares`' on purpose: one loop shared through closures measured 35x slower (they were not inlined
/// into the SIMD loop).
public func reluBackwardSquares(
    _ x: UnsafePointer<Float>, _ dy: UnsafePointer<Float>, _ dx: UnsafeMutablePointer<Float>, _ n: Int
) -> Float {
    typealias V = SIMD8<Float>
    let zero = V()
    var s0 = V(), s1 = V()
    var i = 0
    while i &+ 16 <= n {
        let xa = UnsafeRawPointer(x + i).loadUnaligned(as: V.self)
        let xb = UnsafeRawPointer(x + i + 8).loadUnaligned(as: V.self)
        let ga = UnsafeRawPointer(dy + i).loadUnaligned(as: V.self)
        let gb = UnsafeRawPointer(dy + i + 8).loadUnaligned(as: V.self)
        let ra = zero.replacing(with: ga, where: xa .> zero)
        let rb = zero.replacing(with: gb, where: xb .> zero)
        UnsafeMutableRawPointer(dx + i).storeBytes(of: ra, as: V.self)
        UnsafeMutableRawPointer(dx + i + 8).storeBytes(of: rb, as: V.self)
        s0 += ra * ra
        s1 += rb * rb
        i &+= 16
    }
    var sum = (s0 + s1).sum()
    while i < n {
        let g = dy[i]
        let v = x[i] > 0 ? g : 0
        dx[i] = v
        sum += v * v
        i &+= 1
    }
    return sum
}

/// Sum of (x[i] + y[i])^2: the squared norm of a vector held as two addends (a sharded step's own gradients and
/// the sum it received), without forming it. Expanding it into three dot products instead cancels badly when the
/// addends nearly cancel, down to a negative "square". SIMD accumulators for speed, as in `reluForwardSquares`.
public func sumOfSquaredSums(_ x: UnsafePointer<Float>, _ y: UnsafePointer<Float>, _ n: Int) -> Double {
    typealias V = SIMD8<Float>
    var s0 = V(), s1 = V()
    var i = 0
    while i &+ 16 <= n {
        let a = UnsafeRawPointer(x + i).loadUnaligned(as: V.self) + UnsafeRawPointer(y + i).loadUnaligned(as: V.self)
        let b = UnsafeRawPointer(x + i + 8).loadUnaligned(as: V.self) + UnsafeRawPointer(y + i + 8).loadUnaligned(as: V.self)
        s0 += a * a
        s1 += b * b
        i &+= 16
    }
    var sum = Double((s0 + s1).sum())
    while i < n {
        let v = x[i] + y[i]
        sum += Double(v * v)
        i &+= 1
    }
    return sum
}

/// y = max(x, 0) + slope * min(x, 0)
@_specialize(where T == Float) @_specialize(where T == Double)
public func leakyReLUForward<T: Scalar>(_ x: UnsafePointer<T>, _ y: UnsafeMutablePointer<T>, _ n: Int, slope: T) {
    for i in 0..<n { y[i] = Swift.max(x[i], 0) + slope * Swift.min(x[i], 0) }
}

/// dx = dy * (x > 0 ? 1 : slope)
@_specialize(where T == Float) @_specialize(where T == Double)
public func leakyReLUBackward<T: Scalar>(
    _ x: UnsafePointer<T>, _ dy: UnsafePointer<T>, _ dx: UnsafeMutablePointer<T>, _ n: Int, slope: T
) {
    for i in 0..<n { dx[i] = dy[i] * (x[i] > 0 ? 1 : slope) }
}

/// y = tanh(x)
@_specialize(where T == Float) @_specialize(where T == Double)
public func tanhForward<T: Scalar>(_ x: UnsafePointer<T>, _ y: UnsafeMutablePointer<T>, _ n: Int) {
    for i in 0..<n { y[i] = T.tanh(x[i]) }
}

/// dx = dy * (1 - y^2), from the saved output y = tanh(x)
@_specialize(where T == Float) @_specialize(where T == Double)
public func tanhBackward<T: Scalar>(
    _ y: UnsafePointer<T>, _ dy: UnsafePointer<T>, _ dx: UnsafeMutablePointer<T>, _ n: Int
) {
    for i in 0..<n { dx[i] = dy[i] * (1 - y[i] * y[i]) }
}

/// y = 1 / (1 + exp(-x)); for very negative x, exp(-x) = inf and y = 0 exactly, which is the right limit.
@_specialize(where T == Float) @_specialize(where T == Double)
public func sigmoidForward<T: Scalar>(_ x: UnsafePointer<T>, _ y: UnsafeMutablePointer<T>, _ n: Int) {
    for i in 0..<n { y[i] = 1 / (1 + T.exp(-x[i])) }
}

/// dx = dy * y * (1 - y), from the saved output y
@_specialize(where T == Float) @_specialize(where T == Double)
public func sigmoidBackward<T: Scalar>(
    _ y: UnsafePointer<T>, _ dy: UnsafePointer<T>, _ dx: UnsafeMutablePointer<T>, _ n: Int
) {
    for i in 0..<n { dx[i] = dy[i] * y[i] * (1 - y[i]) }
}

/// Exact GELU, as PyTorch's default: y = x * Phi(x) = 0.5 * x * (1 + erf(x / sqrt 2))
@_specialize(where T == Float) @_specialize(where T == Double)
public func geluForward<T: Scalar>(_ x: UnsafePointer<T>, _ y: UnsafeMutablePointer<T>, _ n: Int) {
    let invSqrt2 = 1 / T.sqrt(2)
    for i in 0..<n { y[i] = x[i] * (1 + T.erf(x[i] * invSqrt2)) / 2 }
}

/// dx = dy * (Phi(x) + x * phi(x)), phi the standard normal density
@_specialize(where T == Float) @_specialize(where T == Double)
public func geluBackward<T: Scalar>(
    _ x: UnsafePointer<T>, _ dy: UnsafePointer<T>, _ dx: UnsafeMutablePointer<T>, _ n: Int
) {
    let invSqrt2 = 1 / T.sqrt(2)
    let invSqrt2Pi = 1 / T.sqrt(2 * T.pi)
    for i in 0..<n {
        let cdf = (1 + T.erf(x[i] * invSqrt2)) / 2
        let pdf = T.exp(-x[i] * x[i] / 2) * invSqrt2Pi
        dx[i] = dy[i] * (cdf + x[i] * pdf)
    }
}

/// Inverted dropout: mask = 1/keep with probability keep, else 0; y = x * mask. Expected y equals x, so
/// evaluation needs no rescaling.
@_specialize(where T == Float) @_specialize(where T == Double)
public func dropoutForward<T: Scalar>(
    _ x: UnsafePointer<T>, _ y: UnsafeMutablePointer<T>, mask: UnsafeMutablePointer<T>, _ n: Int,
    keep: Double, generator: inout RandomGenerator
) {
    // Compare 53-bit integers: the draw is exact and independent of T.
    let threshold = UInt64(keep * 0x1.0p53)
    let scale = T(1 / keep)
    for i in 0..<n {
        mask[i] = (generator.next() >> 11) < threshold ? scale : 0
        y[i] = x[i] * mask[i]
    }
}

// MARK: - Dense helpers

/// Every row of y[B, C] = bias[C] (the GEMM then adds X W^T with beta = 1).
@_specialize(where T == Float) @_specialize(where T == Double)
public func broadcastRows<T: Scalar>(_ bias: UnsafePointer<T>, into y: UnsafeMutablePointer<T>, rows: Int, columns: Int) {
    for r in 0..<rows {
        (y + r * columns).update(from: bias, count: columns)
    }
}

// MARK: - Losses

/// Fused, numerically stable softmax cross-entropy over rows of logits[B, C], with optional label smoothing.
///
/// The target of row b is t = (1 - s) onehot(label_b) + s / C (s = labelSmoothing; PyTorch's
/// `CrossEntropyLoss(label_smoothing=s)`), so
/// loss_b = -sum_j t_j log softmax(z_b)_j = logsumexp(z_b) - (1 - s) z_b[label_b] - (s / C) sum_j z_b[j],
/// with logsumexp computed around the row maximum so exp never overflows.
/// Writes dlogits = (softmax(z) - t) * gradientScale (gradientScale = 1/B for a mean over the batch).
/// Returns the sum of the row losses (in Double) and the number of rows whose arg-max equals the label.
/// With s = 0 every operation that involves s is exact (x - 0, x * 1) and the logits' sum is not used, so the results
/// are bit for bit those of plain cross-entropy.
@_specialize(where T == Float) @_specialize(where T == Double)
public func softmaxCrossEntropy<T: Scalar>(
    logits: UnsafePointer<T>, labels: UnsafePointer<Int32>, rows: Int, classes: Int,
    gradient: UnsafeMutablePointer<T>, gradientScale: T, labelSmoothing: T = 0
) -> (lossSum: Double, correct: Int) {
    let spread = labelSmoothing / T(classes)
    let onLabel = 1 - labelSmoothing
    var lossSum = 0.0
    var correct = 0
    for r in 0..<rows {
        let z = logits + r * classes
        let g = gradient + r * classes
        let label = Int(labels[r])
        var maxValue = z[0]
        var argmax = 0
        for j in 1..<classes {
            let greater = z[j] > maxValue
            argmax = greater ? j : argmax
            maxValue = greater ? z[j] : maxValue
        }
        var sum: T = 0
        for j in 0..<classes {
            g[j] = T.exp(z[j] - maxValue)
            sum += g[j]
        }
        let inverse = 1 / sum
        var logitSum: T = 0
        for j in 0..<classes {
            g[j] = (g[j] * inverse - spread - (j == label ? onLabel : 0)) * gradientScale
            logitSum += z[j]
        }
        // Without smoothing the logits' sum is left out, not multiplied by 0: it may overflow where no loss term does.
        let smoothingTerm = spread == 0 ? 0 : spread * logitSum
        lossSum += Double(T.log(sum) + maxValue - onLabel * z[label] - smoothingTerm)
        correct += argmax == label ? 1 : 0
    }
    return (lossSum, correct)
}

/// Mean squared error over all B*C elements (PyTorch's MSELoss with reduction "mean"):
/// loss = sum (p - t)^2 / (B*C); writes dp = 2 (p - t) * gradientScale with gradientScale = 1 / (B*C).
/// Returns the sum of squared differences.
@_specialize(where T == Float) @_specialize(where T == Double)
public func squaredError<T: Scalar>(
    predictions: UnsafePointer<T>, targets: UnsafePointer<T>, count: Int,
    gradient: UnsafeMutablePointer<T>, gradientScale: T
) -> Double {
    var sum: T = 0
    for i in 0..<count {
        let d = predictions[i] - targets[i]
        sum += d * d
        gradient[i] = 2 * d * gradientScale
    }
    return Double(sum)
}

/// Number of rows of scores[B, C] whose arg-max equals the label.
@_specialize(where T == Float) @_specialize(where T == Double)
public func countCorrect<T: Scalar>(scores: UnsafePointer<T>, labels: UnsafePointer<Int32>, rows: Int, classes: Int) -> Int {
    var correct = 0
    for r in 0..<rows {
        let z = scores + r * classes
        var maxValue = z[0]
        var argmax = 0
        for j in 1..<classes {
            let greater = z[j] > maxValue
            argmax = greater ? j : argmax
            maxValue = greater ? z[j] : maxValue
        }
        correct += argmax == Int(labels[r]) ? 1 : 0
    }
    return correct
}

/// targets[B, C] = onehot(labels)
@_specialize(where T == Float) @_specialize(where T == Double)
public func oneHot<T: Scalar>(labels: UnsafePointer<Int32>, rows: Int, classes: Int, into targets: UnsafeMutablePointer<T>) {
    for r in 0..<rows {
        let label = Int(labels[r])
        for j in 0..<classes { targets[r * classes + j] = j == label ? 1 : 0 }
    }
}

// MARK: - Whole-buffer helpers

/// The whole-buffer operations with short common names (`copy`, `add`, `zero`, ...): a namespace keeps them from
/// leaking into every module that imports Engine, where they would shadow or collide with other `copy`s and
/// `add`s. A caseless enum's static methods compile to the same code as free functions: its metatype is empty and
/// passes nothing, and the attributes below (`@_specialize`, `@inline(__always)`) apply unchanged.
public enum Elementwise {
    /// destination = source (a specialised copy: the generic `update(from:)` in unspecialised code is per element).
    @_specialize(where T == Float) @_specialize(where T == Double)
    public static func copy<T: Scalar>(
        _ source: UnsafePointer<T>, into destination: UnsafeMutablePointer<T>, _ n: Int
    ) {
        destination.update(from: source, count: n)
    }

    /// x = 0, as one memset: zero bits are +0.0 in IEEE 754.
    @inline(__always)
    public static func zero<T: Scalar>(_ x: UnsafeMutablePointer<T>, _ n: Int) {
        memset(x, 0, n * MemoryLayout<T>.stride)
    }

    /// y += x
    @_specialize(where T == Float) @_specialize(where T == Double)
    public static func add<T: Scalar>(_ x: UnsafePointer<T>, into y: UnsafeMutablePointer<T>, _ n: Int) {
        for i in 0..<n { y[i] += x[i] }
    }

    /// out = a + b (a residual block's sum of its paths)
    @_specialize(where T == Float) @_specialize(where T == Double)
    public static func add<T: Scalar>(
        _ a: UnsafePointer<T>, _ b: UnsafePointer<T>, into out: UnsafeMutablePointer<T>, _ n: Int
    ) {
        for i in 0..<n { out[i] = a[i] + b[i] }
    }

    /// x *= a
    @_specialize(where T == Float) @_specialize(where T == Double)
    public static func scale<T: Scalar>(_ x: UnsafeMutablePointer<T>, _ n: Int, by a: T) {
        for i in 0..<n { x[i] *= a }
    }

    /// out = a * b (dropout's backward: dx = dy * mask)
    @_specialize(where T == Float) @_specialize(where T == Double)
    public static func multiply<T: Scalar>(
        _ a: UnsafePointer<T>, _ b: UnsafePointer<T>, into out: UnsafeMutablePointer<T>, _ n: Int
    ) {
        for i in 0..<n { out[i] = a[i] * b[i] }
    }

    /// Element-wise conversion between scalar types (the gradient checker's float64 copy of a float32 model).
    @_specialize(where S == Float, D == Double) @_specialize(where S == Double, D == Float)
    @_specialize(where S == Float, D == Float) @_specialize(where S == Double, D == Double)
    public static func convert<S: Scalar, D: Scalar>(
        _ source: UnsafePointer<S>, into destination: UnsafeMutablePointer<D>, _ n: Int
    ) {
        for i in 0..<n { destination[i] = D(source[i]) }
    }
}

/// Number of elements that are NaN or infinite. (x - x is 0 for finite x and NaN otherwise; NaN != NaN.)
/// Written as while loops with wrapping adds into a 32-bit count per block of 2^30 elements because the
/// compiler vectorizes the reduction fully only in that form: as `for i in 0..<n` with `count += ...` it
/// stayed scalar (BENCHMARKS.md, "Measurements behind comments in the code").
@_specialize(where T == Float) @_specialize(where T == Double)
public func nonFiniteCount<T: Scalar>(_ x: UnsafePointer<T>, _ n: Int) -> Int {
    var total = 0
    var start = 0
    while start < n {
        let end = Swift.min(n, start &+ (1 << 30))
        var count: Int32 = 0
        var i = start
        while i < end {
            let d = x[i] - x[i]
            count &+= d == d ? 0 : 1
            i &+= 1
        }
        total &+= Int(count)
        start = end
    }
    return total
}
