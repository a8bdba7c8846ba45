import Coordinator
import Foundation
import Testing

/// Runs the built `bpworker` executable, alone or under a real `mpirun`, with a hard time limit: a test that
/// would hang fails instead.
struct Harness {
    struct Result {
        let status: Int32
        let output: String
        let seconds: Double
    }

    static let executable: URL = {
        var candidates: [URL] = []
        if let runner = Bundle.main.executableURL {
            candidates.append(runner.resolvingSymlinksInPath().deletingLastPathComponent().appendingPathComponent("bpworker"))
        }
        for bundle in Bundle.allBundles where bundle.bundleURL.pathExtension == "xctest" {
            candidates.append(bundle.bundleURL.deletingLastPathComponent().appendingPathComponent("bpworker"))
        }
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        candidates.append(root.appendingPathComponent(".build/debug/bpworker"))
        return candidates.first { FileManager.default.isExecutableFile(atPath: $0.path) } ?? candidates.last!
    }()

    static func mpirunPath() -> String {
        for dir in (ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin").split(separator: ":") {
            let path = "\(dir)/mpirun"
            if FileManager.default.isExecutableFile(atPath: path) { return path }
        }
        return "/usr/bin/mpirun"
    }

    /// `bpworker ARGS` as one local process.
    static func local(_ arguments: [String], environment: [String: String] = [:], timeout: Double = 120) throws -> Result {
        try run(executable.path, arguments, environment: environment, timeout: timeout)
    }

    /// `mpirun -n RANKS bpworker ARGS`; extra environment is exported to the ranks with -x.
    static func mpirun(_ ranks: Int, _ arguments: [String], environment: [String: String] = [:], timeout: Double = 120) throws -> Result {
        var launcher = ["--allow-run-as-root", "--oversubscribe", "-n", "\(ranks)"]
        for name in environment.keys.sorted() { launcher += ["-x", name] }
        return try run(mpirunPath(), launcher + [executable.path] + arguments, environment: environment, timeout: timeout)
    }

    /// A launched process the test can signal while it runs.
    final class Running {
        let process: Process
        let outputFile: URL
        let handle: FileHandle
        let start = Date()

        init(process: Process, outputFile: URL, handle: FileHandle) {
            self.process = process
            self.outputFile = outputFile
            self.handle = handle
        }

        var output: String { (try? String(contentsOf: outputFile, encoding: .utf8)) ?? "" }

        func signal(_ number: Int32) { kill(process.processIdentifier, number) }
        /// To the whole process group the process leads (`Process` starts each child as a group's leader), as a
        /// terminal's Ctrl-C or `timeout` sends it.
        func signalGroup(_ number: Int32) { kill(-process.processIdentifier, number) }

        /// Waits until `condition` holds on the output so far (or the process ends, or the time runs out).
        func waitFor(_ timeout: Double = 60, _ condition: (String) -> Bool) -> Bool {
            let deadline = Date().addingTimeInterval(timeout)
            while Date() < deadline {
                if condition(output) { return true }
                if !process.isRunning { return condition(output) }
                usleep(20_000)
            }
            return false
        }

        func wait(timeout: Double = 120) -> Result {
            while process.isRunning && Date().timeIntervalSince(start) < timeout { usleep(20_000) }
            if process.isRunning {
                process.terminate()
                kill(process.processIdentifier, SIGKILL)
                process.waitUntilExit()
                try? handle.close()
                Issue.record("timed out after \(timeout) s: \(process.executableURL?.path ?? "") \((process.arguments ?? []).joined(separator: " "))\n\(output)")
                return Result(status: -1, output: output, seconds: timeout)
            }
            process.waitUntilExit()
            try? handle.close()
            return Result(status: process.terminationStatus, output: output, seconds: Date().timeIntervalSince(start))
        }
    }

