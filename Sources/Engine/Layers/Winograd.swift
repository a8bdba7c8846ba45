/// Winograd's minimal filtering F(4x4, 3x3) (Lavin and Gray, "Fast Algorithms for Convolutional Neural Networks",
/// 2016) for 3x3 convolutions with stride 1 and padding 1: each 4x4 block of outputs comes from its 6x6 block of
/// inputs with 36 multiplications per pair of channels instead of 144,
///
///     Y = A^T [ (G g G^T) ⊙ (B^T d B) ] A        (g: 3x3 filter, d: 6x6 input tile, Y: 4x4 output tile)
///
/// and the products of a batch are 36 GEMMs, one per point of the 6x6 transform, over all tiles of all samples:
///
///     U[p] = (G g G^T)[p]        [O, C]             the filters, transformed once per pass
///     V[p] = (B^T d B)[p]        [tiles, C]         every sample's tiles, one row each
///     M[p] = V[p] U[p]^T         [tiles, O]         one GEMM per point
///     y    = A^T M A             each tile's 4x4 outputs, clipped to the image
///
/// Backward is the exact adjoint of that computation, so the float64 gradient check holds it to the same bar as any
/// layer: dM = A dY A^T per tile, dU[p] = dM[p]^T V[p] and dg = G^T dU G (the weight gradient), dV[p] = dM[p] U[p]
/// and dx = B dV B^T added over the overlapping tiles (the input gradient). Three GEMMs per point and pass, each with
/// the whole batch's tiles as one dimension: 128 channels at 7x7 and batch 64 make [256, 128] x [128, 128] products,
/// where lowering one sample at a time made [128, 1152] x [1152, 49].
///
/// Where 4 does not divide the image, the last rows or columns of tiles are 3 outputs wide and take F(3x3, 3x3)
/// from five of the same points (see `WinogradTiling`): 14x14 and 7x7 images then multiply 16% fewer points than
/// whole 4x4 tiles overrunning the image would.
///
/// Matrices (points 0, 1, -1, 2, -2 and infinity):
///
///     B^T = | 4  0 -5  0  1  0 |    G = |  1/4     0     0  |    A^T = | 1  1  1  1  1  0 |
///           | 0 -4 -4  1  1  0 |        | -1/6  -1/6  -1/6  |          | 0  1 -1  2 -2  0 |
///           | 0  4 -4 -1  1  0 |        | -1/6   1/6  -1/6  |          | 0  1  1  4  4  0 |
///           | 0 -2 -1  2  1  0 |        |  1/24  1/12  1/6  |          | 0  1 -1  8 -8  1 |
///           | 0  2 -1 -2  1  0 |        |  1/24 -1/12  1/6  |
///           | 0  4  0 -5  0  1 |        |   0     0     1   |
enum Winograd {
    /// Points of the transform (6x6).
    static let points = 36

    /// Whether a convolution takes this path: 3x3, stride 1, padding 1 (the image keeps its size), and enough
    /// channels on both sides that the 36 GEMMs are worth their transforms. A first layer on one or three channels
    /// lowers to one GEMM per sample instead (see Conv2d).
    static func applies(inChannels: Int, outChannels: Int, kernel: Int, stride: Int, padding: Int) -> Bool {
        kernel == 3 && stride == 1 && padding == 1 && inChannels >= minimumChannels && outChannels >= minimumChannels
    }
    static let minimumChannels = 16

    /// Tiles a tile transform takes through each of its halves before the next half, staged in 36 vectors a tile:
    /// the half that reads or writes the 36 point matrices then touches six of them at a time, each in a sequential
    /// stream, where one tile at a time touched all 36 at once (more streams than the caches follow).
    static let tilesPerRun = 8

    /// Blocks of `lanes` filters the filter transform stages before writing them to U (`winogradTransformFilters`),
    /// in the same vectors between a transform's halves: 4 blocks' 36 points and one block's nine taps fit the 8
    /// tiles' 36 vectors. Measured on the ResNet's step, alternating (BENCHMARKS.md, "fourteenth session"): 3 to 6
    /// blocks 2 to 3% faster than one block at a time, 1 and 2 blocks no faster.
    static let filterBlocksPerRun = 4

    /// The multiply-adds up to which OpenBLAS 0.3.21 runs a product through its unpacked small-matrix kernels (on
    /// AVX-512, for column-major NN and NT: every GEMM here, the forward one included since it multiplies by U^T):
    /// no packing of either operand, no pass that zeroes C. The GEMMs of one thread go in pieces of the tiles no
    /// larger (the weight gradient's added up with beta 1). Measured on the ResNet's step (`bpbench cnn-profile`,
    /// alternating): the 32-channel block's backward 5.65 -> 4.70 ms, the 64-channel block's 4.20 -> 3.53, the step
    /// about 4% faster; forward in pieces (NN, where it had been one TN product per point) the 32-channel block's
    /// 9.2 -> 7.3 ms, the 64-channel one's 5.6 -> 4.6, the step 4% faster again. With OpenBLAS's Haswell kernels on
    /// the same machine, within the noise.
    static let unpackedLimit = 1_000_000

    /// The bytes of the operand that every row of tiles multiplies (U or U^T, [O, C]) above which the unpacked NN
    /// kernel is slower than the packed one: it reads that operand as it lies for each few rows, and 128 x 128
    /// Floats (64 KiB) outgrow a core's L1 cache. Measured (OpenBLAS 0.3.21, AVX-512, medians of 60 alternating
    /// rounds): 36 products [256, 128] x [128, 128] took 3.9 ms whole and 4.3 in pieces of 52 tiles; [256, 64] x
    /// [64, 128] 1.9 whole and 1.35 in pieces. The weight gradient's NT products gain from pieces at every size.
    static let unpackedOperandLimit = 32 * 1024

    /// Whether a product goes in pieces: on one thread, where the operand every row multiplies (for an NN product by
    /// U or U^T; 0 for the weight gradient's) fits `unpackedOperandLimit`. The forward GEMMs then go by U^T (NN);
    /// otherwise they are one product per point, by U (column-major TN, packed): whole, the NN product would only
    /// add U's transposes (measured on the ResNet's 128-channel block, 11.8 ms forward by U, 13.3 by U^T).
    static func goesInPieces(sharedOperandBytes: Int, threads: Int) -> Bool {
        threads == 1 && sharedOperandBytes <= unpackedOperandLimit
    }

    /// The bytes of transformed tiles a chunk of samples may take through a pass (`WinogradConvolution`): V and M
    /// forward; dM, V and dV backward. One pass over a whole batch writes each point matrix to memory and reads it back
    /// from there (at batch 64, V of a 32-channel layer at 14x14 is 4.7 MB against the core's 2 MiB of L2 cache);
    /// chunk by chunk, the next step reads what the last one wrote while it is still in the cache. Measured on the
    /// ResNet's step (`bpbench cnn-profile`, BENCHMARKS.md "thirteenth session"): the 32-to-32 layers' forward
    /// outside the filter transform 2.3 -> 1.5 ms in chunks of 4 to 8 samples, the 32-to-64 one's 3.6 -> 2.6 ms.
    static let chunkBytes = 1 << 20

    /// Set by tests (chunks of one or two samples on layers too small to be chunked) and by the benchmark's
    /// comparison with whole batches (`WinogradChunks`).
    @TaskLocal static var chunkSamplesOverride: Int?

    /// The samples in each chunk of a layer's passes: as many as keep a backward chunk's dM, V and dV within
    /// `chunkBytes`, at least one; the whole batch where U, which every chunk multiplies again (and OpenBLAS packs
    /// again), is more than half a chunk's tiles. In the ResNet at batch 64 (Float) that chunks the 32-to-32 layers
    /// by 4 samples and the 32-to-64 one by 3, and leaves the 64- and 128-channel ones whole: in chunks the
    /// 128-channel block's forward was slower (4.5 -> 5.4 ms), the 64-channel block's backward too (4.3 -> 4.8 ms).
    static func chunkSamples(inChannels: Int, outChannels: Int, tiling: WinogradTiling, batchCapacity: Int) -> Int {
        if let chunkSamplesOverride { return max(1, min(chunkSamplesOverride, batchCapacity)) }
        let scalarBytes = 64 / tiling.lanes
        let perSample = tiling.tilesPerImage * points * (2 * tiling.padded(inChannels) + tiling.padded(outChannels)) * scalarBytes
        let samples = max(1, chunkBytes / perSample)
        let filterBytes = points * inChannels * outChannels * scalarBytes
        return samples < batchCapacity && 2 * filterBytes <= samples * perSample ? samples : batchCapacity
    }

    /// The tiles in each piece of a GEMM over `rows` tiles (the last piece may have fewer): as few equal pieces as
    /// keep each within `unpackedLimit` where it `goesInPieces`, all of them in one otherwise.
    static func unpackedPieceRows(rows: Int, multiplyAddsPerRow: Int, sharedOperandBytes: Int = 0, threads: Int) -> Int {
        guard goesInPieces(sharedOperandBytes: sharedOperandBytes, threads: threads) else { return max(1, rows) }
        let pieces = max(1, (rows * multiplyAddsPerRow + unpackedLimit - 1) / unpackedLimit)
        return max(1, (rows + pieces - 1) / pieces)
    }
}

