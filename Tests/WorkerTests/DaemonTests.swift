import Engine
import Foundation
import Testing
@testable import Worker

/// The daemon survives: each test does the damage for real to a real mpirun job.
@Suite("Checkpoints, preemption and faults", .serialized, .temporaryFiles)
struct DaemonTests {
    /// A job with dropout and AdamW (so optimizer state and RNG state both matter for exact resume), checkpoints
    /// every 7 steps and 3 epochs of 12 steps on 2 ranks (200 samples, global batch 16).
    func job(_ data: SyntheticData, runDir: String, extra: [String] = []) -> [String] {
        ["train", "--run-dir", runDir, "--progress", "plain"] + data.arguments + [
            "--set", "model.hidden=[32, 32]", "--set", "model.dropout=0.1", "--set", "optimizer.name=adamw",
            "--set", "optimizer.lr=0.01", "--set", "schedule.warmup_steps=5", "--set", "training.epochs=3",
            "--set", "training.batch_size=8", "--set", "seed=3", "--set", "logging.interval=5",
            "--set", "checkpoint.every_steps=7", "--set", "data.normalize=scale",
        ] + extra
    }

    func modelBytes(_ runDir: String) throws -> Data {
        try Data(contentsOf: URL(fileURLWithPath: runDir + "/model.safetensors"))
    }

    func parameters(_ path: String) throws -> [String: [Float]] {
        let file = try SafeTensorsFile(path: path)
        var result: [String: [Float]] = [:]
        for name in file.tensors.keys where !name.hasPrefix("optimizer.") { result[name] = try file.floats(name) }
        return result
    }

    func uninterrupted(_ data: SyntheticData) throws -> [String: [Float]] {
        let run = temporaryRunDirectory()
        let r = try Harness.mpirun(2, job(data, runDir: run))
        #expect(r.status == 0, "\(r.output)")
        return try parameters(run + "/model.safetensors")
    }

