import CHDF5
import Foundation

// MARK: - The library lock

/// Serialises every libhdf5 call in the process. Debian's build is compiled thread-safe, but other builds are
/// not, and even a thread-safe build takes one global lock per call: serialising here costs nothing extra and
/// keeps a reader correct on any build.
private let libraryLock = NSLock()

/// Runs `body` holding the library lock, with HDF5's automatic error printing off for this thread (the setting
/// is per thread in thread-safe builds, and a prefetch thread may read from a reader another thread opened).
private func withHDF5<R>(_ body: () throws -> R) rethrows -> R {
    libraryLock.lock()
    defer { libraryLock.unlock() }
    _ = fileLockingOffEverywhere
    _ = H5Eset_auto2(bp_h5e_default(), nil, nil)
    return try body()
}

/// File locking off for every file libhdf5 opens in this process, set once before the first library call: the
/// readers' own access lists turn it off (parallel file systems often lack the locks), but libhdf5 opens a virtual
/// dataset's sources with its default, and refuses to open one file twice with different locking ("file locking
/// flag values don't match"): a source then read as zeros. `HDF5_USE_FILE_LOCKING` overrides every access list, so
/// all opens agree; a value the user set is kept (it applies to all of them alike).
private let fileLockingOffEverywhere: Void = { _ = setenv("HDF5_USE_FILE_LOCKING", "FALSE", 0) }()

/// The innermost message on this thread's HDF5 error stack (where the library detected the failure, for
/// example "file signature not found" or "inflate() failed"), or "" when the stack is empty. Call it under
/// the library lock, right after the failing call: the next library call clears the stack.
private func libraryMessage() -> String {
    var message = ""
    withUnsafeMutablePointer(to: &message) { pointer in
        _ = H5Ewalk2(bp_h5e_default(), H5E_WALK_UPWARD, { depth, error, data in
            guard depth == 0, let text = error?.pointee.desc, let data else { return 0 }
            data.assumingMemoryBound(to: String.self).pointee = String(cString: text)
            return 0
        }, pointer)
    }
    return message
}

/// A DataError about `name` whose reason ends with what HDF5 said, when it said anything.
private func libraryFailure(_ name: String, _ reason: String) -> DataError {
    let detail = libraryMessage()
    return DataError(path: name, reason: detail.isEmpty ? reason : "\(reason) (HDF5: \(detail))")
}

// MARK: - Stored types

/// A dataset's stored element type, as far as the readers care.
private enum StoredType: CustomStringConvertible {
    case integer(bits: Int, signed: Bool)
    case float(bits: Int)
    case other(String)

    /// Classifies a datatype handle (under the library lock).
    init(_ type: hid_t) {
        let bits = Int(H5Tget_size(type)) * 8
        switch H5Tget_class(type) {
        case H5T_INTEGER: self = .integer(bits: bits, signed: H5Tget_sign(type) != H5T_SGN_NONE)
        case H5T_FLOAT: self = .float(bits: bits)
        case H5T_STRING: self = .other("string")
        case H5T_COMPOUND: self = .other("compound")
        case H5T_ENUM: self = .other("enum (h5py stores bool as one)")
        case H5T_VLEN: self = .other("variable-length")
        case H5T_ARRAY: self = .other("array")
        case H5T_OPAQUE: self = .other("opaque")
        case H5T_BITFIELD: self = .other("bitfield")
        case H5T_REFERENCE: self = .other("reference")
        default: self = .other("time or unknown class")
        }
    }

    /// The NumPy name: `int32`, `float64`, `string`.
    var description: String {
        switch self {
        case .integer(let bits, let signed): (signed ? "int" : "uint") + String(bits)
        case .float(let bits): "float" + String(bits)
        case .other(let name): name
        }
    }
}

// MARK: - Opening a dataset

/// The handles of one open dataset and what the readers check about it. Created and closed under the lock.
private struct OpenDataset {
    let file: hid_t
    let dataset: hid_t
    let space: hid_t
    /// [rows, values...]: never empty, rows > 0 and every extent > 0.
    let shape: [Int]
    let stored: StoredType
    /// Chunked (often compressed) rather than contiguous: decides how many runs of rows one read may select.
    let chunked: Bool
    /// The chunk cache given to the dataset (`chunkCache`), and one chunk's bytes; 0 without one.
    var cacheBytes = 0, chunkBytes = 0
    /// The other files its values come from: an external link's target, a virtual dataset's sources (as found when
    /// opened). A reader checks them after each read, as it checks its own file.
    var otherFiles: [String] = []

