/// One layer of a sequential model. The position of a layer in `ModelSpec.layers` is its index in PyTorch's
/// `nn.Sequential`, so `linear` at position 2 owns the tensors `2.weight` [outputs, inputs] and `2.bias` [outputs].
///
/// Shapes are per sample, NCHW like PyTorch without the batch dimension: [C, H, W] for images, [F] for features.
public enum LayerSpec: Equatable, Sendable, CustomStringConvertible {
    /// y = x W^T + b (PyTorch `nn.Linear`), on flat samples [inputs].
    case linear(inputs: Int, outputs: Int)
    /// PyTorch `nn.Conv2d(inChannels, outChannels, kernel, stride, padding, bias)` with square kernels:
    /// y[o, i, j] = b[o] + sum over c, p, q of W[o, c, p, q] x[c, i*stride + p - padding, j*stride + q - padding],
    /// zero outside the input. Weight [out, in, k, k], bias [out].
    case conv2d(inChannels: Int, outChannels: Int, kernel: Int, stride: Int, padding: Int, bias: Bool)
    /// PyTorch `nn.MaxPool2d(kernel, stride)`: the largest value of each window (no padding; windows that do not fit
    /// are dropped, as with ceil_mode=False).
    case maxPool2d(kernel: Int, stride: Int)
    /// PyTorch `nn.AvgPool2d(kernel, stride)`: the mean of each window.
    case avgPool2d(kernel: Int, stride: Int)
    /// PyTorch `nn.AdaptiveAvgPool2d(1)`: the mean of each channel, [C, H, W] -> [C, 1, 1].
    case globalAvgPool2d
    /// PyTorch `nn.Flatten()`: [C, H, W] -> [C * H * W], no computation.
    case flatten
    /// PyTorch `nn.BatchNorm1d(features)` on [F] samples or `nn.BatchNorm2d(features)` on [C, H, W]: normalise each
    /// feature (channel) over the batch (and the positions), then scale by weight and shift by bias. eps 1e-5,
    /// momentum 0.1; running mean and (unbiased) variance are kept in training and used in evaluation.
    case batchNorm(features: Int)
    /// PyTorch `nn.LayerNorm(features)` over the last dimension of each sample, eps 1e-5, with weight and bias.
    case layerNorm(features: Int)
    /// y = max(x, 0)
    case relu
    /// y = x for x > 0, slope * x otherwise (PyTorch's default slope is 0.01).
    case leakyReLU(slope: Double)
    case tanh
    /// y = 1 / (1 + e^-x)
    case sigmoid
    /// Exact GELU, y = x * Phi(x).
    case gelu
    /// Inverted dropout with drop probability p: active in training only.
    case dropout(probability: Double)

    public var description: String {
        switch self {
        case let .linear(i, o): "Linear(\(i), \(o))"
        case let .conv2d(i, o, k, s, p, b):
            "Conv2d(\(i), \(o), kernel_size=\(k)" + (s != 1 ? ", stride=\(s)" : "") + (p != 0 ? ", padding=\(p)" : "")
                + (b ? "" : ", bias=False") + ")"
        case let .maxPool2d(k, s): "MaxPool2d(\(k)" + (s != k ? ", stride=\(s)" : "") + ")"
        case let .avgPool2d(k, s): "AvgPool2d(\(k)" + (s != k ? ", stride=\(s)" : "") + ")"
        case .globalAvgPool2d: "AdaptiveAvgPool2d(1)"
        case .flatten: "Flatten"
        case let .batchNorm(f): "BatchNorm(\(f))"
        case let .layerNorm(f): "LayerNorm(\(f))"
        case .relu: "ReLU"
        case let .leakyReLU(s): "LeakyReLU(\(s))"
        case .tanh: "Tanh"
        case .sigmoid: "Sigmoid"
        case .gelu: "GELU"
        case let .dropout(p): "Dropout(\(p))"
        }
    }

