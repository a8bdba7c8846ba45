import Synchronization

/// A labelled data set held in memory.
///
/// Features stay in their stored type (uint8 pixels stay uint8: 47 MB for Fashion-MNIST's training set instead
/// of 188 MB as Float) and are converted and normalised only when a batch is gathered.
public struct Dataset: Sendable {
    public enum Features: Sendable {
        case uint8([UInt8])
        case float32([Float])
        /// Raw `.npy` shards mapped read-only: the values stay in the page cache, shared by the ranks of a node.
        case mapped(MappedFeatures)
        /// Rows read on demand (HDF5) into a buffer the size of a batch.
        case reader(StagedReader)

        public var count: Int {
            switch self {
            case .uint8(let v): v.count
            case .float32(let v): v.count
            case .mapped(let m): m.count * m.featureCount
            case .reader(let r): r.reader.count * r.featureCount
            }
        }

        /// How the values are stored.
        public var element: StoredElement {
            switch self {
            case .uint8: .uint8
            case .float32: .float32
            case .mapped(let m): m.element
            case .reader(let r): r.reader.element
            }
        }
    }

    /// For messages, e.g. the file path.
    public let name: String
    /// The labels' file, for messages about labels (the same as `name` when one file holds both).
    public let labelsName: String
    /// Number of samples.
    public let count: Int
    /// Values per sample (784 for 28x28 images).
    public let featureCount: Int
    /// The shape of one sample as stored, its product `featureCount`: [28, 28] for IDX images, [C, H, W] for an
    /// IDX or `.npy` file of shape [N, C, H, W], [D] for one of shape [N, D]. Model files record it.
    public let sampleShape: [Int]
    public let features: Features
    public let labels: [Int32]
    /// Affine normalisation applied while gathering: x_normalised = x * scale + shift, with x the stored value.
    /// Defaults: 1/255 for uint8 (pixels in [0, 1]) and 1 for float32; shift 0.
    public var scale: Double
    public var shift: Double
    /// After `standardize` (or `normalize(like:)` a standardized set): the mean and standard deviation of the
    /// stored values themselves (bytes 0...255 for uint8, not x/255) that `scale` and `shift` divide by, so that
    /// x * scale + shift = (x - mean) / std. `std` is the divisor used: 1/base for constant data. Nil otherwise.
    public private(set) var standardization: (mean: Double, std: Double)?

    /// Validates that there are `featureCount` values for each label and that no label is negative.
    /// - Parameter sampleShape: the shape of one sample (default [featureCount]); its product must be `featureCount`.
    public init(name: String, labelsName: String? = nil, featureCount: Int, sampleShape: [Int]? = nil, features: Features,
                labels: [Int32]) throws {
        guard featureCount > 0 else {
            throw DataError(path: name, reason: "feature count must be positive, got \(featureCount)")
        }
        let sampleShape = sampleShape ?? [featureCount]
        // The product in Double cannot overflow, and is exact for any shape whose elements fit in memory.
        guard sampleShape.allSatisfy({ $0 > 0 }), sampleShape.reduce(1.0, { $0 * Double($1) }) == Double(featureCount) else {
            throw DataError(path: name, reason: "sample shape \(sampleShape) does not hold \(featureCount) features")
        }
        let (expected, overflow) = labels.count.multipliedReportingOverflow(by: featureCount)
        guard !overflow, features.count == expected else {
            throw DataError(
                path: name,
                reason: "\(features.count) feature values do not make \(labels.count) samples of \(featureCount) features")
        }
        if let index = labels.firstIndex(where: { $0 < 0 }) {
            throw DataError(path: labelsName ?? name, reason: "negative label \(labels[index]) at index \(index)")
        }
        self.name = name
        self.labelsName = labelsName ?? name
        self.count = labels.count
        self.featureCount = featureCount
        self.sampleShape = sampleShape
        self.features = features
        self.labels = labels
        scale = features.element == .uint8 ? 1.0 / 255.0 : 1
        shift = 0
    }

    // MARK: - Loading

