import Engine
import Foundation
import Testing

// MARK: - Helpers

struct PythonFailure: Error, CustomStringConvertible {
    let description: String
}

/// Runs a python3 script with the given arguments and returns its standard output.
/// These tests need python3 with numpy; a missing interpreter or module is a failure, never a skip.
func runPython(_ script: String, arguments: [String] = []) throws -> String {
    let scratch = try TemporaryDirectory()
    let outPath = scratch.file("stdout"), errPath = scratch.file("stderr")
    _ = FileManager.default.createFile(atPath: outPath, contents: nil)
    _ = FileManager.default.createFile(atPath: errPath, contents: nil)
    let process = Process()
    process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
    process.arguments = ["python3", "-c", script] + arguments
    process.standardOutput = try FileHandle(forWritingTo: URL(fileURLWithPath: outPath))
    process.standardError = try FileHandle(forWritingTo: URL(fileURLWithPath: errPath))
    do {
        try process.run()
    } catch {
        throw PythonFailure(description: "cannot run python3 (\(error)); these tests need python3 with numpy: pip install numpy")
    }
    process.waitUntilExit()
    let out = try String(contentsOfFile: outPath, encoding: .utf8)
    let err = try String(contentsOfFile: errPath, encoding: .utf8)
    guard process.terminationStatus == 0 else {
        throw PythonFailure(description: """
            python3 exited with status \(process.terminationStatus); these tests need python3 with numpy \
            (pip install numpy). stderr:
            \(err)
            """)
    }
    return out
}

/// Asserts that `body` throws a DataError about `path` whose reason contains every one of `fragments`.
func expectDataError(
    path: String, _ fragments: [String], sourceLocation: SourceLocation = #_sourceLocation, _ body: () throws -> Void
) {
    do {
        try body()
        Issue.record("expected a DataError about \(path) mentioning \(fragments), but nothing was thrown",
                     sourceLocation: sourceLocation)
    } catch let error as DataError {
        #expect(error.path == path, sourceLocation: sourceLocation)
        #expect(error.description == "\(path): \(error.reason)", sourceLocation: sourceLocation)
        for fragment in fragments {
            #expect(error.reason.contains(fragment), "reason was: \(error.reason)", sourceLocation: sourceLocation)
        }
    } catch {
        Issue.record("expected a DataError, got \(error)", sourceLocation: sourceLocation)
    }
}

/// A malformed file for a reader to reject: the test case's name, the file's bytes, and what the DataError must say.
struct BadFile: CustomTestStringConvertible, Sendable {
    let name: String
    let bytes: [UInt8]
    let fragments: [String]
    var testDescription: String { name }

    /// Writes the bytes to a file called `fileName` and expects `read`, given its path, to reject it (`expectDataError`).
    func expectRejected(as fileName: String, sourceLocation: SourceLocation = #_sourceLocation,
                        by read: (String) throws -> Void) throws {
        let dir = try TemporaryDirectory()
        let path = try dir.write(fileName, bytes)
        expectDataError(path: path, fragments, sourceLocation: sourceLocation) { try read(path) }
    }
}

/// An IDX file: magic, type, dimension count, big-endian dimensions, payload.
private func idxFile(type: UInt8 = 0x08, dims: [UInt32], payload: [UInt8]) -> [UInt8] {
    var bytes: [UInt8] = [0, 0, type, UInt8(dims.count)]
    for d in dims { bytes += [UInt8(d >> 24), UInt8((d >> 16) & 0xFF), UInt8((d >> 8) & 0xFF), UInt8(d & 0xFF)] }
    return bytes + payload
}

/// A version 1 .npy file with the given header dict, padded as NumPy pads it (to a multiple of 64, newline last).
private func npyFile(header: String, payload: [UInt8]) -> [UInt8] {
    var text = Array(header.utf8)
    let total = 10 + text.count + 1
    text += [UInt8](repeating: 0x20, count: (64 - total % 64) % 64) + [0x0A]
    let n = text.count
    return [0x93] + Array("NUMPY".utf8) + [1, 0, UInt8(n & 0xFF), UInt8(n >> 8)] + text + payload
}

private let fashionMNIST = "/usr/share/datasets/fashion-mnist/"

/// Mean and population standard deviation, in Double.
private func moments<C: Collection>(_ values: C) -> (mean: Double, std: Double) where C.Element == Double {
    let n = Double(values.count)
    let mean = values.reduce(0, +) / n
    let variance = values.reduce(0) { $0 + ($1 - mean) * ($1 - mean) } / n
    return (mean, variance.squareRoot())
}

/// Gathers `indices` from `data` into fresh arrays (test convenience; the real callers reuse buffers).
private func gathered<T: BinaryFloatingPoint>(_ data: Dataset, _ indices: [Int], as: T.Type) -> (inputs: [T], labels: [Int32]) {
    var inputs = [T](repeating: -12345, count: indices.count * data.featureCount)
    var labels = [Int32](repeating: -1, count: indices.count)
    indices.withUnsafeBufferPointer { idx in
        inputs.withUnsafeMutableBufferPointer { x in
            labels.withUnsafeMutableBufferPointer { y in
                try! data.gather(indices: idx, into: x.baseAddress!, labels: y.baseAddress!)
            }
        }
    }
    return (inputs, labels)
}

// MARK: - NPY

