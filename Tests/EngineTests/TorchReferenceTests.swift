import Engine
import Foundation
import Testing

/// Every layer kind against real PyTorch (the CPU wheel in .venv-bench), as llm.c checks itself against PyTorch
/// state dumps: each case's model is built here with a seed and run on a random batch; its parameters, buffers and
/// batches go to one safetensors file; one Python process rebuilds every case as a `torch.nn.Sequential` of
/// PyTorch's own modules in float64, loads the state with `load_state_dict(strict=True)` (which proves the tensor
/// names and shapes are PyTorch's), repeats the same SGD steps and the compared pass, and writes its logits, loss,
/// parameter gradients and buffers back. Nothing of the Engine runs on the Python side. Each module is the one its
/// kind declares (`LayerKind.torchModule`), built as the README's loader builds a model file's `modules`, so the
/// comparison also checks what model files tell PyTorch.
///
/// Differences are per tensor: the largest absolute difference over the largest absolute reference value.
@Suite("PyTorch reference")
struct TorchReferenceTests {
    static let repository = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent()
    /// scripts/setup --python makes it: PyTorch's CPU build, NumPy and safetensors.
    static let torchPython = repository.appendingPathComponent(".venv-bench/bin/python").path

    /// One model, the SGD steps in training mode that come before the compared pass, and that pass.
    struct Case: Sendable {
        let name: String
        let spec: ModelSpec
        /// The compared pass: `.train` (batch norm normalises with the batch and updates its running statistics) or
        /// `.eval` (batch norm uses the running statistics, dropout is off).
        let mode: ForwardMode
        /// Training steps (forward in `.train`, backward, SGD) before the compared pass: they move batch norm's
        /// running statistics away from 0 and 1. Only for models without dropout, whose masks PyTorch cannot draw.
        var steps = 0
        var rows = 4
        /// Run as Model<Float> (against the same float64 reference) instead of Model<Double>.
        var float = false
    }

    static func conv(_ i: Int, _ o: Int, _ k: Int, stride: Int = 1, pad: Int = 0, bias: Bool = true) -> LayerSpec {
        .conv2d(inChannels: i, outChannels: o, kernel: k, stride: stride, padding: pad, bias: bias)
    }

