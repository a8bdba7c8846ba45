import Engine

/// Writes a model's parameters as safetensors with PyTorch nn.Sequential names and shapes, so
/// `model.load_state_dict(safetensors.torch.load_file(path))` works on the matching nn.Sequential.
func writeParameters(of model: Model<Float>, to path: String, metadata: [String: String]) throws {
    var writer = SafeTensorsWriter()
    for info in model.parameterTable {
        writer.add(name: info.name, shape: info.shape,
                   floats: UnsafeBufferPointer(rebasing: model.parameters[info.range]))
    }
    writer.metadata = metadata
    try writer.write(to: path)
}

/// Reads parameters saved by bpworker (or by PyTorch/NumPy with the same names and shapes) into `model`.
/// Every tensor of the model must be present with its exact shape; extra tensors are an error too, since
/// they mean the file belongs to another architecture.
func loadParameters(into model: Model<Float>, from path: String) throws {
    let file = try SafeTensorsFile(path: path)
    for info in model.parameterTable {
        try file.expect(info.name, shape: info.shape)
        let values = try file.floats(info.name)
        for (i, v) in values.enumerated() { model.parameters[info.offset + i] = v }
    }
    let expected = Set(model.parameterTable.map(\.name))
    if let extra = file.tensors.keys.sorted().first(where: { !expected.contains($0) && !$0.hasPrefix("optimizer.") }) {
        throw ConfigError(description: "\(path): tensor '\(extra)' is not part of the model \(model.spec.summary)")
    }
}
