/// `env` without the variables an MPI launcher gives its ranks (OMPI_*, PMIX_*, ORTE_*, OPAL_*, PMI_*).
///
/// A process that called MPI_Init carries them, and an `mpirun` it spawns with them believes it is
/// nested inside a job and exits 1 without a word; strip them before spawning one.
public func environmentWithoutMPIVariables(_ env: [String: String]) -> [String: String] {
    let prefixes = ["OMPI_", "PMIX_", "ORTE_", "OPAL_", "PMI_"]
    return env.filter { key, _ in !prefixes.contains { key.hasPrefix($0) } }
}
