import Coordinator
import Engine
import Foundation

/// What a rank will need at its peak, and whether its node can give it: checked on every rank after the data is
/// loaded and before the model is allocated, so a model that cannot fit ends every rank with one message instead
/// of a crash in the allocator.
///
/// The estimate is what is resident already (runtime, libraries, the data sets, read from /proc) plus what the
/// run will allocate, from the shapes alone: parameters, gradients, optimizer state, activations at the batch
/// capacity, the sharded update's receive buffers, and on rank 0 the checkpoint serialization (the file is built
/// in memory before it is written) and the float64 gradient-check copy.
struct MemoryEstimate {
    struct Item: Equatable {
        let name: String
        let bytes: Double
    }

    /// Resident now: runtime, libraries, MPI and the data sets.
    var resident: Double
    /// The largest resident size so far (data loading peaks above what stays).
    var residentPeak: Double
    /// The data sets within `resident`, named for the message.
    var data: Double
    /// What is still to be allocated.
    var items: [Item]
    /// Mapped data files (`data.mmap`): shared by the node's ranks through the page cache, which the kernel may evict,
    /// so they count against no rank's private memory.
    var mapped: Double = 0
    /// Address space that later reservations take beyond `items` without becoming resident (`addressReservations`):
    /// counted against `ulimit -v` only.
    var reserved: [Item] = []

    var toAllocate: Double { items.reduce(0) { $0 + $1.bytes } }
    /// The peak this rank should reach.
    var peak: Double { max(residentPeak, resident + toAllocate) }

    /// Allowance for working memory no shape predicts: OpenBLAS's packing buffers and OpenMPI's first large
    /// collectives, measured on the reference machine (a tiny model's resident size grows by 2 to 6 MiB from
    /// setup to its peak).
    static let workingAllowance = 8.0 * 1_048_576

    /// The kernel's page tables for `bytes` of new memory: 8 bytes per 4 KiB page, 8 per 2 MiB in the tables above
    /// those, and four partly filled tables at the ends; charged to the rank's memory cgroup and never reclaimed.
    /// Uncounted, `eval --model` of the CNN at batch 2000 passed the check in a 1,520 MiB cgroup and was killed there,
    /// 0.5 MiB over (its VmPTE reached 3.2 MiB at a peak of 1.52 GiB); it is now refused below 1,523 MiB and runs
    /// from there up (see docs/memory.md).
    static func pageTableBytes(forAllocating bytes: Double) -> Double {
        (bytes / 512 + bytes / 262_144).rounded(.up) + 4 * 4096
    }

    /// What the run maps after the check without touching most of it, which `ulimit -v` counts all the same.
    /// OpenBLAS maps one buffer of 128 MiB (BUFFER_SIZE on x86-64) for each of its threads at the first GEMM and,
    /// when that mapping fails, spins in its allocator for ever: measured, a default job under a limit that passed a
    /// check without it hung at its first step. Each thread started after the check (the watchdog, the prefetch
    /// thread) maps an 8 MiB stack and a 64 MiB glibc arena, which otherwise take the room of the first checkpoint's
    /// serialization. Measured on the default job: the address space grows 282 MiB from the check to the end.
    static func addressReservations(blasThreads: Int, threadsToStart: Int) -> [Item] {
        let mib = 1_048_576.0
        return [Item(name: "OpenBLAS buffers (\(blasThreads) x 128 MiB)", bytes: Double(max(1, blasThreads)) * 128 * mib),
                Item(name: "stacks and malloc arenas of \(threadsToStart) threads", bytes: Double(threadsToStart) * 72 * mib)]
    }

