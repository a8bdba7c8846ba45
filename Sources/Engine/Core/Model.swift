import Foundation

/// The result of one forward pass over `count` rows.
public struct BatchResult: Equatable, Sendable {
    /// Sum of per-row losses; `lossSum / count` is the mean loss that the gradients differentiate.
    public var lossSum: Double
    /// Rows whose highest score is the label (0 when the model has no labels).
    public var correct: Int
    public var count: Int
    public var loss: Double { count > 0 ? lossSum / Double(count) : 0 }

    public init(lossSum: Double = 0, correct: Int = 0, count: Int = 0) {
        self.lossSum = lossSum
        self.correct = correct
        self.count = count
    }

    public static func + (a: BatchResult, b: BatchResult) -> BatchResult {
        BatchResult(lossSum: a.lossSum + b.lossSum, correct: a.correct + b.correct, count: a.count + b.count)
    }
}

/// Which pass of a model a `Model.layerTimer` report is about. Declared outside the generic `Model` so that its
/// layout is known in unspecialised code: nested there, each report through the timer heap-allocated (measured).
public enum ModelPass: Sendable { case forward, backward }

/// A sequential model: one contiguous parameter buffer and one gradient buffer of the same layout, a buffer of the
/// layers' non-trainable state (batch norm's running statistics), and a plan of layers that view into them.
///
/// Every tensor has its PyTorch `nn.Sequential` name (`parameterTable`, `bufferTable`), so zeroing gradients is one
/// fill, an optimizer is one flat loop and an allreduce works on the gradient buffer, or contiguous ranges of it,
/// without packing. Activations and their gradients are allocated once for `batchCapacity` rows, as are the
/// layers' own workspaces and the scratch they share: `forward` and `backward` allocate nothing, for any batch of
/// up to `batchCapacity` rows. Each layer kind is a class of its own under Layers/ with its passes side by side.
///
/// Dimension legend: B = rows in the batch (<= batchCapacity); a row is one sample, flattened (NCHW for images).
public final class Model<T: Scalar> {
    public let spec: ModelSpec
    public let parameterTable: [ParameterInfo]
    public let parameterCount: Int
    /// Non-trainable tensors saved with the parameters (batch norm's running_mean, running_var,
    /// num_batches_tracked), with offsets into `buffers`.
    public let bufferTable: [ParameterInfo]
    public let batchCapacity: Int
    /// Values in one input sample, and in one output row.
    public let inputWidth: Int
    public let outputWidth: Int
    /// `spec.labelSmoothing` in the model's scalar type, read by every cross-entropy forward pass.
    let labelSmoothing: T
    /// The shape of a sample before the first layer and after each layer.
    public let shapes: [[Int]]

    /// All parameters, in `parameterTable` order.
    public let parameters: UnsafeMutableBufferPointer<T>
    /// d loss / d parameters, same layout. `backward(count:accumulate: false, ...)`, as training calls it, overwrites
    /// it; the default `accumulate: true` adds to it, after a `zeroGradients()`.
    public let gradients: UnsafeMutableBufferPointer<T>
    /// `controlSlots` extra values stored immediately before `gradients`, zeroed with them. A data-parallel
    /// caller puts per-step signals here (a stop request, a count of non-finite values) so they travel in the
    /// same allreduce as the first tensors' gradients instead of costing a collective of their own.
    public let control: UnsafeMutableBufferPointer<T>
    /// The layers' non-trainable state, in `bufferTable` order (empty without batch norm).
    public let buffers: UnsafeMutableBufferPointer<T>
    /// The batch's input rows, [batchCapacity, inputWidth]: data loaders gather straight into it.
    public let inputs: UnsafeMutablePointer<T>
    /// The batch's labels, [batchCapacity].
    public let labels: UnsafeMutablePointer<Int32>
    /// Regression targets for the squared-error loss, [batchCapacity, outputWidth]. Filled with one-hot labels
    /// by `forward` while `targetsFromLabels` is true.
    public let targets: UnsafeMutablePointer<T>
    public var targetsFromLabels = true