@Suite struct NPYReaderTests {
    /// NumPy writes each supported dtype and shape (plus format versions 2 and 3 and gzip-compressed files);
    /// for each it prints name|dtype|shape|values, floats as hex bit patterns so the comparison is bit-exact.
    static let writer = """
        import sys, os, gzip
        import numpy as np
        d = sys.argv[1]
        lines = []
        def record(name, a):
            c = np.ascontiguousarray(a)  # (makes 0-d arrays 1-d, so the shape comes from a)
            bits = c.view({4: np.uint32, 8: np.uint64}[c.itemsize]) if c.dtype.kind in 'fi' else c
            lines.append('|'.join([name, str(c.dtype), ','.join(str(s) for s in a.shape),
                                   ' '.join('%x' % int(b) for b in bits.ravel())]))
        def save(name, a, version=None, compress=False):
            p = os.path.join(d, name)
            if compress:
                with gzip.open(p, 'wb') as f: np.save(f, a)
            elif version is None:
                np.save(p, a)
            else:
                with open(p, 'wb') as f: np.lib.format.write_array(f, a, version=version)
            record(name, a)
        rng = np.random.default_rng(7)
        save('u1_5.npy', np.array([0, 1, 127, 128, 255], dtype=np.uint8))
        save('u1_2x3x4.npy', rng.integers(0, 256, size=(2, 3, 4), dtype=np.uint8))
        f4 = np.array([0.0, -0.0, 1.5, -2.25, np.inf, -np.inf, np.nan, 1e-45, 3.4028235e38, 0.1, 1/3, -7e-3],
                      dtype='<f4').reshape(3, 4)
        save('f4_3x4.npy', f4)
        save('f8_2x3x4.npy', rng.standard_normal((2, 3, 4)))
        save('f8_5.npy', np.array([np.pi, -0.0, 1e308, 5e-324, np.nan]))
        save('i8_5.npy', np.array([0, -1, 2**63 - 1, -2**63, 123456789012], dtype='<i8'))
        save('i8_3x4.npy', np.arange(-6, 6, dtype=np.int64).reshape(3, 4))
        save('i4_5.npy', np.array([0, -1, 2**31 - 1, -2**31, 123456789], dtype='<i4'))
        save('f4_scalar.npy', np.array(2.5, dtype=np.float32))
        save('f4_empty_0x3.npy', np.zeros((0, 3), dtype=np.float32))
        save('f4_v2.npy', np.arange(6, dtype=np.float32).reshape(2, 3), version=(2, 0))
        save('f8_v3.npy', np.linspace(-1, 1, 5), version=(3, 0))
        save('f4_3x4.npy.gz', f4, compress=True)
        # gzip is detected by its magic bytes, not by the file name.
        save('u1_gzipped_without_gz_suffix.npy', np.arange(24, dtype=np.uint8).reshape(4, 6), compress=True)
        print('\\n'.join(lines))
        """

    @Test func roundTripsEverySupportedDtypeAndShape() throws {
        let dir = try TemporaryDirectory()
        let listing = try runPython(Self.writer, arguments: [dir.path])
        let lines = listing.split(separator: "\n")
        #expect(lines.count == 14)
        for line in lines {
            let fields = line.split(separator: "|", omittingEmptySubsequences: false).map(String.init)
            try #require(fields.count == 4, "bad line from python: \(line)")
            let (name, dtype) = (fields[0], fields[1])
            let shape = fields[2].isEmpty ? [] : fields[2].split(separator: ",").map { Int($0)! }
            let bits = fields[3].split(separator: " ").map { UInt64($0, radix: 16)! }

            let array = try NPY.read(path: dir.file(name))
            #expect(array.shape == shape, "\(name)")
            #expect(array.dtypeName == dtype, "\(name)")
            #expect(array.count == bits.count, "\(name)")
            let actual: [UInt64]
            switch array.storage {
            case .uint8(let v): actual = v.map { UInt64($0) }
            case .float32(let v): actual = v.map { UInt64($0.bitPattern) }
            case .float64(let v): actual = v.map { $0.bitPattern }
            case .int32(let v): actual = v.map { UInt64(UInt32(bitPattern: $0)) }
            case .int64(let v): actual = v.map { UInt64(bitPattern: $0) }
            }
            #expect(actual == bits, "\(name): values differ from what NumPy wrote")
        }
    }

    @Test func spotChecksDecodedValues() throws {
        let dir = try TemporaryDirectory()
        _ = try runPython(Self.writer, arguments: [dir.path])
        let f4 = try NPY.read(path: dir.file("f4_3x4.npy"))
        guard case .float32(let v) = f4.storage else {
            Issue.record("expected float32, got \(f4.dtypeName)")
            return
        }
        #expect(v[2] == 1.5 && v[3] == -2.25 && v[4] == .infinity && v[6].isNaN && v[8] == Float.greatestFiniteMagnitude)
        #expect(v[1] == 0 && v[1].sign == .minus)
        let i8 = try NPY.read(path: dir.file("i8_5.npy"))
        #expect(i8.storage == .int64([0, -1, .max, .min, 123_456_789_012]))
        #expect(try NPY.read(path: dir.file("i4_5.npy")).storage == .int32([0, -1, .max, .min, 123_456_789]))
        let scalar = try NPY.read(path: dir.file("f4_scalar.npy"))
        #expect(scalar.shape == [] && scalar.storage == .float32([2.5]))
        let u1 = try NPY.read(path: dir.file("u1_gzipped_without_gz_suffix.npy"))
        #expect(u1.shape == [4, 6] && u1.storage == .uint8(Array(0..<24)))
    }

