import Engine

/// How a `GradientReducer` turns the ranks' gradients into one update, chosen by measurement (BENCHMARKS.md,
/// table 4). The raw values are what `training.reduction` accepts.
public enum ReductionStrategy: String, Sendable, CaseIterable {
    /// `ShardedReducer`: each rank reduces and updates its own piece of every bucket, then the pieces are gathered.
    case sharded
    /// `AllreduceReducer`: every bucket is summed on every rank, and every rank applies the whole update.
    case allreduce
}

/// Turns every rank's gradients into one identical update of every rank's parameters, in buckets that overlap
/// with backward.
///
/// Buckets (`GradientBuckets`) are contiguous ranges of the gradient buffer, made of whole tensors taken in
/// reverse layer order. Backward reports through `gradientsReady(from:)` that everything from an offset on is
/// final; every bucket lying wholly past that offset starts at once, in place on its range: no copies, no packing.
/// Because nonblocking communication progresses only inside MPI calls, each report also polls what is in flight.
/// `finish()` waits for all of it; `update(learningRate:gradientScale:)` then applies the `ParameterUpdate` the
/// reducer was made with, which reads the gradients times `gradientScale` (1 / ranks, times any clipping factor) in
/// its own pass instead of the reducer making one more.
///
/// Contract: buckets are started in the same order on every rank (the bucket list depends only on the model
/// layout and the bucket size, which ranks verify to be identical at start).
///
/// Control values: the slots that lie directly before the gradient buffer (`Model.control`) are summed over the
/// ranks with the last bucket started, the one holding offset 0. Before each bucket starts, its non-finite values
/// are counted into `control[nonFiniteSlot]`, so after `finish()` every rank knows whether any rank produced a NaN
/// or infinity this step, at no extra round trip. A bucket that `provenFinite` vouches for is not read: its count
/// is 0.
///
/// Timing goes to the `BucketObserver` given at construction; without one no clock is read but `finish()`'s, for
/// `waitSeconds`. A step allocates nothing.
public protocol GradientReducer: AnyObject {
    var strategy: ReductionStrategy { get }
    /// The buckets' ranges in the gradient buffer, in the order they are started (`GradientBuckets.ranges`).
    var buckets: [Range<Int>] { get }
    /// 1 / world size: after `finish()`, the mean gradient is this times the sum over ranks.
    var gradientScale: Double { get }
    /// This rank's own count of non-finite gradient values in the current step (before reduction).
    var localNonFiniteCount: Int { get }
    /// Seconds spent blocked in `finish()` waiting for communication, summed since the last `resetTimers()`.
    var waitSeconds: Double { get }
    func resetTimers()

    /// Starts every bucket that lies wholly within `gradients[offset...]`, then polls what is in flight.
    /// Called by the model's backward pass after each layer.
    func gradientsReady(from offset: Int) throws(MPIError)

    /// Starts what backward did not (nothing, after a full backward) and waits for all of it, control values
    /// included. Afterwards each rank holds, for the part of the parameters it updates, the sum of the ranks'
    /// gradients (`1 / gradientScale` times the mean).
    func finish() throws(MPIError)

    /// The L2 norm of `scale` times the gradients summed over ranks (with `scale = gradientScale`, of the mean
    /// gradient), for clipping. Call after `finish()`. Collective.
    func gradientNorm(scale: Double) throws(MPIError) -> Double

    /// Applies one step of the `ParameterUpdate` from `gradientScale` times the summed gradients, after `finish()`,
    /// and leaves identical parameters on every rank. Allocates nothing.
    func update(learningRate: Double, gradientScale: Double) throws(MPIError)

    /// Makes every rank's update state (`ParameterUpdate.stateBuffers`) whole and current. Collective; call before
    /// saving the state.
    func gatherUpdateState() throws(MPIError)
}

extension GradientReducer {
    /// The name the configuration and callers have always used for the strategy.
    public typealias Strategy = ReductionStrategy
}

/// What every reducer is built from, whatever its strategy.
public struct ReductionInputs {
    let communicator: any Communicator
    let buckets: [Range<Int>]
    let gradients: UnsafeMutableBufferPointer<Float>
    let parameters: UnsafeMutableBufferPointer<Float>
    let update: any ParameterUpdate
    let observer: (any BucketObserver)?
    let control: ControlSlots

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
        self.update = update
        self.observer = observer
        self.control = ControlSlots(control: control, gradients: gradients, nonFiniteSlot: nonFiniteSlot,
                                    provenFinite: provenFinite)
    }
}

/// The reducer for `strategy`; see `ReductionInputs` for the parameters.
public func makeGradientReducer(
    strategy: ReductionStrategy, communicator: any Communicator, buckets: GradientBuckets,
    gradients: UnsafeMutableBufferPointer<Float>, parameters: UnsafeMutableBufferPointer<Float>,
    update: any ParameterUpdate, control: UnsafeMutableBufferPointer<Float> = .init(start: nil, count: 0),
    nonFiniteSlot: Int? = nil, provenFinite: ((Range<Int>) -> Bool)? = nil, observer: (any BucketObserver)? = nil
) -> any GradientReducer {
    let inputs = ReductionInputs(communicator: communicator, buckets: buckets, gradients: gradients, parameters: parameters,
                                 update: update, control: control, nonFiniteSlot: nonFiniteSlot, provenFinite: provenFinite,
                                 observer: observer)
    return switch strategy {
    case .sharded: ShardedReducer(inputs)
    case .allreduce: AllreduceReducer(inputs)
    }
}
