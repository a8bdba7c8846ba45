import Engine
import Foundation

/// Turns every rank's gradients into one identical update of every rank's parameters, in buckets that overlap
/// with backward.
///
/// Buckets are contiguous ranges of the gradient buffer, made of whole tensors taken in reverse layer order
/// (the order backward finishes them) until a bucket holds at least `bucketElements`; 0 means one bucket,
/// communicated after backward. Backward reports through `gradientsReady(from:)` that everything from an offset
/// on is final; every bucket lying wholly past that offset starts at once, in place on its range: no copies, no
/// packing. Because nonblocking communication progresses only inside MPI calls, each report also polls what is
/// in flight. `finish()` waits for all of it; `update(_:parameters:learningRate:gradientScale:)` then applies the
/// optimizer, which reads the gradients times `gradientScale` (1 / ranks, times any clipping factor) in its own
/// pass instead of the reducer making one more.
///
/// Two strategies, chosen by measurement (BENCHMARKS.md, table 4):
/// - `.sharded` (the default): every bucket is cut into one even piece per rank (`partitions`), and rank r
///   owns piece r of each. A bucket's pieces go straight to their owners as soon as backward has written it
///   (`MPI_Isend`/`MPI_Irecv`, receives posted before the first send), so every rank sends and receives the
///   same amount at the same time; each owner updates only its pieces, adding the received gradients inside
///   the optimizer's pass, then the ranks gather the updated parameters bucket by bucket (`MPI_Allgatherv`).
///   Per rank, the optimizer streams 1 / ranks of the parameters and state, and no pass of its own sums
///   gradients: on 2 ranks sharing 2 cores the step measured about 1 ms faster than with `.allreduce`. Every
///   parameter is computed by one rank and copied to the others, so replicas stay bitwise identical. The
///   optimizer state is current only in each rank's own pieces until `gatherOptimizerState(_:)`, which a
///   checkpoint calls first.
/// - `.allreduce`: each bucket is one `MPI_Iallreduce`; every rank then holds the sum and applies the whole
///   update itself.
///
/// Contract: buckets are started in the same order on every rank (the bucket list depends only on the model
/// layout and the bucket size, which ranks verify to be identical at start).
///
/// Control values: the slots that lie directly before the gradient buffer (`Model.control`) are summed over the
/// ranks with the last bucket started, the one holding offset 0: riding along in its allreduce, or in a small
/// allreduce of their own when sharded. Before each bucket starts, its non-finite values are counted into
/// `control[nonFiniteSlot]`, so after `finish()` every rank knows whether any rank produced a NaN or infinity
/// this step, at no extra round trip. A bucket that `provenFinite` vouches for is not read: its count is 0.
public final class GradientReducer {
    public enum Strategy: String, Sendable, CaseIterable {
        case sharded
        case allreduce
    }

    public let strategy: Strategy
    public let buckets: [Range<Int>]
    public let communicator: any Communicator
    /// How each bucket is cut into one piece per rank (`.sharded`); rank r updates piece r of every bucket.
    public let partitions: [Partition]
    private let gradients: UnsafeMutableBufferPointer<Float>
    private let control: UnsafeMutableBufferPointer<Float>
    private let nonFiniteSlot: Int?
    private let provenFinite: ((Range<Int>) -> Bool)?
    private var started = 0
    /// This rank's own count of non-finite gradient values in the current step (before reduction).
    public private(set) var localNonFiniteCount = 0
    /// 1 / world size: after `finish()`, the mean gradient is this times the sum over ranks.
    public var gradientScale: Double { 1 / Double(communicator.size) }
    /// Seconds spent blocked in `finish()` waiting for communication, summed since the last `resetTimers()`.
    public private(set) var waitSeconds = 0.0
    /// Where each bucket's posting, sends, receives and completion, the wait after backward, the update and the
    /// parameter gather are recorded while it records (`--timeline`). Nil, or not recording: no clock is read.
    public var timeline: TimelineRecorder? {
        didSet {
            times = timeline.map { BucketTimes(recorder: $0, buckets: buckets.count, sendBucket: sendPlan.map(\.bucket),
                                               receiveBucket: receivePlan.map(\.bucket)) }
        }
    }
    private var times: BucketTimes?

