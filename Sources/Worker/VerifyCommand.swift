import ArgumentParser
import Engine
import Foundation

/// `bpworker verify PATH...`: each model file or checkpoint checked against its checksums, before a run relies on it.
struct Verify: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Verify model files and checkpoints against their checksums.",
        discussion: """
            A PATH may be a file, a run directory (its model.safetensors, its checkpoints and where checkpoints/latest \
            points) or a checkpoints directory. Prints one verdict per file: intact, unverified (a file of an earlier \
            version, without checksums) or DAMAGED with the reason. Exits 1 when any file is damaged or missing.
              bpworker verify runs/default
              bpworker verify runs/default/checkpoints/step-00001400.safetensors
            """)

    @Argument(help: "Files, run directories or checkpoints directories.")
    var paths: [String]

    func run() throws {
        var damaged = 0
        for path in paths {
            for (file, verdict) in Self.verdicts(path) {
                print("\(file): \(verdict.text)")
                if verdict.isDamage { damaged += 1 }
            }
        }
        if damaged > 0 {
            FileHandle.standardError.write(Data("bpworker verify: \(damaged) damaged or missing\n".utf8))
            throw ExitCode.failure
        }
    }

    enum Verdict: Equatable {
        case intact(tensors: Int, bytes: Int)
        case unverified
        case damaged(String)
        /// Nothing there to verify, where something should be.
        case missing(String)
        /// A run that has written no model file or checkpoint yet, as its status.json says: nothing is wrong.
        case notYet(String)

        var isDamage: Bool {
            switch self {
            case .damaged, .missing: true
            case .intact, .unverified, .notYet: false
            }
        }

        var text: String {
            switch self {
            case let .intact(tensors, bytes): "intact (\(tensors) tensors, \(bytes) bytes, every checksum matches)"
            case .unverified: "unverified: no checksums (written by an earlier bpworker or another program)"
            case let .damaged(reason): "DAMAGED: " + (reason.hasPrefix("damaged: ") ? String(reason.dropFirst(9)) : reason)
            case let .missing(reason): "MISSING: " + reason
            case let .notYet(reason): "nothing to verify yet: " + reason
            }
        }
    }

    /// The files `path` stands for, each with its verdict.
    static func verdicts(_ path: String) -> [(String, Verdict)] {
        var isDirectory: ObjCBool = false
        guard FileManager.default.fileExists(atPath: path, isDirectory: &isDirectory) else { return [(path, .missing("no such file"))] }
        guard isDirectory.boolValue else { return [(path, verdict(path))] }
        let checkpoints = FileManager.default.fileExists(atPath: path + "/checkpoints") ? path + "/checkpoints" : path
        var files: [String] = []
        if FileManager.default.fileExists(atPath: path + "/model.safetensors") { files.append(path + "/model.safetensors") }
        let names = ((try? FileManager.default.contentsOfDirectory(atPath: checkpoints)) ?? []).filter(Checkpointer.isCheckpointName)
        files += names.sorted().map { checkpoints + "/" + $0 }
        var result = files.map { ($0, verdict($0)) }
        // `latest` must name a checkpoint that is there: a resume would skip it.
        var info = stat()
        if lstat(checkpoints + "/latest", &info) == 0, (info.st_mode & S_IFMT) != S_IFREG {
            result.append((checkpoints + "/latest", .damaged("is not a file (a directory or another kind): no checkpoint can be made "
                + "latest while it is there")))
        } else if let bytes = FileManager.default.contents(atPath: checkpoints + "/latest") {
            if let text = String(data: bytes, encoding: .utf8) {
                let latest = text.trimmingCharacters(in: .whitespacesAndNewlines)
                if !names.contains(latest) {
                    // A path, not a name of this directory's checkpoints, is passed over by a resume, even where it
                    // leads to one of them.
                    let why = latest.contains("/") ? "which is not the name of a checkpoint in \(checkpoints) (it must be a file "
                        + "name, such as step-00000060.safetensors; a resume passes it over)" : "which is not there"
                    result.append((checkpoints + "/latest", .damaged("names \(latest.isEmpty ? "nothing" : latest), \(why)")))
                }
            } else {
                result.append((checkpoints + "/latest", .damaged("not text (\(bytes.count) bytes that are not UTF-8): it names no checkpoint")))
            }
        }
        if result.isEmpty {
            // A run going on before its first checkpoint has nothing to verify and nothing wrong; any other directory
            // without one lacks what was asked for, a run that ended before its first checkpoint included.
            let status = try? RunStatus.read(path)
            if let status, status.state == .starting || status.state == .training {
                let where_ = "\(status.state.rawValue) (step \(grouped(status.step)) of \(grouped(status.totalSteps)))"
                result.append(RunDirectoryLock.isHeld(path)
                    ? (path, .notYet("the run is \(where_) and has written no checkpoint or model file so far"))
                    : (path, .missing("no model file or checkpoint here; status.json says \(where_), but no job runs here: "
                        + "it ended before its first checkpoint")))
            } else {
                result.append((path, .missing("no model file or checkpoint here")))
            }
        }
        return result
    }

    static func verdict(_ file: String) -> Verdict {
        do {
            let opened = try SafeTensorsFile(path: file)
            switch try opened.verify() {
            case .intact:
                let bytes = (try? FileManager.default.attributesOfItem(atPath: file))?[.size] as? Int ?? 0
                return .intact(tensors: opened.names.count, bytes: bytes)
            case .unchecked:
                return .unverified
            }
        } catch let error as DataError {
            return .damaged(error.reason)
        } catch {
            return .damaged("\(error)")
        }
    }
}
