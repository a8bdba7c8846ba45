import CZlib
import Foundation

// safetensors (https://github.com/huggingface/safetensors): an 8-byte little-endian header length N, N bytes of
// JSON mapping tensor names to {"dtype", "shape", "data_offsets": [begin, end]} plus an optional string map
// "__metadata__", then the raw little-endian data, C order. Offsets are relative to the end of the header,
// and the tensors must tile the data section exactly. PyTorch, NumPy and JAX read it without bpworker.

/// Every dtype the safetensors format defines, so that a valid file of any of them parses and checks; bpworker itself
/// reads F32 and F64 as floats and I64, I32 and U8 as integers, and names the dtype when a tensor is of another.
public enum SafeTensorsDType: String, Sendable, CaseIterable {
    case f32 = "F32", f64 = "F64", i64 = "I64", i32 = "I32", u8 = "U8"
    case f16 = "F16", bf16 = "BF16", f8e4m3 = "F8_E4M3", f8e5m2 = "F8_E5M2"
    case bool = "BOOL", i8 = "I8", i16 = "I16", u16 = "U16", u32 = "U32", u64 = "U64"
    /// Added by safetensors 0.6 and later (PyTorch's complex64, float8_e8m0fnu, float4_e2m1fn_x2, and the 6-bit
    /// floats): F4 and the F6 ones pack elements into bits, so a tensor's size is counted in bits.
    case c64 = "C64", f8e8m0 = "F8_E8M0", f4 = "F4", f6e2m3 = "F6_E2M3", f6e3m2 = "F6_E3M2"

    /// Bits of one element.
    public var bits: Int {
        switch self {
        case .f4: 4
        case .f6e2m3, .f6e3m2: 6
        case .u8, .i8, .bool, .f8e4m3, .f8e5m2, .f8e8m0: 8
        case .f16, .bf16, .i16, .u16: 16
        case .f32, .i32, .u32: 32
        case .f64, .i64, .u64, .c64: 64
        }
    }

    /// Bytes of one element (the packed dtypes take less than one: see `bits`).
    public var size: Int { bits / 8 }
}

// Bad files throw `DataError` (Data/DataError.swift): the path and a reason naming the tensor.

/// Collects tensors and writes them as one safetensors file, atomically, with checksums (`SafeTensorsChecksums`).
public struct SafeTensorsWriter {
    private var entries: [(name: String, dtype: SafeTensorsDType, shape: [Int], bytes: Data)] = []
    public var metadata: [String: String] = [:]
    /// Record the checksums in the metadata (tests turn it off to make files of earlier versions).
    public var checksummed = true

    public init() {}

    public mutating func add(name: String, shape: [Int], floats: UnsafeBufferPointer<Float>) {
        precondition(shape.reduce(1, *) == floats.count, "\(name): shape \(shape) does not hold \(floats.count) values")
        entries.append((name, .f32, shape, littleEndianBytes(floats)))
    }

    public mutating func add(name: String, shape: [Int], doubles: UnsafeBufferPointer<Double>) {
        precondition(shape.reduce(1, *) == doubles.count, "\(name): shape \(shape) does not hold \(doubles.count) values")
        entries.append((name, .f64, shape, littleEndianBytes(doubles)))
    }

    public mutating func add(name: String, shape: [Int], int64s: [Int64]) {
        precondition(shape.reduce(1, *) == int64s.count, "\(name): shape \(shape) does not hold \(int64s.count) values")
        entries.append((name, .i64, shape, int64s.withUnsafeBufferPointer { littleEndianBytes($0) }))
    }

    private func littleEndianBytes<T: FixedWidthInteger>(_ values: UnsafeBufferPointer<T>) -> Data {
        var data = Data(count: values.count * MemoryLayout<T>.size)
        data.withUnsafeMutableBytes { raw in
            for (i, v) in values.enumerated() { raw.storeBytes(of: v.littleEndian, toByteOffset: i * MemoryLayout<T>.size, as: T.self) }
        }
        return data
    }

    private func littleEndianBytes(_ values: UnsafeBufferPointer<Float>) -> Data {
        littleEndianBytes(UnsafeBufferPointer(start: UnsafeRawPointer(values.baseAddress)?.assumingMemoryBound(to: UInt32.self),
                                              count: values.count))
    }

