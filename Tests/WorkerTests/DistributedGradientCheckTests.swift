import Foundation
import Testing

/// `bpworker gradcheck --distributed` and the train-time check under synchronized batch norm, under real mpirun: what
/// the binary adds to the check. What the check computes across ranks (J and the gradient of the global batch, a
/// kink on one rank skipped on all, the local-sums bug that only ranks together see) is tested in one process in
/// EngineTests (DistributedCheckTests); here, that the sampler's shards, `--distributed` and `model.batchnorm=sync`
/// feed it, and how a run reports, fails and stops.
@Suite("Distributed gradient check", .serialized, .temporaryFiles)
struct DistributedGradientCheckTests {
    /// The CNN of the CNN tests: batch norm over images (layer 1) and over features (layer 9).
    static let layers = CNNTests.layers

    func gradcheck(_ data: SyntheticData, runDir: String, _ extra: [String]) -> [String] {
        ["gradcheck", "--run-dir", runDir, "--set", "model.layers=\(Self.layers)", "--set", "data.normalize=scale"]
            + data.arguments + extra
    }

    func report(_ runDir: String) throws -> [String: Any] {
        try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: runDir + "/gradcheck.json"))) as! [String: Any]
    }

    /// What the check measured, as numbers: J, every tensor's gradient norm and grad . u of the random direction.
    func measured(_ report: [String: Any]) -> [Double] {
        let tensors = report["tensors"] as! [[String: Any]]
        let direction = report["direction"] as! [String: Any]
        return [report["loss"] as! Double] + tensors.map { $0["gradientNorm"] as! Double } + [direction["analytic"] as! Double]
    }

    /// Where the check looked: every tensor's checked coordinates and skipped kinks, and the directions skipped.
    func looked(_ report: [String: Any]) -> [[Int]] {
        let tensors = report["tensors"] as! [[String: Any]]
        let direction = report["direction"] as! [String: Any]
        return tensors.map { [$0["checked"] as! Int, $0["kinksSkipped"] as! Int] } + [[direction["kinksSkipped"] as! Int]]
    }

    /// The sampler deals the epoch's permutation out to the ranks in turn, so the first 8 / N samples of N ranks'
    /// shards are together the first 8 of one rank's: with `--distributed` and synchronized batch norm, 4 ranks
    /// checking 2 samples each must measure what one process measures on all 8 (J, the analytic gradient, grad . u),
    /// to rounding, and look at the same coordinates, skipping the same kinks.
    @Test func nRanksMeasureWhatOneRankMeasuresOnTheGlobalBatch() throws {
        let data = try SyntheticData(samples: 96, features: 36, imageShape: [6, 6])
        defer { data.remove() }
        var results: [Int: [String: Any]] = [:]
        for ranks in [1, 4] {
            let run = temporaryRunDirectory()
            let r = try Harness.mpirun(ranks, gradcheck(data, runDir: run, ["--distributed", "--set", "model.batchnorm=sync",
                                                                            "--set", "gradcheck.batch=\(8 / ranks)"]), timeout: 120)
            #expect(r.status == 0, "\(r.output)")
            #expect(occurrences(of: "gradient check: PASS", in: r.output) == 1, "\(r.output)")
            #expect(r.output.contains("distributed over \(ranks) rank\(ranks == 1 ? "" : "s"), batch \(8 / ranks) per rank (8 samples)"),
                    "\(r.output)")
            let json = try report(run)
            #expect(json["distributed"] as? Bool == true)
            #expect(json["ranks"] as? Int == ranks)
            #expect(json["samples"] as? Int == 8)
            #expect(json["batchSize"] as? Int == 8 / ranks)
            results[ranks] = json
        }
        let one = measured(results[1]!), many = measured(results[4]!)
        #expect(many.count == one.count)
        let worst = zip(one, many).map { abs($0 - $1) / max(abs($0), 1e-12) }.max() ?? .infinity
        #expect(worst < 1e-10, "4 ranks measured \(many), one rank \(one)")
        #expect(looked(results[1]!) == looked(results[4]!), "one rank: \(looked(results[1]!)), 4 ranks: \(looked(results[4]!))")
    }

    /// `gradcheck.batch` larger than rank 0's shard: the check on rank 0 alone uses the rows the shard has, not rows
    /// it never gathered (it once sized the batch from the whole training set).
    @Test func theCheckOnRankZeroUsesNoMoreRowsThanItsShardHas() throws {
        let data = try SyntheticData(samples: 12, features: 36, imageShape: [6, 6])
        defer { data.remove() }
        let run = temporaryRunDirectory()
        let r = try Harness.mpirun(2, ["gradcheck", "--run-dir", run, "--set", "model.hidden=[8]", "--set", "model.activation=tanh",
                                       "--set", "data.normalize=scale", "--set", "gradcheck.batch=10", "--set", "training.batch_size=2"]
                                      + data.arguments, timeout: 120)
        #expect(r.status == 0, "\(r.output)")
        let json = try report(run)
        #expect(json["distributed"] as? Bool == false)
        #expect(json["batchSize"] as? Int == 6, "rank 0's shard of 12 samples on 2 ranks: \(json)")
        #expect(occurrences(of: "gradcheck.batch=10 is more than a rank's share of an epoch (6 samples, the steps of an epoch times "
                            + "training.batch_size): checking 6", in: r.output) == 1, "said once: \(r.output)")
    }

    /// BPWORKER_TEST_GRADIENT_FAULT=localsums breaks synchronized batch norm's cross-rank part in the binary: the
    /// check on rank 0 alone passes and says that only --distributed reaches that part; the distributed check fails,
    /// names the tensors below the layer, exits 1 and writes its report.
    @Test func theDistributedCheckFindsABugInSynchronizedBatchNormThatRankZeroAloneCannotSee() throws {
        let data = try SyntheticData(samples: 96, features: 36, imageShape: [6, 6])
        defer { data.remove() }
        let fault = ["BPWORKER_TEST_GRADIENT_FAULT": "localsums:1.weight"]
        let sync = ["--set", "model.batchnorm=sync"]
        let alone = try Harness.mpirun(2, gradcheck(data, runDir: temporaryRunDirectory(), sync), environment: fault, timeout: 120)
        #expect(alone.status == 0, "\(alone.output)")
        #expect(!alone.output.contains("FAIL"), "\(alone.output)")
        #expect(alone.output.contains("gradient check: on rank 0 alone, whose batch norm normalises its own batch; --distributed"),
                "\(alone.output)")
        #expect(alone.output.contains("gradient check: PASS") || alone.output.contains("gradient check: WARN"), "\(alone.output)")
        let run = temporaryRunDirectory()
        let distributed = try Harness.mpirun(2, gradcheck(data, runDir: run, sync + ["--distributed"]), environment: fault, timeout: 120)
        #expect(distributed.status == 1, "\(distributed.output)")
        #expect(distributed.output.contains("gradient check: FAIL"), "\(distributed.output)")
        #expect(distributed.output.contains("FAIL: 0.weight [4, 1, 3, 3]: relative error"), "\(distributed.output)")
        #expect(distributed.output.contains("FAIL: random direction"), "\(distributed.output)")
        let json = try report(run)
        #expect(json["distributed"] as? Bool == true && json["ranks"] as? Int == 2 && json["samples"] as? Int == 8)
        #expect(json["verdict"] as? String == "fail")
    }

    /// Training with the gradient check and synchronized batch norm checks distributed, and says so; the bug above
    /// stops every rank before the first step (gradcheck.policy=abort).
    @Test func trainingWithSynchronizedBatchNormChecksDistributed() throws {
        let data = try SyntheticData(samples: 96, features: 36, imageShape: [6, 6])
        defer { data.remove() }
        let sync = ["--set", "model.batchnorm=sync", "--gradcheck"]
        let run = temporaryRunDirectory()
        let healthy = try Harness.mpirun(2, CNNTests().job(data, batch: 8, runDir: run, extra: sync), timeout: 120)
        #expect(healthy.status == 0, "\(healthy.output)")
        #expect(healthy.output.contains("gradient check: distributed over every rank, since model.batchnorm=sync"), "\(healthy.output)")
        #expect(healthy.output.contains("gradient check: PASS"), "\(healthy.output)")
        #expect(healthy.output.contains("training finished"), "\(healthy.output)")
        let json = try report(run)
        #expect(json["distributed"] as? Bool == true && json["ranks"] as? Int == 2)
        let broken = try Harness.mpirun(2, CNNTests().job(data, batch: 8, runDir: temporaryRunDirectory(), extra: sync),
                                        environment: ["BPWORKER_TEST_GRADIENT_FAULT": "localsums:1.weight"], timeout: 120)
        #expect(broken.status == 1, "\(broken.output)")
        #expect(broken.output.contains("FAIL: 0.weight"), "\(broken.output)")
        #expect(broken.output.contains("gradient check failed; stopping every rank (gradcheck.policy=abort)"), "\(broken.output)")
        #expect(!broken.output.contains("training finished"), "\(broken.output)")
    }

    /// A stop signal during the check before training (here `gradcheck.all` on the CNN, many minutes of coordinates)
    /// ends it without a verdict, and the run stops before its first step: exit 0, state stopped at step 0, no
    /// checkpoint, and the same command starts over, check first. Distributed, the signal goes to rank 1 alone and
    /// every rank stops after the same coordinate (the request is summed with the coordinate's losses); on rank 0
    /// alone, to rank 0. Before, the check ran to its end whatever arrived: minutes past a scheduler's grace time.
    @Test(arguments: [true, false]) func aStopDuringTheCheckEndsTheRunBeforeItsFirstStep(distributed: Bool) throws {
        let data = try SyntheticData(samples: 96, features: 36, imageShape: [6, 6])
        defer { data.remove() }
        let run = temporaryRunDirectory()
        // 42,000 parameters: the whole check takes minutes.
        let layers = "[conv 64 3 pad 1 nobias, batchnorm, relu, conv 64 3 pad 1, relu, flatten, linear 8, relu, batchnorm]"
        let extra = ["--gradcheck", "--set", "gradcheck.all=true"] + (distributed ? ["--set", "model.batchnorm=sync"] : [])
        let job = try Harness.startMPI(2, CNNTests().job(data, batch: 8, runDir: run, extra: extra, layers: layers))
        #expect(job.waitFor { $0.contains("run directory: ") }, "\(job.output)")
        usleep(1_500_000)
        let heartbeat = try JSONSerialization.jsonObject(
            with: Data(contentsOf: URL(fileURLWithPath: run + "/heartbeat/rank-\(distributed ? 1 : 0).json"))) as? [String: Any]
        kill(pid_t(try #require(heartbeat?["pid"] as? Int)), SIGTERM)
        let r = job.wait(timeout: 60)
        #expect(r.status == 0, "\(r.output)")
        #expect(r.output.contains("gradient check: stopped by \(distributed ? "a signal on another rank" : "SIGTERM") after "),
                "\(r.output)")
        #expect(r.output.contains("stopped during the gradient check, before the first step"), "\(r.output)")
        #expect(!r.output.contains("gradient check: PASS") && !r.output.contains("epoch 1/"), "\(r.output)")
        let status = try String(contentsOfFile: run + "/status.json", encoding: .utf8)
        #expect(status.contains("\"state\" : \"stopped\"") && status.contains("\"step\" : 0"), "\(status)")
        #expect(!FileManager.default.fileExists(atPath: run + "/checkpoints/latest"))
        #expect(!FileManager.default.fileExists(atPath: run + "/gradcheck.json"), "no report of a check without a verdict")
        // The run's report says the check was stopped (it said "not run").
        let html = try String(contentsOfFile: run + "/report.html", encoding: .utf8)
        #expect(html.contains("stopped by a signal before its verdict") && !html.contains("not run (train --gradcheck"))
        // The same command, its check sampled this time: a fresh start where nothing trained.
        let again = try Harness.mpirun(2, CNNTests().job(data, batch: 8, runDir: run, extra: ["--gradcheck"]
            + (distributed ? ["--set", "model.batchnorm=sync"] : []), layers: layers), timeout: 120)
        #expect(again.status == 0, "\(again.output)")
        #expect(again.output.contains("removed what an earlier attempt left") && again.output.contains("training finished"),
                "\(again.output)")
    }

    /// Residual blocks with synchronized batch norm in their bodies and shortcuts pass the distributed check.
    @Test func residualBlocksPassTheDistributedCheck() throws {
        let data = try SyntheticData(samples: 96, features: 36, imageShape: [6, 6])
        defer { data.remove() }
        let run = temporaryRunDirectory()
        let checked = try Harness.mpirun(2, CNNTests().job(data, batch: 8, runDir: run, extra: ["--set", "model.batchnorm=sync", "--gradcheck"],
                                                           layers: CNNTests.residualLayers), timeout: 120)
        #expect(checked.status == 0, "\(checked.output)")
        #expect(checked.output.contains("gradient check: PASS"), "\(checked.output)")
        #expect(checked.output.contains("5.shortcut.1.weight"), "\(checked.output)")
        let json = try report(run)
        #expect(json["distributed"] as? Bool == true && json["ranks"] as? Int == 2)
    }

    /// A rank that fails in the middle of the distributed check, while the others wait in one of its sums, ends every
    /// rank within seconds with its message, and no report is written; at train time the watchdog names a rank that
    /// stalls inside the check.
    @Test func anErrorOnOneRankDuringTheCheckEndsEveryRank() throws {
        let data = try SyntheticData(samples: 96, features: 36, imageShape: [6, 6])
        defer { data.remove() }
        for ranks in [2, 4] {
            let run = temporaryRunDirectory()
            let r = try Harness.mpirun(ranks, gradcheck(data, runDir: run, ["--distributed", "--set", "model.batchnorm=sync"]),
                                       environment: ["BPWORKER_TEST_GRADCHECK_FAIL": "1:7"], timeout: 60)
            #expect(r.status != 0, "\(r.output)")
            #expect(r.seconds < 30)
            #expect(occurrences(of: "[rank 1] critical: gradient check: test failure before sum 7 across ranks", in: r.output) == 1,
                    "\(r.output)")
            #expect(!FileManager.default.fileExists(atPath: run + "/gradcheck.json"))
        }
        // At train time the check's sums are watched: a rank stalled inside the check is reported in that phase.
        let stalled = try Harness.mpirun(2, CNNTests().job(data, batch: 8, runDir: temporaryRunDirectory(),
                                                           extra: ["--set", "model.batchnorm=sync", "--gradcheck",
                                                                   "--set", "watchdog.timeout_seconds=2"]),
                                         environment: ["BPWORKER_TEST_GRADCHECK_FAIL": "1:7:stall"], timeout: 60)
        expectStalled(stalled, rank: 0, phase: "gradient check", step: 0)
    }

    /// `bpworker gradcheck` runs under the watchdog too. Distributed, a rank stalled inside a sum is named by the
    /// others; alone on rank 0, a rank 0 that stops (SIGSTOP: its heartbeats stop too) is named by the ranks waiting
    /// for its verdict, while a rank 0 that is only slow (alive, its heartbeats going on) is waited for however long.
    /// `bpworker gradcheck` into a run directory: not into one that holds a run (the run's gradcheck.json was
    /// replaced by a check of another model, and the run's report showed it), and not while a job runs there.
    @Test func theGradcheckCommandLeavesARunsDirectoryAlone() throws {
        let data = try SyntheticData(samples: 96)
        defer { data.remove() }
        let run = temporaryRunDirectory()
        let trained = try Harness.local(["train", "--local", "--run-dir", run, "--gradcheck", "--set", "training.epochs=1",
                                         "--set", "model.hidden=[8]"] + data.arguments)
        #expect(trained.status == 0, "\(trained.output)")
        let before = try Data(contentsOf: URL(fileURLWithPath: run + "/gradcheck.json"))
        let check = try Harness.local(["gradcheck", "--local", "--run-dir", run, "--set", "model.hidden=[4]"] + data.arguments)
        #expect(check.status == 0 && check.output.contains("\(run) holds a run: this check's report is not written"), "\(check.output)")
        #expect(try Data(contentsOf: URL(fileURLWithPath: run + "/gradcheck.json")) == before)
        // While a job runs there: refused.
        let job = try Harness.start(Harness.executable.path, ["train", "--local", "--run-dir", run, "--resume", "--set", "training.epochs=30",
                                                              "--progress", "plain"], environment: ["BPWORKER_TEST_STEP_SLEEP_MS": "20"])
        #expect(job.waitFor(60) { $0.contains("resumed from") })
        let busy = try Harness.local(["gradcheck", "--local", "--run-dir", run, "--set", "model.hidden=[8]"] + data.arguments)
        job.signal(SIGKILL)
        _ = job.wait()
        #expect(busy.status == 1 && busy.output.contains("another bpworker job is running in \(run)"), "\(busy.output)")
    }

    /// A check batch of one sample through batch norm of one value per feature is refused, naming the layer: every
    /// gradient through it is 0, and the check failed the correct backward pass as "a missing backward write".
    @Test func aCheckBatchOfOneThroughBatchNormIsRefused() throws {
        let data = try SyntheticData(samples: 96)
        defer { data.remove() }
        let layers = ["--set", "model.layers=[linear 8, batchnorm, tanh]", "--set", "gradcheck.batch=1"]
        let train = try Harness.local(["train", "--local", "--run-dir", temporaryRunDirectory(), "--gradcheck", "--set", "training.batch_size=8"]
                                      + layers + data.arguments)
        #expect(train.status == 1 && train.output.contains("gradient check: layer 1 BatchNorm(8) would normalise each feature over the check batch") && train.output.contains("raise gradcheck.batch"),
                "\(train.output)")
        #expect(!train.output.contains("missing backward write"), "\(train.output)")
        // Two values (or the distributed check of synchronized batch norm on 2 ranks, one each) pass.
        let two = try Harness.local(["gradcheck", "--local", "--run-dir", temporaryRunDirectory(), "--set", "model.layers=[linear 8, batchnorm, tanh]",
                                     "--set", "gradcheck.batch=2"] + data.arguments)
        #expect(two.status == 0, "\(two.output)")
        let synchronized = try Harness.mpirun(2, ["gradcheck", "--distributed", "--run-dir", temporaryRunDirectory(), "--set", "model.batchnorm=sync"]
                                              + layers + data.arguments)
        #expect(synchronized.status == 0, "\(synchronized.output)")
    }

    /// A correct model fails no coordinate of `gradcheck.all`: this MLP with batch norm, on Fashion-MNIST's check
    /// batch of 4 (the defaults), failed 0.weight at index 2387 by truncation alone (2.8e-4 relative at eps) before a
    /// failing coordinate was measured again at the smaller steps (docs/gradient-checking.md).
    @Test func aCorrectBatchNormMLPPassesTheCheckOfEveryCoordinate() throws {
        let r = try Harness.local(["gradcheck", "--local", "--run-dir", temporaryRunDirectory(), "--set", "seed=2",
                                   "--set", "model.layers=[linear 32, batchnorm, relu, linear 16, batchnorm, tanh]",
                                   "--set", "gradcheck.all=true"], timeout: 120)
        #expect(r.status == 0, "\(r.output)")
        #expect(r.output.contains("0.weight  [32, 784]    25088      0"), "\(r.output)")
        #expect(!r.output.contains("FAIL"), "\(r.output)")
        // A check batch of 2 (or 1 per rank, distributed): batch norm's float64 variance as E[x^2] - mean^2 lost digits
        // where a feature's two values nearly agreed, and a weight whose true derivative is 0 (analytic 3e-16) read
        // -8e-9 by finite differences: FAIL. The variance is now summed about the mean in float64.
        let two = ["--set", "model.layers=[linear 32, batchnorm, tanh, linear 16]", "--set", "gradcheck.all=true"]
        let local = try Harness.local(["gradcheck", "--local", "--run-dir", temporaryRunDirectory(), "--set", "gradcheck.batch=2"] + two,
                                      timeout: 120)
        #expect(local.status == 0 && !local.output.contains("FAIL"), "\(local.output)")
        let distributed = try Harness.mpirun(2, ["gradcheck", "--distributed", "--run-dir", temporaryRunDirectory(), "--set", "gradcheck.batch=1",
                                                 "--set", "model.batchnorm=sync"] + two, timeout: 120)
        #expect(distributed.status == 0 && !distributed.output.contains("FAIL"), "\(distributed.output)")
        // And a wrong one still fails where its coordinates are small: 0.1% on 2.weight of a deep sigmoid MLP, whose
        // coordinates of 1e-6 fell within the rounding level at eps / 100 when any smaller step's error could stand.
        for (fault, tensor) in [("scaled:2.weight:1.001", "2.weight"), ("scaled:0.bias:1.003", "0.bias")] {
            let wrong = try Harness.local(["gradcheck", "--local", "--run-dir", temporaryRunDirectory(), "--set", "model.activation=sigmoid",
                                           "--set", "model.hidden=[16,16,16,16,16,16,16]", "--set", "gradcheck.all=true"],
                                          environment: ["BPWORKER_TEST_GRADIENT_FAULT": fault], timeout: 120)
            #expect(wrong.status == 1 && wrong.output.contains("FAIL: \(tensor) "), "\(wrong.output)")
        }
    }

    @Test func theGradcheckCommandIsWatched() throws {
        let data = try SyntheticData(samples: 96, features: 36, imageShape: [6, 6])
        defer { data.remove() }
        let watched = ["--set", "watchdog.timeout_seconds=2"]
        let distributed = try Harness.mpirun(2, gradcheck(data, runDir: temporaryRunDirectory(),
                                                          ["--distributed", "--set", "model.batchnorm=sync"] + watched),
                                             environment: ["BPWORKER_TEST_GRADCHECK_FAIL": "1:7:stall"], timeout: 60)
        expectStalled(distributed, rank: 0, phase: "gradient check", step: 0)
        let stopped = try Harness.mpirun(2, gradcheck(data, runDir: temporaryRunDirectory(), watched),
                                         environment: ["BPWORKER_TEST_GRADCHECK_SIGSTOP": "0"], timeout: 60)
        expectStalled(stopped, rank: 1, phase: "wait for rank 0's gradient check", step: 0, notArrived: "rank 0 (computing at step 0, heartbeat")
        let slow = try Harness.mpirun(2, gradcheck(data, runDir: temporaryRunDirectory(), watched),
                                      environment: ["BPWORKER_TEST_GRADCHECK_SLOW": "0:5"], timeout: 60)
        #expect(slow.status == 0 && slow.seconds >= 5, "\(slow.output)")
        #expect(slow.output.contains("gradient check: PASS") || slow.output.contains("gradient check: WARN"), "\(slow.output)")
    }
}
