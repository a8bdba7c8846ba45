@testable import Engine
import Foundation
import Testing

/// The fast paths against the plain ones they replace: a batch norm, ReLU, max pooling block run fused against the
/// same three layers run apart, and the lowering of convolutions that keep the image's size against the row-by-row
/// lowering.
@Suite("Fused and fast paths")
struct FusionTests {
    static func conv(_ i: Int, _ o: Int, _ k: Int, pad: Int) -> LayerSpec {
        .conv2d(inChannels: i, outChannels: o, kernel: k, stride: 1, padding: pad, bias: false)
    }

    /// Blocks on the 2x2 vector kernel (rows of 4 outputs and more, with and without a dropped last row and column),
    /// on the general loop (rows of fewer than 4, windows of 3, a stride past the window), and two blocks in a row.
    static let blocks: [(String, ModelSpec)] = [
        ("2x2 on 10x12", ModelSpec(layers: [conv(2, 3, 3, pad: 1), .batchNorm(features: 3), .relu,
                                            .maxPool2d(kernel: 2, stride: 2), .flatten, .linear(inputs: 3 * 30, outputs: 4)],
                                   inputShape: [2, 10, 12])),
        ("2x2 on 9x11, last row and column dropped",
         ModelSpec(layers: [conv(1, 4, 3, pad: 1), .batchNorm(features: 4), .relu, .maxPool2d(kernel: 2, stride: 2),
                            .flatten, .linear(inputs: 4 * 20, outputs: 3)], inputShape: [1, 9, 11])),
        ("2x2 on 6x6: rows of 3", ModelSpec(layers: [conv(2, 3, 3, pad: 1), .batchNorm(features: 3), .relu,
                                                     .maxPool2d(kernel: 2, stride: 2), .flatten, .linear(inputs: 27, outputs: 4)],
                                            inputShape: [2, 6, 6])),
        ("3x3 stride 3", ModelSpec(layers: [conv(2, 3, 3, pad: 1), .batchNorm(features: 3), .relu,
                                            .maxPool2d(kernel: 3, stride: 3), .flatten, .linear(inputs: 3 * 6, outputs: 4)],
                                   inputShape: [2, 9, 6])),
        ("2x2 stride 3", ModelSpec(layers: [conv(2, 3, 3, pad: 1), .batchNorm(features: 3), .relu,
                                            .maxPool2d(kernel: 2, stride: 3), .flatten, .linear(inputs: 3 * 9, outputs: 4)],
                                   inputShape: [2, 8, 8])),
        ("two blocks", ModelSpec(layers: [conv(1, 4, 3, pad: 1), .batchNorm(features: 4), .relu, .maxPool2d(kernel: 2, stride: 2),
                                          conv(4, 5, 3, pad: 1), .batchNorm(features: 5), .relu, .maxPool2d(kernel: 2, stride: 2),
                                          .flatten, .linear(inputs: 5 * 16, outputs: 3)], inputShape: [1, 16, 16])),
    ]

    /// The same model twice, fused and apart, from one seed and batch, with batch norm parameters away from 1 and 0.
    /// With `negativeGamma` every batch norm's first channel is scaled by -0.8, which turns the order of a window's
    /// values around: the Float pooling compares raw inputs only for positive scales, so both of its paths run.
    func pair<T: Scalar>(_ spec: ModelSpec, _: T.Type, rows: Int, negativeGamma: Bool = false) throws
        -> (fused: Model<T>, apart: Model<T>) {
        let fused = try Model<T>(spec: spec, batchCapacity: rows, seed: 3)
        let apart = try Model<T>(spec: spec, batchCapacity: rows, seed: 3, fusesBlocks: false)
        var g = RandomGenerator(seed: 4, stream: 1)
        for info in fused.parameterTable where info.shape.count == 1 {
            for i in info.range { fused.parameters[i] += T(0.5 * g.nextNormal()) }
        }
        if negativeGamma {
            for (index, layer) in spec.layers.enumerated() where layer.as(BatchNormKind.self) != nil {
                fused.parameters[fused.parameterTable.first { $0.name == "\(index).weight" }!.offset] = -0.8
            }
        }
        apart.loadParameters(from: UnsafeBufferPointer(fused.parameters))
        for model in [fused, apart] { fillRandomBatch(model, rows: rows, seed: 9) }
        return (fused, apart)
    }

