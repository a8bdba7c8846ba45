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
    /// Kaiming normal when the next activation is rectifier-like (`InitializationRole.kaiming`), Xavier normal
    /// otherwise.
    case automatic = "auto"
}

/// The architecture of a sequential model: everything needed to rebuild the same parameter layout anywhere.
public struct ModelSpec: Equatable, Sendable {
    public var layers: [LayerSpec]
    public var loss: LossKind
    /// Cross-entropy only: the share s of each target spread evenly over the classes, the target being
    /// (1 - s) onehot(label) + s / C (PyTorch's `CrossEntropyLoss(label_smoothing=s)`). 0 = plain one-hot targets.
    public var labelSmoothing: Double
    public var initialization: Initialization
    /// One input sample's shape: [F] for flat features, [C, H, W] for images.
    public var inputShape: [Int]

    /// - Parameter inputShape: nil takes [inputs of the first linear layer] (a multilayer perceptron).
    public init(layers: [LayerSpec], loss: LossKind = .softmaxCrossEntropy, labelSmoothing: Double = 0,
                initialization: Initialization = .automatic, inputShape: [Int]? = nil) {
        self.layers = layers
        self.loss = loss
        self.labelSmoothing = labelSmoothing
        self.initialization = initialization
        self.inputShape = inputShape ?? {
            layers.lazy.compactMap { $0.as(LinearKind.self) }.first.map { [$0.inputs] } ?? [0]
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
        guard elementCount(inputShape) != nil else { throw ModelSpecError("the input shape \(inputShape) holds more than 2^40 values") }
        var shapes = [inputShape]
        for (index, layer) in layers.enumerated() {
            do { shapes.append(try layer.outputShape(input: shapes[index])) } catch {
                throw ModelSpecError("layer \(index) \(layer): \(error.description)")
            }
        }
        return shapes
    }

    /// Every layer with the shape of its input sample, a block's inner layers right after the block, each named by
    /// its place: "3" for layer 3, "3.residual[1]" and "3.shortcut[0]" inside the block at 3 (as `model.layers`
    /// keys name them). Empty when the layers do not fit.
    public func placedLayers() -> [PlacedLayer] {
        guard let shapes = try? shapes() else { return [] }
        return layers.indices.flatMap { i in
            [("\(i)", layers[i], shapes[i])] + (layers[i].as(ResidualKind.self)?.placedLayers(input: shapes[i], place: "\(i)") ?? [])
        }
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
        guard labelSmoothing >= 0, labelSmoothing < 1 else {
            throw ModelSpecError("label smoothing must be in [0, 1) (0 = off; 1 would make every target uniform and "
                + "the labels meaningless), got \(labelSmoothing)")
        }
        if labelSmoothing > 0, loss != .softmaxCrossEntropy {
            throw ModelSpecError("label smoothing applies to cross_entropy only, the loss is \(loss.rawValue)")
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

    /// The PyTorch module of every layer, in order (the model file's `modules`); empty when the layers do not fit.
    public var torchModules: [TorchModule] {
        guard let shapes = try? shapes() else { return [] }
        return layers.indices.map { layers[$0].torchModule(input: shapes[$0]) }
    }

    /// A one-line description such as "Linear(784, 256) ReLU Linear(256, 10) + cross_entropy".
    public var summary: String {
        layers.map(\.description).joined(separator: " ") + " + " + loss.rawValue
            + (labelSmoothing > 0 ? " (label smoothing \(labelSmoothing))" : "")
    }
}

/// A layer, where it sits ("3", "3.residual[1]") and the shape of its input sample (`ModelSpec.placedLayers`).
public typealias PlacedLayer = (place: String, layer: LayerSpec, input: [Int])

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
