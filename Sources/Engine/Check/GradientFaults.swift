/// A deliberately wrong backward pass for one tensor, used only to prove that the gradient checker catches
/// real bugs (and by the command line's test-only fault switch). `Model.installGradientFault` puts it in a model
/// as a wrapper around the layer it breaks (`FaultyLayer`): the layers' own passes carry no trace of it.
public enum GradientFault: Equatable, Sendable {
    /// The gradient comes out multiplied by `factor`.
    case scaled(tensor: String, factor: Double)
    /// A [out, in] weight gradient is written in [in, out] order (a wrong transpose flag).
    case transposed(tensor: String)
    /// The backward pass never writes this tensor's gradient.
    case missing(tensor: String)
    /// A convolution's input gradient computed with its kernel flipped (rotated 180 degrees): the classic
    /// correlation-versus-convolution mix-up. Names the layer's weight tensor.
    case flippedKernel(tensor: String)
    /// A convolution's input gradient scattered one position off (a wrong padding offset in col2im).
    case paddingOffset(tensor: String)
    /// Batch norm's input gradient without the term for the mean's own dependence on x (dx misses -dbeta / N).
    case batchNormWithoutMeanTerm(tensor: String)
    /// Synchronized batch norm's input gradient with this rank's own sum of dy where the global batch's belongs (a
    /// reduction left out of the backward pass). Only under a `CrossRankReducer`: a rank checking alone cannot see it.
    case batchNormLocalSums(tensor: String)

    public var tensor: String {
        switch self {
        case let .scaled(t, _), let .transposed(t), let .missing(t), let .flippedKernel(t), let .paddingOffset(t),
             let .batchNormWithoutMeanTerm(t), let .batchNormLocalSums(t): t
        }
    }

    /// Whether the fault is in a layer's input gradient (the tensor names the layer) rather than in the named
    /// tensor's own gradient.
    var breaksInputGradient: Bool {
        switch self {
        case .flippedKernel, .paddingOffset, .batchNormWithoutMeanTerm, .batchNormLocalSums: true
        case .scaled, .transposed, .missing: false
        }
    }
}

extension Model {
    /// The test fault installed in this model, also inside a residual block; nil in real runs.
    public var gradientFault: GradientFault? {
        plan.lazy.compactMap(FaultyLayer<T>.fault(in:)).first
    }

    /// Test double: makes the backward pass of the layer that owns `fault.tensor` wrong in the way `fault` says, by
    /// putting a `FaultyLayer` around it in the plan, or around the layer inside a residual block that owns it
    /// (`3.body.0.weight`: the block's first convolution, not the whole block); nil (or a tensor the model does not
    /// have) leaves every layer as built. Replaces any fault installed before. Call it between passes, never during
    /// one. A fault the tensor's layer cannot carry (`whyGradientFaultCannotBePlanted`) leaves its pass correct: the
    /// Worker asks first and refuses such a fault with the reason.
    public func installGradientFault(_ fault: GradientFault?) {
        for case let faulty as FaultyLayer<T> in plan { replaceLayer(at: faulty.index, with: faulty.remove()) }
        for case let block as Residual<T> in plan { block.removeInnerFault() }
        guard let fault, let info = parameterTable.first(where: { $0.name == fault.tensor }) else { return }
        let owner = layer(at: info.layerIndex)
        if let block = owner as? Residual<T> {
            let wrapped = block.wrapInnerLayer(owning: info.offset - block.parameterOffset) { layer, offset in
                FaultyLayer(wrapping: layer, fault: fault, tensor: ParameterInfo(name: info.name, offset: offset, shape: info.shape))
            }
            precondition(wrapped, "no layer of block \(info.layerIndex) owns \(info.name)")
            return
        }
        replaceLayer(at: info.layerIndex, with: FaultyLayer(wrapping: owner, fault: fault, tensor: info))
    }
}

