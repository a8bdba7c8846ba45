import Foundation
import Logging

/// Prints log records of one rank. Rank 0 reports progress on standard output; every other rank reports only
/// errors, prefixed with its rank, on standard error, so N ranks do not print N copies of every line. It writes
/// through the process's `Terminal`, which ends rank 0's progress line before a message.
struct RankLogHandler: LogHandler {
    let rank: Int
    let worldSize: Int
    let terminal: Terminal
    var metadata: Logger.Metadata = [:]
    var logLevel: Logger.Level

    init(rank: Int, worldSize: Int, terminal: Terminal) {
        self.rank = rank
        self.worldSize = worldSize
        self.terminal = terminal
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
        terminal.write(line, to: event.level >= .warning || rank != 0 ? .standardError : .standardOutput)
    }
}
