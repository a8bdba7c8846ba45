import ArgumentParser
import Engine
import Foundation

@main
struct BPWorker: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bpworker",
        abstract: "Data-parallel training over MPI, with a BLAS engine and a float64 gradient checker.",
        discussion: """
            Launch with mpirun (or srun) for several ranks, or run one process with --local.
              mpirun -n 4 bpworker train
              bpworker train --local --set training.epochs=2

            With no configuration file every key has its default: an MLP on Fashion-MNIST from \
            /usr/share/datasets/fashion-mnist. `bpworker keys` lists every key.
            """,
        subcommands: [Train.self, Gradcheck.self, Eval.self, Predict.self, Verify.self, Status.self, Report.self, Keys.self]
    )

    static func main() {
        ProcessorCheck.requireSupportedProcessor()
        BLASKernels.restartWithBetterKernelsIfNeeded()
        // `--resume` alone means the latest checkpoint; ArgumentParser options need a value, so spell it out.
        var arguments = Array(CommandLine.arguments.dropFirst())
        for i in arguments.indices where arguments[i] == "--resume"
            && (i + 1 == arguments.count || arguments[i + 1].hasPrefix("-")) {
            arguments[i] = "--resume=latest"
        }
        if let repeated = repeatedOption(arguments) {
            FileHandle.standardError.write(Data("Error: \(repeated)\n".utf8))
            Glibc.exit(64)
        }
        main(arguments)
    }

    /// Options that take one value. Given twice, swift-argument-parser keeps the last without a word: `--run-dir a
    /// --run-dir b` trained into b (with --overwrite, b was the run removed), `--resume PATH --resume` resumed from the
    /// latest checkpoint, not PATH. (-c/--config is refused by `RunOptions.validate`.)
    static let singleValued = ["--run-dir", "--resume", "--model", "--parameters", "--output", "--blas-threads", "--progress",
                               "--top", "--timeline"]

    /// "--run-dir given 2 times (a, b): ..." for the first single-valued option given more than once, or nil.
    static func repeatedOption(_ arguments: [String]) -> String? {
        let options = arguments.prefix { $0 != "--" }
        for name in singleValued {
            var values: [String] = []
            for (i, argument) in options.enumerated() {
                if argument == name { values.append(i + 1 < options.count ? options[options.startIndex + i + 1] : "") }
                else if argument.hasPrefix(name + "=") { values.append(String(argument.dropFirst(name.count + 1))) }
            }
            if values.count > 1 {
                return "\(name) given \(values.count) times (\(values.joined(separator: ", "))): it takes one value, and the last "
                    + "would replace the others without a word"
            }
        }
        return nil
    }
}

/// Options every subcommand that runs a job shares.
struct RunOptions: ParsableArguments {
    /// Given twice, the second file would silently replace the first (swift-argument-parser keeps the last value):
    /// `validate` refuses that.
    @Option(name: [.short, .customLong("config")], help: "YAML configuration file (default: built-in defaults).")
    var configFiles: [String] = []
    var config: String? { configFiles.first }

    @Option(name: .customLong("set"), help: ArgumentHelp(
        "Override one key, in YAML syntax; repeatable.", valueName: "key=value"))
    var overrides: [String] = []

    @Option(help: "Run directory: resolved config, metrics, model. Created by rank 0.")
    var runDir: String = "runs/default"

    @Flag(help: "Run as one process without an MPI launcher.")
    var local = false

    @Option(help: "OpenBLAS threads per rank (default: 1 when ranks share a node, else all cores).")
    var blasThreads: Int?

    @Option(help: ArgumentHelp("Progress display: line (redraw one line), plain (a line per log interval) or auto: line on a terminal "
        + "in local mode, else plain (under mpirun every rank's output looks like a terminal)."))
    var progress: ProgressStyle = .auto

    func validate() throws {
        if let blasThreads, !(1...1024).contains(blasThreads) { throw ValidationError("--blas-threads must be in 1...1024, got \(blasThreads)") }
        if configFiles.count > 1 {
            throw ValidationError("-c/--config given \(configFiles.count) times (\(configFiles.joined(separator: ", "))): bpworker "
                + "reads one configuration file; change single keys with --set")
        }
    }
}

enum ProgressStyle: String, ExpressibleByArgument, CaseIterable {
    case auto, line, plain
}

