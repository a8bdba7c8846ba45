import AllocationCounter
import Coordinator
import Engine
import Testing

@Suite("Steady-state allocations")
struct AllocationTests {
    /// The whole training step of the Worker's loop: gather, zero, forward, backward with bucketed reduction,
    /// finish, clip, update. After warm-up it must not touch the heap. (On one rank; CommCheck counts the
    /// sharded step's sends, receives and gathers on real ranks.)
    func heapAllocationsPerStep(optimizer kind: OptimizerKind, activation: LayerSpec, dropout: Double,
                                strategy: GradientReducer.Strategy) throws -> UInt {
        try heapAllocationsPerStep(ModelSpec.mlp(widths: [20, 32, 16, 4], activation: activation, dropout: dropout),
                                   optimizer: kind, strategy: strategy)
    }

    /// - Parameter augmented: gather with random crops and flips (`data.augment`), for image models.
    func heapAllocationsPerStep(_ spec: ModelSpec, optimizer kind: OptimizerKind, strategy: GradientReducer.Strategy,
                                augmented: Bool = false) throws -> UInt {
        let width = spec.inputWidth
        let model = try Model<Float>(spec: spec, batchCapacity: 8, seed: 1, controlSlots: 2)
        let optimizer = try Optimizer<Float>(config: OptimizerConfig(kind: kind, momentum: kind == .sgd ? 0.9 : 0),
                                             parameterCount: model.parameterCount)
        let reducer = GradientReducer(communicator: LocalCommunicator(), gradients: model.gradients,
                                      tensorRanges: model.parameterTable.map(\.range), bucketElements: 64, strategy: strategy,
                                      control: model.control, nonFiniteSlot: 1, provenFinite: { model.gradientsProvenFinite(in: $0) })
        var pixels = [UInt8](repeating: 0, count: 64 * width)
        for i in pixels.indices { pixels[i] = UInt8(i % 251) }
        let data = try Dataset(name: "synthetic", featureCount: width, sampleShape: augmented ? spec.inputShape : nil,
                               features: .uint8(pixels), labels: (0..<64).map { Int32($0 % 4) })
        let augmentation = augmented ? try Augmentation(cropPadding: 2, flip: true, seed: 3, sampleShape: spec.inputShape) : nil
        let sampler = try ShardSampler(datasetSize: 64, rank: 0, worldSize: 1, batchSize: 8, seed: 3)
        let schedule = LearningRateSchedule(base: 0.1, kind: .cosine(totalSteps: 100, minimum: 0), warmupSteps: 5)
        let indices = sampler.indices(epoch: 0)
        var counts: [UInt] = []
        try indices.withUnsafeBufferPointer { all in
            for step in 0..<sampler.stepsPerEpoch {
                let before = bp_thread_allocations()
                data.gather(indices: sampler.batch(all, step: step), into: model.inputs, labels: model.labels,
                            augmentation: augmentation, epoch: 1)
                model.zeroControl()
                _ = model.forward(count: 8, mode: .train)
                try model.backward(count: 8, accumulate: false) { try reducer.gradientsReady(from: $0) }
                try reducer.finish()
                let clip = gradientClipFactor(norm: try reducer.gradientNorm(scale: reducer.gradientScale), maxNorm: 1)
                try reducer.update(optimizer, parameters: model.parameters, learningRate: schedule.learningRate(atStep: step),
                                   gradientScale: reducer.gradientScale * clip)
                counts.append(bp_thread_allocations() - before)
            }
        }
        // The counter itself sees allocations: the first step may warm up lazily created runtime state.
        #expect(counts.count == 8)
        return counts.dropFirst(2).max() ?? 0
    }

    @Test func aTrainingStepAllocatesNothing() throws {
        for kind in OptimizerKind.allCases {
            for strategy in GradientReducer.Strategy.allCases {
                // GELU: the finiteness proof reads norms with BLAS; ReLU: the kernels sum them as they go.
                for activation in [LayerSpec.gelu, .relu] {
                    #expect(try heapAllocationsPerStep(optimizer: kind, activation: activation, dropout: 0.2, strategy: strategy) == 0,
                            "\(kind), \(strategy), \(activation)")
                }
            }
        }
    }

    /// Every layer kind of a CNN: workspaces (columns, pooling winners, masks, batch norm's sums) are made once; the
    /// batch is gathered plain and with crops and flips.
    @Test func aCNNTrainingStepAllocatesNothing() throws {
        let conv = { (i: Int, o: Int, pad: Int) in LayerSpec.conv2d(inChannels: i, outChannels: o, kernel: 3, stride: 1, padding: pad, bias: false) }
        let spec = ModelSpec(layers: [
            conv(1, 4, 1), .batchNorm(features: 4), .relu, .maxPool2d(kernel: 2, stride: 2),
            .conv2d(inChannels: 4, outChannels: 6, kernel: 2, stride: 1, padding: 0, bias: true), .layerNorm(features: 2), .gelu,
            .avgPool2d(kernel: 2, stride: 1), .globalAvgPool2d, .flatten, .linear(inputs: 6, outputs: 8), .batchNorm(features: 8),
            .relu, .dropout(probability: 0.2), .linear(inputs: 8, outputs: 4),
        ], inputShape: [1, 6, 6])
        for kind in OptimizerKind.allCases {
            for strategy in GradientReducer.Strategy.allCases {
                for augmented in [false, true] {
                    #expect(try heapAllocationsPerStep(spec, optimizer: kind, strategy: strategy, augmented: augmented) == 0,
                            "\(kind), \(strategy), augmented: \(augmented)")
                }
            }
        }
    }

    @Test func theCounterSeesAllocations() {
        // The counter is live: an Array allocation on this thread is counted.
        let before = bp_thread_allocations()
        let array = [Int](repeating: 7, count: 1000 + Int(before % 3))
        #expect(bp_thread_allocations() - before >= 1)
        #expect(array.count >= 1000)
    }
}
