/// A convolution with square kernels: PyTorch `nn.Conv2d(inChannels, outChannels, kernel, stride, padding, bias)`, the
/// entry `conv OUT K [stride S] [pad P] [nobias]` (the input channels come from the layer before):
/// y[o, i, j] = b[o] + sum over c, p, q of W[o, c, p, q] x[c, i*stride + p - padding, j*stride + q - padding],
/// zero outside the input. Weight [out, in, k, k], bias [out].
public struct Conv2dKind: LayerKind {
    public let inChannels: Int, outChannels: Int, kernel: Int, stride: Int, padding: Int, bias: Bool

    public static var syntax: String { "conv OUT K [stride S] [pad P] [nobias]" }
    public static var isSpatial: Bool { true }
    public static func parse(_ entry: LayerEntry, input: [Int]) throws(LayerEntryError) -> Self {
        guard entry.words.count >= 3 else { throw entry.fail("conv needs its output channels and kernel size, e.g. 'conv 32 3 pad 1'") }
        let outChannels = try entry.integer(entry.words[1], "output channels", minimum: 1)
        let kernel = try entry.integer(entry.words[2], "kernel size", minimum: 1)
        let o = try entry.options(from: 3, allowed: ["stride", "pad", "nobias"])
        return Self(inChannels: input.count == 3 ? input[0] : 0, outChannels: outChannels, kernel: kernel,
                    stride: o["stride"] ?? 1, padding: o["pad"] ?? 0, bias: o["nobias"] == nil)
    }
    public var entry: String {
        "conv \(outChannels) \(kernel)" + (stride != 1 ? " stride \(stride)" : "") + (padding != 0 ? " pad \(padding)" : "")
            + (bias ? "" : " nobias")
    }
    public var description: String {
        "Conv2d(\(inChannels), \(outChannels), kernel_size=\(kernel)" + (stride != 1 ? ", stride=\(stride)" : "")
            + (padding != 0 ? ", padding=\(padding)" : "") + (bias ? "" : ", bias=False") + ")"
    }

    public func outputShape(input: [Int]) throws(ModelSpecError) -> [Int] {
        let (c, h, w) = try imageShape(input, "a convolution")
        let (i, k, s, p) = (inChannels, kernel, stride, padding)
        guard i > 0, outChannels > 0, k > 0, s > 0, p >= 0 else {
            throw ModelSpecError("channels, kernel and stride must be positive and padding >= 0")
        }
        guard c == i else { throw ModelSpecError("expects \(i) input channels but its input has \(c) (shape \(input))") }
        guard k <= h + 2 * p, k <= w + 2 * p else {
            throw ModelSpecError("kernel \(k) is larger than its padded input \(h + 2 * p)x\(w + 2 * p)")
        }
        return [outChannels, windowCount(h, kernel: k, stride: s, padding: p), windowCount(w, kernel: k, stride: s, padding: p)]
    }

    public func parameterShapes(input: [Int]) -> [(String, [Int])] {
        [("weight", [outChannels, inChannels, kernel, kernel])] + (bias ? [("bias", [outChannels])] : [])
    }
    public var bufferShapes: [(String, [Int])] { [] }

    /// A row of ones, the kept columns of a batch (see Conv2d), and in the scratch one sample's columns and their
    /// gradient.
    /// A convolution by Winograd's F(4x4, 3x3) (`usesWinograd`) keeps its transformed inputs and filters instead, and
    /// takes its transformed outputs and gradients from the scratch.
    public func workspace(input: [Int], output: [Int], batchCapacity rows: Double, scalarBytes: Double) -> LayerWorkspace {
        if usesWinograd {
            let tiling = WinogradTiling(height: output[1], width: output[2], scalarBytes: Int(scalarBytes))
            return (tiling.ownedBytes(inChannels: inChannels, outChannels: outChannels, batch: Int(rows), scalarBytes: scalarBytes)
                        + Double(output[1] * output[2]) * scalarBytes,
                    Double(tiling.scratchCount(inChannels: inChannels, outChannels: outChannels, batch: Int(rows))))
        }
        let positions = Double(output[1] * output[2]), patch = Double(inChannels * kernel * kernel)
        let kept = keepsColumns(outputShape: output, batchCapacity: rows, scalarBytes: scalarBytes)
        let keptBytes = kept ? LargeBuffer.allocatedBytes(rows * patch * positions * scalarBytes) : 0
        return (positions * scalarBytes + keptBytes, 2 * patch * positions)
    }