    @Test func rejectsNumPyFilesOfUnsupportedLayoutOrDtype() throws {
        let dir = try TemporaryDirectory()
        _ = try runPython("""
            import sys, os
            import numpy as np
            d = sys.argv[1]
            np.save(os.path.join(d, 'fortran.npy'), np.asfortranarray(np.arange(12, dtype='<f4').reshape(3, 4)))
            np.save(os.path.join(d, 'big_endian.npy'), np.arange(4, dtype='>f4'))
            np.save(os.path.join(d, 'int16.npy'), np.arange(4, dtype=np.int16))
            np.save(os.path.join(d, 'structured.npy'), np.zeros(3, dtype=[('a', '<f4'), ('b', '<i8')]))
            """, arguments: [dir.path])
        let fortran = dir.file("fortran.npy")
        expectDataError(path: fortran, ["Fortran-order arrays are not supported; save with np.ascontiguousarray"]) {
            _ = try NPY.read(path: fortran)
        }
        let big = dir.file("big_endian.npy")
        expectDataError(path: big, ["big-endian", "'>f4'"]) { _ = try NPY.read(path: big) }
        let int16 = dir.file("int16.npy")
        expectDataError(path: int16, ["unsupported dtype", "'<i2'"]) { _ = try NPY.read(path: int16) }
        let structured = dir.file("structured.npy")
        expectDataError(path: structured, ["structured dtypes are not supported"]) { _ = try NPY.read(path: structured) }
    }

    static let goodHeader = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }"

    @Test func readsAHandWrittenFile() throws {
        let dir = try TemporaryDirectory()
        // 1.0, -2.0, 0.5, 3.0, 0.0, 8.0 as little-endian float32.
        let payload: [UInt8] = [0, 0, 0x80, 0x3F, 0, 0, 0, 0xC0, 0, 0, 0, 0x3F, 0, 0, 0x40, 0x40, 0, 0, 0, 0, 0, 0, 0, 0x41]
        let path = try dir.write("hand.npy", npyFile(header: Self.goodHeader, payload: payload))
        let array = try NPY.read(path: path)
        #expect(array.shape == [2, 3])
        #expect(array.storage == .float32([1, -2, 0.5, 3, 0, 8]))
        // Keys in another order, double quotes, no trailing comma, Python 2 longs: still the same dict.
        let other = try dir.write("other.npy", npyFile(
            header: "{\"shape\": (2L, 3L), \"fortran_order\": False, \"descr\": \"<f4\"}", payload: payload))
        #expect(try NPY.read(path: other) == array)
    }

    static let f4x6 = [UInt8](repeating: 0, count: 24)

    static let badFiles: [BadFile] = [
        BadFile(name: "bad magic", bytes: Array("\u{7F}ELF and then some more bytes".utf8), fragments: ["not a .npy file", "0x7F 0x45"]),
        BadFile(name: "empty file", bytes: [], fragments: ["not a .npy file"]),
        BadFile(name: "magic only", bytes: [0x93] + Array("NUMPY".utf8), fragments: ["truncated header: need 8 bytes, file has 6"]),
        BadFile(name: "version 4", bytes: [0x93] + Array("NUMPY".utf8) + [4, 0, 0, 0], fragments: ["unsupported .npy format version 4.0"]),
        BadFile(name: "header length past end of file",
               bytes: [0x93] + Array("NUMPY".utf8) + [1, 0, 0xFF, 0x7F] + Array("{'descr': '<f4'".utf8),
               fragments: ["header length 32767 runs past the end of the file", "25 bytes"]),
        BadFile(name: "missing shape",
               bytes: npyFile(header: "{'descr': '<f4', 'fortran_order': False, }", payload: f4x6),
               fragments: ["missing key 'shape'"]),
        BadFile(name: "missing descr",
               bytes: npyFile(header: "{'fortran_order': False, 'shape': (6,), }", payload: f4x6),
               fragments: ["missing key 'descr'"]),
        BadFile(name: "unterminated dict",
               bytes: npyFile(header: "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), ", payload: f4x6),
               fragments: ["malformed .npy header", "expected a quoted string"]),
        BadFile(name: "missing colon",
               bytes: npyFile(header: "{'descr' '<f4', 'fortran_order': False, 'shape': (2, 3), }", payload: f4x6),
               fragments: ["malformed .npy header", "expected ':'"]),
        BadFile(name: "unknown key",
               bytes: npyFile(header: "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), 'x': 1}", payload: f4x6),
               fragments: ["unexpected key 'x'"]),
        BadFile(name: "duplicate key",
               bytes: npyFile(header: "{'descr': '<f4', 'descr': '<f8', 'fortran_order': False, 'shape': (6,)}", payload: f4x6),
               fragments: ["duplicate key 'descr'"]),
        BadFile(name: "shape is not a tuple",
               bytes: npyFile(header: "{'descr': '<f4', 'fortran_order': False, 'shape': '6'}", payload: f4x6),
               fragments: ["'shape' must be a tuple"]),
        BadFile(name: "one-element tuple without comma",
               bytes: npyFile(header: "{'descr': '<f4', 'fortran_order': False, 'shape': (6)}", payload: f4x6),
               fragments: ["one-element tuple needs a trailing comma"]),
        BadFile(name: "negative dimension",
               bytes: npyFile(header: "{'descr': '<f4', 'fortran_order': False, 'shape': (-6,)}", payload: f4x6),
               fragments: ["expected a non-negative integer"]),
        BadFile(name: "fortran_order not a bool",
               bytes: npyFile(header: "{'descr': '<f4', 'fortran_order': Falsey, 'shape': (6,)}", payload: f4x6),
               fragments: ["expected a string, True, False or a tuple"]),
        BadFile(name: "text after dict",
               bytes: npyFile(header: "{'descr': '<f4', 'fortran_order': False, 'shape': (6,)} junk", payload: f4x6),
               fragments: ["unexpected text after '}'"]),
        BadFile(name: "dimension beyond Int",
               bytes: npyFile(header: "{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999999999999,)}", payload: f4x6),
               fragments: ["dimension too large"]),
        BadFile(name: "shape product overflows",
               bytes: npyFile(header: "{'descr': '<f4', 'fortran_order': False, 'shape': (4294967296, 4294967296)}", payload: f4x6),
               fragments: ["more elements than can be addressed"]),
        BadFile(name: "byte count overflows",
               bytes: npyFile(header: "{'descr': '<f8', 'fortran_order': False, 'shape': (4611686018427387904,)}", payload: f4x6),
               fragments: ["more bytes than can be addressed"]),
        BadFile(name: "truncated payload",
               bytes: npyFile(header: goodHeader, payload: Array(f4x6.dropLast(3))),
               fragments: ["truncated data", "expected 24 data bytes", "[2, 3]", "file has 21"]),
        BadFile(name: "trailing bytes",
               bytes: npyFile(header: goodHeader, payload: f4x6 + [1]),
               fragments: ["trailing bytes", "expected 24 data bytes", "file has 25"]),
        BadFile(name: "big-endian written by hand",
               bytes: npyFile(header: "{'descr': '>f8', 'fortran_order': False, 'shape': (3,)}", payload: f4x6),
               fragments: ["big-endian dtype '>f8'"]),
        BadFile(name: "fortran order written by hand",
               bytes: npyFile(header: "{'descr': '<f4', 'fortran_order': True, 'shape': (2, 3)}", payload: f4x6),
               fragments: ["Fortran-order"]),
        BadFile(name: "unsupported dtype written by hand",
               bytes: npyFile(header: "{'descr': '<c8', 'fortran_order': False, 'shape': (3,)}", payload: f4x6),
               fragments: ["unsupported dtype '<c8'"]),
    ]

    @Test(arguments: badFiles)
    func rejectsMalformedFile(_ bad: BadFile) throws {
        try bad.expectRejected(as: "bad.npy") { _ = try NPY.read(path: $0) }
    }
}

