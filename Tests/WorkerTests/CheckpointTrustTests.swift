import Engine
import Foundation
import Testing

/// A checkpoint whose checksums are valid may still hold values no run can reach: rewritten by a tool, or by hand,
/// with its checksums made again. Each is refused with the tensor or metadata key and the reason, and the run
/// directory stays as it was; before, huge counts crashed the resume (exit 132) or skipped an epoch without a word.
@Suite("Checkpoints read as untrusted input", .serialized, .temporaryFiles)
struct CheckpointTrustTests {
    /// One epoch of 12 steps with batch norm and AdamW, a checkpoint every 5 steps; returns the run directory.
    func trainedRun(_ data: SyntheticData) throws -> String {
        let run = temporaryRunDirectory()
        let r = try Harness.local(["train", "--local", "--run-dir", run, "--progress", "plain"] + data.arguments + [
            "--set", "model.layers=[linear 16, batchnorm, relu, linear 3]", "--set", "optimizer.name=adamw",
            "--set", "training.epochs=2", "--set", "training.batch_size=16", "--set", "checkpoint.every_steps=5",
            "--set", "data.normalize=scale",
        ])
        #expect(r.status == 0, "\(r.output)")
        return run
    }

    /// Rewrites the checkpoint at `path` with its tensors and metadata changed by `change`, checksums made anew.
    func rewrite(_ path: String, checksummed: Bool = true,
                 _ change: (inout [String: (shape: [Int], floats: [Float]?, ints: [Int64]?)], inout [String: String]) -> Void) throws {
        let file = try SafeTensorsFile(path: path)
        var tensors: [String: (shape: [Int], floats: [Float]?, ints: [Int64]?)] = [:]
        for name in file.names {
            let info = try #require(file.tensors[name])
            tensors[name] = info.dtype == .i64 ? (info.shape, nil, try file.int64s(name)) : (info.shape, try file.floats(name), nil)
        }
        var metadata = file.metadata.filter { !$0.key.hasPrefix("bpworker_") }
        change(&tensors, &metadata)
        var writer = SafeTensorsWriter()
        writer.checksummed = checksummed
        for name in tensors.keys.sorted() {
            let tensor = tensors[name]!
            if let floats = tensor.floats {
                floats.withUnsafeBufferPointer { writer.add(name: name, shape: tensor.shape, floats: $0) }
            } else {
                writer.add(name: name, shape: tensor.shape, int64s: tensor.ints!)
            }
        }
        writer.metadata = metadata
        try writer.write(to: path)
    }

    func position(_ metadata: inout [String: String], _ change: (inout [String: Any]) -> Void) {
        var object = (try? JSONSerialization.jsonObject(with: Data(metadata["position"]!.utf8)) as? [String: Any]) ?? [:]
        change(&object)
        metadata["position"] = String(decoding: try! JSONSerialization.data(withJSONObject: object), as: UTF8.self)
    }

    @Test func impossibleValuesWithValidChecksumsAreRefused() throws {
        let data = try SyntheticData(samples: 200)
        defer { data.remove() }
        let base = try trainedRun(data)
        let latest = try String(contentsOfFile: base + "/checkpoints/latest", encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines)
        let cases: [(String, String, (inout [String: (shape: [Int], floats: [Float]?, ints: [Int64]?)], inout [String: String]) -> Void)] = [
            ("count 2^40", "tensor '1.num_batches_tracked': count 1099511627777.0 is not a whole number up to 16777216", { t, _ in
                t["1.num_batches_tracked"] = ([], nil, [1 << 40 + 1]) }),
            ("count inf", "tensor '1.num_batches_tracked': count inf is not a whole number", { t, _ in
                t["1.num_batches_tracked"] = ([], [.infinity], nil) }),
            ("optimizer step", "metadata 'optimizer_step' is 9223372036854775807, beyond 2^48 steps", { _, m in
                m["optimizer_step"] = "\(Int64.max)" }),
            ("world size", "metadata 'position' holds worldSize 4611686018427387904 beyond 2^24", { _, m in
                position(&m) { $0["worldSize"] = 1 << 62 } }),
            ("epoch step", "not resumed from it: it is at step 1099511627776 of its epoch, and an epoch of this training set has 12 steps", { _, m in
                position(&m) { $0["epochStep"] = 1 << 40 } }),
            ("skipped", "more skipped than taken", { _, m in position(&m) { $0["skippedSteps"] = 1 << 30 } }),
        ]
        for (name, expected, change) in cases {
            let run = temporaryRunDirectory()
            try FileManager.default.copyItem(atPath: base, toPath: run)
            try rewrite(run + "/checkpoints/" + latest, change)
            let before = try Data(contentsOf: URL(fileURLWithPath: run + "/checkpoints/" + latest))
            let r = try Harness.local(["train", "--local", "--resume", "--run-dir", run, "--progress", "plain",
                                       "--set", "training.epochs=3"], timeout: 60)
            #expect(r.status == 1, "\(name): \(r.output)")
            #expect(r.output.contains(expected), "\(name): \(r.output)")
            #expect(!r.output.contains("Fatal error"), "\(name): \(r.output)")
            #expect(try Data(contentsOf: URL(fileURLWithPath: run + "/checkpoints/" + latest)) == before, "\(name): the checkpoint changed")
        }
    }

    /// A checkpoint without checksums (an earlier version's) resumes with the note `predict` and `eval` print.
    @Test func anUncheckedCheckpointResumesWithItsNote() throws {
        let data = try SyntheticData(samples: 200)
        defer { data.remove() }
        let run = try trainedRun(data)
        let latest = try String(contentsOfFile: run + "/checkpoints/latest", encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines)
        try rewrite(run + "/checkpoints/" + latest, checksummed: false) { _, _ in }
        let r = try Harness.local(["train", "--local", "--resume", "--run-dir", run, "--progress", "plain", "--set", "training.epochs=3"])
        #expect(r.status == 0, "\(r.output)")
        #expect(r.output.contains("\(latest): no checksums (written by an earlier bpworker or another program): loaded unverified"),
                "\(r.output)")
    }

    /// `latest` names a file of this run's checkpoints, never a path out of it: edited to point into another run, the
    /// resume used that run's checkpoint while `verify` called the pointer damaged. Now the pointer is passed over and
    /// the newest checkpoint of this run resumes.
    @Test func aLatestPointerOutOfTheRunIsNotFollowed() throws {
        let data = try SyntheticData(samples: 200)
        defer { data.remove() }
        let other = try trainedRun(data)
        let run = try trainedRun(data)
        let otherLatest = try String(contentsOfFile: other + "/checkpoints/latest", encoding: .utf8)
            .trimmingCharacters(in: .whitespacesAndNewlines)
        let escape = "../../" + URL(fileURLWithPath: other).lastPathComponent + "/checkpoints/" + otherLatest
        try Data(escape.utf8).write(to: URL(fileURLWithPath: run + "/checkpoints/latest"))
        let r = try Harness.local(["train", "--local", "--resume", "--run-dir", run, "--progress", "plain", "--set", "training.epochs=3"])
        #expect(r.status == 0, "\(r.output)")
        #expect(!r.output.contains(escape), "\(r.output)")
        #expect(r.output.contains("resumed from \(run)/checkpoints/step-"), "\(r.output)")
    }
}
