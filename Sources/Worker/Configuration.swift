import Coordinator
import Engine
import Foundation
import Yams

/// Everything a run is made of. Every key has a default, so `bpworker train` with no file trains a sensible MLP
/// on Fashion-MNIST. Keys are declared once, in `Configuration.keys`, which drives reading, `--set` overrides,
/// unknown-key detection and the resolved YAML written to the run directory.
struct Configuration: Equatable {
    var seed = 0

    // data
    var dataFormat = DataFormat.idx
    var trainFeatures = "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"
    var trainLabels = "/usr/share/datasets/fashion-mnist/train-labels-idx1-ubyte.gz"
    var testFeatures = "/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz"
    var testLabels = "/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz"
    var normalization = Normalization.standardize
    var dataMmap = true
    var dataPrefetch = 4
    var remainder = Remainder.auto
    /// Training batches only: random crop after zero padding (0 = off), random horizontal flip and random erasing
    /// (a probability, 0 = off) (`Augmentation`).
    var augmentCropPadding = 0
    var augmentFlip = false
    var augmentErase = 0.0

    // model
    var inputs = 0
    var classes = 0
    var hidden = [512, 256]
    var activation = "relu"
    var dropout = 0.0
    var layers: [String] = []
    var initialization = Initialization.automatic
    var loss = LossKind.softmaxCrossEntropy
    var labelSmoothing = 0.0
    var batchNorm = BatchNormMode.local

    // optimizer
    var optimizer = OptimizerKind.sgd
    var learningRate = 0.05
    var momentum = 0.9
    var nesterov = true
    var beta1 = 0.9
    var beta2 = 0.999
    var epsilon = 1e-8
    var weightDecay = 5e-4
    var clipNorm = 0.0

    // schedule
    var schedule = ScheduleName.cosine
    var warmupSteps = Warmup.auto
    var stepSize = 1000
    var gamma = 0.5
    var minimumLearningRate = 0.0

    // training
    var epochs = 15
    var batchSize = 64
    var bucketKiB = defaultBucketKiB
    var reduction = GradientReducer.Strategy.sharded
    var blasThreads = 0
    var targetAccuracy = 0.0

    // gradient check
    var gradcheckEnabled = false
    var gradcheckSamples = 8
    var gradcheckEpsilon = 1e-4
    var gradcheckBatch = 4
    var gradcheckAll = false
    var gradcheckPolicy = GradcheckPolicy.abort

    // logging
    var logInterval = 100

    // checkpoints and faults
    var checkpointEverySteps = 500
    var checkpointEverySeconds = 0.0
    var checkpointKeep = 3
    var checkpointMaxFailures = 3
    var numericsPolicy = NumericsPolicy.stop
    var maxSkippedSteps = 10
    var replicaCheckEvery = 500
    var watchdogSeconds = 300.0

    // timeline
    var timelineSteps = 0
    var timelineWarmupSteps = 10

    /// Gradient buckets of 256 KiB, from the sweep in BENCHMARKS.md (tables 2 and 4): from 256 KiB up the nonblocking
    /// allreduce runs at MPI_Allreduce's speed, and the benchmark and default models still split into several
    /// buckets. On 2 ranks sharing 2 cores the step is level with one bucket after backward, with either reduction
    /// (the copies are CPU work and no core is idle); buckets are kept for nodes where the network moves the data
    /// while backward runs. 0 means one bucket after backward.
    static let defaultBucketKiB = 256

