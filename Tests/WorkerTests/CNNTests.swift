import Engine
import Foundation
import Testing

/// Convolutional networks through the whole system: N ranks against one, resume, bad layer lists, PyTorch.
@Suite("Convolutional networks", .serialized, .temporaryFiles)
struct CNNTests {
    /// Every bias the cost depends on: none right before a batch norm (whose gradient would be rounding noise, and
    /// comparing noise across world sizes means nothing).
    static let layers = "[conv 4 3 pad 1 nobias, batchnorm, relu, maxpool 2, conv 6 3 pad 1, relu, flatten, linear 8, relu, batchnorm]"

    /// 96 images of 6x6 in 3 classes; `epochs` epochs of global batch 16.
    func job(_ data: SyntheticData, batch: Int, runDir: String, extra: [String] = [], layers: String = layers) -> [String] {
        ["train", "--run-dir", runDir, "--progress", "plain"] + data.arguments + [
            "--set", "model.layers=\(layers)", "--set", "training.epochs=2", "--set", "training.batch_size=\(batch)",
            "--set", "optimizer.lr=0.05", "--set", "schedule.warmup_steps=2", "--set", "seed=4", "--set", "logging.interval=3",
            "--set", "data.normalize=scale",
        ] + extra
    }

    /// Every tensor of a model file as Double: parameters, running statistics and counts.
    func state(_ runDir: String) throws -> [String: [Double]] {
        let file = try SafeTensorsFile(path: runDir + "/model.safetensors")
        var result: [String: [Double]] = [:]
        for (name, info) in file.tensors {
            result[name] = info.dtype == .i64 ? try file.int64s(name).map(Double.init) : try file.doubles(name)
        }
        return result
    }

