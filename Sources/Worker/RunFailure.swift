import Coordinator
import Foundation

/// How a rank ends the job once a run has begun. Before that, `Session.agree` and `Session.abort` end every rank and
/// write nothing; from then on the failure is also recorded where a monitor looks: rank 0 through `Progress`
/// (status.json, the metrics' end marker and the report), every other rank in the shared status.json (`rank N: ...`).
struct RunFailure {
    let session: Session
    let progress: Progress

    /// `Session.agree`, recording the failure of the rank that failed first.
    func agree<T>(_ what: String, _ body: () throws -> T) -> T {
        Session.agree(session.communicator, session.logger, what, onFailure: { record($0) }, body)
    }

    /// Reports `message`, records it, and tears the whole job down (MPI_Abort ends every rank in milliseconds).
    func abort(_ message: String) -> Never {
        session.logger.critical("\(message)")
        record(message)
        session.communicator.abort(code: 1)
    }

    /// - Parameter stepsDone: where the failing rank stands, when it knows (a watchdog's stall): status.json says at
    ///   least that many steps, as rank 0's last write may be from before them.
    func record(_ message: String, stepsDone: Int? = nil) {
        if session.isRoot {
            if let stepsDone { progress.status.step = max(progress.status.step, stepsDone) }
            progress.finish(state: .failed, message: message)
        } else {
            RunStatus.markFailed(session.runDirectory, message: "rank \(session.rank): \(message)", stepsDone: stepsDone)
        }
    }
}

/// Lets the watchdog thread end the job. @unchecked Sendable: the watchdog only calls `abort`, which marks the run
/// failed in the shared status.json and calls MPI_Abort, meant precisely for ending a job from wherever the trouble is
/// seen.
struct Aborter: @unchecked Sendable {
    let communicator: any Communicator
    let runDirectory: String
    /// The run's own record of a failure, once it has one (`RunFailure.record`): on rank 0 the status with the steps
    /// done, the metrics' `end` marker and the report, which a watchdog's abort left out (status.json kept the step of
    /// the last log line, and the report said `training`). Set once, on the main thread, before training begins.
    private let recorder = Recorder()

    private final class Recorder: @unchecked Sendable {
        var record: ((String, Int?) -> Void)?
    }

    init(communicator: any Communicator, runDirectory: String) {
        self.communicator = communicator
        self.runDirectory = runDirectory
    }

    func recordFailures(with failure: RunFailure) {
        recorder.record = { failure.record($0, stepsDone: $1) }
    }

    func abort(_ report: String, stepsDone: Int? = nil) -> Never {
        FileHandle.standardError.write(Data("[rank \(communicator.rank)] error: \(report)\n".utf8))
        if let record = recorder.record {
            // Rank 0's record has no rank prefix of its own (other ranks' add theirs): this one names where it was seen.
            record(communicator.rank == 0 ? "rank 0: \(report)" : report, stepsDone)
        } else {
            RunStatus.markFailed(runDirectory, message: "rank \(communicator.rank): \(report)", stepsDone: stepsDone)
        }
        communicator.abort(code: 1)
    }
}
