/// y = x W^T + b on flat samples [inputs]: PyTorch `nn.Linear(inputs, outputs)`, the entry `linear N` (the inputs
/// come from the layer before).
public struct LinearKind: LayerKind {
    public let inputs: Int
    public let outputs: Int

    public static var syntax: String { "linear N" }
    public static var isSpatial: Bool { false }
    public static func parse(_ entry: LayerEntry, input: [Int]) throws(LayerEntryError) -> Self {
        try entry.expectCount(2)
        guard input.count == 1 else { throw entry.fail("takes flat samples, but its input is \(input): put a flatten before it") }
        // An integer as every other size is (Double took 0x10, 1e3 and 8.0 as widths).
        return Self(inputs: input[0], outputs: try entry.integer(entry.words[1], "linear width", minimum: 1))
    }
    public var entry: String { "linear \(outputs)" }
    public var description: String { "Linear(\(inputs), \(outputs))" }

    public func outputShape(input: [Int]) throws(ModelSpecError) -> [Int] {
        guard inputs > 0, outputs > 0 else { throw ModelSpecError("widths must be positive") }
        guard input.count == 1 else {
            throw ModelSpecError("takes flat samples of \(inputs) values, but its input is \(input): put a flatten before it")
        }
        guard input[0] == inputs else { throw ModelSpecError("expects \(inputs) inputs but the previous layer produces \(input[0])") }
        return [outputs]
    }

    public func parameterShapes(input: [Int]) -> [(String, [Int])] { [("weight", [outputs, inputs]), ("bias", [outputs])] }
    public var bufferShapes: [(String, [Int])] { [] }
    public func workspace(input: [Int], output: [Int], batchCapacity rows: Double, scalarBytes: Double) -> LayerWorkspace {
        (rows * scalarBytes, 0)  // a column of ones
    }

    public var hasKink: Bool { false }
    public var initializationRole: InitializationRole { .xavier }
    /// Its backward pass reads x and dy, never y.
    public var outputMayBeOverwritten: Bool { true }
    public func runsInPlace(after previous: LayerSpec?) -> Bool { false }
    public func torchModule(input: [Int]) -> TorchModule { TorchModule("Linear", [.int(inputs), .int(outputs)]) }
    public func makeLayer<T: Scalar>(_ placement: LayerPlacement) -> Layer<T> { Linear<T>(placement, spec: LayerSpec(self)) }
}

extension LayerSpec {
    public static func linear(inputs: Int, outputs: Int) -> LayerSpec { LayerSpec(LinearKind(inputs: inputs, outputs: outputs)) }
}

/// y[B, O] = x[B, I] W[O, I]^T + b[O] (PyTorch `nn.Linear`).
///
/// Parameters: weight [O, I], bias [O]. Backward: dW[O, I] (+)= dy[B, O]^T x[B, I]; db[O] (+)= dy^T 1[B];
/// dx[B, I] = dy[B, O] W[O, I]. Every product is one BLAS call.
final class Linear<T: Scalar>: Layer<T> {
    private var inputs: Int { inputCount }
    private var outputs: Int { outputCount }
    /// A column of ones for the bias gradient as a GEMV (column sums of dy).
    private let ones: UnsafeMutablePointer<T>

    override init(_ placement: LayerPlacement, spec: LayerSpec) {
        ones = .allocate(capacity: placement.batchCapacity)
        ones.initialize(repeating: 1, count: placement.batchCapacity)
        super.init(placement, spec: spec)
    }

    deinit { ones.deallocate() }


    override func forward(count: Int, mode: ForwardMode) {
        let w = parameters!
        // y[B,O] = bias (broadcast) + x[B,I] * W[O,I]^T
        broadcastRows(w + outputs * inputs, into: y, rows: count, columns: outputs)
        T.gemm(transposeA: false, transposeB: true, m: count, n: outputs, k: inputs,
               alpha: 1, a: x, lda: inputs, b: w, ldb: inputs, beta: 1, c: y, ldc: outputs)
    }