    /// Loads IDX image and label files (images shaped [N, rows, cols], [N, D] or [N, C, rows, cols]; labels [N]).
    public static func loadIDX(images: String, labels: String) throws -> Dataset {
        let x = try IDX.read(path: images)
        let y = try IDX.read(path: labels)
        guard x.shape.count >= 2 else {
            throw DataError(path: images, reason: "expected images shaped [N, rows, cols] or [N, D], got \(x.shape)")
        }
        try checkLabels(shape: y.shape, path: labels, samples: x.shape[0], samplesPath: images, noun: "images")
        let featureCount = x.shape.dropFirst().reduce(1, *)  // cannot overflow: IDX.read checked the whole product
        return try Dataset(name: images, labelsName: labels, featureCount: featureCount, sampleShape: Array(x.shape.dropFirst()),
                           features: .uint8(x.bytes), labels: y.bytes.map { Int32($0) })
    }

    /// Loads `.npy` features ([N, ...] of uint8, float32, or float64 which is stored as float32) and labels
    /// ([N] of uint8 or int64; int64 labels outside 0...Int32.max are an error). `features` and `labels` may each name
    /// one file, a directory or a glob of shards (`DataFiles`): one labels file per features shard, in the same order,
    /// with one label per sample of its shard; one global sample index runs over the shards in order.
    /// - Parameter mapped: map raw uint8 and float32 files (`MappedFeatures`) instead of reading them; a set with a
    ///   gzip-compressed or float64 file is read into memory.
    public static func loadNPY(features: String, labels: String, mapped: Bool = false) throws -> Dataset {
        let featureFiles = try DataFiles.resolve(features)
        let labelFiles = try DataFiles.resolve(labels)
        guard featureFiles.count == labelFiles.count else {
            throw DataError(path: labels, reason: "names \(labelFiles.count) labels file\(labelFiles.count == 1 ? "" : "s") but "
                + "\(features) names \(featureFiles.count) feature shard\(featureFiles.count == 1 ? "" : "s"): one labels file per shard")
        }
        // Each header read once: whether every file can be mapped, and then how. A bad header is the error it is; only a
        // gzip-compressed file sends the set to be read into memory (discarding every error read a cut 3 GB file whole
        // before it said what was wrong).
        var layouts: [NPYLayout] = []
        if mapped {
            for file in featureFiles {
                do { layouts.append(try NPY.layout(path: file)) } catch let error as DataError where error.reason == NPY.gzipReason {
                    break
                }
            }
        }
        if layouts.count == featureFiles.count && layouts.allSatisfy({ StoredElement($0.dtype) != nil }) {
            let store = try MappedFeatures(paths: featureFiles, layouts: layouts)
            var all: [Int32] = []
            for (shard, labelFile) in zip(store.shards, labelFiles) {
                all += try readLabels(labelFile, samples: shard.rows, samplesPath: shard.path)
            }
            return try Dataset(name: features, labelsName: labels, featureCount: store.featureCount, sampleShape: store.sampleShape,
                               features: .mapped(store), labels: all)
        }
        var shards: [(path: String, array: NPYArray)] = []
        var all: [Int32] = []
        for (featureFile, labelFile) in zip(featureFiles, labelFiles) {
            let x = try NPY.read(path: featureFile)
            guard x.shape.count >= 1 else {
                throw DataError(path: featureFile, reason: "expected features shaped [N, ...], got a 0-d array")
            }
            if let first = shards.first, x.dtypeName != first.array.dtypeName || x.shape.dropFirst() != first.array.shape.dropFirst() {
                throw DataError(path: featureFile, reason: "holds \(x.dtypeName) samples shaped \(Array(x.shape.dropFirst())), but "
                    + "\(first.path) holds \(first.array.dtypeName) samples shaped \(Array(first.array.shape.dropFirst())): every "
                    + "shard of a data set must have the same dtype and sample shape")
            }
            if featureFiles.count > 1 && x.shape[0] == 0 {
                throw DataError(path: featureFile, reason: "is an empty shard: shape \(x.shape) holds no samples")
            }
            all += try readLabels(labelFile, samples: x.shape[0], samplesPath: featureFile)
            shards.append((featureFile, x))
        }
        let shape = shards[0].array.shape
        let featureCount = shape.dropFirst().reduce(1, *)  // cannot overflow: NPY.read checked the whole product
        guard featureCount > 0 else {
            throw DataError(path: featureFiles[0], reason: "samples have no features: shape \(shape)")
        }
        return try Dataset(name: features, labelsName: labels, featureCount: featureCount,
                           sampleShape: shape.count == 1 ? [1] : Array(shape.dropFirst()),
                           features: try concatenated(shards), labels: all)
    }

