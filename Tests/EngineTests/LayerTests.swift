import Engine
import Foundation
import Testing

@Suite("Layers and losses against hand-computed values")
struct LayerTests {
    // W = [[1, 2], [3, 4], [5, 6]], b = [0.5, -1, 2], x = [[1, -1], [2, 0.5]]
    // y = x W^T + b = [[-0.5, -2, 1], [3.5, 7, 15]]
    func denseForwardBackward<T: Scalar>(_: T.Type) throws {
        let model = try Model<T>(spec: ModelSpec(layers: [.linear(inputs: 2, outputs: 3)], loss: .meanSquaredError),
                                 batchCapacity: 2)
        setTensor(model, "0.weight", [1, 2, 3, 4, 5, 6])
        setTensor(model, "0.bias", [0.5, -1, 2])
        for (i, v) in [1.0, -1, 2, 0.5].enumerated() { model.inputs[i] = T(v) }
        model.targetsFromLabels = false
        model.targets.update(repeating: 0, count: 6)
        let result = model.forward(count: 2, mode: .train)
        let y = (0..<6).map { Double(model.outputs[$0]) }
        #expect(allClose(y, [-0.5, -2, 1, 3.5, 7, 15], tolerance(T.self)))
        // MSE with zero targets: loss = sum y^2 / 6
        #expect(close(result.loss, 291.5 / 6, tolerance(T.self)))

        model.zeroGradients()
        model.backward(count: 2)
        // dy = 2 y / 6 = [[-1/6, -2/3, 1/3], [7/6, 7/3, 5]]; dW = dy^T x; db = column sums of dy
        let dy = [[-1.0 / 6, -2.0 / 3, 1.0 / 3], [7.0 / 6, 7.0 / 3, 5]]
        let x = [[1.0, -1], [2, 0.5]]
        var dW: [Double] = []
        for j in 0..<3 { for k in 0..<2 { dW.append(dy[0][j] * x[0][k] + dy[1][j] * x[1][k]) } }
        #expect(allClose(tensorValues(model, "0.weight", in: model.gradients), dW, tolerance(T.self)))
        #expect(allClose(tensorValues(model, "0.bias", in: model.gradients), [1, 5.0 / 3, 16.0 / 3], tolerance(T.self)))
        // Backward accumulates: a second backward doubles the gradient.
        model.backward(count: 2)
        #expect(allClose(tensorValues(model, "0.bias", in: model.gradients), [2, 10.0 / 3, 32.0 / 3], tolerance(T.self)))
    }

    @Test func denseFloat() throws { try denseForwardBackward(Float.self) }
    @Test func denseDouble() throws { try denseForwardBackward(Double.self) }

    /// A linear layer with identity weights and no bias: its outputs, the loss's logits, are its inputs `logits`
    /// (rows of 3), with `labels`.
    func logitsModel<T: Scalar>(_: T.Type, _ logits: [Double], labels: [Int32], labelSmoothing: Double = 0) throws -> Model<T> {
        let spec = ModelSpec(layers: [.linear(inputs: 3, outputs: 3)], labelSmoothing: labelSmoothing)
        let model = try Model<T>(spec: spec, batchCapacity: labels.count)
        setTensor(model, "0.weight", [1, 0, 0, 0, 1, 0, 0, 0, 1])
        setTensor(model, "0.bias", [0, 0, 0])
        for (i, v) in logits.enumerated() { model.inputs[i] = T(v) }
        for (i, label) in labels.enumerated() { model.labels[i] = label }
        return model
    }

    func crossEntropy<T: Scalar>(_: T.Type) throws {
        // One linear layer with identity weights passes the logits [1, 2, 3] through.
        let model = try logitsModel(T.self, [1, 2, 3], labels: [2])
        let result = model.forward(count: 1, mode: .train)
        // log(e + e^2 + e^3) - 3
        #expect(close(result.loss, 0.40760596444438013, tolerance(T.self)))
        #expect(result.correct == 1)
        model.zeroGradients()
        model.backward(count: 1)
        // d loss / d logits = softmax - onehot, and with identity W, dW = (softmax - onehot) x^T
        let softmax = [0.09003057317038046, 0.24472847105479764, 0.6652409557748219]
        let db = tensorValues(model, "0.bias", in: model.gradients)
        #expect(allClose(db, [softmax[0], softmax[1], softmax[2] - 1], tolerance(T.self)))
    }