/// For the benchmark: models built inside `withChunkSamples` take every Winograd layer's passes in chunks of that
/// many samples (`Int.max`: whole batches, as before the chunks), not as `Winograd.chunkSamples` chooses.
public enum WinogradChunks {
    public static func withChunkSamples<R>(_ samples: Int, _ body: () throws -> R) rethrows -> R {
        try Winograd.$chunkSamplesOverride.withValue(samples, operation: body)
    }
}

/// How an image of `height` x `width` is cut into output tiles, and the sizes of what the passes keep.
///
/// A row of tiles is 4 outputs high, except the last few when 4 does not divide the height: those are 3 high and
/// take F(3x3, 3x3) from five of the six points (all but -2, with the same G rows, so that U serves both), as many
/// of them as the 4-high tiles would overrun the image by. 14 = 4 + 4 + 3 + 3 and 7 = 4 + 3, where 4-high tiles
/// alone cover 16 and 8: the points a batch multiplies drop from 576 to 484 per 14x14 image (and from 144 to 121 per
/// 7x7), and so do the GEMMs' multiply-adds. Columns the same. A tile's point (k, l) (k for rows, l for columns) is
/// then in its GEMM only where both of its sizes have the point: the point matrices with k = 4 hold only the tiles
/// of full rows, those with l = 4 only those of full columns, each packed without gaps (`rowsAtMinusTwo(ofTile:)`).
///
/// The transformed values are channel-minor: V is [36, B tiles, C] (each point's matrix the transpose of the one
/// above, which BLAS takes as it is), so that the transforms work on `lanes` channels at once in one vector register,
/// loading and storing whole vectors. Channels are padded to a multiple of `lanes`, and each point's matrix is
/// followed by one vector of slack so that the 36 matrices do not start at addresses that share a cache set.
struct WinogradTiling: Sendable {
    let height: Int, width: Int
    /// Channels per vector: `Scalar.Lanes`, 64 bytes of scalars (16 Floats, 8 Doubles).
    let lanes: Int

    init(height: Int, width: Int, scalarBytes: Int) {
        (self.height, self.width, lanes) = (height, width, 64 / scalarBytes)
    }
    var tileRows: Int { (height + 3) / 4 }
    var tileColumns: Int { (width + 3) / 4 }
    var tilesPerImage: Int { tileRows * tileColumns }
    /// The rows (columns) of tiles 4 outputs high (wide): the first ones; each of the rest is 3 short of 4.
    var fullRows: Int { tileRows - min(4 * tileRows - height, tileRows) }
    var fullColumns: Int { tileColumns - min(4 * tileColumns - width, tileColumns) }
    /// The tiles of a sample in point p's matrix: all but those of short rows where k = 4, or short columns where
    /// l = 4.
    func tilesPerImage(point p: Int) -> Int {
        (p / 6 == 4 ? fullRows : tileRows) * (p % 6 == 4 ? fullColumns : tileColumns)
    }
    /// The rows of point p's matrix for `count` samples: the M of its GEMMs (the K of the weight gradient's).
    func rowsOfPoint(_ p: Int, count: Int) -> Int { count * tilesPerImage(point: p) }
    /// Where the batch's tile `tile` lies in the matrices of the points at -2 (k = 4, l = 4, and both), which only
    /// full rows (columns) of tiles have: -1 where the tile has no such point. Every other point's matrix has it at
    /// row `tile`.
    func rowsAtMinusTwo(ofTile tile: Int) -> (k4: Int32, l4: Int32, both: Int32) {
        let (b, inImage) = tile.quotientAndRemainder(dividingBy: tilesPerImage)
        let (r, c) = inImage.quotientAndRemainder(dividingBy: tileColumns)
        let (fullRow, fullColumn) = (r < fullRows, c < fullColumns)
        return (fullRow ? Int32(b * fullRows * tileColumns + inImage) : -1,
                fullColumn ? Int32(b * tileRows * fullColumns + r * fullColumns + c) : -1,
                fullRow && fullColumn ? Int32(b * fullRows * fullColumns + r * fullColumns + c) : -1)
    }
    /// The first output of the `index`-th row (or column) of tiles, of `full` full ones.
    @inline(__always) private func origin(_ index: Int, full: Int) -> Int {
        index < full ? 4 * index : 4 * full + 3 * (index - full)
    }
    /// The input plane with its zero border: one row and column before the image, and after it enough for the last
    /// tile's window; `lanes` channels interleaved.
    var paddedInputWidth: Int { 4 * tileColumns + 2 }
    var paddedInputCount: Int { (4 * tileRows + 2) * paddedInputWidth * lanes }
    /// Where tile `tile`'s window starts in an interleaved block `width` wide: its outputs in an output block, its
    /// inputs in an input block (whose one-value border shifts the image, not the windows).
    @inline(__always) func tileOffset(_ tile: Int, width: Int) -> Int {
        let (row, column) = tile.quotientAndRemainder(dividingBy: tileColumns)
        return (origin(row, full: fullRows) * width + origin(column, full: fullColumns)) * lanes
    }
    /// The output plane rounded up to whole 4x4 tiles; `lanes` channels interleaved.
    var paddedOutputWidth: Int { 4 * tileColumns }
    var paddedOutputCount: Int { 4 * tileRows * paddedOutputWidth * lanes }

    /// Channels rounded up to whole vectors: the leading dimension of a point's matrix.
    func padded(_ channels: Int) -> Int { (channels + lanes - 1) / lanes * lanes }
    /// Elements between one point's matrix and the next, for `count` samples.
    func pointStride(channels: Int, count: Int) -> Int { count * tilesPerImage * padded(channels) + lanes }
    /// Elements of a transformed batch [36, B tiles, C] (V, dV, M or dM).
    func transformedCount(channels: Int, batch: Int) -> Int { Winograd.points * pointStride(channels: channels, count: batch) }
    /// Elements between one point's filters and the next in U (or dU): one vector of slack past them.
    func filterPointStride(inChannels: Int, outChannels: Int) -> Int { outChannels * inChannels + lanes }
    /// Elements of transformed filters U [36, O, C] (or dU).
    func transformedFilterCount(inChannels: Int, outChannels: Int) -> Int {
        Winograd.points * filterPointStride(inChannels: inChannels, outChannels: outChannels)
    }
    /// Elements of the shared scratch: M (or dM), dV and dU.
    func scratchCount(inChannels: Int, outChannels: Int, batch: Int) -> Int {
        transformedCount(channels: outChannels, batch: batch) + transformedCount(channels: inChannels, batch: batch)
            + transformedFilterCount(inChannels: inChannels, outChannels: outChannels)
    }
    /// Bytes a layer allocates for itself: V of one chunk (a `LargeBuffer`), U, one point's U^T, four padded planes,
    /// the vectors between the transforms' halves, the two tables of where a plane's positions lie in the padded
    /// planes and the table of each tile's rows in the point matrices.
    func ownedBytes(inChannels: Int, outChannels: Int, batch: Int, scalarBytes: Double) -> Double {
        let small = transformedFilterCount(inChannels: inChannels, outChannels: outChannels) + inChannels * outChannels
            + 2 * paddedInputCount + 2 * paddedOutputCount + Winograd.tilesPerRun * Winograd.points * lanes
        let chunk = Winograd.chunkSamples(inChannels: inChannels, outChannels: outChannels, tiling: self, batchCapacity: batch)
        return LargeBuffer.allocatedBytes(Double(transformedCount(channels: inChannels, batch: chunk)) * scalarBytes)
            + Double(small) * scalarBytes + Double(2 * height * width * MemoryLayout<Int32>.size)
            + Double(batch * tilesPerImage * 4 * MemoryLayout<Int32>.size)
    }
}

/// The passes of one convolution by F(4x4, 3x3), over buffers it owns (V, U, the padded planes) and the shared
/// scratch (M or dM, dV, dU). `Conv2d` owns one when `Winograd.applies`.
final class WinogradConvolution<T: Scalar> {
    let inChannels: Int, outChannels: Int, tiling: WinogradTiling
    /// Samples per chunk of every pass (`Winograd.chunkSamples`); the batch capacity where the layer takes whole
    /// batches.
    let chunkSamples: Int
    /// V [36, B tiles, C] for one chunk: the forward pass leaves its last chunk's here, which backward takes first;
    /// every other chunk's it transforms again.
    private let transformedInput: UnsafeMutableBufferPointer<T>
    /// U [36, O, C], from forward for the input gradient.
    private let transformedFilters: UnsafeMutablePointer<T>
    /// One point's U^T [C, O], for the forward GEMMs that go in pieces (see `forward`).
    private let transposedFilters: UnsafeMutablePointer<T>
    /// The bytes of one point's U (or U^T): the operand every row of an NN product multiplies.
    private var filterPointBytes: Int { inChannels * outChannels * MemoryLayout<T>.stride }
    /// An input block with its zero border (never written outside the image), the same for the input gradient
    /// (zeroed per block), an output block of whole tiles, and an output gradient block zero outside the image.
    private let paddedInput: UnsafeMutablePointer<T>, paddedInputGradient: UnsafeMutablePointer<T>
    private let paddedOutput: UnsafeMutablePointer<T>, paddedOutputGradient: UnsafeMutablePointer<T>
    /// Where each position of an image lies in the padded input blocks and in the output blocks.
    private let inputPositions: [Int32], outputPositions: [Int32]
    /// For each tile of a full batch, its rows in the point matrices of k = 4, l = 4 and both
    /// (`WinogradTiling.rowsAtMinusTwo(ofTile:)`), computed once so that the transforms divide nothing per tile; a
    /// fourth value, unused, puts each tile's entry in 16 bytes of its own.
    private let pointRowTable: UnsafeMutablePointer<Int32>
    /// The vectors between a transform's two halves: 36 for each tile of a run (the filter transform stages its blocks
    /// here too, `Winograd.filterBlocksPerRun`).
    private let between: UnsafeMutablePointer<T>
    /// Whether dx is this backward pass's already (`backwardWeights` computes it chunk by chunk with the weight
    /// gradient, from the same dM).
    private var inputGradientDone = false
    /// The bytes of the buffers above, added up as they were allocated: what the memory estimate counts for the
    /// layer (`WinogradTiling.ownedBytes`), tested equal.
    let allocatedBytes: Double

