import Engine
import Foundation

/// Faults the tests inject into a real run, each switched on by an environment variable and documented in the
/// docs/checkpoints-and-faults.md ("Fault injection"). `fromEnvironment` is the one place that reads a BPWORKER_TEST_* variable: it runs
/// once at setup, and each value is handed to the code it acts in. The per-step cost is two integer comparisons.
struct TestHooks {
    /// BPWORKER_TEST_NAN=RANK:STEP[:loss]: that rank's batch turns to NaN at that step (0-based global step),
    /// which poisons its loss and its gradients; with `:loss`, only the loss it reports turns to NaN and the
    /// gradients stay finite, so each channel of the non-finite check can be tested alone.
    var nanStep: Int?
    var nanLossOnly = false
    /// BPWORKER_TEST_GRADCHECK_FAIL=RANK:N[:stall]: that rank fails inside the distributed gradient check, before its
    /// Nth sum across ranks (1-based), while the others wait in it; with `:stall` it sleeps there for a minute instead.
    var gradcheckFailSum: Int?
    var gradcheckStalls = false
    /// BPWORKER_TEST_GRADCHECK_SIGSTOP=RANK: that rank stops itself (SIGSTOP, every thread, heartbeats too) as its
    /// gradient check begins, as a rank the scheduler or a debugger froze.
    var gradcheckStopsItself = false
    /// BPWORKER_TEST_GRADCHECK_SLOW=RANK:SECONDS: that rank sleeps that long as its check begins, alive (its watchdog
    /// thread keeps writing heartbeats), as a long check on a large model takes.
    var gradcheckSleepSeconds = 0.0
    func duringGradientCheck() {
        if gradcheckStopsItself { kill(getpid(), SIGSTOP) }
        if gradcheckSleepSeconds > 0 { sleepFully(gradcheckSleepSeconds) }
    }
    /// BPWORKER_TEST_STALL=RANK:STEP:SECONDS[:PLACE]: that rank sleeps SECONDS at `place` (`StallPlace`), inside or
    /// after step STEP.
    var stallStep: Int?
    var stallSeconds = 0.0
    var stallPlace = StallPlace.beforeForward
    /// Where BPWORKER_TEST_STALL's rank sleeps, by the value's last field.
    enum StallPlace: String {
        /// No place given: inside the step, before its forward pass.
        case beforeForward = ""
        /// Between the gradient exchange and the update, where the others wait in the sharded update's parameter gather.
        case afterExchange = "after-exchange"
        /// Inside the batch's read, as on a stalled file system.
        case read
        /// As the run finishes, after its last checkpoint (the step is the run's last, 0-based).
        case finish
        /// During setup, before the data are read (the step is ignored).
        case setup
        /// `bpworker eval` before its evaluation's sums, while the others wait in them (the step is ignored).
        case eval
        /// At the very end, after the run's last step STEP, before the last status and MPI_Finalize.
        case finalize
        /// Before the checkpoint after step STEP (its number, as in step-0000000N), while the others wait in its first
        /// agreement.
        case checkpoint
        /// Before `train --gradcheck`'s agreement on the check's batch, while the others wait in it (the step is
        /// ignored).
        case gradcheck
    }

    /// Sleeps when the stall is at `place` (and at `step`, for the places that have one).
    private func stall(at place: StallPlace, step: Int? = nil) {
        guard let stallStep, place == stallPlace, step.map({ $0 == stallStep }) ?? true else { return }
        sleepFully(stallSeconds)
    }

