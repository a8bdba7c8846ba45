import Engine
import Foundation
import Testing

@Suite("Small models learn")
struct LearningTests {
    /// Full-batch training on (points, labels); returns training accuracy.
    func train<T: Scalar>(_: T.Type, spec: ModelSpec, points: [[Double]], labels: [Int32], optimizer: OptimizerConfig,
                          learningRate: Double, steps: Int, seed: UInt64) throws -> Double {
        let model = try Model<T>(spec: spec, batchCapacity: points.count, seed: seed)
        let opt = try Optimizer<T>(config: optimizer, parameterCount: model.parameterCount)
        for (r, point) in points.enumerated() {
            for (c, v) in point.enumerated() { model.inputs[r * point.count + c] = T(v) }
            model.labels[r] = labels[r]
        }
        for _ in 0..<steps {
            model.zeroGradients()
            model.forward(count: points.count, mode: .train)
            model.backward(count: points.count)
            opt.update(parameters: model.parameters, gradients: model.gradients, learningRate: learningRate)
        }
        let result = model.forward(count: points.count, mode: .eval)
        return Double(result.correct) / Double(points.count)
    }

    @Test func xorWithCrossEntropy() throws {
        let points: [[Double]] = [[0, 0], [0, 1], [1, 0], [1, 1]]
        let labels: [Int32] = [0, 1, 1, 0]
        for (activation, scalar) in [(LayerSpec.tanh, "f32"), (.relu, "f64")] {
            let spec = ModelSpec.mlp(widths: [2, 8, 2], activation: activation)
            let accuracy = scalar == "f32"
                ? try train(Float.self, spec: spec, points: points, labels: labels, optimizer: .init(kind: .adam),
                            learningRate: 0.05, steps: 300, seed: 1)
                : try train(Double.self, spec: spec, points: points, labels: labels, optimizer: .init(kind: .adam),
                            learningRate: 0.05, steps: 300, seed: 1)
            #expect(accuracy == 1, "XOR with \(activation)")
        }
    }

    @Test func xorWithMeanSquaredErrorAndMomentum() throws {
        let points: [[Double]] = [[0, 0], [0, 1], [1, 0], [1, 1]]
        let spec = ModelSpec.mlp(widths: [2, 8, 2], activation: .sigmoid, loss: .meanSquaredError)
        let accuracy = try train(Float.self, spec: spec, points: points, labels: [0, 1, 1, 0],
                                 optimizer: .init(kind: .sgd, momentum: 0.9, nesterov: true),
                                 learningRate: 0.5, steps: 2000, seed: 2)
        #expect(accuracy == 1)
    }

    /// Two interleaved spirals (Lang and Witbrock 1988): 2 x 100 points, not linearly separable.
    static func twoSpirals(pointsPerClass n: Int) -> ([[Double]], [Int32]) {
        var points: [[Double]] = [], labels: [Int32] = []
        for i in 0..<n {
            let t = Double(i) / Double(n) * 3 * Double.pi  // one and a half turns
            let r = 0.2 + 0.8 * Double(i) / Double(n)
            points.append([r * cos(t), r * sin(t)]); labels.append(0)
            points.append([-r * cos(t), -r * sin(t)]); labels.append(1)
        }
        return (points, labels)
    }

    @Test func twoSpiralsReachFullTrainingAccuracy() throws {
        let (points, labels) = Self.twoSpirals(pointsPerClass: 100)
        let spec = ModelSpec.mlp(widths: [2, 64, 64, 2], activation: .relu)
        let accuracy = try train(Float.self, spec: spec, points: points, labels: labels,
                                 optimizer: .init(kind: .adamw), learningRate: 0.01, steps: 600, seed: 3)
        #expect(accuracy == 1)
    }
}
