import Engine
import Foundation

/// Where a run stands, beyond its tensors: everything a checkpoint needs for a resumed run to continue exactly.
struct TrainingPosition: Codable, Equatable {
    /// Steps taken since the run began, skipped ones included (a skipped step still consumes its batch): the
    /// learning-rate schedule, checkpoint names and progress count these.
    var globalStep = 0
    var epoch = 0
    /// Steps done within `epoch`.
    var epochStep = 0
    var skippedSteps = 0
    var worldSize = 1
    var batchSize = 1
    /// The mapped data files the run trained on, as they were (nil in checkpoints of data held in memory, and of
    /// earlier versions): a resume refuses files that changed since.
    var dataFiles: [DataFileRecord]?
    /// The test accuracy measured at the end of the epoch before `epoch`, while no step of `epoch` is done (nil
    /// otherwise, and in checkpoints of earlier versions): a resume of a run that stopped on
    /// `training.target_accuracy` there has nothing more to train (it trained another epoch and replaced the model).
    var testAccuracy: Double?

    /// The largest step count a checkpoint may hold: far beyond any run, and small enough that arithmetic on steps
    /// (the schedule, Adam's bias correction) cannot overflow. Sizes are bounded as the configuration bounds them.
    static let maxSteps = 1 << 48, maxCount = 1 << 24

    /// Why this position, read from a checkpoint, is not one a run can have reached (nil: it could be). A file with
    /// valid checksums may still hold anything: huge counts crashed the resume on overflow, or skipped an epoch.
    var impossibility: String? {
        if globalStep > Self.maxSteps || epochStep > Self.maxSteps || skippedSteps > globalStep {
            return "steps (global \(globalStep), in its epoch \(epochStep), skipped \(skippedSteps)) beyond 2^48, or more "
                + "skipped than taken"
        }
        let sizes = [("epoch", epoch), ("worldSize", worldSize), ("batchSize", batchSize)].filter { $0.1 > Self.maxCount }
        if !sizes.isEmpty { return sizes.map { "\($0.0) \($0.1)" }.joined(separator: ", ") + " beyond 2^24" }
        if samplesSeen == nil { return "\(epochStep) steps of \(worldSize) x \(batchSize) samples overflow a count" }
        return nil
    }

    /// The samples this epoch has seen; nil when the count would overflow.
    var samplesSeen: Int? {
        let (perStep, overflow) = batchSize.multipliedReportingOverflow(by: worldSize)
        let (seen, overflow2) = epochStep.multipliedReportingOverflow(by: perStep)
        return overflow || overflow2 ? nil : seen
    }

    /// Why this position cannot continue on a training set of `datasetSize` samples cut into `stepsPerEpoch` steps of
    /// `worldSize` x `batchSize` here (nil: it can): more steps of its epoch done than an epoch has (the same shape),
    /// or more samples seen than the set holds plus one wrapped batch (another shape). Such a checkpoint belongs to
    /// other data; clamping it would skip the rest of the epoch without a word.
    func mismatch(worldSize: Int, batchSize: Int, stepsPerEpoch: Int, datasetSize: Int) -> String? {
        if self.worldSize == worldSize && self.batchSize == batchSize {
            guard epochStep <= stepsPerEpoch else {
                return "it is at step \(epochStep) of its epoch, and an epoch of this training set has \(stepsPerEpoch) steps"
            }
            return nil
        }
        guard let seen = samplesSeen, seen <= datasetSize + self.batchSize * self.worldSize else {
            return "its epoch has seen \(samplesSeen.map(String.init) ?? "more") samples, and this training set has \(datasetSize)"
        }
        return nil
    }