    /// The shards' values one after another, as stored (float64 as float32).
    private static func concatenated(_ shards: [(path: String, array: NPYArray)]) throws -> Features {
        let parts = try shards.map { try stored($0.array, path: $0.path) }
        guard parts.count > 1 else { return parts[0] }
        // Every shard has the first one's dtype (checked as they were read).
        var bytes: [UInt8] = [], floats: [Float] = []
        for part in parts {
            switch part {
            case .uint8(let v): bytes += v
            case .float32(let v): floats += v
            case .mapped, .reader: preconditionFailure("a shard read into memory")
            }
        }
        return parts[0].element == .uint8 ? .uint8(bytes) : .float32(floats)
    }

    private static func stored(_ x: NPYArray, path: String) throws -> Features {
        switch x.storage {
        case .uint8(let v): .uint8(v)
        case .float32(let v): .float32(v)
        case .float64(let v): .float32(v.map { Float($0) })
        case .int32, .int64:
            throw DataError(path: path, reason: "unsupported feature dtype \(x.dtypeName) (expected uint8, float32 or float64)")
        }
    }

    /// The labels of `path`, one per sample of the `samples` samples of `samplesPath`.
    private static func readLabels(_ path: String, samples: Int, samplesPath: String) throws -> [Int32] {
        let y = try NPY.read(path: path)
        try checkLabels(shape: y.shape, path: path, samples: samples, samplesPath: samplesPath, noun: "samples")
        switch y.storage {
        case .uint8(let v):
            return v.map { Int32($0) }
        case .int64(let v):
            if let index = v.firstIndex(where: { $0 < 0 || $0 > Int64(Int32.max) }) {
                throw DataError(path: path, reason: "label \(v[index]) at index \(index) is outside 0...\(Int32.max)")
            }
            return v.map { Int32($0) }
        case .int32(let v):
            // NumPy's default integer on Windows, and what torch's int32 tensors save as.
            if let index = v.firstIndex(where: { $0 < 0 }) {
                throw DataError(path: path, reason: "label \(v[index]) at index \(index) is outside 0...\(Int32.max)")
            }
            return v
        default:
            throw DataError(path: path, reason: "unsupported label dtype \(y.dtypeName) (expected uint8, int32 or int64)")
        }
    }

    /// Loads an HDF5 data set: `features` and `labels` name `FILE:/DATASET` (`train.h5:/images`, `train.h5:/labels`),
    /// features [N, ...] of uint8, float32 or float64 (read as float32), labels [N] of integers. The features are read
    /// on demand, a batch at a time (`HDF5Rows`); the labels into memory.
    public static func loadHDF5(features: String, labels: String) throws -> Dataset {
        let (file, dataset) = try HDF5.split(features)
        let reader = try HDF5Rows(file: file, dataset: dataset)
        let (labelFile, labelDataset) = try HDF5.split(labels)
        let values = try HDF5.readLabels(file: labelFile, dataset: labelDataset)
        guard values.count == reader.count else {
            throw DataError(path: features, reason: "has \(reader.count) samples but the labels \(labels) have \(values.count)")
        }
        return try Dataset(name: features, labelsName: labels, featureCount: reader.sampleShape.reduce(1, *),
                           sampleShape: reader.sampleShape, features: .reader(StagedReader(reader)), labels: values)
    }

    /// Labels must be one per sample: shaped [N] with N the features' first dimension.
    private static func checkLabels(shape: [Int], path: String, samples: Int, samplesPath: String, noun: String) throws {
        guard shape.count == 1 else {
            throw DataError(path: path, reason: "expected labels shaped [N], got \(shape)")
        }
        guard samples == shape[0] else {
            throw DataError(path: samplesPath, reason: "has \(samples) \(noun) but the labels file \(path) has \(shape[0]) labels")
        }
    }

    // MARK: - Labels

    /// The largest label (-1 for an empty data set).
    /// Bytes the samples and labels occupy in memory.
    public var residentBytes: Double {
        let features: Double = switch self.features {
        case .uint8, .float32: Double(self.features.count * self.features.element.size)
        case .mapped, .reader: 0
        }
        return features + Double(labels.count) * 4
    }

    /// The mapped files and what they were when mapped (none for data held in memory).
    public var mappedFiles: [(path: String, identity: FileIdentity)] {
        if case .mapped(let m) = features { m.shards.map { ($0.path, $0.identity) } } else { [] }
    }