    /// The pid of a rank, from its heartbeat file.
    func pid(of rank: Int, in runDir: String, timeout: Double = 30) -> Int32? {
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            if let data = FileManager.default.contents(atPath: "\(runDir)/heartbeat/rank-\(rank).json"),
               let record = try? JSONSerialization.jsonObject(with: data) as? [String: Any], let pid = record["pid"] as? Int {
                return Int32(pid)
            }
            usleep(50_000)
        }
        return nil
    }

    /// Sends `signal` to rank `rank`'s own process (its pid from the heartbeat; not to mpirun) once `job`'s output
    /// is `ready`, and waits for the job to end; `secondsAfterSignal` is how long it took to end.
    func signal(rank: Int, _ signal: Int32, of job: Harness.Running, in runDir: String, when ready: (String) -> Bool,
                sourceLocation: SourceLocation = #_sourceLocation) throws -> (result: Harness.Result, secondsAfterSignal: Double) {
        let arrived = job.waitFor(60, ready)
        #expect(arrived, "the job never got there:\n\(job.output)", sourceLocation: sourceLocation)
        let process = try #require(pid(of: rank, in: runDir), sourceLocation: sourceLocation)
        let sent = Date()
        kill(process, signal)
        let result = job.wait(timeout: 60)
        return (result, Date().timeIntervalSince(sent))
    }

    /// kill -9 of rank 1 once `job`'s output is `ready`: the job fails within seconds instead of hanging. Then the
    /// run resumes from its last checkpoint and finishes.
    func killRank1AndResume(_ job: Harness.Running, run: String, when ready: (String) -> Bool,
                            sourceLocation: SourceLocation = #_sourceLocation) throws {
        let killed = try signal(rank: 1, SIGKILL, of: job, in: run, when: ready, sourceLocation: sourceLocation)
        #expect(killed.result.status != 0, sourceLocation: sourceLocation)
        #expect(killed.secondsAfterSignal < 30, sourceLocation: sourceLocation)
        let resumed = try Harness.resume(run)
        #expect(resumed.status == 0, "\(resumed.output)", sourceLocation: sourceLocation)
        #expect(resumed.output.contains("resumed from") && resumed.output.contains("training finished"), "\(resumed.output)",
                sourceLocation: sourceLocation)
    }

    @Test func sigusr1ToMpirunCheckpointsAndResumesExactly() throws {
        let data = try SyntheticData(samples: 200)
        defer { data.remove() }
        let reference = try uninterrupted(data)
        let run = temporaryRunDirectory()
        let stopped = try Harness.startSlowed(2, job(data, runDir: run)).stop(after: "(step 14)")
        #expect(stopped.status == 0, "\(stopped.output)")
        #expect(stopped.output.contains("stopped by SIGUSR1"), "\(stopped.output)")
        #expect(stopped.output.contains("resume with: bpworker train --resume --run-dir \(run)"))
        #expect(!stopped.output.contains("training finished"))
        let status = try String(contentsOfFile: run + "/status.json", encoding: .utf8)
        #expect(status.contains("\"state\" : \"stopped\""))
        let resumed = try Harness.resume(run)
        #expect(resumed.status == 0, "\(resumed.output)")
        #expect(resumed.output.contains("resumed from"))
        #expect(try parameters(run + "/model.safetensors") == reference, "resumed run must equal the uninterrupted one bitwise")
    }

    @Test func sigtermToOneRankCheckpointsAndResumesExactly() throws {
        let data = try SyntheticData(samples: 200)
        defer { data.remove() }
        let reference = try uninterrupted(data)
        let run = temporaryRunDirectory()
        let job = try Harness.startSlowed(2, job(data, runDir: run))
        let stopped = try signal(rank: 1, SIGTERM, of: job, in: run) { $0.contains("epoch 1/3 step 5/12") }.result
        #expect(stopped.status == 0, "\(stopped.output)")
        #expect(stopped.output.contains("stopped by SIGTERM on rank 1 after step"), "\(stopped.output)")
        // status.json names the signal and the rank too (it said "another rank's signal").
        let status = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: run + "/status.json"))) as? [String: Any]
        #expect(status?["state"] as? String == "stopped" && status?["message"] as? String == "stop requested by SIGTERM on rank 1",
                "\(status ?? [:])")
        let resumed = try Harness.resume(run)
        #expect(resumed.status == 0, "\(resumed.output)")
        #expect(try parameters(run + "/model.safetensors") == reference)
        // Every checkpoint kept is complete and the pointer names the newest.
        let latest = try latestCheckpoint(run)
        #expect(latest == "step-00000036.safetensors")
        let kept = try FileManager.default.contentsOfDirectory(atPath: run + "/checkpoints").filter { $0.hasSuffix(".safetensors") }
        #expect(kept.count == 3)
    }

    /// A stop that lands on an epoch's last step: the resume still runs that epoch's evaluation and target check, so
    /// a run that reaches `training.target_accuracy` there stops where the uninterrupted one stops, with its model.
    /// (It used to move on to the next epoch unevaluated and train past the target.)
    @Test func aStopAfterAnEpochsLastStepResumesWithThatEpochsEvaluation() throws {
        let data = try SyntheticData(samples: 200)
        defer { data.remove() }
        let target = ["--set", "training.target_accuracy=0.01"]
        let reference = temporaryRunDirectory()
        let r = try Harness.mpirun(2, job(data, runDir: reference, extra: target))
        #expect(r.status == 0 && r.output.contains("reached training.target_accuracy=0.01 after epoch 1"), "\(r.output)")
        let run = temporaryRunDirectory()
        // Rank 1 signals itself as global step 11 (0-based) begins: the last of epoch 1's 12 steps.
        let stopped = try Harness.mpirun(2, job(data, runDir: run, extra: target), environment: ["BPWORKER_TEST_SIGNAL": "1:11"])
        #expect(stopped.status == 0 && stopped.output.contains("stopped by SIGTERM on rank 1 after step 12"), "\(stopped.output)")
        #expect(!stopped.output.contains("test accuracy"), "\(stopped.output)")
        let resumed = try Harness.resume(run)
        #expect(resumed.status == 0, "\(resumed.output)")
        #expect(resumed.output.contains("epoch 1 at step 12/12 (its evaluation next)"), "\(resumed.output)")
        #expect(resumed.output.contains("epoch 1/3 test accuracy"), "\(resumed.output)")
        #expect(resumed.output.contains("reached training.target_accuracy=0.01 after epoch 1"), "\(resumed.output)")
        #expect(try parameters(run + "/model.safetensors") == parameters(reference + "/model.safetensors"))
    }

    @Test func sigtermToMpirunWithAGracePeriodSavesACheckpoint() throws {
        let data = try SyntheticData(samples: 200)
        defer { data.remove() }
        let run = temporaryRunDirectory()
        // OpenMPI waits odls_base_sigkill_timeout before escalating to SIGKILL: the ranks get time to save.
        let job = try Harness.startSlowed(2, job(data, runDir: run, extra: ["--set", "checkpoint.every_steps=0", "--set", "training.epochs=40"]),
                                          launcherOptions: ["--mca", "odls_base_sigkill_timeout", "10"])
        #expect(job.waitFor { $0.contains("epoch 2/40 step") })
        job.signal(SIGTERM)
        let stopped = job.wait(timeout: 60)
        #expect(stopped.output.contains("stopped by SIGTERM"), "\(stopped.output)")
        #expect(!stopped.output.contains("training finished"))
        // The checkpoint of the stop is complete and resumable.
        let latest = try latestCheckpoint(run)
        let file = try SafeTensorsFile(path: run + "/checkpoints/" + latest)
        #expect(Int(file.metadata["step"] ?? "") ?? 0 >= 10)
        let resumed = try Harness.resume(run)
        #expect(resumed.status == 0, "\(resumed.output)")
    }

    @Test func aKilledRankEndsTheJobAndTheLastCheckpointResumes() throws {
        let data = try SyntheticData(samples: 200)
        defer { data.remove() }
        let reference = try uninterrupted(data)
        let run = temporaryRunDirectory()
        let job = try Harness.startSlowed(2, job(data, runDir: run))
        try killRank1AndResume(job, run: run) { $0.contains("checkpoint: ") && $0.contains("step 14)") }
        #expect(try parameters(run + "/model.safetensors") == reference, "the resumed run must equal the uninterrupted one bitwise")
    }

    @Test func aCrashDuringACheckpointWriteLeavesThePreviousOneIntact() throws {
        let data = try SyntheticData(samples: 200)
        defer { data.remove() }
        let run = temporaryRunDirectory()
        let r = try Harness.mpirun(2, job(data, runDir: run), environment: ["BPWORKER_TEST_CHECKPOINT_CRASH": "21"])
        #expect(r.status != 0)
        let latest = try latestCheckpoint(run)
        #expect(latest == "step-00000014.safetensors")
        let names = try FileManager.default.contentsOfDirectory(atPath: run + "/checkpoints")
        #expect(names.contains { $0.hasSuffix(".tmp") }, "the crash left its half-written temporary file: \(names)")
        #expect(!names.contains("step-00000021.safetensors"))
        _ = try SafeTensorsFile(path: run + "/checkpoints/" + latest)
        let resumed = try Harness.resume(run)
        #expect(resumed.status == 0, "\(resumed.output)")
        #expect(resumed.output.contains("step-00000014.safetensors"))
        // The next checkpoint cleans up the leftover.
        #expect(!(try FileManager.default.contentsOfDirectory(atPath: run + "/checkpoints")).contains { $0.hasSuffix(".tmp") })
    }

    @Test func nanOnOneRankStopsEveryRankAtTheSameStep() throws {
        let data = try SyntheticData(samples: 200)
        defer { data.remove() }
        let run = temporaryRunDirectory()
        let r = try Harness.mpirun(3, job(data, runDir: run), environment: ["BPWORKER_TEST_NAN": "1:11"])
        #expect(r.status != 0)
        // The batch's input is what is not finite (the hook put a NaN into rank 1's first sample): the message says which
        // sample and file.
        let train = data.directory.appendingPathComponent("train-x.idx").path
        #expect(r.output.contains("non-finite loss or gradient at step 12 on rank 1 (the input of sample "), "\(r.output)")
        #expect(r.output.contains(" of data.train_features, in \(train), is not finite); stopped (numerics.policy=stop)"), "\(r.output)")
        #expect(occurrences(of: "non-finite", in: r.output) == 1)
        // The last good state was saved: the parameters before the bad step, all finite.
        let latest = try latestCheckpoint(run)
        let file = try SafeTensorsFile(path: run + "/checkpoints/" + latest)
        #expect(file.metadata["step"] == "11")
        #expect(try file.floats("0.weight").allSatisfy(\.isFinite))
        let status = try String(contentsOfFile: run + "/status.json", encoding: .utf8)
        #expect(status.contains("\"state\" : \"failed\""))
    }

    /// An update with finite gradients that overflows the parameters (SGD at lr 3e38 on raw bytes): the numerics check reads the
    /// loss and gradients, so the checkpoint after that step was written with infinite weights and named "last good
    /// state", and a last step's overflow ended "finished". Now no checkpoint keeps them, and every rank fails naming
    /// the tensors.
    @Test func anUpdateThatOverflowsTheParametersIsNeverCheckpointed() throws {
        let data = try SyntheticData(samples: 200)
        defer { data.remove() }
        let run = temporaryRunDirectory()
        let r = try Harness.mpirun(2, job(data, runDir: run, extra: [
            "--set", "optimizer.name=sgd", "--set", "optimizer.momentum=0", "--set", "optimizer.nesterov=false",
            "--set", "model.dropout=0", "--set", "optimizer.lr=3e38", "--set", "schedule.warmup_steps=0",
            "--set", "checkpoint.every_steps=1", "--set", "data.normalize=none",
        ]))
        #expect(r.status != 0)
        #expect(r.output.contains("the parameters are not finite after step 1's update: 0.weight ("), "\(r.output)")
        #expect(r.output.contains("no checkpoint written. Last good state: none"), "\(r.output)")
        #expect(!FileManager.default.fileExists(atPath: run + "/model.safetensors"))
        let checkpoints = (try? FileManager.default.contentsOfDirectory(atPath: run + "/checkpoints")) ?? []
        #expect(!checkpoints.contains { $0.hasSuffix(".safetensors") }, "\(checkpoints)")
        let status = try String(contentsOfFile: run + "/status.json", encoding: .utf8)
        #expect(status.contains("\"state\" : \"failed\""))
        #expect(status.contains("the parameters are not finite"))
    }

    /// Batch norm's running variance above float32's range (inputs of 1e20, not normalised): computed in float64 and
    /// stored as inf, it reached every checkpoint and the final model of a run that ended "finished". The check before a
    /// checkpoint reads the running statistics too.
    @Test func aRunningStatisticThatOverflowsIsNeverCheckpointed() throws {
        let directory = TemporaryFiles.path("huge-").path
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        let made = try Harness.run("/usr/bin/env", ["python3", "-c", """
            import sys, numpy as np
            rng = np.random.default_rng(4)
            y = rng.integers(0, 3, 96)
            np.save(sys.argv[1] + "/x.npy", (rng.random((96, 6), dtype=np.float32) + y[:, None]) * np.float32(1e20))
            np.save(sys.argv[1] + '/y.npy', y.astype(np.int64))
            """, directory], environment: [:], timeout: 60)
        #expect(made.status == 0, "\(made.output)")
        let run = temporaryRunDirectory()
        let data = ["data.format=npy", "data.train_features=\(directory)/x.npy", "data.train_labels=\(directory)/y.npy",
                    "data.test_features=\(directory)/x.npy", "data.test_labels=\(directory)/y.npy", "data.normalize=none"]
        let r = try Harness.mpirun(2, ["train", "--run-dir", run, "--progress", "plain"] + data.flatMap { ["--set", $0] } + [
            "--set", "model.layers=[linear 8, batchnorm, relu, linear 3]", "--set", "training.batch_size=8", "--set", "training.epochs=2"])
        #expect(r.status == 1, "\(r.output)")
        #expect(r.output.contains("batch norm's running statistics are not finite after step 6's update: 1.running_var ("),
                "\(r.output)")
        #expect(!FileManager.default.fileExists(atPath: run + "/model.safetensors"))
    }

    @Test func nanOnOneRankIsSkippedEverywhereUnderTheSkipPolicy() throws {
        let data = try SyntheticData(samples: 200)
        defer { data.remove() }
        let run = temporaryRunDirectory()
        let r = try Harness.mpirun(3, job(data, runDir: run, extra: ["--set", "numerics.policy=skip",
                                                                   "--set", "training.replica_check_every=1"]),
                                   environment: ["BPWORKER_TEST_NAN": "2:11"])
        #expect(r.status == 0, "\(r.output)")
        #expect(r.output.contains("non-finite loss or gradient at step 12 on rank 2 (the input of sample "), "\(r.output)")
        #expect(r.output.contains("is not finite): step skipped on every rank (1 of at most 10"), "\(r.output)")
        #expect(r.output.contains("training finished"))
        #expect(try parameters(run + "/model.safetensors").values.allSatisfy { $0.allSatisfy(\.isFinite) })
        // Past the limit the skip policy stops too.
        let strict = try Harness.mpirun(2, job(data, runDir: temporaryRunDirectory(),
                                               extra: ["--set", "numerics.policy=skip", "--set", "numerics.max_skips=0"]),
                                        environment: ["BPWORKER_TEST_NAN": "0:3"])
        #expect(strict.status != 0)
        #expect(strict.output.contains("more than 0 skipped steps (numerics.max_skips)"))
    }

    /// Every rank applying the whole update (allreduce), a replica's drift persists and the periodic check
    /// stops the job naming it. The sharded update copies every parameter from its owner at each step, which
    /// overwrites the drifted copy (rank 2 does not own parameter 0): the same fault leaves the replicas equal.
    @Test func aDivergedReplicaIsAnErrorNamingTheRank() throws {
        let data = try SyntheticData(samples: 200)
        defer { data.remove() }
        let check = ["--set", "training.replica_check_every=5"]
        let r = try Harness.mpirun(3, job(data, runDir: temporaryRunDirectory(), extra: check + ["--set", "training.reduction=allreduce"]),
                                   environment: ["BPWORKER_TEST_DIVERGE": "2:7"])
        #expect(r.status != 0)
        #expect(r.output.contains("replicas diverged at step 10: the parameters of rank 2 differ from rank 0's"), "\(r.output)")
        let healed = try Harness.mpirun(3, job(data, runDir: temporaryRunDirectory(), extra: check),
                                        environment: ["BPWORKER_TEST_DIVERGE": "2:7"])
        #expect(healed.status == 0, "\(healed.output)")
        #expect(!healed.output.contains("replicas diverged"))
    }

    @Test func aStalledRankTriggersTheWatchdog() throws {
        let data = try SyntheticData(samples: 200)
        defer { data.remove() }
        let run = temporaryRunDirectory()
        let r = try Harness.mpirun(2, job(data, runDir: run, extra: ["--set", "watchdog.timeout_seconds=3"]),
                                   environment: ["BPWORKER_TEST_STALL": "1:9:60"], timeout: 60)
        expectStalled(r, rank: 0, phase: "gradient allreduce", step: 9, notArrived: "rank 1 (computing at step 9")
        // Stalled after the exchange: the other rank waits in the sharded update's parameter gather.
        let gather = try Harness.mpirun(2, job(data, runDir: temporaryRunDirectory(), extra: ["--set", "watchdog.timeout_seconds=3"]),
                                        environment: ["BPWORKER_TEST_STALL": "1:9:60:after-exchange"], timeout: 60)
        expectStalled(gather, rank: 0, phase: "update and parameter gather", step: 9)
        // Stalled before a checkpoint: the other rank waits in its first agreement (whether the data and the run
        // directory are unchanged), which was outside every watched phase: the job waited for ever in "computing".
        let checkpoint = try Harness.mpirun(2, job(data, runDir: temporaryRunDirectory(), extra: ["--set", "watchdog.timeout_seconds=3"]),
                                            environment: ["BPWORKER_TEST_STALL": "1:7:60:checkpoint"], timeout: 60)
        expectStalled(checkpoint, rank: 0, phase: "checkpoint", step: 6, notArrived: "rank 1 (computing at step 6")
        // And before `train --gradcheck`'s agreement on the check's batch, unwatched as well.
        let check = try Harness.mpirun(2, job(data, runDir: temporaryRunDirectory(), extra: ["--gradcheck", "--set", "watchdog.timeout_seconds=3"]),
                                       environment: ["BPWORKER_TEST_STALL": "1:0:60:gradcheck"], timeout: 60)
        expectStalled(check, rank: 0, phase: "gradient check", step: 0, notArrived: "rank 1 (computing at step 0")
    }

    /// The watchdog bounds a batch of an evaluation, not the whole test set: an evaluation three times longer than the
    /// timeout, each batch shorter, finishes (it ended the healthy job). And a rank that stalls as the run finishes,
    /// after its last checkpoint, or during setup, is reported there instead of leaving the others waiting for ever.
    @Test func aLongEvaluationPassesAndAStallAtTheEndIsReported() throws {
        let data = try SyntheticData(samples: 200)
        defer { data.remove() }
        let watchdog = ["--set", "watchdog.timeout_seconds=2", "--set", "training.epochs=1"]
        let long = try Harness.mpirun(2, job(data, runDir: temporaryRunDirectory(), extra: watchdog),
                                      environment: ["BPWORKER_TEST_EVAL_SLEEP_MS": "500"], timeout: 90)
        #expect(long.status == 0 && long.output.contains("epoch 1/1 test accuracy") && !long.output.contains("stall"), "\(long.output)")
        let stalled = try Harness.mpirun(2, job(data, runDir: temporaryRunDirectory(), extra: watchdog),
                                         environment: ["BPWORKER_TEST_STALL": "1:11:60:finish"], timeout: 60)
        expectStalled(stalled, rank: 0, phase: "report", step: 11)
        // Later still: a rank frozen after rank 0 wrote the run's end left rank 0 in MPI_Finalize for ever.
        let last = try Harness.mpirun(2, job(data, runDir: temporaryRunDirectory(), extra: watchdog),
                                      environment: ["BPWORKER_TEST_STALL": "1:11:60:finalize"], timeout: 60)
        expectStalled(last, rank: 0, phase: "finalize (rank 0's last writes, MPI_Finalize)", step: 11)
        // Before the run's watchdog starts: a rank stalled in setup (before it reads the data) leaves the other
        // waiting in setup's agreement, which is timed too (it waited for ever).
        let setup = try Harness.mpirun(2, job(data, runDir: temporaryRunDirectory(), extra: watchdog),
                                       environment: ["BPWORKER_TEST_STALL": "1:0:60:setup"], timeout: 60)
        #expect(setup.status != 0 && setup.seconds < 30, "\(setup.output)")
        #expect(setup.output.contains("[rank 0] error: stall: rank 0 has waited ") && setup.output.contains(" s in setup (data) for the "
                + "other ranks (watchdog.timeout_seconds=2.0): a rank has not arrived; aborting the job"), "\(setup.output)")
    }

    /// `eval` and `gradcheck` have no run of their own to watch, but their waits are timed too: a rank frozen in
    /// their setup, or before `eval`'s sums, left the others waiting for ever. Each ends within the timeout.
    @Test func evalAndGradcheckEndAStalledJob() throws {
        let data = try SyntheticData(samples: 200)
        defer { data.remove() }
        let run = temporaryRunDirectory()
        let trained = try Harness.mpirun(2, job(data, runDir: run, extra: ["--set", "training.epochs=1"]))
        try #require(trained.status == 0, "\(trained.output)")
        let timeout = ["--set", "watchdog.timeout_seconds=2"]
        let cases: [(String, [String], String, String)] = [
            ("eval, its setup", ["eval", "--run-dir", run] + timeout, "1:0:60:setup", "s in eval (data) for the other ranks"),
            ("eval, its sums", ["eval", "--run-dir", run] + timeout, "1:0:60:eval", "s in eval (evaluation sums) for the other ranks"),
            ("eval --model, its sums", ["eval", "--run-dir", run, "--model", run + "/model.safetensors"] + data.arguments + timeout,
             "0:0:60:eval", "s in eval (evaluation sums) for the other ranks"),
            ("gradcheck, its setup", ["gradcheck", "--run-dir", temporaryRunDirectory(), "--set", "model.hidden=[8]"] + data.arguments + timeout,
             "1:0:60:setup", "s in setup (data) for the other ranks"),
        ]
        for (name, arguments, stall, expected) in cases {
            let r = try Harness.mpirun(2, arguments, environment: ["BPWORKER_TEST_STALL": stall], timeout: 60)
            #expect(r.status != 0 && r.seconds < 30, "\(name): \(r.output)")
            #expect(r.output.contains("error: stall: rank ") && r.output.contains(expected)
                    && r.output.contains("(watchdog.timeout_seconds=2.0): a rank has not arrived; aborting the job"), "\(name): \(r.output)")
        }
        // Unstalled, eval passes under the same timeout.
        let healthy = try Harness.mpirun(2, ["eval", "--run-dir", run] + timeout)
        #expect(healthy.status == 0 && healthy.output.contains("eval: test accuracy"), "\(healthy.output)")
    }

    /// `--resume` of a run that has finished trains nothing and keeps what its status says of it: the run's epoch, its
    /// last checkpoint, loss and accuracies (they were rewritten as epoch 0, no checkpoint, no loss).
    @Test func resumingAFinishedRunKeepsItsStatus() throws {
        let data = try SyntheticData(samples: 200)
        defer { data.remove() }
        let run = temporaryRunDirectory()
        let first = try Harness.mpirun(2, job(data, runDir: run, extra: ["--set", "training.epochs=2"]))
        #expect(first.status == 0, "\(first.output)")
        let before = try RunStatusFields(run)
        let again = try Harness.resume(run)
        #expect(again.status == 0, "\(again.output)")
        let after = try RunStatusFields(run)
        #expect(after.state == "finished" && after.epoch == before.epoch && after.step == before.step, "\(after) vs \(before)")
        #expect(after.lastCheckpoint == before.lastCheckpoint && after.lastCheckpoint != nil)
        #expect(after.loss == before.loss && after.testAccuracy == before.testAccuracy && after.testAccuracy != nil)
    }

    /// A run directory removed under a running job: the next checkpoint finds its lock gone and ends the run, saying
    /// so (it went on into a new directory without config or metrics, ended "finished", and a second job could start).
    @Test func aRunDirectoryRemovedMidRunEndsTheRun() throws {
        let data = try SyntheticData(samples: 200)
        defer { data.remove() }
        let run = temporaryRunDirectory()
        let job = try Harness.startMPI(2, job(data, runDir: run), environment: ["BPWORKER_TEST_STEP_SLEEP_MS": "40"])
        #expect(job.waitFor(60) { $0.contains("checkpoint: ") }, "\(job.output)")
        try FileManager.default.removeItem(atPath: run)
        let r = job.wait(timeout: 90)
        #expect(r.status == 1, "\(r.output)")
        #expect(r.output.contains("\(run) was removed or replaced while the run trained"), "\(r.output)")
        #expect(!FileManager.default.fileExists(atPath: run + "/model.safetensors"))
    }

    /// `cluster/mpirun-multinode --max-restarts 2` on this machine (a hostfile of `localhost`, 2 ranks) for the
    /// arguments of a `train` job (the launcher adds `train` itself), each step slowed by `stepSleepMs`.
    /// The launcher leads a process group of its own (Foundation's `Process` starts each child so), as a job started
    /// from a terminal does.
    /// `host` names this machine in the hostfile; `environment` adds to the launcher's.
    func startLauncher(_ train: [String], stepSleepMs: Int, host: String = "localhost",
                       environment: [String: String] = [:]) throws -> Harness.Running {
        let hosts = TemporaryFiles.path("hosts-")
        try Data("\(host) slots=2\n".utf8).write(to: hosts)
        let launcher = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent().appendingPathComponent("cluster/mpirun-multinode").path
        return try Harness.start("/bin/bash", [launcher, "--max-restarts", "2"] + train.dropFirst(), environment: [
            "HOSTFILE": hosts.path, "IFACE": "lo", "RANKS_PER_NODE": "2", "CORES_PER_NODE": "2", "BPWORKER": Harness.executable.path,
            "BPWORKER_TEST_STEP_SLEEP_MS": "\(stepSleepMs)", "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
        ].merging(environment) { $1 })
    }

    /// A stop that reaches the launcher between attempts, while it asks which hosts still answer (no mpirun is running
    /// to take it): no further attempt starts, the launcher says so and exits with the failed attempt's status. The
    /// hostfile names this machine by its address, which mpirun takes for local and the launcher checks through
    /// HOST_CHECK: here a script that marks that it runs, then takes 3 s.
    @Test func aStopBetweenAttemptsStartsNoOther() throws {
        let addresses = try Harness.run("/bin/hostname", ["-I"], environment: [:], timeout: 10).output
        guard let address = addresses.split(separator: " ").map(String.init).first(where: { $0.contains(".") && !$0.hasPrefix("127.") })
        else {
            print("skipped: this machine has no IPv4 address but loopback (hostname -I: \(addresses))")
            return
        }
        let data = try SyntheticData(samples: 200)
        defer { data.remove() }
        let run = temporaryRunDirectory()
        let checking = TemporaryFiles.path("checking-").path, check = TemporaryFiles.path("host-check-").path
        try Data("#!/bin/sh\ntouch '\(checking)'\nsleep 3\n".utf8).write(to: URL(fileURLWithPath: check))
        chmod(check, 0o755)
        let launched = try startLauncher(job(data, runDir: run, extra: ["--set", "training.epochs=30"]), stepSleepMs: 50,
                                         host: address, environment: ["HOST_CHECK": check])
        #expect(launched.waitFor(60) { $0.contains("checkpoint: ") }, "\(launched.output)")
        let heartbeat = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: run + "/heartbeat/rank-1.json"))) as? [String: Any]
        kill(pid_t(try #require(heartbeat?["pid"] as? Int)), SIGKILL)
        let deadline = Date().addingTimeInterval(60)
        while !FileManager.default.fileExists(atPath: checking) && Date() < deadline { usleep(50_000) }
        #expect(FileManager.default.fileExists(atPath: checking), "the launcher never checked its host: \(launched.output)")
        launched.signal(SIGTERM)
        let r = launched.wait(timeout: 60)
        #expect(r.status != 0, "\(r.output)")
        #expect(r.output.contains("mpirun-multinode: a stop signal arrived between attempts: not restarted; continue with --resume (step-"),
                "\(r.output)")
        #expect(occurrences(of: "run directory: ", in: r.output) == 1, "a second attempt started: \(r.output)")
    }

    /// `cluster/mpirun-multinode` on this machine (a hostfile of `localhost`): a SIGTERM to the launcher stops the run
    /// with a checkpoint, and the launcher exits 0, as its header says of a stop (mpirun's own exit after a forwarded
    /// SIGTERM is 1, which the launcher passed on). The same sent to the launcher's whole process group (Ctrl-C in a
    /// terminal, `timeout`): mpirun got it directly as well as forwarded, took the second as "abort now", and the ranks
    /// died without their checkpoint, leaving the run `training`. mpirun now runs in a session of its own, and the
    /// launcher's one forward stops the run cleanly.
    @Test(arguments: [false, true])
    func aStopToTheLauncherExitsZeroWithACheckpoint(toItsProcessGroup: Bool) throws {
        let data = try SyntheticData(samples: 200)
        defer { data.remove() }
        let run = temporaryRunDirectory()
        let job = try startLauncher(job(data, runDir: run, extra: ["--set", "training.epochs=30"]), stepSleepMs: 20)
        #expect(job.waitFor(60) { $0.contains("checkpoint: ") }, "\(job.output)")
        if toItsProcessGroup { job.signalGroup(SIGTERM) } else { job.signal(SIGTERM) }
        let r = job.wait(timeout: 60)
        #expect(r.status == 0, "\(r.output)")
        #expect(r.output.contains("mpirun-multinode: stopped by a signal with a checkpoint"), "\(r.output)")
        #expect(try String(contentsOfFile: run + "/status.json", encoding: .utf8).contains("\"state\" : \"stopped\""))
    }

    /// A stop to the launcher during the gradient check before the first step: the run stops with no checkpoint, and
    /// the launcher says to run the same command again (it said "with a checkpoint (no checkpoint); continue with
    /// --resume", and a resume has nothing to resume from) and exits 0.
    @Test func aStopToTheLauncherDuringTheGradientCheckSaysToStartOver() throws {
        let data = try SyntheticData(samples: 200)
        defer { data.remove() }
        let run = temporaryRunDirectory()
        // 270,000 parameters, every one checked: minutes of check.
        let job = try startLauncher(job(data, runDir: run, extra: ["--gradcheck", "--set", "gradcheck.all=true",
                                                                   "--set", "model.hidden=[512, 512]"]), stepSleepMs: 0)
        #expect(job.waitFor(60) { $0.contains("run directory: ") }, "\(job.output)")
        usleep(1_000_000)
        job.signal(SIGTERM)
        let r = job.wait(timeout: 60)
        #expect(r.status == 0, "\(r.output)")
        #expect(r.output.contains("mpirun-multinode: stopped by a signal before the first checkpoint (during the gradient check); "
            + "run the same command again to start over"), "\(r.output)")
        #expect(!r.output.contains("continue with --resume"), "\(r.output)")
    }

    /// The launcher killed outright (SIGKILL, nothing to trap): mpirun, in a session of its own, is told by the kernel
    /// (`setpriv --pdeathsig TERM`) and the run stops with its checkpoint, instead of training on as an orphan that
    /// holds the run directory's lock.
    @Test func aKilledLauncherLeavesNoJobBehind() throws {
        let data = try SyntheticData(samples: 200)
        defer { data.remove() }
        let run = temporaryRunDirectory()
        let job = try startLauncher(job(data, runDir: run, extra: ["--set", "training.epochs=30"]), stepSleepMs: 20)
        #expect(job.waitFor(60) { $0.contains("checkpoint: ") }, "\(job.output)")
        job.signal(SIGKILL)
        let deadline = Date().addingTimeInterval(30)
        var state = ""
        while Date() < deadline {
            state = (try? String(contentsOfFile: run + "/status.json", encoding: .utf8)) ?? ""
            if state.contains("\"state\" : \"stopped\"") && !RunDirectoryLock.isHeld(run) { break }
            usleep(200_000)
        }
        #expect(state.contains("\"state\" : \"stopped\""), "\(state)\n\(job.output)")
        #expect(!RunDirectoryLock.isHeld(run), "a job still holds \(run)")
        _ = job.wait(timeout: 60)
    }

    /// The launcher's restarts keep the caller's `--resume PATH` until the job writes a checkpoint of its own: in a
    /// directory whose earlier run had newer checkpoints, a rank killed before the first one of this job was restarted
    /// from that earlier run's latest, under the new settings.
    @Test func theLauncherRestartsFromTheCallersCheckpointUntilItWritesItsOwn() throws {
        let data = try SyntheticData(samples: 200)
        defer { data.remove() }
        let run = temporaryRunDirectory()
        let earlier = try Harness.mpirun(2, job(data, runDir: run, extra: ["--set", "checkpoint.keep=20"]))
        #expect(earlier.status == 0, "\(earlier.output)")
        // From step 7 of 36 (checkpoints every 7 steps and at epoch ends): rank 1 is killed at step 10, before this
        // job's first checkpoint (12).
        let from = run + "/checkpoints/step-00000007.safetensors"
        let launched = try startLauncher(job(data, runDir: run, extra: ["--resume", from, "--set", "optimizer.lr=0.02"]), stepSleepMs: 150)
        #expect(launched.waitFor(60) { $0.contains("step 10/12") }, "\(launched.output)")
        let heartbeat = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: run + "/heartbeat/rank-1.json"))) as? [String: Any]
        let pid = try #require(heartbeat?["pid"] as? Int)
        kill(pid_t(pid), SIGKILL)
        let r = launched.wait(timeout: 120)
        #expect(r.status == 0, "\(r.output)")
        #expect(occurrences(of: "resumed from \(from): step 7,", in: r.output) == 2, "\(r.output)")
        #expect(!r.output.contains("resumed from \(run)/checkpoints/step-00000036"), "\(r.output)")
    }

    @Test func resumingOnAnotherWorldSizeSaysWhatChanges() throws {
        let data = try SyntheticData(samples: 200)
        defer { data.remove() }
        let run = temporaryRunDirectory()
        #expect(try Harness.startSlowed(2, job(data, runDir: run)).stop(after: "(step 14)").status == 0)
        let stoppedAt = try stopStep(run)
        let resumed = try Harness.resume(run, ranks: 4)
        #expect(resumed.status == 0, "\(resumed.output)")
        #expect(resumed.output.contains("resuming a 2-rank checkpoint (batch 8 per rank) on 4 ranks (batch 8): global batch 16 -> 32"))
        // 12 steps of 16 per epoch before, 6 of 32 after: the samples seen this epoch, in whole new batches.
        let seen = (stoppedAt % 12) * 16
        let expected = (stoppedAt / 12) * 6 + seen / 32
        #expect(resumed.output.contains("resumed from \(run)/checkpoints/step-\(String(format: "%08d", stoppedAt)).safetensors: "
            + "step \(expected), epoch \(stoppedAt / 12 + 1) at step \(seen / 32)/6,"), "\(resumed.output)")
        #expect(resumed.output.contains("training finished"))
        #expect(!resumed.output.contains("model.batchnorm=local"), "no batch norm, nothing to say")
        // With batch norm normalising each rank's own batch, a batch of another size normalises other samples: said.
        let normed = temporaryRunDirectory()
        let bn = ["--set", "model.layers=[linear 16, batchnorm, relu]"]
        #expect(try Harness.startSlowed(2, job(data, runDir: normed, extra: bn)).stop(after: "(step 14)").status == 0)
        let other = try Harness.mpirun(4, ["train", "--run-dir", normed, "--resume", "--progress", "plain", "--set", "training.batch_size=4"])
        #expect(other.status == 0, "\(other.output)")
        #expect(other.output.contains("model.batchnorm=local: each rank now normalises batches of 4, not 8, so the run continues "
                                      + "but not as it would have on 2 ranks"), "\(other.output)")
    }

    /// The step a stopped run's last checkpoint holds, from `checkpoints/latest`.
    func stopStep(_ run: String) throws -> Int {
        let latest = try String(contentsOfFile: run + "/checkpoints/latest", encoding: .utf8)
        return try #require(Int(latest.dropFirst("step-".count).prefix(8)))
    }

    /// With the same global batch on another world size the sample order is the same, and dropout masks are drawn per
    /// (seed, epoch, sample), so the resumed run must end where an uninterrupted one ends (N ranks equal one rank, to
    /// float rounding), dropout on: a resumed position off by one step, a step seen twice, or masks drawn anew, move
    /// the model far more than that.
    @Test func resumingOnAnotherWorldSizeWithTheSameGlobalBatchContinuesTheSameRun() throws {
        let data = try SyntheticData(samples: 200)
        defer { data.remove() }
        let dropout = ["--set", "model.dropout=0.3"]
        let referenceRun = temporaryRunDirectory()
        let r = try Harness.mpirun(2, job(data, runDir: referenceRun, extra: dropout))
        #expect(r.status == 0, "\(r.output)")
        let reference = try parameters(referenceRun + "/model.safetensors")
        let run = temporaryRunDirectory()
        #expect(try Harness.startSlowed(2, job(data, runDir: run, extra: dropout)).stop(after: "(step 14)").status == 0)
        let stoppedAt = try stopStep(run)
        let resumed = try Harness.local(["train", "--run-dir", run, "--resume", "--progress", "plain", "--set", "training.batch_size=16"])
        #expect(resumed.status == 0, "\(resumed.output)")
        #expect(resumed.output.contains("global batch 16 -> 16, 12 steps per epoch"), "\(resumed.output)")
        #expect(resumed.output.contains(": step \(stoppedAt), epoch \(stoppedAt / 12 + 1) at step \(stoppedAt % 12)/12,"), "\(resumed.output)")
        let model = try parameters(run + "/model.safetensors")
        #expect(model.keys.sorted() == reference.keys.sorted())
        for (name, values) in reference {
            let other = try #require(model[name])
            let difference = zip(values, other).map { Double(abs($0 - $1)) }.reduce(0, +)
            let size = values.map { Double(abs($0)) }.reduce(0, +)
            #expect(difference / size <= 1e-5, "\(name): relative difference \(difference / size)")
        }
    }

    /// Dropout masks drawn per (seed, epoch, sample): 2 and 4 ranks with batch 16 / N train the model one rank trains
    /// with batch 16, dropout on (to float rounding, over 3 epochs of 12 steps), and dropout does change that model.
    @Test func dropoutKeepsNRanksEqualToOneRank() throws {
        let data = try SyntheticData(samples: 200)
        defer { data.remove() }
        func trained(ranks: Int, dropout: Double) throws -> [String: [Float]] {
            let run = temporaryRunDirectory()
            let extra = ["--set", "model.dropout=\(dropout)", "--set", "training.batch_size=\(16 / ranks)", "--set", "checkpoint.every_steps=0"]
            let r = ranks == 1 ? try Harness.local(job(data, runDir: run, extra: extra) + ["--local"])
                               : try Harness.mpirun(ranks, job(data, runDir: run, extra: extra))
            #expect(r.status == 0, "\(r.output)")
            return try parameters(run + "/model.safetensors")
        }
        func relative(_ a: [String: [Float]], _ b: [String: [Float]]) -> Double {
            let difference = a.map { name, values in zip(values, b[name] ?? []).map { Double(abs($0 - $1)) }.reduce(0, +) }.reduce(0, +)
            return difference / a.values.map { $0.map { Double(abs($0)) }.reduce(0, +) }.reduce(0, +)
        }
        let one = try trained(ranks: 1, dropout: 0.3)
        for ranks in [2, 4] {
            #expect(relative(one, try trained(ranks: ranks, dropout: 0.3)) <= 1e-5, "\(ranks) ranks")
        }
        #expect(relative(one, try trained(ranks: 1, dropout: 0)) > 1e-3, "dropout must change what is trained")
    }

    @Test func sigusr2IsAStopRequestToo() throws {
        let data = try SyntheticData(samples: 200)
        defer { data.remove() }
        let run = temporaryRunDirectory()
        let job = try Harness.start(Harness.executable.path, job(data, runDir: run) + ["--local"],
                                    environment: ["BPWORKER_TEST_STEP_SLEEP_MS": "50"])
        #expect(job.waitFor { $0.contains("step 5/25") })
        job.signal(SIGUSR2)
        let r = job.wait(timeout: 30)
        #expect(r.status == 0, "\(r.output)")
        #expect(r.output.contains("stopped by SIGUSR2"))
        #expect(FileManager.default.fileExists(atPath: run + "/checkpoints/latest"))
    }

    @Test func aSecondSigintExitsAtOnce() throws {
        let data = try SyntheticData(samples: 200)
        defer { data.remove() }
        let run = temporaryRunDirectory()
        let job = try Harness.start(Harness.executable.path, job(data, runDir: run, extra: ["--set", "training.epochs=40"]) + ["--local"],
                                    environment: ["BPWORKER_TEST_STEP_SLEEP_MS": "200"])
        #expect(job.waitFor { $0.contains("step 5/25") })
        job.signal(SIGINT)
        usleep(20_000)
        job.signal(SIGINT)
        let r = job.wait(timeout: 10)
        #expect(r.status == 130)
        #expect(!r.output.contains("stopped by"))
        #expect(r.seconds < 10)
    }

    /// The steps after which a run's output says it wrote a checkpoint ("checkpoint: PATH (step N)").
    func checkpointSteps(_ output: String) -> [Int] {
        output.split(separator: "\n").compactMap { line in
            guard line.hasPrefix("checkpoint: "), let open = line.lastIndex(of: "(") else { return nil }
            return Int(line[open...].dropFirst("(step ".count).dropLast())
        }
    }

    /// checkpoint.every_seconds is decided by rank 0's clock and travels in the step's control values: every rank
    /// checkpoints after the same step whatever its own clock says. BPWORKER_TEST_CLOCK_OFFSET runs one rank's clock
    /// 1000 s ahead. The job has 12 steps per epoch, with a checkpoint at every epoch end; any other comes from the clock.
    @Test func timeBasedCheckpointsAreRank0sDecisionAtTheSameStepOnEveryRank() throws {
        let data = try SyntheticData(samples: 200)
        defer { data.remove() }
        let reference = try uninterrupted(data)
        let byTime = ["--set", "checkpoint.every_steps=0", "--set", "checkpoint.keep=100", "--set", "watchdog.timeout_seconds=10"]
        let epochEnds = [12, 24, 36]

        // A real run: steps of at least 40 ms, an epoch of at least 480 ms, so 0.2 s pass inside every epoch. Rank 1's
        // clock says a checkpoint is due at every step: had it decided for itself, it would enter the collective save
        // alone and the watchdog would end the job.
        let run = temporaryRunDirectory()
        let r = try Harness.mpirun(2, job(data, runDir: run, extra: byTime + ["--set", "checkpoint.every_seconds=0.2"]),
                                   environment: ["BPWORKER_TEST_STEP_SLEEP_MS": "40", "BPWORKER_TEST_CLOCK_OFFSET": "1:1000"])
        #expect(r.status == 0, "\(r.output)")
        let steps = checkpointSteps(r.output)
        for epoch in 0..<3 {
            #expect(steps.contains { $0 > 12 * epoch && $0 < 12 * epoch + 12 }, "no time-based checkpoint in epoch \(epoch + 1): \(steps)")
        }
        #expect(try parameters(run + "/model.safetensors") == reference, "checkpoints by time must not change the training")

        // Rank 1's clock alone says due at every step, rank 0's never: no checkpoint but the epoch ends.
        let rank1 = try Harness.mpirun(2, job(data, runDir: temporaryRunDirectory(), extra: byTime + ["--set", "checkpoint.every_seconds=1000"]),
                                       environment: ["BPWORKER_TEST_CLOCK_OFFSET": "1:1000"])
        #expect(rank1.status == 0, "\(rank1.output)")
        #expect(checkpointSteps(rank1.output) == epochEnds)

        // Rank 0's clock alone says due at every step: both ranks checkpoint after every step.
        let rank0 = try Harness.mpirun(2, job(data, runDir: temporaryRunDirectory(), extra: byTime + ["--set", "checkpoint.every_seconds=1000"]),
                                       environment: ["BPWORKER_TEST_CLOCK_OFFSET": "0:1000"])
        #expect(rank0.status == 0, "\(rank0.output)")
        #expect(checkpointSteps(rank0.output) == Array(1...36))
    }

    @Test func statusCommandReportsTheRun() throws {
        let data = try SyntheticData(samples: 100)
        defer { data.remove() }
        let run = temporaryRunDirectory()
        #expect(try Harness.local(job(data, runDir: run) + ["--local"]).status == 0)
        let s = try Harness.local(["status", run])
        #expect(s.status == 0)
        #expect(s.output.contains("state: finished"))
        #expect(s.output.contains("step 36/36, epoch 3/3, 1 rank"))
        #expect(s.output.contains("last checkpoint: \(run)/checkpoints/step-00000036.safetensors"))
        let missing = try Harness.local(["status", "/nonexistent"])
        #expect(missing.status == 1 && missing.output == "error: /nonexistent: no such run directory\n", "\(missing.output)")
        // A damaged status.json: one line naming the file and what is wrong, exit 1 (it was exit 64 with the usage text
        // and the decoder's own words), and a loss of 1e35 in a good one is printed, not a crash or 36 digits.
        let statusFile = run + "/status.json"
        let good = try Data(contentsOf: URL(fileURLWithPath: statusFile))
        for (bytes, reason) in [(good.prefix(good.count / 2), "not valid JSON (truncated or damaged?)"), (Data("{}".utf8), "'state' is missing")] {
            try bytes.write(to: URL(fileURLWithPath: statusFile))
            let damaged = try Harness.local(["status", run])
            #expect(damaged.status == 1 && damaged.output == "error: \(statusFile): unreadable status: \(reason)\n", "\(damaged.output)")
        }
        var record = try #require(try JSONSerialization.jsonObject(with: good) as? [String: Any])
        record["loss"] = 6.37e35
        record["samplesPerSecond"] = 1e300
        try JSONSerialization.data(withJSONObject: record).write(to: URL(fileURLWithPath: statusFile))
        let huge = try Harness.local(["status", run])
        #expect(huge.status == 0 && huge.output.contains("loss 6.37e+35") && huge.output.contains("1e+300 samples/s"), "\(huge.output)")
    }
}