    enum DataFormat: String, CaseIterable { case idx, npy, hdf5 }
    /// standardize: mean 0, std 1 from training-set statistics; scale: x / 255 for bytes; none: raw values.
    enum Normalization: String, CaseIterable { case standardize, scale, none }
    /// What happens to the samples that do not fill a last global batch: dropped (each epoch reshuffles, so
    /// different samples are dropped each time), or wrapped around from the start of the permutation. `auto`, the
    /// default, drops them unless the training set does not fill one global batch, which dropping would make an
    /// error (`resolvedRemainder`).
    enum Remainder: String, CaseIterable { case auto, drop, wrap }
    enum ScheduleName: String, CaseIterable { case constant, step, cosine }
    /// `schedule.warmup_steps`: a number of steps, or `auto`, the default (`resolvedWarmupSteps`). The default is a
    /// value of its own rather than an absent key because config.yaml lists every key and a resume reads it: a
    /// resumed run must see `auto` again to compute the warmup of the run it continues.
    enum Warmup: Equatable { case auto, steps(Int) }
    /// `auto`'s warmup on a long run.
    static let defaultWarmupSteps = 200
    /// `auto` warms up over at most 1/this of the run's steps, so a short run does not spend itself below its peak
    /// rate (a tenth, as common recipes do, e.g. Hugging Face's warmup_ratio 0.1), and a cosine run always has steps
    /// left after its warmup. Runs of 2,000 steps or more keep the full `defaultWarmupSteps`.
    static let autoWarmupRunDivisor = 10
    enum GradcheckPolicy: String, CaseIterable { case abort, warn }
    /// stop: checkpoint the last good state and stop with an error; skip: drop the step on every rank.
    enum NumericsPolicy: String, CaseIterable { case stop, skip }
    /// local: each rank normalises over its own batch (PyTorch DDP's default); sync: over the global batch
    /// (SyncBatchNorm), so N ranks of batch b train the model one rank of batch N b trains.
    enum BatchNormMode: String, CaseIterable { case local, sync }

    // MARK: - The keys

    struct Key: Sendable {
        let path: String
        let help: String
        let read: @Sendable (inout Configuration, Node) -> Bool
        let write: @Sendable (Configuration) -> Node
        let typeName: String
    }

