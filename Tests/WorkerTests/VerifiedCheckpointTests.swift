import Engine
import Foundation
import Testing

/// Checkpoints that cannot lie: every kind of damage to a real run's latest checkpoint is found before any rank uses
/// it, `--resume` falls back to the newest checkpoint that verifies and still ends bit for bit where an undisturbed
/// run ends, an explicit damaged path is refused naming the alternative, and `bpworker verify` says which file is
/// damaged. The checksums are zlib's CRC-32, recomputed in Python as the independent check.
@Suite("Verified checkpoints", .serialized, .temporaryFiles)
struct VerifiedCheckpointTests {
    /// 3 epochs of 12 steps on 2 ranks (200 samples, global batch 16), AdamW and dropout, a checkpoint every 5 steps.
    func job(_ data: SyntheticData, runDir: String) -> [String] {
        ["train", "--run-dir", runDir, "--progress", "plain"] + data.arguments + [
            "--set", "model.hidden=[24]", "--set", "model.dropout=0.1", "--set", "optimizer.name=adamw",
            "--set", "optimizer.lr=0.01", "--set", "schedule.warmup_steps=3", "--set", "training.epochs=3",
            "--set", "training.batch_size=8", "--set", "seed=5", "--set", "logging.interval=4",
            "--set", "checkpoint.every_steps=5", "--set", "checkpoint.keep=20", "--set", "data.normalize=scale",
        ]
    }

    func tensors(_ path: String) throws -> [String: [UInt32]] {
        let file = try SafeTensorsFile(path: path)
        var result: [String: [UInt32]] = [:]
        for name in file.names where !name.hasPrefix("optimizer.") { result[name] = try file.floats(name).map(\.bitPattern) }
        return result
    }

    /// The file's header (JSON text) and where its data section starts.
    func header(_ bytes: Data) -> (text: String, dataStart: Int) {
        let length = Int(bytes.prefix(8).withUnsafeBytes { UInt64(littleEndian: $0.loadUnaligned(as: UInt64.self)) })
        return (String(decoding: bytes[8..<(8 + length)], as: UTF8.self), 8 + length)
    }

    /// Each kind of damage the issue lists, done to a copy of a stopped run's latest checkpoint.
    enum Damage: String, CaseIterable {
        case flippedDataByte, flippedMetadataByte, zeroedBlock, truncated, latestNamesAMissingFile

        /// Damages the run's latest checkpoint (`latest` itself for the last kind); the reason a resume must give.
        func apply(to run: String, latest: String, test: VerifiedCheckpointTests) throws -> String {
            let path = run + "/checkpoints/" + latest
            var bytes = try Data(contentsOf: URL(fileURLWithPath: path))
            let (text, dataStart) = test.header(bytes)
            switch self {
            case .flippedDataByte:
                bytes[dataStart + (bytes.count - dataStart) / 2] ^= 0x01
                try bytes.write(to: URL(fileURLWithPath: path))
                return "CRC-32"
            case .flippedMetadataByte:
                // A digit of the recorded step, inside the metadata: the JSON stays valid, the header's checksum does not.
                let at = try #require(text.range(of: "\"epoch_step\":\"")).upperBound
                let offset = 8 + text.utf8.distance(from: text.startIndex, to: at)
                bytes[offset] = bytes[offset] == UInt8(ascii: "7") ? UInt8(ascii: "8") : UInt8(ascii: "7")
                try bytes.write(to: URL(fileURLWithPath: path))
                return "damaged header"
            case .zeroedBlock:
                let start = dataStart + (bytes.count - dataStart) / 3
                bytes.replaceSubrange(start..<(start + 64), with: Data(count: 64))
                try bytes.write(to: URL(fileURLWithPath: path))
                return "CRC-32"
            case .truncated:
                try bytes.prefix(bytes.count * 2 / 3).write(to: URL(fileURLWithPath: path))
                return "truncated (or its header damaged)"
            case .latestNamesAMissingFile:
                try FileManager.default.removeItem(atPath: path)
                return "missing"
            }
        }
    }

