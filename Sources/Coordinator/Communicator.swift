import CMPI

/// A group of cooperating processes that reduce and broadcast flat buffers.
///
/// `MPICommunicator` spans the ranks of an MPI job; `LocalCommunicator` is the single process of a run
/// without MPI. Collectives must be called by every rank in the same order with the same counts and
/// roots; a buffer of zero elements returns at once on every rank without communicating.
/// Not thread-safe: call it from the one thread that initialized it (MPI_THREAD_FUNNELED).
public protocol Communicator: AnyObject {
    /// This process's index in the group, 0..<size.
    var rank: Int { get }
    /// Number of processes in the group.
    var size: Int { get }
    /// Name of the host this rank runs on (MPI_Get_processor_name, or the host name locally).
    var processorName: String { get }

    /// Reduces `buffer` element-wise across all ranks, in place; every rank ends with the result.
    func allreduce<T: MPIScalar>(_ buffer: UnsafeMutableBufferPointer<T>, op: ReduceOperation) throws(MPIError)

    /// Copies `root`'s `buffer` into every other rank's `buffer`; all ranks pass the same count.
    func broadcast<T: MPIScalar>(_ buffer: UnsafeMutableBufferPointer<T>, root: Int) throws(MPIError)

    /// Blocks until every rank has reached the barrier.
    func barrier() throws(MPIError)

    /// Starts an in-place allreduce of `buffer` and returns at once. The buffer must stay valid and
    /// untouched until the returned reduction has completed (`test()` returned true, or `wait()` returned).
    func startAllreduce<T: MPIScalar>(
        _ buffer: UnsafeMutableBufferPointer<T>, op: ReduceOperation
    ) throws(MPIError) -> PendingRequest

    /// Starts sending `buffer` to rank `destination` with message tag `tag` (0...32767) and returns at once. The
    /// buffer must stay valid and untouched until the returned request has completed. Messages between two
    /// ranks with the same tag arrive in the order they were started.
    func startSend<T: MPIScalar>(
        _ buffer: UnsafeBufferPointer<T>, to destination: Int, tag: Int
    ) throws(MPIError) -> PendingRequest

    /// Starts receiving exactly `buffer.count` elements from rank `source` with tag `tag` into `buffer` and
    /// returns at once; `buffer` holds the message once the returned request has completed.
    func startReceive<T: MPIScalar>(
        _ buffer: UnsafeMutableBufferPointer<T>, from source: Int, tag: Int
    ) throws(MPIError) -> PendingRequest

    /// In-place allgather over a partition of `buffer`: each rank r contributes its part
    /// `buffer[partition.range(of: r)]` and every rank ends with every part. The partition must have one part
    /// per rank and cover `buffer`. Allocates nothing.
    func allgather<T: MPIScalar>(_ buffer: UnsafeMutableBufferPointer<T>, partition: Partition) throws(MPIError)

    /// Collects every rank's `buffer` on `root` in rank order (MPI_Gather of the lengths, then MPI_Gatherv):
    /// `root` gets one array per rank, every other rank an empty list. Lengths may differ between ranks. It
    /// allocates the result: for the end of a run (the timeline), never inside a step.
    func gather<T: MPIScalar>(_ buffer: UnsafeBufferPointer<T>, root: Int) throws(MPIError) -> [[T]]

    /// Which ranks share this rank's node. Collective: every rank must call it.
    func nodeLayout() throws(MPIError) -> NodeLayout

    /// Ends the process, and in MPI mode every rank of the job, with exit code `code`.
    func abort(code: Int32) -> Never

    /// Shuts the communicator down; later collectives throw. Idempotent.
    func finalize() throws(MPIError)
}

extension Communicator {
    /// Broadcasts a byte payload whose length only `root` needs to know: the length goes first, then
    /// every other rank resizes `bytes` to it and receives the payload.
    public func broadcast(bytes: inout [UInt8], root: Int) throws(MPIError) {
        var length = Int64(bytes.count)
        try withUnsafeMutablePointer(to: &length) { (pointer) throws(MPIError) in
            try broadcast(UnsafeMutableBufferPointer(start: pointer, count: 1), root: root)
        }
        if rank != root {
            bytes = [UInt8](repeating: 0, count: Int(length))
        }
        try bytes.withUnsafeMutableBufferPointer { (buffer) throws(MPIError) in
            try broadcast(buffer, root: root)
        }
    }
}

