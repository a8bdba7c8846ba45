@testable import Engine
import Foundation
import Synchronization
import Testing

/// Whether python3 can import h5py: the only reason these tests skip.
private let h5pyImports = (try? runPython("import h5py, numpy")) != nil

/// h5py writes the test files; NumPy's values read back through h5py are saved beside them as `.npy` references
/// (floats cast to float32 by NumPy), which the tests read with bpworker's own `.npy` reader.
private let writer = """
    import sys, os
    import numpy as np, h5py
    d = sys.argv[1]
    rng = np.random.default_rng(20)
    def ref(name, ds):
        a = ds[()]
        with np.errstate(over='ignore'):
            np.save(os.path.join(d, name), a.astype(np.float32) if a.dtype.kind == 'f' else a)
    with h5py.File(os.path.join(d, 'u8.h5'), 'w') as f:
        ref('u8_images.npy', f.create_dataset('images', data=rng.integers(0, 256, (120, 28, 28), dtype=np.uint8)))
        f.create_dataset('int32', data=rng.integers(0, 9, (5, 3), dtype=np.int32))
        f.create_dataset('scalar', data=3.0)
        f.create_dataset('names', data=np.array([b'shirt', b'boot']))
        f.create_dataset('empty', data=np.zeros((0, 4), dtype=np.float32))
        ref('labels_i64.npy', f.create_dataset('labels_i64', data=rng.integers(0, 10, 50, dtype=np.int64)))
        ref('labels_u8.npy', f.create_dataset('labels_u8', data=rng.integers(0, 256, 50, dtype=np.uint8)))
        f.create_dataset('labels_negative', data=np.array([0, 3, -1, 2], dtype=np.int16))
        f.create_dataset('labels_float', data=np.array([0.0, 1.0]))
        f.create_dataset('labels_2d', data=np.zeros((4, 2), dtype=np.int64))
    with h5py.File(os.path.join(d, 'float.h5'), 'w') as f:
        x = rng.standard_normal((300, 10)).astype(np.float32)
        ref('f32.npy', f.create_dataset('group/f32', data=x, chunks=(7, 10), compression='gzip', compression_opts=4))
        ref('f64.npy', f.create_dataset('f64', data=rng.standard_normal((40, 3)) * 1e3))
        # Rounding, overflow to infinity, subnormals, underflow to signed zero, NaN.
        edges = [[1e300, -1e300, 1e-50], [np.nan, np.inf, -np.inf], [3.4028235677973366e38, 1.5e-45, 0.1],
                 [3.4028236e38, -7e-46, 1 / 3]]
        ref('f64_edges.npy', f.create_dataset('f64_edges', data=np.array(edges), chunks=(2, 3), compression='gzip'))
        ref('vector.npy', f.create_dataset('vector', data=rng.standard_normal(20).astype(np.float32), chunks=(4,)))
    """

/// The test files (h5py's) in a fresh directory, with their references.
final class HDF5TestFiles {
    let dir: TemporaryDirectory
    init() throws {
        dir = try TemporaryDirectory()
        _ = try runPython(writer, arguments: [dir.path])
    }
    func path(_ name: String) -> String { dir.file(name) }
    func reference(_ name: String) throws -> NPYArray { try NPY.read(path: path(name)) }
}

/// Reads `rows` through `reader` into fresh bytes.
private func readBytes(_ reader: HDF5Rows, rows: [Int]) throws -> [UInt8] {
    let rowBytes = reader.sampleShape.reduce(reader.element.size, *)
    var bytes = [UInt8](repeating: 0xA5, count: rows.count * rowBytes)
    try rows.withUnsafeBufferPointer { r in
        try bytes.withUnsafeMutableBytes { try reader.read(rows: r, into: $0.baseAddress!) }
    }
    return bytes
}

/// The reference rows `rows` of an `.npy` array as bytes (uint8 as is, float32 as its little-endian bits).
private func referenceBytes(_ array: NPYArray, rows: [Int]) -> [UInt8] {
    let perRow = array.count / array.shape[0]
    switch array.storage {
    case .uint8(let v):
        return rows.flatMap { v[($0 * perRow)..<(($0 + 1) * perRow)] }
    case .float32(let v):
        return rows.flatMap { v[($0 * perRow)..<(($0 + 1) * perRow)] }.flatMap { value in
            withUnsafeBytes(of: value.bitPattern.littleEndian) { Array($0) }
        }
    default:
        Issue.record("unexpected reference dtype \(array.dtypeName)")
        return []
    }
}