    /// This position continued on `worldSize` ranks of `batchSize` samples, with `stepsPerEpoch` steps per epoch
    /// there. The same shape continues exactly. Another shape keeps the samples already seen in this epoch
    /// (rounded down to whole new global batches, so none is skipped; up to one global batch is seen again) and
    /// recomputes the global step; `sameShape` tells the caller whether to say what changed.
    ///
    /// A position with every step of its epoch done (`epochStep == stepsPerEpoch`) stays in that epoch: its end, the
    /// evaluation and the target accuracy check, is still to come. Only a stop after an epoch's last step saves one (the
    /// end of an epoch moves the position to the next epoch before it checkpoints); moving it on would skip that
    /// evaluation, and a run that reaches `training.target_accuracy` there would train on past where it stops.
    ///
    /// The global step is always `epoch * stepsPerEpoch + epochStep` in a run's own steps (a skipped step counts as
    /// taken), so it is recomputed for this training set too: a checkpoint of another training set of the same shape
    /// kept its step count, and the run ended short of its schedule ("finished: 128 of 192 planned steps", the cosine
    /// never at its end).
    func continued(worldSize: Int, batchSize: Int, stepsPerEpoch: Int) -> (position: TrainingPosition, sameShape: Bool) {
        var next = self
        let sameShape = self.worldSize == worldSize && self.batchSize == batchSize
        if !sameShape {
            next.epochStep = min((samplesSeen ?? 0) / (batchSize * worldSize), stepsPerEpoch)
            next.worldSize = worldSize
            next.batchSize = batchSize
        }
        next.epochStep = min(next.epochStep, stepsPerEpoch)
        next.globalStep = epoch * stepsPerEpoch + next.epochStep
        next.skippedSteps = min(skippedSteps, next.globalStep)
        if next.epochStep != 0 { next.testAccuracy = nil }
        return (next, sameShape)
    }
}

/// The checkpoint a resume continues from, and the newer ones it skipped as damaged. Rank 0 chooses; every rank
/// receives it (JSON).
struct ResumeChoice: Codable {
    struct Skipped: Codable {
        let path: String
        let reason: String
        var text: String { "\(path): \(reason)" }
    }

    let path: String
    let skipped: [Skipped]
}

/// A checkpoint that is missing, unreadable or does not belong to this run.
struct CheckpointError: Error, CustomStringConvertible, Equatable {
    let description: String
}

/// Checkpoints in RUN_DIR/checkpoints: safetensors files holding the model under PyTorch names, the optimizer
/// state under `optimizer.<state>.<tensor>`, and the position, configuration and layout in `__metadata__`.
/// Rank 0 writes them atomically; `latest` names the newest and is replaced atomically after it; the oldest
/// beyond `keep` are deleted.
struct Checkpointer {
    static let format = "bpworker-checkpoint"
    /// 2 adds the model description (ModelFile.swift); version 1 checkpoints still resume.
    static let formatVersion = "2"
    static let readableVersions: Set<String> = ["1", formatVersion]

    let directory: String
    let keep: Int
    /// The model's description (`ModelDescription.metadata`), written into every checkpoint.
    let modelMetadata: [String: String]

    /// Test hook (`TestHooks.checkpointCrashStep`): the checkpoint of this step stops half-way through its file and
    /// the process dies with SIGKILL, as a crash or a node failure would. Nil in real runs.
    let crashAtStep: Int?
    /// Test hook (`TestHooks.checkpointCorruptStep`): the checkpoint of this step has a byte flipped on disk right after
    /// it is written, as a faulty disk or controller would, before it is read back. Nil in real runs.
    let corruptAtStep: Int?

    init(runDirectory: String, keep: Int, modelMetadata: [String: String] = [:], crashAtStep: Int? = nil, corruptAtStep: Int? = nil) {
        self.corruptAtStep = corruptAtStep
        directory = runDirectory + "/checkpoints"
        self.keep = keep
        self.modelMetadata = modelMetadata
        self.crashAtStep = crashAtStep
    }

    var latestPointer: String { directory + "/latest" }

    /// `step-00001234.safetensors`: the checkpoints this class writes, prunes and `--overwrite` removes.
    static func isCheckpointName(_ name: String) -> Bool { name.hasPrefix("step-") && name.hasSuffix(".safetensors") }
    /// What an interrupted atomic write leaves (see `writeAtomically`).
    static func isTemporaryName(_ name: String) -> Bool { name.hasPrefix(".") && name.hasSuffix(".tmp") }