    /// The `state` of an uninterrupted 2-rank run of `job` (batch 8 per rank) with `extra`: what a run stopped and
    /// resumed with the same settings must equal bitwise.
    func uninterruptedState(_ data: SyntheticData, extra: [String], sourceLocation: SourceLocation = #_sourceLocation)
        throws -> [String: [Double]] {
        let reference = temporaryRunDirectory()
        let r = try Harness.mpirun(2, job(data, batch: 8, runDir: reference, extra: extra))
        #expect(r.status == 0, "\(r.output)", sourceLocation: sourceLocation)
        return try state(reference)
    }

    func relativeDifference(_ a: [String: [Double]], _ b: [String: [Double]]) -> Double {
        guard a.keys.sorted() == b.keys.sorted() else { return .infinity }
        var worst = 0.0
        for (name, x) in a {
            let y = b[name]!
            let scale = x.map(abs).max() ?? 1
            worst = max(worst, (zip(x, y).map { abs($0 - $1) }.max() ?? 0) / max(scale, 1e-12))
        }
        return worst
    }

    @Test func synchronizedBatchNormGivesNRanksTheModelOfOneRank() throws {
        let data = try SyntheticData(samples: 96, features: 36, imageShape: [6, 6])
        defer { data.remove() }
        let sync = ["--set", "model.batchnorm=sync"]
        let one = temporaryRunDirectory(), two = temporaryRunDirectory(), four = temporaryRunDirectory(), local = temporaryRunDirectory()
        let r1 = try Harness.local(job(data, batch: 16, runDir: one, extra: sync) + ["--local"])
        #expect(r1.status == 0, "\(r1.output)")
        #expect(r1.output.contains("0: Conv2d(1, 4, kernel_size=3, padding=1, bias=False)  ->  [16, 4, 6, 6]  36 parameters"), "\(r1.output)")
        let r2 = try Harness.mpirun(2, job(data, batch: 8, runDir: two, extra: sync))
        #expect(r2.status == 0, "\(r2.output)")
        #expect(r2.output.contains("batch norm: synchronized over 2 ranks"))
        let r4 = try Harness.mpirun(4, job(data, batch: 4, runDir: four, extra: sync))
        #expect(r4.status == 0, "\(r4.output)")
        let reference = try state(one)
        #expect(reference.keys.contains("1.running_mean") && reference["1.num_batches_tracked"] == [12])
        #expect(reference.keys.contains("9.running_var") && reference["9.num_batches_tracked"] == [12])
        #expect(relativeDifference(reference, try state(two)) <= 1e-5)
        #expect(relativeDifference(reference, try state(four)) <= 1e-5)
        // Local batch norm normalises each rank's half batch: another model, so the comparison means something.
        let rl = try Harness.mpirun(2, job(data, batch: 8, runDir: local))
        #expect(rl.status == 0, "\(rl.output)")
        #expect(rl.output.contains("rank 0's running statistics are evaluated, checkpointed and saved"))
        #expect(relativeDifference(reference, try state(local)) > 1e-4)
    }

    @Test func aCNNStopsAndResumesBitwise() throws {
        let data = try SyntheticData(samples: 192, features: 36, imageShape: [6, 6])
        defer { data.remove() }
        let extra = ["--set", "training.epochs=3", "--set", "checkpoint.every_steps=5"]
        let reference = try uninterruptedState(data, extra: extra)
        let run = temporaryRunDirectory()
        let stopped = try Harness.startSlowed(2, job(data, batch: 8, runDir: run, extra: extra)).stop(after: "(step 15)")
        #expect(stopped.status == 0 && stopped.output.contains("stopped by SIGUSR1"), "\(stopped.output)")
        let resumed = try Harness.resume(run)
        #expect(resumed.status == 0, "\(resumed.output)")
        #expect(try state(run) == reference, "the resumed CNN must equal the uninterrupted one bitwise, running statistics included")
    }

    /// Synchronized batch norm's sums are collectives inside the passes: a rank that stalls leaves the others
    /// waiting in them, and the watchdog names that phase instead of letting the job hang.
    @Test func theWatchdogWatchesSynchronizedBatchNorm() throws {
        let data = try SyntheticData(samples: 96, features: 36, imageShape: [6, 6])
        defer { data.remove() }
        let r = try Harness.mpirun(2, job(data, batch: 8, runDir: temporaryRunDirectory(),
                                          extra: ["--set", "model.batchnorm=sync", "--set", "watchdog.timeout_seconds=2"]),
                                   environment: ["BPWORKER_TEST_STALL": "1:3:60"], timeout: 60)
        expectStalled(r, rank: 0, phase: "synchronized batch norm", step: 3)
    }

    /// Local batch norm's running statistics differ between ranks during training; the replica check compares them
    /// after taking rank 0's (as evaluation and checkpoints do), so it checks every step without a false alarm, and a
    /// drifted replica, a NaN, still stop a CNN naming the rank.
    @Test func replicaChecksAndNonFiniteValuesWorkWithBatchNorm() throws {
        let data = try SyntheticData(samples: 96, features: 36, imageShape: [6, 6])
        defer { data.remove() }
        let healthy = try Harness.mpirun(2, job(data, batch: 8, runDir: temporaryRunDirectory(),
                                               extra: ["--set", "training.replica_check_every=1"]))
        #expect(healthy.status == 0 && !healthy.output.contains("diverged"), "\(healthy.output)")
        let drifted = try Harness.mpirun(2, job(data, batch: 8, runDir: temporaryRunDirectory(),
                                                extra: ["--set", "training.replica_check_every=4", "--set", "training.reduction=allreduce"]),
                                         environment: ["BPWORKER_TEST_DIVERGE": "1:2"])
        #expect(drifted.status == 1, "\(drifted.output)")
        #expect(drifted.output.contains("replicas diverged at step 4: the parameters of rank 1 differ from rank 0's"), "\(drifted.output)")
        // A NaN batch on rank 0, whose running statistics are the ones saved: the dropped step leaves them as they
        // were, so the last good state is finite and equal to the checkpoint taken just before.
        let run = temporaryRunDirectory()
        let nan = try Harness.mpirun(2, job(data, batch: 8, runDir: run, extra: ["--set", "checkpoint.every_steps=5"]),
                                     environment: ["BPWORKER_TEST_NAN": "0:5"])
        #expect(nan.status == 1, "\(nan.output)")
        #expect(nan.output.contains("non-finite loss or gradient at step 6 on rank 0 (the input of sample ")
                && nan.output.contains("is not finite); stopped (numerics.policy=stop)"), "\(nan.output)")
        let last = try SafeTensorsFile(path: run + "/checkpoints/step-00000005.safetensors")
        for name in ["1.running_mean", "1.running_var", "9.running_mean", "9.running_var"] {
            #expect(try last.floats(name).allSatisfy(\.isFinite), "\(name): the last good state keeps finite running statistics")
        }
        #expect(try last.int64s("1.num_batches_tracked") == [5])
    }

