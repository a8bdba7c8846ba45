import Engine
import Foundation
import Testing

/// What reading a set into memory will hold at least, from headers and sizes alone, against the files NumPy and
/// Python's gzip write: the values as stored, and never more than a read holds.
@Suite struct ReadFootprintTests {
    @Test func countsTheStoredValuesOfEachFile() throws {
        let dir = try TemporaryDirectory()
        _ = try runPython("""
            import sys, os, gzip, struct
            import numpy as np
            d = sys.argv[1]
            np.save(os.path.join(d, 'u1.npy'), np.zeros((100, 28, 28), np.uint8))
            np.save(os.path.join(d, 'f4.npy'), np.zeros((50, 10), np.float32))
            np.save(os.path.join(d, 'f8.npy'), np.zeros((50, 10), np.float64))
            with gzip.open(os.path.join(d, 'f8.npy.gz'), 'wb') as f: np.save(f, np.zeros((50, 10), np.float64))
            idx = bytes([0, 0, 8, 3]) + b''.join(struct.pack('>I', n) for n in (100, 28, 28)) + bytes(100 * 784)
            open(os.path.join(d, 'images-idx3-ubyte'), 'wb').write(idx)
            with gzip.open(os.path.join(d, 'images-idx3-ubyte.gz'), 'wb') as f: f.write(idx)
            os.mkdir(os.path.join(d, 'shards'))
            for i in range(3): np.save(os.path.join(d, 'shards', f'part-{i}.npy'), np.zeros((10, 4), np.float32))
            """, arguments: [dir.path])
        func bytes(_ parts: [ReadFootprint.Part]) -> [Double] { parts.map(\.bytes) }
        // IDX: the pixels, raw or inflated (the gzip trailer's size, less the 16-byte header).
        #expect(bytes(ReadFootprint.idx(images: dir.file("images-idx3-ubyte"))) == [78_400])
        #expect(bytes(ReadFootprint.idx(images: dir.file("images-idx3-ubyte.gz"))) == [78_400])
        // .npy read into memory: the values as stored, float64 as float32.
        #expect(bytes(ReadFootprint.npy(features: dir.file("u1.npy"), mapped: false)) == [78_400])
        #expect(bytes(ReadFootprint.npy(features: dir.file("f4.npy"), mapped: false)) == [2_000])
        #expect(bytes(ReadFootprint.npy(features: dir.file("f8.npy"), mapped: false)) == [2_000])
        // A compressed file: half its inflated size (header included), whatever its dtype; the read holds it whole.
        let inflated = 128.0 + 4_000
        #expect(bytes(ReadFootprint.npy(features: dir.file("f8.npy.gz"), mapped: false)) == [inflated / 2])
        // Mapped: nothing private, unless a file cannot be mapped (float64), which sends the whole set to memory.
        #expect(ReadFootprint.npy(features: dir.file("u1.npy"), mapped: true).isEmpty)
        #expect(ReadFootprint.npy(features: dir.file("f4.npy"), mapped: true).isEmpty)
        #expect(bytes(ReadFootprint.npy(features: dir.file("f8.npy"), mapped: true)) == [2_000])
        // Shards each count, named.
        let shards = ReadFootprint.npy(features: dir.file("shards"), mapped: false)
        #expect(shards.map { URL(fileURLWithPath: $0.path).lastPathComponent } == ["part-0.npy", "part-1.npy", "part-2.npy"])
        #expect(bytes(shards) == [160, 160, 160])
        // What cannot be sized counts nothing: the reader names its problem.
        #expect(ReadFootprint.npy(features: dir.file("missing.npy"), mapped: false).isEmpty)
        #expect(ReadFootprint.idx(images: dir.file("missing")).isEmpty)
    }
}

/// A reader of large rows that records every consecutive read: row r holds r + position / 1,000,000.
private final class RecordingReader: RowReader, @unchecked Sendable {
    let name = "recording", count: Int, sampleShape: [Int], element = StoredElement.float32, workingBytes = 0.0
    var largestRead = 0, rowsRead = 0
    init(count: Int, sampleShape: [Int]) { (self.count, self.sampleShape) = (count, sampleShape) }
    func read(rows: UnsafeBufferPointer<Int>, into destination: UnsafeMutableRawPointer) throws {
        for (i, r) in rows.enumerated() { try read(range: r..<r + 1, into: destination + i * rowBytes) }
    }
    var rowBytes: Int { sampleShape.reduce(1, *) * 4 }
    func read(range: Range<Int>, into destination: UnsafeMutableRawPointer) throws {
        largestRead = max(largestRead, range.count)
        rowsRead += range.count
        let values = sampleShape.reduce(1, *)
        let out = destination.assumingMemoryBound(to: Float.self)
        for (i, r) in range.enumerated() {
            for p in 0..<values { out[i * values + p] = Float(r) + Float(p) / 1_000_000 }
        }
    }
}

/// The statistics passes over an HDF5 set read at most 8 MiB of rows at once (a chunk of 4,096 rows of 3x160x160
/// floats took 1.2 GiB at once, past what the memory estimate counted), and still sum every row once.
@Suite struct StatisticsBlockTests {
    @Test func theStatisticsPassesReadAtMostEightMebibytesAtOnce() throws {
        let reader = RecordingReader(count: 100, sampleShape: [3, 160, 160])
        let data = try Dataset(name: "recording", featureCount: 76_800, sampleShape: [3, 160, 160],
                               features: .reader(StagedReader(reader)), labels: [Int32](repeating: 0, count: 100))
        let sums = try data.chunkSums(chunks: 0..<data.statisticsChunks, center: 0, squared: false)
        #expect(reader.largestRead * reader.rowBytes <= 8 << 20 && reader.largestRead == 27, "\(reader.largestRead) rows at once")
        #expect(reader.rowsRead == 100)
        // Sum over rows r and positions p of r + p / 1e6 (each value rounded to float32 first).
        var expected = 0.0
        for r in 0..<100 { for p in 0..<76_800 { expected += Double(Float(r) + Float(p) / 1_000_000) } }
        #expect(abs(sums.reduce(0, +) - expected) <= 1e-9 * expected)
        // A row larger than the block is read alone.
        let huge = RecordingReader(count: 3, sampleShape: [3_000_000])
        let one = try Dataset(name: "huge", featureCount: 3_000_000, features: .reader(StagedReader(huge)), labels: [0, 0, 0])
        _ = try one.chunkSums(chunks: 0..<1, center: 0, squared: false)
        #expect(huge.largestRead == 1 && huge.rowsRead == 3)
    }
}