    /// Every layer kind and option. Two things are avoided on purpose: a bias right before a normalisation that
    /// removes it (its gradient is zero, so the comparison would say nothing; `expectNonTrivial` guards this), and
    /// dropout before a training pass (PyTorch cannot draw the Engine's masks).
    static let cases: [Case] = [
        Case(name: "conv stride 1 padding 0 bias, ReLU",
             spec: ModelSpec(layers: [conv(2, 3, 3), .relu, .flatten, .linear(inputs: 48, outputs: 4)], inputShape: [2, 6, 6]),
             mode: .eval),
        Case(name: "conv stride 2 padding 1 no bias, LeakyReLU",
             spec: ModelSpec(layers: [conv(2, 4, 3, stride: 2, pad: 1, bias: false), .leakyReLU(slope: 0.1), .flatten,
                                      .linear(inputs: 64, outputs: 3)], inputShape: [2, 7, 7]),
             mode: .eval),
        Case(name: "conv stride 2 padding 2, conv 2x2 padding 1 no bias, tanh, sigmoid, MSE",
             spec: ModelSpec(layers: [conv(3, 4, 3, stride: 2, pad: 2), .tanh, conv(4, 2, 2, pad: 1, bias: false), .sigmoid,
                                      .flatten, .linear(inputs: 50, outputs: 5)],
                             loss: .meanSquaredError, inputShape: [3, 6, 6]),
             mode: .eval),
        Case(name: "max pool 3 stride 2",
             spec: ModelSpec(layers: [conv(2, 3, 3, pad: 1), .tanh, .maxPool2d(kernel: 3, stride: 2), .flatten,
                                      .linear(inputs: 27, outputs: 4)], inputShape: [2, 7, 7]),
             mode: .eval),
        Case(name: "avg pool 2 stride 3, max pool 2 stride 1, MSE",
             spec: ModelSpec(layers: [conv(2, 3, 3, pad: 1), .sigmoid, .avgPool2d(kernel: 2, stride: 3),
                                      .maxPool2d(kernel: 2, stride: 1), .flatten, .linear(inputs: 12, outputs: 4)],
                             loss: .meanSquaredError, inputShape: [2, 8, 8]),
             mode: .eval),
        Case(name: "avg pool 3 stride 2, global avg pool, GELU",
             spec: ModelSpec(layers: [conv(2, 4, 3), .gelu, .avgPool2d(kernel: 3, stride: 2), .globalAvgPool2d, .flatten,
                                      .linear(inputs: 4, outputs: 3)], inputShape: [2, 9, 9]),
             mode: .eval),
        Case(name: "batch norm 2d, training",
             spec: ModelSpec(layers: [conv(2, 3, 3, pad: 1, bias: false), .batchNorm(features: 3), .relu, .flatten,
                                      .linear(inputs: 108, outputs: 4)], inputShape: [2, 6, 6]),
             mode: .train),
        Case(name: "batch norm 1d, training (third step), MSE",
             spec: ModelSpec(layers: [.linear(inputs: 8, outputs: 6), .relu, .batchNorm(features: 6),
                                      .linear(inputs: 6, outputs: 3)], loss: .meanSquaredError, inputShape: [8]),
             mode: .train, steps: 2, rows: 5),
        Case(name: "batch norm 2d, evaluation after 4 steps",
             spec: ModelSpec(layers: [conv(1, 4, 3, pad: 1, bias: false), .batchNorm(features: 4), .relu,
                                      .maxPool2d(kernel: 2, stride: 2), conv(4, 6, 3, pad: 1, bias: false),
                                      .batchNorm(features: 6), .tanh, .globalAvgPool2d, .flatten,
                                      .linear(inputs: 6, outputs: 3)], inputShape: [1, 8, 8]),
             mode: .eval, steps: 4, rows: 6),
        Case(name: "batch norm 1d first, evaluation after 4 steps, MSE",
             spec: ModelSpec(layers: [.batchNorm(features: 8), .linear(inputs: 8, outputs: 6), .tanh, .batchNorm(features: 6),
                                      .linear(inputs: 6, outputs: 3)], loss: .meanSquaredError, inputShape: [8]),
             mode: .eval, steps: 4, rows: 6),
        Case(name: "layer norm over features, GELU, dropout",
             spec: ModelSpec(layers: [.linear(inputs: 10, outputs: 8), .layerNorm(features: 8), .gelu,
                                      .dropout(probability: 0.25), .linear(inputs: 8, outputs: 3)], inputShape: [10]),
             mode: .eval),
        Case(name: "SiLU on images and on features, MSE",
             spec: ModelSpec(layers: [conv(2, 3, 3, pad: 1), .silu, .flatten, .linear(inputs: 108, outputs: 6), .silu,
                                      .linear(inputs: 6, outputs: 3)], loss: .meanSquaredError, inputShape: [2, 6, 6]),
             mode: .train, steps: 2),
        Case(name: "channel dropout, evaluation",
             spec: ModelSpec(layers: [conv(2, 3, 3, pad: 1), .relu, .dropout2d(probability: 0.3), .flatten,
                                      .linear(inputs: 108, outputs: 4)], inputShape: [2, 6, 6]),
             mode: .eval),
        Case(name: "layer norm over images",
             spec: ModelSpec(layers: [conv(2, 3, 3, pad: 1), .tanh, .layerNorm(features: 6), .flatten,
                                      .linear(inputs: 108, outputs: 3)], inputShape: [2, 6, 6]),
             mode: .eval),
        Case(name: "residual blocks: identity, stride-2 projection, training after 2 steps",
             spec: ModelSpec(layers: [conv(2, 4, 3, pad: 1, bias: false), .batchNorm(features: 4), .relu,
                                      .residual(body: [conv(4, 4, 3, pad: 1, bias: false), .batchNorm(features: 4), .relu,
                                                       conv(4, 4, 3, pad: 1, bias: false), .batchNorm(features: 4)]),
                                      .relu,
                                      .residual(body: [conv(4, 6, 3, stride: 2, pad: 1, bias: false), .batchNorm(features: 6), .relu,
                                                       .maxPool2d(kernel: 1, stride: 1), conv(6, 6, 3, pad: 1, bias: false),
                                                       .batchNorm(features: 6)],
                                                shortcut: [conv(4, 6, 1, stride: 2, bias: false), .batchNorm(features: 6)]),
                                      .relu, .globalAvgPool2d, .flatten, .linear(inputs: 6, outputs: 3)], inputShape: [2, 6, 6]),
             mode: .train, steps: 2, rows: 5),
        Case(name: "label smoothing 0.1, training after 2 steps",
             spec: ModelSpec(layers: [.linear(inputs: 6, outputs: 5), .tanh, .linear(inputs: 5, outputs: 4)],
                             labelSmoothing: 0.1, inputShape: [6]),
             mode: .train, steps: 2, rows: 5),
        Case(name: "Float: label smoothing 0.3, a small CNN",
             spec: ModelSpec(layers: [conv(1, 3, 3, pad: 1), .relu, .flatten, .linear(inputs: 48, outputs: 5)],
                             labelSmoothing: 0.3, inputShape: [1, 4, 4]),
             mode: .train, steps: 1, float: true),
        Case(name: "residual blocks, evaluation after 3 steps, nested, on features",
             spec: ModelSpec(layers: [.linear(inputs: 6, outputs: 5), .tanh,
                                      .residual(body: [.linear(inputs: 5, outputs: 5), .batchNorm(features: 5), .gelu,
                                                       .residual(body: [.linear(inputs: 5, outputs: 5), .tanh])]),
                                      .linear(inputs: 5, outputs: 3)], inputShape: [6]),
             mode: .eval, steps: 3, rows: 6),
        Case(name: "Float: residual block with a fused block in its body, training",
             spec: ModelSpec(layers: [conv(1, 4, 3, pad: 1, bias: false), .batchNorm(features: 4), .relu,
                                      .residual(body: [conv(4, 4, 3, pad: 1, bias: false), .batchNorm(features: 4), .relu,
                                                       .maxPool2d(kernel: 2, stride: 2)],
                                                shortcut: [conv(4, 4, 1, stride: 2, bias: false), .batchNorm(features: 4)]),
                                      .relu, .flatten, .linear(inputs: 64, outputs: 3)], inputShape: [1, 8, 8]),
             mode: .train, float: true),
        // 16 channels and more: these 3x3 convolutions run by Winograd's F(4x4, 3x3), on an image that cuts tiles
        // off at the edge (5x6) and with a bias, then in Float on 7x7 as in the shipped ResNet, after 2 SGD steps.
        Case(name: "Winograd: 3x3 convolutions of 16 and 24 channels with a bias, a residual block, training after 2 steps",
             spec: ModelSpec(layers: [conv(3, 16, 3, pad: 1), .tanh, conv(16, 16, 3, pad: 1), .relu,
                                      .residual(body: [conv(16, 24, 3, pad: 1, bias: false), .batchNorm(features: 24), .relu,
                                                       conv(24, 24, 3, pad: 1)],
                                                shortcut: [conv(16, 24, 1, bias: false), .batchNorm(features: 24)]),
                                      .relu, .globalAvgPool2d, .flatten, .linear(inputs: 24, outputs: 4)], inputShape: [3, 5, 6]),
             mode: .train, steps: 2, rows: 5),
        Case(name: "Float: Winograd 3x3 convolutions of 32 channels on 7x7, batch norm training after 2 steps",
             spec: ModelSpec(layers: [conv(2, 16, 3, pad: 1, bias: false), .batchNorm(features: 16), .relu,
                                      .residual(body: [conv(16, 32, 3, pad: 1, bias: false), .batchNorm(features: 32), .relu,
                                                       conv(32, 32, 3, pad: 1, bias: false), .batchNorm(features: 32)],
                                                shortcut: [conv(16, 32, 1, bias: false), .batchNorm(features: 32)]),
                                      .relu, .globalAvgPool2d, .flatten, .linear(inputs: 32, outputs: 3)], inputShape: [2, 7, 7]),
             mode: .train, steps: 2, rows: 6, float: true),
        Case(name: "Float: a small CNN, batch norm training",
             spec: ModelSpec(layers: [conv(1, 4, 3, pad: 1, bias: false), .batchNorm(features: 4), .relu,
                                      .maxPool2d(kernel: 2, stride: 2), conv(4, 6, 3, stride: 2, pad: 1), .leakyReLU(slope: 0.2),
                                      .flatten, .linear(inputs: 24, outputs: 8), .layerNorm(features: 8), .gelu,
                                      .linear(inputs: 8, outputs: 3)], inputShape: [1, 8, 8]),
             mode: .train, float: true),
    ]

