import Coordinator
import Engine
import Foundation
import Logging

/// One process's place in a job: its communicator, logger, resolved configuration and run directory.
///
/// Setup failures go through `agree`: every rank runs the same setup step, and one small allreduce tells all
/// of them whether any rank failed. The lowest failing rank prints its error, and every rank exits 1 at once,
/// so bad input gives one clear message and never leaves ranks waiting in a collective.
final class Session {
    let communicator: any Communicator
    let logger: Logger
    let config: Configuration
    let runDirectory: String
    let isLocal: Bool
    let layout: NodeLayout
    let blasThreads: Int
    let progressStyle: ProgressStyle
    /// Standard output and error, shared by the logger and the progress line.
    let terminal: Terminal
    /// Times `agree`'s waits while a training run sets up (`Trainer.setUp`); nil otherwise.
    var setupWatch: SetupWatch?

    var rank: Int { communicator.rank }
    var worldSize: Int { communicator.size }
    var isRoot: Bool { communicator.rank == 0 }

    private init(communicator: any Communicator, logger: Logger, config: Configuration, runDirectory: String,
                 isLocal: Bool, layout: NodeLayout, blasThreads: Int, progressStyle: ProgressStyle, terminal: Terminal) {
        self.communicator = communicator
        self.logger = logger
        self.config = config
        self.runDirectory = runDirectory
        self.isLocal = isLocal
        self.layout = layout
        self.blasThreads = blasThreads
        self.progressStyle = progressStyle
        self.terminal = terminal
    }

    /// Starts MPI (or local mode), reads the configuration and sets the BLAS threads. Writes nothing: a run
    /// directory is written only once setup has succeeded on every rank (`Trainer.commitRunDirectory`).
    /// - Parameter configFile: the configuration file when `--config` is not given (resume and eval reuse the
    ///   run's config.yaml).
    static func start(options: RunOptions, extraOverrides: [String], configFile: String? = nil) -> Session {
        // Local mode when asked for, or when no MPI launcher started this process.
        let isLocal = options.local || !MPICommunicator.isLaunchedByMPI
        let communicator: any Communicator
        if isLocal {
            communicator = LocalCommunicator()
        } else {
            // Said before MPI_Init, which fails with OpenMPI's messages alone when the variables are an ended mpirun's.
            // A warning, not a refusal: inside a container the directory may be out of sight while its launcher lives.
            if let stale = MPICommunicator.staleLauncher(environment: ProcessInfo.processInfo.environment) {
                FileHandle.standardError.write(Data(("bpworker: warning: this process has an MPI launcher's variables, but that "
                    + "launcher looks ended (\(stale)): if MPI_Init fails below, they were left from an earlier mpirun; run under "
                    + "a live launcher, with --local, or without the OMPI_*, PMIX_*, ORTE_* and OPAL_* variables\n").utf8))
            }
            do { communicator = try MPICommunicator.initialize() } catch {
                FileHandle.standardError.write(Data("bpworker: cannot start MPI: \(error)\n".utf8))
                exit(1)
            }
        }
        let terminal = Terminal()
        // A mapped data file truncated underneath the run raises SIGBUS on access: say which file, and exit 1.
        MappedRegions.installFaultHandler(prefix: "[rank \(communicator.rank)]")
        var logger = Logger(label: "bpworker") { _ in
            RankLogHandler(rank: communicator.rank, worldSize: communicator.size, terminal: terminal)
        }
        logger[metadataKey: "rank"] = "\(communicator.rank)"

        let config = agree(communicator, logger, "configuration") { () throws -> Configuration in
            let loaded = try Configuration.load(file: options.config ?? configFile, overrides: options.overrides + extraOverrides)
            try loaded.validateBLASThreads()
            return loaded
        }
        let layout = agree(communicator, logger, "node layout") { try communicator.nodeLayout() }
        let cores = AllowedCores.count()
        let threads = options.blasThreads
            ?? (config.blasThreads > 0 ? config.blasThreads : layout.localSize > 1 ? 1 : cores)
        BLASThreads.set(threads)
        return Session(communicator: communicator, logger: logger, config: config, runDirectory: options.runDir,
                       isLocal: isLocal, layout: layout, blasThreads: threads, progressStyle: options.progress,
                       terminal: terminal)
    }

    /// Runs one setup step on every rank and stops the whole job, with one message, if it failed anywhere. (Once a
    /// run has begun, `RunFailure.agree` also records the failure.)
    func agree<T>(_ what: String, _ body: () throws -> T) -> T {
        Session.agree(communicator, logger, what, watch: setupWatch, body)
    }

    static func agree<T>(_ communicator: any Communicator, _ logger: Logger, _ what: String,
                         onFailure: ((String) -> Void)? = nil, watch: SetupWatch? = nil, _ body: () throws -> T) -> T {
        var result: T? = nil
        var message = ""
        do { result = try body() } catch { message = "\(error)" }
        var firstFailure = [Int32(result == nil ? communicator.rank : Int(Int32.max))]
        do {
            try firstFailure.withUnsafeMutableBufferPointer { (buffer) throws(MPIError) in
                try SetupWatch.waiting(watch, in: what) { () throws(MPIError) in try communicator.allreduce(buffer, op: .min) }
            }
        } catch {
            logger.error("\(what): \(message.isEmpty ? "\(error)" : message)")
            onFailure?("\(what): \(message.isEmpty ? "\(error)" : message)")
            communicator.abort(code: 1)
        }
        if firstFailure[0] != Int32.max {
            if firstFailure[0] == communicator.rank {
                logger.error("\(what): \(message)")
                onFailure?("\(what): \(message)")
            }
            try? communicator.finalize()
            exit(1)
        }
        return result!
    }

    /// An error in the middle of the job, where the other ranks may already wait in a collective: report it and
    /// tear the whole job down (MPI_Abort ends every rank in milliseconds).
    func abort(_ message: String) -> Never {
        logger.critical("\(message)")
        communicator.abort(code: 1)
    }

    func finish(exitCode: Int32 = 0) -> Never {
        do { try communicator.finalize() } catch { abort("MPI_Finalize: \(error)") }
        exit(exitCode)
    }
}