    /// - Parameter training: false for `eval` and `gradcheck`, which build the model (its parameters, gradients and
    ///   activations) but train nothing: no optimizer state, update buffers, prefetched batches, checkpoints or timeline
    ///   (they were counted, and `eval --model` of a 100M-parameter file was refused for 1.6 GB it would never allocate).
    /// - Parameter checksOnEveryRank: the gradient check runs on every rank (`gradcheck --distributed`), not only
    ///   where synchronized batch norm makes it so; counted on rank 0 alone, ranks 1 and up passed and were killed.
    static func estimate(config: Configuration, spec: ModelSpec, datasets: [Dataset], rank: Int, worldSize: Int,
                         usage: ProcessMemory, training: Bool = true, checksOnEveryRank: Bool = false) -> MemoryEstimate {
        let footprint = Model<Float>.footprint(spec: spec, batchCapacity: config.batchSize)
        let parameters = footprint.parameters
        let buffer = footprint.parameterBufferBytes
        let stateNames = Optimizer<Float>.stateNames(config.optimizerConfig)
        var items = [
            Item(name: "parameters", bytes: buffer),
            Item(name: "gradients", bytes: buffer),
        ]
        if training && !stateNames.isEmpty {
            items.append(Item(name: "optimizer state (\(stateNames.joined(separator: ", ")))", bytes: Double(stateNames.count) * buffer))
        }
        items.append(Item(name: "activations at batch \(config.batchSize)", bytes: footprint.activationBytes))
        if training, config.dataPrefetch > 0, let train = datasets.first {
            items.append(Item(name: "\(config.dataPrefetch) prefetched batches", bytes: BatchPrefetcher.bufferBytes(
                depth: config.dataPrefetch, batchSize: config.batchSize, featureCount: train.featureCount)))
        }
        if training && config.reduction == .sharded && worldSize > 1 {
            let piece = LargeBuffer.allocatedBytes((parameters / Double(worldSize)).rounded(.up) * 4)
            items.append(Item(name: "sharded update buffers", bytes: Double(worldSize - 1) * piece))
        }
        if training && rank == 0 {
            // SafeTensorsWriter holds every tensor's bytes and then the whole file: twice the checkpoint's size.
            items.append(Item(name: "checkpoint serialization", bytes: 2 * Double(1 + stateNames.count) * parameters * 4))
        }
        // `--timeline`: every rank's recording buffer and the copy it sends (80 bytes an event of its capacity), and on
        // rank 0 the gathered events of every rank and the trace built from them: measured, about 450 bytes per event of
        // each rank's capacity (the window holds fewer than it has room for), counted as 500. A 4,000-step window of the
        // default model peaked at 274 MiB where 123 were counted, and was killed by its cgroup; now 330 are (2 ranks,
        // 2,000 steps: 305 measured, 323 counted).
        if training && config.timelineSteps > 0 {
            let buckets = config.bucketKiB > 0 ? max(1, Int((parameters * 4 / Double(config.bucketKiB * 1024)).rounded(.up))) : 1
            let events = Double(Timeline.capacity(steps: config.timelineSteps, runSteps: config.timelineSteps,
                                                  layers: spec.layers.count, buckets: buckets))
            items.append(Item(name: "timeline", bytes: events * (80 + (rank == 0 ? Double(worldSize) * 500 : 0))))
        }
        // The check runs on rank 0, or on every rank when it is distributed (synchronized batch norm).
        if config.gradcheckEnabled && (rank == 0 || config.batchNorm == .sync || checksOnEveryRank) {
            // The check takes gradcheck.batch samples of a rank's shard, or the whole shard when it is shorter.
            let shard = datasets.first.map { $0.count / max(worldSize, 1) + config.batchSize } ?? config.gradcheckBatch
            let checkBatch = min(config.gradcheckBatch, shard)
            let check = Model<Double>.footprint(spec: spec, batchCapacity: checkBatch)
            items.append(Item(name: "float64 gradient-check copy", bytes: 2 * check.parameterBufferBytes + check.activationBytes))
            // The analytic gradient, and the random direction with the parameters it restores: three float64 vectors
            // of the parameters' size alive at once beside the copy, during the direction check. Counted as two, a
            // check alone (`bpworker gradcheck`, no training state beside it) of 12-4096-4096-3 was estimated under
            // the 700 MiB of a cgroup it then was killed in: its peak is 824 MiB, and now it asks 797 MiB more than
            // the runtime's (refused under 800 MiB, runs under 840).
            items.append(Item(name: "gradient-check vectors", bytes: 3 * check.parameterBufferBytes
                + Model<Double>.kinkPatternBytes(spec: spec, batchCapacity: checkBatch)))
        }
        let reading = datasets.reduce(0.0) { $0 + $1.readerWorkingBytes }
        if reading > 0 { items.append(Item(name: "HDF5 chunk caches and libhdf5's buffers", bytes: reading)) }
        items.append(Item(name: "BLAS and MPI working memory", bytes: workingAllowance))
        items.append(Item(name: "page tables", bytes: pageTableBytes(forAllocating: items.reduce(0) { $0 + $1.bytes })))
        let data = datasets.reduce(0.0) { $0 + $1.residentBytes }
        // The watchdog, the prefetch thread, and one for the runtime's own (Dispatch's first worker).
        let threads = 2 + (training && config.dataPrefetch > 0 ? 1 : 0)
        return MemoryEstimate(resident: usage.resident, residentPeak: usage.residentPeak, data: data, items: items,
                              mapped: datasets.reduce(0.0) { $0 + $1.mappedBytes },
                              reserved: addressReservations(blasThreads: BLASThreads.current, threadsToStart: threads))
    }

