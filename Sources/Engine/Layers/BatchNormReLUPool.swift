/// Batch norm, ReLU and max pooling run as one block: `[..., batchnorm, relu, maxpool k]` (windows that do not
/// overlap), the basic block of a CNN after each convolution. The three layers stay in the model's plan, with their
/// names, tensors and timings; the model links them (`Model.fuseBlocks`) and they divide the work differently:
///
/// | pass     | batch norm                             | ReLU    | max pooling                                    |
/// |----------|----------------------------------------|---------|------------------------------------------------|
/// | forward  | statistics, per-channel scale and shift | nothing | normalises, rectifies and pools its windows    |
/// | backward | parameter gradients; dx (one pass)     | nothing | batch norm's reductions over its winners only  |
///
/// Unfused, the block passes over the full-size activations nine times (normalise, rectify, pool; route dy to the
/// winners, mask it, two reductions, dx), and those passes were a quarter of the shipped CNN's step. Fused, the
/// normalised activations are never written: forward reads x twice (statistics, then pooling) and backward once,
/// with the reductions over the pooled quarter. Every other value of the batch norm's dy is zero, so its
/// reductions are sums over the winners whose ReLU passed them, and its dx is dx = k (x - mean) + c everywhere
/// plus a dy at those winners (`GradientFactors`). The arithmetic is the unfused layers': outputs are bit for bit
/// the same, gradients the same up to the order of the sums (tested against the unfused model, and in the float64
/// gradient check like every layer). Winners are the same wherever the ReLU passes the output; where it does not,
/// the Float kernel may name another input of the window (see `maxPool2x2`), which no gradient reaches.
///
/// The ReLU's kinks are the signs of the pooled values (the pooling's kink pattern adds them): an input that wins
/// no window changes nothing downstream whichever side of zero it is on.

/// sums[c] = sum of dy over the winners whose value passed the ReLU (dbeta), sums[C + c] = the same of dy xhat
/// (dgamma), from each window's kept winning input: what `featureGradientSums` finds over the batch norm's own dy.
@_specialize(where T == Float) @_specialize(where T == Double)
func pooledGradientSums<T: Scalar>(pool: MaxPool2d<T>, samples: Int, normalization bn: BatchNorm<T>) {
    let channels = bn.features, outPlane = pool.outputCount / channels
    let sums = bn.sums.baseAddress!
    if T.self == Float.self {
        return floatPooledGradientSums(dy: readingFloats(pool.dy), y: readingFloats(pool.y),
                                       winningInputs: readingFloats(pool.winningInputs),
                                       planes: samples * channels, channels: channels, outPlane: outPlane,
                                       mean: bn.mean, inverseDeviation: bn.inverseDeviation, into: sums)
    }
    sums.update(repeating: 0, count: 2 * channels)
    for n in 0..<(samples * channels) {
        let c = n % channels, m = bn.mean[c]
        let offset = n * outPlane
        let g = pool.dy + offset, y = pool.y + offset, won = pool.winningInputs + offset
        // Float takes the vector kernel above; this loop serves the float64 gradient check.
        var s0 = 0.0, t0 = 0.0
        for o in 0..<outPlane where y[o] > 0 {
            s0 += Double(g[o])
            t0 += Double(g[o]) * (Double(won[o]) - m)
        }
        sums[c] += s0
        sums[channels + c] += t0 * bn.inverseDeviation[c]
    }
}

/// `pooledGradientSums` in Float vectors, a plane at a time, each plane's sums then carried into Double (as
/// `floatFeatureSums` does): converting every value to Double was slow for a quarter of an activation's values
/// (BENCHMARKS.md, "Measurements behind comments in the code").
func floatPooledGradientSums(dy: UnsafePointer<Float>, y: UnsafePointer<Float>, winningInputs: UnsafePointer<Float>,
                             planes: Int, channels: Int, outPlane: Int, mean: UnsafePointer<Double>,
                             inverseDeviation: UnsafePointer<Double>, into sums: UnsafeMutablePointer<Double>) {
    typealias V = SIMD8<Float>
    let zero = V(repeating: 0)
    sums.update(repeating: 0, count: 2 * channels)
    for n in 0..<planes {
        let c = n % channels, m = Float(mean[c]), center = V(repeating: m)
        let offset = n * outPlane
        let g = dy + offset, pooled = y + offset, won = winningInputs + offset
        var s = V(), t = V()
        var o = 0
        while o &+ 8 <= outPlane {
            let gradient = UnsafeRawPointer(g + o).loadUnaligned(as: V.self)
            let value = UnsafeRawPointer(pooled + o).loadUnaligned(as: V.self)
            let input = UnsafeRawPointer(won + o).loadUnaligned(as: V.self)
            let passed = zero.replacing(with: gradient, where: value .> zero)
            s += passed
            t += passed * (input - center)
            o &+= 8
        }
        var sum = Double(s.sum()), product = Double(t.sum())
        while o < outPlane {
            let gradient = g[o], passed = Double(pooled[o] > 0 ? gradient : 0)
            sum += passed
            product += passed * Double(won[o] - m)
            o &+= 1
        }
        sums[c] += sum
        sums[channels + c] += product * inverseDeviation[c]
    }
}