    /// A file-access list without file locking: every rank opens the same read-only file, and parallel file systems
    /// often lack the locks HDF5 takes by default (it then refuses to open at all). The caller closes it.
    private static func readOnlyAccess() -> hid_t {
        let access = H5Pcreate(bp_h5p_file_access())
        _ = H5Pset_file_locking(access, false, true)
        return access
    }

    /// Opens `dataset` in `file` read-only; with `rowCache`, a chunked dataset gets a chunk cache sized for
    /// rows read in a random order (see `chunkCache`). Throws, naming `name`, for a file HDF5 cannot open
    /// (not HDF5, truncated, damaged), a missing dataset, a 0-d or empty one.
    static func open(file: String, dataset: String, name: String, rowCache: Bool) throws -> OpenDataset {
        let access = readOnlyAccess()
        let fileHandle = H5Fopen(file, bp_h5f_acc_rdonly(), access)
        // The message first: the next library call clears the error stack.
        let failure = fileHandle < 0
            ? libraryFailure(name, "cannot open the file as HDF5 (not an HDF5 file, or truncated or damaged)") : nil
        _ = H5Pclose(access)
        if let failure { throw failure }
        do {
            var datasetHandle = try openDataset(fileHandle, dataset, name: name, access: bp_h5p_default())
            let otherFiles: [String]
            do { otherFiles = try filesBehind(datasetHandle, fileHandle: fileHandle, path: file, name: name) } catch {
                _ = H5Dclose(datasetHandle)
                throw error
            }
            let chunked = isChunked(datasetHandle)
            var sizes = (cache: 0, chunk: 0)
            if rowCache, chunked, let (cache, cacheBytes, chunkBytes) = chunkCacheAccess(datasetHandle) {
                _ = H5Dclose(datasetHandle)
                defer { _ = H5Pclose(cache) }
                datasetHandle = try openDataset(fileHandle, dataset, name: name, access: cache)
                sizes = (cacheBytes, chunkBytes)
            }
            var opened = try described(file: fileHandle, dataset: datasetHandle, chunked: chunked, name: name)
            (opened.cacheBytes, opened.chunkBytes) = sizes
            opened.otherFiles = otherFiles
            return opened
        } catch {
            _ = H5Fclose(fileHandle)
            throw error
        }
    }

    private static func openDataset(_ file: hid_t, _ path: String, name: String, access: hid_t) throws -> hid_t {
        let dataset = H5Dopen2(file, path, access)
        guard dataset >= 0 else { throw libraryFailure(name, "the file has no dataset at this path") }
        return dataset
    }

    /// Reads the shape and the stored type; closes the dataset (not the file) when it throws.
    private static func described(file: hid_t, dataset: hid_t, chunked: Bool, name: String) throws -> OpenDataset {
        let space = H5Dget_space(dataset)
        let type = H5Dget_type(dataset)
        let rank = space >= 0 ? Int(H5Sget_simple_extent_ndims(space)) : -1
        var dims = [hsize_t](repeating: 0, count: max(rank, 0))
        if rank > 0 { _ = H5Sget_simple_extent_dims(space, &dims, nil) }
        let stored = type >= 0 ? StoredType(type) : .other("unreadable")
        if type >= 0 { _ = H5Tclose(type) }
        let shape = dims.map { Int($0) }
        var problem: String?
        if rank < 0 {
            problem = "cannot read the dataset's shape"
        } else if rank == 0 {
            problem = "a scalar (0-d) dataset; expected one row per sample, shape [N, ...]"
        } else if shape.contains(0) {
            problem = "an empty dataset, shape \(shape)"
        }
        if let problem {
            let failure = libraryFailure(name, problem)
            if space >= 0 { _ = H5Sclose(space) }
            _ = H5Dclose(dataset)
            throw failure
        }
        return OpenDataset(file: file, dataset: dataset, space: space, shape: shape, stored: stored, chunked: chunked)
    }

    /// The files other than `path` that an open dataset's values come from (an external link's target, a virtual
    /// dataset's sources, and theirs in turn), after checking that libhdf5 can read it: its filters are there, and so are
    /// its sources. `context` says where a nested one was reached from, for messages.
    private static func filesBehind(_ dataset: hid_t, fileHandle: hid_t, path: String, name: String, context: String = "",
                                    depth: Int = 0) throws -> [String] {
        try requireFilters(dataset, name: name, context: context)
        var files = fileName(of: dataset).map { $0 == path ? [] : [$0] } ?? []
        for source in try virtualSources(dataset, fileHandle: fileHandle, path: path, name: name, depth: depth)
        where !files.contains(source) { files.append(source) }
        return files
    }