/// Random rows of 0..<count with repeats, the first and last rows, and two rows in three in a shuffled order:
/// many runs of consecutive rows, more than one library call selects.
private func scrambledRows(_ count: Int, seed: UInt64) -> [Int] {
    var g = RandomGenerator(seed: seed, stream: .test)
    var most = (0..<count).filter { $0 % 3 != 1 }
    most.shuffle(using: &g)
    return (0..<(count / 4 + 3)).map { _ in g.nextInt(below: count) } + [0, count - 1, count - 1] + most
}

/// Asserts that `body` throws a DataError about `name` whose reason contains every one of `fragments`.
private func expectError(_ name: String, _ fragments: [String], sourceLocation: SourceLocation = #_sourceLocation,
                         _ body: () throws -> Void) {
    do {
        try body()
        Issue.record("expected a DataError about \(name), but nothing was thrown", sourceLocation: sourceLocation)
    } catch let error as DataError {
        #expect(error.path == name, sourceLocation: sourceLocation)
        for fragment in fragments {
            #expect(error.reason.contains(fragment), "reason was: \(error.reason)", sourceLocation: sourceLocation)
        }
    } catch {
        Issue.record("expected a DataError, got \(error)", sourceLocation: sourceLocation)
    }
}

@Suite(.enabled(if: h5pyImports, "h5py cannot be imported by python3: pip install h5py (scripts/setup --python)"))
struct HDF5Tests {
    let files: HDF5TestFiles
    init() throws { files = try HDF5TestFiles() }

    @Test(arguments: [
        ("u8.h5", "/images", "u8_images.npy", [28, 28], StoredElement.uint8),
        ("float.h5", "/group/f32", "f32.npy", [10], .float32),
        ("float.h5", "/f64", "f64.npy", [3], .float32),
        ("float.h5", "/f64_edges", "f64_edges.npy", [3], .float32),
        ("float.h5", "/vector", "vector.npy", [1], .float32),
    ])
    func rowsInAnyOrderEqualNumPysRows(file: String, dataset: String, referenceName: String, shape: [Int],
                                       element: StoredElement) throws {
        let reader = try HDF5Rows(file: files.path(file), dataset: dataset)
        let reference = try files.reference(referenceName)
        #expect(reader.name == files.path(file) + ":" + dataset)
        #expect(reader.count == reference.shape[0])
        #expect(reader.sampleShape == shape)
        #expect(reader.element == element)
        let rows = scrambledRows(reader.count, seed: UInt64(reader.count))
        #expect(try readBytes(reader, rows: rows) == referenceBytes(reference, rows: rows))
        // A smaller batch after a larger one reuses the scratch; a larger one grows it.
        #expect(try readBytes(reader, rows: [3, 1, 3]) == referenceBytes(reference, rows: [3, 1, 3]))
        let twice = rows + rows
        #expect(try readBytes(reader, rows: twice) == referenceBytes(reference, rows: twice))
        #expect(try readBytes(reader, rows: []) == [])
    }

    @Test func rangesEqualNumPysRows() throws {
        let reader = try HDF5Rows(file: files.path("float.h5"), dataset: "/group/f32")
        let reference = try files.reference("f32.npy")
        for range in [0..<300, 5..<6, 13..<200, 299..<300, 40..<40] {
            var bytes = [UInt8](repeating: 0xA5, count: range.count * 40)
            try bytes.withUnsafeMutableBytes { try reader.read(range: range, into: $0.baseAddress!) }
            #expect(bytes == referenceBytes(reference, rows: Array(range)), "rows \(range)")
        }
        var one = [UInt8](repeating: 0, count: 40)
        expectError(reader.name, ["299..<301", "0..<300"]) {
            try one.withUnsafeMutableBytes { try reader.read(range: 299..<301, into: $0.baseAddress!) }
        }
        expectError(reader.name, ["row 300", "0..<300"]) { _ = try readBytes(reader, rows: [1, 300]) }
        expectError(reader.name, ["row -1"]) { _ = try readBytes(reader, rows: [-1]) }
    }

