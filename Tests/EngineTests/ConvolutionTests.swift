@testable import Engine
import Foundation
import Testing

/// Convolution, pooling and normalisation layers: against a second, naive implementation, against closed forms, and
/// every one of them through the float64 finite-difference checker (batch norm with batch statistics, so the check
/// covers the coupling between samples).
@Suite("Convolutional layers")
struct ConvolutionTests {
    static func conv(_ i: Int, _ o: Int, _ k: Int, stride: Int = 1, pad: Int = 0, bias: Bool = true) -> LayerSpec {
        .conv2d(inChannels: i, outChannels: o, kernel: k, stride: stride, padding: pad, bias: bias)
    }

    /// A float64 model on a random batch, with non-zero biases and normalisation parameters away from 1 and 0.
    func checkedModel(_ spec: ModelSpec, rows: Int = 3, seed: UInt64 = 5) throws -> Model<Double> {
        let model = try Model<Double>(spec: spec, batchCapacity: rows, seed: seed)
        fillRandomBatch(model, rows: rows, seed: seed)
        var g = RandomGenerator(seed: seed, stream: 78)
        for info in model.parameterTable where info.shape.count == 1 {
            for i in info.range { model.parameters[i] += 0.1 * g.nextNormal() }
        }
        return model
    }

    static let models: [(String, ModelSpec)] = [
        ("conv pad 1, relu", ModelSpec(layers: [conv(2, 3, 3, pad: 1), .relu, .flatten, .linear(inputs: 3 * 36, outputs: 4)],
                                       inputShape: [2, 6, 6])),
        ("conv stride 2 no bias, tanh", ModelSpec(layers: [conv(2, 3, 3, stride: 2, bias: false), .tanh, .flatten,
                                                           .linear(inputs: 3 * 4, outputs: 4)], inputShape: [2, 6, 6])),
        ("conv stride 2 pad 2, two convs", ModelSpec(layers: [conv(2, 3, 3, stride: 2, pad: 2), .tanh, conv(3, 2, 2, pad: 1),
                                                              .flatten, .linear(inputs: 2 * 6 * 6, outputs: 3)], inputShape: [2, 7, 7])),
        // Stride 2 after another layer, so its input gradient (col2im's strided scatter) reaches the check: on 6x7, a 3x3
        // window with padding 1 leaves the last padded row unreached (6 + 2 - 3 is odd) and tiles the columns; then a
        // 2x2 window of stride 2, padding 1, on 3x4, which overlaps nothing and leaves a row out.
        ("conv stride 2 pad 1 after a conv, uneven", ModelSpec(layers: [conv(2, 3, 3, pad: 1), .tanh, conv(3, 4, 3, stride: 2, pad: 1),
                                                                        .tanh, conv(4, 2, 2, stride: 2, pad: 1), .flatten,
                                                                        .linear(inputs: 2 * 2 * 3, outputs: 3)], inputShape: [2, 6, 7])),
        ("maxpool", ModelSpec(layers: [conv(2, 3, 3, pad: 1), .tanh, .maxPool2d(kernel: 2, stride: 2), .flatten,
                                       .linear(inputs: 27, outputs: 4)], inputShape: [2, 6, 6])),
        ("avgpool stride 1", ModelSpec(layers: [conv(2, 3, 3, pad: 1), .sigmoid, .avgPool2d(kernel: 3, stride: 1), .flatten,
                                                .linear(inputs: 3 * 16, outputs: 4)], inputShape: [2, 6, 6])),
        ("global average pooling", ModelSpec(layers: [conv(2, 4, 3), .gelu, .globalAvgPool2d, .flatten,
                                                      .linear(inputs: 4, outputs: 3)], inputShape: [2, 6, 6])),
        ("silu on images", ModelSpec(layers: [conv(2, 3, 3, pad: 1), .silu, conv(3, 2, 3, stride: 2), .silu, .flatten,
                                              .linear(inputs: 2 * 9, outputs: 3)], inputShape: [2, 7, 7])),
        ("batchnorm 2d", ModelSpec(layers: [conv(2, 3, 3, pad: 1, bias: false), .batchNorm(features: 3), .tanh, .flatten,
                                            .linear(inputs: 108, outputs: 4)], inputShape: [2, 6, 6])),
        ("batchnorm 1d", ModelSpec(layers: [.linear(inputs: 8, outputs: 6), .batchNorm(features: 6), .tanh,
                                            .linear(inputs: 6, outputs: 3)], inputShape: [8])),
        ("layernorm", ModelSpec(layers: [.linear(inputs: 8, outputs: 6), .layerNorm(features: 6), .gelu,
                                         .linear(inputs: 6, outputs: 3)], inputShape: [8])),
        ("layernorm on images", ModelSpec(layers: [conv(2, 3, 3, pad: 1), .layerNorm(features: 6), .tanh, .flatten,
                                                   .linear(inputs: 108, outputs: 3)], inputShape: [2, 6, 6])),
        ("a small CNN", ModelSpec(layers: [conv(1, 4, 3, pad: 1, bias: false), .batchNorm(features: 4), .relu,
                                           .maxPool2d(kernel: 2, stride: 2), conv(4, 6, 3, pad: 1, bias: false),
                                           .batchNorm(features: 6), .relu, .maxPool2d(kernel: 2, stride: 2), .flatten,
                                           .linear(inputs: 24, outputs: 8), .batchNorm(features: 8), .relu, .dropout(probability: 0.3),
                                           .linear(inputs: 8, outputs: 3)], inputShape: [1, 8, 8])),
    ]

