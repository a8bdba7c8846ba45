import Foundation

// MARK: - Formatting and hashing shared by the Worker's messages

func fnv1a<C: Collection>(_ bytes: C) -> UInt64 where C.Element == UInt8 {
    var hash: UInt64 = 0xcbf2_9ce4_8422_2325
    for byte in bytes { hash = (hash ^ UInt64(byte)) &* 0x100_0000_01b3 }
    return hash
}

/// 1234567 -> "1,234,567".
func grouped<I: BinaryInteger>(_ value: I) -> String {
    let digits = String(value.magnitude)
    var out = ""
    for (i, c) in digits.enumerated() {
        if i > 0 && (digits.count - i) % 3 == 0 { out.append(",") }
        out.append(c)
    }
    return (value < 0 ? "-" : "") + out
}

/// 0.9031 -> "90.31%".
func percent(_ x: Double) -> String { String(format: "%.2f%%", 100 * x) }

/// Seconds as "42s", "3m05s" or "1h07m"; "?" when unknown.
func duration(_ seconds: Double) -> String {
    guard seconds.isFinite, seconds >= 0 else { return "?" }
    guard seconds < 3.6e9 else { return "over 1,000,000h" }
    let s = Int(seconds.rounded())
    return s >= 3600 ? "\(s / 3600)h\(String(format: "%02d", s / 60 % 60))m" : s >= 60 ? "\(s / 60)m\(String(format: "%02d", s % 60))s" : "\(s)s"
}

/// (1, "rank") -> "1 rank", (4, "rank") -> "4 ranks".
func counted(_ count: Int, _ noun: String) -> String { "\(count) \(noun)\(count == 1 ? "" : "s")" }

/// A rounded value with thousands separators, "1,234"; in exponent form beyond 1e15 ("6.37e+35"), where rounding to
/// an Int would overflow (a diverging run's loss reaches 1e35).
func groupedRounded(_ value: Double) -> String {
    abs(value) < 1e15 ? grouped(Int(value.rounded())) : String(format: "%.3g", value)
}

/// A loss as the progress lines print it: four decimals, or four significant digits beyond a million.
func lossText(_ loss: Double) -> String {
    abs(loss) < 1e6 || !loss.isFinite ? String(format: "%.4f", loss) : String(format: "%.4g", loss)
}
