import Coordinator
import Foundation
import Testing
@testable import Worker

/// `--timeline`: real jobs under mpirun write RUN_DIR/timeline.json, and scripts/check-timeline (Python's json, apart
/// from the code that wrote it) checks it as Perfetto reads the format and against what the run measured.
@Suite("Timeline of every rank", .serialized, .temporaryFiles)
struct TimelineTests {
    static let repository = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent()
    static let checker = repository.appendingPathComponent("scripts/check-timeline").path

    /// scripts/check-timeline on `trace` with `arguments`: its exit status and output.
    func check(_ trace: String, _ arguments: [String]) throws -> Harness.Result {
        try Harness.run("/usr/bin/env", ["python3", Self.checker, trace] + arguments, environment: [:], timeout: 120)
    }

    /// Three epochs of 20 steps at a global batch of 32; the timeline records steps 6 to 35 (warm-up 5), which
    /// hold an epoch end (evaluation and checkpoint) and checkpoints every 15 steps.
    func job(_ data: SyntheticData, runDir: String, extra: [String] = []) -> [String] {
        ["train", "--run-dir", runDir, "--progress", "plain", "--timeline", "30"] + data.arguments + [
            "--set", "model.hidden=[128, 64]", "--set", "schedule.name=constant", "--set", "schedule.warmup_steps=0",
            "--set", "training.epochs=3", "--set", "training.batch_size=16", "--set", "logging.interval=10",
            "--set", "checkpoint.every_steps=15", "--set", "timeline.warmup_steps=5", "--set", "training.bucket_kib=8",
            "--set", "data.normalize=scale",
        ] + extra
    }

    @Test func twoRanksWriteOneValidTraceThatTheCheckerRejectsWhenBroken() throws {
        let data = try SyntheticData(samples: 640, features: 100)
        defer { data.remove() }
        let run = temporaryRunDirectory()
        let result = try Harness.mpirun(2, job(data, runDir: run))
        #expect(result.status == 0, "\(result.output)")
        #expect(result.output.contains("timeline: recording 30 steps from step 6"), "\(result.output)")
        let trace = run + "/timeline.json"
        // 100 inputs, [128, 64] hidden: 5 layers; bucket_kib=8 makes two buckets, 2.weight..4.bias and 0.weight..0.bias.
        #expect(result.output.contains("gradients: 2 buckets"), "\(result.output)")
        let good = try check(trace, ["--ranks", "2", "--steps", "30", "--layers", "5", "--buckets", "2",
                                     "--reduction", "sharded", "--metrics", run + "/metrics.jsonl",
                                     "--expect", "evaluation", "checkpoint", "progress report", "report"])
        #expect(good.status == 0, "\(good.output)")
        #expect(good.output.contains("timeline ok"), "\(good.output)")

        // The checker fails when the trace is broken in each way it guards against.
        let object = try #require(try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: trace))) as? [String: Any])
        let events = try #require(object["traceEvents"] as? [[String: Any]])
        func broken(_ name: String, _ change: ([[String: Any]]) -> [[String: Any]], expecting failure: String) throws {
            var copy = object
            copy["traceEvents"] = change(events)
            let path = run + "/broken-\(name).json"
            try JSONSerialization.data(withJSONObject: copy).write(to: URL(fileURLWithPath: path))
            let r = try check(path, ["--ranks", "2", "--steps", "30", "--layers", "5", "--buckets", "2", "--reduction", "sharded",
                                     "--metrics", run + "/metrics.jsonl"])
            #expect(r.status == 1 && r.output.contains(failure), "\(name): \(r.output)")
        }
        func isStep(_ e: [String: Any], _ n: Int) -> Bool { e["name"] as? String == "step \(n)" }
        // Rank 1's clock left 5 s ahead, as on another host without alignment.
        try broken("unaligned", { $0.map { e in
            var e = e
            if e["pid"] as? Int == 2, let ts = e["ts"] as? Double { e["ts"] = ts + 5e6 }
            return e
        } }, expecting: "the clocks are not aligned")
        // A layer that outlasts its pass.
        var stretched = false
        try broken("overlap", { $0.map { e in
            var e = e
            if !stretched, (e["name"] as? String)?.hasPrefix("forward 0 ") == true, let dur = e["dur"] as? Double {
                e["dur"] = dur + 1e5
                stretched = true
            }
            return e
        } }, expecting: "overlaps the end of")
        // One step's backward pass missing: its parts no longer cover it.
        let firstBackward = try #require(events.firstIndex { $0["pid"] as? Int == 1 && $0["name"] as? String == "backward" })
        try broken("gap", { Array($0[..<firstBackward] + $0[(firstBackward + 1)...]) }, expecting: "no 'backward' in it")
        // Rank 0's forward and backward passes swapped in one step: its parts out of order.
        try broken("disordered", { $0.map { e in
            guard e["pid"] as? Int == 1, (e["args"] as? [String: Any])?["step"] as? Int == 10 else { return e }
            var e = e
            if e["name"] as? String == "forward" { e["name"] = "backward" } else if e["name"] as? String == "backward" { e["name"] = "forward" }
            return e
        } }, expecting: "its parts in the order")
        // A progress report lost: metrics.jsonl has a record without it.
        try broken("unreported", { $0.filter { !($0["pid"] as? Int == 1 && $0["name"] as? String == "progress report") } },
                   expecting: "no progress report after the step")
        // Processes unnamed, or numbered from 0 (Perfetto's swapper).
        try broken("unnamed", { $0.filter { !($0["name"] as? String == "process_name" && $0["pid"] as? Int == 2) } },
                   expecting: "process_name")
        try broken("pid0", { $0.map { e in
            var e = e
            if let pid = e["pid"] as? Int { e["pid"] = pid - 1 }
            return e
        } }, expecting: "pid")
        // A step lost on one rank.
        try broken("lost", { $0.filter { !($0["pid"] as? Int == 2 && isStep($0, 20)) } }, expecting: "29 steps recorded")
    }

