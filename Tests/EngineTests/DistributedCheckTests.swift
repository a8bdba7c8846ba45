import Engine
import Foundation
import Testing

/// `checkGradients(acrossRanks:)` with ranks as threads of one process (`ThreadRanks`), each with its own model and
/// its own part of the batch: what the distributed check computes, against one model checking the global batch
/// alone, and the decisions every rank must share. What the binary adds (the sampler's shards, `--distributed`,
/// `model.batchnorm=sync`, the report and the abort policy under mpirun) is in WorkerTests
/// (DistributedGradientCheckTests).
@Suite("Distributed gradient check in one process")
struct DistributedCheckTests {
    /// Convolution, two batch norms (over images and over features), ReLU kinks and max pooling.
    static let spec = ModelSpec(layers: [
        .conv2d(inChannels: 1, outChannels: 4, kernel: 3, stride: 1, padding: 1, bias: false), .batchNorm(features: 4), .relu,
        .maxPool2d(kernel: 2, stride: 2), .flatten, .linear(inputs: 36, outputs: 8), .tanh, .batchNorm(features: 8),
        .linear(inputs: 8, outputs: 3),
    ], inputShape: [1, 6, 6])

    /// A model of `spec` holding `rows` rows of the 8-row global batch, from row `first` on.
    static func model(rows: Int, from first: Int, reducer: CrossRankReducer?, fault: GradientFault? = nil) throws -> Model<Double> {
        let global = try Model<Double>(spec: spec, batchCapacity: 8, seed: 5)
        fillRandomBatch(global, rows: 8, seed: 5)
        let model = try Model<Double>(spec: spec, batchCapacity: rows, seed: 5, crossRankReducer: reducer)
        let width = model.inputWidth
        for i in 0..<(rows * width) { model.inputs[i] = global.inputs[first * width + i] }
        for r in 0..<rows { model.labels[r] = global.labels[first + r] }
        model.installGradientFault(fault)
        return model
    }

    /// Each of `ranks` ranks checks 8 / ranks rows of the global batch, its batch norm summing across the ranks.
    static func distributedCheck(ranks: Int, fault: GradientFault? = nil) -> [GradientCheckReport] {
        let threads = ThreadRanks(ranks)
        return threads.run { rank in
            let sums = threads.reducer(rank: rank), rows = 8 / ranks
            let model = try! Self.model(rows: rows, from: rank * rows, reducer: sums, fault: fault)
            return checkGradients(model: model, count: rows, acrossRanks: sums)
        }
    }

    /// J is the mean over the ranks of their mean losses and the gradient their average, and synchronized batch norm
    /// normalises over the global batch: 2 ranks of 4 rows must measure what one model measures on all 8 (J, every
    /// gradient norm, grad . u, and the same kinks), to rounding, and every rank returns the same report.
    @Test func ranksMeasureWhatOneModelMeasuresOnTheGlobalBatch() throws {
        let alone = checkGradients(model: try Self.model(rows: 8, from: 0, reducer: nil), count: 8)
        let reports = Self.distributedCheck(ranks: 2)
        #expect(!alone.distributed && alone.ranks == 1 && alone.samples == 8)
        for together in reports {
            #expect(alone.verdict == .pass && together.verdict == .pass, "\(alone.text)\n\(together.text)")
            #expect(together.distributed && together.ranks == 2 && together.samples == 8 && together.batchSize == 4)
            #expect(together.text.contains("distributed over 2 ranks, batch 4 per rank (8 samples)"), "\(together.text)")
            #expect(abs(together.loss - alone.loss) <= 1e-12 * abs(alone.loss), "\(together.loss) vs \(alone.loss)")
            #expect(together.tensors.map(\.name) == alone.tensors.map(\.name))
            for (a, t) in zip(alone.tensors, together.tensors) {
                #expect(a.checked == t.checked && a.kinksSkipped == t.kinksSkipped, "\(a.name)")
                #expect(abs(a.gradientNorm - t.gradientNorm) <= 1e-10 * a.gradientNorm, "\(a.name): \(t.gradientNorm) vs \(a.gradientNorm)")
            }
            #expect(abs(together.direction.analytic - alone.direction.analytic) <= 1e-10 * abs(alone.direction.analytic))
        }
        #expect(reports[0].tensors == reports[1].tensors && reports[0].direction == reports[1].direction)
    }

    /// Synchronized batch norm's input gradient with the rank's own sum of dy where the global one belongs: invisible
    /// to a rank checking alone (there is no global sum), a failure naming the tensor below the layer across ranks,
    /// for the batch norm over images (layer 1, above the convolution) and over features (layer 7, above a linear).
    @Test(arguments: [("1.weight", "0.weight"), ("7.weight", "5.weight")])
    func theLocalSumsBugShowsOnlyAcrossRanks(norm: String, below: String) throws {
        let fault = GradientFault.batchNormLocalSums(tensor: norm)
        let alone = checkGradients(model: try Self.model(rows: 4, from: 0, reducer: nil, fault: fault), count: 4)
        #expect(alone.verdict == .pass, "\(alone.text)")
        for together in Self.distributedCheck(ranks: 2, fault: fault) {
            #expect(together.verdict == .fail, "\(together.text)")
            #expect(together.failures.contains { $0.hasPrefix(below) }, "\(together.failures)")
            #expect(together.tensors.first { $0.name == norm }?.verdict == .pass, "the layer's own parameters are right")
        }
    }

