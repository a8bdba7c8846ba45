import Coordinator
import Foundation
import Synchronization

/// The watch of the waits no `Watchdog` times: a training run's and `gradcheck`'s setup (`Phase.setup`), before the
/// run directory (where the heartbeats live) exists and the `Watchdog` starts, and the whole of `eval`, which has no
/// run of its own. It times each wait of `Session.agree` for the other ranks (and `eval`'s sums, `waiting`), and ends
/// the job when one passes `watchdog.timeout_seconds`. A rank frozen there (SIGSTOP, a swapped-out host) used to
/// leave the others waiting for ever. It names no rank: without heartbeats it cannot tell which has not arrived.
///
/// Only the waits are timed, never the bodies (reading the data, the statistics pass), so a long setup on every rank
/// is not a stall; a wait that is long because rank 0 alone works (verifying a checkpoint to resume) is, past the
/// timeout (300 s by default).
final class SetupWatch: Sendable {
    private let timeout: Double
    private let rank: Int
    /// What the job is doing, for the report: "setup", or the command ("eval").
    private let stage: String
    /// Aborting is what the watch thread calls of it: MPI_Abort is safe from any thread (as the Watchdog's Aborter).
    nonisolated(unsafe) private let communicator: any Communicator
    /// When the current wait began (ns, monotonic), 0 outside waits.
    private let waitingSince = Atomic<Int>(0)
    private let what = Mutex<String>("")
    private let stopped = Atomic<Bool>(false)

    init(timeout: Double, rank: Int, communicator: any Communicator, stage: String = Phase.setup.name) {
        self.timeout = timeout
        self.rank = rank
        self.stage = stage
        self.communicator = communicator
        guard timeout > 0 else { return }
        let thread = Thread { [self] in run() }
        thread.name = "bpworker-setup-watch"
        thread.start()
    }

    /// Times `wait`, the agreement of setup step `step`.
    func waiting<T, E: Error>(in step: String, _ wait: () throws(E) -> T) throws(E) -> T {
        what.withLock { $0 = step }
        waitingSince.store(Watchdog.nanoseconds(), ordering: .releasing)
        defer { waitingSince.store(0, ordering: .releasing) }
        return try wait()
    }

    /// `wait` timed by `watch` when there is one (a wait where no watch runs, as in training under the Watchdog, as it is).
    static func waiting<T, E: Error>(_ watch: SetupWatch?, in step: String, _ wait: () throws(E) -> T) throws(E) -> T {
        guard let watch else { return try wait() }
        return try watch.waiting(in: step, wait)
    }

    /// Setup is over: the run's `Watchdog` takes over.
    func stop() {
        stopped.store(true, ordering: .relaxed)
    }

    private func run() {
        while !stopped.load(ordering: .relaxed) {
            usleep(250_000)
            let since = waitingSince.load(ordering: .acquiring)
            guard since > 0, !stopped.load(ordering: .relaxed) else { continue }
            let waited = Double(Watchdog.nanoseconds() - since) * 1e-9
            guard waited > timeout else { continue }
            let step = what.withLock { $0 }
            let report = "[rank \(rank)] error: stall: rank \(rank) has waited \(String(format: "%.1f", waited)) s in \(stage) (\(step)) "
                + "for the other ranks (watchdog.timeout_seconds=\(timeout)): a rank has not arrived; aborting the job\n"
            FileHandle.standardError.write(Data(report.utf8))
            communicator.abort(code: 1)
        }
    }
}