    func expectCleanFailure(_ data: SyntheticData, layers: String, extra: [String] = [], message: String,
                            sourceLocation: SourceLocation = #_sourceLocation) throws {
        let r = try Harness.mpirun(2, ["train", "--run-dir", temporaryRunDirectory()] + data.arguments
                                    + ["--set", "model.layers=\(layers)"] + extra, timeout: 60)
        #expect(r.status == 1, "\(r.output)", sourceLocation: sourceLocation)
        #expect(occurrences(of: message, in: r.output) == 1, "expected '\(message)' once in:\n\(r.output)", sourceLocation: sourceLocation)
        #expect(r.seconds < 30, sourceLocation: sourceLocation)
    }

    @Test func badLayerListsFailOnEveryRankNamingTheLayer() throws {
        let images = try SyntheticData(samples: 40, features: 36, imageShape: [6, 6])
        let flat = try SyntheticData(samples: 40, features: 36)
        defer { images.remove(); flat.remove() }
        try expectCleanFailure(images, layers: "[conv 4 9, flatten]",
                               message: "model.layers[0] 'conv 4 9' (layer 0 Conv2d(1, 4, kernel_size=9)): kernel 9 is larger than its padded input 6x6")
        try expectCleanFailure(images, layers: "[conv 0 3, flatten]", message: "model.layers[0]: 'conv 0 3': output channels must be an integer >= 1, got 0")
        try expectCleanFailure(images, layers: "[conv 4 3 stride 0, flatten]",
                               message: "model.layers[0]: 'conv 4 3 stride 0': stride must be an integer >= 1, got 0")
        try expectCleanFailure(images, layers: "[conv 4 3, linear 8]",
                               message: "model.layers[1]: 'linear 8': takes flat samples, but its input is [4, 4, 4]: put a flatten before it")
        try expectCleanFailure(images, layers: "[conv 4 3, relu]", message: "the output layer takes flat samples: end the list with flatten")
        try expectCleanFailure(images, layers: "[maxpool 7, flatten]", message: "window 7 is larger than its input 6x6")
        try expectCleanFailure(flat, layers: "[conv 4 3, flatten]",
                               message: "model.layers[0]: 'conv 4 3' needs image samples [H, W] or [C, H, W], but the data's samples are [36]")
        try expectCleanFailure(images, layers: "[conv 4 3 pad 1, flatten, linear 8, batchnorm]", extra: ["--set", "training.batch_size=1"],
                               message: "layer 3 BatchNorm(8) would normalise each feature over 1 value per step")
        try expectCleanFailure(images, layers: "[conv 4 3 dilation 2, flatten]", message: "unknown option 'dilation' (nobias, pad, stride)")
        try expectCleanFailure(images, layers: "[convolution 4 3, flatten]", message: "model.layers[0]: unknown layer 'convolution'")
        // Numbers whose sizes would overflow: one clear error, not a crash in the shape arithmetic.
        try expectCleanFailure(images, layers: "[conv 4 3 pad 9223372036854775807, flatten]",
                               message: "model.layers[0]: 'conv 4 3 pad 9223372036854775807': pad must be at most 16777216")
        try expectCleanFailure(images, layers: "[conv 16 3 pad 16777216, flatten]",
                               message: "its output sample [16, 33554436, 33554436] would hold more than 2^40 values")
    }

    // MARK: - Residual blocks

    /// A stem, an identity block with dropout in its body, and a stride-2 block with a projection shortcut and the
    /// fused batch norm, ReLU, pooling block in its body; no bias before a batch norm.
    static let residualLayers = "[conv 4 3 pad 1 nobias, batchnorm, relu, "
        + "{residual: [conv 4 3 pad 1 nobias, batchnorm, relu, dropout 0.3, conv 4 3 pad 1 nobias, batchnorm]}, relu, "
        + "{shortcut: [conv 6 1 stride 2 nobias, batchnorm], "
        + "residual: [conv 6 3 stride 2 pad 1 nobias, batchnorm, relu, maxpool 1, conv 6 3 pad 1 nobias, batchnorm]}, relu, flatten]"