    @Test func labelsEqualNumPys() throws {
        let file = files.path("u8.h5")
        for (dataset, referenceName) in [("/labels_i64", "labels_i64.npy"), ("/labels_u8", "labels_u8.npy")] {
            let labels = try HDF5.readLabels(file: file, dataset: dataset)
            let expected: [Int64] = switch try files.reference(referenceName).storage {
            case .int64(let v): v
            case .uint8(let v): v.map(Int64.init)
            default: []
            }
            #expect(labels.map(Int64.init) == expected, "\(dataset)")
            #expect(labels.count == 50)
        }
        expectError(file + ":/labels_negative", ["index 2", "-1"]) {
            _ = try HDF5.readLabels(file: file, dataset: "/labels_negative")
        }
        expectError(file + ":/labels_float", ["float64"]) { _ = try HDF5.readLabels(file: file, dataset: "/labels_float") }
        expectError(file + ":/labels_2d", ["rank 1", "[4, 2]"]) { _ = try HDF5.readLabels(file: file, dataset: "/labels_2d") }
        expectError(file + ":/missing", ["no dataset"]) { _ = try HDF5.readLabels(file: file, dataset: "/missing") }
    }

    /// A label data set that declares more labels than memory holds (10^12 in a chunked file of a few KB) is refused
    /// naming it, before anything is allocated: reading it crashed every rank ("failed to allocate 8000000000032
    /// bytes").
    @Test func aLabelSetNoMemoryHoldsIsRefusedBeforeItIsRead() throws {
        let dir = try TemporaryDirectory()
        _ = try runPython("""
            import sys, h5py
            with h5py.File(sys.argv[1] + '/huge.h5', 'w') as f:
                f.create_dataset('y', shape=(10**12,), dtype='u1', chunks=(4096,))
            """, arguments: [dir.path])
        let file = dir.file("huge.h5")
        expectError(file + ":/y", ["1000000000000 labels", "more than the 536870912 (2^29"]) {
            _ = try HDF5.readLabels(file: file, dataset: "/y")
        }
    }

    /// The statistics and finiteness passes read a reader's rows in blocks of at most 8 MiB (4,096 rows of 3x160x160
    /// floats at once took 1.2 GiB that the memory check did not count), in row order: the sums are those of the
    /// same rows in memory, bit for bit, and the block is in the memory estimate.
    @Test func passesOverAReaderReadInBoundedBlocksAndSumAsInMemory() throws {
        let dir = try TemporaryDirectory()
        _ = try runPython("""
            import sys, h5py, numpy as np
            x = np.random.default_rng(3).random((200, 3, 64, 64), dtype=np.float32)
            y = np.arange(200) % 4
            with h5py.File(sys.argv[1] + '/big.h5', 'w') as f:
                f.create_dataset('x', data=x, chunks=(5, 3, 64, 64), compression='gzip')
                f['y'] = y
            np.save(sys.argv[1] + '/x.npy', x)
            np.save(sys.argv[1] + '/y.npy', y)
            """, arguments: [dir.path])
        let streamed = try Dataset.loadHDF5(features: dir.file("big.h5") + ":/x", labels: dir.file("big.h5") + ":/y")
        let inMemory = try Dataset.loadNPY(features: dir.file("x.npy"), labels: dir.file("y.npy"))
        let chunks = 0..<streamed.statisticsChunks
        for squared in [false, true] {
            let a = try streamed.chunkSums(chunks: chunks, center: 0.25, squared: squared)
            let b = try inMemory.chunkSums(chunks: chunks, center: 0.25, squared: squared)
            #expect(a.map(\.bitPattern) == b.map(\.bitPattern), "\(a) \(b)")
        }
        // 200 rows of 48 KiB, 9.4 MiB: two blocks, of 170 rows and 30.
        let row = Double(3 * 64 * 64 * 4)
        #expect(streamed.readerWorkingBytes >= 170 * row)
        #expect(Dataset.statisticsBlockBytes == 8 << 20)
    }

