import Foundation
import Synchronization

/// A process's standard output and error as one console, shared by the log (`RankLogHandler`) and rank 0's
/// progress line (`Progress`). The progress line is redrawn in place (`\r`, then ESC [K to clear it) and stays
/// open, without a newline, until the next redraw; anything else written first ends it with a newline, so a log
/// message never lands at the end of the progress line. Safe to use from any thread.
final class Terminal: Sendable {
    enum Stream: Sendable { case standardOutput, standardError }

    private let output: @Sendable (Stream, Data) -> Void
    /// Whether a progress line is drawn and not yet ended.
    private let lineOpen = Mutex(false)

    /// - Parameter output: where the bytes go; the process's own streams unless a test captures them.
    init(output: @escaping @Sendable (Stream, Data) -> Void = Terminal.write) {
        self.output = output
    }

    static func write(_ stream: Stream, _ data: Data) {
        switch stream {
        case .standardOutput: FileHandle.standardOutput.write(data)
        case .standardError: FileHandle.standardError.write(data)
        }
    }

    /// Draws `line` over the open progress line (or as a new one), leaving it open.
    func redraw(_ line: String) {
        lineOpen.withLock { open in
            output(.standardOutput, Data(("\r\u{1B}[K" + line).utf8))
            open = true
        }
    }

    /// Ends the open progress line, if there is one, so the next output starts on a line of its own.
    func endLine() {
        lineOpen.withLock { open in
            if open { output(.standardOutput, Data("\n".utf8)) }
            open = false
        }
    }

    /// Writes `text` (whole lines) after ending the open progress line.
    func write(_ text: String, to stream: Stream) {
        lineOpen.withLock { open in
            if open { output(.standardOutput, Data("\n".utf8)) }
            open = false
            output(stream, Data(text.utf8))
        }
    }
}