    /// Whether the convolution runs by Winograd's F(4x4, 3x3) (Winograd.swift): 3x3, stride 1, padding 1, and at least
    /// 16 channels in and out.
    public var usesWinograd: Bool {
        Winograd.applies(inChannels: inChannels, outChannels: outChannels, kernel: kernel, stride: stride, padding: padding)
    }

    /// The rows of each of the 36 point GEMMs of a Winograd pass over `batch` samples of output `output` [C, H, W]:
    /// a point's tiles, fewer where short tiles lack the point (`WinogradTiling`). For the benchmark that replays them.
    public func winogradPointRows(output: [Int], batch: Int) -> [Int] {
        let tiling = WinogradTiling(height: output[1], width: output[2], scalarBytes: 4)
        return (0..<Winograd.points).map { tiling.rowsOfPoint($0, count: batch) }
    }

    /// The tiles in each piece of a Winograd GEMM over `tiles` tiles on one OpenBLAS thread in Float
    /// (`Winograd.unpackedPieceRows`): of the weight gradient's with `sharedOperand` false, of the forward and input
    /// gradient's with it true; for the benchmark that replays the step's GEMMs.
    public func winogradPieceRows(tiles: Int, sharedOperand: Bool) -> Int {
        Winograd.unpackedPieceRows(rows: tiles, multiplyAddsPerRow: inChannels * outChannels,
                                   sharedOperandBytes: sharedOperand ? inChannels * outChannels * 4 : 0, threads: 1)
    }
    /// Whether the forward GEMMs go in pieces by U^T on one thread in Float (`Winograd.goesInPieces`), or one TN
    /// product per point by U.
    public var winogradForwardGoesInPieces: Bool {
        Winograd.goesInPieces(sharedOperandBytes: inChannels * outChannels * 4, threads: 1)
    }

    /// Whether a convolution keeps its batch of columns between its passes (see `Conv2d`); also for the benchmark
    /// that replays its GEMMs on the same operands.
    public func keepsColumns(outputShape: [Int], batchCapacity: Double, scalarBytes: Double) -> Bool {
        Conv2d<Float>.keepsColumns(patch: inChannels * kernel * kernel, positions: outputShape[1] * outputShape[2],
                                   batchCapacity: batchCapacity, scalarBytes: scalarBytes)
    }

    public var hasKink: Bool { false }
    public var initializationRole: InitializationRole { .xavier }
    /// Its backward pass reads its columns (or x) and dy, never y.
    public var outputMayBeOverwritten: Bool { true }
    public func runsInPlace(after previous: LayerSpec?) -> Bool { false }
    public func torchModule(input: [Int]) -> TorchModule {
        TorchModule("Conv2d", [.int(inChannels), .int(outChannels), .int(kernel)],
                    ["stride": .int(stride), "padding": .int(padding), "bias": .bool(bias)])
    }
    public func makeLayer<T: Scalar>(_ placement: LayerPlacement) -> Layer<T> { Conv2d<T>(self, placement) }
}

extension LayerSpec {
    public static func conv2d(inChannels: Int, outChannels: Int, kernel: Int, stride: Int, padding: Int, bias: Bool) -> LayerSpec {
        LayerSpec(Conv2dKind(inChannels: inChannels, outChannels: outChannels, kernel: kernel, stride: stride,
                             padding: padding, bias: bias))
    }
}