    /// Synchronized batch norm inside blocks, and dropout drawn per sample inside one: 2 ranks with batch 8 train the
    /// model 1 rank trains with batch 16, and the blocks' tensors have PyTorch's names.
    @Test func residualBlocksKeepNRanksEqualToOneRank() throws {
        let data = try SyntheticData(samples: 96, features: 36, imageShape: [6, 6])
        defer { data.remove() }
        let sync = ["--set", "model.batchnorm=sync"]
        let one = temporaryRunDirectory(), two = temporaryRunDirectory(), local = temporaryRunDirectory()
        let r1 = try Harness.local(job(data, batch: 16, runDir: one, extra: sync, layers: Self.residualLayers) + ["--local"])
        #expect(r1.status == 0, "\(r1.output)")
        let r2 = try Harness.mpirun(2, job(data, batch: 8, runDir: two, extra: sync, layers: Self.residualLayers))
        #expect(r2.status == 0, "\(r2.output)")
        let reference = try state(one)
        #expect(reference["5.shortcut.1.num_batches_tracked"] == [12] && reference.keys.contains("3.body.5.running_var"),
                "\(reference.keys.sorted())")
        #expect(relativeDifference(reference, try state(two)) <= 1e-5)
        // Local batch norm normalises each rank's half batch: another model, so the comparison means something.
        let rl = try Harness.mpirun(2, job(data, batch: 8, runDir: local, layers: Self.residualLayers))
        #expect(rl.status == 0, "\(rl.output)")
        #expect(relativeDifference(reference, try state(local)) > 1e-4)
    }

    @Test func badBlocksFailNamingTheBlockTheEntryAndTheReason() throws {
        let images = try SyntheticData(samples: 40, features: 36, imageShape: [6, 6])
        defer { images.remove() }
        try expectCleanFailure(images, layers: "[conv 4 3 pad 1, {residual: [conv 4 3 pad 1, conv x 3]}, flatten]",
                               message: "model.layers[1].residual[1]: 'conv x 3': output channels must be an integer >= 1, got x")
        try expectCleanFailure(images, layers: "[conv 4 3 pad 1, {residual: [relu], shortcut: [conv 4 1, bogus]}, flatten]",
                               message: "model.layers[1].shortcut[1]: unknown layer 'bogus'")
        try expectCleanFailure(images, layers: "[conv 4 3 pad 1, {residual: [conv 8 3 pad 1]}, flatten]",
                               message: "model.layers[1]: 'residual [conv 8 3 pad 1]': the body gives [8, 6, 6] per sample but the "
                                + "identity shortcut gives [4, 6, 6]: they must match to be added")
        // Batch norm inside a block is held to "more than one value per channel" as the model's own layers are.
        try expectCleanFailure(images, layers: "[conv 4 1, globalavgpool, {residual: [conv 4 1, batchnorm]}, flatten]",
                               extra: ["--set", "training.batch_size=1"],
                               message: "error: model: layer 2.residual[1] BatchNorm(4) would normalise each feature over 1 value per step")
        try expectCleanFailure(images, layers: "[conv 4 3 pad 1, {residual: [relu], shortcutt: [relu]}, flatten]",
                               message: "model.layers[1]: 'residual [relu] shortcutt [relu]': expected 'shortcut [ENTRY, ...]' after the body")
    }

    // MARK: - data.augment

    static let augment = ["--set", "data.augment.crop_padding=2", "--set", "data.augment.flip=true"]

    /// Crops and flips are drawn per (seed, epoch, sample), never per rank or batch position: with augmentation on,
    /// 2 ranks with batch 8 still train the model one rank with batch 16 trains (synchronized batch norm), and the
    /// augmentation really changes that model.
    @Test func augmentationKeepsNRanksEqualToOneRank() throws {
        let data = try SyntheticData(samples: 96, features: 36, imageShape: [6, 6])
        defer { data.remove() }
        let sync = ["--set", "model.batchnorm=sync"]
        let one = temporaryRunDirectory(), two = temporaryRunDirectory(), plain = temporaryRunDirectory()
        let r1 = try Harness.local(job(data, batch: 16, runDir: one, extra: sync + Self.augment) + ["--local"])
        #expect(r1.status == 0, "\(r1.output)")
        #expect(r1.output.contains("augmentation: random 6x6 crops of the image padded with 2 zeros, random horizontal flips"), "\(r1.output)")
        let r2 = try Harness.mpirun(2, job(data, batch: 8, runDir: two, extra: sync + Self.augment))
        #expect(r2.status == 0, "\(r2.output)")
        let rp = try Harness.local(job(data, batch: 16, runDir: plain, extra: sync) + ["--local"])
        #expect(rp.status == 0, "\(rp.output)")
        let reference = try state(one)
        #expect(relativeDifference(reference, try state(two)) <= 1e-5)
        #expect(relativeDifference(reference, try state(plain)) > 1e-3, "augmentation must change what is trained")
        // The resolved configuration nests the keys and reads back.
        let config = try String(contentsOfFile: two + "/config.yaml", encoding: .utf8)
        #expect(config.contains("  augment:\n    crop_padding: 2\n    flip: true\n"), "\(config)")
    }

    /// Evaluation never augments: the test accuracy and loss a run reports after its last epoch are exactly what
    /// `bpworker eval --model` (which knows nothing of data.augment) computes from the saved model.
    @Test func evaluationDuringTrainingSeesTheImagesAsTheyAre() throws {
        let data = try SyntheticData(samples: 96, features: 36, imageShape: [6, 6])
        defer { data.remove() }
        let run = temporaryRunDirectory()
        let trained = try Harness.mpirun(2, job(data, batch: 8, runDir: run, extra: Self.augment))
        #expect(trained.status == 0, "\(trained.output)")
        let metrics = try String(contentsOfFile: run + "/metrics.jsonl", encoding: .utf8).split(separator: "\n")
        let last = try #require(metrics.last { $0.contains("\"eval\"") }, "\(metrics)")
        let record = try #require(try JSONSerialization.jsonObject(with: Data(last.utf8)) as? [String: Any])
        let accuracy = try #require(record["accuracy"] as? Double), loss = try #require(record["loss"] as? Double)
        let evaluated = try Harness.local(["eval", "--local", "--run-dir", temporaryRunDirectory(), "--model", run + "/model.safetensors"]
                                          + data.arguments.suffix(4))
        #expect(evaluated.status == 0, "\(evaluated.output)")
        let correct = Int((accuracy * 96).rounded())
        #expect(evaluated.output.contains("(\(correct)/96), loss \(String(format: "%.4f", loss))"), "training's last evaluation: \(last)\n\(evaluated.output)")
    }

    @Test func badAugmentationSettingsFailOnEveryRankNamingTheKey() throws {
        let images = try SyntheticData(samples: 40, features: 36, imageShape: [6, 6])
        let flat = try SyntheticData(samples: 40, features: 36)
        defer { images.remove(); flat.remove() }
        func expectFailure(_ data: SyntheticData, _ settings: [String], _ message: String, sourceLocation: SourceLocation = #_sourceLocation) throws {
            let r = try Harness.mpirun(2, ["train", "--run-dir", temporaryRunDirectory()] + data.arguments
                                        + settings.flatMap { ["--set", $0] }, timeout: 60)
            #expect(r.status == 1, "\(r.output)", sourceLocation: sourceLocation)
            #expect(occurrences(of: message, in: r.output) == 1, "expected '\(message)' once in:\n\(r.output)", sourceLocation: sourceLocation)
            #expect(r.seconds < 30, sourceLocation: sourceLocation)
        }
        let flatPath = flat.directory.appendingPathComponent("train-x.idx").path
        try expectFailure(flat, ["data.augment.flip=true"],
                          "data.augment: random crops, flips and erasing need image samples [H, W] or [C, H, W], but the samples are [36] (\(flatPath))")
        try expectFailure(images, ["data.augment.crop_padding=6"],
                          "data.augment: crop_padding 6 must be smaller than the images' 6x6, or a crop could hold no pixel of the image")
        try expectFailure(images, ["data.augment.crop_padding=-1"], "data.augment.crop_padding must be >= 0 (0 = no cropping), got -1")
        try expectFailure(images, ["data.augment.flip=sometimes"], "data.augment.flip: expected true or false, got \"sometimes\"")
        try expectFailure(images, ["data.augment.crop=2"], "unknown key 'data.augment.crop'")
    }

    @Test func gradientCheckCoversTheCNNWithBatchStatistics() throws {
        let data = try SyntheticData(samples: 40, features: 36, imageShape: [6, 6])
        defer { data.remove() }
        let run = temporaryRunDirectory()
        let r = try Harness.mpirun(2, ["gradcheck", "--run-dir", run, "--set", "model.layers=\(Self.layers)",
                                       "--set", "gradcheck.all=true"] + data.arguments, timeout: 120)
        #expect(r.status == 0, "\(r.output)")
        #expect(r.output.contains("gradient check: PASS") || r.output.contains("gradient check: WARN"), "\(r.output)")
        for tensor in ["0.weight", "1.weight", "1.bias", "4.weight", "4.bias", "7.weight", "7.bias", "9.weight", "9.bias", "10.weight"] {
            #expect(r.output.contains("  \(tensor) "), "\(tensor) not checked:\n\(r.output)")
        }
        // A conv whose input gradient uses the flipped kernel stops the job, naming the tensors below it.
        let bad = try Harness.mpirun(2, ["gradcheck", "--run-dir", temporaryRunDirectory(), "--set", "model.layers=\(Self.layers)"]
                                     + data.arguments, environment: ["BPWORKER_TEST_GRADIENT_FAULT": "flipped:4.weight"], timeout: 120)
        #expect(bad.status == 1, "\(bad.output)")
        #expect(bad.output.contains("FAIL: 0.weight"), "\(bad.output)")
        // A fault the model cannot carry is refused, not planted as nothing (which made this test's fault pass).
        for (fault, reason) in [("flipped:4.wieght", "the model has no tensor '4.wieght'"),
                                ("flipped:1.weight", "needs a convolution's tensor; 1.weight belongs to BatchNorm(4)"),
                                ("localsums:1.weight", "local sums need synchronized batch norm (model.batchnorm=sync); this run's is local")] {
            let refused = try Harness.mpirun(2, ["gradcheck", "--run-dir", temporaryRunDirectory(), "--set", "model.layers=\(Self.layers)"]
                                             + data.arguments, environment: ["BPWORKER_TEST_GRADIENT_FAULT": fault], timeout: 60)
            #expect(refused.status != 0 && refused.output.contains("error: configuration: BPWORKER_TEST_GRADIENT_FAULT: "), "\(refused.output)")
            #expect(refused.output.contains(reason) && !refused.output.contains("gradient check: "), "\(refused.output)")
        }
    }
}

