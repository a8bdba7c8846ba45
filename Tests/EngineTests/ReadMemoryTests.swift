import Engine
import Foundation
import Testing

/// What reading a set into memory will hold at least, from headers alone, against the files NumPy and Python's gzip
/// write: the values the header declares, as stored, and never more than a read holds.
@Suite struct ReadFootprintTests {
    @Test func countsTheStoredValuesOfEachFile() throws {
        let dir = try TemporaryDirectory()
        _ = try runPython("""
            import sys, os, gzip, struct
            import numpy as np
            d = sys.argv[1]
            p = lambda name: os.path.join(d, name)
            np.save(p('u1.npy'), np.zeros((100, 28, 28), np.uint8))
            np.save(p('f4.npy'), np.zeros((50, 10), np.float32))
            np.save(p('f8.npy'), np.zeros((50, 10), np.float64))
            with gzip.open(p('f8.npy.gz'), 'wb') as f: np.save(f, np.zeros((50, 10), np.float64))
            idx = bytes([0, 0, 8, 3]) + b''.join(struct.pack('>I', n) for n in (100, 28, 28)) + bytes(100 * 784)
            open(p('images-idx3-ubyte'), 'wb').write(idx)
            with gzip.open(p('images-idx3-ubyte.gz'), 'wb') as f: f.write(idx)
            # Two members, as `cat a.gz b.gz` makes: the last member's trailer says 1,000 bytes.
            open(p('two-members.gz'), 'wb').write(gzip.compress(idx[:-1000]) + gzip.compress(idx[-1000:]))
            # Cut, as an interrupted download leaves it: its last 4 bytes are compressed data, not a size.
            open(p('cut.gz'), 'wb').write(gzip.compress(idx)[:300])
            os.mkdir(p('shards'))
            for i in range(3): np.save(p(f'shards/part-{i}.npy'), np.zeros((10, 4), np.float32))
            os.mkdir(p('f8-shards'))
            for i in range(2): np.save(p(f'f8-shards/part-{i}.npy'), np.zeros((10, 4), np.float64))
            os.mkdir(p('bad-shards'))
            np.save(p('bad-shards/a.npy'), np.zeros((10, 4), np.float32))
            np.save(p('bad-shards/b.npy'), np.asfortranarray(np.zeros((10, 4), np.float32)))
            os.mkfifo(p('fifo.npy')); os.mkfifo(p('fifo-idx'))
            open(p('cut.npy'), 'wb').write(open(p('f4.npy'), 'rb').read()[:1000])
            import zlib
            def member(data, extra=b''):
                c = zlib.compressobj(6, zlib.DEFLATED, -15)
                head = b'\\x1f\\x8b\\x08' + (b'\\x04' if extra else b'\\x00') + b'\\0\\0\\0\\0\\0\\xff'
                head += struct.pack('<H', len(extra)) + extra if extra else b''
                return head + c.compress(data) + c.flush() + struct.pack('<II', zlib.crc32(data), len(data))
            open(p('extra-field.gz'), 'wb').write(member(idx, extra=b'RA' + struct.pack('<H', 7000) + bytes(7000)))
            open(p('split-header.gz'), 'wb').write(gzip.compress(idx[:4]) + gzip.compress(idx[4:]))
            """, arguments: [dir.path])
        func stays(_ parts: [ReadFootprint.Part]) -> [Double] { parts.map(\.stays) }
        func size(_ name: String) -> Double { Double((try? FileManager.default.attributesOfItem(atPath: dir.file(name))[.size] as? Int) ?? -1) }
        // IDX: a raw file is read whole (its size), a compressed one beside the pixels its header declares, inflated
        // from the first bytes; a file of two members, or one cut short, by its header too (the gzip trailer's size,
        // which counted 1,000 bytes for the first and 2 GiB for a cut 1 MB file, is not read).
        #expect(ReadFootprint.idx(images: dir.file("images-idx3-ubyte")).map { [$0.bytes, $0.stays] } == [[78_416, 78_400]])
        for name in ["images-idx3-ubyte.gz", "two-members.gz", "cut.gz"] {
            #expect(ReadFootprint.idx(images: dir.file(name)).map { [$0.bytes, $0.stays] } == [[size(name) + 78_400, 78_400]], "\(name)")
        }
        // .npy read into memory: the file beside its decoded values, then the values as stored (float64 as float32).
        #expect(ReadFootprint.npy(features: dir.file("u1.npy"), mapped: false).map { [$0.bytes, $0.stays] } == [[size("u1.npy"), 78_400]])
        #expect(ReadFootprint.npy(features: dir.file("f4.npy"), mapped: false).map { [$0.bytes, $0.stays] }
                == [[size("f4.npy") + 2_000, 2_000]])
        #expect(ReadFootprint.npy(features: dir.file("f8.npy"), mapped: false).map { [$0.bytes, $0.stays] }
                == [[size("f8.npy") + 4_000, 2_000]])
        // Compressed: the file beside its contents while they are inflated, then the contents beside the decoded values
        // (never all three at once: counting them so refused sets that fit).
        #expect(ReadFootprint.npy(features: dir.file("f8.npy.gz"), mapped: false).map { [$0.bytes, $0.stays] }
                == [[max(size("f8.npy.gz") + 4_128, 4_128 + 4_000), 2_000]])
        // Mapped: nothing private, unless a file cannot be mapped (float64), which sends the whole set to memory.
        #expect(ReadFootprint.npy(features: dir.file("u1.npy"), mapped: true).isEmpty)
        #expect(ReadFootprint.npy(features: dir.file("f4.npy"), mapped: true).isEmpty)
        #expect(stays(ReadFootprint.npy(features: dir.file("f8.npy"), mapped: true)) == [2_000])
        // Shards each count, named, kept as read until their concatenation, which holds the whole set once more.
        let shards = ReadFootprint.npy(features: dir.file("shards"), mapped: false)
        #expect(shards.map { URL(fileURLWithPath: $0.path).lastPathComponent }
                == ["part-0.npy", "part-1.npy", "part-2.npy", "shards (the shards concatenated)"])
        #expect(stays(shards) == [160, 160, 160, 0] && shards.last?.bytes == 480)
        #expect(ReadFootprint.peak(shards) == 480 + 480)
        // float64 shards: kept as read (8 bytes a value), their float32 copies made beside them, then the whole set (a
        // 4-shard set of 400 MB counted 572 MiB where the read peaked at 762, and was killed in cgroups it passed).
        let f8 = ReadFootprint.npy(features: dir.file("f8-shards"), mapped: false)
        #expect(f8.map(\.stays) == [320, 320, 0] && f8.last?.bytes == 2 * 160 + 2 * 160)
        #expect(ReadFootprint.peak(f8) == 640 + 640)
        // A bad shard: mapped, the loader refuses the set before reading (nothing); read, it reads the shards before the
        // bad one (they count: counting nothing let them be read until the OOM killer came).
        #expect(ReadFootprint.npy(features: dir.file("bad-shards"), mapped: true).isEmpty)
        #expect(stays(ReadFootprint.npy(features: dir.file("bad-shards"), mapped: false)) == [160])
        // What the reader refuses before reading counts nothing, and it names the problem: a missing file, a raw .npy
        // cut short (its header is checked against its size first).
        #expect(ReadFootprint.npy(features: dir.file("missing.npy"), mapped: false).isEmpty)
        #expect(ReadFootprint.idx(images: dir.file("missing")).isEmpty)
        #expect(ReadFootprint.npy(features: dir.file("cut.npy"), mapped: false).isEmpty)
        // A FIFO is not opened: opening it took its writer's data, and the reader then waited for ever (with no writer,
        // the open itself would block this test).
        #expect(ReadFootprint.npy(features: dir.file("fifo.npy"), mapped: false).isEmpty)
        #expect(ReadFootprint.idx(images: dir.file("fifo-idx")).isEmpty)
        // The gzip header of a dictzip file (an extra field of 7 KB) and a first member that ends inside the IDX header
        // are read past: the pixels count (they counted nothing, and the set was read until the OOM killer came).
        for name in ["extra-field.gz", "split-header.gz"] {
            #expect(stays(ReadFootprint.idx(images: dir.file(name))) == [78_400], "\(name)")
        }
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
