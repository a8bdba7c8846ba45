import CZlib
import Foundation

/// The least memory that reading a data set's features into memory will hold, from the files' headers alone (a
/// compressed file's header inflated from its first bytes), before the data is read: so that a set that cannot fit
/// is refused with its size instead of the rank being killed by its memory limit half-way through reading it.
///
/// What stays once read is the values as the header declares them (float64 stored as float32), and the read holds at
/// least that. Only what a header declares is counted, never a gzip trailer's size, which a cut or concatenated file
/// makes meaningless. Mapped files (`data.mmap`) and HDF5, which reads rows as they are needed, count nothing. A file
/// that is not a regular file is not opened (opening a FIFO took its writer's data, and the reader then waited for
/// ever), and a file whose header is bad counts nothing: the reader then says what is wrong with it.
public enum ReadFootprint {
    /// One file's share: its name and the bytes it will hold.
    public struct Part: Sendable, Equatable {
        public let path: String
        public let bytes: Double
    }

    /// IDX images (unsigned bytes, raw or gzip-compressed): the pixels its header declares.
    public static func idx(images: String) -> [Part] {
        guard let (header, _) = start(of: images, bytes: 4 + 4 * 4), header.count >= 4, header[0] == 0, header[1] == 0,
              header[2] == 0x08, (1...4).contains(Int(header[3])), header.count >= 4 + 4 * Int(header[3]) else { return [] }
        let dims = (0..<Int(header[3])).map { d in header[(4 + 4 * d)..<(8 + 4 * d)].reduce(0) { $0 << 8 | Int($1) } }
        return [Part(path: images, bytes: dims.reduce(1.0) { $0 * Double($1) })]
    }

    /// `.npy` features, each shard `features` names: nothing for a set that is mapped (`mapped`, every shard raw uint8
    /// or float32), and nothing at all when a shard's header is bad (the loader refuses the set); otherwise each
    /// shard's values as stored.
    public static func npy(features: String, mapped: Bool) -> [Part] {
        guard let files = try? DataFiles.resolve(features) else { return [] }
        var layouts: [NPYLayout] = []
        var compressed = false
        for file in files {
            guard let (prefix, gzip) = start(of: file, bytes: 1 << 16),
                  let layout = try? NPY.layout(of: prefix, fileSize: nil, path: file) else { return [] }
            layouts.append(layout)
            compressed = compressed || gzip
        }
        if mapped && !compressed && layouts.allSatisfy({ $0.dtype == .uint8 || $0.dtype == .float32 }) { return [] }
        return zip(files, layouts).map { file, layout in
            Part(path: file, bytes: Double(layout.count) * Double(layout.dtype == .float64 ? 4 : layout.dtype.itemSize))
        }
    }

    /// The first `bytes` bytes of `path` as the reader sees them (inflated when it is gzip-compressed, `gzip`), or
    /// fewer when it holds fewer; nil when it is not a regular file or cannot be read.
    static func start(of path: String, bytes: Int) -> (bytes: [UInt8], gzip: Bool)? {
        var info = stat()
        guard stat(path, &info) == 0, (info.st_mode & S_IFMT) == S_IFREG,
              let handle = FileHandle(forReadingAtPath: path) else { return nil }
        defer { try? handle.close() }
        // Stored deflate blocks add 5 bytes per 64 KiB, and a gzip header with a file name rarely 4 KiB: this many
        // compressed bytes hold the first `bytes` inflated ones.
        guard let start = try? handle.read(upToCount: bytes + 4096) else { return nil }
        let first = [UInt8](start)
        guard first.count >= 2, first[0] == 0x1F, first[1] == 0x8B else { return (Array(first.prefix(bytes)), false) }
        return inflatedPrefix(first, bytes: bytes).map { ($0, true) }
    }

    /// Up to `bytes` bytes inflated from the start of a gzip stream; nil when it is corrupt before them.
    private static func inflatedPrefix(_ input: [UInt8], bytes: Int) -> [UInt8]? {
        var stream = z_stream()
        guard inflateInit2_(&stream, 15 + 32, zlibVersion(), Int32(MemoryLayout<z_stream>.size)) == Z_OK else { return nil }
        defer { inflateEnd(&stream) }
        var output = [UInt8](repeating: 0, count: bytes)
        var input = input
        let produced = input.withUnsafeMutableBufferPointer { inBuffer in
            output.withUnsafeMutableBufferPointer { outBuffer -> Int? in
                stream.next_in = inBuffer.baseAddress
                stream.avail_in = UInt32(inBuffer.count)
                stream.next_out = outBuffer.baseAddress
                stream.avail_out = UInt32(outBuffer.count)
                let status = inflate(&stream, Z_SYNC_FLUSH)
                guard status == Z_OK || status == Z_STREAM_END || status == Z_BUF_ERROR else { return nil }
                return outBuffer.count - Int(stream.avail_out)
            }
        }
        return produced.map { Array(output.prefix($0)) }
    }
}
