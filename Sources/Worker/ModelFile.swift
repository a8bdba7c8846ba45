import Engine
import Foundation

/// What a model file says about its model beyond the tensors: everything needed to use it without bpworker's
/// configuration. `model.safetensors` (format `bpworker-model`, version 2) and checkpoints (`bpworker-checkpoint`,
/// version 2) carry it in the safetensors `__metadata__`, whose values are all strings (lists as JSON, which is
/// also YAML flow syntax). docs/model-files.md documents the same keys:
///
///     layers            ["linear 512", "relu", "linear 256", "relu", "linear 10"]  the whole nn.Sequential in
///                       `model.layers` syntax, the output layer INCLUDED (model.layers takes the list without its
///                       last entry: bpworker adds the output layer)
///     modules           [{"module": "Linear", "args": [784, 512], "kwargs": {}}, ...]  the same list as PyTorch
///                       modules, one per entry of layers: getattr(torch.nn, module)(*args, **kwargs) builds each
///                       (an argument that is itself a module is built first, so blocks nest); from each kind's
///                       `LayerKind.torchModule`, so the README's loader needs no change for a new kind
///     input_shape       [28, 28]        one sample as stored
///     model_input_shape [784]           one sample as the first layer takes it (C order): [C, H, W] for a model
///                                       with a kind that works on images only (convolutions, pooling, dropout2d;
///                                       an [H, W] sample is one channel), else flat
///     input_dtype       uint8           the stored values preprocessing applies to: uint8 = bytes 0..255 (not
///                                       divided by 255); float32 (float32 or float64 files)
///     classes           10              outputs of the last layer
///     loss              cross_entropy   or mse
///     label_smoothing   0.1             only when training smoothed the targets (model.label_smoothing): the loss
///                                       `eval` reports is the one training minimised
///     preprocess        standardize     standardize, scale or none (the configuration's data.normalize)
///     preprocess_scale  model input = float32(raw * preprocess_scale + preprocess_shift), computed in float64,
///     preprocess_shift  raw being the stored value; exactly what bpworker applies, for every kind
///     preprocess_mean   standardize only: the training set's mean and standard deviation of the raw values
///     preprocess_std    (bytes 0..255 for uint8), so that (raw - mean) / std is the same map
///
/// Version 1 model files (and version 1 checkpoints) have none of these keys; version 2 files written before
/// `modules` and `model_input_shape` lack those two, which bpworker itself never reads (it rebuilds the model from
/// `layers`).
struct ModelDescription: Equatable {
    static let modelFormat = "bpworker-model"
    /// 2: the description keys above. 1: parameters, `step`, `world_size`, `model` (a summary) and `config` only.
    static let modelFormatVersion = "2"
    /// The first model and checkpoint format version with the description.
    static let firstDescribedVersion = 2

    enum InputType: String, Equatable {
        /// Bytes 0...255 (IDX files, uint8 .npy).
        case uint8
        /// float32 (or float64 .npy, which bpworker reads as float32).
        case float32

        init(_ data: Dataset) {
            switch data.features.element {
            case .uint8: self = .uint8
            case .float32: self = .float32
            }
        }

        /// What the values are, for errors.
        var values: String {
            switch self {
            case .uint8: "raw bytes 0..255 (uint8)"
            case .float32: "floating-point values (float32, or float64 read as float32)"
            }
        }
    }

    struct Preprocessing: Equatable {
        var kind: Configuration.Normalization
        var scale: Double
        var shift: Double
        /// Raw-value statistics, for `standardize`.
        var mean: Double?
        var std: Double?

        /// Makes `data` gather exactly what training gathered.
        func apply(to data: inout Dataset) {
            data.scale = scale
            data.shift = shift
        }

        /// "standardize: x * 0.0124 + -0.81 = (x - 72.9) / 90.0", x the stored value.
        var summary: String {
            var text = "\(kind.rawValue): x * \(scale) + \(shift)"
            if let mean, let std { text += " = (x - \(mean)) / \(std)" }
            return text
        }
    }

    /// The architecture with its output layer; the initialisation is not recorded (the parameters are).
    var spec: ModelSpec
    var inputShape: [Int]
    var inputType: InputType
    var preprocessing: Preprocessing

    var classes: Int { spec.outputWidth }

    // MARK: - Writing

    /// The description of a model trained on `data` (the training set, normalised as `normalization` says).
    init(spec: ModelSpec, data: Dataset, normalization: Configuration.Normalization) {
        self.spec = spec
        inputShape = data.sampleShape
        inputType = InputType(data)
        let statistics = normalization == .standardize ? data.standardization : nil
        preprocessing = Preprocessing(kind: normalization, scale: data.scale, shift: data.shift,
                                      mean: statistics?.mean, std: statistics?.std)
    }

