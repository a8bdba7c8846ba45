import Foundation

/// Whether a forward pass is for training (dropout active) or for evaluation and checking (dropout off).
public enum ForwardMode: Sendable {
    case train, eval
}

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

/// A deliberately wrong backward pass for one tensor, used only to prove that the gradient checker catches
/// real bugs (and by the command line's test-only fault switch).
public enum GradientFault: Equatable, Sendable {
    /// The gradient comes out multiplied by `factor`.
    case scaled(tensor: String, factor: Double)
    /// A [out, in] weight gradient is written in [in, out] order (a wrong transpose flag).
    case transposed(tensor: String)
    /// The backward pass never writes this tensor's gradient.
    case missing(tensor: String)

    public var tensor: String {
        switch self {
        case let .scaled(t, _), let .transposed(t), let .missing(t): t
        }
    }
}

/// A sequential model with one contiguous parameter buffer and one gradient buffer of the same layout.
///
/// Layers are views into those buffers (see `parameterTable`), so zeroing gradients is one fill, an optimizer
/// is one flat loop and an allreduce works on the gradient buffer, or contiguous ranges of it, without packing.
/// Activations and their gradients are allocated once for `batchCapacity` rows: `forward` and `backward`
/// allocate nothing, for any batch of up to `batchCapacity` rows.
///
/// Dimension legend: B = rows in the batch (<= batchCapacity), I = inputs of a layer, O = outputs of a layer.
public final class Model<T: Scalar> {
    public let spec: ModelSpec
    public let parameterTable: [ParameterInfo]
    public let parameterCount: Int
    public let batchCapacity: Int
    public let inputWidth: Int
    public let outputWidth: Int

    /// All parameters, in `parameterTable` order.
    public let parameters: UnsafeMutableBufferPointer<T>
    /// d loss / d parameters, same layout. Backward accumulates into it; call `zeroGradients()` per step.
    public let gradients: UnsafeMutableBufferPointer<T>
    /// `controlSlots` extra values stored immediately before `gradients`, zeroed with them. A data-parallel
    /// caller puts per-step signals here (a stop request, a count of non-finite values) so they travel in the
    /// same allreduce as the first tensors' gradients instead of costing a collective of their own.
    public let control: UnsafeMutableBufferPointer<T>
    /// The batch's input rows, [batchCapacity, inputWidth]: data loaders gather straight into it.
    public let inputs: UnsafeMutablePointer<T>
    /// The batch's labels, [batchCapacity].
    public let labels: UnsafeMutablePointer<Int32>
    /// Regression targets for the squared-error loss, [batchCapacity, outputWidth]. Filled with one-hot labels
    /// by `forward` while `targetsFromLabels` is true.
    public let targets: UnsafeMutablePointer<T>
    public var targetsFromLabels = true

    /// Draws the dropout masks. Give each rank its own stream so ranks drop different units.
    public var dropoutGenerator: RandomGenerator
    /// Test hook: one tensor's backward pass made wrong on purpose. Nil in real runs.
    public var gradientFault: GradientFault? {
        didSet { resolvedFault = gradientFault.flatMap { f in parameterTable.firstIndex { $0.name == f.tensor } } }
    }
    private var resolvedFault: Int?

    /// Which pass a `layerTimer` report is about.
    public enum Pass: Sendable { case forward, backward }
    /// Profiling hook (bench/bpbench profile): when set, forward and backward time every layer inside the real
    /// pass and report (layer index, pass, seconds); index `spec.layers.count` is the loss. Timing kernels alone
    /// once hid a slow kernel that only real activations exposed. Backward excludes the time spent in its
    /// `gradientsReady` callback. Nil in training: then the passes read no clock.
    public var layerTimer: ((_ layer: Int, _ pass: Pass, _ seconds: Double) -> Void)?

