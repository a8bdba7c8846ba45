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
}
