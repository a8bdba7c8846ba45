@testable import Engine
import Testing

/// Channel dropout (`dropout2d P`, PyTorch `nn.Dropout2d`): whole (sample, channel) planes zeroed or scaled, at the
/// rate P, drawn as `Dropout` draws; the backward pass through the same mask; the identity outside training. PyTorch
/// cannot draw the Engine's masks, so TorchReferenceTests compares it in evaluation only.
@Suite("Channel dropout")
struct Dropout2dTests {
    static let channels = 16, height = 3, width = 5

    /// conv, dropout2d, flatten, linear: the convolution gives dropout2d an input gradient to write.
    static func model(probability: Double, rows: Int, seed: UInt64 = 7) throws -> (Model<Double>, Layer<Double>) {
        let spec = ModelSpec(layers: [.conv2d(inChannels: 2, outChannels: channels, kernel: 3, stride: 1, padding: 1, bias: true),
                                      .dropout2d(probability: probability), .flatten,
                                      .linear(inputs: channels * height * width, outputs: 3)],
                             inputShape: [2, height, width])
        let model = try Model<Double>(spec: spec, batchCapacity: rows, seed: seed)
        fillRandomBatch(model, rows: rows, seed: seed)
        return (model, model.plan[1])
    }

    /// Each plane of the last forward pass: its factor, 0 where its first value is 0 and `scale` elsewhere, and
    /// whether every value of the plane had exactly that factor (x * factor == y, bit for bit).
    static func planeFactors(_ layer: Layer<Double>, rows: Int, scale: Double) -> [(factor: Double, whole: Bool)] {
        let size = height * width
        return (0..<(rows * channels)).map { p in
            let x = layer.x + p * size, y = layer.y + p * size
            let factor = y[0] == 0 ? 0 : scale
            return (factor, (0..<size).allSatisfy { y[$0] == x[$0] * factor })
        }
    }

    @Test(arguments: [0.2, 0.5])
    func wholePlanesAreDroppedAtTheRateP(probability: Double) throws {
        let rows = 200
        let (model, layer) = try Self.model(probability: probability, rows: rows)
        model.forward(count: rows, mode: .train)
        let planes = Self.planeFactors(layer, rows: rows, scale: 1 / (1 - probability))
        #expect(planes.allSatisfy { $0.whole }, "a plane was not zeroed or scaled by 1 / (1 - P) as a whole")
        // 3200 planes: the rate's standard deviation is at most 0.009.
        let dropped = Double(planes.filter { $0.factor == 0 }.count) / Double(planes.count)
        #expect(abs(dropped - probability) < 0.03, "dropped \(dropped) of the planes, P = \(probability)")
    }

    /// Each row's mask is what `Dropout` would draw from that row's generator (seed, sample, layer), one value per
    /// plane: so a sample's planes are dropped the same wherever it is trained, as with `Dropout`.
    @Test func theMaskIsDrawnAsDropoutDrawsIt() throws {
        let rows = 20, probability = 0.3
        let (model, layer) = try Self.model(probability: probability, rows: rows)
        model.forward(count: rows, mode: .train)
        let threshold = UInt64((1 - probability) * 0x1.0p53)
        let expected = (0..<rows).flatMap { row in
            var generator = model.dropoutGenerator(row: row, layer: 1)
            return (0..<Self.channels).map { _ in (generator.next() >> 11) < threshold }
        }
        #expect(Self.planeFactors(layer, rows: rows, scale: 1 / (1 - probability)).map { $0.factor != 0 } == expected)
        // Row 3 holding sample 0 draws what row 0 drew.
        let samples = [5, 6, 7, 0]
        samples.withUnsafeBufferPointer { model.setSamples(epoch: 0, indices: $0) }
        for row in 0..<3 { for j in 0..<(2 * Self.height * Self.width) { model.inputs[row * 30 + j] = 0 } }
        model.forward(count: 4, mode: .train)
        let again = Self.planeFactors(layer, rows: 4, scale: 1 / (1 - probability)).map { $0.factor != 0 }
        #expect(Array(again[(3 * Self.channels)...]) == Array(expected[..<Self.channels]))
    }

    @Test func backwardUsesTheForwardMask() throws {
        let rows = 30
        let (model, layer) = try Self.model(probability: 0.4, rows: rows)
        model.forward(count: rows, mode: .train)
        model.backward(count: rows)
        let planes = Self.planeFactors(layer, rows: rows, scale: 1 / 0.6), size = Self.height * Self.width
        let dx = try #require(layer.dx)
        #expect(planes.contains { $0.factor == 0 } && planes.contains { $0.factor != 0 })
        for (p, plane) in planes.enumerated() {
            let matches = (0..<size).allSatisfy { dx[p * size + $0] == layer.dy[p * size + $0] * plane.factor }
            #expect(matches, "plane \(p): dx is not dy times the plane's factor \(plane.factor)")
        }
    }

    /// Outside training the layer is the identity, forward and backward: evaluation and the gradient check alike.
    @Test(arguments: [ForwardMode.eval, .check])
    func isTheIdentityOutsideTraining(mode: ForwardMode) throws {
        let rows = 6
        let (model, layer) = try Self.model(probability: 0.5, rows: rows)
        model.forward(count: rows, mode: mode)
        model.backward(count: rows)
        let n = rows * layer.inputCount, dx = try #require(layer.dx)
        #expect((0..<n).allSatisfy { layer.y[$0] == layer.x[$0] && dx[$0] == layer.dy[$0] })
    }

    /// The float64 finite-difference check (in `check` mode, where dropout2d passes everything through).
    @Test func passesTheGradientCheck() throws {
        let (model, _) = try Self.model(probability: 0.5, rows: 3)
        let report = checkGradients(model: model, count: 3)
        #expect(report.verdict == .pass, "\(report.text)")
    }

    /// Flat samples have no channels to drop: the entry and the spec both say so.
    @Test func refusesFlatSamples() throws {
        #expect(throws: LayerEntryError(reason: "drops whole channels of image samples [C, H, W], but its input is [16]: "
                                            + "use 'dropout P' on flat samples")) {
            try LayerSpec.parse(["dropout2d", "0.5"], input: [16])
        }
        #expect(try LayerSpec.parse(["dropout2d", "0.5"], input: [4, 3, 3]) == .dropout2d(probability: 0.5))
        let flat = ModelSpec(layers: [.linear(inputs: 4, outputs: 4), .dropout2d(probability: 0.5), .linear(inputs: 4, outputs: 2)])
        #expect(throws: ModelSpecError.self) { try flat.validate() }
        let certain = ModelSpec(layers: [.dropout2d(probability: 1), .flatten, .linear(inputs: 9, outputs: 2)], inputShape: [1, 3, 3])
        #expect(throws: ModelSpecError("layer 0 Dropout2d(1.0): drop probability must be in [0, 1)")) { try certain.validate() }
    }
}