    /// The seed of the dropout masks (the run's seed).
    public let dropoutSeed: UInt64
    /// Per row of the batch, the stream its dropout masks are drawn from: (epoch, the sample's index) as
    /// `setSamples` keys it, so a sample's masks depend on no rank, batch or position in the batch, as its
    /// augmentation does not: N ranks with batch b train the model one rank trains with batch N*b, dropout on, and a
    /// resume on another world size draws the same masks. [batchCapacity]; until `setSamples`, row r is sample r of
    /// epoch 0.
    public let sampleStreams: UnsafeMutablePointer<UInt64>
    /// Sums across ranks for synchronized batch norm; nil normalises each rank's batch on its own.
    public let crossRankReducer: CrossRankReducer?

    /// Which pass a `layerTimer` report is about.
    public typealias Pass = ModelPass
    /// Profiling hook (bench/bpbench profile, the Worker's `--timeline`): when set, forward and backward time every
    /// run-time layer (a fused block is one, `timedLayerNames`) inside the real pass and report (layer index, pass,
    /// start, end) in `DispatchTime` uptime nanoseconds;
    /// index `spec.layers.count` is the loss. Timing kernels alone once hid a slow kernel that only real activations
    /// exposed. A layer's backward span includes its `gradientsReady` callback (where gradient buckets start), so
    /// what the callback records nests inside it. Nil in training: then the passes read no clock.
    public var layerTimer: ((_ layer: Int, _ pass: Pass, _ start: UInt64, _ end: UInt64) -> Void)? {
        didSet {
            timing = layerTimer != nil
            timer = layerTimer ?? { _, _, _, _ in }
        }
    }
    /// `layerTimer` as the passes read it: a flag and a plain closure. Read from unspecialised generic code, the
    /// optional closure was reabstracted on every read, a heap allocation per layer (measured), which a recorded
    /// step (`--timeline`) cannot afford.
    private var timing = false
    private var timer: (_ layer: Int, _ pass: Pass, _ start: UInt64, _ end: UInt64) -> Void = { _, _, _, _ in }

    /// The run-time layers in order: one per layer of the spec, except a fused block, one for three
    /// (`LayerSpec.planRuns`). Fixed once built, except that a test fault may wrap one (GradientFaults.swift).
    private(set) var plan: [Layer<T>]
    /// For each layer of the spec, the position in `plan` of the run-time layer that runs it.
    private let planPosition: [Int]
    private let arena: UnsafeMutableBufferPointer<T>
    private let scratch: UnsafeMutableBufferPointer<T>
    /// The last layer: the loss reads its output and writes its output gradient.
    private let lastLayer: Layer<T>

    /// The output rows of the last forward pass, [batchCapacity, outputWidth] (logits for cross-entropy).
    public var outputs: UnsafePointer<T> { UnsafePointer(lastLayer.y) }

