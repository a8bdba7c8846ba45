/// Pooling over image samples [C, H, W]: max (PyTorch `nn.MaxPool2d`), mean (`nn.AvgPool2d`) and the mean of each
/// whole channel (`nn.AdaptiveAvgPool2d(1)`). No padding; windows that do not fit are dropped (ceil_mode=False).
/// The loops are specialised kernels below; the layers only call them.

/// y[c, i, j] = the largest x[c, i s + p, j s + q] over the window; the first largest wins a tie, as in PyTorch.
/// Backward routes each dy to the input that won its window (`winners`, kept from the last forward pass). Which
/// input wins is the gradient checker's kink: a perturbation that changes a winner straddles one.
final class MaxPool2d<T: Scalar>: Layer<T> {
    let kernel: Int, stride: Int
    /// For each output value of the last forward pass, the index within its sample of the input that won.
    private let winners: UnsafeMutablePointer<Int32>

    required init(index: Int, spec: LayerSpec, inputShape: [Int], outputShape: [Int], batchCapacity: Int) {
        guard case let .maxPool2d(k, s) = spec else { preconditionFailure("MaxPool2d made from \(spec)") }
        (kernel, stride) = (k, s)
        let elements = batchCapacity * outputShape.reduce(1, *)
        winners = .allocate(capacity: elements)
        winners.initialize(repeating: 0, count: elements)
        super.init(index: index, spec: spec, inputShape: inputShape, outputShape: outputShape, batchCapacity: batchCapacity)
    }

    deinit { winners.deallocate() }


    override func forward(count: Int, mode: ForwardMode) {
        maxPoolForward(x, y, winners: winners, samples: count, channels: inputShape[0], height: inputShape[1],
                       width: inputShape[2], kernel: kernel, stride: stride, outHeight: outputShape[1], outWidth: outputShape[2])
    }

    override func backwardInput(count: Int, accumulate: Bool) {
        guard let dx else { return }
        maxPoolBackward(dy, winners: winners, into: dx, samples: count, inputCount: inputCount, outputCount: outputCount)
    }

    override func appendKinkPattern(count: Int, to pattern: inout [Int32]) {
        pattern.append(contentsOf: UnsafeBufferPointer(start: winners, count: count * outputCount))
    }
}

/// y[c, i, j] = the mean of x[c, i s + p, j s + q] over the window; backward spreads dy / k^2 over it.
final class AvgPool2d<T: Scalar>: Layer<T> {
    let kernel: Int, stride: Int

