/// An unsigned-byte IDX array (the MNIST/Fashion-MNIST format): its shape and its data in row-major order.
public struct IDXArray: Sendable, Equatable {
    public let shape: [Int]
    public let bytes: [UInt8]

    public init(shape: [Int], bytes: [UInt8]) {
        self.shape = shape
        self.bytes = bytes
    }
}

/// Reader for IDX files, raw or gzip-compressed.
///
/// Layout: two zero bytes, a type byte, a dimension count, that many big-endian UInt32 dimensions, then the data.
public enum IDX {
    /// The IDX type codes; only unsigned byte is supported, the others are named in the error.
    static let typeNames: [UInt8: String] = [
        0x08: "unsigned byte", 0x09: "signed byte", 0x0B: "int16", 0x0C: "int32", 0x0D: "float32", 0x0E: "float64",
    ]

    public static func read(path: String) throws -> IDXArray {
        var data = try readFileBytes(path: path)
        let shape = try parseHeader(data, path: path)
        let headerSize = 4 + 4 * shape.count
        // Drop the header in place rather than copying tens of megabytes into a new array.
        data.removeSubrange(0..<headerSize)
        return IDXArray(shape: shape, bytes: data)
    }

    /// Validates the header against the whole file and returns the shape.
    static func parseHeader(_ data: [UInt8], path: String) throws -> [Int] {
        func fail(_ reason: String) -> DataError { DataError(path: path, reason: reason) }
        guard data.count >= 4 else {
            throw fail("truncated header: need 4 bytes, file has \(data.count)")
        }
        guard data[0] == 0, data[1] == 0 else {
            throw fail("not an IDX file: magic bytes \(hexByte(data[0])) \(hexByte(data[1])) (expected 0x00 0x00)")
        }
        let type = data[2]
        guard type == 0x08 else {
            if let name = typeNames[type] {
                throw fail("unsupported IDX data type \(hexByte(type)) (\(name)); only unsigned byte (0x08) is supported")
            }
            throw fail("unknown IDX data type \(hexByte(type)); only unsigned byte (0x08) is supported")
        }
        let ndims = Int(data[3])
        guard (1...4).contains(ndims) else {
            throw fail("unsupported number of dimensions \(ndims) (expected 1 to 4)")
        }
        let headerSize = 4 + 4 * ndims
        guard data.count >= headerSize else {
            throw fail("truncated header: need \(headerSize) bytes, file has \(data.count)")
        }
        var shape = [Int]()
        shape.reserveCapacity(ndims)
        var product = 1
        var overflow = false
        for d in 0..<ndims {
            let o = 4 + 4 * d
            let dim = Int(data[o]) << 24 | Int(data[o + 1]) << 16 | Int(data[o + 2]) << 8 | Int(data[o + 3])
            shape.append(dim)
            if !overflow {
                let (p, o) = product.multipliedReportingOverflow(by: dim)
                product = p
                overflow = o
            }
        }
        if overflow {
            throw fail("shape \(shape) has more elements than can be addressed")
        }
        let payload = data.count - headerSize
        guard payload == product else {
            let what = payload < product ? "truncated data" : "trailing bytes after data"
            throw fail("\(what): expected \(product) data bytes for shape \(shape), file has \(payload)")
        }
        return shape
    }
}