    init(inChannels: Int, outChannels: Int, height: Int, width: Int, batchCapacity: Int) {
        (self.inChannels, self.outChannels) = (inChannels, outChannels)
        tiling = WinogradTiling(height: height, width: width, scalarBytes: MemoryLayout<T>.stride)
        chunkSamples = Winograd.chunkSamples(inChannels: inChannels, outChannels: outChannels, tiling: tiling,
                                             batchCapacity: batchCapacity)
        precondition(tiling.lanes == T.Lanes.scalarCount, "the tiling's lanes are not \(T.self).Lanes")
        precondition(Winograd.filterBlocksPerRun * Winograd.points + 9 <= Winograd.tilesPerRun * Winograd.points,
                     "the filter transform's staged blocks outgrow the vectors between the transforms' halves")
        transformedInput = LargeBuffer.allocate(tiling.transformedCount(channels: inChannels, batch: chunkSamples))
        transformedInput.initialize(repeating: 0)
        var allocated = LargeBuffer.allocatedBytes(Double(transformedInput.count * MemoryLayout<T>.stride))
        func zeroed(_ n: Int) -> UnsafeMutablePointer<T> {
            let p = UnsafeMutablePointer<T>.allocate(capacity: n)
            p.initialize(repeating: 0, count: n)
            allocated += Double(n * MemoryLayout<T>.stride)
            return p
        }
        transformedFilters = zeroed(tiling.transformedFilterCount(inChannels: inChannels, outChannels: outChannels))
        transposedFilters = zeroed(inChannels * outChannels)
        (paddedInput, paddedInputGradient) = (zeroed(tiling.paddedInputCount), zeroed(tiling.paddedInputCount))
        (paddedOutput, paddedOutputGradient) = (zeroed(tiling.paddedOutputCount), zeroed(tiling.paddedOutputCount))
        inputPositions = winogradBlockPositions(tiling: tiling, blockWidth: tiling.paddedInputWidth, border: 1)
        outputPositions = winogradBlockPositions(tiling: tiling, blockWidth: tiling.paddedOutputWidth, border: 0)
        between = zeroed(Winograd.tilesPerRun * Winograd.points * tiling.lanes)
        let tiles = batchCapacity * tiling.tilesPerImage
        pointRowTable = .allocate(capacity: 4 * tiles)
        for tile in 0..<tiles {
            let rows = tiling.rowsAtMinusTwo(ofTile: tile)
            (pointRowTable + 4 * tile).initialize(from: [rows.k4, rows.l4, rows.both, 0], count: 4)
        }
        allocatedBytes = allocated + Double((inputPositions.count + outputPositions.count + 4 * tiles) * MemoryLayout<Int32>.size)
    }

    deinit {
        LargeBuffer.free(transformedInput)
        for p in [transformedFilters, transposedFilters, paddedInput, paddedInputGradient, paddedOutput, paddedOutputGradient, between] {
            p.deallocate()
        }
        pointRowTable.deallocate()
    }

    /// The scratch's parts: M or dM [36, B tiles, O], then dV [36, B tiles, C], then dU [36, O, C]. Past O (or C)
    /// each row holds whatever another layer left there: the transforms carry those lanes along and never store
    /// them in y or dx, and no GEMM reads them.
    private func transformedOutput(_ scratch: UnsafeMutablePointer<T>) -> UnsafeMutablePointer<T> { scratch }
    private func transformedInputGradient(_ scratch: UnsafeMutablePointer<T>, count: Int) -> UnsafeMutablePointer<T> {
        scratch + Winograd.points * tiling.pointStride(channels: outChannels, count: count)
    }
    private func transformedFilterGradient(_ scratch: UnsafeMutablePointer<T>, count: Int) -> UnsafeMutablePointer<T> {
        transformedInputGradient(scratch, count: count) + Winograd.points * tiling.pointStride(channels: inChannels, count: count)
    }

    /// y = conv(x, w) + b for `count` samples; `bias` nil without one. Chunk by chunk (`chunkSamples`): V, M = V U^T,
    /// then y. With `outputSums`, y's per-channel sums are added there (`addFeatureSums`) as each sample's block of
    /// channels leaves the output transform.
    func forward(x: UnsafePointer<T>, weights: UnsafePointer<T>, bias: UnsafePointer<T>?, count: Int,
                 y: UnsafeMutablePointer<T>, outputSums: UnsafeMutablePointer<Double>? = nil,
                 scratch: UnsafeMutablePointer<T>) {
        let (plane, v, m) = (tiling.height * tiling.width, transformedInput.baseAddress!, transformedOutput(scratch))
        transformFilters(weights)
        forEachChunk(of: count) { first, samples in
            winogradTransformInputs(x + first * inChannels * plane, count: samples, channels: inChannels, tiling: tiling,
                                    padded: paddedInput, positions: inputPositions, pointRowTable: pointRowTable,
                                    between: between, into: v)
            multiplyByFilters(v, count: samples, into: m)
            winogradTransformOutputs(m, count: samples, channels: outChannels, tiling: tiling, bias: bias,
                                     padded: paddedOutput, positions: outputPositions, pointRowTable: pointRowTable,
                                     between: between, into: y + first * outChannels * plane, sums: outputSums)
        }
    }

    /// Calls `body(first, samples)` for the chunks of `count` samples (`chunkSamples` each, the last one fewer), in
    /// order, or from the last to the first.
    @inline(__always)
    private func forEachChunk(of count: Int, lastFirst: Bool = false, _ body: (_ first: Int, _ samples: Int) -> Void) {
        let chunks = (count + chunkSamples - 1) / chunkSamples
        for i in 0..<chunks {
            let first = (lastFirst ? chunks - 1 - i : i) * chunkSamples
            body(first, min(chunkSamples, count - first))
        }
    }

    /// M = V U^T for `count` samples' tiles.
    private func multiplyByFilters(_ v: UnsafePointer<T>, count: Int, into m: UnsafeMutablePointer<T>) {
        let (c, o, n) = (inChannels, outChannels, count * tiling.tilesPerImage)
        let (cp, op) = (tiling.padded(c), tiling.padded(o))
        let (vStride, mStride) = (tiling.pointStride(channels: c, count: count), tiling.pointStride(channels: o, count: count))
        let uStride = tiling.filterPointStride(inChannels: c, outChannels: o)
        BLASThreads.oneThreadIfSmall(work: n * c * o) {
            // In pieces by U^T (NN) where the pieces pay, in one TN product by U otherwise (`Winograd.goesInPieces`).
            let inPieces = Winograd.goesInPieces(sharedOperandBytes: filterPointBytes, threads: BLASThreads.current)
            for p in 0..<Winograd.points {
                let rows = tiling.rowsOfPoint(p, count: count)
                if rows == 0 { continue }
                guard inPieces else {
                    // M[p][tiles, O] = V[p][tiles, C] U[p][O, C]^T
                    T.gemm(transposeA: false, transposeB: true, m: rows, n: o, k: c, alpha: 1, a: v + p * vStride, lda: cp,
                           b: transformedFilters + p * uStride, ldb: c, beta: 0, c: m + p * mStride, ldc: op)
                    continue
                }
                // M[p][tiles, O] = V[p][tiles, C] U^T[p][C, O], the tiles in pieces (`inUnpackedPieces`)
                T.transpose(rows: o, columns: c, a: transformedFilters + p * uStride, lda: c, b: transposedFilters, ldb: o)
                inUnpackedPieces(rows: rows, multiplyAddsPerRow: o * c, sharedOperand: true) { first, pieceRows in
                    T.gemm(transposeA: false, transposeB: false, m: pieceRows, n: o, k: c, alpha: 1, a: v + p * vStride + first * cp,
                           lda: cp, b: transposedFilters, ldb: o, beta: 0, c: m + p * mStride + first * op, ldc: op)
                }
            }
        }
    }

    /// U from the weights [O, C, 3, 3]: every forward pass starts with it, and `backwardInput` multiplies by it.
    func transformFilters(_ weights: UnsafePointer<T>) {
        winogradTransformFilters(weights, outChannels: outChannels, inChannels: inChannels,
                                 pointStride: tiling.filterPointStride(inChannels: inChannels, outChannels: outChannels),
                                 between: between, into: transformedFilters)
        inputGradientDone = false
    }