/// PyTorch `nn.Conv2d` with square kernels, lowered to matrix products one sample at a time:
///
///     cols[C k k, Ho Wo] = im2col(x_b[C, H, W])        (each column is one receptive field)
///     y_b[O, Ho Wo]      = W[O, C k k] cols + b[O]      (one GEMM: NCHW output directly)
///
/// Backward, per sample: dW[O, C k k] += dy_b[O, Ho Wo] cols^T, db[O] += the row sums of dy_b,
/// dcols[C k k, Ho Wo] = W^T dy_b and dx_b = col2im(dcols). Every product is one BLAS call; the lowering loops are
/// specialised kernels (`im2col`, `col2im`) with no branch per element, and convolutions that keep the image's size
/// (stride 1, "same" padding, the common case) lower each kernel offset as one shifted copy (`im2colSame`).
///
/// The forward pass keeps every sample's columns for the backward pass when they take at most
/// `Conv2d.keptColumnsLimit` bytes (16 MiB for the shipped CNN's second convolution at batch 64): the step then
/// comes closer to the time of its GEMMs than when it lowers again, though the GEMMs read the columns from memory
/// instead of cache (BENCHMARKS.md, "Measurements behind comments in the code"). Larger layers lower again, one
/// sample at a time.
///
/// Parameters: weight [O, C, k, k] (C k k contiguous per output channel, the GEMM's row-major [O, C k k]), bias [O].
/// Scratch: one sample's columns (when they are not kept), and their gradient when an earlier layer needs dx.
final class Conv2d<T: Scalar>: Layer<T> {
    let inChannels: Int, outChannels: Int, kernel: Int, stride: Int, padding: Int, hasBias: Bool
    let height: Int, width: Int, outHeight: Int, outWidth: Int
    /// Rows of the column matrix (C k k) and its columns (Ho Wo).
    private var patch: Int { inChannels * kernel * kernel }
    private var positions: Int { outHeight * outWidth }
    /// A row of ones, [Ho Wo]: the bias gradient as a GEMV over dy_b's rows.
    private let ones: UnsafeMutablePointer<T>
    /// Every sample's columns from the last forward pass, [B, C k k, Ho Wo], when they are kept.
    private let keptColumns: UnsafeMutableBufferPointer<T>?
    /// The passes by Winograd's F(4x4, 3x3), for the layers it applies to; they lower no columns.
    private let winograd: WinogradConvolution<T>?
    /// Whether this layer runs by Winograd's F(4x4, 3x3) (its kind's `usesWinograd`, as built).
    var runsWinograd: Bool { winograd != nil }
    /// The samples in each chunk of its Winograd passes (`Winograd.chunkSamples`); nil off that path.
    var winogradChunkSamples: Int? { winograd?.chunkSamples }
    /// The bytes its Winograd path allocated, for the test that the memory estimate counts them.
    var winogradAllocatedBytes: Double? { winograd?.allocatedBytes }

    /// For weights changed between a forward pass and the input gradient (a test fault's flipped kernels): the
    /// Winograd path multiplies by the filters it transformed in the forward pass, the lowered one by the weights.
    func weightsChanged() {
        winograd?.transformFilters(parameters!)
    }

    /// Bytes of columns a layer keeps between its passes at most.
    static var keptColumnsLimit: Double { 64 * 1_048_576 }

    /// Whether a layer with `patch` rows and `positions` columns per sample keeps a batch of its columns.
    static func keepsColumns(patch: Int, positions: Int, batchCapacity: Double, scalarBytes: Double) -> Bool {
        Double(patch) * Double(positions) * batchCapacity * scalarBytes <= keptColumnsLimit
    }