    /// "118 MiB at peak: data 52 MiB, runtime and libraries 34 MiB, parameters 2.0 MiB, ..."
    var summary: String {
        var parts = [(name: "data", bytes: data), (name: "runtime and libraries", bytes: max(0, resident - data))]
        parts += items.map { ($0.name, $0.bytes) }
        let privately = "\(bytesText(peak)) at peak, private: " + parts.filter { $0.bytes > 0 }.map { "\($0.name) \(bytesText($0.bytes))" }
            .joined(separator: ", ")
        guard mapped > 0 else { return privately }
        return privately + "; mapped, shared by the node's ranks through the page cache: data \(bytesText(mapped))"
    }

    /// The largest items first, for the message of a model that does not fit.
    var biggest: String {
        var parts = items.map { ($0.name, $0.bytes) }
        parts.append(("data and runtime already resident", resident))
        return parts.sorted { $0.1 > $1.1 }.prefix(4).map { "\($0.0) \(bytesText($0.1))" }.joined(separator: ", ")
    }

    /// Throws when this rank's remaining allocations, times the ranks sharing its node, exceed what the node has
    /// (MemAvailable, the cgroup's limit), or when this process's address space would pass `ulimit -v`.
    func check(against limits: MemoryLimits, ranksOnNode: Int) throws(MemoryError) {
        let needed = toAllocate
        let ranks = Double(max(1, ranksOnNode))
        let onNode = ranks > 1 ? " x \(ranksOnNode) ranks on this node = \(bytesText(needed * ranks))" : ""
        func fail(_ limit: String) -> MemoryError {
            MemoryError(description: "the model does not fit in memory: each rank needs \(bytesText(needed)) more"
                + "\(onNode) (largest: \(biggest)), but \(limit). Use a smaller model (model.hidden, model.layers) or "
                + "batch (training.batch_size), fewer ranks per node, or a node with more memory")
        }
        if let limit = limits.nodeLimitPassed(by: needed * ranks) { throw fail(limit) }
        let reservations = reserved.reduce(0) { $0 + $1.bytes }
        if let limit = limits.addressSpaceLimit, (limits.addressSpace ?? 0) + needed + reservations > limit {
            let mapped = reserved.map { "\($0.name) \(bytesText($0.bytes))" }.joined(separator: ", ")
            throw fail("ulimit -v allows \(bytesText(limit)) of address space, \(bytesText(limits.addressSpace ?? 0)) is in use "
                + "and the run maps \(bytesText(reservations)) more that stays mostly untouched (\(mapped))")
        }
    }
}

/// The data sets a rank reads into memory, checked before a byte of them is read: a set larger than the node or the
/// rank's cgroup can hold ended the rank by the OOM killer half-way through reading it, with no word of why (the check
/// of `MemoryEstimate` comes after the data is loaded). `ReadFootprint` counts the least the reads will hold, so a set
/// this refuses could not have been read.
struct DataReadCheck {
    let parts: [ReadFootprint.Part]
    /// Whether `data.mmap` would map these files (eval reads its test set into memory whatever it says): the advice.
    let mappable: Bool