    /// Rank 0's sample puts the first hidden unit's ReLU input exactly on its kink, rank 1's sample keeps it far from
    /// it: perturbing that unit's weights or bias straddles the kink on rank 0 only, and every rank must skip those
    /// coordinates (a rank going on alone would leave the collectives unmatched), while rank 1 alone skips nothing.
    @Test func aKinkOnOneRankIsSkippedOnEveryRank() throws {
        @Sendable func model(rank: Int) throws -> Model<Double> {
            let model = try Model<Double>(spec: .mlp(widths: [2, 2, 2]), batchCapacity: 1, seed: 1)
            setTensor(model, "0.weight", [1, 1, 1, -1])
            setTensor(model, "0.bias", [0, 0])
            // Pre-activations: rank 0 (0, 2), unit 0 on its kink; rank 1 (3, -1), both units far from theirs.
            let input: [Double] = rank == 0 ? [1, -1] : [1, 2]
            for i in input.indices { model.inputs[i] = input[i] }
            model.labels[0] = Int32(rank)
            return model
        }
        var options = GradientCheckOptions()
        options.checkAllCoordinates = true
        let threads = ThreadRanks(2)
        let reports = threads.run { [options] rank in
            checkGradients(model: try! model(rank: rank), count: 1, options: options, acrossRanks: threads.reducer(rank: rank))
        }
        let kinks = { (report: GradientCheckReport) in report.tensors.map { [$0.checked, $0.kinksSkipped] } }
        // Tensors 0.weight, 0.bias, 2.weight, 2.bias: unit 0's two weights and its bias straddle the kink.
        for report in reports { #expect(kinks(report) == [[2, 2], [1, 1], [4, 0], [2, 0]], "\(report.text)") }
        #expect(reports[0].tensors == reports[1].tensors && reports[0].direction == reports[1].direction)
        let rankOneAlone = checkGradients(model: try model(rank: 1), count: 1, options: options)
        #expect(kinks(rankOneAlone) == [[4, 0], [2, 0], [4, 0], [2, 0]], "\(rankOneAlone.text)")
    }
}

/// Ranks of a data-parallel job as threads of one process. `reducer(rank:)` is that rank's `CrossRankReducer`: a
/// collective that waits until every rank has called it, then hands each the element-wise sum, added in rank order
/// so that every rank gets the same bits. Calls that do not match up (a rank that skips one) stop the test process
/// after a minute instead of hanging.
final class ThreadRanks: @unchecked Sendable {
    let count: Int
    private let condition = NSCondition()
    private var waiting: [UnsafeMutableBufferPointer<Double>?]
    private var arrived = 0
    private var generation = 0

    init(_ count: Int) {
        self.count = count
        waiting = Array(repeating: nil, count: count)
    }

    func reducer(rank: Int) -> CrossRankReducer { Rank(ranks: self, rank: rank) }

    /// Runs `body(rank)` on a thread of its own for every rank; the results in rank order.
    func run<R>(_ body: @escaping @Sendable (Int) -> R) -> [R] {
        let results = Results<R>(count)
        let group = DispatchGroup()
        for rank in 0..<count {
            group.enter()
            let thread = Thread {
                results.set(rank, body(rank))
                group.leave()
            }
            thread.stackSize = 16 << 20
            thread.start()
        }
        group.wait()
        return results.values
    }

    fileprivate func sum(_ values: UnsafeMutableBufferPointer<Double>, rank: Int) {
        condition.lock()
        defer { condition.unlock() }
        waiting[rank] = values
        arrived += 1
        guard arrived < count else {
            let buffers = waiting.map { $0! }
            precondition(buffers.allSatisfy { $0.count == values.count }, "ranks summed different counts")
            for i in values.indices {
                let total = buffers.reduce(0.0) { $0 + $1[i] }
                for buffer in buffers { buffer[i] = total }
            }
            (arrived, generation) = (0, generation + 1)
            waiting = Array(repeating: nil, count: count)
            condition.broadcast()
            return
        }
        let mine = generation
        while generation == mine {
            precondition(condition.wait(until: Date() + 60), "rank \(rank) waited a minute: the collectives did not match")
        }
    }

    private final class Rank: CrossRankReducer {
        let ranks: ThreadRanks, rank: Int
        init(ranks: ThreadRanks, rank: Int) { (self.ranks, self.rank) = (ranks, rank) }
        func sumAcrossRanks(_ values: UnsafeMutableBufferPointer<Double>) { ranks.sum(values, rank: rank) }
    }

    private final class Results<R>: @unchecked Sendable {
        private let lock = NSLock()
        private var slots: [R?]
        init(_ count: Int) { slots = Array(repeating: nil, count: count) }
        func set(_ index: Int, _ value: R) { lock.withLock { slots[index] = value } }
        var values: [R] { lock.withLock { slots.map { $0! } } }
    }
}