    /// Tensors the cost does not depend on: a bias right before a normalisation that removes it.
    static let removedByNormalisation: [String: [String]] = [
        "batchnorm 1d": ["0.bias"], "layernorm on images": ["0.bias"], "a small CNN": ["9.bias"],
    ]

    /// A convolution whose batch of columns is over `Conv2d.keptColumnsLimit` lowers its samples again in backward
    /// instead of keeping them from the forward pass: the same gradients, to 1e-12, as the same layers keeping
    /// theirs, and the float64 check passes. (Every other test here runs small layers, which keep their columns.)
    @Test func aConvolutionTooLargeToKeepItsColumnsLowersThemAgain() throws {
        let spec = ModelSpec(layers: [Self.conv(2, 3, 3, stride: 2, pad: 2), .tanh, Self.conv(3, 2, 2, pad: 1), .flatten,
                                      .linear(inputs: 2 * 6 * 6, outputs: 3)], inputShape: [2, 7, 7])
        // The first convolution's columns: 2 x 3 x 3 rows by 5 x 5 positions per sample, in Double.
        let large = Int(Conv2d<Double>.keptColumnsLimit / Double(18 * 25 * 8)) + 1
        #expect(!Conv2d<Double>.keepsColumns(patch: 18, positions: 25, batchCapacity: Double(large), scalarBytes: 8))
        #expect(Conv2d<Double>.keepsColumns(patch: 18, positions: 25, batchCapacity: 3, scalarBytes: 8))
        let keeping = try checkedModel(spec)
        let lowering = try Model<Double>(spec: spec, batchCapacity: large, seed: 1)
        keeping.copyParameters(to: lowering)
        lowering.inputs.update(from: keeping.inputs, count: 3 * keeping.inputWidth)
        lowering.labels.update(from: keeping.labels, count: 3)
        for model in [keeping, lowering] {
            _ = model.forward(count: 3, mode: .train)
            model.backward(count: 3)
        }
        // The same to rounding: OpenBLAS's AVX-512 kernels may round an element of a product differently in buffers
        // of another alignment (1 gradient of the 200 differed in its last bit on one such machine).
        let differing = zip(keeping.gradients, lowering.gradients).filter { abs($0 - $1) > 1e-12 * max(abs($0), abs($1)) }.count
        #expect(differing == 0, "\(differing) of \(keeping.gradients.count) gradients differ")
        var options = GradientCheckOptions()
        options.checkAllCoordinates = true
        let report = checkGradients(model: lowering, count: 3, options: options)
        #expect(report.verdict == .pass, "\(report.text)")
    }

