import Engine
import Testing

@Suite("Residual blocks")
struct ResidualTests {
    static func conv(_ i: Int, _ o: Int, _ k: Int, stride: Int = 1, pad: Int = 0, bias: Bool = false) -> LayerSpec {
        .conv2d(inChannels: i, outChannels: o, kernel: k, stride: stride, padding: pad, bias: bias)
    }

    /// Blocks as a ResNet has them, after a stem: the identity, a stride-2 projection, a body with the fused batch
    /// norm, ReLU and pooling block, and one with dropout (off in the check) and a nested block.
    static let models: [(String, ModelSpec)] = [
        ("identity shortcut", ModelSpec(layers: [
            conv(2, 3, 3, pad: 1), .batchNorm(features: 3), .relu,
            .residual(body: [conv(3, 3, 3, pad: 1), .batchNorm(features: 3), .relu, conv(3, 3, 3, pad: 1), .batchNorm(features: 3)]),
            .relu, .flatten, .linear(inputs: 3 * 36, outputs: 4),
        ], inputShape: [2, 6, 6])),
        ("stride-2 projection", ModelSpec(layers: [
            conv(2, 3, 3, pad: 1), .batchNorm(features: 3), .relu,
            .residual(body: [conv(3, 4, 3, stride: 2, pad: 1), .batchNorm(features: 4), .relu, conv(4, 4, 3, pad: 1),
                             .batchNorm(features: 4)],
                      shortcut: [conv(3, 4, 1, stride: 2), .batchNorm(features: 4)]),
            .relu, .flatten, .linear(inputs: 4 * 9, outputs: 3),
        ], inputShape: [2, 6, 6])),
        ("fused block and tanh inside, conv bias in the shortcut", ModelSpec(layers: [
            conv(2, 3, 3, pad: 1, bias: true), .tanh,
            .residual(body: [conv(3, 4, 3, pad: 1), .batchNorm(features: 4), .relu, .maxPool2d(kernel: 2, stride: 2), .tanh],
                      shortcut: [conv(3, 4, 1, stride: 2, bias: true)]),
            .flatten, .linear(inputs: 4 * 9, outputs: 3),
        ], inputShape: [2, 6, 6])),
        ("flat, nested, with dropout", ModelSpec(layers: [
            .linear(inputs: 5, outputs: 6), .tanh,
            .residual(body: [.linear(inputs: 6, outputs: 6), .tanh, .dropout(probability: 0.5),
                             .residual(body: [.batchNorm(features: 6), .linear(inputs: 6, outputs: 6), .relu]), .linear(inputs: 6, outputs: 6)]),
            .tanh, .linear(inputs: 6, outputs: 3),
        ], inputShape: [5])),
    ]

    /// Test faults on tensors inside blocks break the layer that owns the tensor, not the whole block: with the
    /// whole block wrapped, the faults in an input gradient (a flipped kernel, batch norm without its mean term) found
    /// no convolution or batch norm to break and the check passed. The convolutions run by Winograd (16 channels),
    /// whose input gradient multiplies by the filters transformed in the forward pass; the nested block's 1x1
    /// convolution is two blocks deep. The failing tensors are those upstream of the broken input gradient (or the broken
    /// tensor itself), never the broken layer's own weights or anything after it.
    static let innerFaults: [(GradientFault, failing: String, passing: [String])] = [
        (.flippedKernel(tensor: "3.body.3.weight"), "3.body.0.weight", ["3.body.3.weight", "3.body.4.weight", "6.weight"]),
        (.paddingOffset(tensor: "3.body.3.weight"), "3.body.0.weight", ["3.body.3.weight", "3.body.4.weight", "6.weight"]),
        (.batchNormWithoutMeanTerm(tensor: "3.body.1.weight"), "3.body.0.weight", ["3.body.1.weight", "3.body.3.weight"]),
        (.scaled(tensor: "3.body.0.weight", factor: 1.5), "3.body.0.weight", ["0.weight", "3.body.3.weight"]),
        (.missing(tensor: "3.body.5.body.0.bias"), "3.body.5.body.0.bias", ["3.body.5.body.0.weight", "0.weight"]),
    ]