    /// BPWORKER_TEST_EVAL_SLEEP_MS=N: every evaluation batch of every rank takes N ms longer (an evaluation longer
    /// than the watchdog's timeout, each batch shorter).
    var evaluationBatchSleepSeconds = 0.0
    /// BPWORKER_TEST_STEP_SLEEP_MS=N: every step of every rank takes N ms longer (so signals land mid-epoch).
    var stepSleepMicroseconds: UInt32 = 0
    /// BPWORKER_TEST_SIGNAL=RANK:STEP: that rank sends itself SIGTERM as that step begins (0-based global step), so a
    /// stop lands on a chosen step, such as an epoch's last.
    var signalStep: Int?
    /// BPWORKER_TEST_DIVERGE=RANK:STEP: that rank's first parameter drifts at that step (a silent replica fault).
    var divergeStep: Int?
    /// BPWORKER_TEST_CLOCK_OFFSET=RANK:SECONDS: that rank's clock for time-based checkpoints runs SECONDS ahead.
    var clockOffsetSeconds = 0.0
    /// BPWORKER_TEST_CLOCK_SKEW=RANK:SECONDS: that rank's timeline clock runs this far ahead, as a clock on another
    /// host may, so a test can see that the timeline's alignment undoes it (`Timeline`).
    var clockSkewSeconds = 0.0
    /// BPWORKER_TEST_CHECKPOINT_CRASH=STEP: the checkpoint of this step stops half-way through its file and the
    /// process dies with SIGKILL, as a crash or a node failure would (`Checkpointer`).
    var checkpointCrashStep: Int?
    /// BPWORKER_TEST_CHECKPOINT_CORRUPT=STEP: that step's checkpoint has a byte flipped on disk right after it is
    /// written (before bpworker reads it back).
    var checkpointCorruptStep: Int?
    /// BPWORKER_TEST_GRADIENT_FAULT (see `gradientFault(from:)`): one tensor's backward pass broken on purpose, in
    /// the training model and in the gradient check's copy of it (see docs/gradient-checking.md, "Testing the gradient check").
    var gradientFault: GradientFault?

    /// The hooks `environment` switches on for `rank`. Throws for a gradient fault it cannot parse; other values
    /// that do not parse switch nothing on.
    static func fromEnvironment(_ environment: [String: String] = ProcessInfo.processInfo.environment,
                                rank: Int) throws(TestHookError) -> TestHooks {
        let env = environment
        var hooks = TestHooks()
        func fields(_ name: String) -> [Double]? {
            env[name].map { $0.split(separator: ":").compactMap { Double($0) } }
        }
        if let f = fields("BPWORKER_TEST_NAN"), f.count == 2, Int(f[0]) == rank {
            hooks.nanStep = Int(f[1])
            hooks.nanLossOnly = env["BPWORKER_TEST_NAN"]?.hasSuffix(":loss") ?? false
        }
        if let f = fields("BPWORKER_TEST_GRADCHECK_FAIL"), f.count == 2, Int(f[0]) == rank {
            hooks.gradcheckFailSum = Int(f[1])
            hooks.gradcheckStalls = env["BPWORKER_TEST_GRADCHECK_FAIL"]?.hasSuffix(":stall") ?? false
        }
        if let f = fields("BPWORKER_TEST_GRADCHECK_SIGSTOP"), f.count == 1, Int(f[0]) == rank { hooks.gradcheckStopsItself = true }
        if let f = fields("BPWORKER_TEST_GRADCHECK_SLOW"), f.count == 2, Int(f[0]) == rank { hooks.gradcheckSleepSeconds = f[1] }
        if let f = fields("BPWORKER_TEST_STALL"), f.count == 3, Int(f[0]) == rank {
            hooks.stallStep = Int(f[1])
            hooks.stallSeconds = f[2]
            let place = env["BPWORKER_TEST_STALL"]?.split(separator: ":").dropFirst(3).first.map(String.init) ?? ""
            hooks.stallPlace = StallPlace(rawValue: place) ?? .beforeForward
        }
        if let f = fields("BPWORKER_TEST_STEP_SLEEP_MS"), f.count == 1 { hooks.stepSleepMicroseconds = UInt32(f[0] * 1000) }
        if let f = fields("BPWORKER_TEST_EVAL_SLEEP_MS"), f.count == 1 { hooks.evaluationBatchSleepSeconds = f[0] / 1000 }
        if let f = fields("BPWORKER_TEST_DIVERGE"), f.count == 2, Int(f[0]) == rank { hooks.divergeStep = Int(f[1]) }
        if let f = fields("BPWORKER_TEST_SIGNAL"), f.count == 2, Int(f[0]) == rank { hooks.signalStep = Int(f[1]) }
        if let f = fields("BPWORKER_TEST_CLOCK_OFFSET"), f.count == 2, Int(f[0]) == rank { hooks.clockOffsetSeconds = f[1] }
        if let f = fields("BPWORKER_TEST_CLOCK_SKEW"), f.count == 2, Int(f[0]) == rank { hooks.clockSkewSeconds = f[1] }
        hooks.checkpointCrashStep = env["BPWORKER_TEST_CHECKPOINT_CRASH"].flatMap { Int($0) }
        hooks.checkpointCorruptStep = env["BPWORKER_TEST_CHECKPOINT_CORRUPT"].flatMap { Int($0) }
        if let value = env["BPWORKER_TEST_GRADIENT_FAULT"], !value.isEmpty { hooks.gradientFault = try gradientFault(from: value) }
        return hooks
    }

