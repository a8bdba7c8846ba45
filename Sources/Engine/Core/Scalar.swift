import CBLAS
import Foundation
import RealModule
import Synchronization

/// The floating-point types the engine computes in: `Float` for training, `Double` for gradient checking.
///
/// A scalar knows its BLAS routines, so generic engine code reaches `cblas_sgemm` or `cblas_dgemm` through one
/// static dispatch per call and never multiplies matrices by hand. All matrices are row-major.
public protocol Scalar: BinaryFloatingPoint, Real, Sendable, Codable where Magnitude == Self {
    /// Short name used in reports: "float32" or "float64".
    static var dtypeName: String { get }

    /// C[m,n] = alpha * op(A) * op(B) + beta * C, row-major, with op(X) = X or X^T.
    static func gemm(
        transposeA: Bool, transposeB: Bool, m: Int, n: Int, k: Int,
        alpha: Self, a: UnsafePointer<Self>, lda: Int, b: UnsafePointer<Self>, ldb: Int,
        beta: Self, c: UnsafeMutablePointer<Self>, ldc: Int)

    /// y[n] = alpha * A^T * x + beta * y for row-major A[m,n]; used for bias gradients (column sums).
    static func gemvTransposed(
        m: Int, n: Int, alpha: Self, a: UnsafePointer<Self>, lda: Int,
        x: UnsafePointer<Self>, beta: Self, y: UnsafeMutablePointer<Self>)

    /// y[m] = alpha * A * x + beta * y for row-major A[m,n]; used for row sums (a convolution's bias gradient).
    static func gemv(
        m: Int, n: Int, alpha: Self, a: UnsafePointer<Self>, lda: Int,
        x: UnsafePointer<Self>, beta: Self, y: UnsafeMutablePointer<Self>)

    /// Sum of x[i] * y[i].
    static func dot(_ n: Int, _ x: UnsafePointer<Self>, _ y: UnsafePointer<Self>) -> Self

    /// B[columns, rows] = A[rows, columns]^T, row-major (OpenBLAS's `?omatcopy`).
    static func transpose(rows: Int, columns: Int, a: UnsafePointer<Self>, lda: Int, b: UnsafeMutablePointer<Self>, ldb: Int)

    /// 64 bytes of the type (16 Floats, 8 Doubles; one AVX-512 register, two AVX2 ones): the channels the Winograd
    /// transforms work on at once. (`SIMD` asks its scalars to be `Codable`, hence that refinement above.)
    associatedtype Lanes: SIMD where Lanes.Scalar == Self
}

extension Float: Scalar {
    public typealias Lanes = SIMD16<Float>
    public static var dtypeName: String { "float32" }

    @inline(__always)
    public static func gemm(
        transposeA: Bool, transposeB: Bool, m: Int, n: Int, k: Int,
        alpha: Float, a: UnsafePointer<Float>, lda: Int, b: UnsafePointer<Float>, ldb: Int,
        beta: Float, c: UnsafeMutablePointer<Float>, ldc: Int
    ) {
        cblas_sgemm(
            CblasRowMajor, transposeA ? CblasTrans : CblasNoTrans, transposeB ? CblasTrans : CblasNoTrans,
            blasint(m), blasint(n), blasint(k), alpha, a, blasint(lda), b, blasint(ldb), beta, c, blasint(ldc))
    }

    @inline(__always)
    public static func gemvTransposed(
        m: Int, n: Int, alpha: Float, a: UnsafePointer<Float>, lda: Int,
        x: UnsafePointer<Float>, beta: Float, y: UnsafeMutablePointer<Float>
    ) {
        cblas_sgemv(CblasRowMajor, CblasTrans, blasint(m), blasint(n), alpha, a, blasint(lda), x, 1, beta, y, 1)
    }

    @inline(__always)
    public static func gemv(
        m: Int, n: Int, alpha: Float, a: UnsafePointer<Float>, lda: Int,
        x: UnsafePointer<Float>, beta: Float, y: UnsafeMutablePointer<Float>
    ) {
        cblas_sgemv(CblasRowMajor, CblasNoTrans, blasint(m), blasint(n), alpha, a, blasint(lda), x, 1, beta, y, 1)
    }

