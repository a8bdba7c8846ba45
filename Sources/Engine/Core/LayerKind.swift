import Foundation

/// One kind of layer, and everything about it: each kind is one type declared in a file of its own under Layers/
/// (Linear.swift, Conv2d.swift, ReLU.swift, ...), next to its run-time class (a `Layer<T>` subclass with forward and
/// backward side by side). `LayerKinds.all` lists the kinds; nothing else enumerates them, so a new kind is one new
/// file and one line in that list. The grammar of `model.layers`, model files, the memory estimate, the gradient
/// checker, the initialisation and the PyTorch reference tests all ask the kind.
///
/// Shapes are per sample, NCHW like PyTorch without the batch dimension: [C, H, W] for images, [F] for features.
public protocol LayerKind: Sendable, Equatable, CustomStringConvertible {
    // MARK: The model.layers grammar

    /// The entry's syntax in `model.layers`, its name first: "conv OUT K [stride S] [pad P] [nobias]".
    static var syntax: String { get }
    /// Whether the kind works on images [C, H, W] only: a model with one sees image samples (an [H, W] sample as one
    /// channel), any other model flat samples.
    static var isSpatial: Bool { get }
    /// Whether one entry of this kind works on images only: `isSpatial`, unless the kind nests entries (a block).
    static func isSpatial(_ entry: LayerEntry) -> Bool
    /// Whether the kind is an element-wise nonlinearity, which `model.activation` takes (false but for those).
    static var isActivation: Bool { get }
    /// The kind from one entry (its name first) for input samples of `input`, which fixes what the entry leaves out
    /// (a linear layer's inputs, the channels of a convolution or a normalisation). The shapes are checked after, by
    /// `outputShape`.
    static func parse(_ entry: LayerEntry, input: [Int]) throws(LayerEntryError) -> Self
    /// The entry in `model.layers` syntax; `parse` reads it back as the same kind (model files record layers so).
    var entry: String { get }

    // MARK: Shapes, tensors and memory

    /// The shape of one output sample for one input sample of `input`, or why the layer cannot take it.
    func outputShape(input: [Int]) throws(ModelSpecError) -> [Int]
    /// The trainable tensors: (name suffix, shape), in the order they lie in the parameter buffer.
    func parameterShapes(input: [Int]) -> [(String, [Int])]
    /// The non-trainable state saved with the parameters (PyTorch's buffers). A scalar has shape [].
    var bufferShapes: [(String, [Int])] { get }
    /// What a layer of this kind allocates for itself at `batchCapacity` rows (bytes, in floating point so that
    /// impossible sizes are still counted), and the elements of the shared scratch it needs: keep it in step with the
    /// run-time class's initialiser (the scratch is sized from it). `Model.footprint` adds it up before anything is
    /// allocated; the memory tests compare the estimate with the measured peak.
    func workspace(input: [Int], output: [Int], batchCapacity rows: Double, scalarBytes: Double) -> LayerWorkspace

    // MARK: Training

    /// Whether the derivative jumps somewhere (the gradient checker's kinks): ReLU's at 0, max pooling's where the
    /// largest value of a window changes hands. The run-time class appends which side of them each value is on.
    var hasKink: Bool { get }
    /// What the layer is to the weights of the layer before it, for their initialisation (`Model.initializeParameters`).
    var initializationRole: InitializationRole { get }
    /// Whether the next layer may overwrite this layer's output in place (an in-place ReLU): only when this layer's
    /// backward pass never reads its own output. False is always safe; it costs two buffers.
    var outputMayBeOverwritten: Bool { get }
    /// Whether a layer of this kind right after `previous` (nil: it is the first layer) shares its input's buffers:
    /// its output is its input's buffer and its input gradient its output gradient's.
    func runsInPlace(after previous: LayerSpec?) -> Bool
    /// The PyTorch module that computes the same, for input samples of `input` (the README's loader builds it from
    /// the model file; the PyTorch reference tests too).
    func torchModule(input: [Int]) -> TorchModule
    /// The run-time layer of this kind at `placement` in a model of scalars `T`.
    func makeLayer<T: Scalar>(_ placement: LayerPlacement) -> Layer<T>
}

/// What `LayerKind.workspace` returns: bytes a layer allocates for itself and elements of the shared scratch.
public typealias LayerWorkspace = (bytes: Double, scratchElements: Double)

