import Engine
import Foundation
import Testing

/// Mapped `.npy` files and sharded data sets (NumPy writes every file): what a run gathers from them is what the
/// in-memory reader gathers from one file, value for value, and every way a shard set can be wrong is one error
/// naming the file.
@Suite("Mapped and sharded data")
struct MappedDataTests {
    let directory: TemporaryDirectory

    init() throws { directory = try TemporaryDirectory() }

    /// NumPy writes `x.npy`/`y.npy` (n samples of `shape`, dtype) and the same arrays cut at `cuts` into numbered
    /// shards `x-0000k-of-0000K.npy` / `y-...` under `shards/`.
    func write(n: Int, shape: [Int], dtype: String, cuts: [Int]) throws {
        try FileManager.default.createDirectory(atPath: directory.file("shards"), withIntermediateDirectories: true)
        _ = try runPython("""
            import numpy as np, sys
            d, n, dtype = sys.argv[1], int(sys.argv[2]), sys.argv[3]
            shape = [int(v) for v in sys.argv[4].split(',')]
            cuts = [0] + [int(v) for v in sys.argv[5].split(',')] + [n]
            rng = np.random.default_rng(7)
            x = (rng.integers(0, 256, size=[n] + shape) if dtype == 'uint8' else rng.normal(3, 2, size=[n] + shape)).astype(dtype)
            y = rng.integers(0, 5, size=n).astype(np.int64)
            np.save(d + '/x.npy', x); np.save(d + '/y.npy', y)
            k = len(cuts) - 1
            for i in range(k):
                np.save(f'{d}/shards/x-{i:05d}-of-{k:05d}.npy', x[cuts[i]:cuts[i + 1]])
                np.save(f'{d}/shards/y-{i:05d}-of-{k:05d}.npy', y[cuts[i]:cuts[i + 1]].astype(np.uint8))
            """, arguments: [directory.path, "\(n)", dtype, shape.map(String.init).joined(separator: ","),
                             cuts.map(String.init).joined(separator: ",")])
    }

    func gathered(_ data: Dataset, _ indices: [Int], augmentation: Augmentation? = nil, epoch: Int = 0) -> ([Float], [Int32]) {
        var inputs = [Float](repeating: .nan, count: indices.count * data.featureCount)
        var labels = [Int32](repeating: -1, count: indices.count)
        indices.withUnsafeBufferPointer { i in
            try! data.gather(indices: i, into: &inputs, labels: &labels, augmentation: augmentation, epoch: epoch)
        }
        return (inputs, labels)
    }

    @Test(arguments: ["uint8", "float32"])
    func sevenUnevenMappedShardsGatherWhatOneFileInMemoryGathers(dtype: String) throws {
        try write(n: 600, shape: [1, 6, 6], dtype: dtype, cuts: [1, 90, 91, 250, 400, 599])
        var one = try Dataset.loadNPY(features: directory.file("x.npy"), labels: directory.file("y.npy"))
        var shards = try Dataset.loadNPY(features: directory.file("shards/x-*.npy"), labels: directory.file("shards/y-*.npy"), mapped: true)
        var mapped = try Dataset.loadNPY(features: directory.file("x.npy"), labels: directory.file("y.npy"), mapped: true)
        guard case .mapped(let store) = shards.features else { Issue.record("the shards were not mapped"); return }
        #expect(store.shards.count == 7 && store.count == 600 && store.shards.map(\.rows) == [1, 89, 1, 159, 150, 199, 1])
        #expect(shards.sampleShape == [1, 6, 6] && shards.residentBytes == 600 * 4 && shards.mappedBytes > 0)
        // The statistics: the same numbers, bit for bit, whoever holds the values.
        let statistics = [try one.standardize(), try shards.standardize(), try mapped.standardize()]
        #expect(statistics.allSatisfy { $0.mean == statistics[0].mean && $0.std == statistics[0].std }, "\(statistics)")
        // Every sample once, in a shuffled order with repeats across the shard boundaries, plain and augmented.
        var generator = RandomGenerator(seed: 5, stream: 1)
        let indices = generator.permutation(600) + [0, 1, 89, 90, 91, 599, 599]
        let augmentation = try Augmentation(cropPadding: 1, flip: true, seed: 3, sampleShape: [1, 6, 6])
        for (a, e) in [(nil, 0), (augmentation, 0), (augmentation, 3)] as [(Augmentation?, Int)] {
            let reference = gathered(one, indices, augmentation: a, epoch: e)
            for data in [shards, mapped] {
                let other = gathered(data, indices, augmentation: a, epoch: e)
                #expect(other.1 == reference.1)
                #expect(other.0.elementsEqual(reference.0) { $0.bitPattern == $1.bitPattern }, "\(dtype), augmented \(a != nil), epoch \(e)")
            }
        }
    }

