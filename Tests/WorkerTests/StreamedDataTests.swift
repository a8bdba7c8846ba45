import Foundation
import Testing

/// Mapped and sharded `.npy` data sets in real jobs under mpirun: the same model as the in-memory path, bit for bit;
/// a shard that changes underneath a run, or between a stop and its resume, is one clear error naming it; a bad
/// shard set stops every rank during setup, with nothing written.
@Suite("Streamed data", .serialized, .temporaryFiles)
struct StreamedDataTests {
    /// NumPy writes 8x8 one-channel images (uint8 or float32), `n` samples, as one file `x.npy`/`y.npy` and as seven
    /// uneven numbered shards, plus a test set.
    func write(_ directory: String, n: Int = 900, dtype: String = "float32") throws {
        try FileManager.default.createDirectory(atPath: directory + "/shards", withIntermediateDirectories: true)
        let script = """
            import numpy as np, sys
            d, n, dtype = sys.argv[1], int(sys.argv[2]), sys.argv[3]
            rng = np.random.default_rng(11)
            y = rng.integers(0, 4, size=n)
            x = rng.normal(0, 1, size=(n, 1, 8, 8)) + y[:, None, None, None] * 0.7
            x = (np.clip(x * 40 + 100, 0, 255).astype(np.uint8) if dtype == 'uint8' else (x * 3 + 5).astype(np.float32))
            np.save(d + '/x.npy', x); np.save(d + '/y.npy', y.astype(np.int64))
            np.save(d + '/tx.npy', x[:200]); np.save(d + '/ty.npy', y[:200].astype(np.int64))
            cuts = [0, 1, 130, 131, 400, 401, 700, n]
            for i in range(7):
                np.save(f'{d}/shards/x-{i:05d}-of-00007.npy', x[cuts[i]:cuts[i + 1]])
                np.save(f'{d}/shards/y-{i:05d}-of-00007.npy', y[cuts[i]:cuts[i + 1]].astype(np.int64))
            """
        let r = try Harness.run("/usr/bin/env", ["python3", "-c", script, directory, "\(n)", dtype], environment: [:], timeout: 120)
        #expect(r.status == 0, "\(r.output)")
    }

    /// h5py writes DIR/train.h5 (the features chunked and gzip-compressed) and DIR/test.h5 from `write(_:)`'s arrays,
    /// then runs `then` (Python, with `d` the directory).
    func writeHDF5(_ directory: String, then: String = "") throws {
        let script = """
            import h5py, numpy as np, sys
            d = sys.argv[1]
            with h5py.File(d + '/train.h5', 'w') as f:
                f.create_dataset('images', data=np.load(d + '/x.npy'), chunks=(64, 1, 8, 8), compression='gzip')
                f.create_dataset('labels', data=np.load(d + '/y.npy'))
            with h5py.File(d + '/test.h5', 'w') as f:
                f.create_dataset('images', data=np.load(d + '/tx.npy'))
                f.create_dataset('labels', data=np.load(d + '/ty.npy'))

            """ + then
        let written = try Harness.run("/usr/bin/env", ["python3", "-c", script, directory], environment: [:], timeout: 120)
        #expect(written.status == 0, "\(written.output)")
    }

    func job(_ data: String, runDir: String, features: String, labels: String, extra: [String] = []) -> [String] {
        ["train", "--run-dir", runDir, "--progress", "plain",
         "--set", "data.format=npy", "--set", "data.train_features=\(features)", "--set", "data.train_labels=\(labels)",
         "--set", "data.test_features=\(data)/tx.npy", "--set", "data.test_labels=\(data)/ty.npy",
         "--set", "model.layers=[conv 4 3 pad 1, relu, maxpool 2, flatten, linear 16, relu, linear 4]",
         "--set", "data.augment.flip=true", "--set", "data.augment.crop_padding=1", "--set", "training.epochs=2",
         "--set", "training.batch_size=16", "--set", "schedule.warmup_steps=0", "--set", "logging.interval=20"] + extra
    }

