import Engine

/// Adds one flat buffer of the model's layout to `writer`, tensor by tensor, under `prefix` + the tensor's
/// PyTorch name: the parameters themselves (prefix "") or an optimizer state ("optimizer.exp_avg.").
func addTensors(of buffer: UnsafeMutableBufferPointer<Float>, layout: [ParameterInfo], prefix: String = "",
                to writer: inout SafeTensorsWriter) {
    for info in layout {
        writer.add(name: prefix + info.name, shape: info.shape, floats: UnsafeBufferPointer(rebasing: buffer[info.range]))
    }
}

/// The inverse of `addTensors`: every tensor must be present with exactly the layout's shape. Returns the names read.
@discardableResult
func readTensors(from file: SafeTensorsFile, layout: [ParameterInfo], prefix: String = "",
                 into buffer: UnsafeMutableBufferPointer<Float>) throws -> [String] {
    for info in layout {
        try file.expect(prefix + info.name, shape: info.shape)
        let values = try file.floats(prefix + info.name)
        values.withUnsafeBufferPointer { buffer.baseAddress!.advanced(by: info.offset).update(from: $0.baseAddress!, count: info.count) }
    }
    return layout.map { prefix + $0.name }
}

/// Writes a model's parameters as safetensors with PyTorch nn.Sequential names and shapes, so
/// `model.load_state_dict(safetensors.torch.load_file(path))` works on the matching nn.Sequential.
func writeParameters(of model: Model<Float>, to path: String, metadata: [String: String]) throws {
    var writer = SafeTensorsWriter()
    addTensors(of: model.parameters, layout: model.parameterTable, to: &writer)
    writer.metadata = metadata
    try writer.write(to: path)
}

/// Reads parameters saved by bpworker (or by PyTorch/NumPy with the same names and shapes) into `model`.
/// Every tensor of the model must be present with its exact shape; extra tensors are an error too, since
/// they mean the file belongs to another architecture.
func loadParameters(into model: Model<Float>, from path: String) throws {
    let file = try SafeTensorsFile(path: path)
    let expected = Set(try readTensors(from: file, layout: model.parameterTable, into: model.parameters))
    if let extra = file.names.first(where: { !expected.contains($0) && !$0.hasPrefix("optimizer.") }) {
        throw ConfigError(description: "\(path): tensor '\(extra)' is not part of the model \(model.spec.summary)")
    }
}

/// A hash of the model's tensor names, shapes and layers: checkpoints and ranks compare it to tell whether two
/// models have the same layout.
func layoutHash(_ model: Model<Float>) -> UInt64 {
    let layout = model.parameterTable.map { "\($0.name)\($0.shape)" }.joined(separator: ";") + model.spec.summary
    return fnv1a(Array(layout.utf8))
}