/// What a layer is to the weights of the layer with parameters before it. With `model.init: auto` they are drawn
/// for the first layer after them that is not `.transparent`.
public enum InitializationRole: Equatable, Sendable {
    /// Weight layers look past it to the activation they feed: dropout, normalisation, pooling, reshaping.
    case transparent
    /// A rectifier-like activation: Kaiming (He) initialisation, its variance scaled by `gain` (1 / (1 + slope^2)
    /// for leaky ReLU, 1 for ReLU, GELU and SiLU).
    case kaiming(gain: Double)
    /// Tanh and sigmoid, or a weight layer with no activation between: Xavier (Glorot) initialisation.
    case xavier
}

extension LayerKind {
    public static func isSpatial(_ entry: LayerEntry) -> Bool { isSpatial }
    public static var isActivation: Bool { false }
    /// Whether `other` is this same kind with the same settings.
    func isEqual(to other: any LayerKind) -> Bool { (other as? Self) == self }
    /// The entry's name in `model.layers` (the first word of its syntax).
    static var name: String { String(syntax.prefix { $0 != " " }) }
}

/// The kinds of layer: the only list of them.
public enum LayerKinds {
    /// Every kind, in the order the grammar lists them.
    public static let all: [any LayerKind.Type] = [
        LinearKind.self, Conv2dKind.self, MaxPool2dKind.self, AvgPool2dKind.self, GlobalAvgPool2dKind.self,
        FlattenKind.self, BatchNormKind.self, LayerNormKind.self, ReLUKind.self, LeakyReLUKind.self, TanhKind.self,
        SigmoidKind.self, GELUKind.self, SiLUKind.self, DropoutKind.self, Dropout2dKind.self, ResidualKind.self,
    ]

    /// The kind whose entries start with `name` ("conv"), or nil.
    public static func named(_ name: String) -> (any LayerKind.Type)? {
        all.first { $0.name == name }
    }

    /// Whether the entry of `words` needs image samples (its kind's `isSpatial(_:)`); false for an unknown name.
    public static func entryIsSpatial(_ words: [String]) -> Bool {
        guard let name = words.first, let kind = named(name) else { return false }
        return kind.isSpatial(LayerEntry(words: words))
    }

    /// Every entry's name, sorted: for an error that lists what `model.layers` takes.
    public static var names: [String] { all.map { $0.name }.sorted() }

    /// The element-wise nonlinearities, for an error that lists what `model.activation` takes.
    public static var activationNames: [String] { all.filter { $0.isActivation }.map { $0.name } }

    /// Why no kind takes an entry whose first word is `name`: what the entry was probably meant to be, or the names
    /// `model.layers` takes.
    public static func unknownEntry(_ name: String) -> String {
        if name == "shortcut" {
            return "'shortcut' without 'residual': a shortcut belongs to a residual block, written in the same mapping, "
                + "{residual: [ENTRY, ...], shortcut: [ENTRY, ...]}"
        }
        if name.hasPrefix("[") {
            return "a list where an entry belongs ('\(LayerEntry.shown(name)) ...'): entries are layers or residual blocks, and a block's "
                + "entries are written in one list, residual: [ENTRY, ...]"
        }
        return "unknown layer '\(LayerEntry.shown(name))' (" + names.joined(separator: ", ") + ")"
    }
}

/// Where a run-time layer sits in its model: what its initialiser needs beside its kind.
public struct LayerPlacement: Sendable {
    /// The position in the model: the layer's index in PyTorch's `nn.Sequential`.
    let index: Int
    let inputShape: [Int]
    let outputShape: [Int]
    let batchCapacity: Int
    /// Whether a block's inner batch norm, ReLU, max pooling runs fuse, as the model's own do (`Model.init`).
    var fusesBlocks = true
}

/// One layer of a sequential model: a kind with its settings. The position of a layer in `ModelSpec.layers` is its
/// index in PyTorch's `nn.Sequential`, so `linear` at position 2 owns the tensors `2.weight` [outputs, inputs] and
/// `2.bias` [outputs]. Each kind's file adds the constructors (`.linear(inputs:outputs:)`, `.relu`, ...).
public struct LayerSpec: Equatable, Sendable, CustomStringConvertible {
    public let kind: any LayerKind

    public init(_ kind: some LayerKind) { self.kind = kind }

    public static func == (a: LayerSpec, b: LayerSpec) -> Bool { a.kind.isEqual(to: b.kind) }

