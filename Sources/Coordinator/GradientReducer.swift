import Engine
import Foundation

/// Averages a model's flat gradient buffer over all ranks, in buckets that overlap with backward.
///
/// Buckets are contiguous ranges of the gradient buffer, made of whole tensors taken in reverse layer order
/// (the order backward finishes them) until a bucket holds at least `bucketElements`; 0 means one bucket, a
/// single fused allreduce after backward. Backward reports through `gradientsReady(from:)` that everything
/// from an offset on is final; every bucket lying wholly past that offset starts at once with a nonblocking
/// allreduce, in place on its range: no copies, no packing. Because nonblocking collectives progress only
/// inside MPI calls, each report also polls the buckets in flight. `finish()` waits for all of them and leaves
/// the sum over ranks in the buffer: the mean is `gradientScale` times it, and the optimizer applies that factor
/// in its own pass (`Optimizer.update(gradientScale:)`) instead of the reducer making one more.
///
/// Contract: buckets are started in the same order on every rank (the bucket list depends only on the model
/// layout and the bucket size, which ranks verify to be identical at start).
///
/// Control values: the slots that lie directly before the gradient buffer (`Model.control`) ride along in the
/// last bucket started, the one holding offset 0, and are summed, never averaged. Before each bucket starts,
/// its non-finite values are counted into `control[nonFiniteSlot]`, so after `finish()` every rank knows
/// whether any rank produced a NaN or infinity this step, at no extra collective.
public final class GradientReducer {
    public let buckets: [Range<Int>]
    public let communicator: any Communicator
    private let gradients: UnsafeMutableBufferPointer<Float>
    private let control: UnsafeMutableBufferPointer<Float>
    private let nonFiniteSlot: Int?
    private var pending: [PendingReduction]
    private var started = 0
    /// This rank's own count of non-finite gradient values in the current step (before reduction).
    public private(set) var localNonFiniteCount = 0
    /// 1 / world size: after `finish()`, the mean gradient is this times the buffer.
    public var gradientScale: Double { 1 / Double(communicator.size) }
    /// Seconds spent blocked in `finish()` waiting for communication, summed since the last `resetTimers()`.
    public private(set) var waitSeconds = 0.0

    /// - Parameters:
    ///   - tensorRanges: the ranges of the model's tensors in the flat buffer, in layer order.
    ///   - bucketElements: minimum elements per bucket; 0 means one fused allreduce.
    ///   - control: slots directly before `gradients` in memory, reduced (summed) with the last bucket.
    ///   - nonFiniteSlot: index in `control` that receives this rank's count of non-finite gradient values.
    public init(communicator: any Communicator, gradients: UnsafeMutableBufferPointer<Float>,
                tensorRanges: [Range<Int>], bucketElements: Int,
                control: UnsafeMutableBufferPointer<Float> = .init(start: nil, count: 0), nonFiniteSlot: Int? = nil) {
        precondition(control.count == 0 || control.baseAddress! + control.count == gradients.baseAddress!,
                     "control slots must sit directly before the gradients")
        precondition(nonFiniteSlot.map { $0 >= 0 && $0 < control.count } ?? true, "nonFiniteSlot outside control")
        self.communicator = communicator
        self.gradients = gradients
        self.control = control
        self.nonFiniteSlot = nonFiniteSlot
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
        pending = Array(repeating: .completed, count: buckets.count)
    }

    /// Starts every bucket that lies wholly within `gradients[offset...]`, then polls those in flight.
    /// Called by the model's backward pass after each layer.
    public func gradientsReady(from offset: Int) throws(MPIError) {
        while started < buckets.count && buckets[started].lowerBound >= offset {
            let range = buckets[started]
            if started == 0 { localNonFiniteCount = 0 }
            if let slot = nonFiniteSlot {
                let count = nonFiniteCount(gradients.baseAddress! + range.lowerBound, range.count)
                localNonFiniteCount += count
                control[slot] += Float(count)
            }
            // The bucket at offset 0 is started last and carries the control slots in front of it.
            let buffer = range.lowerBound == 0
                ? UnsafeMutableBufferPointer(start: gradients.baseAddress! - control.count, count: control.count + range.count)
                : UnsafeMutableBufferPointer(rebasing: gradients[range])
            pending[started] = try communicator.startAllreduce(buffer, op: .sum)
            started += 1
        }
        for i in 0..<started { _ = try pending[i].test() }
    }

    /// Starts what backward did not (nothing, after a full backward) and waits for every bucket: every rank then
    /// holds the sum of the ranks' gradients, `1 / gradientScale` times the mean gradient of the global batch.
    public func finish() throws(MPIError) {
        try gradientsReady(from: 0)
        let start = DispatchTime.now().uptimeNanoseconds
        for i in 0..<buckets.count { try pending[i].wait() }
        waitSeconds += Double(DispatchTime.now().uptimeNanoseconds - start) * 1e-9
        started = 0
    }

    public func resetTimers() { waitSeconds = 0 }
}
