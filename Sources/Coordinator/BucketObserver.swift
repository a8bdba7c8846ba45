/// What a `GradientReducer` tells about its communication as it happens, for a timeline (`BucketTimes`). The
/// reducer makes these calls on its own thread, inside the training step: an observer must not allocate, and
/// should read no clock while it is not recording.
///
/// Buckets are indices into `GradientReducer.buckets`; peers are ranks. A completion is reported when the rank
/// sees it (a test that returned true, or the return of a wait), and may be reported again later for the same
/// request: the first report is the one that counts.
public protocol BucketObserver: AnyObject {
    /// `ShardedReducer`: this step's receives are about to be posted, all at once, before the first send.
    func postingReceives()
    /// `bucket` is about to be counted (non-finite values) and posted.
    func startingBucket(_ bucket: Int)
    /// `bucket`'s sends, or its allreduce, have been posted.
    func startedBucket(_ bucket: Int)
    /// `ShardedReducer`: the control values' own allreduce is about to be posted.
    func postingControl()

    func sendCompleted(bucket: Int, peer: Int)
    func receiveCompleted(bucket: Int, peer: Int)
    func reductionCompleted(bucket: Int)
    func controlCompleted()

    /// Every request of the step has completed; `finish()` was blocked from `waitStart` to `waitEnd`
    /// (`TimelineRecorder.now()` nanoseconds).
    func exchangeFinished(waitStart: Int64, waitEnd: Int64)

    /// The parameter update runs between these two.
    func updating()
    func updated()
    /// `ShardedReducer`: `bucket`'s updated parameters are gathered from their owners between these two.
    func gatheringParameters(bucket: Int)
    func gatheredParameters(bucket: Int)
}
