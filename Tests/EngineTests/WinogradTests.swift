@testable import Engine
import Foundation
import Testing

/// Convolutions by Winograd's F(4x4, 3x3): against the definition (a second implementation, in Double), against the
/// lowered GEMMs in Float, and through the float64 finite-difference checker, with the image sizes that cut tiles
/// off at the edge.
@Suite("Winograd convolutions")
struct WinogradTests {
    static func conv(_ i: Int, _ o: Int, bias: Bool = true) -> LayerSpec {
        .conv2d(inChannels: i, outChannels: o, kernel: 3, stride: 1, padding: 1, bias: bias)
    }

    @Test func theFastPathTakesThreeByThreeSamePaddingWithEnoughChannels() {
        #expect(Self.conv(16, 16).as(Conv2dKind.self)!.usesWinograd)
        #expect(Self.conv(128, 64).as(Conv2dKind.self)!.usesWinograd)
        #expect(!Self.conv(15, 64).as(Conv2dKind.self)!.usesWinograd)
        #expect(!Self.conv(1, 32).as(Conv2dKind.self)!.usesWinograd)
        #expect(!LayerSpec.conv2d(inChannels: 32, outChannels: 32, kernel: 3, stride: 2, padding: 1, bias: false)
            .as(Conv2dKind.self)!.usesWinograd)
        #expect(!LayerSpec.conv2d(inChannels: 32, outChannels: 32, kernel: 3, stride: 1, padding: 0, bias: false)
            .as(Conv2dKind.self)!.usesWinograd)
        #expect(!LayerSpec.conv2d(inChannels: 32, outChannels: 32, kernel: 5, stride: 1, padding: 2, bias: false)
            .as(Conv2dKind.self)!.usesWinograd)
    }

    /// Rows and columns of tiles that 4 does not fill take 3-output tiles with five of the six points: 14 = 4 + 4 +
    /// 3 + 3 (22 points a row of tiles, not 24) and 7 = 4 + 3 (11, not 12), down to images of short tiles only. Each
    /// point's matrix holds every tile that has the point exactly once, in rows 0 to its count: a row left out would
    /// be a GEMM row of garbage, a row twice a tile overwritten.
    @Test func shortTilesDropTheOverrunAndPackEachPointsMatrix() {
        for (size, full, points) in [(28, 7, 42), (14, 2, 22), (7, 1, 11), (10, 1, 16), (13, 1, 21), (9, 0, 15),
                                     (5, 0, 10), (1, 0, 5)] {
            let tiling = WinogradTiling(height: size, width: size, scalarBytes: 4)
            #expect(tiling.fullRows == full && tiling.fullColumns == full, "\(size)")
            let perImage = (0..<Winograd.points).reduce(0) { $0 + tiling.tilesPerImage(point: $1) }
            #expect(perImage == points * points, "\(size): \(perImage) points an image")
        }
        for (height, width) in [(14, 14), (7, 7), (5, 9), (10, 13), (8, 3), (1, 1)] {
            let tiling = WinogradTiling(height: height, width: width, scalarBytes: 8), count = 3
            var rows = [[Int]](repeating: [], count: Winograd.points)
            for tile in 0..<count * tiling.tilesPerImage {
                let (k4, l4, both) = tiling.rowsAtMinusTwo(ofTile: tile)
                for p in 0..<Winograd.points {
                    let row = switch (p / 6 == 4, p % 6 == 4) {
                    case (false, false): tile
                    case (true, false): Int(k4)
                    case (false, true): Int(l4)
                    case (true, true): Int(both)
                    }
                    if row >= 0 { rows[p].append(row) }
                }
            }
            for p in 0..<Winograd.points {
                #expect(rows[p].sorted() == Array(0..<tiling.rowsOfPoint(p, count: count)), "\(height)x\(width) point \(p)")
            }
        }
    }

    /// The ResNet's 32-channel layers at 14x14 and 64-channel ones at 7x7 make GEMMs of 2^20 multiply-adds (batch 64):
    /// one thread; fashion-cnn's 32-to-64 layer at 14x14 and the ResNet's 128-channel ones, 2^21 and up: all of them.
    @Test func smallGEMMsRunOnOneOpenBLASThread() {
        #expect(BLASThreads.threadsFor(work: 64 * 16 * 32 * 32, threads: 2) == 1)
        #expect(BLASThreads.threadsFor(work: 64 * 4 * 64 * 64, threads: 2) == 1)
        #expect(BLASThreads.threadsFor(work: 64 * 16 * 32 * 64, threads: 2) == 2)
        #expect(BLASThreads.threadsFor(work: 64 * 4 * 128 * 128, threads: 4) == 4)
        #expect(BLASThreads.threadsFor(work: 1, threads: 1) == 1)
    }

    /// Chunks that keep a pass's transformed tiles in the cache (`Winograd.chunkSamples`): the ResNet's 32-channel
    /// layers at 14x14 and batch 64 go by 4 and 3 samples (a backward chunk's dM, V and dV within 1 MiB), its 64- and
    /// 128-channel ones, whose U outweighs half a chunk, whole; a batch no larger than one chunk whole.
    @Test func chunksKeepAPassInTheCache() {
        func samples(_ c: Int, _ o: Int, _ size: Int, batch: Int = 64, scalarBytes: Int = 4) -> Int {
            Winograd.chunkSamples(inChannels: c, outChannels: o, tiling: WinogradTiling(height: size, width: size, scalarBytes: scalarBytes),
                                  batchCapacity: batch)
        }
        #expect(samples(32, 32, 14) == 4)
        #expect(samples(32, 64, 14) == 3)
        #expect(samples(16, 16, 28) == 3)
        #expect(samples(32, 32, 14, scalarBytes: 8) == 2)
        #expect(samples(64, 64, 7) == 64)
        #expect(samples(64, 128, 7) == 64)
        #expect(samples(128, 128, 7) == 64)
        #expect(samples(32, 32, 14, batch: 4) == 4)
        #expect(samples(32, 32, 14, batch: 3) == 3)
        #expect(Winograd.$chunkSamplesOverride.withValue(2) { samples(128, 128, 7) } == 2)
        #expect(Winograd.$chunkSamplesOverride.withValue(Int.max) { samples(32, 32, 14) } == 64)
    }

    /// The memory estimate counts what a Winograd layer allocates (`Conv2dKind.workspace`, from
    /// `WinogradTiling.ownedBytes`), bit for bit, whether it takes its passes in chunks (V for one chunk) or whole, in
    /// Float and Double, on the ResNet's layers at batch 64 and a batch of one.
    @Test(arguments: [nil, 2, Int.max] as [Int?])
    func theEstimateCountsWhatALayerAllocates(chunk: Int?) throws {
        try Winograd.$chunkSamplesOverride.withValue(chunk) {
            for (c, o, size) in [(32, 32, 14), (32, 64, 14), (64, 64, 7), (64, 128, 7), (128, 128, 7), (16, 20, 9)] {
                for batch in [64, 1] {
                    try allocationIsEstimated(Float.self, c, o, size, batch: batch)
                    try allocationIsEstimated(Double.self, c, o, size, batch: batch)
                }
            }
        }
    }

    func allocationIsEstimated<T: Scalar>(_: T.Type, _ c: Int, _ o: Int, _ size: Int, batch: Int) throws {
        let kind = Conv2dKind(inChannels: c, outChannels: o, kernel: 3, stride: 1, padding: 1, bias: false)
        let (input, output) = ([c, size, size], [o, size, size])
        let placement = LayerPlacement(index: 0, inputShape: input, outputShape: output, batchCapacity: batch)
        let layer = try #require(kind.makeLayer(placement) as Layer<T> as? Conv2d<T>)
        let allocated = try #require(layer.winogradAllocatedBytes)
        let ones = Double(size * size * MemoryLayout<T>.stride)  // the bias gradient's vector of ones
        let estimated = kind.workspace(input: input, output: output, batchCapacity: Double(batch),
                                       scalarBytes: Double(MemoryLayout<T>.stride)).bytes
        #expect(estimated == allocated + ones, "\(T.self) \(c)->\(o) at \(size)x\(size), batch \(batch), chunks of \(layer.winogradChunkSamples ?? 0)")
    }

    /// U = G g G^T for every filter, against the definition in Double, on filter counts that leave the last run of
    /// staged blocks short and the last block partly empty (`Winograd.filterBlocksPerRun`), in Float and Double.
    @Test(arguments: [(17, 19), (16, 16), (5, 3), (64, 1), (32, 36)])
    func filtersTransformAsDefined(outChannels: Int, inChannels: Int) {
        filterTransform(Float.self, outChannels, inChannels, tolerance: 1e-6)
        filterTransform(Double.self, outChannels, inChannels, tolerance: 1e-14)
    }

    func filterTransform<T: Scalar>(_: T.Type, _ o: Int, _ c: Int, tolerance: Double) {
        let g: [[Double]] = [[1.0 / 4, 0, 0], [-1.0 / 6, -1.0 / 6, -1.0 / 6], [-1.0 / 6, 1.0 / 6, -1.0 / 6],
                             [1.0 / 24, 1.0 / 12, 1.0 / 6], [1.0 / 24, -1.0 / 12, 1.0 / 6], [0, 0, 1]]
        var generator = RandomGenerator(seed: 31, stream: 2)
        let weights = (0..<(o * c * 9)).map { _ in T(generator.nextNormal()) }
        let tiling = WinogradTiling(height: 4, width: 4, scalarBytes: MemoryLayout<T>.stride)
        let pointStride = tiling.filterPointStride(inChannels: c, outChannels: o)
        var u = [T](repeating: .nan, count: tiling.transformedFilterCount(inChannels: c, outChannels: o))
        var between = [T](repeating: .nan, count: Winograd.tilesPerRun * Winograd.points * tiling.lanes)
        winogradTransformFilters(weights, outChannels: o, inChannels: c, pointStride: pointStride, between: &between, into: &u)
        var worst = 0.0
        for filter in 0..<(o * c) {
            for k in 0..<6 {
                for l in 0..<6 {
                    var expected = 0.0
                    for i in 0..<3 {
                        for j in 0..<3 { expected += g[k][i] * Double(weights[filter * 9 + i * 3 + j]) * g[l][j] }
                    }
                    // A point never written stays NaN: counted as the worst error, not lost in max.
                    let error = abs(Double(u[(6 * k + l) * pointStride + filter]) - expected)
                    worst = error.isNaN ? .infinity : max(worst, error)
                }
            }
        }
        #expect(worst <= tolerance, "\(T.self) \(o)x\(c): worst error \(worst)")
    }

    /// The samples per chunk of a model's Winograd layers, inside residual blocks too.
    static func chunkSizes(_ model: Model<Double>) -> [Int] {
        allLayers(model.plan).compactMap { ($0 as? Conv2d<Double>)?.winogradChunkSamples }
    }

    /// In chunks of two samples (three rows: two, then one), V transformed again in backward: the forward pass and
    /// both gradients match their definitions as whole batches do, on every shape.
    @Test(arguments: shapes.indices)
    func chunksMatchTheDefinitionsInDouble(shape index: Int) throws {
        let (c, o, h, w, bias) = Self.shapes[index]
        try Winograd.$chunkSamplesOverride.withValue(2) {
            try matchesTheDefinition(c: c, o: o, h: h, w: w, bias: bias, rows: 3, chunk: 2)
            try gradientsMatchTheirDefinitions(c: c, o: o, h: h, w: w, bias: bias, rows: 3, chunk: 2)
        }
    }

    /// The float64 check, one sample per chunk, with batch norm in training mode coupling the chunks.
    @Test(arguments: models.indices)
    func passesTheFloat64CheckInChunks(model index: Int) throws {
        try Winograd.$chunkSamplesOverride.withValue(1) { try passesTheFloat64Check(model: index) }
    }

    /// The gradient checker's planted bug in a Winograd layer's input gradient (its kernels turned for that pass) is
    /// caught, whole and in chunks: `backwardWeights` computes dx along with the weight gradient, and the changed
    /// filters make `backwardInput` compute it again with them.
    @Test(arguments: [Int.max, 1])
    func aFlippedKernelInTheInputGradientIsCaught(chunk: Int) throws {
        let spec = ModelSpec(layers: [Self.conv(16, 16), .tanh, Self.conv(16, 16), .flatten, .linear(inputs: 16 * 5 * 6, outputs: 3)],
                             inputShape: [16, 5, 6])
        try Winograd.$chunkSamplesOverride.withValue(chunk) {
            let model = try ConvolutionTests().checkedModel(spec)
            #expect((model.plan[2] as? Conv2d<Double>)?.winogradChunkSamples == min(chunk, model.batchCapacity))
            model.installGradientFault(.flippedKernel(tensor: "2.weight"))
            let report = checkGradients(model: model, count: 3)
            #expect(report.verdict == .fail, "\(report.text)")
            #expect(report.tensors.filter { $0.verdict == .fail }.map(\.name) == ["0.weight", "0.bias"], "\(report.text)")
        }
    }

    /// Output sizes: whole tiles (8x8), the shipped ResNet's 7x7 and 14x14 (full and short tiles), one pixel (1x1),
    /// and uneven ones: 5x9 of short tiles only, 10x13 with one full tile and two or three short ones.
    static let shapes: [(c: Int, o: Int, h: Int, w: Int, bias: Bool)] = [
        (16, 16, 8, 8, true), (16, 20, 7, 7, false), (24, 16, 14, 14, true), (16, 17, 1, 1, true), (17, 16, 5, 9, true),
        (16, 16, 3, 2, false), (16, 16, 10, 13, true),
    ]

    @Test(arguments: shapes.indices)
    func matchesTheDefinitionInDouble(shape index: Int) throws {
        let (c, o, h, w, bias) = Self.shapes[index]
        try matchesTheDefinition(c: c, o: o, h: h, w: w, bias: bias, rows: 3)
    }

    func matchesTheDefinition(c: Int, o: Int, h: Int, w: Int, bias: Bool, rows: Int, chunk: Int? = nil) throws {
        let spec = ModelSpec(layers: [Self.conv(c, o, bias: bias), .flatten, .linear(inputs: o * h * w, outputs: 2)],
                             inputShape: [c, h, w])
        let model = try Model<Double>(spec: spec, batchCapacity: rows + 1, seed: 3)
        fillRandomBatch(model, rows: rows, seed: 4)
        if bias { setTensor(model, "0.bias", (0..<o).map { 0.1 * Double($0) - 0.5 }) }
        model.forward(count: rows, mode: .eval)
        let weights = tensorValues(model, "0.weight", in: model.parameters)
        let b = bias ? tensorValues(model, "0.bias", in: model.parameters) : nil
        let convolution = model.plan[0]
        // The layer as built takes the path (a lowered one would match the definition too), in chunks if asked.
        #expect((convolution as? Conv2d<Double>)?.runsWinograd == true)
        if let chunk { #expect((convolution as? Conv2d<Double>)?.winogradChunkSamples == chunk) }
        for row in 0..<rows {
            let x = (0..<(c * h * w)).map { model.inputs[row * c * h * w + $0] }
            let expected = ConvolutionTests().naiveConvolution(x, weights, b, c: c, h: h, wd: w, o: o, k: 3, stride: 1, pad: 1)
            let got = (0..<(o * h * w)).map { Double(convolution.y[row * o * h * w + $0]) }
            let worst = zip(got, expected).map { abs($0 - $1) }.max()!
            #expect(worst <= 1e-12, "row \(row): worst difference \(worst)")
        }
    }

    /// Float channel blocks go through 8x8 transposes eight planes at a time, and the rest one at a time: 16, 24 and
    /// 32 channels on the shipped ResNet's 7x7, and 20 (8 + 8 + 4), 24 and 17 (8 + 8 + 1) on 5x9, whose 45 positions
    /// leave five past the last transpose.
    static let floatShapes: [(c: Int, hidden: Int, o: Int, h: Int, w: Int)] = [(16, 32, 24, 7, 7), (20, 24, 17, 5, 9)]

    /// In Float the transforms round differently from the lowered GEMMs: outputs and all three gradients agree with
    /// the Double definition to the accuracy F(4x4, 3x3) is known for (relative to each tensor's largest value).
    @Test(arguments: floatShapes.indices)
    func floatAgreesWithDoubleToSingleRounding(shape index: Int) throws {
        let (c, hidden, o, h, w) = Self.floatShapes[index]
        let spec = ModelSpec(layers: [Self.conv(c, hidden), .tanh, Self.conv(hidden, o), .flatten,
                                      .linear(inputs: o * h * w, outputs: 5)], inputShape: [c, h, w])
        let rows = 4
        let exact = try Model<Double>(spec: spec, batchCapacity: rows, seed: 6)
        let single = try Model<Float>(spec: spec, batchCapacity: rows, seed: 6)
        fillRandomBatch(exact, rows: rows, seed: 7)
        for i in 0..<(rows * exact.inputWidth) { single.inputs[i] = Float(exact.inputs[i]) }
        for i in exact.parameters.indices { single.parameters[i] = Float(exact.parameters[i]) }
        single.labels.update(from: exact.labels, count: rows)
        _ = exact.forward(count: rows, mode: .train)
        exact.backward(count: rows, accumulate: false) { _ in }
        _ = single.forward(count: rows, mode: .train)
        single.backward(count: rows, accumulate: false) { _ in }
        #expect(single.plan.allSatisfy { ($0 as? Conv2d<Float>)?.runsWinograd ?? true })
        func relative(_ a: [Double], _ b: [Double]) -> Double {
            let scale = b.map { abs($0) }.max()!
            return zip(a, b).map { abs($0 - $1) }.max()! / scale
        }
        let outputs = relative((0..<(rows * o * h * w)).map { Double(single.plan[2].y[$0]) },
                               (0..<(rows * o * h * w)).map { exact.plan[2].y[$0] })
        #expect(outputs <= 1e-5, "outputs \(outputs)")
        for name in ["0.weight", "0.bias", "2.weight", "2.bias"] {
            let error = relative(tensorValues(single, name, in: single.gradients), tensorValues(exact, name, in: exact.gradients))
            #expect(error <= 1e-5, "\(name) \(error)")
        }
        let inputGradient = relative((0..<(rows * hidden * h * w)).map { Double(single.plan[2].dx![$0]) },
                                     (0..<(rows * hidden * h * w)).map { exact.plan[2].dx![$0] })
        #expect(inputGradient <= 1e-5, "2's input gradient \(inputGradient)")
    }

    static let models: [(String, ModelSpec)] = [
        ("two convolutions, uneven tiles", ModelSpec(layers: [conv(16, 16), .relu, conv(16, 17), .flatten,
                                                              .linear(inputs: 17 * 5 * 6, outputs: 3)], inputShape: [16, 5, 6])),
        ("a residual block with a projection", ModelSpec(layers: [
            conv(16, 16), .relu,
            .residual(body: [conv(16, 24), .relu, conv(24, 24)],
                      shortcut: [.conv2d(inChannels: 16, outChannels: 24, kernel: 1, stride: 1, padding: 0, bias: true)]),
            .relu, .globalAvgPool2d, .flatten, .linear(inputs: 24, outputs: 3),
        ], inputShape: [16, 7, 7])),
        // Batch norm in training mode couples the samples; on a small image so that no gradient is so small that the
        // cost's rounding decides its check.
        ("a residual block with batch norm", ModelSpec(layers: [
            conv(16, 16, bias: false), .batchNorm(features: 16), .relu,
            .residual(body: [conv(16, 16, bias: false), .batchNorm(features: 16), .relu, conv(16, 16, bias: false),
                             .batchNorm(features: 16)]),
            .relu, .globalAvgPool2d, .flatten, .linear(inputs: 16, outputs: 3),
        ], inputShape: [16, 3, 2])),
    ]

    /// 48 coordinates of every weight and bias, and the input gradient through the second convolution, within the float64
    /// check's bar. (`gradientsMatchTheirDefinitionsInDouble` holds both gradients to 1e-12.)
    @Test(arguments: models.indices)
    func passesTheFloat64Check(model index: Int) throws {
        let (name, spec) = Self.models[index]
        let model = try ConvolutionTests().checkedModel(spec)
        // In chunks where a caller asked for them (`passesTheFloat64CheckInChunks`), on every Winograd layer.
        if let chunk = Winograd.chunkSamplesOverride {
            let sizes = Self.chunkSizes(model)
            #expect(!sizes.isEmpty && sizes.allSatisfy { $0 == chunk }, "\(name): chunks \(sizes)")
        }
        var options = GradientCheckOptions()
        options.samplesPerTensor = 48
        // As in the residual blocks' check, batch norm's coupling takes a step of 1e-5 (at the default 1e-4 the
        // difference quotient's truncation error reaches 3e-5 on the smallest gradients).
        if name.contains("batch norm") { options.epsilon = 1e-5 }
        let report = checkGradients(model: model, count: 3, options: options)
        #expect(report.verdict == .pass, "\(name):\n\(report.text)")
        for tensor in report.tensors {
            #expect(tensor.checked > 0, "\(name): \(tensor.name) unchecked")
            // The float64 noise the pass threshold is chosen from, as for every layer (ConvolutionTests).
            #expect(tensor.maxRelativeError <= 5e-6, "\(name): \(tensor.name) \(tensor.maxRelativeError)")
        }
        #expect(report.direction.relativeError <= 1e-6, "\(name):\n\(report.text)")
    }

    /// On one thread the GEMMs go in pieces of at most 10^6 multiply-adds: 64 channels at 7x7 and batch 64 make 256
    /// tiles, two pieces of 128 (the points at -2 have 128 tiles, one piece); with more threads, one. The forward and
    /// input gradient's products (NN, by U^T or U) stay whole where that operand outgrows 32 KiB (128 x 128 Floats),
    /// the forward's then by U (TN).
    @Test func gemmsGoInUnpackedPieces() throws {
        #expect(Winograd.unpackedPieceRows(rows: 256, multiplyAddsPerRow: 64 * 64, threads: 1) == 128)
        #expect(Winograd.unpackedPieceRows(rows: 128, multiplyAddsPerRow: 64 * 64, threads: 1) == 128)
        #expect(Winograd.unpackedPieceRows(rows: 256, multiplyAddsPerRow: 128 * 128, threads: 1) == 52)
        #expect(Winograd.unpackedPieceRows(rows: 1024, multiplyAddsPerRow: 32 * 32, threads: 1) == 512)
        #expect(Winograd.unpackedPieceRows(rows: 256, multiplyAddsPerRow: 64 * 64, threads: 2) == 256)
        #expect(Winograd.unpackedPieceRows(rows: 256, multiplyAddsPerRow: 64 * 64, sharedOperandBytes: 64 * 64 * 4, threads: 1) == 128)
        #expect(Winograd.unpackedPieceRows(rows: 256, multiplyAddsPerRow: 128 * 64, sharedOperandBytes: 128 * 64 * 4, threads: 1) == 86)
        #expect(Winograd.unpackedPieceRows(rows: 256, multiplyAddsPerRow: 128 * 128, sharedOperandBytes: 128 * 128 * 4, threads: 1)
                == 256)
        #expect(Winograd.unpackedPieceRows(rows: 256, multiplyAddsPerRow: 64 * 64, sharedOperandBytes: 64 * 64 * 8, threads: 1) == 128)
        #expect(Winograd.goesInPieces(sharedOperandBytes: 128 * 64 * 4, threads: 1))
        #expect(!Winograd.goesInPieces(sharedOperandBytes: 128 * 128 * 4, threads: 1))
        #expect(!Winograd.goesInPieces(sharedOperandBytes: 32 * 32 * 4, threads: 2))
        // The pieces added up (the weight gradient) and placed side by side (the forward output and the input
        // gradient) against the definitions, at that size, in Double (64 x 64 Doubles are 32 KiB: in pieces).
        try matchesTheDefinition(c: 64, o: 64, h: 7, w: 7, bias: false, rows: 64)
        try gradientsMatchTheirDefinitions(c: 64, o: 64, h: 7, w: 7, bias: false, rows: 64)
        // And whole where U outgrows the limit (64 x 80 Doubles, 40 KiB): the forward by U (TN), the input gradient NN
        // in one product; no other test in Double reaches them on one thread.
        #expect(!Winograd.goesInPieces(sharedOperandBytes: 64 * 80 * 8, threads: 1))
        try matchesTheDefinition(c: 64, o: 80, h: 7, w: 7, bias: false, rows: 3)
        try gradientsMatchTheirDefinitions(c: 64, o: 80, h: 7, w: 7, bias: false, rows: 3)
    }

    /// The gradients as their definitions, in Double: dW[o, c, p, q] = the sum over samples and positions of
    /// dy[o, i, j] x[c, i + p - 1, j + q - 1], and dx[c, r, s] = the sum of W[o, c, p, q] dy[o, r - p + 1, s - q + 1].
    @Test(arguments: shapes.indices)
    func gradientsMatchTheirDefinitionsInDouble(shape index: Int) throws {
        let (c, o, h, w, bias) = Self.shapes[index]
        try gradientsMatchTheirDefinitions(c: c, o: o, h: h, w: w, bias: bias, rows: 3)
    }

    func gradientsMatchTheirDefinitions(c: Int, o: Int, h: Int, w: Int, bias: Bool, rows: Int, chunk: Int? = nil) throws {
        let spec = ModelSpec(layers: [Self.conv(c, c), .tanh, Self.conv(c, o, bias: bias), .flatten,
                                      .linear(inputs: o * h * w, outputs: 3)], inputShape: [c, h, w])
        let model = try Model<Double>(spec: spec, batchCapacity: rows, seed: 10)
        fillRandomBatch(model, rows: rows, seed: 11)
        _ = model.forward(count: rows, mode: .train)
        model.backward(count: rows, accumulate: false) { _ in }
        let layer = model.plan[2]
        #expect((layer as? Conv2d<Double>)?.runsWinograd == true)
        if let chunk { #expect((layer as? Conv2d<Double>)?.winogradChunkSamples == chunk) }
        let weights = tensorValues(model, "2.weight", in: model.parameters)
        var dW = [Double](repeating: 0, count: o * c * 9), dx = [Double](repeating: 0, count: rows * c * h * w)
        for b in 0..<rows {
            for oc in 0..<o {
                for i in 0..<h {
                    for j in 0..<w {
                        let g = layer.dy[((b * o + oc) * h + i) * w + j]
                        for ic in 0..<c {
                            for p in 0..<3 {
                                for q in 0..<3 {
                                    let r = i + p - 1, s = j + q - 1
                                    guard r >= 0 && r < h && s >= 0 && s < w else { continue }
                                    let xi = ((b * c + ic) * h + r) * w + s
                                    dW[((oc * c + ic) * 3 + p) * 3 + q] += g * layer.x[xi]
                                    dx[xi] += g * weights[((oc * c + ic) * 3 + p) * 3 + q]
                                }
                            }
                        }
                    }
                }
            }
        }
        func worst(_ a: [Double], _ b: [Double]) -> Double {
            zip(a, b).map { abs($0 - $1) }.max()! / max(1e-300, b.map { abs($0) }.max()!)
        }
        let weightError = worst(tensorValues(model, "2.weight", in: model.gradients), dW)
        let inputError = worst((0..<dx.count).map { layer.dx![$0] }, dx)
        #expect(weightError <= 1e-12, "weight gradient \(weightError)")
        #expect(inputError <= 1e-12, "input gradient \(inputError)")
    }

    /// With accumulate the weight gradient adds to what is there; a smaller batch than the capacity packs its tiles;
    /// the same in chunks of two samples (five rows: 2 + 2 + 1; two: one chunk, V kept from forward; three: 2 + 1,
    /// the last chunk's V kept from forward).
    @Test(arguments: [nil, 2] as [Int?])
    func accumulatesAndTakesSmallerBatches(chunk: Int?) throws {
        try Winograd.$chunkSamplesOverride.withValue(chunk) { try accumulatesAndTakesSmallerBatches() }
    }

    func accumulatesAndTakesSmallerBatches() throws {
        let spec = ModelSpec(layers: [Self.conv(16, 16), .tanh, Self.conv(16, 16), .flatten, .linear(inputs: 16 * 36, outputs: 3)],
                             inputShape: [16, 6, 6])
        let full = try Model<Double>(spec: spec, batchCapacity: 5, seed: 8)
        fillRandomBatch(full, rows: 5, seed: 9)
        #expect(Self.chunkSizes(full) == [Winograd.chunkSamplesOverride ?? 5, Winograd.chunkSamplesOverride ?? 5])
        let part = try Model<Double>(spec: spec, batchCapacity: 5, seed: 8)
        part.inputs.update(from: full.inputs, count: 5 * full.inputWidth)
        part.labels.update(from: full.labels, count: 5)
        _ = full.forward(count: 5, mode: .train)
        full.backward(count: 5, accumulate: false) { _ in }
        // The same five samples as 2 then 3, accumulated: the batch's gradient up to the mean's scale.
        _ = part.forward(count: 2, mode: .train)
        part.backward(count: 2, accumulate: false) { _ in }
        let firstTwo = Array(part.gradients)
        part.inputs.update(from: full.inputs + 2 * full.inputWidth, count: 3 * full.inputWidth)
        part.labels.update(from: full.labels + 2, count: 3)
        _ = part.forward(count: 3, mode: .train)
        let accumulatedBefore = Array(part.gradients)
        #expect(accumulatedBefore == firstTwo)
        part.backward(count: 3, accumulate: true) { _ in }
        let lastThree = try Model<Double>(spec: spec, batchCapacity: 5, seed: 8)
        lastThree.inputs.update(from: full.inputs + 2 * full.inputWidth, count: 3 * full.inputWidth)
        lastThree.labels.update(from: full.labels + 2, count: 3)
        _ = lastThree.forward(count: 3, mode: .train)
        lastThree.backward(count: 3, accumulate: false) { _ in }
        // The loss is a mean over the batch: 5 g_full = 2 g_first + 3 g_last.
        for i in full.gradients.indices {
            let expected = 2 * firstTwo[i] + 3 * lastThree.gradients[i]
            #expect(abs(5 * full.gradients[i] - expected) <= 1e-12 * max(1, abs(expected)), "gradient \(i)")
            #expect(abs(part.gradients[i] - (firstTwo[i] + lastThree.gradients[i])) <= 1e-12 * max(1, abs(part.gradients[i])),
                    "accumulated gradient \(i)")
        }
    }
}