    /// The tensors of a model file, as Python's safetensors reads them, in one comparable string.
    func tensors(_ path: String) throws -> String {
        let script = "import sys, hashlib\nfrom safetensors.numpy import load_file\nt = load_file(sys.argv[1])\n"
            + "print(' '.join(k + ':' + hashlib.sha256(t[k].tobytes()).hexdigest()[:16] for k in sorted(t)))"
        let r = try Harness.run("/usr/bin/env", ["python3", "-c", script, path], environment: [:], timeout: 60)
        #expect(r.status == 0, "\(r.output)")
        return r.output
    }

    @Test(arguments: ["float32", "uint8"])
    func sevenMappedShardsOnTwoRanksTrainTheModelOfOneFileInMemory(dtype: String) throws {
        let data = temporaryRunDirectory()
        try write(data, dtype: dtype)
        let streamed = temporaryRunDirectory(), inMemory = temporaryRunDirectory()
        let a = try Harness.mpirun(2, job(data, runDir: streamed, features: data + "/shards/x-*.npy", labels: data + "/shards/y-*.npy"))
        #expect(a.status == 0, "\(a.output)")
        #expect(a.output.contains("mapped, shared by the node's ranks through the page cache: data"), "\(a.output)")
        let b = try Harness.mpirun(2, job(data, runDir: inMemory, features: data + "/x.npy", labels: data + "/y.npy",
                                          extra: ["--set", "data.mmap=false"]))
        #expect(b.status == 0, "\(b.output)")
        #expect(!b.output.contains("mapped, shared"), "\(b.output)")
        #expect(try tensors(streamed + "/model.safetensors") == tensors(inMemory + "/model.safetensors"))
    }

    /// Resumed mid-epoch on 1 rank from a 2-rank checkpoint: from the mapped shards, the same model as the same resume
    /// from one file read into memory (the position arithmetic of a resume on another world size is RunLifecycle's and
    /// CNNTests'; here the streamed path must take it identically). The checkpoint is a fixed step's, not a signal's.
    @Test func aResumeOnAnotherWorldSizeStreamsAsItReadsFromMemory() throws {
        let data = temporaryRunDirectory()
        try write(data)
        var models: [String] = []
        for (features, labels, extra) in [(data + "/shards/x-*.npy", data + "/shards/y-*.npy", [String]()),
                                          (data + "/x.npy", data + "/y.npy", ["--set", "data.mmap=false"])] {
            let run = temporaryRunDirectory()
            let first = try Harness.mpirun(2, job(data, runDir: run, features: features, labels: labels,
                                                  extra: extra + ["--set", "checkpoint.every_steps=10", "--set", "checkpoint.keep=100"]))
            #expect(first.status == 0, "\(first.output)")
            let resumed = try Harness.mpirun(1, ["train", "--run-dir", run, "--progress", "plain", "--resume",
                                                 run + "/checkpoints/step-00000010.safetensors"])
            #expect(resumed.status == 0 && resumed.output.contains("resuming a 2-rank checkpoint"), "\(resumed.output)")
            models.append(try tensors(run + "/model.safetensors"))
        }
        #expect(models[0] == models[1])
    }

