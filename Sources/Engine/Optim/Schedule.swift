import RealModule

/// The learning rate as a function of the update step (0-based), for the global batch.
///
/// Every schedule may start with a linear warmup: for step < warmupSteps, lr = base * (step + 1) / warmupSteps.
public struct LearningRateSchedule: Equatable, Sendable {
    public enum Kind: Equatable, Sendable {
        /// lr = base
        case constant
        /// lr = base * gamma ^ floor(step / every)  (torch.optim.lr_scheduler.StepLR)
        case step(every: Int, gamma: Double)
        /// After warmup, lr = minimum + (base - minimum) * (1 + cos(pi * progress)) / 2 with
        /// progress = (step - warmup) / (totalSteps - warmup), clamped to [0, 1].
        case cosine(totalSteps: Int, minimum: Double)
    }

    public var base: Double
    public var kind: Kind
    public var warmupSteps: Int

    public init(base: Double, kind: Kind = .constant, warmupSteps: Int = 0) {
        self.base = base
        self.kind = kind
        self.warmupSteps = warmupSteps
    }

    public func validate() throws(ScheduleError) {
        guard base > 0, base.isFinite else { throw ScheduleError("learning rate must be positive, got \(base)") }
        guard warmupSteps >= 0 else { throw ScheduleError("warmup steps must be >= 0, got \(warmupSteps)") }
        switch kind {
        case .constant: break
        case let .step(every, gamma):
            guard every > 0 else { throw ScheduleError("step schedule: step size must be positive, got \(every)") }
            guard gamma > 0, gamma <= 1 else { throw ScheduleError("step schedule: gamma must be in (0, 1], got \(gamma)") }
        case let .cosine(total, minimum):
            guard total > warmupSteps else {
                throw ScheduleError("cosine schedule: total steps \(total) must exceed warmup steps \(warmupSteps)")
            }
            guard minimum >= 0, minimum <= base else {
                throw ScheduleError("cosine schedule: minimum \(minimum) must be in [0, base \(base)]")
            }
        }
    }

    public func learningRate(atStep step: Int) -> Double {
        if step < warmupSteps { return base * Double(step + 1) / Double(warmupSteps) }
        switch kind {
        case .constant:
            return base
        case let .step(every, gamma):
            return base * Double.pow(gamma, Double(step / every))
        case let .cosine(total, minimum):
            let progress = min(1, max(0, Double(step - warmupSteps) / Double(total - warmupSteps)))
            return minimum + (base - minimum) * (1 + Double.cos(Double.pi * progress)) / 2
        }
    }
}

/// A learning-rate schedule that cannot work (a non-positive rate, a cosine shorter than its warmup, ...).
public struct ScheduleError: Error, CustomStringConvertible, Equatable {
    public let description: String
    public init(_ description: String) { self.description = description }
}