    // `.allreduce`: one request per bucket.
    private var reductions: [PendingRequest]

    // `.sharded`: what each bucket sends and receives, and the requests in flight. Piece k of bucket b is
    // sendPlan[sendStart[b] + k]; the plan is made once, so a step allocates nothing.
    private struct Piece {
        let bucket: Int
        let peer: Int
        let range: Range<Int>  // in the gradient buffer
    }
    private var sendPlan: [Piece] = []
    private var sendStart: [Int] = [0]
    private var receivePlan: [Piece] = []
    private var sends: [PendingRequest] = []
    private var receives: [PendingRequest] = []
    private var controlReduction = PendingRequest.completed
    private var receivesPosted = false
    /// This rank's piece of each bucket, in the flat buffer, and where its values start in `received`.
    private var ownPieces: [Range<Int>] = []
    private var ownOffsets: [Int] = []
    /// One buffer per other rank: the gradients it sent for this rank's pieces, one after another in bucket order.
    /// After `finish()` the first holds the sum of them all (nil on one rank): `peerSums`.
    private var received: [UnsafeMutableBufferPointer<Float>] = []
    private var peerSums: UnsafeMutablePointer<Float>? { received.first?.baseAddress }

    /// - Parameters:
    ///   - gradients: the flat gradient buffer; the parameters and optimizer state share its layout.
    ///   - tensorRanges: the ranges of the model's tensors in the flat buffer, in layer order.
    ///   - bucketElements: minimum elements per bucket; 0 means one bucket.
    ///   - control: slots directly before `gradients` in memory, reduced (summed) with the last bucket.
    ///   - nonFiniteSlot: index in `control` that receives this rank's count of non-finite gradient values.
    ///   - provenFinite: whether a range of this step's gradients is already known to hold no NaN or infinity
    ///     (`Model.gradientsProvenFinite(in:)`), so that counting would only read it again; nil: always count.
    public init(communicator: any Communicator, gradients: UnsafeMutableBufferPointer<Float>,
                tensorRanges: [Range<Int>], bucketElements: Int, strategy: Strategy = .sharded,
                control: UnsafeMutableBufferPointer<Float> = .init(start: nil, count: 0), nonFiniteSlot: Int? = nil,
                provenFinite: ((Range<Int>) -> Bool)? = nil) {
        precondition(control.count == 0 || control.baseAddress! + control.count == gradients.baseAddress!,
                     "control slots must sit directly before the gradients")
        precondition(nonFiniteSlot.map { $0 >= 0 && $0 < control.count } ?? true, "nonFiniteSlot outside control")
        self.communicator = communicator
        self.gradients = gradients
        self.control = control
        self.nonFiniteSlot = nonFiniteSlot
        self.provenFinite = provenFinite
        self.strategy = strategy
        var buckets: [Range<Int>] = []
        if bucketElements <= 0 {
            buckets = [0..<gradients.count]
        } else {
            var upper = gradients.count
            var lower = upper
            for range in tensorRanges.reversed() {
                lower = range.lowerBound
                if upper - lower >= bucketElements {
                    buckets.append(lower..<upper)
                    upper = lower
                }
            }
            if lower < upper { buckets.append(lower..<upper) }
        }
        self.buckets = buckets
        reductions = Array(repeating: .completed, count: buckets.count)
        partitions = buckets.map { Partition(count: $0.count, parts: communicator.size) }
        if strategy == .sharded { planPieces() }
    }

    deinit {
        for buffer in received { LargeBuffer.free(buffer) }
    }

    private var rank: Int { communicator.rank }

    /// Rank `owner`'s piece of bucket `b`, in the flat buffer.
    private func piece(_ b: Int, of owner: Int) -> Range<Int> {
        let part = partitions[b].range(of: owner)
        return (buckets[b].lowerBound + part.lowerBound)..<(buckets[b].lowerBound + part.upperBound)
    }