struct Train: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Train a model data-parallel.",
        discussion: """
            Examples:
              mpirun -n 4 bpworker train
              mpirun -n 2 bpworker train -c job.yaml --set optimizer.lr=0.1
              bpworker train --local --set training.epochs=1
              mpirun -n 4 bpworker train --resume
              mpirun -n 4 bpworker train --overwrite
              mpirun -n 2 bpworker train --timeline 50

            --resume alone continues from RUN_DIR/checkpoints/latest. A run directory that already holds a run is \
            never started over by accident: train refuses unless given --resume or --overwrite.

            SIGTERM, SIGINT, SIGUSR1 or SIGUSR2 on any rank: every rank stops after the same step, rank 0 writes a \
            checkpoint and all exit 0. A second SIGINT exits at once. During the gradient check before the first \
            step (on rank 0, or on every rank with model.batchnorm=sync), the check ends without a verdict and \
            the run stops with no checkpoint: run the same command again to start over.
            """)

    @OptionGroup var options: RunOptions

    @Flag(help: ArgumentHelp("Gradient-check before the first step, on rank 0 or, with model.batchnorm=sync, on every rank together "
        + "(same as gradcheck.enabled=true)."))
    var gradcheck = false

    @Option(help: ArgumentHelp(
        "Resume from a checkpoint: --resume alone takes RUN_DIR/checkpoints/latest.", valueName: "path"))
    var resume: String?

    @Flag(help: "Start again in a run directory that holds a run: removes its checkpoints, metrics, status and model first (other files stay).")
    var overwrite = false

    @Option(help: ArgumentHelp(
        "Record what every rank does for this many steps (after timeline.warmup_steps) into RUN_DIR/timeline.json, "
            + "a trace for Perfetto or chrome://tracing (same as timeline.steps).",
        valueName: "steps"))
    var timeline: Int?

    func validate() throws {
        if let timeline, timeline < 1 { throw ValidationError("--timeline must be at least 1 step") }
        if resume != nil && overwrite {
            throw ValidationError("--resume continues the run in the run directory and --overwrite removes it: choose one")
        }
    }

    func run() throws {
        // Before anything else, so a scheduler's signal during setup is not lost.
        StopSignals.install()
        // A resumed run keeps its configuration unless told otherwise.
        let runConfig = options.runDir + "/config.yaml"
        let session = Session.start(
            options: options,
            extraOverrides: (gradcheck ? ["gradcheck.enabled=true"] : []) + (timeline.map { ["timeline.steps=\($0)"] } ?? []),
            configFile: resume != nil && FileManager.default.fileExists(atPath: runConfig) ? runConfig : nil)
        let (outcome, loop) = Trainer.train(session, resume: resume, overwrite: overwrite)
        Trainer.finish(session, outcome, loop: loop)
    }
}

