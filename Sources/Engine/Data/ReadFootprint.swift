import CZlib
import Foundation

/// The least memory that reading a data set's features into memory will hold, from the files' headers alone (a
/// compressed file's header inflated from its first bytes), before the data is read: so that a set that cannot fit
/// is refused with its size instead of the rank being killed by its memory limit half-way through reading it.
///
/// Each file counts what its read holds at its peak, as `readFileBytes`, `IDX.read`, `NPY.read` and `Dataset.loadNPY`
/// hold it (the file's bytes beside its decoded values, a compressed file beside its contents, float64 beside its
/// float32 copy, shards beside their concatenation), and what it keeps while the next file is read. Sizes come from
/// the file system and the headers, never from a gzip trailer, which a cut or concatenated file makes meaningless.
/// Mapped files (`data.mmap`) and HDF5, which reads rows as they are needed, count nothing. A file that is not a
/// regular file is not opened (opening a FIFO took its writer's data, and the reader then waited for ever), and a file
/// the reader refuses before reading it counts nothing: the reader then says what is wrong with it.
public enum ReadFootprint {
    /// One file's share: its name, the bytes its read holds at its peak (the file's bytes, raw or inflated, beside its
    /// decoded values), and what stays once it is read (its values as stored) while the next file is read.
    public struct Part: Sendable, Equatable {
        public let path: String
        public let bytes: Double
        public let stays: Double
    }

    /// The most the reads of `parts`, in order, hold at once: each file's peak on top of what the earlier ones keep.
    public static func peak(_ parts: [Part]) -> Double {
        var kept = 0.0, most = 0.0
        for part in parts {
            most = max(most, kept + part.bytes)
            kept += part.stays
        }
        return most
    }

    /// The reader reads a file of at most this many bytes (`readFileBytes`); a larger one is refused before it is read.
    static let largestRead = 1 << 32

    /// IDX images (unsigned bytes): a raw file is read whole (its size, whatever its header says); a compressed one
    /// is held beside its inflated pixels, which the header declares (at most 1032 times the file: deflate's ratio).
    public static func idx(images: String) -> [Part] {
        guard let (header, gzip, size) = start(of: images, bytes: 4 + 4 * 4), size <= largestRead else { return [] }
        guard gzip else { return [Part(path: images, bytes: Double(size), stays: Double(max(0, size - 16)))] }
        guard header.count >= 4, header[0] == 0, header[1] == 0, header[2] == 0x08, (1...4).contains(Int(header[3])),
              header.count >= 4 + 4 * Int(header[3]) else { return [] }
        let dims = (0..<Int(header[3])).map { d in header[(4 + 4 * d)..<(8 + 4 * d)].reduce(0) { $0 << 8 | Int($1) } }
        let pixels = min(dims.reduce(1.0) { $0 * Double($1) }, 1032 * Double(size), Double(largestRead))
        return [Part(path: images, bytes: Double(size) + pixels, stays: pixels)]
    }

