import Foundation
import Logging

/// Prints log records of one rank. Rank 0 reports progress on standard output; every other rank reports only
/// errors, prefixed with its rank, on standard error, so N ranks do not print N copies of every line.
struct RankLogHandler: LogHandler {
    let rank: Int
    let worldSize: Int
    var metadata: Logger.Metadata = [:]
    var logLevel: Logger.Level

    init(rank: Int, worldSize: Int) {
        self.rank = rank
        self.worldSize = worldSize
        logLevel = rank == 0 ? .info : .error
    }

    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    func log(event: LogEvent) {
        // Rank 0's progress needs no prefix; every error in a multi-rank job names its rank.
        let prefix = rank > 0 || (worldSize > 1 && event.level >= .warning) ? "[rank \(rank)] " : ""
        let level = event.level >= .warning ? "\(event.level): " : ""
        let line = prefix + level + "\(event.message)\n"
        if event.level >= .warning || rank != 0 {
            FileHandle.standardError.write(Data(line.utf8))
        } else {
            FileHandle.standardOutput.write(Data(line.utf8))
        }
    }
}