    /// The weight gradient (written with accumulate false, added to otherwise) from dy and x, the forward pass's
    /// input, and with `dx` the input gradient too (overwritten), chunk by chunk from the last: dM, V (the forward
    /// pass left the last chunk's; the others transformed again), dU += dM^T V, and dV = dM U, then dx.
    /// `backwardInput` then has nothing left to do.
    func backwardWeights(x: UnsafePointer<T>, dy: UnsafePointer<T>, count: Int, accumulate: Bool,
                         weightGradient: UnsafeMutablePointer<T>, dx: UnsafeMutablePointer<T>?,
                         scratch: UnsafeMutablePointer<T>) {
        let (c, o, plane) = (inChannels, outChannels, tiling.height * tiling.width)
        let (v, dm) = (transformedInput.baseAddress!, transformedOutput(scratch))
        // Past the largest chunk's dM and dV, so that every chunk adds into the same dU.
        let du = transformedFilterGradient(scratch, count: min(count, chunkSamples))
        let uStride = tiling.filterPointStride(inChannels: c, outChannels: o)
        let lastChunk = (count - 1) / chunkSamples * chunkSamples
        forEachChunk(of: count, lastFirst: true) { first, samples in
            transformOutputGradient(dy, first: first, samples: samples, into: dm)
            if first != lastChunk {
                winogradTransformInputs(x + first * c * plane, count: samples, channels: c, tiling: tiling,
                                        padded: paddedInput, positions: inputPositions, pointRowTable: pointRowTable,
                                        between: between, into: v)
            }
            let (cp, op) = (tiling.padded(c), tiling.padded(o))
            let (vStride, mStride) = (tiling.pointStride(channels: c, count: samples), tiling.pointStride(channels: o, count: samples))
            BLASThreads.oneThreadIfSmall(work: samples * tiling.tilesPerImage * c * o) {
                for p in 0..<Winograd.points {
                    let rows = tiling.rowsOfPoint(p, count: samples)
                    // No tile has the point (every row or every column of tiles short): it adds nothing.
                    if rows == 0 {
                        if first == lastChunk { (du + p * uStride).update(repeating: 0, count: o * c) }
                        continue
                    }
                    // dU[p][O, C] (+)= dM[p][tiles, O]^T V[p][tiles, C], the tiles in pieces added up
                    // (`inUnpackedPieces`)
                    inUnpackedPieces(rows: rows, multiplyAddsPerRow: o * c) { piece, k in
                        T.gemm(transposeA: true, transposeB: false, m: o, n: c, k: k, alpha: 1, a: dm + p * mStride + piece * op,
                               lda: op, b: v + p * vStride + piece * cp, ldb: cp, beta: first == lastChunk && piece == 0 ? 0 : 1,
                               c: du + p * uStride, ldc: c)
                    }
                }
            }
            if let dx { inputGradient(fromTransformed: dm, count: samples, into: dx + first * c * plane, scratch: scratch) }
        }
        winogradFilterGradients(du, outChannels: o, inChannels: c, pointStride: uStride, accumulate: accumulate,
                                between: between, into: weightGradient)
        inputGradientDone = dx != nil
    }

    /// dM of a chunk's samples, from dy.
    private func transformOutputGradient(_ dy: UnsafePointer<T>, first: Int, samples: Int, into dm: UnsafeMutablePointer<T>) {
        winogradTransformOutputGradients(dy + first * outChannels * tiling.height * tiling.width, count: samples,
                                         channels: outChannels, tiling: tiling, padded: paddedOutputGradient,
                                         positions: outputPositions, pointRowTable: pointRowTable, between: between, into: dm)
    }

    /// Calls `body(first, count)` for pieces of `rows` tiles that cover them in order, each at most
    /// `Winograd.unpackedLimit` multiply-adds where it can be, when the GEMMs run on one OpenBLAS thread; otherwise
    /// once for all of them, so that OpenBLAS's threads share the whole product. `sharedOperand`: an NN product, by
    /// U or U^T (see `Winograd.unpackedOperandLimit`).
    @inline(__always)
    private func inUnpackedPieces(rows: Int, multiplyAddsPerRow: Int, sharedOperand: Bool = false,
                                  _ body: (_ first: Int, _ count: Int) -> Void) {
        let piece = Winograd.unpackedPieceRows(rows: rows, multiplyAddsPerRow: multiplyAddsPerRow,
                                               sharedOperandBytes: sharedOperand ? filterPointBytes : 0, threads: BLASThreads.current)
        for first in stride(from: 0, to: rows, by: piece) { body(first, min(piece, rows - first)) }
    }

    /// dx (overwritten) from dy, through the U of the last forward pass: already done when `backwardWeights` was
    /// given dx and the filters have not changed since (`weightsChanged`, a test fault's flipped kernels).
    func backwardInput(dy: UnsafePointer<T>, count: Int, dx: UnsafeMutablePointer<T>, scratch: UnsafeMutablePointer<T>) {
        defer { inputGradientDone = false }
        if inputGradientDone { return }
        let (plane, dm) = (tiling.height * tiling.width, transformedOutput(scratch))
        forEachChunk(of: count) { first, samples in
            transformOutputGradient(dy, first: first, samples: samples, into: dm)
            inputGradient(fromTransformed: dm, count: samples, into: dx + first * inChannels * plane, scratch: scratch)
        }
    }

    /// dV = dM U for `count` samples' tiles, then their dx (overwritten).
    private func inputGradient(fromTransformed dm: UnsafePointer<T>, count: Int, into dx: UnsafeMutablePointer<T>,
                               scratch: UnsafeMutablePointer<T>) {
        let (c, o, n) = (inChannels, outChannels, count * tiling.tilesPerImage)
        let (cp, op) = (tiling.padded(c), tiling.padded(o))
        let (vStride, mStride) = (tiling.pointStride(channels: c, count: count), tiling.pointStride(channels: o, count: count))
        let dv = transformedInputGradient(scratch, count: count)
        let uStride = tiling.filterPointStride(inChannels: c, outChannels: o)
        BLASThreads.oneThreadIfSmall(work: n * c * o) {
            for p in 0..<Winograd.points {
                let rows = tiling.rowsOfPoint(p, count: count)
                if rows == 0 { continue }
                // dV[p][tiles, C] = dM[p][tiles, O] U[p][O, C], the tiles in pieces (`inUnpackedPieces`)
                inUnpackedPieces(rows: rows, multiplyAddsPerRow: o * c, sharedOperand: true) { first, m in
                    T.gemm(transposeA: false, transposeB: false, m: m, n: c, k: o, alpha: 1, a: dm + p * mStride + first * op,
                           lda: op, b: transformedFilters + p * uStride, ldb: c, beta: 0, c: dv + p * vStride + first * cp, ldc: cp)
                }
            }
        }
        winogradInputGradients(dv, count: count, channels: c, tiling: tiling, padded: paddedInputGradient,
                               positions: inputPositions, pointRowTable: pointRowTable, between: between, into: dx)
    }
}

// MARK: - Filter transforms (once per pass, `lanes` filters at a time)

/// U[p, o, c] = (G g G^T)[p] for every filter g = w[o, c] (3x3); U's points `pointStride` apart, which leaves room
/// for one vector past the last filter. `lanes` filters at a time, `Winograd.filterBlocksPerRun` such blocks staged
/// in `between` (their 36 points each, then the block's nine taps) before they go to U point by point: one block
/// at a time, each block's 36 stores went to 36 places in U at once, more streams than the caches follow
/// (BENCHMARKS.md, "fourteenth session").
@_specialize(where T == Float) @_specialize(where T == Double)
func winogradTransformFilters<T: Scalar>(_ w: UnsafePointer<T>, outChannels: Int, inChannels: Int, pointStride: Int,
                                         between stage: UnsafeMutablePointer<T>, into u: UnsafeMutablePointer<T>) {
    typealias V = T.Lanes
    let lanes = V.scalarCount, filters = outChannels * inChannels, run = Winograd.filterBlocksPerRun
    let quarter: T = 1 / 4, sixth: T = 1 / 6, twelfth: T = 1 / 12, twentyFourth: T = 1 / 24
    let g = stage + run * Winograd.points * lanes
    for firstOfRun in stride(from: 0, to: filters, by: run * lanes) {
        let blocks = min(run, (filters - firstOfRun + lanes - 1) / lanes)
        for block in 0..<blocks {
            // g[k, lane] = w[first + lane, k]: the block's nine taps as nine vectors.
            let first = firstOfRun + block * lanes
            for lane in 0..<min(lanes, filters - first) {
                let source = w + (first + lane) * 9
                for k in 0..<9 { g[k &* lanes &+ lane] = source[k] }
            }
            // t = G g [6, 3] one column q at a time, then row k of the block's points = t G^T.
            let g0 = (load(g, as: V.self), load(g + 3 * lanes, as: V.self), load(g + 6 * lanes, as: V.self))
            let g1 = (load(g + lanes, as: V.self), load(g + 4 * lanes, as: V.self), load(g + 7 * lanes, as: V.self))
            let g2 = (load(g + 2 * lanes, as: V.self), load(g + 5 * lanes, as: V.self), load(g + 8 * lanes, as: V.self))
            // Column q of g is (gq.0, gq.1, gq.2); rows of t for each column.
            @inline(__always) func column(_ c: (V, V, V)) -> (V, V, V, V, V, V) {
                (quarter * c.0, -sixth * (c.0 + c.1 + c.2), -sixth * (c.0 - c.1 + c.2),
                 twentyFourth * c.0 + twelfth * c.1 + sixth * c.2, twentyFourth * c.0 - twelfth * c.1 + sixth * c.2, c.2)
            }
            let (c0, c1, c2) = (column(g0), column(g1), column(g2))
            let points = stage + block * Winograd.points * lanes
            @inline(__always) func row(_ k: Int, _ r: (V, V, V)) {
                let (a, b) = (column(r), points + 6 * k * lanes)
                store(a.0, b); store(a.1, b + lanes); store(a.2, b + 2 * lanes)
                store(a.3, b + 3 * lanes); store(a.4, b + 4 * lanes); store(a.5, b + 5 * lanes)
            }
            row(0, (c0.0, c1.0, c2.0)); row(1, (c0.1, c1.1, c2.1)); row(2, (c0.2, c1.2, c2.2))
            row(3, (c0.3, c1.3, c2.3)); row(4, (c0.4, c1.4, c2.4)); row(5, (c0.5, c1.5, c2.5))
        }
        // Point by point, the run's blocks side by side in U: one stream at a time.
        for p in 0..<Winograd.points {
            let target = u + p * pointStride + firstOfRun
            for block in 0..<blocks {
                store(load(stage + (block * Winograd.points + p) * lanes, as: V.self), target + block * lanes)
            }
        }
    }
}