    init(_ kind: Conv2dKind, _ placement: LayerPlacement) {
        let (i, k) = (kind.inChannels, kind.kernel)
        (inChannels, outChannels, kernel, stride, padding, hasBias) = (i, kind.outChannels, k, kind.stride, kind.padding, kind.bias)
        let (inputShape, outputShape, batchCapacity) = (placement.inputShape, placement.outputShape, placement.batchCapacity)
        (height, width) = (inputShape[1], inputShape[2])
        (outHeight, outWidth) = (outputShape[1], outputShape[2])
        ones = .allocate(capacity: outputShape[1] * outputShape[2])
        ones.initialize(repeating: 1, count: outputShape[1] * outputShape[2])
        let patch = i * k * k, positions = outputShape[1] * outputShape[2]
        winograd = kind.usesWinograd
            ? WinogradConvolution(inChannels: i, outChannels: kind.outChannels, height: outputShape[1], width: outputShape[2],
                                  batchCapacity: batchCapacity)
            : nil
        if winograd != nil {
            keptColumns = nil
        } else if Self.keepsColumns(patch: patch, positions: positions, batchCapacity: Double(batchCapacity),
                             scalarBytes: Double(MemoryLayout<T>.stride)) {
            let columns: UnsafeMutableBufferPointer<T> = LargeBuffer.allocate(batchCapacity * patch * positions)
            columns.initialize(repeating: 0)
            keptColumns = columns
        } else {
            keptColumns = nil
        }
        super.init(placement, spec: LayerSpec(kind))
    }

    deinit {
        ones.deallocate()
        if let keptColumns { LargeBuffer.free(keptColumns) }
    }

    /// Where sample b's columns are: its slot among the kept ones, or the scratch.
    @inline(__always) private func columns(_ b: Int) -> UnsafeMutablePointer<T> {
        if let keptColumns { keptColumns.baseAddress! + b * patch * positions } else { scratch! }
    }


    /// The batch norm right after this layer (its own, or a fused block's), whose forward statistics the forward
    /// pass sums sample by sample as each leaves the kernels (`BatchNormStatistics.sumsArrived`): one pass less over
    /// the output, which pays where the output outgrows the core's L2 cache (fashion-cnn's first layer's, 6.4 MB at
    /// batch 64; BENCHMARKS.md, "fourteenth session"). The model owns both layers.
    unowned(unsafe) var outputStatistics: BatchNormStatistics<T>?

    override func attach(to model: Model<T>) {
        outputStatistics = OutputSums.summedByConvolution ? next?.normalization : nil
    }

    override func forward(count: Int, mode: ForwardMode) {
        let w = parameters!
        let statistics = mode.usesBatchStatistics ? outputStatistics : nil
        let sums = statistics?.startSums()
        defer { statistics?.sumsArrived = true }
        if let winograd {
            return winograd.forward(x: x, weights: w, bias: hasBias ? w + outChannels * patch : nil, count: count, y: y,
                                    outputSums: sums, scratch: scratch)
        }
        for b in 0..<count {
            let xb = x + b * inputCount, yb = y + b * outputCount, cols = columns(b)
            if hasBias {
                broadcastColumns(w + outChannels * patch, into: yb, rows: outChannels, columns: positions)
            }
            im2col(xb, channels: inChannels, height: height, width: width, kernel: kernel, stride: stride,
                   padding: padding, outHeight: outHeight, outWidth: outWidth, into: cols)
            // y_b[O, HoWo] (+)= W[O, Ckk] * cols[Ckk, HoWo]
            T.gemm(transposeA: false, transposeB: false, m: outChannels, n: positions, k: patch,
                   alpha: 1, a: w, lda: patch, b: cols, ldb: positions, beta: hasBias ? 1 : 0, c: yb, ldc: positions)
            if let sums {
                addFeatureSums(yb, samples: 1, features: 0..<outChannels, of: outChannels, positions: positions, into: sums)
            }
        }
    }