    @Test(arguments: innerFaults.indices)
    func faultsInsideABlockBreakTheLayerThatOwnsTheTensor(fault index: Int) throws {
        let (fault, failing, passing) = Self.innerFaults[index]
        let spec = ModelSpec(layers: [
            Self.conv(16, 16, 3, pad: 1), .batchNorm(features: 16), .relu,
            .residual(body: [Self.conv(16, 16, 3, pad: 1), .batchNorm(features: 16), .relu, Self.conv(16, 16, 3, pad: 1),
                             .batchNorm(features: 16),
                             .residual(body: [Self.conv(16, 16, 1, bias: true), .tanh])]),
            .relu, .globalAvgPool2d, .flatten, .linear(inputs: 16, outputs: 3),
        ], inputShape: [16, 2, 3])
        let model = try ConvolutionTests().checkedModel(spec)
        model.installGradientFault(fault)
        #expect(model.gradientFault == fault)
        var options = GradientCheckOptions()
        options.epsilon = 1e-5
        let report = checkGradients(model: model, count: 3, options: options)
        let failed = Set(report.tensors.filter { $0.verdict == .fail }.map(\.name))
        #expect(failed.contains(failing), "\(fault):\n\(report.text)")
        for name in passing { #expect(!failed.contains(name), "\(fault): \(name)\n\(report.text)") }
        // Removed, every layer is as built again.
        model.installGradientFault(nil)
        #expect(model.gradientFault == nil)
        #expect(checkGradients(model: model, count: 3, options: options).verdict == .pass)
    }

    @Test(arguments: models.indices)
    func blocksPassTheFloat64Check(model index: Int) throws {
        let (name, spec) = Self.models[index]
        var options = GradientCheckOptions()
        options.checkAllCoordinates = true
        // At the default 1e-4 the worst coordinates (batch norm weights in a body) err by the step's own truncation,
        // up to 1e-4, falling as eps^2 with smaller steps: the derivative is right, the difference is curved there.
        // At 1e-5 every coordinate is within 1e-6; much smaller and rounding in the cost takes over.
        options.epsilon = 1e-5
        let report = checkGradients(model: try checkedModel(spec), count: 4, options: options)
        #expect(report.verdict == .pass, "\(name):\n\(report.text)")
        #expect(report.deterministic)
        #expect(report.tensors.count == spec.parameterTable.count)
        for tensor in report.tensors {
            #expect(tensor.checked > 0, "\(name): \(tensor.name) unchecked")
            #expect(tensor.maxRelativeError <= 1e-6, "\(name): \(tensor.name) \(tensor.maxRelativeError)")
        }
        #expect(report.direction.relativeError <= 1e-6, "\(name):\n\(report.text)")
    }

    /// The fused batch norm, ReLU, max pooling block inside a body and a shortcut against the same layers run apart
    /// (`fusesBlocks: false` reaches into blocks): outputs and running statistics bit for bit, gradients up to the
    /// order of the sums.
    @Test(arguments: [false, true])
    func aFusedBlockInsideABlockComputesWhatItsLayersDoApart(float: Bool) throws {
        let spec = ModelSpec(layers: [
            Self.conv(2, 3, 3, pad: 1), .batchNorm(features: 3), .relu,
            .residual(body: [Self.conv(3, 4, 3, pad: 1), .batchNorm(features: 4), .relu, .maxPool2d(kernel: 2, stride: 2)],
                      shortcut: [Self.conv(3, 4, 1), .batchNorm(features: 4), .relu, .maxPool2d(kernel: 2, stride: 2)]),
            .flatten, .linear(inputs: 4 * 16, outputs: 3),
        ], inputShape: [2, 8, 8])
        if float { try compareFusedAndApart(spec, Float.self) } else { try compareFusedAndApart(spec, Double.self) }
    }

    func compareFusedAndApart<T: Scalar>(_ spec: ModelSpec, _: T.Type) throws {
        let rows = 5
        let fused = try Model<T>(spec: spec, batchCapacity: rows, seed: 3)
        let apart = try Model<T>(spec: spec, batchCapacity: rows, seed: 3, fusesBlocks: false)
        var g = RandomGenerator(seed: 4, stream: 1)
        for info in fused.parameterTable where info.shape.count == 1 {
            for i in info.range { fused.parameters[i] += T(0.5 * g.nextNormal()) }
        }
        apart.loadParameters(from: UnsafeBufferPointer(fused.parameters))
        for model in [fused, apart] { fillRandomBatch(model, rows: rows, seed: 9) }
        for mode in [ForwardMode.train, .check, .eval] {
            #expect(fused.forward(count: rows, mode: mode) == apart.forward(count: rows, mode: mode), "\(mode)")
            for i in 0..<(rows * fused.outputWidth) { #expect(fused.outputs[i] == apart.outputs[i], "\(mode) output \(i)") }
            fused.backward(count: rows, accumulate: false) { _ in }
            apart.backward(count: rows, accumulate: false) { _ in }
            let a = Array(fused.gradients).map(Double.init), b = Array(apart.gradients).map(Double.init)
            let scale = b.map(abs).max()!
            #expect(scale > 0 && zip(a, b).allSatisfy { abs($0 - $1) <= tolerance(T.self) * scale }, "\(mode) gradients")
        }
        #expect(Array(fused.buffers) == Array(apart.buffers), "running statistics")
    }

    /// A model built with `fusesBlocks: false` runs a block's batch norm, ReLU and max pooling apart, each keeping
    /// its output and gradient: its memory estimate counts them, where the fused one does not.
    @Test func theEstimateOfBlocksRunApartCountsTheirBuffers() {
        let (c, side, rows) = (16, 16, 256)
        let spec = ModelSpec(layers: [
            .conv2d(inChannels: 1, outChannels: c, kernel: 3, stride: 1, padding: 1, bias: false),
            .residual(body: [.conv2d(inChannels: c, outChannels: c, kernel: 3, stride: 1, padding: 1, bias: false),
                             .batchNorm(features: c), .relu, .maxPool2d(kernel: 1, stride: 1)]),
            .globalAvgPool2d, .flatten, .linear(inputs: c, outputs: 3),
        ], inputShape: [1, side, side])
        let fused = Model<Float>.footprint(spec: spec, batchCapacity: rows)
        let apart = Model<Float>.footprint(spec: spec, batchCapacity: rows, fusesBlocks: false)
        // Apart, the batch norm keeps its output and output gradient (the ReLU runs in place after it), 4 MiB each
        // here; fused, the block keeps each window's winning input instead (4 MiB). The block's buffers are whole
        // 2 MiB pages either way (20 and 12 MiB).
        let plane = Double(rows * c * side * side * 4)
        #expect(apart.activationBytes - fused.activationBytes == 2 * plane - plane,
                "apart \(apart.activationBytes), fused \(fused.activationBytes)")
    }

    @Test func tensorsHavePyTorchNames() throws {
        let spec = Self.models[1].1
        let names = spec.parameterTable.map(\.name)
        #expect(names.contains("3.body.0.weight") && names.contains("3.body.4.bias") && names.contains("3.shortcut.0.weight"))
        #expect(names.contains("3.shortcut.1.weight") && names.contains("6.bias"))
        #expect(spec.bufferTable.map(\.name).contains("3.shortcut.1.num_batches_tracked"))
        #expect(spec.torchModules[3].json.hasPrefix("{\"module\": \"Residual\", \"args\": [], \"kwargs\": {\"body\": {\"module\": \"Sequential\""))
    }

    @Test func entryReadsBackAsTheSameBlock() throws {
        for (_, spec) in Self.models {
            let shapes = try spec.shapes()
            for (i, layer) in spec.layers.enumerated() where layer.as(ResidualKind.self) != nil {
                let words = layer.entry.split(separator: " ").map(String.init)
                #expect(try LayerSpec.parse(words, input: shapes[i]) == layer, "\(layer.entry)")
            }
        }
        let block = try #require(try LayerSpec.parse(
            "residual [conv 4 3 stride 2 pad 1 nobias, batchnorm, relu] shortcut [conv 4 1 stride 2 nobias]".split(separator: " ").map(String.init),
            input: [3, 6, 6]))
        #expect(block.entry == "residual [conv 4 3 stride 2 pad 1 nobias, batchnorm, relu] shortcut [conv 4 1 stride 2 nobias]")
        #expect(try block.outputShape(input: [3, 6, 6]) == [4, 3, 3])
        #expect(LayerKinds.entryIsSpatial(["residual", "[linear", "4,", "residual", "[conv", "4", "3]]"]))
        #expect(!LayerKinds.entryIsSpatial(["residual", "[linear", "4,", "relu]"]))
        #expect(block.isSpatial && !LayerSpec.residual(body: [.relu]).isSpatial && LayerSpec.conv2d(
            inChannels: 1, outChannels: 1, kernel: 1, stride: 1, padding: 0, bias: true).isSpatial && !LayerSpec.flatten.isSpatial)
    }

    @Test(arguments: [
        ("residual [conv 4 3, relu, conv x 3]", LayerEntryError(reason: "'conv x 3': output channels must be an integer >= 1, got x",
                                                                path: "residual[2]")),
        ("residual [relu] shortcut [conv 3 1, bogus 2]", LayerEntryError(reason: "unknown layer 'bogus' (" + LayerKinds.names.joined(separator: ", ") + ")",
                                                                          path: "shortcut[1]")),
        ("residual [relu, residual [relu, dropout]]", LayerEntryError(reason: "'dropout': 'dropout' needs 1 argument",
                                                                       path: "residual[1].residual[1]")),
        ("residual [conv 4 3 stride 2 pad 1]", LayerEntryError(
            reason: "the body gives [4, 3, 3] per sample but the identity shortcut gives [3, 6, 6]: they must match to be added")),
        ("residual [relu] shortcut", LayerEntryError(reason: "expected a list of entries in brackets, e.g. '[conv 16 3 pad 1, batchnorm]'")),
        ("residual [relu, ]", LayerEntryError(reason: "a list has an empty entry")),
        ("residual []", LayerEntryError(reason: "the body is an empty list: it needs at least one entry")),
        ("residual [relu] shortcut [ ]", LayerEntryError(reason: "the shortcut is an empty list: the identity shortcut is written "
                                                         + "by leaving 'shortcut' out")),
        ("residual [[conv 3 3 pad 1, relu]]", LayerEntryError(
            reason: "a list where an entry belongs ('[conv ...'): entries are layers or residual blocks, and a block's entries "
                + "are written in one list, residual: [ENTRY, ...]", path: "residual[0]")),
        ("residual [relu, shortcut [relu]]", LayerEntryError(
            reason: "'shortcut' without 'residual': a shortcut belongs to a residual block, written in the same mapping, "
                + "{residual: [ENTRY, ...], shortcut: [ENTRY, ...]}", path: "residual[1]")),
        ("residual [conv 3 3 pad 1 pad 2]", LayerEntryError(reason: "'conv 3 3 pad 1 pad 2': 'pad' is given twice", path: "residual[0]")),
        ("residual [conv 3 3 nobias nobias]", LayerEntryError(reason: "'conv 3 3 nobias nobias': 'nobias' is given twice", path: "residual[0]")),
        ("residual [conv 3 3 pad 16777217]", LayerEntryError(reason: "'conv 3 3 pad 16777217': pad must be at most 16777216, got 16777217",
                                                             path: "residual[0]")),
        ("residual [conv 3 3 pad 9223372036854775807]", LayerEntryError(
            reason: "'conv 3 3 pad 9223372036854775807': pad must be at most 16777216, got 9223372036854775807", path: "residual[0]")),
        ("residual [flatten, linear 20000000]", LayerEntryError(reason: "'linear 20000000': linear width must be at most 16777216, got 20000000",
                                                                path: "residual[1]")),
        // Integers as every size is: Double's parser took these as 16, 1000 and 8.
        ("residual [flatten, linear 0x10]", LayerEntryError(reason: "'linear 0x10': linear width must be an integer >= 1, got 0x10",
                                                            path: "residual[1]")),
        ("residual [flatten, linear 1e3]", LayerEntryError(reason: "'linear 1e3': linear width must be an integer >= 1, got 1e3",
                                                           path: "residual[1]")),
        ("residual [flatten, linear 8.0]", LayerEntryError(reason: "'linear 8.0': linear width must be an integer >= 1, got 8.0",
                                                           path: "residual[1]")),
        ("residual [flatten, linear 99999999999999999999]", LayerEntryError(
            reason: "'linear 99999999999999999999': linear width must be at most 16777216, got 99999999999999999999", path: "residual[1]")),
        ("residual [conv 16 3 pad 16777216, flatten]", LayerEntryError(
            reason: "'conv 16 3 pad 16777216' (Conv2d(3, 16, kernel_size=3, padding=16777216)): its output sample "
                + "[16, 33554436, 33554436] would hold more than 2^40 values", path: "residual[0]")),
        ("residual [flatten, linear 16777216, linear 16777216]", LayerEntryError(
            reason: "'linear 16777216' (Linear(16777216, 16777216)): its weight [16777216, 16777216] would hold more than 2^40 values",
            path: "residual[2]")),
        ("residual [relu", LayerEntryError(reason: "a '[' has no matching ']'")),
        ("residual [relu] extra", LayerEntryError(reason: "expected 'shortcut [ENTRY, ...]' after the body, got 'extra'")),
        ("residual [conv 4 9]", LayerEntryError(reason: "'conv 4 9' (Conv2d(3, 4, kernel_size=9)): kernel 9 is larger than its padded input 6x6",
                                                path: "residual[0]")),
    ])
    func badEntriesNameTheBlockEntryAndReason(text: String, expected: LayerEntryError) {
        #expect(throws: expected) { try LayerSpec.parse(text.split(separator: " ").map(String.init), input: [3, 6, 6]) }
    }

    /// Blocks nested 8 deep parse (at once); 9 deep is refused before anything is parsed. Each level cost a few times
    /// the one inside it, so 20 levels in a model file kept `predict` busy for minutes.
    @Test func nestingIsBounded() throws {
        func nested(_ depth: Int) -> [String] {
            (String(repeating: "residual [", count: depth) + "relu" + String(repeating: "]", count: depth))
                .split(separator: " ").map(String.init)
        }
        let deepest = try #require(try LayerSpec.parse(nested(ResidualKind.maxNesting), input: [3, 6, 6]))
        #expect(try deepest.outputShape(input: [3, 6, 6]) == [3, 6, 6])
        for depth in [ResidualKind.maxNesting + 1, 40, 1000] {
            #expect(throws: LayerEntryError(reason: "blocks nest \(depth) deep; at most 8 are taken (a ResNet's blocks nest 1 deep)")) {
                try LayerSpec.parse(nested(depth), input: [3, 6, 6])
            }
        }
    }
}