    override func backwardParameters(count: Int, accumulate: Bool) {
        let beta: T = accumulate ? 1 : 0
        let gw = gradients!
        // dW[O,I] (+)= dy[B,O]^T * x[B,I];  db[O] (+)= dy[B,O]^T * 1[B]
        T.gemm(transposeA: true, transposeB: false, m: outputs, n: inputs, k: count,
               alpha: 1, a: dy, lda: outputs, b: x, ldb: inputs, beta: beta, c: gw, ldc: inputs)
        T.gemvTransposed(m: count, n: outputs, alpha: 1, a: dy, lda: outputs, x: ones, beta: beta, y: gw + outputs * inputs)
        provenFinite = !accumulate && gradientsBounded(count: count)
    }

    override func backwardInput(count: Int, accumulate: Bool) {
        // dx[B,I] = dy[B,O] * W[O,I]
        guard let dx else { return }
        T.gemm(transposeA: false, transposeB: false, m: count, n: inputs, k: outputs,
               alpha: 1, a: dy, lda: outputs, b: parameters!, ldb: inputs, beta: 0, c: dx, ldc: inputs)
    }

    /// The bounds behind `Model.gradientsProvenFinite(in:)`, just after the backward GEMMs: dW = dy^T x and
    /// db = dy^T 1, so by Cauchy-Schwarz every |dW_oi| <= |dy| |x| and every |db_o| <= |dy| sqrt(B) (Frobenius norms
    /// over the batch). When both bounds are finite and far below the largest finite value, no partial sum of the
    /// GEMM or GEMV can overflow, and finite inputs with no overflow give finite outputs. The squared norms come from
    /// the in-place ReLU kernels that wrote x and dy anyway, or else from a BLAS dot; a NaN or infinity in x or dy
    /// makes its norm non-finite and the proof fails.
    private func gradientsBounded(count: Int) -> Bool {
        let x2 = Double(previous?.outputSquares ?? T.dot(count * inputs, x, x))
        let dy2 = Double(next?.inputGradientSquares ?? T.dot(count * outputs, dy, dy))
        // A wide margin below the largest finite value for the rounding of the norms and of the products' sums.
        let limit = Double(T.greatestFiniteMagnitude) / 16
        let weightBound = dy2.squareRoot() * x2.squareRoot(), biasBound = dy2.squareRoot() * Double(count).squareRoot()
        return weightBound <= limit && biasBound <= limit  // false for NaN and infinity
    }

    override func initialize(scheme: Initialization, gain: Double, generator: inout RandomGenerator) {
        initializeWeights(parameters!, count: outputs * inputs, fanIn: inputs, fanOut: outputs,
                          scheme: scheme, gain: gain, generator: &generator)
        (parameters! + outputs * inputs).update(repeating: 0, count: outputs)
    }
}

/// Draws `count` weights of a layer with `fanIn` inputs and `fanOut` outputs per unit of receptive field, in Double
/// and then rounded to T, so Float and Double models made with one seed start from the same values.
func initializeWeights<T: Scalar>(_ weights: UnsafeMutablePointer<T>, count n: Int, fanIn: Int, fanOut: Int,
                                  scheme: Initialization, gain: Double, generator: inout RandomGenerator) {
    switch scheme {
    case .kaimingNormal, .automatic:
        let std = (2 * gain / Double(fanIn)).squareRoot()
        for i in 0..<n { weights[i] = T(generator.nextNormal() * std) }
    case .kaimingUniform:
        let bound = (6 * gain / Double(fanIn)).squareRoot()
        for i in 0..<n { weights[i] = T((2 * generator.nextUniform() - 1) * bound) }
    case .xavierNormal:
        let std = (2 / Double(fanIn + fanOut)).squareRoot()
        for i in 0..<n { weights[i] = T(generator.nextNormal() * std) }
    case .xavierUniform:
        let bound = (6 / Double(fanIn + fanOut)).squareRoot()
        for i in 0..<n { weights[i] = T((2 * generator.nextUniform() - 1) * bound) }
    }
}