    /// A virtual dataset reads through to its sources. One whose source file or source dataset is missing is
    /// refused naming the mapping: HDF5 read zeros for its rows, and training went on with them.
    @Test func aVirtualDatasetWithAMissingSourceIsRefusedNotReadAsZeros() throws {
        let dir = try TemporaryDirectory()
        _ = try runPython("""
            import sys, os, h5py, numpy as np
            d = sys.argv[1]
            x = np.random.default_rng(5).random((60, 4), dtype=np.float32) + 1
            for i in range(3):
                with h5py.File(f'{d}/part{i}.h5', 'w') as f:
                    f['x'] = x[20 * i:20 * (i + 1)]
            def layout(name, sources):
                lay = h5py.VirtualLayout(shape=(60, 4), dtype='f4')
                for i, (file, dataset) in enumerate(sources):
                    lay[20 * i:20 * (i + 1)] = h5py.VirtualSource(file, dataset, shape=(20, 4))
                with h5py.File(f'{d}/{name}', 'w') as f:
                    f.create_virtual_dataset('x', lay, fillvalue=0)
            # Relative names, an absolute one whose directory moved (HDF5 then looks for its last component beside
            # the virtual file), a missing file, and a file without the dataset.
            layout('whole.h5', [('part0.h5', 'x'), (f'{d}/gone/part1.h5', 'x'), ('part2.h5', 'x')])
            layout('missing.h5', [('part0.h5', 'x'), ('part9.h5', 'x'), ('part2.h5', 'x')])
            layout('nodataset.h5', [('part0.h5', 'x'), ('part1.h5', 'y'), ('part2.h5', 'x')])
            with h5py.File(f'{d}/linked.h5', 'w') as f:
                f['x'] = h5py.ExternalLink('part1.h5', '/x')
            # A source that is itself virtual, with a missing source one level down.
            lay = h5py.VirtualLayout(shape=(20, 4), dtype='f4')
            lay[:] = h5py.VirtualSource('part8.h5', 'x', shape=(20, 4))
            with h5py.File(f'{d}/inner.h5', 'w') as f:
                f.create_virtual_dataset('x', lay, fillvalue=0)
            layout('nested.h5', [('part0.h5', 'x'), ('inner.h5', 'x'), ('part2.h5', 'x')])
            np.save(f'{d}/x.npy', x)
            """, arguments: [dir.path])
        let reader = try HDF5Rows(file: dir.file("whole.h5"), dataset: "/x")
        let rows = Array(0..<60)
        #expect(try readBytes(reader, rows: rows) == referenceBytes(try NPY.read(path: dir.file("x.npy")), rows: rows))
        expectError(dir.file("missing.h5") + ":/x", ["mapping 2 of 3", "part9.h5", "cannot be opened", "zeros"]) {
            _ = try HDF5Rows(file: dir.file("missing.h5"), dataset: "/x")
        }
        expectError(dir.file("nodataset.h5") + ":/x", ["mapping 2 of 3", "part1.h5", "no dataset y"]) {
            _ = try HDF5Rows(file: dir.file("nodataset.h5"), dataset: "/x")
        }
        expectError(dir.file("nested.h5") + ":/x", ["mapping 1 of 1", "part8.h5", "cannot be opened"]) {
            _ = try HDF5Rows(file: dir.file("nested.h5"), dataset: "/x")
        }
        // A source or a link's target that changes under a reader is noticed at its next read, as its own file is: the
        // run trained on the new contents.
        let linked = try HDF5Rows(file: dir.file("linked.h5"), dataset: "/x")
        #expect(try readBytes(linked, rows: [0, 19]).count == 2 * 16)
        _ = try runPython("import os, sys; os.utime(sys.argv[1], (1, 1))", arguments: [dir.file("part1.h5")])
        for (reader, file) in [(reader, "whole.h5"), (linked, "linked.h5")] {
            expectError(dir.file(file) + ":/x", ["part1.h5, a file its values come from", "modified since it was opened"]) {
                _ = try readBytes(reader, rows: [1])
            }
        }
    }

