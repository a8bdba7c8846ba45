import Foundation

/// A residual block: y = body(x) + shortcut(x), the shortcut a path of layers of its own (a 1x1 convolution with
/// stride and a batch norm, to match the body's shape) or the identity. The entry is
/// `residual [ENTRY, ...] [shortcut [ENTRY, ...]]`, each ENTRY a `model.layers` entry (a block may nest); in YAML a
/// mapping `{residual: [...], shortcut: [...]}`. Its PyTorch module is the loader's `Residual(body, shortcut)`, with
/// `body` and `shortcut` an `nn.Sequential` each, so the block at index 3 owns `3.body.0.weight`, `3.shortcut.1.bias`.
public struct ResidualKind: LayerKind {
    public let body: [LayerSpec]
    /// Nil: the identity (the body's output must have the block's input shape).
    public let shortcut: [LayerSpec]?

    public init(body: [LayerSpec], shortcut: [LayerSpec]?) {
        self.body = body
        self.shortcut = shortcut
    }

    public static var syntax: String { "residual [ENTRY, ...] [shortcut [ENTRY, ...]]" }
    /// A block of linear layers takes flat samples: whether a block needs images is its entries' business
    /// (`isSpatial(_:)`).
    public static var isSpatial: Bool { false }
    public static func isSpatial(_ entry: LayerEntry) -> Bool {
        // Too deep to take: `parse` refuses it at once, where splitting it level by level cost seconds (3,000 deep, 8 s;
        // 10,000 deep in a 140 KB model file, minutes).
        guard nesting(entry) <= maxNesting, let (body, shortcut) = try? lists(entry) else { return false }
        return (body + (shortcut ?? [])).contains { LayerKinds.entryIsSpatial(words($0)) }
    }

    /// How deep blocks may nest. A ResNet nests one deep; each level costs a few times the one inside it to parse
    /// and shape (every layer's shape is checked with its tensors'), so a file of blocks 20 deep took minutes.
    public static let maxNesting = 8

    /// How deep the entry's brackets nest: one pass over its characters.
    static func nesting(_ entry: LayerEntry) -> Int {
        var depth = 0, deepest = 0
        for word in entry.words {
            for c in word.utf8 {
                if c == UInt8(ascii: "[") { depth += 1; deepest = max(deepest, depth) }
                if c == UInt8(ascii: "]") { depth -= 1 }
            }
        }
        return deepest
    }

    public static func parse(_ entry: LayerEntry, input: [Int]) throws(LayerEntryError) -> Self {
        let deepest = nesting(entry)
        guard deepest <= maxNesting else {
            throw entry.fail("blocks nest \(deepest) deep; at most \(maxNesting) are taken (a ResNet's blocks nest 1 deep)")
        }
        let (bodyEntries, shortcutEntries) = try lists(entry)
        let body = try parsePath(bodyEntries, "residual", input: input)
        let shortcut: [LayerSpec]?
        if let shortcutEntries { shortcut = try parsePath(shortcutEntries, "shortcut", input: input) } else { shortcut = nil }
        let kind = Self(body: body, shortcut: shortcut)
        do { _ = try kind.outputShape(input: input) } catch { throw entry.fail(error.description) }
        return kind
    }

    public var entry: String {
        "residual [" + body.map(\.entry).joined(separator: ", ") + "]"
            + (shortcut.map { " shortcut [" + $0.map(\.entry).joined(separator: ", ") + "]" } ?? "")
    }
    public var description: String {
        "Residual(body=[" + body.map(\.description).joined(separator: ", ") + "], shortcut="
            + (shortcut.map { "[" + $0.map(\.description).joined(separator: ", ") + "]" } ?? "identity") + ")"
    }

    // MARK: Shapes, tensors and memory