    @Test func everyDamageIsFoundAndTheNewestIntactCheckpointIsResumedExactly() throws {
        let data = try SyntheticData(samples: 200)
        defer { data.remove() }
        let reference = temporaryRunDirectory()
        let r = try Harness.mpirun(2, job(data, runDir: reference))
        #expect(r.status == 0, "\(r.output)")
        let stopped = temporaryRunDirectory()
        #expect(try Harness.startSlowed(2, job(data, runDir: stopped)).stop(after: "(step 20)").status == 0)
        let latest = try latestCheckpoint(stopped)
        let checkpoints = try FileManager.default.contentsOfDirectory(atPath: stopped + "/checkpoints").filter { $0.hasPrefix("step-") }.sorted()
        let previous = try #require(checkpoints.last { $0 != latest })
        for damage in Damage.allCases {
            let run = temporaryRunDirectory()
            // A copy that keeps the files' times: the newest checkpoint is the newest written.
            let copied = try Harness.run("/bin/cp", ["-a", stopped, run], environment: [:], timeout: 30)
            #expect(copied.status == 0, "\(copied.output)")
            let reason = try damage.apply(to: run, latest: latest, test: self)
            // verify names the damage and exits 1.
            let verified = try Harness.local(["verify", run])
            #expect(verified.status == 1, "\(damage): \(verified.output)")
            #expect(verified.output.contains("DAMAGED") && verified.output.contains(latest), "\(damage): \(verified.output)")
            // An explicit resume from it is refused, naming the newest intact checkpoint.
            if damage != .latestNamesAMissingFile {
                let refused = try Harness.mpirun(2, ["train", "--run-dir", run, "--progress", "plain", "--resume",
                                                     run + "/checkpoints/" + latest], timeout: 60)
                #expect(refused.status == 1, "\(damage): \(refused.output)")
                #expect(refused.output.contains("not resumed from it; the newest intact checkpoint is \(run)/checkpoints/\(previous)"),
                        "\(damage): \(refused.output)")
            }
            // --resume alone skips it, says why and where it resumes, and ends where the undisturbed run ends.
            let resumed = try Harness.resume(run)
            #expect(resumed.status == 0, "\(damage): \(resumed.output)")
            #expect(resumed.output.contains("resume: skipped \(run)/checkpoints/\(latest): ") && resumed.output.contains(reason),
                    "\(damage): \(resumed.output)")
            #expect(resumed.output.contains("resume: resuming from \(run)/checkpoints/\(previous), the newest checkpoint that verifies"),
                    "\(damage): \(resumed.output)")
            #expect(try tensors(run + "/model.safetensors") == tensors(reference + "/model.safetensors"), "\(damage)")
            // The events: status.json and the report's resume marker.
            let status = try #require(try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: run + "/status.json")))
                as? [String: Any])
            #expect(status["resumedFrom"] as? String == "\(run)/checkpoints/\(previous)", "\(status)")
            #expect((status["skippedCheckpoints"] as? [String])?.first?.hasPrefix("\(run)/checkpoints/\(latest): ") == true, "\(status)")
            let metrics = try String(contentsOfFile: run + "/metrics.jsonl", encoding: .utf8)
            #expect(metrics.contains("\"message\":\"resumed from \(previous); skipped \(latest) ("), "\(damage)")
            let report = try String(contentsOfFile: run + "/report.html", encoding: .utf8)
            #expect(report.contains("resumed from \(previous); skipped \(latest) ("), "\(damage): the report's resume marker")
            // The damaged file was set aside (renamed), so afterwards every checkpoint verifies again.
            if damage != .latestNamesAMissingFile {
                #expect(FileManager.default.fileExists(atPath: run + "/checkpoints/" + latest + ".damaged"), "\(damage)")
            }
            let after = try Harness.local(["verify", run])
            #expect(after.status == 0, "\(damage): \(after.output)")
        }
    }

    /// A finished one-epoch run of a small MLP (local mode), for its model file and checkpoints.
    func smallRun(_ data: SyntheticData) throws -> String {
        let run = temporaryRunDirectory()
        let r = try Harness.local(["train", "--local", "--run-dir", run, "--progress", "plain"] + data.arguments
                                  + ["--set", "model.hidden=[8]", "--set", "training.epochs=1", "--set", "training.batch_size=8",
                                     "--set", "schedule.warmup_steps=0"])
        #expect(r.status == 0, "\(r.output)")
        return run
    }

    /// A `latest` pointer of bytes that are not text names no checkpoint: verify says so (it said nothing, and exited 0).
    @Test func aLatestPointerThatIsNotTextIsDamaged() throws {
        let data = try SyntheticData(samples: 64)
        defer { data.remove() }
        let run = try smallRun(data)
        #expect(try Harness.local(["verify", run]).status == 0)
        try Data([0xff, 0xfe, 0, 1, 2, 0x80]).write(to: URL(fileURLWithPath: run + "/checkpoints/latest"))
        let verified = try Harness.local(["verify", run])
        #expect(verified.status == 1, "\(verified.output)")
        #expect(verified.output.contains("checkpoints/latest: DAMAGED: not text (6 bytes that are not UTF-8): it names no checkpoint"),
                "\(verified.output)")
    }

    /// A checkpoint damaged on its way to disk is caught by the read-back: `latest` stays on the previous checkpoint,
    /// nothing is pruned (`checkpoint.keep=1` would otherwise delete the last intact one), the file is set aside, and the
    /// run goes on and finishes with the undisturbed run's model.
    @Test func aCheckpointThatDoesNotVerifyAfterWritingNeverReplacesAnIntactOne() throws {
        let data = try SyntheticData(samples: 200)
        defer { data.remove() }
        let reference = temporaryRunDirectory(), run = temporaryRunDirectory()
        let keepOne = ["--set", "checkpoint.keep=1"]
        #expect(try Harness.mpirun(2, job(data, runDir: reference) + keepOne).status == 0)
        let r = try Harness.mpirun(2, job(data, runDir: run) + keepOne, environment: ["BPWORKER_TEST_CHECKPOINT_CORRUPT": "10"])
        #expect(r.status == 0, "\(r.output)")
        #expect(r.output.contains("checkpoint at step 10 not written: \(run)/checkpoints/step-00000010.safetensors does not verify after "
                                  + "writing (damaged: tensor"), "\(r.output)")
        #expect(r.output.contains("set aside as step-00000010.safetensors.damaged; the previous checkpoints are kept (latest: "
                                  + "\(run)/checkpoints/step-00000005.safetensors)"), "\(r.output)")
        #expect(FileManager.default.fileExists(atPath: run + "/checkpoints/step-00000010.safetensors.damaged"))
        #expect(try tensors(run + "/model.safetensors") == tensors(reference + "/model.safetensors"))
    }

    /// The recorded checksums are zlib's CRC-32 of each tensor's bytes, as Python computes it from what the
    /// `safetensors` package reads; a checksummed file still loads in `safetensors` and `torch` as before.
    @Test func checksumsArePythonsCRC32AndTheFileStaysPlainSafetensors() throws {
        let data = try SyntheticData(samples: 64)
        defer { data.remove() }
        let run = try smallRun(data)
        for file in [run + "/model.safetensors", run + "/checkpoints/" + (try latestCheckpoint(run))] {
            let script = """
                import json, sys, zlib
                from safetensors import safe_open
                with safe_open(sys.argv[1], framework="numpy") as f:
                    recorded = json.loads(f.metadata()["bpworker_crc32"])
                    keys = sorted(f.keys())
                    mine = {k: format(zlib.crc32(f.get_tensor(k).tobytes()), "08x") for k in keys}
                print("match" if mine == recorded and len(keys) > 0 else f"differ {mine} {recorded}")
                """
            let out = try Harness.run("/usr/bin/env", ["python3", "-c", script, file], environment: [:], timeout: 60)
            #expect(out.status == 0 && out.output.contains("match"), "\(file): \(out.output)")
        }
        let torch = ModelFileTests.torchPython
        if FileManager.default.isExecutableFile(atPath: torch) {
            let script = "import sys, torch; from safetensors.torch import load_file; print(sorted(load_file(sys.argv[1]).keys()))"
            let out = try Harness.run(torch, ["-c", script, run + "/model.safetensors"], environment: [:], timeout: 120)
            #expect(out.status == 0 && out.output.contains("0.weight"), "\(out.output)")
        }
    }

    /// A damaged model file is refused by `eval --model` and `predict`; one without checksums (an earlier version's,
    /// made here by rewriting the file without them in Python) loads with a one-line note, and `verify` calls it
    /// unverified without failing.
    @Test func damagedModelFilesAreRefusedAndOldOnesLoadWithANote() throws {
        let data = try SyntheticData(samples: 64)
        defer { data.remove() }
        let run = try smallRun(data)
        let model = run + "/model.safetensors"
        let old = run + "/old.safetensors", damaged = run + "/damaged.safetensors"
        let strip = """
            import sys
            from safetensors.numpy import load_file, save_file
            from safetensors import safe_open
            with safe_open(sys.argv[1], framework="numpy") as f: meta = f.metadata()
            meta = {k: v for k, v in meta.items() if not k.startswith("bpworker_")}
            save_file(load_file(sys.argv[1]), sys.argv[2], metadata=meta)
            """
        let stripped = try Harness.run("/usr/bin/env", ["python3", "-c", strip, model, old], environment: [:], timeout: 60)
        #expect(stripped.status == 0, "\(stripped.output)")
        var bytes = try Data(contentsOf: URL(fileURLWithPath: model))
        bytes[bytes.count - 5] ^= 0x40
        try bytes.write(to: URL(fileURLWithPath: damaged))
        let evalArguments = ["eval", "--local", "--run-dir", temporaryRunDirectory()] + Array(data.arguments.suffix(4))
        let refused = try Harness.local(evalArguments + ["--model", damaged])
        #expect(refused.status == 1 && refused.output.contains("\(damaged): damaged: tensor"), "\(refused.output)")
        let inputs = run + "/inputs.npy"
        let written = try Harness.run("/usr/bin/env", ["python3", "-c", "import numpy as np, sys; np.save(sys.argv[1], np.ones((3, 12), np.float32))",
                                                       inputs], environment: [:], timeout: 60)
        #expect(written.status == 0, "\(written.output)")
        let predicted = try Harness.local(["predict", "--model", damaged, inputs])
        #expect(predicted.status == 1 && predicted.output.contains("damaged: tensor"), "\(predicted.output)")
        let loaded = try Harness.local(evalArguments + ["--model", old])
        #expect(loaded.status == 0 && loaded.output.contains("\(old): no checksums (written by an earlier bpworker or another program): "
                                                             + "loaded unverified"), "\(loaded.output)")
        let intact = try Harness.local(evalArguments + ["--model", model])
        #expect(intact.status == 0 && !intact.output.contains("no checksums"), "\(intact.output)")
        let verified = try Harness.local(["verify", model, old])
        #expect(verified.status == 0, "\(verified.output)")
        #expect(verified.output.contains("\(model): intact") && verified.output.contains("\(old): unverified"), "\(verified.output)")
    }
}

