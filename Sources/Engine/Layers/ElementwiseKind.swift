/// A kind without parameters or buffers, which allocates nothing of its own: pooling, reshaping, activations.
/// Conforming says so, and the kind's file declares only the rest. (A kind of these that allocates, like max
/// pooling's winners or dropout's mask, declares its workspace.)
public protocol StatelessKind: LayerKind {}

extension StatelessKind {
    public func parameterShapes(input: [Int]) -> [(String, [Int])] { [] }
    public var bufferShapes: [(String, [Int])] { [] }
    public func workspace(input: [Int], output: [Int], batchCapacity rows: Double, scalarBytes: Double) -> LayerWorkspace {
        (0, 0)
    }
}

/// A stateless kind that maps each value on its own, on samples of any shape: activations and dropout. Its output
/// has its input's shape.
public protocol ElementwiseKind: StatelessKind {}

extension ElementwiseKind {
    public static var isSpatial: Bool { false }
    public func outputShape(input: [Int]) throws(ModelSpecError) -> [Int] { input }
}

/// A buffer of T seen as Float, for the Float-only kernels; only called when T is Float.
@inline(__always)
func floats<T>(_ p: UnsafeMutablePointer<T>) -> UnsafeMutablePointer<Float> {
    UnsafeMutableRawPointer(p).assumingMemoryBound(to: Float.self)
}

/// `floats` for a buffer only read.
@inline(__always)
func readingFloats<T>(_ p: UnsafePointer<T>) -> UnsafePointer<Float> {
    UnsafeRawPointer(p).assumingMemoryBound(to: Float.self)
}

/// Appends x[i] > 0 for each of `n` values: which side of ReLU's kink each input is on.
@_specialize(where T == Float) @_specialize(where T == Double)
func appendSigns<T: Scalar>(_ x: UnsafePointer<T>, _ n: Int, to pattern: inout [Int32]) {
    for i in 0..<n { pattern.append(x[i] > 0 ? 1 : 0) }
}
