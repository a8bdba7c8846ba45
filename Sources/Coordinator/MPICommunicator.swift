import CMPI
import Foundation
import Logging

/// The ranks of an MPI job (MPI_COMM_WORLD), with MPI errors returned as `MPIError` instead of aborting.
///
/// Create it once per process with `initialize()`, use it from that thread only, and call `finalize()`
/// before exiting normally.
public final class MPICommunicator: Communicator {
    public let rank: Int
    public let size: Int
    public let processorName: String
    /// The thread support MPI_Init_thread provided (FUNNELED is requested: only this thread calls MPI;
    /// other threads may read plain flags but never call MPI).
    public let threadLevel: MPIThreadLevel

    private let comm: MPI_Comm
    private let requests: RequestPool
    private var isFinalized = false

    private static let logger = Logger(label: "bpworker.coordinator.mpi")

    private init(comm: MPI_Comm, rank: Int, size: Int, processorName: String,
                 threadLevel: MPIThreadLevel, requestSlots: Int) {
        self.comm = comm
        self.rank = rank
        self.size = size
        self.processorName = processorName
        self.threadLevel = threadLevel
        self.requests = RequestPool(capacity: requestSlots)
    }

    /// Initializes MPI (MPI_Init_thread, MPI_THREAD_FUNNELED) and makes MPI_COMM_WORLD return errors. First
    /// applies the OpenMPI settings of `MPITuning.defaults` that the user has not set.
    /// `requestSlots` sizes the reusable storage for reductions in flight at once (it grows if exceeded).
    /// MPI can be initialized once per process: a second call throws.
    public static func initialize(requestSlots: Int = 16) throws(MPIError) -> MPICommunicator {
        var flag: Int32 = 0
        try mpiCheck(MPI_Finalized(&flag), "MPI_Finalized")
        if flag != 0 {
            // MPI_Error_string may not be called after MPI_Finalize, hence the literal text.
            throw MPIError(call: "MPI_Init_thread", code: bp_mpi_err_other(),
                           message: "MPI_ERR_OTHER: MPI was already finalized in this process")
        }
        try mpiCheck(MPI_Initialized(&flag), "MPI_Initialized")
        if flag != 0 {
            throw MPIError(call: "MPI_Init_thread", code: bp_mpi_err_other(),
                           message: "MPI_ERR_OTHER: MPI is already initialized in this process")
        }

        let tuned = MPITuning.apply()
        var provided: Int32 = 0
        try mpiCheck(MPI_Init_thread(nil, nil, bp_mpi_thread_funneled(), &provided), "MPI_Init_thread")
        let world = bp_mpi_comm_world()
        // Errors on the world communicator (and the communicators split from it) come back as codes.
        try mpiCheck(MPI_Comm_set_errhandler(world, bp_mpi_errors_return()), "MPI_Comm_set_errhandler")
        try mpiCheck(MPI_Comm_set_errhandler(bp_mpi_comm_self(), bp_mpi_errors_return()), "MPI_Comm_set_errhandler")

        var rank: Int32 = 0
        var size: Int32 = 0
        try mpiCheck(MPI_Comm_rank(world, &rank), "MPI_Comm_rank")
        try mpiCheck(MPI_Comm_size(world, &size), "MPI_Comm_size")

        let threadLevel = MPIThreadLevel(mpiValue: provided) ?? .single
        if threadLevel < .funneled {
            logger.warning("MPI provides only \(threadLevel); requested MPI_THREAD_FUNNELED")
        }
        let communicator = MPICommunicator(
            comm: world, rank: Int(rank), size: Int(size), processorName: try processorNameOfThisRank(),
            threadLevel: threadLevel, requestSlots: requestSlots)
        logger.debug("MPI initialized: rank \(rank) of \(size) on \(communicator.processorName), \(threadLevel)")
        for setting in tuned {
            logger.debug("MPI setting shipped with bpworker: \(setting.name)=\(setting.value) (\(setting.reason))")
        }
        return communicator
    }

    /// Whether the environment shows that an MPI launcher (mpirun/mpiexec, a PMIx or PMI server, or
    /// `srun`) started this process, so the command line can choose MPI or local mode.
    public static var isLaunchedByMPI: Bool {
        isLaunchedByMPI(environment: ProcessInfo.processInfo.environment)
    }

