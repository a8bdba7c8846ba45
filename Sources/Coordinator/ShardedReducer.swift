import Engine

/// `ReductionStrategy.sharded` (the default): every bucket is cut into one even piece per rank (`partitions`), and
/// rank r owns piece r of each. A bucket's pieces go straight to their owners as soon as backward has written it
/// (`MPI_Isend`/`MPI_Irecv`, receives posted before the first send), so every rank sends and receives the same
/// amount at the same time; each owner updates only its pieces, adding the received gradients inside the update's
/// pass, then the ranks gather the updated parameters bucket by bucket (`MPI_Allgatherv`). Per rank, the update
/// streams 1 / ranks of the parameters and state, and no pass of its own sums gradients (BENCHMARKS.md, table 4).
/// Every parameter is computed by one rank and copied to the others, so replicas stay bitwise identical. The update's
/// state is current only in each rank's own pieces until `gatherUpdateState()`, which a checkpoint calls first.
///
/// The control slots are summed in a small allreduce of their own, started with the bucket at offset 0. See
/// `GradientReducer` for the contract.
public final class ShardedReducer: GradientReducer {
    public var strategy: ReductionStrategy { .sharded }
    public let buckets: [Range<Int>]
    public let communicator: any Communicator
    /// How each bucket is cut into one piece per rank; rank r updates piece r of every bucket.
    public let partitions: [Partition]
    private let gradients: UnsafeMutableBufferPointer<Float>
    private let parameters: UnsafeMutableBufferPointer<Float>
    private let parameterUpdate: any ParameterUpdate
    private let observer: (any BucketObserver)?
    private var control: ControlSlots
    private var started = 0
    public var localNonFiniteCount: Int { control.localNonFiniteCount }
    public var gradientScale: Double { 1 / Double(communicator.size) }
    public private(set) var waitSeconds = 0.0

    // What each bucket sends and receives, and the requests in flight. Piece k of bucket b is
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

    public init(_ inputs: ReductionInputs) {
        (communicator, buckets, gradients, parameters) = (inputs.communicator, inputs.buckets, inputs.gradients, inputs.parameters)
        (parameterUpdate, observer, control) = (inputs.update, inputs.observer, inputs.control)
        let ranks = inputs.communicator.size
        partitions = inputs.buckets.map { Partition(count: $0.count, parts: ranks) }
        planPieces()
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

    public func gradientsReady(from offset: Int) throws(MPIError) {
        if !receivesPosted { try postReceives() }
        while started < buckets.count && buckets[started].lowerBound >= offset {
            let range = buckets[started]
            observer?.startingBucket(started)
            if started == 0 { control.beginStep() }
            control.countNonFinite(in: range)
            for i in sendStart[started]..<sendStart[started + 1] {
                let piece = sendPlan[i]
                sends[i] = try communicator.startSend(UnsafeBufferPointer(rebasing: gradients[piece.range]),
                                                      to: piece.peer, tag: tag(started))
            }
            if range.lowerBound == 0 {
                observer?.postingControl()
                controlReduction = try communicator.startAllreduce(control.values, op: .sum)
            }
            observer?.startedBucket(started)
            started += 1
        }
        for i in 0..<sendStart[started] {
            if try sends[i].test() { observer?.sendCompleted(bucket: sendPlan[i].bucket, peer: sendPlan[i].peer) }
        }
        for i in receives.indices {
            if try receives[i].test() { observer?.receiveCompleted(bucket: receivePlan[i].bucket, peer: receivePlan[i].peer) }
        }
    }

    /// Posted before this rank sends anything: a peer's piece that arrives later goes straight into its buffer
    /// instead of waiting in MPI's queue of unexpected messages.
    private func postReceives() throws(MPIError) {
        receivesPosted = true
        observer?.postingReceives()
        for (i, piece) in receivePlan.enumerated() {
            let start = ownOffsets[piece.bucket]
            let buffer = UnsafeMutableBufferPointer(rebasing: received[slot(of: piece.peer)][start..<(start + piece.range.count)])
            receives[i] = try communicator.startReceive(buffer, from: piece.peer, tag: tag(piece.bucket))
        }
    }

    /// Afterwards every rank holds the other ranks' gradients for its own pieces, summed, beside its own.
    public func finish() throws(MPIError) {
        try gradientsReady(from: 0)
        try timedWait(&waitSeconds, observer: observer) { () throws(MPIError) in
            for i in receives.indices {
                try receives[i].wait()
                observer?.receiveCompleted(bucket: receivePlan[i].bucket, peer: receivePlan[i].peer)
            }
            for i in sends.indices {
                try sends[i].wait()
                observer?.sendCompleted(bucket: sendPlan[i].bucket, peer: sendPlan[i].peer)
            }
            try controlReduction.wait()
            observer?.controlCompleted()
        }
        started = 0
        receivesPosted = false
        // More than two ranks: one sum of the others' gradients for the update to add.
        for k in received.indices.dropFirst() {
            Elementwise.add(received[k].baseAddress!, into: received[0].baseAddress!, received[0].count)
        }
    }

    /// Each rank holds the sum for its own pieces only: one allreduce of a single number.
    public func gradientNorm(scale: Double) throws(MPIError) -> Double {
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

    /// This rank updates its own pieces, then the pieces are gathered, bucket by bucket.
    public func update(learningRate: Double, gradientScale: Double) throws(MPIError) {
        observer?.updating()
        parameterUpdate.beginStep()
        for b in ownPieces.indices {
            let own = ownPieces[b]
            var addend: UnsafePointer<Float>? = nil
            if let sums = peerSums { addend = UnsafePointer(sums + ownOffsets[b]) }
            parameterUpdate.updatePart(own, parameters: parameters, gradients: gradients.baseAddress! + own.lowerBound,
                                       adding: addend, learningRate: learningRate, gradientScale: gradientScale)
        }
        observer?.updated()
        for b in buckets.indices {
            observer?.gatheringParameters(bucket: b)
            try communicator.allgather(UnsafeMutableBufferPointer(rebasing: parameters[buckets[b]]), partition: partitions[b])
            observer?.gatheredParameters(bucket: b)
        }
    }

    public func gatherUpdateState() throws(MPIError) {
        for state in parameterUpdate.stateBuffers {
            for (b, bucket) in buckets.enumerated() {
                try communicator.allgather(UnsafeMutableBufferPointer(rebasing: state[bucket]), partition: partitions[b])
            }
        }
    }

    public func resetTimers() { waitSeconds = 0 }
}
