import Engine
import Foundation
import Synchronization
import Testing

/// The background gather (`BatchPrefetcher`) against gathering in the step: the same batches, bit for bit, from every
/// kind of storage, at every depth, from any starting step, over epochs; a batch that cannot be read fails its own
/// step with the reader's error; a stalled read is named by the cursor; closing never waits for more than one batch.
@Suite("Prefetching batches on a background thread")
struct PrefetchTests {
    let directory: TemporaryDirectory

    init() throws { directory = try TemporaryDirectory() }

    /// 203 samples of 2x5x5 as uint8 and float32, one file and three shards, written by NumPy.
    func write() throws {
        try FileManager.default.createDirectory(atPath: directory.file("shards"), withIntermediateDirectories: true)
        _ = try runPython("""
            import numpy as np, sys
            d = sys.argv[1]; rng = np.random.default_rng(11)
            x8 = rng.integers(0, 256, size=(203, 2, 5, 5)).astype(np.uint8)
            xf = rng.normal(1, 3, size=(203, 2, 5, 5)).astype(np.float32)
            y = rng.integers(0, 7, size=203).astype(np.int64)
            np.save(d + '/x8.npy', x8); np.save(d + '/xf.npy', xf); np.save(d + '/y.npy', y)
            for i, (a, b) in enumerate([(0, 70), (70, 71), (71, 203)]):
                np.save(f'{d}/shards/x-{i:05d}-of-00003.npy', xf[a:b]); np.save(f'{d}/shards/y-{i:05d}-of-00003.npy', y[a:b])
            """, arguments: [directory.path])
    }

    func datasets() throws -> [(String, Dataset)] {
        var uint8 = try Dataset.loadNPY(features: directory.file("x8.npy"), labels: directory.file("y.npy"))
        var float32 = try Dataset.loadNPY(features: directory.file("xf.npy"), labels: directory.file("y.npy"))
        var mapped = try Dataset.loadNPY(features: directory.file("shards/x-*.npy"), labels: directory.file("shards/y-*.npy"), mapped: true)
        var reader = try Dataset(name: "rows", featureCount: float32.featureCount, sampleShape: float32.sampleShape,
                                 features: .reader(StagedReader(ArrayRows(float32))), labels: float32.labels)
        try uint8.standardize()
        try float32.standardize()
        try mapped.standardize()
        try reader.standardize()
        return [("uint8", uint8), ("float32", float32), ("mapped shards", mapped), ("reader", reader)]
    }

    /// Step `step`'s batch gathered directly, as a step without prefetching gathers it.
    func direct(_ data: Dataset, _ indices: [Int], step: Int, batch: Int, augmentation: Augmentation?, epoch: Int)
        throws -> ([Float], [Int32]) {
        var inputs = [Float](repeating: .nan, count: batch * data.featureCount)
        var labels = [Int32](repeating: -1, count: batch)
        try indices[(step * batch)..<((step + 1) * batch)].withUnsafeBufferPointer {
            try data.gather(indices: $0, into: &inputs, labels: &labels, augmentation: augmentation, epoch: epoch)
        }
        return (inputs, labels)
    }

    @Test(arguments: [0, 1, 3, 8])
    func batchesEqualGatheringInTheStep(depth: Int) throws {
        try write()
        let batch = 16, steps = 12
        let augmentation = try Augmentation(cropPadding: 1, flip: true, erase: 0.5, seed: 9, sampleShape: [2, 5, 5])
        for (name, data) in try datasets() {
            let seen = Steps()
            let prefetcher = BatchPrefetcher(dataset: data, batchSize: batch, stepsPerEpoch: steps, depth: depth,
                                             augmentation: augmentation, beforeRead: { step in seen.append(step) })
            var inputs = [Float](repeating: .nan, count: batch * data.featureCount)
            var labels = [Int32](repeating: -1, count: batch)
            // Two epochs of 12 steps (with repeats, as a wrapped remainder has), the second resumed at step 5.
            for (epoch, firstStep, globalStep) in [(0, 0, 0), (1, 5, 17)] {
                var generator = RandomGenerator(seed: 4, stream: UInt64(epoch))
                let indices = Array((generator.permutation(203) + Array(0..<203)).prefix(steps * batch))
                // Gathered first: a reader's staging buffer serves one gather at a time, and the thread is gathering.
                let expected = try (firstStep..<steps).map {
                    try direct(data, indices, step: $0, batch: batch, augmentation: augmentation, epoch: epoch)
                }
                indices.withUnsafeBufferPointer {
                    prefetcher.begin(epoch: epoch, indices: $0, firstStep: firstStep, globalStep: globalStep)
                }
                for step in firstStep..<steps {
                    try prefetcher.take(step: step, into: &inputs, labels: &labels)
                    let (x, y) = expected[step - firstStep]
                    #expect(inputs.map(\.bitPattern) == x.map(\.bitPattern) && labels == y, "\(name), depth \(depth), epoch \(epoch) step \(step)")
                }
            }
            prefetcher.close()
            // Every batch read once, announced with its global step, in order.
            #expect(seen.all == Array(0..<12) + Array(17..<24), "\(name), depth \(depth)")
        }
    }