    /// A dataset compressed with a filter this libhdf5 lacks (h5py's own lzf) is refused when opened, naming the
    /// filter: it opened, and its first read failed as "damaged or truncated".
    @Test func aFilterTheLibraryLacksIsNamedWhenOpened() throws {
        let dir = try TemporaryDirectory()
        _ = try runPython("""
            import sys, h5py, numpy as np
            with h5py.File(sys.argv[1] + '/lzf.h5', 'w') as f:
                f.create_dataset('x', data=np.zeros((64, 8), dtype=np.float32), chunks=(8, 8), compression='lzf')
            lay = h5py.VirtualLayout(shape=(64, 8), dtype='f4')
            lay[:] = h5py.VirtualSource('lzf.h5', 'x', shape=(64, 8))
            with h5py.File(sys.argv[1] + '/vlzf.h5', 'w') as f:
                f.create_virtual_dataset('x', lay, fillvalue=0)
            """, arguments: [dir.path])
        for file in ["lzf.h5", "vlzf.h5"] {
            expectError(dir.file(file) + ":/x", ["compressed with filter 32000", "which this libhdf5 does not have"]) {
                _ = try HDF5Rows(file: dir.file(file), dataset: "/x")
            }
        }
    }

    @Test func rejectsBadDatasetsNamingFileAndDataset() throws {
        let file = files.path("u8.h5")
        let cases: [(String, [String])] = [
            ("/missing", ["no dataset"]), ("/group/missing", ["no dataset"]), ("/scalar", ["scalar (0-d)"]),
            ("/names", ["dtype string"]), ("/int32", ["dtype int32"]), ("/empty", ["empty", "[0, 4]"]),
        ]
        for (dataset, fragments) in cases {
            expectError(file + ":" + dataset, fragments) { _ = try HDF5Rows(file: file, dataset: dataset) }
        }
        let missing = files.path("nothing.h5")
        expectError(missing + ":/images", ["no such file"]) { _ = try HDF5Rows(file: missing, dataset: "/images") }
        expectError(files.dir.path + ":/images", ["directory"]) { _ = try HDF5Rows(file: files.dir.path, dataset: "/images") }
        let text = try files.dir.write("notes.h5", Array("not an HDF5 file at all\n".utf8))
        expectError(text + ":/images", ["not an HDF5 file", "signature"]) { _ = try HDF5Rows(file: text, dataset: "/images") }
    }

    @Test func aTruncatedFileIsAnErrorNotACrash() throws {
        let whole = try Data(contentsOf: URL(fileURLWithPath: files.path("float.h5")))
        let half = try files.dir.write("half.h5", Array(whole.prefix(whole.count / 2)))
        expectError(half + ":/group/f32", ["HDF5: truncated file"]) {
            let reader = try HDF5Rows(file: half, dataset: "/group/f32")
            _ = try readBytes(reader, rows: Array(0..<reader.count))
        }
    }

    /// Zeros the middle of one compressed chunk (rows 21..<28, found by h5py): reading a row in it throws and
    /// names the rows asked for; rows in the other chunks still read correctly from the same reader.
    @Test func aDamagedChunkIsAnErrorNamingTheRows() throws {
        let path = files.path("float.h5")
        _ = try runPython("""
            import sys, h5py
            with h5py.File(sys.argv[1], 'r') as f:
                info = f['group/f32'].id.get_chunk_info_by_coord((21, 0))
            with open(sys.argv[1], 'r+b') as out:
                out.seek(info.byte_offset + info.size // 4)
                out.write(bytes(info.size // 2))
            """, arguments: [path])
        let reader = try HDF5Rows(file: path, dataset: "/group/f32")
        expectError(reader.name, ["rows 3, 22", "damaged"]) { _ = try readBytes(reader, rows: [22, 3]) }
        let reference = try files.reference("f32.npy")
        #expect(try readBytes(reader, rows: [299, 0, 28]) == referenceBytes(reference, rows: [299, 0, 28]))
        expectError(reader.name, ["rows 14..<30", "damaged"]) {
            var bytes = [UInt8](repeating: 0, count: 16 * 40)
            try bytes.withUnsafeMutableBytes { try reader.read(range: 14..<30, into: $0.baseAddress!) }
        }
    }

