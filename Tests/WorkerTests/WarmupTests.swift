import Engine
import Foundation
import Testing
@testable import Worker

/// `schedule.warmup_steps`: its default (`auto`) never makes a valid run an error, and a set value the run cannot
/// hold is refused with the reason.
@Suite("Warmup on short runs", .serialized, .temporaryFiles)
struct WarmupTests {
    /// lr at step `step` (0-based) of the 32-step runs below, in closed form: base 0.05 (the default), 3 warmup steps
    /// (a tenth of 32, rounded down), then a cosine to 0 over the remaining 29.
    static func closedFormRate(atStep step: Int) -> Double {
        step < 3 ? 0.05 * Double(step + 1) / 3 : 0.05 * (1 + cos(Double.pi * Double(step - 3) / 29)) / 2
    }

    // MARK: - The setting

    @Test func autoIsTheDefaultAndSurvivesTheResolvedYAML() throws {
        let defaults = Configuration()
        #expect(defaults.warmupSteps == .auto)
        #expect(defaults.yaml.contains("\n  warmup_steps: auto\n"), "\(defaults.yaml)")
        let file = TemporaryFiles.path("bpworker-config-").appendingPathExtension("yaml")
        try Data(defaults.yaml.utf8).write(to: file)
        #expect(try Configuration.load(file: file.path, overrides: []).warmupSteps == .auto, "a resume reads auto back")
        #expect(try Configuration.load(file: file.path, overrides: ["schedule.warmup_steps=200"]).warmupSteps == .steps(200))
        #expect(try Configuration.load(file: nil, overrides: ["schedule.warmup_steps=auto"]).warmupSteps == .auto)
        do {
            _ = try Configuration.load(file: nil, overrides: ["schedule.warmup_steps=some"])
            Issue.record("a word other than auto must be refused")
        } catch {
            #expect("\(error)".contains("schedule.warmup_steps: expected an integer or auto"), "\(error)")
        }
    }

