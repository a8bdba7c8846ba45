import Foundation

/// Storage for the flat buffers a training step streams through (parameters, gradients, optimizer state,
/// activations): aligned to 2 MiB and, when at least that large, marked for transparent huge pages
/// (`madvise(MADV_HUGEPAGE)`; Debian's default THP mode applies them only where asked).
///
/// Why: a 784-1024-1024-10 step at batch 256 touches about 30 MB of these buffers, thousands of 4 KiB pages, more
/// than the TLB holds, so the memory-bound passes (optimizer, element-wise kernels) and the GEMMs' packing paid for
/// page walks. With 2 MiB pages, measured on the reference machine: one rank 12.7k -> 13.1k samples/s, two ranks
/// 23.2k -> 24.1k. Where the kernel has THP disabled the advice is ignored and nothing else changes.
public enum LargeBuffer {
    public static let hugePage = 2 << 20

    /// `count` uninitialized elements. Release with `free(_:)`.
    public static func allocate<T>(_ count: Int) -> UnsafeMutableBufferPointer<T> {
        let bytes = Swift.max(count * MemoryLayout<T>.stride, 1)
        // Whole huge pages for a buffer that spans one; a smaller one only needs cache-line alignment.
        let huge = bytes >= hugePage
        let size = huge ? (bytes + hugePage - 1) / hugePage * hugePage : bytes
        var raw: UnsafeMutableRawPointer? = nil
        guard posix_memalign(&raw, huge ? hugePage : 64, size) == 0, let raw else {
            fatalError("out of memory: could not allocate \(size) bytes")
        }
        // Advice only: an error (THP compiled out) leaves ordinary pages.
        if huge { _ = madvise(raw, size, MADV_HUGEPAGE) }
        return UnsafeMutableBufferPointer(start: raw.bindMemory(to: T.self, capacity: count), count: count)
    }

    /// The bytes `allocate` takes for a buffer of `bytes`: whole huge pages once it spans one. In floating point,
    /// for sizes being checked before they are allocated.
    public static func allocatedBytes(_ bytes: Double) -> Double {
        let page = Double(hugePage)
        return bytes >= page ? (bytes / page).rounded(.up) * page : bytes
    }

    public static func free<T>(_ buffer: UnsafeMutableBufferPointer<T>) {
        Foundation.free(buffer.baseAddress)
    }
}
