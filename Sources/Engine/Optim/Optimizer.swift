import RealModule

/// Which update rule an `Optimizer` applies.
public enum OptimizerKind: String, Sendable, CaseIterable {
    /// SGD, with momentum and Nesterov when `momentum > 0`; weight decay is L2 added to the gradient.
    case sgd
    /// Adam; weight decay is L2 added to the gradient (torch.optim.Adam).
    case adam
    /// AdamW: weight decay decoupled from the gradient (torch.optim.AdamW).
    case adamw
}

/// Hyper-parameters of an optimizer. Defaults are torch.optim's.
public struct OptimizerConfig: Equatable, Sendable {
    public var kind: OptimizerKind
    public var momentum: Double
    public var nesterov: Bool
    public var beta1: Double
    public var beta2: Double
    public var epsilon: Double
    public var weightDecay: Double

    public init(kind: OptimizerKind = .sgd, momentum: Double = 0, nesterov: Bool = false,
                beta1: Double = 0.9, beta2: Double = 0.999, epsilon: Double = 1e-8, weightDecay: Double? = nil) {
        self.kind = kind
        self.momentum = momentum
        self.nesterov = nesterov
        self.beta1 = beta1
        self.beta2 = beta2
        self.epsilon = epsilon
        // torch.optim.AdamW defaults to 0.01, the others to 0.
        self.weightDecay = weightDecay ?? (kind == .adamw ? 0.01 : 0)
    }

    /// Rejects settings no optimizer can use; the message names the setting.
    public func validate() throws(OptimizerError) {
        guard momentum >= 0, momentum < 1 else { throw OptimizerError("momentum must be in [0, 1), got \(momentum)") }
        guard !nesterov || (kind == .sgd && momentum > 0) else {
            throw OptimizerError("nesterov needs the sgd optimizer with momentum > 0")
        }
        guard beta1 >= 0, beta1 < 1 else { throw OptimizerError("beta1 must be in [0, 1), got \(beta1)") }
        guard beta2 >= 0, beta2 < 1 else { throw OptimizerError("beta2 must be in [0, 1), got \(beta2)") }
        guard epsilon > 0 else { throw OptimizerError("epsilon must be positive, got \(epsilon)") }
        guard weightDecay >= 0, weightDecay.isFinite else {
            throw OptimizerError("weight decay must be finite and >= 0, got \(weightDecay)")
        }
    }
}

/// An optimizer over a flat parameter buffer. Its state (momentum, Adam moments) is flat buffers of the
/// parameter layout, named as in torch.optim's state (`momentum_buffer`, `exp_avg`, `exp_avg_sq`), so a
/// checkpoint can store them beside the parameters.
public final class Optimizer<T: Scalar> {
    public let config: OptimizerConfig
    public let parameterCount: Int
    /// Updates applied so far; Adam's bias correction uses it. Restored from checkpoints.
    public var stepCount: Int = 0
    /// Named state buffers, each `parameterCount` long.
    public let state: [(name: String, buffer: UnsafeMutableBufferPointer<T>)]

    public init(config: OptimizerConfig, parameterCount: Int) throws(OptimizerError) {
        try config.validate()
        self.config = config
        self.parameterCount = parameterCount
        state = Self.stateNames(config).map { name in
            let buffer: UnsafeMutableBufferPointer<T> = LargeBuffer.allocate(parameterCount)
            buffer.initialize(repeating: 0)
            return (name, buffer)
        }
    }

    /// The state buffers `config` keeps, each as long as the parameters, under torch.optim's names.
    public static func stateNames(_ config: OptimizerConfig) -> [String] {
        switch config.kind {
        case .sgd: config.momentum > 0 ? ["momentum_buffer"] : []
        case .adam, .adamw: ["exp_avg", "exp_avg_sq"]
        }
    }

    deinit {
        for s in state { LargeBuffer.free(s.buffer) }
    }

    /// Applies one update to `parameters` from `gradientScale * gradients` with this step's learning rate: a
    /// data-parallel caller passes the summed gradients and 1 / ranks, so averaging costs no pass of its own.
    /// Allocates nothing.
    public func update(parameters: UnsafeMutableBufferPointer<T>, gradients: UnsafeMutableBufferPointer<T>,
                       learningRate: Double, gradientScale: Double = 1) {
        precondition(gradients.count == parameterCount)
        beginStep()
        updatePart(0..<parameterCount, parameters: parameters, gradients: UnsafePointer(gradients.baseAddress!),
                   adding: nil, learningRate: learningRate, gradientScale: gradientScale)
    }

