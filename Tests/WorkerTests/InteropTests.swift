import Engine
import Foundation
import Testing

/// Checkpoints are read and written by the real Python clients (safetensors, NumPy), on the real data set.
@Suite("Python interoperability", .serialized, .temporaryFiles)
struct InteropTests {
    static let fashion = "/usr/share/datasets/fashion-mnist"

    func python(_ script: String) throws -> String {
        let r = try Harness.run("/usr/bin/env", ["python3", "-c", script], environment: [:], timeout: 120)
        guard r.status == 0 else {
            throw DataError(path: "python3", reason: "failed (scripts/setup --python installs numpy and safetensors):\n\(r.output)")
        }
        return r.output
    }

    /// A NumPy forward pass of the MLP in `file` over the Fashion-MNIST test set, normalised with the training
    /// set's statistics exactly as bpworker's default `data.normalize=standardize`; prints the correct count.
    func numpyCorrect(_ file: String) throws -> Int {
        let out = try python("""
            import gzip, numpy as np
            from safetensors.numpy import load_file
            def images(name):
                raw = gzip.open("\(Self.fashion)/" + name).read()
                return np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 784)
            train = images("train-images-idx3-ubyte.gz").astype(np.float64) / 255
            mean, std = train.mean(), train.std()
            x = ((images("t10k-images-idx3-ubyte.gz") / 255 - mean) / std).astype(np.float32)
            y = np.frombuffer(gzip.open("\(Self.fashion)/t10k-labels-idx1-ubyte.gz").read(), np.uint8, offset=8)
            t = load_file("\(file)")
            layers = sorted({int(k.split(".")[0]) for k in t if not k.startswith("optimizer.")})
            for i, layer in enumerate(layers):
                x = x @ t[f"{layer}.weight"].T + t[f"{layer}.bias"]
                if i + 1 < len(layers): x = np.maximum(x, 0)
            print(int((x.argmax(1) == y).sum()))
            """)
        return try #require(Int(out.trimmingCharacters(in: .whitespacesAndNewlines)))
    }

    /// The correct count bpworker eval reports: "test accuracy 84.12% (8,412/10,000)".
    func bpworkerCorrect(_ output: String) throws -> Int {
        let range = try #require(output.range(of: #"\(([0-9,]+)/10,000\)"#, options: .regularExpression))
        return try #require(Int(output[range].dropFirst().prefix { $0 != "/" }.replacingOccurrences(of: ",", with: "")))
    }

    @Test func numpyReproducesBpworkersAccuracyFromACheckpoint() throws {
        let run = temporaryRunDirectory()
        let train = try Harness.local(["train", "--local", "--run-dir", run, "--progress", "plain",
                                       "--set", "model.hidden=[32]", "--set", "training.epochs=1", "--set", "training.batch_size=100",
                                       "--set", "logging.interval=200", "--set", "checkpoint.every_steps=0"], timeout: 300)
        #expect(train.status == 0, "\(train.output)")
        let latest = try String(contentsOfFile: run + "/checkpoints/latest", encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines)
        let checkpoint = run + "/checkpoints/" + latest
        let eval = try Harness.local(["eval", "--local", "--run-dir", run, "--parameters", checkpoint], timeout: 120)
        #expect(eval.status == 0, "\(eval.output)")
        let ours = try bpworkerCorrect(eval.output)
        #expect(ours > 8000, "one epoch reaches over 80%")
        // float32 sums in another order may flip an argmax that is a near tie: allow one sample in 10,000.
        #expect(abs(try numpyCorrect(checkpoint) - ours) <= 1)
    }

    @Test func bpworkerEvaluatesParametersWrittenByPython() throws {
        let run = temporaryRunDirectory()
        try FileManager.default.createDirectory(atPath: run, withIntermediateDirectories: true)
        let file = run + "/from-python.safetensors"
        // Least-squares weights of a linear classifier on standardised pixels: far better than chance, made
        // entirely in NumPy.
        _ = try python("""
            import gzip, numpy as np
            from safetensors.numpy import save_file
            raw = gzip.open("\(Self.fashion)/train-images-idx3-ubyte.gz").read()
            x = np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 784)[:20000].astype(np.float64) / 255
            full = np.frombuffer(raw, np.uint8, offset=16).astype(np.float64) / 255
            x = (x - full.mean()) / full.std()
            y = np.frombuffer(gzip.open("\(Self.fashion)/train-labels-idx1-ubyte.gz").read(), np.uint8, offset=8)[:20000]
            targets = np.eye(10)[y]
            a = np.hstack([x, np.ones((len(x), 1))])
            w = np.linalg.solve(a.T @ a + 1e-1 * np.eye(785), a.T @ targets)
            save_file({"0.weight": np.ascontiguousarray(w[:784].T).astype(np.float32),
                       "0.bias": w[784].astype(np.float32)}, "\(file)", metadata={"made_by": "numpy"})
            """)
        let eval = try Harness.local(["eval", "--local", "--run-dir", run, "--parameters", file, "--set", "model.hidden=[]"])
        #expect(eval.status == 0, "\(eval.output)")
        let ours = try bpworkerCorrect(eval.output)
        #expect(ours > 7500)
        #expect(abs(try numpyCorrect(file) - ours) <= 1)
    }
}
