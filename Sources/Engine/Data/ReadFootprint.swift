import Foundation

/// The least memory that reading a data set's features into memory will hold, from the files' sizes and headers
/// alone, before a byte of their data is read: so that a set that cannot fit is refused with its size instead of the
/// rank being killed by its memory limit half-way through reading it.
///
/// A lower bound, never more than the read holds, so that it refuses no set that fits: a file read into memory is
/// first held whole (raw, or inflated), and what stays is its values as stored (float64 as float32, half the bytes).
/// Mapped files (`data.mmap`) and HDF5, which reads rows as they are needed, count nothing. Any file it cannot size
/// counts nothing either: the reader then says what is wrong with it.
public enum ReadFootprint {
    /// One file's share: its name and the bytes it will hold.
    public struct Part: Sendable, Equatable {
        public let path: String
        public let bytes: Double
    }

    /// IDX images (unsigned bytes, raw or gzip-compressed): the values, the file's size without its header.
    public static func idx(images: String) -> [Part] {
        guard let size = inflatedSize(images) else { return [] }
        return [Part(path: images, bytes: Double(max(0, size - 16)))]
    }

    /// `.npy` features, each shard `features` names: nothing for a shard that is mapped (`mapped`, raw uint8 or
    /// float32); the values as stored for the others; half of a compressed file's inflated size, whose dtype the
    /// header inside it would tell (float64, the widest, is stored in half its bytes).
    public static func npy(features: String, mapped: Bool) -> [Part] {
        guard let files = try? DataFiles.resolve(features) else { return [] }
        var layouts: [String: NPYLayout] = [:]
        for file in files { layouts[file] = try? NPY.layout(path: file) }
        // The loader maps a set only when every shard can be mapped.
        let allMappable = mapped && files.allSatisfy { layouts[$0].map { $0.dtype == .uint8 || $0.dtype == .float32 } ?? false }
        if allMappable { return [] }
        return files.compactMap { file in
            if let layout = layouts[file] {
                let stored = layout.dtype == .float64 ? 4 : layout.dtype.itemSize
                return Part(path: file, bytes: Double(layout.count) * Double(stored))
            }
            guard isGzip(file), let size = inflatedSize(file) else { return nil }
            return Part(path: file, bytes: Double(size) / 2)
        }
    }

    /// The bytes `path` holds once inflated: its size when it is not gzip-compressed, otherwise its last member's
    /// ISIZE (the inflated size modulo 2^32, exact below the 4 GiB that `readFileBytes` reads at most). Nil when the
    /// file cannot be read or sized (a pipe).
    static func inflatedSize(_ path: String) -> Int? {
        let fd = open(path, O_RDONLY)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var info = stat()
        guard fstat(fd, &info) == 0, (info.st_mode & S_IFMT) == S_IFREG else { return nil }
        let size = Int(info.st_size)
        var magic: [UInt8] = [0, 0]
        guard pread(fd, &magic, 2, 0) == 2, magic == [0x1F, 0x8B] else { return size }
        var trailer: [UInt8] = [0, 0, 0, 0]
        guard size >= 18, pread(fd, &trailer, 4, off_t(size - 4)) == 4 else { return nil }
        return trailer.reversed().reduce(0) { $0 << 8 | Int($1) }
    }

    static func isGzip(_ path: String) -> Bool {
        guard let handle = FileHandle(forReadingAtPath: path) else { return false }
        defer { try? handle.close() }
        return (try? handle.read(upToCount: 2)).map { Array($0) == [0x1F, 0x8B] } ?? false
    }
}
