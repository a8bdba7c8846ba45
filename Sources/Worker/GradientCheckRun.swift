import Coordinator
import Engine
import Foundation

/// The gradient check of a job, in one of two ways, after which every rank goes on or stops together:
///
/// - alone: rank 0 checks backpropagation in float64 on a small batch of its own shard while the others wait for its
///   verdict. Its batch norm normalises rank 0's batch alone, so synchronized batch norm's cross-rank terms are not
///   exercised.
/// - distributed: every rank checks at once on a batch of its own shard, perturbing the same coordinates; J is the
///   mean loss over all ranks' check batches, and with `model.batchnorm=sync` the float64 model's batch norm sums
///   over the ranks as in training, so the cross-rank terms of its backward pass are checked too (`checkGradients`
///   with `acrossRanks`). Every rank reaches the same verdict; rank 0 reports it.
enum GradientCheckRun {
    /// `stopped`: a stop signal (SIGTERM, SIGINT, SIGUSR1, SIGUSR2) arrived during the check, which ended without a
    /// verdict: training then stops before its first step.
    enum Verdict: Int32 { case pass = 0, warn = 1, fail = 2, stopped = 3 }

    /// Returns the verdict every rank received. `reportDirectory`: where rank 0 writes gradcheck.json (nil: nowhere).
    /// `phases`: the watchdog watches the distributed check's collectives (phase "gradient check") and the other
    /// ranks' wait for rank 0's verdict. `failure`: how a failure ends the job once a run has begun (nil: `Session.abort`).
    static func run(_ session: Session, _ prepared: Prepared, distributed: Bool = false, phases: PhaseRunner,
                    failure: RunFailure? = nil, printJSON: Bool = false, reportDirectory: String?) -> Verdict {
        func abort(_ message: String) -> Never {
            if let failure { failure.abort(message) }
            session.abort(message)
        }
        let config = session.config
        var verdict: [Int32] = [Verdict.pass.rawValue]
        var report: GradientCheckReport? = nil
        // Every rank's shard of an epoch is equally long: every rank knows the check batch, and refuses it together.
        let checkBatch = min(config.gradcheckBatch, prepared.sampler.stepsPerEpoch * config.batchSize)
        let together = distributed && config.batchNorm == .sync ? session.worldSize : 1
        let check = { () throws in try checkGradientCheckBatch(prepared.model.spec, samples: checkBatch * together) }
        // In a run, watched as the check's own collectives are (outside a phase, a frozen rank left the others here
        // for ever); outside one, `Session.agree` is timed by the setup's watch.
        prepared.hooks.beforeGradientCheck()
        if let failure { phases.watched(.gradientCheck) { failure.agree("gradient check", check) } } else {
            session.agree("gradient check", check)
        }
        if distributed || session.isRoot {
            // The first rows of this rank's shard: `gradcheck.batch`, or the whole shard when it is shorter. Every
            // rank's shard of an epoch is equally long, so in the distributed check every rank has the same count.
            let indices = Array(prepared.sampler.indices(epoch: 0).prefix(config.gradcheckBatch))
            if indices.count < config.gradcheckBatch && session.isRoot && !printJSON {
                let message = "gradient check: gradcheck.batch=\(config.gradcheckBatch) is more than a rank's share of an epoch "
                    + "(\(indices.count) samples, the steps of an epoch times training.batch_size): checking \(indices.count)"
                session.logger.info("\(message)")
            }
            prepared.hooks.duringGradientCheck()
            let sums = distributed ? crossRankSums(session, hooks: prepared.hooks, phases: phases, abort: abort) : nil
            let synchronized = distributed && config.batchNorm == .sync && session.worldSize > 1
            let copy = prepared.model.float64Copy(batchCapacity: indices.count, crossRankReducer: synchronized ? sums : nil)
            do {
                try indices.withUnsafeBufferPointer { try prepared.train.gather(indices: $0, into: copy.inputs, labels: copy.labels) }
            } catch {
                abort("gradient check: \(error)")
            }
            if distributed && !printJSON {
                let ranks = counted(session.worldSize, "rank")
                let through = copy.crossRankReducer != nil ? ", through synchronized batch norm" : ""
                let message = "gradient check: distributed over \(ranks), \(indices.count) samples each; every rank perturbs "
                    + "the same coordinates and J is the mean loss over all of them\(through)"
                session.logger.info("\(message)")
            }
            // The stop signals are installed by `train` only; `bpworker gradcheck` ends by a signal's default action.
            switch checkGradients(model: copy, count: indices.count, options: config.gradientCheckOptions, acrossRanks: sums,
                                  stopRequested: { StopSignals.requested != nil }) {
            case .finished(let finished): report = finished
            case .stopped(let coordinates, let passes, let seconds):
                verdict[0] = Verdict.stopped.rawValue
                if session.isRoot { sayStopped(session, coordinates: coordinates, passes: passes, seconds: seconds) }
            }
        }
        if let report {
            if session.isRoot { publish(report, session, printJSON: printJSON, reportDirectory: reportDirectory) }
            verdict[0] = (report.verdict == .fail ? Verdict.fail : report.verdict == .warn ? .warn : .pass).rawValue
        }
        let own = verdict[0]
        // The others wait here while rank 0 checks alone: watched, with a stall only once rank 0 stops answering.
        let waiting: Phase = distributed || session.isRoot ? .gradientCheck : .gradientCheckVerdict
        do {
            try phases.watched(waiting) {
                try verdict.withUnsafeMutableBufferPointer { (buffer) throws(MPIError) in
                    try session.communicator.broadcast(buffer, root: 0)
                }
            }
        } catch {
            abort("gradient check verdict: \(error)")
        }
        if distributed && own != verdict[0] {
            // Cannot happen while every decision is taken from summed values; if it does, going on would split the job.
            let name = { (raw: Int32) in Verdict(rawValue: raw).map { "\($0)" } ?? "\(raw)" }
            abort("gradient check: rank \(session.rank) reached the verdict \(name(own)) but rank 0 reached "
                + "\(name(verdict[0])): the distributed check desynchronised")
        }
        return Verdict(rawValue: verdict[0]) ?? .fail
    }

