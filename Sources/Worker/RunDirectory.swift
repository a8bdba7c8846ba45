import Engine
import Foundation

/// What a run directory already holds, and whether `train` may start there.
///
/// A run directory is a user's work: its checkpoints are what `--resume` continues and its `config.yaml` is what
/// `--resume` reads. `train` without `--resume` refuses to start over an existing run (the convention of Hugging
/// Face's `--overwrite_output_dir`); `--overwrite` removes the previous run's own files, and nothing else the
/// user put there. Rank 0 inspects the directory (a shared file system on multi-node jobs), and every rank agrees
/// on the verdict before anything is written.
struct RunDirectory {
    let path: String
    /// Checkpoint files (`step-*.safetensors`), oldest first.
    var checkpoints: [String] = []
    /// The name `checkpoints/latest` points to.
    var latest: String?
    var status: RunStatus?
    /// status.json exists but cannot be read: a run was there, and what it was is unknown.
    var statusUnreadable = false
    var hasModel = false

    /// How `train` was asked to treat the directory.
    enum StartMode: Equatable {
        /// A new run: refused where a run exists.
        case fresh
        /// A new run on purpose: the previous run's files are removed once setup has succeeded.
        case overwrite
        /// Continue the run that is there.
        case resume
    }

    /// The files a run writes, relative to the run directory: what `--overwrite` removes. (`config.yaml` is
    /// replaced by the new run's, atomically, so it is not removed: it may also be the file `-c` read.)
    static let runFiles = ["status.json", "metrics.jsonl", "model.safetensors", "gradcheck.json", "report.html",
                           "timeline.json"]

    static func inspect(_ path: String) -> RunDirectory {
        var directory = RunDirectory(path: path)
        let files = FileManager.default
        let checkpointDirectory = path + "/checkpoints"
        if let names = try? files.contentsOfDirectory(atPath: checkpointDirectory) {
            directory.checkpoints = names.filter(Checkpointer.isCheckpointName).sorted()
        }
        if let pointer = try? String(contentsOfFile: checkpointDirectory + "/latest", encoding: .utf8) {
            let name = pointer.trimmingCharacters(in: .whitespacesAndNewlines)
            directory.latest = name.isEmpty ? nil : name
        }
        if files.fileExists(atPath: RunStatus.path(path)) {
            do { directory.status = try RunStatus.read(path) } catch { directory.statusUnreadable = true }
        }
        directory.hasModel = files.fileExists(atPath: path + "/model.safetensors")
        return directory
    }

    /// Whether a previous run's work is here: any checkpoint or saved model, or a status other than a run that
    /// failed, or was stopped during its gradient check, before its first step (either left nothing worth keeping).
    var holdsRun: Bool {
        if !checkpoints.isEmpty || latest != nil || hasModel || statusUnreadable { return true }
        guard let status else { return false }
        return !((status.state == .failed || status.state == .stopped) && status.step == 0)
    }

    /// "finished, last checkpoint step-00003510", for messages.
    var summary: String {
        var parts: [String] = []
        if let status { parts.append(status.state.rawValue + (status.state == .training ? " or killed" : "")) }
        if statusUnreadable { parts.append("unreadable status.json") }
        if let last = latest ?? checkpoints.last {
            parts.append("last checkpoint \(last.replacingOccurrences(of: ".safetensors", with: ""))")
        } else if hasModel {
            parts.append("model.safetensors, no checkpoint")
        }
        return parts.joined(separator: ", ")
    }

    /// Throws when a fresh start would lose the run that is here. (`--overwrite` means to; `--resume` continues it,
    /// and a missing checkpoint is found where it is read.)
    func checkStart(_ mode: StartMode) throws(RunDirectoryError) {
        // Something other than a file where `latest` goes: no checkpoint could be made latest (the rename onto it
        // fails), and a resume ended after 4 failed checkpoints. Refused at once, before setup.
        var info = stat()
        let latestPath = path + "/checkpoints/latest"
        if mode != .overwrite, lstat(latestPath, &info) == 0, (info.st_mode & S_IFMT) != S_IFREG {
            throw RunDirectoryError(description: "\(latestPath) is not a file (a directory or another kind): it must be a file "
                + "naming the latest checkpoint; remove it, or start again with --overwrite")
        }
        guard mode == .fresh, holdsRun else { return }
        throw RunDirectoryError(description: "\(path) already holds a run (\(summary)); continue it with --resume, "
            + "start again with --overwrite, or choose another --run-dir")
    }