    /// The newest checkpoint's path, from the `latest` pointer.
    func latest() throws -> String {
        guard let name = try? String(contentsOfFile: latestPointer, encoding: .utf8)
            .trimmingCharacters(in: .whitespacesAndNewlines), !name.isEmpty else {
            throw CheckpointError(description: "\(latestPointer): no checkpoint to resume from")
        }
        // A name of this directory's checkpoints, never a path: a pointer edited to "../../other/..." resumed another
        // run's checkpoint while `verify` called it damaged.
        guard Self.isCheckpointName(name), !name.contains("/") else {
            throw CheckpointError(description: "\(latestPointer): names '\(name)', which is not a checkpoint file of this run "
                + "(step-NNNNNNNN.safetensors in \(directory))")
        }
        return directory + "/" + name
    }

    // MARK: - Verification

    /// Why the checkpoint at `path` cannot be trusted (missing, unreadable, truncated, or failing its checksums), or nil
    /// when it verifies. A file of an earlier version, without checksums, is trusted as it always was.
    static func damage(_ path: String) -> String? {
        guard FileManager.default.fileExists(atPath: path) else { return "missing" }
        do {
            _ = try SafeTensorsFile(path: path).verify()
            return nil
        } catch let error as DataError {
            return error.reason
        } catch {
            return "\(error)"
        }
    }

    /// The run's checkpoints, newest first: the one `latest` names, then the others by the time they were written (a
    /// resume on another world size counts steps anew, so names need not grow with time).
    func newestFirst() -> [String] {
        let names = ((try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? []).filter(Self.isCheckpointName)
        let dated = names.map { name -> (name: String, time: Double) in
            let modified = (try? FileManager.default.attributesOfItem(atPath: directory + "/" + name))?[.modificationDate] as? Date
            return (name, modified?.timeIntervalSince1970 ?? 0)
        }
        var ordered = dated.sorted { ($0.time, $0.name) > ($1.time, $1.name) }.map { directory + "/" + $0.name }
        if let latest = try? latest() {
            ordered.removeAll { $0 == latest }
            ordered.insert(latest, at: 0)
        }
        return ordered
    }

    /// `--resume` alone: the newest checkpoint that verifies, and each newer one skipped with the reason. With
    /// `setAside`, a damaged file is renamed to NAME.damaged (kept for inspection, out of every later choice).
    func newestIntact(setAside: Bool = false) throws -> ResumeChoice {
        var skipped: [ResumeChoice.Skipped] = []
        for path in newestFirst() {
            guard var reason = Self.damage(path) else { return ResumeChoice(path: path, skipped: skipped) }
            if setAside && reason != "missing" && (try? FileManager.default.moveItem(atPath: path, toPath: path + ".damaged")) != nil {
                reason += " (kept as \(URL(fileURLWithPath: path).lastPathComponent).damaged)"
            }
            skipped.append(.init(path: path, reason: reason))
        }
        let tried = skipped.map { "\(URL(fileURLWithPath: $0.path).lastPathComponent) (\($0.reason))" }.joined(separator: "; ")
        throw CheckpointError(description: skipped.isEmpty ? "\(directory): no checkpoint to resume from"
            : "\(directory): no intact checkpoint to resume from: \(tried)")
    }

    /// `--resume PATH`: the path when it verifies; otherwise an error naming the damage and the newest intact
    /// checkpoint of this run, if there is one.
    func checkedExplicit(_ path: String) throws -> ResumeChoice {
        guard let reason = Self.damage(path) else { return ResumeChoice(path: path, skipped: []) }
        let alternative = (try? newestIntact()).map { "; the newest intact checkpoint is \($0.path) (resume with --resume \($0.path), "
            + "or --resume alone for the newest intact one)" } ?? "; this run has no intact checkpoint"
        throw CheckpointError(description: "\(path): \(reason): not resumed from it\(alternative)")
    }

    /// Writes a checkpoint (rank 0 only) and returns its path.
    func save(model: Model<Float>, optimizer: Optimizer<Float>, position: TrainingPosition, config: Configuration) throws -> String {
        do { try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true) } catch {
            // In words, not Foundation's "Error Domain=NSCocoaErrorDomain Code=512 ..." (the run directory became a file).
            throw CheckpointError(description: "cannot create \(directory): \(plainReason(error))")
        }
        let name = String(format: "step-%08d.safetensors", position.globalStep)
        let path = directory + "/" + name
        // The file's bytes in a scope of their own, so that neither they nor the writer's copies of the tensors are
        // alive when the file is read back: the peak stays at twice the checkpoint's size, as the memory estimate
        // counts, not three times.
        do {
            let bytes = try serializedCheckpoint(model: model, optimizer: optimizer, position: position, config: config)
            if crashAtStep == position.globalStep {
                try writeAtomically(bytes, to: path, faultAfterBytes: bytes.count / 2) { kill(getpid(), SIGKILL) }
            }
            do { try writeAtomically(bytes, to: path) } catch {
                // A full disk or quota: say what it took (the temporary file is removed, the previous checkpoints untouched).
                throw CheckpointError(description: "\(error) (the checkpoint needs \(bytesText(Double(bytes.count))); "
                    + "\(bytesText(Self.freeBytes(directory))) free in \(directory))")
            }
            if corruptAtStep == position.globalStep, let handle = FileHandle(forUpdatingAtPath: path) {
                try handle.seek(toOffset: UInt64(bytes.count - 1))
                try handle.write(contentsOf: [~bytes[bytes.count - 1]])
                try handle.close()
            }
        }
        // Read back before `latest` moves to it and older ones are pruned: a checkpoint that does not verify never
        // replaces one that does, and is set aside.
        if let damage = Self.damage(path) {
            try? FileManager.default.moveItem(atPath: path, toPath: path + ".damaged")
            throw CheckpointError(description: "\(path) does not verify after writing (\(damage)); set aside as \(name).damaged")
        }
        try writeAtomically(Data((name + "\n").utf8), to: latestPointer)
        try prune(keeping: path)
        return path
    }