    static let keys: [Key] = [
        key("seed", \.seed, "seed of every random stream: initialisation, shuffling, dropout, gradient-check samples"),
        key("data.format", \.dataFormat, "idx (MNIST-style, raw or .gz), npy, or hdf5 (data keys as FILE.h5:/DATASET)"),
        key("data.train_features", \.trainFeatures,
            "training inputs: IDX images, or a .npy array [N, ...], a directory of .npy shards or a glob (train-*.npy)"),
        key("data.train_labels", \.trainLabels, "training labels: IDX or .npy [N] (one file per features shard, in order)"),
        key("data.test_features", \.testFeatures, "test inputs"),
        key("data.test_labels", \.testLabels, "test labels"),
        key("data.mmap", \.dataMmap,
            "npy: map raw uint8/float32 files read-only (shared by a node's ranks through the page cache) instead of reading them"),
        key("data.prefetch", \.dataPrefetch,
            "batches a background thread gathers (reads, normalises, augments) ahead of the step; 0 gathers in the step"),
        key("data.normalize", \.normalization, "standardize (training-set mean/std), scale (x/255) or none"),
        key("data.remainder", \.remainder, "drop or wrap the samples that do not fill the last global batch; auto: drop, "
            + "unless the training set does not fill one global batch"),
        key("data.augment.crop_padding", \.augmentCropPadding,
            "images, training only: pad with this many zeros on each side, then crop a random window of the image's size (0 = off)"),
        key("data.augment.flip", \.augmentFlip, "images, training only: mirror left-right with probability 1/2"),
        key("data.augment.erase", \.augmentErase,
            "images, training only: the probability of erasing a random rectangle (2 to 33% of the image) to 0 "
                + "after normalisation, as torchvision's RandomErasing (0 = off)"),
        key("model.inputs", \.inputs, "input width; 0 takes it from the data, anything else must match the data"),
        key("model.classes", \.classes, "output width; 0 takes max label + 1 from the training labels"),
        key("model.hidden", \.hidden, "widths of the hidden layers of the MLP"),
        key("model.activation", \.activation, "the activation after each hidden layer: a model.layers entry such as relu, gelu or leaky_relu 0.2"),
        key("model.dropout", \.dropout, "drop probability after every hidden activation (0 = none)"),
        Key(path: "model.layers",
            help: "explicit layer list overriding hidden/activation/dropout, e.g. [linear 512, gelu, dropout 0.1, linear 256, relu]; "
                + "the output layer is added; a residual block is a mapping {residual: [ENTRY, ...], shortcut: [ENTRY, ...]}",
            read: { config, node in
                guard case let .sequence(items) = node else { return false }
                var entries: [String] = []
                for item in items {
                    guard let text = layerEntryText(item) else { return false }
                    entries.append(text)
                }
                config.layers = entries
                return true
            },
            write: { $0.layers.node }, typeName: "a list of layer entries"),
        key("model.init", \.initialization, "auto, kaiming_normal, kaiming_uniform, xavier_normal or xavier_uniform"),
        key("model.loss", \.loss, "cross_entropy or mse"),
        key("model.label_smoothing", \.labelSmoothing,
            "cross_entropy only: targets (1 - s) onehot + s / classes, as PyTorch's label_smoothing (0 = off)"),
        key("model.batchnorm", \.batchNorm,
            "local (each rank's batch; rank 0's running statistics are evaluated and saved) or sync (the global batch)"),
        key("optimizer.name", \.optimizer, "sgd, adam or adamw"),
        key("optimizer.lr", \.learningRate, "peak learning rate, for the global batch"),
        key("optimizer.momentum", \.momentum, "SGD momentum (0 = plain SGD)"),
        key("optimizer.nesterov", \.nesterov, "Nesterov momentum (SGD)"),
        key("optimizer.beta1", \.beta1, "Adam beta1"),
        key("optimizer.beta2", \.beta2, "Adam beta2"),
        key("optimizer.eps", \.epsilon, "Adam epsilon"),
        key("optimizer.weight_decay", \.weightDecay, "L2 (sgd, adam) or decoupled (adamw) weight decay"),
        key("optimizer.clip_norm", \.clipNorm, "clip the global gradient norm to this (0 = off)"),
        key("schedule.name", \.schedule, "constant, step or cosine"),
        key("schedule.warmup_steps", \.warmupSteps,
            "linear warmup steps; auto = \(defaultWarmupSteps), but at most a tenth of the run's steps (a set value is used as it is)"),
        key("schedule.step_size", \.stepSize, "step schedule: steps between decays"),
        key("schedule.gamma", \.gamma, "step schedule: decay factor"),
        key("schedule.min_lr", \.minimumLearningRate, "cosine schedule: final learning rate"),
        key("training.epochs", \.epochs, "passes over the training set"),
        key("training.batch_size", \.batchSize, "samples per rank per step (global batch = this x ranks)"),
        key("training.bucket_kib", \.bucketKiB, "gradient bucket size in KiB, sent while backward runs (0 = one bucket after backward)"),
        key("training.reduction", \.reduction,
            "sharded (each rank updates its part of the parameters, then they are gathered) or allreduce (every rank updates all)"),
        key("training.target_accuracy", \.targetAccuracy, "stop after the first epoch whose test accuracy reaches this (0 = off)"),
        key("training.blas_threads", \.blasThreads, "OpenBLAS threads per rank (0 = 1 when ranks share a node, else all cores)"),
        key("gradcheck.enabled", \.gradcheckEnabled, "gradient-check before the first step (rank 0; every rank with model.batchnorm=sync)"),
        key("gradcheck.samples", \.gradcheckSamples, "coordinates sampled per tensor"),
        key("gradcheck.eps", \.gradcheckEpsilon, "finite-difference step"),
        key("gradcheck.batch", \.gradcheckBatch, "examples in the check batch"),
        key("gradcheck.all", \.gradcheckAll, "check every coordinate instead of sampling"),
        key("gradcheck.policy", \.gradcheckPolicy, "abort (stop every rank on failure) or warn"),
        key("logging.interval", \.logInterval, "steps between progress lines and metrics records"),
        key("checkpoint.every_steps", \.checkpointEverySteps, "steps between checkpoints (also one at every epoch end; 0 = epoch ends only)"),
        key("checkpoint.every_seconds", \.checkpointEverySeconds,
            "seconds between checkpoints by rank 0's clock, at the same step on every rank (0 = off; with every_steps, whichever comes first)"),
        key("checkpoint.keep", \.checkpointKeep, "checkpoints kept in RUN_DIR/checkpoints (older ones are deleted)"),
        key("checkpoint.max_failures", \.checkpointMaxFailures,
            "checkpoints in a row that may fail to be written (a full disk) before the run stops failed; each is retried at the next"),
        key("numerics.policy", \.numericsPolicy, "on a NaN or infinite loss or gradient on any rank: stop (checkpoint, error) or skip the step"),
        key("numerics.max_skips", \.maxSkippedSteps, "skip policy: stop after this many skipped steps"),
        key("training.replica_check_every", \.replicaCheckEvery, "steps between parameter checksum comparisons across ranks (0 = off)"),
        key("watchdog.timeout_seconds", \.watchdogSeconds, "abort the job when a collective has not completed for this long (0 = off)"),
        key("timeline.steps", \.timelineSteps,
            "record what every rank does for this many steps into RUN_DIR/timeline.json, a Chrome trace (0 = off; --timeline)"),
        key("timeline.warmup_steps", \.timelineWarmupSteps, "steps this process runs before the timeline starts recording"),
    ]

