import Foundation

/// OpenMPI settings bpworker ships because measurement chose them (bench/run, BENCHMARKS.md table 2). Each is an
/// MCA parameter applied as its `OMPI_MCA_<name>` environment variable before MPI_Init, only when the user has
/// not set that variable (directly, or with `mpirun --mca`/`-x`, which set it too): the user's value always wins.
public enum MPITuning {
    public struct Setting: Equatable, Sendable {
        /// The MCA parameter, e.g. `coll_libnbc_iallreduce_algorithm`.
        public let name: String
        public let value: String
        public let reason: String
        public var environmentKey: String { "OMPI_MCA_" + name }
    }

    public static let defaults: [Setting] = [
        Setting(
            name: "coll_libnbc_iallreduce_algorithm", value: "3",
            reason: "with training.reduction=allreduce the gradient buckets are nonblocking allreduces (and the step's "
                + "control values always are); OpenMPI's default for an in-place one is a binomial "
                + "reduce to rank 0 and a broadcast, measured 2.6x slower than MPI_Allreduce at 4 MiB on 2 ranks; "
                + "reduce-scatter + allgather (3) is level with it at every size from 256 KiB"),
    ]

    /// The settings from `defaults` that `environment` does not set already: what `apply` would add.
    public static func missing(from environment: [String: String]) -> [Setting] {
        defaults.filter { environment[$0.environmentKey] == nil }
    }

    /// Sets every default the process environment lacks; returns those it set. Call before MPI_Init.
    @discardableResult
    public static func apply() -> [Setting] {
        let added = missing(from: ProcessInfo.processInfo.environment)
        for setting in added { setenv(setting.environmentKey, setting.value, 0) }
        return added
    }
}