    private let plan: [LayerStep<T>]
    private let arena: UnsafeMutableBufferPointer<T>
    /// A column of ones for bias gradients as a GEMV (sum over rows).
    private let ones: UnsafeMutablePointer<T>
    private var lastMode: ForwardMode = .eval

    /// The output rows of the last forward pass, [batchCapacity, outputWidth] (logits for cross-entropy).
    public var outputs: UnsafePointer<T> { UnsafePointer(plan[plan.count - 1].y) }

    public init(spec: ModelSpec, batchCapacity: Int, seed: UInt64 = 0, controlSlots: Int = 0) throws(ModelSpecError) {
        try spec.validate()
        guard batchCapacity > 0 else { throw ModelSpecError("batch size must be at least 1, got \(batchCapacity)") }
        self.spec = spec
        self.batchCapacity = batchCapacity
        parameterTable = spec.parameterTable
        parameterCount = parameterTable.last.map { $0.offset + $0.count } ?? 0
        inputWidth = spec.inputWidth
        outputWidth = spec.outputWidth

        parameters = LargeBuffer.allocate(parameterCount)
        parameters.initialize(repeating: 0)
        let gradientStorage: UnsafeMutableBufferPointer<T> = LargeBuffer.allocate(controlSlots + parameterCount)
        gradientStorage.initialize(repeating: 0)
        control = UnsafeMutableBufferPointer(rebasing: gradientStorage[..<controlSlots])
        gradients = UnsafeMutableBufferPointer(rebasing: gradientStorage[controlSlots...])
        labels = .allocate(capacity: batchCapacity)
        labels.initialize(repeating: 0, count: batchCapacity)
        dropoutGenerator = RandomGenerator(seed: seed, stream: .dropout)

        // One arena holds every activation, activation gradient, dropout mask, the targets and the ones column.
        var widths: [Int] = [inputWidth]
        for layer in spec.layers {
            if case let .linear(_, o) = layer { widths.append(o) } else { widths.append(widths.last!) }
        }
        // A ReLU right after a linear layer runs in place, forward and backward: nothing else reads the linear
        // layer's output before the ReLU (that layer's backward needs its input), ReLU's backward mask is the same
        // taken from its output (y > 0 exactly where x > 0), and its input gradient can overwrite its output
        // gradient, which is the buffer the linear layer reads as its own. Two buffers fewer per hidden layer.
        let inPlace = spec.layers.indices.map { index in
            guard index > 0, case .relu = spec.layers[index], case .linear = spec.layers[index - 1] else { return false }
            return true
        }
        let ownOutputElements = spec.layers.indices.reduce(0) { $0 + (inPlace[$1] ? 0 : widths[$1 + 1]) } * batchCapacity
        let maskElements = zip(spec.layers, widths.dropFirst()).reduce(0) { total, pair in
            if case .dropout = pair.0 { total + pair.1 * batchCapacity } else { total }
        }
        // Activations and activation gradients for every layer with its own output, the input batch, masks,
        // targets and the ones column. (`Model.footprint` computes the same total without allocating: keep the two
        // in step; a test compares them.)
        let total = inputWidth * batchCapacity + 2 * ownOutputElements + maskElements + batchCapacity * outputWidth
            + batchCapacity
        arena = LargeBuffer.allocate(total)
        arena.initialize(repeating: 0)

        var cursor = arena.baseAddress!
        func take(_ n: Int) -> UnsafeMutablePointer<T> {
            defer { cursor += n }
            return cursor
        }
        var activations = [take(inputWidth * batchCapacity)]
        for index in spec.layers.indices {
            activations.append(inPlace[index] ? activations[index] : take(widths[index + 1] * batchCapacity))
        }
        inputs = activations[0]
        targets = take(batchCapacity * outputWidth)
        ones = take(batchCapacity)
        ones.update(repeating: 1, count: batchCapacity)

        // The gradient of a layer's input is needed only when some earlier layer has parameters.
        var steps: [LayerStep<T>] = []
        var offset = 0
        var previousGradient: UnsafeMutablePointer<T>? = nil
        var seenParameters = false
        for (index, layer) in spec.layers.enumerated() {
            let dy = inPlace[index] ? previousGradient! : take(widths[index + 1] * batchCapacity)
            let step = LayerStep<T>(
                index: index, layer: layer, inWidth: widths[index], outWidth: widths[index + 1],
                x: activations[index], y: activations[index + 1],
                dx: seenParameters ? previousGradient : nil, dy: dy)
            if case let .linear(i, o) = layer {
                step.parameterOffset = offset
                step.parameterElements = o * i + o
                step.weightIndex = steps.reduce(0) { $0 + ($1.weightIndex >= 0 ? 2 : 0) }
                offset += step.parameterElements
                seenParameters = true
            }
            if case .dropout = layer { step.mask = take(widths[index + 1] * batchCapacity) }
            steps.append(step)
            previousGradient = dy
        }
        precondition(cursor == arena.baseAddress! + total, "arena sized \(total), used \(cursor - arena.baseAddress!)")
        activations.removeAll()
        // The in-place ReLUs sit between linear layers' buffers: they also sum the squares they write, for the
        // finiteness proof in `backward` (Float only; the float64 gradient-check copy has no use for it).
        for (index, step) in steps.enumerated() { step.sumsSquares = inPlace[index] && T.self == Float.self }
        plan = steps
        initializeParameters(seed: seed)
    }

