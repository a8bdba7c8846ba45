/// The kernels of batch norm (BatchNorm.swift) and layer norm (LayerNorm.swift).

// MARK: - Kernels. Layout [B, F, S]: sample b, feature f, position s at (b F + f) S + s.

/// sums[f] = sum of x over the batch and positions of feature f; sums[F + f] = the same of x^2. In Double, with four
/// independent accumulators per sum: one accumulator made each addition wait for the last (BENCHMARKS.md,
/// "Measurements behind comments in the code").
/// Float runs of 16 values and more take `floatFeatureSums`.
@_specialize(where T == Float) @_specialize(where T == Double)
func featureSums<T: Scalar>(_ x: UnsafePointer<T>, samples: Int, features: Int, positions: Int,
                            into sums: UnsafeMutablePointer<Double>) {
    sums.update(repeating: 0, count: 2 * features)
    addFeatureSums(x, samples: samples, features: 0..<features, of: features, positions: positions, into: sums)
}

/// `featureSums` added into `sums` for the features `range` of F only, `x` at sample 0: what a convolution adds sample
/// by sample as it writes its output (`BatchNormStatistics.sumsArrived`). Each feature's sums take its samples in
/// order either way, so summing a batch in pieces of samples (and of features) gives the same sums, bit for bit.
@_specialize(where T == Float) @_specialize(where T == Double)
func addFeatureSums<T: Scalar>(_ x: UnsafePointer<T>, samples: Int, features range: Range<Int>, of features: Int,
                               positions: Int, into sums: UnsafeMutablePointer<Double>) {
    if T.self == Float.self && positions >= 16 {
        return floatFeatureSums(readingFloats(x), samples: samples, features: range, of: features, positions: positions,
                                into: sums)
    }
    for b in 0..<samples {
        for f in range {
            let run = x + (b * features + f) * positions
            var s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0, q0 = 0.0, q1 = 0.0, q2 = 0.0, q3 = 0.0
            var i = 0
            while i &+ 4 <= positions {
                let v0 = Double(run[i]), v1 = Double(run[i &+ 1]), v2 = Double(run[i &+ 2]), v3 = Double(run[i &+ 3])
                s0 += v0; s1 += v1; s2 += v2; s3 += v3
                q0 += v0 * v0; q1 += v1 * v1; q2 += v2 * v2; q3 += v3 * v3
                i &+= 4
            }
            while i < positions {
                let v = Double(run[i])
                s0 += v
                q0 += v * v
                i &+= 1
            }
            sums[f] += (s0 + s1) + (s2 + s3)
            sums[features + f] += (q0 + q1) + (q2 + q3)
        }
    }
}

/// `addFeatureSums` over Float images: each run of a feature's positions in one sample summed in Float vectors, as
/// d = x - x[0] (shifted by its first value, so that the squares do not cancel when the mean is far from 0), then
/// carried into the Double sums: sum x = sum d + n x0, sum x^2 = sum d^2 + 2 x0 sum d + n x0^2. Converting every
/// value to Double made this pass four times slower than reading its input (BENCHMARKS.md, "Measurements behind
/// comments in the code"); a run's Float sums hold about 50 values per lane, a relative error near 1e-7, which the
/// Float activations they sum carry already.
func floatFeatureSums(_ x: UnsafePointer<Float>, samples: Int, features range: Range<Int>, of features: Int,
                      positions: Int, into sums: UnsafeMutablePointer<Double>) {
    typealias V = SIMD8<Float>
    for b in 0..<samples {
        for f in range {
            let run = x + (b * features + f) * positions
            let origin = run[0], shift = V(repeating: origin)
            var s0 = V(), s1 = V(), q0 = V(), q1 = V()
            var i = 0
            while i &+ 16 <= positions {
                let d0 = UnsafeRawPointer(run + i).loadUnaligned(as: V.self) - shift
                let d1 = UnsafeRawPointer(run + (i &+ 8)).loadUnaligned(as: V.self) - shift
                s0 += d0; s1 += d1
                q0 += d0 * d0; q1 += d1 * d1
                i &+= 16
            }
            var s = Double((s0 + s1).sum()), q = Double((q0 + q1).sum())
            while i < positions {
                let d = Double(run[i]) - Double(origin)
                s += d
                q += d * d
                i &+= 1
            }
            let n = Double(positions), o = Double(origin)
            sums[f] += s + n * o
            sums[features + f] += q + 2 * o * s + n * o * o
        }
    }
}

/// y = x scale + shift, per feature (scale = gamma / sqrt(var + eps), shift = beta - mean scale).
@_specialize(where T == Float) @_specialize(where T == Double)
func normalizeFeatures<T: Scalar>(_ x: UnsafePointer<T>, _ y: UnsafeMutablePointer<T>, samples: Int, features: Int,
                                  positions: Int, scale: UnsafePointer<T>, shift: UnsafePointer<T>) {
    for b in 0..<samples {
        for f in 0..<features {
            let offset = (b * features + f) * positions
            let s = scale[f], h = shift[f]
            let run = x + offset, out = y + offset
            // A while loop with wrapping increments: `offset + i` checked for overflow kept this loop scalar.
            var i = 0
            while i < positions {
                out[i] = run[i] * s + h
                i &+= 1
            }
        }
    }
}