    /// The files of the feature sets `features` (the training set's, then the test set's, as `Setup.loadData` reads
    /// them), mapped where `mapped` and they can be.
    init(_ config: Configuration, features: [String], mapped: Bool, mappable: Bool = true) {
        parts = features.flatMap { set -> [ReadFootprint.Part] in
            switch config.dataFormat {
            case .idx: ReadFootprint.idx(images: set)
            case .npy: ReadFootprint.npy(features: set, mapped: mapped)
            case .hdf5: []
            }
        }
        self.mappable = mappable
    }

    /// The most the reads hold at once (the training set's parts, then the test set's).
    var bytes: Double { ReadFootprint.peak(parts) }

    /// Every rank's `bytes` summed over the ranks of this rank's node (collective, timed as setup's waits are, in
    /// `step`): ranks may read different files, or map them where another reads them (`data.mmap` is a per-rank key).
    /// Also whether this rank reads the node's largest share (the first such rank): the one whose files a refusal
    /// names (a refusal on rank 0 named rank 0's small files where rank 1's large one did not fit).
    func nodeBytes(_ session: Session, step: String) throws -> (total: Double, largestShare: Bool) {
        var all = [Double](repeating: 0, count: session.worldSize)
        all[session.rank] = bytes
        try SetupWatch.waiting(session.setupWatch, in: step) { () throws(MPIError) in
            try all.withUnsafeMutableBufferPointer { (buffer) throws(MPIError) in
                try session.communicator.allgather(buffer, partition: Partition(count: session.worldSize, parts: session.worldSize))
            }
        }
        let local = session.layout.localRanks
        let largest = local.max { all[$0] < all[$1] || (all[$0] == all[$1] && $0 > $1) } ?? session.rank
        return (local.reduce(0) { $0 + all[$1] }, largest == session.rank)
    }

    /// The check of every rank before it reads its data sets (setup phase "data"): `features` as `init` takes them.
    static func require(_ session: Session, features: [String], mapped: Bool, mappable: Bool = true) {
        session.agree("data") {
            let check = DataReadCheck(session.config, features: features, mapped: mapped, mappable: mappable)
            try check.check(against: .read(), nodeBytes: try check.nodeBytes(session, step: "data"), ranksOnNode: session.layout.localSize)
        }
    }

    /// Throws, on the rank of the node's largest share, when the node's ranks together (`nodeBytes`, over
    /// `ranksOnNode` ranks) would read more into memory than the node or the cgroup has; on any rank whose reads would
    /// pass `ulimit -v`.
    func check(against limits: MemoryLimits, nodeBytes: (total: Double, largestShare: Bool), ranksOnNode: Int) throws(MemoryError) {
        let needed = bytes
        guard needed > 0 else { return }
        // Page tables take no address space; the node's memory and the cgroup hold them (`pageTableBytes`).
        let resident = nodeBytes.total + MemoryEstimate.pageTableBytes(forAllocating: nodeBytes.total)
        guard let limit = limits.addressSpaceLimitPassed(by: needed)
                ?? (nodeBytes.largestShare ? limits.nodeLimitPassed(by: resident) : nil) else { return }
        let nodeBytes = nodeBytes.total
        let onNode = ranksOnNode > 1 ? ", the \(ranksOnNode) ranks on this node \(bytesText(nodeBytes))" : ""
        let files = parts.sorted { $0.bytes > $1.bytes }.prefix(4).map { "\($0.path) \(bytesText($0.bytes))" }
        let instead = mappable ? "Map raw uint8 or float32 .npy files instead (data.mmap=true) or store the set in HDF5 "
            + "(data.format=hdf5): both read rows as they are needed" : "Store the set in HDF5 (data.format=hdf5), which is read "
            + "in rows as they are needed (eval reads .npy and IDX test sets into memory, mapped or not)"
        throw MemoryError(description: "the data does not fit in memory: this rank reads at least \(bytesText(needed)) of it "
            + "into memory\(onNode) (\(files.joined(separator: ", "))), but \(limit). \(instead). Or use fewer ranks per node, "
            + "or a node with more memory")
    }
}

struct MemoryError: Error, CustomStringConvertible, Equatable {
    let description: String
}

