import Engine
import Foundation
import Testing
@testable import Worker

/// Multi-process behaviour, tested by running the built executable under mpirun.
@Suite("bpworker train across ranks", .serialized, .temporaryFiles)
struct TrainingTests {
    /// A small, fast job: SGD with momentum for one epoch over `data`.
    func job(_ data: SyntheticData, batch: Int, runDir: String, extra: [String] = []) -> [String] {
        ["train", "--run-dir", runDir, "--progress", "plain"] + data.arguments + [
            "--set", "model.hidden=[32, 32]", "--set", "optimizer.lr=0.1", "--set", "optimizer.weight_decay=0",
            "--set", "schedule.name=constant", "--set", "schedule.warmup_steps=0", "--set", "training.epochs=1",
            "--set", "training.batch_size=\(batch)", "--set", "seed=5", "--set", "logging.interval=2",
            "--set", "data.normalize=scale",
        ] + extra
    }

    func parameters(_ runDir: String) throws -> [String: [Float]] {
        let file = try SafeTensorsFile(path: runDir + "/model.safetensors")
        var result: [String: [Float]] = [:]
        for name in file.tensors.keys { result[name] = try file.floats(name) }
        return result
    }

    /// Largest |a - b| / max |a| over all tensors.
    func relativeDifference(_ a: [String: [Float]], _ b: [String: [Float]]) -> Double {
        #expect(Set(a.keys) == Set(b.keys))
        var worst = 0.0
        for (name, x) in a {
            guard let y = b[name], x.count == y.count else { return .infinity }
            let scale = Double(x.map { abs($0) }.max() ?? 1)
            let diff = zip(x, y).map { Double(abs($0 - $1)) }.max() ?? 0
            worst = max(worst, diff / max(scale, 1e-12))
        }
        return worst
    }

    /// The default of OpenBLAS threads counts the cores the rank may run on: one under `taskset -c 0` and under
    /// mpirun's binding of one rank to one core, where a second thread would only take turns with the first; in
    /// local mode, the cores of the mask it inherits (every core of the machine when nothing narrowed it).
    @Test func blasThreadsDefaultToTheCoresTheRankMayUse() throws {
        let data = try SyntheticData(samples: 32)
        defer { data.remove() }
        /// `launcher bpworker train ...`, and the start record's blas_threads.
        func threads(_ launcher: [String], local: Bool) throws -> Int? {
            let run = temporaryRunDirectory(), bpworker = Harness.executable.path
            let arguments = Array(launcher.dropFirst()) + [bpworker] + job(data, batch: 16, runDir: run) + (local ? ["--local"] : [])
            let result = try Harness.run(launcher.first ?? bpworker, launcher.isEmpty ? Array(arguments.dropFirst()) : arguments,
                                         environment: [:], timeout: 120)
            #expect(result.status == 0, "\(result.output)")
            let first = try String(contentsOfFile: run + "/metrics.jsonl", encoding: .utf8).split(separator: "\n").first ?? ""
            let start = try JSONSerialization.jsonObject(with: Data(first.utf8)) as? [String: Any]
            return start?["blas_threads"] as? Int
        }
        // Without a launcher the child inherits this process's mask (every core, unless the suite itself was narrowed).
        #expect(try threads([], local: true) == AllowedCores.count())
        #expect(try threads(["/usr/bin/taskset", "-c", "0"], local: true) == 1)
        #expect(try threads([Harness.mpirunPath(), "--allow-run-as-root", "--bind-to", "core", "-n", "1"], local: false) == 1)
    }

    @Test func nRanksEqualOneRankWithTheGlobalBatch() throws {
        let data = try SyntheticData(samples: 96)
        defer { data.remove() }
        let one = temporaryRunDirectory(), two = temporaryRunDirectory(), four = temporaryRunDirectory()
        let smallBatch = temporaryRunDirectory()
        let r1 = try Harness.local(job(data, batch: 16, runDir: one) + ["--local"])
        #expect(r1.status == 0, "\(r1.output)")
        let r2 = try Harness.mpirun(2, job(data, batch: 8, runDir: two))
        #expect(r2.status == 0, "\(r2.output)")
        let r4 = try Harness.mpirun(4, job(data, batch: 4, runDir: four))
        #expect(r4.status == 0, "\(r4.output)")
        #expect(r4.output.contains("global batch 16"))
        // Ranks sharing a node get one BLAS thread each; a local run gets every core.
        #expect(r4.output.contains("4 ranks on 1 node") && r4.output.contains("1 BLAS thread per rank"))
        let cores = ProcessInfo.processInfo.activeProcessorCount
        #expect(r1.output.contains("\(cores) BLAS thread\(cores == 1 ? "" : "s") per rank"))
        let p1 = try parameters(one)
        #expect(relativeDifference(p1, try parameters(two)) <= 1e-5)
        #expect(relativeDifference(p1, try parameters(four)) <= 1e-5)
        // The comparison means something: another global batch gives another model.
        let r8 = try Harness.local(job(data, batch: 8, runDir: smallBatch) + ["--local"])
        #expect(r8.status == 0)
        #expect(relativeDifference(p1, try parameters(smallBatch)) > 1e-3)
    }

