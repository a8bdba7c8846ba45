import Engine

/// Synchronized batch norm's sums over the ranks (PyTorch's SyncBatchNorm): the engine's batch norm layers hand it
/// their per-feature sums, in forward ([sum x, sum x^2, count]) and in backward ([sum dy, sum dy xhat, count]), and
/// it replaces them with their totals over every rank in one `MPI_Allreduce`. Every rank runs the same layers in
/// the same order, so the calls match up (the contract every collective here keeps).
///
/// It runs inside a pass, where an error has no way back: `onFailure` reports it and ends the job. `willReduce` and
/// `didReduce` let the caller watch the collective (the worker's watchdog and timeline).
public final class CrossRankSums: CrossRankReducer {
    public let communicator: any Communicator
    private let willReduce: () -> Void
    private let didReduce: () -> Void
    private let onFailure: (MPIError) -> Never

    public init(communicator: any Communicator, willReduce: @escaping () -> Void = {}, didReduce: @escaping () -> Void = {},
                onFailure: @escaping (MPIError) -> Never) {
        self.communicator = communicator
        self.willReduce = willReduce
        self.didReduce = didReduce
        self.onFailure = onFailure
    }

    public func sumAcrossRanks(_ values: UnsafeMutableBufferPointer<Double>) {
        willReduce()
        defer { didReduce() }
        do { try communicator.allreduce(values, op: .sum) } catch { onFailure(error) }
    }
}
