import Engine

/// `ReductionStrategy.allreduce`: each bucket is one `MPI_Iallreduce`, in place on its range of the gradients; every
/// rank then holds the sum and applies the whole update itself. The bucket at offset 0, started last, carries the
/// control slots in front of it. See `GradientReducer` for the contract.
public final class AllreduceReducer: GradientReducer {
    public var strategy: ReductionStrategy { .allreduce }
    public let buckets: [Range<Int>]
    public let communicator: any Communicator
    private let gradients: UnsafeMutableBufferPointer<Float>
    private let parameters: UnsafeMutableBufferPointer<Float>
    private let parameterUpdate: any ParameterUpdate
    private let observer: (any BucketObserver)?
    private var control: ControlSlots
    /// One request per bucket, and how many buckets have been started this step.
    private var reductions: [PendingRequest]
    private var started = 0
    public var localNonFiniteCount: Int { control.localNonFiniteCount }
    public var gradientScale: Double { 1 / Double(communicator.size) }
    public private(set) var waitSeconds = 0.0

    /// - Parameters:
    ///   - buckets: the plan, over all of `gradients`.
    ///   - gradients: the flat gradient buffer; the parameters and the update's state share its layout.
    ///   - parameters: what `update` changes, identically on every rank.
    ///   - update: the optimizer step applied to the summed gradients.
    ///   - control, nonFiniteSlot, provenFinite: the control values (`ControlSlots`).
    ///   - observer: told what is communicated when (`BucketObserver`); nil: nothing is timed.
    public init(communicator: any Communicator, buckets: GradientBuckets, gradients: UnsafeMutableBufferPointer<Float>,
                parameters: UnsafeMutableBufferPointer<Float>, update: any ParameterUpdate,
                control: UnsafeMutableBufferPointer<Float> = .init(start: nil, count: 0), nonFiniteSlot: Int? = nil,
                provenFinite: ((Range<Int>) -> Bool)? = nil, observer: (any BucketObserver)? = nil) {
        precondition(buckets.ranges.first?.upperBound == gradients.count, "buckets must cover the gradients")
        self.communicator = communicator
        self.buckets = buckets.ranges
        self.gradients = gradients
        self.parameters = parameters
        parameterUpdate = update
        self.observer = observer
        self.control = ControlSlots(control: control, gradients: gradients, nonFiniteSlot: nonFiniteSlot,
                                    provenFinite: provenFinite)
        reductions = Array(repeating: .completed, count: buckets.count)
    }

    public func gradientsReady(from offset: Int) throws(MPIError) {
        while started < buckets.count && buckets[started].lowerBound >= offset {
            let range = buckets[started]
            observer?.startingBucket(started)
            if started == 0 { control.beginStep() }
            control.countNonFinite(in: range)
            let buffer = range.lowerBound == 0 ? control.withGradients(range) : UnsafeMutableBufferPointer(rebasing: gradients[range])
            reductions[started] = try communicator.startAllreduce(buffer, op: .sum)
            observer?.startedBucket(started)
            started += 1
        }
        for b in 0..<started { if try reductions[b].test() { observer?.reductionCompleted(bucket: b) } }
    }

    public func finish() throws(MPIError) {
        try gradientsReady(from: 0)
        try timedWait(&waitSeconds, observer: observer) { () throws(MPIError) in
            for b in 0..<buckets.count {
                try reductions[b].wait()
                observer?.reductionCompleted(bucket: b)
            }
        }
        started = 0
    }

    public func gradientNorm(scale: Double) throws(MPIError) -> Double {
        scale * Double(Float.dot(gradients.count, gradients.baseAddress!, gradients.baseAddress!)).squareRoot()
    }

    public func update(learningRate: Double, gradientScale: Double) throws(MPIError) {
        observer?.updating()
        parameterUpdate.update(parameters: parameters, gradients: gradients, learningRate: learningRate,
                               gradientScale: gradientScale)
        observer?.updated()
    }

    /// Nothing to gather: every rank updated all of the state.
    public func gatherUpdateState() throws(MPIError) {}

    public func resetTimers() { waitSeconds = 0 }
}
