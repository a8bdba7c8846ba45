#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import Foundation
import Synchronization

/// The sample a gather is reading now, published for another thread: a watchdog names the file of a read that stalls
/// (`Dataset.file(ofSample:)`). One relaxed store per sample.
public final class ReadCursor: Sendable {
    public let sample = Atomic<Int>(-1)
    public init() {}
}

/// A training set's batches, gathered (read, converted, normalised, augmented) on a background thread up to `depth`
/// steps ahead of the step that uses them, into buffers allocated once: a read from disk or a decompression overlaps
/// the steps' compute instead of adding to it. `take` copies a finished batch into the model's input buffers.
///
/// The batches are the same as gathering in the step: a batch is a function of (epoch, the rank's sample indices, the
/// augmentation seed), whichever thread gathers it. With `depth` 0 there is no thread: `take` gathers in the step.
///
/// Threads: `begin`, `take` and `close` are called from the training thread; the gathering thread touches the data set
/// only between them, and `begin` and `close` wait until it is idle, so the training thread may use the data set (a
/// gradient check, a change check) whenever no epoch is being prefetched. Neither side allocates after the first batch.
public final class BatchPrefetcher: @unchecked Sendable {
    /// Batches gathered ahead; 0 gathers in `take`.
    public let depth: Int
    public let batchSize: Int
    private let shared: Shared
    /// Seconds `take` spent waiting for its batch and copying it (or gathering it, with depth 0), since the last
    /// `resetWait()`. Training thread only.
    public private(set) var waitSeconds = 0.0

    /// - Parameters:
    ///   - stepsPerEpoch: the most steps an epoch has (sizes the copy of the epoch's indices, made once).
    ///   - beforeRead: called on the gathering thread with the global step of each batch, before it is read (tests
    ///     stall a read there).
    public init(dataset: Dataset, batchSize: Int, stepsPerEpoch: Int, depth: Int, augmentation: Augmentation?,
                cursor: ReadCursor? = nil, beforeRead: @escaping @Sendable (Int) -> Void = { _ in }) {
        precondition(depth >= 0 && batchSize > 0 && stepsPerEpoch >= 0)
        self.depth = depth
        self.batchSize = batchSize
        shared = Shared(dataset: dataset, batchSize: batchSize, stepsPerEpoch: stepsPerEpoch, depth: depth,
                        augmentation: augmentation, cursor: cursor, beforeRead: beforeRead)
        guard depth > 0 else { return }
        let thread = Thread { [shared] in shared.gatherAhead() }
        thread.name = "bpworker-prefetch"
        thread.start()
    }

    deinit { close() }

    /// Tests: called on the gathering thread after each batch it gathers, with the batch's step.
    public func observeGathered(_ observer: @escaping @Sendable (Int) -> Void) {
        shared.locked { shared.afterGather = observer }
    }

    /// Starts an epoch at `firstStep`, whose batches are `indices` in step order (`batchSize` each; copied), step
    /// `firstStep` being global step `globalStep`. Waits for a batch of the previous epoch still being gathered.
    public func begin(epoch: Int, indices: UnsafeBufferPointer<Int>, firstStep: Int, globalStep: Int) {
        precondition(indices.count % batchSize == 0 && indices.count <= shared.indices.count, "begin: \(indices.count) indices")
        shared.locked {
            shared.waitUntilIdle()
            _ = shared.indices.update(fromContentsOf: indices)
            shared.epoch = epoch
            shared.firstStep = firstStep
            shared.firstGlobalStep = globalStep
            shared.nextToGather = firstStep
            shared.nextToTake = firstStep
            shared.end = indices.count / batchSize
            for slot in 0..<depth { shared.slotSteps[slot] = -1 }
            shared.signal()
        }
    }

    /// Copies step `step`'s batch into `inputs` ([batchSize, featureCount]) and `labels`, waiting for it if it is not
    /// gathered yet. Steps are taken in order from `begin`'s `firstStep`. Throws the error of a batch that could not
    /// be read (a damaged file), naming the file.
    public func take(step: Int, into inputs: UnsafeMutablePointer<Float>, labels: UnsafeMutablePointer<Int32>) throws {
        let started = DispatchTime.now().uptimeNanoseconds
        defer { waitSeconds += Double(DispatchTime.now().uptimeNanoseconds - started) * 1e-9 }
        guard depth > 0 else {
            try shared.gather(step: step, into: inputs, labels: labels)
            return
        }
        let slot = step % depth
        let failure: Error? = shared.locked {
            precondition(step == shared.nextToTake && step < shared.end, "take: step \(step), expected \(shared.nextToTake)")
            while shared.slotSteps[slot] != step { shared.wait() }
            return shared.slotErrors[slot]
        }
        if let failure { throw failure }
        let values = batchSize * shared.featureCount
        inputs.update(from: shared.inputs + slot * values, count: values)
        labels.update(from: shared.labels + slot * batchSize, count: batchSize)
        shared.locked {
            shared.nextToTake = step + 1
            shared.signal()
        }
    }

    public func resetWait() { waitSeconds = 0 }

    /// The samples of step `step` of the current epoch (training thread, between `begin` and the epoch's end).
    public func indices(ofStep step: Int) -> UnsafeBufferPointer<Int> { shared.batch(step) }