    /// Every tensor of a safetensors file (parameters, and in a checkpoint the optimizer state too).
    func tensors(_ path: String) throws -> [String: [Float]] {
        let file = try SafeTensorsFile(path: path)
        var result: [String: [Float]] = [:]
        for name in file.tensors.keys { result[name] = try file.floats(name) }
        return result
    }

    @Test func bucketingAndReductionStrategyDoNotChangeTheModel() throws {
        let data = try SyntheticData(samples: 64)
        defer { data.remove() }
        let runs = [("sharded", 0), ("sharded", 1), ("allreduce", 0), ("allreduce", 1)]
        let directories = runs.map { _ in temporaryRunDirectory() }
        for ((strategy, kib), directory) in zip(runs, directories) {
            let result = try Harness.mpirun(2, job(data, batch: 8, runDir: directory, extra: [
                "--set", "training.bucket_kib=\(kib)", "--set", "training.reduction=\(strategy)",
            ]))
            #expect(result.status == 0, "\(result.output)")
            #expect(result.output.contains(kib == 0 ? "gradients: 1 bucket" : "gradients: 2 buckets"), "\(result.output)")
            #expect(result.output.contains("training.reduction=\(strategy)"))
        }
        // Two ranks add the same two numbers per element whatever the bucketing, and whichever rank adds them:
        // bitwise equal models, and checkpoints whose momentum (gathered from the ranks' parts when sharded)
        // is equal too.
        let reference = try parameters(directories[0])
        let checkpoint = "/checkpoints/step-00000004.safetensors"
        let referenceState = try tensors(directories[0] + checkpoint)
        #expect(referenceState.keys.contains { $0.contains("momentum_buffer") }, "\(referenceState.keys.sorted())")
        for directory in directories.dropFirst() {
            #expect(try parameters(directory) == reference)
            #expect(try tensors(directory + checkpoint) == referenceState)
        }
    }

    @Test func localModeTrainsEvaluatesAndWritesTheRunDirectory() throws {
        let data = try SyntheticData(samples: 120)
        defer { data.remove() }
        let run = temporaryRunDirectory()
        let r = try Harness.local(job(data, batch: 10, runDir: run, extra: ["--set", "training.epochs=3"]) + ["--local"])
        #expect(r.status == 0, "\(r.output)")
        #expect(r.output.contains("local mode"))
        #expect(r.output.contains("10 per rank x 1 rank = global batch 10"))
        // The resolved configuration is printed, not only written.
        #expect(r.output.contains("configuration (also in \(run)/config.yaml)") && r.output.contains("    batch_size: 10"))
        let config = try String(contentsOfFile: run + "/config.yaml", encoding: .utf8)
        #expect(config.contains("batch_size: 10"))
        let records = try String(contentsOfFile: run + "/metrics.jsonl", encoding: .utf8).split(separator: "\n")
            .map { try JSONSerialization.jsonObject(with: Data($0.utf8)) as! [String: Any] }
        let evals = records.filter { $0["type"] as? String == "eval" }
        #expect(evals.count == 3)
        #expect(records.filter { $0["type"] as? String == "train" }.count >= 3 * 6)
        let finalAccuracy = try #require(evals.last?["accuracy"] as? Double)
        #expect(finalAccuracy > 0.9, "the synthetic classes are separable")
        // bpworker eval reports the accuracy the training run ended with, on 1 and on 3 ranks.
        for ranks in [1, 3] {
            let e = ranks == 1 ? try Harness.local(["eval", "--local", "--run-dir", run] + data.arguments)
                               : try Harness.mpirun(ranks, ["eval", "--run-dir", run] + data.arguments)
            #expect(e.status == 0, "\(e.output)")
            #expect(e.output.contains("test accuracy \(String(format: "%.2f%%", 100 * finalAccuracy))"), "\(e.output)")
        }
    }

    /// `--progress line` redraws one line, and every log message (checkpoints, the evaluation) starts a line of its
    /// own instead of landing after the ETA.
    @Test func theProgressLineEndsBeforeEveryMessage() throws {
        let data = try SyntheticData(samples: 120)
        defer { data.remove() }
        let run = temporaryRunDirectory()
        // The job's own `--progress plain` replaced: an option given twice is refused.
        let arguments = job(data, batch: 10, runDir: run, extra: [
            "--local", "--set", "logging.interval=1", "--set", "checkpoint.every_steps=4", "--set", "training.epochs=2",
        ]).map { $0 == "plain" ? "line" : $0 }
        let r = try Harness.local(arguments)
        #expect(r.status == 0, "\(r.output)")
        let lines = r.output.split(separator: "\n")
        #expect(lines.contains { $0.contains("\r\u{1B}[K") && $0.contains(" ETA ") }, "a progress line was drawn: \(r.output)")
        #expect(lines.contains { $0.hasPrefix("checkpoint: ") }, "\(r.output)")
        for line in lines {
            guard let eta = line.range(of: " ETA ", options: .backwards) else { continue }
            // What follows the last ETA is its duration ("7s", "1m05s", "?") and nothing else.
            let rest = line[eta.upperBound...]
            #expect(rest.allSatisfy { $0.isNumber || "hms?".contains($0) }, "text after the ETA: \(line.debugDescription)")
        }
    }