    static func start(_ program: String, _ arguments: [String], environment: [String: String]) throws -> Running {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: program)
        process.arguments = arguments
        process.environment = environmentWithoutMPIVariables(ProcessInfo.processInfo.environment).merging(environment) { $1 }
        let outputFile = TemporaryFiles.path("bpworker-").appendingPathExtension("log")
        _ = FileManager.default.createFile(atPath: outputFile.path, contents: nil)
        let handle = try FileHandle(forWritingTo: outputFile)
        process.standardOutput = handle
        process.standardError = handle
        process.standardInput = FileHandle.nullDevice
        // The child inherits this thread's signal mask, and the test runner's threads block some signals: a
        // launcher started with SIGTERM or SIGUSR1 blocked would never see the signals these tests send.
        var none = sigset_t()
        sigemptyset(&none)
        pthread_sigmask(SIG_SETMASK, &none, nil)
        try process.run()
        return Running(process: process, outputFile: outputFile, handle: handle)
    }

    /// `mpirun` started in the background; `launcherOptions` go before `-n`.
    static func startMPI(_ ranks: Int, _ arguments: [String], environment: [String: String] = [:],
                         launcherOptions: [String] = []) throws -> Running {
        var launcher = ["--allow-run-as-root", "--oversubscribe"] + launcherOptions + ["-n", "\(ranks)"]
        for name in environment.keys.sorted() { launcher += ["-x", name] }
        return try start(mpirunPath(), launcher + [executable.path] + arguments, environment: environment)
    }

    static func run(_ program: String, _ arguments: [String], environment: [String: String], timeout: Double) throws -> Result {
        let running = try start(program, arguments, environment: environment)
        defer { try? FileManager.default.removeItem(at: running.outputFile) }
        return running.wait(timeout: timeout)
    }

    /// `startMPI` with every step slowed by 40 ms (BPWORKER_TEST_STEP_SLEEP_MS), so that the test can act on the job
    /// while it runs.
    static func startSlowed(_ ranks: Int, _ arguments: [String], launcherOptions: [String] = []) throws -> Running {
        try startMPI(ranks, arguments, environment: ["BPWORKER_TEST_STEP_SLEEP_MS": "40"], launcherOptions: launcherOptions)
    }

    /// `bpworker train --resume` of the run in `runDirectory`, from its last checkpoint, on `ranks` ranks.
    static func resume(_ runDirectory: String, ranks: Int = 2) throws -> Result {
        try mpirun(ranks, ["train", "--run-dir", runDirectory, "--resume", "--progress", "plain"])
    }
}

extension Harness.Running {
    /// Sends SIGUSR1 (stop at the end of this step, with a checkpoint) once the output shows `marker`, and waits for
    /// the job to end.
    func stop(after marker: String, sourceLocation: SourceLocation = #_sourceLocation) -> Harness.Result {
        #expect(waitFor { $0.contains(marker) }, "'\(marker)' never came", sourceLocation: sourceLocation)
        signal(SIGUSR1)
        return wait(timeout: 60)
    }
}

/// The file name of the run's newest checkpoint, which `checkpoints/latest` holds.
func latestCheckpoint(_ runDirectory: String) throws -> String {
    try String(contentsOfFile: runDirectory + "/checkpoints/latest", encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines)
}

/// A small synthetic classification data set written as IDX files (the format bpworker reads by default).
struct SyntheticData {
    let directory: URL
    let samples: Int
    let features: Int
    let classes: Int

    /// - Parameter imageShape: write the samples as images of this shape ([H, W] or [C, H, W]), `features` values each.
    init(samples: Int, features: Int = 12, classes: Int = 3, seed: UInt64 = 1, labelOverride: UInt8? = nil,
         imageShape: [Int]? = nil) throws {
        directory = TemporaryFiles.path("bpworker-data-")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        self.samples = samples
        self.features = features
        self.classes = classes
        var state = seed &* 0x9E37_79B9_7F4A_7C15 | 1
        func next() -> UInt64 {
            state ^= state << 13; state ^= state >> 7; state ^= state << 17
            return state
        }
        var pixels: [UInt8] = []
        var labels: [UInt8] = []
        for _ in 0..<samples {
            let label = UInt8(next() % UInt64(classes))
            labels.append(labelOverride ?? label)
            // Class-dependent features, so a model can learn something.
            for f in 0..<features { pixels.append(UInt8((Int(next() % 128) + (f % classes == Int(label) ? 127 : 0)))) }
        }
        for split in ["train", "test"] {
            try Self.idx(shape: [samples] + (imageShape ?? [features]), bytes: pixels).write(to: directory.appendingPathComponent("\(split)-x.idx"))
            try Self.idx(shape: [samples], bytes: labels).write(to: directory.appendingPathComponent("\(split)-y.idx"))
        }
    }

    static func idx(shape: [Int], bytes: [UInt8]) -> Data {
        var data = Data([0, 0, 0x08, UInt8(shape.count)])
        for d in shape { withUnsafeBytes(of: UInt32(d).bigEndian) { data.append(contentsOf: $0) } }
        return data + Data(bytes)
    }

    /// `--set` arguments pointing bpworker at these files.
    var arguments: [String] {
        ["train-x", "train-y", "test-x", "test-y"].enumerated().flatMap { i, name -> [String] in
            let key = ["data.train_features", "data.train_labels", "data.test_features", "data.test_labels"][i]
            return ["--set", "\(key)=\(directory.appendingPathComponent(name + ".idx").path)"]
        }
    }