    /// `crossRankReducer`: sums across ranks for synchronized batch norm, given to every batch norm layer (nil: each
    /// rank normalises its own batch). `fusesBlocks: false` runs every batch norm, ReLU, max pooling block as three
    /// separate layers (inside residual blocks too), as a reference for tests and benchmarks (see
    /// BatchNormReLUPool.swift); training always fuses. The memory estimate (`footprint`) takes the same flag, except
    /// inside blocks, which it counts fused.
    /// - Parameter seed: draws the dropout masks (with `setSamples`' keys).
    public init(spec: ModelSpec, batchCapacity: Int, seed: UInt64 = 0, controlSlots: Int = 0, crossRankReducer: CrossRankReducer? = nil,
                fusesBlocks: Bool = true) throws(ModelSpecError) {
        try spec.validate()
        guard batchCapacity > 0 else { throw ModelSpecError("batch size must be at least 1, got \(batchCapacity)") }
        self.spec = spec
        self.batchCapacity = batchCapacity
        shapes = try spec.shapes()
        parameterTable = spec.parameterTable
        parameterCount = parameterTable.last.map { $0.offset + $0.count } ?? 0
        bufferTable = spec.bufferTable
        inputWidth = spec.inputWidth
        outputWidth = shapes.last!.reduce(1, *)
        labelSmoothing = T(spec.labelSmoothing)
        self.crossRankReducer = crossRankReducer

        parameters = LargeBuffer.allocate(parameterCount)
        parameters.initialize(repeating: 0)
        let gradientStorage: UnsafeMutableBufferPointer<T> = LargeBuffer.allocate(controlSlots + parameterCount)
        gradientStorage.initialize(repeating: 0)
        control = UnsafeMutableBufferPointer(rebasing: gradientStorage[..<controlSlots])
        gradients = UnsafeMutableBufferPointer(rebasing: gradientStorage[controlSlots...])
        let bufferCount = bufferTable.last.map { $0.offset + $0.count } ?? 0
        buffers = .allocate(capacity: max(1, bufferCount))
        buffers.initialize(repeating: 0)
        labels = .allocate(capacity: batchCapacity)
        labels.initialize(repeating: 0, count: batchCapacity)
        dropoutSeed = seed
        sampleStreams = .allocate(capacity: batchCapacity)
        for row in 0..<batchCapacity { sampleStreams[row] = RandomGenerator.stream(.dropout, epoch: 0, index: row) }

        let runs = LayerSpec.planRuns(spec.layers, fusing: fusesBlocks)
        let plan = Model.placeInPlace(Model.makeLayers(spec.layers, runs: runs, shapes: shapes, batchCapacity: batchCapacity,
                                                       fusesBlocks: fusesBlocks) { $0 },
                                      specs: spec.layers)
        planPosition = runs.enumerated().flatMap { position, run in run.map { _ in position } }
        // One arena holds the input batch, every activation and activation gradient a layer does not share with
        // the one before it, and the targets. (`Model.footprint` computes the same total without allocating.)
        arena = LargeBuffer.allocate(Model.arenaElements(plan, inputWidth: spec.inputWidth, outputWidth: outputWidth,
                                                         batchCapacity: batchCapacity))
        arena.initialize(repeating: 0)
        scratch = LargeBuffer.allocate(max(1, plan.map(\.scratchElements).max() ?? 0))
        scratch.initialize(repeating: 0)
        (inputs, targets) = Model.bindActivations(plan, arena: arena, scratch: scratch, inputWidth: spec.inputWidth,
                                                  outputWidth: outputWidth, batchCapacity: batchCapacity)
        let bound = Model.bindParameters(plan, parameters: parameters, gradients: gradients, buffers: buffers)
        precondition(bound == (parameterCount, bufferCount), "parameter layout out of step")
        for (i, layer) in plan.enumerated() {
            layer.previous = i > 0 ? plan[i - 1] : nil
            layer.next = i + 1 < plan.count ? plan[i + 1] : nil
        }
        self.plan = plan
        lastLayer = plan[plan.count - 1]
        for layer in plan { layer.attach(to: self) }
        initializeParameters(seed: seed)
    }

    /// The run-time layers of `layers` (a model's, or a block's path), one per run of its layers: a layer made by
    /// its own class, or a fused block. `identity` gives the layer at position i of `layers` its index (the model's
    /// position, or a block's own identity for an inner layer); a block fuses inside as `fusesBlocks` says.
    static func makeLayers(_ layers: [LayerSpec], runs: [Range<Int>], shapes: [[Int]], batchCapacity: Int, fusesBlocks: Bool,
                           identity: (Int) -> Int) -> [Layer<T>] {
        runs.map { run in
            let index = run.lowerBound
            let placement = LayerPlacement(index: identity(index), inputShape: shapes[index],
                                           outputShape: shapes[run.upperBound], batchCapacity: batchCapacity, fusesBlocks: fusesBlocks)
            guard run.count == 3, let pool = layers[index + 2].as(MaxPool2dKind.self) else {
                return layers[index].kind.makeLayer(placement)
            }
            return BatchNormReLUPool<T>(placement, normalization: layers[index], pool: pool)
        }
    }