    public func outputShape(input: [Int]) throws(ModelSpecError) -> [Int] {
        let output = try Self.shapes(body, "residual", input: input).last!
        let other = try shortcut.map { path throws(ModelSpecError) in try Self.shapes(path, "shortcut", input: input).last! } ?? input
        guard output == other else {
            throw ModelSpecError("the body gives \(output) per sample but the \(shortcut == nil ? "identity shortcut" : "shortcut") "
                + "gives \(other): they must match to be added")
        }
        return output
    }

    public func parameterShapes(input: [Int]) -> [(String, [Int])] {
        paths.flatMap { name, path in
            let shapes = (try? Self.shapes(path, name, input: input)) ?? Array(repeating: [], count: path.count + 1)
            return path.indices.flatMap { i in path[i].parameterShapes(input: shapes[i]).map { ("\(name).\(i).\($0.0)", $0.1) } }
        }
    }
    public var bufferShapes: [(String, [Int])] {
        paths.flatMap { name, path in path.indices.flatMap { i in path[i].bufferShapes.map { ("\(name).\(i).\($0.0)", $0.1) } } }
    }

    /// The inner layers' own workspaces, and the block's buffers: the outputs and output gradients of the inner
    /// layers that do not run in place (the last of each path reads the block's output gradient), and the
    /// shortcut's input gradient.
    public func workspace(input: [Int], output: [Int], batchCapacity rows: Double, scalarBytes: Double) -> LayerWorkspace {
        workspace(input: input, batchCapacity: rows, scalarBytes: scalarBytes, fusing: true)
    }

    /// The same for a model built with `fusesBlocks` (`Model.footprint`): apart, a batch norm, ReLU, max pooling run
    /// keeps each layer's output and gradient, and nested blocks follow.
    func workspace(input: [Int], batchCapacity rows: Double, scalarBytes: Double, fusing: Bool) -> LayerWorkspace {
        var bytes = 0.0, scratch = 0.0
        for (name, path) in paths {
            let shapes = (try? Self.shapes(path, name, input: input)) ?? []
            guard shapes.count == path.count + 1 else { continue }
            for (run, _) in Self.innerRuns(path, fusing: fusing) {
                let needs = LayerSpec.workspace(of: path[run], shapes: shapes[run.lowerBound...run.upperBound],
                                                batchCapacity: rows, scalarBytes: scalarBytes, fusing: fusing)
                bytes += needs.bytes
                scratch = max(scratch, needs.scratchElements)
            }
        }
        let owned = ownedElements(input: input, batchCapacity: rows, fusing: fusing)
        return (bytes + LargeBuffer.allocatedBytes(owned * scalarBytes), scratch)
    }

    /// Elements of the buffers the block allocates for its inner layers (see `workspace`).
    func ownedElements(input: [Int], batchCapacity rows: Double, fusing: Bool) -> Double {
        var elements = shortcut == nil ? 0 : input.reduce(1.0) { $0 * Double($1) }
        for (name, path) in paths {
            guard let shapes = try? Self.shapes(path, name, input: input) else { continue }
            let runs = Self.innerRuns(path, fusing: fusing)
            for (position, (run, inPlace)) in runs.enumerated() where !inPlace {
                let width = shapes[run.upperBound].reduce(1.0) { $0 * Double($1) }
                elements += position == runs.count - 1 ? width : 2 * width
            }
        }
        return rows * elements
    }

    // MARK: Training

    public var hasKink: Bool { paths.contains { $0.1.contains(where: \.hasKink) } }
    /// What the body's first layer that is not transparent is to the weights before the block.
    public var initializationRole: InitializationRole {
        body.lazy.map(\.kind.initializationRole).first { $0 != .transparent } ?? .transparent
    }
    /// Its backward pass reads its output gradient only.
    public var outputMayBeOverwritten: Bool { true }
    public func runsInPlace(after previous: LayerSpec?) -> Bool { false }
    public func torchModule(input: [Int]) -> TorchModule {
        var kwargs: [String: TorchValue] = [:]
        for (name, path) in paths {
            let shapes = (try? Self.shapes(path, name, input: input)) ?? Array(repeating: [], count: path.count + 1)
            kwargs[name] = .module(TorchModule("Sequential", path.indices.map { .module(path[$0].torchModule(input: shapes[$0])) }))
        }
        return TorchModule("Residual", [], kwargs)
    }
    public func makeLayer<T: Scalar>(_ placement: LayerPlacement) -> Layer<T> { Residual<T>(self, placement) }

