/// The few values every rank adds to each step's gradient exchange: a stop request, its count of non-finite values,
/// and rank 0's time-based checkpoint decision. They sit in the slots directly before the gradient buffer
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
    }

    /// How many slots a model must reserve before its gradients (`Model(controlSlots:)`).
    public static let slotCount = Slot.allCases.count

    private let values: UnsafeMutableBufferPointer<Float>

    public init(_ values: UnsafeMutableBufferPointer<Float>) {
        precondition(values.count == Self.slotCount, "\(values.count) control slots, expected \(Self.slotCount)")
        self.values = values
    }

    /// Before backward: what this rank adds to the step's sums. Overwrites the previous step's sums.
    @inline(__always)
    public func post(stopRequested: Bool, nonFiniteLoss: Bool, checkpointDue: Bool) {
        values[Slot.stopRequests.rawValue] = stopRequested ? 1 : 0
        values[Slot.nonFinite.rawValue] = nonFiniteLoss ? 1 : 0
        values[Slot.checkpointDue.rawValue] = checkpointDue ? 1 : 0
    }

    // After the exchange: the sums over every rank.
    public var stopRequested: Bool { values[Slot.stopRequests.rawValue] > 0 }
    public var anyNonFinite: Bool { values[Slot.nonFinite.rawValue] > 0 }
    public var checkpointDue: Bool { values[Slot.checkpointDue.rawValue] > 0 }
}