// MARK: - IDX and gzip

@Suite struct IDXReaderTests {
    @Test func readsFashionMNIST() throws {
        let train = try IDX.read(path: fashionMNIST + "train-images-idx3-ubyte.gz")
        #expect(train.shape == [60000, 28, 28])
        #expect(train.bytes.count == 60000 * 784)
        let trainLabels = try IDX.read(path: fashionMNIST + "train-labels-idx1-ubyte.gz")
        #expect(trainLabels.shape == [60000])
        let test = try IDX.read(path: fashionMNIST + "t10k-images-idx3-ubyte.gz")
        #expect(test.shape == [10000, 28, 28])
        let testLabels = try IDX.read(path: fashionMNIST + "t10k-labels-idx1-ubyte.gz")
        #expect(testLabels.shape == [10000])

        // Reference values obtained independently with python3's gzip module:
        //   d = gzip.open('train-labels-idx1-ubyte.gz').read(); list(d[8:18])
        //   im = gzip.open('train-images-idx3-ubyte.gz').read(); sum(im[16:16+784])
        // and likewise for the t10k files.
        #expect(Array(trainLabels.bytes.prefix(10)) == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5])
        #expect(train.bytes.prefix(784).reduce(0) { $0 + Int($1) } == 76247)
        #expect(Array(testLabels.bytes.prefix(10)) == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7])
        #expect(test.bytes.prefix(784).reduce(0) { $0 + Int($1) } == 33456)
    }

    @Test func readsRawAndGzippedFilesAlike() throws {
        let dir = try TemporaryDirectory()
        let payload = (0..<24).map { UInt8($0 * 10) }
        let raw = try dir.write("raw-idx3-ubyte", idxFile(dims: [2, 3, 4], payload: payload))
        let array = try IDX.read(path: raw)
        #expect(array == IDXArray(shape: [2, 3, 4], bytes: payload))
        // Same file gzipped by Python, under a name without .gz: detected by magic.
        let zipped = dir.file("zipped-idx3-ubyte")
        _ = try runPython("import gzip, sys; open(sys.argv[2], 'wb').write(gzip.compress(open(sys.argv[1], 'rb').read()))",
                          arguments: [raw, zipped])
        #expect(try IDX.read(path: zipped) == array)
        #expect(try readFileBytes(path: zipped) == (try readFileBytes(path: raw)))
        let oneDim = try dir.write("labels", idxFile(dims: [3], payload: [7, 8, 9]))
        #expect(try IDX.read(path: oneDim) == IDXArray(shape: [3], bytes: [7, 8, 9]))
        let empty = try dir.write("empty", idxFile(dims: [0, 28, 28], payload: []))
        #expect(try IDX.read(path: empty) == IDXArray(shape: [0, 28, 28], bytes: []))
    }