    /// True for the layers whose derivative jumps (the gradient checker's kinks): ReLU's at 0, max-pooling's where
    /// the largest value of a window changes hands.
    public var hasKink: Bool {
        switch self {
        case .relu, .leakyReLU, .maxPool2d: true
        default: false
        }
    }

    /// Whether the layer works on images [C, H, W].
    public var isSpatial: Bool {
        switch self {
        case .conv2d, .maxPool2d, .avgPool2d, .globalAvgPool2d: true
        default: false
        }
    }

    /// The trainable tensors of the layer: (name suffix, shape), in the order they lie in the parameter buffer.
    public func parameterShapes(input: [Int]) -> [(String, [Int])] {
        switch self {
        case let .linear(i, o): [("weight", [o, i]), ("bias", [o])]
        case let .conv2d(i, o, k, _, _, bias): [("weight", [o, i, k, k])] + (bias ? [("bias", [o])] : [])
        case let .batchNorm(f), let .layerNorm(f): [("weight", [f]), ("bias", [f])]
        default: []
        }
    }

    /// The non-trainable state the layer saves with its parameters (PyTorch's buffers): batch norm's running
    /// statistics and its count of batches. A scalar has shape [].
    public var bufferShapes: [(String, [Int])] {
        switch self {
        case let .batchNorm(f): [("running_mean", [f]), ("running_var", [f]), ("num_batches_tracked", [])]
        default: []
        }
    }

    /// The shape of one output sample for one input sample of `input`, or why the layer cannot take it.
    public func outputShape(input: [Int]) throws(ModelSpecError) -> [Int] {
        func spatial(_ name: String) throws(ModelSpecError) -> (c: Int, h: Int, w: Int) {
            guard input.count == 3 else {
                throw ModelSpecError("\(name) needs image samples [C, H, W], but its input is \(input)")
            }
            return (input[0], input[1], input[2])
        }
        func windows(_ size: Int, kernel: Int, stride: Int, padding: Int) -> Int { (size + 2 * padding - kernel) / stride + 1 }
        switch self {
        case let .linear(i, o):
            guard i > 0, o > 0 else { throw ModelSpecError("widths must be positive") }
            guard input.count == 1 else {
                throw ModelSpecError("takes flat samples of \(i) values, but its input is \(input): put a flatten before it")
            }
            guard input[0] == i else { throw ModelSpecError("expects \(i) inputs but the previous layer produces \(input[0])") }
            return [o]
        case let .conv2d(i, o, k, s, p, _):
            let (c, h, w) = try spatial("a convolution")
            guard i > 0, o > 0, k > 0, s > 0, p >= 0 else {
                throw ModelSpecError("channels, kernel and stride must be positive and padding >= 0")
            }
            guard c == i else { throw ModelSpecError("expects \(i) input channels but its input has \(c) (shape \(input))") }
            guard k <= h + 2 * p, k <= w + 2 * p else {
                throw ModelSpecError("kernel \(k) is larger than its padded input \(h + 2 * p)x\(w + 2 * p)")
            }
            return [o, windows(h, kernel: k, stride: s, padding: p), windows(w, kernel: k, stride: s, padding: p)]
        case let .maxPool2d(k, s), let .avgPool2d(k, s):
            let (c, h, w) = try spatial("pooling")
            guard k > 0, s > 0 else { throw ModelSpecError("kernel and stride must be positive") }
            guard k <= h, k <= w else { throw ModelSpecError("window \(k) is larger than its input \(h)x\(w)") }
            return [c, windows(h, kernel: k, stride: s, padding: 0), windows(w, kernel: k, stride: s, padding: 0)]
        case .globalAvgPool2d:
            let (c, _, _) = try spatial("global average pooling")
            return [c, 1, 1]
        case .flatten:
            return [input.reduce(1, *)]
        case let .batchNorm(f):
            guard input.count == 1 || input.count == 3 else {
                throw ModelSpecError("batch norm takes [F] or [C, H, W] samples, its input is \(input)")
            }
            guard input[0] == f else { throw ModelSpecError("expects \(f) features (channels) but its input is \(input)") }
            return input
        case let .layerNorm(f):
            guard let last = input.last, last == f else {
                throw ModelSpecError("normalises the last dimension of \(f), but its input is \(input)")
            }
            return input
        case let .leakyReLU(slope):
            guard slope.isFinite else { throw ModelSpecError("slope must be finite") }
            return input
        case let .dropout(p):
            guard p >= 0, p < 1 else { throw ModelSpecError("drop probability must be in [0, 1)") }
            return input
        case .relu, .tanh, .sigmoid, .gelu:
            return input
        }
    }
}

