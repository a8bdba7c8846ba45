@testable import Engine
import Foundation
import Testing

@Suite("Finite-difference gradient checker")
struct GradientCheckTests {
    static let activations: [LayerSpec] = [.relu, .leakyReLU(slope: 0.1), .tanh, .sigmoid, .gelu, .silu, .dropout(probability: 0.5)]

    @Test(arguments: activations, LossKind.allCases)
    func everyLayerAloneWithEveryLoss(activation: LayerSpec, loss: LossKind) throws {
        let spec = ModelSpec(layers: [.linear(inputs: 4, outputs: 5), activation, .linear(inputs: 5, outputs: 3)], loss: loss)
        var options = GradientCheckOptions()
        options.checkAllCoordinates = true
        let report = checkGradients(model: try checkedModel(spec), count: 4, options: options)
        #expect(report.verdict == .pass, "\(report.text)")
        #expect(report.deterministic)
        let checked: Int = report.tensors.map(\.checked).reduce(0, +)
        #expect(checked > 0)
        #expect(report.tensors.allSatisfy { $0.maxRelativeError <= 1e-6 || $0.kinksSkipped > 0 }, "\(report.text)")
        #expect(report.direction.relativeError <= 1e-4)
    }

    /// Smoothed targets change the loss's gradient (softmax - t, not softmax - onehot): finite differences of the
    /// smoothed loss itself must agree with it.
    @Test(arguments: [0.1, 0.4])
    func labelSmoothedCrossEntropy(smoothing: Double) throws {
        let spec = ModelSpec(layers: [.linear(inputs: 4, outputs: 5), .tanh, .linear(inputs: 5, outputs: 3)],
                             labelSmoothing: smoothing)
        var options = GradientCheckOptions()
        options.checkAllCoordinates = true
        let report = checkGradients(model: try checkedModel(spec), count: 4, options: options)
        #expect(report.verdict == .pass, "\(report.text)")
        #expect(report.tensors.allSatisfy { $0.maxRelativeError <= 1e-6 }, "\(report.text)")
    }

    @Test func linearLayerAloneChecksEveryCoordinate() throws {
        var options = GradientCheckOptions()
        options.checkAllCoordinates = true
        let model = try checkedModel(ModelSpec(layers: [.linear(inputs: 3, outputs: 4)]))
        let report = checkGradients(model: model, count: 4, options: options)
        #expect(report.verdict == .pass)
        #expect(report.tensors.map(\.checked) == [12, 4])
        // Two forward passes for J(theta) (the determinism check), one full pass per tensor, two per coordinate,
        // two for the direction.
        #expect(report.forwardPasses == 2 + 2 + 2 * 16 + 2)
        // Four significant digits at least, as the method promises in float64.
        #expect(report.tensors.allSatisfy { $0.maxRelativeError < 1e-7 })
    }

    @Test func deepComposedModelPasses() throws {
        let spec = ModelSpec(layers: [
            .linear(inputs: 10, outputs: 16), .gelu, .dropout(probability: 0.2),
            .linear(inputs: 16, outputs: 12), .tanh, .linear(inputs: 12, outputs: 8), .sigmoid,
            .linear(inputs: 8, outputs: 8), .leakyReLU(slope: 0.2), .linear(inputs: 8, outputs: 4),
        ])
        let report = checkGradients(model: try checkedModel(spec, rows: 6), count: 6)
        #expect(report.verdict == .pass, "\(report.text)")
        #expect(report.tensors.count == 10)
        #expect(report.tensors.allSatisfy { $0.checked > 0 && $0.gradientNorm > 0 })
    }

    static let faults: [GradientFault] = [
        .scaled(tensor: "2.weight", factor: 1.1), .scaled(tensor: "0.bias", factor: 0.5),
        .transposed(tensor: "0.weight"), .missing(tensor: "2.bias"), .missing(tensor: "0.weight"),
    ]

    @Test(arguments: faults)
    func injectedBugsFailAndNameTheTensor(fault: GradientFault) throws {
        let model = try checkedModel(.mlp(widths: [5, 6, 3], activation: .tanh))
        model.installGradientFault(fault)
        let report = checkGradients(model: model, count: 4)
        #expect(report.verdict == .fail)
        let broken = try #require(report.tensors.first { $0.name == fault.tensor })
        #expect(broken.verdict == .fail)
        #expect(report.failures.contains { $0.hasPrefix(fault.tensor) }, "\(report.failures)")
        #expect(report.text.contains("FAIL: \(fault.tensor)"))
        // Only the broken tensor fails.
        #expect(report.tensors.filter { $0.verdict == .fail }.map(\.name) == [fault.tensor])
        // The random direction touches every parameter, so it catches the bug too.
        #expect(report.direction.verdict != .pass)
    }

