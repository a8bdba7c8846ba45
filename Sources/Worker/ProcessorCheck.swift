import Foundation

/// The Engine is compiled for processors with AVX2 and FMA (Package.swift, `engineCodeGeneration`). On one without
/// them its first vector instruction would end the process with SIGILL, on every rank, with no word of why: the
/// Worker, compiled for baseline x86-64, looks first and refuses with the reason.
enum ProcessorCheck {
    /// The features the Engine's code generation assumes (`-target-cpu haswell`), as /proc/cpuinfo names them.
    static let required = ["avx", "avx2", "fma", "bmi1", "bmi2", "f16c", "movbe"]

    /// The required features missing from `cpuFlags` (/proc/cpuinfo's "flags" line, split at spaces).
    static func missing(cpuFlags: Set<String>) -> [String] {
        required.filter { !cpuFlags.contains($0) }
    }

    /// The error to stop with on this machine, or nil when it has every feature (or says nothing of them).
    static func problem(cpuinfo: String) -> String? {
        guard let line = cpuinfo.split(separator: "\n").first(where: { $0.hasPrefix("flags") }),
              let colon = line.firstIndex(of: ":") else { return nil }
        let flags = Set(line[line.index(after: colon)...].split(separator: " ").map(String.init))
        let absent = missing(cpuFlags: flags)
        guard !absent.isEmpty else { return nil }
        return "bpworker: this processor lacks \(absent.joined(separator: ", ")), which this build's engine needs "
            + "(it is compiled for AVX2 and FMA: Package.swift, engineCodeGeneration); rebuild without that setting to run here"
    }

    /// Exits with status 1 and the reason when the processor cannot run the Engine.
    static func requireSupportedProcessor() {
        #if arch(x86_64) && os(Linux)
        guard let cpuinfo = try? String(contentsOfFile: "/proc/cpuinfo", encoding: .utf8),
              let problem = problem(cpuinfo: cpuinfo) else { return }
        FileHandle.standardError.write(Data((problem + "\n").utf8))
        exit(1)
        #endif
    }
}