    @Test func allreduceSyncBatchNormAndClippingOnSkewedClocks() throws {
        let data = try SyntheticData(samples: 640, features: 64, imageShape: [1, 8, 8])
        defer { data.remove() }
        let run = temporaryRunDirectory()
        // Rank 1's timeline clock runs 5 s ahead: alignment must measure it and undo it.
        let result = try Harness.mpirun(2, job(data, runDir: run, extra: [
            "--set", "model.layers=[conv 4 3 pad 1 nobias, batchnorm, relu, maxpool 2, flatten, linear 32, relu]",
            "--set", "model.batchnorm=sync", "--set", "training.reduction=allreduce", "--set", "optimizer.clip_norm=1",
        ]), environment: ["BPWORKER_TEST_CLOCK_SKEW": "1:5"])
        #expect(result.status == 0, "\(result.output)")
        #expect(result.output.contains("gradients: 2 buckets"), "\(result.output)")
        let trace = run + "/timeline.json"
        // 8 layers, of which batchnorm, relu, maxpool run as one fused block: 6 timed.
        let good = try check(trace, ["--ranks", "2", "--steps", "30", "--layers", "6", "--buckets", "2",
                                     "--reduction", "allreduce", "--metrics", run + "/metrics.jsonl",
                                     "--expect", "evaluation", "checkpoint"])
        #expect(good.status == 0, "\(good.output)")
        let object = try #require(try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: trace))) as? [String: Any])
        let other = try #require(object["otherData"] as? [String: Any])
        let clocks = try #require(other["clock_alignment"] as? [[String: Any]])
        let offset = try #require(clocks.last?["offset_us_at_close"] as? Double)
        #expect(abs(offset - 5e6) < 1000, "rank 1's offset \(offset) µs")
        // Synchronized batch norm's reductions and the clipping norm are inside the steps (the checker found them
        // nested); they are there.
        let names = Set(try #require(object["traceEvents"] as? [[String: Any]]).compactMap { $0["name"] as? String })
        #expect(names.contains("batch norm sync") && names.contains("gradient norm (clipping)"))
    }

    @Test func aRunThatEndsInsideTheWindowWritesWhatItRecordedAndOffWritesNothing() throws {
        let data = try SyntheticData(samples: 320, features: 12)
        defer { data.remove() }
        let run = temporaryRunDirectory()
        // 10 steps, 5 of warm-up: 5 recorded of the 1000 asked for, one process.
        let result = try Harness.local(["train", "--local", "--run-dir", run, "--progress", "plain", "--timeline", "1000"]
            + data.arguments + ["--set", "training.epochs=1", "--set", "training.batch_size=32", "--set", "timeline.warmup_steps=5",
                                "--set", "schedule.warmup_steps=0", "--set", "model.hidden=[8]"])
        #expect(result.status == 0, "\(result.output)")
        let good = try check(run + "/timeline.json", ["--ranks", "1", "--steps", "5", "--layers", "3", "--expect", "evaluation"])
        #expect(good.status == 0, "\(good.output)")

        let off = temporaryRunDirectory()
        let plain = try Harness.local(["train", "--local", "--run-dir", off, "--progress", "plain"] + data.arguments
            + ["--set", "training.epochs=1", "--set", "schedule.warmup_steps=0", "--set", "model.hidden=[8]"])
        #expect(plain.status == 0, "\(plain.output)")
        #expect(!FileManager.default.fileExists(atPath: off + "/timeline.json"))
        #expect(!plain.output.contains("timeline: recording"))

        // A warm-up longer than the run: nothing recorded, and it says so.
        let unopened = temporaryRunDirectory()
        let early = try Harness.local(["train", "--local", "--run-dir", unopened, "--progress", "plain", "--timeline", "5"]
            + data.arguments + ["--set", "training.epochs=1", "--set", "timeline.warmup_steps=1000", "--set", "schedule.warmup_steps=0",
                                "--set", "model.hidden=[8]"])
        #expect(early.status == 0 && early.output.contains("the run ended within the 1000 steps before recording"), "\(early.output)")
        #expect(!FileManager.default.fileExists(atPath: unopened + "/timeline.json"))

        let zero = try Harness.local(["train", "--local", "--run-dir", temporaryRunDirectory(), "--timeline", "0"] + data.arguments)
        #expect(zero.status != 0 && zero.output.contains("--timeline must be at least 1 step"), "\(zero.output)")
        let negative = try Harness.local(["train", "--local", "--run-dir", temporaryRunDirectory(), "--set", "timeline.warmup_steps=-1"]
            + data.arguments)
        #expect(negative.status == 1 && negative.output.contains("timeline.warmup_steps must be >= 0"), "\(negative.output)")
    }

    // MARK: - The file, without a run

    /// A trace of `ranks` with the given clock alignments and nothing else.
    static func trace(ranks: [[TimelineEvent]] = [[], []], open: [ClockOffset], close: [ClockOffset],
                      hosts: [String] = ["a", "b"], layers: [String] = []) -> TraceFile {
        TraceFile(ranks: ranks, dropped: ranks.map { _ in 0 }, alignedAtOpen: open, alignedAtClose: close, hosts: hosts,
                  names: .init(layers: layers, buckets: [], bucketBytes: [], sharded: false), steps: 1, warmup: 0,
                  strategy: "allreduce")
    }

    /// The offset runs linearly from its value at the open to its value at the close, and beyond them on the same
    /// line: rank 1 is 1 ms ahead at 0 s and 3 ms ahead at 10 s, so at t it is 1 ms + t / 5000 ahead.
    @Test func aDriftingClockIsInterpolatedBetweenTheTwoAlignments() {
        let ms: Int64 = 1_000_000, s: Int64 = 1_000_000_000
        let zero = ClockOffset(offset: 0, roundTrip: 0, at: 0)
        let trace = Self.trace(open: [zero, ClockOffset(offset: 1 * ms, roundTrip: 0, at: 0)],
                               close: [zero, ClockOffset(offset: 3 * ms, roundTrip: 0, at: 10 * s)])
        #expect(trace.alignedTime(5 * s, rank: 1) == 5 * s - 2 * ms)
        #expect(trace.alignedTime(0, rank: 1) == -1 * ms)
        #expect(trace.alignedTime(10 * s, rank: 1) == 10 * s - 3 * ms)
        #expect(trace.alignedTime(-10 * s, rank: 1) == -10 * s + 1 * ms, "before the open: offset 1 - 2 ms")
        #expect(trace.alignedTime(20 * s, rank: 1) == 20 * s - 5 * ms, "after the close: offset 1 + 4 ms")
        #expect(trace.alignedTime(2_500_000_001, rank: 1) == 2_500_000_001 - 1_500_000, "rounded to the nanosecond")
        for t in [-7 * s, 0, 3 * s + 17] { #expect(trace.alignedTime(t, rank: 0) == t, "rank 0's clock is the reference") }
        #expect(trace.alignedTime(4 * s, rank: 2) == 4 * s, "a rank without an alignment is left as it is")
        // Both alignments at the same time: no drift to measure, the offset is the one at the open.
        let instant = Self.trace(open: [zero, ClockOffset(offset: 1 * ms, roundTrip: 0, at: 2 * s)],
                                 close: [zero, ClockOffset(offset: 3 * ms, roundTrip: 0, at: 2 * s)])
        #expect(instant.alignedTime(9 * s, rank: 1) == 9 * s - 1 * ms)
    }

    /// Hosts and layers named with quotes, backslashes and a newline come back intact through Python's json, and
    /// times are the exact nanoseconds as µs with three decimals (read as decimals, not floats).
    @Test func namesAreEscapedAndTimesExact() throws {
        let host = #"host "q" \ back\slash"# + "\n"
        let layer = #"linear "8" \d"#
        let t0: Int64 = 9_007_199_254_740_993  // past 2^53: a Double would round it
        let events = [TimelineEvent(start: t0, end: t0 + 1_234_567, kind: .step, index: 0, step: 3),
                      TimelineEvent(start: t0 + 1, end: t0 + 2, kind: .layerForward, index: 0, step: 3)]
        let trace = Self.trace(ranks: [events], open: [], close: [], hosts: [host], layers: [layer])
        let path = TemporaryFiles.path("trace-").path
        try trace.json.write(to: URL(fileURLWithPath: path))
        let read = try Harness.run("/usr/bin/env", ["python3", "-c", """
            import json, sys, decimal
            trace = json.load(open(sys.argv[1]), parse_float=decimal.Decimal)
            out = {"process": [e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "process_name"],
                   "names": [e["name"] for e in trace["traceEvents"] if e["ph"] == "X"],
                   "times": [[str(e["ts"]), str(e["dur"])] for e in trace["traceEvents"] if e["ph"] == "X"]}
            print(json.dumps(out))
            """, path], environment: [:], timeout: 60)
        try #require(read.status == 0, "\(read.output)")
        let line = try #require(read.output.split(separator: "\n").last)
        let out = try #require(try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any])
        #expect(out["process"] as? [String] == ["rank 0 (\(host))"])
        #expect(out["names"] as? [String] == ["step 3", "forward 0 \(layer)"])
        #expect(out["times"] as? [[String]] == [["0", "1234.567"], ["0.001", "0.001"]])
    }
}
