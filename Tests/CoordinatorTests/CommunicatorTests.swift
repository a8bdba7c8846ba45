import Coordinator
import Foundation
import Testing

// MARK: - LocalCommunicator

@Suite struct LocalCommunicatorTests {
    @Test func isRankZeroOfOne() throws {
        let comm: any Communicator = LocalCommunicator()
        #expect(comm.rank == 0)
        #expect(comm.size == 1)
        #expect(!comm.processorName.isEmpty)
        try comm.barrier()
    }

    @Test(arguments: ReduceOperation.allCases)
    func allreduceIsTheIdentity(op: ReduceOperation) throws {
        let comm = LocalCommunicator()
        let floats: [Float] = [1.5, -2, 0, 1e30]
        var reducedFloats = floats
        try reducedFloats.withUnsafeMutableBufferPointer { try comm.allreduce($0, op: op) }
        #expect(reducedFloats == floats)

        let ints: [Int64] = [.min, -1, 0, .max]
        var reducedInts = ints
        try reducedInts.withUnsafeMutableBufferPointer { try comm.allreduce($0, op: op) }
        #expect(reducedInts == ints)
    }

    @Test func gatherHandsBackTheOneRanksPartAndRefusesAnotherRoot() throws {
        let comm = LocalCommunicator()
        let values: [Int64] = [7, -3, .max]
        #expect(try values.withUnsafeBufferPointer { try comm.gather($0, root: 0) } == [values])
        #expect(try [Int64]().withUnsafeBufferPointer { try comm.gather($0, root: 0) } == [[]])
        #expect(throws: MPIError.self) { try values.withUnsafeBufferPointer { try comm.gather($0, root: 1) } }
        // One rank's clock against itself: no offset.
        #expect(try ClockAlignment.measure(comm).map(\.offset) == [0])
    }

    @Test func startAllreduceIsAlreadyComplete() throws {
        let comm = LocalCommunicator()
        var values: [Double] = [3, 1, 4, 1, 5]
        let pending = try values.withUnsafeMutableBufferPointer { try comm.startAllreduce($0, op: .sum) }
        #expect(try pending.test())
        #expect(try pending.test())
        try pending.wait()
        #expect(values == [3, 1, 4, 1, 5])
    }

    @Test func broadcastFromRootZeroKeepsTheBuffer() throws {
        let comm = LocalCommunicator()
        var values: [UInt64] = [1, 2, .max]
        try values.withUnsafeMutableBufferPointer { try comm.broadcast($0, root: 0) }
        #expect(values == [1, 2, .max])

        var bytes: [UInt8] = Array("payload".utf8)
        try comm.broadcast(bytes: &bytes, root: 0)
        #expect(bytes == Array("payload".utf8))
    }

    @Test(arguments: [1, -1, 7])
    func broadcastFromAnotherRootThrowsLikeMPI(root: Int) {
        let comm = LocalCommunicator()
        var values: [Int32] = [1, 2, 3]
        let error = #expect(throws: MPIError.self) {
            try values.withUnsafeMutableBufferPointer { try comm.broadcast($0, root: root) }
        }
        #expect(error?.call == "MPI_Bcast")
        #expect(error?.message.hasPrefix("MPI_ERR_ROOT") == true)
        #expect(values == [1, 2, 3])
    }

    @Test func nodeLayoutIsOneRankOnOneNode() throws {
        let comm = LocalCommunicator()
        let layout = try comm.nodeLayout()
        #expect(layout == NodeLayout(nodeNames: [comm.processorName], localRanks: [0], localIndex: 0))
        #expect(layout.localSize == 1)
        #expect(layout.nodeCount == 1)
    }

    /// `Communicator.finalize` is idempotent: neither of two calls throws, and the second changes nothing the
    /// first left. A local run never initializes MPI, so neither call may reach it (OpenMPI aborts the process
    /// when MPI_Finalize comes before MPI_Init). CommCheck checks MPICommunicator's finalize on real ranks.
    @Test func finalizeIsIdempotent() throws {
        let comm = LocalCommunicator()
        let name = comm.processorName
        for call in 1...2 {
            #expect(throws: Never.self, "finalize call \(call)") { try comm.finalize() }
            #expect(comm.rank == 0 && comm.size == 1 && comm.processorName == name, "after finalize call \(call)")
        }
    }

    /// abort(code:) exits the process, so it runs in a child: CommCheck leaves unflushed output behind
    /// and calls LocalCommunicator.abort, which must flush it and exit with the given code.
    @Test func abortFlushesAndExitsWithTheCode() throws {
        let result = try run(try commCheckExecutable(), ["--local-abort", "7"], timeout: 60)
        #expect(!result.timedOut)
        #expect(result.status == 7)
        #expect(result.output == "local abort pending")
    }
}

