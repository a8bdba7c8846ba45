import Coordinator
import Foundation
import Synchronization

/// Turns a hang into an error. The training thread marks when it enters and leaves a collective; a separate
/// thread checks twice a second, and when one collective has run past the timeout it prints the stall report
/// (step, phase, and which ranks have not arrived, read from their heartbeat files) and aborts the job with
/// MPI_Abort, so a batch allocation is never burnt waiting.
///
/// Every rank's watchdog also writes RUN_DIR/heartbeat/rank-N.json once a second: pid, host, step and phase.
/// Operators and tests use it to see where each rank is; the stall report uses it to name the missing ranks.
///
/// Threads: the training thread writes `phase`, `phaseStart` and `step`, the watchdog thread reads them, so they
/// are atomics. Plain fields were a data race (undefined behaviour, which ThreadSanitizer reports), and nothing
/// ordered them: the compiler, or an ARM64 core, may reorder plain stores and loads, so the watchdog could pair a
/// new phase with the previous collective's start time and report a stall too early. `enter` therefore publishes
/// the phase last, with release ordering, after the step and the start time, and the watchdog reads it first,
/// with acquire ordering: a phase other than `compute` comes with that collective's start time or a later one.
/// Step and start time need no ordering of their own (relaxed).
/// On x86-64 every one of these loads and stores is a plain `mov`; on ARM64 the release/acquire pair is
/// `stlr`/`ldar`: the per-step cost stays a few stores and one clock read, with no allocation.
final class Watchdog: Sendable {
    /// `Phase.rawValue` of where the training thread is; `compute` outside collectives.
    private let phase = Atomic<Int>(Phase.compute.rawValue)
    /// When the current phase began (ns, monotonic clock).
    private let phaseStart = Atomic<Int>(0)
    /// The global step the training thread is on.
    private let step = Atomic<Int>(0)
    /// The heartbeat file, opened at the first heartbeat (-1 until then); written by `start` and then by the watchdog's
    /// thread alone.
    private let heartbeatFile = Atomic<Int32>(-1)
    private let timeout: Double
    private let rank: Int
    private let worldSize: Int
    private let heartbeatDirectory: String
    /// Ends the job with the stall report and the steps done (the step the stall is in).
    private let abort: @Sendable (String, Int) -> Never
    private let host = ProcessInfo.processInfo.hostName

    init(timeout: Double, rank: Int, worldSize: Int, runDirectory: String, abort: @escaping @Sendable (String, Int) -> Never) {
        self.timeout = timeout
        self.rank = rank
        self.worldSize = worldSize
        heartbeatDirectory = runDirectory + "/heartbeat"
        self.abort = abort
    }

    /// Starts the watchdog's thread, and its heartbeat files in RUN_DIR/heartbeat. Until then `enter` and `leave`
    /// only mark where the training thread is: a run writes nothing to its directory before setup has succeeded.
    /// - Parameter dataRead: what a batch's read is reading now (the sample, the data set's key, the file), for a stall
    ///   in `Phase.loadBatch`; called on the watchdog's thread.
    func start(dataRead: @escaping @Sendable () -> String = { "" }) {
        try? FileManager.default.createDirectory(atPath: heartbeatDirectory, withIntermediateDirectories: true)
        // The first heartbeat now: a rank that stops right after this still has one to be named by.
        writeHeartbeat(phase: name(Phase(rawValue: phase.load(ordering: .acquiring)) ?? .compute, dataRead), step: step.load(ordering: .relaxed))
        let thread = Thread { [self] in run(dataRead) }
        thread.name = "bpworker-watchdog"
        thread.start()
    }

    @inline(__always)
    static func nanoseconds() -> Int { Int(DispatchTime.now().uptimeNanoseconds) }

    /// Marks the start of a step's computation (one store).
    @inline(__always)
    func beginStep(_ step: Int) {
        self.step.store(step, ordering: .relaxed)
    }

    /// Marks entering a collective (allocates nothing: called every step).
    @inline(__always)
    func enter(_ phase: Phase, step: Int) {
        self.step.store(step, ordering: .relaxed)
        phaseStart.store(Self.nanoseconds(), ordering: .relaxed)
        // Last and releasing: a watchdog that sees this phase sees its start time too.
        self.phase.store(phase.rawValue, ordering: .releasing)
    }

    /// Marks entering a collective inside the current step's passes (synchronized batch norm's sums).
    @inline(__always)
    func enter(_ phase: Phase) {
        phaseStart.store(Self.nanoseconds(), ordering: .relaxed)
        self.phase.store(phase.rawValue, ordering: .releasing)
    }

    /// Marks leaving the collective (one store; relaxed: `compute` comes with no start time to publish).
    @inline(__always)
    func leave() {
        phase.store(Phase.compute.rawValue, ordering: .relaxed)
    }