    /// Label smoothing s against the definition: loss = -sum_j t_j log softmax(z)_j with t = (1 - s) onehot + s / C,
    /// and d loss / d z = softmax(z) - t (the kernel computes the loss through a rearranged sum).
    func crossEntropyWithLabelSmoothing<T: Scalar>(_: T.Type) throws {
        let logits = [1.0, 2, 3, 0.5, -2, 4]
        let labels: [Int32] = [2, 0]
        let s = 0.1
        let model = try logitsModel(T.self, logits, labels: labels, labelSmoothing: s)
        var expectedLoss = 0.0
        var expectedBiasGradient = [0.0, 0, 0]
        for row in 0..<2 {
            let z = Array(logits[(3 * row)..<(3 * row + 3)])
            let exps = z.map { Foundation.exp($0) }
            let probabilities = exps.map { $0 / exps.reduce(0, +) }
            for j in 0..<3 {
                let target = (j == Int(labels[row]) ? 1 - s : 0) + s / 3
                expectedLoss -= target * Foundation.log(probabilities[j]) / 2
                expectedBiasGradient[j] += (probabilities[j] - target) / 2
            }
        }
        let result = model.forward(count: 2, mode: .train)
        #expect(close(result.loss, expectedLoss, tolerance(T.self)))
        #expect(result.correct == 1)
        model.zeroGradients()
        model.backward(count: 2)
        #expect(allClose(tensorValues(model, "0.bias", in: model.gradients), expectedBiasGradient, tolerance(T.self)))
    }

    @Test func crossEntropyWithLabelSmoothingFloat() throws { try crossEntropyWithLabelSmoothing(Float.self) }
    @Test func crossEntropyWithLabelSmoothingDouble() throws { try crossEntropyWithLabelSmoothing(Double.self) }

