import ArgumentParser
import Engine
import Foundation

struct Predict: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Class probabilities for samples, from a model file alone (one process, no MPI).",
        discussion: """
            The model file (model.safetensors or a checkpoint) records the model, the input shape and type, and \
            the preprocessing; predict applies that preprocessing to INPUT's stored values and writes the softmax \
            of the outputs, float32 [N, classes], to a .npy file, or prints each sample's most likely classes.

            INPUT: an IDX file (raw or .gz; e.g. t10k-images-idx3-ubyte.gz) or a .npy file (a name ending in .npy \
            or .npy.gz) of N samples shaped like the model's input, in its input type (uint8: raw bytes 0..255). \
            A NaN or an infinity in float input is refused, naming the sample.
              bpworker predict --model model.safetensors images.idx.gz --output probs.npy
              bpworker predict --model runs/default/model.safetensors samples.npy --top 3
            """)

    @Option(help: "bpworker model file or checkpoint.")
    var model: String

    @Argument(help: "Samples: IDX (raw or .gz) or .npy, shaped [N, ...] like the model's input.")
    var input: String

    @Option(help: "Write the probabilities (float32 [N, classes]) to this .npy file.")
    var output: String?

    /// Unconditional, so that `--top -1` reaches the check in `validate` instead of reading as a missing value.
    @Option(parsing: .unconditional, help: "Print the K most likely classes of every sample (default 3 when there is no --output).")
    var top: Int?

    @Flag(help: "Write the model's outputs (logits for cross-entropy) instead of probabilities.")
    var logits = false

    @Option(help: "OpenBLAS threads (default: all cores).")
    var blasThreads: Int?

    func validate() throws {
        if let top, top < 1 { throw ValidationError("--top must be at least 1") }
        if let blasThreads, !(1...1024).contains(blasThreads) { throw ValidationError("--blas-threads must be in 1...1024, got \(blasThreads)") }
    }

    func run() throws {
        BLASThreads.set(blasThreads ?? AllowedCores.count())
        do {
            try predict()
        } catch {
            // One line naming the file and the reason, exit 1.
            FileHandle.standardError.write(Data("bpworker predict: error: \(error)\n".utf8))
            throw ExitCode.failure
        }
    }

    /// Rows of samples per forward pass.
    static let batchSize = 256

    private func predict() throws {
        let (file, description, unverified) = try ModelFile.open(path: model)
        if let unverified { FileHandle.standardError.write(Data("bpworker predict: note: \(unverified)\n".utf8)) }
        var samples = try Self.readSamples(path: input)
        try description.checkInput(samples, modelPath: model)
        // A NaN or an infinity would come out as a row of NaN probabilities and a "most likely" class picked by it.
        try samples.requireFinite()
        description.preprocessing.apply(to: &samples)
        let network = try ModelFile.model(file, description, batchCapacity: Self.batchSize)

        // probabilities: [N, C], C = classes
        let classes = description.classes
        var probabilities = [Float](repeating: 0, count: samples.count * classes)
        try probabilities.withUnsafeMutableBufferPointer { out in
            var start = 0
            while start < samples.count {
                let count = min(Self.batchSize, samples.count - start)
                let indices = Array(start..<(start + count))
                try indices.withUnsafeBufferPointer { try samples.gather(indices: $0, into: network.inputs, labels: network.labels) }
                network.forward(count: count, mode: .eval)
                if logits {
                    (out.baseAddress! + start * classes).update(from: network.outputs, count: count * classes)
                } else {
                    softmaxRows(network.outputs, rows: count, columns: classes, into: out.baseAddress! + start * classes)
                }
                start += count
            }
        }

        if let output {
            try writeAtomically(npyFloat32(probabilities, shape: [samples.count, classes]), to: output)
            print("wrote \(output): \(logits ? "logits" : "probabilities") float32 [\(samples.count), \(classes)] "
                + "of \(grouped(samples.count)) samples "
                + "(\(input)), model \(description.spec.summary), preprocessing \(description.preprocessing.summary)")
        }
        if output == nil || top != nil {
            let k = min(top ?? 3, classes)
            var text = ""
            for i in 0..<samples.count {
                let row = probabilities[(i * classes)..<((i + 1) * classes)]
                let best = row.indices.sorted { row[$0] > row[$1] || (row[$0] == row[$1] && $0 < $1) }.prefix(k)
                text += "\(i): " + best.map { "\($0 - i * classes) \(String(format: "%.4f", row[$0]))" }.joined(separator: ", ") + "\n"
            }
            FileHandle.standardOutput.write(Data(text.utf8))
        }
    }

    /// Samples without labels: an IDX file, or a `.npy` file (by name: `.npy` or `.npy.gz`), [N, ...sample shape].
    static func readSamples(path: String) throws -> Dataset {
        let name = path.hasSuffix(".gz") ? String(path.dropLast(3)) : path
        let shape: [Int]
        let features: Dataset.Features
        if name.hasSuffix(".npy") {
            let x = try NPY.read(path: path)
            shape = x.shape
            switch x.storage {
            case .uint8(let v): features = .uint8(v)
            case .float32(let v): features = .float32(v)
            case .float64(let v): features = .float32(v.map { Float($0) })
            case .int32, .int64:
                throw DataError(path: path, reason: "unsupported sample dtype \(x.dtypeName) (uint8, float32 or float64)")
            }
        } else {
            let x: IDXArray
            do { x = try IDX.read(path: path) } catch let error as DataError {
                throw DataError(path: path, reason: error.reason + " (predict reads IDX files, raw or .gz, and .npy files named *.npy)")
            }
            shape = x.shape
            features = .uint8(x.bytes)
        }
        guard shape.count >= 2 else {
            throw DataError(path: path, reason: "expected samples shaped [N, ...one sample's shape], got \(shape)")
        }
        let sampleShape = Array(shape.dropFirst())
        return try Dataset(name: path, featureCount: sampleShape.reduce(1, *), sampleShape: sampleShape, features: features,
                           labels: [Int32](repeating: 0, count: shape[0]))
    }
}

