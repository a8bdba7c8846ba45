/// Features read on demand, rows at a time, from a file that cannot be mapped (HDF5: chunked, compressed).
/// Implementations are safe to call from one thread at a time per reader; the library calls are serialised
/// process-wide (Debian's libhdf5 is built thread-safe; other builds may not be).
public protocol RowReader: AnyObject, Sendable {
    /// For messages: `train.h5:/images`.
    var name: String { get }
    /// Rows (samples).
    var count: Int { get }
    /// The shape of one row; its product is the values per row.
    var sampleShape: [Int] { get }
    /// The type the rows are delivered in.
    var element: StoredElement { get }
    /// Writes rows `rows` (any order, repeats allowed), one after another, into `destination`
    /// (`rows.count` x values per row x `element.size` bytes). Errors name the file, the dataset and the reason.
    func read(rows: UnsafeBufferPointer<Int>, into destination: UnsafeMutableRawPointer) throws
    /// Writes the consecutive rows `range` into `destination` (for statistics over a part of the set).
    func read(range: Range<Int>, into destination: UnsafeMutableRawPointer) throws
}