    /// Ends the gathering thread after the batch it is reading, if any. Called by `deinit`.
    public func close() {
        shared.locked {
            shared.closed = true
            shared.signal()
            shared.waitUntilIdle()
        }
    }

    /// Bytes of the batches gathered ahead (for the memory estimate).
    public static func bufferBytes(depth: Int, batchSize: Int, featureCount: Int) -> Double {
        Double(depth * batchSize * (featureCount * MemoryLayout<Float>.stride + MemoryLayout<Int32>.stride))
    }
}

/// What the two threads share: the slots and the positions, under one mutex; the data set and the buffers, which the
/// positions hand from one thread to the other.
private final class Shared: @unchecked Sendable {
    let dataset: Dataset
    let batchSize, featureCount, depth: Int
    let augmentation: Augmentation?
    let cursor: ReadCursor?
    let beforeRead: @Sendable (Int) -> Void
    /// `depth` batches, each [batchSize, featureCount], and their labels.
    let inputs: UnsafeMutablePointer<Float>
    let labels: UnsafeMutablePointer<Int32>
    /// The epoch's indices in step order.
    let indices: UnsafeMutableBufferPointer<Int>
    private let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    private let changed = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)

    // Under the mutex.
    var epoch = 0, firstStep = 0, firstGlobalStep = 0
    var nextToGather = 0, nextToTake = 0, end = 0
    /// The step whose batch each slot holds (-1: none yet), and the error of one that could not be read.
    let slotSteps: UnsafeMutableBufferPointer<Int>
    var slotErrors: [Error?]
    var busy = false, closed = false
    var afterGather: (@Sendable (Int) -> Void)?

    init(dataset: Dataset, batchSize: Int, stepsPerEpoch: Int, depth: Int, augmentation: Augmentation?, cursor: ReadCursor?,
         beforeRead: @escaping @Sendable (Int) -> Void) {
        self.dataset = dataset
        self.batchSize = batchSize
        featureCount = dataset.featureCount
        self.depth = depth
        self.augmentation = augmentation
        self.cursor = cursor
        self.beforeRead = beforeRead
        inputs = .allocate(capacity: max(1, depth * batchSize * dataset.featureCount))
        labels = .allocate(capacity: max(1, depth * batchSize))
        indices = .allocate(capacity: stepsPerEpoch * batchSize)
        indices.initialize(repeating: 0)
        slotSteps = .allocate(capacity: depth)
        slotSteps.initialize(repeating: -1)
        slotErrors = Array(repeating: nil, count: depth)
        pthread_mutex_init(mutex, nil)
        pthread_cond_init(changed, nil)
    }

    deinit {
        pthread_cond_destroy(changed)
        pthread_mutex_destroy(mutex)
        mutex.deallocate()
        changed.deallocate()
        inputs.deallocate()
        labels.deallocate()
        indices.deallocate()
        slotSteps.deallocate()
    }

    @inline(__always)
    func locked<T>(_ body: () throws -> T) rethrows -> T {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return try body()
    }

    /// With the mutex held.
    func wait() { pthread_cond_wait(changed, mutex) }
    func signal() { pthread_cond_broadcast(changed) }
    func waitUntilIdle() { while busy { wait() } }

    func batch(_ step: Int) -> UnsafeBufferPointer<Int> {
        UnsafeBufferPointer(rebasing: indices[(step * batchSize)..<((step + 1) * batchSize)])
    }

    /// Gathers step `step` of the current epoch; on the gathering thread, or on the training thread with depth 0.
    func gather(step: Int, into inputs: UnsafeMutablePointer<Float>, labels: UnsafeMutablePointer<Int32>) throws {
        let batch = batch(step)
        cursor?.sample.store(batch[0], ordering: .relaxed)
        beforeRead(firstGlobalStep + step - firstStep)
        try dataset.gather(indices: batch, into: inputs, labels: labels, augmentation: augmentation, epoch: epoch,
                           cursor: cursor)
    }

    /// The gathering thread: whenever a slot is free and the epoch has a step left to gather, gathers it outside the
    /// mutex. A free slot is one whose batch was taken: step s goes to slot s % depth once step s - depth is taken.
    func gatherAhead() {
        pthread_mutex_lock(mutex)
        while true {
            while !closed && !(nextToGather < end && nextToGather < nextToTake + depth) { wait() }
            if closed { break }
            let step = nextToGather, slot = step % depth
            busy = true
            pthread_mutex_unlock(mutex)
            // The pages of the batch `depth` steps further on start coming from disk now (mapped data), many requests
            // in flight while this thread reads the current one.
            if step + depth < end { dataset.willNeed(batch(step + depth)) }
            var failure: Error?
            do {
                try gather(step: step, into: inputs + slot * batchSize * featureCount, labels: labels + slot * batchSize)
            } catch {
                failure = error
            }
            pthread_mutex_lock(mutex)
            afterGather?(step)
            busy = false
            slotSteps[slot] = step
            slotErrors[slot] = failure
            nextToGather = step + 1
            signal()
        }
        pthread_mutex_unlock(mutex)
    }
}