    private func run(_ dataRead: @Sendable () -> String) {
        var lastHeartbeat = 0
        while true {
            usleep(250_000)
            // The phase first, acquiring: see the comment on the class.
            let phase = Phase(rawValue: self.phase.load(ordering: .acquiring)) ?? .compute
            let since = phaseStart.load(ordering: .relaxed)
            let step = self.step.load(ordering: .relaxed)
            let now = Self.nanoseconds()
            if now - lastHeartbeat > 1_000_000_000 {
                writeHeartbeat(phase: name(phase, dataRead), step: step)
                lastHeartbeat = now
            }
            let waited = Double(now - since) * 1e-9
            if timeout > 0 && phase.isWatched && waited > timeout && (!phase.waitsOnRankZero || rank == 0 || rankZeroSilent()) {
                abort(stallReport(phase: name(phase, dataRead), step: step, waited: waited), step)
            }
        }
    }

    /// Whether rank 0 has written no heartbeat for longer than the timeout (or none can be read).
    private func rankZeroSilent() -> Bool {
        guard let record = Self.readHeartbeat("\(heartbeatDirectory)/rank-0.json"), let time = record["time"] as? Double else {
            return true
        }
        return Date().timeIntervalSince1970 - time > timeout
    }

    private func writeHeartbeat(phase: String, step: Int) {
        let record: [String: Any] = ["rank": rank, "pid": Int(getpid()), "host": host, "step": step, "phase": phase,
                                     "time": Date().timeIntervalSince1970]
        guard let data = try? JSONSerialization.data(withJSONObject: record, options: [.sortedKeys]),
              data.count < Self.heartbeatBytes else { return }
        // Rewritten in place, in blocks allocated once: a full disk refused the new file an atomic replace needs, the
        // heartbeat went stale, and the others' watchdogs took a healthy rank 0 (checking gradients) for a frozen one.
        var fd = heartbeatFile.load(ordering: .relaxed)
        if fd < 0 {
            fd = open("\(heartbeatDirectory)/rank-\(rank).json", O_RDWR | O_CREAT | O_CLOEXEC, 0o644)
            guard fd >= 0 else { return }
            _ = ftruncate(fd, off_t(Self.heartbeatBytes))
            _ = posix_fallocate(fd, 0, off_t(Self.heartbeatBytes))
            heartbeatFile.store(fd, ordering: .relaxed)
        }
        // JSON, then spaces (which JSON readers skip) to the fixed size, so no earlier, longer record shows through.
        let bytes = [UInt8](data) + [UInt8](repeating: 0x20, count: Self.heartbeatBytes - 1 - data.count) + [0x0A]
        _ = bytes.withUnsafeBytes { pwrite(fd, $0.baseAddress!, $0.count, 0) }
    }

    /// A heartbeat file's fixed size: a record is about 150 bytes.
    static let heartbeatBytes = 512

    /// A heartbeat record, read again a moment later when it does not parse (a read that met a write in place).
    static func readHeartbeat(_ path: String) -> [String: Any]? {
        for attempt in 0..<3 {
            if let data = FileManager.default.contents(atPath: path),
               let record = try? JSONSerialization.jsonObject(with: data) as? [String: Any] {
                return record
            }
            if attempt < 2 { usleep(10_000) }
        }
        return nil
    }

    /// What a report and a heartbeat call the phase: a stalled read names what it reads.
    private func name(_ phase: Phase, _ dataRead: () -> String) -> String {
        guard phase == .loadBatch, case let reading = dataRead(), !reading.isEmpty else { return phase.name }
        return "\(phase.name) (\(reading))"
    }

    /// How old a heartbeat is when its rank is frozen (SIGSTOP, a debugger, a swapped-out host) rather than waiting:
    /// a live rank's watchdog writes one every 1 to 1.25 s. A rank frozen inside the same collective as this one has
    /// not written one since about when this one began to wait, so this must stay below the timeout, or a frozen rank
    /// would pass for one "waiting in the same collective" (a 5 s bound missed it under a 3 s timeout); at least 2 s
    /// for a loaded machine, and 5 s at most, which no live rank's heartbeat reaches.
    private var staleHeartbeatSeconds: Double { min(5, max(2, 0.75 * timeout)) }

    /// - Parameter phase: the phase's name, as `name(_:_:)` gives it.
    private func stallReport(phase: String, step: Int, waited: Double) -> String {
        var lines = ["stall: rank \(rank) has waited \(String(format: "%.1f", waited)) s in the \(phase) of step \(step) "
            + "(watchdog.timeout_seconds=\(timeout)); aborting the job"]
        var missing: [String] = []
        for other in 0..<worldSize where other != rank {
            let path = "\(heartbeatDirectory)/rank-\(other).json"
            guard let record = Self.readHeartbeat(path) else {
                missing.append("rank \(other) (no heartbeat: on another node without a shared run directory?)")
                continue
            }
            let otherStep = record["step"] as? Int ?? -1
            let otherPhase = record["phase"] as? String ?? "?"
            let age = Date().timeIntervalSince1970 - (record["time"] as? Double ?? 0)
            if otherPhase != phase || otherStep != step || age > staleHeartbeatSeconds {
                missing.append("rank \(other) (\(otherPhase) at step \(otherStep), heartbeat \(String(format: "%.0f", age)) s ago)")
            }
        }
        lines.append(missing.isEmpty ? "every other rank reports waiting in the same collective"
                                     : "not arrived: " + missing.joined(separator: "; "))
        return lines.joined(separator: "\n")
    }
}