    func compare<T: Scalar>(_ name: String, _: T.Type) throws {
        let spec = Self.blocks.first { $0.0 == name }!.1
        let rows = 5
        let (fused, apart) = try pair(spec, T.self, rows: rows, negativeGamma: true)
        let blocks = fused.plan.compactMap { $0 as? BatchNormReLUPool<T> }
        let norms = spec.layers.filter { $0.as(BatchNormKind.self) != nil }.count
        #expect(norms > 0 && blocks.count == norms && fused.plan.count == apart.plan.count - 2 * norms, "\(name): not fused")
        #expect(!apart.plan.contains { $0 is BatchNormReLUPool<T> }, "\(name): fused")
        for mode in [ForwardMode.train, .check, .eval] {
            let a = fused.forward(count: rows, mode: mode), b = apart.forward(count: rows, mode: mode)
            // The same arithmetic: bit for bit the same outputs, and the same winners wherever the ReLU passed the
            // output (where all four inputs were rectified to 0, the fused block may name another: no gradient passes).
            #expect(a == b, "\(name) \(mode)")
            for i in 0..<(rows * fused.outputWidth) { #expect(fused.outputs[i] == apart.outputs[i], "\(name) \(mode) output \(i)") }
            var passed = 0
            for p in blocks {
                let q = try #require(apart.layer(at: p.index + 2) as? MaxPool2d<T>)
                for i in 0..<(rows * p.outputCount) {
                    #expect(p.y[i] == q.y[i], "\(name) \(mode) pooling \(p.index) at \(i)")
                    if q.y[i] > 0 {
                        #expect(p.winners[i] == q.winners[i], "\(name) \(mode) pooling \(p.index) winner at \(i)")
                        passed += 1
                    }
                }
            }
            #expect(passed > 0)
            fused.backward(count: rows, accumulate: false) { _ in }
            apart.backward(count: rows, accumulate: false) { _ in }
            // The Double sums run in another order: equal up to their rounding.
            let g = Array(fused.gradients).map(Double.init), h = Array(apart.gradients).map(Double.init)
            let scale = h.map(abs).max()!
            for i in g.indices {
                #expect(abs(g[i] - h[i]) <= tolerance(T.self) * scale, "\(name) \(mode) gradient \(i): \(g[i]) vs \(h[i])")
            }
            #expect(g != [Double](repeating: 0, count: g.count))
        }
        for i in 0..<fused.buffers.count { #expect(fused.buffers[i] == apart.buffers[i], "\(name): running statistics") }
    }

    @Test(arguments: blocks.map(\.0))
    func aFusedBlockComputesWhatItsLayersDoApartInFloat(name: String) throws { try compare(name, Float.self) }

    @Test(arguments: blocks.map(\.0))
    func aFusedBlockComputesWhatItsLayersDoApartInDouble(name: String) throws { try compare(name, Double.self) }

    /// Overlapping windows would route two outputs' gradients to one input: such a block runs apart.
    @Test func overlappingWindowsAreNotFused() throws {
        let spec = ModelSpec(layers: [Self.conv(1, 2, 3, pad: 1), .batchNorm(features: 2), .relu, .maxPool2d(kernel: 3, stride: 2),
                                      .flatten, .linear(inputs: 2 * 9, outputs: 2)], inputShape: [1, 8, 8])
        let model = try Model<Float>(spec: spec, batchCapacity: 2)
        #expect(!model.plan.contains { $0 is BatchNormReLUPool<Float> })
    }

    /// A fused block passes the float64 check at the standard of every layer, and the injected batch norm bugs still
    /// fail it, naming the tensor. A fault wraps the batch norm (`FaultyLayer`), which runs the block's fused backward
    /// pass and then spoils its result: the pooling stays linked to the batch norm, so the fused kernels run.
    @Test func aFusedBlockPassesTheCheckAndItsInjectedBugsFail() throws {
        let spec = Self.blocks.first { $0.0 == "two blocks" }!.1
        let (model, _) = try pair(spec, Double.self, rows: 3)
        var options = GradientCheckOptions()
        options.checkAllCoordinates = true
        let report = checkGradients(model: model, count: 3, options: options)
        #expect(report.verdict == .pass, "\(report.text)")
        for tensor in report.tensors { #expect(tensor.maxRelativeError <= 5e-6, "\(tensor.name)\n\(report.text)") }
        // The second block's input gradient without its mean term: what reaches the layers below is wrong, first of
        // all the convolution right before it. Its own tensors are right.
        model.installGradientFault(.batchNormWithoutMeanTerm(tensor: "5.weight"))
        #expect(model.plan.contains { ($0 as? FaultyLayer<Double>)?.inner is BatchNormReLUPool<Double> },
                "the fault did not wrap the fused block")
        let meanless = checkGradients(model: model, count: 3)
        let failing = meanless.tensors.filter { $0.verdict == .fail }.map(\.name)
        #expect(meanless.verdict == .fail && failing.contains("4.weight"), "\(meanless.text)")
        #expect(failing.allSatisfy { Int($0.prefix { $0 != "." })! < 5 }, "\(meanless.text)")
        for (fault, broken) in [(GradientFault.missing(tensor: "1.weight"), ["1.weight"]),
                                (.scaled(tensor: "5.bias", factor: 1.001), ["5.bias"])] {
            model.installGradientFault(fault)
            let report = checkGradients(model: model, count: 3)
            #expect(report.verdict == .fail, "\(fault):\n\(report.text)")
            #expect(report.tensors.filter { $0.verdict == .fail }.map(\.name) == broken, "\(fault):\n\(report.text)")
        }
    }

    /// Float batch norm statistics are summed in Float vectors, each run shifted by its first value: on values far
    /// from 0 (a mean 1000 deviations away) the variance E[x^2] - mean^2 still agrees with the Double loop's.
    @Test func floatStatisticsKeepTheVarianceOfValuesFarFromZero() {
        let (samples, features, positions) = (4, 3, 100)
        var g = RandomGenerator(seed: 12, stream: 3)
        let floats = (0..<(samples * features * positions)).map { _ in Float(1000 + g.nextNormal()) }
        let doubles = floats.map(Double.init)
        var fast = [Double](repeating: .nan, count: 2 * features), exact = fast
        featureSums(floats, samples: samples, features: features, positions: positions, into: &fast)
        featureSums(doubles, samples: samples, features: features, positions: positions, into: &exact)
        let n = Double(samples * positions)
        for f in 0..<features {
            let variance = { (s: [Double]) in s[features + f] / n - (s[f] / n) * (s[f] / n) }
            #expect(abs(fast[f] - exact[f]) <= 1e-6 * abs(exact[f]), "sum of feature \(f)")
            #expect(abs(variance(fast) - variance(exact)) <= 1e-3 * variance(exact), "variance of feature \(f)")
        }
    }

    // MARK: - Batch norm's forward sums added by the convolution before it

    /// Every way a convolution feeds a batch norm: lowered (2 input channels) and by Winograd (20 and 24 channels, a
    /// partial block of 16 lanes), at 10x10, 5x5 and 2x2 (runs shorter than the Float kernel's 16), with a bias and
    /// without, in residual blocks' bodies and shortcuts, and before a fused batch norm, ReLU, pooling block.
    static let feedsBatchNorm = ModelSpec(layers: [
        .conv2d(inChannels: 2, outChannels: 20, kernel: 3, stride: 1, padding: 1, bias: true), .batchNorm(features: 20), .relu,
        .residual(body: [conv(20, 20, 3, pad: 1), .batchNorm(features: 20), .relu, conv(20, 20, 3, pad: 1),
                         .batchNorm(features: 20)]),
        .relu,
        .residual(body: [.conv2d(inChannels: 20, outChannels: 24, kernel: 3, stride: 2, padding: 1, bias: false),
                         .batchNorm(features: 24), .relu, conv(24, 24, 3, pad: 1), .batchNorm(features: 24)],
                  shortcut: [.conv2d(inChannels: 20, outChannels: 24, kernel: 1, stride: 2, padding: 0, bias: false),
                             .batchNorm(features: 24)]),
        .relu,
        .conv2d(inChannels: 24, outChannels: 16, kernel: 3, stride: 1, padding: 1, bias: true), .batchNorm(features: 16), .relu,
        .maxPool2d(kernel: 2, stride: 2),
        conv(16, 16, 3, pad: 1), .batchNorm(features: 16), .relu,
        .flatten, .linear(inputs: 16 * 4, outputs: 5),
    ], inputShape: [2, 10, 10])

    /// The convolution sums its output as it writes it, and the batch norm after it takes those sums: the same
    /// outputs, gradients and running statistics, bit for bit, as the batch norm's own pass, in Float and Double,
    /// over whole batches and Winograd chunks of 2 samples, in every forward mode, and when a pass starts at a batch
    /// norm (the gradient check's partial pass), where no convolution ran to hand sums over.
    @Test(arguments: [Int.max, 2])
    func convolutionSumsAreTheBatchNormsOwn(chunk: Int) throws {
        try Winograd.$chunkSamplesOverride.withValue(chunk) {
            try sumsByConvolution(Float.self)
            try sumsByConvolution(Double.self)
        }
    }

    func sumsByConvolution<T: Scalar>(_: T.Type) throws {
        let spec = Self.feedsBatchNorm, rows = 5
        let summing = try Model<T>(spec: spec, batchCapacity: rows, seed: 3)
        let own = try OutputSums.withSumsInBatchNorm { try Model<T>(spec: spec, batchCapacity: rows, seed: 3) }
        // Every convolution followed by a batch norm sums for it (eight of them, the fused block's included, five by
        // Winograd); none does in the other model.
        let convolutions = allLayers(summing.plan).compactMap { $0 as? Conv2d<T> }
        let feeding = convolutions.filter { $0.outputStatistics != nil }
        #expect(feeding.count == 8 && feeding.allSatisfy { $0.outputStatistics === $0.next?.normalization }, "\(T.self)")
        #expect(feeding.filter { $0.winogradChunkSamples != nil }.count == 5, "\(T.self)")
        let ownFeeding = allLayers(own.plan).filter { ($0 as? Conv2d<T>)?.outputStatistics != nil }
        #expect(ownFeeding.isEmpty, "\(T.self)")
        var g = RandomGenerator(seed: 4, stream: 1)
        for info in summing.parameterTable where info.shape.count == 1 {
            for i in info.range { summing.parameters[i] += T(0.5 * g.nextNormal()) }
        }
        own.loadParameters(from: UnsafeBufferPointer(summing.parameters))
        for model in [summing, own] { fillRandomBatch(model, rows: rows, seed: 9) }
        func same(_ what: String) {
            let outputs = 0..<(rows * summing.outputWidth)
            #expect(outputs.map { summing.outputs[$0] } == outputs.map { own.outputs[$0] }, "\(T.self) \(what): outputs")
            #expect(Array(summing.buffers) == Array(own.buffers), "\(T.self) \(what): running statistics")
        }
        for step in 0..<2 {
            let a = summing.forward(count: rows, mode: .train), b = own.forward(count: rows, mode: .train)
            #expect(a == b, "\(T.self) step \(step)")
            same("step \(step)")
            // Every batch norm took the sums it was handed.
            let waiting = allLayers(summing.plan).filter { $0.normalization.map(\.sumsArrived) == true }
            #expect(waiting.isEmpty, "\(T.self)")
            summing.backward(count: rows, accumulate: false) { _ in }
            own.backward(count: rows, accumulate: false) { _ in }
            #expect(Array(summing.gradients) == Array(own.gradients), "\(T.self) step \(step): gradients")
        }
        for mode in [ForwardMode.check, .eval] {
            #expect(summing.forward(count: rows, mode: mode) == own.forward(count: rows, mode: mode), "\(T.self) \(mode)")
            same("\(mode)")
        }
        // After a backward pass the batch norms' sums hold their gradient reductions: a pass that starts at a batch
        // norm must sum its input itself. Perturb the stem's batch norm (layer 1), the fused block's (8) and the last
        // one (12), as the gradient check does, and recompute from there.
        for layer in [1, 8, 12] {
            summing.forward(count: rows, mode: .check)
            summing.backward(count: rows, accumulate: false) { _ in }
            let offset = summing.parameterTable.first { $0.name == "\(layer).weight" }!.offset
            for model in [summing, own] { model.parameters[offset] += T(0.25) }
            let a = summing.forward(count: rows, mode: .check, fromLayer: layer)
            let b = own.forward(count: rows, mode: .check, fromLayer: 0)
            #expect(a == b, "\(T.self) from layer \(layer)")
            same("from layer \(layer)")
        }
        // The sums really come from the convolution: its forward pass alone hands over exactly the sums of its output.
        for conv in feeding {
            let statistics = try #require(conv.outputStatistics)
            statistics.sumsArrived = false
            conv.forward(count: rows, mode: .train)
            var expected = [Double](repeating: .nan, count: 2 * statistics.features)
            featureSums(UnsafePointer(conv.y), samples: rows, features: statistics.features, positions: statistics.positions,
                        into: &expected)
            #expect(statistics.sumsArrived, "\(T.self) layer \(conv.index)")
            #expect(Array(statistics.sums[0..<(2 * statistics.features)]) == expected, "\(T.self) layer \(conv.index)")
            statistics.sumsArrived = false
        }
    }

    // MARK: - Lowering convolutions that keep the image's size

    @Test(arguments: [(1, 0), (3, 1), (5, 2), (3, 2), (3, 0)])
    func sameSizeLoweringIsTheRowByRowOne(kernel: Int, padding: Int) {
        // (3, 2) and (3, 0) are not size-keeping convolutions; the fast path is only taken for those that are, but
        // its geometry holds for any padding (the padding-offset test fault lowers with padding + 1).
        lowering(Float.self, kernel: kernel, padding: padding, height: 7, width: 9)
        lowering(Double.self, kernel: kernel, padding: padding, height: 7, width: 9)
        // Images smaller than the kernel's reach, and one row.
        lowering(Float.self, kernel: kernel, padding: padding, height: 2, width: 3)
        lowering(Float.self, kernel: kernel, padding: padding, height: 1, width: 12)
    }

    func lowering<T: Scalar>(_: T.Type, kernel: Int, padding: Int, height: Int, width: Int) {
        let channels = 3
        let size = height * width
        var g = RandomGenerator(seed: 8, stream: 2)
        let x = (0..<(channels * size)).map { _ in T(g.nextNormal()) }
        let rows = channels * kernel * kernel * size
        var fast = [T](repeating: .nan, count: rows), plain = [T](repeating: .nan, count: rows)
        im2colSame(x, channels: channels, size: size, width: width, kernel: kernel, padding: padding, into: &fast)
        im2colRows(x, channels: channels, height: height, width: width, kernel: kernel, stride: 1, padding: padding,
                   outHeight: height, outWidth: width, into: &plain)
        #expect(fast == plain, "\(T.self) k \(kernel) pad \(padding) \(height)x\(width)")
        let dcols = (0..<rows).map { _ in T(g.nextNormal()) }
        var scratch = dcols
        var dxFast = [T](repeating: .nan, count: channels * size), dxPlain = dxFast
        col2imSame(&scratch, channels: channels, size: size, width: width, kernel: kernel, padding: padding, into: &dxFast)
        col2imRows(dcols, channels: channels, height: height, width: width, kernel: kernel, stride: 1, padding: padding,
                   outHeight: height, outWidth: width, into: &dxPlain)
        #expect(dxFast == dxPlain, "\(T.self) k \(kernel) pad \(padding) \(height)x\(width)")
    }
}