    /// `isLaunchedByMPI` for a given environment.
    public static func isLaunchedByMPI(environment: [String: String]) -> Bool {
        if environment["OMPI_COMM_WORLD_SIZE"] != nil { return true }
        if environment["PMIX_RANK"] != nil { return true }
        if environment["PMI_RANK"] != nil { return true }
        // SLURM_PROCID alone is also set in a batch script; SLURM_STEP_ID marks an `srun` step.
        return environment["SLURM_PROCID"] != nil && environment["SLURM_STEP_ID"] != nil
    }

    /// Why the launcher that these variables describe is gone, or nil when it may be there: OpenMPI's mpirun names its
    /// session directory in `PMIX_SERVER_TMPDIR`, which it removes when it ends. Variables left from a finished mpirun
    /// (a script that mpirun started, running bpworker later) made MPI_Init fail with OpenMPI's messages alone.
    public static func staleLauncher(environment: [String: String]) -> String? {
        guard let directory = environment["PMIX_SERVER_TMPDIR"], !directory.isEmpty,
              !FileManager.default.fileExists(atPath: directory) else { return nil }
        return "PMIX_SERVER_TMPDIR=\(directory) does not exist"
    }

    /// Number of MPI_Request slots currently allocated for reductions in flight.
    public var requestSlotCapacity: Int { requests.capacity }

    // MARK: - Collectives

    public func allreduce<T: MPIScalar>(_ buffer: UnsafeMutableBufferPointer<T>, op: ReduceOperation) throws(MPIError) {
        try checkActive("MPI_Allreduce")
        guard let base = buffer.baseAddress, !buffer.isEmpty else { return }
        let count = try mpiInt(buffer.count, "MPI_Allreduce", errorCode: bp_mpi_err_count())
        try mpiCheck(
            MPI_Allreduce(bp_mpi_in_place(), base, count, T.mpiDatatype.raw, op.mpiOperation.raw, comm),
            "MPI_Allreduce")
    }

    public func broadcast<T: MPIScalar>(_ buffer: UnsafeMutableBufferPointer<T>, root: Int) throws(MPIError) {
        try checkActive("MPI_Bcast")
        guard let base = buffer.baseAddress, !buffer.isEmpty else { return }
        let count = try mpiInt(buffer.count, "MPI_Bcast", errorCode: bp_mpi_err_count())
        let root = try mpiInt(root, "MPI_Bcast", errorCode: bp_mpi_err_root())
        try mpiCheck(MPI_Bcast(base, count, T.mpiDatatype.raw, root, comm), "MPI_Bcast")
    }

    public func barrier() throws(MPIError) {
        try checkActive("MPI_Barrier")
        try mpiCheck(MPI_Barrier(comm), "MPI_Barrier")
    }

    public func startAllreduce<T: MPIScalar>(
        _ buffer: UnsafeMutableBufferPointer<T>, op: ReduceOperation
    ) throws(MPIError) -> PendingRequest {
        try checkActive("MPI_Iallreduce")
        guard let base = buffer.baseAddress, !buffer.isEmpty else { return .completed }
        let count = try mpiInt(buffer.count, "MPI_Iallreduce", errorCode: bp_mpi_err_count())
        return try startRequest("MPI_Iallreduce") { request in
            MPI_Iallreduce(bp_mpi_in_place(), base, count, T.mpiDatatype.raw, op.mpiOperation.raw, comm, request)
        }
    }

    public func startSend<T: MPIScalar>(
        _ buffer: UnsafeBufferPointer<T>, to destination: Int, tag: Int
    ) throws(MPIError) -> PendingRequest {
        try startPointToPoint("MPI_Isend", count: buffer.count, peer: destination, tag: tag) { count, peer, tag, request in
            MPI_Isend(buffer.baseAddress!, count, T.mpiDatatype.raw, peer, tag, comm, request)
        }
    }

    public func startReceive<T: MPIScalar>(
        _ buffer: UnsafeMutableBufferPointer<T>, from source: Int, tag: Int
    ) throws(MPIError) -> PendingRequest {
        try startPointToPoint("MPI_Irecv", count: buffer.count, peer: source, tag: tag) { count, peer, tag, request in
            MPI_Irecv(buffer.baseAddress!, count, T.mpiDatatype.raw, peer, tag, comm, request)
        }
    }

    /// What a send and a receive share: an empty buffer completes at once; count, peer rank and tag are checked
    /// into MPI's 32-bit ints (each with its own MPI error class); then `start` runs on a request slot.
    private func startPointToPoint(
        _ call: StaticString, count: Int, peer: Int, tag: Int,
        _ start: (_ count: Int32, _ peer: Int32, _ tag: Int32, UnsafeMutablePointer<MPI_Request?>) -> Int32
    ) throws(MPIError) -> PendingRequest {
        try checkActive(call)
        guard count > 0 else { return .completed }
        let count = try mpiInt(count, call, errorCode: bp_mpi_err_count())
        let peer = try mpiInt(peer, call, errorCode: bp_mpi_err_rank())
        let tag = try mpiInt(tag, call, errorCode: bp_mpi_err_tag())
        return try startRequest(call) { request in start(count, peer, tag, request) }
    }