    @inline(__always)
    public static func dot(_ n: Int, _ x: UnsafePointer<Float>, _ y: UnsafePointer<Float>) -> Float {
        cblas_sdot(blasint(n), x, 1, y, 1)
    }

    @inline(__always)
    public static func transpose(rows: Int, columns: Int, a: UnsafePointer<Float>, lda: Int, b: UnsafeMutablePointer<Float>,
                                 ldb: Int) {
        cblas_somatcopy(CblasRowMajor, CblasTrans, blasint(rows), blasint(columns), 1, a, blasint(lda), b, blasint(ldb))
    }
}

extension Double: Scalar {
    public typealias Lanes = SIMD8<Double>
    public static var dtypeName: String { "float64" }

    @inline(__always)
    public static func gemm(
        transposeA: Bool, transposeB: Bool, m: Int, n: Int, k: Int,
        alpha: Double, a: UnsafePointer<Double>, lda: Int, b: UnsafePointer<Double>, ldb: Int,
        beta: Double, c: UnsafeMutablePointer<Double>, ldc: Int
    ) {
        cblas_dgemm(
            CblasRowMajor, transposeA ? CblasTrans : CblasNoTrans, transposeB ? CblasTrans : CblasNoTrans,
            blasint(m), blasint(n), blasint(k), alpha, a, blasint(lda), b, blasint(ldb), beta, c, blasint(ldc))
    }

    @inline(__always)
    public static func gemvTransposed(
        m: Int, n: Int, alpha: Double, a: UnsafePointer<Double>, lda: Int,
        x: UnsafePointer<Double>, beta: Double, y: UnsafeMutablePointer<Double>
    ) {
        cblas_dgemv(CblasRowMajor, CblasTrans, blasint(m), blasint(n), alpha, a, blasint(lda), x, 1, beta, y, 1)
    }

    @inline(__always)
    public static func gemv(
        m: Int, n: Int, alpha: Double, a: UnsafePointer<Double>, lda: Int,
        x: UnsafePointer<Double>, beta: Double, y: UnsafeMutablePointer<Double>
    ) {
        cblas_dgemv(CblasRowMajor, CblasNoTrans, blasint(m), blasint(n), alpha, a, blasint(lda), x, 1, beta, y, 1)
    }

    @inline(__always)
    public static func dot(_ n: Int, _ x: UnsafePointer<Double>, _ y: UnsafePointer<Double>) -> Double {
        cblas_ddot(blasint(n), x, 1, y, 1)
    }

    @inline(__always)
    public static func transpose(rows: Int, columns: Int, a: UnsafePointer<Double>, lda: Int, b: UnsafeMutablePointer<Double>,
                                 ldb: Int) {
        cblas_domatcopy(CblasRowMajor, CblasTrans, blasint(rows), blasint(columns), 1, a, blasint(lda), b, blasint(ldb))
    }
}

/// OpenBLAS's thread pool size. One thread per rank when several ranks share a node, all cores otherwise.
public enum BLASThreads {
    /// The count last set (OpenBLAS's own default until then): what `oneThreadIfSmall` goes back to. Read from it,
    /// not from OpenBLAS, so that a pass that took the threads away on one thread hands back the count set since,
    /// not the one it found: in one test process, a Winograd test's restore undid another test's `set(1)`, and that
    /// test's steps then allocated OpenBLAS's thread jobs.
    private static let configured = Atomic<Int>(Int(openblas_get_num_threads()))

    public static func set(_ count: Int) {
        configured.store(max(1, count), ordering: .relaxed)
        openblas_set_num_threads(Int32(max(1, count)))
    }
    public static var current: Int { Int(openblas_get_num_threads()) }
    /// The multiply-adds from which a GEMM gains from OpenBLAS's threads (measured on 2 cores, see `oneThreadIfSmall`).
    static let splitWorth = 1 << 21