extension DaemonTests {
    /// SIGTERM to one rank of a CNN job: every rank stops after the same step, the checkpoint holds rank 0's running
    /// statistics at that step, and the resumed run ends bitwise equal to an uninterrupted one.
    @Test func sigtermToOneRankOfACNNCheckpointsItsRunningStatisticsAndResumesBitwise() throws {
        let cnn = CNNTests()
        let data = try SyntheticData(samples: 192, features: 36, imageShape: [6, 6])
        defer { data.remove() }
        let extra = ["--set", "training.epochs=3", "--set", "checkpoint.every_steps=0"]
        let reference = try cnn.uninterruptedState(data, extra: extra)
        let run = temporaryRunDirectory()
        let job = try Harness.startSlowed(2, cnn.job(data, batch: 8, runDir: run, extra: extra))
        let stopped = try signal(rank: 1, SIGTERM, of: job, in: run) { $0.contains("epoch 2/3 step 3/12") }.result
        #expect(stopped.status == 0 && stopped.output.contains("stopped by SIGTERM on rank 1 after step"), "\(stopped.output)")
        let checkpoint = try SafeTensorsFile(path: run + "/checkpoints/" + (try latestCheckpoint(run)))
        let step = try #require(Int(checkpoint.metadata["step"] ?? ""))
        #expect(step > 12 && step < 36, "stopped mid-run in epoch 2 or 3, not at an epoch end: step \(step)")
        for layer in [1, 9] {
            #expect(try checkpoint.int64s("\(layer).num_batches_tracked") == [Int64(step)])
            let mean = try checkpoint.floats("\(layer).running_mean"), variance = try checkpoint.floats("\(layer).running_var")
            #expect(mean.allSatisfy(\.isFinite) && mean.contains { $0 != 0 } && variance.contains { $0 != 1 }, "layer \(layer): statistics moved")
        }
        let resumed = try Harness.resume(run)
        #expect(resumed.status == 0 && resumed.output.contains("resumed from"), "\(resumed.output)")
        #expect(try cnn.state(run) == reference, "bitwise, running statistics included")
    }