    /// The parts a job's ranks compute (every W-th chunk) add up to what one process computes, for any W.
    @Test func statisticsSplitOverRanksAddUpToTheWhole() throws {
        try write(n: 9000, shape: [3], dtype: "float32", cuts: [4096])
        var whole = try Dataset.loadNPY(features: directory.file("x.npy"), labels: directory.file("y.npy"), mapped: true)
        #expect(whole.statisticsChunks == 3)
        let expected = try whole.standardize()
        for ranks in [2, 3, 5] {
            var sums = [Double](repeating: 0, count: whole.statisticsChunks)
            for r in 0..<ranks {
                let part = try whole.chunkSums(chunks: stride(from: r, to: whole.statisticsChunks, by: ranks), center: 0, squared: false)
                for c in sums.indices { sums[c] += part[c] }
            }
            let mean = sums.reduce(0, +) / Double(whole.features.count)
            #expect(mean == expected.mean, "\(ranks) ranks")
        }
        // Against NumPy in float64: mean 3, standard deviation 2 by construction, within sampling error.
        let numpy = try runPython("import numpy as np, sys; x = np.load(sys.argv[1]).astype(np.float64); print(x.mean(), x.std())",
                                  arguments: [directory.file("x.npy")]).split(separator: " ").compactMap { Double($0.trimmingCharacters(in: .whitespacesAndNewlines)) }
        #expect(abs(expected.mean - numpy[0]) < 1e-12 && abs(expected.std - numpy[1]) < 1e-12, "\(expected) against NumPy \(numpy)")
    }

    @Test func everyBadShardSetIsOneErrorNamingTheFile() throws {
        try write(n: 100, shape: [4], dtype: "float32", cuts: [30, 60])
        let shards = directory.file("shards")
        func load(_ features: String = "x-*.npy", _ labels: String = "y-*.npy") throws {
            _ = try Dataset.loadNPY(features: shards + "/" + features, labels: shards + "/" + labels, mapped: true)
        }
        _ = try runPython("""
            import numpy as np, sys
            d = sys.argv[1]
            np.save(d + '/wide.npy', np.zeros((5, 5), np.float32)); np.save(d + '/bytes.npy', np.zeros((5, 4), np.uint8))
            np.save(d + '/empty.npy', np.zeros((0, 4), np.float32)); np.save(d + '/y5.npy', np.zeros(5, np.int64))
            np.save(d + '/y4.npy', np.zeros(4, np.int64)); np.save(d + '/y0.npy', np.zeros(0, np.int64))
            np.save(d + '/scalar.npy', np.float32(3))
            """, arguments: [directory.path])
        let d = directory.path
        // Mixed shapes, mixed dtypes: named with the first shard.
        expectDataError(path: d + "/wide.npy", ["samples shaped [5]", "x.npy holds float32 samples shaped [4]"]) {
            _ = try MappedFeatures(paths: [d + "/x.npy", d + "/wide.npy"])
        }
        expectDataError(path: d + "/bytes.npy", ["holds uint8", "same dtype and sample shape"]) {
            _ = try MappedFeatures(paths: [d + "/x.npy", d + "/bytes.npy"])
        }
        expectDataError(path: d + "/empty.npy", ["empty shard"]) { _ = try MappedFeatures(paths: [d + "/x.npy", d + "/empty.npy"]) }
        // A 0-d array, as the in-memory reader says it (it was called an empty shard, as if it held no value).
        expectDataError(path: d + "/scalar.npy", ["expected features shaped [N, ...], got a 0-d array"]) {
            _ = try MappedFeatures(paths: [d + "/scalar.npy"])
        }
        expectDataError(path: d + "/scalar.npy", ["expected features shaped [N, ...], got a 0-d array"]) {
            _ = try Dataset.loadNPY(features: d + "/scalar.npy", labels: d + "/y5.npy", mapped: false)
        }
        // Labels that do not match their shard.
        expectDataError(path: d + "/bytes.npy", ["has 5 samples but the labels file \(d)/y4.npy has 4 labels"]) {
            _ = try Dataset.loadNPY(features: d + "/bytes.npy", labels: d + "/y4.npy", mapped: true)
        }
        // Two labels files for three shards (outside a numbered series, which would be reported as a gap first).
        try FileManager.default.copyItem(atPath: shards + "/y-00000-of-00003.npy", toPath: d + "/labels-a.npy")
        try FileManager.default.copyItem(atPath: shards + "/y-00001-of-00003.npy", toPath: d + "/labels-b.npy")
        expectDataError(path: d + "/labels-*.npy", ["names 2 labels files", "names 3 feature shards"]) {
            _ = try Dataset.loadNPY(features: shards + "/x-*.npy", labels: d + "/labels-*.npy", mapped: true)
        }
        // The right count of labels files, but one of them with another shard's count: named shard by shard.
        try FileManager.default.copyItem(atPath: d + "/y5.npy", toPath: d + "/labels-c.npy")
        expectDataError(path: shards + "/x-00002-of-00003.npy", ["has 40 samples but the labels file \(d)/labels-c.npy has 5 labels"]) {
            _ = try Dataset.loadNPY(features: shards + "/x-*.npy", labels: d + "/labels-*.npy", mapped: true)
        }
        // A numbered series with a gap.
        try FileManager.default.moveItem(atPath: shards + "/x-00001-of-00003.npy", toPath: d + "/aside.npy")
        expectDataError(path: shards + "/x-*.npy", ["shard", "x-00001-of-00003 is missing (2 of 3 present)"]) { try load() }
        expectDataError(path: shards + "/nothing-*.npy", ["matches no file"]) { try load("nothing-*.npy") }
        // A shard given twice (raw and compressed), and one numbered past the count: each would add samples silently.
        try FileManager.default.moveItem(atPath: d + "/aside.npy", toPath: shards + "/x-00001-of-00003.npy")
        try FileManager.default.copyItem(atPath: shards + "/x-00001-of-00003.npy", toPath: shards + "/x-00001-of-00003.npy.gz")
        expectDataError(path: shards + "/x-00001-of-00003.npy.gz", ["is shard 1 of 3, and so is \(shards)/x-00001-of-00003.npy: each shard once"]) {
            _ = try DataFiles.resolve(shards + "/x-*")
        }
        try FileManager.default.moveItem(atPath: shards + "/x-00001-of-00003.npy.gz", toPath: shards + "/x-00007-of-00003.npy")
        expectDataError(path: shards + "/x-00007-of-00003.npy", ["is shard 7 of a series of 3, numbered 0 to 2"]) {
            _ = try DataFiles.resolve(shards + "/x-*.npy")
        }
        // A file whose name holds glob characters is that file, not a pattern: `x[1].npy` matched `x1.npy` instead.
        try FileManager.default.copyItem(atPath: d + "/y5.npy", toPath: d + "/lab[1].npy")
        try FileManager.default.copyItem(atPath: d + "/x.npy", toPath: d + "/lab1.npy")
        #expect(try DataFiles.resolve(d + "/lab[1].npy") == [d + "/lab[1].npy"])
        #expect(try DataFiles.resolve(d + "/lab[0-9].npy") == [d + "/lab1.npy"], "a pattern that names no file is still a pattern")
        // A truncated shard is refused from its header and size, before anything maps it.
        let truncated = d + "/truncated.npy"
        try FileManager.default.copyItem(atPath: d + "/x.npy", toPath: truncated)
        truncate(truncated, 200)
        expectDataError(path: truncated, ["truncated data"]) { _ = try MappedFeatures(paths: [truncated]) }
    }