    /// Runs `body`, a run of GEMMs of `work` multiply-adds each, with OpenBLAS on one thread when they are too small
    /// to split (below `splitWorth`), then gives OpenBLAS back its threads. OpenBLAS splits any GEMM past 2^18
    /// multiply-adds and wakes its other threads for each; a Winograd convolution makes 36 a pass. In local mode on 2
    /// cores the ResNet (whose 14x14 32-channel and 7x7 64-channel layers make GEMMs of 2^20) trained at 576 to 1154
    /// samples/s from one run to the next with every GEMM split, at 1108 to 1146 with those on one thread, and 906 with
    /// one thread throughout; fashion-cnn's Winograd GEMMs of 2^21 run faster split (4825 against 3917 samples/s on
    /// one thread). Under mpirun every rank has one thread and this costs one call that reads a number.
    @inline(__always) static func oneThreadIfSmall(work: Int, _ body: () -> Void) {
        let threads = configured.load(ordering: .relaxed)
        let taken = threadsFor(work: work, threads: threads) < threads
        if taken { openblas_set_num_threads(1) }
        body()
        if taken { openblas_set_num_threads(Int32(configured.load(ordering: .relaxed))) }
    }

    /// The OpenBLAS threads GEMMs of `work` multiply-adds get when it has `threads`.
    static func threadsFor(work: Int, threads: Int) -> Int { work < splitWorth ? 1 : threads }
}

/// Which OpenBLAS kernels run, and a better choice when OpenBLAS guessed badly.
public enum BLASKernels {
    /// The kernel family OpenBLAS chose at load time ("Haswell", "SkylakeX", ...).
    public static var coreName: String { String(cString: openblas_get_corename()) }

    /// The kernel family to ask for with OPENBLAS_CORETYPE when OpenBLAS fell back to its oldest x86-64 kernels
    /// (Prescott, SSE3) on a processor it does not know: Debian bookworm's OpenBLAS 0.3.21 does this on recent
    /// Xeons, and its GEMMs then run 4x slower than with its AVX-512 kernels (BENCHMARKS.md, "Measurements behind
    /// comments in the code"). Nil when OpenBLAS chose well or no better kernel fits.
    /// - Parameter cpuFlags: the processor's feature flags, as /proc/cpuinfo lists them.
    public static func betterCoreType(current: String, cpuFlags: Set<String>) -> String? {
        guard current == "Prescott" || current == "Core2" || current == "Nehalem" else { return nil }
        if ["avx512f", "avx512bw", "avx512dq", "avx512vl"].allSatisfy(cpuFlags.contains) { return "SkylakeX" }
        if ["avx2", "fma"].allSatisfy(cpuFlags.contains) { return "Haswell" }
        return nil
    }

    /// Call first thing in an executable: when OpenBLAS picked its fallback kernels on a processor that has
    /// better ones (`betterCoreType`), restarts this same process with OPENBLAS_CORETYPE set, since OpenBLAS
    /// reads it only when it loads. An OPENBLAS_CORETYPE the user set is always kept. Under mpirun the restart is
    /// an exec in place (same pid, same MPI environment), and it must come before MPI_Init.
    public static func restartWithBetterKernelsIfNeeded() {
        let environment = ProcessInfo.processInfo.environment
        guard environment["OPENBLAS_CORETYPE"] == nil, environment[restartedVariable] == nil,
              let cpuinfo = try? String(contentsOfFile: "/proc/cpuinfo", encoding: .utf8),
              let flagsLine = cpuinfo.split(separator: "\n").first(where: { $0.hasPrefix("flags") }) else { return }
        let flags = Set(flagsLine.split(separator: ":").last?.split(separator: " ").map(String.init) ?? [])
        guard let coreType = betterCoreType(current: coreName, cpuFlags: flags) else { return }
        setenv("OPENBLAS_CORETYPE", coreType, 1)
        setenv(restartedVariable, coreName, 1)   // only one restart, whatever happens
        let arguments = CommandLine.arguments.map { strdup($0) } + [nil]
        execv("/proc/self/exe", arguments)
        // exec failed: carry on with the kernels we have.
    }

    static let restartedVariable = "BPWORKER_BLAS_RESTARTED"

    /// Which kernels run and why, for start-up reports.
    public static var description: String {
        if let original = ProcessInfo.processInfo.environment[restartedVariable] {
            return "OpenBLAS \(coreName) kernels (it chose \(original) for this processor; OPENBLAS_CORETYPE=\(coreName) set)"
        }
        return "OpenBLAS \(coreName) kernels"
    }
}