/// sums[f] = sum of dy (dbeta), sums[F + f] = sum of dy xhat (dgamma), with xhat recomputed from x.
@_specialize(where T == Float) @_specialize(where T == Double)
func featureGradientSums<T: Scalar>(_ x: UnsafePointer<T>, _ dy: UnsafePointer<T>, samples: Int, features: Int,
                                    positions: Int, mean: UnsafePointer<Double>, inverseDeviation: UnsafePointer<Double>,
                                    into sums: UnsafeMutablePointer<Double>) {
    if T.self == Float.self && positions >= 16 {
        return floatFeatureGradientSums(readingFloats(x), readingFloats(dy), samples: samples, features: features,
                                        positions: positions, mean: mean, inverseDeviation: inverseDeviation, into: sums)
    }
    sums.update(repeating: 0, count: 2 * features)
    for b in 0..<samples {
        for f in 0..<features {
            let offset = (b * features + f) * positions
            let g = dy + offset, v = x + offset
            let m = mean[f]
            // sum dy xhat = r sum dy (x - m): the deviation's factor taken out of the loop. Four accumulators each.
            var s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0, t0 = 0.0, t1 = 0.0, t2 = 0.0, t3 = 0.0
            var i = 0
            while i &+ 4 <= positions {
                let g0 = Double(g[i]), g1 = Double(g[i &+ 1]), g2 = Double(g[i &+ 2]), g3 = Double(g[i &+ 3])
                s0 += g0; s1 += g1; s2 += g2; s3 += g3
                t0 += g0 * (Double(v[i]) - m); t1 += g1 * (Double(v[i &+ 1]) - m)
                t2 += g2 * (Double(v[i &+ 2]) - m); t3 += g3 * (Double(v[i &+ 3]) - m)
                i &+= 4
            }
            while i < positions {
                let g0 = Double(g[i])
                s0 += g0
                t0 += g0 * (Double(v[i]) - m)
                i &+= 1
            }
            sums[f] += (s0 + s1) + (s2 + s3)
            sums[features + f] += ((t0 + t1) + (t2 + t3)) * inverseDeviation[f]
        }
    }
}

/// `featureGradientSums` for Float planes of 16 values or more, the way `floatFeatureSums` takes its sums: each
/// plane's in Float vectors, x - mean formed first in Float, then carried into the Double sums. Converting every value
/// to Double kept the loop scalar, 2% of the ResNet's step; a plane's Float sums hold at most a few dozen values per
/// lane (49 to 196 positions), a relative error near 1e-7, which the Float dy they sum carries already.
func floatFeatureGradientSums(_ x: UnsafePointer<Float>, _ dy: UnsafePointer<Float>, samples: Int, features: Int,
                              positions: Int, mean: UnsafePointer<Double>, inverseDeviation: UnsafePointer<Double>,
                              into sums: UnsafeMutablePointer<Double>) {
    typealias V = SIMD8<Float>
    sums.update(repeating: 0, count: 2 * features)
    for b in 0..<samples {
        for f in 0..<features {
            let offset = (b * features + f) * positions
            let g = dy + offset, v = x + offset
            let m = Float(mean[f]), center = V(repeating: m)
            var s0 = V(), s1 = V(), t0 = V(), t1 = V()
            var i = 0
            while i &+ 16 <= positions {
                let g0 = UnsafeRawPointer(g + i).loadUnaligned(as: V.self)
                let g1 = UnsafeRawPointer(g + (i &+ 8)).loadUnaligned(as: V.self)
                s0 += g0; s1 += g1
                t0 += g0 * (UnsafeRawPointer(v + i).loadUnaligned(as: V.self) - center)
                t1 += g1 * (UnsafeRawPointer(v + (i &+ 8)).loadUnaligned(as: V.self) - center)
                i &+= 16
            }
            var s = Double((s0 + s1).sum()), t = Double((t0 + t1).sum())
            while i < positions {
                let g0 = Double(g[i])
                s += g0
                t += g0 * Double(v[i] - m)
                i &+= 1
            }
            sums[f] += s
            sums[features + f] += t * inverseDeviation[f]
        }
    }
}

/// Batch norm's input gradient, per feature f, as dx = a dy + k (x - center) + c: with the reductions,
/// a = gamma r, k = -a r sums[F + f] / count and c = -a sums[f] / count (r = 1 / sqrt(var + eps), center the mean);
/// with `sums` nil (running statistics) k = c = 0. The factors in Double, the loops in T: converting every value to
/// Double and back kept them scalar (see BENCHMARKS.md, "Measurements behind comments in the code"). x - center is
/// formed first, so no large terms cancel in T.
struct GradientFactors<T: Scalar> {
    let mean: UnsafePointer<Double>, inverseDeviation: UnsafePointer<Double>, gamma: UnsafePointer<T>
    let sums: UnsafePointer<Double>?, count: Double