    /// Mapped data: starts reading the samples at `indices` from disk, without waiting (`MappedFeatures.willNeed`), so
    /// that a later batch's pages arrive while this one computes. Nothing for data held in memory.
    public func willNeed(_ indices: UnsafeBufferPointer<Int>) {
        if case .mapped(let m) = features { m.willNeed(indices) }
    }

    /// The file that holds sample `index`: a mapped shard's path, a reader's `FILE:/DATASET`, or the data set's name for
    /// data held in memory.
    public func file(ofSample index: Int) -> String {
        switch features {
        case .mapped(let m) where (0..<count).contains(index): m.shards[m.shardIndex(ofRow: index)].path
        case .reader(let r): r.reader.name
        default: name
        }
    }

    /// Throws, naming the file, when a mapped file is no longer the one that was mapped.
    public func checkUnchanged() throws {
        if case .mapped(let m) = features { try m.checkUnchanged() }
    }

    /// Bytes a reader (HDF5) takes beyond its batches: its caches and its library's buffers, and the block the
    /// statistics and finiteness passes read rows into (0 for other data).
    public var readerWorkingBytes: Double {
        guard case .reader(let r) = features else { return 0 }
        let row = featureCount * r.reader.element.size
        return r.reader.workingBytes + Double(max(row, min(Self.statisticsBlockBytes, Self.statisticsChunkRows * row)))
    }

    /// The most bytes a pass over a reader's rows (`chunkSums`, `byteHistogram`) holds at once, one row at least.
    static let statisticsBlockBytes = 8 << 20

    /// Bytes of mapped files: shared through the page cache by every rank of a node (0 for data held in memory).
    public var mappedBytes: Double {
        if case .mapped(let m) = features { Double(m.mappedBytes) } else { 0 }
    }

    public var maxLabel: Int32 { labels.max() ?? -1 }

    /// Number of classes implied by the labels: max label + 1.
    public var classCount: Int { Int(maxLabel) + 1 }

    /// Throws if any label is >= `classCount`, naming the file, the first offending index and its value.
    public func validateLabels(classCount: Int) throws {
        if let index = labels.firstIndex(where: { Int($0) >= classCount }) {
            throw DataError(
                path: labelsName,
                reason: "label \(labels[index]) at index \(index) is out of range for \(classCount) classes (0...\(classCount - 1))")
        }
    }

    // MARK: - Normalisation

    /// Rows per chunk of the statistics: fixed, so that chunk sums are added in the same order however many ranks
    /// compute them, and N ranks standardise exactly as one does.
    public static let statisticsChunkRows = 4096
    public var statisticsChunks: Int { (count + Self.statisticsChunkRows - 1) / Self.statisticsChunkRows }

    /// Sets `scale` and `shift` so that gathered features have mean 0 and standard deviation 1 over the whole
    /// data set, and returns the mean and (population) standard deviation they had before, i.e. of the values
    /// as gathered with the default scale: x/255 for uint8 (computed exactly from a histogram), x for float32.
    /// Constant data only has its mean removed (a standard deviation of 0 is treated as 1). This process computes
    /// every chunk; a job splits them over its ranks with the same parts (`byteHistogram`, `chunkSums`).
    @discardableResult
    public mutating func standardize() throws -> (mean: Double, std: Double) {
        let all = 0..<statisticsChunks
        switch features.element {
        case .uint8:
            return standardize(histogram: try byteHistogram(chunks: all))
        case .float32:
            let n = Double(features.count)
            let sums = try chunkSums(chunks: all, center: 0, squared: false)
            try requireFinite(chunkSums: sums)
            let mean = n > 0 ? sums.reduce(0, +) / n : 0
            let variance = n > 0 ? try chunkSums(chunks: all, center: mean, squared: true).reduce(0, +) / n : 0
            return standardize(mean: mean, variance: variance)
        }
    }

    /// uint8 features: how often each byte value occurs in the rows of `chunks`.
    public func byteHistogram(chunks: some Sequence<Int>) throws -> [Int64] {
        precondition(features.element == .uint8, "byteHistogram of \(features.element) features")
        var histogram = [Int64](repeating: 0, count: 256)
        try histogram.withUnsafeMutableBufferPointer { h in
            for chunk in chunks {
                try forEachRow(of: chunk) { row in
                    let values = row.assumingMemoryBound(to: UInt8.self)
                    for j in 0..<featureCount { h[Int(values[j])] += 1 }
                }
            }
        }
        return histogram
    }