    private func littleEndianBytes(_ values: UnsafeBufferPointer<Double>) -> Data {
        littleEndianBytes(UnsafeBufferPointer(start: UnsafeRawPointer(values.baseAddress)?.assumingMemoryBound(to: UInt64.self),
                                              count: values.count))
    }

    /// The whole file's bytes.
    public func serialized() throws -> Data {
        var header: [String: Any] = [:]
        var tensors: [SafeTensorsFile.TensorInfo] = []
        var offset = 0
        for entry in entries {
            header[entry.name] = ["dtype": entry.dtype.rawValue, "shape": entry.shape,
                                  "data_offsets": [offset, offset + entry.bytes.count]] as [String: Any]
            tensors.append(.init(name: entry.name, dtype: entry.dtype, shape: entry.shape, byteRange: offset..<(offset + entry.bytes.count)))
            offset += entry.bytes.count
        }
        var metadata = self.metadata
        if checksummed {
            let crcs = Dictionary(uniqueKeysWithValues: entries.map { ($0.name, $0.bytes.withUnsafeBytes { crc32Hex($0) }) })
            metadata[SafeTensorsChecksums.tensorsKey] = String(decoding: try JSONSerialization.data(withJSONObject: crcs, options: [.sortedKeys]),
                                                               as: UTF8.self)
            metadata[SafeTensorsChecksums.headerKey] = SafeTensorsChecksums.headerChecksum(tensors: tensors, metadata: metadata)
        }
        if !metadata.isEmpty { header["__metadata__"] = metadata }
        var json = try JSONSerialization.data(withJSONObject: header, options: [.sortedKeys])
        // Pad with spaces so the data starts 8-byte aligned, as the reference writer does.
        json.append(contentsOf: [UInt8](repeating: 0x20, count: (8 - json.count % 8) % 8))
        // Reserved whole: grown by appends, the buffer was copied as it doubled, and writing a checkpoint peaked near 2.7
        // times its size instead of the 2 the memory estimate counts (the tensors' bytes and the file's).
        var file = Data()
        file.reserveCapacity(8 + json.count + offset)
        withUnsafeBytes(of: UInt64(json.count).littleEndian) { file.append(contentsOf: $0) }
        file.append(json)
        for entry in entries { file.append(entry.bytes) }
        return file
    }

    /// Writes atomically: a temporary file in the same directory, fsync, rename over `path`, fsync of the
    /// directory. A reader sees the old file or the new one, never half of one; on any error the old file is
    /// untouched and the temporary file removed.
    /// - Parameter faultAfterBytes: test hook simulating a crash mid-write: stop after that many bytes.
    public func write(to path: String, faultAfterBytes: Int? = nil) throws {
        let bytes = try serialized()
        try writeAtomically(bytes, to: path, faultAfterBytes: faultAfterBytes)
    }
}

