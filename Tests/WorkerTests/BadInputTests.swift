import Foundation
import Testing

/// Bad input reaches every rank as one clear error and a non-zero exit within seconds, never a hang.
@Suite("Bad input", .serialized, .temporaryFiles)
struct BadInputTests {
    func expectCleanFailure(_ arguments: [String], ranks: Int = 2, message: String,
                            sourceLocation: SourceLocation = #_sourceLocation) throws {
        let r = try Harness.mpirun(ranks, ["train", "--run-dir", temporaryRunDirectory()] + arguments, timeout: 60)
        #expect(r.status != 0, "exit status", sourceLocation: sourceLocation)
        #expect(r.output.contains(message), "expected '\(message)' in:\n\(r.output)", sourceLocation: sourceLocation)
        // One message, not one per rank.
        #expect(occurrences(of: message, in: r.output) == 1, "\(r.output)", sourceLocation: sourceLocation)
        #expect(r.seconds < 30, sourceLocation: sourceLocation)
    }

    @Test func missingDataFile() throws {
        try expectCleanFailure(["--set", "data.train_features=/nonexistent/train.idx"], message: "/nonexistent/train.idx: cannot open")
    }

    @Test func corruptDataFile() throws {
        let data = try SyntheticData(samples: 32)
        defer { data.remove() }
        let bad = data.directory.appendingPathComponent("train-x.idx")
        try Data("this is not an IDX file at all".utf8).write(to: bad)
        try expectCleanFailure(data.arguments, message: "not an IDX file")
    }

    @Test func truncatedDataFile() throws {
        let data = try SyntheticData(samples: 32)
        defer { data.remove() }
        let file = data.directory.appendingPathComponent("train-x.idx")
        let bytes = try Data(contentsOf: file)
        try bytes.prefix(bytes.count - 5).write(to: file)
        try expectCleanFailure(data.arguments, message: "train-x.idx: truncated data: expected 384 data bytes")
    }

    @Test func labelOutOfRange() throws {
        let data = try SyntheticData(samples: 32)
        defer { data.remove() }
        try expectCleanFailure(data.arguments + ["--set", "model.classes=2"],
                               message: "train-y.idx: label 2 at index 2 is out of range for 2 classes")
    }

    @Test func inputWidthNotMatchingTheFirstLayer() throws {
        let data = try SyntheticData(samples: 32)
        defer { data.remove() }
        try expectCleanFailure(data.arguments + ["--set", "model.inputs=784"], message: "model.inputs is 784")
    }

    /// The test set is held to the training set's samples, as `eval --model` holds its input to a model file's: images
    /// of another shape (the same number of values) or values of another kind (floats where the model trained on
    /// bytes) are refused naming both files. Before, they were evaluated, and the test accuracy was silently wrong.
    @Test func aTestSetUnlikeTheTrainingSet() throws {
        let data = try SyntheticData(samples: 32, features: 36, imageShape: [6, 6])
        defer { data.remove() }
        let train = data.directory.appendingPathComponent("train-x.idx").path
        let test = data.directory.appendingPathComponent("test-x.idx")
        try SyntheticData.idx(shape: [32, 4, 9], bytes: [UInt8](repeating: 7, count: 32 * 36)).write(to: test)
        let cnn = ["--set", "model.layers=[conv 4 3, flatten]"]
        try expectCleanFailure(data.arguments + cnn, message: "\(test.path): samples are shaped [4, 9] but \(train)'s are [6, 6]")
        let directory = data.directory.path
        let made = try Harness.run("/usr/bin/env", ["python3", "-c", """
            import numpy as np
            np.save("\(directory)/x.npy", np.full((32, 6, 6), 9, np.uint8))
            np.save("\(directory)/y.npy", np.arange(32, dtype=np.int64) % 3)
            np.save("\(directory)/xf.npy", np.full((32, 6, 6), 9 / 255, np.float32))
            """], environment: [:], timeout: 60)
        #expect(made.status == 0, "\(made.output)")
        let npy = ["--set", "data.format=npy", "--set", "data.train_features=\(directory)/x.npy", "--set", "data.train_labels=\(directory)/y.npy",
                   "--set", "data.test_features=\(directory)/xf.npy", "--set", "data.test_labels=\(directory)/y.npy"]
        try expectCleanFailure(npy + cnn, message: "\(directory)/xf.npy: holds floating-point values (float32, or float64 read as "
                                + "float32) but \(directory)/x.npy holds raw bytes 0..255 (uint8)")
    }