/// Softmax of each row, computed in Double (max subtracted first) and rounded to Float.
private func softmaxRows(_ logits: UnsafePointer<Float>, rows: Int, columns: Int, into out: UnsafeMutablePointer<Float>) {
    for r in 0..<rows {
        let z = logits + r * columns
        var top = -Double.infinity
        for j in 0..<columns { top = max(top, Double(z[j])) }
        var sum = 0.0
        for j in 0..<columns { sum += exp(Double(z[j]) - top) }
        for j in 0..<columns { out[r * columns + j] = Float(exp(Double(z[j]) - top) / sum) }
    }
}

/// A `.npy` file (format 1.0) of little-endian float32 values in C order.
func npyFloat32(_ values: [Float], shape: [Int]) -> Data {
    let dims = shape.map(String.init).joined(separator: ", ") + (shape.count == 1 ? "," : "")
    var header = "{'descr': '<f4', 'fortran_order': False, 'shape': (\(dims)), }"
    // Magic (6) + version (2) + length (2) + header + newline, padded with spaces to a multiple of 64 bytes.
    header += String(repeating: " ", count: (64 - (10 + header.utf8.count + 1) % 64) % 64) + "\n"
    var data = Data([0x93] + Array("NUMPY".utf8) + [1, 0])
    withUnsafeBytes(of: UInt16(header.utf8.count).littleEndian) { data.append(contentsOf: $0) }
    data.append(contentsOf: Array(header.utf8))
    data.reserveCapacity(data.count + 4 * values.count)
    for v in values { withUnsafeBytes(of: v.bitPattern.littleEndian) { data.append(contentsOf: $0) } }
    return data
}