    @Test func trainingStopsAtTheTargetAccuracy() throws {
        let data = try SyntheticData(samples: 120)
        defer { data.remove() }
        let run = temporaryRunDirectory()
        let r = try Harness.mpirun(2, job(data, batch: 10, runDir: run, extra: ["--set", "training.epochs=20",
                                                                             "--set", "training.target_accuracy=0.9"]))
        #expect(r.status == 0, "\(r.output)")
        #expect(r.output.contains("reached training.target_accuracy=0.9 after epoch"))
        let evals = try String(contentsOfFile: run + "/metrics.jsonl", encoding: .utf8).split(separator: "\n")
            .filter { $0.contains("\"eval\"") }
        #expect(evals.count < 20)
        #expect(FileManager.default.fileExists(atPath: run + "/model.safetensors"))
    }

    @Test func gradientCheckRunsOnRankZeroWhileOthersWait() throws {
        let data = try SyntheticData(samples: 64)
        defer { data.remove() }
        let run = temporaryRunDirectory()
        let r = try Harness.mpirun(3, ["gradcheck", "--run-dir", run, "--set", "model.hidden=[16]", "--set", "model.activation=tanh"]
                                    + data.arguments)
        #expect(r.status == 0, "\(r.output)")
        #expect(occurrences(of: "gradient check: PASS", in: r.output) == 1)
        let report = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: run + "/gradcheck.json"))) as! [String: Any]
        #expect(report["dtype"] as? String == "float64")
        // Training with --gradcheck checks first, then trains.
        let t = try Harness.mpirun(2, job(data, batch: 8, runDir: run) + ["--gradcheck"])
        #expect(t.status == 0, "\(t.output)")
        #expect(t.output.contains("gradient check: PASS"))
        #expect(t.output.contains("training finished"))
    }

    @Test func aBrokenBackwardPassStopsEveryRank() throws {
        let data = try SyntheticData(samples: 64)
        defer { data.remove() }
        let run = temporaryRunDirectory()
        let r = try Harness.mpirun(3, job(data, batch: 8, runDir: run) + ["--gradcheck"],
                                   environment: ["BPWORKER_TEST_GRADIENT_FAULT": "scaled:2.weight:1.5"], timeout: 60)
        #expect(r.status != 0, "\(r.output)")
        #expect(r.output.contains("FAIL: 2.weight"), "\(r.output)")
        #expect(!r.output.contains("training finished"))
        #expect(r.seconds < 30)
        // Under the warn policy the same job trains on.
        let w = try Harness.mpirun(2, job(data, batch: 8, runDir: run) + ["--gradcheck", "--set", "gradcheck.policy=warn"],
                                   environment: ["BPWORKER_TEST_GRADIENT_FAULT": "scaled:2.weight:1.5"], timeout: 60)
        #expect(w.status == 0, "\(w.output)")
        #expect(w.output.contains("FAIL: 2.weight") && w.output.contains("training finished"))
    }

    @Test func helpShowsOptionsAndAnExample() throws {
        let r = try Harness.local(["train", "--help"])
        #expect(r.status == 0)
        for text in ["--config", "--set", "--run-dir", "--local", "--gradcheck", "mpirun -n 4 bpworker train"] {
            #expect(r.output.contains(text), "help lacks \(text)")
        }
        // Paragraphs are left to argument-parser to wrap: no line breaks inside our sentences, no line past the
        // terminal's 80 columns, example commands whole on their lines.
        for command in [[], ["train"], ["gradcheck"], ["eval"], ["status"], ["report"]] {
            let help = try Harness.local(command + ["--help"])
            for line in help.output.split(separator: "\n") where !line.hasPrefix("USAGE:") {
                #expect(line.count <= 80, "\(command): \(line)")
            }
        }
        #expect(r.output.contains("\n  mpirun -n 4 bpworker train --resume\n"))
        #expect(r.output.replacingOccurrences(of: "\n", with: " ").contains(
            "--resume alone continues from RUN_DIR/checkpoints/latest. A run directory that already holds a run is never"),
                "a sentence broken by hand: \(r.output)")
        let bad = try Harness.local(["train", "--no-such-flag"])
        #expect(bad.status != 0)
    }
}