    /// A NaN in float training data: its statistics would be NaN, and so every standardised value; the run used to
    /// stop at step 1 on a non-finite loss naming no file, after writing a checkpoint that bpworker itself refuses.
    @Test func aNaNInTheTrainingDataNamesTheFileAndTheSample() throws {
        let directory = temporaryRunDirectory()
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        let made = try Harness.run("/usr/bin/env", ["python3", "-c", """
            import numpy as np
            x = np.ones((5000, 12), np.float32)
            x[4100, 3] = np.nan
            np.save("\(directory)/x.npy", x)
            np.save("\(directory)/y.npy", np.arange(5000, dtype=np.int64) % 3)
            np.save("\(directory)/xt.npy", np.ones((30, 12), np.float32))
            np.save("\(directory)/yt.npy", np.arange(30, dtype=np.int64) % 3)
            """], environment: [:], timeout: 60)
        #expect(made.status == 0, "\(made.output)")
        try expectCleanFailure(["--set", "data.format=npy", "--set", "data.train_features=\(directory)/x.npy",
                                "--set", "data.train_labels=\(directory)/y.npy", "--set", "data.test_features=\(directory)/x.npy",
                                "--set", "data.test_labels=\(directory)/y.npy"],
                               message: "\(directory)/x.npy: sample 4100 holds nan (its value 3): the data must be finite numbers")
        // Without the statistics pass nothing reads the data ahead: the step whose batch holds the sample stops, naming it.
        let r = try Harness.mpirun(2, ["train", "--run-dir", temporaryRunDirectory(), "--set", "data.format=npy",
                                       "--set", "data.train_features=\(directory)/x.npy", "--set", "data.train_labels=\(directory)/y.npy",
                                       "--set", "data.test_features=\(directory)/xt.npy", "--set", "data.test_labels=\(directory)/yt.npy",
                                       "--set", "data.normalize=scale", "--set", "training.epochs=1"], timeout: 60)
        #expect(r.status == 1, "\(r.output)")
        #expect(occurrences(of: "(the input of sample 4100 of data.train_features, in \(directory)/x.npy, is not finite); stopped "
                            + "(numerics.policy=stop)", in: r.output) == 1, "\(r.output)")
    }

    /// A NaN or an infinity in a float test set: every evaluation's loss was NaN and its accuracy whatever the NaN rows'
    /// scores gave, silently; `predict` wrote rows of NaN probabilities. Now train and eval refuse the test set on
    /// every rank, and predict its input, naming the file and the sample.
    @Test func aNaNInTheTestSetOrInPredictsInputNamesTheFileAndTheSample() throws {
        let directory = temporaryRunDirectory()
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        let made = try Harness.run("/usr/bin/env", ["python3", "-c", """
            import numpy as np
            rng = np.random.default_rng(1)
            x = rng.random((300, 12)).astype(np.float32)
            np.save("\(directory)/x.npy", x)
            np.save("\(directory)/y.npy", np.arange(300, dtype=np.int64) % 3)
            t = x[:90].copy()
            t[77, 5] = np.inf
            np.save("\(directory)/t.npy", t)
            t[77, 5] = np.nan
            np.save("\(directory)/tnan.npy", t)
            """], environment: [:], timeout: 60)
        #expect(made.status == 0, "\(made.output)")
        func data(test: String) -> [String] {
            ["--set", "data.format=npy", "--set", "data.train_features=\(directory)/x.npy", "--set", "data.train_labels=\(directory)/y.npy",
             "--set", "data.test_features=\(directory)/\(test)", "--set", "data.test_labels=\(directory)/y90.npy"]
        }
        let labels = try Harness.run("/usr/bin/env", ["python3", "-c", "import numpy as np; np.save('\(directory)/y90.npy', np.arange(90) % 3)"],
                                     environment: [:], timeout: 60)
        #expect(labels.status == 0, "\(labels.output)")
        for normalize in ["scale", "standardize"] {
            try expectCleanFailure(data(test: "t.npy") + ["--set", "data.normalize=\(normalize)", "--set", "model.hidden=[8]"],
                                   message: "\(directory)/t.npy: sample 77 holds inf (its value 5): the data must be finite numbers")
        }
        let run = temporaryRunDirectory()
        let trained = try Harness.local(["train", "--local", "--run-dir", run, "--set", "model.hidden=[8]", "--set", "training.epochs=1"]
                                        + data(test: "x.npy").dropLast(2) + ["--set", "data.test_labels=\(directory)/y.npy"])
        #expect(trained.status == 0, "\(trained.output)")
        let evaluated = try Harness.mpirun(2, ["eval", "--run-dir", temporaryRunDirectory(), "--model", run + "/model.safetensors"]
                                           + data(test: "tnan.npy"), timeout: 60)
        #expect(evaluated.status != 0, "\(evaluated.output)")
        #expect(occurrences(of: "\(directory)/tnan.npy: sample 77 holds nan (its value 5): the data must be finite numbers",
                            in: evaluated.output) == 1, "\(evaluated.output)")
        let predicted = try Harness.local(["predict", "--model", run + "/model.safetensors", directory + "/t.npy"])
        #expect(predicted.status == 1, "\(predicted.output)")
        #expect(predicted.output.contains("bpworker predict: error: \(directory)/t.npy: sample 77 holds inf (its value 5): the data "
                                          + "must be finite numbers"), "\(predicted.output)")
        #expect(!predicted.output.contains("0: "), "\(predicted.output)")
        let fine = try Harness.local(["predict", "--model", run + "/model.safetensors", directory + "/x.npy", "--top", "1"])
        #expect(fine.status == 0 && fine.output.contains("299: "), "\(fine.output)")
    }

    /// Ranks given different settings (each node reading its own `-c FILE`; here two programs of one mpirun) end the
    /// job in setup, naming the keys and both values. Another learning rate trained a wrong model with exit 0, another
    /// `training.epochs` hung the job at the end, another reduction crashed it in MPI. Keys a rank may set for itself
    /// (its data paths, prefetch, BLAS threads) are allowed to differ.
    @Test func ranksWithDifferentSettingsAreRefusedNamingTheKeys() throws {
        let data = try SyntheticData(samples: 64)
        defer { data.remove() }
        let common = ["train", "--progress", "plain", "--set", "model.hidden=[8]", "--set", "training.epochs=1"] + data.arguments
        func twoPrograms(_ run: String, second: [String]) throws -> Harness.Result {
            try Harness.run(Harness.mpirunPath(), ["--allow-run-as-root", "--oversubscribe", "-n", "1", Harness.executable.path]
                            + common + ["--run-dir", run] + [":", "-n", "1", Harness.executable.path] + common + ["--run-dir", run] + second,
                            environment: [:], timeout: 60)
        }
        let run = temporaryRunDirectory()
        let refused = try twoPrograms(run, second: ["--set", "optimizer.lr=5", "--set", "training.epochs=3", "--set", "training.reduction=allreduce"])
        #expect(refused.status != 0 && refused.seconds < 30, "\(refused.output)")
        #expect(occurrences(of: "rank 1's settings differ from rank 0's, and every rank must train with the same: optimizer.lr is 5.0 "
                            + "here, 0.05 on rank 0; training.epochs is 3 here, 1 on rank 0; training.reduction is allreduce here, "
                            + "sharded on rank 0", in: refused.output) == 1, "\(refused.output)")
        #expect(!FileManager.default.fileExists(atPath: run), "a refused start writes nothing")
        let allowed = try twoPrograms(temporaryRunDirectory(), second: ["--set", "training.blas_threads=1", "--set", "data.prefetch=0"])
        #expect(allowed.status == 0 && allowed.output.contains("training finished"), "\(allowed.output)")
    }

    @Test func unknownConfigKey() throws {
        try expectCleanFailure(["--set", "optimizer.learnig_rate=0.1"], message: "unknown key 'optimizer.learnig_rate'")
        try expectCleanFailure(["--set", "training.epoch=3"], message: "(did you mean 'training.epochs'?)")
    }

    @Test func wrongTypeInAFileNamesFileLineAndKey() throws {
        let file = TemporaryFiles.path("bad-").appendingPathExtension("yaml")
        try Data("seed: 1\ntraining:\n  epochs: three\n".utf8).write(to: file)
        defer { try? FileManager.default.removeItem(at: file) }
        try expectCleanFailure(["-c", file.path], message: "\(file.path):3: training.epochs: expected an integer, got \"three\"")
        try expectCleanFailure(["--set", "optimizer.lr=fast"], message: "optimizer.lr: expected a number")
        try expectCleanFailure(["--set", "optimizer.name=rmsprop"], message: "expected one of sgd, adam, adamw")
        // A section given a value: the section is named and said to be a mapping (it was called an unknown key).
        try expectCleanFailure(["--set", "model=5"],
                               message: "model: expected a mapping of its keys (model.inputs, model.classes, model.hidden, ...), got \"5\"")
    }

    /// A second `-c` would replace the first without a word (the last value wins in swift-argument-parser).
    @Test func aSecondConfigurationFileIsRefused() throws {
        let r = try Harness.local(["train", "--local", "-c", "first.yaml", "--config", "second.yaml"], timeout: 30)
        #expect(r.status != 0, "\(r.output)")
        #expect(r.output.contains("-c/--config given 2 times (first.yaml, second.yaml): bpworker reads one configuration file; "
                                  + "change single keys with --set"), "\(r.output)")
    }

    /// An option of one value given twice: swift-argument-parser kept the last without a word (`--run-dir a --run-dir b`
    /// trained into b; `--resume PATH --resume` resumed from the latest checkpoint instead of PATH).
    @Test func aSingleValuedOptionGivenTwiceIsRefused() throws {
        for (arguments, expected) in [
            (["train", "--local", "--run-dir", "a", "--run-dir=b"], "--run-dir given 2 times (a, b)"),
            (["train", "--local", "--resume", "x/step-00000004.safetensors", "--resume"], "--resume given 2 times (x/step-00000004.safetensors, latest)"),
            (["predict", "--model", "m", "--output", "a.npy", "--output", "b.npy", "x.npy"], "--output given 2 times (a.npy, b.npy)"),
            (["eval", "--local", "--model", "m", "--model", "n"], "--model given 2 times (m, n)"),
        ] {
            let r = try Harness.local(arguments, timeout: 30)
            #expect(r.status == 64 && r.output.contains(expected + ": it takes one value"), "\(arguments): \(r.output)")
        }
        #expect(!FileManager.default.fileExists(atPath: "a") && !FileManager.default.fileExists(atPath: "b"))
    }

    /// A run directory that cannot be one: the reason in words, not Foundation's error domain and code.
    @Test func aRunDirectoryThatIsAFileOrUnderOne() throws {
        let data = try SyntheticData(samples: 32)
        defer { data.remove() }
        let file = TemporaryFiles.path("not-a-directory-")
        try Data("x".utf8).write(to: file)
        defer { try? FileManager.default.removeItem(at: file) }
        for (runDirectory, reason) in [(file.path, "it exists and is not a directory"),
                                       (file.path + "/runs/a", "cannot create it: \(file.path) is not a directory")] {
            let r = try Harness.mpirun(2, ["train", "--run-dir", runDirectory, "--set", "training.batch_size=8"] + data.arguments,
                                       timeout: 60)
            #expect(r.status != 0)
            #expect(r.output.contains("run directory \(runDirectory): \(reason)"), "\(r.output)")
            #expect(!r.output.contains("NSCocoaErrorDomain"), "\(r.output)")
            #expect(r.seconds < 30)
        }
        let check = try Harness.local(["gradcheck", "--local", "--run-dir", file.path] + data.arguments)
        #expect(check.status != 0 && check.output.contains("it exists and is not a directory"), "\(check.output)")
    }

    /// A large .npy file cut short, mapped (the default) and read: the error comes from its header, before anything of
    /// its size is read. Before, a mapped set that failed its header check was read whole (3 GB, then the error, or a
    /// crash in the allocator under a memory limit: here `ulimit -v` of 2 GiB for a sparse file of 3 GB).
    @Test func aLargeTruncatedNPYFileIsAnErrorBeforeItIsRead() throws {
        let directory = TemporaryFiles.path("big-npy-")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        let made = try Harness.run("/usr/bin/env", ["python3", "-c", """
            import numpy as np, os
            a = np.lib.format.open_memmap("\(directory.path)/x.npy", "w+", "<f4", (1000000, 784)); del a
            os.truncate("\(directory.path)/x.npy", os.path.getsize("\(directory.path)/x.npy") - 4)
            np.save("\(directory.path)/y.npy", np.zeros(1000000, np.uint8))
            """], environment: [:], timeout: 60)
        try #require(made.status == 0, "\(made.output)")
        for mmap in ["true", "false"] {
            let command = [Harness.executable.path, "train", "--local", "--run-dir", temporaryRunDirectory(), "--set", "data.format=npy",
                           "--set", "data.train_features=\(directory.path)/x.npy", "--set", "data.train_labels=\(directory.path)/y.npy",
                           "--set", "data.mmap=\(mmap)"]
            let quoted = command.map { "'\($0)'" }.joined(separator: " ")
            let r = try Harness.run("/bin/sh", ["-c", "ulimit -v 2097152 && exec \(quoted)"], environment: [:], timeout: 60)
            #expect(r.status == 1, "data.mmap=\(mmap): \(r.output)")
            #expect(r.output.contains("\(directory.path)/x.npy: ") && r.output.contains("3136000000"), "data.mmap=\(mmap): \(r.output)")
            #expect(!r.output.contains("Fatal error") && !r.output.contains("allocate"), "data.mmap=\(mmap): \(r.output)")
        }
    }

    /// A model file is read whole by `eval --model` and `predict`: one larger than the memory there is for it is
    /// refused, naming the file and the limit, before a byte of it is read (under a cgroup, the OOM killer ended the
    /// reading rank half-way with no message). Here a sparse file of 3 GB under `ulimit -v` of 2 GiB.
    @Test func aModelFileLargerThanMemoryIsRefusedBeforeItIsRead() throws {
        let directory = TemporaryFiles.path("big-model-")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        let file = directory.path + "/model.safetensors"
        try #require(FileManager.default.createFile(atPath: file, contents: nil))
        try #require(truncate(file, 3_000_000_000) == 0)
        for command in [["eval", "--local", "--run-dir", temporaryRunDirectory(), "--model", file],
                        ["predict", "--model", file, directory.path + "/x.npy"]] {
            let quoted = ([Harness.executable.path] + command).map { "'\($0)'" }.joined(separator: " ")
            let r = try Harness.run("/bin/sh", ["-c", "ulimit -v 2097152 && exec \(quoted)"], environment: [:], timeout: 60)
            #expect(r.status != 0, "\(command[0]): \(r.output)")
            #expect(r.output.contains("\(file): the file is read whole into memory (2.79 GiB), but ulimit -v allows 2.00 GiB"),
                    "\(command[0]): \(r.output)")
        }
    }

    /// `model.activation` takes an element-wise nonlinearity only: `linear 3` built Linear(12, 8), Linear(8, 3), ... and
    /// trained it without a word, and batchnorm, flatten or dropout were taken as well.
    @Test func anActivationThatIsAnotherLayerIsRefused() throws {
        for entry in ["linear 3", "batchnorm", "flatten", "dropout 0.1"] {
            try expectCleanFailure(["--set", "model.hidden=[8]", "--set", "model.activation=\(entry)"],
                                   message: "model.activation: '\(entry)' is not an activation (relu, leaky_relu, tanh, sigmoid, gelu, "
                                       + "silu); other layers go in model.layers")
        }
    }

    /// An empty training set (read into memory) is named as such, not as a test label out of range for 0 classes.
    @Test func anEmptyTrainingSetIsNamed() throws {
        let directory = TemporaryFiles.path("empty-train-")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        let made = try Harness.run("/usr/bin/env", ["python3", "-c", """
            import numpy as np
            np.save("\(directory.path)/x0.npy", np.zeros((0, 8), np.float32)); np.save("\(directory.path)/y0.npy", np.zeros(0, np.int64))
            np.save("\(directory.path)/x.npy", np.zeros((4, 8), np.float32)); np.save("\(directory.path)/y.npy", np.arange(4) % 2)
            """], environment: [:], timeout: 60)
        try #require(made.status == 0, "\(made.output)")
        for mmap in ["false", "true"] {
            try expectCleanFailure(["--set", "data.format=npy", "--set", "data.mmap=\(mmap)",
                                    "--set", "data.train_features=\(directory.path)/x0.npy", "--set", "data.train_labels=\(directory.path)/y0.npy",
                                    "--set", "data.test_features=\(directory.path)/x.npy", "--set", "data.test_labels=\(directory.path)/y.npy"],
                                   message: "\(directory.path)/x0.npy: ")
        }
    }

    /// Relative run directories with a one-character part, new or under a new parent: Foundation's
    /// `deletingLastPathComponent` trapped on them (exit 132 on every rank) while the parents were looked for.
    @Test func aRelativeRunDirectoryOfOneCharacter() throws {
        let data = try SyntheticData(samples: 32)
        defer { data.remove() }
        let base = TemporaryFiles.path("relative-")
        try FileManager.default.createDirectory(at: base, withIntermediateDirectories: true)
        for runDirectory in ["a", "r/x", "b/", "c/de"] {
            let command = [Harness.executable.path, "train", "--local", "--run-dir", runDirectory, "--set", "training.epochs=1",
                           "--set", "training.batch_size=8"] + data.arguments
            let quoted = command.map { "'\($0)'" }.joined(separator: " ")
            let r = try Harness.run("/bin/sh", ["-c", "cd '\(base.path)' && exec \(quoted)"], environment: [:], timeout: 60)
            #expect(r.status == 0, "--run-dir \(runDirectory): \(r.output)")
            #expect(FileManager.default.fileExists(atPath: base.appendingPathComponent(runDirectory).path + "/model.safetensors"))
        }
    }

    /// A configuration from a pipe (`-c <(...)`, `-c /dev/stdin`) is read as a file is: it was refused with an
    /// unrelated errno ("Inappropriate ioctl for device").
    @Test func aConfigurationFromAPipeIsRead() throws {
        let data = try SyntheticData(samples: 64)
        defer { data.remove() }
        let command = [Harness.executable.path, "train", "--local", "--run-dir", temporaryRunDirectory(), "-c", "/dev/stdin"] + data.arguments
        let quoted = command.map { "'\($0)'" }.joined(separator: " ")
        let r = try Harness.run("/bin/sh", ["-c", "printf 'training:\\n  epochs: 1\\nmodel:\\n  hidden: [8]\\n' | exec \(quoted)"],
                                environment: [:], timeout: 60)
        #expect(r.status == 0 && r.output.contains("training finished") && r.output.contains("hidden: [8]"), "\(r.output)")
    }

    @Test func batchSizeZero() throws {
        try expectCleanFailure(["--set", "training.batch_size=0"], message: "training.batch_size must be at least 1")
    }

    @Test func moreRanksThanSamples() throws {
        let data = try SyntheticData(samples: 3)
        defer { data.remove() }
        try expectCleanFailure(data.arguments, ranks: 4, message: "the data set has 3 samples but the job has 4 ranks")
    }

    @Test func ranksWithDifferentModelsRefuseToStart() throws {
        // MPMD launch: rank 0 and rank 1 get different hidden widths, as a mismatched config would.
        let args = ["train", "--run-dir", temporaryRunDirectory(), "--set", "training.epochs=1"]
        let r = try Harness.run(
            Harness.mpirunPath(),
            ["--allow-run-as-root", "--oversubscribe", "-n", "1", Harness.executable.path] + args + ["--set", "model.hidden=[64]"]
                + [":", "-n", "1", Harness.executable.path] + args + ["--set", "model.hidden=[63]"],
            environment: [:], timeout: 60)
        #expect(r.status != 0)
        // Named by the settings every rank must share, before any model is built.
        #expect(r.output.contains("rank 1's settings differ from rank 0's, and every rank must train with the same: model.hidden is [63] "
                                  + "here, [64] on rank 0"), "\(r.output)")
        #expect(r.seconds < 30)
        // With the same settings, models can still differ where a rank reads its own data (a key each rank may set):
        // 6x6 images on rank 0, 4x9 on rank 1, the same values per sample, make other convolution outputs. The
        // replicas' layouts are compared before the first step.
        let square = try SyntheticData(samples: 64, features: 36, imageShape: [6, 6])
        let wide = try SyntheticData(samples: 64, features: 36, imageShape: [4, 9])
        defer { square.remove(); wide.remove() }
        let cnn = ["--set", "model.layers=[conv 4 3, relu, flatten]"]
        let shapes = try Harness.run(
            Harness.mpirunPath(),
            ["--allow-run-as-root", "--oversubscribe", "-n", "1", Harness.executable.path] + args + cnn + square.arguments
                + [":", "-n", "1", Harness.executable.path] + args + cnn + wide.arguments,
            environment: [:], timeout: 60)
        #expect(shapes.status != 0 && shapes.seconds < 30, "\(shapes.output)")
        #expect(shapes.output.contains("ranks disagree on parameters"), "\(shapes.output)")

        // Other values under other names (each rank may name its own data): rank 1 trained on them, or measured its
        // accuracy on another test set, and the job ended 0 with a wrong model. The contents are compared.
        let other = try SyntheticData(samples: 64, features: 36, seed: 2), same = try SyntheticData(samples: 64, features: 36)
        let mine = try SyntheticData(samples: 64, features: 36)
        defer { other.remove(); same.remove(); mine.remove() }
        for (rank1, set, file) in [(other.arguments, "training", "train-x.idx"),
                                   (Array(mine.arguments.prefix(4)) + Array(other.arguments.suffix(4)), "test", "test-x.idx")] {
            let differ = try Harness.run(
                Harness.mpirunPath(),
                ["--allow-run-as-root", "--oversubscribe", "-n", "1", Harness.executable.path] + args + mine.arguments
                    + [":", "-n", "1", Harness.executable.path] + args + rank1,
                environment: [:], timeout: 60)
            #expect(differ.status != 0 && differ.seconds < 30, "\(differ.output)")
            #expect(differ.output.contains("ranks read different data: the \(set) set of rank 1 ("), "\(differ.output)")
            #expect(differ.output.contains(other.directory.appendingPathComponent(file).path), "\(differ.output)")
        }
        // The same values under other names train.
        let renamed = try Harness.run(
            Harness.mpirunPath(),
            ["--allow-run-as-root", "--oversubscribe", "-n", "1", Harness.executable.path] + args + mine.arguments
                + [":", "-n", "1", Harness.executable.path] + args + same.arguments,
            environment: [:], timeout: 60)
        #expect(renamed.status == 0, "\(renamed.output)")
    }

    @Test func impossibleSettings() throws {
        try expectCleanFailure(["--set", "model.dropout=1.5"], message: "model.dropout must be in [0, 1)")
        // A step so small that the rounding level swallows any error: at 1e-12 a gradient twice too large passed.
        try expectCleanFailure(["--set", "gradcheck.eps=1e-12"], message: "gradcheck.eps must be in [1e-8, 0.1], got 1e-12")
        try expectCleanFailure(["--set", "optimizer.momentum=2"], message: "momentum must be in [0, 1)")
        try expectCleanFailure(["--set", "model.label_smoothing=1"], message: "model.label_smoothing must be in [0, 1)")
        try expectCleanFailure(["--set", "data.augment.erase=1.5"], message: "data.augment.erase must be a probability in [0, 1]")
        try expectCleanFailure(["--set", "model.loss=mse", "--set", "model.label_smoothing=0.1"],
                               message: "model.label_smoothing applies to model.loss cross_entropy only, the loss is mse")
        // Numbers so large that a size computed from them would overflow: each crashed every rank before it was bounded.
        let huge = "9223372036854775807"
        for (key, message) in [("training.batch_size", "training.batch_size must be at most 16777216, got \(huge)"),
                               ("training.epochs", "training.epochs must be at most 16777216, got \(huge)"),
                               ("training.bucket_kib", "training.bucket_kib must be in 0...16777216 (0 = one fused allreduce), got \(huge)"),
                               ("training.blas_threads", "training.blas_threads must be in 0...1024 (0 = automatic), got \(huge)"),
                               ("timeline.steps", "timeline.steps must be in 0...16777216 (0 = off), got \(huge)")] {
            try expectCleanFailure(["--set", "\(key)=\(huge)"], message: message)
        }
        // A negative count used to mean "from the data", as 0 does, without a word.
        try expectCleanFailure(["--set", "model.classes=-3"], message: "model.classes must be >= 0 (0 = from the labels), got -3")
    }
}