    /// `.npy` features, each shard `features` names, as `Dataset.loadNPY` reads them: nothing for a set it maps
    /// (`mapped`, every shard raw uint8 or float32) or refuses before reading (a bad raw header while it looks for
    /// shards to map); otherwise the shards read in order up to the first bad one, which the reader refuses.
    public static func npy(features: String, mapped: Bool) -> [Part] {
        guard let files = try? DataFiles.resolve(features) else { return [] }
        var shards: [(file: String, layout: NPYLayout?, gzip: Bool, size: Int)] = []
        for file in files {
            guard let (prefix, gzip, size) = start(of: file, bytes: 1 << 16) else { shards.append((file, nil, false, 0)); continue }
            shards.append((file, try? NPY.layout(of: prefix, fileSize: gzip ? nil : size, path: file), gzip, size))
        }
        if mapped {
            // The loader looks at every shard until the first compressed one: a bad one before it ends the load.
            let looked = shards.prefix { !$0.gzip }
            if looked.contains(where: { $0.layout == nil }) { return [] }
            if looked.count == shards.count && shards.allSatisfy({ $0.layout!.dtype == .uint8 || $0.layout!.dtype == .float32 }) {
                return []
            }
        }
        var parts: [Part] = []
        for shard in shards {
            guard let layout = shard.layout, shard.size <= largestRead else { break }
            let decoded = Double(layout.count) * Double(layout.dtype.itemSize)
            // The file's bytes as read: a compressed file is held beside its contents until they are inflated.
            let contents = shard.gzip ? min(Double(layout.dataOffset) + decoded, 1032 * Double(shard.size)) : Double(shard.size)
            let inflating = shard.gzip ? Double(shard.size) + contents : contents
            // uint8 keeps the file's bytes as its values; the others decode beside them, and float64 is then stored
            // as float32 beside its decoded values.
            let stored = layout.dtype == .float64 ? decoded / 2 : decoded
            let read = max(inflating, layout.dtype == .uint8 ? 0 : contents + decoded, decoded + (layout.dtype == .float64 ? stored : 0))
            // Several shards are kept as read until they are concatenated.
            parts.append(Part(path: shard.file, bytes: read, stays: shards.count > 1 ? decoded : stored))
        }
        if parts.count > 1 {
            // The concatenation: every shard as read, each float64 one's float32 copy beside it (made for all of them
            // before the first is appended), and the whole set stored.
            let whole = shards.prefix(parts.count).map { shard -> Double in
                let stored = Double(shard.layout!.count) * (shard.layout!.dtype == .uint8 ? 1 : 4)
                return shard.layout!.dtype == .float64 ? 2 * stored : stored
            }
            parts.append(Part(path: features + " (the shards concatenated)", bytes: whole.reduce(0, +), stays: 0))
        }
        return parts
    }

    /// The first `bytes` bytes of `path` as the reader sees them (inflated when it is gzip-compressed, `gzip`, across
    /// members and past long gzip headers), or fewer when it holds fewer, and the file's size; nil when it is not a
    /// regular file (never opened: opening a FIFO took its writer's data) or cannot be read.
    static func start(of path: String, bytes: Int) -> (bytes: [UInt8], gzip: Bool, size: Int)? {
        var info = stat()
        guard stat(path, &info) == 0, (info.st_mode & S_IFMT) == S_IFREG,
              let handle = FileHandle(forReadingAtPath: path) else { return nil }
        defer { try? handle.close() }
        guard let first = try? handle.read(upToCount: bytes).map({ [UInt8]($0) }) else { return nil }
        let size = Int(info.st_size)
        guard first.count >= 2, first[0] == 0x1F, first[1] == 0x8B else { return (first, false, size) }
        return inflatedPrefix(first, more: handle, bytes: bytes).map { ($0, true, size) }
    }

    /// Up to `bytes` bytes inflated from the gzip stream that starts with `input` and goes on in `handle`, member after
    /// member, reading at most 16 MiB of it; nil when it is corrupt before them.
    private static func inflatedPrefix(_ input: [UInt8], more handle: FileHandle, bytes: Int) -> [UInt8]? {
        var stream = z_stream()
        guard inflateInit2_(&stream, 15 + 32, zlibVersion(), Int32(MemoryLayout<z_stream>.size)) == Z_OK else { return nil }
        defer { inflateEnd(&stream) }
        var output = [UInt8](repeating: 0, count: bytes)
        var pending = input, read = input.count, produced = 0
        while produced < bytes {
            if pending.isEmpty {
                guard read < 16 << 20, let next = try? handle.read(upToCount: 1 << 16), !next.isEmpty else { break }
                pending = [UInt8](next)
                read += pending.count
            }
            let (status, used, made) = pending.withUnsafeMutableBufferPointer { inBuffer in
                output.withUnsafeMutableBufferPointer { outBuffer -> (Int32, Int, Int) in
                    stream.next_in = inBuffer.baseAddress
                    stream.avail_in = UInt32(inBuffer.count)
                    stream.next_out = outBuffer.baseAddress! + produced
                    stream.avail_out = UInt32(outBuffer.count - produced)
                    let status = inflate(&stream, Z_SYNC_FLUSH)
                    return (status, inBuffer.count - Int(stream.avail_in), outBuffer.count - produced - Int(stream.avail_out))
                }
            }
            pending.removeFirst(used)
            produced += made
            switch status {
            case Z_STREAM_END: inflateReset(&stream)   // another member may follow
            case Z_OK: continue
            case Z_BUF_ERROR where used == 0 && made == 0 && !pending.isEmpty: return nil
            case Z_BUF_ERROR: continue
            default: return nil
            }
        }
        return Array(output.prefix(produced))
    }
}