    // MARK: Paths

    /// The body ("body" in tensor names) and the shortcut, when there is one.
    var paths: [(String, [LayerSpec])] { [("body", body)] + (shortcut.map { [("shortcut", $0)] } ?? []) }

    /// The run-time layers of a path, as runs of its layers (a fused block inside a body is one), and whether each
    /// runs in place: as its kind says, except the first of a path (its input is the block's, which the other path
    /// reads) and the last (its output gradient is the block's, which the other path reads too). The workspace is
    /// the fused plan's, as training runs it (a model with `fusesBlocks: false` is a reference for tests).
    static func innerRuns(_ path: [LayerSpec], fusing: Bool) -> [(run: Range<Int>, inPlace: Bool)] {
        let runs = LayerSpec.planRuns(path, fusing: fusing)
        return runs.enumerated().map { position, run in
            let inner = position > 0 && position < runs.count - 1
            return (run, inner && path[run.lowerBound].kind.runsInPlace(after: path[run.lowerBound - 1]))
        }
    }

    /// The inner layers with their input shapes, nested blocks' after their block (`ModelSpec.placedLayers`), named
    /// from `place`, the block's own place.
    func placedLayers(input: [Int], place: String) -> [PlacedLayer] {
        paths.flatMap { name, path -> [PlacedLayer] in
            guard let shapes = try? Self.shapes(path, name, input: input) else { return [] }
            return path.indices.flatMap { i -> [PlacedLayer] in
                let at = "\(place).\(name == "body" ? "residual" : name)[\(i)]"
                return [(at, path[i], shapes[i])] + (path[i].as(ResidualKind.self)?.placedLayers(input: shapes[i], place: at) ?? [])
            }
        }
    }

    /// The shape of a sample before a path's first layer and after each.
    static func shapes(_ path: [LayerSpec], _ name: String, input: [Int]) throws(ModelSpecError) -> [[Int]] {
        var shapes = [input]
        for (i, layer) in path.enumerated() {
            do { shapes.append(try layer.outputShape(input: shapes[i])) } catch {
                throw ModelSpecError("\(name == "body" ? "residual" : name)[\(i)] \(layer): \(error.description)")
            }
        }
        return shapes
    }

    // MARK: Parsing

    /// The entry's body entries and shortcut entries (nil: none), as texts.
    private static func lists(_ entry: LayerEntry) throws(LayerEntryError) -> ([String], [String]?) {
        let text = entry.words.dropFirst().joined(separator: " ")
        let (body, rest) = try bracketedList(Substring(text), "body", entry)
        let tail = rest.drop { $0 == " " }
        if tail.isEmpty { return (body, nil) }
        guard tail.prefix(while: { $0 != " " && $0 != "[" }) == "shortcut" else {
            throw entry.fail("expected 'shortcut [ENTRY, ...]' after the body, got '\(tail)'")
        }
        let (shortcut, end) = try bracketedList(tail.dropFirst("shortcut".count), "shortcut", entry)
        guard end.allSatisfy({ $0 == " " }) else { throw entry.fail("unexpected '\(end.drop { $0 == " " })' after the shortcut") }
        return (body, shortcut)
    }

