import Engine

/// The few values every rank adds to each step's gradient exchange: a stop request and where it came from, its count
/// of non-finite values, and rank 0's time-based checkpoint decision. They sit in the slots directly before the gradient buffer
/// (`Model.control`), and the reducers sum them over the ranks with the bucket that holds offset 0, the last one
/// started, so every rank learns the same three sums at no extra round trip. The reducer itself adds this rank's
/// count of non-finite gradient values into `Slot.nonFinite` as it starts each bucket.
public struct StepControl {
    public enum Slot: Int, CaseIterable {
        /// Ranks asking to stop (a signal arrived).
        case stopRequests
        /// Non-finite values in this step's losses and gradients, over every rank.
        case nonFinite
        /// 1 when rank 0's clock says a time-based checkpoint is due (`checkpoint.every_seconds`), 0 on every other
        /// rank: the sum is rank 0's decision, so every rank checkpoints after the same step whatever its own clock says.
        case checkpointDue
        /// rank * 64 + the signal's number on a rank asking to stop, 0 elsewhere: where a single request came from,
        /// which rank 0 names in its message and status.json (exact in a Float below 2^24, so up to 262,143 ranks).
        case stopSource
    }

    /// How many slots a model must reserve before its gradients (`Model(controlSlots:)`).
    public static let slotCount = Slot.allCases.count

    private let values: UnsafeMutableBufferPointer<Float>

    public init(_ values: UnsafeMutableBufferPointer<Float>) {
        precondition(values.count == Self.slotCount, "\(values.count) control slots, expected \(Self.slotCount)")
        self.values = values
    }

    /// Before backward: what this rank adds to the step's sums. Overwrites the previous step's sums.
    /// - Parameter stopSignal: the signal asking this rank to stop (1 to 63), nil when none arrived.
    @inline(__always)
    public func post(stopSignal: Int32?, rank: Int, nonFiniteLoss: Bool, checkpointDue: Bool) {
        values[Slot.stopRequests.rawValue] = stopSignal == nil ? 0 : 1
        values[Slot.stopSource.rawValue] = stopSignal.map { Float(rank * 64 + Int($0 & 63)) } ?? 0
        values[Slot.nonFinite.rawValue] = nonFiniteLoss ? 1 : 0
        values[Slot.checkpointDue.rawValue] = checkpointDue ? 1 : 0
    }

    // After the exchange: the sums over every rank.
    public var stopRequested: Bool { values[Slot.stopRequests.rawValue] > 0 }
    /// Ranks that asked to stop in this step.
    public var stopRequests: Int { Int(values[Slot.stopRequests.rawValue]) }
    /// The rank and signal of the one rank that asked to stop; nil when none or several did.
    public var stopSource: (rank: Int, signal: Int32)? {
        guard stopRequests == 1 else { return nil }
        let code = Int(values[Slot.stopSource.rawValue])
        return (code / 64, Int32(code % 64))
    }
    public var anyNonFinite: Bool { values[Slot.nonFinite.rawValue] > 0 }
    public var checkpointDue: Bool { values[Slot.checkpointDue.rawValue] > 0 }
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