    @Test func autoWarmsUpOverAtMostATenthOfTheRun() throws {
        let auto = Configuration()
        let resolved = [1, 9, 10, 32, 1999, 2000, 100_000].map { auto.resolvedWarmupSteps(totalSteps: $0) }
        #expect(resolved == [0, 0, 1, 3, 199, 200, 200])
        var set = Configuration()
        set.warmupSteps = .steps(250)
        #expect(set.resolvedWarmupSteps(totalSteps: 32) == 250, "a set value is never capped")
        #expect(auto.cappedWarmupNote(totalSteps: 32) == "schedule.warmup_steps: default 200 capped to 3 of the run's 32 steps "
            + "(auto warms up over at most a tenth of the run; set schedule.warmup_steps to choose)")
        #expect(auto.cappedWarmupNote(totalSteps: 2000) == nil && set.cappedWarmupNote(totalSteps: 32) == nil)
        let schedule = auto.learningRateSchedule(totalSteps: 32)
        for step in 0..<32 {
            let expected = Self.closedFormRate(atStep: step)
            #expect(abs(schedule.learningRate(atStep: step) - expected) <= 1e-15, "step \(step)")
        }
    }

    @Test func aSetWarmupTheRunCannotHoldIsRefusedWithTheReason() throws {
        func message(_ overrides: [String]) -> String {
            do { try Configuration.load(file: nil, overrides: ["training.epochs=4"] + overrides).validateSchedule(stepsPerEpoch: 8) } catch {
                return "\(error)"
            }
            return "no error"
        }
        #expect(message([]) == "no error")
        #expect(message(["schedule.warmup_steps=31"]) == "no error")
        #expect(message(["schedule.warmup_steps=200", "schedule.name=constant"]) == "no error", "a constant rate has no end to fit")
        #expect(message(["schedule.warmup_steps=32"]) == "schedule.warmup_steps=32 does not fit this run: the cosine schedule "
            + "needs steps after its warmup, and the run has 32 (4 epochs of 8); set schedule.warmup_steps below 32, remove it "
            + "(auto: at most a tenth of the run), or train longer (training.epochs)")
        #expect(message(["schedule.warmup_steps=-1"]) == "schedule.warmup_steps must be >= 0 or auto, got -1")
        var oneStep = Configuration()
        oneStep.epochs = 1
        #expect(throws: Never.self) { try oneStep.validateSchedule(stepsPerEpoch: 1) }
    }

    // MARK: - Through the binary

    /// 512 samples in batches of 64 on one rank: 8 steps an epoch, 4 epochs, 32 steps; the schedule at its defaults.
    func job(_ data: SyntheticData, runDir: String, extra: [String] = []) -> [String] {
        ["train", "--local", "--run-dir", runDir, "--progress", "plain", "--set", "training.epochs=4",
         "--set", "logging.interval=1"] + data.arguments + extra
    }

    /// The learning rate of each training record in metrics.jsonl, by its step (the count of steps done).
    func rates(_ runDir: String) throws -> [Int: Double] {
        var rates: [Int: Double] = [:]
        for line in try String(contentsOfFile: runDir + "/metrics.jsonl", encoding: .utf8).split(separator: "\n") {
            let record = try #require(try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any])
            guard record["type"] as? String == "train" else { continue }
            rates[try #require(record["step"] as? Int)] = try #require(record["lr"] as? Double)
        }
        return rates
    }

    func expectClosedFormRates(_ rates: [Int: Double], steps: ClosedRange<Int>, sourceLocation: SourceLocation = #_sourceLocation) {
        #expect(Set(rates.keys) == Set(steps), sourceLocation: sourceLocation)
        for (step, rate) in rates {
            // The record after step k (1-based) holds the rate that step used: step k - 1, 0-based.
            let expected = Self.closedFormRate(atStep: step - 1)
            #expect(abs(rate - expected) <= 1e-12 * expected, "step \(step): \(rate), expected \(expected)", sourceLocation: sourceLocation)
        }
    }

    /// `data.remainder` defaults to `auto`: a training set smaller than one global batch (50 samples, the default
    /// batch of 64 on 2 ranks) wraps around and trains, saying so, where the dropped remainder left no step and made
    /// the run an error. `drop` set explicitly is still refused with the reason.
    @Test func aSetSmallerThanOneGlobalBatchTrainsOnDefaults() throws {
        let data = try SyntheticData(samples: 50)
        defer { data.remove() }
        #expect(Configuration().remainder == .auto)
        let trained = try Harness.mpirun(2, ["train", "--run-dir", temporaryRunDirectory(), "--progress", "plain"] + data.arguments
                                            + ["--set", "training.epochs=2"])
        #expect(trained.status == 0, "\(trained.output)")
        #expect(trained.output.contains("global batch 128; 1 step per epoch (wrap remainder)"), "\(trained.output)")
        #expect(occurrences(of: "data.remainder: auto wraps the samples around (the training set's 50 do not fill one global batch "
                            + "of 128, and dropping them would leave no step; set data.remainder to choose)", in: trained.output) == 1,
                "\(trained.output)")
        #expect(trained.output.contains("training finished"), "\(trained.output)")
        let refused = try Harness.mpirun(2, ["train", "--run-dir", temporaryRunDirectory()] + data.arguments
                                            + ["--set", "data.remainder=drop"])
        #expect(refused.status == 1, "\(refused.output)")
        #expect(refused.output.contains("the data set has 50 samples, fewer than one global batch of 128"), "\(refused.output)")
    }

    @Test func aShortRunOnDefaultsTrainsWithItsWarmupCapped() throws {
        let data = try SyntheticData(samples: 512)
        defer { data.remove() }
        let run = temporaryRunDirectory()
        let trained = try Harness.local(job(data, runDir: run))
        #expect(trained.status == 0, "\(trained.output)")
        #expect(trained.output.contains("8 steps per epoch (drop remainder), 4 epochs"), "\(trained.output)")
        #expect(occurrences(of: "schedule.warmup_steps: default 200 capped to 3 of the run's 32 steps", in: trained.output) == 1,
                "\(trained.output)")
        #expect(trained.output.contains("training finished"), "\(trained.output)")
        expectClosedFormRates(try rates(run), steps: 1...32)
        let refused = try Harness.local(job(data, runDir: temporaryRunDirectory(), extra: ["--set", "schedule.warmup_steps=200"]))
        #expect(refused.status == 1, "\(refused.output)")
        #expect(refused.output.contains("schedule.warmup_steps=200 does not fit this run: the cosine schedule needs steps after "
            + "its warmup, and the run has 32 (4 epochs of 8)"), "\(refused.output)")
    }

    /// A resume reads `auto` back from config.yaml and caps it as the first run did: resumed from step 10, the run
    /// ends with the uninterrupted run's model, bit for bit, and its rates after the resume follow the closed form.
    @Test func aResumedCappedRunContinuesBitwise() throws {
        let data = try SyntheticData(samples: 512)
        defer { data.remove() }
        let run = temporaryRunDirectory()
        let trained = try Harness.local(job(data, runDir: run, extra: ["--set", "checkpoint.every_steps=10", "--set", "checkpoint.keep=10"]))
        #expect(trained.status == 0, "\(trained.output)")
        let reference = try TrainingTests().parameters(run)
        try FileManager.default.removeItem(atPath: run + "/metrics.jsonl")
        let resumed = try Harness.local(["train", "--local", "--run-dir", run, "--progress", "plain",
                                         "--resume", run + "/checkpoints/step-00000010.safetensors"])
        #expect(resumed.status == 0, "\(resumed.output)")
        #expect(resumed.output.contains("resumed from \(run)/checkpoints/step-00000010.safetensors: step 10"), "\(resumed.output)")
        #expect(resumed.output.contains("schedule.warmup_steps: default 200 capped to 3 of the run's 32 steps"), "\(resumed.output)")
        #expect(try TrainingTests().parameters(run) == reference, "the resumed run must end with the uninterrupted run's model bitwise")
        expectClosedFormRates(try rates(run), steps: 11...32)
    }
}
