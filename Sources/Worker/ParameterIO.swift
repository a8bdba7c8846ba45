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
        try file.readFloats(prefix + info.name, into: UnsafeMutableBufferPointer(rebasing: buffer[info.range]))
    }
    return layout.map { prefix + $0.name }
}

/// Adds the model's buffers (batch norm's running_mean and running_var as float32, num_batches_tracked as an int64
/// scalar, as PyTorch keeps them) to `writer` under their PyTorch names.
func addBuffers(of model: Model<Float>, to writer: inout SafeTensorsWriter) {
    for info in model.bufferTable {
        if info.shape.isEmpty {
            writer.add(name: info.name, shape: [], int64s: [Int64(model.buffers[info.offset])])
        } else {
            writer.add(name: info.name, shape: info.shape, floats: UnsafeBufferPointer(rebasing: model.buffers[info.range]))
        }
    }
}

/// The inverse of `addBuffers`: every buffer must be present with its shape (a count as an integer or float scalar).
@discardableResult
func readBuffers(from file: SafeTensorsFile, into model: Model<Float>) throws -> [String] {
    for info in model.bufferTable {
        if info.shape.isEmpty {
            guard let tensor = file.tensors[info.name] else { throw DataError(path: file.path, reason: "missing tensor '\(info.name)'") }
            guard tensor.shape.isEmpty || tensor.shape == [1] else {
                throw DataError(path: file.path, reason: "tensor '\(info.name)': shape \(tensor.shape), the model expects [] (a count)")
            }
            let count = tensor.dtype == .f32 || tensor.dtype == .f64 ? Double(try file.floats(info.name)[0]) : Double(try file.int64s(info.name)[0])
            guard count >= 0 else { throw DataError(path: file.path, reason: "tensor '\(info.name)': negative count \(count)") }
            // Kept in the model's float32 buffers, which hold every whole number up to 2^24 exactly; a larger count (or
            // inf) would come back changed, or trap when the next checkpoint writes it as an integer.
            guard count == count.rounded(), count <= Double(1 << 24) else {
                throw DataError(path: file.path, reason: "tensor '\(info.name)': count \(count) is not a whole number up to "
                    + "16777216 (2^24), the largest bpworker keeps exactly")
            }
            model.buffers[info.offset] = Float(count)
        } else {
            try file.expect(info.name, shape: info.shape)
            let values = try file.floats(info.name)
            values.withUnsafeBufferPointer { model.buffers.baseAddress!.advanced(by: info.offset).update(from: $0.baseAddress!, count: info.count) }
        }
    }
    return model.bufferTable.map(\.name)
}

/// The model's state as PyTorch's `state_dict()` holds it: parameters and buffers.
func addState(of model: Model<Float>, to writer: inout SafeTensorsWriter) {
    addTensors(of: model.parameters, layout: model.parameterTable, to: &writer)
    addBuffers(of: model, to: &writer)
}

/// Reads a model's parameters and buffers; returns the names read.
@discardableResult
func readState(from file: SafeTensorsFile, into model: Model<Float>) throws -> Set<String> {
    Set(try readTensors(from: file, layout: model.parameterTable, into: model.parameters) + readBuffers(from: file, into: model))
}

/// Writes a model's parameters and buffers as safetensors with PyTorch nn.Sequential names and shapes, so
/// `model.load_state_dict(safetensors.torch.load_file(path), strict=True)` works on the matching nn.Sequential.
func writeParameters(of model: Model<Float>, to path: String, metadata: [String: String]) throws {
    var writer = SafeTensorsWriter()
    addState(of: model, to: &writer)
    writer.metadata = metadata
    try writer.write(to: path)
}

/// Reads parameters (and buffers) saved by bpworker (or by PyTorch/NumPy with the same names and shapes) into
/// `model`. Every tensor of the model must be present with its exact shape; extra tensors are an error too, since
/// they mean the file belongs to another architecture. A damaged file (its checksums) is an error; returns the note
/// for a file without checksums.
@discardableResult
func loadParameters(into model: Model<Float>, from path: String) throws -> String? {
    let file = try SafeTensorsFile(path: path)
    let unverified = try ModelFile.verified(file)
    let expected = try readState(from: file, into: model)
    if let extra = file.names.first(where: { !expected.contains($0) && !$0.hasPrefix("optimizer.") }) {
        throw DataError(path: path, reason: "tensor '\(extra)' is not part of the model \(model.spec.summary)")
    }
    return unverified
}

/// A checksum of everything that must be identical on every rank: parameters and buffers.
func replicaChecksum(_ model: Model<Float>) -> UInt64 {
    var hash = fnv1a(UnsafeRawBufferPointer(model.parameters))
    if !model.bufferTable.isEmpty { hash ^= fnv1a(UnsafeRawBufferPointer(model.buffers)) &* 0x9E37_79B9_7F4A_7C15 }
    return hash
}

/// A hash of the model's tensor names, shapes and layers: checkpoints and ranks compare it to tell whether two
/// models have the same layout.
func layoutHash(_ model: Model<Float>) -> UInt64 {
    // Images add their input shape; an MLP's hash is what it always was, so its older checkpoints still resume.
    let layout = (model.parameterTable + model.bufferTable).map { "\($0.name)\($0.shape)" }.joined(separator: ";")
        + model.spec.summary + (model.spec.inputShape.count > 1 ? "\(model.spec.inputShape)" : "")
    return fnv1a(Array(layout.utf8))
}