    static func key<V: ConfigValue>(
        _ path: String, _ keyPath: WritableKeyPath<Configuration, V> & Sendable, _ help: String
    ) -> Key {
        Key(path: path, help: help,
            read: { config, node in
                guard let value = V(node: node) else { return false }
                config[keyPath: keyPath] = value
                return true
            },
            write: { $0[keyPath: keyPath].node },
            typeName: V.typeName)
    }
}

// MARK: - Reading

struct ConfigError: Error, CustomStringConvertible {
    let description: String
}

extension Configuration {
    /// Reads a YAML file (or nothing: all defaults) and applies `overrides` ("key=value", value in YAML syntax).
    /// Unknown keys, wrong types and unparsable values are errors naming the file, line and key.
    static func load(file: String?, overrides: [String]) throws -> Configuration {
        guard let file else { return try load(text: nil, origin: "", overrides: overrides) }
        return try load(text: try configurationText(file), origin: file, overrides: overrides)
    }

    /// The text of a configuration file, or an error saying why there is none: no such file, a directory, not
    /// readable, or not UTF-8 (the line of the first byte that is not).
    static func configurationText(_ file: String) throws -> String {
        var isDirectory: ObjCBool = false
        guard FileManager.default.fileExists(atPath: file, isDirectory: &isDirectory) else {
            throw ConfigError(description: "\(file): no such configuration file")
        }
        guard !isDirectory.boolValue else { throw ConfigError(description: "\(file): a directory, not a configuration file") }
        // Read to its end, so that a pipe (`-c <(...)`, /dev/stdin) works as a file does.
        let data: [UInt8]
        do { data = try readWholeFile(path: file, maxBytes: 64 << 20, advice: "not a configuration file") } catch let error as DataError {
            throw ConfigError(description: "\(file): cannot read the configuration file (\(error.reason))")
        }
        guard let text = String(validating: data, as: UTF8.self) else {
            // The first line that does not decode (a newline is one byte in UTF-8, so no character spans two lines).
            let lines = data.split(separator: UInt8(ascii: "\n"), omittingEmptySubsequences: false)
            let line = (lines.firstIndex { String(validating: $0, as: UTF8.self) == nil } ?? 0) + 1
            throw ConfigError(description: "\(file):\(line): not UTF-8 text (YAML files are UTF-8; re-save it so, e.g. "
                + "iconv -f latin1 -t utf-8)")
        }
        return text
    }

