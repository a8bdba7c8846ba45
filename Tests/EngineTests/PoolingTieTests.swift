@testable import Engine
import Foundation
import Testing

/// Max pooling's ties against PyTorch's `max_pool2d(..., return_indices=True)`: the first largest value of a window
/// (in row-major order) wins, and the gradient goes to exactly that input, in every kernel: the general loop in
/// Double and in Float, the Float 2x2 kernel, each fused with the batch norm and ReLU before it and apart.
///
/// The inputs are full of ties that survive batch norm: small integers (equal inputs normalise to equal values),
/// and a constant plane, whose windows all tie. A negative scale in one channel runs the fused 2x2 kernel's path
/// that normalises before it compares; a positive one its path that compares the raw inputs.
@Suite("Max pooling ties against PyTorch")
struct PoolingTieTests {
    /// One model: a 1x1 convolution holding the identity (so that the block's input gradient is computed, and its
    /// input is the batch exactly), batch norm, ReLU, max pooling. `kernel` names which kernels run.
    struct Case: Sendable {
        let name: String
        let kernel: Int, stride: Int
        let height: Int, width: Int
        /// Overlapping windows are never fused.
        var fusable = true
    }

    static let channels = 3, rows = 4
    /// Batch norm's scale and shift per channel (see `inputs`).
    static let gamma = [1.1, 0.9, -0.8], beta = [0.1, 0.5, 0.2]
    static let cases = [
        // Float: the 2x2 kernel (rows of 4 outputs and more); forward and, fused, backward.
        Case(name: "2x2 on 8x10", kernel: 2, stride: 2, height: 8, width: 10),
        // Float: the general loop (rows of fewer than 4 outputs), fused and apart.
        Case(name: "2x2 on 6x6", kernel: 2, stride: 2, height: 6, width: 6),
        Case(name: "3x3 stride 3 on 9x6", kernel: 3, stride: 3, height: 9, width: 6),
        Case(name: "3x3 stride 2 on 7x7, overlapping", kernel: 3, stride: 2, height: 7, width: 7, fusable: false),
    ]

    /// Channel 0: integers 0...2 (ties of 2s, the largest, in every position of a window); channel 1: constant
    /// 1.5 (every window a tie; its bias of 0.5 lets the ReLU pass it); channel 2: integers 0...1 under a scale of
    /// -0.8, so the 0s are the largest.
    static func inputs(_ c: Case) -> [Double] {
        var g = RandomGenerator(seed: 21, stream: 5)
        let plane = c.height * c.width
        return (0..<(rows * channels * plane)).map { i in
            switch (i / plane) % channels {
            case 0: Double(g.nextInt(below: 3))
            case 1: 1.5
            default: Double(g.nextInt(below: 2))
            }
        }
    }

    /// What the Engine computed: the pooled values, the winners (indices within a sample), the gradient the pooling
    /// received and the block's input gradient.
    struct Pass {
        var pooled: [Double] = [], winners: [Int] = [], dy: [Double] = [], dx: [Double] = []
    }

    static func spec(_ c: Case) -> ModelSpec {
        let outputs = channels * ((c.height - c.kernel) / c.stride + 1) * ((c.width - c.kernel) / c.stride + 1)
        return ModelSpec(layers: [.conv2d(inChannels: channels, outChannels: channels, kernel: 1, stride: 1, padding: 0, bias: false),
                                  .batchNorm(features: channels), .relu, .maxPool2d(kernel: c.kernel, stride: c.stride), .flatten,
                                  .linear(inputs: outputs, outputs: 3)],
                         inputShape: [channels, c.height, c.width])
    }

    static func run<T: Scalar>(_ c: Case, _: T.Type, fused: Bool) throws -> Pass {
        let model = try Model<T>(spec: spec(c), batchCapacity: rows, seed: 7, fusesBlocks: fused)
        let identity = (0..<(channels * channels)).map { $0 / channels == $0 % channels ? 1.0 : 0.0 }
        setTensor(model, "0.weight", identity)
        setTensor(model, "1.weight", gamma)
        setTensor(model, "1.bias", beta)
        for (i, v) in inputs(c).enumerated() { model.inputs[i] = T(v) }
        for r in 0..<rows { model.labels[r] = Int32(r % 3) }
        // Fused, one layer runs the batch norm, the ReLU and the pooling; apart, the pooling is a layer of its own.
        let pool = model.layer(at: 3)
        #expect((pool is BatchNormReLUPool<T>) == fused && (pool is MaxPool2d<T>) != fused, "\(c.name): fused is \(fused)")
        let winners = try #require((pool as? BatchNormReLUPool<T>)?.winners ?? (pool as? MaxPool2d<T>)?.winners)
        model.zeroGradients()
        _ = model.forward(count: rows, mode: .train)
        model.backward(count: rows, accumulate: false) { _ in }
        let outputs = rows * pool.outputCount, inputs = rows * pool.inputCount
        return Pass(pooled: (0..<outputs).map { Double(pool.y[$0]) }, winners: (0..<outputs).map { Int(winners[$0]) },
                    dy: (0..<outputs).map { Double(pool.dy[$0]) }, dx: (0..<inputs).map { Double(model.layer(at: 1).dx![$0]) })
    }

