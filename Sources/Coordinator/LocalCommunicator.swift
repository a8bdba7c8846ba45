import CMPI
import Foundation

/// The single process of a run without MPI: rank 0 of 1. Every collective returns at once (a reduction
/// over one rank is the identity) and nothing here touches the MPI runtime, which is never initialized.
public final class LocalCommunicator: Communicator {
    public let rank = 0
    public let size = 1
    public let processorName: String

    public init() {
        processorName = LocalCommunicator.hostName()
    }

    public func allreduce<T: MPIScalar>(_ buffer: UnsafeMutableBufferPointer<T>, op: ReduceOperation) throws(MPIError) {}

    public func broadcast<T: MPIScalar>(_ buffer: UnsafeMutableBufferPointer<T>, root: Int) throws(MPIError) {
        try checkRoot(root)
    }

    public func barrier() throws(MPIError) {}

    public func startAllreduce<T: MPIScalar>(
        _ buffer: UnsafeMutableBufferPointer<T>, op: ReduceOperation
    ) throws(MPIError) -> PendingRequest {
        .completed
    }

    /// There is no other rank to talk to: any send throws as MPI does for an invalid rank.
    public func startSend<T: MPIScalar>(
        _ buffer: UnsafeBufferPointer<T>, to destination: Int, tag: Int
    ) throws(MPIError) -> PendingRequest {
        throw MPIError(call: "MPI_Isend", code: bp_mpi_err_rank(), message: "MPI_ERR_RANK: invalid rank (local mode has no other rank)")
    }

    /// There is no other rank to hear from: any receive throws as MPI does for an invalid rank.
    public func startReceive<T: MPIScalar>(
        _ buffer: UnsafeMutableBufferPointer<T>, from source: Int, tag: Int
    ) throws(MPIError) -> PendingRequest {
        throw MPIError(call: "MPI_Irecv", code: bp_mpi_err_rank(), message: "MPI_ERR_RANK: invalid rank (local mode has no other rank)")
    }

    /// One rank holds every part already; only a partition that does not fit is an error.
    public func allgather<T: MPIScalar>(_ buffer: UnsafeMutableBufferPointer<T>, partition: Partition) throws(MPIError) {
        guard partition.parts == 1, partition.count == buffer.count else {
            throw MPIError(call: "MPI_Allgatherv", code: bp_mpi_err_count(),
                           message: "MPI_ERR_COUNT: a partition of \(partition.count) elements in \(partition.parts) parts "
                               + "for a buffer of \(buffer.count) on 1 rank")
        }
    }

    public func gather<T: MPIScalar>(_ buffer: UnsafeBufferPointer<T>, root: Int) throws(MPIError) -> [[T]] {
        try checkRoot(root, call: "MPI_Gatherv")
        return [Array(buffer)]
    }

    public func nodeLayout() throws(MPIError) -> NodeLayout {
        NodeLayout(nodeNames: [processorName], localRanks: [0], localIndex: 0)
    }

    /// Flushes stdout and stderr, then exits with `code`.
    public func abort(code: Int32) -> Never {
        fflush(nil)
        exit(code)
    }

    public func finalize() throws(MPIError) {}

    /// gethostname, as MPI_Get_processor_name uses; ProcessInfo.hostName may wait on a DNS lookup.
    private static func hostName() -> String {
        var name = [CChar](repeating: 0, count: 256)
        guard gethostname(&name, name.count - 1) == 0 else { return "localhost" }
        return String(decoding: name.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    /// Rejects a root MPI would reject, so a wrong root fails in local runs too. The text is OpenMPI's
    /// MPI_Error_string for MPI_ERR_ROOT, written out because the MPI runtime is not initialized here.
    private func checkRoot(_ root: Int, call: String = "MPI_Bcast") throws(MPIError) {
        if root != 0 {
            throw MPIError(call: call, code: bp_mpi_err_root(), message: "MPI_ERR_ROOT: invalid root")
        }
    }
}