    /// A NaN in a series of shards is named with the shard that holds it (it named the pattern).
    @Test func aNaNInAShardNamesTheShard() throws {
        let d = try TemporaryDirectory()
        _ = try runPython("""
            import sys, numpy as np
            for i in range(3):
                x = np.ones((50, 8), np.float32)
                if i == 2: x[15, 3] = np.nan
                np.save(f'{sys.argv[1]}/x-{i:05d}-of-00003.npy', x)
                np.save(f'{sys.argv[1]}/y-{i:05d}-of-00003.npy', np.arange(50) % 3)
            """, arguments: [d.path])
        let data = try Dataset.loadNPY(features: d.path + "/x-*.npy", labels: d.path + "/y-*.npy", mapped: true)
        expectDataError(path: d.path + "/x-00002-of-00003.npy", ["sample 115 of \(d.path)/x-*.npy holds nan (its value 3)"]) {
            try data.requireFinite()
        }
    }

    @Test func aFileThatChangesUnderneathIsNamed() throws {
        try write(n: 50, shape: [4], dtype: "uint8", cuts: [20])
        let data = try Dataset.loadNPY(features: directory.file("shards/x-*.npy"), labels: directory.file("shards/y-*.npy"), mapped: true)
        try data.checkUnchanged()
        let shard = directory.file("shards/x-00001-of-00002.npy")
        // Rewritten in place: a new modification time (and here a new size).
        let handle = try #require(FileHandle(forWritingAtPath: shard))
        try handle.seekToEnd()
        handle.write(Data([1, 2, 3]))
        try handle.close()
        expectDataError(path: shard, ["changed size", "must not change during a run"]) { try data.checkUnchanged() }
    }
}
