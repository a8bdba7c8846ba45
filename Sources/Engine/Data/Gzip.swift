import CZlib

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// Reads a whole file. If it starts with the gzip magic (1f 8b) it is inflated, whatever its extension,
/// so `train-images-idx3-ubyte` and `train-images-idx3-ubyte.gz` read the same.
///
/// `maxBytes` bounds the returned size (raw or decompressed) so that a gzip bomb is an error rather than
/// an out-of-memory kill. Concatenated gzip members (as `cat a.gz b.gz` makes) are inflated in sequence;
/// anything else after the last member is an error.
public func readFileBytes(path: String, maxBytes: Int = 1 << 32) throws -> [UInt8] {
    let raw = try readWholeFile(path: path, maxBytes: maxBytes, advice: "an uncompressed .npy file of uint8 or float32 is "
        + "mapped instead, whatever its size (data.mmap, the default): convert float64 data with np.float32 and do not compress it")
    guard raw.count >= 2, raw[0] == 0x1F, raw[1] == 0x8B else { return raw }
    return try gunzip(raw, path: path, maxBytes: maxBytes)
}

private func errnoText() -> String { String(cString: strerror(errno)) }

/// Reads until `count` bytes are in `buffer` or the file ends; returns how many were read.
private func readFully(_ fd: Int32, _ buffer: UnsafeMutableRawPointer, _ count: Int, path: String) throws -> Int {
    var filled = 0
    while filled < count {
        let n = read(fd, buffer + filled, count - filled)
        if n > 0 {
            filled += n
        } else if n == 0 {
            break
        } else if errno != EINTR {
            throw DataError(path: path, reason: "read failed: \(errnoText())")
        }
    }
    return filled
}

/// The bytes of `path` as they are, to its end: regular files in one read, pipes and special files (whose size says
/// nothing) drained. Throws, naming the file, when it cannot be read or holds more than `maxBytes`, with `advice`.
public func readWholeFile(path: String, maxBytes: Int, advice: String) throws -> [UInt8] {
    let fd = open(path, O_RDONLY)
    guard fd >= 0 else { throw DataError(path: path, reason: "cannot open file: \(errnoText())") }
    defer { close(fd) }

    var info = stat()
    guard fstat(fd, &info) == 0 else { throw DataError(path: path, reason: "cannot stat file: \(errnoText())") }
    let expected = Int(info.st_size)
    let tooBig = DataError(path: path, reason: "file of \(expected) bytes is larger than the \(maxBytes) bytes bpworker reads "
        + "into memory; \(advice)")
    if expected > maxBytes { throw tooBig }

    // One read straight into the array's storage for regular files.
    var bytes = try [UInt8](unsafeUninitializedCapacity: expected) { buffer, count in
        count = expected == 0 ? 0 : try readFully(fd, buffer.baseAddress!, expected, path: path)
    }
    // st_size is only a hint: special files report 0 and files can grow; drain whatever is left.
    var chunk = [UInt8](repeating: 0, count: 1 << 16)
    while true {
        let n = try chunk.withUnsafeMutableBytes { try readFully(fd, $0.baseAddress!, $0.count, path: path) }
        if n == 0 { return bytes }
        bytes.append(contentsOf: chunk[0..<n])
        if bytes.count > maxBytes { throw tooBig }
    }
}

/// Inflates a gzip file held in memory. Feeds input in ≤ 1 GiB pieces (avail_in is 32-bit) and output in 1 MiB chunks.
private func gunzip(_ input: [UInt8], path: String, maxBytes: Int) throws -> [UInt8] {
    var output = [UInt8]()
    // ISIZE (last 4 bytes, LE) is the size mod 2^32 of the last member: only a capacity hint, capped by the
    // deflate's maximum ratio (~1032:1) so that a forged trailer cannot make us reserve gigabytes.
    if input.count >= 18 {
        let n = input.count
        let isize = Int(input[n - 4]) | Int(input[n - 3]) << 8 | Int(input[n - 2]) << 16 | Int(input[n - 1]) << 24
        output.reserveCapacity(min(isize, maxBytes, input.count.multipliedReportingOverflow(by: 1032).partialValue))
    }
    var chunk = [UInt8](repeating: 0, count: 1 << 20)
    var stream = z_stream()
    // inflateInit2 is a macro; 15 + 32 = maximum window, auto-detect gzip/zlib header.
    guard inflateInit2_(&stream, 15 + 32, zlibVersion(), Int32(MemoryLayout<z_stream>.size)) == Z_OK else {
        throw DataError(path: path, reason: "cannot initialise zlib")
    }
    defer { inflateEnd(&stream) }

    try input.withUnsafeBytes { inBuffer in
        let inBase = UnsafeMutablePointer(mutating: inBuffer.bindMemory(to: UInt8.self).baseAddress!)
        var consumed = 0  // input bytes handed to zlib so far, minus what it still holds
        try chunk.withUnsafeMutableBufferPointer { outBuffer in
            let outBase = outBuffer.baseAddress!
            while true {
                if stream.avail_in == 0 && consumed < input.count {
                    let piece = min(input.count - consumed, 1 << 30)
                    stream.next_in = inBase + consumed
                    stream.avail_in = UInt32(piece)
                    consumed += piece
                }
                stream.next_out = outBase
                stream.avail_out = UInt32(outBuffer.count)
                let status = inflate(&stream, Z_NO_FLUSH)
                let produced = outBuffer.count - Int(stream.avail_out)
                if produced > 0 {
                    if output.count + produced > maxBytes {
                        throw DataError(path: path, reason: "decompressed size exceeds the limit of \(maxBytes) bytes")
                    }
                    output.append(contentsOf: UnsafeBufferPointer(start: outBase, count: produced))
                }
                let remaining = Int(stream.avail_in) + (input.count - consumed)
                switch status {
                case Z_STREAM_END:
                    if remaining == 0 { return }
                    // Another gzip member may follow; anything else is garbage.
                    let next = input.count - remaining
                    guard remaining >= 2, input[next] == 0x1F, input[next + 1] == 0x8B else {
                        throw DataError(path: path, reason: "\(remaining) trailing bytes after the gzip stream")
                    }
                    inflateReset(&stream)
                case Z_OK, Z_BUF_ERROR:
                    // zlib wants more input but there is none: the file ends mid-stream.
                    if remaining == 0 && stream.avail_out != 0 {
                        throw DataError(path: path, reason: "truncated gzip stream")
                    }
                    // Z_BUF_ERROR with input left and room for output means no progress is possible.
                    if status == Z_BUF_ERROR && produced == 0 {
                        throw DataError(path: path, reason: "corrupt gzip stream: inflate made no progress")
                    }
                case Z_MEM_ERROR:
                    throw DataError(path: path, reason: "out of memory while inflating")
                default:  // Z_DATA_ERROR, Z_NEED_DICT, Z_STREAM_ERROR
                    let message = stream.msg.map { String(cString: $0) } ?? "zlib error \(status)"
                    throw DataError(path: path, reason: "corrupt gzip stream: \(message)")
                }
            }
        }
    }
    return output
}
