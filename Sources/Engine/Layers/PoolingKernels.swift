/// The kernels of pooling over image samples [C, H, W]: max (MaxPool2d.swift), mean (AvgPool2d.swift) and the mean
/// of each whole channel (GlobalAvgPool2d.swift). No padding; windows that do not fit are dropped (ceil_mode=False).
/// Specialised loops; the layers only call them.

/// What a max pooling fused with the batch norm and ReLU before it needs (BatchNormReLUPool.swift): the batch norm's
/// input, its per-channel y = x scale + shift, and where to keep each window's winning input.
struct PoolNormalization<T: Scalar> {
    let x: UnsafePointer<T>, scale: UnsafePointer<T>, shift: UnsafePointer<T>
    let winningInputs: UnsafeMutablePointer<T>

    init(x: UnsafePointer<T>, scale: UnsafePointer<T>, shift: UnsafePointer<T>, winningInputs: UnsafeMutablePointer<T>) {
        (self.x, self.scale, self.shift, self.winningInputs) = (x, scale, shift, winningInputs)
    }
}

/// Max pooling of `samples` samples [C, H, W] -> [C, Ho, Wo], recording each window's winner (its index within the
/// sample). With `normalization` each input is first normalised and rectified, z = max(x scale + shift, 0), as the
/// batch norm and ReLU before would have written it, and the winner's x is kept. The comparisons are selects, not
/// branches, on Int indices (converted once per window): the first version compared through Int32 conversions,
/// checked for overflow at every element, and was a large part of a CNN step (BENCHMARKS.md, "Measurements behind
/// comments in the code"). The 2x2 window of stride 2 has a kernel of its own (`maxPool2x2`).
@_specialize(where T == Float) @_specialize(where T == Double)
func maxPoolForward<T: Scalar>(_ x: UnsafePointer<T>, _ y: UnsafeMutablePointer<T>, winners: UnsafeMutablePointer<Int32>,
                               samples: Int, channels: Int, height: Int, width: Int, kernel: Int, stride: Int,
                               outHeight: Int, outWidth: Int, normalization: PoolNormalization<T>? = nil) {
    let inPlane = height * width, outPlane = outHeight * outWidth
    if kernel == 2 && stride == 2 && outWidth >= 4, T.self == Float.self {
        return maxPool2x2(readingFloats(x), floats(y), winners: winners, planes: samples * channels, channels: channels,
                          width: width, inPlane: inPlane, outHeight: outHeight, outWidth: outWidth,
                          normalization: normalization.map {
                              PoolNormalization(x: readingFloats($0.x), scale: readingFloats($0.scale), shift: readingFloats($0.shift),
                                                winningInputs: floats($0.winningInputs))
                          })
    }
    let fused = normalization != nil
    for n in 0..<(samples * channels) {
        let input = x + n * inPlane, output = y + n * outPlane, won = winners + n * outPlane
        let c = n % channels, base = c * inPlane
        let s: T = fused ? normalization!.scale[c] : 1, h: T = fused ? normalization!.shift[c] : 0
        for i in 0..<outHeight {
            for j in 0..<outWidth {
                let corner = i * stride * width + j * stride
                var best = input[corner], bestInput = best
                if fused { best = rectified(best * s + h) }
                var winner = corner
                for p in 0..<kernel {
                    for q in 0..<kernel {
                        let at = corner &+ p &* width &+ q
                        let v = input[at]
                        let z = fused ? rectified(v * s + h) : v
                        let better = z > best
                        best = better ? z : best
                        bestInput = better ? v : bestInput
                        winner = better ? at : winner
                    }
                }
                output[i * outWidth + j] = best
                won[i * outWidth + j] = Int32(truncatingIfNeeded: base &+ winner)
                if fused { normalization!.winningInputs[n * outPlane + i * outWidth + j] = bestInput }
            }
        }
    }
}