    /// A fault the model cannot carry is named with the reason, so that the command line's test switch refuses it:
    /// planted anyway, it left the backward pass correct, and a test that misspelt its tensor passed or failed for
    /// the wrong reason. Tensors inside blocks are looked up in the layer that owns them.
    @Test func aFaultTheModelCannotCarryIsNamedWithTheReason() throws {
        let spec = ResidualTests.models[1].1  // conv, batch norm, relu, 3: block with a projection, relu, flatten, 6: linear
        let model = try Model<Double>(spec: spec, batchCapacity: 4, seed: 1)
        for fault: GradientFault in [.flippedKernel(tensor: "3.body.3.weight"), .paddingOffset(tensor: "3.shortcut.0.weight"),
                                     .batchNormWithoutMeanTerm(tensor: "3.shortcut.1.weight"), .transposed(tensor: "6.weight"),
                                     .scaled(tensor: "6.bias", factor: 2), .missing(tensor: "3.body.1.bias")] {
            #expect(model.whyGradientFaultCannotBePlanted(fault) == nil, "\(fault)")
        }
        let refused: [(GradientFault, String)] = [
            (.missing(tensor: "7.weight"), "the model has no tensor '7.weight' (its tensors: 0.weight, 1.weight, 1.bias, 3.body.0.weight"),
            (.flippedKernel(tensor: "3.body.1.weight"), "a flipped kernel or padding offset needs a convolution's tensor; 3.body.1.weight belongs to BatchNorm(4)"),
            (.transposed(tensor: "3.body.0.weight"), "a transposed gradient needs a matrix [out, in]; 3.body.0.weight is [4, 3, 3, 3]"),
            (.batchNormWithoutMeanTerm(tensor: "6.weight"), "a missing mean term needs a batch norm's tensor; 6.weight belongs to Linear"),
            (.batchNormLocalSums(tensor: "3.body.0.weight"), "local sums need a batch norm's tensor; 3.body.0.weight belongs to Conv2d"),
            (.paddingOffset(tensor: "0.weight"), "which is the first layer: no layer uses its input gradient"),
            // The projection's 1x1 kernel turned by 180 degrees is itself: planted, the check passed.
            (.flippedKernel(tensor: "3.shortcut.0.weight"), "a flipped kernel needs a kernel larger than 1x1 (a 1x1 one turned is itself); "
                + "3.shortcut.0.weight belongs to Conv2d"),
        ]
        for (fault, reason) in refused {
            let problem = model.whyGradientFaultCannotBePlanted(fault)
            #expect(problem?.contains(reason) == true, "\(fault): \(problem ?? "nil")")
        }
        #expect(model.whyGradientFaultCannotBePlanted(.batchNormLocalSums(tensor: "3.body.4.weight")) == nil)
    }

    @Test func missingGradientIsReportedAsNotInfluencingTheCost() throws {
        let model = try checkedModel(.mlp(widths: [5, 6, 3]))
        model.installGradientFault(.missing(tensor: "2.weight"))
        let report = checkGradients(model: model, count: 4)
        let tensor = try #require(report.tensors.first { $0.name == "2.weight" })
        #expect(tensor.gradientNorm == 0)
        #expect(tensor.note?.contains("does not influence the cost") == true)
        #expect(tensor.worst.map { $0.analytic == 0 && $0.numeric != 0 } == true)
    }

    /// One row through [3, 8, 2]; the first layer's even units get a pre-activation of `distance`, the odd ones 0.5.
    /// (With `allUnits`, every unit gets `distance`.)
    func modelWithUnitsNearTheKink(distance: Double, allUnits: Bool = false) throws -> Model<Double> {
        let model = try Model<Double>(spec: .mlp(widths: [3, 8, 2]), batchCapacity: 1, seed: 3)
        fillRandomBatch(model, rows: 1, seed: 3)
        let w = model.tensor("0.weight", in: model.parameters)!
        let b = model.tensor("0.bias", in: model.parameters)!
        for j in 0..<8 {
            let pre = (0..<3).reduce(0.0) { $0 + w[j * 3 + $1] * model.inputs[$1] }
            b[j] = allUnits || j % 2 == 0 ? distance - pre : 0.5 - pre
        }
        return model
    }

