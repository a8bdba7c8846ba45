import Engine
import Foundation
import Testing

@Suite("Model structure, initialisation and buffers")
struct ModelTests {
    @Test func parameterTableFollowsPyTorchSequential() throws {
        let spec = ModelSpec.mlp(widths: [784, 256, 128, 10])
        #expect(spec.layers == [.linear(inputs: 784, outputs: 256), .relu, .linear(inputs: 256, outputs: 128), .relu,
                                .linear(inputs: 128, outputs: 10)])
        let table = spec.parameterTable
        #expect(table.map(\.name) == ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"])
        #expect(table.map(\.shape) == [[256, 784], [256], [128, 256], [128], [10, 128], [10]])
        #expect(table.map(\.offset) == [0, 200_704, 200_960, 233_728, 233_856, 235_136])
        let model = try Model<Float>(spec: spec, batchCapacity: 4)
        #expect(model.parameterCount == 235_146)
        // Dropout layers take an index too, exactly as in nn.Sequential.
        #expect(ModelSpec.mlp(widths: [4, 8, 2], dropout: 0.5).parameterTable.map(\.name)
                == ["0.weight", "0.bias", "3.weight", "3.bias"])
    }

    /// The footprint is computed from shapes alone, before allocating; the model's own buffers are the reference.
    @Test(arguments: [
        ModelSpec.mlp(widths: [784, 512, 256, 10]),
        ModelSpec.mlp(widths: [12, 32, 32, 3], activation: .tanh, dropout: 0.2),
        ModelSpec(layers: [.linear(inputs: 5, outputs: 8), .gelu, .relu, .dropout(probability: 0.1), .linear(inputs: 8, outputs: 4),
                           .relu, .leakyReLU(slope: 0.1), .linear(inputs: 4, outputs: 2)]),
        ModelSpec(layers: [.linear(inputs: 3, outputs: 2)], loss: .meanSquaredError),
    ])
    func footprintMatchesWhatTheModelAllocates(spec: ModelSpec) throws {
        for batch in [1, 7, 64] {
            let footprint = Model<Float>.footprint(spec: spec, batchCapacity: batch)
            let model = try Model<Float>(spec: spec, batchCapacity: batch)
            #expect(footprint.parameters == Double(model.parameterCount))
            #expect(footprint.arenaElements == Double(model.arenaCount), "batch \(batch)")
            #expect(Model<Double>.footprint(spec: spec, batchCapacity: batch).arenaElements == Double(model.arenaCount))
        }
    }

    /// A model no machine holds is counted (in floating point), so the memory check can say so; one whose tensors
    /// pass 2^40 values is refused by its shapes before anything multiplies their sizes in Int.
    @Test func footprintOfAnImpossibleModelIsCountedNotOverflowed() {
        let huge = ModelSpec.mlp(widths: [784, 1_000_000, 1_000_000, 1_000_000, 10])
        let footprint = Model<Float>.footprint(spec: huge, batchCapacity: 64)
        #expect(footprint.parameters > 2e12)
        #expect(footprint.parameterBufferBytes > 8e12)
        let beyond = ModelSpec.mlp(widths: [784, 10_000_000_000, 10])
        #expect(throws: ModelSpecError("layer 0 Linear(784, 10000000000): its weight [10000000000, 784] would hold more than "
                                       + "2^40 values")) { try beyond.validate() }
    }

    @Test func largeBuffersStartOnHugePageBoundaries() throws {
        // Parameters, gradient storage and optimizer state start on 2 MiB boundaries so huge pages can back them.
        let model = try Model<Float>(spec: .mlp(widths: [784, 1024, 1024, 10]), batchCapacity: 8)
        let optimizer = try Optimizer<Float>(config: .init(kind: .adam), parameterCount: model.parameterCount)
        let starts = [UnsafeRawPointer(model.parameters.baseAddress!), UnsafeRawPointer(model.gradients.baseAddress!)]
            + optimizer.state.map { UnsafeRawPointer($0.buffer.baseAddress!) }
        for start in starts { #expect(Int(bitPattern: start) % (2 << 20) == 0) }
        // And they are ordinary memory: written whole and read back.
        for i in 0..<model.parameterCount { model.gradients[i] = Float(i % 7) }
        #expect(model.gradients.reduce(0, +) == Float((0..<model.parameterCount).reduce(0) { $0 + $1 % 7 }))
    }

    /// A fused batch norm, ReLU, max pooling block is timed once, at its batch norm's index, and the loss after every
    /// layer of the spec (`spec.layers.count`), never at an index a layer has (the timeline names events by index).
    @Test func layerTimerReportsAFusedBlockOnceAndTheLossAfterEveryLayer() throws {
        let spec = ModelSpec(layers: [.conv2d(inChannels: 1, outChannels: 2, kernel: 3, stride: 1, padding: 1, bias: false),
                                      .batchNorm(features: 2), .relu, .maxPool2d(kernel: 2, stride: 2), .flatten,
                                      .linear(inputs: 8, outputs: 3)], inputShape: [1, 4, 4])
        let model = try Model<Float>(spec: spec, batchCapacity: 2)
        fillRandomBatch(model, rows: 2, seed: 3)
        var reports: [(Int, Model<Float>.Pass)] = []
        model.layerTimer = { index, pass, _, _ in reports.append((index, pass)) }
        model.forward(count: 2, mode: .train)
        model.backward(count: 2)
        #expect(reports.map(\.0) == [0, 1, 4, 5, 6, 5, 4, 1, 0], "\(reports)")
        #expect(model.timedLayerNames[1] == "BatchNorm(2) ReLU MaxPool2d(2)")
    }

    @Test func layerTimerReportsEveryLayerOfBothPassesInOrder() throws {
        let model = try Model<Float>(spec: .mlp(widths: [6, 5, 4, 3]), batchCapacity: 2)
        for i in 0..<12 { model.inputs[i] = Float(i) / 7 - 0.5 }
        model.labels[0] = 1
        model.labels[1] = 2
        var reports: [(Int, Model<Float>.Pass, UInt64, UInt64)] = []
        model.layerTimer = { reports.append(($0, $1, $2, $3)) }
        let layers = model.spec.layers.count   // Linear ReLU Linear ReLU Linear
        model.forward(count: 2, mode: .train)
        // When each layer's gradients were reported ready: inside that layer's backward span (the timeline nests
        // what the callback records in it).
        var ready: [(offset: Int, at: UInt64)] = []
        model.backward(count: 2) { ready.append(($0, DispatchTime.now().uptimeNanoseconds)) }
        #expect(reports.map(\.0) == Array(0...layers) + Array((0..<layers).reversed()))
        #expect(reports.map(\.1) == Array(repeating: .forward, count: layers + 1) + Array(repeating: .backward, count: layers))
        // Spans in the order the layers ran, one after another, each a second at most.
        #expect(reports.allSatisfy { $0.2 <= $0.3 && $0.3 - $0.2 < 1_000_000_000 })
        #expect(zip(reports, reports.dropFirst()).allSatisfy { $0.3 <= $1.2 })
        let withParameters = model.parameterTable.filter { $0.name.hasSuffix(".weight") }.map(\.layerIndex)
        #expect(ready.count == withParameters.count)
        for (offset, at) in ready {
            let layer = model.parameterTable.first { $0.offset == offset }!.layerIndex
            let span = reports.first { $0.0 == layer && $0.1 == .backward }!
            #expect(span.2 <= at && at <= span.3, "layer \(layer)")
        }
        // Switched off, the passes report nothing.
        model.layerTimer = nil
        reports.removeAll()
        model.forward(count: 2, mode: .train)
        #expect(reports.isEmpty)
    }

    @Test func invalidArchitecturesAreRejectedWithTheLayerNamed() {
        #expect(throws: ModelSpecError("layer 2 Linear(5, 2): expects 5 inputs but the previous layer produces 4")) {
            try ModelSpec(layers: [.linear(inputs: 3, outputs: 4), .relu, .linear(inputs: 5, outputs: 2)]).validate()
        }
        #expect(throws: ModelSpecError.self) { try ModelSpec(layers: [.relu]).validate() }
        #expect(throws: ModelSpecError.self) {
            try ModelSpec(layers: [.linear(inputs: 3, outputs: 4), .dropout(probability: 1)]).validate()
        }
        #expect(throws: ModelSpecError.self) { try ModelSpec(layers: [.linear(inputs: 3, outputs: 1)]).validate() }
        #expect(throws: ModelSpecError("batch size must be at least 1, got 0")) {
            _ = try Model<Float>(spec: .mlp(widths: [2, 2]), batchCapacity: 0)
        }
        // Images: every reason names the layer.
        func message(_ layers: [LayerSpec], input: [Int]) -> String {
            do { try ModelSpec(layers: layers, inputShape: input).validate() } catch { return error.description }
            return "valid"
        }
        let conv = LayerSpec.conv2d(inChannels: 1, outChannels: 4, kernel: 3, stride: 1, padding: 1, bias: true)
        #expect(message([conv, .flatten, .linear(inputs: 4 * 28 * 28, outputs: 10)], input: [1, 28, 28]) == "valid")
        #expect(message([.conv2d(inChannels: 1, outChannels: 4, kernel: 7, stride: 1, padding: 0, bias: true), .flatten,
                         .linear(inputs: 16, outputs: 2)], input: [1, 5, 5])
                == "layer 0 Conv2d(1, 4, kernel_size=7): kernel 7 is larger than its padded input 5x5")
        #expect(message([conv, .linear(inputs: 4 * 28 * 28, outputs: 10)], input: [1, 28, 28])
                == "layer 1 Linear(3136, 10): takes flat samples of 3136 values, but its input is [4, 28, 28]: put a flatten before it")
        #expect(message([conv, .flatten, .linear(inputs: 10, outputs: 2)], input: [1, 28, 28])
                == "layer 2 Linear(10, 2): expects 10 inputs but the previous layer produces 3136")
        #expect(message([conv, .flatten, .linear(inputs: 3136, outputs: 2)], input: [3, 28, 28])
                == "layer 0 Conv2d(1, 4, kernel_size=3, padding=1): expects 1 input channels but its input has 3 (shape [3, 28, 28])")
        #expect(message([.maxPool2d(kernel: 2, stride: 2), .flatten, .linear(inputs: 3, outputs: 2)], input: [12])
                == "layer 0 MaxPool2d(2): pooling needs image samples [C, H, W], but its input is [12]")
        #expect(message([conv, .batchNorm(features: 5), .flatten, .linear(inputs: 3136, outputs: 2)], input: [1, 28, 28])
                == "layer 1 BatchNorm(5): expects 5 features (channels) but its input is [4, 28, 28]")
        #expect(message([conv, .maxPool2d(kernel: 0, stride: 1)], input: [1, 28, 28])
                == "layer 1 MaxPool2d(0, stride=1): kernel and stride must be positive")
        #expect(message([conv], input: [1, 28, 28])
                == "the model's output is [4, 28, 28] per sample; it must be flat (end with linear, or flatten)")
    }

    @Test func initialisationIsSeededAndScaled() throws {
        let spec = ModelSpec.mlp(widths: [400, 300, 10], activation: .relu)
        let a = try Model<Float>(spec: spec, batchCapacity: 1, seed: 7)
        let b = try Model<Float>(spec: spec, batchCapacity: 1, seed: 7)
        let c = try Model<Float>(spec: spec, batchCapacity: 1, seed: 8)
        let d = try Model<Double>(spec: spec, batchCapacity: 1, seed: 7)
        #expect(Array(a.parameters) == Array(b.parameters))
        #expect(Array(a.parameters) != Array(c.parameters))
        // Float and Double models of one seed start from the same values, rounded.
        #expect((0..<a.parameterCount).allSatisfy { a.parameters[$0] == Float(d.parameters[$0]) })
        // Kaiming for the ReLU layer: std sqrt(2 / 400); Xavier for the last: std sqrt(2 / 310).
        func std(_ values: [Double]) -> Double {
            let mean = values.reduce(0, +) / Double(values.count)
            return (values.map { ($0 - mean) * ($0 - mean) }.reduce(0, +) / Double(values.count)).squareRoot()
        }
        let w0 = tensorValues(d, "0.weight", in: d.parameters)
        let w2 = tensorValues(d, "2.weight", in: d.parameters)
        #expect(abs(std(w0) / (2.0 / 400).squareRoot() - 1) < 0.01)
        #expect(abs(std(w2) / (2.0 / 310).squareRoot() - 1) < 0.05)
        #expect(tensorValues(d, "0.bias", in: d.parameters).allSatisfy { $0 == 0 })
        // Uniform schemes stay inside their bounds.
        let u = try Model<Double>(spec: .mlp(widths: [50, 20, 2], initialization: .xavierUniform), batchCapacity: 1)
        let bound = (6.0 / 70).squareRoot()
        let uw = tensorValues(u, "0.weight", in: u.parameters)
        #expect(uw.allSatisfy { abs($0) <= bound } && uw.contains { abs($0) > 0.9 * bound })
    }

    /// `model.init: auto` draws a layer's weights for the first layer after it that is not transparent (dropout,
    /// normalisation, pooling, flatten): Kaiming, with the activation's gain, before a rectifier; Xavier otherwise.
    static let fedLayers: [(LayerSpec, Double)] = [
        (.relu, 2.0 / 400), (.gelu, 2.0 / 400), (.silu, 2.0 / 400), (.leakyReLU(slope: 0.5), 2.0 / 1.25 / 400),
        (.tanh, 2.0 / 700), (.sigmoid, 2.0 / 700), (.linear(inputs: 300, outputs: 2), 2.0 / 700),
    ]

    @Test(arguments: fedLayers)
    func initialisationFollowsTheActivationFed(next: LayerSpec, variance: Double) throws {
        let spec = ModelSpec(layers: [.linear(inputs: 400, outputs: 300), .dropout(probability: 0.1), .layerNorm(features: 300),
                                      next] + (next.as(LinearKind.self) == nil ? [.linear(inputs: 300, outputs: 2)] : []))
        let model = try Model<Double>(spec: spec, batchCapacity: 1, seed: 3)
        let w = tensorValues(model, "0.weight", in: model.parameters)
        // 120,000 draws: the estimate's relative standard deviation is 0.004.
        let drawn = w.map { $0 * $0 }.reduce(0, +) / Double(w.count)
        #expect(abs(drawn / variance - 1) < 0.02, "before \(next): variance \(drawn), expected \(variance)")
    }

    @Test func gradientsReadyReportsSuffixesInReverseLayerOrder() throws {
        let model = try Model<Float>(spec: .mlp(widths: [6, 5, 4, 3]), batchCapacity: 2)
        fillRandomBatch(model, rows: 2, seed: 1)
        model.forward(count: 2, mode: .train)
        var offsets: [Int] = []
        var finalWhenReported: [Bool] = []
        let reference = try Model<Float>(spec: model.spec, batchCapacity: 2)
        fillRandomBatch(reference, rows: 2, seed: 1)
        reference.forward(count: 2, mode: .train)
        reference.backward(count: 2)
        model.backward(count: 2) { offset in
            offsets.append(offset)
            // Everything from offset on already holds its final value.
            finalWhenReported.append((offset..<model.parameterCount).allSatisfy {
                model.gradients[$0] == reference.gradients[$0]
            })
        }
        let table = model.parameterTable
        #expect(offsets == [table[4].offset, table[2].offset, table[0].offset])
        #expect(finalWhenReported == [true, true, true])
    }

    @Test func partialBatchEqualsSmallerModel() throws {
        let spec = ModelSpec.mlp(widths: [5, 7, 3], activation: .tanh)
        let big = try Model<Double>(spec: spec, batchCapacity: 10, seed: 2)
        let small = try Model<Double>(spec: spec, batchCapacity: 3, seed: 2)
        fillRandomBatch(big, rows: 3, seed: 4)
        fillRandomBatch(small, rows: 3, seed: 4)
        #expect(big.forward(count: 3, mode: .train) == small.forward(count: 3, mode: .train))
        big.backward(count: 3)
        small.backward(count: 3)
        #expect(Array(big.gradients) == Array(small.gradients))
    }

    @Test func aPartialForwardEqualsAFullOne() throws {
        let model = try Model<Double>(spec: .mlp(widths: [6, 8, 5, 3], activation: .tanh), batchCapacity: 4, seed: 5)
        fillRandomBatch(model, rows: 4, seed: 6)
        model.forward(count: 4, mode: .eval)
        // Change a parameter of layer 2; recomputing from layer 2 on gives what a full pass gives.
        model.tensor("2.weight", in: model.parameters)![3] += 0.25
        let partial = model.forward(count: 4, mode: .eval, fromLayer: 2)
        let full = model.forward(count: 4, mode: .eval)
        #expect(partial == full)
        #expect(model.parameterTable.map(\.layerIndex) == [0, 0, 2, 2, 4, 4])
    }

    @Test func float64CopyMatchesOriginal() throws {
        let model = try Model<Float>(spec: .mlp(widths: [4, 6, 3]), batchCapacity: 4, seed: 9)
        let copy = model.float64Copy(batchCapacity: 2)
        #expect(copy.parameterCount == model.parameterCount)
        #expect((0..<model.parameterCount).allSatisfy { Double(model.parameters[$0]) == copy.parameters[$0] })
    }
}
