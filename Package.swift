// swift-tools-version:6.0
//
// bpworker: a distributed data-parallel training daemon.
//
// The folders are the architecture:
//   Engine       layers, losses, optimizers, data readers and the gradient checker; knows nothing of MPI.
//   Coordinator  communicators, sharding, gradient reduction; sees the model only as flat buffers, and changes
//                parameters only through its `ParameterUpdate` protocol (Engine's `Optimizer<Float>` conforms, in
//                Coordinator/ParameterUpdate.swift). From Engine it takes kernels (dot, add, nonFiniteCount,
//                sumOfSquaredSums), `LargeBuffer`, `RandomGenerator` for sampling, and the `CrossRankReducer`
//                protocol that synchronized batch norm's sums implement.
//   Worker       the `bpworker` command line that wires the two together.
// C libraries come in through four small system-library shims: CBLAS (OpenBLAS), CMPI (OpenMPI), CZlib and CHDF5
// (libhdf5, for training data in HDF5 files).
import PackageDescription

let package = Package(
    name: "bpworker",
    // macOS 15 for the Synchronization module (Atomic, Mutex), which the watchdog shares its fields through.
    platforms: [.macOS(.v15)],
    // MARK: - Public API
    products: [
        .executable(name: "bpworker", targets: ["Worker"]),
        .library(name: "Engine", targets: ["Engine"]),
        .library(name: "Coordinator", targets: ["Coordinator"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
        .package(url: "https://github.com/apple/swift-log", from: "1.6.0"),
        .package(url: "https://github.com/apple/swift-numerics", from: "1.0.0"),
        .package(url: "https://github.com/jpsim/Yams", from: "6.0.0"),
    ],
    targets: [
        // MARK: - C shims
        .systemLibrary(
            name: "CBLAS",
            pkgConfig: "openblas",
            providers: [.apt(["libopenblas-dev"])]
        ),
        .systemLibrary(
            name: "CMPI",
            pkgConfig: "ompi-c",
            providers: [.apt(["libopenmpi-dev", "openmpi-bin"])]
        ),
        .systemLibrary(
            name: "CZlib",
            pkgConfig: "zlib",
            providers: [.apt(["zlib1g-dev"])]
        ),
        // Debian's libhdf5-dev installs `hdf5-serial.pc`; its `hdf5.pc` is only an alternatives link.
        .systemLibrary(
            name: "CHDF5",
            pkgConfig: "hdf5-serial",
            providers: [.apt(["libhdf5-dev"])]
        ),

        // MARK: - Implementation
        .target(
            name: "Engine",
            dependencies: [
                "CBLAS", "CZlib", "CHDF5",
                .product(name: "RealModule", package: "swift-numerics"),
            ],
            swiftSettings: engineCodeGeneration
        ),
        .target(
            name: "Coordinator",
            // Engine for its kernels and types (see the top); parameters change only through `ParameterUpdate`.
            dependencies: [
                "Engine", "CMPI",
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .executableTarget(
            name: "Worker",
            dependencies: [
                "Engine", "Coordinator",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Yams", package: "Yams"),
            ]
        ),

        // MARK: - Benchmarks (bench/run)
        .executableTarget(
            name: "bpbench",
            dependencies: ["Engine", "Coordinator", "CMPI", "CBLAS", "AllocationCounter"],
            path: "bench/bpbench"
        ),

        // MARK: - Tests
        // Counts the calling thread's heap allocations (replaces malloc in the test binary only).
        .target(
            name: "AllocationCounter",
            path: "Tests/AllocationCounter"
        ),
        .testTarget(
            name: "EngineTests",
            dependencies: ["Engine"]
        ),
        // Run under mpirun by CoordinatorTests to check the MPI communicator on real ranks.
        .executableTarget(
            name: "CommCheck",
            dependencies: ["Coordinator", "Engine"],
            path: "Tests/CommCheck"
        ),
        .testTarget(
            name: "CoordinatorTests",
            dependencies: ["Coordinator", "Engine", "AllocationCounter"]
        ),
        // Runs the built bpworker, alone and under mpirun.
        .testTarget(
            name: "WorkerTests",
            dependencies: ["Engine", "Coordinator", "Worker", "AllocationCounter",
                           .product(name: "ArgumentParser", package: "swift-argument-parser")]
        ),
    ]
)

// The Engine's own kernels (the Winograd transforms, the element-wise loops) in 256-bit AVX2 vectors with FMA
// available, where baseline x86-64 splits every SIMD16<Float> into four 128-bit SSE operations: the ResNet trains
// 1.2 times faster, with bit for bit the same model (BENCHMARKS.md, "the Engine compiled for AVX2"). Swift contracts no
// a * b + c into an FMA by itself, so results do not change. Every machine this runs on has AVX2 (Haswell, 2013,
// and later; AMD since Excavator); the Worker checks at start and refuses, with the reason, a processor without it
// (ProcessorCheck.swift), before any Engine code runs.
var engineCodeGeneration: [SwiftSetting] {
    #if arch(x86_64)
    [.unsafeFlags(["-target-cpu", "haswell"])]
    #else
    []
    #endif
}