    @Test func labelSmoothingOutOfRangeOrWithMSEIsRefused() {
        for s in [-0.1, 1, 1.5, .nan] {
            #expect(throws: ModelSpecError.self) {
                try ModelSpec(layers: [.linear(inputs: 3, outputs: 3)], labelSmoothing: s).validate()
            }
        }
        #expect(throws: ModelSpecError("label smoothing applies to cross_entropy only, the loss is mse")) {
            try ModelSpec(layers: [.linear(inputs: 3, outputs: 3)], loss: .meanSquaredError, labelSmoothing: 0.1).validate()
        }
    }

    @Test func crossEntropyFloat() throws { try crossEntropy(Float.self) }
    @Test func crossEntropyDouble() throws { try crossEntropy(Double.self) }

    /// Logits whose sum overflows Float while each loss term stays finite: without smoothing the sum must not reach
    /// the loss (0 times infinity would make it NaN).
    @Test func crossEntropyWithoutSmoothingIgnoresAnOverflowingLogitSum() throws {
        let model = try logitsModel(Float.self, [3e38, 3e38, 2.9e38], labels: [0])
        let result = model.forward(count: 1, mode: .train)
        // log 2 is below the rounding of 3e38 in Float: the loss is as finite as plain cross-entropy's, 0 here.
        #expect(result.lossSum == 0, "\(result.lossSum)")
    }

    @Test func crossEntropyIsStableForHugeLogits() throws {
        // Labels 0 (loss ~ e^-1000 = 0) and 2 (loss = 2000).
        let model = try logitsModel(Float.self, [1000, 0, -1000, 1000, 0, -1000], labels: [0, 2])
        let result = model.forward(count: 2, mode: .train)
        #expect(result.lossSum == 2000)
        model.zeroGradients()
        model.backward(count: 2)
        #expect(nonFiniteCount(model.gradients.baseAddress!, model.parameterCount) == 0)
        #expect(result.correct == 1)
    }

    func countsNonFinite<T: Scalar>(_: T.Type) {
        // Lengths around the vector width, non-finite values at the start, in the middle and in the scalar tail.
        for n in [1, 7, 8, 9, 37, 1000] {
            var values = (0..<n).map { T($0) * 1e30 - T(n / 2) }   // large but finite, both signs
            values[0] = T.leastNonzeroMagnitude
            var expected = 0
            for (position, special) in [(0, T.nan), (n / 2, T.infinity), (n - 1, -T.infinity)] where position < n {
                if values[position].isFinite { expected += 1 }
                values[position] = special
            }
            #expect(nonFiniteCount(values, n) == expected, "n = \(n)")
            #expect(nonFiniteCount(values, n) == values.count { !$0.isFinite })
        }
    }

    @Test func countsNonFiniteFloat() { countsNonFinite(Float.self) }
    @Test func countsNonFiniteDouble() { countsNonFinite(Double.self) }

    func activations<T: Scalar>(_: T.Type) {
        let x: [Double] = [-2, -0.5, 0.25, 1, 3]
        let n = x.count
        let xs = UnsafeMutablePointer<T>.allocate(capacity: n)
        let ys = UnsafeMutablePointer<T>.allocate(capacity: n)
        defer { xs.deallocate(); ys.deallocate() }
        for i in 0..<n { xs[i] = T(x[i]) }
        func run(_ f: (UnsafePointer<T>, UnsafeMutablePointer<T>, Int) -> Void) -> [Double] {
            f(xs, ys, n)
            return (0..<n).map { Double(ys[$0]) }
        }
        let tol = tolerance(T.self) * 10
        #expect(allClose(run { reluForward($0, $1, $2) }, x.map { max($0, 0) }, tol))
        #expect(allClose(run { leakyReLUForward($0, $1, $2, slope: T(0.1)) }, x.map { $0 > 0 ? $0 : 0.1 * $0 }, tol))
        #expect(allClose(run { tanhForward($0, $1, $2) }, [-0.9640275800758169, -0.46211715726000974, 0.24491866240370913,
                                                         0.7615941559557649, 0.9950547536867305], tol))
        #expect(allClose(run { sigmoidForward($0, $1, $2) }, [0.11920292202211755, 0.3775406687981454, 0.5621765008857981,
                                                            0.7310585786300049, 0.9525741268224334], tol))
        // x * Phi(x), Phi from the normal CDF tables (scipy.stats.norm.cdf)
        #expect(allClose(run { geluForward($0, $1, $2) }, [-0.04550026389635839, -0.15426876936299344, 0.14967658142073093,
                                                         0.8413447460685429, 2.99595030590511], tol))
        // x * sigmoid(x), from the sigmoid values above
        #expect(allClose(run { siluForward($0, $1, $2) }, [-0.2384058440442351, -0.1887703343990727, 0.14054412522144952,
                                                         0.7310585786300049, 2.8577223804673], tol))
    }

    /// SiLU far out on both sides, where exp(-x) overflows or vanishes: its limits (0 and x; slopes 0 and 1), never NaN.
    @Test func siluAtTheExtremes() {
        let x: [Float] = [-1000, -100, 100, 1000], dy: [Float] = [1, 1, 1, 1]
        var y = [Float](repeating: .nan, count: 4), dx = [Float](repeating: .nan, count: 4)
        siluForward(x, &y, 4)
        siluBackward(x, dy, &dx, 4)
        #expect(y == [0, 0, 100, 1000] && dx == [0, 0, 1, 1], "y \(y), dx \(dx)")
    }

    @Test func activationValuesFloat() { activations(Float.self) }
    @Test func activationValuesDouble() { activations(Double.self) }

    @Test func dropoutTrainsAndEvaluatesCorrectly() throws {
        let spec = ModelSpec(layers: [.linear(inputs: 100, outputs: 100), .dropout(probability: 0.3),
                                      .linear(inputs: 100, outputs: 2)])
        let model = try Model<Double>(spec: spec, batchCapacity: 50, seed: 3)
        fillRandomBatch(model, rows: 50, seed: 1)
        // Evaluation: dropout is the identity, so two passes agree exactly.
        let e1 = model.forward(count: 50, mode: .eval).lossSum
        let e2 = model.forward(count: 50, mode: .eval).lossSum
        #expect(e1 == e2)
        // Training: the masks are a function of (seed, epoch, sample): the same samples give the same pass, another
        // epoch or another seed other masks.
        let t1 = model.forward(count: 50, mode: .train).lossSum
        #expect(model.forward(count: 50, mode: .train).lossSum == t1)
        #expect(t1 != e1)
        Array(0..<50).withUnsafeBufferPointer { model.setSamples(epoch: 1, indices: $0) }
        #expect(model.forward(count: 50, mode: .train).lossSum != t1)
        let twin = try Model<Double>(spec: spec, batchCapacity: 50, seed: 3)
        fillRandomBatch(twin, rows: 50, seed: 1)
        #expect(twin.forward(count: 50, mode: .train).lossSum == t1)
        // Another dropout seed, the same weights: other masks.
        let other = try Model<Double>(spec: spec, batchCapacity: 50, seed: 4)
        other.initializeParameters(seed: 3)
        fillRandomBatch(other, rows: 50, seed: 1)
        #expect(other.forward(count: 50, mode: .eval).lossSum == e1)
        #expect(other.forward(count: 50, mode: .train).lossSum != t1)
    }

    /// A sample's dropout masks depend on the seed, the epoch, the sample and the layer, never on its row, its batch or
    /// the rank that trains it: the same sample in another batch, at another row, gets the same masks, and two dropout
    /// layers draw different ones. The model ends in its dropouts, so `outputs` shows what they kept.
    @Test func dropoutMasksFollowTheSampleNotTheRow() throws {
        let spec = ModelSpec(layers: [.linear(inputs: 8, outputs: 256), .dropout(probability: 0.5), .dropout(probability: 0.5)])
        let a = try Model<Double>(spec: spec, batchCapacity: 4, seed: 9)
        let b = try Model<Double>(spec: spec, batchCapacity: 4, seed: 9)
        // Sample s's input row is the same in every position; batch a holds samples 5, 11, 2; batch b holds 2, 40, 5.
        func run(_ model: Model<Double>, _ samples: [Int], epoch: Int) -> [[Double]] {
            for (row, s) in samples.enumerated() { for j in 0..<8 { model.inputs[row * 8 + j] = 1 + Double(s) * 0.01 + Double(j) * 0.1 } }
            samples.withUnsafeBufferPointer { model.setSamples(epoch: epoch, indices: $0) }
            _ = model.forward(count: samples.count, mode: .train)
            return samples.indices.map { row in (0..<256).map { model.outputs[row * 256 + $0] } }
        }
        let inA = run(a, [5, 11, 2], epoch: 3), inB = run(b, [2, 40, 5], epoch: 3)
        // The same masks, and the same kept values to rounding: the linear layer's GEMM may round a row differently at
        // another position in the batch (OpenBLAS's AVX-512 kernels do).
        func same(_ x: [Double], _ y: [Double]) -> Bool {
            x.map { $0 == 0 } == y.map { $0 == 0 } && zip(x, y).allSatisfy { abs($0 - $1) <= 1e-12 * max(abs($0), abs($1)) }
        }
        #expect(same(inA[0], inB[2]) && same(inA[2], inB[0]))
        #expect(inA[0].map { $0 == 0 } != inA[2].map { $0 == 0 }, "two samples, one mask")
        // Another epoch: another mask for the same sample.
        let later = run(b, [2, 40, 5], epoch: 4)
        #expect(inA[0].map { $0 == 0 } != later[2].map { $0 == 0 })
        // Two layers at p = 0.5 keep a quarter when their masks are independent, half if they were the same mask.
        let kept = inA.joined().filter { $0 != 0 }.count
        #expect((150...234).contains(kept), "kept \(kept) of 768")
    }

    @Test func dropoutMaskKeepsTheRightShareAndScales() {
        let n = 100_000
        let x = UnsafeMutablePointer<Float>.allocate(capacity: n)
        let y = UnsafeMutablePointer<Float>.allocate(capacity: n)
        let mask = UnsafeMutablePointer<Float>.allocate(capacity: n)
        defer { x.deallocate(); y.deallocate(); mask.deallocate() }
        x.update(repeating: 1, count: n)
        var g = RandomGenerator(seed: 5, stream: .dropout)
        dropoutForward(x, y, mask: mask, n, keep: 0.75, generator: &g)
        let kept = (0..<n).filter { y[$0] != 0 }.count
        #expect(abs(Double(kept) / Double(n) - 0.75) < 0.01)
        #expect((0..<n).allSatisfy { y[$0] == 0 || abs(y[$0] - 1 / 0.75) < 1e-6 })
    }

    @Test func squaredErrorAgainstHandValues() {
        let p: [Double] = [1, 2, 3, 4], t: [Double] = [0, 2, 5, 3]
        var g = [Double](repeating: 0, count: 4)
        let sum = squaredError(predictions: p, targets: t, count: 4, gradient: &g, gradientScale: 0.25)
        #expect(sum == 6)  // 1 + 0 + 4 + 1
        #expect(g == [0.5, 0, -1, 0.5])  // 2 (p - t) / 4
    }
}