    /// A batch that cannot be read fails its own step, with the reader's error; the batches before it arrive.
    @Test func aReadErrorFailsItsOwnStep() throws {
        try write()
        let float32 = try Dataset.loadNPY(features: directory.file("xf.npy"), labels: directory.file("y.npy"))
        let rows = ArrayRows(float32, failing: 100)
        let data = try Dataset(name: "rows", featureCount: float32.featureCount, sampleShape: float32.sampleShape,
                               features: .reader(StagedReader(rows)), labels: float32.labels)
        let prefetcher = BatchPrefetcher(dataset: data, batchSize: 10, stepsPerEpoch: 20, depth: 4, augmentation: nil)
        var inputs = [Float](repeating: 0, count: 10 * data.featureCount), labels = [Int32](repeating: 0, count: 10)
        Array(0..<200).withUnsafeBufferPointer { prefetcher.begin(epoch: 0, indices: $0, firstStep: 0, globalStep: 0) }
        for step in 0..<10 { try prefetcher.take(step: step, into: &inputs, labels: &labels) }
        #expect(throws: DataError.self) { try prefetcher.take(step: 10, into: &inputs, labels: &labels) }
        do {
            try prefetcher.take(step: 10, into: &inputs, labels: &labels)
        } catch {
            #expect("\(error)".contains("row 100 is damaged"), "\(error)")
        }
    }

    /// The gathering thread runs ahead by `depth` batches and no further, and a read that stalls is named by the cursor:
    /// the sample, and through `file(ofSample:)` the shard holding it.
    @Test func theThreadRunsDepthAheadAndTheCursorNamesAStalledRead() throws {
        try write()
        let mapped = try Dataset.loadNPY(features: directory.file("shards/x-*.npy"), labels: directory.file("shards/y-*.npy"), mapped: true)
        let cursor = ReadCursor()
        let release = Flag()
        let gathered = Steps()
        let prefetcher = BatchPrefetcher(dataset: mapped, batchSize: 1, stepsPerEpoch: 203, depth: 3, augmentation: nil, cursor: cursor,
                                         beforeRead: { step in
                                             while step == 6 && !release.value.load(ordering: .relaxed) { usleep(1000) }
                                         })
        prefetcher.observeGathered { step in gathered.append(step) }
        // Sample 70 is the middle shard's only sample: step 6 reads it.
        let indices = [5, 6, 7, 8, 9, 10, 70, 202]
        var inputs = [Float](repeating: 0, count: mapped.featureCount), labels: [Int32] = [0]
        indices.withUnsafeBufferPointer { prefetcher.begin(epoch: 0, indices: $0, firstStep: 0, globalStep: 0) }
        try prefetcher.take(step: 0, into: &inputs, labels: &labels)
        usleep(200_000)
        // Step 0 taken: steps 1...3 gathered, and not step 4 (its slot holds step 1).
        #expect(gathered.all == [0, 1, 2, 3])
        for step in 1...5 { try prefetcher.take(step: step, into: &inputs, labels: &labels) }
        usleep(200_000)
        #expect(cursor.sample.load(ordering: .relaxed) == 70)
        #expect(mapped.file(ofSample: 70) == directory.file("shards/x-00001-of-00003.npy"))
        release.value.store(true, ordering: .relaxed)
        try prefetcher.take(step: 6, into: &inputs, labels: &labels)
        #expect(labels[0] == mapped.labels[70])
        prefetcher.close()
        #expect(gathered.all == Array(0..<8))
    }
}

/// A `RowReader` over a data set held in memory, optionally failing on one row: the reader kind (HDF5's) without a file.
final class ArrayRows: RowReader, @unchecked Sendable {
    let name = "rows"
    let count: Int
    let sampleShape: [Int]
    let element = StoredElement.float32
    let workingBytes = 0.0
    private let values: [Float]
    private let failing: Int?

    init(_ data: Dataset, failing: Int? = nil) {
        guard case .float32(let values) = data.features else { preconditionFailure("float32 features") }
        self.values = values
        count = data.count
        sampleShape = data.sampleShape
        self.failing = failing
    }

    func read(rows: UnsafeBufferPointer<Int>, into destination: UnsafeMutableRawPointer) throws {
        let width = sampleShape.reduce(1, *)
        for (k, row) in rows.enumerated() {
            if row == failing { throw DataError(path: name, reason: "row \(row) is damaged") }
            values.withUnsafeBufferPointer {
                (destination + k * width * 4).copyMemory(from: $0.baseAddress! + row * width, byteCount: width * 4)
            }
        }
    }

    func read(range: Range<Int>, into destination: UnsafeMutableRawPointer) throws {
        try Array(range).withUnsafeBufferPointer { try read(rows: $0, into: destination) }
    }
}

/// Steps recorded from another thread.
final class Steps: Sendable {
    private let steps = Mutex<[Int]>([])
    func append(_ step: Int) { steps.withLock { $0.append(step) } }
    var all: [Int] { steps.withLock { $0 } }
}

final class Flag: Sendable {
    let value = Atomic<Bool>(false)
}
