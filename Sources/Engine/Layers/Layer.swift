import Foundation

/// Whether a forward pass trains, evaluates, or feeds the gradient checker.
///
/// | mode    | dropout | batch norm statistics          |
/// |---------|---------|--------------------------------|
/// | `train` | active  | the batch's, running ones kept |
/// | `eval`  | off     | the running ones               |
/// | `check` | off     | the batch's, nothing kept      |
///
/// `check` makes the cost a deterministic function of the parameters that still couples the samples of a batch
/// through batch norm, which is what the gradient check must cover.
public enum ForwardMode: Sendable {
    case train, eval, check

    /// Dropout drops units only while training.
    @inline(__always) var dropsUnits: Bool { self == .train }
    /// Batch norm normalises with the batch's own statistics in training and in the check.
    @inline(__always) var usesBatchStatistics: Bool { self != .eval }
}

/// Sums across the ranks of a data-parallel job, for layers whose forward and backward passes need statistics of
/// the global batch (synchronized batch norm), and for the distributed gradient check (`checkGradients(acrossRanks:)`).
/// The engine knows nothing of MPI: the coordinator supplies this.
public protocol CrossRankReducer: AnyObject {
    /// Replaces each value of `values` with its sum over every rank. Collective: every rank calls it in the same
    /// order with the same count. It runs inside a forward or backward pass, where there is no way back: on
    /// failure the implementation reports it and ends the job.
    func sumAcrossRanks(_ values: UnsafeMutableBufferPointer<Double>)
}

/// One layer of a model at run time: a kind's forward and backward passes over views into the model's buffers.
///
/// Every kind subclasses this in its kind's file (Linear.swift, Conv2d.swift, ...), with its forward and backward
/// side by side; the kind makes it (`LayerKind.makeLayer`). The model allocates activations and their gradients for
/// the batch capacity once, binds them here, and runs its plan of layers: `forward` in order, then in reverse
/// `backwardParameters` (the layer's parameter gradients, after which a data-parallel caller may start reducing them)
/// and `backwardInput` (d loss / d x, skipped when no earlier layer has parameters). None of these allocate.
///
/// Public only because `LayerKind.makeLayer` returns one; everything in it is the Engine's own.
///
/// A class, not a struct: copying a generic struct out of an array in unspecialised generic code heap-allocates a box
/// per copy (measured: one allocation per layer per pass), while a class reference is only retained.
///
/// Dimension legend: B = rows in the batch (<= batchCapacity); a sample is `inputCount` values in, `outputCount` out.
public class Layer<T: Scalar> {
    let index: Int
    let spec: LayerSpec
    let inputShape: [Int]
    let outputShape: [Int]
    let inputCount: Int
    let outputCount: Int
    let batchCapacity: Int

    /// Input activations [B, inputCount], output activations [B, outputCount], and their gradients. `dx` is nil when
    /// nothing below needs it.
    var x: UnsafeMutablePointer<T>!
    var y: UnsafeMutablePointer<T>!
    var dx: UnsafeMutablePointer<T>?
    var dy: UnsafeMutablePointer<T>!

    /// The layer's parameters and their gradients (its first tensor; the others follow it in `parameterShapes`
    /// order), and its buffers (running statistics); nil for layers without them.
    var parameters: UnsafeMutablePointer<T>?
    var gradients: UnsafeMutablePointer<T>?
    var buffers: UnsafeMutablePointer<T>?
    /// Offset of the layer's first parameter in the model's flat buffers, and how many it has.
    var parameterOffset = 0
    var parameterCount = 0
    /// Scratch space shared by every layer (the convolutions' column buffers), `scratchElements` long at least.
    var scratch: UnsafeMutablePointer<T>!

    /// The layers before and after, for the finiteness proof (`Linear`); unowned: the model owns every layer.
    unowned(unsafe) var previous: Layer<T>?
    unowned(unsafe) var next: Layer<T>?

    /// Sums of squares some kernels compute as they write (Float ReLUs in place): of the output in the last training
    /// forward, of the input gradient in the last backward; nil when not computed.
    var outputSquares: T?
    var inputGradientSquares: T?
    /// Whether the last non-accumulating backward proved this layer's parameter gradients finite.
    var provenFinite = false

    init(_ placement: LayerPlacement, spec: LayerSpec) {
        index = placement.index
        self.spec = spec
        inputShape = placement.inputShape
        outputShape = placement.outputShape
        inputCount = inputShape.reduce(1, *)
        outputCount = outputShape.reduce(1, *)
        batchCapacity = placement.batchCapacity
    }

    // MARK: - What the model allocates for the layer

    /// The layer's output is its input's buffer (and its input gradient its output gradient's): an in-place
    /// activation, or a reshape. Decided by the model, which knows the neighbours (`LayerKind.runsInPlace`).
    var runsInPlace = false

    /// Elements of the shared scratch space the layer needs at the batch capacity.
    var scratchElements: Int {
        Int(spec.workspace(input: inputShape, output: outputShape, batchCapacity: Double(batchCapacity),
                           scalarBytes: Double(MemoryLayout<T>.stride)).scratchElements)
    }

    /// Bytes the layer allocates for itself (masks, indices, saved statistics), for the memory estimate.
    var workspaceBytes: Int {
        Int(spec.workspace(input: inputShape, output: outputShape, batchCapacity: Double(batchCapacity),
                           scalarBytes: Double(MemoryLayout<T>.stride)).bytes)
    }

    /// Called once the model holds every layer: for what a layer takes from its model (the dropout generator, the
    /// sums across ranks).
    func attach(to model: Model<T>) {}

    // MARK: - Passes

    func forward(count: Int, mode: ForwardMode) {
        fatalError("\(type(of: self)) does not implement forward")
    }

    /// Writes (accumulate: false) or adds to (true) the gradients of the layer's parameters from `dy` and `x`.
    func backwardParameters(count: Int, accumulate: Bool) {}

    /// Writes d loss / d x into `dx` (when it is not nil) from `dy`.
    func backwardInput(count: Int, accumulate: Bool) {}

    // MARK: - Initialisation and the gradient checker

    /// Sets the layer's parameters (weights by `scheme` with `gain`, from `generator`) and buffers to their start.
    func initialize(scheme: Initialization, gain: Double, generator: inout RandomGenerator) {}

    /// Whether the layer's derivative jumps somewhere (the gradient checker's kinks): its kind's, or a fused block's.
    var hasKink: Bool { spec.hasKink }

    /// A batch norm's statistics and reductions, for a layer that normalises (the test faults reach them).
    var normalization: BatchNormStatistics<T>? { nil }

    /// Appends what decides which side of a kink each value is on in the last forward pass (ReLU: the signs of its
    /// inputs; max-pooling: which element won each window). Two passes with different patterns straddle a kink.
    func appendKinkPattern(count: Int, to pattern: inout [Int32]) {}
}