    /// `load(file:overrides:)` from the file's text (nil: all defaults); `origin` names it in errors.
    static func load(text: String?, origin file: String, overrides: [String]) throws -> Configuration {
        var tree: [String: (node: Node, origin: String)] = [:]
        if let text {
            let root: Node?
            do { root = try Yams.compose(yaml: text) } catch {
                throw ConfigError(description: "\(file): not valid YAML: \(error)")
            }
            if let root {
                guard case .mapping = root else {
                    throw ConfigError(description: "\(file): the top level must be a mapping of keys")
                }
                try flatten(root, prefix: "", file: file, into: &tree)
            }
        }
        for override in overrides {
            guard let equals = override.firstIndex(of: "="), equals != override.startIndex else {
                throw ConfigError(description: "--set \(override): expected key=value, e.g. --set optimizer.lr=0.1")
            }
            let path = String(override[..<equals]).trimmingCharacters(in: .whitespaces)
            let text = String(override[override.index(after: equals)...])
            let node: Node
            do { node = try Yams.compose(yaml: text) ?? Node("") } catch {
                throw ConfigError(description: "--set \(path): cannot parse value \(text.debugDescription): \(error)")
            }
            if case let .mapping(inner) = node, !inner.isEmpty {
                try flatten(node, prefix: path + ".", file: "--set", into: &tree)
            } else {
                tree[path] = (node, "--set")
            }
        }
        var config = Configuration()
        let known = Dictionary(uniqueKeysWithValues: keys.map { ($0.path, $0) })
        for (path, entry) in tree.sorted(by: { $0.key < $1.key }) {
            guard let key = known[path] else {
                // A section written as a value (`model: 5`): the section is known, the value is not a mapping.
                let section = keys.filter { $0.path.hasPrefix(path + ".") }.map(\.path)
                if !section.isEmpty, case let .mapping(inner) = entry.node, inner.isEmpty { continue }
                if !section.isEmpty {
                    throw ConfigError(description: "\(entry.origin)\(location(entry.node)): \(path): expected a mapping of its keys "
                        + "(\(section.prefix(3).joined(separator: ", "))\(section.count > 3 ? ", ..." : "")), got \(describe(entry.node))")
                }
                let suggestion = keys.map(\.path).min { editDistance($0, path) < editDistance($1, path) }!
                throw ConfigError(description: "\(entry.origin)\(location(entry.node)): unknown key '\(path)'"
                    + (editDistance(suggestion, path) <= 3 ? " (did you mean '\(suggestion)'?)" : ""))
            }
            guard key.read(&config, entry.node) else {
                throw ConfigError(description: "\(entry.origin)\(location(entry.node)): \(path): expected \(key.typeName), "
                    + "got \(describe(entry.node))")
            }
        }
        return config
    }

    private static func flatten(_ node: Node, prefix: String, file: String, into tree: inout [String: (node: Node, origin: String)]) throws {
        guard case let .mapping(mapping) = node else { return }
        for (keyNode, value) in mapping {
            guard let name = keyNode.string else {
                throw ConfigError(description: "\(file)\(location(keyNode)): keys must be strings")
            }
            let path = prefix + name
            // An empty mapping (`lr: {}`, `typo: {}`) is kept as a value, so that a key or an unknown name given one is
            // an error like any other (it set nothing, silently); an empty section (`optimizer: {}`) sets nothing.
            if case let .mapping(inner) = value, !inner.isEmpty {
                try flatten(value, prefix: path + ".", file: file, into: &tree)
            } else {
                // One key written twice in a file, as `optimizer.lr: 0.1` and `optimizer: {lr: 0.2}`: the later one won
                // without a word (YAML refuses only the same spelling twice). --set still overrides the file.
                if let earlier = tree[path], earlier.origin == file, file != "--set" {
                    throw ConfigError(description: "\(file)\(location(keyNode)): \(path) is given twice (also at line "
                        + "\(earlier.node.mark.map { "\($0.line)" } ?? "?"))")
                }
                tree[path] = (value, file)
            }
        }
    }