    /// Throws, naming the mapping, when `dataset` is virtual and a source that HDF5 would look for cannot be
    /// opened: HDF5 then reads the fill value (zeros) for the rows it maps, silently, and training would go on
    /// with them. A source is looked for as libhdf5 does (H5Pset_virtual's "Source File Resolutions"): `.` is this
    /// file; a relative name under each prefix of `HDF5_VDS_PREFIX` (with `${ORIGIN}` the virtual file's
    /// directory), then the virtual file's directory, then as it is; an absolute name as it is, then by its last
    /// component the same way. The first file that opens is the one HDF5 reads, so its dataset must open too. Names
    /// with printf-style patterns (`%b`, for unlimited mappings) are left to HDF5.
    ///
    /// Returns the source files found (other than this one), so that a reader notices when one of them changes.
    ///
    /// A source that is itself virtual (or reached through an external link) is followed the same way, `depth` levels
    /// at most: one level down, a missing source read as zeros again.
    private static func virtualSources(_ dataset: hid_t, fileHandle: hid_t, path: String, name: String,
                                       depth: Int = 0) throws -> [String] {
        guard depth < 8 else { throw DataError(path: name, reason: "virtual datasets nested more than 8 deep (or in a cycle)") }
        let creation = H5Dget_create_plist(dataset)
        guard creation >= 0 else { return [] }
        defer { _ = H5Pclose(creation) }
        guard H5Pget_layout(creation) == H5D_VIRTUAL else { return [] }
        var found: [String] = []
        var count = 0
        guard H5Pget_virtual_count(creation, &count) >= 0 else {
            throw libraryFailure(name, "cannot read the virtual dataset's mappings")
        }
        let directory = (path as NSString).deletingLastPathComponent
        let prefixes = (ProcessInfo.processInfo.environment["HDF5_VDS_PREFIX"] ?? "").split(separator: ":").map {
            $0.replacingOccurrences(of: "${ORIGIN}", with: directory.isEmpty ? "." : directory)
        }
        for index in 0..<count {
            let source = libraryString { H5Pget_virtual_filename(creation, index, $0, $1) } ?? ""
            let sourceDataset = libraryString { H5Pget_virtual_dsetname(creation, index, $0, $1) } ?? ""
            if source.contains("%") || sourceDataset.contains("%") { continue }
            let mapping = "virtual dataset mapping \(index + 1) of \(count), source \(source):\(sourceDataset)"
            /// The source dataset opened: what it reads from in turn.
            func follow(_ opened: hid_t, in file: hid_t, at filePath: String) throws {
                defer { _ = H5Dclose(opened) }
                for inner in try filesBehind(opened, fileHandle: file, path: filePath, name: name, context: "\(mapping): ",
                                             depth: depth + 1) where !found.contains(inner) { found.append(inner) }
            }
            if source == "." {
                let opened = H5Dopen2(fileHandle, sourceDataset, bp_h5p_default())
                guard opened >= 0 else {
                    throw DataError(path: name, reason: "\(mapping): this file has no dataset \(sourceDataset) "
                        + "(HDF5 would read zeros for its rows)")
                }
                try follow(opened, in: fileHandle, at: path)
                continue
            }
            let relative = source.hasPrefix("/") ? (source as NSString).lastPathComponent : source
            var candidates = source.hasPrefix("/") ? [source] : []
            candidates += prefixes.map { ($0 as NSString).appendingPathComponent(relative) }
            candidates += [directory.isEmpty ? relative : (directory as NSString).appendingPathComponent(relative), relative]
            candidates = candidates.enumerated().filter { !candidates.prefix($0.offset).contains($0.element) }.map(\.element)
            let access = readOnlyAccess()
            defer { _ = H5Pclose(access) }
            guard let (sourcePath, sourceFile) = candidates.lazy.map({ ($0, H5Fopen($0, bp_h5f_acc_rdonly(), access)) })
                .first(where: { $0.1 >= 0 }) else {
                throw libraryFailure(name, "\(mapping): the source file cannot be opened (looked for "
                    + "\(candidates.joined(separator: ", "))); HDF5 would read zeros for its rows")
            }
            defer { _ = H5Fclose(sourceFile) }
            if !found.contains(sourcePath) { found.append(sourcePath) }
            let opened = H5Dopen2(sourceFile, sourceDataset, bp_h5p_default())
            guard opened >= 0 else {
                throw DataError(path: name, reason: "\(mapping): the source file has no dataset \(sourceDataset) "
                    + "(HDF5 would read zeros for its rows)")
            }
            try follow(opened, in: sourceFile, at: sourcePath)
        }
        return found
    }