/// The adjoint of `winogradTransformFilters`: dw[o, c] (=, or += with `accumulate`) G^T dU[., o, c] G, dU's points
/// `pointStride` apart.
@_specialize(where T == Float) @_specialize(where T == Double)
func winogradFilterGradients<T: Scalar>(_ du: UnsafePointer<T>, outChannels: Int, inChannels: Int, pointStride: Int,
                                        accumulate: Bool, between g: UnsafeMutablePointer<T>, into dw: UnsafeMutablePointer<T>) {
    typealias V = T.Lanes
    let lanes = V.scalarCount, filters = outChannels * inChannels
    let quarter: T = 1 / 4, sixth: T = 1 / 6, twelfth: T = 1 / 12, twentyFourth: T = 1 / 24
    // G^T applied to six values: the three sums each column (or row) of dU contributes.
    @inline(__always) func adjoint(_ u: (V, V, V, V, V, V)) -> (V, V, V) {
        (quarter * u.0 - sixth * (u.1 + u.2) + twentyFourth * (u.3 + u.4),
         sixth * (u.2 - u.1) + twelfth * (u.3 - u.4),
         sixth * (u.3 + u.4 - u.1 - u.2) + u.5)
    }
    for first in stride(from: 0, to: filters, by: lanes) {
        let d = du + first
        // t = G^T dU [3, 6]: column l of dU gives column l of t.
        @inline(__always) func column(_ l: Int) -> (V, V, V) {
            adjoint((load(d + l * pointStride, as: V.self), load(d + (6 + l) * pointStride, as: V.self),
                     load(d + (12 + l) * pointStride, as: V.self), load(d + (18 + l) * pointStride, as: V.self),
                     load(d + (24 + l) * pointStride, as: V.self), load(d + (30 + l) * pointStride, as: V.self)))
        }
        let (t0, t1, t2, t3, t4, t5) = (column(0), column(1), column(2), column(3), column(4), column(5))
        // dg = t G [3, 3]: row p of t gives row p of dg.
        let r0 = adjoint((t0.0, t1.0, t2.0, t3.0, t4.0, t5.0))
        let r1 = adjoint((t0.1, t1.1, t2.1, t3.1, t4.1, t5.1))
        let r2 = adjoint((t0.2, t1.2, t2.2, t3.2, t4.2, t5.2))
        store(r0.0, g); store(r0.1, g + lanes); store(r0.2, g + 2 * lanes)
        store(r1.0, g + 3 * lanes); store(r1.1, g + 4 * lanes); store(r1.2, g + 5 * lanes)
        store(r2.0, g + 6 * lanes); store(r2.1, g + 7 * lanes); store(r2.2, g + 8 * lanes)
        // dw[first + lane, k] = g[k, lane], or added to: the nine vectors back into the filters' layout.
        for lane in 0..<min(lanes, filters - first) {
            let target = dw + (first + lane) * 9
            if accumulate {
                for k in 0..<9 { target[k] += g[k &* lanes &+ lane] }
            } else {
                for k in 0..<9 { target[k] = g[k &* lanes &+ lane] }
            }
        }
    }
}

// MARK: - Tile transforms (every pass, a block of `lanes` channels of the whole batch at a time)
//
// Each copies a sample's planes of the block into an interleaved padded block ([rows, columns, lanes], so that one
// vector holds a position of every channel in the block) or out of one, and transforms in whole vectors: 36 vector
// loads and stores per tile instead of 36 scalar ones per tile and channel, and no tile tests a bound. The tiles of
// the batch go in runs of `Winograd.tilesPerRun`, each half of the transform over the whole run before the other.

@inline(__always) private func load<V: SIMD>(_ p: UnsafePointer<V.Scalar>, as: V.Type) -> V {
    UnsafeRawPointer(p).loadUnaligned(as: V.self)
}
@inline(__always) private func store<V: SIMD>(_ v: V, _ p: UnsafeMutablePointer<V.Scalar>) {
    UnsafeMutableRawPointer(p).storeBytes(of: v, as: V.self)
}

/// Where each position of an H x W plane (row-major) lies in an interleaved block [rows, blockWidth, lanes] whose
/// image starts at (border, border): the offset of its first lane, for `interleave` and `deinterleave`.
func winogradBlockPositions(tiling: WinogradTiling, blockWidth: Int, border: Int) -> [Int32] {
    (0..<tiling.height * tiling.width).map { q in
        let (i, j) = q.quotientAndRemainder(dividingBy: tiling.width)
        return Int32(((i + border) * blockWidth + j + border) * tiling.lanes)
    }
}

/// Copies `planes` planes of [H, W] (channels of one sample, the last block may have fewer than `lanes`) into an
/// interleaved block, position q of each plane to `positions[q]`; the rest of the block is left as it is. Float
/// moves eight planes at a time by 8x8 transposes in registers (eight positions of eight planes in, eight vectors
/// of eight lanes out), which takes half the time of one scalar at a time; what is left goes one scalar at a time.
@inline(__always)
private func interleave<T: Scalar>(_ source: UnsafePointer<T>, planes: Int, tiling: WinogradTiling,
                                   positions: UnsafePointer<Int32>, into block: UnsafeMutablePointer<T>) {
    let n = tiling.height * tiling.width
    var first = 0
    if T.self == Float.self {
        let (s, b) = (UnsafeRawPointer(source).assumingMemoryBound(to: Float.self),
                      UnsafeMutableRawPointer(block).assumingMemoryBound(to: Float.self))
        while first + 8 <= planes {
            let plane = s + first * n, lanes = b + first
            var q = 0
            while q + 8 <= n {
                let r = transpose8(load(plane + q, as: Eight.self), load(plane + n + q, as: Eight.self),
                                   load(plane + 2 * n + q, as: Eight.self), load(plane + 3 * n + q, as: Eight.self),
                                   load(plane + 4 * n + q, as: Eight.self), load(plane + 5 * n + q, as: Eight.self),
                                   load(plane + 6 * n + q, as: Eight.self), load(plane + 7 * n + q, as: Eight.self))
                store(r.0, lanes + Int(positions[q])); store(r.1, lanes + Int(positions[q + 1]))
                store(r.2, lanes + Int(positions[q + 2])); store(r.3, lanes + Int(positions[q + 3]))
                store(r.4, lanes + Int(positions[q + 4])); store(r.5, lanes + Int(positions[q + 5]))
                store(r.6, lanes + Int(positions[q + 6])); store(r.7, lanes + Int(positions[q + 7]))
                q += 8
            }
            for q in q..<n {
                for lane in 0..<8 { lanes[Int(positions[q]) &+ lane] = plane[lane &* n &+ q] }
            }
            first += 8
        }
    }
    for lane in first..<planes {
        let plane = source + lane * n
        for q in 0..<n { block[Int(positions[q]) &+ lane] = plane[q] }
    }
}

/// The inverse of `interleave`: the block's images back into `planes` planes of [H, W].
@inline(__always)
private func deinterleave<T: Scalar>(_ block: UnsafePointer<T>, planes: Int, tiling: WinogradTiling,
                                     positions: UnsafePointer<Int32>, into target: UnsafeMutablePointer<T>) {
    let n = tiling.height * tiling.width
    var first = 0
    if T.self == Float.self {
        let (b, t) = (UnsafeRawPointer(block).assumingMemoryBound(to: Float.self),
                      UnsafeMutableRawPointer(target).assumingMemoryBound(to: Float.self))
        while first + 8 <= planes {
            let lanes = b + first, plane = t + first * n
            var q = 0
            while q + 8 <= n {
                let r = transpose8(load(lanes + Int(positions[q]), as: Eight.self), load(lanes + Int(positions[q + 1]), as: Eight.self),
                                   load(lanes + Int(positions[q + 2]), as: Eight.self), load(lanes + Int(positions[q + 3]), as: Eight.self),
                                   load(lanes + Int(positions[q + 4]), as: Eight.self), load(lanes + Int(positions[q + 5]), as: Eight.self),
                                   load(lanes + Int(positions[q + 6]), as: Eight.self), load(lanes + Int(positions[q + 7]), as: Eight.self))
                store(r.0, plane + q); store(r.1, plane + n + q); store(r.2, plane + 2 * n + q); store(r.3, plane + 3 * n + q)
                store(r.4, plane + 4 * n + q); store(r.5, plane + 5 * n + q); store(r.6, plane + 6 * n + q)
                store(r.7, plane + 7 * n + q)
                q += 8
            }
            for q in q..<n {
                for lane in 0..<8 { plane[lane &* n &+ q] = lanes[Int(positions[q]) &+ lane] }
            }
            first += 8
        }
    }
    for lane in first..<planes {
        let plane = target + lane * n
        for q in 0..<n { plane[q] = block[Int(positions[q]) &+ lane] }
    }
}