/// The block's input gradient: per plane, dx = k (x - mean) + c over every input (the pooling's dy reaches none
/// but the winners), then at each winner dx = a dy + k (x - mean) + c with dy masked by the ReLU, the expression the
/// unfused batch norm evaluates there. The plane is still in cache for the second loop.
@_specialize(where T == Float) @_specialize(where T == Double)
func normalizeReLUPoolBackward<T: Scalar>(_ x: UnsafePointer<T>, _ dx: UnsafeMutablePointer<T>, pool: MaxPool2d<T>,
                                          samples: Int, factors: GradientFactors<T>) {
    let channels = pool.inputShape[0], inPlane = pool.inputCount / channels, outPlane = pool.outputCount / channels
    let (height, width, outHeight, outWidth) = (pool.inputShape[1], pool.inputShape[2], pool.outputShape[1], pool.outputShape[2])
    if T.self == Float.self && pool.kernel == 2 && pool.stride == 2 && outWidth >= 4 && height == 2 * outHeight
        && width == 2 * outWidth {
        return normalizeReLUPool2x2Backward(
            readingFloats(x), floats(dx), dy: readingFloats(pool.dy), y: readingFloats(pool.y), winners: pool.winners, planes: samples * channels,
            channels: channels, width: width, outHeight: outHeight, outWidth: outWidth,
            factors: { c in
                let (a, k, shift, center) = factors(c, features: channels)
                return (Float(a), Float(k), Float(shift), Float(center))
            })
    }
    for n in 0..<(samples * channels) {
        let c = n % channels
        let (a, k, shift, center) = factors(c, features: channels)
        let v = x + n * inPlane, out = dx + n * inPlane
        var i = 0
        while i < inPlane {
            out[i] = k * (v[i] - center) + shift
            i &+= 1
        }
        // Winners index their sample; this plane starts c planes into it.
        let sample = dx + (n / channels) * pool.inputCount
        let offset = n * outPlane
        let g = pool.dy + offset, y = pool.y + offset, won = pool.winners + offset, inputs = pool.winningInputs + offset
        var o = 0
        while o < outPlane {
            let gradient = g[o], upstream: T = y[o] > 0 ? gradient : 0  // loaded first: a select, not a branch
            sample[Int(won[o])] = a * upstream + k * (inputs[o] - center) + shift
            o &+= 1
        }
    }
}

/// `normalizeReLUPoolBackward` for 2x2 windows of stride 2 tiling a Float image: one pass over the windows, four
/// outputs at a time, with dy spread to each window's winner by comparing its index with the window's four
/// positions, then dx = a dy + k (x - mean) + c on both input rows as vectors. The same expression at every input
/// (dy is 0 off the winners, and 0 + t = t), so the same values as the general loop, without its scalar scatter
/// (15 instructions an output). A row's last group overlaps the one before, as in `maxPool2x2`.
func normalizeReLUPool2x2Backward(_ x: UnsafePointer<Float>, _ dx: UnsafeMutablePointer<Float>, dy: UnsafePointer<Float>,
                                  y: UnsafePointer<Float>, winners: UnsafePointer<Int32>, planes: Int, channels: Int,
                                  width: Int, outHeight: Int, outWidth: Int,
                                  factors: (Int) -> (a: Float, k: Float, c: Float, center: Float)) {
    typealias Row = SIMD8<Float>
    typealias Four = SIMD4<Float>
    typealias Indices = SIMD4<Int32>
    let inPlane = 4 * outHeight * outWidth, outPlane = outHeight * outWidth
    let zero = Four(repeating: 0), columns = Indices(0, 2, 4, 6), one = Indices(repeating: 1)
    let below = Indices(repeating: Int32(truncatingIfNeeded: width)), belowRight = below &+ one
    for n in 0..<planes {
        let c = n % channels, base = c * inPlane
        let (a, k, shift, center) = factors(c)
        let input = x + n * inPlane, output = dx + n * inPlane
        let g = dy + n * outPlane, pooled = y + n * outPlane, won = winners + n * outPlane
        var i = 0
        while i < outHeight {
            let top = 2 &* i &* width, row = i &* outWidth
            var j = 0
            while j < outWidth {
                let start = Swift.min(j, outWidth &- 4), q = 2 &* start, at = row &+ start
                let gradient = UnsafeRawPointer(g + at).loadUnaligned(as: Four.self)
                let value = UnsafeRawPointer(pooled + at).loadUnaligned(as: Four.self)
                let winner = UnsafeRawPointer(won + at).loadUnaligned(as: Indices.self)
                // dy where the ReLU passed it, then at each of the window's four positions where it won.
                let passed = zero.replacing(with: gradient, where: value .> zero)
                let corner = Indices(repeating: Int32(truncatingIfNeeded: base &+ top &+ q)) &+ columns
                let upperLeft = zero.replacing(with: passed, where: winner .== corner)
                let upperRight = zero.replacing(with: passed, where: winner .== corner &+ one)
                let lowerLeft = zero.replacing(with: passed, where: winner .== corner &+ below)
                let lowerRight = zero.replacing(with: passed, where: winner .== corner &+ belowRight)
                let upperGradient = Row(upperLeft[0], upperRight[0], upperLeft[1], upperRight[1],
                                        upperLeft[2], upperRight[2], upperLeft[3], upperRight[3])
                let lowerGradient = Row(lowerLeft[0], lowerRight[0], lowerLeft[1], lowerRight[1],
                                        lowerLeft[2], lowerRight[2], lowerLeft[3], lowerRight[3])
                let upper = UnsafeRawPointer(input + top + q).loadUnaligned(as: Row.self)
                let lower = UnsafeRawPointer(input + top + width + q).loadUnaligned(as: Row.self)
                let upperDx = a * upperGradient + k * (upper - center) + shift
                let lowerDx = a * lowerGradient + k * (lower - center) + shift
                UnsafeMutableRawPointer(output + top + q).storeBytes(of: upperDx, as: Row.self)
                UnsafeMutableRawPointer(output + top + width + q).storeBytes(of: lowerDx, as: Row.self)
                j = start &+ 4
            }
            i &+= 1
        }
    }
}