    override func backwardParameters(count: Int, accumulate: Bool) {
        let gw = gradients!
        if let winograd {
            // With the input gradient, chunk by chunk from the same transformed dy (see `WinogradConvolution`).
            winograd.backwardWeights(x: x, dy: dy, count: count, accumulate: accumulate, weightGradient: gw, dx: dx,
                                     scratch: scratch)
        } else {
            for b in 0..<count {
                let xb = x + b * inputCount, cols = columns(b)
                if keptColumns == nil {
                    im2col(xb, channels: inChannels, height: height, width: width, kernel: kernel, stride: stride,
                           padding: padding, outHeight: outHeight, outWidth: outWidth, into: cols)
                }
                // dW[O, Ckk] (+)= dy_b[O, HoWo] * cols[Ckk, HoWo]^T
                T.gemm(transposeA: false, transposeB: true, m: outChannels, n: patch, k: positions, alpha: 1,
                       a: dy + b * outputCount, lda: positions, b: cols, ldb: positions, beta: accumulate || b > 0 ? 1 : 0,
                       c: gw, ldc: patch)
            }
        }
        // db[O] (+)= dy_b[O, HoWo] * 1[HoWo], sample by sample
        if hasBias {
            for b in 0..<count {
                T.gemv(m: outChannels, n: positions, alpha: 1, a: dy + b * outputCount, lda: positions, x: ones,
                       beta: accumulate || b > 0 ? 1 : 0, y: gw + outChannels * patch)
            }
        }
        provenFinite = false
    }

    /// dcols[Ckk, HoWo] = W[O, Ckk]^T * dy_b[O, HoWo] per sample, scattered back onto the input's positions.
    override func backwardInput(count: Int, accumulate: Bool) {
        guard let dx else { return }
        if let winograd { return winograd.backwardInput(dy: dy, count: count, dx: dx, scratch: scratch) }
        let dcols = scratch! + patch * positions
        for b in 0..<count {
            T.gemm(transposeA: true, transposeB: false, m: patch, n: positions, k: outChannels, alpha: 1, a: parameters!,
                   lda: patch, b: dy + b * outputCount, ldb: positions, beta: 0, c: dcols, ldc: positions)
            col2im(dcols, channels: inChannels, height: height, width: width, kernel: kernel, stride: stride,
                   padding: padding, outHeight: outHeight, outWidth: outWidth, into: dx + b * inputCount)
        }
    }

    override func initialize(scheme: Initialization, gain: Double, generator: inout RandomGenerator) {
        let receptive = kernel * kernel
        initializeWeights(parameters!, count: outChannels * patch, fanIn: inChannels * receptive,
                          fanOut: outChannels * receptive, scheme: scheme, gain: gain, generator: &generator)
        if hasBias { (parameters! + outChannels * patch).update(repeating: 0, count: outChannels) }
    }
}

// MARK: - Lowering kernels

/// The valid output positions j (as a half-open range) for kernel offset `q`: those whose input position
/// j * stride + q - padding lies in [0, size).
@inline(__always)
private func validRange(offset q: Int, padding: Int, stride: Int, size: Int, outSize: Int) -> Range<Int> {
    // j * stride >= padding - q  and  j * stride < size + padding - q
    let low = max(0, (padding - q + stride - 1) / stride)
    let high = min(outSize, max(0, (size + padding - q + stride - 1) / stride))
    return low..<max(low, high)
}

/// cols[(c k + p) k + q, i Wo + j] = x[c, i stride + p - padding, j stride + q - padding], 0 outside the image.
/// The valid range of each row is computed once, so the inner loops copy (or fill zeros) without a bounds test.
/// A convolution that keeps the image's size (stride 1, 2 padding = k - 1) takes `im2colSame`.
@_specialize(where T == Float) @_specialize(where T == Double)
func im2col<T: Scalar>(_ x: UnsafePointer<T>, channels: Int, height: Int, width: Int, kernel: Int, stride: Int,
                       padding: Int, outHeight: Int, outWidth: Int, into cols: UnsafeMutablePointer<T>) {
    if stride == 1 && outHeight == height && outWidth == width {
        return im2colSame(x, channels: channels, size: height * width, width: width, kernel: kernel, padding: padding,
                          into: cols)
    }
    im2colRows(x, channels: channels, height: height, width: width, kernel: kernel, stride: stride, padding: padding,
               outHeight: outHeight, outWidth: outWidth, into: cols)
}