/// A full disk during checkpoints, for real: RUN_DIR/checkpoints is a tmpfs with room for two checkpoints.
@Suite("A full disk", .serialized, .temporaryFiles)
struct FullDiskTests {
    /// A tmpfs of `size` mounted on `path`, made if missing (a new directory when nil; root); `unmount` it after.
    func mountTmpfs(size: String, at path: String? = nil) throws -> String {
        let mount = path ?? temporaryRunDirectory()
        try FileManager.default.createDirectory(atPath: mount, withIntermediateDirectories: true)
        let mounted = try Harness.run("/bin/mount", ["-t", "tmpfs", "-o", "size=\(size)", "tmpfs", mount], environment: [:], timeout: 30)
        try #require(mounted.status == 0, "\(mounted.output)")
        return mount
    }

    func unmount(_ mount: String) {
        _ = try? Harness.run("/bin/umount", ["-l", mount], environment: [:], timeout: 30)
    }

    /// Fills the tmpfs at `mount` to its last block.
    func fill(_ mount: String) throws {
        let filled = try Harness.run("/bin/sh", ["-c", "dd if=/dev/zero of='\(mount)/filler' bs=64k 2>/dev/null; true"],
                                     environment: [:], timeout: 30)
        #expect(filled.status == 0)
    }