extension Model {
    /// Why `fault` cannot be planted in this model, nil when it can. Planting it anyway would leave the backward pass
    /// correct, and a test that expects the check to fail would see it pass for the wrong reason, or one that expects
    /// a pass would prove nothing: a tensor the model does not have, a flipped kernel or padding offset outside a
    /// convolution, a transposed tensor that is no matrix, a mean term or local sums outside batch norm, or a broken
    /// input gradient of the first layer, which nothing uses.
    public func whyGradientFaultCannotBePlanted(_ fault: GradientFault) -> String? {
        guard let info = parameterTable.first(where: { $0.name == fault.tensor }) else {
            return "the model has no tensor '\(fault.tensor)' (its tensors: \(parameterTable.map(\.name).joined(separator: ", ")))"
        }
        var owner = layer(at: info.layerIndex)
        if let block = owner as? Residual<T>, let inner = block.innerLayer(owning: info.offset - block.parameterOffset) { owner = inner }
        let described = "\(info.name) belongs to \(owner.spec.description)"
        if fault.breaksInputGradient && owner.dx == nil {
            return "the fault breaks the input gradient of the layer \(info.name) belongs to, \(owner.spec.description), which is "
                + "the first layer: no layer uses its input gradient"
        }
        switch fault {
        case .scaled, .missing:
            return nil
        case .transposed:
            return info.shape.count == 2 ? nil : "a transposed gradient needs a matrix [out, in]; \(info.name) is \(info.shape)"
        case .flippedKernel, .paddingOffset:
            guard let convolution = owner as? Conv2d<T> else {
                return "a flipped kernel or padding offset needs a convolution's tensor; \(described)"
            }
            // A 1x1 kernel turned by 180 degrees is itself: the backward pass stays correct.
            if case .flippedKernel = fault, convolution.kernel == 1 {
                return "a flipped kernel needs a kernel larger than 1x1 (a 1x1 one turned is itself); \(described)"
            }
            return nil
        case .batchNormWithoutMeanTerm:
            return owner.normalization != nil ? nil : "a missing mean term needs a batch norm's tensor; \(described)"
        case .batchNormLocalSums:
            // Without synchronized batch norm the fault is in place and changes nothing, as for a rank checking alone
            // (the Worker refuses it unless model.batchnorm=sync).
            return owner.normalization != nil ? nil : "local sums need a batch norm's tensor; \(described)"
        }
    }
}

extension Residual {
    /// Where the block's own layer (body 0 or shortcut 1, and its index) that owns the parameter `offset` elements
    /// past the block's first is: a nested block, when the owner is inside it.
    private func position(owning offset: Int) -> (path: Int, index: Int)? {
        for (path, layers) in [body, shortcut].enumerated() {
            if let index = layers.firstIndex(where: {
                $0.parameterCount > 0 && ($0.parameterOffset..<$0.parameterOffset + $0.parameterCount).contains(offset)
            }) { return (path, index) }
        }
        return nil
    }

    /// The inner layer (inside nested blocks too) that owns the parameter `offset` elements past the block's first.
    func innerLayer(owning offset: Int) -> Layer<T>? {
        guard let (path, index) = position(owning: offset) else { return nil }
        let owner = (path == 0 ? body : shortcut)[index]
        if let nested = owner as? Residual<T> { return nested.innerLayer(owning: offset - nested.parameterOffset) }
        return owner
    }

    /// Puts `wrap(layer, offset)` in place of the inner layer that owns the parameter `offset` elements past the
    /// block's first; a nested block passes the search on, with the offset from its own first parameter, so that
    /// `wrap` gets it from the first of the block that holds the layer (as the layer's `parameterOffset` is). False
    /// when no inner layer owns it.
    func wrapInnerLayer(owning offset: Int, _ wrap: (Layer<T>, Int) -> Layer<T>) -> Bool {
        guard let (path, index) = position(owning: offset) else { return false }
        var layers = path == 0 ? body : shortcut
        if let nested = layers[index] as? Residual<T> {
            return nested.wrapInnerLayer(owning: offset - nested.parameterOffset, wrap)
        }
        layers[index] = wrap(layers[index], offset)
        replacePath(path, with: layers)
        return true
    }

    /// The fault a `FaultyLayer` inside the block (or a nested one) carries.
    var innerFault: GradientFault? {
        (body + shortcut).lazy.compactMap(FaultyLayer<T>.fault(in:)).first
    }

    /// Every inner layer as built.
    func removeInnerFault() {
        for path in [0, 1] {
            let layers = (path == 0 ? body : shortcut).map { layer -> Layer<T> in
                (layer as? Residual<T>)?.removeInnerFault()
                return (layer as? FaultyLayer<T>)?.remove() ?? layer
            }
            replacePath(path, with: layers)
        }
    }
}