    /// float32 features: throws naming the first sample that holds a NaN or an infinity, when the sums of the
    /// values per chunk (`chunkSums` with center 0) say that one does (no sum of finite Floats overflows a Double).
    /// Its statistics would not be finite, and every value standardised with them would be NaN.
    public func requireFinite(chunkSums sums: [Double]) throws {
        guard let chunk = sums.firstIndex(where: { !$0.isFinite }) else { return }
        var sample = chunk * Self.statisticsChunkRows
        var found: (sample: Int, position: Int, value: Float)? = nil
        try forEachRow(of: chunk) { row in
            let values = row.assumingMemoryBound(to: Float.self)
            if found == nil, let j = (0..<featureCount).first(where: { !values[$0].isFinite }) { found = (sample, j, values[j]) }
            sample += 1
        }
        guard let found else { throw DataError(path: name, reason: "samples from \(chunk * Self.statisticsChunkRows) on sum to \(sums[chunk])") }
        // The file that holds it: a shard of a series, not the pattern that names them all.
        let file = self.file(ofSample: found.sample)
        throw DataError(path: file, reason: "sample \(found.sample)\(file == name ? "" : " of \(name)") holds \(found.value) "
            + "(its value \(found.position)): the data must be finite numbers")
    }

    /// Throws naming the first sample that holds a NaN or an infinity, reading every float32 value once (in one
    /// process; a data-parallel job splits the chunks over its ranks, `chunkSums` and `requireFinite(chunkSums:)`).
    /// Bytes are always finite.
    public func requireFinite() throws {
        guard features.element == .float32 else { return }
        try requireFinite(chunkSums: chunkSums(chunks: 0..<statisticsChunks, center: 0, squared: false))
    }

    /// float32 features: for each chunk c of `chunks`, the sum over its values of (x - center), or of its square,
    /// at index c of the result (0 elsewhere), summed in Double in row order.
    public func chunkSums(chunks: some Sequence<Int>, center: Double, squared: Bool) throws -> [Double] {
        precondition(features.element == .float32, "chunkSums of \(features.element) features")
        var sums = [Double](repeating: 0, count: statisticsChunks)
        for chunk in chunks {
            var sum = 0.0
            try forEachRow(of: chunk) { row in
                let values = row.assumingMemoryBound(to: Float.self)
                if squared {
                    for j in 0..<featureCount {
                        let d = Double(values[j]) - center
                        sum += d * d
                    }
                } else {
                    for j in 0..<featureCount { sum += Double(values[j]) - center }
                }
            }
            sums[chunk] = sum
        }
        return sums
    }

    /// The rows of statistics chunk `chunk`, in order.
    private func forEachRow(of chunk: Int, _ body: (UnsafeRawPointer) -> Void) throws {
        let rows = (chunk * Self.statisticsChunkRows)..<min(count, (chunk + 1) * Self.statisticsChunkRows)
        switch features {
        case .reader(let reader):
            // In blocks of at most `statisticsBlockBytes`, in row order: a chunk of 4,096 rows at once took 1.2 GiB for
            // 3x160x160 float images, past what the memory check had counted.
            let bytes = featureCount * reader.reader.element.size
            let blockRows = max(1, min(rows.count, Self.statisticsBlockBytes / max(1, bytes)))
            let block = UnsafeMutableRawPointer.allocate(byteCount: max(1, blockRows * bytes), alignment: 16)
            defer { block.deallocate() }
            for first in stride(from: rows.lowerBound, to: rows.upperBound, by: blockRows) {
                let part = first..<min(rows.upperBound, first + blockRows)
                try reader.reader.read(range: part, into: block)
                for i in 0..<part.count { body(block + i * bytes) }
            }
        case .uint8(let values):
            values.withUnsafeBytes { bytes in for i in rows { body(bytes.baseAddress! + i * featureCount) } }
        case .float32(let values):
            values.withUnsafeBytes { bytes in for i in rows { body(bytes.baseAddress! + i * featureCount * 4) } }
        case .mapped(let mapped):
            // The chunk in large reads, not page by page (readahead is off for the shuffled steps).
            mapped.willNeed(rows: rows)
            for i in rows { body(mapped.row(i)) }
        }
    }