    /// "[a, b [c, d], e] rest" as (["a", "b [c, d]", "e"], " rest"): commas split only outside inner brackets. `list`
    /// ("body" or "shortcut") names the list in errors.
    private static func bracketedList(_ text: Substring, _ list: String, _ entry: LayerEntry) throws(LayerEntryError)
        -> ([String], Substring) {
        let start = text.drop { $0 == " " }
        guard start.first == "[" else { throw entry.fail("expected a list of entries in brackets, e.g. '[conv 16 3 pad 1, batchnorm]'") }
        var items: [String] = [], current = "", depth = 0
        for index in start.indices {
            let c = start[index]
            switch c {
            case "[": depth += 1
                if depth > 1 { current.append(c) }
            case "]": depth -= 1
                if depth > 0 { current.append(c); continue }
                items.append(current)
                guard items.count > 1 || !current.allSatisfy({ $0 == " " }) else {
                    throw entry.fail(list == "body" ? "the body is an empty list: it needs at least one entry"
                        : "the shortcut is an empty list: the identity shortcut is written by leaving 'shortcut' out")
                }
                guard !items.contains(where: { $0.allSatisfy { $0 == " " } }) else { throw entry.fail("a list has an empty entry") }
                return (items.map { $0.trimmingCharacters(in: .whitespaces) }, start[start.index(after: index)...])
            case "," where depth == 1: items.append(current)
                current = ""
            default: current.append(c)
            }
        }
        throw entry.fail("a '[' has no matching ']'")
    }

    private static func words(_ text: String) -> [String] { text.split(separator: " ").map(String.init) }

    /// The layers of one path from its entries, each for the output of the one before; an error names the entry by
    /// the path and its position (`residual[1]`, `shortcut[0]`), before any path an inner block's error names.
    private static func parsePath(_ entries: [String], _ name: String, input: [Int]) throws(LayerEntryError) -> [LayerSpec] {
        var layers: [LayerSpec] = [], shape = input
        for (i, text) in entries.enumerated() {
            let at = "\(name)[\(i)]"
            func fail(_ error: LayerEntryError) -> LayerEntryError {
                LayerEntryError(reason: error.reason, path: at + (error.path.isEmpty ? "" : "." + error.path))
            }
            let words = words(text)
            let parsed: LayerSpec?
            do { parsed = try LayerSpec.parse(words, input: shape) } catch {
                throw fail(error.path.isEmpty ? LayerEntryError(reason: "'\(text)': \(error.reason)") : error)
            }
            guard let layer = parsed else {
                throw fail(LayerEntryError(reason: LayerKinds.unknownEntry(words.first ?? "")))
            }
            do { shape = try layer.outputShape(input: shape) } catch {
                throw fail(LayerEntryError(reason: "'\(text)' (\(layer)): \(error.description)"))
            }
            layers.append(layer)
        }
        guard !layers.isEmpty else { throw LayerEntryError(reason: "\(name) needs at least one entry") }
        return layers
    }
}

extension LayerSpec {
    public static func residual(body: [LayerSpec], shortcut: [LayerSpec]? = nil) -> LayerSpec {
        LayerSpec(ResidualKind(body: body, shortcut: shortcut))
    }
}

/// A residual block at run time: the run-time layers of its body and its shortcut, over buffers of its own
/// (`ResidualKind.workspace`) and the block's slices of the model's parameters, gradients and buffers.
///
/// Forward runs the body, then the shortcut, and writes y = body's output + shortcut's output (or + x). Backward runs
/// each path back from the block's dy, which neither path writes (their last layers never run in place): the body's
/// first layer writes the block's dx, the shortcut's first its own buffer, and the block adds that (or dy, for the
/// identity) into dx, where the paths meet. The parameter gradients are final only after both paths, so the whole
/// pass runs in `backwardParameters` (or `backwardInput`, for a block without parameters).
///
/// Inner layers have an identity of their own for their dropout draws (`innerIdentity`), never a model layer's.
final class Residual<T: Scalar>: Layer<T> {
    private let kind: ResidualKind
    /// The run-time layers of the body and of the shortcut (empty: the identity), and the first layer of each run
    /// within its path.
    private(set) var body: [Layer<T>], shortcut: [Layer<T>]
    private let bodyStarts: [Int], shortcutStarts: [Int]
    private let arena: UnsafeMutableBufferPointer<T>
    /// The shortcut's input gradient [B, inputCount]; nil for the identity, or when the block computes no dx.
    private var shortcutGradient: UnsafeMutablePointer<T>?
    /// Whether this backward pass has run the paths already (`backwardParameters` runs them for `backwardInput`).
    private var pathsDone = false
    /// The model's initialisation, and what the block feeds (for its inner layers' initialisation).
    private var initialization = Initialization.automatic
    var fedRole: InitializationRole?