    /// Points every layer at its input, output and their gradients in `arena` (the input batch first, the targets
    /// last), and at the shared scratch. A layer's input gradient is bound only when some earlier layer has
    /// parameters: nothing else needs it. Returns the input batch and the targets.
    private static func bindActivations(
        _ plan: [Layer<T>], arena: UnsafeMutableBufferPointer<T>, scratch: UnsafeMutableBufferPointer<T>,
        inputWidth: Int, outputWidth: Int, batchCapacity: Int
    ) -> (inputs: UnsafeMutablePointer<T>, targets: UnsafeMutablePointer<T>) {
        var cursor = arena.baseAddress!
        func take(_ n: Int) -> UnsafeMutablePointer<T> {
            defer { cursor += n }
            return cursor
        }
        let inputs = take(inputWidth * batchCapacity)
        var activation = inputs
        var previousGradient: UnsafeMutablePointer<T>? = nil
        var seenParameters = false
        for layer in plan {
            layer.x = activation
            layer.y = layer.runsInPlace ? activation : take(layer.outputCount * batchCapacity)
            layer.dy = layer.runsInPlace ? previousGradient! : take(layer.outputCount * batchCapacity)
            layer.dx = seenParameters ? previousGradient : nil
            layer.scratch = scratch.baseAddress!
            seenParameters = seenParameters || layer.spec.parameterShapes(input: layer.inputShape).contains { $0.1.reduce(1, *) > 0 }
            activation = layer.y
            previousGradient = layer.dy
        }
        let targets = take(batchCapacity * outputWidth)
        let used = cursor - arena.baseAddress!
        precondition(used == arena.count, "arena sized \(arena.count), used \(used)")
        return (inputs, targets)
    }

    /// Points every layer with parameters at its tensors in `parameters` and `gradients`, and every layer with
    /// state at its part of `buffers`, in plan order. Returns how many parameters and buffer values were bound.
    static func bindParameters(_ plan: [Layer<T>], parameters: UnsafeMutableBufferPointer<T>,
                                       gradients: UnsafeMutableBufferPointer<T>,
                                       buffers: UnsafeMutableBufferPointer<T>) -> (Int, Int) {
        var parameterOffset = 0, bufferOffset = 0
        for layer in plan {
            let count = layer.spec.parameterShapes(input: layer.inputShape).reduce(0) { $0 + $1.1.reduce(1, *) }
            if count > 0 {
                layer.parameters = parameters.baseAddress! + parameterOffset
                layer.gradients = gradients.baseAddress! + parameterOffset
                layer.parameterOffset = parameterOffset
                layer.parameterCount = count
                parameterOffset += count
            }
            let stateCount = layer.spec.bufferShapes.reduce(0) { $0 + $1.1.reduce(1, *) }
            if stateCount > 0 {
                layer.buffers = buffers.baseAddress! + bufferOffset
                bufferOffset += stateCount
            }
        }
        return (parameterOffset, bufferOffset)
    }

    deinit {
        LargeBuffer.free(parameters)
        LargeBuffer.free(UnsafeMutableBufferPointer(start: gradients.baseAddress! - control.count, count: control.count + parameterCount))
        buffers.deallocate()
        labels.deallocate()
        sampleStreams.deallocate()
        LargeBuffer.free(arena)
        LargeBuffer.free(scratch)
    }

    /// Keys the batch's rows for dropout: row r holds sample `indices[r]` of `epoch` (allocates nothing).
    public func setSamples(epoch: Int, indices: UnsafeBufferPointer<Int>) {
        precondition(indices.count <= batchCapacity, "setSamples: \(indices.count) rows, capacity \(batchCapacity)")
        for (row, index) in indices.enumerated() { sampleStreams[row] = RandomGenerator.stream(.dropout, epoch: epoch, index: index) }
    }

