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
                                strategy: GradientReducer.Strategy, timeline: Bool = false) throws -> UInt {
        try heapAllocationsPerStep(ModelSpec.mlp(widths: [20, 32, 16, 4], activation: activation, dropout: dropout),
                                   optimizer: kind, strategy: strategy, timeline: timeline)
    }

    /// - Parameter timeline: record every step as `--timeline` does: the model's layer timer, the reducer's bucket
    ///   events and the step's own parts, into a recorder sized beforehand.
    /// - Parameter augmented: gather with random crops and flips (`data.augment`), for image models.
    func heapAllocationsPerStep(_ spec: ModelSpec, optimizer kind: OptimizerKind, strategy: GradientReducer.Strategy,
                                timeline: Bool = false, augmented: Bool = false) throws -> UInt {
        let width = spec.inputWidth
        let model = try Model<Float>(spec: spec, batchCapacity: 8, seed: 1, controlSlots: 2)
        let optimizer = try Optimizer<Float>(config: OptimizerConfig(kind: kind, momentum: kind == .sgd ? 0.9 : 0),
                                             parameterCount: model.parameterCount)
        let buckets = GradientBuckets(tensorRanges: model.parameterTable.map(\.range), bucketElements: 64,
                                      totalCount: model.parameterCount)
        let recorder: TimelineRecorder? = timeline ? TimelineRecorder(capacity: 4096) : nil
        let reducer = makeGradientReducer(strategy: strategy, communicator: LocalCommunicator(), buckets: buckets,
                                          gradients: model.gradients, parameters: model.parameters, update: optimizer,
                                          control: model.control, nonFiniteSlot: 1, provenFinite: { model.gradientsProvenFinite(in: $0) },
                                          observer: recorder.map { BucketTimes(recorder: $0, buckets: buckets.count, ranks: 1) })
        var pixels = [UInt8](repeating: 0, count: 64 * width)
        for i in pixels.indices { pixels[i] = UInt8(i % 251) }
        let data = try Dataset(name: "synthetic", featureCount: width, sampleShape: augmented ? spec.inputShape : nil,
                               features: .uint8(pixels), labels: (0..<64).map { Int32($0 % 4) })
        let augmentation = augmented ? try Augmentation(cropPadding: 2, flip: true, seed: 3, sampleShape: spec.inputShape) : nil
        let sampler = try ShardSampler(datasetSize: 64, rank: 0, worldSize: 1, batchSize: 8, seed: 3)
        let schedule = LearningRateSchedule(base: 0.1, kind: .cosine(totalSteps: 100, minimum: 0), warmupSteps: 5)
        if let recorder {
            model.layerTimer = { layer, pass, start, end in
                recorder.record(pass == .forward ? .layerForward : .layerBackward, layer, start: Int64(start), end: Int64(end))
            }
            recorder.startRecording()
        }
        let indices = sampler.indices(epoch: 0)
        var counts: [UInt] = []
        try indices.withUnsafeBufferPointer { all in
            for step in 0..<sampler.stepsPerEpoch {
                let before = bp_thread_allocations()
                let stepStarted = recorder?.begin() ?? 0
                try! data.gather(indices: sampler.batch(all, step: step), into: model.inputs, labels: model.labels,
                            augmentation: augmentation, epoch: 1)
                recorder?.end(.loadBatch, since: stepStarted)
                model.zeroControl()
                let forwardStarted = recorder?.begin() ?? 0
                _ = model.forward(count: 8, mode: .train)
                recorder?.end(.forward, since: forwardStarted)
                let backwardStarted = recorder?.begin() ?? 0
                try model.backward(count: 8, accumulate: false) { try reducer.gradientsReady(from: $0) }
                recorder?.end(.backward, since: backwardStarted)
                try reducer.finish()
                let normStarted = recorder?.begin() ?? 0
                let clip = gradientClipFactor(norm: try reducer.gradientNorm(scale: reducer.gradientScale), maxNorm: 1)
                recorder?.end(.gradientNorm, since: normStarted)
                try reducer.update(learningRate: schedule.learningRate(atStep: step), gradientScale: reducer.gradientScale * clip)
                recorder?.end(.step, since: stepStarted)
                counts.append(bp_thread_allocations() - before)
            }
        }
        // The counter itself sees allocations: the first step may warm up lazily created runtime state.
        #expect(counts.count == 8)
        if let recorder {
            // The steps were recorded (every layer, both passes), and none was dropped.
            #expect(recorder.recorded.filter { $0.kind == .layerForward }.count == 8 * (spec.layers.count + 1))
            #expect(recorder.recorded.filter { $0.kind == .exchangeWait }.count == 8 && recorder.dropped == 0)
            #expect(recorder.recorded.filter { $0.kind == .update }.count == 8)
        }
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

    /// `--timeline` on: recording a step (into a buffer sized beforehand) allocates nothing either.
    @Test func aRecordedTrainingStepAllocatesNothing() throws {
        for kind in OptimizerKind.allCases {
            for strategy in GradientReducer.Strategy.allCases {
                #expect(try heapAllocationsPerStep(optimizer: kind, activation: .relu, dropout: 0.2, strategy: strategy, timeline: true) == 0,
                        "\(kind), \(strategy)")
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