    @Test func kinksAreSkippedAndReplaced() throws {
        // Half of the units 5e-7 from the ReLU kink: perturbing their bias crosses it at every step down to eps / 100.
        // (Not closer: the output layer's gradients are those units' activations times the loss's, and below about
        // 1e-7 they fall to where the difference quotient's rounding is a visible part of them.)
        let model = try modelWithUnitsNearTheKink(distance: 5e-7)
        var options = GradientCheckOptions()
        options.samplesPerTensor = 4  // strata of two biases: one near the kink, one far from it
        let report = checkGradients(model: model, count: 1, options: options)
        let bias = try #require(report.tensors.first { $0.name == "0.bias" })
        #expect(bias.kinksSkipped > 0)
        #expect(bias.checked == 4)
        #expect(bias.verdict == .pass, "\(report.text)")
        #expect(report.tensors.allSatisfy { $0.verdict == .pass }, "\(report.text)")
        #expect(report.passed, "\(report.text)")
    }

    /// 1e-5 from the kink: a bias's step of eps crosses it, eps / 100 does not, so the coordinate is compared there
    /// instead of being replaced. The random direction moves all 50 parameters by eps / sqrt(50), 1.4e-5 each: at
    /// eps it crosses; the next, at eps / 10, moves the units by a few 1e-6 and is compared.
    @Test func aCoordinateOrADirectionNearAKinkIsComparedAtASmallerStep() throws {
        let model = try modelWithUnitsNearTheKink(distance: 1e-5)
        var options = GradientCheckOptions()
        options.samplesPerTensor = 8
        options.checkAllCoordinates = true
        let report = checkGradients(model: model, count: 1, options: options)
        let bias = try #require(report.tensors.first { $0.name == "0.bias" })
        #expect(bias.kinksSkipped == 0 && bias.checked == 8, "\(report.text)")
        #expect(bias.maxRelativeError <= 1e-6, "\(report.text)")
        #expect(report.direction.kinksSkipped >= 1)
        #expect(report.direction.epsilon < options.epsilon)
        #expect(report.direction.note == nil && report.direction.verdict == .pass, "\(report.text)")
        #expect(report.direction.relativeError <= 1e-6, "\(report.text)")
        #expect(report.text.contains("random direction (eps 1.00e-05)") || report.text.contains("random direction (eps 1.00e-06)"),
                "\(report.text)")
        #expect(report.passed, "\(report.text)")
    }

    /// A wrong gradient is still caught at the smaller steps. Every unit 1e-5 from its kink, so that every bias
    /// straddles it at eps and each coordinate checked was compared at a smaller step; with the bias gradient 0.1%
    /// off, those comparisons fail (the far units of the other tests would fail at eps and show nothing).
    @Test func aCoordinateComparedAtASmallerStepStillCatchesAWrongGradient() throws {
        let model = try modelWithUnitsNearTheKink(distance: 1e-5, allUnits: true)
        model.installGradientFault(.scaled(tensor: "0.bias", factor: 1.001))
        var options = GradientCheckOptions()
        options.checkAllCoordinates = true
        let report = checkGradients(model: model, count: 1, options: options)
        let bias = try #require(report.tensors.first { $0.name == "0.bias" })
        #expect(bias.kinksSkipped == 0 && bias.verdict == .fail, "\(report.text)")
        #expect(bias.checked == 8 && bias.maxRelativeError >= 5e-4, "\(report.text)")
    }

    /// A correct coordinate whose difference quotient is off by its truncation error, eps^2 / 6 times the ratio of
    /// the third derivative to the first. One input of 300 into tanh: d/dw tanh(300 w + b) has a third derivative
    /// about 300^2 times its first, so at eps the quotient is about 3e-4 off, as correct models were with
    /// `gradcheck.all` (an MLP with batch norm over a check batch of 4) until the check measured such a coordinate again
    /// at the smaller steps, where truncation falls with the step squared. The same coordinate 0.1% wrong still fails:
    /// it is wrong at every step.
    @Test func aCoordinateOffByTruncationIsMeasuredAtASmallerStepAndAWrongOneStillFails() throws {
        func steepModel() throws -> Model<Double> {
            let model = try Model<Double>(spec: ModelSpec(layers: [.linear(inputs: 1, outputs: 1), .tanh, .linear(inputs: 1, outputs: 2)]),
                                          batchCapacity: 1, seed: 5)
            model.inputs[0] = 300
            model.labels[0] = 1
            setTensor(model, "0.weight", [0.001])
            setTensor(model, "0.bias", [-0.1])  // z = 0.2
            setTensor(model, "2.weight", [0.7, -0.4])
            setTensor(model, "2.bias", [0.05, -0.02])
            return model
        }
        let model = try steepModel()
        model.zeroGradients()
        model.forward(count: 1, mode: .check)
        model.backward(count: 1)
        let analytic = model.gradients[0]
        let eps = GradientCheckOptions().epsilon
        func cost(_ w: Double) -> Double {
            model.parameters[0] = w
            defer { model.parameters[0] = 0.001 }
            return model.forward(count: 1, mode: .check).loss
        }
        let atEps = (cost(0.001 + eps) - cost(0.001 - eps)) / (2 * eps)
        let atTenth = (cost(0.001 + eps / 10) - cost(0.001 - eps / 10)) / (eps / 5)
        // Truncation, not a wrong gradient: about 100 times smaller at a tenth of the step.
        #expect(relativeError(analytic, atEps) > 1e-4, "\(analytic) \(atEps)")
        #expect(relativeError(analytic, atTenth) < relativeError(analytic, atEps) / 50, "\(analytic) \(atTenth)")

        var options = GradientCheckOptions()
        options.checkAllCoordinates = true
        let report = checkGradients(model: try steepModel(), count: 1, options: options)
        let weight = try #require(report.tensors.first { $0.name == "0.weight" })
        #expect(weight.checked == 1 && weight.maxRelativeError <= options.passThreshold, "\(report.text)")
        // The random direction moves that weight too (6e-5 off at eps): measured again at the smaller steps as well.
        #expect(report.direction.verdict == .pass && report.direction.epsilon < options.epsilon, "\(report.text)")
        #expect(report.passed, "\(report.text)")

        let broken = try steepModel()
        broken.installGradientFault(.scaled(tensor: "0.weight", factor: 1.001))
        let failed = checkGradients(model: broken, count: 1, options: options)
        let wrong = try #require(failed.tensors.first { $0.name == "0.weight" })
        #expect(wrong.verdict == .fail && wrong.maxRelativeError >= 5e-4, "\(failed.text)")
        #expect(failed.tensors.filter { $0.verdict == .fail }.map(\.name) == ["0.weight"], "\(failed.text)")
    }

    @Test func aDirectionThatCrossesAKinkAtEveryStepIsReportedNotFailed() throws {
        // 1e-9 from the kink: even eps / 100 moves the units by about 1e-7, so every direction crosses.
        let model = try modelWithUnitsNearTheKink(distance: 1e-9)
        var options = GradientCheckOptions()
        options.samplesPerTensor = 4
        let report = checkGradients(model: model, count: 1, options: options)
        #expect(report.direction.kinksSkipped == options.kinkRetries + 1)
        #expect(report.direction.epsilon == options.epsilon * 0.01)
        #expect(report.direction.verdict == .warn && report.direction.note != nil)
        #expect(report.passed, "\(report.text)")
    }

    /// A wrong backward pass fails the direction at the smaller steps too: it is compared at eps / 10 here, where
    /// 0.1% off the first layer's weight gradient moves grad . u by far more than the pass threshold.
    @Test func aDirectionComparedAtASmallerStepStillCatchesAWrongGradient() throws {
        let model = try modelWithUnitsNearTheKink(distance: 1e-5)
        model.installGradientFault(.scaled(tensor: "0.weight", factor: 1.001))
        let report = checkGradients(model: model, count: 1)
        #expect(report.direction.epsilon < GradientCheckOptions().epsilon)
        #expect(report.direction.verdict != .pass, "\(report.text)")
    }

    /// A batch like Fashion-MNIST's: a constant background with a random patch. Through a lowered convolution, batch
    /// norm, ReLU and a Winograd convolution, the background's windows are the same function of the parameters at
    /// every position but round differently across a tile, and max pooling picks among them by rounding. Those are not
    /// kinks (`appendPoolKinkPattern`): every coordinate of the first layer is checked, and the random direction is
    /// compared. When the pattern was the recorded winners, the shipped fashion-cnn checked none of its first layer's.
    @Test(arguments: [true, false])
    func tiesThatRoundingOrdersAreNotKinks(fused: Bool) throws {
        let conv = { (i: Int, o: Int) in LayerSpec.conv2d(inChannels: i, outChannels: o, kernel: 3, stride: 1, padding: 1, bias: false) }
        let spec = ModelSpec(layers: [conv(1, 16), .batchNorm(features: 16), .relu, conv(16, 16), .batchNorm(features: 16),
                                      .relu, .maxPool2d(kernel: 2, stride: 2), .flatten, .linear(inputs: 16 * 5 * 5, outputs: 3)],
                             inputShape: [1, 10, 10])
        let rows = 4
        let model = try Model<Double>(spec: spec, batchCapacity: rows, seed: 2, fusesBlocks: fused)
        #expect((model.plan[3] as? Conv2d<Double>)?.runsWinograd == true)
        var g = RandomGenerator(seed: 9, stream: .test)
        for row in 0..<rows {
            for q in 0..<100 {
                let (i, j) = q.quotientAndRemainder(dividingBy: 10)
                model.inputs[row * 100 + q] = (3..<6).contains(i) && (3..<6).contains(j) ? g.nextNormal() : -0.8
            }
            model.labels[row] = Int32(row % 3)
        }
        let report = checkGradients(model: model, count: rows)
        let first = try #require(report.tensors.first { $0.name == "0.weight" })
        #expect(first.checked == GradientCheckOptions().samplesPerTensor, "\(report.text)")
        #expect(report.tensors.allSatisfy { $0.verdict == .pass }, "\(report.text)")
        #expect(report.direction.note == nil && report.direction.verdict == .pass, "\(report.text)")
    }

    /// The pattern of one window: the first input within the tolerance of the largest, not the largest.
    @Test func aWindowsKinkPatternIsItsFirstInputWithinRoundingOfTheLargest() {
        func pattern(_ window: [Double]) -> [Int32] {
            var pattern: [Int32] = []
            window.withUnsafeBufferPointer {
                appendPoolKinkPattern($0.baseAddress!, samples: 1, channels: 1, height: 2, width: 2, kernel: 2, stride: 2,
                                      outHeight: 1, outWidth: 1, normalization: nil, to: &pattern)
            }
            return pattern
        }
        #expect(pattern([0.5, 1.0, 1.0 + 1e-15, 0.2]) == [1])
        #expect(pattern([1.0 + 1e-15, 0.5, 0.2, 1.0]) == [0])
        #expect(pattern([0.5, 1.0, 1.0 + 1e-9, 0.2]) == [2])
        #expect(pattern([-3.0, -2.0, -2.0 - 1e-14, -2.5]) == [1])
        #expect(pattern([-3.0, -2.0 - 1e-14, -2.0, -2.5]) == [1])
    }

    /// A tanh unit deep in saturation (z = 12) behind an input of 200: its weight's gradient is 8e-9, and the
    /// difference's truncation error (eps^2 / 6 times the third derivative over the first, about 4 x^2) is 1.7e-4 of
    /// it (the old code failed it), yet only 1.7e-12: far below the quotient's rounding level, 2e-10 here. `gradcheck.all` failed such
    /// coordinates of correct convolutions. Now a difference within that level counts as the pass threshold at most;
    /// a gradient 0.1% wrong where it is larger still fails.
    @Test func aTinyGradientOffByLessThanRoundingPassesAndAWrongOneStillFails() throws {
        func saturatedModel() throws -> Model<Double> {
            let model = try Model<Double>(spec: .mlp(widths: [1, 1, 2], activation: .tanh), batchCapacity: 1, seed: 1)
            fillRandomBatch(model, rows: 1, seed: 1)
            model.inputs[0] = 200
            setTensor(model, "0.weight", [0.06])
            setTensor(model, "0.bias", [0])
            setTensor(model, "2.weight", [0.8, -0.5])
            setTensor(model, "2.bias", [0.1, 0])
            return model
        }
        var options = GradientCheckOptions()
        options.checkAllCoordinates = true
        let report = checkGradients(model: try saturatedModel(), count: 1, options: options)
        let weight = try #require(report.tensors.first { $0.name == "0.weight" })
        let worst = try #require(weight.worst)
        #expect(abs(worst.analytic) < 1e-7 && abs(worst.analytic) > 1e-9, "\(report.text)")
        #expect(relativeError(worst.analytic, worst.numeric) > options.warnThreshold, "the regime that failed before: \(report.text)")
        #expect(abs(worst.analytic - worst.numeric) < 1e-10, "\(report.text)")
        #expect(report.passed, "\(report.text)")

        let wrong = try saturatedModel()
        wrong.installGradientFault(.scaled(tensor: "2.weight", factor: 1.001))
        let failed = checkGradients(model: wrong, count: 1, options: options)
        #expect(!failed.passed && failed.tensors.first { $0.name == "2.weight" }?.verdict == .fail, "\(failed.text)")
    }

    /// Units saturated so far that tanh is exactly 1: the gradient and every finite difference of the first layer are
    /// exactly 0. That is a cost that does not depend on the tensor there (a warning), not a missing backward write,
    /// which the check failed it as; a missing write (a zero gradient against finite differences) still fails.
    @Test func aTensorTheCostIgnoresExactlyWarnsAndAMissingWriteStillFails() throws {
        let model = try Model<Double>(spec: .mlp(widths: [1, 2, 2], activation: .tanh), batchCapacity: 1, seed: 1)
        fillRandomBatch(model, rows: 1, seed: 1)
        model.inputs[0] = 1e4
        setTensor(model, "0.weight", [1, -1])
        setTensor(model, "0.bias", [0, 0])
        var options = GradientCheckOptions()
        options.checkAllCoordinates = true
        let report = checkGradients(model: model, count: 1, options: options)
        let weight = try #require(report.tensors.first { $0.name == "0.weight" })
        #expect(weight.gradientNorm == 0 && weight.verdict == .warn, "\(report.text)")
        #expect(weight.note?.contains("the cost does not depend on this tensor on the check batch") == true, "\(report.text)")
        #expect(report.passed, "\(report.text)")
        let missing = try checkedModel(.mlp(widths: [5, 6, 3]))
        missing.installGradientFault(.missing(tensor: "0.weight"))
        #expect(checkGradients(model: missing, count: 4).tensors.first { $0.name == "0.weight" }?.verdict == .fail)
    }

    @Test func verdictsHoldFourSignificantDigits() throws {
        // Above 1e-4 relative fails: a weight gradient 0.1% wrong, a bias gradient 0.03% wrong.
        for (tensor, factor) in [("0.weight", 1.001), ("0.bias", 1.0003), ("2.weight", 0.9995)] {
            let model = try checkedModel(.mlp(widths: [5, 6, 3], activation: .tanh))
            model.installGradientFault(.scaled(tensor: tensor, factor: factor))
            let report = checkGradients(model: model, count: 4)
            #expect(report.verdict == .fail, "\(tensor) x \(factor):\n\(report.text)")
            #expect(!report.passed)
            #expect(report.tensors.first { $0.name == tensor }?.verdict == .fail)
        }
        // Between the float64 noise (1e-5) and four digits: a warning, and the job goes on.
        let model = try checkedModel(.mlp(widths: [5, 6, 3], activation: .tanh))
        model.installGradientFault(.scaled(tensor: "0.weight", factor: 1.00003))
        let report = checkGradients(model: model, count: 4)
        #expect(report.verdict == .warn, "\(report.text)")
        #expect(report.passed)
        #expect(report.tensors.first { $0.name == "0.weight" }?.verdict == .warn)
    }

    @Test func reportIsReadableAndJSON() throws {
        let report = checkGradients(model: try checkedModel(.mlp(widths: [4, 5, 3])), count: 4)
        #expect(report.text.contains("0.weight"))
        #expect(report.text.contains("[5, 4]"))
        #expect(report.text.contains("float64"))
        #expect(report.json.contains("\"verdict\" : \"pass\""))
        #expect(report.json.contains("\"maxRelativeError\""))
        let decoded = try JSONDecoder().decode(GradientCheckReport.self, from: Data(report.json.utf8))
        #expect(decoded.direction == report.direction)
        // A report from before directions took smaller steps has no step of its own: the default's.
        var old = try #require(JSONSerialization.jsonObject(with: Data(report.json.utf8)) as? [String: Any])
        var direction = try #require(old["direction"] as? [String: Any])
        direction["epsilon"] = nil
        old["direction"] = direction
        let older = try JSONDecoder().decode(GradientCheckReport.self, from: JSONSerialization.data(withJSONObject: old))
        #expect(older.direction.epsilon == GradientCheckOptions().epsilon && older.direction.analytic == report.direction.analytic)
    }

    @Test func relativeErrorFormula() {
        #expect(relativeError(1, 1) == 0)
        #expect(abs(relativeError(1.0001, 1) - 0.0001 / 1.0001) < 1e-15)
        #expect(relativeError(0, 0) == 0)
        #expect(relativeError(1e-12, 0) == 1e-12 / 1e-8)
    }
}