/// Where the ranks of a job run.
public struct NodeLayout: Sendable, Equatable {
    /// Processor (host) name of every rank, indexed by rank.
    public let nodeNames: [String]
    /// Ranks that share this rank's node (its shared-memory domain), ascending.
    public let localRanks: [Int]
    /// This rank's position in `localRanks`.
    public let localIndex: Int

    public init(nodeNames: [String], localRanks: [Int], localIndex: Int) {
        self.nodeNames = nodeNames
        self.localRanks = localRanks
        self.localIndex = localIndex
    }

    /// Number of ranks on this rank's node.
    public var localSize: Int { localRanks.count }
    /// Number of distinct nodes in the job.
    public var nodeCount: Int { Set(nodeNames).count }
}

/// Contiguous parts of a flat buffer of `count` elements, one per rank, as even as possible (the first
/// `count % parts` parts hold one element more). The counts and offsets MPI needs are made once, here.
public struct Partition: Sendable, Equatable {
    /// Part r is `bounds[r]..<bounds[r + 1]`.
    public let bounds: [Int]
    let counts: [Int32]
    let offsets: [Int32]

    /// - Precondition: `parts >= 1`, `count >= 0`, and the count fits MPI's 32-bit counts.
    public init(count: Int, parts: Int) {
        precondition(parts >= 1 && count >= 0 && count <= Int(Int32.max), "cannot partition \(count) elements \(parts) ways")
        let base = count / parts, extra = count % parts
        var bounds = [0]
        for r in 0..<parts { bounds.append(bounds[r] + base + (r < extra ? 1 : 0)) }
        self.bounds = bounds
        counts = (0..<parts).map { Int32(bounds[$0 + 1] - bounds[$0]) }
        offsets = bounds.dropLast().map { Int32($0) }
    }

    public var parts: Int { bounds.count - 1 }
    public var count: Int { bounds[parts] }
    public func range(of part: Int) -> Range<Int> { bounds[part]..<bounds[part + 1] }
}

/// A nonblocking operation in flight: an allreduce (`Communicator.startAllreduce`), a send or a receive.
///
/// Why no per-call allocation: the MPI_Request lives in a slot of a pool that the communicator creates
/// once and grows only when more requests are in flight at once than ever before. This value is just
/// (pool, slot index, generation): starting, testing and waiting allocate nothing on the Swift side.
/// MPI sets a completed request to MPI_REQUEST_NULL, which frees the slot for reuse; the generation,
/// bumped on every reuse, lets a stale copy of this value see that its own operation is long done
/// instead of testing someone else's request.
/// Every started operation must be driven to completion; dropping it leaves MPI using the buffer.
public struct PendingRequest {
    enum State {
        case completed
        case inFlight(RequestPool, index: Int, generation: UInt64)
    }

    let state: State

    init(state: State) {
        self.state = state
    }

    /// An operation that needs no communication (one rank, or an empty buffer).
    public static var completed: PendingRequest { PendingRequest(state: .completed) }

    /// Whether the operation has finished (MPI_Test). Once it has, keeps returning true without calling MPI.
    public func test() throws(MPIError) -> Bool {
        guard case let .inFlight(pool, index, generation) = state, pool.isInFlight(index, generation) else {
            return true
        }
        var flag: Int32 = 0
        try mpiCheck(MPI_Test(pool.requests + index, &flag, bp_mpi_status_ignore()), "MPI_Test")
        return flag != 0
    }

    /// Blocks until the operation has finished (MPI_Wait); returns at once if it already has.
    public func wait() throws(MPIError) {
        guard case let .inFlight(pool, index, generation) = state, pool.isInFlight(index, generation) else {
            return
        }
        try mpiCheck(MPI_Wait(pool.requests + index, bp_mpi_status_ignore()), "MPI_Wait")
    }
}