    /// kill -9 of a rank of a CNN job with augmentation on: the job ends within seconds and the last checkpoint
    /// resumes to the model of an uninterrupted run, bit for bit (the draws depend on the epoch and the sample only).
    @Test func aKilledRankOfAnAugmentedCNNJobResumesBitwise() throws {
        let cnn = CNNTests()
        let data = try SyntheticData(samples: 192, features: 36, imageShape: [6, 6])
        defer { data.remove() }
        let extra = CNNTests.augment + ["--set", "training.epochs=3", "--set", "checkpoint.every_steps=5"]
        let reference = try cnn.uninterruptedState(data, extra: extra)
        let run = temporaryRunDirectory()
        let job = try Harness.startSlowed(2, cnn.job(data, batch: 8, runDir: run, extra: extra))
        try killRank1AndResume(job, run: run) { $0.contains("checkpoint: ") && $0.contains("step 15)") }
        #expect(try cnn.state(run) == reference, "the resumed CNN must equal the uninterrupted one bitwise")
    }
}

extension ModelFileTests {
    /// A CNN's model.safetensors in real PyTorch: the README's snippet builds the nn.Sequential from the file's
    /// metadata, loads it with strict=True (batch norm's running statistics included) and counts exactly what
    /// `bpworker eval --model` counts; its logits match `bpworker predict --logits` within 1e-4. The same again for
    /// the file without `modules`, as bpworker wrote it before recording them. The NumPy reader of the same page does
    /// the same from the file's modules alone.
    @Test func pytorchLoadsACNNStrictlyAndReproducesItsOutputs() throws {
        try pytorchReproduces(layers: "[conv 4 3 pad 1 nobias, batchnorm, relu, maxpool 2, conv 6 2 stride 1, leaky_relu 0.1, "
                                + "avgpool 2 stride 1, flatten, linear 12, relu, batchnorm, dropout 0.2]", legacyToo: true)
    }