    /// PyTorch's repr of the module, shortened ("Conv2d(1, 32, kernel_size=3, padding=1, bias=False)").
    public var description: String { kind.description }
    /// The entry in `model.layers` syntax ("conv 32 3 pad 1 nobias").
    public var entry: String { kind.entry }
    /// Whether the layer works on images only (a block: whether one of its entries does).
    public var isSpatial: Bool { LayerKinds.entryIsSpatial(entry.split(separator: " ").map(String.init)) }
    public var hasKink: Bool { kind.hasKink }
    /// The kind's output shape, checked with its tensors against 2^40 values (`elementCount`): every shape a model
    /// is built from passes here, so sizes and offsets computed from shapes later cannot overflow.
    public func outputShape(input: [Int]) throws(ModelSpecError) -> [Int] {
        let output = try kind.outputShape(input: input)
        if elementCount(output) == nil {
            throw ModelSpecError("its output sample \(output) would hold more than 2^40 values")
        }
        for (name, shape) in kind.parameterShapes(input: input) where elementCount(shape) == nil {
            throw ModelSpecError("its \(name) \(shape) would hold more than 2^40 values")
        }
        return output
    }
    public func parameterShapes(input: [Int]) -> [(String, [Int])] { kind.parameterShapes(input: input) }
    public var bufferShapes: [(String, [Int])] { kind.bufferShapes }
    public func torchModule(input: [Int]) -> TorchModule { kind.torchModule(input: input) }

    func workspace(input: [Int], output: [Int], batchCapacity rows: Double, scalarBytes: Double) -> LayerWorkspace {
        kind.workspace(input: input, output: output, batchCapacity: rows, scalarBytes: scalarBytes)
    }

    /// What one run-time layer needs, made from `run` (one layer, or a fused batch norm, ReLU, max pooling block) on
    /// `shapes` (its input to its output) in a model built with `fusing` (`Model.footprint`), which residual blocks
    /// follow inside.
    static func workspace(of run: ArraySlice<LayerSpec>, shapes: ArraySlice<[Int]>, batchCapacity rows: Double,
                          scalarBytes: Double, fusing: Bool) -> LayerWorkspace {
        let (layer, input, output) = (run[run.startIndex], shapes[shapes.startIndex], shapes[shapes.endIndex - 1])
        if run.count > 1 { return fusedBlockWorkspace(run, shapes: shapes, batchCapacity: rows, scalarBytes: scalarBytes) }
        if let block = layer.as(ResidualKind.self) {
            return block.workspace(input: input, batchCapacity: rows, scalarBytes: scalarBytes, fusing: fusing)
        }
        return layer.workspace(input: input, output: output, batchCapacity: rows, scalarBytes: scalarBytes)
    }

    /// The settings of a layer of kind `K`, or nil for a layer of another kind.
    public func `as`<K: LayerKind>(_: K.Type) -> K? { kind as? K }

    /// The layer one `model.layers` entry describes, for input samples of `input`; nil when no kind has its name.
    public static func parse(_ words: [String], input: [Int]) throws(LayerEntryError) -> LayerSpec? {
        guard let name = words.first, let kind = LayerKinds.named(name) else { return nil }
        return LayerSpec(try kind.parse(LayerEntry(words: words), input: input))
    }
}

// MARK: - Parsing entries

/// Why an entry of `model.layers` does not parse; the caller names the key and the entry.
public struct LayerEntryError: Error, Equatable {
    public let reason: String
    /// Where in a block the failing entry is (`residual[1]`, `residual[0].shortcut[1]`); empty for the entry itself.
    public var path: String

    public init(reason: String, path: String = "") {
        self.reason = reason
        self.path = path
    }
}

/// The words of one `model.layers` entry (its name first) and the checks kinds make on them.
public struct LayerEntry: Sendable {
    public let words: [String]
    var name: String { words[0] }

    func fail(_ reason: String) -> LayerEntryError { LayerEntryError(reason: reason) }

    func integer(_ text: String, _ what: String, minimum: Int) throws(LayerEntryError) -> Int {
        let digits = !text.isEmpty && text.allSatisfy { $0.isASCII && $0.isNumber }
        guard let v = Int(text) ?? (digits ? Int.max : nil), v >= minimum else {
            throw fail("\(what) must be an integer >= \(minimum), got \(Self.shown(text))")
        }
        guard v <= Self.largestInteger else {
            throw fail("\(what) must be at most \(Self.largestInteger), got \(Self.shown(text))")
        }
        return v
    }

    /// `text` as an error message shows it: whole up to 120 characters, else its first 100 and its length (a forged
    /// entry ran to a megabyte, and every message that quoted it with it).
    public static func shown(_ text: String) -> String {
        text.count <= 120 ? text : text.prefix(100) + "... (\(text.count) characters)"
    }

    /// The largest number an entry takes (channels, widths, kernels, strides, padding): 2^24, far beyond any layer
    /// that fits in memory, and small enough that no size computed from them overflows before the shapes are checked
    /// (`LayerSpec.outputShape`).
    static let largestInteger = 1 << 24