    /// Elements in the buffer that holds every activation, activation gradient, mask, target and the ones column.
    public var arenaCount: Int { arena.count }

    /// What a model of `spec` at `batchCapacity` rows allocates, computed in floating point from the shapes
    /// alone, so that a size too large to allocate (or even to count in an `Int`) is found before anything is
    /// allocated.
    public struct Footprint: Equatable, Sendable {
        /// Parameters (also the length of the gradient buffer and of each optimizer state buffer).
        public var parameters: Double
        /// Elements of the activation arena (`arenaCount`).
        public var arenaElements: Double
        /// Bytes of one parameter-sized buffer of `T`, as `LargeBuffer` allocates it.
        public var parameterBufferBytes: Double { LargeBuffer.allocatedBytes(parameters * Double(MemoryLayout<T>.stride)) }
        /// Bytes of the activation arena and the labels.
        public var activationBytes: Double
    }

    public static func footprint(spec: ModelSpec, batchCapacity: Int) -> Footprint {
        let rows = Double(batchCapacity)
        var parameters = 0.0
        var width = Double(spec.inputWidth)
        var elements = Double(spec.inputWidth) * rows  // the input batch
        for (index, layer) in spec.layers.enumerated() {
            var output = width
            if case let .linear(i, o) = layer {
                parameters += Double(i) * Double(o) + Double(o)
                output = Double(o)
            }
            let inPlace: Bool = if index > 0, case .relu = layer, case .linear = spec.layers[index - 1] { true } else { false }
            if !inPlace { elements += 2 * output * rows }  // activations and their gradients
            if case .dropout = layer { elements += output * rows }  // the mask
            width = output
        }
        elements += rows * Double(spec.outputWidth) + rows  // targets and the ones column
        let stride = Double(MemoryLayout<T>.stride)
        return Footprint(parameters: parameters, arenaElements: elements,
                         activationBytes: LargeBuffer.allocatedBytes(elements * stride) + rows * 4)
    }

    deinit {
        LargeBuffer.free(parameters)
        LargeBuffer.free(UnsafeMutableBufferPointer(start: gradients.baseAddress! - control.count, count: control.count + parameterCount))
        labels.deallocate()
        LargeBuffer.free(arena)
    }

    // MARK: - Parameters