    static let badFiles: [BadFile] = [
        BadFile(name: "wrong magic", bytes: [0x50, 0x4B, 3, 4] + [UInt8](repeating: 0, count: 20),
               fragments: ["not an IDX file: magic bytes 0x50 0x4B"]),
        BadFile(name: "shorter than the fixed header", bytes: [0, 0, 8],
               fragments: ["truncated header: need 4 bytes, file has 3"]),
        BadFile(name: "truncated dimensions", bytes: [0, 0, 8, 3, 0, 0, 0xEA, 0x60, 0, 0],
               fragments: ["truncated header: need 16 bytes, file has 10"]),
        BadFile(name: "truncated payload", bytes: idxFile(dims: [60000, 28, 28], payload: [UInt8](repeating: 0, count: 1000)),
               fragments: ["truncated data", "expected 47040000 data bytes for shape [60000, 28, 28], file has 1000"]),
        BadFile(name: "trailing bytes", bytes: idxFile(dims: [2, 2], payload: [1, 2, 3, 4, 5]),
               fragments: ["trailing bytes", "expected 4 data bytes for shape [2, 2], file has 5"]),
        BadFile(name: "ndims 0", bytes: [0, 0, 8, 0, 1, 2, 3],
               fragments: ["unsupported number of dimensions 0"]),
        BadFile(name: "ndims 5", bytes: idxFile(dims: [1, 1, 1, 1, 1], payload: [0]),
               fragments: ["unsupported number of dimensions 5"]),
        BadFile(name: "dimension product overflows", bytes: idxFile(dims: [.max, .max, .max, .max], payload: [1, 2, 3]),
               fragments: ["shape [4294967295, 4294967295, 4294967295, 4294967295] has more elements than can be addressed"]),
        BadFile(name: "float32 type", bytes: idxFile(type: 0x0D, dims: [2], payload: [UInt8](repeating: 0, count: 8)),
               fragments: ["unsupported IDX data type 0x0D (float32)"]),
        BadFile(name: "int32 type", bytes: idxFile(type: 0x0C, dims: [2], payload: [UInt8](repeating: 0, count: 8)),
               fragments: ["unsupported IDX data type 0x0C (int32)"]),
        BadFile(name: "unknown type", bytes: idxFile(type: 0x42, dims: [2], payload: [0, 0]),
               fragments: ["unknown IDX data type 0x42"]),
        BadFile(name: "empty file", bytes: [], fragments: ["truncated header: need 4 bytes, file has 0"]),
        BadFile(name: "gzip magic only", bytes: [0x1F, 0x8B], fragments: ["truncated gzip stream"]),
        BadFile(name: "gzip with bad method", bytes: [0x1F, 0x8B, 0x07, 0, 0, 0, 0, 0, 0, 3, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10],
               fragments: ["corrupt gzip stream"]),
    ]

    @Test(arguments: badFiles)
    func rejectsMalformedFile(_ bad: BadFile) throws {
        try bad.expectRejected(as: "bad-idx") { _ = try IDX.read(path: $0) }
    }

    @Test func rejectsDamagedRealGzipFiles() throws {
        let dir = try TemporaryDirectory()
        let original = try readRawBytes(fashionMNIST + "train-labels-idx1-ubyte.gz")
        #expect(original.count == 29491)

        let half = try dir.write("half.gz", Array(original.prefix(original.count / 2)))
        expectDataError(path: half, ["truncated gzip stream"]) { _ = try IDX.read(path: half) }
        // Only the 8-byte trailer missing: all data inflates but the stream never ends.
        let noTrailer = try dir.write("no-trailer.gz", Array(original.dropLast(8)))
        expectDataError(path: noTrailer, ["truncated gzip stream"]) { _ = try IDX.read(path: noTrailer) }

        var badCRC = original
        badCRC[badCRC.count - 8] ^= 0xFF
        let crc = try dir.write("bad-crc.gz", badCRC)
        expectDataError(path: crc, ["corrupt gzip stream: incorrect data check"]) { _ = try IDX.read(path: crc) }

        let garbage = try dir.write("garbage.gz", original + Array("junk".utf8))
        expectDataError(path: garbage, ["4 trailing bytes after the gzip stream"]) { _ = try IDX.read(path: garbage) }

        let missing = dir.file("does-not-exist.gz")
        expectDataError(path: missing, ["cannot open file", "No such file"]) { _ = try IDX.read(path: missing) }
        expectDataError(path: dir.path, ["read failed"]) { _ = try readFileBytes(path: dir.path) }
    }

    @Test func boundsTheDecompressedSize() throws {
        let path = fashionMNIST + "train-labels-idx1-ubyte.gz"  // 29491 bytes inflating to 60008
        expectDataError(path: path, ["decompressed size exceeds the limit of 60007 bytes"]) {
            _ = try readFileBytes(path: path, maxBytes: 60007)
        }
        #expect(try readFileBytes(path: path, maxBytes: 60008).count == 60008)
        expectDataError(path: path, ["file of 29491 bytes is larger than the 1000 bytes bpworker reads into memory"]) { _ = try readFileBytes(path: path, maxBytes: 1000) }
        // A gzip bomb: 64 MiB of zeros in about 64 KiB.
        let dir = try TemporaryDirectory()
        let bomb = dir.file("bomb")
        _ = try runPython("import gzip, sys; open(sys.argv[1], 'wb').write(gzip.compress(bytes(64 << 20), 9))",
                          arguments: [bomb])
        expectDataError(path: bomb, ["decompressed size exceeds the limit of 1048576 bytes"]) {
            _ = try readFileBytes(path: bomb, maxBytes: 1 << 20)
        }
    }

    @Test func inflatesConcatenatedGzipMembers() throws {
        let dir = try TemporaryDirectory()
        let path = dir.file("two-members")
        _ = try runPython("""
            import gzip, sys
            open(sys.argv[1], 'wb').write(gzip.compress(b'hello, ') + gzip.compress(b'world' * 1000))
            """, arguments: [path])
        let bytes = try readFileBytes(path: path)
        #expect(bytes == Array(("hello, " + String(repeating: "world", count: 1000)).utf8))
    }