// MARK: - Errors, wrappers, environment

@Suite struct MPIErrorTests {
    @Test func descriptionNamesCallMessageAndCode() {
        let error = MPIError(call: "MPI_Allreduce", code: 15, message: "MPI_ERR_TRUNCATE: message truncated")
        #expect(error.description == "MPI_Allreduce failed: MPI_ERR_TRUNCATE: message truncated (code 15)")
        #expect("\(error)" == error.description)
        #expect(error != MPIError(call: "MPI_Bcast", code: 15, message: "MPI_ERR_TRUNCATE: message truncated"))
    }
}

@Suite struct WrapperTypeTests {
    func datatype<T: MPIScalar>(of _: T.Type) -> MPIDatatype { T.mpiDatatype }

    @Test func eachScalarHasItsOwnDatatypeOfTheRightWidth() {
        let expected: [(MPIDatatype, String, Int)] = [
            (datatype(of: Float.self), "MPI_FLOAT", MemoryLayout<Float>.size),
            (datatype(of: Double.self), "MPI_DOUBLE", MemoryLayout<Double>.size),
            (datatype(of: Int32.self), "MPI_INT32_T", MemoryLayout<Int32>.size),
            (datatype(of: Int64.self), "MPI_INT64_T", MemoryLayout<Int64>.size),
            (datatype(of: UInt64.self), "MPI_UINT64_T", MemoryLayout<UInt64>.size),
            (datatype(of: UInt8.self), "MPI_UINT8_T", MemoryLayout<UInt8>.size),
        ]
        for (type, name, width) in expected {
            #expect(type.name == name)
            #expect(type.byteSize == width, "\(name)")
        }
        #expect(Set(expected.map(\.0)).count == expected.count, "two scalars share a datatype handle")
    }

    @Test func sameWidthDatatypesStayDistinct() {
        #expect(MPIDatatype.byte != MPIDatatype.uint8)
        #expect(MPIDatatype.char != MPIDatatype.uint8)
        #expect(MPIDatatype.int32 != MPIDatatype.float)
        #expect(MPIDatatype.int64 != MPIDatatype.uint64)
    }

    @Test func reduceOperationsMapToDistinctMPIOperations() {
        #expect(ReduceOperation.sum.mpiOperation == .sum)
        #expect(ReduceOperation.max.mpiOperation == .max)
        #expect(ReduceOperation.min.mpiOperation == .min)
        #expect(ReduceOperation.allCases.map(\.mpiOperation.name) == ["MPI_SUM", "MPI_MAX", "MPI_MIN"])
        #expect(Set(ReduceOperation.allCases.map(\.mpiOperation)).count == 3)
    }

    @Test func completedReductionNeedsNoMPI() throws {
        let pending = PendingRequest.completed
        #expect(try pending.test())
        try pending.wait()
    }
}

