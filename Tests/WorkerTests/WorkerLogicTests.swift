import Engine
import ArgumentParser
import Foundation
import Testing
@testable import Worker

/// The Worker's decisions, called directly: no MPI, no process.
@Suite("Worker logic", .temporaryFiles)
struct WorkerLogicTests {
    // MARK: - The terminal

    /// What a `Terminal` wrote, stream by stream, in order.
    final class CapturedOutput: @unchecked Sendable {
        private let lock = NSLock()
        private var parts: [String] = []
        var written: [String] { lock.withLock { parts } }

        func append(_ stream: Terminal.Stream, _ data: Data) {
            let text = String(decoding: data, as: UTF8.self)
            lock.withLock { parts.append((stream == .standardOutput ? "out " : "err ") + text) }
        }
    }

    /// The progress line is redrawn in place and stays open; anything else, on either stream, first ends it, and
    /// ending it twice writes one newline.
    // MARK: - The processor

    /// A processor without AVX2 or FMA is refused with the features it lacks, before any Engine code runs (which is
    /// compiled for them); this machine, which runs the whole suite, has them.
    @Test func aProcessorWithoutAVX2IsRefusedWithTheReason() throws {
        let older = "processor\t: 0\nflags\t\t: fpu sse sse2 ssse3 sse4_1 sse4_2 avx popcnt\nbogomips\t: 4000\n"
        let problem = try #require(ProcessorCheck.problem(cpuinfo: older))
        #expect(problem.contains("lacks avx2, fma, bmi1, bmi2, f16c, movbe"), "\(problem)")
        let full = "flags\t\t: fpu sse2 avx avx2 fma bmi1 bmi2 f16c movbe avx512f\n"
        #expect(ProcessorCheck.problem(cpuinfo: full) == nil)
        // No flags line (not x86 Linux as we know it): nothing to say.
        #expect(ProcessorCheck.problem(cpuinfo: "processor : 0\n") == nil)
        #if arch(x86_64) && os(Linux)
        let here = try String(contentsOfFile: "/proc/cpuinfo", encoding: .utf8)
        #expect(ProcessorCheck.problem(cpuinfo: here) == nil)
        #endif
    }