    @Test func splitsSpecs() throws {
        #expect(try HDF5.split("train.h5:/images") == ("train.h5", "/images"))
        #expect(try HDF5.split("/data/run:1/train.h5:/group/images") == ("/data/run:1/train.h5", "/group/images"))
        for bad in ["train.h5", "train.h5:images", ":/images", "train.h5:/", ""] {
            expectError(bad, ["FILE:/DATASET"]) { _ = try HDF5.split(bad) }
        }
    }
}

@Suite struct HDF5ReaderPartsTests {
    @Test func heapSortAgreesWithTheStandardSort() {
        var g = RandomGenerator(seed: 5, stream: .test)
        for count in [0, 1, 2, 3, 10, 257] {
            var values = (0..<count).map { _ in g.nextInt(below: 20) }
            let expected = values.sorted()
            values.withUnsafeMutableBufferPointer { heapSort($0.baseAddress!, count, by: <) }
            #expect(values == expected, "\(count) values")
        }
    }

    @Test func chunkCacheHoldsAFewChunksInAPrimeNumberOfSlots() {
        for (chunkBytes, bytes) in [(280, 1 << 20), (1 << 20, 4 << 20), (100 << 20, 64 << 20)] {
            let cache = chunkCache(chunkBytes: chunkBytes)
            #expect(cache.bytes == bytes)
            #expect(cache.slots >= 100 * max(1, bytes / chunkBytes))
            #expect((2..<cache.slots).allSatisfy { cache.slots % $0 != 0 }, "\(cache.slots) is prime")
            #expect(cache.w0 == 1)
        }
    }
}

extension HDF5Tests {
    /// Two readers on two threads at once (a prefetch thread and the main one): the process-wide lock keeps
    /// every row equal to NumPy's.
    @Test func readersOnTwoThreadsReadTheSameRows() throws {
        let readers = [try HDF5Rows(file: files.path("u8.h5"), dataset: "/images"),
                       try HDF5Rows(file: files.path("float.h5"), dataset: "/group/f32")]
        let references = [try files.reference("u8_images.npy"), try files.reference("f32.npy")]
        let matches = Mutex([0, 0])
        DispatchQueue.concurrentPerform(iterations: 2) { which in
            let reader = readers[which]
            for round in 0..<40 {
                let rows = scrambledRows(reader.count, seed: UInt64(round))
                let same = (try? readBytes(reader, rows: rows)) == referenceBytes(references[which], rows: rows)
                matches.withLock { $0[which] += same ? 1 : 0 }
            }
        }
        #expect(matches.withLock { $0 } == [40, 40])
    }
}

extension HDF5Tests {
    /// A file truncated, modified or replaced under an open reader: the next read throws, naming the file and
    /// the change (HDF5 alone reads a truncated contiguous dataset as zeros, without an error).
    @Test func aFileChangedUnderAnOpenReaderIsAnError() throws {
        let path = files.path("u8.h5")
        let bytes = try Data(contentsOf: URL(fileURLWithPath: path))
        let reader = try HDF5Rows(file: path, dataset: "/images")
        let reference = try files.reference("u8_images.npy")
        #expect(try readBytes(reader, rows: [119, 0]) == referenceBytes(reference, rows: [119, 0]))

        try FileManager.default.setAttributes([.modificationDate: Date(timeIntervalSince1970: 1e9)], ofItemAtPath: path)
        expectError(reader.name, ["was modified since it was opened"]) { _ = try readBytes(reader, rows: [1]) }

        let other = try HDF5Rows(file: path, dataset: "/images")
        let copy = try files.dir.write("copy.h5", Array(bytes))
        #expect(rename(copy, path) == 0)
        expectError(other.name, ["was replaced"]) { _ = try readBytes(other, rows: [2]) }

        let third = try HDF5Rows(file: path, dataset: "/images")
        #expect(truncate(path, off_t(bytes.count / 2)) == 0)
        expectError(third.name, ["changed size from \(bytes.count) to \(bytes.count / 2) bytes"]) {
            var out = [UInt8](repeating: 0, count: 120 * 784)
            try out.withUnsafeMutableBytes { try third.read(range: 0..<120, into: $0.baseAddress!) }
        }
        #expect(unlink(path) == 0)
        expectError(third.name, ["is gone"]) { _ = try readBytes(third, rows: [3]) }
    }
}