@Suite struct EnvironmentTests {
    @Test func stripsTheLaunchersVariablesOnly() {
        let env = [
            "PATH": "/usr/bin", "HOME": "/root", "SLURM_PROCID": "0", "MY_OMPI_SETTING": "1", "OMPI": "bare",
            "OMPI_COMM_WORLD_SIZE": "2", "OMPI_MCA_btl": "self", "PMIX_RANK": "1", "PMIX_SERVER_URI2": "x",
            "ORTE_HNP_URI": "y", "OPAL_PREFIX": "/usr", "PMI_RANK": "0", "PMI_FD": "5",
        ]
        #expect(environmentWithoutMPIVariables(env) == [
            "PATH": "/usr/bin", "HOME": "/root", "SLURM_PROCID": "0", "MY_OMPI_SETTING": "1", "OMPI": "bare",
        ])
    }

    @Test func detectsEachLauncher() {
        #expect(MPICommunicator.isLaunchedByMPI(environment: ["OMPI_COMM_WORLD_SIZE": "4"]))
        #expect(MPICommunicator.isLaunchedByMPI(environment: ["PMIX_RANK": "0"]))
        #expect(MPICommunicator.isLaunchedByMPI(environment: ["PMI_RANK": "3"]))
        #expect(MPICommunicator.isLaunchedByMPI(environment: ["SLURM_PROCID": "0", "SLURM_STEP_ID": "1"]))
        #expect(!MPICommunicator.isLaunchedByMPI(environment: ["SLURM_PROCID": "0"]))
        #expect(!MPICommunicator.isLaunchedByMPI(environment: ["PATH": "/usr/bin", "OMPI_MCA_btl": "self"]))
        #expect(!MPICommunicator.isLaunchedByMPI(environment: [:]))
    }

    /// Variables of an mpirun that has ended (its session directory gone) are named before MPI_Init, which failed with
    /// OpenMPI's messages alone; a live launcher's directory, or none, says nothing.
    @Test func anEndedLaunchersVariablesAreNamed() {
        let gone = "/tmp/ompi.nowhere.\(getpid())/pid.1"
        #expect(MPICommunicator.staleLauncher(environment: ["PMIX_RANK": "0", "PMIX_SERVER_TMPDIR": gone])
                == "PMIX_SERVER_TMPDIR=\(gone) does not exist")
        #expect(MPICommunicator.staleLauncher(environment: ["PMIX_RANK": "0", "PMIX_SERVER_TMPDIR": NSTemporaryDirectory()]) == nil)
        #expect(MPICommunicator.staleLauncher(environment: ["PMIX_RANK": "0"]) == nil)
    }

    @Test func shippedMPISettingsYieldToTheUsers() {
        let key = "OMPI_MCA_coll_libnbc_iallreduce_algorithm"
        #expect(MPITuning.defaults.contains { $0.environmentKey == key && $0.value == "3" })
        #expect(MPITuning.missing(from: ["PATH": "/bin"]).map(\.environmentKey).contains(key))
        // Set by the user (or by mpirun --mca / -x): kept, whatever its value.
        #expect(!MPITuning.missing(from: [key: "1"]).map(\.environmentKey).contains(key))
        #expect(!MPITuning.missing(from: [key: "0"]).map(\.environmentKey).contains(key))
    }

    @Test func strippedEnvironmentIsNotLaunchedByMPI() {
        let env = ["OMPI_COMM_WORLD_SIZE": "2", "PMIX_RANK": "1", "PMI_RANK": "1", "PATH": "/bin"]
        #expect(!MPICommunicator.isLaunchedByMPI(environment: environmentWithoutMPIVariables(env)))
    }
}

// MARK: - Real ranks under mpirun

/// Serialized: two jobs of busy-polling ranks at once on a 2-core machine only slow each other down.
@Suite(.serialized) struct MPIRunTests {
    @Test(arguments: [2, 4])
    func everyRankPassesCommCheck(ranks: Int) throws {
        let result = try mpirun(ranks: ranks, [])
        #expect(!result.timedOut, "mpirun -n \(ranks) timed out:\n\(result.output)")
        #expect(result.status == 0, "mpirun -n \(ranks) exited \(result.status):\n\(result.output)")
        for rank in 0..<ranks {
            #expect(result.output.contains("CommCheck rank \(rank)/\(ranks): PASS"),
                    "rank \(rank) did not pass:\n\(result.output)")
        }
        #expect(!result.output.contains("FAIL"), "\(result.output)")
    }

    /// The last rank aborts while the others wait in a barrier that can never complete: only MPI_Abort
    /// tearing the whole job down lets mpirun return, and it must do so quickly, with the abort's code.
    @Test func abortTearsTheJobDown() throws {
        let result = try mpirun(ranks: 2, ["--abort"])
        #expect(!result.timedOut, "job survived abort:\n\(result.output)")
        #expect(result.status == 3, "mpirun exited \(result.status):\n\(result.output)")
        #expect(result.elapsed < 30, "teardown took \(result.elapsed) s")
        #expect(result.output.contains("CommCheck rank 1: aborting"))
        #expect(!result.output.contains("SURVIVED"))
    }

    func mpirun(ranks: Int, _ extra: [String]) throws -> RunResult {
        let arguments = ["--allow-run-as-root", "--oversubscribe", "-n", "\(ranks)", try commCheckExecutable().path]
        return try run(try executableOnPath("mpirun"), arguments + extra, timeout: 120)
    }
}