    /// Runs `start` on a free request slot and hands out the request it made; a failed start frees the slot.
    private func startRequest(_ call: StaticString, _ start: (UnsafeMutablePointer<MPI_Request?>) -> Int32) throws(MPIError) -> PendingRequest {
        let slot = requests.acquire()
        do {
            try mpiCheck(start(requests.requests + slot.index), call)
        } catch {
            requests.release(slot.index)
            throw error
        }
        return PendingRequest(state: .inFlight(requests, index: slot.index, generation: slot.generation))
    }

    public func allgather<T: MPIScalar>(_ buffer: UnsafeMutableBufferPointer<T>, partition: Partition) throws(MPIError) {
        try checkActive("MPI_Allgatherv")
        guard partition.parts == size, partition.count == buffer.count else {
            throw MPIError(call: "MPI_Allgatherv", code: bp_mpi_err_count(),
                           message: "MPI_ERR_COUNT: a partition of \(partition.count) elements in \(partition.parts) parts "
                               + "for a buffer of \(buffer.count) on \(size) ranks")
        }
        guard let base = buffer.baseAddress, !buffer.isEmpty else { return }
        try partition.counts.withUnsafeBufferPointer { (counts) throws(MPIError) in
            try partition.offsets.withUnsafeBufferPointer { (offsets) throws(MPIError) in
                try mpiCheck(
                    MPI_Allgatherv(bp_mpi_in_place(), 0, T.mpiDatatype.raw, base, counts.baseAddress, offsets.baseAddress,
                                   T.mpiDatatype.raw, comm),
                    "MPI_Allgatherv")
            }
        }
    }

    public func gather<T: MPIScalar>(_ buffer: UnsafeBufferPointer<T>, root: Int) throws(MPIError) -> [[T]] {
        try checkActive("MPI_Gatherv")
        let rootRank = try mpiInt(root, "MPI_Gatherv", errorCode: bp_mpi_err_root())
        var length = try mpiInt(buffer.count, "MPI_Gatherv", errorCode: bp_mpi_err_count())
        let isRoot = rank == root
        var lengths = [Int32](repeating: 0, count: isRoot ? size : 1)
        try lengths.withUnsafeMutableBufferPointer { (all) throws(MPIError) in
            try mpiCheck(MPI_Gather(&length, 1, bp_mpi_int32_t(), all.baseAddress, 1, bp_mpi_int32_t(), rootRank, comm), "MPI_Gather")
        }
        // MPI_Gatherv places the parts at 32-bit displacements: the root says whether the total fits, so that on
        // a refusal every rank throws together instead of some waiting in MPI_Gatherv.
        var offsets = [Int32](repeating: 0, count: lengths.count)
        var total = 0
        for r in lengths.indices {
            offsets[r] = Int32(clamping: total)
            total += Int(lengths[r])
        }
        var fits: Int32 = total <= Int(Int32.max) ? 1 : 0
        try mpiCheck(MPI_Bcast(&fits, 1, bp_mpi_int32_t(), rootRank, comm), "MPI_Bcast")
        guard fits == 1 else {
            throw MPIError(call: "MPI_Gatherv", code: bp_mpi_err_count(),
                           message: "MPI_ERR_COUNT: the ranks' parts add up to more elements than MPI_Gatherv can place")
        }
        guard isRoot else {
            try mpiCheck(MPI_Gatherv(buffer.baseAddress, length, T.mpiDatatype.raw, nil, nil, nil, T.mpiDatatype.raw, rootRank, comm),
                         "MPI_Gatherv")
            return []
        }
        let received = try [T](unsafeUninitializedCapacity: max(total, 1)) { (storage, initialized) throws(MPIError) in
            try lengths.withUnsafeBufferPointer { (counts) throws(MPIError) in
                try offsets.withUnsafeBufferPointer { (displacements) throws(MPIError) in
                    try mpiCheck(
                        MPI_Gatherv(buffer.baseAddress, length, T.mpiDatatype.raw, storage.baseAddress, counts.baseAddress,
                                    displacements.baseAddress, T.mpiDatatype.raw, rootRank, comm),
                        "MPI_Gatherv")
                }
            }
            initialized = total
        }
        return lengths.indices.map { r in Array(received[Int(offsets[r])..<(Int(offsets[r]) + Int(lengths[r]))]) }
    }

