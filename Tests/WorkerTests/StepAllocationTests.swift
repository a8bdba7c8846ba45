import AllocationCounter
import Engine
import Foundation
import Synchronization
import Testing
@testable import Worker

/// The real training step, `TrainingLoop.step`, as `bpworker train` builds it (`Trainer.setUp`, local mode, in this
/// process): after warm-up a step must not touch the heap, with every phase run through the watchdog and, with
/// `--timeline`, recorded. (CoordinatorTests' AllocationTests take the engine and reducer apart; this is the loop.)
@Suite("The real step allocates nothing", .serialized, .temporaryFiles)
struct StepAllocationTests {
    /// Heap allocations of this thread over `steps` steps after `warmUp` steps of a local run with `settings`.
    func allocations(_ data: SyntheticData, _ settings: [String], warmUp: Int = 4, steps: Int = 12) throws -> UInt {
        try allocations(data.arguments, settings, warmUp: warmUp, steps: steps)
    }

    func allocations(_ dataArguments: [String], _ settings: [String], warmUp: Int = 4, steps: Int = 12) throws -> UInt {
        // One BLAS thread, as every rank of a multi-rank node runs: with more, OpenBLAS allocates its thread jobs in
        // every large GEMM, outside bpworker's code (BENCHMARKS.md, table 5).
        var arguments = ["--local", "--blas-threads", "1", "--run-dir", temporaryRunDirectory(), "--progress", "plain"]
            + dataArguments
        for setting in ["training.batch_size=8", "training.epochs=1", "schedule.warmup_steps=0", "logging.interval=1000",
                        "data.normalize=scale", "checkpoint.every_steps=0"] + settings {
            arguments += ["--set", setting]
        }
        let session = Session.start(options: try RunOptions.parse(arguments), extraOverrides: [])
        let (loop, _) = Trainer.setUp(session, resume: nil, overwrite: false)
        // The prefetch thread's own count after each batch it gathers (`data.prefetch`, on by default).
        let gathered = GatheredAllocations()
        loop.batches.observeGathered { step in gathered.record(step: step, allocations: bp_thread_allocations()) }
        loop.beginEpoch(0)
        for step in 0..<warmUp { _ = try loop.step(step) }
        let before = bp_thread_allocations()
        var completed = 0
        for step in warmUp..<(warmUp + steps) {
            if case (.completed, _) = try loop.step(step) { completed += 1 }
        }
        let count = bp_thread_allocations() - before
        #expect(completed == steps)
        loop.batches.close()
        let producer = gathered.counts.filter { $0.step >= warmUp }.map(\.allocations)
        if loop.batches.depth > 0 {
            #expect(producer.count >= steps && producer.last == producer.first, "the prefetch thread allocated: \(gathered.counts)")
        }
        return count
    }

    @Test(arguments: [
        ["training.reduction=sharded"],
        ["training.reduction=allreduce", "optimizer.clip_norm=1.0"],
        ["optimizer.name=adamw", "model.dropout=0.2"],
        ["timeline.steps=40", "timeline.warmup_steps=1"],
    ])
    func mlpSteps(settings: [String]) throws {
        let data = try SyntheticData(samples: 256, features: 64, classes: 4)
        let count = try allocations(data, settings)
        #expect(count == 0, "\(count) allocations in 12 steps with \(settings)")
    }

    @Test func cnnStepsWithBatchNormAndAugmentation() throws {
        let data = try SyntheticData(samples: 128, features: 64, classes: 4, imageShape: [1, 8, 8])
        let settings = ["model.layers=[conv 4 3 pad 1 nobias, batchnorm, relu, maxpool 2, flatten, linear 4]",
                        "data.augment.flip=true", "data.augment.crop_padding=1"]
        let count = try allocations(data, settings)
        #expect(count == 0, "\(count) allocations in 12 steps")
    }