    /// Decides which layers run in place, as each kind says (`LayerKind.runsInPlace`). A ReLU right after a layer
    /// whose backward pass does not read its own output (linear, convolution, batch norm) runs in place, forward and
    /// backward: nothing else reads that output before the ReLU, ReLU's backward mask is the same taken from its
    /// output (y > 0 exactly where x > 0), and its input gradient can overwrite its output gradient, which is the
    /// buffer the layer before reads as its own. Two buffers fewer per hidden layer. A flatten moves nothing, so it
    /// always shares its input's buffers. In Float, in-place ReLUs also sum the squares they write, for the
    /// finiteness proof in `backward`.
    /// The layer before a fused block's is its first layer's; the layer after it sees its pooling before it.
    private static func placeInPlace(_ layers: [Layer<T>], specs: [LayerSpec]) -> [Layer<T>] {
        for layer in layers {
            layer.runsInPlace = layer.spec.kind.runsInPlace(after: layer.index > 0 ? specs[layer.index - 1] : nil)
        }
        return layers
    }

    /// Elements of the arena for `plan`: the input batch, the outputs and output gradients of the layers that do
    /// not run in place, and the targets.
    private static func arenaElements(_ plan: [Layer<T>], inputWidth: Int, outputWidth: Int, batchCapacity: Int) -> Int {
        let own = plan.reduce(0) { $0 + ($1.runsInPlace ? 0 : 2 * $1.outputCount) }
        return batchCapacity * (inputWidth + own + outputWidth)
    }

    /// Elements in the buffer that holds every activation and activation gradient, the input batch and the targets.
    public var arenaCount: Int { arena.count }

    /// What a model of `spec` at `batchCapacity` rows allocates, computed from the shapes alone (in floating point),
    /// so that a size too large to allocate, or even to count in an `Int`, is found before anything is allocated.
    public struct Footprint: Equatable, Sendable {
        /// Parameters (also the length of the gradient buffer and of each optimizer state buffer).
        public var parameters: Double
        /// Elements of the activation arena (`arenaCount`).
        public var arenaElements: Double
        /// Bytes of one parameter-sized buffer of `T`, as `LargeBuffer` allocates it.
        public var parameterBufferBytes: Double { LargeBuffer.allocatedBytes(parameters * Double(MemoryLayout<T>.stride)) }
        /// Bytes of the activation arena, the labels, the layers' workspaces and their scratch.
        public var activationBytes: Double
    }

    /// The bytes the gradient check's kink patterns take at `batchCapacity` samples (`kinkPattern(count:)`): an Int32
    /// for every input value of every layer with a kink (ReLU's signs, pooling's winners), also inside residual blocks,
    /// and the check holds two at once (the spare capacity `append` leaves is never touched, so never resident). A CNN's
    /// check at 256 samples was killed by the memory limit its estimate passed, 70 MiB over it, for want of these
    /// (measured: about one pattern's worth at the peak; two are counted).
    public static func kinkPatternBytes(spec: ModelSpec, batchCapacity: Int) -> Double {
        func values(_ layers: [LayerSpec], input: [Int]) -> Double {
            var shape = input, total = 0.0
            for layer in layers {
                if let block = layer.kind as? ResidualKind {
                    total += values(block.body, input: shape) + values(block.shortcut ?? [], input: shape)
                } else if layer.hasKink {
                    total += shape.reduce(1.0) { $0 * Double($1) }
                }
                guard let next = try? layer.outputShape(input: shape) else { return total }
                shape = next
            }
            return total
        }
        return 2 * 4 * Double(batchCapacity) * values(spec.layers, input: spec.inputShape)
    }