    /// Rank 0: the report as a table (or JSON), a failure's lines on stderr, and gradcheck.json in `reportDirectory`.
    private static func publish(_ report: GradientCheckReport, _ session: Session, printJSON: Bool, reportDirectory: String?) {
        if printJSON { print(report.json) } else {
            session.logger.info("\(report.text)")
            if !report.passed {
                FileHandle.standardError.write(Data("gradient check failed: \(report.failures.joined(separator: "; "))\n".utf8))
            }
        }
        if let reportDirectory {
            try? writeAtomically(Data(report.json.utf8), to: reportDirectory + "/gradcheck.json", durable: false)
        }
    }

    private static func sayStopped(_ session: Session, coordinates: Int, passes: Int, seconds: Double) {
        let source = StopSignals.requested.map(StopSignals.name) ?? "a signal on another rank"
        let message = "gradient check: stopped by \(source) after \(counted(coordinates, "coordinate")) compared "
            + "(\(passes) forward passes, \(String(format: "%.1f", seconds)) s), before its verdict: nothing is verified"
        session.logger.notice("\(message)")
    }

    /// The distributed check's sums over the ranks (its losses, its gradient, and synchronized batch norm's statistics),
    /// watched as the phase "gradient check". A failure inside the check ends every rank.
    private static func crossRankSums(_ session: Session, hooks: TestHooks, phases: PhaseRunner,
                                      abort: @escaping (String) -> Never) -> CrossRankSums {
        var reductions = 0
        var start: Int64 = 0
        return CrossRankSums(communicator: session.communicator, willReduce: {
            reductions += 1
            if reductions == hooks.gradcheckFailSum {
                if hooks.gradcheckStalls { sleepFully(60) } else {
                    abort("gradient check: test failure before sum \(reductions) across ranks (BPWORKER_TEST_GRADCHECK_FAIL)")
                }
            }
            start = phases.enter(.gradientCheck)
        }, didReduce: {
            phases.leave(.gradientCheck, since: start)
        }, onFailure: { error in
            abort("gradient check: sum across ranks failed: \(error)")
        })
    }
}