    /// The checkpoint file's bytes: the model's state, the optimizer's under `optimizer.<state>.`, and the metadata.
    private func serializedCheckpoint(model: Model<Float>, optimizer: Optimizer<Float>, position: TrainingPosition,
                                      config: Configuration) throws -> Data {
        var writer = SafeTensorsWriter()
        addState(of: model, to: &writer)
        for state in optimizer.state {
            addTensors(of: state.buffer, layout: model.parameterTable, prefix: "optimizer.\(state.name).", to: &writer)
        }
        let positionJSON = String(decoding: try JSONEncoder().encode(position), as: UTF8.self)
        writer.metadata = [
            "format": Self.format, "format_version": Self.formatVersion,
            "step": "\(position.globalStep)", "epoch": "\(position.epoch)", "epoch_step": "\(position.epochStep)",
            "world_size": "\(position.worldSize)", "optimizer": config.optimizer.rawValue,
            "optimizer_step": "\(optimizer.stepCount)", "position": positionJSON,
            "model": model.spec.summary, "layout_hash": String(layoutHash(model), radix: 16), "config": config.yaml,
        ].merging(modelMetadata) { own, _ in own }
        return try writer.serialized()
    }

    /// Bytes an unprivileged process may still write under `directory` (statvfs), 0 when unknown.
    static func freeBytes(_ directory: String) -> Double {
        var info = statvfs()
        guard statvfs(directory, &info) == 0 else { return 0 }
        return Double(info.f_bavail) * Double(info.f_frsize)
    }