/// Atomic replacement of a file's contents (see `SafeTensorsWriter.write`).
/// - Parameters:
///   - durable: fsync the file and its directory, so the new contents survive a power loss. Readers never see a
///     partial file either way (the rename is atomic); files rewritten every few steps that only inform, like
///     status.json, skip the fsyncs (about 2 ms each on the reference machine, every log interval on rank 0).
///   - faultAfterBytes: test hook: stop after this many bytes of the temporary file and fail.
///   - afterPartialWrite: test hook run at that point instead of failing (a crash simulation kills the process).
public func writeAtomically(_ bytes: Data, to path: String, durable: Bool = true, faultAfterBytes: Int? = nil,
                            afterPartialWrite: (() -> Void)? = nil) throws {
    let url = URL(fileURLWithPath: path)
    let directory = url.deletingLastPathComponent().path
    let temporary = directory + "/." + url.lastPathComponent + ".\(getpid()).tmp"
    func failure(_ what: String) -> DataError {
        DataError(path: path, reason: "\(what): \(String(cString: strerror(errno)))")
    }
    let fd = open(temporary, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
    guard fd >= 0 else { throw failure("cannot create \(temporary)") }
    var closed = false
    defer {
        if !closed { close(fd) }
    }
    do {
        let limit = min(bytes.count, faultAfterBytes ?? bytes.count)
        try bytes.withUnsafeBytes { raw in
            var written = 0
            while written < limit {
                let n = Foundation.write(fd, raw.baseAddress! + written, limit - written)
                guard n > 0 else { throw failure("write") }
                written += n
            }
        }
        if let faultAfterBytes, faultAfterBytes < bytes.count {
            afterPartialWrite?()
            throw DataError(path: path, reason: "write stopped after \(faultAfterBytes) bytes (test fault)")
        }
        if durable { guard fsync(fd) == 0 else { throw failure("fsync") } }
        closed = true
        guard close(fd) == 0 else { throw failure("close") }
        guard rename(temporary, path) == 0 else { throw failure("rename") }
    } catch {
        unlink(temporary)
        throw error
    }
    // The rename is durable only once the directory entry is on disk.
    guard durable else { return }
    let dirfd = open(directory, O_RDONLY)
    if dirfd >= 0 {
        fsync(dirfd)
        close(dirfd)
    }
}

/// A safetensors file read and validated as untrusted input: every header field, shape and byte range is
/// checked against the file before any data is touched.
public struct SafeTensorsFile {
    public struct TensorInfo: Sendable, Equatable {
        public let name: String
        public let dtype: SafeTensorsDType
        public let shape: [Int]
        /// Bytes within the data section.
        public let byteRange: Range<Int>
    }

    public let path: String
    public let metadata: [String: String]
    public let tensors: [String: TensorInfo]
    /// Tensor names in data order.
    public let names: [String]
    private let data: Data
    private let dataStart: Int

    /// Reads and validates the file: a header within `maxHeaderBytes`, a file within `maxFileBytes`, every tensor's
    /// dtype, shape and byte range consistent, and the tensors tiling the data section exactly.
    public init(path: String, maxHeaderBytes: Int = 100 << 20, maxFileBytes: Int = 1 << 36) throws {
        let (data, header, dataStart) = try Self.readHeader(path: path, maxHeaderBytes: maxHeaderBytes,
                                                            maxFileBytes: maxFileBytes)
        let dataLength = data.count - dataStart
        var metadata: [String: String] = [:]
        var tensors: [String: TensorInfo] = [:]
        try Self.requireWhole(header, dataLength: dataLength, path: path)
        // In name order: the first bad entry, which the error names, is the same in every process (a dictionary's
        // order is not).
        for name in header.keys.sorted() {
            let value = header[name]!
            if name == "__metadata__" {
                metadata = try Self.metadata(value, path: path)
            } else {
                tensors[name] = try Self.tensorInfo(name: name, entry: value, dataLength: dataLength, path: path)
            }
        }
        let ordered = try Self.tiling(Array(tensors.values), dataLength: dataLength, path: path)
        self.path = path
        self.metadata = metadata
        self.tensors = tensors
        self.names = ordered.map(\.name)
        self.data = data
        self.dataStart = dataStart
    }

    /// The whole file, its JSON header and where the data section starts, with the header's size checked first.
    private static func readHeader(path: String, maxHeaderBytes: Int, maxFileBytes: Int) throws
        -> (data: Data, header: [String: Any], dataStart: Int) {
        func fail(_ reason: String) -> DataError { DataError(path: path, reason: reason) }
        guard let attributes = try? FileManager.default.attributesOfItem(atPath: path),
              let size = attributes[.size] as? Int else { throw fail("cannot open file") }
        guard size <= maxFileBytes else { throw fail("file of \(size) bytes exceeds the limit of \(maxFileBytes)") }
        guard size >= 8 else { throw fail("truncated: \(size) bytes, shorter than the 8-byte header length") }
        guard let data = FileManager.default.contents(atPath: path) else { throw fail("cannot read file") }
        let headerLength = data.withUnsafeBytes { UInt64(littleEndian: $0.loadUnaligned(as: UInt64.self)) }
        guard headerLength > 0 else { throw fail("header length is 0") }
        guard headerLength <= UInt64(maxHeaderBytes) else {
            throw fail("header length \(headerLength) exceeds the limit of \(maxHeaderBytes) bytes (huge header)")
        }
        guard headerLength <= UInt64(data.count - 8) else {
            throw fail("header length \(headerLength) runs past the end of the file (\(data.count) bytes)")
        }
        let headerBytes = data.subdata(in: 8..<(8 + Int(headerLength)))
        guard headerBytes.first == UInt8(ascii: "{") else { throw fail("header is not a JSON object") }
        guard let object = try? JSONSerialization.jsonObject(with: headerBytes), let header = object as? [String: Any] else {
            throw fail("header is not valid JSON")
        }
        if let clash = clashingKeys(headerBytes, parsed: header.count) { throw fail(clash) }
        return (data, header, 8 + Int(headerLength))
    }

    /// Why the header's top-level keys (tensor names and `__metadata__`) are fewer in `parsed`, the parsed header's
    /// count, than in the text: a name given twice, or two names that are the same text in different Unicode forms
    /// (precomposed "é" and "e" with a combining accent), which Swift's strings compare equal. Such a header parsed
    /// into one tensor where the file has two, and the file was called damaged for the gap the other left; Python's
    /// `safe_open` reads both. Nil when every key is distinct. `bytes` is valid JSON and starts with an object.
    private static func clashingKeys(_ bytes: Data, parsed: Int) -> String? {
        let text = [UInt8](bytes)
        var keys: [String] = [], i = 1, depth = 1, inString = false, escaped = false, keyStart = -1
        // Top-level keys are the strings at depth 1 that follow "{" or ",": depth counts brackets outside strings.
        var expectKey = true
        while i < text.count && depth > 0 {
            let c = text[i]
            if inString {
                if escaped { escaped = false } else if c == UInt8(ascii: "\\") { escaped = true } else if c == UInt8(ascii: "\"") {
                    inString = false
                    if keyStart >= 0, let key = try? JSONSerialization.jsonObject(with: Data(text[keyStart...i]),
                                                                                  options: .fragmentsAllowed) as? String {
                        keys.append(key)
                    }
                    keyStart = -1
                }
            } else {
                switch c {
                case UInt8(ascii: "\""):
                    inString = true
                    if depth == 1 && expectKey { keyStart = i; expectKey = false }
                case UInt8(ascii: "{"), UInt8(ascii: "["): depth += 1
                case UInt8(ascii: "}"), UInt8(ascii: "]"): depth -= 1
                case UInt8(ascii: ","): if depth == 1 { expectKey = true }
                default: break
                }
            }
            i += 1
        }
        guard keys.count != parsed else { return nil }
        var seen: [String: String] = [:]
        for key in keys {
            guard let earlier = seen[key] else { seen[key] = key; continue }
            if Array(earlier.unicodeScalars) == Array(key.unicodeScalars) { return "tensor '\(key)' is named twice in the header" }
            return "tensor names '\(earlier)' and '\(key)' are the same text in different Unicode forms "
                + "(\(scalars(earlier)) and \(scalars(key))), which bpworker cannot tell apart: rename one"
        }
        return nil
    }

    private static func scalars(_ name: String) -> String {
        name.unicodeScalars.map { $0.isASCII ? String($0) : String(format: "U+%04X", $0.value) }.joined()
    }

    /// A file cut short: the data section ends before the furthest end its header gives. Said as such, before any
    /// one tensor's entry is checked, so the message does not blame whichever tensor happens to be checked first.
    private static func requireWhole(_ header: [String: Any], dataLength: Int, path: String) throws {
        let ends = header.compactMap { name, value -> Int? in
            guard name != "__metadata__", let entry = value as? [String: Any], let offsets = entry["data_offsets"] as? [Any],
                  offsets.count == 2 else { return nil }
            return jsonInteger(offsets[1])
        }
        guard let furthest = ends.max(), furthest > dataLength, ends.allSatisfy({ $0 >= 0 }) else { return }
        throw DataError(path: path, reason: "truncated (or its header damaged): its header describes \(furthest) bytes of tensor data and the file "
            + "holds \(dataLength) (\(furthest - dataLength) bytes missing)")
    }

    /// `__metadata__`: an object of strings.
    private static func metadata(_ value: Any, path: String) throws -> [String: String] {
        guard let map = value as? [String: Any] else { throw DataError(path: path, reason: "__metadata__ is not an object") }
        var metadata: [String: String] = [:]
        for (k, v) in map {
            guard let s = v as? String else {
                throw DataError(path: path, reason: "__metadata__ value for '\(k)' is not a string")
            }
            metadata[k] = s
        }
        return metadata
    }

    /// One tensor's entry: a known dtype, a shape of non-negative integers that fits in the data section, and
    /// data_offsets within it that hold exactly that shape.
    private static func tensorInfo(name: String, entry value: Any, dataLength: Int, path: String) throws -> TensorInfo {
        func fail(_ reason: String) -> DataError { DataError(path: path, reason: "tensor '\(name)': " + reason) }
        guard let entry = value as? [String: Any] else { throw fail("entry is not an object") }
        guard let dtypeName = entry["dtype"] as? String else { throw fail("missing dtype") }
        guard let dtype = SafeTensorsDType(rawValue: dtypeName) else { throw fail("unsupported dtype '\(dtypeName)'") }
        guard let shapeValues = entry["shape"] as? [Any] else { throw fail("missing shape") }
        var shape: [Int] = []
        for d in shapeValues {
            guard let dim = jsonInteger(d) else { throw fail("shape \(shapeValues) is not a list of integers") }
            guard dim >= 0 else { throw fail("negative dimension \(dim) in shape") }
            shape.append(dim)
        }
        // A zero anywhere makes an empty tensor, however large the other dimensions ([100000, 0] is valid).
        var elements = shape.contains(0) ? 0 : 1
        for dim in shape where elements > 0 {
            let (product, overflow) = elements.multipliedReportingOverflow(by: dim)
            // At most two elements a byte (F4's), so that the bit count below cannot overflow either.
            guard !overflow, product <= 2 * dataLength else { throw fail("shape \(shapeValues) holds more elements than the file") }
            elements = product
        }
        guard let offsets = entry["data_offsets"] as? [Any], offsets.count == 2,
              let begin = jsonInteger(offsets[0]), let end = jsonInteger(offsets[1]) else {
            throw fail("missing or malformed data_offsets")
        }
        guard begin >= 0, begin <= end else { throw fail("data_offsets [\(begin), \(end)] are reversed") }
        guard end <= dataLength else {
            throw fail("data_offsets [\(begin), \(end)] run past the data section of \(dataLength) bytes")
        }
        // In bits, as the format counts packed dtypes: 12 values of F4 are 6 bytes; a count that is no whole number of
        // bytes is not a tensor.
        let (bits, overflow) = elements.multipliedReportingOverflow(by: dtype.bits)
        guard !overflow, bits % 8 == 0 else {
            throw fail("shape \(shape) of \(dtype.rawValue) is \(elements) x \(dtype.bits) bits, not a whole number of bytes")
        }
        guard end - begin == bits / 8 else {
            throw fail("shape \(shape) of \(dtype.rawValue) needs \(bits / 8) bytes, data_offsets give \(end - begin)")
        }
        return TensorInfo(name: name, dtype: dtype, shape: shape, byteRange: begin..<end)
    }

    /// The tensors in data order, which must tile the data section: no overlaps, no gaps, nothing after the last.
    private static func tiling(_ tensors: [TensorInfo], dataLength: Int, path: String) throws -> [TensorInfo] {
        let ordered = tensors.sorted {
            ($0.byteRange.lowerBound, $0.byteRange.upperBound) < ($1.byteRange.lowerBound, $1.byteRange.upperBound)
        }
        var cursor = 0
        for info in ordered {
            if info.byteRange.lowerBound < cursor {
                throw DataError(path: path, reason: "tensor '\(info.name)': data_offsets overlap the previous tensor")
            }
            if info.byteRange.lowerBound > cursor {
                throw DataError(path: path,
                                reason: "tensor '\(info.name)': gap of \(info.byteRange.lowerBound - cursor) bytes before its data")
            }
            cursor = info.byteRange.upperBound
        }
        guard cursor == dataLength else {
            throw DataError(path: path, reason: "\(dataLength - cursor) bytes after the last tensor are not covered by the header")
        }
        return ordered
    }

    private func info(_ name: String) throws -> TensorInfo {
        guard let info = tensors[name] else {
            throw DataError(path: path, reason: "missing tensor '\(name)'")
        }
        return info
    }

    private func load<T: FixedWidthInteger>(_ info: TensorInfo, as: T.Type) -> [T] {
        let count = info.byteRange.count / MemoryLayout<T>.size
        return data.withUnsafeBytes { raw in
            let start = dataStart + info.byteRange.lowerBound
            return (0..<count).map {
                T(littleEndian: raw.loadUnaligned(fromByteOffset: start + $0 * MemoryLayout<T>.size, as: T.self))
            }
        }
    }

    /// The tensor's values as Float (F32 exactly; F64 rounded).
    public func floats(_ name: String) throws -> [Float] {
        let info = try info(name)
        let count = info.byteRange.count / (info.dtype == .f64 ? 8 : 4)
        return try [Float](unsafeUninitializedCapacity: count) { buffer, initialized in
            try readFloats(name, into: buffer)
            initialized = count
        }
    }

    /// The tensor's values as Float (F32 exactly; F64 rounded) written into `destination`, which holds its element
    /// count: no copy of the tensor on the way (`floats` made two, 32 MiB beside the file for a 2048x2048 weight,
    /// which `eval --model`'s memory estimate did not count).
    public func readFloats(_ name: String, into destination: UnsafeMutableBufferPointer<Float>) throws {
        let info = try info(name)
        let size = info.dtype == .f32 ? 4 : info.dtype == .f64 ? 8 : 0
        guard size > 0 else {
            throw DataError(path: path, reason: "tensor '\(name)': dtype \(info.dtype.rawValue), bpworker reads F32 or F64 here")
        }
        let count = info.byteRange.count / size
        precondition(count == destination.count, "tensor '\(name)': \(count) values into room for \(destination.count)")
        data.withUnsafeBytes { raw in
            let start = dataStart + info.byteRange.lowerBound
            if size == 4 {
                for i in 0..<count {
                    destination[i] = Float(bitPattern: UInt32(littleEndian: raw.loadUnaligned(fromByteOffset: start + 4 * i, as: UInt32.self)))
                }
            } else {
                for i in 0..<count {
                    destination[i] = Float(Double(bitPattern: UInt64(littleEndian: raw.loadUnaligned(fromByteOffset: start + 8 * i,
                                                                                                      as: UInt64.self))))
                }
            }
        }
    }

    /// The tensor's values as Double (F32 and F64 exactly).
    public func doubles(_ name: String) throws -> [Double] {
        let info = try info(name)
        switch info.dtype {
        case .f32: return load(info, as: UInt32.self).map { Double(Float(bitPattern: $0)) }
        case .f64: return load(info, as: UInt64.self).map { Double(bitPattern: $0) }
        default: throw DataError(path: path, reason: "tensor '\(name)': dtype \(info.dtype.rawValue), bpworker reads F32 or F64 here")
        }
    }

    public func int64s(_ name: String) throws -> [Int64] {
        let info = try info(name)
        switch info.dtype {
        case .i64: return load(info, as: Int64.self)
        case .i32: return load(info, as: Int32.self).map(Int64.init)
        case .u8: return load(info, as: UInt8.self).map(Int64.init)
        default: throw DataError(path: path, reason: "tensor '\(name)': dtype \(info.dtype.rawValue), bpworker reads I64, I32 or U8 here")
        }
    }

    /// Compares the file with its checksums (`SafeTensorsChecksums`): every tensor's bytes and the header. Throws,
    /// naming the tensor or the metadata and the reason, when anything differs; returns `.unchecked` for a file without
    /// checksums.
    public func verify() throws -> SafeTensorsChecksums.Verdict {
        guard let recorded = metadata[SafeTensorsChecksums.tensorsKey] else {
            if metadata[SafeTensorsChecksums.headerKey] != nil {
                throw DataError(path: path, reason: "damaged: metadata '\(SafeTensorsChecksums.tensorsKey)' is missing")
            }
            return .unchecked
        }
        let header = SafeTensorsChecksums.headerChecksum(tensors: Array(tensors.values), metadata: metadata)
        guard metadata[SafeTensorsChecksums.headerKey] == header else {
            throw DataError(path: path, reason: "damaged header: its checksum is \(header), the file records "
                + "\(metadata[SafeTensorsChecksums.headerKey].map { "'\($0)'" } ?? "none") (a name, shape, offset or metadata value changed)")
        }
        guard let object = try? JSONSerialization.jsonObject(with: Data(recorded.utf8)), let crcs = object as? [String: String] else {
            throw DataError(path: path, reason: "damaged: metadata '\(SafeTensorsChecksums.tensorsKey)' is not an object of strings")
        }
        for name in names {
            guard let expected = crcs[name] else {
                throw DataError(path: path, reason: "damaged: tensor '\(name)' has no recorded checksum")
            }
            let range = tensors[name]!.byteRange
            let bytes = (dataStart + range.lowerBound)..<(dataStart + range.upperBound)
            let actual = data.withUnsafeBytes { crc32Hex(UnsafeRawBufferPointer(rebasing: $0[bytes])) }
            guard actual == expected else {
                throw DataError(path: path, reason: "damaged: tensor '\(name)': its bytes' CRC-32 is \(actual), the file records \(expected)")
            }
        }
        if let missing = crcs.keys.sorted().first(where: { tensors[$0] == nil }) {
            throw DataError(path: path, reason: "damaged: tensor '\(missing)' has a checksum but is not in the file")
        }
        return .intact
    }

    /// Checks that a float tensor exists with exactly this shape.
    public func expect(_ name: String, shape: [Int]) throws {
        let info = try info(name)
        guard info.dtype == .f32 || info.dtype == .f64 else {
            throw DataError(path: path, reason: "tensor '\(name)': dtype \(info.dtype.rawValue), bpworker reads F32 or F64 "
                + "(in PyTorch, save `tensor.float()`)")
        }
        guard info.shape == shape else {
            throw DataError(path: path, reason: "tensor '\(name)': shape \(info.shape), the model expects \(shape)")
        }
    }
}

/// Checksums in a safetensors file's own metadata, so the file stays a plain safetensors file that PyTorch, NumPy
/// and the `safetensors` package read as before: `bpworker_crc32` maps every tensor's name to the CRC-32 (zlib's)
/// of its bytes, and `bpworker_header_crc32` is the CRC-32 of every tensor's name, dtype, shape and offsets and every
/// other metadata entry, in a canonical order. Together they cover every byte a reader uses: a flipped bit in the
/// data changes a tensor's CRC; one in the header changes a name, a shape, an offset or a metadata value (or breaks
/// the JSON, which the reader refuses anyway). The JSON padding is the only part left out; it carries nothing.
public enum SafeTensorsChecksums {
    public static let tensorsKey = "bpworker_crc32"
    public static let headerKey = "bpworker_header_crc32"

    /// What `SafeTensorsFile.verify` found.
    public enum Verdict: Equatable, Sendable {
        /// Every checksum matched.
        case intact
        /// A file without checksums (written by an earlier version, or by another program): nothing to check.
        case unchecked
    }

    /// The header's canonical text (one line per tensor, then per metadata entry, both sorted; lengths before
    /// names and values, so no two headers share a text) and its CRC-32 as 8 hex digits.
    static func headerChecksum(tensors: [SafeTensorsFile.TensorInfo], metadata: [String: String]) -> String {
        var text = ""
        for t in tensors.sorted(by: { $0.name < $1.name }) {
            text += "t \(t.name.utf8.count):\(t.name) \(t.dtype.rawValue) \(t.shape) \(t.byteRange.lowerBound) \(t.byteRange.upperBound)\n"
        }
        for (key, value) in metadata.sorted(by: { $0.key < $1.key }) where key != headerKey {
            text += "m \(key.utf8.count):\(key) \(value.utf8.count):\(value)\n"
        }
        return Array(text.utf8).withUnsafeBytes { crc32Hex($0) }
    }
}

/// zlib's CRC-32 of `bytes` as 8 lowercase hex digits (crc32_z takes any length).
func crc32Hex(_ bytes: UnsafeRawBufferPointer) -> String {
    let crc = bytes.isEmpty ? crc32_z(0, nil, 0)
        : crc32_z(0, bytes.baseAddress!.assumingMemoryBound(to: UInt8.self), bytes.count)
    let hex = String(crc, radix: 16)
    return String(repeating: "0", count: 8 - hex.count) + hex
}

/// An integral JSON number; nil for booleans (which Foundation also hands out as NSNumber), fractions and
/// anything else.
private func jsonInteger(_ value: Any) -> Int? {
    guard let number = value as? NSNumber, type(of: number) != type(of: NSNumber(value: true)) else { return nil }
    return Int(exactly: number.doubleValue)
}
