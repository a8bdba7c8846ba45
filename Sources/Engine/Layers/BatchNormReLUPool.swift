/// Batch norm, ReLU and max pooling run as one layer: `[..., batchnorm, relu, maxpool k]` (windows that do not
/// overlap), the basic block of a CNN after each convolution. The model file and the tensors still name three layers
/// (the batch norm's weight, bias and running statistics under its own index); at run time the model's plan holds one
/// `BatchNormReLUPool` in their place (`LayerSpec.planRuns`), which owns the whole pass:
///
/// | pass     | what the block does                                                                    |
/// |----------|----------------------------------------------------------------------------------------|
/// | forward  | batch norm statistics, per-channel scale and shift; normalises, rectifies and pools     |
/// | backward | batch norm's reductions over the winners only, parameter gradients; dx in one pass      |
///
/// Unfused, the block passes over the full-size activations nine times (normalise, rectify, pool; route dy to the
/// winners, mask it, two reductions, dx), and those passes were a quarter of the shipped CNN's step. Fused, the
/// normalised activations are never written (nor is room kept for them): forward reads x twice (statistics, then
/// pooling) and backward once, with the reductions over the pooled quarter. Every other value of the batch norm's dy
/// is zero, so its reductions are sums over the winners whose ReLU passed them, and its dx is dx = k (x - mean) + c
/// everywhere plus a dy at those winners (`GradientFactors`). The arithmetic is the unfused layers': outputs are bit
/// for bit the same, gradients the same up to the order of the sums (tested against the unfused model, and in the
/// float64 gradient check like every layer). Winners are the same wherever the ReLU passes the output; where it does
/// not, the Float kernel may name another input of the window (see `maxPool2x2`), which no gradient reaches.
///
/// The ReLU's kinks are the signs of the pooled values: an input that wins no window changes nothing downstream
/// whichever side of zero it is on.
///
/// Dimension legend: B = rows, C = channels; x [B, C, H, W] is the batch norm's input, y [B, C, Ho, Wo] the pooling's
/// output.
final class BatchNormReLUPool<T: Scalar>: Layer<T> {
    let statistics: BatchNormStatistics<T>
    override var normalization: BatchNormStatistics<T>? { statistics }
    let kernel: Int, stride: Int
    /// For each output value of the last forward pass, the index within its sample of the input that won.
    let winners: UnsafeMutablePointer<Int32>
    /// For each output value, the batch norm input (before normalisation) that won its window. [B, C, Ho, Wo]
    let winningInputs: UnsafeMutablePointer<T>

    /// `placement` spans the three layers (the batch norm's input to the pooling's output); `normalization` is the
    /// batch norm's spec: the block owns its tensors.
    init(_ placement: LayerPlacement, normalization: LayerSpec, pool: MaxPool2dKind) {
        statistics = BatchNormStatistics(features: placement.inputShape[0],
                                         positions: placement.inputShape.dropFirst().reduce(1, *))
        (kernel, stride) = (pool.kernel, pool.stride)
        let elements = placement.batchCapacity * placement.outputShape.reduce(1, *)
        winners = .allocate(capacity: elements)
        winners.initialize(repeating: 0, count: elements)
        winningInputs = .allocate(capacity: elements)
        winningInputs.initialize(repeating: 0, count: elements)
        super.init(placement, spec: normalization)
    }

    deinit {
        winners.deallocate()
        winningInputs.deallocate()
    }

    override func attach(to model: Model<T>) { statistics.reducer = model.crossRankReducer }

    /// Which input wins a window, and the ReLU's sign at it.
    override var hasKink: Bool { true }

    override func forward(count: Int, mode: ForwardMode) {
        statistics.update(x, count: count, mode: mode, parameters: parameters!, buffers: buffers!)
        let normalization = PoolNormalization(x: x, scale: statistics.scale, shift: statistics.shift,
                                              winningInputs: winningInputs)
        maxPoolForward(x, y, winners: winners, samples: count, channels: inputShape[0], height: inputShape[1],
                       width: inputShape[2], kernel: kernel, stride: stride, outHeight: outputShape[1],
                       outWidth: outputShape[2], normalization: normalization)
    }

