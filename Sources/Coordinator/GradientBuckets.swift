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

/// The control values both reducers carry: the slots directly before the gradient buffer that are summed with the
/// last bucket, and the count of non-finite gradient values that goes into one of them.
struct ControlSlots {
    let values: UnsafeMutableBufferPointer<Float>
    private let gradients: UnsafeMutableBufferPointer<Float>
    private let nonFiniteSlot: Int?
    private let provenFinite: ((Range<Int>) -> Bool)?
    /// This rank's count of non-finite gradient values in the buckets counted since `beginStep()`.
    private(set) var localNonFiniteCount = 0

    /// - Parameters:
    ///   - control: slots directly before `gradients` in memory, reduced (summed) with the last bucket.
    ///   - nonFiniteSlot: index in `control` that receives this rank's count of non-finite gradient values; nil:
    ///     nothing is counted.
    ///   - provenFinite: whether a range of this step's gradients is already known to hold no NaN or infinity
    ///     (`Model.gradientsProvenFinite(in:)`), so that counting would only read it again; nil: always count.
    init(control: UnsafeMutableBufferPointer<Float>, gradients: UnsafeMutableBufferPointer<Float>, nonFiniteSlot: Int?,
         provenFinite: ((Range<Int>) -> Bool)?) {
        precondition(control.count == 0 || control.baseAddress! + control.count == gradients.baseAddress!,
                     "control slots must sit directly before the gradients")
        precondition(nonFiniteSlot.map { $0 >= 0 && $0 < control.count } ?? true, "nonFiniteSlot outside control")
        values = control
        self.gradients = gradients
        self.nonFiniteSlot = nonFiniteSlot
        self.provenFinite = provenFinite
    }

    /// The control slots and `range` of the gradients as one buffer: `range` must start at 0.
    func withGradients(_ range: Range<Int>) -> UnsafeMutableBufferPointer<Float> {
        precondition(range.lowerBound == 0, "the control slots lie before offset 0 only")
        return UnsafeMutableBufferPointer(start: gradients.baseAddress! - values.count, count: values.count + range.count)
    }

    mutating func beginStep() { localNonFiniteCount = 0 }

    /// Adds the non-finite values in `range` of the gradients to this rank's count and to the control slot.
    mutating func countNonFinite(in range: Range<Int>) {
        guard let slot = nonFiniteSlot else { return }
        let proven = provenFinite?(range) ?? false
        let count = proven ? 0 : nonFiniteCount(gradients.baseAddress! + range.lowerBound, range.count)
        localNonFiniteCount += count
        values[slot] += Float(count)
    }
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
