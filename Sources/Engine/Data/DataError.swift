/// One error type for all bad input files: names the file and says what is wrong with it.
public struct DataError: Error, CustomStringConvertible, Equatable, Sendable {
    /// The file (or data set name) the error is about.
    public let path: String
    /// What is wrong, in words a user can act on.
    public let reason: String

    public init(path: String, reason: String) {
        self.path = path
        self.reason = reason
    }

    public var description: String { "\(path): \(reason)" }
}

/// "0x1F": how bytes are shown in messages about bad file headers.
func hexByte(_ byte: UInt8) -> String {
    let digits: [Character] = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "A", "B", "C", "D", "E", "F"]
    return "0x" + String(digits[Int(byte >> 4)]) + String(digits[Int(byte & 0xF)])
}