    /// Draws weights by `spec.initialization` from the seeded initialization stream (in Double, then rounded to T,
    /// so Float and Double models made with one seed start from the same values); biases start at zero.
    public func initializeParameters(seed: UInt64) {
        var generator = RandomGenerator(seed: seed, stream: .initialization)
        for step in plan {
            guard case let .linear(fanIn, fanOut) = step.layer else { continue }
            let weights = parameters.baseAddress! + step.parameterOffset
            let scheme = resolvedInitialization(after: step.index)
            var gain = 1.0
            if case let .leakyReLU(slope) = nextActivation(after: step.index) { gain = 1 / (1 + slope * slope) }
            let n = fanIn * fanOut
            switch scheme {
            case .kaimingNormal, .automatic:
                let std = (2 * gain / Double(fanIn)).squareRoot()
                for i in 0..<n { weights[i] = T(generator.nextNormal() * std) }
            case .kaimingUniform:
                let bound = (6 * gain / Double(fanIn)).squareRoot()
                for i in 0..<n { weights[i] = T((2 * generator.nextUniform() - 1) * bound) }
            case .xavierNormal:
                let std = (2 / Double(fanIn + fanOut)).squareRoot()
                for i in 0..<n { weights[i] = T(generator.nextNormal() * std) }
            case .xavierUniform:
                let bound = (6 / Double(fanIn + fanOut)).squareRoot()
                for i in 0..<n { weights[i] = T((2 * generator.nextUniform() - 1) * bound) }
            }
            (weights + n).update(repeating: 0, count: fanOut)
        }
    }

    private func nextActivation(after index: Int) -> LayerSpec? {
        spec.layers[(index + 1)...].first { if case .dropout = $0 { false } else { true } }
    }

    private func resolvedInitialization(after index: Int) -> Initialization {
        guard spec.initialization == .automatic else { return spec.initialization }
        switch nextActivation(after: index) {
        case .relu, .leakyReLU, .gelu: return .kaimingNormal
        default: return .xavierNormal
        }
    }

    /// Copies parameters from a buffer of the same layout, converting the scalar type if needed.
    public func loadParameters<S: Scalar>(from source: UnsafeBufferPointer<S>) {
        precondition(source.count == parameterCount, "parameter count \(source.count) != \(parameterCount)")
        Elementwise.convert(source.baseAddress!, into: parameters.baseAddress!, parameterCount)
    }

    /// Copies this model's parameters into another model of the same architecture (any scalar type).
    public func copyParameters<S: Scalar>(to other: Model<S>) {
        precondition(other.spec == spec, "architectures differ")
        other.loadParameters(from: UnsafeBufferPointer(parameters))
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
        precondition(fromLayer >= 0 && fromLayer < plan.count, "layer \(fromLayer) out of range")
        lastMode = mode
        for index in fromLayer..<plan.count {
            let started = timerClock()
            let step = plan[index]
            let n = count * step.outWidth
            switch step.layer {
            case let .linear(i, o):
                // y[B,O] = bias (broadcast) + x[B,I] * W[O,I]^T
                let w = parameters.baseAddress! + step.parameterOffset
                broadcastRows(w + o * i, into: step.y, rows: count, columns: o)
                T.gemm(transposeA: false, transposeB: true, m: count, n: o, k: i,
                       alpha: 1, a: step.x, lda: i, b: w, ldb: i, beta: 1, c: step.y, ldc: o)
            case .relu:
                if step.sumsSquares && mode == .train {
                    step.outputSquares = T(reluForwardSquares(floats(step.x), floats(step.y), n))
                } else {
                    reluForward(step.x, step.y, n)
                    step.outputSquares = nil
                }
            case let .leakyReLU(slope): leakyReLUForward(step.x, step.y, n, slope: T(slope))
            case .tanh: tanhForward(step.x, step.y, n)
            case .sigmoid: sigmoidForward(step.x, step.y, n)
            case .gelu: geluForward(step.x, step.y, n)
            case let .dropout(p):
                if mode == .train && p > 0 {
                    dropoutForward(step.x, step.y, mask: step.mask!, n, keep: 1 - p, generator: &dropoutGenerator)
                } else {
                    Elementwise.copy(step.x, into: step.y, n)
                }
            }
            report(index, .forward, since: started)
        }
        let lossStarted = timerClock()
        defer { report(plan.count, .forward, since: lossStarted) }
        let last = plan[plan.count - 1]
        switch spec.loss {
        case .softmaxCrossEntropy:
            let r = softmaxCrossEntropy(
                logits: last.y, labels: labels, rows: count, classes: outputWidth,
                gradient: last.dy, gradientScale: 1 / T(count))
            return BatchResult(lossSum: r.lossSum, correct: r.correct, count: count)
        case .meanSquaredError:
            if targetsFromLabels { oneHot(labels: labels, rows: count, classes: outputWidth, into: targets) }
            let n = count * outputWidth
            let sum = squaredError(
                predictions: last.y, targets: targets, count: n, gradient: last.dy, gradientScale: 1 / T(n))
            let correct = targetsFromLabels ? countCorrect(scores: last.y, labels: labels, rows: count, classes: outputWidth) : 0
            return BatchResult(lossSum: sum / Double(outputWidth), correct: correct, count: count)
        }
    }