    /// The `__metadata__` entries, merged into the model file's and each checkpoint's.
    var metadata: [String: String] {
        var entries = [
            "layers": Self.jsonList(spec.layers.map(Self.layerText)),
            "modules": "[" + spec.torchModules.map(\.json).joined(separator: ", ") + "]",
            "input_shape": Self.jsonList(inputShape),
            "model_input_shape": Self.jsonList(spec.inputShape),
            "input_dtype": inputType.rawValue,
            "classes": "\(classes)",
            "loss": spec.loss.rawValue,
            "preprocess": preprocessing.kind.rawValue,
            // Swift prints the shortest decimal that reads back as the same Double, in Swift and Python alike.
            "preprocess_scale": "\(preprocessing.scale)",
            "preprocess_shift": "\(preprocessing.shift)",
        ]
        if spec.labelSmoothing > 0 { entries["label_smoothing"] = "\(spec.labelSmoothing)" }
        if let mean = preprocessing.mean, let std = preprocessing.std {
            entries["preprocess_mean"] = "\(mean)"
            entries["preprocess_std"] = "\(std)"
        }
        return entries
    }

    /// One layer in `model.layers` syntax; `Configuration.modelSpec` reads it back to the same `LayerSpec`.
    static func layerText(_ layer: LayerSpec) -> String { Configuration.layerText(layer) }

    /// `["a", "b"]` or `[28, 28]`: JSON, each item escaped by `JSONEncoder`, and spaced as YAML flow syntax is
    /// usually written, so `--set model.layers=...` takes it as it is.
    static func jsonList(_ items: [some Encodable]) -> String {
        let encoder = JSONEncoder()
        encoder.outputFormatting = .withoutEscapingSlashes
        // A string or an integer always encodes.
        let texts = items.map { String(decoding: (try? encoder.encode($0)) ?? Data(), as: UTF8.self) }
        return "[" + texts.joined(separator: ", ") + "]"
    }

    // MARK: - Reading

    /// Most layers a description may list: far beyond any real model, and it bounds what an untrusted file can make
    /// bpworker allocate before its tensors are checked.
    static let maxLayers = 10_000

    /// Reads the description from a file's metadata (untrusted): every key must be present and well formed.
    /// Errors name the file and the key; a file from before descriptions says so and what to use instead.
    init(metadata: [String: String], path: String) throws {
        func fail(_ reason: String) -> DataError { DataError(path: path, reason: reason) }
        let format = metadata["format"]
        guard format == Self.modelFormat || format == Checkpointer.format else {
            throw fail("not a bpworker model file: its safetensors metadata has "
                + (format.map { "format '\($0)'" } ?? "no 'format'")
                + " (bpworker writes '\(Self.modelFormat)' or '\(Checkpointer.format)'). For parameters saved by other "
                + "tools, describe the model with --set model.* and use: bpworker eval --parameters \(path)")
        }
        let version = metadata["format_version"] ?? "1"
        guard let versionNumber = Int(version) else { throw fail("metadata 'format_version' is '\(version)', not a number") }
        if versionNumber < Self.firstDescribedVersion || metadata["layers"] == nil {
            throw fail("no layer list in its metadata (\(format!) format_version \(version), written by a bpworker that "
                + "did not record the model), so the model cannot be built from the file alone. Evaluate it with its "
                + "run's configuration instead: bpworker eval --run-dir RUN_DIR --parameters \(path)")
        }
        let newest = format == Self.modelFormat ? Self.modelFormatVersion : Checkpointer.formatVersion
        guard versionNumber <= Int(newest)! else {
            throw fail("\(format!) format_version \(version) was written by a newer bpworker; this one reads up to \(newest)")
        }
        func value(_ key: String) throws -> String {
            guard let v = metadata[key] else { throw fail("metadata '\(key)' is missing") }
            return v
        }

        let layerTexts = try Self.stringList(try value("layers"), key: "layers", path: path)
        guard !layerTexts.isEmpty, layerTexts.count <= Self.maxLayers else {
            throw fail("metadata 'layers' lists \(layerTexts.count) layers (1 to \(Self.maxLayers))")
        }
        inputShape = try Self.shape(try value("input_shape"), path: path)
        guard let classes = Int(try value("classes")), classes >= 1 else {
            throw fail("metadata 'classes' is '\(metadata["classes"]!)', not a positive integer")
        }
        guard let loss = LossKind(rawValue: try value("loss")) else {
            throw fail("metadata 'loss' is '\(metadata["loss"]!)' (\(LossKind.allCases.map(\.rawValue).joined(separator: " or ")))")
        }
        let labelSmoothing = try metadata["label_smoothing"].map { text in
            guard let s = Double(text), s >= 0, s < 1 else {
                throw fail("metadata 'label_smoothing' is '\(text)', not a number in [0, 1)")
            }
            return s
        } ?? 0
        guard let type = InputType(rawValue: try value("input_dtype")) else {
            throw fail("metadata 'input_dtype' is '\(metadata["input_dtype"]!)' (uint8 or float32)")
        }
        inputType = type
        guard let preprocessing = try Self.recordedPreprocessing(metadata, path: path) else {
            throw fail("metadata 'preprocess' is missing")
        }
        self.preprocessing = preprocessing

        // The list is the model.layers list plus the output layer: rebuild it with the very parser that
        // model.layers goes through, so what a file records and what a configuration says mean the same.
        guard layerTexts.last == "linear \(classes)" else {
            throw fail("metadata 'layers' must end with the output layer 'linear \(classes)' (classes is \(classes)), "
                + "it ends with '\(layerTexts.last ?? "")'")
        }
        var configuration = Configuration()
        configuration.hidden = []
        configuration.layers = Array(layerTexts.dropLast())
        configuration.loss = loss
        configuration.labelSmoothing = labelSmoothing
        do {
            spec = try configuration.modelSpec(sampleShape: inputShape, classes: classes)
        } catch {
            // The error quotes the entry (cut short); the whole list may be long (a forged one ran to 110 KB).
            let layers = try value("layers")
            throw fail("metadata 'layers' \(layers.count <= 200 ? layers : layers.prefix(160) + "... (\(layers.count) characters)"): \(error)")
        }
    }