    private func planPieces() {
        var offset = 0
        for b in buckets.indices {
            let mine = piece(b, of: rank)
            ownPieces.append(mine)
            ownOffsets.append(offset)
            offset += mine.count
            for peer in 0..<communicator.size where peer != rank {
                let theirs = piece(b, of: peer)
                if !theirs.isEmpty { sendPlan.append(Piece(bucket: b, peer: peer, range: theirs)) }
                if !mine.isEmpty { receivePlan.append(Piece(bucket: b, peer: peer, range: mine)) }
            }
            sendStart.append(sendPlan.count)
        }
        sends = Array(repeating: .completed, count: sendPlan.count)
        receives = Array(repeating: .completed, count: receivePlan.count)
        received = (0..<(communicator.size - 1)).map { _ in
            let buffer: UnsafeMutableBufferPointer<Float> = LargeBuffer.allocate(offset)
            buffer.initialize(repeating: 0)
            return buffer
        }
    }

    /// Message tags: the bucket index, kept within the range every MPI must allow (0...32767). Messages between
    /// two ranks with one tag are matched in the order they were started, which is bucket order on every rank.
    private func tag(_ bucket: Int) -> Int { bucket & 0x7fff }

    /// Which of `received` holds `peer`'s gradients: the other ranks in rank order.
    private func slot(of peer: Int) -> Int { peer < rank ? peer : peer - 1 }

    /// Starts every bucket that lies wholly within `gradients[offset...]`, then polls what is in flight.
    /// Called by the model's backward pass after each layer.
    public func gradientsReady(from offset: Int) throws(MPIError) {
        if strategy == .sharded && !receivesPosted {
            // Posted before this rank sends anything: a peer's piece that arrives later goes straight into its
            // buffer instead of waiting in MPI's queue of unexpected messages.
            receivesPosted = true
            times?.postingReceives()
            for (i, piece) in receivePlan.enumerated() {
                let start = ownOffsets[piece.bucket]
                receives[i] = try communicator.startReceive(
                    UnsafeMutableBufferPointer(rebasing: received[slot(of: piece.peer)][start..<(start + piece.range.count)]),
                    from: piece.peer, tag: tag(piece.bucket))
            }
        }
        while started < buckets.count && buckets[started].lowerBound >= offset {
            let range = buckets[started]
            let posting = timeline?.begin() ?? 0
            if started == 0 { localNonFiniteCount = 0 }
            if let slot = nonFiniteSlot {
                let proven = provenFinite?(range) ?? false
                let count = proven ? 0 : nonFiniteCount(gradients.baseAddress! + range.lowerBound, range.count)
                localNonFiniteCount += count
                control[slot] += Float(count)
            }
            switch strategy {
            case .allreduce:
                // The bucket at offset 0 is started last and carries the control slots in front of it.
                let buffer = range.lowerBound == 0
                    ? UnsafeMutableBufferPointer(start: gradients.baseAddress! - control.count, count: control.count + range.count)
                    : UnsafeMutableBufferPointer(rebasing: gradients[range])
                reductions[started] = try communicator.startAllreduce(buffer, op: .sum)
            case .sharded:
                for i in sendStart[started]..<sendStart[started + 1] {
                    let piece = sendPlan[i]
                    sends[i] = try communicator.startSend(UnsafeBufferPointer(rebasing: gradients[piece.range]),
                                                          to: piece.peer, tag: tag(started))
                }
                if range.lowerBound == 0 {
                    times?.postingControl()
                    controlReduction = try communicator.startAllreduce(control, op: .sum)
                }
            }
            if posting != 0 {
                times?.posted(bucket: started, at: posting)
                timeline?.end(.bucketStart, started, since: posting)
            }
            started += 1
        }
        switch strategy {
        case .allreduce:
            for i in 0..<started { if try reductions[i].test() { times?.reductionCompleted(i) } }
        case .sharded:
            for i in 0..<sendStart[started] { if try sends[i].test() { times?.sendCompleted(i) } }
            for i in receives.indices { if try receives[i].test() { times?.receiveCompleted(i) } }
        }
    }

