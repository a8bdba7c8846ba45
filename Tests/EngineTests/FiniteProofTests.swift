import Engine
import Testing

/// `Model.gradientsProvenFinite(in:)` lets a training step skip reading every gradient for NaN. It must never
/// vouch for a gradient that is not finite, and it must vouch for ordinary ones, or it saves nothing.
@Suite("Proving gradients finite without reading them")
struct FiniteProofTests {
    func linearRanges(_ model: Model<Float>) -> [Range<Int>] {
        // Each linear layer's weight and bias, which are adjacent.
        stride(from: 0, to: model.parameterTable.count, by: 2).map {
            model.parameterTable[$0].range.lowerBound..<model.parameterTable[$0 + 1].range.upperBound
        }
    }

    func count(_ model: Model<Float>, _ range: Range<Int>) -> Int {
        nonFiniteCount(model.gradients.baseAddress! + range.lowerBound, range.count)
    }

    @Test(arguments: [LayerSpec.relu, .gelu, .tanh])
    func ordinaryGradientsAreProven(activation: LayerSpec) throws {
        for dropout in [0.0, 0.3] {
            let model = try Model<Float>(spec: .mlp(widths: [6, 16, 12, 3], activation: activation, dropout: dropout),
                                         batchCapacity: 37, seed: 2)
            fillRandomBatch(model, rows: 37, seed: 3)
            model.forward(count: 37, mode: .train)
            model.backward(count: 37, accumulate: false) { _ in }
            for range in linearRanges(model) {
                #expect(model.gradientsProvenFinite(in: range), "\(activation), dropout \(dropout), \(range)")
                #expect(count(model, range) == 0)
            }
            #expect(model.gradientsProvenFinite(in: 0..<model.parameterCount))
        }
    }

    /// Inputs from ordinary to enormous, and a NaN: whenever a layer is proven, its gradients are all finite;
    /// when some are not, it is not proven.
    @Test(arguments: [LayerSpec.relu, .gelu])
    func neverVouchesForANonFiniteGradient(activation: LayerSpec) throws {
        let model = try Model<Float>(spec: .mlp(widths: [6, 16, 12, 3], activation: activation), batchCapacity: 8, seed: 2)
        var sawNonFinite = false
        for (k, scale) in [Float(1), 1e10, 1e15, 1e18, 1e20, 1e25, 1e30, 1e38, .nan].enumerated() {
            fillRandomBatch(model, rows: 8, seed: UInt64(k))
            for i in 0..<(8 * 6) { model.inputs[i] *= scale }
            model.forward(count: 8, mode: .train)
            model.backward(count: 8, accumulate: false) { _ in }
            for range in linearRanges(model) {
                let bad = count(model, range)
                sawNonFinite = sawNonFinite || bad > 0
                if model.gradientsProvenFinite(in: range) { #expect(bad == 0, "scale \(scale): proven with \(bad) non-finite") }
            }
            if scale == 1 { #expect(model.gradientsProvenFinite(in: 0..<model.parameterCount)) }
            if scale.isNaN { #expect(!model.gradientsProvenFinite(in: linearRanges(model)[0])) }
        }
        #expect(sawNonFinite, "the sweep never produced a non-finite gradient, so it proved nothing")
    }

    /// The proof trusts that backward with accumulate: false overwrites the gradients (GEMM and GEMV beta = 0)
    /// rather than scaling them by zero, which would keep an old NaN.
    @Test func oldNaNGradientsAreOverwritten() throws {
        let model = try Model<Float>(spec: .mlp(widths: [6, 16, 3]), batchCapacity: 4, seed: 2)
        fillRandomBatch(model, rows: 4, seed: 3)
        model.gradients.update(repeating: .nan)
        model.forward(count: 4, mode: .train)
        model.backward(count: 4, accumulate: false) { _ in }
        #expect(nonFiniteCount(model.gradients.baseAddress!, model.parameterCount) == 0)
        #expect(model.gradientsProvenFinite(in: 0..<model.parameterCount))
    }

    @Test func nothingIsProvenWhenAccumulatingOrFaulty() throws {
        let model = try Model<Float>(spec: .mlp(widths: [6, 16, 3]), batchCapacity: 4, seed: 2)
        fillRandomBatch(model, rows: 4, seed: 3)
        model.forward(count: 4, mode: .train)
        model.backward(count: 4) { _ in }
        #expect(!model.gradientsProvenFinite(in: 0..<model.parameterCount))
        // A deliberately wrong backward (test hook) may write anything: never vouched for.
        model.installGradientFault(.scaled(tensor: "0.weight", factor: .infinity))
        model.forward(count: 4, mode: .train)
        model.backward(count: 4, accumulate: false) { _ in }
        #expect(!model.gradientsProvenFinite(in: model.parameterTable[0].range))
        #expect(model.gradientsProvenFinite(in: model.parameterTable[2].range))
    }

    /// The summing ReLU kernels write exactly what the plain ones write, NaN and -0 included, for lengths that
    /// are and are not multiples of their 16-wide blocks, and sum the squares of what they wrote.
    @Test(arguments: [0, 5, 16, 37, 1000])
    func summingReLUKernelsMatchThePlainOnes(n: Int) {
        var g = RandomGenerator(seed: UInt64(n), stream: .test)
        var x = (0..<n).map { _ in Float(g.nextNormal()) }, dy = (0..<n).map { _ in Float(g.nextNormal()) }
        if n > 3 { x[1] = .nan; x[2] = -0.0; x[3] = 0; dy[1] = .infinity }
        var plain = [Float](repeating: 7, count: n), summed = [Float](repeating: 7, count: n)
        reluForward(x, &plain, n)
        let forwardSum = reluForwardSquares(x, &summed, n)
        #expect(plain.map(\.bitPattern) == summed.map(\.bitPattern))
        let finite = summed.filter(\.isFinite)
        if finite.count == n {
            let exact = finite.reduce(0.0) { $0 + Double($1) * Double($1) }
            #expect(abs(Double(forwardSum) - exact) <= 1e-5 * max(exact, 1))
        } else {
            #expect(forwardSum.isNaN)
        }
        reluBackward(x, dy, &plain, n)
        let backwardSum = reluBackwardSquares(x, dy, &summed, n)
        #expect(plain.map(\.bitPattern) == summed.map(\.bitPattern))
        let exact = summed.reduce(0.0) { $0 + Double($1) * Double($1) }
        #expect(exact.isFinite ? abs(Double(backwardSum) - exact) <= 1e-5 * max(exact, 1) : !backwardSum.isFinite)
        // In place, as the model runs them.
        var inPlace = x
        _ = inPlace.withUnsafeMutableBufferPointer { reluForwardSquares($0.baseAddress!, $0.baseAddress!, n) }
        reluForward(x, &plain, n)
        #expect(inPlace.map(\.bitPattern) == plain.map(\.bitPattern))
    }
}