    public static func footprint(spec: ModelSpec, batchCapacity: Int, fusesBlocks: Bool = true) -> Footprint {
        let rows = Double(batchCapacity)
        let stride = Double(MemoryLayout<T>.stride)
        let shapes = (try? spec.shapes()) ?? []
        guard shapes.count == spec.layers.count + 1 else {
            return Footprint(parameters: 0, arenaElements: 0, activationBytes: 0)
        }
        var parameters = 0.0, own = 0.0, workspace = 0.0, scratch = 0.0
        for (index, layer) in spec.layers.enumerated() {
            parameters += layer.parameterShapes(input: shapes[index]).reduce(0.0) { $0 + $1.1.reduce(1.0) { $0 * Double($1) } }
        }
        // Per run-time layer, as `init` builds them: a fused block keeps only the pooled output and its gradient.
        for run in LayerSpec.planRuns(spec.layers, fusing: fusesBlocks) {
            let index = run.lowerBound, output = shapes[run.upperBound]
            let previous: LayerSpec? = index > 0 ? spec.layers[index - 1] : nil
            if !spec.layers[index].kind.runsInPlace(after: previous) { own += 2 * output.reduce(1.0) { $0 * Double($1) } }
            let needs = LayerSpec.workspace(of: spec.layers[run], shapes: shapes[run.lowerBound...run.upperBound],
                                            batchCapacity: rows, scalarBytes: stride, fusing: fusesBlocks)
            workspace += needs.bytes
            scratch = max(scratch, needs.scratchElements)
        }
        let elements = rows * (Double(spec.inputWidth) + own + (shapes.last ?? [0]).reduce(1.0) { $0 * Double($1) })
        return Footprint(parameters: parameters, arenaElements: elements,
                         activationBytes: LargeBuffer.allocatedBytes(elements * stride) + rows * 4 + workspace
                            + LargeBuffer.allocatedBytes(max(1, scratch) * stride))
    }

    // MARK: - Parameters

    /// Draws weights by `spec.initialization` from the seeded initialization stream (in Double, then rounded to T,
    /// so Float and Double models made with one seed start from the same values); biases start at zero,
    /// normalisation layers at weight 1 and bias 0, running statistics at mean 0 and variance 1.
    public func initializeParameters(seed: UInt64) {
        var generator = RandomGenerator(seed: seed, stream: .initialization)
        for layer in plan where layer.parameters != nil || layer.buffers != nil {
            let (scheme, gain) = Model.initialization(spec.initialization, feeding: fedRole(after: layer.index))
            layer.initialize(scheme: scheme, gain: gain, generator: &generator)
        }
    }

    /// The scheme and gain of weights that feed `fed` (nil: nothing), under the model's `initialization`.
    static func initialization(_ initialization: Initialization, feeding fed: InitializationRole?) -> (Initialization, Double) {
        var gain = 1.0, scheme = initialization
        if case let .kaiming(g) = fed { gain = g }
        if scheme == .automatic { scheme = if case .kaiming = fed { .kaimingNormal } else { .xavierNormal } }
        return (scheme, gain)
    }

    /// What the layer at `index` feeds: the role of the first layer after it that is not transparent (dropout,
    /// normalisation, pooling, flatten), nil at the end.
    func fedRole(after index: Int) -> InitializationRole? {
        spec.layers[(index + 1)...].lazy.map(\.kind.initializationRole).first { $0 != .transparent }
    }

    /// Copies parameters from a buffer of the same layout, converting the scalar type if needed.
    public func loadParameters<S: Scalar>(from source: UnsafeBufferPointer<S>) {
        precondition(source.count == parameterCount, "parameter count \(source.count) != \(parameterCount)")
        Elementwise.convert(source.baseAddress!, into: parameters.baseAddress!, parameterCount)
    }

    /// Copies this model's parameters and buffers into another model of the same architecture (any scalar type).
    public func copyParameters<S: Scalar>(to other: Model<S>) {
        precondition(other.spec == spec, "architectures differ")
        other.loadParameters(from: UnsafeBufferPointer(parameters))
        Elementwise.convert(buffers.baseAddress!, into: other.buffers.baseAddress!, buffers.count)
    }

    /// The view of one named tensor in a flat buffer of this model's layout.
    public func tensor(_ name: String, in buffer: UnsafeMutableBufferPointer<T>) -> UnsafeMutableBufferPointer<T>? {
        guard let info = parameterTable.first(where: { $0.name == name }) else { return nil }
        return UnsafeMutableBufferPointer(rebasing: buffer[info.range])
    }

