/// One layer of a sequential model. The position of a layer in `ModelSpec.layers` is its index in PyTorch's
/// `nn.Sequential`, so `linear` at position 2 owns the tensors `2.weight` [outputs, inputs] and `2.bias` [outputs].
public enum LayerSpec: Equatable, Sendable, CustomStringConvertible {
    /// y = x W^T + b (PyTorch `nn.Linear`).
    case linear(inputs: Int, outputs: Int)
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
        case .relu: "ReLU"
        case let .leakyReLU(s): "LeakyReLU(\(s))"
        case .tanh: "Tanh"
        case .sigmoid: "Sigmoid"
        case .gelu: "GELU"
        case let .dropout(p): "Dropout(\(p))"
        }
    }

    /// True for the activations whose derivative jumps at 0 (the gradient checker's kinks).
    public var hasKink: Bool {
        switch self {
        case .relu, .leakyReLU: true
        default: false
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

/// How linear weights are drawn at initialisation. Biases start at zero.
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

    public init(layers: [LayerSpec], loss: LossKind = .softmaxCrossEntropy, initialization: Initialization = .automatic) {
        self.layers = layers
        self.loss = loss
        self.initialization = initialization
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

    /// Width of the model's input rows.
    public var inputWidth: Int {
        for layer in layers { if case let .linear(i, _) = layer { return i } }
        return 0
    }

    /// Width of the model's output rows (the number of classes for cross-entropy).
    public var outputWidth: Int {
        for layer in layers.reversed() { if case let .linear(_, o) = layer { return o } }
        return 0
    }

    /// Checks that the layers fit together; the error names the layer by its nn.Sequential index.
    public func validate() throws(ModelSpecError) {
        guard layers.contains(where: { if case .linear = $0 { true } else { false } }) else {
            throw ModelSpecError("the model has no linear layer")
        }
        var width: Int? = nil
        for (index, layer) in layers.enumerated() {
            switch layer {
            case let .linear(i, o):
                guard i > 0, o > 0 else { throw ModelSpecError("layer \(index) \(layer): widths must be positive") }
                if let w = width, w != i {
                    throw ModelSpecError("layer \(index) \(layer) expects \(i) inputs but the previous layer produces \(w)")
                }
                width = o
            case let .leakyReLU(slope):
                guard slope.isFinite else { throw ModelSpecError("layer \(index) \(layer): slope must be finite") }
            case let .dropout(p):
                guard p >= 0, p < 1 else {
                    throw ModelSpecError("layer \(index) \(layer): drop probability must be in [0, 1)")
                }
            case .relu, .tanh, .sigmoid, .gelu:
                break
            }
        }
        if case .linear = layers[0] {} else {
            throw ModelSpecError("layer 0 is \(layers[0]); the first layer must be Linear (it fixes the input width)")
        }
        if loss == .softmaxCrossEntropy, outputWidth < 2 {
            throw ModelSpecError("cross-entropy needs at least 2 outputs, the last linear layer has \(outputWidth)")
        }
    }

    /// The tensors of this architecture with PyTorch nn.Sequential names, shapes and offsets into the flat buffer.
    public var parameterTable: [ParameterInfo] {
        var table: [ParameterInfo] = []
        var offset = 0
        for (index, layer) in layers.enumerated() {
            if case let .linear(i, o) = layer {
                table.append(ParameterInfo(name: "\(index).weight", offset: offset, shape: [o, i]))
                offset += o * i
                table.append(ParameterInfo(name: "\(index).bias", offset: offset, shape: [o]))
                offset += o
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
    /// Row-major shape: [out, in] for weights, [out] for biases.
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
