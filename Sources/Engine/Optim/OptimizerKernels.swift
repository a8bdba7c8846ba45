// Optimizer updates: one flat loop each over a range of the parameter buffer (see Kernels.swift for why every
// generic loop carries @_specialize). Formulas follow torch.optim so results compare one to one.
//
// Every update reads the gradient as s * g, with s the caller's gradient scale: a data-parallel step hands over
// the sum over ranks with s = 1 / ranks (and any clipping factor) instead of making a pass of its own to average.
// The loops are memory bound, so the multiply is free; a separate pass over the gradients was not (BENCHMARKS.md,
// "Measurements behind comments in the code").
//
// Where g comes from is the `GradientSource`: one buffer, or the sum of two. A sharded data-parallel step
// (Coordinator's `ShardedReducer`) receives the other ranks' gradients for its shard into a buffer
// of their own and adds them here, in the update's pass, instead of in a reduction pass of their own.

/// Where an update reads its gradients: element i of the range being updated.
public protocol GradientSource {
    associatedtype Element
    subscript(_ i: Int) -> Element { get }
}

/// g[i]: one gradient buffer.
@frozen public struct Gradients<T>: GradientSource {
    public let g: UnsafePointer<T>
    @inlinable public init(_ g: UnsafePointer<T>) { self.g = g }
    @inlinable @inline(__always) public subscript(_ i: Int) -> T { g[i] }
}

/// g[i] + h[i]: this rank's gradients plus the sum of the others' for the same elements.
@frozen public struct SummedGradients<T: Scalar>: GradientSource {
    public let g: UnsafePointer<T>
    public let h: UnsafePointer<T>
    @inlinable public init(_ g: UnsafePointer<T>, _ h: UnsafePointer<T>) { self.g = g; self.h = h }
    @inlinable @inline(__always) public subscript(_ i: Int) -> T { g[i] + h[i] }
}

/// Plain SGD with optional L2 weight decay: p -= lr * (s g + wd * p)
@_specialize(where T == Float, G == Gradients<Float>) @_specialize(where T == Float, G == SummedGradients<Float>)
@_specialize(where T == Double, G == Gradients<Double>) @_specialize(where T == Double, G == SummedGradients<Double>)
public func sgdUpdate<T: Scalar, G: GradientSource>(
    _ p: UnsafeMutablePointer<T>, _ g: G, _ n: Int, gradientScale s: T, learningRate lr: T, weightDecay wd: T
) where G.Element == T {
    for i in 0..<n { p[i] -= lr * (s * g[i] + wd * p[i]) }
}

/// SGD with momentum (PyTorch form, dampening 0): d = s g + wd p; buf = mu buf + d;
/// p -= lr * buf, or with Nesterov p -= lr * (d + mu buf). A zero buffer makes the first step buf = d, as
/// PyTorch's clone-on-first-step does.
@_specialize(where T == Float, G == Gradients<Float>) @_specialize(where T == Float, G == SummedGradients<Float>)
@_specialize(where T == Double, G == Gradients<Double>) @_specialize(where T == Double, G == SummedGradients<Double>)
public func momentumUpdate<T: Scalar, G: GradientSource>(
    _ p: UnsafeMutablePointer<T>, _ g: G, buffer: UnsafeMutablePointer<T>, _ n: Int,
    gradientScale s: T, learningRate lr: T, momentum mu: T, nesterov: Bool, weightDecay wd: T
) where G.Element == T {
    if nesterov {
        for i in 0..<n {
            let d = s * g[i] + wd * p[i]
            buffer[i] = mu * buffer[i] + d
            p[i] -= lr * (d + mu * buffer[i])
        }
    } else {
        for i in 0..<n {
            let d = s * g[i] + wd * p[i]
            buffer[i] = mu * buffer[i] + d
            p[i] -= lr * buffer[i]
        }
    }
}

/// Adam (Kingma and Ba 2015) in PyTorch's arithmetic, with either L2 (`decoupledDecay` = 1: d = g + wd p) or
/// AdamW's decoupled decay (Loshchilov and Hutter 2019: p *= 1 - lr wd before the Adam step), with g read as s g:
///   m = b1 m + (1 - b1) d;  v = b2 v + (1 - b2) d^2
///   p -= (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
/// The caller passes the bias corrections for step t (1-based), and 1 - b1 and 1 - b2 rounded from float64, as PyTorch
/// computes them: b1 = 0.99999999 is 1 in float32, and 1 - T(b1) would stop m from ever moving.
@_specialize(where T == Float, G == Gradients<Float>) @_specialize(where T == Float, G == SummedGradients<Float>)
@_specialize(where T == Double, G == Gradients<Double>) @_specialize(where T == Double, G == SummedGradients<Double>)
public func adamUpdate<T: Scalar, G: GradientSource>(
    _ p: UnsafeMutablePointer<T>, _ g: G, m: UnsafeMutablePointer<T>, v: UnsafeMutablePointer<T>,
    _ n: Int, gradientScale s: T, learningRate lr: T, beta1: T, beta2: T, oneMinusBeta1: T, oneMinusBeta2: T, epsilon: T,
    l2Decay: T, decoupledDecay: T, biasCorrection1: T, biasCorrection2: T
) where G.Element == T {
    let stepSize = lr / biasCorrection1
    let inverseRootCorrection2 = 1 / T.sqrt(biasCorrection2)
    let shrink = 1 - lr * decoupledDecay
    for i in 0..<n {
        let d = s * g[i] + l2Decay * p[i]
        m[i] = beta1 * m[i] + oneMinusBeta1 * d
        v[i] = beta2 * v[i] + oneMinusBeta2 * d * d
        p[i] = p[i] * shrink - stepSize * m[i] / (T.sqrt(v[i]) * inverseRootCorrection2 + epsilon)
    }
}