    /// Zeroes the gradients and the control slots before them: one memset.
    public func zeroGradients() {
        Elementwise.zero(gradients.baseAddress! - control.count, control.count + parameterCount)
    }

    /// Zeroes only the control slots: enough before a `backward(count:accumulate: false, ...)`, which overwrites
    /// every gradient.
    public func zeroControl() {
        Elementwise.zero(control.baseAddress ?? gradients.baseAddress!, control.count)
    }

    // MARK: - Forward and backward

    /// Runs the first `count` rows of `inputs` through the model and the loss; also leaves d loss / d outputs
    /// ready for `backward`. The loss is the mean over the rows, so gradients are too.
    @discardableResult
    public func forward(count: Int, mode: ForwardMode) -> BatchResult {
        forward(count: count, mode: mode, fromLayer: 0)
    }

    /// A forward pass that recomputes only layers `fromLayer...`, reusing the activations the previous pass left
    /// for the layers below: valid when nothing below `fromLayer` changed since (same inputs and parameters,
    /// and no dropout below). The gradient checker perturbs one tensor at a time and uses this.
    public func forward(count: Int, mode: ForwardMode, fromLayer: Int) -> BatchResult {
        precondition(count > 0 && count <= batchCapacity, "batch of \(count) rows, capacity \(batchCapacity)")
        precondition(fromLayer >= 0 && fromLayer < planPosition.count, "layer \(fromLayer) out of range")
        // Indices, not `for layer in plan`: in unspecialised generic code the iterator heap-allocated (measured).
        var index = planPosition[fromLayer]
        while index < plan.count {
            let started = timerClock()
            plan[index].forward(count: count, mode: mode)
            report(plan[index].index, .forward, since: started)
            index += 1
        }
        let lossStarted = timerClock()
        defer { report(spec.layers.count, .forward, since: lossStarted) }
        switch spec.loss {
        case .softmaxCrossEntropy:
            let r = softmaxCrossEntropy(
                logits: lastLayer.y, labels: labels, rows: count, classes: outputWidth,
                gradient: lastLayer.dy, gradientScale: 1 / T(count), labelSmoothing: labelSmoothing)
            return BatchResult(lossSum: r.lossSum, correct: r.correct, count: count)
        case .meanSquaredError:
            if targetsFromLabels { oneHot(labels: labels, rows: count, classes: outputWidth, into: targets) }
            let n = count * outputWidth
            let sum = squaredError(
                predictions: lastLayer.y, targets: targets, count: n, gradient: lastLayer.dy, gradientScale: 1 / T(n))
            let correct = targetsFromLabels ? countCorrect(scores: lastLayer.y, labels: labels, rows: count, classes: outputWidth) : 0
            return BatchResult(lossSum: sum / Double(outputWidth), correct: correct, count: count)
        }
    }

    /// Back-propagates the last forward pass (same `count`), accumulating into `gradients`.
    ///
    /// Layers run in reverse order. After each layer's parameter gradients are complete, and before its input
    /// gradient is computed, `gradientsReady(offset)` reports that `gradients[offset...]` is final: a data-parallel
    /// caller starts reducing those buckets while backward continues. The input gradient of the first layer with
    /// parameters is never computed: nothing needs it.
    ///
    /// With `accumulate: false` the parameter gradients are overwritten instead of added to (GEMM beta = 0), so a
    /// training step needs no zeroing pass over the gradient buffer (BENCHMARKS.md, "Measurements behind comments in
    /// the code").
    /// Such a pass also tries to prove each linear layer's gradients finite (`gradientsProvenFinite(in:)`).
    public func backward(count: Int, accumulate: Bool = true, gradientsReady: (_ offset: Int) throws -> Void) rethrows {
        precondition(count > 0 && count <= batchCapacity, "batch of \(count) rows, capacity \(batchCapacity)")
        var index = plan.count - 1
        while index >= 0 {
            let started = timerClock()
            let layer = plan[index]
            if layer.parameterCount > 0 {
                layer.backwardParameters(count: count, accumulate: accumulate)
                try gradientsReady(layer.parameterOffset)
            }
            layer.backwardInput(count: count, accumulate: accumulate)
            report(layer.index, .backward, since: started)
            index -= 1
        }
    }