    private static func location(_ node: Node) -> String {
        node.mark.map { ":\($0.line)" } ?? ""
    }

    private static func describe(_ node: Node) -> String {
        switch node {
        case let .scalar(s): s.string.debugDescription
        case .sequence: "a list"
        case .mapping: "a mapping"
        case .alias: "an alias"
        }
    }

    /// The keys whose values differ from `earlier`'s, in the order of `keys`, with both values as YAML.
    func differences(from earlier: Configuration) -> [(key: String, earlier: String, now: String)] {
        func text(_ node: Node) -> String {
            ((try? Yams.serialize(node: node)) ?? "?").trimmingCharacters(in: .whitespacesAndNewlines)
        }
        return Self.keys.compactMap { key in
            let (before, now) = (text(key.write(earlier)), text(key.write(self)))
            return before == now ? nil : (key.path, before, now)
        }
    }

    /// `differences(from:)` as "key: old -> new".
    func changes(since earlier: Configuration) -> [String] {
        differences(from: earlier).map { "\($0.key): \($0.earlier) -> \($0.now)" }
    }

    /// Keys a rank may set for itself: where it reads the data (a node's own copy; the data's contents are compared
    /// across ranks instead) and how it uses its own cores and memory. Every other key must be the same on every rank.
    static let perRankKeys: Set<String> = [
        "data.train_features", "data.train_labels", "data.test_features", "data.test_labels", "data.mmap", "data.prefetch",
        "training.blas_threads",
    ]

    /// The resolved configuration as YAML, every key present.
    var yaml: String {
        // Dotted paths become nested mappings (data.augment.flip under data: augment:), in the order of `keys`.
        func mapping(_ entries: [(path: [String], value: Node)]) -> Node {
            var names: [String] = []
            var groups: [String: [(path: [String], value: Node)]] = [:]
            for entry in entries {
                if groups[entry.path[0]] == nil { names.append(entry.path[0]) }
                groups[entry.path[0], default: []].append((Array(entry.path.dropFirst()), entry.value))
            }
            return Node(names.map { name in
                let group = groups[name]!
                return (Node(name), group.count == 1 && group[0].path.isEmpty ? group[0].value : mapping(group))
            })
        }
        let root = mapping(Self.keys.map { (path: $0.path.split(separator: ".").map(String.init), value: $0.write(self)) })
        return (try? Yams.serialize(node: root, sortKeys: false)) ?? ""
    }
}

func editDistance(_ a: String, _ b: String) -> Int {
    let a = Array(a), b = Array(b)
    var row = Array(0...b.count)
    for i in 1...max(1, a.count) where !a.isEmpty {
        var previous = row[0]
        row[0] = i
        for j in 1...max(1, b.count) where !b.isEmpty {
            let old = row[j]
            row[j] = min(row[j] + 1, row[j - 1] + 1, previous + (a[i - 1] == b[j - 1] ? 0 : 1))
            previous = old
        }
    }
    return row[b.count]
}

// MARK: - Values

