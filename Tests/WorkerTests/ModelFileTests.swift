import Engine
import Foundation
import Testing
@testable import Worker

/// Model files describe themselves: the metadata is checked against NumPy's own statistics of the data, bpworker
/// rebuilds the model from it alone, and NumPy and PyTorch (the real CPU wheel) applying it, the README's
/// snippets among them, reproduce `bpworker eval`'s correct count exactly.
@Suite("Model files", .serialized, .suiteFiles, .temporaryFiles)
struct ModelFileTests {
    static let fashion = "/usr/share/datasets/fashion-mnist"
    static let repository = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent()
    /// scripts/setup --python makes it: PyTorch's CPU build, NumPy and safetensors.
    static let torchPython = repository.appendingPathComponent(".venv-bench/bin/python").path

    /// The layers of the shared Fashion-MNIST run: ReLU, dropout and LeakyReLU, whose float32 results NumPy and
    /// PyTorch reproduce up to the order of GEMM sums.
    static let layers = ["linear 64", "relu", "dropout 0.1", "linear 32", "leaky_relu 0.2"]

    /// One real training run, shared: one epoch on Fashion-MNIST (about 6 s in a debug build). Its targets are
    /// label-smoothed, so `eval --model` reporting the run's own loss shows that the file carries the smoothing.
    static let fashionRun: (directory: String, result: Harness.Result?) = {
        let directory = TemporaryFiles.suitePath("bpworker-run-").path
        let result = try? Harness.local(["train", "--local", "--run-dir", directory, "--progress", "plain",
                                         "--set", "model.layers=[\(layers.joined(separator: ", "))]",
                                         "--set", "training.epochs=1", "--set", "training.batch_size=100",
                                         "--set", "model.label_smoothing=0.1",
                                         "--set", "logging.interval=600", "--set", "checkpoint.every_steps=0"], timeout: 300)
        return (directory, result)
    }()

    func trainedRun() throws -> String {
        let result = try #require(Self.fashionRun.result, "training did not run")
        try #require(result.status == 0, "\(result.output)")
        return Self.fashionRun.directory
    }

    func latestCheckpoint(_ run: String) throws -> String {
        run + "/checkpoints/" + (try String(contentsOfFile: run + "/checkpoints/latest", encoding: .utf8))
            .trimmingCharacters(in: .whitespacesAndNewlines)
    }

    /// Runs a Python script with `executable` (default: python3 on PATH) from `directory`.
    func python(_ script: String, executable: String = "python3", directory: String = FileManager.default.temporaryDirectory.path) throws -> String {
        let r = try Harness.run("/bin/sh", ["-c", "cd \"$0\" && exec \"$1\" -c \"$2\"", directory, executable, script],
                                environment: [:], timeout: 180)
        guard r.status == 0 else {
            throw DataError(path: executable, reason: "failed (scripts/setup --python installs NumPy, safetensors and .venv-bench):\n\(r.output)")
        }
        return r.output
    }

    /// The correct count and sample count of "accuracy 84.12% (8,412/10,000)", as bpworker eval and the Python
    /// scripts print it.
    func evalCount(_ output: String) throws -> (correct: Int, count: Int) {
        let range = try #require(output.range(of: #"accuracy [0-9.]+% \([0-9,]+/[0-9,]+\)"#, options: .regularExpression), "\(output)")
        let numbers = output[range].split(separator: "(")[1].dropLast().split(separator: "/")
            .map { Int($0.replacingOccurrences(of: ",", with: ""))! }
        return (numbers[0], numbers[1])
    }

    func pythonCount(_ output: String) throws -> (correct: Int, count: Int) { try evalCount(output) }

