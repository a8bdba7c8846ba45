import CMPI

/// A predefined MPI datatype. Datatypes and operations are distinct Swift types (both are bare
/// `OpaquePointer`s in C), so one can never be passed where the other is expected.
public struct MPIDatatype: Hashable, CustomStringConvertible, @unchecked Sendable {
    // @unchecked Sendable: `raw` is the address of an immutable, statically allocated OpenMPI object
    // that lives for the whole process; sharing the address across threads shares no mutable state.
    let raw: OpaquePointer
    /// The MPI name, e.g. "MPI_FLOAT".
    public let name: String
    /// Bytes per element, as the Swift element type lays them out.
    public let byteSize: Int

    public static let float = MPIDatatype(raw: bp_mpi_float(), name: "MPI_FLOAT", byteSize: 4)
    public static let double = MPIDatatype(raw: bp_mpi_double(), name: "MPI_DOUBLE", byteSize: 8)
    public static let int32 = MPIDatatype(raw: bp_mpi_int32_t(), name: "MPI_INT32_T", byteSize: 4)
    public static let int64 = MPIDatatype(raw: bp_mpi_int64_t(), name: "MPI_INT64_T", byteSize: 8)
    public static let uint64 = MPIDatatype(raw: bp_mpi_uint64_t(), name: "MPI_UINT64_T", byteSize: 8)
    public static let uint8 = MPIDatatype(raw: bp_mpi_uint8_t(), name: "MPI_UINT8_T", byteSize: 1)
    public static let byte = MPIDatatype(raw: bp_mpi_byte(), name: "MPI_BYTE", byteSize: 1)
    public static let char = MPIDatatype(raw: bp_mpi_char(), name: "MPI_CHAR", byteSize: 1)

    public var description: String { name }

    public static func == (lhs: MPIDatatype, rhs: MPIDatatype) -> Bool { lhs.raw == rhs.raw }
    public func hash(into hasher: inout Hasher) { hasher.combine(raw) }
}

/// A predefined MPI reduction operation; see `MPIDatatype` for why it is its own type.
public struct MPIOperation: Hashable, CustomStringConvertible, @unchecked Sendable {
    // @unchecked Sendable: as for MPIDatatype, `raw` addresses an immutable predefined OpenMPI object.
    let raw: OpaquePointer
    /// The MPI name, e.g. "MPI_SUM".
    public let name: String

    public static let sum = MPIOperation(raw: bp_mpi_sum(), name: "MPI_SUM")
    public static let max = MPIOperation(raw: bp_mpi_max(), name: "MPI_MAX")
    public static let min = MPIOperation(raw: bp_mpi_min(), name: "MPI_MIN")

    public var description: String { name }

    public static func == (lhs: MPIOperation, rhs: MPIOperation) -> Bool { lhs.raw == rhs.raw }
    public func hash(into hasher: inout Hasher) { hasher.combine(raw) }
}

/// A Swift element type that MPI can carry and reduce without conversion.
public protocol MPIScalar: Comparable, Sendable {
    static var mpiDatatype: MPIDatatype { get }
}

extension Float: MPIScalar { public static var mpiDatatype: MPIDatatype { .float } }
extension Double: MPIScalar { public static var mpiDatatype: MPIDatatype { .double } }
extension Int32: MPIScalar { public static var mpiDatatype: MPIDatatype { .int32 } }
extension Int64: MPIScalar { public static var mpiDatatype: MPIDatatype { .int64 } }
extension UInt64: MPIScalar { public static var mpiDatatype: MPIDatatype { .uint64 } }
extension UInt8: MPIScalar { public static var mpiDatatype: MPIDatatype { .uint8 } }

/// The reductions the coordinator uses.
public enum ReduceOperation: Sendable, CaseIterable {
    case sum, max, min

    public var mpiOperation: MPIOperation {
        switch self {
        case .sum: .sum
        case .max: .max
        case .min: .min
        }
    }
}

/// Thread support levels of MPI_Init_thread, in increasing order.
public enum MPIThreadLevel: Int32, Sendable, Comparable, CustomStringConvertible {
    case single, funneled, serialized, multiple

    init?(mpiValue: Int32) {
        switch mpiValue {
        case bp_mpi_thread_single(): self = .single
        case bp_mpi_thread_funneled(): self = .funneled
        case bp_mpi_thread_serialized(): self = .serialized
        case bp_mpi_thread_multiple(): self = .multiple
        default: return nil
        }
    }

    var mpiValue: Int32 {
        switch self {
        case .single: bp_mpi_thread_single()
        case .funneled: bp_mpi_thread_funneled()
        case .serialized: bp_mpi_thread_serialized()
        case .multiple: bp_mpi_thread_multiple()
        }
    }

    public var description: String {
        switch self {
        case .single: "MPI_THREAD_SINGLE"
        case .funneled: "MPI_THREAD_FUNNELED"
        case .serialized: "MPI_THREAD_SERIALIZED"
        case .multiple: "MPI_THREAD_MULTIPLE"
        }
    }

    public static func < (lhs: MPIThreadLevel, rhs: MPIThreadLevel) -> Bool { lhs.rawValue < rhs.rawValue }
}