/// A layer whose backward pass is wrong on purpose: it runs the layer it wraps, bound to the same buffers, then
/// perturbs what that layer wrote (`GradientFault`). Forward passes, kink patterns and initialisation are the
/// wrapped layer's. The neighbours keep their links to the wrapped layer, and a fused block (BatchNormReLUPool.swift)
/// still runs its own fused kernels: the fault acts on their results. Allocates as it pleases: it never runs in real training.
final class FaultyLayer<T: Scalar>: Layer<T> {
    let inner: Layer<T>
    let fault: GradientFault
    /// The broken tensor, at its offset in the model's flat buffers.
    let tensor: ParameterInfo
    /// Batch norm's reducer, as built, and the stand-in that keeps this rank's sums of dy (`batchNormLocalSums`).
    private let originalReducer: CrossRankReducer?
    private let localSums: LocalSumsOfGradients?

    init(wrapping inner: Layer<T>, fault: GradientFault, tensor: ParameterInfo) {
        self.inner = inner
        self.fault = fault
        self.tensor = tensor
        let norm = inner.normalization
        originalReducer = norm?.reducer
        if case .batchNormLocalSums = fault, let norm, let reducer = norm.reducer {
            let stand = LocalSumsOfGradients(reducer, features: norm.features)
            norm.reducer = stand
            localSums = stand
        } else {
            localSums = nil
        }
        super.init(LayerPlacement(index: inner.index, inputShape: inner.inputShape, outputShape: inner.outputShape,
                                  batchCapacity: inner.batchCapacity), spec: inner.spec)
        (x, y, dx, dy, scratch) = (inner.x, inner.y, inner.dx, inner.dy, inner.scratch)
        (parameters, gradients, buffers) = (inner.parameters, inner.gradients, inner.buffers)
        (parameterOffset, parameterCount, runsInPlace) = (inner.parameterOffset, inner.parameterCount, inner.runsInPlace)
        (previous, next) = (inner.previous, inner.next)
    }

    /// The fault `layer` carries: its own as a `FaultyLayer`, or one inside it as a residual block.
    static func fault(in layer: Layer<T>) -> GradientFault? {
        (layer as? FaultyLayer<T>)?.fault ?? (layer as? Residual<T>)?.innerFault
    }

    /// The wrapped layer, as it was before this one was installed.
    func remove() -> Layer<T> {
        if let norm = inner.normalization { norm.reducer = originalReducer }
        return inner
    }

    override func forward(count: Int, mode: ForwardMode) {
        inner.forward(count: count, mode: mode)
    }

    override func backwardParameters(count: Int, accumulate: Bool) {
        inner.backwardParameters(count: count, accumulate: accumulate)
        provenFinite = inner.provenFinite
        guard !fault.breaksInputGradient else { return }
        breakParameterGradient()
        // A wrong backward pass may write anything: never vouched for.
        provenFinite = false
    }

    override func backwardInput(count: Int, accumulate: Bool) {
        guard let dx else { return inner.backwardInput(count: count, accumulate: accumulate) }
        switch fault {
        case .flippedKernel:
            guard let conv = inner as? Conv2d<T> else { break }
            withKernelsFlipped(conv) { conv.backwardInput(count: count, accumulate: accumulate) }
            return
        case .batchNormLocalSums:
            localSums?.keepsLocal = true
            inner.backwardInput(count: count, accumulate: accumulate)
            localSums?.keepsLocal = false
            return
        default: break
        }
        inner.backwardInput(count: count, accumulate: accumulate)
        if case .paddingOffset = fault, let conv = inner as? Conv2d<T> { shiftUpAndLeft(dx, conv, count: count) }
        if case .batchNormWithoutMeanTerm = fault, let norm = inner.normalization {
            addMeanTermBack(dx, norm, gamma: inner.parameters!, count: count)
        }
    }

    override func initialize(scheme: Initialization, gain: Double, generator: inout RandomGenerator) {
        inner.initialize(scheme: scheme, gain: gain, generator: &generator)
    }

    override var hasKink: Bool { inner.hasKink }

