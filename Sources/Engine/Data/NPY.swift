#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// A NumPy array read from a `.npy` file: its shape (C order) and its values in one of the supported dtypes.
public struct NPYArray: Sendable, Equatable {
    public enum Storage: Sendable, Equatable {
        case uint8([UInt8])
        case float32([Float])
        case float64([Double])
        case int32([Int32])
        case int64([Int64])
    }

    public let shape: [Int]
    public let storage: Storage

    public init(shape: [Int], storage: Storage) {
        self.shape = shape
        self.storage = storage
    }

    /// The NumPy name of the element type.
    public var dtypeName: String {
        switch storage {
        case .uint8: "uint8"
        case .float32: "float32"
        case .float64: "float64"
        case .int32: "int32"
        case .int64: "int64"
        }
    }

    /// Number of elements (the product of `shape`; 1 for a 0-d array).
    public var count: Int {
        switch storage {
        case .uint8(let v): v.count
        case .float32(let v): v.count
        case .float64(let v): v.count
        case .int32(let v): v.count
        case .int64(let v): v.count
        }
    }
}

/// Reader for NumPy `.npy` files (format versions 1, 2 and 3), raw or gzip-compressed.
///
/// Layout: magic `\x93NUMPY`, major and minor version bytes, a little-endian header length (2 bytes in
/// version 1, 4 bytes in 2 and 3), a Python dict literal padded with spaces and a newline, then the data.
/// What a `.npy` header says about the data after it.
public struct NPYLayout: Sendable {
    public let shape: [Int]
    let dtype: NPY.DType
    /// Where the data starts in the file.
    public let dataOffset: Int
    /// Elements: the product of `shape`.
    public let count: Int
    /// The NumPy name of the element type.
    public var dtypeName: String { dtype.name }
}

public enum NPY {
    enum DType {
        case uint8, float32, float64, int32, int64
        var itemSize: Int {
            switch self {
            case .uint8: 1
            case .float32, .int32: 4
            case .float64, .int64: 8
            }
        }
        var name: String {
            switch self {
            case .uint8: "uint8"
            case .float32: "float32"
            case .float64: "float64"
            case .int32: "int32"
            case .int64: "int64"
            }
        }
    }

    private static let magic: [UInt8] = [0x93, 0x4E, 0x55, 0x4D, 0x50, 0x59]  // "\x93NUMPY"

    public static func read(path: String) throws -> NPYArray {
        // An uncompressed file's header first, from its first bytes: a bad or truncated file is an error before its
        // whole payload is read (a cut 3 GB file took 10 s and 3 GB, or crashed under a memory limit, before saying so).
        do { _ = try layout(path: path) } catch let error as DataError {
            if error.reason != gzipReason { throw error }
        }
        var data = try readFileBytes(path: path)
        let layout = try layout(of: data, fileSize: data.count, path: path)
        let (dataStart, count) = (layout.dataOffset, layout.count)
        let storage: NPYArray.Storage
        switch layout.dtype {
        case .uint8:
            // Drop the header in place instead of copying the payload.
            data.removeSubrange(0..<dataStart)
            storage = .uint8(data)
        case .float32:
            storage = .float32(decodeLittleEndian(data, from: dataStart, count: count) { (b: UInt32) in Float(bitPattern: b) })
        case .float64:
            storage = .float64(decodeLittleEndian(data, from: dataStart, count: count) { (b: UInt64) in Double(bitPattern: b) })
        case .int32:
            storage = .int32(decodeLittleEndian(data, from: dataStart, count: count) { (b: UInt32) in Int32(bitPattern: b) })
        case .int64:
            storage = .int64(decodeLittleEndian(data, from: dataStart, count: count) { (b: UInt64) in Int64(bitPattern: b) })
        }
        return NPYArray(shape: layout.shape, storage: storage)
    }

    /// The layout of a raw (uncompressed) `.npy` file from its header alone, checked against the file's size: what
    /// mapping the file needs. A gzip-compressed file cannot be mapped: an error says so.
    static let gzipReason = "is gzip-compressed and cannot be mapped"