/// The loss applied to the last layer's output.
public enum LossKind: String, Sendable, CaseIterable {
    /// Softmax followed by cross-entropy against integer labels, fused (PyTorch `nn.CrossEntropyLoss`).
    case softmaxCrossEntropy = "cross_entropy"
    /// Mean of squared differences over all outputs (PyTorch `nn.MSELoss`); targets are one-hot labels
    /// unless the caller supplies its own.
    case meanSquaredError = "mse"
}

/// How weights are drawn at initialisation. Biases start at zero; normalisation layers at weight 1, bias 0.
public enum Initialization: String, Sendable, CaseIterable {
    /// He et al. 2015: N(0, 2 / fan_in), for ReLU-family layers.
    case kaimingNormal = "kaiming_normal"
    /// He et al. 2015: U(-sqrt(6 / fan_in), +sqrt(6 / fan_in)).
    case kaimingUniform = "kaiming_uniform"
    /// Glorot and Bengio 2010: N(0, 2 / (fan_in + fan_out)), for tanh and sigmoid layers.
    case xavierNormal = "xavier_normal"
    /// Glorot and Bengio 2010: U(-sqrt(6 / (fan_in + fan_out)), +...).
    case xavierUniform = "xavier_uniform"
    /// Kaiming normal when the next activation is ReLU-family or GELU, Xavier normal otherwise.
    case automatic = "auto"
}

/// The architecture of a sequential model: everything needed to rebuild the same parameter layout anywhere.
public struct ModelSpec: Equatable, Sendable {
    public var layers: [LayerSpec]
    public var loss: LossKind
    public var initialization: Initialization
    /// One input sample's shape: [F] for flat features, [C, H, W] for images.
    public var inputShape: [Int]

    /// - Parameter inputShape: nil takes [inputs of the first linear layer] (a multilayer perceptron).
    public init(layers: [LayerSpec], loss: LossKind = .softmaxCrossEntropy, initialization: Initialization = .automatic,
                inputShape: [Int]? = nil) {
        self.layers = layers
        self.loss = loss
        self.initialization = initialization
        self.inputShape = inputShape ?? {
            for layer in layers { if case let .linear(i, _) = layer { return [i] } }
            return [0]
        }()
    }

    /// A multi-layer perceptron: linear layers of the given widths with `activation` between them and
    /// optional dropout after each activation. `mlp(widths: [784, 256, 10])` is Linear, ReLU, Linear.
    public static func mlp(
        widths: [Int], activation: LayerSpec = .relu, dropout: Double = 0,
        loss: LossKind = .softmaxCrossEntropy, initialization: Initialization = .automatic
    ) -> ModelSpec {
        var layers: [LayerSpec] = []
        for i in 0..<max(0, widths.count - 1) {
            layers.append(.linear(inputs: widths[i], outputs: widths[i + 1]))
            if i + 2 < widths.count {
                layers.append(activation)
                if dropout > 0 { layers.append(.dropout(probability: dropout)) }
            }
        }
        return ModelSpec(layers: layers, loss: loss, initialization: initialization)
    }

    /// Values in one input sample.
    public var inputWidth: Int { inputShape.reduce(1, *) }