    /// The recorded preprocessing; nil when the file records none (version 1 files, files from other tools).
    static func recordedPreprocessing(_ metadata: [String: String], path: String) throws -> Preprocessing? {
        guard let kindName = metadata["preprocess"] else { return nil }
        func fail(_ reason: String) -> DataError { DataError(path: path, reason: reason) }
        guard let kind = Configuration.Normalization(rawValue: kindName) else {
            throw fail("metadata 'preprocess' is '\(kindName)' (standardize, scale or none)")
        }
        func number(_ key: String, required: Bool) throws -> Double? {
            guard let text = metadata[key] else {
                if required { throw fail("metadata '\(key)' is missing (preprocess is \(kindName))") }
                return nil
            }
            guard let v = Double(text), v.isFinite else { throw fail("metadata '\(key)' is '\(text)', not a finite number") }
            return v
        }
        let standardized = kind == .standardize
        let scale = try number("preprocess_scale", required: true)!
        let shift = try number("preprocess_shift", required: true)!
        let mean = try number("preprocess_mean", required: standardized)
        let std = try number("preprocess_std", required: standardized)
        guard scale != 0 else { throw fail("metadata 'preprocess_scale' is 0: every input would look the same") }
        return Preprocessing(kind: kind, scale: scale, shift: shift, mean: mean, std: std)
    }

    static func stringList(_ text: String, key: String, path: String) throws -> [String] {
        guard let object = try? JSONSerialization.jsonObject(with: Data(text.utf8)), let list = object as? [String] else {
            throw DataError(path: path, reason: "metadata '\(key)' is not a JSON list of strings: \(text)")
        }
        return list
    }

    /// Most values one sample may hold (2^31): beyond any data set bpworker can load, and it bounds allocations.
    private static let maxSampleValues = 1 << 31

    private static func shape(_ text: String, path: String) throws -> [Int] {
        let fail = DataError(path: path, reason: "metadata 'input_shape' is not a JSON list of positive integers: \(text)")
        guard let object = try? JSONSerialization.jsonObject(with: Data(text.utf8)), let list = object as? [NSNumber],
              !list.isEmpty else { throw fail }
        var shape: [Int] = []
        var count = 1
        for number in list {
            // NSNumber also holds booleans and fractions: only whole positive numbers are dimensions.
            guard type(of: number) != type(of: NSNumber(value: true)), let d = Int(exactly: number.doubleValue), d >= 1 else { throw fail }
            let (product, overflow) = count.multipliedReportingOverflow(by: d)
            guard !overflow, product <= maxSampleValues else {
                throw DataError(path: path, reason: "metadata 'input_shape' \(text) holds more than \(maxSampleValues) values")
            }
            count = product
            shape.append(d)
        }
        return shape
    }

    // MARK: - Using

