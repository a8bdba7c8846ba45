#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import Synchronization

/// A file as it was when it was opened: a run compares it again before it trusts the data (at every epoch's end, at
/// every checkpoint and on resume), since a mapped file that is truncated or replaced underneath a run would give
/// other values, or a SIGBUS, instead of an error.
public struct FileIdentity: Equatable, Sendable, Codable {
    public let size: Int
    public let modified: Double
    public let device: UInt64
    public let inode: UInt64

    /// The file at `path` now; nil when `stat` fails (it is gone). Allocates nothing: a reader may check its file after
    /// every read (`HDF5Rows`).
    public init?(_ path: UnsafePointer<CChar>) {
        var info = stat()
        guard stat(path, &info) == 0 else { return nil }
        size = Int(info.st_size)
        modified = Double(info.st_mtim.tv_sec) + Double(info.st_mtim.tv_nsec) * 1e-9
        device = UInt64(info.st_dev)
        inode = UInt64(info.st_ino)
    }

    public static func of(_ path: String) throws -> FileIdentity {
        guard let identity = path.withCString(FileIdentity.init) else {
            throw DataError(path: path, reason: "cannot stat file: \(String(cString: strerror(errno)))")
        }
        return identity
    }

    /// Why `now` is not this file any more, or nil when it is. `sameFile: false` compares the contents' size and
    /// modification time only (a checkpoint's record of a file survives the file being copied back in place).
    public func change(to now: FileIdentity?, sameFile: Bool = true) -> String? {
        guard let now else { return "is gone (deleted or renamed)" }
        if sameFile && (now.device != device || now.inode != inode) { return "was replaced by another file" }
        if now.size != size { return "changed size from \(size) to \(now.size) bytes" }
        if now.modified != modified { return "was modified" }
        return nil
    }
}

/// The features of one or more raw `.npy` files (shards), mapped read-only: a rank touches only the pages of the
/// samples it gathers, and every rank of a node shares one copy of them in the page cache. One global sample index
/// runs over the shards in order. Values are read in place (uint8, or float32 little-endian on a little-endian host).
public final class MappedFeatures: @unchecked Sendable {
    public struct Shard: @unchecked Sendable {
        public let path: String
        /// The shard's first sample in the global index, and its samples.
        public let firstRow: Int
        public let rows: Int
        public let identity: FileIdentity
        /// The first value of the shard's data, inside `mapping`.
        let data: UnsafeRawPointer
        let mapping: UnsafeMutableRawPointer
        let length: Int
    }

    public let element: StoredElement
    public let featureCount: Int
    public let sampleShape: [Int]
    public let shards: [Shard]
    /// Samples over all shards.
    public let count: Int
    private let rowBytes: Int
    /// `shards[i].firstRow` and `shards[i].data`, apart from the shards' paths: `row(_:)`, once per gathered sample,
    /// reads plain words instead of copying a `Shard` (and retaining its path).
    private let firstRows: UnsafeMutableBufferPointer<Int>
    private let starts: UnsafeMutableBufferPointer<UnsafeRawPointer>
    private static let pageSize = Int(sysconf(Int32(_SC_PAGESIZE)))

    /// Maps every file of `paths` (in that order). They must hold arrays of the same dtype (uint8 or float32) and the
    /// same sample shape, each with at least one sample.
    public convenience init(paths: [String]) throws {
        try self.init(paths: paths, layouts: paths.map { try NPY.layout(path: $0) })
    }