    /// Standardises uint8 features from the histogram of every stored byte (exact).
    @discardableResult
    public mutating func standardize(histogram: [Int64]) -> (mean: Double, std: Double) {
        let n = Double(histogram.reduce(0, +))
        var sum = 0.0
        for (v, k) in histogram.enumerated() { sum += Double(v) / 255.0 * Double(k) }
        let mean = n > 0 ? sum / n : 0
        var squares = 0.0
        for (v, k) in histogram.enumerated() {
            let d = Double(v) / 255.0 - mean
            squares += d * d * Double(k)
        }
        return standardize(base: 1.0 / 255.0, mean: mean, variance: n > 0 ? squares / n : 0)
    }

    /// Standardises float32 features from the mean and (population) variance of every stored value.
    @discardableResult
    public mutating func standardize(mean: Double, variance: Double) -> (mean: Double, std: Double) {
        standardize(base: 1, mean: mean, variance: variance)
    }

    /// `base`: the default scale, the statistics being of x * base.
    private mutating func standardize(base: Double, mean: Double, variance: Double) -> (mean: Double, std: Double) {
        let std = variance.squareRoot()
        let divisor = std > 0 ? std : 1
        scale = base / divisor
        shift = -mean / divisor
        standardization = (mean / base, divisor / base)
        return (mean, std)
    }

    /// Uses another data set's normalisation (the test set uses the training set's statistics).
    /// Both must store features in the same units, as they do when loaded from the same format.
    public mutating func normalize(like other: Dataset) {
        scale = other.scale
        shift = other.shift
        standardization = other.standardization
    }

    // MARK: - Batches

    /// Gathers the samples at `indices` into `inputs` (row-major [indices.count, featureCount]) applying the
    /// normalisation, and their labels into `labels`. Allocates nothing: this runs in every training step.
    /// An index outside 0..<count is a programmer error and stops the process.
    @_specialize(where T == Float)
    @_specialize(where T == Double)
    ///
    /// With `augmentation` (training batches only), each sample is cropped, flipped and erased as drawn for
    /// (`augmentation.seed`, `epoch`, its index) before the normalisation; see `Augmentation`.
    ///
    /// With `cursor`, the sample being read is published as the gather goes (per sample from mapped files), so that a
    /// watchdog can name the file of a read that stalls (`file(ofSample:)`).
    public func gather<T: BinaryFloatingPoint>(
        indices: UnsafeBufferPointer<Int>, into inputs: UnsafeMutablePointer<T>, labels: UnsafeMutablePointer<Int32>,
        augmentation: Augmentation? = nil, epoch: Int = 0, cursor: ReadCursor? = nil
    ) throws {
        guard !indices.isEmpty else { return }
        cursor?.sample.store(indices[0], ordering: .relaxed)
        let count = self.count
        // Labels first: this also range-checks every index once, before the feature loops trust them.
        self.labels.withUnsafeBufferPointer { source in
            for (row, index) in indices.enumerated() {
                precondition(index >= 0 && index < count, "gather: index \(index) out of range 0..<\(count) in \(name)")
                labels[row] = source[index]
            }
        }
        if let augmentation {
            precondition(augmentation.channels * augmentation.height * augmentation.width == featureCount,
                         "gather: augmentation for \(augmentation.channels)x\(augmentation.height)x\(augmentation.width) "
                            + "images, but \(name) has \(featureCount) features")
        }
        let normalization = Normalization(scale: scale, shift: shift, augmentation: augmentation, epoch: epoch)
        switch features {
        case .uint8(let values):
            values.withUnsafeBufferPointer {
                gatherRows(ContiguousRows(base: $0.baseAddress!, featureCount: featureCount), featureCount, indices, inputs, normalization)
            }
        case .float32(let values):
            values.withUnsafeBufferPointer {
                gatherRows(ContiguousRows(base: $0.baseAddress!, featureCount: featureCount), featureCount, indices, inputs, normalization)
            }
        case .mapped(let mapped):
            switch mapped.element {
            case .uint8: gatherRows(MappedRows<UInt8>(features: mapped, cursor: cursor), featureCount, indices, inputs, normalization)
            case .float32: gatherRows(MappedRows<Float>(features: mapped, cursor: cursor), featureCount, indices, inputs, normalization)
            }
        case .reader(let reader):
            let staged = try reader.stage(indices)
            switch reader.reader.element {
            case .uint8: gatherRows(StagedRows<UInt8>(base: staged, featureCount: featureCount), featureCount, indices, inputs, normalization)
            case .float32: gatherRows(StagedRows<Float>(base: staged, featureCount: featureCount), featureCount, indices, inputs, normalization)
            }
        }
    }
}

