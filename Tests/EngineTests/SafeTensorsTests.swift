import Engine
import Foundation
import Testing

@Suite("safetensors files", .serialized)
struct SafeTensorsTests {
    /// This test's files; removed with the suite instance when the test ends.
    let scratch: TemporaryDirectory
    let directory: URL

    init() throws {
        scratch = try TemporaryDirectory()
        directory = URL(fileURLWithPath: scratch.path)
    }

    func path(_ name: String) -> String { directory.appendingPathComponent(name).path }

    /// A writer holding a [2, 3] float32, a [4] float64 and a [2] int64 tensor.
    func sampleWriter() -> SafeTensorsWriter {
        var writer = SafeTensorsWriter()
        let w: [Float] = [1.5, -2, 0.25, .pi, -0.0, 1e-30]
        let b: [Double] = [1.0 / 3, -1e300, 0, 42]
        w.withUnsafeBufferPointer { writer.add(name: "0.weight", shape: [2, 3], floats: $0) }
        b.withUnsafeBufferPointer { writer.add(name: "0.bias", shape: [4], doubles: $0) }
        writer.add(name: "step", shape: [2], int64s: [7, -9_000_000_000])
        writer.metadata = ["format": "bpworker-model", "step": "7"]
        return writer
    }

    @Test func roundTripIsBitExact() throws {
        try sampleWriter().write(to: path("a.safetensors"))
        let file = try SafeTensorsFile(path: path("a.safetensors"))
        #expect(file.metadata.filter { !$0.key.hasPrefix("bpworker_") } == ["format": "bpworker-model", "step": "7"])
        #expect(try file.verify() == .intact)
        #expect(file.names == ["0.weight", "0.bias", "step"])
        #expect(try file.floats("0.weight").map(\.bitPattern) == [Float(1.5), -2, 0.25, .pi, -0.0, 1e-30].map(\.bitPattern))
        #expect(try file.doubles("0.bias") == [1.0 / 3, -1e300, 0, 42])
        #expect(try file.int64s("step") == [7, -9_000_000_000])
        #expect(file.tensors["0.weight"]?.shape == [2, 3])
        try file.expect("0.weight", shape: [2, 3])
        #expect(throws: DataError.self) { try file.expect("0.weight", shape: [3, 2]) }
        #expect(throws: DataError(path: path("a.safetensors"), reason: "missing tensor '9.weight'")) {
            try file.floats("9.weight")
        }
        // The data section starts 8-byte aligned, as the reference writer makes it.
        let bytes = try Data(contentsOf: URL(fileURLWithPath: path("a.safetensors")))
        let headerLength = bytes.prefix(8).withUnsafeBytes { UInt64(littleEndian: $0.loadUnaligned(as: UInt64.self)) }
        #expect(headerLength % 8 == 0)
    }

    // MARK: - The real Python client

    func python(_ script: String) throws -> String {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        process.arguments = ["python3", "-c", script]
        let output = Pipe(), errors = Pipe()
        process.standardOutput = output
        process.standardError = errors
        try process.run()
        let data = output.fileHandleForReading.readDataToEndOfFile()
        let message = errors.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        guard process.terminationStatus == 0 else {
            throw DataError(path: "python3", reason: "failed (install with `pip install numpy safetensors`, "
                + "as scripts/setup --python does): \(String(decoding: message, as: UTF8.self))")
        }
        return String(decoding: data, as: UTF8.self)
    }

    @Test func pythonReadsWhatBpworkerWrites() throws {
        try sampleWriter().write(to: path("swift.safetensors"))
        let out = try python("""
            import json, numpy as np
            from safetensors import safe_open
            from safetensors.numpy import load_file
            t = load_file("\(path("swift.safetensors"))")
            with safe_open("\(path("swift.safetensors"))", framework="np") as f: meta = f.metadata()
            print(json.dumps({k: {"dtype": str(v.dtype), "shape": list(v.shape),
                                  "bits": v.ravel().view(np.uint32 if v.dtype == np.float32 else np.uint64).tolist()
                                          if v.dtype != np.int64 else v.tolist()} for k, v in t.items()} | {"__meta__": meta}))
            """)
        let json = try JSONSerialization.jsonObject(with: Data(out.utf8)) as! [String: Any]
        let weight = json["0.weight"] as! [String: Any]
        #expect(weight["dtype"] as? String == "float32")
        #expect(weight["shape"] as? [Int] == [2, 3])
        #expect((weight["bits"] as? [NSNumber])?.map(\.uint32Value) == [Float(1.5), -2, 0.25, .pi, -0.0, 1e-30].map(\.bitPattern))
        let bias = json["0.bias"] as! [String: Any]
        #expect(bias["dtype"] as? String == "float64")
        #expect((bias["bits"] as? [NSNumber])?.map(\.uint64Value) == [1.0 / 3, -1e300, 0, 42].map(\.bitPattern))
        #expect((json["step"] as! [String: Any])["bits"] as? [Int] == [7, -9_000_000_000])
        #expect((json["__meta__"] as? [String: String])?.filter { !$0.key.hasPrefix("bpworker_") } == ["format": "bpworker-model", "step": "7"])
    }

    @Test func bpworkerReadsWhatPythonWrites() throws {
        _ = try python("""
            import numpy as np
            from safetensors.numpy import save_file
            save_file({"2.weight": np.arange(12, dtype=np.float32).reshape(3, 4) / 7,
                       "2.bias": np.array([0.1, -0.2, 0.3], dtype=np.float64),
                       "count": np.array([5], dtype=np.int64)},
                      "\(path("python.safetensors"))", metadata={"source": "python"})
            """)
        let file = try SafeTensorsFile(path: path("python.safetensors"))
        #expect(file.metadata == ["source": "python"])
        #expect(file.tensors["2.weight"]?.shape == [3, 4])
        #expect(try file.floats("2.weight") == (0..<12).map { Float($0) / 7 })
        #expect(try file.doubles("2.bias") == [0.1, -0.2, 0.3])
        #expect(try file.int64s("count") == [5])
    }

    /// Names that are one string to Swift and two to the format: precomposed "é" (U+00E9) and "e" with a combining
    /// accent (U+0301). Python's client writes and reads both tensors; bpworker parsed the header into one and called
    /// the file damaged for a gap of 8 bytes. It now says why it refuses the file; a name given twice likewise. Keys
    /// with escaped quotes, and brackets inside metadata strings, are no clash.
    @Test func namesSwiftCannotTellApartAreRefusedWithTheReason() throws {
        let out = try python("""
            import numpy as np
            from safetensors.numpy import save_file
            from safetensors import safe_open
            save_file({"w\\u00e9": np.ones(3, np.float32), "we\\u0301": np.zeros(2, np.float32)}, "\(path("forms.safetensors"))")
            with safe_open("\(path("forms.safetensors"))", framework="np") as f: print(len(list(f.keys())))
            """)
        #expect(out.trimmingCharacters(in: .whitespacesAndNewlines) == "2")
        #expect {
            try SafeTensorsFile(path: path("forms.safetensors"))
        } throws: { error in
            let reason = (error as? DataError)?.reason ?? ""
            return reason.contains("are the same text in different Unicode forms") && reason.contains("U+00E9")
                && reason.contains("U+0301")
        }
        let entry = #"{"dtype":"F32","shape":[1],"data_offsets":"#
        let twice = try forge("twice.safetensors", header: "{\"a\":\(entry)[0,4]}, \"a\":\(entry)[4,8]}}", data: Array(repeating: 0, count: 8))
        #expect(throws: DataError(path: twice, reason: "tensor 'a' is named twice in the header")) { try SafeTensorsFile(path: twice) }
        let escaped = try forge("escaped.safetensors", header: #"{"x\"y":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"#
                                + #""__metadata__":{"k":"[{,}]\"\\","l":"a"}}"#, data: [0, 0, 0, 0])
        let file = try SafeTensorsFile(path: escaped)
        #expect(file.names == ["x\"y"] && file.metadata == ["k": "[{,}]\"\\", "l": "a"])
    }

    // MARK: - Untrusted files

    /// Writes `header` JSON (unpadded) followed by `data` bytes, with the given header length word.
    func forge(_ name: String, header: String, data: [UInt8], headerLength: UInt64? = nil) throws -> String {
        var bytes = Data()
        withUnsafeBytes(of: (headerLength ?? UInt64(header.utf8.count)).littleEndian) { bytes.append(contentsOf: $0) }
        bytes.append(Data(header.utf8))
        bytes.append(contentsOf: data)
        try bytes.write(to: URL(fileURLWithPath: path(name)))
        return path(name)
    }

    @Test func corruptFilesAreClearErrors() throws {
        let valid = path("valid.safetensors")
        try sampleWriter().write(to: valid)
        let good = try Data(contentsOf: URL(fileURLWithPath: valid))
        let eight = [UInt8](repeating: 0, count: 8)
        var cases: [(String, String)] = []
        func add(_ file: String, _ expected: String) { cases.append((file, expected)) }

        try good.prefix(5).write(to: URL(fileURLWithPath: path("tiny")))
        add(path("tiny"), "shorter than the 8-byte header length")
        try good.prefix(40).write(to: URL(fileURLWithPath: path("cut-header")))
        add(path("cut-header"), "runs past the end of the file")
        try good.prefix(good.count - 3).write(to: URL(fileURLWithPath: path("cut-data")))
        add(path("cut-data"), "truncated (or its header damaged): its header describes")
        // Cut right after the header: every tensor's data is missing, and the message says so, not one tensor's.
        let headerEnd = 8 + Int(good.withUnsafeBytes { UInt64(littleEndian: $0.loadUnaligned(as: UInt64.self)) })
        try good.prefix(headerEnd).write(to: URL(fileURLWithPath: path("cut-after-header")))
        add(path("cut-after-header"), "truncated (or its header damaged): its header describes \(good.count - headerEnd) bytes "
            + "of tensor data and the file holds 0 (\(good.count - headerEnd) bytes missing)")
        add(try forge("huge", header: "{}", data: [], headerLength: 1 << 40), "huge header")
        add(try forge("zero", header: "", data: eight, headerLength: 0), "header length is 0")
        add(try forge("notjson", header: "{nope", data: []), "not valid JSON")
        add(try forge("array", header: "[1, 2]", data: []), "not a JSON object")
        add(try forge("overlap", header: #"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"b":{"dtype":"U8","shape":[4],"data_offsets":[2,6]}}"#,
                      data: eight), "tensor 'b': data_offsets overlap")
        add(try forge("range", header: #"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#, data: eight),
            "truncated (or its header damaged): its header describes 16 bytes of tensor data and the file holds 8")
        add(try forge("gap", header: #"{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"b":{"dtype":"U8","shape":[2],"data_offsets":[4,6]}}"#,
                      data: [UInt8](repeating: 0, count: 6)), "tensor 'b': gap of 2 bytes")
        add(try forge("trailing", header: #"{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}"#, data: eight),
            "6 bytes after the last tensor")
        add(try forge("dtype", header: #"{"a":{"dtype":"Q7","shape":[2],"data_offsets":[0,8]}}"#, data: eight),
            "tensor 'a': unsupported dtype 'Q7'")
        add(try forge("shape", header: #"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#, data: eight),
            "tensor 'a': shape [3] of F32 needs 12 bytes, data_offsets give 8")
        add(try forge("nooffsets", header: #"{"a":{"dtype":"F32","shape":[2]}}"#, data: eight),
            "tensor 'a': missing or malformed data_offsets")
        add(try forge("negative", header: #"{"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}}"#, data: eight),
            "tensor 'a': negative dimension")
        // A shape whose element count overflows Int must be refused by the shape check itself: the fragment is
        // the one error that names it, not "shape ... needs N bytes", which a wrapped count would produce instead.
        add(try forge("overflow", header: #"{"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,8]}}"#, data: eight),
            "tensor 'a': shape [4294967296, 4294967296] holds more elements than the file")
        // 8 * 2^61 wraps to exactly 0 elements, which the empty data_offsets of 'a' would match, and 'b' covers the
        // data section: without the overflow check this file would load.
        add(try forge("wraps", header: #"{"a":{"dtype":"F32","shape":[8,2305843009213693952],"data_offsets":[0,0]},"b":{"dtype":"U8","shape":[8],"data_offsets":[0,8]}}"#,
                      data: eight), "tensor 'a': shape [8, 2305843009213693952] holds more elements than the file")
        // A zero after a large dimension: the partial product must not be compared with the file before the zero.
        add(try forge("empty-then-shape", header: #"{"e":{"dtype":"F32","shape":[100000,0],"data_offsets":[0,0]},"a":{"dtype":"F32","shape":[100000],"data_offsets":[0,8]}}"#,
                      data: eight), "tensor 'a': shape [100000] holds more elements than the file")
        add(try forge("bool", header: #"{"a":{"dtype":"U8","shape":[true],"data_offsets":[0,1]}}"#, data: [0]),
            "is not a list of integers")
        add(try forge("meta", header: #"{"__metadata__":{"step":7}}"#, data: []), "__metadata__ value for 'step' is not a string")
        for (file, expected) in cases {
            do {
                _ = try SafeTensorsFile(path: file)
                Issue.record("\(file) was accepted")
            } catch let error as DataError {
                #expect(error.path == file)
                #expect(error.reason.contains(expected), "\(file): \(error.reason)")
            }
        }
    }

    /// An empty tensor is valid whatever its other dimensions (Python's safetensors writes [100000, 0]).
    @Test func anEmptyTensorOfAnyShapeIsValid() throws {
        let header = #"{"empty":{"dtype":"F32","shape":[100000,0],"data_offsets":[0,0]},"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#
        let file = try SafeTensorsFile(path: try forge("empty", header: header, data: [UInt8](repeating: 0, count: 8)))
        #expect(file.tensors["empty"]?.shape == [100000, 0])
        #expect(try file.floats("empty").isEmpty)
        #expect(try file.floats("w") == [0, 0])
    }

    /// F16, BF16 and the other dtypes of the format make a valid file (PyTorch saves half-precision models so); only
    /// reading such a tensor as bpworker's floats is refused, naming the tensor and its dtype.
    @Test func everyDTypeOfTheFormatParsesAndOnlyReadingNamesIt() throws {
        let header = #"{"w":{"dtype":"F16","shape":[2],"data_offsets":[0,4]},"b":{"dtype":"BF16","shape":[1],"data_offsets":[4,6]},"#
            + #""m":{"dtype":"BOOL","shape":[2],"data_offsets":[6,8]}}"#
        let file = try SafeTensorsFile(path: try forge("half", header: header, data: [0, 60, 0, 60, 128, 63, 1, 0]))
        #expect(file.tensors["w"]?.dtype == .f16)
        #expect(file.tensors["b"]?.dtype == .bf16)
        #expect(file.names == ["w", "b", "m"])
        for read in [{ _ = try file.floats("w") }, { _ = try file.doubles("w") }, { try file.expect("w", shape: [2]) }] {
            do {
                try read()
                Issue.record("an F16 tensor was read as F32")
            } catch let error as DataError {
                #expect(error.reason.contains("tensor 'w': dtype F16, bpworker reads F32 or F64"), "\(error.reason)")
                #expect(!error.reason.contains("not a float"))
            }
        }
        #expect(throws: DataError.self) { _ = try file.int64s("m") }

        // The dtypes safetensors 0.6 and later add (PyTorch's complex64, float8_e8m0fnu, float4_e2m1fn_x2 and the
        // 6-bit floats), sized in bits: 12 F4 values are 6 bytes, 4 F6 values 3; they were called damaged.
        let newer = #"{"c":{"dtype":"C64","shape":[1],"data_offsets":[0,8]},"e":{"dtype":"F8_E8M0","shape":[2],"data_offsets":[8,10]},"#
            + #""f":{"dtype":"F4","shape":[12],"data_offsets":[10,16]},"g":{"dtype":"F6_E2M3","shape":[4],"data_offsets":[16,19]},"#
            + #""h":{"dtype":"F6_E3M2","shape":[4],"data_offsets":[19,22]}}"#
        let packed = try SafeTensorsFile(path: try forge("packed", header: newer, data: [UInt8](repeating: 0, count: 22)))
        #expect(packed.names == ["c", "e", "f", "g", "h"])
        #expect(packed.tensors["f"]?.dtype == .f4 && packed.tensors["c"]?.dtype == .c64)
        // Three F4 values are 12 bits: no whole number of bytes, as safetensors itself refuses.
        let odd = #"{"f":{"dtype":"F4","shape":[3],"data_offsets":[0,2]}}"#
        #expect(throws: DataError.self) { _ = try SafeTensorsFile(path: try forge("odd", header: odd, data: [0, 0])) }
    }

    @Test func anInterruptedWriteLeavesThePreviousFileIntact() throws {
        let target = path("model.safetensors")
        try sampleWriter().write(to: target)
        let before = try Data(contentsOf: URL(fileURLWithPath: target))
        var other = SafeTensorsWriter()
        let values = [Float](repeating: 9, count: 1000)
        values.withUnsafeBufferPointer { other.add(name: "0.weight", shape: [1000], floats: $0) }
        #expect(throws: DataError.self) { try other.write(to: target, faultAfterBytes: 100) }
        #expect(try Data(contentsOf: URL(fileURLWithPath: target)) == before)
        #expect(try SafeTensorsFile(path: target).floats("0.weight").count == 6)
        let leftovers = try FileManager.default.contentsOfDirectory(atPath: directory.path).filter { $0.hasSuffix(".tmp") }
        #expect(leftovers.isEmpty)
        // Without the fault the new file replaces the old one.
        try other.write(to: target)
        #expect(try SafeTensorsFile(path: target).floats("0.weight") == values)
    }
}
