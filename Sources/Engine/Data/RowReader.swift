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
    /// Bytes reading takes beyond the rows it delivers (caches, a library's buffers), for the memory estimate.
    var workingBytes: Double { get }
    /// Writes rows `rows` (any order, repeats allowed), one after another, into `destination`
    /// (`rows.count` x values per row x `element.size` bytes). Errors name the file, the dataset and the reason.
    func read(rows: UnsafeBufferPointer<Int>, into destination: UnsafeMutableRawPointer) throws
    /// Writes the consecutive rows `range` into `destination` (for statistics over a part of the set).
    func read(range: Range<Int>, into destination: UnsafeMutableRawPointer) throws
}

/// A `RowReader`'s rows for the gather loops: a batch is read into a buffer sized once for the largest batch seen, in
/// the order asked. One gather at a time (a data set is gathered from one thread).
public final class StagedReader: @unchecked Sendable {
    public let reader: any RowReader
    public let featureCount: Int
    private var staging = UnsafeMutableRawPointer.allocate(byteCount: 1, alignment: 16)
    private var capacity = 0

    public init(_ reader: any RowReader) {
        self.reader = reader
        featureCount = reader.sampleShape.reduce(1, *)
    }

    deinit { staging.deallocate() }

    /// Reads the rows of `indices`, one after another, and returns where they start.
    func stage(_ indices: UnsafeBufferPointer<Int>) throws -> UnsafeRawPointer {
        let bytes = indices.count * featureCount * reader.element.size
        if bytes > capacity {
            staging.deallocate()
            staging = .allocate(byteCount: bytes, alignment: 16)
            capacity = bytes
        }
        try reader.read(rows: indices, into: staging)
        return UnsafeRawPointer(staging)
    }
}