    required init(index: Int, spec: LayerSpec, inputShape: [Int], outputShape: [Int], batchCapacity: Int) {
        guard case let .avgPool2d(k, s) = spec else { preconditionFailure("AvgPool2d made from \(spec)") }
        (kernel, stride) = (k, s)
        super.init(index: index, spec: spec, inputShape: inputShape, outputShape: outputShape, batchCapacity: batchCapacity)
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

// MARK: - Kernels

/// Max pooling of `samples` samples [C, H, W] -> [C, Ho, Wo], recording each window's winner (its index within the
/// sample). The comparisons are selects, not branches, on Int indices (converted once per window): the first version
/// compared through Int32 conversions, checked for overflow at every element, and took 9 ms of a 74 ms CNN step.
/// The 2x2 window of stride 2 has a kernel of its own (`maxPool2x2`).
@_specialize(where T == Float) @_specialize(where T == Double)
func maxPoolForward<T: Scalar>(_ x: UnsafePointer<T>, _ y: UnsafeMutablePointer<T>, winners: UnsafeMutablePointer<Int32>,
                               samples: Int, channels: Int, height: Int, width: Int, kernel: Int, stride: Int,
                               outHeight: Int, outWidth: Int) {
    let inPlane = height * width, outPlane = outHeight * outWidth
    if kernel == 2 && stride == 2 {
        return maxPool2x2(x, y, winners: winners, planes: samples * channels, channels: channels, width: width,
                          inPlane: inPlane, outHeight: outHeight, outWidth: outWidth)
    }
    for n in 0..<(samples * channels) {
        let input = x + n * inPlane, output = y + n * outPlane, won = winners + n * outPlane
        let base = (n % channels) * inPlane
        for i in 0..<outHeight {
            for j in 0..<outWidth {
                let corner = i * stride * width + j * stride
                var best = input[corner]
                var winner = corner
                for p in 0..<kernel {
                    for q in 0..<kernel {
                        let at = corner &+ p &* width &+ q
                        let v = input[at]
                        let better = v > best
                        best = better ? v : best
                        winner = better ? at : winner
                    }
                }
                output[i * outWidth + j] = best
                won[i * outWidth + j] = Int32(truncatingIfNeeded: base &+ winner)
            }
        }
    }
}

/// The 2x2 window of stride 2, by far the most common: two input rows side by side, the window's four values
/// compared in row-major order (so the first largest still wins a tie) with selects, and the arithmetic wrapping.
/// The general loop spent about 50 instructions on each output (callgrind), this one about 25.
@_specialize(where T == Float) @_specialize(where T == Double)
func maxPool2x2<T: Scalar>(_ x: UnsafePointer<T>, _ y: UnsafeMutablePointer<T>, winners: UnsafeMutablePointer<Int32>,
                           planes: Int, channels: Int, width: Int, inPlane: Int, outHeight: Int, outWidth: Int) {
    let outPlane = outHeight * outWidth
    for n in 0..<planes {
        let input = x + n * inPlane, output = y + n * outPlane, won = winners + n * outPlane
        let base = (n % channels) * inPlane
        for i in 0..<outHeight {
            let top = 2 * i * width
            let upper = input + top, lower = upper + width
            let out = output + i * outWidth, winner = won + i * outWidth
            var j = 0
            while j < outWidth {
                let q = j &* 2
                let va = upper[q], vb = upper[q &+ 1], vc = lower[q], vd = lower[q &+ 1]
                var best = va, at = 0
                var better = vb > best
                best = better ? vb : best
                at = better ? 1 : at
                better = vc > best
                best = better ? vc : best
                at = better ? width : at
                better = vd > best
                best = better ? vd : best
                at = better ? width &+ 1 : at
                out[j] = best
                winner[j] = Int32(truncatingIfNeeded: base &+ top &+ q &+ at)
                j &+= 1
            }
        }
    }
}

/// dx = 0, then dx[winner] += dy for every output value.
@_specialize(where T == Float) @_specialize(where T == Double)
func maxPoolBackward<T: Scalar>(_ dy: UnsafePointer<T>, winners: UnsafePointer<Int32>, into dx: UnsafeMutablePointer<T>,
                                samples: Int, inputCount: Int, outputCount: Int) {
    dx.update(repeating: 0, count: samples * inputCount)
    for b in 0..<samples {
        let gradient = dx + b * inputCount, upstream = dy + b * outputCount, won = winners + b * outputCount
        for o in 0..<outputCount { gradient[Int(won[o])] += upstream[o] }
    }
}

/// Mean pooling of `samples` samples [C, H, W] -> [C, Ho, Wo].
@_specialize(where T == Float) @_specialize(where T == Double)
func avgPoolForward<T: Scalar>(_ x: UnsafePointer<T>, _ y: UnsafeMutablePointer<T>, samples: Int, channels: Int,
                               height: Int, width: Int, kernel: Int, stride: Int, outHeight: Int, outWidth: Int) {
    let inPlane = height * width, outPlane = outHeight * outWidth
    let scale = 1 / T(kernel * kernel)
    for n in 0..<(samples * channels) {
        let input = x + n * inPlane, output = y + n * outPlane
        for i in 0..<outHeight {
            for j in 0..<outWidth {
                let corner = input + i * stride * width + j * stride
                var sum: T = 0
                for p in 0..<kernel {
                    for q in 0..<kernel { sum += corner[p * width + q] }
                }
                output[i * outWidth + j] = sum * scale
            }
        }
    }
}

/// dx = 0, then dy / k^2 added over each window.
@_specialize(where T == Float) @_specialize(where T == Double)
func avgPoolBackward<T: Scalar>(_ dy: UnsafePointer<T>, into dx: UnsafeMutablePointer<T>, samples: Int, channels: Int,
                                height: Int, width: Int, kernel: Int, stride: Int, outHeight: Int, outWidth: Int) {
    let inPlane = height * width, outPlane = outHeight * outWidth
    let scale = 1 / T(kernel * kernel)
    dx.update(repeating: 0, count: samples * channels * inPlane)
    for n in 0..<(samples * channels) {
        let gradient = dx + n * inPlane, upstream = dy + n * outPlane
        for i in 0..<outHeight {
            for j in 0..<outWidth {
                let share = upstream[i * outWidth + j] * scale
                let corner = gradient + i * stride * width + j * stride
                for p in 0..<kernel {
                    for q in 0..<kernel { corner[p * width + q] += share }
                }
            }
        }
    }
}

/// y[n] = the mean of the n-th plane of `size` values.
@_specialize(where T == Float) @_specialize(where T == Double)
func planeMeans<T: Scalar>(_ x: UnsafePointer<T>, _ y: UnsafeMutablePointer<T>, planes: Int, size: Int) {
    let scale = 1 / T(size)
    for n in 0..<planes {
        let plane = x + n * size
        var sum: T = 0
        for i in 0..<size { sum += plane[i] }
        y[n] = sum * scale
    }
}

/// dx[n, i] = dy[n] / size.
@_specialize(where T == Float) @_specialize(where T == Double)
func planeMeansBackward<T: Scalar>(_ dy: UnsafePointer<T>, into dx: UnsafeMutablePointer<T>, planes: Int, size: Int) {
    let scale = 1 / T(size)
    for n in 0..<planes { (dx + n * size).update(repeating: dy[n] * scale, count: size) }
}
