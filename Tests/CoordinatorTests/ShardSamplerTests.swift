import Coordinator
import Testing

@Suite("Sharding like DistributedSampler")
struct ShardSamplerTests {
    @Test(arguments: [(103, 4, 5), (100, 3, 7), (10, 2, 5), (7, 7, 1), (5, 2, 8)])
    func disjointCompleteAndEqual(size: Int, ranks: Int, batch: Int) throws {
        for remainder in [ShardSampler.Remainder.drop, .wrap] where remainder == .wrap || size >= batch * ranks {
            let samplers = try (0..<ranks).map {
                try ShardSampler(datasetSize: size, rank: $0, worldSize: ranks, batchSize: batch, seed: 11, remainder: remainder)
            }
            let global = batch * ranks
            // Every rank runs the same number of steps, whatever the remainder.
            #expect(Set(samplers.map(\.stepsPerEpoch)).count == 1)
            let steps = samplers[0].stepsPerEpoch
            #expect(steps == (remainder == .drop ? size / global : (size + global - 1) / global))
            for epoch in 0..<3 {
                let shards = samplers.map { $0.indices(epoch: epoch) }
                #expect(shards.allSatisfy { $0.count == steps * batch })
                let all = shards.flatMap { $0 }
                if remainder == .drop {
                    // Disjoint: no sample on two ranks or twice on one.
                    #expect(Set(all).count == all.count)
                    #expect(all.count == steps * global)
                } else {
                    // Complete: every sample is used; only the wrapped ones repeat.
                    #expect(Set(all) == Set(0..<size))
                    #expect(all.count == steps * global)
                }
                // Step s over all ranks is exactly the global batch perm[s G ..< (s+1) G].
                var perm = samplers[0].permutation(epoch: epoch)
                let base = perm
                while perm.count < steps * global { perm += base.prefix(steps * global - perm.count) }
                for s in 0..<steps {
                    let union = (0..<ranks).flatMap { shards[$0][(s * batch)..<((s + 1) * batch)] }
                    #expect(Set(union) == Set(perm[(s * global)..<((s + 1) * global)]))
                }
            }
        }
    }

    /// A global batch far larger than the data set wraps the permutation many times: position i of the epoch takes
    /// perm[i % size]. Built by appending the permutation's prefix, this copied the array at each append, and a batch
    /// of 2^22 over 256 samples ran for many minutes; now it is one pass.
    @Test func aBatchManyTimesTheDataSetWrapsInOnePass() throws {
        let sampler = try ShardSampler(datasetSize: 256, rank: 1, worldSize: 2, batchSize: 1 << 22, seed: 5, remainder: .wrap)
        let perm = sampler.permutation(epoch: 3)
        let indices = sampler.indices(epoch: 3)
        #expect(indices.count == 1 << 22)
        for k in [0, 1, 127, 128, 129, 1000, (1 << 22) - 1] { #expect(indices[k] == perm[(2 * k + 1) % 256]) }
    }

    @Test func deterministicPerEpochAndDifferentAcrossEpochs() throws {
        let a = try ShardSampler(datasetSize: 1000, rank: 1, worldSize: 2, batchSize: 10, seed: 3)
        let b = try ShardSampler(datasetSize: 1000, rank: 1, worldSize: 2, batchSize: 10, seed: 3)
        #expect(a.indices(epoch: 4) == b.indices(epoch: 4))
        #expect(a.indices(epoch: 4) != a.indices(epoch: 5))
        let c = try ShardSampler(datasetSize: 1000, rank: 1, worldSize: 2, batchSize: 10, seed: 4)
        #expect(a.indices(epoch: 4) != c.indices(epoch: 4))
    }

    @Test func oneRankWithTheGlobalBatchSeesTheSameSamples() throws {
        // The basis of N ranks x batch b == 1 rank x batch N b.
        let single = try ShardSampler(datasetSize: 64, rank: 0, worldSize: 1, batchSize: 16, seed: 9)
        let ranks = try (0..<4).map { try ShardSampler(datasetSize: 64, rank: $0, worldSize: 4, batchSize: 4, seed: 9) }
        #expect(single.stepsPerEpoch == ranks[0].stepsPerEpoch)
        let whole = single.indices(epoch: 2)
        let shards = ranks.map { $0.indices(epoch: 2) }
        for s in 0..<single.stepsPerEpoch {
            let union = shards.flatMap { $0[(s * 4)..<((s + 1) * 4)] }
            #expect(Set(union) == Set(whole[(s * 16)..<((s + 1) * 16)]))
        }
    }

    @Test func impossibleSettingsAreClearErrors() {
        #expect(throws: ShardingError.self) { try ShardSampler(datasetSize: 3, rank: 0, worldSize: 4, batchSize: 1, seed: 0) }
        #expect(throws: ShardingError.self) { try ShardSampler(datasetSize: 100, rank: 0, worldSize: 1, batchSize: 0, seed: 0) }
        #expect(throws: ShardingError.self) { try ShardSampler(datasetSize: 10, rank: 0, worldSize: 2, batchSize: 6, seed: 0) }
        // The reason in words, with one rank counted as one.
        #expect(throws: ShardingError("the data set has 10 samples, fewer than one global batch of 12 (12 per rank x 1 rank): "
                                      + "lower training.batch_size, use fewer ranks or set data.remainder=wrap")) {
            try ShardSampler(datasetSize: 10, rank: 0, worldSize: 1, batchSize: 12, seed: 0)
        }
        #expect((try? ShardSampler(datasetSize: 10, rank: 0, worldSize: 2, batchSize: 6, seed: 0, remainder: .wrap))?.stepsPerEpoch == 1)
        do {
            _ = try ShardSampler(datasetSize: 3, rank: 0, worldSize: 4, batchSize: 1, seed: 0)
        } catch {
            #expect(error.description.contains("3 samples") && error.description.contains("4 ranks"))
        }
    }

    @Test func evaluationCoversEverySampleOnce() {
        let shards = (0..<3).map { ShardSampler.evaluationIndices(datasetSize: 10, rank: $0, worldSize: 3) }
        #expect(shards.flatMap { $0 }.sorted() == Array(0..<10))
    }
}