/// `im2col` row by row, for any stride and padding.
@_specialize(where T == Float) @_specialize(where T == Double)
func im2colRows<T: Scalar>(_ x: UnsafePointer<T>, channels: Int, height: Int, width: Int, kernel: Int, stride: Int,
                           padding: Int, outHeight: Int, outWidth: Int, into cols: UnsafeMutablePointer<T>) {
    var row = cols
    for c in 0..<channels {
        let plane = x + c * height * width
        for p in 0..<kernel {
            let rows = validRange(offset: p, padding: padding, stride: stride, size: height, outSize: outHeight)
            for q in 0..<kernel {
                let columns = validRange(offset: q, padding: padding, stride: stride, size: width, outSize: outWidth)
                for i in 0..<outHeight {
                    let out = row + i * outWidth
                    guard rows.contains(i) else {
                        out.update(repeating: 0, count: outWidth)
                        continue
                    }
                    let source = plane + (i * stride + p - padding) * width + q - padding
                    // Plain loops rather than `update(from:count:)`: the runs are as short as a row (14 values in
                    // the shipped CNN's second convolution), where a memmove call cost more than the copy.
                    var j = 0
                    while j < columns.lowerBound { out[j] = 0; j &+= 1 }
                    if stride == 1 {
                        while j < columns.upperBound { out[j] = source[j]; j &+= 1 }
                    } else {
                        while j < columns.upperBound { out[j] = source[j &* stride]; j &+= 1 }
                    }
                    while j < outWidth { out[j] = 0; j &+= 1 }
                }
                row += outHeight * outWidth
            }
        }
    }
}

/// The adjoint of `im2col`: dx[c, i stride + p - padding, j stride + q - padding] += dcols[(c k + p) k + q, i Wo + j]
/// over every valid position; dx is overwritten (zeroed first). A convolution that keeps the image's size takes
/// `col2imSame`, which may zero the entries of `dcols` that fall outside the image.
@_specialize(where T == Float) @_specialize(where T == Double)
func col2im<T: Scalar>(_ dcols: UnsafeMutablePointer<T>, channels: Int, height: Int, width: Int, kernel: Int, stride: Int,
                       padding: Int, outHeight: Int, outWidth: Int, into dx: UnsafeMutablePointer<T>) {
    if stride == 1 && outHeight == height && outWidth == width {
        return col2imSame(dcols, channels: channels, size: height * width, width: width, kernel: kernel,
                          padding: padding, into: dx)
    }
    col2imRows(dcols, channels: channels, height: height, width: width, kernel: kernel, stride: stride, padding: padding,
               outHeight: outHeight, outWidth: outWidth, into: dx)
}

/// `col2im` row by row, for any stride and padding.
@_specialize(where T == Float) @_specialize(where T == Double)
func col2imRows<T: Scalar>(_ dcols: UnsafePointer<T>, channels: Int, height: Int, width: Int, kernel: Int, stride: Int,
                           padding: Int, outHeight: Int, outWidth: Int, into dx: UnsafeMutablePointer<T>) {
    dx.update(repeating: 0, count: channels * height * width)
    var row = dcols
    for c in 0..<channels {
        let plane = dx + c * height * width
        for p in 0..<kernel {
            let rows = validRange(offset: p, padding: padding, stride: stride, size: height, outSize: outHeight)
            for q in 0..<kernel {
                let columns = validRange(offset: q, padding: padding, stride: stride, size: width, outSize: outWidth)
                for i in rows {
                    let target = plane + (i * stride + p - padding) * width + q - padding
                    let source = row + i * outWidth
                    if stride == 1 {
                        for j in columns { target[j] += source[j] }
                    } else {
                        for j in columns { target[j &* stride] += source[j] }
                    }
                }
                row += outHeight * outWidth
            }
        }
    }
}

