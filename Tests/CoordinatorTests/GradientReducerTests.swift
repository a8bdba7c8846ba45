import Coordinator
import Engine
import Testing

/// A reducer made as the Worker makes it, on one rank.
func oneRankReducer(_ strategy: GradientReducer.Strategy, _ model: Model<Float>, bucketElements: Int,
                    update: any ParameterUpdate, observer: (any BucketObserver)? = nil) -> any GradientReducer {
    let buckets = GradientBuckets(tensorRanges: model.parameterTable.map(\.range), bucketElements: bucketElements,
                                  totalCount: model.parameterCount)
    return makeGradientReducer(strategy: strategy, communicator: LocalCommunicator(), buckets: buckets,
                               gradients: model.gradients, parameters: model.parameters, update: update, observer: observer)
}

@Suite("Gradient buckets")
struct GradientReducerTests {
    @Test func bucketsTileTheBufferInReverseLayerOrderAlongTensorBoundaries() throws {
        let model = try Model<Float>(spec: .mlp(widths: [20, 30, 40, 10]), batchCapacity: 2)
        let ranges = model.parameterTable.map(\.range)
        for elements in [0, 1, 500, 1000, 5000, 1_000_000] {
            let buckets = GradientBuckets(tensorRanges: ranges, bucketElements: elements, totalCount: model.parameterCount).ranges
            // Contiguous, descending, covering everything exactly once.
            #expect(buckets.first?.upperBound == model.parameterCount)
            #expect(buckets.last?.lowerBound == 0)
            for (a, b) in zip(buckets, buckets.dropFirst()) { #expect(a.lowerBound == b.upperBound) }
            // Boundaries fall on tensor starts, and every bucket but the last holds at least `elements`.
            let starts = Set(ranges.map(\.lowerBound))
            #expect(buckets.allSatisfy { starts.contains($0.lowerBound) })
            if elements > 0 { #expect(buckets.dropLast().allSatisfy { $0.count >= elements }) }
            if elements == 0 || elements >= model.parameterCount { #expect(buckets.count == 1) }
        }
        let perTensor = GradientBuckets(tensorRanges: ranges, bucketElements: 1, totalCount: model.parameterCount)
        #expect(perTensor.ranges == ranges.reversed())
    }

    /// The factory makes the type for the strategy, and the reducer uses the plan it was given.
    @Test(arguments: GradientReducer.Strategy.allCases)
    func theFactoryMakesEachStrategysType(strategy: GradientReducer.Strategy) throws {
        let model = try Model<Float>(spec: .mlp(widths: [6, 5, 3]), batchCapacity: 1)
        let optimizer = try Optimizer<Float>(config: OptimizerConfig(kind: .sgd), parameterCount: model.parameterCount)
        let reducer = oneRankReducer(strategy, model, bucketElements: 8, update: optimizer)
        #expect(reducer.strategy == strategy)
        #expect(strategy == .sharded ? reducer is ShardedReducer : reducer is AllreduceReducer)
        #expect(reducer.buckets == GradientBuckets(tensorRanges: model.parameterTable.map(\.range), bucketElements: 8,
                                                   totalCount: model.parameterCount).ranges)
        #expect(reducer.buckets.count > 1)
    }

    @Test(arguments: GradientReducer.Strategy.allCases)
    func localReductionIsTheIdentity(strategy: GradientReducer.Strategy) throws {
        let model = try Model<Float>(spec: .mlp(widths: [6, 5, 3]), batchCapacity: 4)
        var g = RandomGenerator(seed: 1, stream: .test)
        for i in 0..<(4 * 6) { model.inputs[i] = Float(g.nextNormal()) }
        for r in 0..<4 { model.labels[r] = Int32(r % 3) }
        model.forward(count: 4, mode: .train)
        model.backward(count: 4)
        let expected = Array(model.gradients)
        model.zeroGradients()
        model.forward(count: 4, mode: .train)
        let optimizer = try Optimizer<Float>(config: OptimizerConfig(kind: .sgd), parameterCount: model.parameterCount)
        let reducer = oneRankReducer(strategy, model, bucketElements: 8, update: optimizer)
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
        let reducer = oneRankReducer(strategy, model, bucketElements: 8, update: reduced)
        try model.backward(count: 4, accumulate: false) { try reducer.gradientsReady(from: $0) }
        try reducer.finish()
        #expect(abs(try reducer.gradientNorm(scale: 1) - norm) <= 1e-5 * norm)
        try reducer.update(learningRate: 0.1, gradientScale: reducer.gradientScale)
        try reducer.gatherUpdateState()
        #expect(Array(model.parameters) == expected)
        #expect(Array(reduced.state[0].buffer) == Array(plain.state[0].buffer))
        #expect(expected != start)
    }

    /// What each reducer tells its observer, in order, over two steps on one rank (no peers: no sends or receives),
    /// with three buckets reported one at a time as backward would.
    @Test(arguments: GradientReducer.Strategy.allCases)
    func theObserverHearsEachBucketAndTheUpdate(strategy: GradientReducer.Strategy) throws {
        let count = 12
        let gradients = UnsafeMutableBufferPointer<Float>.allocate(capacity: count)
        let parameters = UnsafeMutableBufferPointer<Float>.allocate(capacity: count)
        defer { gradients.deallocate(); parameters.deallocate() }
        gradients.initialize(repeating: 1)
        parameters.initialize(repeating: 0)
        let optimizer = try Optimizer<Float>(config: OptimizerConfig(kind: .sgd), parameterCount: count)
        let buckets = GradientBuckets(tensorRanges: [0..<4, 4..<8, 8..<12], bucketElements: 4, totalCount: count)
        #expect(buckets.ranges == [8..<12, 4..<8, 0..<4])
        let log = CallLog()
        let reducer = makeGradientReducer(strategy: strategy, communicator: LocalCommunicator(), buckets: buckets,
                                          gradients: gradients, parameters: parameters, update: optimizer, observer: log)
        let expected: [String] = switch strategy {
        case .sharded:
            ["receives", "start 0", "started 0", "start 1", "started 1", "start 2", "control", "started 2",
             "control done", "finished", "updating", "updated", "gather 0", "gathered 0", "gather 1", "gathered 1",
             "gather 2", "gathered 2"]
        case .allreduce:
            // Every poll reports what has completed so far, again: the observer keeps the first.
            ["start 0", "started 0", "reduced 0", "start 1", "started 1", "reduced 0", "reduced 1", "start 2", "started 2",
             "reduced 0", "reduced 1", "reduced 2", "reduced 0", "reduced 1", "reduced 2", "finished", "updating", "updated"]
        }
        for _ in 0..<2 {
            log.calls = []
            try reducer.gradientsReady(from: 8)
            try reducer.gradientsReady(from: 4)
            try reducer.finish()
            try reducer.update(learningRate: 0.5, gradientScale: 1)
            #expect(log.calls == expected)
        }
        #expect(Array(parameters) == Array(repeating: -1, count: count), "two steps of -0.5 times gradients of 1")
    }
}

/// Notes every call a reducer makes, by name.
final class CallLog: BucketObserver {
    var calls: [String] = []
    func postingReceives() { calls.append("receives") }
    func startingBucket(_ bucket: Int) { calls.append("start \(bucket)") }
    func startedBucket(_ bucket: Int) { calls.append("started \(bucket)") }
    func postingControl() { calls.append("control") }
    func sendCompleted(bucket: Int, peer: Int) { calls.append("sent \(bucket) to \(peer)") }
    func receiveCompleted(bucket: Int, peer: Int) { calls.append("received \(bucket) from \(peer)") }
    func reductionCompleted(bucket: Int) { calls.append("reduced \(bucket)") }
    func controlCompleted() { calls.append("control done") }
    func exchangeFinished(waitStart: Int64, waitEnd: Int64) { calls.append(waitStart <= waitEnd ? "finished" : "finished backwards") }
    func updating() { calls.append("updating") }
    func updated() { calls.append("updated") }
    func gatheringParameters(bucket: Int) { calls.append("gather \(bucket)") }
    func gatheredParameters(bucket: Int) { calls.append("gathered \(bucket)") }
}