    /// Starts a step whose update is applied piece by piece (`updatePart`): counts it (Adam's bias correction).
    public func beginStep() {
        stepCount += 1
    }

    /// Applies the current step's update (begun with `beginStep()`) to the parameters and state in `range` only,
    /// from `gradientScale * (gradients + addend)`, where `gradients` and `addend` hold the values for the range
    /// alone (element 0 belongs to `range.lowerBound`); without `addend`, from `gradientScale * gradients`. This
    /// is a rank's share of a sharded step: it owns `range`, received the other ranks' gradients for it summed in
    /// `addend`, and adds them in this pass. Allocates nothing.
    public func updatePart(_ range: Range<Int>, parameters: UnsafeMutableBufferPointer<T>, gradients: UnsafePointer<T>,
                           adding addend: UnsafePointer<T>?, learningRate: Double, gradientScale: Double = 1) {
        precondition(stepCount > 0, "updatePart before beginStep")
        precondition(parameters.count == parameterCount && range.lowerBound >= 0 && range.upperBound <= parameterCount)
        let offset = range.lowerBound
        if let addend {
            apply(parameters.baseAddress! + offset, SummedGradients(gradients, addend), offset, range.count,
                  learningRate: learningRate, gradientScale: gradientScale)
        } else {
            apply(parameters.baseAddress! + offset, Gradients(gradients), offset, range.count,
                  learningRate: learningRate, gradientScale: gradientScale)
        }
    }

    /// The update rule over `n` elements from `offset`; `p` and `g` already point at the first of them.
    private func apply<G: GradientSource>(_ p: UnsafeMutablePointer<T>, _ g: G, _ offset: Int, _ n: Int,
                                          learningRate: Double, gradientScale: Double) where G.Element == T {
        guard n > 0 else { return }
        let lr = T(learningRate), wd = T(config.weightDecay), s = T(gradientScale)
        switch config.kind {
        case .sgd:
            if config.momentum > 0 {
                momentumUpdate(p, g, buffer: state[0].buffer.baseAddress! + offset, n, gradientScale: s, learningRate: lr,
                               momentum: T(config.momentum), nesterov: config.nesterov, weightDecay: wd)
            } else {
                sgdUpdate(p, g, n, gradientScale: s, learningRate: lr, weightDecay: wd)
            }
        case .adam, .adamw:
            let t = Double(stepCount)
            let decoupled = config.kind == .adamw
            adamUpdate(p, g, m: state[0].buffer.baseAddress! + offset, v: state[1].buffer.baseAddress! + offset, n,
                       gradientScale: s, learningRate: lr, beta1: T(config.beta1), beta2: T(config.beta2),
                       oneMinusBeta1: T(1 - config.beta1), oneMinusBeta2: T(1 - config.beta2), epsilon: T(config.epsilon),
                       l2Decay: decoupled ? 0 : wd, decoupledDecay: decoupled ? wd : 0,
                       biasCorrection1: T(1 - Double.pow(config.beta1, t)),
                       biasCorrection2: T(1 - Double.pow(config.beta2, t)))
        }
    }

    /// Forgets all state (fresh momentum and moments, step 0).
    public func reset() {
        stepCount = 0
        for s in state { Elementwise.zero(s.buffer.baseAddress!, s.buffer.count) }
    }
}

/// Gradient-norm clipping as torch.nn.utils.clip_grad_norm_, for gradients that are read as `scale * gradients`:
/// the norm of the scaled gradients and the factor maxNorm / (norm + 1e-6), or 1 when that is not below 1.
/// Nothing is written: the caller multiplies the factor into the gradient scale it passes to `Optimizer.update`.
public func gradientClipFactor<T: Scalar>(_ gradients: UnsafeBufferPointer<T>, scale: Double = 1, maxNorm: Double)
    -> (norm: Double, factor: Double) {
    let norm = scale * Double(T.dot(gradients.count, gradients.baseAddress!, gradients.baseAddress!)).squareRoot()
    return (norm, gradientClipFactor(norm: norm, maxNorm: maxNorm))
}

/// torch.nn.utils.clip_grad_norm_'s factor for a gradient of global norm `norm`: maxNorm / (norm + 1e-6), or 1
/// when that is not below 1. For callers that compute the norm themselves (a sharded step sums it over ranks).
public func gradientClipFactor(norm: Double, maxNorm: Double) -> Double {
    Swift.min(1, maxNorm / (norm + 1e-6))
}

/// Optimizer settings that cannot work (a momentum of 1 or more, Nesterov without momentum, ...).
public struct OptimizerError: Error, CustomStringConvertible, Equatable {
    public let description: String
    public init(_ description: String) { self.description = description }
}
