/// A labelled data set held in memory.
///
/// Features stay in their stored type (uint8 pixels stay uint8: 47 MB for Fashion-MNIST's training set instead
/// of 188 MB as Float) and are converted and normalised only when a batch is gathered.
public struct Dataset: Sendable {
    public enum Features: Sendable {
        case uint8([UInt8])
        case float32([Float])

        public var count: Int {
            switch self {
            case .uint8(let v): v.count
            case .float32(let v): v.count
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
        switch features {
        case .uint8: scale = 1.0 / 255.0
        case .float32: scale = 1
        }
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
    /// ([N] of uint8 or int64; int64 labels outside 0...Int32.max are an error).
    public static func loadNPY(features: String, labels: String) throws -> Dataset {
        let x = try NPY.read(path: features)
        let y = try NPY.read(path: labels)
        guard x.shape.count >= 1 else {
            throw DataError(path: features, reason: "expected features shaped [N, ...], got a 0-d array")
        }
        try checkLabels(shape: y.shape, path: labels, samples: x.shape[0], samplesPath: features, noun: "samples")
        let stored: Features
        switch x.storage {
        case .uint8(let v): stored = .uint8(v)
        case .float32(let v): stored = .float32(v)
        case .float64(let v): stored = .float32(v.map { Float($0) })
        case .int64:
            throw DataError(path: features, reason: "unsupported feature dtype int64 (expected uint8, float32 or float64)")
        }
        let labelValues: [Int32]
        switch y.storage {
        case .uint8(let v):
            labelValues = v.map { Int32($0) }
        case .int64(let v):
            if let index = v.firstIndex(where: { $0 < 0 || $0 > Int64(Int32.max) }) {
                throw DataError(path: labels, reason: "label \(v[index]) at index \(index) is outside 0...\(Int32.max)")
            }
            labelValues = v.map { Int32($0) }
        default:
            throw DataError(path: labels, reason: "unsupported label dtype \(y.dtypeName) (expected uint8 or int64)")
        }
        let featureCount = x.shape.dropFirst().reduce(1, *)  // cannot overflow: NPY.read checked the whole product
        guard featureCount > 0 else {
            throw DataError(path: features, reason: "samples have no features: shape \(x.shape)")
        }
        return try Dataset(name: features, labelsName: labels, featureCount: featureCount,
                           sampleShape: x.shape.count == 1 ? [1] : Array(x.shape.dropFirst()), features: stored, labels: labelValues)
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
        let perValue = switch features {
        case .uint8: 1.0
        case .float32: 4.0
        }
        return Double(features.count) * perValue + Double(labels.count) * 4
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

    /// Sets `scale` and `shift` so that gathered features have mean 0 and standard deviation 1 over the whole
    /// data set, and returns the mean and (population) standard deviation they had before, i.e. of the values
    /// as gathered with the default scale: x/255 for uint8 (computed exactly from a histogram), x for float32.
    /// Constant data only has its mean removed (a standard deviation of 0 is treated as 1).
    @discardableResult
    public mutating func standardize() -> (mean: Double, std: Double) {
        let base: Double  // the default scale: statistics are of x * base
        let mean: Double
        let variance: Double
        switch features {
        case .uint8(let values):
            base = 1.0 / 255.0
            var histogram = [Int](repeating: 0, count: 256)
            values.withUnsafeBufferPointer { v in
                histogram.withUnsafeMutableBufferPointer { h in
                    for x in v { h[Int(x)] += 1 }
                }
            }
            let n = Double(values.count)
            var sum = 0.0
            for (v, k) in histogram.enumerated() { sum += Double(v) / 255.0 * Double(k) }
            mean = values.isEmpty ? 0 : sum / n
            var squares = 0.0
            for (v, k) in histogram.enumerated() {
                let d = Double(v) / 255.0 - mean
                squares += d * d * Double(k)
            }
            variance = values.isEmpty ? 0 : squares / n
        case .float32(let values):
            base = 1
            // Two passes in Double: the one-pass formula loses digits when the mean is large.
            (mean, variance) = values.withUnsafeBufferPointer { v -> (Double, Double) in
                guard !v.isEmpty else { return (0, 0) }
                var sum = 0.0
                for x in v { sum += Double(x) }
                let m = sum / Double(v.count)
                var squares = 0.0
                for x in v {
                    let d = Double(x) - m
                    squares += d * d
                }
                return (m, squares / Double(v.count))
            }
        }
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
    /// With `augmentation` (training batches only), each sample is cropped and flipped as drawn for
    /// (`augmentation.seed`, `epoch`, its index) before the normalisation; see `Augmentation`.
    public func gather<T: BinaryFloatingPoint>(
        indices: UnsafeBufferPointer<Int>, into inputs: UnsafeMutablePointer<T>, labels: UnsafeMutablePointer<Int32>,
        augmentation: Augmentation? = nil, epoch: Int = 0
    ) {
        guard !indices.isEmpty else { return }
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
            switch features {
            case .uint8(let values):
                values.withUnsafeBufferPointer {
                    gatherAugmentedRows($0.baseAddress!, featureCount, indices, inputs, scale, shift, augmentation, epoch)
                }
            case .float32(let values):
                values.withUnsafeBufferPointer {
                    gatherAugmentedRows($0.baseAddress!, featureCount, indices, inputs, scale, shift, augmentation, epoch)
                }
            }
            return
        }
        switch features {
        case .uint8(let values):
            values.withUnsafeBufferPointer {
                gatherRows($0.baseAddress!, featureCount, indices, inputs, scale, shift)
            }
        case .float32(let values):
            values.withUnsafeBufferPointer {
                gatherRows($0.baseAddress!, featureCount, indices, inputs, scale, shift)
            }
        }
    }
}

// The element loops: one per stored type, specialised for both destination types because an unspecialised
// generic loop reached from another module runs ~70x slower. The affine map is computed in Double and
// rounded once to T, so Float and Double batches agree to Float precision.

@_specialize(where T == Float)
@_specialize(where T == Double)
private func gatherRows<T: BinaryFloatingPoint>(
    _ source: UnsafePointer<UInt8>, _ featureCount: Int, _ indices: UnsafeBufferPointer<Int>,
    _ destination: UnsafeMutablePointer<T>, _ scale: Double, _ shift: Double
) {
    // A byte has 256 values: map each once (same arithmetic, so the same results) and look the rows up instead of
    // converting every element through Double (a sixth faster, BENCHMARKS.md, "Measurements behind comments in the
    // code"; the rest is fetching random rows from memory). The table lives on the stack: no allocation.
    withUnsafeTemporaryAllocation(of: T.self, capacity: 256) { table in
        for v in 0..<256 { table[v] = T(Double(v) * scale + shift) }
        let map = UnsafePointer(table.baseAddress!)
        var out = destination
        for index in indices {
            let row = source + index * featureCount
            var j = 0
            while j < featureCount {
                out[j] = map[Int(row[j])]
                j &+= 1
            }
            out += featureCount
        }
    }
}

@_specialize(where T == Float)
@_specialize(where T == Double)
private func gatherRows<T: BinaryFloatingPoint>(
    _ source: UnsafePointer<Float>, _ featureCount: Int, _ indices: UnsafeBufferPointer<Int>,
    _ destination: UnsafeMutablePointer<T>, _ scale: Double, _ shift: Double
) {
    var out = destination
    for index in indices {
        let row = source + index * featureCount
        for j in 0..<featureCount {
            out[j] = T(Double(row[j]) * scale + shift)
        }
        out += featureCount
    }
}

// Augmented gathers: the same arithmetic per element as above (bytes through the table, floats through Double), the
// padding being the stored value 0 normalised like any other.

@_specialize(where T == Float)
@_specialize(where T == Double)
private func gatherAugmentedRows<T: BinaryFloatingPoint>(
    _ source: UnsafePointer<UInt8>, _ featureCount: Int, _ indices: UnsafeBufferPointer<Int>,
    _ destination: UnsafeMutablePointer<T>, _ scale: Double, _ shift: Double, _ augmentation: Augmentation, _ epoch: Int
) {
    withUnsafeTemporaryAllocation(of: T.self, capacity: 256) { table in
        for v in 0..<256 { table[v] = T(Double(v) * scale + shift) }
        let map = UnsafePointer(table.baseAddress!)
        var out = destination
        for index in indices {
            augmentation.apply(augmentation.draw(epoch: epoch, index: index), from: source + index * featureCount, into: out,
                               padding: map[0]) { map[Int($0)] }
            out += featureCount
        }
    }
}

@_specialize(where T == Float)
@_specialize(where T == Double)
private func gatherAugmentedRows<T: BinaryFloatingPoint>(
    _ source: UnsafePointer<Float>, _ featureCount: Int, _ indices: UnsafeBufferPointer<Int>,
    _ destination: UnsafeMutablePointer<T>, _ scale: Double, _ shift: Double, _ augmentation: Augmentation, _ epoch: Int
) {
    var out = destination
    let padding = T(shift)  // the stored value 0 normalised: 0 * scale + shift
    for index in indices {
        augmentation.apply(augmentation.draw(epoch: epoch, index: index), from: source + index * featureCount, into: out,
                           padding: padding) { T(Double($0) * scale + shift) }
        out += featureCount
    }
}