    /// Back-propagates the last forward pass (same `count`), accumulating into `gradients`.
    ///
    /// Layers run in reverse order. After each linear layer's weight and bias gradients are complete, and before
    /// its input gradient is computed, `gradientsReady(offset)` reports that `gradients[offset...]` is final:
    /// a data-parallel caller starts reducing those buckets while backward continues. The input gradient of the
    /// first linear layer is never computed: nothing needs it.
    ///
    /// With `accumulate: false` the parameter gradients are overwritten instead of added to (GEMM beta = 0), so a
    /// training step needs no zeroing pass over the gradient buffer (measured: 3% of a 784-1024-1024-10 step).
    /// Such a pass also tries to prove each linear layer's gradients finite (`gradientsProvenFinite(in:)`).
    public func backward(count: Int, accumulate: Bool = true, gradientsReady: (_ offset: Int) throws -> Void) rethrows {
        let beta: T = accumulate ? 1 : 0
        precondition(count > 0 && count <= batchCapacity, "batch of \(count) rows, capacity \(batchCapacity)")
        for index in stride(from: plan.count - 1, through: 0, by: -1) {
            let started = timerClock()
            var callback: UInt64 = 0
            let step = plan[index]
            let n = count * step.inWidth
            switch step.layer {
            case let .linear(i, o):
                let w = parameters.baseAddress! + step.parameterOffset
                let gw = gradients.baseAddress! + step.parameterOffset
                // dW[O,I] += dy[B,O]^T * x[B,I];  db[O] += dy[B,O]^T * 1[B]
                T.gemm(transposeA: true, transposeB: false, m: o, n: i, k: count,
                       alpha: 1, a: step.dy, lda: o, b: step.x, ldb: i, beta: beta, c: gw, ldc: i)
                T.gemvTransposed(m: count, n: o, alpha: 1, a: step.dy, lda: o, x: ones, beta: beta, y: gw + o * i)
                step.provenFinite = !accumulate && gradientsBounded(at: index, count: count)
                if let fault = resolvedFault, fault == step.weightIndex || fault == step.weightIndex + 1 {
                    applyFault(to: parameterTable[fault])
                    step.provenFinite = false
                }
                let callbackStarted = timerClock()
                try gradientsReady(step.parameterOffset)
                callback = timerClock() &- callbackStarted
                // dx[B,I] = dy[B,O] * W[O,I]
                if let dx = step.dx {
                    T.gemm(transposeA: false, transposeB: false, m: count, n: i, k: o,
                           alpha: 1, a: step.dy, lda: o, b: w, ldb: i, beta: 0, c: dx, ldc: i)
                }
            case .relu:
                step.inputGradientSquares = nil
                guard let dx = step.dx else { break }
                if step.sumsSquares && !accumulate {
                    step.inputGradientSquares = T(reluBackwardSquares(floats(step.x), floats(step.dy), floats(dx), n))
                } else {
                    reluBackward(step.x, step.dy, dx, n)
                }
            case let .leakyReLU(slope):
                if let dx = step.dx { leakyReLUBackward(step.x, step.dy, dx, n, slope: T(slope)) }
            case .tanh:
                if let dx = step.dx { tanhBackward(step.y, step.dy, dx, n) }
            case .sigmoid:
                if let dx = step.dx { sigmoidBackward(step.y, step.dy, dx, n) }
            case .gelu:
                if let dx = step.dx { geluBackward(step.x, step.dy, dx, n) }
            case let .dropout(p):
                guard let dx = step.dx else { break }
                if lastMode == .train && p > 0 {
                    Elementwise.multiply(step.dy, step.mask!, into: dx, n)
                } else {
                    Elementwise.copy(step.dy, into: dx, n)
                }
            }
            report(index, .backward, since: started &+ callback)
        }
    }