private typealias Eight = SIMD8<Float>

/// The transpose of an 8x8 matrix given as its eight rows: three perfect unshuffles (even elements of a pair of
/// rows, then odd ones) each rotate the element index's six bits by one, and three rotate the row bits into the
/// column bits. The compiler makes each unshuffle a few in-register shuffles.
@inline(__always)
private func transpose8(_ r0: Eight, _ r1: Eight, _ r2: Eight, _ r3: Eight, _ r4: Eight, _ r5: Eight, _ r6: Eight,
                        _ r7: Eight) -> (Eight, Eight, Eight, Eight, Eight, Eight, Eight, Eight) {
    @inline(__always) func unshuffle(_ r: (Eight, Eight, Eight, Eight, Eight, Eight, Eight, Eight))
        -> (Eight, Eight, Eight, Eight, Eight, Eight, Eight, Eight) {
        let p0 = SIMD16(lowHalf: r.0, highHalf: r.1), p1 = SIMD16(lowHalf: r.2, highHalf: r.3)
        let p2 = SIMD16(lowHalf: r.4, highHalf: r.5), p3 = SIMD16(lowHalf: r.6, highHalf: r.7)
        return (p0.evenHalf, p1.evenHalf, p2.evenHalf, p3.evenHalf, p0.oddHalf, p1.oddHalf, p2.oddHalf, p3.oddHalf)
    }
    return unshuffle(unshuffle(unshuffle((r0, r1, r2, r3, r4, r5, r6, r7))))
}

/// Calls `body` for every block of `lanes` channels and, in it, every run of the batch's tiles (the first tile and
/// the run), in order.
@inline(__always)
private func forEachRun(count: Int, channels: Int, tiling: WinogradTiling, _ body: (_ block: Int, _ first: Int, _ run: Range<Int>) -> Void) {
    let tiles = count * tiling.tilesPerImage
    for block in stride(from: 0, to: channels, by: tiling.lanes) {
        for first in stride(from: 0, to: tiles, by: Winograd.tilesPerRun) {
            body(block, first, first..<min(first + Winograd.tilesPerRun, tiles))
        }
    }
}

/// Tile `tile` of the batch as its index in its sample's image, after interleaving the sample's block of `source`
/// ([B, C, H, W]) into `padded` when it is the sample's first tile.
@inline(__always)
private func interleavingAt<T: Scalar>(_ tile: Int, block: Int, channels: Int, of source: UnsafePointer<T>,
                                       tiling: WinogradTiling, positions: UnsafePointer<Int32>,
                                       into padded: UnsafeMutablePointer<T>) -> Int {
    let (b, inImage) = tile.quotientAndRemainder(dividingBy: tiling.tilesPerImage)
    if inImage == 0 {
        interleave(source + (b * channels + block) * tiling.height * tiling.width, planes: min(tiling.lanes, channels - block),
                   tiling: tiling, positions: positions, into: padded)
    }
    return inImage
}

/// The counterpart of `interleavingAt` once tile `tile` of the batch is in `padded`: when it was its sample's last,
/// the sample's block goes from `padded` into `target` ([B, C, H, W]), and with `sums` its channels' sums are added
/// there while the block is in the L1 cache (`addFeatureSums`).
@inline(__always)
private func deinterleavingAfter<T: Scalar>(_ tile: Int, block: Int, channels: Int, from padded: UnsafePointer<T>,
                                            tiling: WinogradTiling, positions: UnsafePointer<Int32>,
                                            into target: UnsafeMutablePointer<T>, sums: UnsafeMutablePointer<Double>? = nil) {
    let (b, inImage) = tile.quotientAndRemainder(dividingBy: tiling.tilesPerImage)
    guard inImage == tiling.tilesPerImage - 1 else { return }
    let (planes, plane) = (min(tiling.lanes, channels - block), tiling.height * tiling.width)
    deinterleave(padded, planes: planes, tiling: tiling, positions: positions, into: target + (b * channels + block) * plane)
    if let sums {
        addFeatureSums(UnsafePointer(target + b * channels * plane), samples: 1, features: block..<(block + planes),
                       of: channels, positions: plane, into: sums)
    }
}

// The 1-D transforms of a full (4-output) tile and of a short (3-output) one, applied to vectors; the 2-D
// transforms apply them down the columns of a window, then along its rows. A short tile's five points go to slots
// 0, 1, 2, 3 and 5 of six (its point -2, slot 4, unused).
//
//     F(3, 3):  B^T = | 4 -2 -4  2  0 |    A^T = | 1  1  1  1  0 |    G: the rows of F(4, 3)'s G for
//                     | 0 -6 -3  3  0 |          | 0  1 -1  2  0 |    0, 1, -1, 2 and infinity
//                     | 0  2 -3  1  0 |          | 0  1  1  4  1 |
//                     | 0 -4  0  4  0 |
//                     | 0  2 -1 -2  1 |

/// B^T d for six inputs.
@inline(__always) private func inputTransform<V: SIMD>(_ d0: V, _ d1: V, _ d2: V, _ d3: V, _ d4: V, _ d5: V)
    -> (V, V, V, V, V, V) where V.Scalar: FloatingPoint {
    (4 * d0 - 5 * d2 + d4, d3 + d4 - 4 * (d1 + d2), 4 * (d1 - d2) + d4 - d3, 2 * (d3 - d1) + d4 - d2,
     2 * (d1 - d3) + d4 - d2, 4 * d1 - 5 * d3 + d5)
}
/// B^T d for a short tile's five inputs, into slots 0, 1, 2, 3 and 5.
@inline(__always) private func shortInputTransform<V: SIMD>(_ d0: V, _ d1: V, _ d2: V, _ d3: V, _ d4: V)
    -> (V, V, V, V, V) where V.Scalar: FloatingPoint {
    (4 * (d0 - d2) + 2 * (d3 - d1), 3 * (d3 - d2) - 6 * d1, 2 * d1 - 3 * d2 + d3, 4 * (d3 - d1), 2 * (d1 - d3) + d4 - d2)
}
/// B v (the adjoint of `inputTransform`) for six points.
@inline(__always) private func inputGradientTransform<V: SIMD>(_ v0: V, _ v1: V, _ v2: V, _ v3: V, _ v4: V, _ v5: V)
    -> (V, V, V, V, V, V) where V.Scalar: FloatingPoint {
    (4 * v0, 4 * (v2 - v1 + v5) + 2 * (v4 - v3), -5 * v0 - 4 * (v1 + v2) - v3 - v4, v1 - v2 + 2 * (v3 - v4) - 5 * v5,
     v0 + v1 + v2 + v3 + v4, v5)
}
/// B v for a short tile's slots 0, 1, 2, 3 and 5: its five inputs.
@inline(__always) private func shortInputGradientTransform<V: SIMD>(_ v0: V, _ v1: V, _ v2: V, _ v3: V, _ v5: V)
    -> (V, V, V, V, V) where V.Scalar: FloatingPoint {
    (4 * v0, 2 * (v2 + v5 - v0) - 6 * v1 - 4 * v3, -4 * v0 - 3 * (v1 + v2) - v5, 2 * (v0 - v5) + 3 * v1 + v2 + 4 * v3, v5)
}
/// A^T m for six points: four outputs.
@inline(__always) private func outputTransform<V: SIMD>(_ m0: V, _ m1: V, _ m2: V, _ m3: V, _ m4: V, _ m5: V)
    -> (V, V, V, V) where V.Scalar: FloatingPoint {
    (m0 + m1 + m2 + m3 + m4, m1 - m2 + 2 * (m3 - m4), m1 + m2 + 4 * (m3 + m4), m1 - m2 + 8 * (m3 - m4) + m5)
}
/// A^T m for a short tile's slots 0, 1, 2, 3 and 5: three outputs.
@inline(__always) private func shortOutputTransform<V: SIMD>(_ m0: V, _ m1: V, _ m2: V, _ m3: V, _ m5: V)
    -> (V, V, V) where V.Scalar: FloatingPoint {
    (m0 + m1 + m2 + m3, m1 - m2 + 2 * m3, m1 + m2 + 4 * m3 + m5)
}
/// A e (the adjoint of `outputTransform`) for four output gradients: six points.
@inline(__always) private func outputGradientTransform<V: SIMD>(_ e0: V, _ e1: V, _ e2: V, _ e3: V)
    -> (V, V, V, V, V, V) where V.Scalar: FloatingPoint {
    (e0, e0 + e1 + e2 + e3, e0 - e1 + e2 - e3, e0 + 2 * e1 + 4 * e2 + 8 * e3, e0 - 2 * e1 + 4 * e2 - 8 * e3, e3)
}
/// A e for a short tile's three output gradients: slots 0, 1, 2, 3 and 5.
@inline(__always) private func shortOutputGradientTransform<V: SIMD>(_ e0: V, _ e1: V, _ e2: V)
    -> (V, V, V, V, V) where V.Scalar: FloatingPoint {
    (e0, e0 + e1 + e2, e0 - e1 + e2, e0 + 2 * e1 + 4 * e2, e2)
}

