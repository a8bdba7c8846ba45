#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// The files a data key names, in name order: one file, a directory (its `.npy` files), or a glob pattern
/// (`data/train-*.npy`). Shards numbered as a series (`train-00003-of-00064.npy`) must all be there.
public enum DataFiles {
    public static func resolve(_ spec: String) throws -> [String] {
        let files: [String]
        // A file that exists under the name as written is that file, whatever characters its name holds: `x[1].npy`
        // as a pattern matched `x1.npy` and trained on it (or matched nothing though the file was there).
        var info = stat()
        if stat(spec, &info) == 0 && (info.st_mode & S_IFMT) == S_IFREG { return [spec] }
        if spec.contains(where: { "*?[".contains($0) }) {
            files = try glob(spec)
            guard !files.isEmpty else { throw DataError(path: spec, reason: "matches no file") }
        } else if isDirectory(spec) {
            files = try directoryFiles(spec)
            guard !files.isEmpty else { throw DataError(path: spec, reason: "is a directory without .npy files") }
        } else {
            return [spec]
        }
        try checkSeries(files, spec: spec)
        return files
    }

    private static func isDirectory(_ path: String) -> Bool {
        var info = stat()
        return stat(path, &info) == 0 && (info.st_mode & S_IFMT) == S_IFDIR
    }

    private static func glob(_ pattern: String) throws -> [String] {
        var matches = glob_t()
        defer { globfree(&matches) }
        let status = Glibc.glob(pattern, 0, nil, &matches)
        guard status == 0 || status == GLOB_NOMATCH else {
            throw DataError(path: pattern, reason: "cannot expand the pattern (glob error \(status))")
        }
        return (0..<Int(matches.gl_pathc)).compactMap { matches.gl_pathv[$0].map { String(cString: $0) } }.sorted()
    }

    private static func directoryFiles(_ directory: String) throws -> [String] {
        guard let handle = opendir(directory) else {
            throw DataError(path: directory, reason: "cannot read the directory: \(String(cString: strerror(errno)))")
        }
        defer { closedir(handle) }
        var names: [String] = []
        while let entry = readdir(handle) {
            let name = withUnsafePointer(to: entry.pointee.d_name) { String(cString: UnsafeRawPointer($0).assumingMemoryBound(to: CChar.self)) }
            if name.hasSuffix(".npy") || name.hasSuffix(".npy.gz") { names.append(name) }
        }
        let base = directory.hasSuffix("/") ? directory : directory + "/"
        return names.sorted().map { base + $0 }
    }

    /// Shards named `PREFIX-NNNNN-of-MMMMM.npy`: every number below MMMMM present once, all with the same MMMMM. A
    /// number given twice (`.npy` and `.npy.gz` of one shard) or at or past the count would add samples silently.
    static func checkSeries(_ files: [String], spec: String) throws {
        var series: [String: (total: Int, seen: [Int: String], example: String, width: Int)] = [:]
        for file in files {
            guard let (prefix, number, total, width) = seriesPart(file) else { continue }
            var entry = series[prefix] ?? (total, [:], file, width)
            guard entry.total == total else {
                throw DataError(path: file, reason: "is shard \(number) of \(total), but \(entry.example) belongs to a series of "
                    + "\(entry.total): one series must agree on its count")
            }
            guard number < total else {
                throw DataError(path: file, reason: "is shard \(number) of a series of \(total), numbered 0 to \(total - 1)")
            }
            if let other = entry.seen[number] {
                throw DataError(path: file, reason: "is shard \(number) of \(total), and so is \(other): each shard once")
            }
            entry.seen[number] = file
            series[prefix] = entry
        }
        for (prefix, entry) in series.sorted(by: { $0.key < $1.key }) {
            let pad = { (n: Int) in String(repeating: "0", count: max(0, entry.width - String(n).count)) + String(n) }
            if let missing = (0..<entry.total).first(where: { entry.seen[$0] == nil }) {
                throw DataError(path: spec, reason: "shard \(prefix)-\(pad(missing))-of-\(pad(entry.total)) is missing "
                    + "(\(entry.seen.count) of \(entry.total) present)")
            }
        }
    }

    /// ("dir/train", 3, 64, 5) for "dir/train-00003-of-00064.npy"; nil for a name outside a series.
    private static func seriesPart(_ file: String) -> (String, Int, Int, Int)? {
        var name = Substring(file)
        for suffix in [".gz", ".npy"] where name.hasSuffix(suffix) { name = name.dropLast(suffix.count) }
        let parts = name.split(separator: "-", omittingEmptySubsequences: false)
        guard parts.count >= 4, parts[parts.count - 2] == "of",
              let number = Int(parts[parts.count - 3]), let total = Int(parts[parts.count - 1]),
              parts[parts.count - 3].allSatisfy(\.isNumber), parts[parts.count - 1].allSatisfy(\.isNumber), total > 0 else {
            return nil
        }
        return (parts.dropLast(3).joined(separator: "-"), number, total, parts[parts.count - 1].count)
    }
}