    /// Whether the last `backward(accumulate: false)` proved every gradient in `range` finite; false for anything
    /// it could not prove (then count, as `nonFiniteCount` does). The proof reads no gradient: for a linear layer,
    /// dW = dy^T x and db = dy^T 1, so by Cauchy-Schwarz every |dW_oi| <= |dy| |x| and every |db_o| <= |dy| sqrt(B)
    /// (Frobenius norms over the batch). When both bounds are finite and far below the largest finite value, no
    /// partial sum of the GEMM or GEMV can overflow, and finite inputs with no overflow give finite outputs. The
    /// squared norms come from the in-place ReLU kernels that wrote x and dy anyway (`reluForwardSquares`,
    /// `reluBackwardSquares`) or else from a BLAS dot; a NaN or infinity in x or dy makes its norm non-finite and
    /// the proof fails. What this saves: reading 1.9 M gradients per 784-1024-1024-10 step (0.3 ms, 1.5%).
    public func gradientsProvenFinite(in range: Range<Int>) -> Bool {
        // Indices and integers only: called per gradient bucket in every step, and in unspecialised generic code
        // iterating the plan or matching the layer enum heap-allocated (measured, debug build).
        var index = 0
        while index < plan.count {
            let step = plan[index]
            let lower = step.parameterOffset, upper = lower + step.parameterElements
            if step.parameterElements > 0 && lower < range.upperBound && range.lowerBound < upper && !step.provenFinite {
                return false
            }
            index += 1
        }
        return true
    }

    /// The bounds of `gradientsProvenFinite(in:)` for linear layer `index`, just after its backward GEMMs.
    private func gradientsBounded(at index: Int, count: Int) -> Bool {
        let step = plan[index]
        guard case let .linear(i, o) = step.layer else { return false }
        // Squared norms of x (the previous layer's output) and dy (the next layer's input gradient, or the loss's).
        let xSquares = index > 0 ? plan[index - 1].outputSquares : nil
        let dySquares = index + 1 < plan.count ? plan[index + 1].inputGradientSquares : nil
        let x2 = Double(xSquares ?? T.dot(count * i, step.x, step.x))
        let dy2 = Double(dySquares ?? T.dot(count * o, step.dy, step.dy))
        // A wide margin below the largest finite value for the rounding of the norms and of the products' sums.
        let limit = Double(T.greatestFiniteMagnitude) / 16
        let weightBound = dy2.squareRoot() * x2.squareRoot(), biasBound = dy2.squareRoot() * Double(count).squareRoot()
        return weightBound <= limit && biasBound <= limit  // false for NaN and infinity
    }

    /// A buffer of T seen as Float, for the Float-only kernels; only called when T is Float.
    @inline(__always)
    private func floats(_ p: UnsafeMutablePointer<T>) -> UnsafeMutablePointer<Float> {
        UnsafeMutableRawPointer(p).assumingMemoryBound(to: Float.self)
    }