extension Configuration {
    /// One `model.layers` item as its entry text: a string as it is, a block's mapping `{residual: [a, b],
    /// shortcut: [c]}` as "residual [a, b] shortcut [c]" (its kind parses that, and names what is wrong in it), a list
    /// inside as "[a, b]". Nil for what no entry can be (an alias, a key that is not a string).
    static func layerEntryText(_ node: Node) -> String? {
        switch node {
        case let .scalar(s): return s.string
        case let .sequence(items):
            let texts = items.compactMap(layerEntryText)
            return texts.count == items.count ? "[" + texts.joined(separator: ", ") + "]" : nil
        case let .mapping(mapping):
            // The block's name first, whatever order the YAML wrote its keys in.
            var parts: [(String, String)] = []
            for (key, value) in mapping {
                guard let name = key.string, let text = layerEntryText(value) else { return nil }
                parts.append((name, name + " " + text))
            }
            return (parts.filter { $0.0 == "residual" } + parts.filter { $0.0 != "residual" }).map(\.1).joined(separator: " ")
        case .alias: return nil
        }
    }
}

protocol ConfigValue: SendableMetatype {
    init?(node: Node)
    var node: Node { get }
    static var typeName: String { get }
}

extension Int: ConfigValue {
    init?(node: Node) {
        guard case let .scalar(s) = node, s.style == .plain, let v = node.int else { return nil }
        _ = s
        self = v
    }
    var node: Node { Node(String(self)) }
    static var typeName: String { "an integer" }
}

extension Double: ConfigValue {
    init?(node: Node) {
        guard case let .scalar(s) = node, s.style == .plain, let v = node.float ?? node.int.map(Double.init) else { return nil }
        _ = s
        self = v
    }
    var node: Node { Node("\(self)") }
    static var typeName: String { "a number" }
}

extension Bool: ConfigValue {
    init?(node: Node) {
        guard let v = node.bool else { return nil }
        self = v
    }
    var node: Node { Node(self ? "true" : "false") }
    static var typeName: String { "true or false" }
}

extension String: ConfigValue {
    init?(node: Node) {
        guard case let .scalar(s) = node else { return nil }
        self = s.string
    }
    var node: Node { Node(self, Tag(.str), .doubleQuoted) }
    static var typeName: String { "a string" }
}

extension Array: ConfigValue where Element: ConfigValue {
    init?(node: Node) {
        guard case let .sequence(items) = node else { return nil }
        var values: [Element] = []
        for item in items {
            guard let v = Element(node: item) else { return nil }
            values.append(v)
        }
        self = values
    }
    var node: Node { Node(map(\.node), Tag(.seq), .flow) }
    static var typeName: String {
        "a list of \(Element.typeName.replacingOccurrences(of: "an ", with: "").replacingOccurrences(of: "a ", with: ""))s"
    }
}

extension Configuration.Warmup: ConfigValue {
    init?(node: Node) {
        if case let .scalar(s) = node, s.string == "auto" {
            self = .auto
        } else if let steps = Int(node: node) {
            self = .steps(steps)
        } else {
            return nil
        }
    }
    var node: Node {
        switch self {
        case .auto: Node("auto")
        case let .steps(steps): steps.node
        }
    }
    static var typeName: String { "an integer or auto" }
}

/// Enumerations read from their raw string; the error lists the choices.
protocol ConfigChoice: ConfigValue, RawRepresentable<String>, CaseIterable {}
extension ConfigChoice {
    init?(node: Node) {
        guard case let .scalar(s) = node, let v = Self(rawValue: s.string) else { return nil }
        self = v
    }
    var node: Node { Node(rawValue) }
    static var typeName: String { "one of " + allCases.map(\.rawValue).joined(separator: ", ") }
}

extension Configuration.DataFormat: ConfigChoice {}
extension Configuration.Normalization: ConfigChoice {}
extension Configuration.Remainder: ConfigChoice {}
extension Configuration.ScheduleName: ConfigChoice {}
extension Configuration.GradcheckPolicy: ConfigChoice {}
extension Configuration.NumericsPolicy: ConfigChoice {}
extension Configuration.BatchNormMode: ConfigChoice {}
extension Initialization: ConfigChoice {}
extension LossKind: ConfigChoice {}
extension OptimizerKind: ConfigChoice {}
extension GradientReducer.Strategy: ConfigChoice {}