    @Test(arguments: models.indices)
    func everyLayerPassesTheFloat64Check(model index: Int) throws {
        let (name, spec) = Self.models[index]
        var options = GradientCheckOptions()
        options.checkAllCoordinates = true
        let report = checkGradients(model: try checkedModel(spec), count: 3, options: options)
        let removed = Self.removedByNormalisation[name] ?? []
        #expect(report.verdict == (removed.isEmpty ? .pass : .warn), "\(name):\n\(report.text)")
        #expect(report.deterministic)
        for tensor in report.tensors {
            #expect(tensor.checked > 0, "\(name): \(tensor.name) unchecked")
            if removed.contains(tensor.name) {
                #expect(tensor.verdict == .warn && tensor.note?.contains("the cost does not depend on this tensor") == true,
                        "\(name):\n\(report.text)")
            } else {
                // The float64 noise the pass threshold is chosen from (GradientCheckOptions.passThreshold).
                #expect(tensor.maxRelativeError <= 5e-6, "\(name): \(tensor.name) \(tensor.maxRelativeError)")
                #expect(tensor.verdict == .pass)
            }
        }
        #expect(report.direction.relativeError <= 1e-6, "\(name):\n\(report.text)")
    }

    // MARK: - A second implementation

    /// The convolution written as its definition, in Double: four nested sums with bounds tests.
    func naiveConvolution(_ x: [Double], _ w: [Double], _ b: [Double]?, c: Int, h: Int, wd: Int, o: Int, k: Int,
                          stride: Int, pad: Int) -> [Double] {
        let ho = (h + 2 * pad - k) / stride + 1, wo = (wd + 2 * pad - k) / stride + 1
        var y = [Double](repeating: 0, count: o * ho * wo)
        for oc in 0..<o {
            for i in 0..<ho {
                for j in 0..<wo {
                    var sum = b?[oc] ?? 0
                    for ic in 0..<c {
                        for p in 0..<k {
                            for q in 0..<k {
                                let r = i * stride + p - pad, s = j * stride + q - pad
                                if r >= 0 && r < h && s >= 0 && s < wd {
                                    sum += w[((oc * c + ic) * k + p) * k + q] * x[(ic * h + r) * wd + s]
                                }
                            }
                        }
                    }
                    y[(oc * ho + i) * wo + j] = sum
                }
            }
        }
        return y
    }

    @Test(arguments: [(3, 1, 0), (3, 1, 1), (3, 2, 1), (5, 2, 2), (2, 3, 0), (1, 1, 0), (4, 1, 3)])
    func convolutionMatchesItsDefinition(kernel: Int, stride: Int, pad: Int) throws {
        let (c, h, w, o) = (3, 7, 6, 4)
        let layer = Self.conv(c, o, kernel, stride: stride, pad: pad)
        let output = try layer.outputShape(input: [c, h, w])
        let spec = ModelSpec(layers: [layer, .flatten, .linear(inputs: output.reduce(1, *), outputs: 2)], inputShape: [c, h, w])
        let model = try checkedModel(spec, rows: 2)
        model.forward(count: 2, mode: .eval)
        let weights = tensorValues(model, "0.weight", in: model.parameters)
        let bias = tensorValues(model, "0.bias", in: model.parameters)
        // The convolution's output is the flatten's input: recompute the first linear layer's input row by row.
        let n = output.reduce(1, *)
        for row in 0..<2 {
            let x = (0..<(c * h * w)).map { model.inputs[row * c * h * w + $0] }
            let expected = naiveConvolution(x, weights, bias, c: c, h: h, wd: w, o: o, k: kernel, stride: stride, pad: pad)
            // y = W_lin * conv + b_lin: compare through the linear layer's own inputs (the conv's output buffer).
            let linear = model.tensor("2.weight", in: model.parameters)!
            let logits = (0..<2).map { r in (0..<n).reduce(tensorValues(model, "2.bias", in: model.parameters)[r]) { $0 + linear[r * n + $1] * expected[$1] } }
            #expect(allClose(logits, (0..<2).map { model.outputs[row * 2 + $0] }, 1e-12), "row \(row)")
        }
    }

    // MARK: - Batch norm's statistics

    @Test func batchNormKeepsRunningStatisticsAsPyTorchDoes() throws {
        let spec = ModelSpec(layers: [.batchNorm(features: 2), .linear(inputs: 2, outputs: 2)], inputShape: [2])
        let model = try Model<Double>(spec: spec, batchCapacity: 4)
        let batch: [Double] = [1, 10, 2, 20, 4, 30, 9, 40]  // feature 0: 1 2 4 9, feature 1: 10 20 30 40
        for i in batch.indices { model.inputs[i] = batch[i] }
        model.forward(count: 4, mode: .train)
        let mean0 = 4.0, mean1 = 25.0
        let unbiased0 = [1.0, 2, 4, 9].map { ($0 - mean0) * ($0 - mean0) }.reduce(0, +) / 3
        let unbiased1 = [10.0, 20, 30, 40].map { ($0 - mean1) * ($0 - mean1) }.reduce(0, +) / 3
        let running = model.bufferTable.map { info in (info.name, Array(model.buffers[info.range])) }
        #expect(running.map(\.0) == ["0.running_mean", "0.running_var", "0.num_batches_tracked"])
        #expect(allClose(running[0].1, [0.1 * mean0, 0.1 * mean1], 1e-12))
        #expect(allClose(running[1].1, [0.9 + 0.1 * unbiased0, 0.9 + 0.1 * unbiased1], 1e-12))
        #expect(running[2].1 == [1])
        // Evaluation normalises with the running statistics; the check mode with the batch's, keeping nothing.
        let before = Array(model.buffers)
        model.forward(count: 4, mode: .check)
        #expect(Array(model.buffers) == before)
        model.forward(count: 4, mode: .eval)
        #expect(Array(model.buffers) == before)
    }

    // MARK: - Kinks and injected bugs

    @Test func maxPoolWinnerChangesAreKinksSkippedAndCounted() throws {
        // A 1x1 convolution y = w x + b feeds one 2x2 window. With w = 0.5e-7, perturbing w by eps = 1e-4, and by
        // the smaller steps tried after it (down to 1e-6), flips its sign, and with it the window's winner (the
        // largest x for w > 0, the smallest for w < 0): a kink. The bias moves all four values alike and never
        // changes the winner.
        let spec = ModelSpec(layers: [Self.conv(1, 1, 1), .maxPool2d(kernel: 2, stride: 2), .flatten,
                                      .linear(inputs: 1, outputs: 2)], inputShape: [1, 2, 2])
        let model = try Model<Double>(spec: spec, batchCapacity: 1, seed: 2)
        for (i, v) in [1.0, -1.0, -2.0, -3.0].enumerated() { model.inputs[i] = v }
        model.labels[0] = 1
        setTensor(model, "0.weight", [0.5e-7])
        setTensor(model, "0.bias", [0.2])
        setTensor(model, "3.weight", [0.8, -0.6])
        var options = GradientCheckOptions()
        options.checkAllCoordinates = true
        let report = checkGradients(model: model, count: 1, options: options)
        let weight = try #require(report.tensors.first { $0.name == "0.weight" })
        #expect(weight.kinksSkipped == 1 && weight.checked == 0, "\(report.text)")
        let bias = try #require(report.tensors.first { $0.name == "0.bias" })
        #expect(bias.kinksSkipped == 0 && bias.checked == 1 && bias.verdict == .pass, "\(report.text)")
        #expect(report.verdict != .fail, "\(report.text)")
        // At w = 0.5e-5 the step of eps crosses, eps / 100 does not: compared there.
        setTensor(model, "0.weight", [0.5e-5])
        let closer = checkGradients(model: model, count: 1, options: options)
        let compared = try #require(closer.tensors.first { $0.name == "0.weight" })
        #expect(compared.kinksSkipped == 0 && compared.checked == 1 && compared.verdict == .pass, "\(closer.text)")
    }

    static let faults: [(GradientFault, ModelSpec, [String])] = [
        (.flippedKernel(tensor: "2.weight"),
         ModelSpec(layers: [conv(2, 3, 3, pad: 1), .tanh, conv(3, 2, 3, pad: 1), .flatten, .linear(inputs: 72, outputs: 3)],
                   inputShape: [2, 6, 6]), ["0.weight", "0.bias"]),
        (.paddingOffset(tensor: "2.weight"),
         ModelSpec(layers: [conv(2, 3, 3, pad: 1), .tanh, conv(3, 2, 3, pad: 1), .flatten, .linear(inputs: 72, outputs: 3)],
                   inputShape: [2, 6, 6]), ["0.weight", "0.bias"]),
        (.batchNormWithoutMeanTerm(tensor: "1.weight"),
         ModelSpec(layers: [conv(2, 3, 3, pad: 1, bias: false), .batchNorm(features: 3), .tanh, .flatten,
                            .linear(inputs: 108, outputs: 3)], inputShape: [2, 6, 6]), ["0.weight"]),
        (.missing(tensor: "1.weight"),
         ModelSpec(layers: [conv(2, 3, 3, pad: 1, bias: false), .batchNorm(features: 3), .tanh, .flatten,
                            .linear(inputs: 108, outputs: 3)], inputShape: [2, 6, 6]), ["1.weight"]),
    ]

    @Test(arguments: faults.indices)
    func injectedBugsInTheNewLayersFailAndNameTheTensor(fault index: Int) throws {
        let (fault, spec, broken) = Self.faults[index]
        let model = try checkedModel(spec)
        model.installGradientFault(fault)
        let report = checkGradients(model: model, count: 3)
        #expect(report.verdict == .fail, "\(fault):\n\(report.text)")
        #expect(report.tensors.filter { $0.verdict == .fail }.map(\.name) == broken, "\(fault):\n\(report.text)")
        for name in broken { #expect(report.text.contains("FAIL: \(name)"), "\(fault):\n\(report.text)") }
    }
}