    /// Removes the previous run's checkpoints, metrics, status, model, gradient-check report and heartbeats
    /// (rank 0, `--overwrite`, after setup has succeeded); returns what it removed, for the log. Files the user
    /// put in the directory stay. `directories: false` (a fresh start where no run trained) removes files only: the
    /// directories may be the user's, a `checkpoints` that is a mount point among them.
    func removePreviousRun(directories: Bool = true) throws -> [String] {
        let files = FileManager.default
        var removed: [String] = []
        func removeIfEmpty(_ directory: String) throws {
            if directories, (try? files.contentsOfDirectory(atPath: directory))?.isEmpty == true { try files.removeItem(atPath: directory) }
        }
        let checkpointDirectory = path + "/checkpoints"
        if let names = try? files.contentsOfDirectory(atPath: checkpointDirectory) {
            let owned = names.filter { Checkpointer.isCheckpointName($0) || $0 == "latest" || Checkpointer.isTemporaryName($0) }
            for name in owned { try files.removeItem(atPath: checkpointDirectory + "/" + name) }
            let count = owned.filter(Checkpointer.isCheckpointName).count
            if count > 0 { removed.append("\(count) checkpoint\(count == 1 ? "" : "s")") }
            try removeIfEmpty(checkpointDirectory)
        }
        for name in Self.runFiles where files.fileExists(atPath: path + "/" + name) {
            try files.removeItem(atPath: path + "/" + name)
            removed.append(name)
        }
        // What a write of one of them left when its process died in the middle (`.model.safetensors.PID.tmp`).
        for name in (try? files.contentsOfDirectory(atPath: path)) ?? []
        where name.hasSuffix(".tmp") && Self.runFiles.contains(where: { name.hasPrefix("." + $0 + ".") }) {
            try files.removeItem(atPath: path + "/" + name)
            removed.append(name)
        }
        let tensorBoard = path + "/tensorboard"
        if let names = try? files.contentsOfDirectory(atPath: tensorBoard) {
            let events = names.filter { $0.hasPrefix("events.out.tfevents.") }
            for name in events { try files.removeItem(atPath: tensorBoard + "/" + name) }
            if !events.isEmpty { removed.append("\(events.count) TensorBoard event file\(events.count == 1 ? "" : "s")") }
            try removeIfEmpty(tensorBoard)
        }
        let heartbeats = path + "/heartbeat"
        if let names = try? files.contentsOfDirectory(atPath: heartbeats) {
            for name in names where name.hasPrefix("rank-") && name.hasSuffix(".json") {
                try files.removeItem(atPath: heartbeats + "/" + name)
            }
            try removeIfEmpty(heartbeats)
        }
        return removed
    }
}

extension RunDirectory {
    /// Makes the run directory and its parents, or says in words why it cannot: a path that is a file, a parent that
    /// is a file or may not be written. (Foundation's own error prints as "Error Domain=NSCocoaErrorDomain Code=516".)
    static func create(_ path: String) throws(RunDirectoryError) {
        var isDirectory: ObjCBool = false
        if FileManager.default.fileExists(atPath: path, isDirectory: &isDirectory) {
            if isDirectory.boolValue { return }
            throw RunDirectoryError(description: "it exists and is not a directory")
        }
        // The nearest ancestor that exists must be a directory; Foundation says only "error 512" when it is not.
        var ancestor = parent(of: path)
        while !ancestor.isEmpty && ancestor != "/" && !FileManager.default.fileExists(atPath: ancestor) {
            ancestor = parent(of: ancestor)
        }
        if !ancestor.isEmpty && FileManager.default.fileExists(atPath: ancestor, isDirectory: &isDirectory) && !isDirectory.boolValue {
            throw RunDirectoryError(description: "cannot create it: \(ancestor) is not a directory")
        }
        do {
            try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
        } catch {
            throw RunDirectoryError(description: "cannot create it: \(plainReason(error))")
        }
    }
}

/// A Foundation file error in words: the POSIX reason beneath it ("Not a directory"), not its domain and code.
func plainReason(_ error: any Error) -> String {
    let underlying = (error as NSError).userInfo[NSUnderlyingErrorKey] as? NSError
    return underlying.map { $0.domain == NSPOSIXErrorDomain ? String(cString: strerror(Int32($0.code))) : $0.localizedDescription }
        ?? error.localizedDescription
}

/// The path without its last component: "runs" for "runs/a/", "" for "a", "/" for "/a". Split on "/" by hand:
/// Foundation's `deletingLastPathComponent` on Linux traps on a one-character relative path ("a", "r/x" in a loop).
func parent(of path: String) -> String {
    var components = path.split(separator: "/", omittingEmptySubsequences: true)
    guard !components.isEmpty else { return path.hasPrefix("/") ? "/" : "" }
    components.removeLast()
    let joined = components.joined(separator: "/")
    return path.hasPrefix("/") ? "/" + joined : joined
}

struct RunDirectoryError: Error, CustomStringConvertible, Equatable {
    let description: String
}

/// The run directory this process committed, by device and inode, on every rank: a job whose directory was moved
/// away (or removed) while it ran, and another run started at the same path, wrote its status.json and report.html
/// into that other run by path, and left its own directory saying `training`. Writes by path into the run directory
/// ask `allowsWrite(to:)` first; the files a job holds open (metrics, TensorBoard, heartbeats) follow their directory.
enum RunDirectoryIdentity {
    nonisolated(unsafe) private static var recorded: (path: String, device: UInt64, inode: UInt64)?

    /// Records `path` as this job's run directory (after it is created; every rank, before any other thread starts).
    static func record(_ path: String) {
        var info = stat()
        guard stat(path, &info) == 0 else { return }
        recorded = (path, UInt64(info.st_dev), UInt64(info.st_ino))
    }