/// max(z, 0) as ReLU computes it (`0 >= z ? 0 : z`: NaN stays NaN, -0 becomes +0).
@inline(__always) func rectified<T: Scalar>(_ z: T) -> T { 0 >= z ? 0 : z }

/// The 2x2 window of stride 2 in Float, by far the most common, for rows of at least 4 outputs: four outputs at a
/// time, their two input rows loaded as 8 values each and split into even and odd columns, the window's four values
/// compared in row-major order (so the first largest still wins a tie) with vector selects. A row's last group
/// overlaps the one before instead of falling back to a scalar loop, whose selects compiled to branches that random
/// activations mispredict (ten times slower; see BENCHMARKS.md, "Measurements behind comments in the code"). Float only:
/// generic SIMD code compiled its masks lane by lane; Double (the gradient checker) takes the general loop.
func maxPool2x2(_ x: UnsafePointer<Float>, _ y: UnsafeMutablePointer<Float>, winners: UnsafeMutablePointer<Int32>,
                planes: Int, channels: Int, width: Int, inPlane: Int, outHeight: Int, outWidth: Int,
                normalization: PoolNormalization<Float>?) {
    typealias Row = SIMD8<Float>
    typealias Four = SIMD4<Float>
    typealias Indices = SIMD4<Int32>
    precondition(outWidth >= 4 && 2 * outWidth <= width)
    let outPlane = outHeight * outWidth
    let zero = Row(repeating: 0)
    let columns = Indices(0, 2, 4, 6), one = Indices(repeating: 1)
    let below = Indices(repeating: Int32(truncatingIfNeeded: width)), belowRight = below &+ one
    for n in 0..<planes {
        let input = x + n * inPlane, output = y + n * outPlane, won = winners + n * outPlane
        let c = n % channels, base = c * inPlane
        let s: Float = normalization?.scale[c] ?? 1, h: Float = normalization?.shift[c] ?? 0
        let kept = normalization.map { $0.winningInputs + n * outPlane }
        // Fused with a positive scale, x scale + shift and the ReLU never reverse two inputs' order (rounding is
        // monotone): the largest input wins and only it is normalised, a third of the work. The outputs are the
        // same; a winner can differ only where two inputs round to one normalised value, or all four are
        // rectified to 0 (where no gradient passes).
        let increasing = kept != nil && s > 0
        let s4 = Four(repeating: s), h4 = Four(repeating: h), zero4 = Four(repeating: 0)
        var i = 0
        while i < outHeight {
            let top = 2 &* i &* width
            let upper = UnsafeRawPointer(input + top), lower = UnsafeRawPointer(input + top + width)
            let row = i &* outWidth
            var j = 0
            while j < outWidth {
                let start = Swift.min(j, outWidth &- 4), q = 2 &* start
                let rawUpper = upper.loadUnaligned(fromByteOffset: q &* 4, as: Row.self)
                let rawLower = lower.loadUnaligned(fromByteOffset: q &* 4, as: Row.self)
                var zu = rawUpper, zl = rawLower
                if kept != nil && !increasing {
                    // What the batch norm and the ReLU would have written: 0 >= z ? 0 : z, as `rectified`.
                    zu = zu * s + h
                    zu = zu.replacing(with: zero, where: zero .>= zu)
                    zl = zl * s + h
                    zl = zl.replacing(with: zero, where: zero .>= zl)
                }
                var best: Four = zu.evenHalf, winner: Four = rawUpper.evenHalf
                var at = Indices(repeating: 0)
                var better = zu.oddHalf .> best
                best = best.replacing(with: zu.oddHalf, where: better)
                if !increasing { winner = winner.replacing(with: rawUpper.oddHalf, where: better) }
                at = at.replacing(with: one, where: better)
                better = zl.evenHalf .> best
                best = best.replacing(with: zl.evenHalf, where: better)
                if !increasing { winner = winner.replacing(with: rawLower.evenHalf, where: better) }
                at = at.replacing(with: below, where: better)
                better = zl.oddHalf .> best
                best = best.replacing(with: zl.oddHalf, where: better)
                if !increasing { winner = winner.replacing(with: rawLower.oddHalf, where: better) }
                at = at.replacing(with: belowRight, where: better)
                if increasing {
                    // The largest input won; normalised and rectified, it is the largest output.
                    winner = best
                    best = best * s4 + h4
                    best = best.replacing(with: zero4, where: zero4 .>= best)
                }
                UnsafeMutableRawPointer(output + row + start).storeBytes(of: best, as: Four.self)
                let corner = Indices(repeating: Int32(truncatingIfNeeded: base &+ top &+ q))
                UnsafeMutableRawPointer(won + row + start).storeBytes(of: corner &+ columns &+ at, as: Indices.self)
                if let kept { UnsafeMutableRawPointer(kept + row + start).storeBytes(of: winner, as: Four.self) }
                j = start &+ 4
            }
            i &+= 1
        }
    }
}