    func readRawBytes(_ path: String) throws -> [UInt8] {
        [UInt8](try Data(contentsOf: URL(fileURLWithPath: path)))
    }
}

// MARK: - Dataset

@Suite struct DatasetTests {
    @Test func loadsFashionMNIST() throws {
        var train = try Dataset.loadIDX(
            images: fashionMNIST + "train-images-idx3-ubyte.gz", labels: fashionMNIST + "train-labels-idx1-ubyte.gz")
        #expect(train.count == 60000)
        #expect(train.featureCount == 784)
        #expect(train.maxLabel == 9)
        #expect(train.classCount == 10)
        #expect(train.name == fashionMNIST + "train-images-idx3-ubyte.gz")
        var perClass = [Int](repeating: 0, count: 10)
        for label in train.labels { perClass[Int(label)] += 1 }
        #expect(perClass == [Int](repeating: 6000, count: 10))
        guard case .uint8(let pixels) = train.features else {
            Issue.record("Fashion-MNIST pixels should stay uint8")
            return
        }
        #expect(pixels.count == 60000 * 784)
        try train.validateLabels(classCount: 10)

        // Reference statistics of x/255 over the training set, from numpy:
        //   x = np.frombuffer(gzip.open(...).read()[16:], np.uint8) / 255; x.mean(), x.std()
        let (mean, std) = try train.standardize()
        #expect(abs(mean - 0.2860405969887955) < 1e-12)
        #expect(abs(std - 0.35302424451492254) < 1e-12)

        var test = try Dataset.loadIDX(
            images: fashionMNIST + "t10k-images-idx3-ubyte.gz", labels: fashionMNIST + "t10k-labels-idx1-ubyte.gz")
        #expect(test.count == 10000)
        test.normalize(like: train)
        #expect(test.scale == train.scale && test.shift == train.shift)
        let batch = gathered(test, [0], as: Float.self)
        #expect(batch.labels == [9])
        // Pixel sum of test image 0 is 33456 (python gzip, as above): the normalised row sums to sum*scale + 784*shift.
        let rowSum = batch.inputs.reduce(0.0) { $0 + Double($1) }
        #expect(abs(rowSum - (33456 * train.scale + 784 * train.shift)) < 1e-3)
    }

    @Test func mismatchedImageAndLabelCountsNameBothFiles() throws {
        let dir = try TemporaryDirectory()
        let images = try dir.write("images", idxFile(dims: [3, 2, 2], payload: [UInt8](repeating: 1, count: 12)))
        let labels = try dir.write("labels", idxFile(dims: [4], payload: [0, 1, 2, 3]))
        expectDataError(path: images, ["has 3 images", labels, "has 4 labels"]) {
            _ = try Dataset.loadIDX(images: images, labels: labels)
        }
    }

    @Test func loadIDXRejectsWrongRanks() throws {
        let dir = try TemporaryDirectory()
        let images = try dir.write("images", idxFile(dims: [3, 4], payload: [UInt8](repeating: 1, count: 12)))
        let labels = try dir.write("labels", idxFile(dims: [3], payload: [0, 1, 2]))
        let data = try Dataset.loadIDX(images: images, labels: labels)
        #expect(data.count == 3 && data.featureCount == 4 && data.labels == [0, 1, 2])
        expectDataError(path: labels, ["expected images shaped [N, rows, cols] or [N, D], got [3]"]) {
            _ = try Dataset.loadIDX(images: labels, labels: labels)
        }
        expectDataError(path: images, ["expected labels shaped [N], got [3, 4]"]) {
            _ = try Dataset.loadIDX(images: images, labels: images)
        }
    }

    @Test func initValidatesCountsAndLabels() throws {
        expectDataError(path: "mem", ["5 feature values do not make 2 samples of 3 features"]) {
            _ = try Dataset(name: "mem", featureCount: 3, features: .uint8([1, 2, 3, 4, 5]), labels: [0, 1])
        }
        expectDataError(path: "mem", ["negative label -3 at index 1"]) {
            _ = try Dataset(name: "mem", featureCount: 1, features: .float32([1, 2]), labels: [0, -3])
        }
        expectDataError(path: "mem", ["feature count must be positive"]) {
            _ = try Dataset(name: "mem", featureCount: 0, features: .float32([]), labels: [])
        }
        let empty = try Dataset(name: "mem", featureCount: 2, features: .float32([]), labels: [])
        #expect(empty.count == 0 && empty.maxLabel == -1 && empty.classCount == 0)
    }

    @Test func validateLabelsNamesTheFirstOffendingIndexAndValue() throws {
        let data = try Dataset(name: "labels.npy", featureCount: 1, features: .uint8([0, 0, 0, 0, 0]), labels: [0, 1, 5, 2, 7])
        #expect(data.maxLabel == 7)
        try data.validateLabels(classCount: 8)
        expectDataError(path: "labels.npy", ["label 5 at index 2", "3 classes"]) { try data.validateLabels(classCount: 3) }
        expectDataError(path: "labels.npy", ["label 7 at index 4", "6 classes"]) { try data.validateLabels(classCount: 6) }
    }

    static func randomBytes(_ n: Int, seed: UInt64) -> [UInt8] {
        var state = seed
        return (0..<n).map { _ in
            state = state &* 6364136223846793005 &+ 1442695040888963407
            return UInt8(truncatingIfNeeded: state >> 56) / 2 + 20  // a range that does not start at 0
        }
    }