    /// The same for residual blocks (identity, and stride 2 with a projection): the loader's `Residual` module, the
    /// blocks' nested tensor names under strict=True. Files of before had no blocks: no legacy file here.
    @Test func pytorchLoadsAResidualNetworkStrictlyAndReproducesItsOutputs() throws {
        try pytorchReproduces(layers: CNNTests.residualLayers, legacyToo: false)
    }

    func pytorchReproduces(layers: String, legacyToo: Bool) throws {
        let data = try SyntheticData(samples: 120, features: 36, imageShape: [6, 6])
        defer { data.remove() }
        let run = temporaryRunDirectory()
        let trained = try Harness.local(["train", "--local", "--run-dir", run, "--progress", "plain", "--set", "model.layers=\(layers)",
                                         "--set", "training.epochs=2", "--set", "training.batch_size=16",
                                         "--set", "schedule.warmup_steps=2"] + data.arguments)
        #expect(trained.status == 0, "\(trained.output)")
        let model = run + "/model.safetensors"
        let testData = Array(data.arguments.suffix(4))
        let reference = try evalCount(try eval(["--run-dir", temporaryRunDirectory(), "--model", model] + testData).output)

        // Logits from bpworker, the inputs gzipped as the snippet reads them.
        let directory = temporaryRunDirectory()
        try FileManager.default.createDirectory(atPath: directory + "/runs/default", withIntermediateDirectories: true)
        try FileManager.default.createSymbolicLink(atPath: directory + "/runs/default/model.safetensors", withDestinationPath: model)
        let images = data.directory.appendingPathComponent("test-x.idx").path, labels = data.directory.appendingPathComponent("test-y.idx").path
        let predicted = try Harness.local(["predict", "--model", model, images, "--logits", "--output", directory + "/logits.npy"])
        #expect(predicted.status == 0, "\(predicted.output)")
        _ = try python("""
            import gzip, shutil
            for source, target in [("\(images)", "t10k-images-idx3-ubyte.gz"), ("\(labels)", "t10k-labels-idx1-ubyte.gz")]:
                with open(source, "rb") as s, gzip.open(target, "wb") as t: shutil.copyfileobj(s, t)
            """, directory: directory)

        let readme = try String(contentsOf: Self.repository.appendingPathComponent("docs/model-files.md"), encoding: .utf8)
        var snippet = try #require(Self.snippet("torch", in: readme), "README.md has no torch snippet")
        #expect(snippet.contains("data = \"/usr/share/datasets/fashion-mnist/\""))
        snippet = snippet.replacingOccurrences(of: "data = \"/usr/share/datasets/fashion-mnist/\"", with: "data = \"./\"")
        // NumPy alone, from the same file's modules: the same count, and logits within 1e-4.
        let numpy = try #require(Self.snippet("numpy", in: readme), "no numpy snippet")
            .replacingOccurrences(of: "data = \"/usr/share/datasets/fashion-mnist/\"", with: "data = \"./\"")
        let numpyOutput = try python(numpy + """

            ours = np.load("logits.npy")
            print(f"max logit difference {float(np.abs(ours - logits).max()):.3e} of {float(np.abs(logits).max()):.3e}")
            """, directory: directory)
        #expect(try pythonCount(numpyOutput) == reference, "numpy: \(numpyOutput)")
        let numpyLine = try #require(numpyOutput.split(separator: "\n").first { $0.hasPrefix("max logit difference") }, "\(numpyOutput)")
        #expect(try #require(Double(numpyLine.split(separator: " ")[3])) <= 1e-4, "numpy: \(numpyLine)")
        // The file as written (the loader builds its `modules`), then as a file written before `modules` (the loader
        // reads its `layers`).
        for legacy in legacyToo ? [false, true] : [false] {
            if legacy {
                try FileManager.default.removeItem(atPath: directory + "/runs/default/model.safetensors")
                _ = try python("""
                    from safetensors import safe_open
                    from safetensors.numpy import save_file
                    with safe_open("\(model)", "np") as f:
                        meta, t = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
                    # A file of before: no modules, and no checksums either (they cover the metadata removed here).
                    for key in ("modules", "model_input_shape", "bpworker_crc32", "bpworker_header_crc32"):
                        del meta[key]
                    save_file(t, "runs/default/model.safetensors", metadata=meta)
                    """, directory: directory)
                // bpworker itself never needed the keys.
                let evaluated = try eval(["--run-dir", temporaryRunDirectory(), "--model", directory + "/runs/default/model.safetensors"]
                                         + testData)
                #expect(try evalCount(evaluated.output) == reference, "\(evaluated.output)")
            }
            let output = try python(snippet + """

                assert ("modules" in meta) != \(legacy ? "True" : "False")
                ours = torch.from_numpy(np.load("logits.npy"))
                with torch.no_grad():
                    theirs = model(torch.from_numpy(x))
                print(f"max logit difference {float((ours - theirs).abs().max()):.3e} of {float(theirs.abs().max()):.3e}")
                """, executable: Self.torchPython, directory: directory)
            #expect(try pythonCount(output) == reference, "legacy \(legacy): \(output)")
            let line = try #require(output.split(separator: "\n").first { $0.hasPrefix("max logit difference") }, "\(output)")
            let difference = try #require(Double(line.split(separator: " ")[3]), "\(line)")
            #expect(difference <= 1e-4, "legacy \(legacy): \(line)")
            guard legacy else { continue }
            // NumPy alone on the file without `modules`: it reads the same modules from `layers` (it knew only MLPs).
            let numpyLegacy = try python(numpy + """

                assert "modules" not in meta
                ours = np.load("logits.npy")
                print(f"max logit difference {float(np.abs(ours - logits).max()):.3e} of {float(np.abs(logits).max()):.3e}")
                """, directory: directory)
            #expect(try pythonCount(numpyLegacy) == reference, "numpy, legacy: \(numpyLegacy)")
            let legacyLine = try #require(numpyLegacy.split(separator: "\n").first { $0.hasPrefix("max logit difference") }, "\(numpyLegacy)")
            #expect(try #require(Double(legacyLine.split(separator: " ")[3])) <= 1e-4, "numpy, legacy: \(legacyLine)")
        }
        #expect(reference.count == 120)
    }
}