    /// `layouts`: each file's, as `NPY.layout(path:)` read it.
    init(paths: [String], layouts: [NPYLayout]) throws {
        precondition(!paths.isEmpty && paths.count == layouts.count, "no shards to map, or not one layout per shard")
        var shards: [Shard] = []
        var first: (path: String, layout: NPYLayout)? = nil
        do {
            for (path, layout) in zip(paths, layouts) {
                guard let element = StoredElement(layout.dtype) else {
                    throw DataError(path: path, reason: "has dtype \(layout.dtypeName): a mapped data set holds uint8 or float32 "
                        + "features (convert with a.astype('float32'), or set data.mmap=false to read it into memory)")
                }
                guard layout.shape.count >= 1 else {
                    throw DataError(path: path, reason: "expected features shaped [N, ...], got a 0-d array")
                }
                guard layout.shape[0] > 0 else {
                    throw DataError(path: path, reason: "is an empty shard: shape \(layout.shape) holds no samples")
                }
                guard layout.dataOffset % element.size == 0 else {
                    throw DataError(path: path, reason: "its data starts at byte \(layout.dataOffset), not aligned for "
                        + "\(layout.dtypeName): write it with NumPy's np.save, or set data.mmap=false")
                }
                if let first {
                    if layout.dtypeName != first.layout.dtypeName || Array(layout.shape.dropFirst()) != Array(first.layout.shape.dropFirst()) {
                        throw DataError(path: path, reason: "holds \(layout.dtypeName) samples shaped \(Array(layout.shape.dropFirst())), "
                            + "but \(first.path) holds \(first.layout.dtypeName) samples shaped \(Array(first.layout.shape.dropFirst())): "
                            + "every shard of a data set must have the same dtype and sample shape")
                    }
                } else {
                    first = (path, layout)
                }
                shards.append(try Self.map(path, layout: layout, firstRow: shards.last.map { $0.firstRow + $0.rows } ?? 0))
            }
        } catch {
            for shard in shards { munmap(shard.mapping, shard.length) }
            throw error
        }
        let layout = first!.layout
        element = StoredElement(layout.dtype)!
        let sampleShape = layout.shape.count == 1 ? [1] : Array(layout.shape.dropFirst())
        self.sampleShape = sampleShape
        featureCount = sampleShape.reduce(1, *)
        rowBytes = featureCount * element.size
        self.shards = shards
        count = shards.last!.firstRow + shards.last!.rows
        firstRows = .allocate(capacity: shards.count)
        _ = firstRows.initialize(from: shards.map(\.firstRow))
        starts = .allocate(capacity: shards.count)
        _ = starts.initialize(from: shards.map(\.data))
        for shard in shards { MappedRegions.register(shard) }
    }

    deinit {
        for shard in shards {
            MappedRegions.unregister(shard)
            munmap(shard.mapping, shard.length)
        }
        firstRows.deallocate()
        starts.deallocate()
    }

    private static func map(_ path: String, layout: NPYLayout, firstRow: Int) throws -> Shard {
        let identity = try FileIdentity.of(path)
        let fd = open(path, O_RDONLY)
        guard fd >= 0 else { throw DataError(path: path, reason: "cannot open file: \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        guard let mapping = mmap(nil, identity.size, PROT_READ, MAP_SHARED, fd, 0), mapping != MAP_FAILED else {
            throw DataError(path: path, reason: "cannot map file: \(String(cString: strerror(errno)))")
        }
        // Samples are read in a shuffled order: read only the pages asked for, not the kernel's readahead around each,
        // which would fill a page cache smaller than the data with pages no step wants (`willNeed` asks ahead instead).
        madvise(mapping, identity.size, MADV_RANDOM)
        return Shard(path: path, firstRow: firstRow, rows: layout.shape[0], identity: identity,
                     data: UnsafeRawPointer(mapping + layout.dataOffset), mapping: mapping, length: identity.size)
    }

    /// Sample `index`'s stored values.
    @inline(__always)
    public func row(_ index: Int) -> UnsafeRawPointer {
        let shard = shardIndex(ofRow: index)
        return starts[shard] + (index - firstRows[shard]) * rowBytes
    }

    /// The shard that holds sample `index`: the last one whose first row is at most `index`.
    @inline(__always)
    public func shardIndex(ofRow index: Int) -> Int {
        var low = 0, high = firstRows.count - 1
        while low < high {
            let middle = (low + high + 1) >> 1
            if firstRows[middle] <= index { low = middle } else { high = middle - 1 }
        }
        return low
    }

    /// Asks the kernel to start reading the pages of these samples now (MADV_WILLNEED), without waiting for them: a
    /// later step's batch is read from disk while this one computes, many requests in flight at once. A sample whose
    /// pages are in the page cache costs one system call.
    public func willNeed(_ indices: UnsafeBufferPointer<Int>) {
        let page = Self.pageSize
        for index in indices {
            let start = UInt(bitPattern: row(index))
            let first = start & ~UInt(page - 1)
            madvise(UnsafeMutableRawPointer(bitPattern: first), Int(start - first) + rowBytes, MADV_WILLNEED)
        }
    }

    /// Asks the kernel to read the consecutive samples `rows` now, in large requests (MADV_WILLNEED over their span
    /// in each shard): a pass over a range, such as the statistics', would otherwise fault page by page, readahead off.
    public func willNeed(rows: Range<Int>) {
        guard !rows.isEmpty else { return }
        let page = Self.pageSize
        for shard in shards where shard.firstRow < rows.upperBound && shard.firstRow + shard.rows > rows.lowerBound {
            let first = max(rows.lowerBound, shard.firstRow) - shard.firstRow
            let last = min(rows.upperBound, shard.firstRow + shard.rows) - shard.firstRow
            let start = UInt(bitPattern: shard.data + first * rowBytes)
            let aligned = start & ~UInt(page - 1)
            madvise(UnsafeMutableRawPointer(bitPattern: aligned), Int(start - aligned) + (last - first) * rowBytes, MADV_WILLNEED)
        }
    }

    /// Bytes mapped: shared by every rank of a node through the page cache, resident only as far as they are read.
    public var mappedBytes: Int { shards.reduce(0) { $0 + $1.length } }

    /// Throws, naming the shard, when a file is no longer the one that was mapped.
    public func checkUnchanged() throws {
        for shard in shards {
            let now = try FileIdentity.of(shard.path)
            if let change = shard.identity.change(to: now) {
                throw DataError(path: shard.path, reason: "\(change) while the run used it: a shard must not change during a run")
            }
        }
    }
}

/// How stored feature values are typed: what a reader delivers and the gather loops convert.
public enum StoredElement: String, Sendable {
    case uint8, float32
    public var size: Int { self == .uint8 ? 1 : 4 }