    @Test func standardizeGivesZeroMeanUnitStd() throws {
        let n = 200, d = 13
        let bytes = Self.randomBytes(n * d, seed: 3)
        let labels = (0..<n).map { Int32($0 % 4) }
        var u8 = try Dataset(name: "u8", featureCount: d, features: .uint8(bytes), labels: labels)
        #expect(u8.scale == 1.0 / 255 && u8.shift == 0)
        let raw = moments(bytes.map { Double($0) / 255 })
        let (mean, std) = try u8.standardize()
        #expect(abs(mean - raw.mean) < 1e-12 && abs(std - raw.std) < 1e-12)
        #expect(mean > 0.1 && std > 0.01)  // the data really had to be moved and scaled

        let all = Array(0..<n)
        let u8Stats = moments(gathered(u8, all, as: Double.self).inputs)
        #expect(abs(u8Stats.mean) < 1e-12 && abs(u8Stats.std - 1) < 1e-12)

        let floats = bytes.map { Float($0) * 0.37 - 11 }
        var f32 = try Dataset(name: "f32", featureCount: d, features: .float32(floats), labels: labels)
        #expect(f32.scale == 1 && f32.shift == 0)
        let f32Raw = moments(floats.map { Double($0) })
        let f32Result = try f32.standardize()
        #expect(abs(f32Result.mean - f32Raw.mean) < 1e-9 && abs(f32Result.std - f32Raw.std) < 1e-9)
        let f32Stats = moments(gathered(f32, all, as: Double.self).inputs)
        #expect(abs(f32Stats.mean) < 1e-12 && abs(f32Stats.std - 1) < 1e-12)
        let f32Float = moments(gathered(f32, all, as: Float.self).inputs.map { Double($0) })
        #expect(abs(f32Float.mean) < 1e-6 && abs(f32Float.std - 1) < 1e-6)

        // Constant data: centred only.
        var constant = try Dataset(name: "c", featureCount: 2, features: .float32([4, 4, 4, 4]), labels: [0, 0])
        #expect(try constant.standardize() == (mean: 4, std: 0))
        #expect(gathered(constant, [0, 1], as: Double.self).inputs == [0, 0, 0, 0])
    }

    @Test func gatherMatchesDirectComputationInFloatAndDouble() throws {
        let n = 37, d = 29
        let bytes = Self.randomBytes(n * d, seed: 11)
        let floats = bytes.enumerated().map { Float($1) * 0.5 - Float($0 % 7) }
        let labels = (0..<n).map { Int32(($0 * 7) % 10) }
        var sets = [
            try Dataset(name: "u8", featureCount: d, features: .uint8(bytes), labels: labels),
            try Dataset(name: "f32", featureCount: d, features: .float32(floats), labels: labels),
        ]
        for k in sets.indices {
            sets[k].scale = 0.013
            sets[k].shift = -0.7
        }
        // A permutation with repeats, in no particular order.
        let indices = [36, 0, 5, 5, 17, 1, 35, 2, 0, 20]
        for data in sets {
            let stored: (Int) -> Double
            switch data.features {
            case .uint8(let v): stored = { Double(v[$0]) }
            case .float32(let v): stored = { Double(v[$0]) }
            case .mapped, .reader: Issue.record("in-memory sets only here"); return
            }
            let doubles = gathered(data, indices, as: Double.self)
            let singles = gathered(data, indices, as: Float.self)
            #expect(doubles.labels == indices.map { labels[$0] }, "\(data.name)")
            #expect(singles.labels == doubles.labels, "\(data.name)")
            var worstDouble = 0.0, worstFloat = 0.0
            for (row, index) in indices.enumerated() {
                for j in 0..<d {
                    let expected = stored(index * d + j) * 0.013 - 0.7
                    worstDouble = max(worstDouble, abs(doubles.inputs[row * d + j] - expected))
                    worstFloat = max(worstFloat, abs(Double(singles.inputs[row * d + j]) - expected))
                }
            }
            #expect(worstDouble < 1e-12, "\(data.name)")
            #expect(worstFloat < 1e-6, "\(data.name)")
            #expect(worstFloat > 0 || data.name == "u8", "Float output should show Float rounding")
        }
    }

    @Test func gatherPutsEachSampleInItsRow() throws {
        // Sample i has label i and features all equal to i, so a misplaced row or label is visible.
        let n = 50, d = 6
        let features = (0..<n * d).map { UInt8($0 / d) }
        let data = try Dataset(name: "rows", featureCount: d, features: .uint8(features), labels: (0..<n).map { Int32($0) })
        let indices = [49, 3, 27, 0, 14, 3, 48]
        let batch = gathered(data, indices, as: Float.self)
        #expect(batch.labels == indices.map { Int32($0) })
        for (row, index) in indices.enumerated() {
            let expected = Float(Double(index) / 255)
            #expect(batch.inputs[row * d..<(row + 1) * d].allSatisfy { $0 == expected }, "row \(row)")
        }
        // An empty batch writes nothing.
        var untouched: [Float] = [42]
        var label: [Int32] = [42]
        [Int]().withUnsafeBufferPointer { idx in
            try! data.gather(indices: idx, into: &untouched, labels: &label)
        }
        #expect(untouched == [42] && label == [42])
    }