/// Where a tile's values for the points of row k of the transform lie in the point matrices: `row` for l != 4,
/// `rowOfL4` for l = 4 (negative when the tile's column is short, and it has no such point); `skips` when k = 4 and
/// the tile's row is short.
@inline(__always)
private func rowsOfTile(_ tile: Int, inPointRow k: Int, _ table: UnsafePointer<Int32>) -> (skips: Bool, row: Int, rowOfL4: Int) {
    let entry = table + 4 * tile
    return k == 4 ? (entry[0] < 0, Int(entry[0]), Int(entry[2])) : (false, tile, Int(entry[1]))
}
/// The same along column l of the transform: `row` for k != 4, `rowOfK4` for k = 4 (negative when the tile's row
/// is short); `skips` when l = 4 and the tile's column is short.
@inline(__always)
private func rowsOfTile(_ tile: Int, inPointColumn l: Int, _ table: UnsafePointer<Int32>) -> (skips: Bool, row: Int, rowOfK4: Int) {
    let entry = table + 4 * tile
    return l == 4 ? (entry[1] < 0, Int(entry[1]), Int(entry[2])) : (false, tile, Int(entry[0]))
}
/// Whether a tile's row of tiles, and its column, are full (4 outputs).
@inline(__always)
private func isFull(_ tile: Int, _ table: UnsafePointer<Int32>) -> (row: Bool, column: Bool) {
    (table[4 * tile] >= 0, table[4 * tile + 1] >= 0)
}

/// V[p, row, c] = (B^T d B)[p] for every input window d of every plane of x ([B, C, H, W]): 6x6 for a full tile,
/// 5 rows or 5 columns for short ones; a tile's row in each point's matrix from `pointRowTable`.
@_specialize(where T == Float) @_specialize(where T == Double)
func winogradTransformInputs<T: Scalar>(_ x: UnsafePointer<T>, count: Int, channels: Int, tiling: WinogradTiling,
                                        padded: UnsafeMutablePointer<T>, positions: UnsafePointer<Int32>,
                                        pointRowTable: UnsafePointer<Int32>, between t: UnsafeMutablePointer<T>,
                                        into v: UnsafeMutablePointer<T>) {
    typealias V = T.Lanes
    let (pw, lanes) = (tiling.paddedInputWidth, tiling.lanes)
    let (ld, pointStride) = (tiling.padded(channels), tiling.pointStride(channels: channels, count: count))
    forEachRun(count: count, channels: channels, tiling: tiling) { block, first, run in
        // t = B^T d [6, 6] for every tile of the run, column by column: the run's i-th tile's 36 vectors at
        // t + 36 i lanes.
        for tile in run {
            let inImage = interleavingAt(tile, block: block, channels: channels, of: x, tiling: tiling,
                                         positions: positions, into: padded)
            let full = isFull(tile, pointRowTable)
            let d = padded + tiling.tileOffset(inImage, width: pw), s = t + (tile - first) * 36 * lanes
            // One loop for each height of tile, so that no column tests it.
            let columns = full.column ? 6 : 5
            if full.row {
                for j in 0..<columns {
                    let c = d + j * lanes, o = s + j * lanes
                    let r = inputTransform(load(c, as: V.self), load(c + pw * lanes, as: V.self),
                                           load(c + 2 * pw * lanes, as: V.self), load(c + 3 * pw * lanes, as: V.self),
                                           load(c + 4 * pw * lanes, as: V.self), load(c + 5 * pw * lanes, as: V.self))
                    store(r.0, o); store(r.1, o + 6 * lanes); store(r.2, o + 12 * lanes)
                    store(r.3, o + 18 * lanes); store(r.4, o + 24 * lanes); store(r.5, o + 30 * lanes)
                }
            } else {
                for j in 0..<columns {
                    let c = d + j * lanes, o = s + j * lanes
                    let r = shortInputTransform(load(c, as: V.self), load(c + pw * lanes, as: V.self),
                                                load(c + 2 * pw * lanes, as: V.self), load(c + 3 * pw * lanes, as: V.self),
                                                load(c + 4 * pw * lanes, as: V.self))
                    store(r.0, o); store(r.1, o + 6 * lanes); store(r.2, o + 12 * lanes)
                    store(r.3, o + 18 * lanes); store(r.4, o + 30 * lanes)
                }
            }
        }
        // V = t B, row k of every tile of the run before the next row: six of V's 36 matrices written at a time,
        // each in one sequential stream.
        for k in 0..<6 {
            for tile in run {
                let (skips, row, rowOfL4) = rowsOfTile(tile, inPointRow: k, pointRowTable)
                if skips { continue }
                let r = t + ((tile - first) * 36 + 6 * k) * lanes
                let d0 = load(r, as: V.self), d1 = load(r + lanes, as: V.self), d2 = load(r + 2 * lanes, as: V.self)
                let d3 = load(r + 3 * lanes, as: V.self), d4 = load(r + 4 * lanes, as: V.self)
                let o = v + row * ld + block + 6 * k * pointStride
                if rowOfL4 >= 0 {
                    let e = inputTransform(d0, d1, d2, d3, d4, load(r + 5 * lanes, as: V.self))
                    store(e.0, o); store(e.1, o + pointStride); store(e.2, o + 2 * pointStride)
                    store(e.3, o + 3 * pointStride); store(e.4, v + rowOfL4 * ld + block + (6 * k + 4) * pointStride)
                    store(e.5, o + 5 * pointStride)
                } else {
                    let e = shortInputTransform(d0, d1, d2, d3, d4)
                    store(e.0, o); store(e.1, o + pointStride); store(e.2, o + 2 * pointStride)
                    store(e.3, o + 3 * pointStride); store(e.4, o + 5 * pointStride)
                }
            }
        }
    }
}

/// The adjoint of `winogradTransformInputs`: dx[b, c] = the sum over tiles of B dV[., tile, c] B^T, placed at each
/// tile's window, with what falls on the zero border dropped. dx is overwritten.
@_specialize(where T == Float) @_specialize(where T == Double)
func winogradInputGradients<T: Scalar>(_ dv: UnsafePointer<T>, count: Int, channels: Int, tiling: WinogradTiling,
                                       padded: UnsafeMutablePointer<T>, positions: UnsafePointer<Int32>,
                                       pointRowTable: UnsafePointer<Int32>, between t: UnsafeMutablePointer<T>,
                                       into dx: UnsafeMutablePointer<T>) {
    typealias V = T.Lanes
    let (pw, lanes) = (tiling.paddedInputWidth, tiling.lanes)
    let (ld, pointStride) = (tiling.padded(channels), tiling.pointStride(channels: channels, count: count))
    forEachRun(count: count, channels: channels, tiling: tiling) { block, first, run in
        // t = dV B^T, row k of dV (B applied to it) for every tile of the run before the next row: six of dV's
        // 36 matrices read at a time.
        for k in 0..<6 {
            for tile in run {
                let (skips, row, rowOfL4) = rowsOfTile(tile, inPointRow: k, pointRowTable)
                if skips { continue }
                let s = dv + row * ld + block + 6 * k * pointStride
                let v0 = load(s, as: V.self), v1 = load(s + pointStride, as: V.self)
                let v2 = load(s + 2 * pointStride, as: V.self), v3 = load(s + 3 * pointStride, as: V.self)
                let v5 = load(s + 5 * pointStride, as: V.self)
                let r = t + ((tile - first) * 36 + 6 * k) * lanes
                if rowOfL4 >= 0 {
                    let e = inputGradientTransform(v0, v1, v2, v3, load(dv + rowOfL4 * ld + block + (6 * k + 4) * pointStride,
                                                                        as: V.self), v5)
                    store(e.0, r); store(e.1, r + lanes); store(e.2, r + 2 * lanes); store(e.3, r + 3 * lanes)
                    store(e.4, r + 4 * lanes); store(e.5, r + 5 * lanes)
                } else {
                    let e = shortInputGradientTransform(v0, v1, v2, v3, v5)
                    store(e.0, r); store(e.1, r + lanes); store(e.2, r + 2 * lanes); store(e.3, r + 3 * lanes)
                    store(e.4, r + 4 * lanes)
                }
            }
        }
        // dd = B t, column j at a time, added into each tile's window: a sample's block starts at zero with its
        // first tile and goes to dx after its last.
        for tile in run {
            let inImage = tile % tiling.tilesPerImage
            if inImage == 0 { padded.update(repeating: 0, count: tiling.paddedInputCount) }
            let full = isFull(tile, pointRowTable)
            let d = padded + tiling.tileOffset(inImage, width: pw), u = t + (tile - first) * 36 * lanes
            @inline(__always) func add(_ value: V, _ i: Int, _ e: UnsafeMutablePointer<T>) {
                store(load(e + i * pw * lanes, as: V.self) + value, e + i * pw * lanes)
            }
            let columns = full.column ? 6 : 5
            if full.row {
                for j in 0..<columns {
                    let c = u + j * lanes, e = d + j * lanes
                    let r = inputGradientTransform(load(c, as: V.self), load(c + 6 * lanes, as: V.self),
                                                   load(c + 12 * lanes, as: V.self), load(c + 18 * lanes, as: V.self),
                                                   load(c + 24 * lanes, as: V.self), load(c + 30 * lanes, as: V.self))
                    add(r.0, 0, e); add(r.1, 1, e); add(r.2, 2, e); add(r.3, 3, e); add(r.4, 4, e); add(r.5, 5, e)
                }
            } else {
                for j in 0..<columns {
                    let c = u + j * lanes, e = d + j * lanes
                    let r = shortInputGradientTransform(load(c, as: V.self), load(c + 6 * lanes, as: V.self),
                                                        load(c + 12 * lanes, as: V.self), load(c + 18 * lanes, as: V.self),
                                                        load(c + 30 * lanes, as: V.self))
                    add(r.0, 0, e); add(r.1, 1, e); add(r.2, 2, e); add(r.3, 3, e); add(r.4, 4, e)
                }
            }
            deinterleavingAfter(tile, block: block, channels: channels, from: padded, tiling: tiling, positions: positions,
                                into: dx)
        }
    }
}

