import Foundation

/// A file that records are appended to, each whole or not at all: a write that fails (a full disk, a quota) is cut
/// back to the end of the last whole record, so a reader never meets half a line or half an event, and the first
/// failure is reported (`onFirstFailure`) while the run goes on and tries again with the next record.
/// (swift-corelibs-foundation's `FileHandle.write(_: Data)` traps on an error: a full run directory crashed rank 0.)
final class RecordFile {
    let path: String
    private let handle: FileHandle
    /// Where the last whole record ends.
    private var end: UInt64
    private var failed = false
    private let onFirstFailure: (String) -> Void

    init?(path: String, onFirstFailure: @escaping (String) -> Void) {
        guard let handle = FileHandle(forWritingAtPath: path), let end = try? handle.seekToEnd() else { return nil }
        self.path = path
        self.handle = handle
        self.end = end
        self.onFirstFailure = onFirstFailure
    }

    func append(_ record: Data) {
        do {
            try handle.write(contentsOf: record)
            end += UInt64(record.count)
        } catch {
            try? handle.truncate(atOffset: end)
            _ = try? handle.seekToEnd()
            guard !failed else { return }
            failed = true
            let reason = ((error as NSError).userInfo[NSUnderlyingErrorKey] as? NSError).map { String(cString: strerror(Int32($0.code))) }
            onFirstFailure("\(path): a record could not be written (\(reason ?? "\(error)")); the run goes on, and records "
                + "that cannot be written are left out")
        }
    }
}