    @Test func gatherStopsOnAnOutOfRangeIndex() async {
        await #expect(processExitsWith: .failure) {
            let data = try Dataset(name: "tiny", featureCount: 2, features: .uint8([1, 2, 3, 4]), labels: [0, 1])
            var inputs = [Float](repeating: 0, count: 2)
            var labels = [Int32](repeating: 0, count: 1)
            [2].withUnsafeBufferPointer { try! data.gather(indices: $0, into: &inputs, labels: &labels) }
        }
    }

    @Test func loadsNPYDataSets() throws {
        let dir = try TemporaryDirectory()
        _ = try runPython("""
            import sys, os
            import numpy as np
            d = sys.argv[1]
            p = lambda n: os.path.join(d, n)
            x = np.arange(24, dtype=np.float64).reshape(4, 2, 3) / 8 - 1
            np.save(p('x_f8.npy'), x)
            np.save(p('x_u1.npy'), np.arange(12, dtype=np.uint8).reshape(4, 3))
            np.save(p('x_f4.npy'), np.arange(8, dtype=np.float32).reshape(4, 2))
            np.save(p('x_i8.npy'), np.arange(8, dtype=np.int64).reshape(4, 2))
            np.save(p('y_i8.npy'), np.array([3, 0, 2, 1], dtype=np.int64))
            np.save(p('y_u1.npy'), np.array([1, 1, 0, 4], dtype=np.uint8))
            np.save(p('y_big.npy'), np.array([0, 2**31, 1, 1], dtype=np.int64))
            np.save(p('y_neg.npy'), np.array([0, 1, -1, 1], dtype=np.int64))
            np.save(p('y_i4.npy'), np.array([2, 0, 1, 3], dtype=np.int32))
            np.save(p('y_neg_i4.npy'), np.array([0, -5, 1, 1], dtype=np.int32))
            np.save(p('x_i4.npy'), np.arange(8, dtype=np.int32).reshape(4, 2))
            np.save(p('y_f4.npy'), np.zeros(4, dtype=np.float32))
            np.save(p('y_2d.npy'), np.zeros((4, 1), dtype=np.int64))
            np.save(p('y_short.npy'), np.zeros(3, dtype=np.int64))
            """, arguments: [dir.path])
        let f8 = try Dataset.loadNPY(features: dir.file("x_f8.npy"), labels: dir.file("y_i8.npy"))
        #expect(f8.count == 4 && f8.featureCount == 6 && f8.labels == [3, 0, 2, 1] && f8.maxLabel == 3)
        guard case .float32(let values) = f8.features else {
            Issue.record("float64 features should be stored as float32")
            return
        }
        #expect(values == (0..<24).map { Float($0) / 8 - 1 })

        let u1 = try Dataset.loadNPY(features: dir.file("x_u1.npy"), labels: dir.file("y_u1.npy"))
        #expect(u1.featureCount == 3 && u1.labels == [1, 1, 0, 4])
        guard case .uint8(let pixels) = u1.features else {
            Issue.record("uint8 features should stay uint8")
            return
        }
        #expect(pixels == Array(0..<12))
        let f4 = try Dataset.loadNPY(features: dir.file("x_f4.npy"), labels: dir.file("y_u1.npy"))
        #expect(gathered(f4, [3], as: Double.self).inputs == [6, 7])

        let x = dir.file("x_f4.npy")
        expectDataError(path: dir.file("y_big.npy"), ["label 2147483648 at index 1", "outside 0...2147483647"]) {
            _ = try Dataset.loadNPY(features: x, labels: dir.file("y_big.npy"))
        }
        expectDataError(path: dir.file("y_neg.npy"), ["label -1 at index 2"]) {
            _ = try Dataset.loadNPY(features: x, labels: dir.file("y_neg.npy"))
        }
        expectDataError(path: dir.file("y_f4.npy"), ["unsupported label dtype float32"]) {
            _ = try Dataset.loadNPY(features: x, labels: dir.file("y_f4.npy"))
        }
        expectDataError(path: dir.file("y_2d.npy"), ["expected labels shaped [N], got [4, 1]"]) {
            _ = try Dataset.loadNPY(features: x, labels: dir.file("y_2d.npy"))
        }
        expectDataError(path: x, ["has 4 samples", dir.file("y_short.npy"), "has 3 labels"]) {
            _ = try Dataset.loadNPY(features: x, labels: dir.file("y_short.npy"))
        }
        expectDataError(path: dir.file("x_i8.npy"), ["unsupported feature dtype int64"]) {
            _ = try Dataset.loadNPY(features: dir.file("x_i8.npy"), labels: dir.file("y_i8.npy"))
        }
        // A pipe or a device, which has no size to check and no position to read from, is named as such (a process
        // substitution, `<(...)`, was refused as "not a .npy file: magic bytes []").
        expectDataError(path: "/dev/null", ["not a regular file (a pipe or a device)"]) {
            _ = try Dataset.loadNPY(features: "/dev/null", labels: dir.file("y_i8.npy"))
        }
        // int32 labels (NumPy's default integer on Windows, torch's int32): they were refused.
        #expect(try Dataset.loadNPY(features: x, labels: dir.file("y_i4.npy")).labels == [2, 0, 1, 3])
        expectDataError(path: dir.file("y_neg_i4.npy"), ["label -5 at index 1"]) {
            _ = try Dataset.loadNPY(features: x, labels: dir.file("y_neg_i4.npy"))
        }
        expectDataError(path: dir.file("x_i4.npy"), ["unsupported feature dtype int32"]) {
            _ = try Dataset.loadNPY(features: dir.file("x_i4.npy"), labels: dir.file("y_i4.npy"))
        }
    }
}