/// This process's memory as the kernel counts it (/proc/self/status).
struct ProcessMemory: Equatable {
    /// VmRSS
    var resident: Double
    /// VmHWM: the largest resident size so far.
    var residentPeak: Double
    /// VmSize: the address space, which `ulimit -v` limits.
    var addressSpace: Double
    /// RssAnon: the resident memory this process alone holds (its heap, its buffers).
    var privateResident: Double = 0
    /// RssFile: resident pages of files (libraries, mapped data), shared through the page cache.
    var fileResident: Double = 0

    static func current(status path: String = "/proc/self/status") -> ProcessMemory {
        let fields = kibibyteFields(path)
        return ProcessMemory(resident: fields["VmRSS"] ?? 0, residentPeak: fields["VmHWM"] ?? 0, addressSpace: fields["VmSize"] ?? 0,
                             privateResident: fields["RssAnon"] ?? 0, fileResident: fields["RssFile"] ?? 0)
    }
}

/// What the memory this process may use is limited by; nil where no limit applies or none can be read.
struct MemoryLimits: Equatable {
    /// MemAvailable of /proc/meminfo: what the node can give without swapping.
    var available: Double?
    /// The memory cgroup's limit (the smallest along its path) and its usage (v2 memory.max and memory.current,
    /// v1 memory.limit_in_bytes and memory.usage_in_bytes) less its page cache.
    var cgroupLimit: Double?
    var cgroupUsage: Double?
    /// `ulimit -v` (RLIMIT_AS) and this process's address space now.
    var addressSpaceLimit: Double?
    var addressSpace: Double?

    /// - Parameters: the roots are parameters so that tests can point them at fixture trees.
    static func read(proc: String = "/proc", cgroupMounts: [String] = ["/sys/fs/cgroup", "/sys/fs/cgroup/memory"],
                     addressSpaceLimit: Double? = currentAddressSpaceLimit()) -> MemoryLimits {
        var limits = MemoryLimits()
        limits.available = kibibyteFields(proc + "/meminfo")["MemAvailable"]
        if let (limit, usage) = cgroupMemory(proc: proc, mounts: cgroupMounts) {
            limits.cgroupLimit = limit
            limits.cgroupUsage = usage
        }
        if let addressSpaceLimit {
            limits.addressSpaceLimit = addressSpaceLimit
            limits.addressSpace = kibibyteFields(proc + "/self/status")["VmSize"]
        }
        return limits
    }

    /// The limit that `bytes` more, over the ranks of the node, would pass (MemAvailable, or the cgroup's free
    /// memory), said as the end of a refusal; nil when it fits.
    func nodeLimitPassed(by bytes: Double) -> String? {
        if let available, bytes > available { return "MemAvailable is \(bytesText(available))" }
        if let cgroupLimit {
            let free = max(0, cgroupLimit - (cgroupUsage ?? 0))
            if bytes > free { return "the memory cgroup allows \(bytesText(cgroupLimit)) with \(bytesText(free)) free" }
        }
        return nil
    }

    /// The `ulimit -v` that `bytes` more address space would pass, said as the end of a refusal; nil when it fits.
    func addressSpaceLimitPassed(by bytes: Double) -> String? {
        guard let addressSpaceLimit, (addressSpace ?? 0) + bytes > addressSpaceLimit else { return nil }
        return "ulimit -v allows \(bytesText(addressSpaceLimit)) of address space and \(bytesText(addressSpace ?? 0)) is in use"
    }

    static func currentAddressSpaceLimit() -> Double? {
        var limit = rlimit()
        // RLIM_INFINITY is all ones; Swift cannot import its macro.
        guard getrlimit(Int32(RLIMIT_AS.rawValue), &limit) == 0, limit.rlim_cur != rlim_t.max else { return nil }
        return Double(limit.rlim_cur)
    }