    init(_ kind: ResidualKind, _ placement: LayerPlacement) {
        self.kind = kind
        func make(_ path: [LayerSpec], _ number: Int) -> ([Layer<T>], [Int]) {
            let shapes = (try? ResidualKind.shapes(path, "", input: placement.inputShape)) ?? []
            precondition(shapes.count == path.count + 1, "residual block built from a spec that does not fit")
            let runs = ResidualKind.innerRuns(path, fusing: placement.fusesBlocks)
            let layers: [Layer<T>] = Model.makeLayers(path, runs: runs.map(\.run), shapes: shapes, batchCapacity: placement.batchCapacity,
                                                      fusesBlocks: placement.fusesBlocks) {
                Residual.innerIdentity(block: placement.index, path: number, position: $0)
            }
            for (layer, run) in zip(layers, runs) { layer.runsInPlace = run.inPlace }
            return (layers, runs.map(\.run.lowerBound))
        }
        (body, bodyStarts) = make(kind.body, 0)
        (shortcut, shortcutStarts) = kind.shortcut.map { make($0, 1) } ?? ([], [])
        arena = LargeBuffer.allocate(Int(kind.ownedElements(input: placement.inputShape, batchCapacity: Double(placement.batchCapacity),
                                                            fusing: placement.fusesBlocks)))
        arena.initialize(repeating: 0)
        super.init(placement, spec: LayerSpec(kind))
    }

    deinit { LargeBuffer.free(arena) }

    /// Path `path` (0 body, 1 shortcut) as `layers`: a test fault's wrapper in place of one of its layers
    /// (GradientFaults.swift), bound to the same buffers.
    func replacePath(_ path: Int, with layers: [Layer<T>]) {
        if path == 0 { body = layers } else { shortcut = layers }
    }

    /// The identity of layer `position` of path `path` (0 body, 1 shortcut) in the block `block`: negative, so that
    /// no model layer has it, and a hash of the three, so that nested blocks' layers differ too.
    static func innerIdentity(block: Int, path: Int, position: Int) -> Int {
        let key = RandomGenerator.mix(UInt64(truncatingIfNeeded: block)) ^ UInt64(path << 32 | position)
        return -1 - Int(truncatingIfNeeded: RandomGenerator.mix(key) >> 2)
    }