struct Gradcheck: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Check backpropagation against float64 finite differences on rank 0 (or every rank together) and exit.",
        discussion: """
            Exits 0 when the check passes (or only warns), 1 when it fails.
              bpworker gradcheck --local
              bpworker gradcheck --local --json --set gradcheck.all=true
              mpirun -n 2 bpworker gradcheck --distributed --set model.batchnorm=sync
            """)

    @OptionGroup var options: RunOptions

    @Flag(help: "Print the report as JSON instead of a table.")
    var json = false

    @Flag(help: ArgumentHelp("Every rank checks together: the same coordinates perturbed on every rank, J the mean loss over all ranks' "
        + "check batches (with model.batchnorm=sync, through synchronized batch norm's cross-rank terms)."))
    var distributed = false

    func run() throws {
        // gradcheck.enabled, so that the memory estimate counts the check this command runs (it counted training's
        // needs without the check, and a check its estimate let through was killed by the memory limit).
        let session = Session.start(options: options, extraOverrides: ["gradcheck.enabled=true"])
        // Until the check's Watchdog starts, setup's waits are timed (a rank frozen there hung the others).
        session.setupWatch = SetupWatch(timeout: session.config.watchdogSeconds, rank: session.rank, communicator: session.communicator)
        let prepared = Setup.prepare(session, training: false, checksOnEveryRank: distributed)
        // The report goes to RUN_DIR/gradcheck.json as well; nothing else of a run directory is touched. Not while a job
        // runs there (its lock), and not into a directory that holds a run, whose gradcheck.json is that run's (a check
        // of another model overwrote it, and the run's report showed it).
        var holdsRun = false
        session.agree("run directory \(session.runDirectory)") {
            guard session.isRoot else { return }
            try RunDirectoryLock.takeIfPresent(session.runDirectory)
            try RunDirectory.create(session.runDirectory)
            holdsRun = RunDirectory.inspect(session.runDirectory).holdsRun
        }
        if holdsRun {
            let note = "\(session.runDirectory) holds a run: this check's report is not written to its gradcheck.json "
                + "(choose another --run-dir to keep it)"
            session.logger.notice("\(note)")
        }
        if !distributed && !json && session.config.batchNorm == .sync && session.worldSize > 1 && !prepared.model.bufferTable.isEmpty {
            let note = "gradient check: on rank 0 alone, whose batch norm normalises its own batch; "
                + "--distributed checks synchronized batch norm's cross-rank terms too"
            session.logger.info("\(note)")
        }
        // Under the watchdog, as training is: a rank that stalls in the check is named, and the job ends.
        let aborter = Aborter(communicator: session.communicator, runDirectory: session.runDirectory)
        let watchdog = Watchdog(timeout: session.config.watchdogSeconds, rank: session.rank, worldSize: session.worldSize,
                                runDirectory: session.runDirectory) { report, step in aborter.abort(report, stepsDone: step) }
        watchdog.start()
        session.setupWatch?.stop()
        session.setupWatch = nil
        let verdict = GradientCheckRun.run(session, prepared, distributed: distributed, phases: PhaseRunner(watchdog: watchdog, recorder: nil),
                                           printJSON: json, reportDirectory: holdsRun ? nil : session.runDirectory)
        session.finish(exitCode: verdict == .fail ? 1 : 0)
    }
}

struct Eval: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Evaluate saved parameters on the test set.",
        discussion: """
              bpworker eval --local --run-dir runs/default
              mpirun -n 2 bpworker eval --parameters model.safetensors
              bpworker eval --local --model runs/default/model.safetensors

            Without --config, the run directory's config.yaml describes the model. With --model, the file \
            describes the model and its preprocessing; only the test data (data.format, data.test_features, \
            data.test_labels) and training.batch_size come from the configuration.
            """)

    @OptionGroup var options: RunOptions

    @Option(help: "safetensors file with the parameters (default: RUN_DIR/model.safetensors).")
    var parameters: String?

    @Option(help: "A bpworker model file or checkpoint to evaluate alone: it records the model and its preprocessing.")
    var model: String?

    func validate() throws {
        if model != nil && parameters != nil { throw ValidationError("--model and --parameters exclude each other") }
    }

    func run() throws {
        if let model {
            let session = Session.start(options: options, extraOverrides: [])
            Evaluation.watch(session)
            Evaluation.runModel(session, modelPath: model)
            session.finish()
        }
        // Without --config, the run's own resolved configuration describes the model that was saved.
        let runConfig = options.runDir + "/config.yaml"
        let session = Session.start(
            options: options, extraOverrides: [],
            configFile: FileManager.default.fileExists(atPath: runConfig) ? runConfig : nil)
        Evaluation.watch(session)
        Evaluation.run(session, parametersPath: parameters ?? session.runDirectory + "/model.safetensors")
        session.finish()
    }
}

struct Status: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Print the state of a run from its status.json.",
        discussion: "  bpworker status runs/default")

    @Argument(help: "Run directory.")
    var runDirectory: String = "runs/default"

    @Flag(help: "Print the raw JSON.")
    var json = false

    func run() throws {
        // One line naming the file and the reason, exit 1, as `report` does: not ArgumentParser's usage text.
        do {
            let status = try RunStatus.read(runDirectory)
            if json {
                print(String(decoding: FileManager.default.contents(atPath: RunStatus.path(runDirectory)) ?? Data(), as: UTF8.self))
            } else {
                print(status.text)
            }
        } catch {
            FileHandle.standardError.write(Data("error: \(error)\n".utf8))
            throw ExitCode.failure
        }
    }
}

struct Keys: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "List every configuration key with its default.")

    func run() throws {
        let defaults = Configuration()
        for key in Configuration.keys {
            let value = (try? Yams.serialize(node: key.write(defaults))) ?? ""
            print("\(key.path) = \(value.trimmingCharacters(in: .whitespacesAndNewlines))")
            print("    \(key.help) (\(key.typeName))")
        }
    }
}

import Yams