/// `im2col` for a convolution that keeps the image's size (stride 1, 2 padding = k - 1): then the row of kernel
/// offset (p, q) is the whole image shifted by (p - padding) rows and (q - padding) columns, one contiguous copy,
/// after which the entries that wrapped around a side of the image are zeroed (one column per row at most) along
/// with the rows above or below it. Row by row, 14-value copies cost 7 instructions a value (callgrind); this costs
/// under one.
@_specialize(where T == Float) @_specialize(where T == Double)
func im2colSame<T: Scalar>(_ x: UnsafePointer<T>, channels: Int, size: Int, width: Int, kernel: Int, padding: Int,
                           into cols: UnsafeMutablePointer<T>) {
    let height = size / width
    var row = cols
    for c in 0..<channels {
        let plane = x + c * size
        for p in 0..<kernel {
            let rows = validRange(offset: p, padding: padding, stride: 1, size: height, outSize: height)
            for q in 0..<kernel {
                let columns = validRange(offset: q, padding: padding, stride: 1, size: width, outSize: width)
                guard !rows.isEmpty && !columns.isEmpty else {
                    row.update(repeating: 0, count: size)
                    row += size
                    continue
                }
                // The first and last valid entries, and the shift between an entry and its input.
                let first = rows.lowerBound * width + columns.lowerBound
                let end = (rows.upperBound - 1) * width + columns.upperBound
                let shift = (p - padding) * width + (q - padding)
                row.update(repeating: 0, count: first)
                (row + first).update(from: plane + first + shift, count: end - first)
                (row + end).update(repeating: 0, count: size - end)
                // The columns off the left or right side of the image, which the copy filled by wrapping around.
                zeroColumns(row, width: width, rows: rows, columns: columns)
                row += size
            }
        }
    }
}

/// Zeroes, in each row of `rows` of an image `width` wide, the entries outside `columns`: a column at a time down
/// the rows, so that the compiler does not turn the runs of one or two entries into a memset call each (half a
/// million calls per step in the shipped CNN).
@inline(__always)
private func zeroColumns<T: Scalar>(_ image: UnsafeMutablePointer<T>, width: Int, rows: Range<Int>, columns: Range<Int>) {
    var j = 0
    while j < width {
        if j == columns.lowerBound { j = Swift.max(j, columns.upperBound) }
        if j >= width { break }
        var at = rows.lowerBound &* width &+ j
        let end = rows.upperBound &* width
        while at < end {
            image[at] = 0
            at &+= width
        }
        j &+= 1
    }
}