    /// The same samples in an HDF5 file (chunked, gzip-compressed, written by h5py) train the model of the `.npy` file
    /// on 2 ranks, bit for bit; a missing dataset stops every rank during setup, naming the file and the dataset.
    @Test func hdf5TrainsWhatNpyTrains() throws {
        let data = temporaryRunDirectory()
        try write(data)
        try writeHDF5(data)
        let npy = temporaryRunDirectory(), hdf5 = temporaryRunDirectory()
        let a = try Harness.mpirun(2, job(data, runDir: npy, features: data + "/x.npy", labels: data + "/y.npy"))
        #expect(a.status == 0, "\(a.output)")
        let h5 = ["--set", "data.format=hdf5", "--set", "data.test_features=\(data)/test.h5:/images",
                  "--set", "data.test_labels=\(data)/test.h5:/labels"]
        let b = try Harness.mpirun(2, job(data, runDir: hdf5, features: data + "/train.h5:/images", labels: data + "/train.h5:/labels",
                                          extra: h5))
        #expect(b.status == 0, "\(b.output)")
        #expect(try tensors(npy + "/model.safetensors") == tensors(hdf5 + "/model.safetensors"))
        let missing = temporaryRunDirectory()
        let c = try Harness.mpirun(2, job(data, runDir: missing, features: data + "/train.h5:/pixels", labels: data + "/train.h5:/labels",
                                          extra: h5))
        #expect(c.status == 1 && c.output.contains("\(data)/train.h5:/pixels"), "\(c.output)")
        #expect(!FileManager.default.fileExists(atPath: missing))
    }

    /// A damaged HDF5 file through the binary on 2 ranks: truncated, it stops every rank during setup; with zeros over
    /// its compressed chunks, the statistics' read stops every rank during setup, and without statistics
    /// (data.normalize=scale) the prefetch thread's read fails mid-run and ends the job within seconds. Each names the file.
    @Test func aDamagedHDF5FileEndsEveryRankNamingIt() throws {
        let data = temporaryRunDirectory()
        try write(data)
        try writeHDF5(data, then: """
            raw = open(d + '/train.h5', 'rb').read()
            open(d + '/truncated.h5', 'wb').write(raw[:len(raw) // 2])
            # Zeros over the last chunk's compressed bytes: the file opens, its index is intact, one chunk cannot be read.
            # (Rows 896 to 899 of 900: not among the 64 that the ranks' comparison of their data reads, i * 900 // 64.)
            with h5py.File(d + '/train.h5', 'r') as f:
                info = f['images'].id.get_chunk_info(f['images'].id.get_num_chunks() - 1)
            damaged = bytearray(raw)
            damaged[info.byte_offset:info.byte_offset + info.size] = bytes(info.size)
            open(d + '/damaged.h5', 'wb').write(bytes(damaged))
            """)
        let h5 = ["--set", "data.format=hdf5", "--set", "data.test_features=\(data)/train.h5:/images",
                  "--set", "data.test_labels=\(data)/train.h5:/labels"]
        for (file, extra, during) in [("truncated.h5", [String](), "data:"), ("damaged.h5", [], "data statistics:"),
                                      ("damaged.h5", ["--set", "data.normalize=scale"], "training failed")] {
            let run = temporaryRunDirectory()
            let r = try Harness.mpirun(2, job(data, runDir: run, features: "\(data)/\(file):/images", labels: "\(data)/train.h5:/labels",
                                              extra: h5 + extra))
            #expect(r.status != 0 && r.seconds < 30, "\(file) \(extra): \(r.output)")
            #expect(r.output.contains(during) && r.output.contains("\(data)/\(file)"), "\(file) \(extra): \(r.output)")
            if during.hasPrefix("data") { #expect(!FileManager.default.fileExists(atPath: run), "\(file): wrote \(run)") }
            if during == "data statistics:" {
                // One rank's read fails: every rank ends through the setup's agreement, not an MPI abort's noise.
                #expect(occurrences(of: "error: data statistics: \(data)/\(file)", in: r.output) == 1
                        && !r.output.contains("critical") && !r.output.contains("ORTE_ERROR_LOG"), "\(r.output)")
            }
        }
    }