    /// The third checkpoint cannot be written: the run says what it needed and what was free, keeps the previous two
    /// (which verify), goes on and tries again at the next one, and stops failed after `checkpoint.max_failures` in a
    /// row. With room made (the tmpfs grown), `--resume` continues from the last checkpoint written.
    @Test(.enabled(if: getuid() == 0, "mounts a tmpfs (root; CI runs as root)"))
    func checkpointsThatCannotBeWrittenKeepThePreviousOnesAndTheRunRetries() throws {
        let data = try SyntheticData(samples: 200)
        defer { data.remove() }
        let run = temporaryRunDirectory()
        let checkpoints = run + "/checkpoints"
        try FileManager.default.createDirectory(atPath: checkpoints, withIntermediateDirectories: true)
        // 74,243 parameters: a checkpoint with AdamW's two states is about 0.9 MB; two fit in 2 MB with no room to write a third.
        let mounted = try Harness.run("/bin/mount", ["-t", "tmpfs", "-o", "size=2m", "tmpfs", checkpoints], environment: [:], timeout: 30)
        try #require(mounted.status == 0, "\(mounted.output)")
        defer { _ = try? Harness.run("/bin/umount", ["-l", checkpoints], environment: [:], timeout: 30) }
        let arguments = ["train", "--run-dir", run, "--progress", "plain"] + data.arguments + [
            "--set", "model.hidden=[256, 256]", "--set", "optimizer.name=adamw", "--set", "training.epochs=3",
            "--set", "training.batch_size=8", "--set", "schedule.warmup_steps=0", "--set", "checkpoint.every_steps=4",
            "--set", "checkpoint.keep=2", "--set", "checkpoint.max_failures=2", "--set", "logging.interval=4"]
        let r = try Harness.mpirun(2, arguments)
        #expect(r.status == 1, "\(r.output)")
        #expect(r.output.contains("checkpoint at step 12 not written: ") && r.output.contains("No space left on device"), "\(r.output)")
        #expect(r.output.contains("(the checkpoint needs 824 KiB; ") && r.output.contains(" free in \(checkpoints))"), "\(r.output)")
        #expect(r.output.contains("trying again at the next one (1 in a row, at most 2)"), "\(r.output)")
        #expect(r.output.contains("checkpoints could not be written 3 times in a row (checkpoint.max_failures=2); the last one is "
                                  + "\(checkpoints)/step-00000008.safetensors"), "\(r.output)")
        let names = try FileManager.default.contentsOfDirectory(atPath: checkpoints).sorted()
        #expect(names == ["latest", "step-00000004.safetensors", "step-00000008.safetensors"], "\(names)")
        let verified = try Harness.local(["verify", run])
        #expect(verified.status == 0, "\(verified.output)")
        let status = try String(contentsOfFile: run + "/status.json", encoding: .utf8)
        #expect(status.contains("\"state\" : \"failed\""), "\(status)")
        // Room made: the run resumes from the last checkpoint written and finishes.
        let grown = try Harness.run("/bin/mount", ["-o", "remount,size=16m", checkpoints], environment: [:], timeout: 30)
        #expect(grown.status == 0, "\(grown.output)")
        let resumed = try Harness.resume(run)
        #expect(resumed.status == 0 && resumed.output.contains("resumed from \(checkpoints)/step-00000008.safetensors: step 8"),
                "\(resumed.output)")
    }

    /// After a resume, the run's last good state is the checkpoint it resumed from until it writes one: a checkpoint
    /// that cannot be written then named "none" as the last one. RUN_DIR/checkpoints holds one checkpoint and no more.
    @Test(.enabled(if: getuid() == 0, "mounts a tmpfs (root; CI runs as root)"))
    func aResumedRunNamesTheCheckpointItResumedFromAsItsLast() throws {
        let data = try SyntheticData(samples: 200)
        defer { data.remove() }
        let run = temporaryRunDirectory()
        let checkpoints = try mountTmpfs(size: "1200k", at: run + "/checkpoints")
        defer { unmount(checkpoints) }
        // 74,243 parameters with AdamW's two states: a checkpoint of about 0.9 MB, once at the end of each epoch.
        let arguments = ["train", "--run-dir", run, "--progress", "plain"] + data.arguments + [
            "--set", "model.hidden=[256, 256]", "--set", "optimizer.name=adamw", "--set", "training.batch_size=8",
            "--set", "checkpoint.every_steps=0", "--set", "checkpoint.keep=1", "--set", "checkpoint.max_failures=0"]
        let first = try Harness.mpirun(2, arguments + ["--set", "training.epochs=1"])
        #expect(first.status == 0, "\(first.output)")
        let resumed = try Harness.mpirun(2, arguments + ["--resume", "--set", "training.epochs=2"])
        #expect(resumed.status == 1, "\(resumed.output)")
        #expect(resumed.output.contains("the last one is \(checkpoints)/step-00000012.safetensors"), "\(resumed.output)")
        #expect(!resumed.output.contains("the last one is none"), "\(resumed.output)")
    }

    /// A full disk while rank 0 checks the gradients alone: its heartbeats are rewritten in place, so they go on, and
    /// the other rank waits for its verdict as long as it takes. (An atomic replace needs a new file, which a full
    /// disk refused: the heartbeat went stale and rank 1's watchdog ended the healthy job, blaming rank 0.)
    @Test(.enabled(if: getuid() == 0, "mounts a tmpfs (root; CI runs as root)"))
    func aFullDiskKeepsTheHeartbeatsGoing() throws {
        let data = try SyntheticData(samples: 96)
        defer { data.remove() }
        let mount = try mountTmpfs(size: "4m")
        defer { unmount(mount) }
        let run = mount + "/run"
        let job = try Harness.startMPI(2, ["gradcheck", "--run-dir", run, "--set", "model.hidden=[8]", "--set", "watchdog.timeout_seconds=2"]
                                       + data.arguments, environment: ["BPWORKER_TEST_GRADCHECK_SLOW": "0:6"])
        let beating = job.waitFor(60) { _ in FileManager.default.fileExists(atPath: run + "/heartbeat/rank-0.json") }
        #expect(beating, "\(job.output)")
        try fill(mount)
        let r = job.wait(timeout: 90)
        #expect(!r.output.contains("stall"), "\(r.output)")
        #expect(r.output.contains("gradient check: PASS") || r.output.contains("gradient check: WARN"), "\(r.output)")
    }

    /// The whole run directory fills up while metrics and TensorBoard records are written every step: rank 0 trapped
    /// in Foundation's `FileHandle.write` (exit 132) and left half a line in metrics.jsonl. Now it says once that
    /// records cannot be written, every line of the file stays whole, and the run ends with the final model's error.
    @Test(.enabled(if: getuid() == 0, "mounts a tmpfs (root; CI runs as root)"))
    func aFullRunDirectoryLeavesWholeRecordsAndNoCrash() throws {
        let data = try SyntheticData(samples: 400)
        defer { data.remove() }
        let mount = try mountTmpfs(size: "4m")
        defer { unmount(mount) }
        let run = mount + "/run"
        let job = try Harness.startMPI(2, ["train", "--run-dir", run, "--progress", "plain"] + data.arguments + [
            "--set", "model.hidden=[64]", "--set", "training.epochs=40", "--set", "training.batch_size=8",
            "--set", "logging.interval=1", "--set", "checkpoint.every_steps=0", "--set", "checkpoint.max_failures=1000"],
            environment: ["BPWORKER_TEST_STEP_SLEEP_MS": "5"])
        // Fill the disk once records are flowing.
        let flowing = job.waitFor(60) { _ in
            ((try? String(contentsOfFile: run + "/metrics.jsonl", encoding: .utf8)) ?? "").split(separator: "\n").count >= 20
        }
        #expect(flowing, "\(job.output)")
        try fill(mount)
        let r = job.wait(timeout: 180)
        #expect(r.status != 132 && !r.output.contains("Fatal error") && !r.output.contains("Program crashed"), "\(r.output)")
        #expect(occurrences(of: "metrics.jsonl: a record could not be written (No space left on device)", in: r.output) == 1,
                "\(r.output)")
        // The run's end is in status.json all the same (rewritten in place: it was left at "training").
        let status = try String(contentsOfFile: run + "/status.json", encoding: .utf8)
        #expect(r.status == 1 && status.contains("\"state\" : \"failed\""), "\(status)\n\(r.output)")
        let lines = try String(contentsOfFile: run + "/metrics.jsonl", encoding: .utf8).split(separator: "\n")
        #expect(lines.count >= 20)
        for line in lines {
            #expect((try? JSONSerialization.jsonObject(with: Data(line.utf8))) != nil, "a cut record: \(line)")
        }
    }

    /// `verify` on a run before its first checkpoint: while the job runs, nothing is wrong and there is nothing to
    /// verify yet (exit 0; it said "DAMAGED: no model file or checkpoint here", exit 1); once the job has died there,
    /// the file is missing and verify says so (exit 1); a directory without a run, or no such path, is missing too.
    @Test func verifyBeforeTheFirstCheckpointSaysNothingIsThereYetWhileTheRunGoesOn() throws {
        let data = try SyntheticData(samples: 200)
        defer { data.remove() }
        let run = temporaryRunDirectory()
        let job = try Harness.startSlowed(2, ["train", "--run-dir", run, "--progress", "plain", "--set", "model.hidden=[8]",
                                              "--set", "training.epochs=100", "--set", "training.batch_size=8",
                                              "--set", "checkpoint.every_steps=0", "--set", "logging.interval=2"] + data.arguments)
        #expect(job.waitFor { $0.contains("step 4/") }, "\(job.output)")
        let early = try Harness.local(["verify", run])
        #expect(early.status == 0, "\(early.output)")
        #expect(early.output.contains("\(run): nothing to verify yet: the run is training (step "), "\(early.output)")
        #expect(early.output.contains("and has written no checkpoint or model file so far"), "\(early.output)")
        job.signal(SIGKILL)
        _ = job.wait(timeout: 30)
        // mpirun is gone; its ranks follow within a few seconds.
        var dead = try Harness.local(["verify", run])
        for _ in 0..<50 where dead.status == 0 {
            usleep(200_000)
            dead = try Harness.local(["verify", run])
        }
        #expect(dead.status == 1, "\(dead.output)")
        #expect(dead.output.contains("\(run): MISSING: no model file or checkpoint here; status.json says training (step "), "\(dead.output)")
        #expect(dead.output.contains("but no job runs here: it ended before its first checkpoint"), "\(dead.output)")
        let empty = TemporaryFiles.path("empty-")
        try FileManager.default.createDirectory(at: empty, withIntermediateDirectories: true)
        let missing = try Harness.local(["verify", empty.path, empty.path + "/none"])
        #expect(missing.status == 1, "\(missing.output)")
        #expect(missing.output.contains("\(empty.path): MISSING: no model file or checkpoint here\n"), "\(missing.output)")
        #expect(missing.output.contains("\(empty.path)/none: MISSING: no such file"), "\(missing.output)")
        #expect(missing.output.contains("bpworker verify: 2 damaged or missing"), "\(missing.output)")
    }

    /// `latest` as a path (even to a checkpoint that is there) is passed over by a resume, and verify says why (it said
    /// the file was not there); `latest` as a directory made every checkpoint of a resume fail (the rename onto it) and
    /// verify said nothing: now verify calls it damaged and train refuses the directory at once.
    @Test func aLatestThatIsAPathOrADirectoryIsNamed() throws {
        let data = try SyntheticData(samples: 200)
        defer { data.remove() }
        let run = temporaryRunDirectory()
        let trained = try Harness.local(["train", "--local", "--run-dir", run, "--set", "model.hidden=[8]", "--set", "training.epochs=1",
                                         "--set", "training.batch_size=8"] + data.arguments)
        #expect(trained.status == 0, "\(trained.output)")
        let latest = try latestCheckpoint(run)
        try Data((run + "/checkpoints/" + latest).utf8).write(to: URL(fileURLWithPath: run + "/checkpoints/latest"))
        let path = try Harness.local(["verify", run])
        #expect(path.status == 1 && path.output.contains("which is not the name of a checkpoint in \(run)/checkpoints (it must be a file name"),
                "\(path.output)")
        try FileManager.default.removeItem(atPath: run + "/checkpoints/latest")
        try FileManager.default.createDirectory(atPath: run + "/checkpoints/latest", withIntermediateDirectories: false)
        let directory = try Harness.local(["verify", run])
        #expect(directory.status == 1 && directory.output.contains("checkpoints/latest: DAMAGED: is not a file"), "\(directory.output)")
        let resumed = try Harness.local(["train", "--local", "--run-dir", run, "--resume"])
        #expect(resumed.status == 1 && resumed.output.contains("checkpoints/latest is not a file (a directory or another kind)"),
                "\(resumed.output)")
    }
}
