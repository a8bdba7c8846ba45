import Foundation
import Synchronization
import Testing
@testable import Worker

/// The watchdog in this process, on its own thread, while this test's thread marks steps and collectives as the
/// training thread does: the two threads share the watchdog's fields, which is what `scripts/test` runs under
/// ThreadSanitizer. (DaemonTests covers the stall report of a real job under mpirun.)
@Suite("Watchdog", .temporaryFiles)
struct WatchdogTests {
    /// What the watchdog passed to its abort hook, and a signal that it did.
    final class Aborts: Sendable {
        let report = Mutex<String?>(nil)
        let arrived = DispatchSemaphore(value: 0)
    }

    /// Ends the thread that plays a live rank's watchdog.
    final class LiveRank: Sendable {
        let stopped = Atomic<Bool>(false)
    }

    /// Rank 0's watchdog, started, reporting into `aborts`.
    func started(timeout: Double, worldSize: Int, run: String, aborts: Aborts) -> Watchdog {
        let watchdog = Watchdog(timeout: timeout, rank: 0, worldSize: worldSize, runDirectory: run) { report, _ in
            aborts.report.withLock { $0 = report }
            aborts.arrived.signal()
            // The real hook ends the job; this one parks the watchdog thread for the rest of the test process.
            while true { sleep(3600) }
        }
        watchdog.start()
        return watchdog
    }

    @Test func shortCollectivesPassAndAStalledOneIsReported() throws {
        let run = temporaryRunDirectory()
        let aborts = Aborts()
        // Long enough that a loaded machine descheduling this thread mid-collective cannot look like a stall.
        let timeout = 2.0
        let watchdog = started(timeout: timeout, worldSize: 2, run: run, aborts: aborts)

        // Steps of short collectives for longer than the timeout, while the watchdog reads every 250 ms.
        let busyUntil = Date().addingTimeInterval(timeout + 0.5)
        var step = 0
        while Date() < busyUntil {
            step += 1
            watchdog.beginStep(step)
            watchdog.enter(.gradientExchange, step: step)
            watchdog.leave()
            watchdog.enter(.update, step: step)
            watchdog.leave()
        }
        #expect(aborts.report.withLock { $0 } == nil, "short collectives were reported as a stall")

        // A collective that does not return.
        watchdog.enter(.progressReport, step: step + 1)
        #expect(aborts.arrived.wait(timeout: .now() + timeout + 5) == .success, "no stall report")
        let report = try #require(aborts.report.withLock { $0 })
        #expect(report.hasPrefix("stall: "), "\(report)")
        expectStallReport(report, rank: 0, phase: "metrics allreduce", step: step + 1, timeout: timeout, notArrived: "rank 1 (no heartbeat")

        // The heartbeat the other ranks' watchdogs would read.
        let heartbeat = try Data(contentsOf: URL(fileURLWithPath: run + "/heartbeat/rank-0.json"))
        let record = try #require(try JSONSerialization.jsonObject(with: heartbeat) as? [String: Any])
        #expect(record["rank"] as? Int == 0)
        #expect(record["pid"] as? Int == Int(getpid()))
    }

    /// A rank frozen (SIGSTOP) inside the very collective this rank waits in: its step and phase match, only its
    /// heartbeat has stopped. It must be named, not taken for a rank that waits too; a live rank waiting in the same
    /// collective, whose heartbeat keeps coming, must not be. (With a 3 s timeout the frozen rank's heartbeat is
    /// about 3 s old when the report is written; the old 5 s bound called it waiting.)
    @Test func aRankFrozenInTheSameCollectiveIsNamed() throws {
        let run = temporaryRunDirectory()
        let aborts = Aborts()
        let timeout = 3.0
        let watchdog = started(timeout: timeout, worldSize: 3, run: run, aborts: aborts)
        let step = 7
        @Sendable func heartbeat(rank: Int) throws {
            let record: [String: Any] = ["rank": rank, "pid": 1, "host": "h", "step": step, "phase": "metrics allreduce",
                                         "time": Date().timeIntervalSince1970]
            // Atomically, as the watchdog writes its own: read mid-write, a live rank looked as if it had none.
            try JSONSerialization.data(withJSONObject: record).write(to: URL(fileURLWithPath: "\(run)/heartbeat/rank-\(rank).json"),
                                                                     options: .atomic)
        }
        // Rank 1 writes its last heartbeat and freezes; rank 2 stays alive, writing one every 0.5 s.
        try heartbeat(rank: 1)
        let liveRank = LiveRank()
        let live = Thread {
            while !liveRank.stopped.load(ordering: .relaxed) {
                try? heartbeat(rank: 2)
                usleep(500_000)
            }
        }
        live.start()
        defer { liveRank.stopped.store(true, ordering: .relaxed) }
        watchdog.enter(.progressReport, step: step)
        #expect(aborts.arrived.wait(timeout: .now() + timeout + 5) == .success, "no stall report")
        let report = try #require(aborts.report.withLock { $0 })
        expectStallReport(report, rank: 0, phase: "metrics allreduce", step: step, timeout: timeout,
                          notArrived: "rank 1 (metrics allreduce at step 7, heartbeat")
        #expect(!report.contains("rank 2"), "a live rank waiting in the same collective was named: \(report)")
    }
}