    /// "test accuracy 86.14% (8,614/10,000), loss 0.3852" from bpworker eval's output.
    func evalSummary(_ output: String) throws -> String {
        let range = try #require(output.range(of: #"test accuracy [0-9.]+% \([0-9,]+/[0-9,]+\), loss [0-9.]+"#, options: .regularExpression),
                                 "\(output)")
        return String(output[range])
    }

    func eval(_ arguments: [String]) throws -> Harness.Result {
        try Harness.local(["eval", "--local"] + arguments, timeout: 180)
    }

    // MARK: - Metadata

    @Test func metadataRecordsTheModelInputAndPreprocessing() throws {
        let run = try trainedRun()
        // NumPy's own statistics of the raw training bytes.
        let stats = try python("""
            import gzip, numpy as np
            x = np.frombuffer(gzip.open("\(Self.fashion)/train-images-idx3-ubyte.gz").read(), np.uint8, offset=16).astype(np.float64)
            print(repr(float(x.mean())), repr(float(x.std())))
            """).split(separator: " ").compactMap { Double($0.trimmingCharacters(in: .whitespacesAndNewlines)) }
        try #require(stats.count == 2)
        let (mean, std) = (stats[0], stats[1])
        for path in [run + "/model.safetensors", try latestCheckpoint(run)] {
            let m = try SafeTensorsFile(path: path).metadata
            let checkpoint = path.contains("/checkpoints/")
            #expect(m["format"] == (checkpoint ? "bpworker-checkpoint" : "bpworker-model"), "\(path)")
            #expect(m["format_version"] == "2")
            #expect(m["layers"] == #"["linear 64", "relu", "dropout 0.1", "linear 32", "leaky_relu 0.2", "linear 10"]"#)
            #expect(m["modules"] == #"[{"module": "Linear", "args": [784, 64], "kwargs": {}}, "#
                + #"{"module": "ReLU", "args": [], "kwargs": {}}, {"module": "Dropout", "args": [0.1], "kwargs": {}}, "#
                + #"{"module": "Linear", "args": [64, 32], "kwargs": {}}, {"module": "LeakyReLU", "args": [0.2], "kwargs": {}}, "#
                + #"{"module": "Linear", "args": [32, 10], "kwargs": {}}]"#)
            #expect(m["input_shape"] == "[28, 28]")
            #expect(m["model_input_shape"] == "[784]")
            #expect(m["input_dtype"] == "uint8")
            #expect(m["classes"] == "10")
            #expect(m["loss"] == "cross_entropy")
            #expect(m["label_smoothing"] == "0.1")
            #expect(m["preprocess"] == "standardize")
            let recordedMean = try #require(m["preprocess_mean"].flatMap(Double.init))
            let recordedStd = try #require(m["preprocess_std"].flatMap(Double.init))
            let scale = try #require(m["preprocess_scale"].flatMap(Double.init))
            let shift = try #require(m["preprocess_shift"].flatMap(Double.init))
            #expect(abs(recordedMean - mean) <= 1e-9 * mean, "mean \(recordedMean), NumPy \(mean)")
            #expect(abs(recordedStd - std) <= 1e-9 * std, "std \(recordedStd), NumPy \(std)")
            #expect(abs(scale * std - 1) <= 1e-9, "scale \(scale) is not 1/std")
            #expect(abs(shift + mean / std) <= 1e-9, "shift \(shift) is not -mean/std")
            // What other code reads is still there.
            #expect(m["model"] == "Linear(784, 64) ReLU Dropout(0.1) Linear(64, 32) LeakyReLU(0.2) Linear(32, 10) + cross_entropy "
                + "(label smoothing 0.1)")
            #expect(m["config"]?.contains("layers:") == true)
            if checkpoint {
                for key in ["position", "layout_hash", "optimizer", "optimizer_step", "step", "epoch"] {
                    #expect(m[key] != nil, "checkpoint metadata lacks \(key)")
                }
            }
        }
    }

    /// `label_smoothing` reads back into the model's loss, is absent from files of unsmoothed runs (0), and a bad
    /// value is one error naming the file and the key.
    @Test func labelSmoothingReadsBackAndABadValueIsRefused() throws {
        let path = try trainedRun() + "/model.safetensors"
        let metadata = try SafeTensorsFile(path: path).metadata
        #expect(try ModelDescription(metadata: metadata, path: path).spec.labelSmoothing == 0.1)
        var without = metadata
        without["label_smoothing"] = nil
        #expect(try ModelDescription(metadata: without, path: path).spec.labelSmoothing == 0)
        for bad in ["1.5", "-0.1", "x"] {
            var damaged = metadata
            damaged["label_smoothing"] = bad
            #expect(throws: DataError(path: path, reason: "metadata 'label_smoothing' is '\(bad)', not a number in [0, 1)")) {
                try ModelDescription(metadata: damaged, path: path)
            }
        }
    }

    /// Every layer kind, and the `scale` preprocessing, through the file and back: the recorded list is accepted
    /// verbatim by model.layers and by `eval --model`, and both evaluate exactly as the run's own configuration.
    @Test func everyLayerKindRoundTrips() throws {
        let data = try SyntheticData(samples: 600, features: 12, classes: 3)
        defer { data.remove() }
        let run = temporaryRunDirectory()
        let layers = "[linear 16, gelu, dropout 0.25, linear 16, tanh, linear 8, leaky_relu 0.05, linear 8, sigmoid]"
        let train = try Harness.local(["train", "--local", "--run-dir", run, "--progress", "plain", "--set", "model.layers=\(layers)",
                                       "--set", "data.normalize=scale", "--set", "training.epochs=5", "--set", "training.batch_size=20",
                                       "--set", "schedule.warmup_steps=10", "--set", "optimizer.lr=0.2"] + data.arguments)
        #expect(train.status == 0, "\(train.output)")
        let file = run + "/model.safetensors"
        let m = try SafeTensorsFile(path: file).metadata
        let recorded = #"["linear 16", "gelu", "dropout 0.25", "linear 16", "tanh", "linear 8", "leaky_relu 0.05", "linear 8", "sigmoid", "linear 3"]"#
        #expect(m["layers"] == recorded)
        #expect(m["input_shape"] == "[12]")
        #expect(m["classes"] == "3")
        #expect(m["preprocess"] == "scale")
        #expect(m["preprocess_scale"].flatMap(Double.init) == 1.0 / 255.0)
        #expect(m["preprocess_shift"].flatMap(Double.init) == 0)
        #expect(m["preprocess_mean"] == nil && m["preprocess_std"] == nil)

        let reference = try eval(["--run-dir", run])
        #expect(reference.status == 0, "\(reference.output)")
        let expected = try evalSummary(reference.output)
        // Built from the file alone, in a run directory with no configuration.
        let alone = try eval(["--run-dir", temporaryRunDirectory(), "--model", file] + data.arguments.suffix(4))
        #expect(alone.status == 0, "\(alone.output)")
        #expect(try evalSummary(alone.output) == expected)
        #expect(alone.output.contains("Linear(12, 16) GELU Dropout(0.25) Linear(16, 16) Tanh Linear(16, 8) LeakyReLU(0.05) Linear(8, 8) Sigmoid Linear(8, 3)"))
        // The recorded list without its output layer, given to model.layers as it is.
        let list = recorded.replacingOccurrences(of: #", "linear 3"]"#, with: "]")
        let configured = try eval(["--run-dir", run, "--parameters", file, "--set", "model.layers=\(list)"])
        #expect(configured.status == 0, "\(configured.output)")
        #expect(try evalSummary(configured.output) == expected)
        #expect(!configured.output.contains("warning"), "\(configured.output)")

        // NumPy applying the recorded preprocessing and layers (its own forward pass) gets the same count.
        let script = """
            import json, math, numpy as np
            from safetensors import safe_open
            with safe_open("\(file)", "np") as f:
                meta, t = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
            raw = open("\(data.directory.path)/test-x.idx", "rb").read()
            x = np.frombuffer(raw, np.uint8, offset=12).reshape(-1, 12).astype(np.float64)
            x = (x * float(meta["preprocess_scale"]) + float(meta["preprocess_shift"])).astype(np.float32)
            y = np.frombuffer(open("\(data.directory.path)/test-y.idx", "rb").read(), np.uint8, offset=8)
            erf = np.vectorize(math.erf, otypes=[np.float32])
            for i, (kind, *a) in enumerate(map(str.split, json.loads(meta["layers"]))):
                if kind == "linear": x = x @ t[f"{i}.weight"].T + t[f"{i}.bias"]
                elif kind == "gelu": x = x * (1 + erf(x / np.float32(math.sqrt(2)))) / 2
                elif kind == "tanh": x = np.tanh(x)
                elif kind == "sigmoid": x = 1 / (1 + np.exp(-x))
                elif kind == "leaky_relu": x = np.where(x > 0, x, np.float32(a[0]) * x)
            c = int((x.argmax(1) == y).sum())
            print(f"accuracy {c / len(y):.2%} ({c}/{len(y)})")
            """
        let ours = try evalCount(reference.output)
        #expect(try pythonCount(try python(script)) == ours)
        #expect(ours.correct > 400, "the synthetic classes are learnable")
    }

    // MARK: - eval --model

    @Test func evalModelMatchesEvalRunDir() throws {
        let run = try trainedRun()
        let reference = try eval(["--run-dir", run])
        #expect(reference.status == 0, "\(reference.output)")
        let expected = try evalSummary(reference.output)
        let elsewhere = temporaryRunDirectory()
        for (label, r) in [
            ("local", try eval(["--run-dir", elsewhere, "--model", run + "/model.safetensors"])),
            ("checkpoint", try eval(["--run-dir", elsewhere, "--model", try latestCheckpoint(run)])),
            ("mpirun -n 2", try Harness.mpirun(2, ["eval", "--run-dir", elsewhere, "--model", run + "/model.safetensors"])),
        ] {
            #expect(r.status == 0, "\(label): \(r.output)")
            #expect(try evalSummary(r.output) == expected, "\(label)")
            #expect(r.output.contains("preprocessing from the file: standardize"), "\(label): \(r.output)")
        }
        #expect(!FileManager.default.fileExists(atPath: elsewhere + "/config.yaml"), "eval writes no configuration")
        // A batch no memory holds is refused by the memory check, as `eval --run-dir` refuses it (it crashed allocating
        // the model, exit 132).
        let huge = try Harness.mpirun(2, ["eval", "--run-dir", elsewhere, "--model", run + "/model.safetensors",
                                          "--set", "training.batch_size=16777216"])
        #expect(huge.status == 1 && occurrences(of: "memory check: the model does not fit in memory", in: huge.output) == 1,
                "\(huge.output)")
    }

    @Test func evalModelTakesTestDataFromSet() throws {
        let run = try trainedRun()
        // The first 1,000 test samples as .npy (float64 would be the wrong type: uint8, as the model was trained).
        let directory = temporaryRunDirectory()
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        let count = try python("""
            import gzip, numpy as np
            x = np.frombuffer(gzip.open("\(Self.fashion)/t10k-images-idx3-ubyte.gz").read(), np.uint8, offset=16).reshape(-1, 784)
            y = np.frombuffer(gzip.open("\(Self.fashion)/t10k-labels-idx1-ubyte.gz").read(), np.uint8, offset=8)
            np.save("\(directory)/x.npy", x[:1000]); np.save("\(directory)/y.npy", y[:1000].astype(np.int64))
            np.save("\(directory)/xf.npy", x[:1000].astype(np.float32))
            np.save("\(directory)/x0.npy", x[:0]); np.save("\(directory)/y0.npy", y[:0].astype(np.int64))
            print(len(y[:1000]))
            """)
        #expect(count.hasPrefix("1000"))
        let set = ["--set", "data.format=npy", "--set", "data.test_labels=\(directory)/y.npy"]
        let r = try eval(["--run-dir", directory, "--model", run + "/model.safetensors", "--set", "data.test_features=\(directory)/x.npy"] + set)
        #expect(r.status == 0, "\(r.output)")
        #expect(try evalCount(r.output).count == 1000)
        let wrongType = try eval(["--run-dir", directory, "--model", run + "/model.safetensors", "--set", "data.test_features=\(directory)/xf.npy"] + set)
        #expect(wrongType.status == 1)
        #expect(wrongType.output.contains("\(directory)/xf.npy: holds floating-point values (float32, or float64 read as float32) but the model"), "\(wrongType.output)")
        // No samples: no accuracy (it printed "-nan% (0/0)" and exited 0).
        let empty = try eval(["--run-dir", directory, "--model", run + "/model.safetensors", "--set", "data.format=npy",
                              "--set", "data.test_features=\(directory)/x0.npy", "--set", "data.test_labels=\(directory)/y0.npy"])
        #expect(empty.status == 1 && empty.output.contains("\(directory)/x0.npy: holds no samples: there is nothing to evaluate"),
                "\(empty.output)")
    }

    // MARK: - predict

    @Test func predictProbabilitiesMatchEval() throws {
        let run = try trainedRun()
        let model = run + "/model.safetensors"
        let reference = try evalCount(try eval(["--run-dir", run]).output)
        let output = run + "/probabilities.npy"
        let r = try Harness.local(["predict", "--model", model, Self.fashion + "/t10k-images-idx3-ubyte.gz", "--output", output])
        #expect(r.status == 0, "\(r.output)")
        // NumPy reads the file and checks it: shape, dtype, rows summing to 1, and argmax against the labels.
        let counted = try python("""
            import gzip, numpy as np
            p = np.load("\(output)")
            assert p.shape == (10000, 10) and p.dtype == np.float32, (p.shape, p.dtype)
            assert np.all(p >= 0) and np.abs(p.sum(1) - 1).max() < 1e-5, np.abs(p.sum(1) - 1).max()
            y = np.frombuffer(gzip.open("\(Self.fashion)/t10k-labels-idx1-ubyte.gz").read(), np.uint8, offset=8)
            c = int((p.argmax(1) == y).sum())
            print(f"accuracy {c / len(y):.2%} ({c}/{len(y)})")
            np.save("\(run)/five.npy", np.frombuffer(gzip.open("\(Self.fashion)/t10k-images-idx3-ubyte.gz").read(), np.uint8, offset=16).reshape(-1, 28, 28)[:5])
            print(" ".join(f"{i}:{k}:{p[i, k]:.4f}" for i in range(5) for k in np.argsort(-p[i], kind="stable")[:2]))
            """)
        #expect(try pythonCount(counted) == reference)

        // --top: the same classes and probabilities, printed, for five samples given as .npy.
        let top = try Harness.local(["predict", "--model", model, run + "/five.npy", "--top", "2"])
        #expect(top.status == 0, "\(top.output)")
        let expected = try #require(counted.split(separator: "\n").last).split(separator: " ")
        let lines = top.output.split(separator: "\n").filter { $0.first?.isNumber == true }
        #expect(lines.count == 5, "\(top.output)")
        for (i, line) in lines.enumerated() {
            let printed = "\(i): " + expected[(2 * i)..<(2 * i + 2)].map { $0.split(separator: ":").dropFirst().joined(separator: " ") }
                .joined(separator: ", ")
            #expect(String(line) == printed)
        }
    }

    @Test func predictRejectsBadInputWithOneClearError() throws {
        let run = try trainedRun()
        let model = run + "/model.safetensors"
        let directory = temporaryRunDirectory()
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        _ = try python("""
            import numpy as np
            from safetensors.numpy import save_file
            np.save("\(directory)/wrong-shape.npy", np.zeros((3, 27, 29), np.uint8))
            np.save("\(directory)/floats.npy", np.zeros((3, 28, 28), np.float32))
            np.save("\(directory)/one.npy", np.zeros((28, 28), np.uint8))
            np.save("\(directory)/good.npy", np.zeros((3, 28, 28), np.uint8))
            np.save("\(directory)/channel.npy", np.zeros((3, 1, 28, 28), np.uint8))
            save_file({"0.weight": np.zeros((10, 784), np.float32), "0.bias": np.zeros(10, np.float32)}, "\(directory)/foreign.safetensors")
            """)
        let bytes = try Data(contentsOf: URL(fileURLWithPath: model))
        try bytes.prefix(bytes.count / 2).write(to: URL(fileURLWithPath: directory + "/truncated.safetensors"))
        let good = directory + "/good.npy"
        let cases: [(model: String, input: String, named: String, reason: String)] = [
            (model, directory + "/wrong-shape.npy", directory + "/wrong-shape.npy", "samples are shaped [27, 29] (783 values) but the model in \(model) takes [28, 28] (784 values)"),
            (model, directory + "/floats.npy", directory + "/floats.npy", "holds floating-point values (float32, or float64 read as float32) but the model in \(model) was trained on raw bytes 0..255 (uint8)"),
            (model, directory + "/one.npy", directory + "/one.npy", "add a leading dimension: shape [1, 28, 28]"),
            (model, run + "/config.yaml", run + "/config.yaml", "not an IDX file"),
            (directory + "/foreign.safetensors", good, directory + "/foreign.safetensors", "not a bpworker model file"),
            (directory + "/truncated.safetensors", good, directory + "/truncated.safetensors", "not a valid safetensors file"),
            (run + "/config.yaml", good, run + "/config.yaml", "not a valid safetensors file"),
        ]
        for c in cases {
            let r = try Harness.local(["predict", "--model", c.model, c.input])
            #expect(r.status == 1, "\(c.input): \(r.output)")
            let lines = r.output.split(separator: "\n")
            #expect(lines.count == 1, "one line: \(r.output)")
            #expect(r.output.hasPrefix("bpworker predict: error: \(c.named): "), "\(r.output)")
            #expect(r.output.contains(c.reason), "\(r.output)")
        }
        // The good input does work, so the errors above are about the input.
        #expect(try Harness.local(["predict", "--model", model, good]).status == 0)
        // Images with their one channel written out, as the model file's model_input_shape gives them, are the same samples.
        let channel = try Harness.local(["predict", "--model", model, directory + "/channel.npy"])
        #expect(channel.status == 0, "\(channel.output)")
    }

    // MARK: - Old files

    @Test func oldModelFileWarnsAndStillEvaluates() throws {
        let run = try trainedRun()
        let old = run + "/old.safetensors"
        // A version 1 model file: the same tensors, the metadata bpworker wrote before files described themselves.
        _ = try python("""
            from safetensors import safe_open
            from safetensors.numpy import save_file
            with safe_open("\(run)/model.safetensors", "np") as f:
                meta, t = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
            save_file(t, "\(old)", metadata={"format": "bpworker-model", "format_version": "1", "step": meta["step"],
                                              "world_size": meta["world_size"], "model": meta["model"], "config": meta["config"]})
            """)
        let current = try eval(["--run-dir", run])
        let r = try eval(["--run-dir", run, "--parameters", old])
        #expect(r.status == 0, "\(r.output)")
        #expect(r.output.contains("warning: \(old) records no preprocessing, layer list or input shape (bpworker-model format_version 1): assuming the configuration's data.normalize=standardize"), "\(r.output)")
        #expect(try evalCount(r.output) == evalCount(current.output))
        #expect(!current.output.contains("warning"), "\(current.output)")

        for arguments in [["eval", "--local", "--run-dir", temporaryRunDirectory(), "--model", old], ["predict", "--model", old, run + "/model.safetensors"]] {
            let refused = try Harness.local(arguments)
            #expect(refused.status == 1, "\(refused.output)")
            #expect(refused.output.contains("\(old): no layer list in its metadata (bpworker-model format_version 1"), "\(refused.output)")
            #expect(refused.output.contains("bpworker eval --run-dir RUN_DIR --parameters \(old)"), "\(refused.output)")
        }
    }

    // MARK: - Python

    /// The README's snippets, extracted between their markers and run as they stand (from a directory holding
    /// runs/default/model.safetensors), with NumPy and with the real PyTorch CPU wheel.
    @Test func readmeSnippetsReproduceEvalExactly() throws {
        let run = try trainedRun()
        let readme = try String(contentsOf: Self.repository.appendingPathComponent("docs/model-files.md"), encoding: .utf8)
        let reference = try evalCount(try eval(["--run-dir", run]).output)
        let directory = temporaryRunDirectory()
        try FileManager.default.createDirectory(atPath: directory + "/runs/default", withIntermediateDirectories: true)
        try FileManager.default.createSymbolicLink(atPath: directory + "/runs/default/model.safetensors", withDestinationPath: run + "/model.safetensors")
        for (name, python) in [("numpy", "python3"), ("torch", Self.torchPython)] {
            let snippet = try #require(Self.snippet(name, in: readme), "README.md has no <!-- snippet: \(name) --> block")
            let output = try self.python(snippet, executable: python, directory: directory)
            #expect(try pythonCount(output) == reference, "\(name): \(output)")
        }
    }

    /// The code of the ```python block between `<!-- snippet: NAME -->` and `<!-- /snippet -->`.
    static func snippet(_ name: String, in readme: String) -> String? {
        guard let start = readme.range(of: "<!-- snippet: \(name) -->\n```python\n"),
              let end = readme.range(of: "```\n<!-- /snippet -->", range: start.upperBound..<readme.endIndex) else { return nil }
        return String(readme[start.upperBound..<end.lowerBound])
    }

    /// NumPy and PyTorch applying the recorded preprocessing in its other form, (raw - mean) / std, to the raw bytes
    /// (written here, not taken from the README) reproduce the count exactly, from the model file and from a checkpoint.
    @Test func numpyAndTorchApplyingTheRecordedStatisticsReproduceEval() throws {
        let run = try trainedRun()
        let reference = try evalCount(try eval(["--run-dir", run]).output)
        for file in [run + "/model.safetensors", try latestCheckpoint(run)] {
            let script = """
                import gzip, json, numpy as np, torch
                from safetensors import safe_open
                with safe_open("\(file)", "np") as f:
                    meta, t = f.metadata(), {k: f.get_tensor(k) for k in f.keys() if not k.startswith("optimizer.")}
                raw = np.frombuffer(gzip.open("\(Self.fashion)/t10k-images-idx3-ubyte.gz").read(), np.uint8, offset=16)
                x = ((raw.reshape(-1, 784).astype(np.float64) - float(meta["preprocess_mean"])) / float(meta["preprocess_std"])).astype(np.float32)
                y = np.frombuffer(gzip.open("\(Self.fashion)/t10k-labels-idx1-ubyte.gz").read(), np.uint8, offset=8)
                def count(forward):
                    c = int((forward(x).argmax(1) == y).sum())
                    print(f"accuracy {c / len(y):.2%} ({c}/{len(y)})")
                def numpy_forward(v):
                    v = np.maximum(v @ t["0.weight"].T + t["0.bias"], 0)
                    v = v @ t["3.weight"].T + t["3.bias"]
                    v = np.where(v > 0, v, np.float32(0.2) * v)
                    return v @ t["5.weight"].T + t["5.bias"]
                model = torch.nn.Sequential(torch.nn.Linear(784, 64), torch.nn.ReLU(), torch.nn.Dropout(0.1), torch.nn.Linear(64, 32),
                                            torch.nn.LeakyReLU(0.2), torch.nn.Linear(32, 10)).eval()
                model.load_state_dict({k: torch.from_numpy(v) for k, v in t.items()})
                count(numpy_forward)
                with torch.no_grad():
                    count(lambda v: model(torch.from_numpy(v)).numpy())
                """
            let lines = try python(script, executable: Self.torchPython).split(separator: "\n").filter { $0.hasPrefix("accuracy") }
            #expect(lines.count == 2)
            for line in lines { #expect(try pythonCount(String(line)) == reference, "\(file): \(line)") }
        }
    }

    /// Lists in the metadata are JSON whatever the names hold: quotes and backslashes are escaped, so Python's json
    /// (through the safetensors package) and bpworker's reader both read back the names written.
    @Test func metadataListsEscapeQuotesAndBackslashes() throws {
        let names = [#"linear "8""#, #"back\slash"#, #"both \" and \\"#, "tab\tnew\nline"]
        let list = ModelDescription.jsonList(names)
        #expect(ModelDescription.jsonList([28, 28]) == "[28, 28]", "spaced as the files have always been")
        #expect(try ModelDescription.stringList(list, key: "layers", path: "test") == names)
        var writer = SafeTensorsWriter()
        writer.add(name: "step", shape: [1], int64s: [1])
        writer.metadata = ["layers": list]
        let path = TemporaryFiles.path("escaped-").appendingPathExtension("safetensors").path
        try writer.serialized().write(to: URL(fileURLWithPath: path))
        let output = try python("""
            import json
            from safetensors import safe_open
            with safe_open("\(path)", "np") as f:
                print(json.dumps(json.loads(f.metadata()["layers"])))
            """)
        let line = try #require(output.split(separator: "\n").last)
        #expect(try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String] == names)
    }
}