    /// Binds the inner layers (the model has bound the block's own buffers by now), then attaches them.
    override func attach(to model: Model<T>) {
        var cursor = arena.baseAddress!
        func take(_ n: Int) -> UnsafeMutablePointer<T> {
            defer { cursor += n }
            return cursor
        }
        if !shortcut.isEmpty {
            let gradient = take(batchCapacity * inputCount)
            shortcutGradient = dx == nil ? nil : gradient
        }
        for (path, inputGradient) in [(body, dx), (shortcut, shortcutGradient)] {
            var activation = x!, previousGradient = inputGradient
            for (position, layer) in path.enumerated() {
                let last = position == path.count - 1
                layer.x = activation
                layer.y = layer.runsInPlace ? activation : take(layer.outputCount * batchCapacity)
                layer.dy = last ? dy : layer.runsInPlace ? previousGradient! : take(layer.outputCount * batchCapacity)
                layer.dx = previousGradient
                layer.scratch = scratch
                layer.previous = position > 0 ? path[position - 1] : nil
                layer.next = last ? nil : path[position + 1]
                (activation, previousGradient) = (layer.y, layer.dy)
            }
        }
        precondition(cursor - arena.baseAddress! == arena.count, "residual block's buffers out of step")
        let bufferCount = spec.bufferShapes.reduce(0) { $0 + $1.1.reduce(1, *) }
        let bound = Model.bindParameters(body + shortcut,
                                         parameters: UnsafeMutableBufferPointer(start: parameters, count: parameterCount),
                                         gradients: UnsafeMutableBufferPointer(start: gradients, count: parameterCount),
                                         buffers: UnsafeMutableBufferPointer(start: buffers, count: bufferCount))
        precondition(bound == (parameterCount, bufferCount), "residual block's parameter layout out of step")
        initialization = model.spec.initialization
        if index >= 0 { fedRole = model.fedRole(after: index) }
        for layer in body + shortcut { layer.attach(to: model) }
    }

    // MARK: - Passes

    override func forward(count: Int, mode: ForwardMode) {
        Residual.forward(body, count: count, mode: mode)
        Residual.forward(shortcut, count: count, mode: mode)
        let other: UnsafeMutablePointer<T> = shortcut.isEmpty ? x : shortcut[shortcut.count - 1].y
        Elementwise.add(body[body.count - 1].y, other, into: y, count * outputCount)
    }

    override func backwardParameters(count: Int, accumulate: Bool) {
        Residual.backward(shortcut, count: count, accumulate: accumulate)
        Residual.backward(body, count: count, accumulate: accumulate)
        pathsDone = true
        provenFinite = false
    }

    override func backwardInput(count: Int, accumulate: Bool) {
        if !pathsDone {
            Residual.backward(shortcut, count: count, accumulate: accumulate)
            Residual.backward(body, count: count, accumulate: accumulate)
        }
        pathsDone = false
        guard let dx else { return }
        Elementwise.add(shortcutGradient ?? dy, into: dx, count * inputCount)
    }

    /// Indices, not `for layer in layers`: in unspecialised generic code the iterator heap-allocated (see `Model`).
    private static func forward(_ layers: [Layer<T>], count: Int, mode: ForwardMode) {
        var index = 0
        while index < layers.count {
            layers[index].forward(count: count, mode: mode)
            index += 1
        }
    }

    private static func backward(_ layers: [Layer<T>], count: Int, accumulate: Bool) {
        var index = layers.count - 1
        while index >= 0 {
            let layer = layers[index]
            if layer.parameterCount > 0 { layer.backwardParameters(count: count, accumulate: accumulate) }
            layer.backwardInput(count: count, accumulate: accumulate)
            index -= 1
        }
    }

    // MARK: - Initialisation and the gradient checker

    /// Each inner layer as the model initialises its layers: for what it feeds within its path, or past the path's
    /// end what the block feeds.
    override func initialize(scheme: Initialization, gain: Double, generator: inout RandomGenerator) {
        for (layers, starts, path) in [(body, bodyStarts, kind.body), (shortcut, shortcutStarts, kind.shortcut ?? [])] {
            for (layer, start) in zip(layers, starts) where layer.parameters != nil || layer.buffers != nil {
                let fed = path[(start + 1)...].lazy.map(\.kind.initializationRole).first { $0 != .transparent } ?? fedRole
                (layer as? Residual<T>)?.fedRole = fed
                let (scheme, gain) = Model<T>.initialization(initialization, feeding: fed)
                layer.initialize(scheme: scheme, gain: gain, generator: &generator)
            }
        }
    }

    override func appendKinkPattern(count: Int, to pattern: inout [Int32]) {
        for layer in body + shortcut where layer.hasKink { layer.appendKinkPattern(count: count, to: &pattern) }
    }
}