    func number(_ text: String) throws(LayerEntryError) -> Double {
        guard let v = Double(text), v.isFinite else { throw fail("expected a number, got \(Self.shown(text))") }
        return v
    }

    /// Options after the positional words: "stride 2", "pad 1", "nobias".
    func options(from start: Int, allowed: Set<String>) throws(LayerEntryError) -> [String: Int] {
        var result: [String: Int] = [:]
        var i = start
        while i < words.count {
            let option = words[i]
            guard allowed.contains(option) else {
                throw fail("unknown option '\(option)' (\(allowed.sorted().joined(separator: ", ")))")
            }
            guard result[option] == nil else { throw fail("'\(option)' is given twice") }
            if option == "nobias" {
                result[option] = 1
                i += 1
                continue
            }
            guard i + 1 < words.count else { throw fail("'\(option)' needs a number") }
            result[option] = try integer(words[i + 1], option, minimum: option == "pad" ? 0 : 1)
            i += 2
        }
        return result
    }

    /// The entry has exactly `expected` words, its name included.
    func expectCount(_ expected: Int) throws(LayerEntryError) {
        if words.count != expected {
            throw fail(expected == 1 ? "'\(name)' takes no argument"
                : "'\(name)' needs \(expected - 1) argument\(expected == 2 ? "" : "s")")
        }
    }
}

// MARK: - PyTorch modules

/// A PyTorch module as data: `getattr(torch.nn, module)(*args, **kwargs)` builds it (the README's loader does, from
/// the model file's `modules`). An argument that is itself a module is built first, so modules nest: a block is a
/// module whose arguments are modules (`Sequential` of several, or a module of the loader's own with keyword
/// arguments such as `body` and `shortcut`), and its tensors get PyTorch's nested names (`3.body.0.weight`).
public struct TorchModule: Equatable, Sendable {
    public var module: String
    public var args: [TorchValue]
    public var kwargs: [String: TorchValue]

    public init(_ module: String, _ args: [TorchValue] = [], _ kwargs: [String: TorchValue] = [:]) {
        self.module = module
        self.args = args
        self.kwargs = kwargs
    }

    /// `{"module": "Conv2d", "args": [1, 32, 3], "kwargs": {"bias": false, "padding": 1}}`: keys sorted, so the same
    /// module always reads the same.
    public var json: String {
        let kwargs = self.kwargs.sorted { $0.key < $1.key }.map { "\(TorchValue.string($0.key).json): \($0.value.json)" }
        return "{\"module\": \(TorchValue.string(module).json), \"args\": [\(args.map(\.json).joined(separator: ", "))], "
            + "\"kwargs\": {\(kwargs.joined(separator: ", "))}}"
    }
}

/// An argument of a PyTorch module.
public indirect enum TorchValue: Equatable, Sendable {
    case int(Int)
    /// Finite (the kinds check their numbers before a model is built).
    case number(Double)
    case bool(Bool)
    case string(String)
    case list([TorchValue])
    case module(TorchModule)

    /// JSON; Swift prints the shortest decimal that reads back as the same Double, in Python too.
    var json: String {
        switch self {
        case let .int(v): "\(v)"
        case let .number(v): "\(v)"
        case let .bool(v): v ? "true" : "false"
        case let .string(v):
            String(decoding: (try? JSONSerialization.data(withJSONObject: v, options: .fragmentsAllowed)) ?? Data(), as: UTF8.self)
        case let .list(values): "[" + values.map(\.json).joined(separator: ", ") + "]"
        case let .module(m): m.json
        }
    }
}

// MARK: - Image shapes

/// An image sample's channels, height and width, or why `input` is not one (`what` names the layer).
func imageShape(_ input: [Int], _ what: String) throws(ModelSpecError) -> (c: Int, h: Int, w: Int) {
    guard input.count == 3 else {
        throw ModelSpecError("\(what) needs image samples [C, H, W], but its input is \(input)")
    }
    return (input[0], input[1], input[2])
}

/// The values in a tensor of `shape`, or nil when they pass 2^40 (4 TiB of Float: no machine holds such a tensor),
/// counted without overflowing whatever the sizes.
public func elementCount(_ shape: [Int]) -> Int? {
    var count = 1
    for size in shape {
        guard size >= 0 else { return nil }
        let (product, overflow) = count.multipliedReportingOverflow(by: size)
        guard !overflow, product <= 1 << 40 else { return nil }
        count = product
    }
    return count
}

/// Positions of a window of `kernel` sliding by `stride` over `size` values padded by `padding` on each side.
func windowCount(_ size: Int, kernel: Int, stride: Int, padding: Int) -> Int { (size + 2 * padding - kernel) / stride + 1 }