    public func nodeLayout() throws(MPIError) -> NodeLayout {
        try checkActive("MPI_Comm_split_type")
        // Ranks that can share memory form one node; key = world rank keeps local order = world order.
        var local: MPI_Comm? = nil
        try mpiCheck(
            MPI_Comm_split_type(comm, bp_mpi_comm_type_shared(), Int32(rank), bp_mpi_info_null(), &local),
            "MPI_Comm_split_type")
        let layout: NodeLayout
        do {
            layout = try nodeLayout(local: local)
        } catch {
            try? mpiCheck(MPI_Comm_free(&local), "MPI_Comm_free")
            throw error
        }
        try mpiCheck(MPI_Comm_free(&local), "MPI_Comm_free")
        return layout
    }

    private func nodeLayout(local: MPI_Comm?) throws(MPIError) -> NodeLayout {
        var localRank: Int32 = 0
        var localSize: Int32 = 0
        try mpiCheck(MPI_Comm_rank(local, &localRank), "MPI_Comm_rank")
        try mpiCheck(MPI_Comm_size(local, &localSize), "MPI_Comm_size")

        var myWorldRank = Int32(rank)
        var localWorldRanks = [Int32](repeating: -1, count: Int(localSize))
        try localWorldRanks.withUnsafeMutableBufferPointer { (ranks) throws(MPIError) in
            try mpiCheck(
                MPI_Allgather(&myWorldRank, 1, bp_mpi_int32_t(), ranks.baseAddress, 1, bp_mpi_int32_t(), local),
                "MPI_Allgather")
        }

        // Fixed-size, NUL-padded name blocks, one per rank.
        let block = Int(bp_mpi_max_processor_name())
        var myName = [CChar](repeating: 0, count: block)
        for (i, byte) in processorName.utf8.prefix(block - 1).enumerated() { myName[i] = CChar(bitPattern: byte) }
        var allNames = [CChar](repeating: 0, count: block * size)
        try allNames.withUnsafeMutableBufferPointer { (names) throws(MPIError) in
            try myName.withUnsafeMutableBufferPointer { (mine) throws(MPIError) in
                try mpiCheck(
                    MPI_Allgather(mine.baseAddress, Int32(block), bp_mpi_char(),
                                  names.baseAddress, Int32(block), bp_mpi_char(), comm),
                    "MPI_Allgather")
            }
        }
        let nodeNames = (0..<size).map { r in
            let slice = allNames[(r * block)..<((r + 1) * block)]
            let bytes = slice.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }
            return String(decoding: bytes, as: UTF8.self)
        }
        return NodeLayout(nodeNames: nodeNames, localRanks: localWorldRanks.map(Int.init), localIndex: Int(localRank))
    }

    // MARK: - Lifetime

    /// MPI_Abort on MPI_COMM_WORLD: the launcher kills every rank of the job within milliseconds.
    public func abort(code: Int32) -> Never {
        fflush(nil)
        if !isFinalized {
            try? mpiCheck(MPI_Abort(comm, code), "MPI_Abort")
        }
        // Only reached if MPI_Abort returned (or MPI is already finalized).
        exit(code)
    }

    /// MPI_Finalize; later calls do nothing. Every started reduction must have completed.
    public func finalize() throws(MPIError) {
        if isFinalized { return }
        isFinalized = true
        try mpiCheck(MPI_Finalize(), "MPI_Finalize")
    }

    private func checkActive(_ call: StaticString) throws(MPIError) {
        if isFinalized {
            // MPI_Error_string may not be called after MPI_Finalize, hence the literal text.
            throw MPIError(call: call.description, code: bp_mpi_err_other(),
                           message: "MPI_ERR_OTHER: communicator used after finalize()")
        }
    }

    private static func processorNameOfThisRank() throws(MPIError) -> String {
        let capacity = Int(bp_mpi_max_processor_name()) + 1
        var name = [CChar](repeating: 0, count: capacity)
        var length: Int32 = 0
        try name.withUnsafeMutableBufferPointer { (buffer) throws(MPIError) in
            try mpiCheck(MPI_Get_processor_name(buffer.baseAddress, &length), "MPI_Get_processor_name")
        }
        let bytes = name.prefix(min(Int(length), capacity - 1)).map { UInt8(bitPattern: $0) }
        return String(decoding: bytes, as: UTF8.self)
    }
}
