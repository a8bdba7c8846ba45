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
        Session.agree(session.communicator, session.logger, what, onFailure: record, body)
    }

    /// Reports `message`, records it, and tears the whole job down (MPI_Abort ends every rank in milliseconds).
    func abort(_ message: String) -> Never {
        session.logger.critical("\(message)")
        record(message)
        session.communicator.abort(code: 1)
    }

    private func record(_ message: String) {
        if session.isRoot {
            progress.finish(state: .failed, message: message)
        } else {
            RunStatus.markFailed(session.runDirectory, message: "rank \(session.rank): \(message)")
        }
    }
}

/// Lets the watchdog thread end the job. @unchecked Sendable: the watchdog only calls `abort`, which marks the run
/// failed in the shared status.json and calls MPI_Abort, meant precisely for ending a job from wherever the trouble is
/// seen.
struct Aborter: @unchecked Sendable {
    let communicator: any Communicator
    let runDirectory: String

    func abort(_ report: String) -> Never {
        FileHandle.standardError.write(Data("[rank \(communicator.rank)] error: \(report)\n".utf8))
        RunStatus.markFailed(runDirectory, message: "rank \(communicator.rank): \(report)")
        communicator.abort(code: 1)
    }
}