    /// Throws, naming the filter, when the dataset's chunks pass through a filter this libhdf5 does not have (h5py's
    /// `lzf`, or a plugin's): it opened, and its first read failed as "damaged or truncated".
    private static func requireFilters(_ dataset: hid_t, name: String, context: String = "") throws {
        let creation = H5Dget_create_plist(dataset)
        guard creation >= 0 else { return }
        defer { _ = H5Pclose(creation) }
        for index in 0..<max(0, H5Pget_nfilters(creation)) {
            var flags: UInt32 = 0, values = 0, config: UInt32 = 0
            var filterName = [CChar](repeating: 0, count: 256)
            let filter = H5Pget_filter2(creation, UInt32(index), &flags, &values, nil, filterName.count, &filterName, &config)
            guard filter >= 0, H5Zfilter_avail(filter) <= 0 else { continue }
            let named = String(decoding: filterName.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
            throw DataError(path: name, reason: "\(context)its chunks are compressed with filter \(filter)\(named.isEmpty ? "" : " (\(named))"), "
                + "which this libhdf5 does not have (h5py's lzf is one): rewrite it with compression='gzip' or none")
        }
    }

    /// The file an open dataset lives in, as libhdf5 opened it: another than the one named when the path went through
    /// an external link. Nil when it cannot be read.
    private static func fileName(of dataset: hid_t) -> String? {
        let owner = H5Iget_file_id(dataset)
        guard owner >= 0 else { return nil }
        defer { _ = H5Fclose(owner) }
        return libraryString { H5Fget_name(owner, $0, $1) }.flatMap { $0.isEmpty ? nil : $0 }
    }

    /// A string libhdf5 hands out the C way: `read(nil, 0)` says its length, `read(buffer, size)` fills it. Nil when
    /// the first call fails.
    private static func libraryString(_ read: (UnsafeMutablePointer<CChar>?, Int) -> Int) -> String? {
        let length = read(nil, 0)
        guard length >= 0 else { return nil }
        var buffer = [CChar](repeating: 0, count: length + 1)
        _ = read(&buffer, buffer.count)
        return String(decoding: buffer.prefix(length).map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    private static func isChunked(_ dataset: hid_t) -> Bool {
        let creation = H5Dget_create_plist(dataset)
        defer { _ = H5Pclose(creation) }
        return creation >= 0 && H5Pget_layout(creation) == H5D_CHUNKED
    }

    /// A dataset-access list with a chunk cache for random rows, its size and the chunk's, or nil when the chunk shape
    /// cannot be read.
    private static func chunkCacheAccess(_ dataset: hid_t) -> (hid_t, cacheBytes: Int, chunkBytes: Int)? {
        let creation = H5Dget_create_plist(dataset)
        defer { _ = H5Pclose(creation) }
        guard creation >= 0 else { return nil }
        let type = H5Dget_type(dataset)
        let elementBytes = type >= 0 ? Int(H5Tget_size(type)) : 1
        if type >= 0 { _ = H5Tclose(type) }
        var chunk = [hsize_t](repeating: 0, count: 32)
        let rank = Int(H5Pget_chunk(creation, Int32(chunk.count), &chunk))
        guard rank > 0 else { return nil }
        let chunkBytes = chunk.prefix(rank).reduce(elementBytes) { $0 * Int($1) }
        let cache = chunkCache(chunkBytes: chunkBytes)
        let access = H5Pcreate(bp_h5p_dataset_access())
        _ = H5Pset_chunk_cache(access, cache.slots, cache.bytes, cache.w0)
        return (access, cache.bytes, chunkBytes)
    }

    func close() {
        _ = H5Sclose(space)
        _ = H5Dclose(dataset)
        _ = H5Fclose(file)
    }
}

/// The chunk cache for one dataset read in a random order: room for four chunks (at least HDF5's default of
/// 1 MiB, at most 64 MiB per reader, so a rank's private memory stays small; a chunk larger than the cache is
/// decompressed on every read that touches it). HDF5's guide asks for about 100 hash slots per chunk held,
/// and a prime count so chunk indices spread over the slots.
///
/// w0 = 1 (evict fully read chunks first): an epoch reads every row once, so a chunk whose rows were all read
/// by one call will not be needed again this epoch, while a partly read chunk still holds rows that later
/// batches of the epoch ask for.
func chunkCache(chunkBytes: Int) -> (slots: Int, bytes: Int, w0: Double) {
    let bytes = min(max(4 * chunkBytes, 1 << 20), 64 << 20)
    let held = max(1, bytes / max(chunkBytes, 1))
    var slots = 100 * held + 1
    while !isPrime(slots) { slots += 2 }
    return (slots, bytes, 1.0)
}

private func isPrime(_ n: Int) -> Bool {
    guard n >= 2 else { return false }
    var divisor = 2
    while divisor * divisor <= n {
        if n % divisor == 0 { return false }
        divisor += 1
    }
    return true
}

/// Throws unless `file` names an existing regular file (HDF5's own message for a missing file is obscure).
private func requireFile(_ file: String, name: String) throws {
    var isDirectory: ObjCBool = false
    guard FileManager.default.fileExists(atPath: file, isDirectory: &isDirectory) else {
        throw DataError(path: name, reason: "no such file: \(file)")
    }
    guard !isDirectory.boolValue else { throw DataError(path: name, reason: "\(file) is a directory, not an HDF5 file") }
}

// MARK: - Specs and labels

/// HDF5 data sets named as `FILE:/DATASET` (for example `train.h5:/images`), and their labels.
public enum HDF5 {
    /// Splits `train.h5:/images` into the file and the dataset path (`/images`) at the last `:/`.
    /// Throws, naming `spec`, when either part is missing.
    public static func split(_ spec: String) throws -> (file: String, dataset: String) {
        guard let colon = spec.range(of: ":/", options: .backwards), colon.lowerBound > spec.startIndex else {
            throw DataError(path: spec, reason: "not an HDF5 data set: expected FILE:/DATASET, for example train.h5:/images")
        }
        let dataset = String(spec[spec.index(after: colon.lowerBound)...])
        guard dataset.count > 1 else {
            throw DataError(path: spec, reason: "no dataset after ':': expected FILE:/DATASET, for example train.h5:/images")
        }
        return (String(spec[..<colon.lowerBound]), dataset)
    }

    /// Reads a rank-1 integer dataset of labels (stored as uint8, int8, int16, int32 or int64; uint16 and
    /// uint32 also fit). Throws, naming `file:dataset`, for anything `HDF5Rows` rejects, another rank or
    /// dtype, and a value outside 0...Int32.max (naming its index).
    /// The most labels a data set may declare: 4 GiB of them as int64.
    static let maxLabels = 1 << 29

    public static func readLabels(file: String, dataset: String) throws -> [Int32] {
        let name = "\(file):\(dataset)"
        try requireFile(file, name: name)
        let values: [Int64] = try withHDF5 {
            let opened = try OpenDataset.open(file: file, dataset: dataset, name: name, rowCache: false)
            defer { opened.close() }
            guard opened.shape.count == 1 else {
                throw DataError(path: name, reason: "labels must be one value per sample (rank 1); shape is \(opened.shape)")
            }
            switch opened.stored {
            case .integer(let bits, let signed) where signed || bits < 64: break
            default:
                throw DataError(path: name, reason: "unsupported label dtype \(opened.stored) (expected integers: int8 to int64, uint8 to uint32)")
            }
            // Labels are held in memory, read as int64 first: a declared count no memory holds (a sparse chunked
            // data set of 10^12 values in a 5 KB file) is refused before anything is allocated, as the other
            // readers refuse more than 4 GiB.
            guard opened.shape[0] <= maxLabels else {
                throw DataError(path: name, reason: "\(opened.shape[0]) labels: more than the \(maxLabels) (2^29, 4 GiB read as int64) "
                    + "that bpworker holds in memory")
            }
            var values = [Int64](repeating: 0, count: opened.shape[0])
            guard H5Dread(opened.dataset, bp_h5t_native_int64(), bp_h5s_all(), bp_h5s_all(), bp_h5p_default(), &values) >= 0
            else { throw libraryFailure(name, "cannot read the labels (the file is damaged or truncated)") }
            return values
        }
        var labels = [Int32](repeating: 0, count: values.count)
        for (index, value) in values.enumerated() {
            guard value >= 0, value <= Int64(Int32.max) else {
                throw DataError(path: name, reason: "label at index \(index) is \(value), outside 0...\(Int32.max)")
            }
            labels[index] = Int32(value)
        }
        return labels
    }
}

// MARK: - Rows on demand

/// Feature rows of one HDF5 dataset ([N, ...], or [N] for one value per sample), read on demand from a file
/// opened read-only: contiguous or chunked, gzip-compressed or not. Stored uint8 is delivered as uint8;
/// float32 and float64 as float32 (HDF5 converts on read, rounding to nearest as NumPy's `astype` does for float64 in
/// the machine's byte order; big-endian float64 goes through libhdf5's own conversion, which rounds a value exactly
/// halfway between two float32 up where NumPy rounds it to even: such values differ in their last bit).
///
/// `@unchecked Sendable`: the scratch buffers are used by one thread at a time (the `RowReader` contract), and
/// every library call holds the process-wide lock.
public final class HDF5Rows: RowReader, @unchecked Sendable {
    public let name: String
    public let count: Int
    public let sampleShape: [Int]
    public let element: StoredElement

    private let opened: OpenDataset
    private let memoryType: hid_t
    private let rowBytes: Int
    /// Runs of consecutive rows selected per library call. Measured with libhdf5 1.10.8 (100,000 rows of
    /// 784 bytes, random batches): one union of a whole batch costs time quadratic in its runs (4,096 rows:
    /// 180 ms contiguous, 1.7 s chunked). A chunked read with more than one run builds a per-chunk map that
    /// costs 5-10x more than one read per run (256 rows: 0.6-0.8 ms one run per read, 5-8 ms with 2 to 32),
    /// while a contiguous one gains a little from 16 (256 rows: 0.9 ms against 1.2 ms).
    private let runsPerRead: Int
    /// Hyperslab start and count, one entry per dimension; only the first (rows) changes between calls.
    private let start: UnsafeMutablePointer<hsize_t>
    private let extent: UnsafeMutablePointer<hsize_t>
    /// Sized for the largest batch seen, grown only when a larger one arrives: the positions of a batch's
    /// requests sorted by row, the distinct rows as read (file order), and a memory dataspace of that size.
    private var capacity = 0
    private var order: UnsafeMutablePointer<Int>?
    private var scratch: UnsafeMutableRawPointer?
    private var memorySpace: hid_t = -1
    /// The file's path as a C string (for `stat` without bridging a String on every read) and its identity
    /// when opened.
    private let cPath: UnsafeMutablePointer<CChar>
    private let openedAs: FileIdentity?
    /// The same for the other files the values come from (an external link's target, a virtual dataset's sources):
    /// one that changed went unnoticed, and the run trained on its new contents.
    private let otherFiles: [(path: String, cPath: UnsafeMutablePointer<CChar>, openedAs: FileIdentity?)]

    /// Opens `dataset` (a path such as `/images`) in `file`. Throws a `DataError` naming `file:dataset` for a
    /// missing file, a file that is not HDF5 or is truncated or damaged, a missing, 0-d or empty dataset, and
    /// a stored type other than uint8, float32 and float64 (naming it).
    public init(file: String, dataset: String) throws {
        name = "\(file):\(dataset)"
        try requireFile(file, name: name)
        let name = name
        let opened = try withHDF5 { try OpenDataset.open(file: file, dataset: dataset, name: name, rowCache: true) }
        switch opened.stored {
        case .integer(bits: 8, signed: false): (element, memoryType) = (.uint8, withHDF5 { bp_h5t_native_uchar() })
        case .float(bits: 32), .float(bits: 64): (element, memoryType) = (.float32, withHDF5 { bp_h5t_native_float() })
        default:
            withHDF5 { opened.close() }
            throw DataError(path: name, reason: "unsupported feature dtype \(opened.stored) (expected uint8, float32 or float64)")
        }
        self.opened = opened
        count = opened.shape[0]
        sampleShape = opened.shape.count == 1 ? [1] : Array(opened.shape.dropFirst())
        rowBytes = sampleShape.reduce(element.size, *)
        runsPerRead = opened.chunked ? 1 : 16
        cPath = strdup(file)
        openedAs = FileIdentity(cPath)
        otherFiles = opened.otherFiles.map { path in
            let c = strdup(path)!
            return (path, c, FileIdentity(c))
        }
        start = .allocate(capacity: opened.shape.count)
        extent = .allocate(capacity: opened.shape.count)
        for d in opened.shape.indices {
            start[d] = 0
            extent[d] = hsize_t(opened.shape[d])
        }
    }

    /// What reading takes beyond the rows it delivers, for the memory estimate: the chunk cache as it fills (the whole
    /// chunks it holds, never more than the data set), and what libhdf5 and malloc keep between reads, measured on the
    /// reference machine at about 32 MiB a data set (65 to 87 MiB for a training and a test set of 64-row gzip chunks),
    /// or two chunks decompressed at once where that is more.
    public var workingBytes: Double {
        let chunk = Double(opened.chunkBytes)
        let cached = chunk > 0 ? (Double(opened.cacheBytes) / chunk).rounded(.down) * chunk : 0
        return min(cached, Double(count * rowBytes)) + max(32 * 1_048_576, 2 * chunk)
    }

    deinit {
        withHDF5 {
            if memorySpace >= 0 { _ = H5Sclose(memorySpace) }
            opened.close()
        }
        start.deallocate()
        extent.deallocate()
        order?.deallocate()
        scratch?.deallocate()
        free(cPath)
        for other in otherFiles { free(other.cPath) }
    }

    /// Reads the sorted distinct rows into the scratch rows (`readDistinct`), then copies each request into
    /// place. Allocation-free in Swift once the largest batch has been seen; libhdf5 allocates its own
    /// selection and chunk structures on every call, which no caller can avoid.
    public func read(rows: UnsafeBufferPointer<Int>, into destination: UnsafeMutableRawPointer) throws {
        guard !rows.isEmpty else { return }
        for row in rows where row < 0 || row >= count {
            throw DataError(path: name, reason: "row \(row) is outside the dataset's 0..<\(count)")
        }
        try reserve(rows.count)
        guard let order, let scratch else { return }
        for slot in rows.indices { order[slot] = slot }
        heapSort(order, rows.count) { rows[$0] < rows[$1] }
        try unchangedAfter { try withHDF5 { try readDistinct(rows, order, into: scratch) } }
        var position = -1
        var previous = -1
        for k in 0..<rows.count {
            let slot = order[k]
            if rows[slot] != previous { position += 1; previous = rows[slot] }
            (destination + slot * rowBytes).copyMemory(from: scratch + position * rowBytes, byteCount: rowBytes)
        }
    }

    public func read(range: Range<Int>, into destination: UnsafeMutableRawPointer) throws {
        guard range.lowerBound >= 0, range.upperBound <= count else {
            throw DataError(path: name, reason: "rows \(range) are outside the dataset's 0..<\(count)")
        }
        guard !range.isEmpty else { return }
        try unchangedAfter { try withHDF5 {
            start[0] = hsize_t(range.lowerBound)
            extent[0] = hsize_t(range.count)
            _ = H5Sselect_hyperslab(opened.space, H5S_SELECT_SET, start, nil, extent, nil)
            var values = hsize_t(range.count * rowBytes / element.size)
            let space = H5Screate_simple(1, &values, nil)
            defer { _ = H5Sclose(space) }
            let status = H5Dread(opened.dataset, memoryType, space, opened.space, bp_h5p_default(), destination)
            guard status >= 0 else {
                throw libraryFailure(name, "cannot read rows \(range) (the file is damaged or truncated)")
            }
        } }
    }

    /// Runs `read`, then throws if the file changed since it was opened: HDF5 reads a truncated contiguous
    /// dataset as zeros without an error, and the change explains a failed read better than the library does.
    /// One `stat` per read, after it, so a change during the read is caught too.
    private func unchangedAfter(_ read: () throws -> Void) throws {
        do {
            try read()
        } catch {
            try requireUnchanged()
            throw error
        }
        try requireUnchanged()
    }

    private func requireUnchanged() throws {
        let now = FileIdentity(cPath)
        if now != openedAs, let openedAs, let change = openedAs.change(to: now) {
            throw DataError(path: name, reason: "the file \(change) since it was opened; restart the run with the data set unchanged")
        }
        for other in otherFiles {
            let now = FileIdentity(other.cPath)
            guard now != other.openedAs, let openedAs = other.openedAs, let change = openedAs.change(to: now) else { continue }
            throw DataError(path: name, reason: "\(other.path), a file its values come from (an external link's target or a virtual "
                + "dataset's source), \(change) since it was opened; restart the run with the data set unchanged")
        }
    }

    /// Reads the distinct rows of `rows` (visited in the sorted `order`) into consecutive rows of `scratch`,
    /// in increasing order (under the lock). Each library call reads a union of hyperslabs, one per run of
    /// consecutive rows, at most `runsPerRead` of them (HDF5 returns a selection in file order, whatever order
    /// it was built in).
    private func readDistinct(_ rows: UnsafeBufferPointer<Int>, _ order: UnsafeMutablePointer<Int>,
                              into scratch: UnsafeMutableRawPointer) throws {
        var done = 0, selectedRuns = 0, selectedRows = 0
        var runStart = rows[order[0]]
        var runLength = 1
        for k in 1...rows.count {
            let row = k < rows.count ? rows[order[k]] : -1
            if row == runStart + runLength - 1 { continue }
            if row == runStart + runLength { runLength += 1; continue }
            start[0] = hsize_t(runStart)
            extent[0] = hsize_t(runLength)
            let operation = selectedRuns == 0 ? H5S_SELECT_SET : H5S_SELECT_OR
            _ = H5Sselect_hyperslab(opened.space, operation, start, nil, extent, nil)
            selectedRuns += 1
            selectedRows += runLength
            if selectedRuns == runsPerRead || k == rows.count {
                try readSelection(selectedRows, into: scratch + done * rowBytes) { describeRows(rows, order) }
                done += selectedRows
                (selectedRuns, selectedRows) = (0, 0)
            }
            runStart = row
            runLength = 1
        }
    }

    /// Reads the file selection (`rows` rows) into the first rows of `buffer` (under the lock).
    private func readSelection(_ rows: Int, into buffer: UnsafeMutableRawPointer,
                               rowsForMessage: () -> String) throws {
        var memoryStart: hsize_t = 0
        var memoryCount = hsize_t(rows * rowBytes / element.size)
        _ = H5Sselect_hyperslab(memorySpace, H5S_SELECT_SET, &memoryStart, nil, &memoryCount, nil)
        let status = H5Dread(opened.dataset, memoryType, memorySpace, opened.space, bp_h5p_default(), buffer)
        guard status >= 0 else {
            throw libraryFailure(name, "cannot read rows \(rowsForMessage()) (the file is damaged or truncated)")
        }
    }

    /// Grows the sort order, the scratch rows and the memory dataspace to hold `rows` rows (never shrinks).
    private func reserve(_ rows: Int) throws {
        guard rows > capacity else { return }
        order?.deallocate()
        scratch?.deallocate()
        order = .allocate(capacity: rows)
        scratch = .allocate(byteCount: rows * rowBytes, alignment: 16)
        capacity = rows
        var values = hsize_t(rows * rowBytes / element.size)
        memorySpace = withHDF5 {
            if memorySpace >= 0 { _ = H5Sclose(memorySpace) }
            return H5Screate_simple(1, &values, nil)
        }
        guard memorySpace >= 0 else {
            capacity = 0
            throw DataError(path: name, reason: "cannot make a memory dataspace for \(rows) rows")
        }
    }

    /// The sorted distinct rows of a failed read, for its message: at most eight, then how many more.
    private func describeRows(_ rows: UnsafeBufferPointer<Int>, _ order: UnsafeMutablePointer<Int>) -> String {
        var distinct: [Int] = []
        for k in 0..<rows.count where distinct.last != rows[order[k]] { distinct.append(rows[order[k]]) }
        let shown = distinct.prefix(8).map(String.init).joined(separator: ", ")
        return distinct.count > 8 ? "\(shown) and \(distinct.count - 8) more" : shown
    }
}

/// Sorts `values[0..<count]` in place with `isLess` (heapsort: no allocation, unlike the standard library's
/// merge sort, which takes a temporary buffer for large batches).
func heapSort(_ values: UnsafeMutablePointer<Int>, _ count: Int, by isLess: (Int, Int) -> Bool) {
    func siftDown(_ root: Int, _ end: Int) {
        var parent = root
        while 2 * parent + 1 < end {
            var child = 2 * parent + 1
            if child + 1 < end, isLess(values[child], values[child + 1]) { child += 1 }
            guard isLess(values[parent], values[child]) else { return }
            (values[parent], values[child]) = (values[child], values[parent])
            parent = child
        }
    }
    guard count > 1 else { return }
    for root in stride(from: count / 2 - 1, through: 0, by: -1) { siftDown(root, count) }
    for end in stride(from: count - 1, to: 0, by: -1) {
        (values[0], values[end]) = (values[end], values[0])
        siftDown(0, end)
    }
}