    /// A read that stalls (a file system that stops answering) is named by the watchdog: the rank, the step and the
    /// data, in its own report or in the report of the rank waiting for it.
    @Test func aStalledReadIsNamedByTheWatchdog() throws {
        let data = temporaryRunDirectory()
        try write(data)
        let features = data + "/shards/x-*.npy"
        let r = try Harness.mpirun(2, job(data, runDir: temporaryRunDirectory(), features: features, labels: data + "/shards/y-*.npy",
                                          extra: ["--set", "watchdog.timeout_seconds=3"]),
                                   environment: ["BPWORKER_TEST_STALL": "1:5:60:read"], timeout: 60)
        #expect(r.status != 0 && r.seconds < 30, "\(r.output)")
        // "data read (sample N of data.train_features, in FILE)": N is the first sample of rank 1's batch of step 5, and
        // FILE the shard that holds it (cut at 1, 130, 131, 400, 401 and 700: write(_:)).
        let own = "rank 1 has waited", other = "not arrived: rank 1 (data read (sample"
        #expect(r.output.contains(own) || r.output.contains(other), "\(r.output)")
        let named = try #require(r.output.firstMatch(of: /data read \(sample (\d+) of data.train_features, in ([^)]+)\)/), "\(r.output)")
        let sample = try #require(Int(named.1))
        #expect(String(named.2) == data + "/shards/x-0000\([1, 130, 131, 400, 401, 700].filter { $0 <= sample }.count)-of-00007.npy", "\(r.output)")
    }

