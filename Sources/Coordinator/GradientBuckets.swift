import Engine
import Foundation

/// How the gradient buffer is cut into buckets, the units a `GradientReducer` communicates: contiguous ranges
/// made of whole tensors taken in reverse layer order (the order backward finishes them) until a bucket holds at
/// least `bucketElements`. It depends only on the model's layout and the bucket size, so every rank computes the
/// same plan, and the Worker can compute it before building a reducer (to size the timeline, to name buckets).
public struct GradientBuckets: Equatable, Sendable {
    /// The buckets in the order they are started: descending, tiling `0..<totalCount`, each starting at a tensor.
    public let ranges: [Range<Int>]

    /// - Parameters:
    ///   - tensorRanges: the ranges of the model's tensors in the flat buffer, in layer order.
    ///   - bucketElements: minimum elements per bucket; 0 means one bucket, communicated after backward.
    ///   - totalCount: the length of the gradient buffer.
    public init(tensorRanges: [Range<Int>], bucketElements: Int, totalCount: Int) {
        guard bucketElements > 0 else {
            ranges = [0..<totalCount]
            return
        }
        var ranges: [Range<Int>] = []
        var upper = totalCount
        var lower = upper
        for range in tensorRanges.reversed() {
            lower = range.lowerBound
            if upper - lower >= bucketElements {
                ranges.append(lower..<upper)
                upper = lower
            }
        }
        if lower < upper { ranges.append(lower..<upper) }
        self.ranges = ranges
    }

    public var count: Int { ranges.count }
}

/// Runs `wait`, the blocking part of a reducer's `finish()`, adding its duration to `seconds` and reporting it to
/// `observer`. The clock is read whether or not anyone observes: `waitSeconds` is reported at every progress line.
@inline(__always)
func timedWait(_ seconds: inout Double, observer: (any BucketObserver)?,
               _ wait: () throws(MPIError) -> Void) throws(MPIError) {
    let start = TimelineRecorder.now()
    try wait()
    let end = TimelineRecorder.now()
    seconds += Double(end - start) * 1e-9
    observer?.exchangeFinished(waitStart: start, waitEnd: end)
}