    /// The memory cgroup of this process: its path from /proc/self/cgroup (v2 `0::PATH`, v1 `N:memory:PATH`),
    /// found under a mount point (where a cgroup namespace shortens the path, the longest tail that exists), the
    /// smallest limit from it up to the mount point, and its usage. Nil without a limit.
    static func cgroupMemory(proc: String, mounts: [String]) -> (limit: Double, usage: Double?)? {
        guard let text = try? String(contentsOfFile: proc + "/self/cgroup", encoding: .utf8) else { return nil }
        for line in text.split(separator: "\n") {
            let fields = line.split(separator: ":", maxSplits: 2, omittingEmptySubsequences: false).map(String.init)
            guard fields.count == 3 else { continue }
            let (limitFile, usageFile) = fields[1].isEmpty ? ("memory.max", "memory.current")
                : fields[1].split(separator: ",").contains("memory") ? ("memory.limit_in_bytes", "memory.usage_in_bytes") : ("", "")
            guard !limitFile.isEmpty else { continue }
            let components = fields[2].split(separator: "/").map(String.init)
            for mount in mounts {
                func directory(_ tail: [String]) -> String { tail.isEmpty ? mount : mount + "/" + tail.joined(separator: "/") }
                func exists(_ tail: [String]) -> Bool { FileManager.default.fileExists(atPath: directory(tail) + "/" + limitFile) }
                // The longest tail of the path that exists below this mount.
                var tail = components
                while !tail.isEmpty && !exists(tail) { tail.removeFirst() }
                guard exists(tail) else { continue }
                let usage = cgroupValue(directory(tail) + "/" + usageFile).map { max(0, $0 - filePages(directory(tail))) }
                var smallest: Double? = nil
                while true {
                    if let value = cgroupValue(directory(tail) + "/" + limitFile) { smallest = min(smallest ?? value, value) }
                    if tail.isEmpty { break }
                    tail.removeLast()
                }
                return smallest.map { ($0, usage) }
            }
        }
        return nil
    }

    /// The cgroup's page cache (memory.stat: v1 `total_inactive_file` and `total_active_file`, v2 `inactive_file` and
    /// `active_file`), which its usage counts and the kernel reclaims before it kills anything: left in, a cgroup that
    /// had read or mapped a data set earlier (a job's previous step) refused a run that fits, its free memory taken by
    /// pages of files no longer read. Active pages too: a file read twice is active, and was reclaimed all the same.
    private static func filePages(_ directory: String) -> Double {
        guard let text = try? String(contentsOfFile: directory + "/memory.stat", encoding: .utf8) else { return 0 }
        var values: [Substring: Double] = [:]
        for line in text.split(separator: "\n") {
            let parts = line.split(separator: " ")
            if parts.count == 2, let value = Double(parts[1]) { values[parts[0]] = value }
        }
        // v1 has its own and hierarchical counts (total_*): the hierarchical ones; v2 has only its own.
        return (values["total_inactive_file"] ?? values["inactive_file"] ?? 0) + (values["total_active_file"] ?? values["active_file"] ?? 0)
    }

    /// A cgroup file's number of bytes; nil for "max" and for v1's "no limit" (a page-rounded Int64.max).
    private static func cgroupValue(_ path: String) -> Double? {
        guard let text = try? String(contentsOfFile: path, encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines),
              let value = Double(text), value < 1e18 else { return nil }
        return value
    }
}

/// "Key:   1234 kB" lines (/proc/meminfo, /proc/self/status) as bytes.
private func kibibyteFields(_ path: String) -> [String: Double] {
    guard let text = try? String(contentsOfFile: path, encoding: .utf8) else { return [:] }
    var fields: [String: Double] = [:]
    for line in text.split(separator: "\n") {
        let parts = line.split(separator: ":", maxSplits: 1)
        guard parts.count == 2 else { continue }
        let words = parts[1].split(whereSeparator: \.isWhitespace)
        guard words.count == 2, words[1] == "kB", let value = Double(words[0]) else { continue }
        fields[String(parts[0])] = value * 1024
    }
    return fields
}

/// 1536 -> "1.5 KiB"; three significant digits from KiB on.
func bytesText(_ bytes: Double) -> String {
    let units = ["bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"]
    var value = bytes
    var unit = 0
    while value >= 1024 && unit < units.count - 1 {
        value /= 1024
        unit += 1
    }
    if unit == 0 { return "\(Int(value)) bytes" }
    return String(format: value >= 100 ? "%.0f %@" : value >= 10 ? "%.1f %@" : "%.2f %@", value, units[unit])
}