/// Where the stored values of the `position`-th sample of a batch, sample `index`, start: in one array, in a mapped
/// shard, or in the batch a reader staged.
private protocol SampleRows {
    associatedtype Value
    func row(_ position: Int, _ index: Int) -> UnsafePointer<Value>
}

private struct ContiguousRows<Value>: SampleRows {
    let base: UnsafePointer<Value>
    let featureCount: Int
    @inline(__always) func row(_ position: Int, _ index: Int) -> UnsafePointer<Value> { base + index * featureCount }
}

private struct MappedRows<Value>: SampleRows {
    let features: MappedFeatures
    let cursor: ReadCursor?
    @inline(__always) func row(_ position: Int, _ index: Int) -> UnsafePointer<Value> {
        cursor?.sample.store(index, ordering: .relaxed)  // a page fault may block here: say where
        return features.row(index).assumingMemoryBound(to: Value.self)
    }
}

private struct StagedRows<Value>: SampleRows {
    let base: UnsafeRawPointer
    let featureCount: Int
    @inline(__always) func row(_ position: Int, _ index: Int) -> UnsafePointer<Value> {
        base.assumingMemoryBound(to: Value.self) + position * featureCount
    }
}

/// The affine map x * scale + shift, and the augmentation drawn per (epoch, sample) when there is one.
private struct Normalization {
    let scale: Double
    let shift: Double
    let augmentation: Augmentation?
    let epoch: Int
}

// The element loops: one per stored type, generic over where rows come from and specialised at their call sites
// (an unspecialised generic loop runs ~70x slower). The affine map is computed in Double and rounded once to T, so
// Float and Double batches agree to Float precision. Augmented rows take the same arithmetic per element, the padding
// being the stored value 0 normalised like any other.

private func gatherRows<Rows: SampleRows, T: BinaryFloatingPoint>(
    _ rows: Rows, _ featureCount: Int, _ indices: UnsafeBufferPointer<Int>, _ destination: UnsafeMutablePointer<T>,
    _ normalization: Normalization
) where Rows.Value == UInt8 {
    // A byte has 256 values: map each once (same arithmetic, so the same results) and look the rows up instead of
    // converting every element through Double (a sixth faster, BENCHMARKS.md, "Measurements behind comments in the
    // code"; the rest is fetching random rows from memory). The table lives on the stack: no allocation.
    withUnsafeTemporaryAllocation(of: T.self, capacity: 256) { table in
        for v in 0..<256 { table[v] = T(Double(v) * normalization.scale + normalization.shift) }
        let map = UnsafePointer(table.baseAddress!)
        var out = destination
        if let augmentation = normalization.augmentation {
            for (position, index) in indices.enumerated() {
                augmentation.apply(augmentation.draw(epoch: normalization.epoch, index: index), from: rows.row(position, index), into: out,
                                   padding: map[0], erased: 0) { map[Int($0)] }
                out += featureCount
            }
            return
        }
        for (position, index) in indices.enumerated() {
            let row = rows.row(position, index)
            var j = 0
            while j < featureCount {
                out[j] = map[Int(row[j])]
                j &+= 1
            }
            out += featureCount
        }
    }
}

private func gatherRows<Rows: SampleRows, T: BinaryFloatingPoint>(
    _ rows: Rows, _ featureCount: Int, _ indices: UnsafeBufferPointer<Int>, _ destination: UnsafeMutablePointer<T>,
    _ normalization: Normalization
) where Rows.Value == Float {
    let scale = normalization.scale, shift = normalization.shift
    var out = destination
    if let augmentation = normalization.augmentation {
        let padding = T(shift)  // the stored value 0 normalised: 0 * scale + shift
        for (position, index) in indices.enumerated() {
            augmentation.apply(augmentation.draw(epoch: normalization.epoch, index: index), from: rows.row(position, index), into: out,
                               padding: padding, erased: 0) { T(Double($0) * scale + shift) }
            out += featureCount
        }
        return
    }
    for (position, index) in indices.enumerated() {
        let row = rows.row(position, index)
        for j in 0..<featureCount {
            out[j] = T(Double(row[j]) * scale + shift)
        }
        out += featureCount
    }
}