    init(mean: UnsafePointer<Double>, inverseDeviation: UnsafePointer<Double>, gamma: UnsafePointer<T>,
         sums: UnsafePointer<Double>?, count: Double) {
        (self.mean, self.inverseDeviation, self.gamma) = (mean, inverseDeviation, gamma)
        (self.sums, self.count) = (sums, count)
    }

    /// (a, k, c, center) for feature f of `features`.
    @inline(__always)
    func callAsFunction(_ f: Int, features: Int) -> (a: T, k: T, c: T, center: T) {
        let r = inverseDeviation[f], scale = Double(gamma[f]) * r
        let meanGradient = sums.map { $0[f] / count } ?? 0
        let varianceGradient = sums.map { $0[features + f] / count } ?? 0
        return (T(scale), T(-scale * r * varianceGradient), T(-scale * meanGradient), T(mean[f]))
    }
}

/// dx = a dy + k (x - center) + c per feature (`GradientFactors`).
@_specialize(where T == Float) @_specialize(where T == Double)
func normalizeBackward<T: Scalar>(_ x: UnsafePointer<T>, _ dy: UnsafePointer<T>, _ dx: UnsafeMutablePointer<T>,
                                  samples: Int, features: Int, positions: Int, factors: GradientFactors<T>) {
    for b in 0..<samples {
        for f in 0..<features {
            let offset = (b * features + f) * positions
            let (a, k, c, center) = factors(f, features: features)
            let v = x + offset, g = dy + offset, out = dx + offset
            var i = 0
            while i < positions {
                out[i] = a * g[i] + k * (v[i] - center) + c
                i &+= 1
            }
        }
    }
}

/// Each run of `length` values normalised by its own mean and deviation (saved), then y = gamma xhat + beta.
@_specialize(where T == Float) @_specialize(where T == Double)
func layerNormForward<T: Scalar>(_ x: UnsafePointer<T>, _ y: UnsafeMutablePointer<T>, runs: Int, length: Int,
                                 mean: UnsafeMutablePointer<Double>, inverseDeviation: UnsafeMutablePointer<Double>,
                                 gamma: UnsafePointer<T>, beta: UnsafePointer<T>) {
    for r in 0..<runs {
        let run = x + r * length, out = y + r * length
        var s = 0.0
        for i in 0..<length { s += Double(run[i]) }
        let m = s / Double(length)
        var v = 0.0
        for i in 0..<length {
            let d = Double(run[i]) - m
            v += d * d
        }
        let inverse = 1 / (v / Double(length) + 1e-5).squareRoot()
        mean[r] = m
        inverseDeviation[r] = inverse
        for i in 0..<length { out[i] = T((Double(run[i]) - m) * inverse * Double(gamma[i]) + Double(beta[i])) }
    }
}

/// dgamma[i] (+)= sum over runs of dy xhat; dbeta[i] (+)= sum of dy. `gradients` holds dgamma then dbeta.
@_specialize(where T == Float) @_specialize(where T == Double)
func layerNormParameterGradients<T: Scalar>(_ x: UnsafePointer<T>, _ dy: UnsafePointer<T>, runs: Int, length: Int,
                                            mean: UnsafePointer<Double>, inverseDeviation: UnsafePointer<Double>,
                                            into gradients: UnsafeMutablePointer<T>, accumulate: Bool) {
    if !accumulate { gradients.update(repeating: 0, count: 2 * length) }
    for r in 0..<runs {
        let run = x + r * length, upstream = dy + r * length
        let m = mean[r], inverse = inverseDeviation[r]
        for i in 0..<length {
            gradients[i] += T(Double(upstream[i]) * (Double(run[i]) - m) * inverse)
            gradients[length + i] += upstream[i]
        }
    }
}

/// dx = inverseDeviation (dxhat - mean(dxhat) - xhat mean(dxhat xhat)), dxhat = dy gamma, per run.
@_specialize(where T == Float) @_specialize(where T == Double)
func layerNormBackward<T: Scalar>(_ x: UnsafePointer<T>, _ dy: UnsafePointer<T>, _ dx: UnsafeMutablePointer<T>,
                                  runs: Int, length: Int, mean: UnsafePointer<Double>,
                                  inverseDeviation: UnsafePointer<Double>, gamma: UnsafePointer<T>) {
    for r in 0..<runs {
        let run = x + r * length, upstream = dy + r * length, out = dx + r * length
        let m = mean[r], inverse = inverseDeviation[r]
        var sum = 0.0, sumXhat = 0.0
        for i in 0..<length {
            let g = Double(upstream[i]) * Double(gamma[i])
            sum += g
            sumXhat += g * (Double(run[i]) - m) * inverse
        }
        let n = Double(length)
        for i in 0..<length {
            let xhat = (Double(run[i]) - m) * inverse
            let g = Double(upstream[i]) * Double(gamma[i])
            out[i] = T(inverse * (g - sum / n - xhat * sumXhat / n))
        }
    }
}