    /// The time the steps wait for their batches is measured, not guessed: a read that takes 1.5 s at step 6 (1 rank)
    /// is most of the time of the logging window that holds it and little of the others' (`data_wait_fraction` in
    /// metrics.jsonl, TensorBoard and the report's time-share chart), with the prefetch thread and without it.
    @Test(arguments: [4, 0])
    func aSlowReadIsDataWait(prefetch: Int) throws {
        let data = temporaryRunDirectory()
        try write(data)
        let run = temporaryRunDirectory()
        let r = try Harness.local(job(data, runDir: run, features: data + "/shards/x-*.npy", labels: data + "/shards/y-*.npy",
                                      extra: ["--local", "--set", "training.epochs=1", "--set", "logging.interval=5",
                                              "--set", "data.prefetch=\(prefetch)"]),
                                  environment: ["BPWORKER_TEST_STALL": "0:6:1.5:read"])
        #expect(r.status == 0, "\(r.output)")
        let lines = try String(contentsOfFile: run + "/metrics.jsonl", encoding: .utf8).split(separator: "\n")
        let train = lines.compactMap { try? JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any] }
            .filter { $0["type"] as? String == "train" }
        // Seconds waited per window: the fraction times the window's length (from the records' elapsed times). In
        // seconds, not as a fraction: on a loaded machine a window of a few milliseconds may well wait for most of them.
        var waits: [(step: Int, seconds: Double)] = []
        var previous = 0.0
        for record in train {
            let elapsed = record["elapsed_seconds"] as? Double ?? 0
            waits.append((record["step"] as? Int ?? -1, (record["data_wait_fraction"] as? Double ?? -1) * (elapsed - previous)))
            previous = elapsed
        }
        #expect(waits.count >= 3, "\(waits)")
        for (step, seconds) in waits.dropFirst() {
            // Global step 6 is the 7th: the window that ends at step 10. (The first window also holds the start-up.)
            #expect(step == 10 ? seconds > 1.2 : seconds < 0.5, "step \(step): waited \(seconds) s for data")
        }
        #expect(r.output.contains("data wait"), "\(r.output)")
        let report = try String(contentsOfFile: run + "/report.html", encoding: .utf8)
        #expect(report.contains("data-series=\"waiting for data\""), "the report's time-share chart")
    }

    /// A checkpoint records the mapped files (size, modification time); a resume after one was rewritten is refused,
    /// naming it, before any rank trains on other data.
    @Test func aShardChangedBeforeResumeIsRefusedNamingIt() throws {
        let data = temporaryRunDirectory()
        try write(data)
        let run = temporaryRunDirectory()
        let arguments = job(data, runDir: run, features: data + "/shards/x-*.npy", labels: data + "/shards/y-*.npy")
        let stopped = try Harness.startSlowed(2, arguments).stop(after: "epoch 1/2 step 20/")
        #expect(stopped.status == 0, "\(stopped.output)")
        // Rewritten between the stop and the resume: same size, new modification time.
        let shard = data + "/shards/x-00003-of-00007.npy"
        let contents = try Data(contentsOf: URL(fileURLWithPath: shard))
        usleep(20_000)
        try contents.write(to: URL(fileURLWithPath: shard))
        let resumed = try Harness.resume(run)
        #expect(resumed.status == 1, "\(resumed.output)")
        #expect(resumed.output.contains("\(shard): was modified"), "\(resumed.output)")
        #expect(resumed.output.contains("a resumed run must read the data it trained on"), "\(resumed.output)")
    }

    /// Truncated while the run maps it: every rank stops with the file named (at the next check, or at the read that
    /// raises SIGBUS), never a crash.
    @Test func aShardTruncatedMidRunEndsTheJobNamingIt() throws {
        let data = temporaryRunDirectory()
        try write(data)
        let run = temporaryRunDirectory()
        let shard = data + "/shards/x-00005-of-00007.npy"
        let running = try Harness.startSlowed(2, job(data, runDir: run, features: data + "/shards/x-*.npy",
                                                     labels: data + "/shards/y-*.npy"))
        #expect(running.waitFor { $0.contains("epoch 1/2 step 20/") }, "\(running.output)")
        truncate(shard, 4096)
        let result = running.wait(timeout: 90)
        #expect(result.status != 0, "\(result.output)")
        #expect(result.output.contains(shard), "\(result.output)")
        #expect(result.output.contains("must not change during a run"), "\(result.output)")
        #expect(!result.output.contains("Bus error") && !result.output.contains("signal 7"), "\(result.output)")
    }

    @Test func badShardSetsStopEveryRankDuringSetupAndWriteNothing() throws {
        let data = temporaryRunDirectory()
        try write(data, n: 300)
        let shards = data + "/shards"
        // A gap in the series, a shard of another shape, labels of another count.
        try FileManager.default.moveItem(atPath: shards + "/x-00002-of-00007.npy", toPath: data + "/gap.npy")
        let script = "import numpy as np, sys; d = sys.argv[1]; np.save(d + '/odd.npy', np.zeros((3, 1, 9, 9), np.float32));"
            + " np.save(d + '/y3.npy', np.zeros(3, np.int64)); np.save(d + '/y2.npy', np.zeros(2, np.int64))"
        _ = try Harness.run("/usr/bin/env", ["python3", "-c", script, data], environment: [:], timeout: 60)
        try FileManager.default.createDirectory(atPath: data + "/mixed", withIntermediateDirectories: true)
        try FileManager.default.copyItem(atPath: data + "/x.npy", toPath: data + "/mixed/a.npy")
        try FileManager.default.copyItem(atPath: data + "/odd.npy", toPath: data + "/mixed/b.npy")
        let cases: [(String, String, String)] = [
            (shards + "/x-*.npy", shards + "/y-*.npy", "shard \(shards)/x-00002-of-00007 is missing (6 of 7 present)"),
            ("\(data)/x.npy,", "\(data)/y.npy", "cannot open file"),
            (data + "/mixed", data + "/y[23].npy", "every shard of a data set must have the same dtype and sample shape"),
            (data + "/odd.npy", data + "/y2.npy", "has 3 samples but the labels file \(data)/y2.npy has 2 labels"),
        ]
        for (features, labels, message) in cases {
            let run = temporaryRunDirectory()
            let r = try Harness.mpirun(2, job(data, runDir: run, features: features, labels: labels))
            #expect(r.status == 1 && r.output.contains(message), "\(features): \(r.output)")
            #expect(r.seconds < 30, "\(r.seconds) s")
            #expect(!FileManager.default.fileExists(atPath: run), "\(features): \(run) was written")
        }
    }
}
