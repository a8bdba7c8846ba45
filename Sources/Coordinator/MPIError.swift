import CMPI

/// A failed MPI call: the C function's name, its return code and the text MPI gives for that code.
///
/// MPI_COMM_WORLD runs with MPI_ERRORS_RETURN, so a failing call returns here instead of killing the job.
public struct MPIError: Error, Sendable, Equatable, CustomStringConvertible {
    /// The C function that failed, e.g. "MPI_Allreduce".
    public let call: String
    /// The MPI error code it returned.
    public let code: Int32
    /// MPI_Error_string's text for `code`, e.g. "MPI_ERR_TRUNCATE: message truncated".
    public let message: String

    public init(call: String, code: Int32, message: String) {
        self.call = call
        self.code = code
        self.message = message
    }

    /// "MPI_Allreduce failed: MPI_ERR_TRUNCATE: message truncated (code 15)".
    public var description: String {
        "\(call) failed: \(message) (code \(code))"
    }
}

/// The one gate every MPI return code passes through: anything but MPI_SUCCESS becomes an `MPIError`.
@inline(__always)
func mpiCheck(_ code: Int32, _ call: StaticString) throws(MPIError) {
    if code != MPI_SUCCESS {
        throw MPIError(call: call.description, code: code, message: mpiErrorString(code))
    }
}

/// MPI_Error_string's text for a code; it cannot go through `mpiCheck` (that would recurse), so a failure
/// to look the text up yields a plain fallback instead.
func mpiErrorString(_ code: Int32) -> String {
    let capacity = Int(bp_mpi_max_error_string()) + 1
    return withUnsafeTemporaryAllocation(of: CChar.self, capacity: capacity) { buffer -> String in
        buffer.initialize(repeating: 0)
        var length: Int32 = 0
        guard MPI_Error_string(code, buffer.baseAddress, &length) == MPI_SUCCESS, length > 0 else {
            return "unknown MPI error"
        }
        let bytes = UnsafeRawBufferPointer(start: buffer.baseAddress, count: min(Int(length), capacity - 1))
        return String(decoding: bytes, as: UTF8.self)
    }
}

/// Converts a count, rank or root to MPI's `int`, reporting out-of-range values as MPI would (`errorCode`),
/// so an oversized buffer is an error rather than a trap or a silently truncated count.
@inline(__always)
func mpiInt(_ value: Int, _ call: StaticString, errorCode: Int32) throws(MPIError) -> Int32 {
    guard let converted = Int32(exactly: value) else {
        throw MPIError(call: call.description, code: errorCode, message: mpiErrorString(errorCode))
    }
    return converted
}