    /// PyTorch, in float64 from the same inputs, batch norm parameters and gradient at the pooling's output:
    /// relu(batch_norm(x)) pooled with its indices, and the input gradient its autograd routes through them.
    static let script = """
        import sys, torch
        import torch.nn.functional as F
        from safetensors.torch import load_file, save_file
        t = load_file(sys.argv[1])
        out = {}
        for prefix in sorted({name.split(".")[0] for name in t}):
            k, s = (int(v) for v in t[prefix + ".window"].tolist())
            x = t[prefix + ".x"].clone().requires_grad_(True)
            z = F.relu(F.batch_norm(x, None, None, t[prefix + ".weight"], t[prefix + ".bias"], training=True, eps=1e-5))
            y, indices = F.max_pool2d(z, k, s, return_indices=True)
            (dx,) = torch.autograd.grad(y, x, t[prefix + ".dy"].reshape(y.shape))
            out.update({prefix + ".y": y.detach().contiguous(), prefix + ".indices": indices.contiguous(), prefix + ".dx": dx})
        save_file(out, sys.argv[2])
        """

    /// Every case and kind through PyTorch in one process: the key is "<case index>_<Float|Double>_<fused|apart>".
    static func reference(_ passes: [String: (Case, Pass)]) throws -> SafeTensorsFile {
        let directory = try TemporaryDirectory()
        var writer = SafeTensorsWriter()
        for (key, (c, pass)) in passes {
            let shape = [rows, channels, c.height, c.width], pooled = [rows, channels, pass.dy.count / rows / channels]
            inputs(c).withUnsafeBufferPointer { writer.add(name: key + ".x", shape: shape, doubles: $0) }
            pass.dy.withUnsafeBufferPointer { writer.add(name: key + ".dy", shape: pooled, doubles: $0) }
            gamma.withUnsafeBufferPointer { writer.add(name: key + ".weight", shape: [channels], doubles: $0) }
            beta.withUnsafeBufferPointer { writer.add(name: key + ".bias", shape: [channels], doubles: $0) }
            writer.add(name: key + ".window", shape: [2], int64s: [Int64(c.kernel), Int64(c.stride)])
        }
        try writer.write(to: directory.file("in.safetensors"))
        try script.write(toFile: directory.file("ties.py"), atomically: false, encoding: .utf8)
        try TorchReferenceTests.runTorch([directory.file("ties.py"), directory.file("in.safetensors"), directory.file("out.safetensors")])
        return try SafeTensorsFile(path: directory.file("out.safetensors"))
    }

    @Test func theFirstLargestValueWinsATieAndGetsTheGradientInEveryKernel() throws {
        var passes: [String: (Case, Pass)] = [:]
        for (index, c) in Self.cases.enumerated() {
            for fused in c.fusable ? [true, false] : [false] {
                let kind = fused ? "fused" : "apart"
                passes["\(index)_Float_\(kind)"] = (c, try Self.run(c, Float.self, fused: fused))
                passes["\(index)_Double_\(kind)"] = (c, try Self.run(c, Double.self, fused: fused))
            }
        }
        let torch = try Self.reference(passes)
        for (key, (c, pass)) in passes.sorted(by: { $0.key < $1.key }) {
            let name = "\(c.name), \(key)", float = key.contains("Float"), fused = key.hasSuffix("fused")
            let pooled = try torch.doubles(key + ".y"), indices = try torch.int64s(key + ".indices"), dx = try torch.doubles(key + ".dx")
            let outPlane = pooled.count / Self.rows / Self.channels, inPlane = c.height * c.width
            var ties = 0
            for o in pooled.indices {
                let channel = (o / outPlane) % Self.channels
                #expect(abs(pass.pooled[o] - pooled[o]) <= (float ? 1e-5 : 1e-12) * max(1, abs(pooled[o])), "\(name): output \(o)")
                // Where the ReLU rectified the whole window a fused block may name another input: no gradient passes.
                guard !fused || pooled[o] > 0 else { continue }
                #expect(pass.winners[o] == channel * inPlane + Int(indices[o]), "\(name): output \(o)'s winner")
                ties += 1
            }
            #expect(ties >= outPlane, "\(name): too few windows compared")
            // The gradient at the winner PyTorch names: any other input of a tied window differs from it by a dy.
            let scale = dx.map(abs).max()!
            let worst = zip(pass.dx, dx).map { abs($0 - $1) }.max()!
            #expect(worst <= (float ? 1e-4 : 1e-10) * scale, "\(name): input gradient off by \(worst) of \(scale)")
        }
        // The inputs tie where it matters: in most windows of channel 0 the largest value comes up more than once.
        let c = Self.cases[0], values = Self.inputs(c)
        var tied = 0
        for i in 0..<(c.height / 2) {
            for j in 0..<(c.width / 2) {
                let window = [0, 1, c.width, c.width + 1].map { values[2 * i * c.width + 2 * j + $0] }
                tied += window.filter { $0 == window.max() }.count > 1 ? 1 : 0
            }
        }
        #expect(tied >= 8, "only \(tied) of the first plane's windows tie")
    }
}