    func remove() { try? FileManager.default.removeItem(at: directory) }
}

func temporaryRunDirectory() -> String {
    TemporaryFiles.path("bpworker-run-").path
}

/// A directory for what tests write, removed when its scope ends, passed or failed: one per test
/// (`.temporaryFiles`, for every WorkerTests suite that uses the helpers) or one for a whole suite (`.suiteFiles`,
/// for what its tests share, such as a model trained once).
struct TemporaryFiles: SuiteTrait, TestTrait, TestScoping {
    enum Scope { case test, suite }
    let scope: Scope

    /// The running test's and suite's directories (task-local: tests running in parallel each see their own).
    @TaskLocal static var directory: URL?
    @TaskLocal static var suiteDirectory: URL?

    /// Per test: applies to each test of the suite (each case of a parameterized one); per suite: once around it.
    var isRecursive: Bool { scope == .test }

    func provideScope(for test: Test, testCase: Test.Case?, performing function: @Sendable () async throws -> Void) async throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("bpworker-\(scope)-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: directory) }
        switch scope {
        case .test: try await Self.$directory.withValue(directory, operation: function)
        case .suite: try await Self.$suiteDirectory.withValue(directory, operation: function)
        }
    }

    /// A new, unused path in the running test's directory.
    static func path(_ prefix: String) -> URL { path(prefix, in: directory, trait: ".temporaryFiles") }

    /// A new, unused path in the running suite's directory.
    static func suitePath(_ prefix: String) -> URL { path(prefix, in: suiteDirectory, trait: ".suiteFiles") }

    private static func path(_ prefix: String, in directory: URL?, trait: String) -> URL {
        guard let directory else {
            Issue.record("no directory: add \(trait) to this test's @Suite, so that what the test writes is removed")
            return FileManager.default.temporaryDirectory.appendingPathComponent(prefix + UUID().uuidString)
        }
        return directory.appendingPathComponent(prefix + UUID().uuidString)
    }
}

extension Trait where Self == TemporaryFiles {
    static var temporaryFiles: Self { Self(scope: .test) }
    static var suiteFiles: Self { Self(scope: .suite) }
}

func occurrences(of needle: String, in haystack: String) -> Int {
    haystack.components(separatedBy: needle).count - 1
}

/// Asserts the watchdog's stall report, in one place for every test that provokes a stall: `output` holds the line
/// `stall: rank RANK has waited SECONDS s in the PHASE of step STEP (watchdog.timeout_seconds=TIMEOUT)`, with `phase`
/// as the report names it; `timeout`, when given, must be the one named; `notArrived`, when given, must begin the
/// report's account of the ranks that did not arrive (`not arrived: rank 1 (computing at step 9`).
func expectStallReport(_ output: String, rank: Int, phase: String, step: Int, timeout: Double? = nil,
                       notArrived: String? = nil, sourceLocation: SourceLocation = #_sourceLocation) {
    let opening = "stall: rank \(rank) has waited "
    guard let start = output.range(of: opening) else {
        Issue.record("no stall report of rank \(rank) in:\n\(output)", sourceLocation: sourceLocation)
        return
    }
    let line = output[start.upperBound...].prefix { $0 != "\n" }
    let waited = line.prefix { $0.isNumber || $0 == "." }
    #expect(Double(waited) != nil, "no waiting time in: \(opening)\(line)", sourceLocation: sourceLocation)
    let place = " s in the \(phase) of step \(step) (watchdog.timeout_seconds=" + (timeout.map { "\($0))" } ?? "")
    #expect(line.dropFirst(waited.count).hasPrefix(place), "expected '\(place)' in: \(opening)\(line)", sourceLocation: sourceLocation)
    if let notArrived {
        #expect(output.contains("not arrived: " + notArrived), "\(output)", sourceLocation: sourceLocation)
    }
}

/// A job in which one rank stalled: it failed, within seconds of the watchdog's timeout rather than hanging, with
/// the stall report (`expectStallReport`).
func expectStalled(_ result: Harness.Result, rank: Int, phase: String, step: Int, notArrived: String? = nil,
                   sourceLocation: SourceLocation = #_sourceLocation) {
    #expect(result.status != 0, "\(result.output)", sourceLocation: sourceLocation)
    #expect(result.seconds < 30, sourceLocation: sourceLocation)
    expectStallReport(result.output, rank: rank, phase: phase, step: step, notArrived: notArrived, sourceLocation: sourceLocation)
}