// MARK: - Running child processes

struct RunResult {
    var status: Int32
    var output: String
    var elapsed: TimeInterval
    var timedOut: Bool
}

struct HarnessError: Error, CustomStringConvertible {
    var description: String
}

/// Runs a child with the MPI launcher variables stripped (a child mpirun that inherits them exits 1
/// without a word), stdout and stderr into one temporary file; kills it after `timeout` seconds.
func run(_ executable: URL, _ arguments: [String], timeout: TimeInterval) throws -> RunResult {
    let outputURL = FileManager.default.temporaryDirectory
        .appendingPathComponent("commcheck-\(UUID().uuidString).log")
    guard FileManager.default.createFile(atPath: outputURL.path, contents: nil) else {
        throw HarnessError(description: "cannot create \(outputURL.path)")
    }
    defer { try? FileManager.default.removeItem(at: outputURL) }
    let output = try FileHandle(forWritingTo: outputURL)
    defer { try? output.close() }

    let process = Process()
    process.executableURL = executable
    process.arguments = arguments
    process.environment = environmentWithoutMPIVariables(ProcessInfo.processInfo.environment)
    process.standardInput = FileHandle.nullDevice
    process.standardOutput = output
    process.standardError = output
    let start = Date()
    try process.run()
    let deadline = start.addingTimeInterval(timeout)
    while process.isRunning && Date() < deadline {
        Thread.sleep(forTimeInterval: 0.02)
    }
    let timedOut = process.isRunning
    if timedOut { process.terminate() }
    process.waitUntilExit()
    let elapsed = Date().timeIntervalSince(start)
    let text = String(decoding: try Data(contentsOf: outputURL), as: UTF8.self)
    return RunResult(status: process.terminationStatus, output: text, elapsed: elapsed, timedOut: timedOut)
}

func executableOnPath(_ name: String) throws -> URL {
    let path = ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin"
    for directory in path.split(separator: ":").map(String.init) + ["/usr/bin"] {
        let candidate = URL(fileURLWithPath: directory).appendingPathComponent(name)
        if FileManager.default.isExecutableFile(atPath: candidate.path) { return candidate }
    }
    throw HarnessError(description: "\(name) not found on PATH \(path); install openmpi-bin")
}

/// The CommCheck built alongside this test binary. `swift test` builds every product into one
/// directory, which is where the test runner itself lives (Linux: `<pkg>PackageTests.xctest` is an
/// executable there; macOS: a bundle there). $COMMCHECK_PATH overrides; the package's own .build
/// (found from this file's path) is the last resort.
func commCheckExecutable() throws -> URL {
    var candidates: [URL] = []
    if let override = ProcessInfo.processInfo.environment["COMMCHECK_PATH"] {
        candidates.append(URL(fileURLWithPath: override))
    }
    if let runner = Bundle.main.executableURL {
        candidates.append(runner.resolvingSymlinksInPath().deletingLastPathComponent().appendingPathComponent("CommCheck"))
    }
    for bundle in Bundle.allBundles where bundle.bundleURL.pathExtension == "xctest" {
        candidates.append(bundle.bundleURL.deletingLastPathComponent().appendingPathComponent("CommCheck"))
    }
    candidates.append(Bundle.main.bundleURL.appendingPathComponent("CommCheck"))
    candidates.append(Bundle.main.bundleURL.deletingLastPathComponent().appendingPathComponent("CommCheck"))
    let packageRoot = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
    for configuration in ["debug", "release"] {
        candidates.append(packageRoot.appendingPathComponent(".build/\(configuration)/CommCheck"))
    }
    for candidate in candidates where FileManager.default.isExecutableFile(atPath: candidate.path) {
        return candidate
    }
    throw HarnessError(
        description: "CommCheck not found (build it with `swift build`); looked at:\n"
            + candidates.map(\.path).joined(separator: "\n"))
}
