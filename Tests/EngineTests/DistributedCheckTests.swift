import Engine
import Testing

/// `checkGradients(acrossRanks:)` in one process, against a closed form: R ranks that hold identical batches. Their
/// sums are R times each rank's values, the global batch is R copies of one batch, and batch norm's statistics
/// over it are that batch's: the distributed check must measure exactly what one rank measures alone (J the mean,
/// not the sum, over the ranks). The real thing, ranks with different batches under mpirun, is in WorkerTests
/// (DistributedGradientCheckTests).
@Suite("Distributed gradient check in one process")
struct DistributedCheckTests {
    /// The sums of `ranks` ranks whose values are all equal to this one's.
    final class IdenticalRanks: CrossRankReducer {
        let ranks: Int
        init(_ ranks: Int) { self.ranks = ranks }
        func sumAcrossRanks(_ values: UnsafeMutableBufferPointer<Double>) {
            for i in values.indices { values[i] *= Double(ranks) }
        }
    }

    /// Convolution, two batch norms (over images and over features), ReLU kinks and max pooling.
    static let spec = ModelSpec(layers: [
        .conv2d(inChannels: 1, outChannels: 4, kernel: 3, stride: 1, padding: 1, bias: false), .batchNorm(features: 4), .relu,
        .maxPool2d(kernel: 2, stride: 2), .flatten, .linear(inputs: 36, outputs: 8), .tanh, .batchNorm(features: 8),
        .linear(inputs: 8, outputs: 3),
    ], inputShape: [1, 6, 6])

    func model(synchronized ranks: IdenticalRanks?, fault: GradientFault? = nil) throws -> Model<Double> {
        let model = try Model<Double>(spec: Self.spec, batchCapacity: 4, seed: 5)
        fillRandomBatch(model, rows: 4, seed: 5)
        model.crossRankReducer = ranks
        model.gradientFault = fault
        return model
    }

    @Test func identicalRanksMeasureWhatOneRankMeasures() throws {
        let alone = checkGradients(model: try model(synchronized: nil), count: 4)
        let ranks = IdenticalRanks(3)
        let together = checkGradients(model: try model(synchronized: ranks), count: 4, acrossRanks: ranks)
        #expect(alone.verdict == .pass && together.verdict == .pass, "\(alone.text)\n\(together.text)")
        #expect(!alone.distributed && alone.ranks == 1 && alone.samples == 4)
        #expect(together.distributed && together.ranks == 3 && together.samples == 12 && together.batchSize == 4)
        #expect(together.text.contains("distributed over 3 ranks, batch 4 per rank (12 samples)"), "\(together.text)")
        #expect(abs(together.loss - alone.loss) <= 1e-14 * abs(alone.loss), "\(together.loss) vs \(alone.loss)")
        #expect(together.tensors.map(\.name) == alone.tensors.map(\.name))
        for (a, t) in zip(alone.tensors, together.tensors) {
            #expect(a.checked == t.checked && a.kinksSkipped == t.kinksSkipped, "\(a.name)")
            #expect(abs(a.gradientNorm - t.gradientNorm) <= 1e-12 * a.gradientNorm, "\(a.name): \(t.gradientNorm) vs \(a.gradientNorm)")
        }
        #expect(abs(together.direction.analytic - alone.direction.analytic) <= 1e-12 * abs(alone.direction.analytic))
    }

    /// Synchronized batch norm's input gradient with the rank's own sum of dy where the global one belongs: invisible
    /// to a rank checking alone (there is no global sum), a failure naming the tensor below the layer across ranks.
    @Test func theLocalSumsBugShowsOnlyAcrossRanks() throws {
        let fault = GradientFault.batchNormLocalSums(tensor: "1.weight")
        let alone = checkGradients(model: try model(synchronized: nil, fault: fault), count: 4)
        #expect(alone.verdict == .pass, "\(alone.text)")
        let ranks = IdenticalRanks(2)
        let together = checkGradients(model: try model(synchronized: ranks, fault: fault), count: 4, acrossRanks: ranks)
        #expect(together.verdict == .fail, "\(together.text)")
        #expect(together.failures.contains { $0.hasPrefix("0.weight") }, "\(together.failures)")
        #expect(together.tensors.first { $0.name == "1.weight" }?.verdict == .pass, "the layer's own parameters are right")
    }
}
