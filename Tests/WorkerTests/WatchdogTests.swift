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

    @Test func shortCollectivesPassAndAStalledOneIsReported() throws {
        let run = temporaryRunDirectory()
        let aborts = Aborts()
        // Long enough that a loaded machine descheduling this thread mid-collective cannot look like a stall.
        let timeout = 2.0
        let watchdog = Watchdog(timeout: timeout, rank: 0, worldSize: 2, runDirectory: run) { report in
            aborts.report.withLock { $0 = report }
            aborts.arrived.signal()
            // The real hook ends the job; this one parks the watchdog thread for the rest of the test process.
            while true { sleep(3600) }
        }
        watchdog.start()

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
}