    override func appendKinkPattern(count: Int, to pattern: inout [Int32]) {
        inner.appendKinkPattern(count: count, to: &pattern)
    }

    // MARK: - The faults

    /// `.scaled`, `.transposed`, `.missing`: the named tensor's gradient, as the wrapped layer wrote it, spoilt.
    private func breakParameterGradient() {
        let g = gradients! + (tensor.offset - parameterOffset)
        switch fault {
        case let .scaled(_, factor):
            Elementwise.scale(g, tensor.count, by: T(factor))
        case .transposed:
            guard tensor.shape.count == 2 else { break }
            let (rows, columns) = (tensor.shape[0], tensor.shape[1])
            let copy = Array(UnsafeBufferPointer(start: g, count: tensor.count))
            for r in 0..<rows {
                for c in 0..<columns { g[c * rows + r] = copy[r * columns + c] }
            }
        case .missing:
            Elementwise.zero(g, tensor.count)
        case .flippedKernel, .paddingOffset, .batchNormWithoutMeanTerm, .batchNormLocalSums:
            break
        }
    }

    /// `.flippedKernel`: runs `body` with every k x k kernel of `conv` rotated 180 degrees, then puts the weights back.
    private func withKernelsFlipped(_ conv: Conv2d<T>, _ body: () -> Void) {
        let w = conv.parameters!, k = conv.kernel, kernels = conv.outChannels * conv.inChannels
        let original = Array(UnsafeBufferPointer(start: w, count: kernels * k * k))
        for kernel in 0..<kernels {
            let base = kernel * k * k
            for p in 0..<k {
                for q in 0..<k { w[base + p * k + q] = original[base + (k - 1 - p) * k + (k - 1 - q)] }
            }
        }
        conv.weightsChanged()
        body()
        w.update(from: original, count: original.count)
        conv.weightsChanged()
    }

    /// `.paddingOffset`: every plane of dx moved one row up and one column left, as col2im with the padding one too
    /// large scatters it (what would land outside the image is dropped, the last row and column get zeros).
    private func shiftUpAndLeft(_ dx: UnsafeMutablePointer<T>, _ conv: Conv2d<T>, count: Int) {
        let (height, width) = (conv.height, conv.width)
        for plane in 0..<(count * conv.inChannels) {
            let p = dx + plane * height * width
            for i in 0..<height {
                for j in 0..<width {
                    p[i * width + j] = i + 1 < height && j + 1 < width ? p[(i + 1) * width + j + 1] : 0
                }
            }
        }
    }

    /// `.batchNormWithoutMeanTerm`: the correct dx has c = -gamma r sum(dy) / N added to every value of feature f
    /// (`GradientFactors`); adding gamma r sum(dy) / N back, from the reductions the layer kept in `sums`, leaves dx
    /// without it. Running statistics have no such term.
    private func addMeanTermBack(_ dx: UnsafeMutablePointer<T>, _ norm: BatchNormStatistics<T>, gamma: UnsafePointer<T>,
                                 count: Int) {
        guard norm.lastUsedBatchStatistics else { return }
        for b in 0..<count {
            for f in 0..<norm.features {
                let term = T(Double(gamma[f]) * norm.inverseDeviation[f] * norm.sums[f] / norm.lastCount)
                let run = dx + (b * norm.features + f) * norm.positions
                for s in 0..<norm.positions { run[s] += term }
            }
        }
    }
}

/// `.batchNormLocalSums`: stands in for synchronized batch norm's reducer. It takes part in every collective as the
/// real one does, so the ranks stay matched, but while `keepsLocal` is set (the layer's input gradient) it hands
/// back this rank's own sums of dy, the first `features` values, in place of the global batch's.
private final class LocalSumsOfGradients: CrossRankReducer {
    let ranks: CrossRankReducer
    let features: Int
    var keepsLocal = false

    init(_ ranks: CrossRankReducer, features: Int) {
        self.ranks = ranks
        self.features = features
    }

    func sumAcrossRanks(_ values: UnsafeMutableBufferPointer<Double>) {
        guard keepsLocal else { return ranks.sumAcrossRanks(values) }
        let local = Array(values[0..<features])
        ranks.sumAcrossRanks(values)
        for f in 0..<features { values[f] = local[f] }
    }
}
