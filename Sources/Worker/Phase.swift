import Coordinator
import Engine

/// What a rank is doing: one list for the watchdog, which names the phase in a stall report, and for the timeline,
/// which draws it. A phase is *watched* when it waits on other ranks (a collective, or a step's exchange): only there
/// can a rank hang, so only there does the watchdog's clock run. A phase is *recorded* when the timeline has an event
/// kind for it; phases whose parts the reducer records itself (the exchange, the update) have none of their own.
enum Phase: Int, CaseIterable, Sendable {
    /// Outside every watched phase: the watchdog's resting state.
    case compute = 0
    // The parts of a training step.
    case step, loadBatch, forward, backward
    /// After backward, until every bucket's gradients have arrived.
    case gradientExchange
    /// The norm of the summed gradients for clipping (a collective when sharded).
    case gradientNorm
    /// The optimizer update and (sharded) the parameter gather.
    case update
    /// Synchronized batch norm's sums, inside the passes.
    case batchNormSync
    // Between steps.
    case progressReport, replicaCheck, evaluation, checkpoint, report
    /// Opening or closing the timeline's window: clock alignment, gathering the events.
    case timeline
    /// The distributed gradient check's sums over the ranks.
    case gradientCheck
    /// Ranks other than 0 waiting while rank 0 checks the gradients alone: as long as it takes, so a stall is only
    /// declared when rank 0 stops answering too (`waitsOnRankZero`).
    case gradientCheckVerdict
    /// Waiting for the other ranks in one of setup's agreements, before the run directory exists: timed by
    /// `SetupWatch`, not by the `Watchdog`, whose heartbeats live in the run directory.
    case setup
    /// MPI_Finalize, which waits for every rank, at the very end; rank 0 writes the run's last status, metrics and
    /// report just before it, so the other ranks wait here for those (`waitsOnRankZero`).
    case finalize

    /// The name a stall report and a heartbeat file give the phase.
    var name: String {
        switch self {
        case .compute, .step, .forward, .backward: "computing"
        case .loadBatch: "data read"
        case .gradientExchange: "gradient allreduce"
        case .gradientNorm: "gradient norm (clipping)"
        case .update: "update and parameter gather"
        case .batchNormSync: "synchronized batch norm"
        case .progressReport: "metrics allreduce"
        case .replicaCheck: "replica check"
        case .evaluation: "evaluation"
        case .checkpoint: "checkpoint"
        case .report: "report"
        case .timeline: "timeline (clock alignment, gathering the events)"
        case .gradientCheck: "gradient check"
        case .gradientCheckVerdict: "wait for rank 0's gradient check"
        case .setup: "setup"
        case .finalize: "finalize (rank 0's last writes, MPI_Finalize)"
        }
    }

    /// Whether the watchdog times the phase: it waits on other ranks, or on a file (a read from a stalled file system
    /// would otherwise hang the job).
    var isWatched: Bool {
        switch self {
        case .compute, .step, .forward, .backward: false
        default: true
        }
    }

    /// Whether the phase waits for rank 0's own long computation (its gradient check alone), whose length no timeout
    /// can know: the watchdog declares a stall only when rank 0's heartbeat is older than the timeout as well (stopped,
    /// or hung with its threads), or missing.
    /// Rank 0 itself waits on the others there, under the plain timeout.
    var waitsOnRankZero: Bool { self == .gradientCheckVerdict || self == .finalize }

    /// The timeline's event for the phase; nil where the reducer or the timeline records finer events itself.
    var timelineKind: TimelineEvent.Kind? {
        switch self {
        case .step: .step
        case .loadBatch: .loadBatch
        case .forward: .forward
        case .backward: .backward
        case .gradientNorm: .gradientNorm
        case .batchNormSync: .batchNormSync
        case .progressReport: .progressReport
        case .replicaCheck: .replicaCheck
        case .evaluation: .evaluation
        case .checkpoint: .checkpoint
        case .report: .report
        case .compute, .gradientExchange, .update, .timeline, .gradientCheck, .gradientCheckVerdict, .setup, .finalize: nil
        }
    }

    /// Between steps the model's passes (an evaluation's) are one event, not an event per layer.
    var isBetweenSteps: Bool {
        switch self {
        case .progressReport, .replicaCheck, .evaluation, .checkpoint, .report: true
        default: false
        }
    }
}

/// Runs the phases of a rank's work under the watchdog and on the timeline: the one place that tells both. Without
/// a timeline (the usual run) a phase costs the watchdog's few stores and no clock read beyond its own; nothing here
/// allocates.
final class PhaseRunner {
    let watchdog: Watchdog
    /// `--timeline`'s recorder (nil without one); it records only while the timeline's window is open.
    let recorder: TimelineRecorder?
    /// The global step the rank is on, as the watchdog reports it.
    private(set) var step = 0

    init(watchdog: Watchdog, recorder: TimelineRecorder?) {
        self.watchdog = watchdog
        self.recorder = recorder
    }

    /// The start of global step `step`, for the watchdog's reports.
    @inline(__always)
    func beginStep(_ step: Int) {
        self.step = step
        watchdog.beginStep(step)
    }

    /// Runs `body` as `phase`: watched if it waits on other ranks, recorded if the timeline draws it.
    @inline(__always)
    func watched<T>(_ phase: Phase, _ body: () throws -> T) rethrows -> T {
        if phase.isWatched { watchdog.enter(phase, step: step) }
        defer { if phase.isWatched { watchdog.leave() } }
        guard let recorder, let kind = phase.timelineKind else { return try body() }
        if phase.isBetweenSteps { recorder.recordsLayers = false }
        let start = recorder.begin()
        defer {
            recorder.end(kind, since: start)
            if phase.isBetweenSteps { recorder.recordsLayers = true }
        }
        return try body()
    }

    /// Restarts the clock of the phase the rank is in, when it has made progress of its own: an evaluation after each
    /// batch, so that the timeout bounds a batch and the closing sums, not the whole test set (a test set longer
    /// than the timeout to evaluate ended a healthy job).
    @inline(__always)
    func progressed(in phase: Phase) {
        if phase.isWatched { watchdog.enter(phase) }
    }

    /// Brackets a collective inside a pass (synchronized batch norm's sums), where no closure can be passed: `enter`
    /// before it, `leave` with what `enter` returned after it.
    @inline(__always)
    func enter(_ phase: Phase) -> Int64 {
        if phase.isWatched { watchdog.enter(phase) }
        return recorder?.begin() ?? 0
    }

    @inline(__always)
    func leave(_ phase: Phase, since start: Int64) {
        if let recorder, let kind = phase.timelineKind { recorder.end(kind, since: start) }
        if phase.isWatched { watchdog.leave() }
    }
}