/// y[b, o] = A^T M[., tile, o] A for each tile (4x4 outputs from 6x6 points, 3 rows or 3 columns for short ones),
/// clipped to the image, plus bias[o] when there is one.
@_specialize(where T == Float) @_specialize(where T == Double)
func winogradTransformOutputs<T: Scalar>(_ m: UnsafePointer<T>, count: Int, channels: Int, tiling: WinogradTiling,
                                         bias: UnsafePointer<T>?, padded: UnsafeMutablePointer<T>,
                                         positions: UnsafePointer<Int32>, pointRowTable: UnsafePointer<Int32>,
                                         between t: UnsafeMutablePointer<T>, into y: UnsafeMutablePointer<T>,
                                         sums: UnsafeMutablePointer<Double>? = nil) {
    typealias V = T.Lanes
    let (pw, lanes) = (tiling.paddedOutputWidth, tiling.lanes)
    let (ld, pointStride) = (tiling.padded(channels), tiling.pointStride(channels: channels, count: count))
    forEachRun(count: count, channels: channels, tiling: tiling) { block, first, run in
        var offset = V()
        if let bias { for lane in 0..<min(lanes, channels - block) { offset[lane] = bias[block + lane] } }
        // t = A^T M [4, 6], column l of M for every tile of the run before the next column: six of M's 36
        // matrices read at a time. The run's i-th tile's 24 vectors at t + 36 i lanes.
        for l in 0..<6 {
            for tile in run {
                let (skips, row, rowOfK4) = rowsOfTile(tile, inPointColumn: l, pointRowTable)
                if skips { continue }
                let s = m + row * ld + block + l * pointStride, r = t + ((tile - first) * 36 + l) * lanes
                let m0 = load(s, as: V.self), m1 = load(s + 6 * pointStride, as: V.self)
                let m2 = load(s + 12 * pointStride, as: V.self), m3 = load(s + 18 * pointStride, as: V.self)
                let m5 = load(s + 30 * pointStride, as: V.self)
                if rowOfK4 >= 0 {
                    let m4 = load(m + rowOfK4 * ld + block + (24 + l) * pointStride, as: V.self)
                    let e = outputTransform(m0, m1, m2, m3, m4, m5)
                    store(e.0, r); store(e.1, r + 6 * lanes); store(e.2, r + 12 * lanes); store(e.3, r + 18 * lanes)
                } else {
                    let e = shortOutputTransform(m0, m1, m2, m3, m5)
                    store(e.0, r); store(e.1, r + 6 * lanes); store(e.2, r + 12 * lanes)
                }
            }
        }
        // Y = t A, row by row, into each tile's place; a sample's block goes to y after its last tile.
        for tile in run {
            let full = isFull(tile, pointRowTable)
            let out = padded + tiling.tileOffset(tile % tiling.tilesPerImage, width: pw), u = t + (tile - first) * 36 * lanes
            let rows = full.row ? 4 : 3
            if full.column {
                for i in 0..<rows {
                    let r = u + 6 * i * lanes, o = out + i * pw * lanes
                    let e = outputTransform(load(r, as: V.self), load(r + lanes, as: V.self), load(r + 2 * lanes, as: V.self),
                                            load(r + 3 * lanes, as: V.self), load(r + 4 * lanes, as: V.self),
                                            load(r + 5 * lanes, as: V.self))
                    store(offset + e.0, o); store(offset + e.1, o + lanes); store(offset + e.2, o + 2 * lanes)
                    store(offset + e.3, o + 3 * lanes)
                }
            } else {
                for i in 0..<rows {
                    let r = u + 6 * i * lanes, o = out + i * pw * lanes
                    let e = shortOutputTransform(load(r, as: V.self), load(r + lanes, as: V.self), load(r + 2 * lanes, as: V.self),
                                                 load(r + 3 * lanes, as: V.self), load(r + 5 * lanes, as: V.self))
                    store(offset + e.0, o); store(offset + e.1, o + lanes); store(offset + e.2, o + 2 * lanes)
                }
            }
            deinterleavingAfter(tile, block: block, channels: channels, from: padded, tiling: tiling, positions: positions,
                                into: y, sums: sums)
        }
    }
}

/// The adjoint of `winogradTransformOutputs` (without the bias): dM[., tile, o] = A dY_tile A^T, with dY zero past
/// the image's edge.
@_specialize(where T == Float) @_specialize(where T == Double)
func winogradTransformOutputGradients<T: Scalar>(_ dy: UnsafePointer<T>, count: Int, channels: Int,
                                                 tiling: WinogradTiling, padded: UnsafeMutablePointer<T>,
                                                 positions: UnsafePointer<Int32>, pointRowTable: UnsafePointer<Int32>,
                                                 between t: UnsafeMutablePointer<T>, into dm: UnsafeMutablePointer<T>) {
    typealias V = T.Lanes
    let (pw, lanes) = (tiling.paddedOutputWidth, tiling.lanes)
    let (ld, pointStride) = (tiling.padded(channels), tiling.pointStride(channels: channels, count: count))
    forEachRun(count: count, channels: channels, tiling: tiling) { block, first, run in
        // t = A e [6, 4] for every tile of the run, column j at a time: the run's i-th tile's 24 vectors at
        // t + 36 i lanes.
        for tile in run {
            let inImage = interleavingAt(tile, block: block, channels: channels, of: dy, tiling: tiling,
                                         positions: positions, into: padded)
            let full = isFull(tile, pointRowTable)
            let e = padded + tiling.tileOffset(inImage, width: pw), u = t + (tile - first) * 36 * lanes
            let columns = full.column ? 4 : 3
            if full.row {
                for j in 0..<columns {
                    let c = e + j * lanes, o = u + j * lanes
                    let r = outputGradientTransform(load(c, as: V.self), load(c + pw * lanes, as: V.self),
                                                    load(c + 2 * pw * lanes, as: V.self), load(c + 3 * pw * lanes, as: V.self))
                    store(r.0, o); store(r.1, o + 4 * lanes); store(r.2, o + 8 * lanes); store(r.3, o + 12 * lanes)
                    store(r.4, o + 16 * lanes); store(r.5, o + 20 * lanes)
                }
            } else {
                for j in 0..<columns {
                    let c = e + j * lanes, o = u + j * lanes
                    let r = shortOutputGradientTransform(load(c, as: V.self), load(c + pw * lanes, as: V.self),
                                                         load(c + 2 * pw * lanes, as: V.self))
                    store(r.0, o); store(r.1, o + 4 * lanes); store(r.2, o + 8 * lanes); store(r.3, o + 12 * lanes)
                    store(r.4, o + 20 * lanes)
                }
            }
        }
        // dM = t A^T [6, 6], row k of every tile of the run before the next row: six of dM's 36 matrices written
        // at a time.
        for k in 0..<6 {
            for tile in run {
                let (skips, row, rowOfL4) = rowsOfTile(tile, inPointRow: k, pointRowTable)
                if skips { continue }
                let r = t + ((tile - first) * 36 + 4 * k) * lanes
                let e0 = load(r, as: V.self), e1 = load(r + lanes, as: V.self), e2 = load(r + 2 * lanes, as: V.self)
                let d = dm + row * ld + block + 6 * k * pointStride
                if rowOfL4 >= 0 {
                    let g = outputGradientTransform(e0, e1, e2, load(r + 3 * lanes, as: V.self))
                    store(g.0, d); store(g.1, d + pointStride); store(g.2, d + 2 * pointStride)
                    store(g.3, d + 3 * pointStride); store(g.4, dm + rowOfL4 * ld + block + (6 * k + 4) * pointStride)
                    store(g.5, d + 5 * pointStride)
                } else {
                    let g = shortOutputGradientTransform(e0, e1, e2)
                    store(g.0, d); store(g.1, d + pointStride); store(g.2, d + 2 * pointStride)
                    store(g.3, d + 3 * pointStride); store(g.4, d + 5 * pointStride)
                }
            }
        }
    }
}