    /// Whether a write to `file` may go ahead: true unless `file` is in the recorded run directory and the directory
    /// at that path is no longer the one recorded (moved, removed or replaced).
    static func allowsWrite(to file: String) -> Bool {
        guard let (path, device, inode) = recorded, file.hasPrefix(path + "/") else { return true }
        var info = stat()
        return stat(path, &info) == 0 && UInt64(info.st_dev) == device && UInt64(info.st_ino) == inode
    }

    /// Throws unless `allowsWrite(to: file)`: for the writes that report their failure (the report, the timeline,
    /// the model).
    static func requireWritable(_ file: String) throws(RunDirectoryError) {
        guard allowsWrite(to: file) else {
            throw RunDirectoryError(description: "the run directory was moved or replaced while the job ran")
        }
    }
}

/// Rank 0's hold on its run directory for the job's life: an `flock` on `RUN_DIR/.lock`, which the kernel releases
/// when the process ends, however it ends. A second job in the same directory (`--overwrite` or `--resume` while one
/// runs there, or two starts at once) is refused before it writes anything: two such jobs overwrote each other's
/// config.yaml, metrics and checkpoints, and both exited 0.
enum RunDirectoryLock {
    nonisolated(unsafe) private static var held: (directory: String, descriptor: Int32)?

    /// Takes the lock of `directory` if its lock file exists (so that a refused start creates nothing): at the
    /// inspection, before setup.
    static func takeIfPresent(_ directory: String) throws(RunDirectoryError) {
        guard FileManager.default.fileExists(atPath: directory + "/.lock") else { return }
        try take(directory, creating: false)
    }

    /// Takes the lock of `directory`, creating the lock file, and writes who holds it: at the commit, before the
    /// previous run's files are removed.
    static func takeAndRecord(_ directory: String) throws(RunDirectoryError) {
        try take(directory, creating: true)
        guard let descriptor = held?.descriptor else { return }
        let holder = "pid \(getpid()) on \(ProcessInfo.processInfo.hostName), since \(ISO8601DateFormatter().string(from: Date()))\n"
        _ = ftruncate(descriptor, 0)
        _ = holder.withCString { pwrite(descriptor, $0, strlen($0), 0) }
    }

    /// Why the held lock no longer guards its directory (nil: it does): its file was removed or replaced, with the
    /// directory or alone.
    static func lost() -> String? {
        guard let (directory, descriptor) = held else { return nil }
        var heldFile = stat(), current = stat()
        guard fstat(descriptor, &heldFile) == 0 else { return nil }
        guard stat(directory + "/.lock", &current) == 0, current.st_ino == heldFile.st_ino, current.st_dev == heldFile.st_dev else {
            return "\(directory) was removed or replaced while the run trained (its .lock is not the one this job holds): "
                + "the run's config, metrics and checkpoints there are gone or another's; stopping"
        }
        return nil
    }

    /// Where the held lock's directory is now, when it was moved away from its path while the job ran (nil: not moved,
    /// removed, or no lock held here): the kernel knows the open lock file's current path.
    static func movedDirectory() -> String? {
        guard let (directory, descriptor) = held else { return nil }
        var buffer = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
        let length = readlink("/proc/self/fd/\(descriptor)", &buffer, buffer.count - 1)
        guard length > 0 else { return nil }
        let path = String(decoding: buffer.prefix(length).map { UInt8(bitPattern: $0) }, as: UTF8.self)
        guard path.hasSuffix("/.lock"), !path.hasSuffix(" (deleted)") else { return nil }
        let now = String(path.dropLast("/.lock".count))
        return now == directory ? nil : now
    }

    /// Whether a job (another process) holds the lock of `directory` now: whether a run is going on there.
    static func isHeld(_ directory: String) -> Bool {
        let descriptor = open(directory + "/.lock", O_RDONLY | O_CLOEXEC)
        guard descriptor >= 0 else { return false }
        defer { close(descriptor) }
        return flock(descriptor, LOCK_SH | LOCK_NB) != 0 && errno == EWOULDBLOCK
    }

    private static func take(_ directory: String, creating: Bool) throws(RunDirectoryError) {
        if held?.directory == directory { return }
        let path = directory + "/.lock"
        let descriptor = open(path, O_RDWR | O_CLOEXEC | (creating ? O_CREAT : 0), 0o644)
        guard descriptor >= 0 else {
            throw RunDirectoryError(description: "\(path): cannot open the run directory's lock: \(String(cString: strerror(errno)))")
        }
        guard flock(descriptor, LOCK_EX | LOCK_NB) == 0 else {
            let holder = (try? String(contentsOfFile: path, encoding: .utf8))?.trimmingCharacters(in: .whitespacesAndNewlines) ?? ""
            close(descriptor)
            throw RunDirectoryError(description: "another bpworker job is running in \(directory)"
                + (holder.isEmpty ? "" : " (\(holder))") + ": wait for it to end or stop it, or use another --run-dir")
        }
        held = (directory, descriptor)
    }
}