    /// Residual blocks: the inner layers' passes (fused block and dropout in a body, a projection shortcut), the sum
    /// and the gradient where the paths meet.
    @Test func residualBlockSteps() throws {
        let data = try SyntheticData(samples: 128, features: 64, classes: 4, imageShape: [1, 8, 8])
        let settings = ["model.layers=[conv 4 3 pad 1 nobias, batchnorm, relu, "
                            + "{residual: [conv 4 3 pad 1 nobias, batchnorm, relu, dropout 0.2, conv 4 3 pad 1 nobias, batchnorm]}, relu, "
                            + "{residual: [conv 6 3 pad 1 nobias, batchnorm, relu, maxpool 2], shortcut: [conv 6 1 stride 2 nobias]}, "
                            + "flatten, linear 4]"]
        let count = try allocations(data, settings)
        #expect(count == 0, "\(count) allocations in 12 steps")
    }

    /// Winograd convolutions (3x3, 16 channels and more): their transforms' runs, the tables that place a plane's
    /// positions in the interleaved blocks, the 36 GEMMs a pass, inside a residual block and out of one; whole batches
    /// and chunks of 3 samples (batch 8: 3 + 3 + 2, backward from the last chunk).
    @Test(arguments: [Int.max, 3])
    func winogradSteps(chunk: Int) throws {
        let data = try SyntheticData(samples: 128, features: 64, classes: 4, imageShape: [1, 8, 8])
        let settings = ["model.layers=[conv 16 3 pad 1 nobias, batchnorm, relu, "
                            + "{residual: [conv 16 3 pad 1 nobias, batchnorm, relu, conv 16 3 pad 1 nobias, batchnorm]}, relu, "
                            + "conv 24 3 pad 1, relu, globalavgpool, flatten, linear 4]"]
        let count = try WinogradChunks.withChunkSamples(chunk) { try allocations(data, settings) }
        #expect(count == 0, "\(count) allocations in 12 steps, chunks of \(chunk)")
    }

    /// Mapped `.npy` shards: gathering from the mapping and asking for the pages of a later batch (`data.prefetch`).
    @Test func mappedShardSteps() throws {
        let directory = temporaryRunDirectory()
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        let script = "import numpy as np, sys; d = sys.argv[1]; rng = np.random.default_rng(2)\n"
            + "for i in range(3):\n"
            + "    np.save(f'{d}/x-{i}.npy', rng.normal(size=(100, 64)).astype(np.float32))\n"
            + "    np.save(f'{d}/y-{i}.npy', rng.integers(0, 4, 100))"
        let written = try Harness.run("/usr/bin/env", ["python3", "-c", script, directory], environment: [:], timeout: 60)
        #expect(written.status == 0, "\(written.output)")
        let data = ["--set", "data.format=npy", "--set", "data.train_features=\(directory)/x-*.npy",
                    "--set", "data.train_labels=\(directory)/y-*.npy", "--set", "data.test_features=\(directory)/x-0.npy",
                    "--set", "data.test_labels=\(directory)/y-0.npy"]
        let count = try allocations(data, ["data.prefetch=2"])
        #expect(count == 0, "\(count) allocations in 12 steps")
    }

    /// The counter counts: a step that allocates is seen (an array made inside the measured steps).
    @Test func theCounterSeesAnAllocation() {
        let before = bp_thread_allocations()
        let made = [Int](repeating: 1, count: Int.random(in: 100...200))
        #expect(made.count >= 100)
        #expect(bp_thread_allocations() - before >= 1)
    }
}

/// The prefetch thread's allocation count after each batch it gathered.
final class GatheredAllocations: Sendable {
    /// Reserved: appending must not allocate on the thread it counts.
    private let all = Mutex<[(step: Int, allocations: UInt)]>({
        var counts: [(step: Int, allocations: UInt)] = []
        counts.reserveCapacity(1000)
        return counts
    }())
    func record(step: Int, allocations: UInt) { all.withLock { $0.append((step, allocations)) } }
    var counts: [(step: Int, allocations: UInt)] { all.withLock { $0 } }
}