    override func backwardParameters(count: Int, accumulate: Bool) {
        // dbeta and dgamma: the batch norm's reductions over the winners (every other value of its dy is zero).
        pooledGradientSums(self, samples: count)
        statistics.writeParameterGradients(gradients!, accumulate: accumulate)
        provenFinite = false
    }

    override func backwardInput(count: Int, accumulate: Bool) {
        guard let dx else { return }
        normalizeReLUPoolBackward(x, dx, block: self, samples: count,
                                  factors: statistics.inputGradientFactors(gamma: parameters!))
    }

    override func initialize(scheme: Initialization, gain: Double, generator: inout RandomGenerator) {
        statistics.initialize(parameters: parameters!, buffers: buffers!)
    }

    /// The windows' winners as `appendPoolKinkPattern` takes them, on the normalised and rectified inputs the pooling
    /// compared, where the ReLU passes the output (elsewhere no gradient reaches the window), then the ReLU's signs.
    override func appendKinkPattern(count: Int, to pattern: inout [Int32]) {
        let normalization = (scale: UnsafePointer<T>(statistics.scale), shift: UnsafePointer<T>(statistics.shift),
                             y: UnsafePointer<T>(y!))
        appendPoolKinkPattern(x, samples: count, channels: inputShape[0], height: inputShape[1], width: inputShape[2],
                              kernel: kernel, stride: stride, outHeight: outputShape[1], outWidth: outputShape[2],
                              normalization: normalization, to: &pattern)
        appendSigns(y, count * outputCount, to: &pattern)
    }
}

extension LayerSpec {
    /// Whether `layers[index...]` starts a batch norm, ReLU, max pooling block that runs fused: the pooling's
    /// windows must not overlap, so that each input wins at most one.
    static func startsFusedBlock(_ layers: [LayerSpec], at index: Int) -> Bool {
        guard index + 2 < layers.count, layers[index].as(BatchNormKind.self) != nil, layers[index + 1] == .relu,
              let pool = layers[index + 2].as(MaxPool2dKind.self) else { return false }
        return pool.stride >= pool.kernel
    }

    /// The layers of one run-time layer each, in order: a fused block's three (`fusing`), any other layer alone.
    static func planRuns(_ layers: [LayerSpec], fusing: Bool) -> [Range<Int>] {
        var runs: [Range<Int>] = []
        var index = 0
        while index < layers.count {
            let length = fusing && startsFusedBlock(layers, at: index) ? 3 : 1
            runs.append(index..<(index + length))
            index += length
        }
        return runs
    }

    /// The workspace of a fused block over `shapes` (the batch norm's input, then each layer's output): the batch
    /// norm's and the pooling's, and each window's winning input.
    static func fusedBlockWorkspace(_ layers: ArraySlice<LayerSpec>, shapes: ArraySlice<[Int]>, batchCapacity rows: Double,
                                    scalarBytes: Double) -> LayerWorkspace {
        let (input, output) = (shapes[shapes.startIndex], shapes[shapes.endIndex - 1])
        let norm = layers[layers.startIndex].workspace(input: input, output: input, batchCapacity: rows, scalarBytes: scalarBytes)
        let pool = layers[layers.endIndex - 1].workspace(input: input, output: output, batchCapacity: rows,
                                                         scalarBytes: scalarBytes)
        let kept = rows * output.reduce(1.0) { $0 * Double($1) } * scalarBytes
        return (norm.bytes + pool.bytes + kept, max(norm.scratchElements, pool.scratchElements))
    }
}

/// sums[c] = sum of dy over the winners whose value passed the ReLU (dbeta), sums[C + c] = the same of dy xhat
/// (dgamma), from each window's kept winning input: what `featureGradientSums` finds over the batch norm's own dy.
@_specialize(where T == Float) @_specialize(where T == Double)
func pooledGradientSums<T: Scalar>(_ pool: BatchNormReLUPool<T>, samples: Int) {
    let bn = pool.statistics
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
func normalizeReLUPoolBackward<T: Scalar>(_ x: UnsafePointer<T>, _ dx: UnsafeMutablePointer<T>, block pool: BatchNormReLUPool<T>,
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
