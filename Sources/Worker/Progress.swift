import Coordinator
import Engine
import Foundation
import Logging

/// Appends one JSON object per line to the run directory's metrics file (rank 0 only), and gives the scalars of
/// each record to TensorBoard's event file too, so both always hold the same numbers. Keeps the run's records in
/// memory as well, as `bpworker report` reads them from the file, so the report is made without rereading it.
final class MetricsLog {
    private let file: RecordFile?
    private let tensorBoard: TensorBoardWriter?
    /// Every record of the run written so far (on a resume, also those of the earlier processes).
    private(set) var records: RunRecords

    /// - Parameter append: keep earlier records (a resumed run continues its metrics).
    /// - Parameter warn: told once when a record cannot be written (a full disk).
    init(path: String, append: Bool = false, tensorBoard: TensorBoardWriter? = nil, warn: @escaping (String) -> Void = { _ in }) {
        self.tensorBoard = tensorBoard
        records = RunRecords(directory: URL(fileURLWithPath: path).deletingLastPathComponent().path)
        let earlier = append ? FileManager.default.contents(atPath: path) : nil
        if earlier == nil {
            _ = FileManager.default.createFile(atPath: path, contents: nil)
        }
        file = RecordFile(path: path, onFirstFailure: warn)
        if let earlier {
            records.add(lines: earlier)
            // A process killed in the middle of a line left it unended: the next record starts a line of its own.
            if let last = earlier.last, last != UInt8(ascii: "\n") { file?.append(Data("\n".utf8)) }
        }
    }

    /// Appends `record`; one that JSON cannot hold (a non-finite number) is left out of the file, TensorBoard and
    /// the records alike.
    func write(_ record: MetricsRecord) {
        guard let file, let line = try? record.line() else { return }
        file.append(line)
        records.add(record)
        if let tensorBoard, case let scalars = TensorBoardWriter.scalars(of: record), !scalars.isEmpty {
            tensorBoard.write(step: record.step, scalars: scalars)
        }
    }
}

/// Training progress: loss and accuracy over the global batch, throughput, the split between computing and
/// waiting on communication, and the ETA. A log interval costs one small allreduce; other steps cost nothing.
/// On a terminal rank 0 redraws one line (through the session's `Terminal`, which ends it before any other
/// output); in a batch log it prints plain lines.
final class Progress {
    private let session: Session
    private let metrics: MetricsLog?
    private var totalSteps: Int
    private let stepsPerEpoch: Int
    private var epochs: Int
    private let isTerminal: Bool
    private var window = BatchResult()
    private var windowStart = Date()
    private var windowSteps = 0
    private let start = Date()
    /// What RUN_DIR/status.json says (rank 0 writes it).
    var status: RunStatus
    private var lastStatusWrite = Date.distantPast
    private var statusWriteFailed = false
    /// Said once: the report is rewritten at every epoch's end.
    private var reportWriteFailed = false

    /// A resume whose checkpoint has done more than this run plans (fewer `training.epochs` than it trained): the
    /// plan is what was done, so that nothing reads "step 96/64, epoch 3/2" or "finished: 64 steps".
    func cover(_ position: TrainingPosition) {
        guard position.globalStep > totalSteps || position.epoch > epochs else { return }
        (totalSteps, epochs) = (max(totalSteps, position.globalStep), max(epochs, position.epoch))
        (status.totalSteps, status.epochs) = (totalSteps, epochs)
    }

    init(session: Session, prepared: Prepared, metrics: MetricsLog?) {
        self.session = session
        self.metrics = metrics
        totalSteps = prepared.totalSteps
        status = RunStatus(state: .training, step: 0, totalSteps: prepared.totalSteps, epoch: 0, epochs: prepared.epochs,
                           worldSize: session.worldSize, updated: RunStatus.now)
        stepsPerEpoch = prepared.sampler.stepsPerEpoch
        epochs = prepared.epochs
        let redraw = switch session.progressStyle {
        case .line: true
        case .plain: false
        case .auto: session.isLocal && isatty(STDOUT_FILENO) == 1
        }
        isTerminal = session.isRoot && redraw
    }

    /// A step's result, into the window of the next report; `globalStep` is the steps done, which status.json says when
    /// the run ends between reports (a watchdog's abort left the step of the last log line).
    @inline(__always)
    func record(_ result: BatchResult, globalStep: Int) {
        status.step = globalStep
        window.lossSum += result.lossSum
        window.correct += result.correct
        window.count += result.count
        windowSteps += 1
    }