    init?(_ dtype: NPY.DType) {
        switch dtype {
        case .uint8: self = .uint8
        case .float32: self = .float32
        case .float64, .int32, .int64: return nil
        }
    }
}

/// Every mapped shard's address range and path, kept where a SIGBUS handler can read them without allocating: a file
/// truncated while mapped makes a read past its new end raise SIGBUS, and the handler names the file instead of the
/// process dying with a bare signal (`installFaultHandler`).
public enum MappedRegions {
    private static let capacity = 4096
    /// Serialises registration (data sets may be mapped from several threads); the handler reads without it.
    private static let lock = Mutex(())
    /// (start, end, path as a C string) of each registered shard; a slot with start 0 is free.
    nonisolated(unsafe) private static let slots: UnsafeMutablePointer<(UInt, UInt, UnsafeMutablePointer<CChar>?)> = {
        let slots = UnsafeMutablePointer<(UInt, UInt, UnsafeMutablePointer<CChar>?)>.allocate(capacity: capacity)
        slots.initialize(repeating: (0, 0, nil), count: capacity)
        return slots
    }()
    /// The handler's words, made as C strings before it can run: it must not allocate.
    nonisolated(unsafe) private static var prefix: UnsafeMutablePointer<CChar>? = nil
    nonisolated(unsafe) private static var explanation: UnsafeMutablePointer<CChar>? = nil

    static func register(_ shard: MappedFeatures.Shard) {
        let start = UInt(bitPattern: shard.mapping)
        lock.withLock { _ in
            for i in 0..<capacity where slots[i].0 == 0 {
                slots[i] = (start, start + UInt(shard.length), strdup(shard.path))
                return
            }
        }
    }

    static func unregister(_ shard: MappedFeatures.Shard) {
        let start = UInt(bitPattern: shard.mapping)
        lock.withLock { _ in
            for i in 0..<capacity where slots[i].0 == start {
                let path = slots[i].2
                slots[i] = (0, 0, nil)
                free(path)
                return
            }
        }
    }

    /// Installs the SIGBUS handler: a fault inside a mapped shard prints `PREFIX error: DATA FILE: changed while
    /// mapped ...` and exits 1 (the launcher then ends the other ranks); any other SIGBUS keeps its default action.
    public static func installFaultHandler(prefix: String) {
        lock.withLock { _ in
            Self.prefix = strdup(prefix + " error: ")
            explanation = strdup(": the data file changed while it was mapped (truncated or rewritten: reading it raised SIGBUS); "
                + "a shard must not change during a run\n")
        }
        var action = sigaction()
        action.sa_flags = SA_SIGINFO
        action.__sigaction_handler.sa_sigaction = { _, info, _ in
            let address = UInt(bitPattern: info?.pointee._sifields._sigfault.si_addr)
            var path: UnsafeMutablePointer<CChar>? = nil
            for i in 0..<MappedRegions.capacity where MappedRegions.slots[i].0 != 0 {
                if address >= MappedRegions.slots[i].0 && address < MappedRegions.slots[i].1 { path = MappedRegions.slots[i].2 }
            }
            guard let path else {
                signal(SIGBUS, SIG_DFL)
                raise(SIGBUS)
                return
            }
            func say(_ text: UnsafePointer<CChar>?) { if let text { _ = write(2, text, strlen(text)) } }
            say(MappedRegions.prefix)
            say(path)
            say(MappedRegions.explanation)
            _exit(1)
        }
        sigaction(SIGBUS, &action, nil)
    }
}