    /// Deletes all but the newest `keep` checkpoints (by the time they were written; `newest`, just written and
    /// verified, always stays), and temporary files a crash left behind.
    private func prune(keeping newest: String) throws {
        for path in newestFirst().filter({ $0 != newest }).dropFirst(max(0, keep - 1)) {
            try? FileManager.default.removeItem(atPath: path)
        }
        for name in try FileManager.default.contentsOfDirectory(atPath: directory) where Self.isTemporaryName(name) {
            try? FileManager.default.removeItem(atPath: directory + "/" + name)
        }
    }

    /// Reads and validates a checkpoint into `model` and `optimizer` (rank 0 only): every tensor must be there with
    /// the model's shape, the optimizer's state must match its kind, and the metadata must describe this model.
    /// Returns the position and, for a file without checksums, the note that says it loaded unverified.
    static func load(path: String, model: Model<Float>, optimizer: Optimizer<Float>) throws
        -> (position: TrainingPosition, unverified: String?, configuration: String?) {
        let file = try SafeTensorsFile(path: path)
        func fail(_ reason: String) -> CheckpointError { CheckpointError(description: "\(path): \(reason)") }
        // Checked again before any value is used: `checkedExplicit` and `newestIntact` chose a file that verified, but it
        // may have changed since (one more pass over a checkpoint, once per resume).
        let unverified = try ModelFile.verified(file)
        guard file.metadata["format"] == format else {
            throw fail("not a bpworker checkpoint (metadata format is \(file.metadata["format"].map { "'\($0)'" } ?? "missing"))")
        }
        guard let version = file.metadata["format_version"], readableVersions.contains(version) else {
            throw fail("checkpoint format version \(file.metadata["format_version"] ?? "?"), "
                + "this bpworker reads \(readableVersions.sorted().joined(separator: " and "))")
        }
        guard file.metadata["layout_hash"] == String(layoutHash(model), radix: 16) else {
            throw fail("checkpoint is for the model \(file.metadata["model"] ?? "?"), this run builds \(model.spec.summary)")
        }
        guard let json = file.metadata["position"], let position = try? JSONDecoder().decode(TrainingPosition.self, from: Data(json.utf8)),
              position.globalStep >= 0, position.epoch >= 0, position.epochStep >= 0, position.worldSize >= 1,
              position.batchSize >= 1 else {
            throw fail("metadata 'position' is missing or malformed")
        }
        if let impossibility = position.impossibility { throw fail("metadata 'position' holds \(impossibility)") }
        guard let optimizerStep = file.metadata["optimizer_step"].flatMap({ Int($0) }), optimizerStep >= 0 else {
            throw fail("metadata 'optimizer_step' is missing or malformed")
        }
        guard optimizerStep <= TrainingPosition.maxSteps else {
            throw fail("metadata 'optimizer_step' is \(optimizerStep), beyond 2^48 steps")
        }
        var expected = try readState(from: file, into: model)
        for state in optimizer.state {
            let prefix = "optimizer.\(state.name)."
            if let missing = model.parameterTable.first(where: { file.tensors[prefix + $0.name] == nil }) {
                throw fail("missing tensor '\(prefix + missing.name)': the checkpoint's optimizer is "
                    + "\(file.metadata["optimizer"] ?? "?"), this run uses \(optimizer.config.kind.rawValue)")
            }
            expected.formUnion(try readTensors(from: file, layout: model.parameterTable, prefix: prefix, into: state.buffer))
        }
        if let extra = file.names.first(where: { !expected.contains($0) }) {
            throw fail("tensor '\(extra)' does not belong to this model and optimizer (\(optimizer.config.kind.rawValue))")
        }
        optimizer.stepCount = optimizerStep
        return (position, unverified, file.metadata["config"])
    }
}

/// A data file as a checkpoint recorded it.
struct DataFileRecord: Codable, Equatable {
    let path: String
    let identity: FileIdentity

    /// Why the file at `path` is not the one recorded (by size and modification time), or nil.
    func change() -> String? {
        identity.change(to: path.withCString(FileIdentity.init), sameFile: false)
    }
}