    /// Starts what backward did not (nothing, after a full backward) and waits for all of it. Then, with
    /// `.allreduce`, every rank holds the sum of the ranks' gradients (`1 / gradientScale` times the mean);
    /// with `.sharded`, every rank holds the other ranks' gradients for its own pieces, summed, beside its own.
    public func finish() throws(MPIError) {
        try gradientsReady(from: 0)
        let start = DispatchTime.now().uptimeNanoseconds
        switch strategy {
        case .allreduce:
            for i in 0..<buckets.count {
                try reductions[i].wait()
                times?.reductionCompleted(i)
            }
        case .sharded:
            for i in receives.indices {
                try receives[i].wait()
                times?.receiveCompleted(i)
            }
            for i in sends.indices {
                try sends[i].wait()
                times?.sendCompleted(i)
            }
            try controlReduction.wait()
            times?.controlCompleted()
        }
        let end = DispatchTime.now().uptimeNanoseconds
        waitSeconds += Double(end - start) * 1e-9
        timeline?.record(.exchangeWait, start: Int64(start), end: Int64(end))
        times?.recordStep(sharded: strategy == .sharded)
        started = 0
        receivesPosted = false
        // More than two ranks: one sum of the others' gradients for the optimizer to add.
        for k in received.indices.dropFirst() {
            Elementwise.add(received[k].baseAddress!, into: received[0].baseAddress!, received[0].count)
        }
    }

    /// The L2 norm of `scale` times the gradients summed over ranks (with `scale = gradientScale`, of the mean
    /// gradient), for clipping. Call after `finish()`. Collective with `.sharded`, where each rank holds the sum
    /// for its own part only: one allreduce of a single number.
    public func gradientNorm(scale: Double) throws(MPIError) -> Double {
        switch strategy {
        case .allreduce:
            return scale * Double(Float.dot(gradients.count, gradients.baseAddress!, gradients.baseAddress!)).squareRoot()
        case .sharded:
            // |g + h|^2 over each of this rank's pieces, g its own gradients and h the sum it received.
            var squares = 0.0
            for b in ownPieces.indices {
                let own = ownPieces[b]
                let g = gradients.baseAddress! + own.lowerBound, n = own.count
                if let sums = peerSums {
                    squares += sumOfSquaredSums(g, sums + ownOffsets[b], n)
                } else {
                    squares += Double(Float.dot(n, g, g))
                }
            }
            try withUnsafeMutablePointer(to: &squares) { (pointer) throws(MPIError) in
                try communicator.allreduce(UnsafeMutableBufferPointer(start: pointer, count: 1), op: .sum)
            }
            return scale * squares.squareRoot()
        }
    }

    /// Applies one optimizer step from `gradientScale` times the summed gradients, after `finish()`, and leaves
    /// identical parameters on every rank. `.sharded`: this rank updates its own pieces, then the pieces are
    /// gathered, bucket by bucket. Allocates nothing.
    public func update(_ optimizer: Optimizer<Float>, parameters: UnsafeMutableBufferPointer<Float>,
                       learningRate: Double, gradientScale: Double) throws(MPIError) {
        let updating = timeline?.begin() ?? 0
        switch strategy {
        case .allreduce:
            optimizer.update(parameters: parameters, gradients: gradients, learningRate: learningRate,
                             gradientScale: gradientScale)
            timeline?.end(.update, since: updating)
        case .sharded:
            optimizer.beginStep()
            for b in ownPieces.indices {
                let own = ownPieces[b]
                var addend: UnsafePointer<Float>? = nil
                if let sums = peerSums { addend = UnsafePointer(sums + ownOffsets[b]) }
                optimizer.updatePart(own, parameters: parameters, gradients: gradients.baseAddress! + own.lowerBound,
                                     adding: addend, learningRate: learningRate, gradientScale: gradientScale)
            }
            timeline?.end(.update, since: updating)
            for b in buckets.indices {
                let gathering = timeline?.begin() ?? 0
                try communicator.allgather(UnsafeMutableBufferPointer(rebasing: parameters[buckets[b]]), partition: partitions[b])
                timeline?.end(.parameterGather, b, since: gathering)
            }
        }
    }

    /// Makes every rank's optimizer state whole and current (`.sharded` keeps each part current only on its
    /// owner). Collective; call before saving the state. Nothing to do with `.allreduce`.
    public func gatherOptimizerState(_ optimizer: Optimizer<Float>) throws(MPIError) {
        guard strategy == .sharded else { return }
        for state in optimizer.state {
            for (b, bucket) in buckets.enumerated() {
                try communicator.allgather(UnsafeMutableBufferPointer(rebasing: state.buffer[bucket]), partition: partitions[b])
            }
        }
    }

    public func resetTimers() { waitSeconds = 0 }
}