/// The adjoint of `im2colSame`: for each channel and kernel row p, the k rows of offsets (p, 0..<k), their entries
/// off the image zeroed first, are added to dx in one pass over the image rows they reach, each target taking its k
/// contributions in `col2imRows`' order (q = 0, 1, ...), so the sums are the same. One pass per kernel row instead
/// of one per offset: dx is loaded and stored a third as often.
@_specialize(where T == Float) @_specialize(where T == Double)
func col2imSame<T: Scalar>(_ dcols: UnsafeMutablePointer<T>, channels: Int, size: Int, width: Int, kernel: Int,
                           padding: Int, into dx: UnsafeMutablePointer<T>) {
    let height = size / width
    dx.update(repeating: 0, count: channels * size)
    for c in 0..<channels {
        let plane = dx + c * size
        for p in 0..<kernel {
            let rows = validRange(offset: p, padding: padding, stride: 1, size: height, outSize: height)
            guard !rows.isEmpty else { continue }
            let block = dcols + (c * kernel + p) * kernel * size
            for q in 0..<kernel {
                let columns = validRange(offset: q, padding: padding, stride: 1, size: width, outSize: width)
                let row = block + q * size
                row.update(repeating: 0, count: rows.lowerBound * width)
                (row + rows.upperBound * width).update(repeating: 0, count: size - rows.upperBound * width)
                zeroColumns(row, width: width, rows: rows, columns: columns)
            }
            // Target t takes row q's entry t - lead - q (lead = (p - padding) width - padding), 0 off the image.
            // Within `edge` of the reached rows' ends that entry may fall outside its row: those targets test it.
            let lead = (p - padding) * width - padding
            let start = rows.lowerBound * width + (p - padding) * width, end = rows.upperBound * width + (p - padding) * width
            let edge = Swift.min(Swift.max(padding, kernel - 1 - padding), (end - start) / 2)
            func addChecked(_ t: Int) {
                var sum = plane[t]
                for q in 0..<kernel {
                    let e = t - lead - q
                    if e >= 0 && e < size { sum += block[q * size + e] }
                }
                plane[t] = sum
            }
            for t in start..<(start + edge) { addChecked(t) }
            let bulk = start + edge, bulkEnd = end - edge
            if T.self == Float.self && kernel == 3 {
                addThreeRows(UnsafeMutableRawPointer(plane).assumingMemoryBound(to: Float.self), from: bulk, to: bulkEnd,
                             UnsafeRawPointer(block + (bulk - lead)).assumingMemoryBound(to: Float.self), rowLength: size)
            } else {
                var t = bulk
                while t < bulkEnd {
                    var sum = plane[t]
                    let e = t &- lead
                    for q in 0..<kernel { sum += block[q &* size &+ e &- q] }
                    plane[t] = sum
                    t &+= 1
                }
            }
            for t in Swift.max(bulkEnd, start + edge)..<end { addChecked(t) }
        }
    }
}

/// target[t] = ((target[t] + a[t]) + b[t]) + c[t] for t in [from, end), where a starts at `first`, b one row later
/// and one entry back, c two rows later and two back: the 3x3 case of `col2imSame`'s bulk, in vectors of 8.
private func addThreeRows(_ target: UnsafeMutablePointer<Float>, from: Int, to end: Int, _ first: UnsafePointer<Float>,
                          rowLength: Int) {
    typealias V = SIMD8<Float>
    let a = UnsafeRawPointer(first), b = UnsafeRawPointer(first + rowLength - 1), c = UnsafeRawPointer(first + 2 * rowLength - 2)
    let out = UnsafeMutableRawPointer(target + from)
    let n = end - from
    var i = 0
    while i &+ 8 <= n {
        let offset = i &* 4
        var sum = out.loadUnaligned(fromByteOffset: offset, as: V.self)
        sum += a.loadUnaligned(fromByteOffset: offset, as: V.self)
        sum += b.loadUnaligned(fromByteOffset: offset, as: V.self)
        sum += c.loadUnaligned(fromByteOffset: offset, as: V.self)
        out.storeBytes(of: sum, toByteOffset: offset, as: V.self)
        i &+= 8
    }
    let t = target + from, x = first, y = first + rowLength - 1, z = first + 2 * rowLength - 2
    while i < n {
        t[i] = ((t[i] + x[i]) + y[i]) + z[i]
        i &+= 1
    }
}

/// y[r, c] = v[r] for every column: a per-channel bias over the positions of one sample.
@_specialize(where T == Float) @_specialize(where T == Double)
func broadcastColumns<T: Scalar>(_ v: UnsafePointer<T>, into y: UnsafeMutablePointer<T>, rows: Int, columns: Int) {
    for r in 0..<rows { (y + r * columns).update(repeating: v[r], count: columns) }
}

/// For the benchmark's side-by-side comparison: models built inside `withSumsInBatchNorm` leave batch norm's forward
/// sums to the batch norm's own pass over its input (as before `Conv2d.outputStatistics`).
public enum OutputSums {
    @TaskLocal static var summedByConvolution = true

    public static func withSumsInBatchNorm<R>(_ body: () throws -> R) rethrows -> R {
        try $summedByConvolution.withValue(false, operation: body)
    }
}