@Suite("Corrupt checkpoints", .serialized, .temporaryFiles)
struct CorruptCheckpointTests {
    /// Resumes from a damaged copy of a real checkpoint: a clear error naming the file, a non-zero exit on every
    /// rank, no crash, and nothing in the run directory changed.
    @Test func everyKindOfDamageIsAClearError() throws {
        let data = try SyntheticData(samples: 64)
        defer { data.remove() }
        let run = temporaryRunDirectory()
        let args = ["train", "--run-dir", run, "--progress", "plain"] + data.arguments + [
            "--set", "model.hidden=[16]", "--set", "training.epochs=1", "--set", "training.batch_size=8",
            "--set", "optimizer.name=adam", "--set", "schedule.warmup_steps=0", "--set", "checkpoint.every_steps=0"]
        let first = try Harness.mpirun(2, args)
        #expect(first.status == 0, "\(first.output)")
        let good = run + "/checkpoints/step-00000004.safetensors"
        let bytes = try Data(contentsOf: URL(fileURLWithPath: good))
        let headerLength = Int(bytes.prefix(8).withUnsafeBytes { UInt64(littleEndian: $0.loadUnaligned(as: UInt64.self)) })
        let header = String(decoding: bytes[8..<(8 + headerLength)], as: UTF8.self)
        let payload = bytes[(8 + headerLength)...]

        func variant(_ name: String, header newHeader: String? = nil, payload newPayload: Data? = nil,
                     length: UInt64? = nil, raw: Data? = nil) throws -> String {
            let path = run + "/" + name + ".safetensors"
            if let raw { try raw.write(to: URL(fileURLWithPath: path)); return path }
            let h = Data((newHeader ?? header).utf8)
            var file = Data()
            withUnsafeBytes(of: (length ?? UInt64(h.count)).littleEndian) { file.append(contentsOf: $0) }
            try (file + h + (newPayload ?? Data(payload))).write(to: URL(fileURLWithPath: path))
            return path
        }
        // A model of another width, and one with a tensor's dtype and one with a tensor missing.
        var other = SafeTensorsWriter()
        let ones = [Float](repeating: 1, count: 12 * 17)
        ones.withUnsafeBufferPointer { other.add(name: "0.weight", shape: [17, 12], floats: UnsafeBufferPointer(rebasing: $0[0..<(12 * 17)])) }
        try other.write(to: run + "/other-shape.safetensors")
        // The header without its checksums, as an earlier version wrote it.
        var parsed = try #require(try JSONSerialization.jsonObject(with: Data(header.utf8)) as? [String: Any])
        var meta = try #require(parsed["__metadata__"] as? [String: String])
        meta = meta.filter { !$0.key.hasPrefix("bpworker_") }
        parsed["__metadata__"] = meta
        let unchecked = String(decoding: try JSONSerialization.data(withJSONObject: parsed, options: [.sortedKeys]), as: UTF8.self)
        let file = try SafeTensorsFile(path: good)
        let biasRange = try #require(file.tensors["0.bias"]).byteRange
        let cases: [(String, String)] = [
            (try variant("truncated", raw: bytes.prefix(bytes.count - 10)), "truncated (or its header damaged)"),
            (try variant("past-end", length: UInt64(bytes.count)), "runs past the end of the file"),
            (try variant("huge-header", length: 1 << 40), "huge header"),
            (try variant("overlap", header: header.replacingOccurrences(
                of: "\"data_offsets\":[\(biasRange.lowerBound),\(biasRange.upperBound)]",
                with: "\"data_offsets\":[\(biasRange.lowerBound - 4),\(biasRange.upperBound - 4)]")), "overlap"),
            (try variant("out-of-range", header: header.replacingOccurrences(
                of: "\"data_offsets\":[\(biasRange.lowerBound),\(biasRange.upperBound)]",
                with: "\"data_offsets\":[\(biasRange.lowerBound),\(biasRange.upperBound + 1_000_000)]")), "truncated (or its header damaged)"),
            // A consistent header with another dtype or name: its checksum finds it; in a file without checksums (an
            // earlier version's), the checks against the model do.
            (try variant("wrong-dtype", header: header.replacingOccurrences(of: "\"F32\"", with: "\"I32\"")), "damaged header"),
            (try variant("wrong-dtype-unchecked", header: unchecked.replacingOccurrences(of: "\"F32\"", with: "\"I32\"")),
             "tensor '0.weight': dtype I32, bpworker reads F32 or F64"),
            (run + "/other-shape.safetensors", "not a bpworker checkpoint"),
            (try variant("missing-tensor", header: header.replacingOccurrences(of: "\"0.bias\"", with: "\"0.bias_renamed\"")),
             "damaged header"),
            (try variant("missing-tensor-unchecked", header: unchecked.replacingOccurrences(of: "\"0.bias\"", with: "\"0.bias_renamed\"")),
             "missing tensor '0.bias'"),
        ]
        for (path, expected) in cases {
            let before = try snapshot(run)
            let r = try Harness.mpirun(2, ["train", "--run-dir", run, "--resume", path, "--progress", "plain"], timeout: 60)
            #expect(r.status != 0, "\(path)")
            #expect(r.output.contains(path) && r.output.contains(expected), "\(path): \(r.output)")
            #expect(!r.output.contains("Fatal error") && !r.output.contains("signal"), "\(r.output)")
            #expect(try snapshot(run) == before, "\(path): the run directory changed")
        }
        // The good checkpoint still resumes.
        let resumed = try Harness.mpirun(2, ["train", "--run-dir", run, "--resume", good, "--progress", "plain"])
        #expect(resumed.status == 0, "\(resumed.output)")
    }

