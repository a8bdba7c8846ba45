import Foundation

/// The cores this process may run on: its affinity mask, which `mpirun` narrows to one core per rank by default
/// (and `taskset` or a batch system's cgroup may narrow too). The default of OpenBLAS threads counts these, not the
/// machine's cores: `mpirun -n 1` on two cores binds its rank to core 0, where a second OpenBLAS thread only took
/// turns with the first (it spun in sched_yield for 15% of the rank's samples, and the ResNet ran at 931 samples/s).
enum AllowedCores {
    /// The count from /proc/self/status (glibc's sched_getaffinity is not visible to Swift), or every active core
    /// where that cannot be read.
    static func count() -> Int {
        if let status = try? String(contentsOfFile: "/proc/self/status", encoding: .utf8),
           let line = status.split(separator: "\n").first(where: { $0.hasPrefix("Cpus_allowed_list:") }),
           let allowed = count(list: line.dropFirst("Cpus_allowed_list:".count)) {
            return allowed
        }
        return ProcessInfo.processInfo.activeProcessorCount
    }

    /// The cores in a kernel CPU list such as "0", "0-1" or "0,2-3,8": nil when it is not one.
    static func count(list: Substring) -> Int? {
        var total = 0
        for range in list.trimmingCharacters(in: .whitespaces).split(separator: ",") {
            let ends = range.split(separator: "-", omittingEmptySubsequences: false).map { Int($0) }
            switch ends.count {
            case 1: guard ends[0] != nil else { return nil }; total += 1
            case 2:
                guard let low = ends[0], let high = ends[1], low <= high else { return nil }
                total += high - low + 1
            default: return nil
            }
        }
        return total > 0 ? total : nil
    }
}