    /// BPWORKER_TEST_GRADIENT_FAULT = missing:NAME | transposed:NAME | scaled:NAME:FACTOR | flipped:CONV.weight |
    /// padding:CONV.weight | nomean:BATCHNORM.weight | localsums:BATCHNORM.weight
    static func gradientFault(from value: String) throws(TestHookError) -> GradientFault {
        let parts = value.split(separator: ":").map(String.init)
        switch (parts.first, parts.count) {
        case ("missing", 2): return .missing(tensor: parts[1])
        case ("transposed", 2): return .transposed(tensor: parts[1])
        case ("flipped", 2): return .flippedKernel(tensor: parts[1])
        case ("padding", 2): return .paddingOffset(tensor: parts[1])
        case ("nomean", 2): return .batchNormWithoutMeanTerm(tensor: parts[1])
        case ("localsums", 2): return .batchNormLocalSums(tensor: parts[1])
        case ("scaled", 3):
            if let factor = Double(parts[2]) { return .scaled(tensor: parts[1], factor: factor) }
        default: break
        }
        throw TestHookError(description: "BPWORKER_TEST_GRADIENT_FAULT=\(value): expected missing:NAME, transposed:NAME, "
            + "scaled:NAME:FACTOR, flipped:CONV.weight, padding:CONV.weight, nomean:BATCHNORM.weight or localsums:BATCHNORM.weight")
    }

    @inline(__always)
    func beforeStep(step: Int, model: Model<Float>) {
        if stepSleepMicroseconds > 0 { sleepFully(Double(stepSleepMicroseconds) * 1e-6) }
        if step == nanStep && !nanLossOnly { model.inputs[0] = .nan }
        stall(at: .beforeForward, step: step)
        if step == divergeStep { model.parameters[0] += 1e-3 }
        if step == signalStep { raise(SIGTERM) }
    }

    @inline(__always)
    func afterForward(step: Int, result: inout BatchResult) {
        if step == nanStep && nanLossOnly { result.lossSum = .nan }
    }

    /// Before `eval`'s sums across ranks (`:eval`).
    func beforeEvaluationSums() {
        stall(at: .eval)
    }

    /// Inside the batch's read (`:read`): a file system that stops answering.
    @inline(__always)
    func duringRead(step: Int) {
        stall(at: .read, step: step)
    }

    /// During setup (`:setup`), before the data are read.
    func duringSetup() {
        stall(at: .setup)
    }

    /// After an evaluation batch.
    func afterEvaluationBatch() {
        if evaluationBatchSleepSeconds > 0 { sleepFully(evaluationBatchSleepSeconds) }
    }

    /// At the very end (`:finalize`), after step `step`, the run's last.
    func atFinalize(step: Int) {
        stall(at: .finalize, step: step)
    }

    /// Before `train --gradcheck`'s agreement on the check's batch (`:gradcheck`).
    func beforeGradientCheck() {
        stall(at: .gradcheck)
    }

    /// Before the checkpoint after step `step` (`:checkpoint`).
    func beforeCheckpoint(step: Int) {
        stall(at: .checkpoint, step: step)
    }

    /// As the run finishes (`:finish`), after step `step`, the run's last.
    func atFinish(step: Int) {
        stall(at: .finish, step: step)
    }

    @inline(__always)
    func afterExchange(step: Int) {
        stall(at: .afterExchange, step: step)
    }
}

/// Sleeps the whole time even when signals arrive (usleep returns early on each one).
func sleepFully(_ seconds: Double) {
    var request = timespec(tv_sec: Int(seconds), tv_nsec: Int((seconds - seconds.rounded(.down)) * 1e9))
    var remaining = timespec()
    while nanosleep(&request, &remaining) != 0 && errno == EINTR { request = remaining }
}

/// A test hook's environment variable that cannot be parsed.
struct TestHookError: Error, CustomStringConvertible, Equatable {
    let description: String
}