    /// - Parameter batches: the training batches, whose `waitSeconds` is the window's time spent waiting for data.
    func report(epoch: Int, step: Int, globalStep: Int, learningRate: Double, reducer: GradientReducer,
                batches: BatchPrefetcher) throws {
        var totals = [window.lossSum, Double(window.correct), Double(window.count), reducer.waitSeconds, batches.waitSeconds]
        try totals.withUnsafeMutableBufferPointer { (buffer) throws(MPIError) in
            try session.communicator.allreduce(buffer, op: .sum)
        }
        let elapsed = max(Date().timeIntervalSince(windowStart), 1e-9)
        let loss = totals[0] / max(totals[2], 1)
        let accuracy = totals[1] / max(totals[2], 1)
        let samplesPerSecond = totals[2] / elapsed
        let waitShare = min(1, totals[3] / Double(session.worldSize) / elapsed)
        let dataShare = min(1, totals[4] / Double(session.worldSize) / elapsed)
        let eta = Double(totalSteps - globalStep) * elapsed / Double(max(windowSteps, 1))
        if session.isRoot {
            let line = "epoch \(epoch + 1)/\(epochs) step \(step + 1)/\(stepsPerEpoch) loss \(lossText(loss)) "
                + "acc \(percent(accuracy)) lr \(String(format: "%.4g", learningRate)) "
                + "\(groupedRounded(samplesPerSecond)) samples/s compute \(String(format: "%.0f", 100 * max(0, 1 - waitShare - dataShare)))% "
                + "comm wait \(String(format: "%.0f", 100 * waitShare))% data wait \(String(format: "%.0f", 100 * dataShare))% "
                + "ETA \(duration(eta))"
            if isTerminal {
                session.terminal.redraw(line)
            } else {
                session.logger.info("\(line)")
            }
            status.step = globalStep
            status.epoch = epoch
            status.loss = loss
            status.accuracy = accuracy
            status.samplesPerSecond = samplesPerSecond
            status.etaSeconds = eta
            // At most once a second from progress reports: rank 0's report is on every rank's critical path (the
            // others wait for it at the next allreduce), and status.json is for people, who read it by the second.
            if Date().timeIntervalSince(lastStatusWrite) >= 1 { writeStatus() }
            metrics?.write(.train(.init(epoch: epoch + 1, step: globalStep, loss: loss, accuracy: accuracy,
                                        learningRate: learningRate, samplesPerSecond: samplesPerSecond,
                                        commWaitFraction: waitShare, dataWaitFraction: dataShare,
                                        elapsedSeconds: Date().timeIntervalSince(start))))
        }
        window = BatchResult()
        windowSteps = 0
        windowStart = Date()
        reducer.resetTimers()
        batches.resetWait()
    }

    func reportEvaluation(_ result: BatchResult, epoch: Int, globalStep: Int) {
        guard session.isRoot else { return }
        let accuracy = Double(result.correct) / Double(max(result.count, 1))
        status.testAccuracy = accuracy
        status.epoch = epoch + 1
        writeStatus()
        let line = "epoch \(epoch + 1)/\(epochs) test accuracy \(percent(accuracy)) loss \(lossText(result.loss)) "
            + "on \(grouped(result.count)) samples, \(duration(Date().timeIntervalSince(start))) elapsed"
        session.logger.info("\(line)")
        metrics?.write(.eval(.init(epoch: epoch + 1, step: globalStep, loss: result.loss, accuracy: accuracy,
                                   samples: result.count, elapsedSeconds: Date().timeIntervalSince(start))))
    }

    // MARK: - Markers for the report

    /// A marker in metrics.jsonl (`"type": "event"`, rank 0): `checkpoint` or `skip` (a step dropped for non-finite
    /// values); `recordStart` and `finish` write the others.
    func recordEvent(_ kind: MetricsRecord.Event.Kind, step: Int) {
        record(MetricsRecord.Event(kind: kind, step: step))
    }

    private func record(_ event: MetricsRecord.Event) {
        guard session.isRoot else { return }
        var event = event
        event.elapsedSeconds = Date().timeIntervalSince(start)
        metrics?.write(.event(event))
    }

    /// The `start` or `resume` marker: world size, nodes, BLAS kernels and threads, and the model, for the report; a
    /// resume's says where it resumed from and which damaged checkpoints it skipped.
    func recordStart(resumed: ResumeChoice?, step: Int, model: Model<Float>) {
        var event = MetricsRecord.Event(kind: resumed != nil ? .resume : .start, step: step)
        if let resumed {
            event.message = "resumed from \(URL(fileURLWithPath: resumed.path).lastPathComponent)"
                + resumed.skipped.map { "; skipped \(URL(fileURLWithPath: $0.path).lastPathComponent) (\($0.reason))" }.joined()
        }
        event.worldSize = session.worldSize
        event.nodes = session.layout.nodeCount
        event.blas = BLASKernels.description
        event.blasThreads = session.blasThreads
        event.model = model.spec.summary
        event.parameters = model.parameterCount
        event.layers = model.layerSummary
        event.totalSteps = totalSteps
        event.epochs = epochs
        record(event)
    }

    /// Rewrites RUN_DIR/report.html from the run's records kept in memory (rank 0, at every evaluation and at the
    /// end): the same page `bpworker report` makes from the files, without rereading metrics.jsonl. A report that
    /// cannot be written is a warning: it must never stop training.
    func writeReport() {
        guard session.isRoot, var run = metrics?.records else { return }
        run.status = status
        run.readSideFiles()
        do { try RunReport.write([run], to: session.runDirectory + "/report.html") } catch {
            if !reportWriteFailed { session.logger.warning("report.html not written: \(error)") }
            reportWriteFailed = true
        }
    }

    /// Writes status.json now (rank 0).
    func writeStatus() {
        guard session.isRoot else { return }
        let now = Date()
        status.updated = RunStatus.timestamp(now)
        if !status.write(to: session.runDirectory) && !statusWriteFailed {
            statusWriteFailed = true
            let path = RunStatus.path(session.runDirectory)
            let warning = RunDirectoryIdentity.allowsWrite(to: path)
                ? "\(path) could not be written; `bpworker status` shows an older state"
                : "\(path) is not written any more: the run directory was moved or replaced while the job ran (the run ends at its "
                    + "next checkpoint)"
            session.logger.warning("\(warning)")
        }
        lastStatusWrite = now
    }

    func finish(state: RunStatus.State, message: String?) {
        status.state = state
        status.message = message
        writeStatus()
        var end = MetricsRecord.Event(kind: .end, step: status.step)
        end.state = state
        end.message = message
        record(end)
        session.terminal.endLine()
        writeReport()
        guard session.isRoot, state == .finished else { return }
        // A run that reached training.target_accuracy stops before its planned total: say both.
        let steps = status.step < totalSteps ? "\(status.step) of \(totalSteps) planned steps" : "\(totalSteps) steps"
        session.logger.info("training finished: \(steps) in \(duration(Date().timeIntervalSince(start)))")
    }
}