    /// Width of the model's output rows (the number of classes for cross-entropy).
    public var outputWidth: Int { ((try? shapes())?.last ?? [0]).reduce(1, *) }

    /// The shape of one sample before the first layer and after each layer: `layers.count + 1` shapes.
    public func shapes() throws(ModelSpecError) -> [[Int]] {
        guard !inputShape.isEmpty, inputShape.allSatisfy({ $0 > 0 }) else {
            throw ModelSpecError("the input shape \(inputShape) must have positive sizes")
        }
        var shapes = [inputShape]
        for (index, layer) in layers.enumerated() {
            do { shapes.append(try layer.outputShape(input: shapes[index])) } catch {
                throw ModelSpecError("layer \(index) \(layer): \(error.description)")
            }
        }
        return shapes
    }

    /// Checks that the layers fit together; the error names the layer by its nn.Sequential index.
    public func validate() throws(ModelSpecError) {
        guard !layers.isEmpty else { throw ModelSpecError("the model has no layers") }
        guard layers.contains(where: { !$0.parameterShapes(input: []).isEmpty }) else {
            throw ModelSpecError("the model has no layer with parameters (linear or conv)")
        }
        let shapes = try shapes()
        guard shapes.last!.count == 1 else {
            throw ModelSpecError("the model's output is \(shapes.last!) per sample; it must be flat (end with linear, or flatten)")
        }
        if loss == .softmaxCrossEntropy, outputWidth < 2 {
            throw ModelSpecError("cross-entropy needs at least 2 outputs, the last layer has \(outputWidth)")
        }
    }

    /// The trainable tensors of this architecture with PyTorch nn.Sequential names, shapes and offsets into the flat
    /// parameter buffer.
    public var parameterTable: [ParameterInfo] { table { layer, input in layer.parameterShapes(input: input) } }

    /// The non-trainable tensors (batch norm's running statistics) with PyTorch names, shapes and offsets into the
    /// flat buffer of buffers. A scalar takes one element.
    public var bufferTable: [ParameterInfo] { table { layer, _ in layer.bufferShapes } }

    private func table(_ tensors: (LayerSpec, [Int]) -> [(String, [Int])]) -> [ParameterInfo] {
        let shapes = (try? shapes()) ?? Array(repeating: [], count: layers.count + 1)
        var table: [ParameterInfo] = []
        var offset = 0
        for (index, layer) in layers.enumerated() {
            for (suffix, shape) in tensors(layer, shapes[index]) {
                table.append(ParameterInfo(name: "\(index).\(suffix)", offset: offset, shape: shape))
                offset += shape.reduce(1, *)
            }
        }
        return table
    }

    /// A one-line description such as "Linear(784, 256) ReLU Linear(256, 10) + cross_entropy".
    public var summary: String {
        layers.map(\.description).joined(separator: " ") + " + " + loss.rawValue
    }
}

public struct ModelSpecError: Error, CustomStringConvertible, Equatable {
    public let description: String
    public init(_ description: String) { self.description = description }
}

/// One tensor in a model's flat parameter buffer. Gradients and optimizer state use the same layout.
public struct ParameterInfo: Equatable, Sendable, Codable {
    /// PyTorch state_dict name, e.g. "0.weight".
    public let name: String
    /// First element in the flat buffer.
    public let offset: Int
    /// Row-major shape: [out, in] for linear weights, [out, in, k, k] for convolutions, [out] for biases, [] for a
    /// scalar.
    public let shape: [Int]
    public var count: Int { shape.reduce(1, *) }
    public var range: Range<Int> { offset..<(offset + count) }
    /// The nn.Sequential index of the layer that owns the tensor ("2.weight" -> 2).
    public var layerIndex: Int { Int(name.prefix { $0 != "." }) ?? 0 }

    public init(name: String, offset: Int, shape: [Int]) {
        self.name = name
        self.offset = offset
        self.shape = shape
    }
}