    /// The checkpoints, latest pointer and model of a run directory, by content.
    func snapshot(_ run: String) throws -> [String: Data] {
        var result: [String: Data] = [:]
        for name in try FileManager.default.contentsOfDirectory(atPath: run + "/checkpoints") {
            result["checkpoints/" + name] = try Data(contentsOf: URL(fileURLWithPath: run + "/checkpoints/" + name))
        }
        result["model.safetensors"] = try Data(contentsOf: URL(fileURLWithPath: run + "/model.safetensors"))
        return result
    }
}

/// The fields of RUN_DIR/status.json a test compares.
struct RunStatusFields: CustomStringConvertible {
    let state: String?, epoch: Int?, step: Int?, lastCheckpoint: String?, loss: Double?, testAccuracy: Double?

    init(_ run: String) throws {
        let object = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: run + "/status.json"))) as? [String: Any] ?? [:]
        state = object["state"] as? String
        epoch = object["epoch"] as? Int
        step = object["step"] as? Int
        lastCheckpoint = object["lastCheckpoint"] as? String
        loss = object["loss"] as? Double
        testAccuracy = object["testAccuracy"] as? Double
    }

    var description: String { "\(state ?? "-") epoch \(epoch ?? -1) step \(step ?? -1) \(lastCheckpoint ?? "-") \(loss ?? .nan) \(testAccuracy ?? .nan)" }
}