    public static func layout(path: String) throws -> NPYLayout {
        let fd = open(path, O_RDONLY)
        guard fd >= 0 else { throw DataError(path: path, reason: "cannot open file: \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        var info = stat()
        guard fstat(fd, &info) == 0 else { throw DataError(path: path, reason: "cannot stat file: \(String(cString: strerror(errno)))") }
        // A pipe (`<(...)`) has no size and no position to read from: said so, rather than "magic bytes []".
        guard (info.st_mode & S_IFMT) == S_IFREG else {
            throw DataError(path: path, reason: "not a regular file (a pipe or a device): .npy data is mapped or read by position; "
                + "write it to a file first")
        }
        // The header is at most 12 bytes of preamble and a length field of up to 4 bytes; NumPy keeps it under 64 KiB.
        let prefix = [UInt8](unsafeUninitializedCapacity: 1 << 16) { buffer, count in
            count = max(0, pread(fd, buffer.baseAddress!, buffer.count, 0))
        }
        if prefix.count >= 2 && prefix[0] == 0x1F && prefix[1] == 0x8B {
            throw DataError(path: path, reason: gzipReason)
        }
        return try layout(of: prefix, fileSize: Int(info.st_size), path: path)
    }

    /// Reads the header at the start of `data` (the file, or its first bytes) and checks that a file of `fileSize`
    /// bytes holds exactly the data it describes (nil: the header alone, of a file whose size is not known).
    static func layout(of data: [UInt8], fileSize: Int?, path: String) throws -> NPYLayout {
        func fail(_ reason: String) -> DataError { DataError(path: path, reason: reason) }
        guard data.count >= 6, Array(data[0..<6]) == magic else {
            let shown = data.prefix(6).map(hexByte).joined(separator: " ")
            throw fail("not a .npy file: magic bytes [\(shown)] (expected 0x93 'NUMPY')")
        }
        guard data.count >= 8 else { throw fail("truncated header: need 8 bytes, file has \(data.count)") }
        let major = data[6]
        let lengthSize: Int
        switch major {
        case 1: lengthSize = 2
        case 2, 3: lengthSize = 4
        default: throw fail("unsupported .npy format version \(major).\(data[7]) (expected 1, 2 or 3)")
        }
        let headerStart = 8 + lengthSize
        guard data.count >= headerStart else {
            throw fail("truncated header: need \(headerStart) bytes, file has \(data.count)")
        }
        var headerLength = 0
        for i in 0..<lengthSize { headerLength |= Int(data[8 + i]) << (8 * i) }
        let dataStart = headerStart + headerLength
        guard dataStart <= data.count else {
            throw fail("header length \(headerLength) runs past the end of the file (file has \(data.count) bytes)")
        }
        let header = try parseHeader(Array(data[headerStart..<dataStart]), path: path)
        let dtype = try dataType(header.descr, path: path)
        if header.fortranOrder {
            throw fail("Fortran-order arrays are not supported; save with np.ascontiguousarray")
        }
        var count = 1
        for dim in header.shape {
            let (p, overflow) = count.multipliedReportingOverflow(by: dim)
            if overflow { throw fail("shape \(header.shape) has more elements than can be addressed") }
            count = p
        }
        let (byteCount, overflow) = count.multipliedReportingOverflow(by: dtype.itemSize)
        if overflow { throw fail("shape \(header.shape) has more bytes than can be addressed") }
        if let fileSize, case let payload = fileSize - dataStart, payload != byteCount {
            let what = payload < byteCount ? "truncated data" : "trailing bytes after data"
            throw fail("\(what): expected \(byteCount) data bytes for \(header.descr) shape \(header.shape), file has \(payload)")
        }
        return NPYLayout(shape: header.shape, dtype: dtype, dataOffset: dataStart, count: count)
    }

    private static func dataType(_ descr: String, path: String) throws -> DType {
        switch descr {
        case "|u1", "<u1", ">u1", "u1": return .uint8  // one byte has no byte order
        case "<f4": return .float32
        case "<f8": return .float64
        case "<i4": return .int32
        case "<i8": return .int64
        default:
            if descr.hasPrefix(">") {
                throw DataError(
                    path: path,
                    reason: "big-endian dtype '\(descr)' is not supported; convert with a.astype('<\(descr.dropFirst())')")
            }
            throw DataError(
                path: path,
                reason: "unsupported dtype '\(descr)'; supported: '|u1' (uint8), '<f4' (float32), '<f8' (float64), '<i4' (int32), "
                    + "'<i8' (int64)")
        }
    }

    /// Decodes `count` little-endian values starting at byte `start`, whatever the host byte order.
    private static func decodeLittleEndian<Bits: FixedWidthInteger, T>(
        _ data: [UInt8], from start: Int, count: Int, _ make: (Bits) -> T
    ) -> [T] {
        let size = MemoryLayout<Bits>.size
        return data.withUnsafeBytes { raw in
            [T](unsafeUninitializedCapacity: count) { out, initialized in
                for i in 0..<count {
                    let bits = Bits(littleEndian: raw.loadUnaligned(fromByteOffset: start + i * size, as: Bits.self))
                    (out.baseAddress! + i).initialize(to: make(bits))
                }
                initialized = count
            }
        }
    }

    // MARK: - Header dict

    struct Header {
        var descr: String
        var fortranOrder: Bool
        var shape: [Int]
    }

    /// Parses exactly the dict NumPy writes: `{'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }`
    /// followed by padding. Keys may come in any order; each must appear once; nothing else is accepted.
    static func parseHeader(_ bytes: [UInt8], path: String) throws -> Header {
        var parser = HeaderParser(bytes: bytes, path: path)
        return try parser.parse()
    }
}

private struct HeaderParser {
    enum Value {
        case string(String), bool(Bool), tuple([Int])
    }

    let bytes: [UInt8]
    let path: String
    var position = 0

    init(bytes: [UInt8], path: String) {
        self.bytes = bytes
        self.path = path
    }

    func fail(_ what: String) -> DataError {
        var text = String(decoding: bytes, as: UTF8.self).trimmingTrailingSpace()
        if text.count > 200 { text = String(text.prefix(200)) + "..." }
        return DataError(path: path, reason: "malformed .npy header: \(what) at offset \(position) in \(text)")
    }

    var current: UInt8? { position < bytes.count ? bytes[position] : nil }

    mutating func skipSpace() {
        while let c = current, c == 0x20 || c == 0x09 || c == 0x0A || c == 0x0D { position += 1 }
    }

    mutating func expect(_ c: Character) throws {
        skipSpace()
        guard current == c.asciiValue! else { throw fail("expected '\(c)'") }
        position += 1
    }

    /// Consumes `c` if it is next (after spaces).
    mutating func accept(_ c: Character) -> Bool {
        skipSpace()
        if current == c.asciiValue! {
            position += 1
            return true
        }
        return false
    }

    mutating func parse() throws -> NPY.Header {
        var descr: String?
        var fortranOrder: Bool?
        var shape: [Int]?
        try expect("{")
        while !accept("}") {
            let keyStart = position
            let key = try parseString()
            guard ["descr", "fortran_order", "shape"].contains(key) else {
                position = keyStart
                throw fail("unexpected key '\(key)'")
            }
            try expect(":")
            let value = try parseValue()
            func reject(_ what: String) -> DataError {
                position = keyStart
                return fail(what)
            }
            switch key {
            case "descr":
                guard descr == nil else { throw reject("duplicate key 'descr'") }
                guard case .string(let s) = value else { throw reject("'descr' must be a string") }
                descr = s
            case "fortran_order":
                guard fortranOrder == nil else { throw reject("duplicate key 'fortran_order'") }
                guard case .bool(let b) = value else { throw reject("'fortran_order' must be True or False") }
                fortranOrder = b
            case "shape":
                guard shape == nil else { throw reject("duplicate key 'shape'") }
                guard case .tuple(let t) = value else { throw reject("'shape' must be a tuple") }
                shape = t
            default:
                throw reject("unexpected key '\(key)'")
            }
            // Entries are separated by commas; a trailing comma before '}' is allowed.
            if !accept(",") {
                try expect("}")
                break
            }
        }
        skipSpace()
        guard position == bytes.count else { throw fail("unexpected text after '}'") }
        guard let descr else { throw DataError(path: path, reason: "malformed .npy header: missing key 'descr'") }
        guard let fortranOrder else {
            throw DataError(path: path, reason: "malformed .npy header: missing key 'fortran_order'")
        }
        guard let shape else { throw DataError(path: path, reason: "malformed .npy header: missing key 'shape'") }
        return NPY.Header(descr: descr, fortranOrder: fortranOrder, shape: shape)
    }

    /// A single- or double-quoted string without escapes (NumPy's descr strings never need them).
    mutating func parseString() throws -> String {
        skipSpace()
        guard let quote = current, quote == 0x27 || quote == 0x22 else { throw fail("expected a quoted string") }
        position += 1
        let start = position
        while let c = current, c != quote {
            if c == 0x5C || c == 0x0A { throw fail("unsupported character in string") }
            position += 1
        }
        guard current == quote else { throw fail("unterminated string") }
        let text = String(decoding: bytes[start..<position], as: UTF8.self)
        position += 1
        return text
    }

    mutating func parseValue() throws -> Value {
        skipSpace()
        switch current {
        case 0x27, 0x22:
            return .string(try parseString())
        case 0x28:  // "("
            return .tuple(try parseTuple())
        case 0x5B:  // "[": a list descr is a structured dtype
            throw fail("structured dtypes are not supported")
        default:
            if acceptWord("True") { return .bool(true) }
            if acceptWord("False") { return .bool(false) }
            throw fail("expected a string, True, False or a tuple")
        }
    }

    mutating func acceptWord(_ word: String) -> Bool {
        let w = Array(word.utf8)
        guard position + w.count <= bytes.count, Array(bytes[position..<position + w.count]) == w else { return false }
        // Must not run on into an identifier such as "Falsey".
        if position + w.count < bytes.count, isIdentifierByte(bytes[position + w.count]) { return false }
        position += w.count
        return true
    }

    func isIdentifierByte(_ c: UInt8) -> Bool {
        (0x30...0x39).contains(c) || (0x41...0x5A).contains(c) || (0x61...0x7A).contains(c) || c == 0x5F
    }

    /// `()`, `(5,)`, `(3, 4)`, `(3, 4,)`. A one-element tuple needs its comma: `(5)` is not a tuple in Python.
    mutating func parseTuple() throws -> [Int] {
        try expect("(")
        var values = [Int]()
        if accept(")") { return values }
        while true {
            values.append(try parseInt())
            if accept(")") {
                if values.count == 1 { throw fail("one-element tuple needs a trailing comma") }
                return values
            }
            try expect(",")
            if accept(")") { return values }
        }
    }

    mutating func parseInt() throws -> Int {
        skipSpace()
        let start = position
        var value = 0
        while let c = current, (0x30...0x39).contains(c) {
            let (m, o1) = value.multipliedReportingOverflow(by: 10)
            let (a, o2) = m.addingReportingOverflow(Int(c - 0x30))
            if o1 || o2 {
                position = start
                throw fail("dimension too large")
            }
            value = a
            position += 1
        }
        guard position > start else { throw fail("expected a non-negative integer") }
        if current == 0x4C { position += 1 }  // Python 2 long suffix, as in "(3L, 4L)" from old NumPy
        return value
    }
}

extension String {
    fileprivate func trimmingTrailingSpace() -> String {
        var s = Substring(self)
        while let last = s.last, last == " " || last == "\n" { s = s.dropLast() }
        return String(s)
    }
}
