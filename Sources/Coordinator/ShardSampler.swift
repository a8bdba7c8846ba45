import Engine

/// Which samples each rank trains on, with the semantics of PyTorch's DistributedSampler.
///
/// Every epoch has one permutation of the data set drawn from (seed, epoch): identical on every rank, with no
/// communication. Rank r takes every world-size-th element starting at r, and batches its share in order, so
/// step s on all ranks together covers exactly the global batch perm[s*G ..< (s+1)*G], G = batch x ranks: the
/// same samples one rank with batch G would see. Every rank runs the same number of steps per epoch whatever
/// the data set size, so uneven data never deadlocks a collective:
/// - `drop`: floor(N / G) steps; the tail of each epoch's permutation is left out (a different tail each epoch).
/// - `wrap`: ceil(N / G) steps; the permutation is extended with its own first elements to fill the last batch.
public struct ShardSampler: Sendable {
    public enum Remainder: String, Sendable { case drop, wrap }

    public let datasetSize: Int
    public let rank: Int
    public let worldSize: Int
    /// Samples per rank per step.
    public let batchSize: Int
    public let seed: UInt64
    public let remainder: Remainder

    public var globalBatchSize: Int { batchSize * worldSize }
    public let stepsPerEpoch: Int

    public init(datasetSize: Int, rank: Int, worldSize: Int, batchSize: Int, seed: UInt64,
                remainder: Remainder = .drop) throws(ShardingError) {
        guard batchSize > 0 else { throw ShardingError("batch size must be at least 1, got \(batchSize)") }
        guard worldSize > 0, rank >= 0, rank < worldSize else {
            throw ShardingError("rank \(rank) is not in a world of \(worldSize)")
        }
        guard datasetSize >= worldSize else {
            throw ShardingError("the data set has \(datasetSize) sample\(datasetSize == 1 ? "" : "s") but the job has \(worldSize) ranks: "
                + "every rank needs at least one sample")
        }
        let global = batchSize * worldSize
        let steps = remainder == .drop ? datasetSize / global : (datasetSize + global - 1) / global
        guard steps > 0 else {
            throw ShardingError("the data set has \(datasetSize) samples, fewer than one global batch of "
                + "\(global) (\(batchSize) per rank x \(worldSize) rank\(worldSize == 1 ? "" : "s")): lower training.batch_size, "
                + "use fewer ranks or set data.remainder=wrap")
        }
        self.datasetSize = datasetSize
        self.rank = rank
        self.worldSize = worldSize
        self.batchSize = batchSize
        self.seed = seed
        self.remainder = remainder
        self.stepsPerEpoch = steps
    }

    /// The epoch's permutation, the same on every rank.
    public func permutation(epoch: Int) -> [Int] {
        var generator = RandomGenerator(seed: seed &+ UInt64(epoch) &* 0x9E37_79B9, stream: .shuffle)
        return generator.permutation(datasetSize)
    }

    /// This rank's samples for the epoch, in step order: stepsPerEpoch x batchSize indices.
    /// Call once per epoch; `batch(_:step:)` then slices it without allocating.
    public func indices(epoch: Int) -> [Int] {
        let perm = permutation(epoch: epoch)
        let total = stepsPerEpoch * globalBatchSize
        // wrap: reuse the permutation from its start (more than once when the data set is smaller than a
        // global batch), as DistributedSampler pads: position i takes perm[i % datasetSize]. (Appending the
        // permutation's own prefix to it copied the whole array at each append: a batch of 2^24 over 256 samples
        // took hours.)
        return stride(from: rank, to: total, by: worldSize).map { perm[$0 % datasetSize] }
    }

    /// The slice of `indices(epoch:)` for one step.
    public func batch(_ epochIndices: UnsafeBufferPointer<Int>, step: Int) -> UnsafeBufferPointer<Int> {
        UnsafeBufferPointer(rebasing: epochIndices[(step * batchSize)..<((step + 1) * batchSize)])
    }

    /// Evaluation shard: every sample exactly once over all ranks (rank r takes r, r + W, ...), no padding.
    /// Ranks may get one sample more or less; evaluation reduces sums and counts once at the end, so that
    /// needs no matching steps.
    public static func evaluationIndices(datasetSize: Int, rank: Int, worldSize: Int) -> [Int] {
        Array(stride(from: rank, to: datasetSize, by: worldSize))
    }
}

public struct ShardingError: Error, CustomStringConvertible, Equatable {
    public let description: String
    public init(_ description: String) { self.description = description }
}