    /// Whether the last `backward(accumulate: false)` proved every gradient in `range` finite; false for anything
    /// it could not prove (then count, as `nonFiniteCount` does). The proof reads no gradient: see `Linear`'s
    /// bound (a layer of another kind proves nothing, and its gradients are counted). What this saves: reading every
    /// gradient once per step (BENCHMARKS.md, "Measurements behind comments in the code").
    public func gradientsProvenFinite(in range: Range<Int>) -> Bool {
        // Indices and integers only: called per gradient bucket in every step, and in unspecialised generic code
        // iterating the plan heap-allocated (measured, debug build).
        var index = 0
        while index < plan.count {
            let layer = plan[index]
            let lower = layer.parameterOffset, upper = lower + layer.parameterCount
            if layer.parameterCount > 0 && lower < range.upperBound && range.lowerBound < upper && !layer.provenFinite {
                return false
            }
            index += 1
        }
        return true
    }

    /// Nanoseconds for `layerTimer`, or 0 without reading the clock when no timer is set.
    @inline(__always)
    private func timerClock() -> UInt64 {
        timing ? DispatchTime.now().uptimeNanoseconds : 0
    }

    @inline(__always)
    private func report(_ layer: Int, _ pass: Pass, since start: UInt64) {
        if timing { timer(layer, pass, start, DispatchTime.now().uptimeNanoseconds) }
    }

    /// Back-propagates the last forward pass with nobody waiting for finished gradients.
    public func backward(count: Int) {
        backward(count: count) { _ in }
    }

    /// What decides, in the last forward pass, which side of every kink each value is on: the sign of every input
    /// to a ReLU-family layer and the winner of every max-pooling window. Two passes with different patterns
    /// straddle a kink, where finite differences are not a derivative.
    public func kinkPattern(count: Int) -> [Int32] {
        var pattern: [Int32] = []
        for layer in plan where layer.hasKink { layer.appendKinkPattern(count: count, to: &pattern) }
        return pattern
    }

    /// One line per layer, as torchinfo prints them: index, layer, output shape [B, ...] and parameter count.
    public var layerSummary: [String] {
        spec.layers.enumerated().map { index, layer in
            let shape = "[\(batchCapacity), " + shapes[index + 1].map(String.init).joined(separator: ", ") + "]"
            let parameters = layer.parameterShapes(input: shapes[index]).reduce(0) { $0 + $1.1.reduce(1, *) }
            return "\(index): \(layer)  ->  \(shape)  \(parameters) parameters"
        }
    }

    /// What the layer timer's reports are about, by the index it reports: the layer at that index, or for a fused
    /// block (which reports at its batch norm's index, once for its three layers) the block, "BatchNorm(32) ReLU
    /// MaxPool2d(2)". Indices inside a block report nothing.
    public var timedLayerNames: [String] {
        var names = spec.layers.map(\.description)
        for layer in plan where layer is BatchNormReLUPool<T> {
            names[layer.index] = spec.layers[layer.index...(layer.index + 2)].map(\.description).joined(separator: " ")
        }
        return names
    }

    /// How many layers the layer timer reports in each pass (besides the loss): a fused block is one.
    public var timedLayerCount: Int { plan.count }

    /// The run-time layer that runs layer `index` of the spec (a fused block runs three).
    func layer(at index: Int) -> Layer<T> { plan[planPosition[index]] }

    /// Puts `layer` in the plan in place of the one that runs layer `index` of the spec: a test fault's wrapper
    /// (GradientFaults.swift).
    func replaceLayer(at index: Int, with layer: Layer<T>) {
        plan[planPosition[index]] = layer
    }
}