    /// Nanoseconds for `layerTimer`, or 0 without reading the clock when no timer is set.
    @inline(__always)
    private func timerClock() -> UInt64 {
        layerTimer == nil ? 0 : DispatchTime.now().uptimeNanoseconds
    }

    @inline(__always)
    private func report(_ layer: Int, _ pass: Pass, since start: UInt64) {
        if let timer = layerTimer { timer(layer, pass, Double(DispatchTime.now().uptimeNanoseconds - start) * 1e-9) }
    }

    /// Back-propagates the last forward pass with nobody waiting for finished gradients.
    public func backward(count: Int) {
        backward(count: count) { _ in }
    }

    /// The sign pattern (x > 0) of every input to a ReLU-family layer in the last forward pass. Two passes with
    /// different patterns straddle a kink, where finite differences are not a derivative.
    public func kinkPattern(count: Int) -> [Bool] {
        var pattern: [Bool] = []
        for step in plan where step.layer.hasKink {
            let n = count * step.inWidth
            for i in 0..<n { pattern.append(step.x[i] > 0) }
        }
        return pattern
    }

    private func applyFault(to info: ParameterInfo) {
        let g = gradients.baseAddress! + info.offset
        switch gradientFault {
        case let .scaled(_, factor):
            Elementwise.scale(g, info.count, by: T(factor))
        case .transposed:
            guard info.shape.count == 2 else { break }
            let (rows, columns) = (info.shape[0], info.shape[1])
            let copy = Array(UnsafeBufferPointer(start: g, count: info.count))
            for r in 0..<rows {
                for c in 0..<columns { g[c * rows + r] = copy[r * columns + c] }
            }
        case .missing:
            Elementwise.zero(g, info.count)
        case nil:
            break
        }
    }
}

/// One layer's place in the forward and backward passes: its buffers are views into the model's arena.
/// A class, not a struct: copying a generic struct out of an array in unspecialised generic code heap-allocates
/// a box per copy (measured: one allocation per layer per pass), while a class reference is only retained.
final class LayerStep<T: Scalar> {
    let index: Int
    let layer: LayerSpec
    let inWidth: Int
    let outWidth: Int
    /// Input activations [B, inWidth].
    let x: UnsafeMutablePointer<T>
    /// Output activations [B, outWidth].
    let y: UnsafeMutablePointer<T>
    /// d loss / d x, [B, inWidth]; nil when no earlier layer has parameters.
    let dx: UnsafeMutablePointer<T>?
    /// d loss / d y, [B, outWidth].
    let dy: UnsafeMutablePointer<T>
    /// Linear layers: offset of the weight in the flat buffers (the bias follows it) and its table index.
    var parameterOffset = 0
    var parameterElements = 0
    var weightIndex = -1
    /// Dropout layers: the mask of the last training pass, [B, outWidth].
    var mask: UnsafeMutablePointer<T>? = nil
    /// In-place ReLUs (Float): their kernels also sum the squares of what they write. The sums of the last
    /// training forward (outputs) and backward (input gradients), nil when not computed.
    var sumsSquares = false
    var outputSquares: T? = nil
    var inputGradientSquares: T? = nil
    /// Linear layers: whether the last backward proved its gradients finite (`Model.gradientsProvenFinite`).
    var provenFinite = false

    init(index: Int, layer: LayerSpec, inWidth: Int, outWidth: Int,
         x: UnsafeMutablePointer<T>, y: UnsafeMutablePointer<T>,
         dx: UnsafeMutablePointer<T>?, dy: UnsafeMutablePointer<T>) {
        self.index = index
        self.layer = layer
        self.inWidth = inWidth
        self.outWidth = outWidth
        self.x = x
        self.y = y
        self.dx = dx
        self.dy = dy
    }
}