    /// The kernel's CPU lists, as /proc/self/status writes Cpus_allowed_list, counted; anything else is not one.
    @Test func allowedCoresCountTheKernelsCPUList() {
        #expect(AllowedCores.count(list: " 0") == 1)
        #expect(AllowedCores.count(list: "0-1") == 2)
        #expect(AllowedCores.count(list: "0,2-3,8\t") == 4)
        for bad in ["", "a", "3-1", "1-", "0-1-2", ","] { #expect(AllowedCores.count(list: Substring(bad)) == nil, "\(bad)") }
        #expect(AllowedCores.count() >= 1)
    }

    @Test func theProgressLineIsEndedBeforeAnyOtherOutput() {
        let captured = CapturedOutput()
        let terminal = Terminal { captured.append($0, $1) }
        let redraw = "\r\u{1B}[K"
        terminal.write("start\n", to: .standardOutput)
        terminal.redraw("step 1 ETA 7s")
        terminal.redraw("step 2 ETA 6s")
        terminal.write("checkpoint: runs/x\n", to: .standardOutput)
        terminal.write("warning: y\n", to: .standardError)
        terminal.redraw("step 3 ETA 5s")
        terminal.write("error: z\n", to: .standardError)
        terminal.redraw("step 4 ETA 4s")
        terminal.endLine()
        terminal.endLine()
        #expect(captured.written == [
            "out start\n", "out \(redraw)step 1 ETA 7s", "out \(redraw)step 2 ETA 6s", "out \n", "out checkpoint: runs/x\n",
            "err warning: y\n", "out \(redraw)step 3 ETA 5s", "out \n", "err error: z\n", "out \(redraw)step 4 ETA 4s", "out \n",
        ])
    }

    // MARK: - Resume arithmetic

    @Test func sameShapeContinuesExactly() {
        let saved = TrainingPosition(globalStep: 17, epoch: 1, epochStep: 5, skippedSteps: 1, worldSize: 2, batchSize: 8)
        let (next, sameShape) = saved.continued(worldSize: 2, batchSize: 8, stepsPerEpoch: 12)
        #expect(sameShape)
        #expect(next == saved)
    }

    /// The same shape on a training set of another size (64 steps per epoch where the checkpoint's had 32): the step
    /// counts in this set's epochs, or the run ended 64 steps short of its schedule and called itself finished.
    @Test func anotherTrainingSetOfTheSameShapeCountsItsOwnSteps() {
        let saved = TrainingPosition(globalStep: 80, epoch: 2, epochStep: 16, skippedSteps: 3, worldSize: 1, batchSize: 64)
        let (next, sameShape) = saved.continued(worldSize: 1, batchSize: 64, stepsPerEpoch: 64)
        #expect(sameShape)
        #expect(next.globalStep == 2 * 64 + 16 && next.epoch == 2 && next.epochStep == 16 && next.skippedSteps == 3)
        // Fewer steps per epoch: the step moves back, and the epoch's steps done are capped at the epoch's.
        let (fewer, _) = saved.continued(worldSize: 1, batchSize: 64, stepsPerEpoch: 10)
        #expect(fewer.globalStep == 2 * 10 + 10 && fewer.epochStep == 10)
    }

    @Test func anotherWorldSizeKeepsTheSamplesSeen() {
        // 2 ranks x 8 = 16 per step; 5 steps into epoch 1 = 80 samples seen. On 1 rank x 8: 10 steps of 8 = 80.
        let saved = TrainingPosition(globalStep: 17, epoch: 1, epochStep: 5, worldSize: 2, batchSize: 8)
        let (next, sameShape) = saved.continued(worldSize: 1, batchSize: 8, stepsPerEpoch: 25)
        #expect(!sameShape)
        #expect(next.epoch == 1)
        #expect(next.epochStep == 10)
        #expect(next.globalStep == 25 + 10)
        #expect(next.worldSize == 1 && next.batchSize == 8)
    }

    @Test func aLargerGlobalBatchRoundsDownSoNoSampleIsSkipped() {
        // 80 samples seen; 4 ranks x 8 = 32 per step: 2 whole steps (64 samples), the next 16 are seen again.
        let saved = TrainingPosition(globalStep: 5, epoch: 0, epochStep: 5, worldSize: 2, batchSize: 8)
        let (next, _) = saved.continued(worldSize: 4, batchSize: 8, stepsPerEpoch: 6)
        #expect(next.epochStep == 2)
        #expect(next.globalStep == 2)
        #expect(next.epochStep * 32 <= 80 && 80 - next.epochStep * 32 < 32)
    }

    /// A stop after an epoch's last step saves the epoch with all its steps done: the resume still owes it its end
    /// (the evaluation and the target accuracy check), so the position stays in it.
    @Test func anEpochWhoseStepsAreDoneStaysForItsEnd() {
        let saved = TrainingPosition(globalStep: 12, epoch: 0, epochStep: 12, worldSize: 2, batchSize: 8)
        let (same, _) = saved.continued(worldSize: 2, batchSize: 8, stepsPerEpoch: 12)
        #expect(same == saved)
        // 192 samples seen; 1 rank x 16 has 12 steps per epoch: the epoch's steps are done there too.
        let (other, _) = saved.continued(worldSize: 1, batchSize: 16, stepsPerEpoch: 12)
        #expect(other.epoch == 0 && other.epochStep == 12 && other.globalStep == 12)
    }

    // MARK: - Run directories

    func makeRun(status: RunStatus.State?, step: Int = 0, checkpoints: [String] = [], model: Bool = false) throws -> String {
        let dir = TemporaryFiles.path("bpworker-rundir-").path
        try FileManager.default.createDirectory(atPath: dir + "/checkpoints", withIntermediateDirectories: true)
        for name in checkpoints { _ = FileManager.default.createFile(atPath: dir + "/checkpoints/" + name, contents: Data("x".utf8)) }
        if let last = checkpoints.last {
            try Data((last + "\n").utf8).write(to: URL(fileURLWithPath: dir + "/checkpoints/latest"))
        }
        if let status {
            RunStatus(state: status, step: step, totalSteps: 100, epoch: 0, epochs: 1, worldSize: 2, updated: RunStatus.now)
                .write(to: dir)
        }
        if model { _ = FileManager.default.createFile(atPath: dir + "/model.safetensors", contents: Data("m".utf8)) }
        return dir
    }

    @Test func anEmptyOrMissingDirectoryTakesANewRun() throws {
        let missing = RunDirectory.inspect("/nonexistent/run-\(UUID().uuidString)")
        #expect(!missing.holdsRun)
        #expect(throws: Never.self) { try missing.checkStart(.fresh) }
        let dir = try makeRun(status: nil)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        #expect(!RunDirectory.inspect(dir).holdsRun)
    }

    @Test func aRunThatFailedBeforeItsFirstStepMayBeStartedOver() throws {
        let dir = try makeRun(status: .failed, step: 0)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        #expect(!RunDirectory.inspect(dir).holdsRun)
        let later = try makeRun(status: .failed, step: 3)
        defer { try? FileManager.default.removeItem(atPath: later) }
        #expect(RunDirectory.inspect(later).holdsRun)
    }

    @Test func aFinishedRunIsRefusedWithWhatIsThereAndWhatToDo() throws {
        let dir = try makeRun(status: .finished, step: 3510, checkpoints: ["step-00003000.safetensors", "step-00003510.safetensors"])
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let run = RunDirectory.inspect(dir)
        #expect(run.holdsRun)
        #expect(throws: RunDirectoryError(description: "\(dir) already holds a run (finished, last checkpoint step-00003510); "
            + "continue it with --resume, start again with --overwrite, or choose another --run-dir")) {
            try run.checkStart(.fresh)
        }
        #expect(throws: Never.self) { try run.checkStart(.resume) }
        #expect(throws: Never.self) { try run.checkStart(.overwrite) }
    }

    @Test func checkpointsOrAModelAloneHoldARun() throws {
        let checkpoints = try makeRun(status: nil, checkpoints: ["step-00000007.safetensors"])
        let model = try makeRun(status: nil, model: true)
        let corrupt = try makeRun(status: nil)
        defer { for d in [checkpoints, model, corrupt] { try? FileManager.default.removeItem(atPath: d) } }
        try Data("{not json".utf8).write(to: URL(fileURLWithPath: corrupt + "/status.json"))
        #expect(RunDirectory.inspect(checkpoints).holdsRun)
        #expect(RunDirectory.inspect(model).holdsRun)
        #expect(RunDirectory.inspect(model).summary == "model.safetensors, no checkpoint")
        #expect(RunDirectory.inspect(corrupt).holdsRun)
        #expect(RunDirectory.inspect(corrupt).summary == "unreadable status.json")
    }

    @Test func overwriteRemovesTheRunsFilesAndNothingElse() throws {
        let dir = try makeRun(status: .stopped, step: 7, checkpoints: ["step-00000005.safetensors", "step-00000007.safetensors"], model: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try FileManager.default.createDirectory(atPath: dir + "/tensorboard", withIntermediateDirectories: true)
        for name in ["metrics.jsonl", "gradcheck.json", "config.yaml", "notes.txt", "checkpoints/mine.txt", "checkpoints/.step-00000009.safetensors.42.tmp",
                     "report.html", "tensorboard/events.out.tfevents.1.host.7.0", "tensorboard/mine.txt", ".model.safetensors.4242.tmp",
                     ".notes.txt.1.tmp"] {
            _ = FileManager.default.createFile(atPath: dir + "/" + name, contents: Data("u".utf8))
        }
        try FileManager.default.createDirectory(atPath: dir + "/heartbeat", withIntermediateDirectories: true)
        _ = FileManager.default.createFile(atPath: dir + "/heartbeat/rank-0.json", contents: Data("{}".utf8))
        let removed = try RunDirectory.inspect(dir).removePreviousRun()
        #expect(removed == ["2 checkpoints", "status.json", "metrics.jsonl", "model.safetensors", "gradcheck.json", "report.html",
                            ".model.safetensors.4242.tmp", "1 TensorBoard event file"])
        let left = try FileManager.default.subpathsOfDirectory(atPath: dir).sorted()
        #expect(left == [".notes.txt.1.tmp", "checkpoints", "checkpoints/mine.txt", "config.yaml", "notes.txt", "tensorboard",
                         "tensorboard/mine.txt"])
        #expect(!RunDirectory.inspect(dir).holdsRun)
    }

    // MARK: - Status

    @Test func markFailedEndsARunningStatusAndKeepsTheRest() throws {
        let dir = try makeRun(status: .training, step: 42)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        RunStatus.markFailed(dir, message: "rank 1: stall")
        let status = try RunStatus.read(dir)
        #expect(status.state == .failed)
        #expect(status.step == 42)
        #expect(status.message == "rank 1: stall")
    }

    @Test func markFailedLeavesAnEndedRunAlone() throws {
        for state in [RunStatus.State.finished, .stopped, .failed] {
            let dir = try makeRun(status: state, step: 9)
            defer { try? FileManager.default.removeItem(atPath: dir) }
            RunStatus.markFailed(dir, message: "late abort")
            let status = try RunStatus.read(dir)
            #expect(status.state == state)
            #expect(status.message == nil)
        }
    }

    @Test func outcomesCarryTheirStateAndExitCode() {
        #expect(RunOutcome.finished == RunOutcome(state: .finished, message: nil, exitCode: 0))
        #expect(RunOutcome.stopped("stop requested by SIGUSR1").exitCode == 0)
        #expect(RunOutcome.stopped("x").state == .stopped)
        #expect(RunOutcome.failed("replicas diverged").exitCode == 1)
        #expect(RunOutcome.failed("x").state == .failed)
    }

    // MARK: - Configuration

    @Test func overridesApplyOverTheFileAndTypesAreChecked() throws {
        let file = TemporaryFiles.path("bpworker-config-").appendingPathExtension("yaml")
        defer { try? FileManager.default.removeItem(at: file) }
        try Data("training:\n  epochs: 3\n  batch_size: 32\noptimizer:\n  name: adam\n".utf8).write(to: file)
        let config = try Configuration.load(file: file.path, overrides: ["training.epochs=5", "model.hidden=[64, 32]"])
        #expect(config.epochs == 5)
        #expect(config.batchSize == 32)
        #expect(config.optimizer == .adam)
        #expect(config.hidden == [64, 32])
        #expect(throws: ConfigError.self) { try Configuration.load(file: nil, overrides: ["training.epochs=three"]) }
        #expect(throws: ConfigError.self) { try Configuration.load(file: nil, overrides: ["training.epoch=3"]) }
    }

    @Test func theResolvedYAMLReadsBackAsTheSameConfiguration() throws {
        var config = Configuration()
        config.layers = ["linear 64", "gelu", "dropout 0.25"]
        config.learningRate = 0.125
        config.optimizer = .adamw
        config.trainFeatures = "/data/with: colon.npy"
        config.augmentCropPadding = 3
        config.augmentFlip = true
        config.augmentErase = 0.25
        config.labelSmoothing = 0.1
        let file = TemporaryFiles.path("bpworker-config-").appendingPathExtension("yaml")
        defer { try? FileManager.default.removeItem(at: file) }
        try Data(config.yaml.utf8).write(to: file)
        #expect(try Configuration.load(file: file.path, overrides: []) == config)
        #expect(config.yaml.contains("  remainder: auto\n  augment:\n    crop_padding: 3\n    flip: true\n    erase: 0.25\nmodel:\n"),
                "\(config.yaml)")
        #expect(config.yaml.contains("  label_smoothing: 0.1\n"), "\(config.yaml)")
    }

    /// `data.augment` reads as a nested mapping in a file, as dotted keys, and as a mapping given to --set.
    @Test func augmentationReadsAsAMappingOrAsDottedKeys() throws {
        let file = TemporaryFiles.path("bpworker-config-").appendingPathExtension("yaml")
        defer { try? FileManager.default.removeItem(at: file) }
        try Data("data:\n  augment: {crop_padding: 2, flip: true}\n".utf8).write(to: file)
        let fromFile = try Configuration.load(file: file.path, overrides: [])
        #expect(fromFile.augmentCropPadding == 2 && fromFile.augmentFlip)
        let dotted = try Configuration.load(file: nil, overrides: ["data.augment.crop_padding=2", "data.augment.flip=true"])
        let mapping = try Configuration.load(file: nil, overrides: ["data.augment={crop_padding: 2, flip: true}"])
        #expect(dotted == fromFile && mapping == fromFile)
        #expect(try Configuration().augmentation(sampleShape: [28, 28]) == nil, "off by default")
        let augmentation = try #require(try fromFile.augmentation(sampleShape: [28, 28]))
        #expect(augmentation.cropPadding == 2 && augmentation.flip && augmentation.channels == 1 && augmentation.height == 28)
        #expect(throws: ConfigError.self) { try Configuration.load(file: nil, overrides: ["data.augment.flip=2"]) }
    }

    @Test func impossibleSettingsNameTheirKey() throws {
        func message(_ overrides: [String]) -> String {
            do { try Configuration.load(file: nil, overrides: overrides).validateSettings() } catch { return "\(error)" }
            return "no error"
        }
        #expect(message(["training.batch_size=0"]).hasPrefix("training.batch_size must be at least 1"))
        #expect(message(["checkpoint.keep=0"]).hasPrefix("checkpoint.keep must be at least 1"))
        #expect(message(["checkpoint.every_seconds=-1"]).hasPrefix("checkpoint.every_seconds must be >= 0"))
        #expect(message(["checkpoint.every_seconds=.inf"]).hasPrefix("checkpoint.every_seconds must be >= 0"))
        #expect(message(["model.dropout=1"]).hasPrefix("model.dropout must be in [0, 1)"))
        #expect(message(["optimizer.momentum=1.5"]).hasPrefix("optimizer.momentum must be in [0, 1), got 1.5"))
        #expect(message(["optimizer.momentum=.nan"]).hasPrefix("optimizer.momentum must be in [0, 1), got nan"))
        #expect(message(["optimizer.momentum=0"]).hasPrefix("optimizer.nesterov (on by default) needs optimizer.momentum > 0"))
        #expect(message(["optimizer.momentum=0", "optimizer.nesterov=false"]) == "no error")
        #expect(message(["optimizer.lr=.nan"]).hasPrefix("optimizer.lr must be positive and finite, got nan"))
        #expect(message(["optimizer.name=adam", "optimizer.eps=.inf"]).hasPrefix("optimizer.eps must be positive and finite, got inf"))
        #expect(message(["optimizer.name=adam", "optimizer.beta2=1"]).hasPrefix("optimizer.beta2 must be in [0, 1), got 1.0"))
        #expect(message(["optimizer.clip_norm=.inf"]).hasPrefix("optimizer.clip_norm must be finite (0 = off), got inf"))
        // Accepted in float64, they are infinity, zero or 1 in the float32 training runs in.
        #expect(message(["optimizer.lr=1e300"]) == "optimizer.lr=1e+300 is inf in float32, the precision training runs in")
        #expect(message(["optimizer.lr=1e-50"]) == "optimizer.lr=1e-50 is 0.0 in float32, the precision training runs in")
        #expect(message(["optimizer.name=adam", "optimizer.eps=1e-300"])
                == "optimizer.eps=1e-300 is 0.0 in float32, the precision training runs in")
        #expect(message(["optimizer.weight_decay=1e39"])
                == "optimizer.weight_decay=1e+39 is inf in float32, the precision training runs in")
        #expect(message(["optimizer.momentum=0.99999999"])
                == "optimizer.momentum=0.99999999 rounds to 1 in float32, the precision training runs in")
        #expect(message(["optimizer.name=adam", "optimizer.beta1=0.99999999", "optimizer.eps=1e-45"]) == "no error")
        #expect(message(["watchdog.timeout_seconds=.inf"]).hasPrefix("watchdog.timeout_seconds must be finite (0 = off)"))
        #expect(message([]) == "no error")
    }

    /// A configuration file that cannot be used says why: every case read "cannot read the configuration file",
    /// and a Latin-1 byte in a comment gave no hint that the encoding was the problem.
    @Test func anUnusableConfigurationFileSaysWhy() throws {
        let latin1 = TemporaryFiles.path("latin1-").appendingPathExtension("yaml")
        try Data("seed: 3\n# caf".utf8 + [0xE9] + Data("\n".utf8)).write(to: latin1)
        let directory = TemporaryFiles.path("config-dir-")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        for (file, expected) in [(latin1.path, "\(latin1.path):2: not UTF-8 text"),
                                 (directory.path + "/missing.yaml", "\(directory.path)/missing.yaml: no such configuration file"),
                                 (directory.path, "\(directory.path): a directory, not a configuration file")] {
            do {
                _ = try Configuration.load(file: file, overrides: [])
                Issue.record("no error for \(file)")
            } catch {
                #expect("\(error)".hasPrefix(expected), "\(error)")
            }
        }
    }

    /// One key written twice in a file in two spellings: the later one won without a word.
    @Test func aKeyGivenTwiceInAFileIsRefused() throws {
        let file = TemporaryFiles.path("twice-").appendingPathExtension("yaml")
        try Data("optimizer.lr: 0.1\nseed: 3\noptimizer:\n  lr: 0.2\n".utf8).write(to: file)
        defer { try? FileManager.default.removeItem(at: file) }
        do {
            _ = try Configuration.load(file: file.path, overrides: [])
            Issue.record("a key given twice was taken")
        } catch {
            #expect("\(error)" == "\(file.path):4: optimizer.lr is given twice (also at line 1)")
        }
        // --set overrides a key of the file, as it always did.
        try Data("optimizer:\n  lr: 0.2\n".utf8).write(to: file)
        #expect(try Configuration.load(file: file.path, overrides: ["optimizer.lr=0.3"]).learningRate == 0.3)
    }

    @Test func layerListsBuildTheModelTheyDescribe() throws {
        var config = Configuration()
        config.layers = ["linear 32", "leaky_relu 0.2", "dropout 0.1", "linear 16", "tanh"]
        let spec = try config.modelSpec(sampleShape: [10], classes: 3)
        #expect(spec.layers == [.linear(inputs: 10, outputs: 32), .leakyReLU(slope: 0.2), .dropout(probability: 0.1),
                                .linear(inputs: 32, outputs: 16), .tanh, .linear(inputs: 16, outputs: 3)])
        config.layers = ["linear 32", "swish"]
        #expect(throws: ConfigError.self) { try config.modelSpec(sampleShape: [10], classes: 3) }
    }

    /// The grammar table in docs/convolutional-networks.md has a row for every kind of layer, in its syntax.
    @Test func everyLayerKindIsInTheGrammarTable() throws {
        let repository = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent()
        let table = try String(contentsOf: repository.appendingPathComponent("docs/convolutional-networks.md"), encoding: .utf8)
        for kind in LayerKinds.all {
            let listed = table.contains("`\(kind.syntax)`")
            #expect(listed, "docs/convolutional-networks.md lists no `\(kind.syntax)`")
        }
    }

    /// Every BPWORKER_TEST_* switch is parsed in `TestHooks.fromEnvironment`: per-rank values only for their rank,
    /// a gradient fault that does not parse is an error, and an empty environment switches nothing on.
    @Test func testSwitchesAreParsedInOnePlace() throws {
        let environment = ["BPWORKER_TEST_CLOCK_SKEW": "1:5", "BPWORKER_TEST_CHECKPOINT_CRASH": "21",
                           "BPWORKER_TEST_GRADIENT_FAULT": "scaled:0.weight:1.5", "BPWORKER_TEST_NAN": "1:7:loss"]
        let rankOne = try TestHooks.fromEnvironment(environment, rank: 1)
        #expect(rankOne.clockSkewSeconds == 5 && rankOne.checkpointCrashStep == 21)
        #expect(rankOne.gradientFault == .scaled(tensor: "0.weight", factor: 1.5))
        #expect(rankOne.nanStep == 7 && rankOne.nanLossOnly)
        let rankZero = try TestHooks.fromEnvironment(environment, rank: 0)
        #expect(rankZero.clockSkewSeconds == 0 && rankZero.nanStep == nil && rankZero.checkpointCrashStep == 21)
        #expect(try TestHooks.fromEnvironment(["BPWORKER_TEST_GRADIENT_FAULT": "localsums:1.weight"], rank: 0).gradientFault
            == .batchNormLocalSums(tensor: "1.weight"))
        #expect(throws: TestHookError.self) { try TestHooks.fromEnvironment(["BPWORKER_TEST_GRADIENT_FAULT": "scaled:x"], rank: 0) }
        let none = try TestHooks.fromEnvironment([:], rank: 0)
        #expect(none.gradientFault == nil && none.checkpointCrashStep == nil && none.clockSkewSeconds == 0 && none.nanStep == nil)
    }
    /// `--help` prints each subcommand's discussion wrapped at 80 columns: a prose line longer than that, broken by
    /// hand where the next line carries on, came out as a long line, its wrapped end and a short line, mid-sentence
    /// (`eval --help`, `predict --help`). So a line of a discussion is at most 80 columns or ends its paragraph (the
    /// next is empty, an indented example, or there is none); paragraphs carry on with a trailing backslash instead.
    @Test func helpTextsWrapWhereTheirSentencesEnd() {
        let commands: [any ParsableCommand.Type] = [BPWorker.self, Train.self, Gradcheck.self, Eval.self, Predict.self,
                                                    Verify.self, Status.self, Report.self, Keys.self]
        for command in commands {
            let lines = command.configuration.discussion.components(separatedBy: "\n")
            for (i, line) in lines.enumerated() where line.count > 80 {
                let next = i + 1 < lines.count ? lines[i + 1] : ""
                #expect(next.isEmpty || next.hasPrefix("  "), "\(command): '\(line)' is wrapped and carries on in '\(next)'")
            }
        }
    }

    /// `bpworker status` shows the epoch from the steps done: a run that ended on its target after epoch 1 of 5 said
    /// "epoch 2/5" (status.json's `epoch` is the next one after an evaluation), and a damaged file whose epoch is
    /// Int.max crashed it (`epoch + 1` overflowed).
    @Test func statusShowsTheEpochOfItsStepsAndSurvivesAnyNumbers() throws {
        func status(step: Int, totalSteps: Int, epoch: Int, epochs: Int) throws -> RunStatus {
            let json = #"{"state":"finished","step":\#(step),"totalSteps":\#(totalSteps),"epoch":\#(epoch),"epochs":\#(epochs),"worldSize":1,"updated":"x"}"#
            return try JSONDecoder().decode(RunStatus.self, from: Data(json.utf8))
        }
        #expect(try status(step: 12, totalSteps: 60, epoch: 1, epochs: 5).shownEpoch == 1)
        #expect(try status(step: 13, totalSteps: 60, epoch: 1, epochs: 5).shownEpoch == 2)
        #expect(try status(step: 0, totalSteps: 60, epoch: 0, epochs: 5).shownEpoch == 1)
        #expect(try status(step: 60, totalSteps: 60, epoch: 5, epochs: 5).text.contains("step 60/60, epoch 5/5, 1 rank"))
        #expect(try status(step: 1, totalSteps: 2, epoch: Int.max, epochs: 1).text.contains("epoch 1/1"))
        #expect(try status(step: Int.max, totalSteps: 2, epoch: Int.max, epochs: Int.max).shownEpoch >= 1)
        #expect(try status(step: -5, totalSteps: 0, epoch: Int.min, epochs: 0).shownEpoch == 1)
    }

    /// An empty mapping given to a key or to an unknown name is refused like any other wrong value (it set nothing,
    /// silently: `lr: {}` trained with the default rate, `typo: {}` passed); an empty section sets nothing.
    @Test func anEmptyMappingIsAWrongValueOrAnUnknownKey() throws {
        func error(_ text: String?, _ overrides: [String] = []) -> String? {
            do { _ = try Configuration.load(text: text, origin: "c.yaml", overrides: overrides); return nil } catch { return "\(error)" }
        }
        #expect(error("optimizer:\n  lr: {}\n") == "c.yaml:2: optimizer.lr: expected a number, got a mapping")
        #expect(error("optimiser_typo: {}\n") == "c.yaml:1: unknown key 'optimiser_typo'")
        #expect(error("seed: {}\n")?.contains("c.yaml:1: seed: expected") == true)
        #expect(error(nil, ["optimizer.lr={}"]) == "--set:1: optimizer.lr: expected a number, got a mapping")
        #expect(error(nil, ["nonsense={}"]) == "--set:1: unknown key 'nonsense'")
        #expect(error("optimizer: {}\nseed: 3\n") == nil)
        #expect(try Configuration.load(text: "optimizer: {}\nseed: 3\n", origin: "c.yaml", overrides: []).seed == 3)
    }
}
