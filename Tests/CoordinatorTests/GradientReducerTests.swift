import Coordinator
import Engine
import Testing

@Suite("Gradient buckets")
struct GradientReducerTests {
    @Test func bucketsTileTheBufferInReverseLayerOrderAlongTensorBoundaries() throws {
        let model = try Model<Float>(spec: .mlp(widths: [20, 30, 40, 10]), batchCapacity: 2)
        let ranges = model.parameterTable.map(\.range)
        for elements in [0, 1, 500, 1000, 5000, 1_000_000] {
            let reducer = GradientReducer(communicator: LocalCommunicator(), gradients: model.gradients,
                                          tensorRanges: ranges, bucketElements: elements)
            // Contiguous, descending, covering everything exactly once.
            #expect(reducer.buckets.first?.upperBound == model.parameterCount)
            #expect(reducer.buckets.last?.lowerBound == 0)
            for (a, b) in zip(reducer.buckets, reducer.buckets.dropFirst()) { #expect(a.lowerBound == b.upperBound) }
            // Boundaries fall on tensor starts, and every bucket but the last holds at least `elements`.
            let starts = Set(ranges.map(\.lowerBound))
            #expect(reducer.buckets.allSatisfy { starts.contains($0.lowerBound) })
            if elements > 0 { #expect(reducer.buckets.dropLast().allSatisfy { $0.count >= elements }) }
            if elements == 0 || elements >= model.parameterCount { #expect(reducer.buckets.count == 1) }
        }
        let perTensor = GradientReducer(communicator: LocalCommunicator(), gradients: model.gradients,
                                        tensorRanges: ranges, bucketElements: 1)
        #expect(perTensor.buckets == ranges.reversed())
    }

    @Test func localReductionIsTheIdentity() throws {
        let model = try Model<Float>(spec: .mlp(widths: [6, 5, 3]), batchCapacity: 4)
        var g = RandomGenerator(seed: 1, stream: .test)
        for i in 0..<(4 * 6) { model.inputs[i] = Float(g.nextNormal()) }
        for r in 0..<4 { model.labels[r] = Int32(r % 3) }
        model.forward(count: 4, mode: .train)
        model.backward(count: 4)
        let expected = Array(model.gradients)
        model.zeroGradients()
        model.forward(count: 4, mode: .train)
        let reducer = GradientReducer(communicator: LocalCommunicator(), gradients: model.gradients,
                                      tensorRanges: model.parameterTable.map(\.range), bucketElements: 8)
        try model.backward(count: 4) { try reducer.gradientsReady(from: $0) }
        try reducer.finish()
        #expect(Array(model.gradients) == expected)
    }

    @Test func partitionsAreContiguousAndEven() {
        for (count, parts) in [(10, 1), (10, 3), (2, 4), (0, 2), (1_863_690, 2)] {
            let partition = Partition(count: count, parts: parts)
            #expect(partition.parts == parts && partition.count == count)
            #expect(partition.bounds.first == 0 && partition.bounds.last == count)
            let sizes = (0..<parts).map { partition.range(of: $0).count }
            #expect(sizes.max()! - sizes.min()! <= 1)
            #expect(sizes == sizes.sorted(by: >), "the larger parts come first")
        }
    }

    /// On one rank both strategies are the plain optimizer step: same parameters, same norm.
    @Test(arguments: GradientReducer.Strategy.allCases)
    func oneRankUpdatesLikeThePlainOptimizer(strategy: GradientReducer.Strategy) throws {
        let model = try Model<Float>(spec: .mlp(widths: [6, 5, 3]), batchCapacity: 4, seed: 2)
        var g = RandomGenerator(seed: 1, stream: .test)
        for i in 0..<(4 * 6) { model.inputs[i] = Float(g.nextNormal()) }
        for r in 0..<4 { model.labels[r] = Int32(r % 3) }
        let config = OptimizerConfig(kind: .sgd, momentum: 0.9)
        let plain = try Optimizer<Float>(config: config, parameterCount: model.parameterCount)
        let reduced = try Optimizer<Float>(config: config, parameterCount: model.parameterCount)
        let start = Array(model.parameters)
        model.forward(count: 4, mode: .train)
        model.backward(count: 4, accumulate: false) { _ in }
        var expected = start
        expected.withUnsafeMutableBufferPointer { p in
            plain.update(parameters: p, gradients: model.gradients, learningRate: 0.1)
        }
        let norm = Double(model.gradients.map { Double($0) * Double($0) }.reduce(0, +)).squareRoot()

        model.zeroGradients()
        model.forward(count: 4, mode: .train)
        let reducer = GradientReducer(communicator: LocalCommunicator(), gradients: model.gradients,
                                      tensorRanges: model.parameterTable.map(\.range), bucketElements: 8, strategy: strategy)
        try model.backward(count: 4, accumulate: false) { try reducer.gradientsReady(from: $0) }
        try reducer.finish()
        #expect(abs(try reducer.gradientNorm(scale: 1) - norm) <= 1e-5 * norm)
        try reducer.update(reduced, parameters: model.parameters, learningRate: 0.1, gradientScale: reducer.gradientScale)
        try reducer.gatherOptimizerState(reduced)
        #expect(Array(model.parameters) == expected)
        #expect(Array(reduced.state[0].buffer) == Array(plain.state[0].buffer))
        #expect(expected != start)
    }
}
