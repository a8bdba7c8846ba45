import Engine

/// What a `GradientReducer` needs from an optimizer: the Coordinator changes parameters only through this. The
/// parameters, gradients and every state buffer share one flat layout, so a sharded reducer can update a range of
/// it and gather the state by the same ranges.
public protocol ParameterUpdate: AnyObject {
    /// Applies one update to all of `parameters` from `gradientScale * gradients`.
    func update(parameters: UnsafeMutableBufferPointer<Float>, gradients: UnsafeMutableBufferPointer<Float>,
                learningRate: Double, gradientScale: Double)

    /// Starts a step whose update is applied range by range (`updatePart`).
    func beginStep()

    /// Applies the step begun by `beginStep()` to `range` of the parameters and state only, from
    /// `gradientScale * (gradients + addend)`; `gradients` and `addend` hold the range's values alone (element 0
    /// belongs to `range.lowerBound`); without `addend`, from `gradientScale * gradients`.
    func updatePart(_ range: Range<Int>, parameters: UnsafeMutableBufferPointer<Float>, gradients: UnsafePointer<Float>,
                    adding addend: UnsafePointer<Float>?, learningRate: Double, gradientScale: Double)

    /// The state kept between steps (momentum, moments), each buffer laid out as the parameters.
    var stateBuffers: [UnsafeMutableBufferPointer<Float>] { get }
}

// Declared here rather than in the Worker: the Coordinator depends on Engine anyway (for its kernels), and every
// client that reduces gradients (the Worker, bpbench, CommCheck, the tests) then gets it once instead of repeating it.
extension Optimizer: ParameterUpdate where T == Float {
    public var stateBuffers: [UnsafeMutableBufferPointer<Float>] { state.map(\.buffer) }
}