/// The kink pattern of max pooling over `samples` samples [C, H, W] of x: for each window, the first of its inputs
/// within `poolTieTolerance` (relative) of the window's largest. With `normalization` (a fused batch norm and ReLU
/// before the pooling) the inputs are compared as the pooling compared them, max(x scale + shift, 0), and a window
/// whose output y the ReLU stops, which no gradient reaches, is -1.
///
/// The winner the forward pass recorded is not the pattern: where two inputs are the same function of the
/// parameters (a window of background, computed at two positions of a Winograd tile), rounding alone orders them,
/// and any step reorders them. On fashion-cnn every coordinate of the first layers, and every random direction,
/// crossed such a "kink", so the gradient check compared none of them. Taking the first input within the tolerance
/// gives both the same winner. A real kink is still seen: at a distance eps from a crossing the two inputs differ
/// by about eps times the difference of their slopes, far above the tolerance. One that is not seen is one whose
/// inputs stay within the tolerance on both sides, which moves the difference quotient by at most the tolerance
/// over eps times the pooled value's gradient: 1e-12 / 1e-4, far below the check's pass threshold.
@_specialize(where T == Float) @_specialize(where T == Double)
func appendPoolKinkPattern<T: Scalar>(_ x: UnsafePointer<T>, samples: Int, channels: Int, height: Int, width: Int,
                                      kernel: Int, stride: Int, outHeight: Int, outWidth: Int,
                                      normalization: (scale: UnsafePointer<T>, shift: UnsafePointer<T>, y: UnsafePointer<T>)?,
                                      to pattern: inout [Int32]) {
    let tolerance = T(poolTieTolerance), fused = normalization != nil
    pattern.reserveCapacity(pattern.count + samples * channels * outHeight * outWidth)
    for n in 0..<(samples * channels) {
        let plane = x + n * height * width, c = n % channels
        let s: T = fused ? normalization!.scale[c] : 1, h: T = fused ? normalization!.shift[c] : 0
        @inline(__always) func value(_ q: Int) -> T { fused ? rectified(plane[q] * s + h) : plane[q] }
        for i in 0..<outHeight {
            for j in 0..<outWidth {
                if fused && !(normalization!.y[(n * outHeight + i) * outWidth + j] > 0) { pattern.append(-1); continue }
                let corner = i * stride * width + j * stride
                var largest = value(corner)
                for r in 0..<kernel {
                    for q in 0..<kernel { largest = max(largest, value(corner + r * width + q)) }
                }
                let bar = largest - tolerance * abs(largest)
                var first = corner
                search: for r in 0..<kernel {
                    for q in 0..<kernel where value(corner + r * width + q) >= bar {
                        first = corner + r * width + q
                        break search
                    }
                }
                pattern.append(Int32(first))
            }
        }
    }
}

/// How close, relative to the window's largest input, another input must be to tie with it in the kink pattern
/// (`appendPoolKinkPattern`): well above float64 rounding after a Winograd transform (about 1e-14), well below
/// what a step of eps = 1e-4 moves two different inputs apart.
let poolTieTolerance = 1e-12

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