    /// Checks that `data` holds samples this model takes: the same stored type, and the same number of values in a
    /// shape that matches (`samplesMatch`). The error names the data file, the model file and both sides.
    func checkInput(_ data: Dataset, modelPath: String) throws {
        let dataType = InputType(data)
        let inputCount = inputShape.reduce(1, *)
        guard data.featureCount == inputCount && samplesMatch(data.sampleShape, inputShape) else {
            var hint = ""
            if data.count == inputShape.first, Array(data.sampleShape) == Array(inputShape.dropFirst()) {
                hint = "; for a single sample, add a leading dimension: shape [1, \(inputShape.map(String.init).joined(separator: ", "))]"
            }
            throw DataError(path: data.name, reason: "samples are shaped \(data.sampleShape) (\(data.featureCount) values) "
                + "but the model in \(modelPath) takes \(inputShape) (\(inputCount) values)" + hint)
        }
        guard dataType == inputType else {
            throw DataError(path: data.name, reason: "holds \(dataType.values) but the model in \(modelPath) was "
                + "trained on \(inputType.values), and its preprocessing (\(preprocessing.kind.rawValue)) applies to those")
        }
    }
}

/// Whether samples of shape `a` can stand for samples of shape `b` (the same number of values assumed): the same
/// shape up to leading sizes of 1 (an image [28, 28] is [1, 28, 28], one channel), or either one flat (an MLP
/// trained on [784] takes [28, 28] images, and the other way round).
func samplesMatch(_ a: [Int], _ b: [Int]) -> Bool {
    func withoutLeadingOnes(_ shape: [Int]) -> ArraySlice<Int> { shape.drop { $0 == 1 } }
    return a.count == 1 || b.count == 1 || withoutLeadingOnes(a) == withoutLeadingOnes(b)
}

/// A bpworker model file or checkpoint read as untrusted input and checked against its own description.
enum ModelFile {
    /// The file is read whole into memory (and then the model built beside it, which the memory check counts): one
    /// larger than the memory there is to read it into is refused before a byte of it is read, where the OOM killer
    /// ended the reading rank half-way with no word of why.
    static func requireRoom(path: String, limits: MemoryLimits) throws {
        guard let size = (try? FileManager.default.attributesOfItem(atPath: path))?[.size] as? Int else { return }
        let bytes = Double(size)
        let resident = bytes + MemoryEstimate.pageTableBytes(forAllocating: bytes)
        guard let passed = limits.addressSpaceLimitPassed(by: bytes) ?? limits.nodeLimitPassed(by: resident) else { return }
        throw DataError(path: path, reason: "the file is read whole into memory (\(bytesText(bytes))), but \(passed)")
    }

    /// Reads `path`, verifies its checksums (`unverified` is the note for a file without any), reads its
    /// description, and checks that its tensors are exactly the described model's (names and shapes; a checkpoint's
    /// optimizer state aside), before anything of the model's size is allocated.
    static func open(path: String, limits: MemoryLimits = .read()) throws
        -> (file: SafeTensorsFile, description: ModelDescription, unverified: String?) {
        guard FileManager.default.fileExists(atPath: path) else { throw DataError(path: path, reason: "no such file") }
        try requireRoom(path: path, limits: limits)
        let file: SafeTensorsFile
        do { file = try SafeTensorsFile(path: path) } catch let error as DataError {
            throw DataError(path: path, reason: "not a valid safetensors file: \(error.reason)")
        }
        let unverified = try verified(file)
        let description = try ModelDescription(metadata: file.metadata, path: path)
        let layout = description.spec.parameterTable
        for info in layout {
            guard file.tensors[info.name] != nil else {
                throw DataError(path: path, reason: "missing tensor '\(info.name)' of the model its metadata describes "
                    + "(\(description.spec.summary))")
            }
            try file.expect(info.name, shape: info.shape)
        }
        // Buffers (batch norm's running statistics) are read and checked with the model (`readBuffers`).
        let buffers = description.spec.bufferTable
        if let missing = buffers.first(where: { file.tensors[$0.name] == nil }) {
            throw DataError(path: path, reason: "missing tensor '\(missing.name)' of the model its metadata describes "
                + "(\(description.spec.summary))")
        }
        let expected = Set((layout + buffers).map(\.name))
        if let extra = file.names.first(where: { !expected.contains($0) && !$0.hasPrefix("optimizer.") }) {
            throw DataError(path: path, reason: "tensor '\(extra)' is not part of the model its metadata describes "
                + "(\(description.spec.summary))")
        }
        return (file, description, unverified)
    }

    /// Verifies `file` against its checksums: throws for a damaged file; returns a one-line note for a file without
    /// checksums (written by an earlier version, or by another program), nil for an intact one.
    static func verified(_ file: SafeTensorsFile) throws -> String? {
        switch try file.verify() {
        case .intact: nil
        case .unchecked: "\(file.path): no checksums (written by an earlier bpworker or another program): loaded unverified"
        }
    }

    /// A model of `description` holding the file's parameters.
    static func model(_ file: SafeTensorsFile, _ description: ModelDescription, batchCapacity: Int) throws -> Model<Float> {
        let model = try Model<Float>(spec: description.spec, batchCapacity: batchCapacity)
        try readState(from: file, into: model)
        return model
    }
}