    /// Learning rate of the SGD steps before the compared pass.
    static let learningRate = 0.1

    // MARK: - Both sides' results

    /// What one side computed for a case. Tensors are flat, in float64 (a Float model's values convert exactly).
    struct Outputs: Sendable {
        /// The compared pass: logits [B, outputs], the mean loss, d loss / d every parameter.
        var logits: [Double] = []
        var loss = 0.0
        var gradients: [String: [Double]] = [:]
        /// Buffers after the compared pass (running_mean, running_var, num_batches_tracked).
        var buffers: [String: [Double]] = [:]
        /// The loss of each SGD step before the compared pass.
        var trainingLosses: [Double] = []
    }

    struct ReferenceError: Error, CustomStringConvertible {
        let description: String
    }

    /// Every case run by the Engine and by PyTorch (or why PyTorch could not run it): once for the suite, one
    /// Python process for all cases.
    static let results: Result<[(engine: Outputs, torch: Result<Outputs, ReferenceError>)], any Error> = Result {
        try runAllCases()
    }

    static func runAllCases() throws -> [(engine: Outputs, torch: Result<Outputs, ReferenceError>)] {
        guard FileManager.default.isExecutableFile(atPath: torchPython) else {
            throw ReferenceError(description: "\(torchPython) is missing: `scripts/setup --python` makes it "
                + "(a virtualenv with PyTorch's CPU wheel and safetensors)")
        }
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("bp-torch-reference-" + UUID().uuidString)
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: directory) }
        func path(_ name: String) -> String { directory.appendingPathComponent(name).path }

        var writer = SafeTensorsWriter()
        var engine: [Outputs] = []
        var descriptions: [[String: Any]] = []
        for (index, c) in cases.enumerated() {
            let prefix = "c\(index)."
            engine.append(try c.float ? run(c, seed: UInt64(100 + index), as: Float.self, prefix: prefix, into: &writer)
                                      : run(c, seed: UInt64(100 + index), as: Double.self, prefix: prefix, into: &writer))
            let shapes = try c.spec.shapes()
            descriptions.append([
                "prefix": prefix, "name": c.name, "loss": c.spec.loss.rawValue, "label_smoothing": c.spec.labelSmoothing,
                "mode": c.mode == .train ? "train" : "eval",
                "steps": c.steps, "lr": learningRate,
                "layers": c.spec.layers.enumerated().map { $1.torchModule(input: shapes[$0]).json },
            ])
        }
        try writer.write(to: path("engine.safetensors"))
        try JSONSerialization.data(withJSONObject: descriptions).write(to: directory.appendingPathComponent("cases.json"))
        try script.write(toFile: path("reference.py"), atomically: false, encoding: .utf8)

        try runTorch([path("reference.py"), path("cases.json"), path("engine.safetensors"), path("torch.safetensors"),
                      path("errors.json")])

        let file = try SafeTensorsFile(path: path("torch.safetensors"))
        let errors = try JSONSerialization.jsonObject(with: Data(contentsOf: directory.appendingPathComponent("errors.json")))
            as? [String: String] ?? [:]
        return try cases.indices.map { index in
            let prefix = "c\(index)."
            if let error = errors[prefix] {
                return (engine[index], .failure(ReferenceError(description: "PyTorch could not run it:\n\(error)")))
            }
            var torch = Outputs()
            torch.logits = try file.doubles(prefix + "logits")
            torch.loss = try file.doubles(prefix + "loss")[0]
            if cases[index].steps > 0 { torch.trainingLosses = try file.doubles(prefix + "training_losses") }
            for name in file.names {
                if name.hasPrefix(prefix + "grad.") {
                    torch.gradients[String(name.dropFirst(prefix.count + 5))] = try file.doubles(name)
                } else if name.hasPrefix(prefix + "buffer.") {
                    let values = name.hasSuffix("num_batches_tracked") ? try file.int64s(name).map(Double.init) : try file.doubles(name)
                    torch.buffers[String(name.dropFirst(prefix.count + 7))] = values
                }
            }
            return (engine[index], .success(torch))
        }
    }

    /// Runs .venv-bench's Python with `arguments` (a script and its own); its output is in the error when it fails.
    static func runTorch(_ arguments: [String]) throws {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: torchPython)
        process.arguments = arguments
        let output = Pipe()
        process.standardOutput = output
        process.standardError = output
        try process.run()
        let printed = String(decoding: output.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        process.waitUntilExit()
        guard process.terminationStatus == 0 else {
            throw ReferenceError(description: "the PyTorch reference failed (exit \(process.terminationStatus); "
                + "`scripts/setup --python` makes .venv-bench):\n\(printed)")
        }
    }

    /// Runs one case in the Engine and adds what PyTorch needs to `writer` under `prefix`: the starting state
    /// ("init.<name>"), each batch ("step<k>.inputs", "step<k>.labels", "final.inputs", "final.labels").
    static func run<T: Scalar>(_ c: Case, seed: UInt64, as _: T.Type, prefix: String,
                               into writer: inout SafeTensorsWriter) throws -> Outputs {
        let model = try Model<T>(spec: c.spec, batchCapacity: c.rows, seed: seed)
        // Biases and normalisation parameters away from their starting 0 and 1, so that each one matters.
        var g = RandomGenerator(seed: seed, stream: 78)
        for info in model.parameterTable where info.shape.count == 1 {
            for i in info.range { model.parameters[i] += T(0.1 * g.nextNormal()) }
        }
        func add(_ name: String, _ shape: [Int], _ values: [Double]) {
            values.withUnsafeBufferPointer { writer.add(name: prefix + name, shape: shape, doubles: $0) }
        }
        for info in model.parameterTable {
            add("init." + info.name, info.shape, model.parameters[info.range].map { Double($0) })
        }
        for info in model.bufferTable {
            if info.name.hasSuffix("num_batches_tracked") {
                writer.add(name: prefix + "init." + info.name, shape: info.shape, int64s: model.buffers[info.range].map { Int64($0) })
            } else {
                add("init." + info.name, info.shape, model.buffers[info.range].map { Double($0) })
            }
        }
        func batch(_ tag: String, seed: UInt64) {
            fillRandomBatch(model, rows: c.rows, seed: seed)
            add(tag + ".inputs", [c.rows] + c.spec.inputShape, (0..<(c.rows * model.inputWidth)).map { Double(model.inputs[$0]) })
            writer.add(name: prefix + tag + ".labels", shape: [c.rows], int64s: (0..<c.rows).map { Int64(model.labels[$0]) })
        }

        var outputs = Outputs()
        for step in 0..<c.steps {
            batch("step\(step)", seed: seed &+ UInt64(step) &+ 1)
            model.zeroGradients()
            outputs.trainingLosses.append(model.forward(count: c.rows, mode: .train).loss)
            model.backward(count: c.rows)
            for i in 0..<model.parameterCount { model.parameters[i] -= T(learningRate) * model.gradients[i] }
        }
        batch("final", seed: seed &+ 1000)
        model.zeroGradients()
        outputs.loss = model.forward(count: c.rows, mode: c.mode).loss
        model.backward(count: c.rows)
        outputs.logits = (0..<(c.rows * model.outputWidth)).map { Double(model.outputs[$0]) }
        for info in model.parameterTable { outputs.gradients[info.name] = model.gradients[info.range].map { Double($0) } }
        for info in model.bufferTable { outputs.buffers[info.name] = model.buffers[info.range].map { Double($0) } }
        return outputs
    }

    /// The PyTorch side: argv = cases.json, the Engine's safetensors file, the safetensors file to write, and a
    /// JSON file of the cases it could not run (prefix: traceback).
    static let script = """
        import json, sys, traceback
        import torch
        from torch import nn
        from safetensors.torch import load_file, save_file

        torch.set_num_threads(1)  # the machine's cores are shared; these models are tiny
        cases = json.load(open(sys.argv[1]))
        given = load_file(sys.argv[2])

        class Residual(nn.Module):
            # As the README's loader has it: body(x) + shortcut(x), the identity without a shortcut.
            def __init__(self, body, shortcut=None):
                super().__init__()
                self.body, self.shortcut = body, shortcut if shortcut is not None else nn.Identity()

            def forward(self, x):
                return self.body(x) + self.shortcut(x)

        def build(d):
            # As the README's loader builds a model file's modules: torch.nn's class (or the loader's own), the
            # recorded arguments, an argument that is itself a module built first.
            value = lambda v: build(v) if isinstance(v, dict) else [value(a) for a in v] if isinstance(v, list) else v
            kind = {"Residual": Residual}.get(d["module"]) or getattr(nn, d["module"])
            return kind(*map(value, d["args"]), **{k: value(v) for k, v in d["kwargs"].items()})

        def reference(case):
            p = case["prefix"]
            model = nn.Sequential(*[build(json.loads(m)) for m in case["layers"]]).double()
            start = p + "init."
            model.load_state_dict({k[len(start):]: v for k, v in given.items() if k.startswith(start)}, strict=True)

            def run(tag, train):
                model.train(train)
                model.zero_grad()
                z = model(given[p + tag + ".inputs"].double())
                y = given[p + tag + ".labels"]
                if case["loss"] == "cross_entropy":
                    loss = nn.CrossEntropyLoss(label_smoothing=case["label_smoothing"])(z, y)
                else:
                    loss = nn.MSELoss()(z, nn.functional.one_hot(y, z.shape[1]).double())
                loss.backward()
                return z, loss

            out, losses = {}, []
            for step in range(case["steps"]):
                _, loss = run(f"step{step}", True)
                losses.append(loss.item())
                with torch.no_grad():
                    for q in model.parameters():
                        q -= case["lr"] * q.grad
            z, loss = run("final", case["mode"] == "train")
            out[p + "logits"] = z.detach()
            out[p + "loss"] = loss.detach().reshape(1)
            if losses:
                out[p + "training_losses"] = torch.tensor(losses, dtype=torch.float64)
            for name, q in model.named_parameters():
                out[p + "grad." + name] = q.grad
            for name, b in model.named_buffers():
                out[p + "buffer." + name] = b
            return out

        # A case PyTorch cannot run (a name or shape that is not PyTorch's) fails that case alone, with the traceback.
        results, errors = {}, {}
        for case in cases:
            try:
                results |= reference(case)
            except Exception:
                errors[case["prefix"]] = traceback.format_exc()
        save_file({k: v.contiguous() for k, v in results.items()}, sys.argv[3])
        json.dump(errors, open(sys.argv[4], "w"))
        """

    // MARK: - Comparing

    /// max |ours - reference| / max |reference|: the error relative to the reference tensor's scale. Infinite when
    /// the sizes differ, or when the reference is all zero and ours is not.
    static func relativeDifference(_ ours: [Double], _ reference: [Double]) -> Double {
        guard ours.count == reference.count else { return .infinity }
        let difference = zip(ours, reference).reduce(0.0) { max($0, abs($1.0 - $1.1)) }
        let scale = reference.reduce(0.0) { max($0, abs($1)) }
        return difference == 0 ? 0 : scale == 0 ? .infinity : difference / scale
    }

    /// Tolerances for float64 models; a Float model is held to 1e-4 on everything. Measured when written: every
    /// float64 difference at most 4e-15 (rounding in sums taken in another order), the Float case's at most 3e-7.
    struct Tolerances {
        var outputs = 1e-10, gradients = 1e-9, buffers = 1e-12
        static let double = Tolerances()
        static let float = Tolerances(outputs: 1e-4, gradients: 1e-4, buffers: 1e-4)
    }

    /// A kind without a case here is a kind nobody compared with PyTorch.
    @Test func everyLayerKindHasACase() {
        let covered = Set(Self.cases.flatMap { $0.spec.layers.map { String($0.entry.prefix { $0 != " " }) } })
        #expect(Set(LayerKinds.names).subtracting(covered).isEmpty, "no PyTorch case: \(Set(LayerKinds.names).subtracting(covered))")
    }

    @Test(arguments: cases.indices)
    func matchesPyTorch(case index: Int) throws {
        let c = Self.cases[index]
        let (ours, reference) = try Self.results.get()[index]
        let torch = try reference.get()
        let tolerance = c.float ? Tolerances.float : .double
        func expectClose(_ what: String, _ a: [Double], _ b: [Double], _ limit: Double) {
            let d = Self.relativeDifference(a, b)
            #expect(d <= limit, "\(c.name): \(what) differs by \(d) relative (limit \(limit)); \(a.count) values, PyTorch's \(b.count)")
        }

        expectClose("logits", ours.logits, torch.logits, tolerance.outputs)
        expectClose("loss", [ours.loss], [torch.loss], tolerance.outputs)
        expectClose("training losses", ours.trainingLosses, torch.trainingLosses, tolerance.outputs)
        #expect(ours.trainingLosses.count == c.steps)

        #expect(ours.gradients.keys.sorted() == torch.gradients.keys.sorted(), "\(c.name): parameter names")
        for (name, reference) in torch.gradients.sorted(by: { $0.key < $1.key }) {
            // A zero reference gradient would compare nothing: the case must make every tensor matter.
            #expect(reference.contains { abs($0) > 1e-6 }, "\(c.name): PyTorch's gradient of \(name) is zero")
            expectClose("gradient of \(name)", ours.gradients[name] ?? [], reference, tolerance.gradients)
        }

        #expect(ours.buffers.keys.sorted() == torch.buffers.keys.sorted(), "\(c.name): buffer names")
        for (name, reference) in torch.buffers.sorted(by: { $0.key < $1.key }) {
            let mine = ours.buffers[name] ?? []
            if name.hasSuffix("num_batches_tracked") {
                #expect(mine == reference, "\(c.name): \(name) is \(mine), PyTorch's \(reference)")
                #expect(reference == [Double(c.steps + (c.mode == .train ? 1 : 0))], "\(c.name): \(name)")
            } else {
                expectClose(name, mine, reference, tolerance.buffers)
            }
        }
        // The running statistics moved from their start (mean 0, variance 1): the comparison above sees them work.
        for (name, reference) in torch.buffers where name.hasSuffix("running_mean") {
            #expect(reference.contains { abs($0) > 1e-3 }, "\(c.name): \(name) never moved")
        }
    }
}
