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

    public init(_ inputs: ReductionInputs) {
        (communicator, buckets, gradients, parameters) = (inputs.communicator, inputs.buckets, inputs.gradients, inputs.parameters)
        (parameterUpdate, observer, control) = (inputs.update, inputs.observer, inputs.control)
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
