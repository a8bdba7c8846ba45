@testable import Engine
import Foundation

/// Fills the model's inputs and labels with `rows` reproducible random rows (inputs ~ N(0, 1)).
func fillRandomBatch<T: Scalar>(_ model: Model<T>, rows: Int, seed: UInt64) {
    var g = RandomGenerator(seed: seed, stream: .test)
    for i in 0..<(rows * model.inputWidth) { model.inputs[i] = T(g.nextNormal()) }
    for r in 0..<rows { model.labels[r] = Int32(g.nextInt(below: model.outputWidth)) }
}

/// The run-time layers of a plan, residual blocks' inner ones included (each block before its body, then its
/// shortcut).
func allLayers<T: Scalar>(_ plan: [Layer<T>]) -> [Layer<T>] {
    plan.flatMap { layer in
        (layer as? Residual<T>).map { [layer] + allLayers($0.body) + allLayers($0.shortcut) } ?? [layer]
    }
}

/// A float64 model of `spec` on a random batch of `rows`, with non-zero biases and normalisation parameters (so their
/// gradients are not special), for the gradient checker.
func checkedModel(_ spec: ModelSpec, rows: Int = 4, seed: UInt64 = 1) throws -> Model<Double> {
    let model = try Model<Double>(spec: spec, batchCapacity: rows, seed: seed)
    fillRandomBatch(model, rows: rows, seed: seed)
    var g = RandomGenerator(seed: seed, stream: 77)
    for info in model.parameterTable where info.shape.count == 1 {
        for i in info.range { model.parameters[i] = 0.1 * g.nextNormal() }
    }
    return model
}

/// Writes `values` into the named tensor of the model's parameters.
func setTensor<T: Scalar>(_ model: Model<T>, _ name: String, _ values: [Double]) {
    let view = model.tensor(name, in: model.parameters)!
    precondition(view.count == values.count, "\(name) has \(view.count) elements")
    for i in values.indices { view[i] = T(values[i]) }
}

func tensorValues<T: Scalar>(_ model: Model<T>, _ name: String, in buffer: UnsafeMutableBufferPointer<T>) -> [Double] {
    model.tensor(name, in: buffer)!.map { Double($0) }
}

func close(_ a: Double, _ b: Double, _ tolerance: Double) -> Bool {
    abs(a - b) <= tolerance * max(1, abs(a), abs(b))
}

func allClose(_ a: [Double], _ b: [Double], _ tolerance: Double) -> Bool {
    a.count == b.count && zip(a, b).allSatisfy { close($0, $1, tolerance) }
}

/// Tolerance for comparing a computation in T with an exact value.
func tolerance<T: Scalar>(_: T.Type) -> Double { T.self == Float.self ? 1e-5 : 1e-12 }

/// A fresh directory for one test, removed when the last reference goes: at the end of the test's scope for a
/// local, or with the suite instance (one per test) for a stored property, whether the test passed or failed.
final class TemporaryDirectory {
    let path: String

    init() throws {
        path = NSTemporaryDirectory() + "bp-engine-tests-" + UUID().uuidString
        try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
    }

    deinit { try? FileManager.default.removeItem(atPath: path) }

    func file(_ name: String) -> String { path + "/" + name }

    @discardableResult
    func write(_ name: String, _ bytes: [UInt8]) throws -> String {
        let p = file(name)
        try Data(bytes).write(to: URL(fileURLWithPath: p))
        return p
    }
}
