import Foundation

// MARK: - TensorBoard event files

/// Writes the run's scalars as TensorBoard event files (rank 0), so `tensorboard --logdir runs/` shows every run.
///
/// One file per process start, `RUN_DIR/tensorboard/events.out.tfevents.<seconds>.<host>.<pid>.0` as TensorFlow's
/// writer names them: a resumed run adds a file and continues the same curves at its global step. A resume begins
/// its file with TensorFlow's restart marker, a `SessionLog` START at the first step it logs, on which TensorBoard
/// drops every point the earlier files hold from that step on: a run killed after its last checkpoint logs those
/// steps again, and its curves would otherwise repeat them (and step back, after a resume on another world size).
///
/// The file is TFRecord framing around `tensorflow.Event` protocol buffers. Only seven fields of three messages are
/// written, so they are encoded here by hand: swift-protobuf's code-generation plugin would add about ten minutes
/// to every clean build (and to CI) for what is forty lines. The field numbers are those of TensorBoard's
/// `event.proto` and `summary.proto`; the test reads the files back with the real `tensorboard` package.
final class TensorBoardWriter {
    let path: String
    private let file: RecordFile

    /// Creates the directory and a new event file, and writes the file-version event TensorBoard looks for first.
    /// - Parameter warn: told once when an event cannot be written (a full disk).
    init(directory: String, warn: @escaping (String) -> Void = { _ in }) throws {
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        let host = ProcessInfo.processInfo.hostName.split(separator: ".").first.map(String.init) ?? "localhost"
        path = directory + "/events.out.tfevents.\(Int(Date().timeIntervalSince1970)).\(host).\(getpid()).0"
        guard FileManager.default.createFile(atPath: path, contents: nil), let file = RecordFile(path: path, onFirstFailure: warn) else {
            throw CocoaError(.fileWriteUnknown, userInfo: [NSFilePathErrorKey: path])
        }
        self.file = file
        write(TensorBoardEvent.fileVersion(wallTime: Date().timeIntervalSince1970))
    }

    /// Marks a restart whose first record is at `step` (a resume from step - 1: a record at step s is logged after
    /// step s): TensorBoard drops the points of earlier files from that step on.
    func markRestart(atStep step: Int, wallTime: Double = Date().timeIntervalSince1970) {
        write(TensorBoardEvent.sessionStart(wallTime: wallTime, step: step))
    }

    /// Appends one event holding `scalars` at `step`. Each write is one `write(2)` of a whole record, so a reader
    /// never sees half of one unless the process dies in the middle (TensorBoard then stops at the last whole one); a
    /// write that fails is cut back (`RecordFile`).
    func write(step: Int, scalars: [(tag: String, value: Double)], wallTime: Double = Date().timeIntervalSince1970) {
        write(TensorBoardEvent.scalars(wallTime: wallTime, step: step, scalars))
    }

    private func write(_ event: [UInt8]) {
        file.append(Data(TFRecord.frame(event)))
    }

    /// The scalars of one metrics.jsonl record, under the tags TensorBoard shows: the same values.
    static func scalars(of record: MetricsRecord) -> [(tag: String, value: Double)] {
        switch record {
        case .train(let train):
            [("train/loss", train.loss), ("train/accuracy", train.accuracy), ("train/learning_rate", train.learningRate),
             ("train/samples_per_second", train.samplesPerSecond), ("train/comm_wait_fraction", train.commWaitFraction)]
                + (train.dataWaitFraction.map { [("train/data_wait_fraction", $0)] } ?? [])
        case .eval(let eval):
            [("test/loss", eval.loss), ("test/accuracy", eval.accuracy)]
        case .event:
            []
        }
    }
}

/// The few protocol-buffer messages TensorBoard reads, encoded by hand (see `TensorBoardWriter`):
/// `Event { double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5;
/// SessionLog session_log = 7; }`, `Summary { repeated Value value = 1; }`,
/// `Summary.Value { string tag = 1; float simple_value = 2; }`, `SessionLog { SessionStatus status = 1; }` (START = 1).
enum TensorBoardEvent {
    static func sessionStart(wallTime: Double, step: Int) -> [UInt8] {
        var log = ProtoWriter()
        log.varint(field: 1, 1)
        var event = ProtoWriter()
        event.double(field: 1, wallTime)
        event.varint(field: 2, UInt64(bitPattern: Int64(step)))
        event.bytes(field: 7, log.bytes)
        return event.bytes
    }

    static func fileVersion(wallTime: Double) -> [UInt8] {
        var event = ProtoWriter()
        event.double(field: 1, wallTime)
        event.bytes(field: 3, Array("brain.Event:2".utf8))
        return event.bytes
    }

    static func scalars(wallTime: Double, step: Int, _ scalars: [(tag: String, value: Double)]) -> [UInt8] {
        var summary = ProtoWriter()
        for scalar in scalars {
            var value = ProtoWriter()
            value.bytes(field: 1, Array(scalar.tag.utf8))
            value.float(field: 2, Float(scalar.value))
            summary.bytes(field: 1, value.bytes)
        }
        var event = ProtoWriter()
        event.double(field: 1, wallTime)
        event.varint(field: 2, UInt64(bitPattern: Int64(step)))
        event.bytes(field: 5, summary.bytes)
        return event.bytes
    }
}

/// Protocol-buffer wire format: each field is a key (field number << 3 | wire type) and its value.
struct ProtoWriter {
    private(set) var bytes: [UInt8] = []

    private mutating func key(_ field: Int, _ wireType: UInt64) { appendVarint(UInt64(field) << 3 | wireType) }

    private mutating func appendVarint(_ value: UInt64) {
        var v = value
        while v >= 0x80 {
            bytes.append(UInt8(v & 0x7F) | 0x80)
            v >>= 7
        }
        bytes.append(UInt8(v))
    }

    /// Wire type 0 (int64, as two's complement in ten bytes when negative).
    mutating func varint(field: Int, _ value: UInt64) {
        key(field, 0)
        appendVarint(value)
    }

    /// Wire type 1, little-endian.
    mutating func double(field: Int, _ value: Double) {
        key(field, 1)
        withUnsafeBytes(of: value.bitPattern.littleEndian) { bytes.append(contentsOf: $0) }
    }

    /// Wire type 5, little-endian.
    mutating func float(field: Int, _ value: Float) {
        key(field, 5)
        withUnsafeBytes(of: value.bitPattern.littleEndian) { bytes.append(contentsOf: $0) }
    }

    /// Wire type 2: strings and embedded messages, length first.
    mutating func bytes(field: Int, _ value: [UInt8]) {
        key(field, 2)
        appendVarint(UInt64(value.count))
        bytes.append(contentsOf: value)
    }
}

/// TFRecord framing: `uint64 length, uint32 masked_crc32c(length), data, uint32 masked_crc32c(data)`, little-endian.
enum TFRecord {
    static func frame(_ data: [UInt8]) -> [UInt8] {
        var length: [UInt8] = []
        withUnsafeBytes(of: UInt64(data.count).littleEndian) { length.append(contentsOf: $0) }
        var record = length
        append(maskedCRC32C(length), to: &record)
        record.append(contentsOf: data)
        append(maskedCRC32C(data), to: &record)
        return record
    }

    private static func append(_ value: UInt32, to bytes: inout [UInt8]) {
        withUnsafeBytes(of: value.littleEndian) { bytes.append(contentsOf: $0) }
    }

    /// TFRecord stores CRCs rotated and offset: a CRC computed over data that itself holds CRCs is otherwise weak
    /// (TensorFlow's `crc32c::Mask`).
    static func maskedCRC32C(_ bytes: [UInt8]) -> UInt32 {
        let crc = crc32c(bytes)
        return ((crc >> 15) | (crc << 17)) &+ 0xA282_EAD8
    }
}

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), the checksum of iSCSI (RFC 3720) and of TFRecord. zlib,
/// which bpworker links, has only the other CRC-32; a table of 256 words does it at the speed a few records a
/// second need.
func crc32c(_ bytes: [UInt8]) -> UInt32 {
    var crc: UInt32 = 0xFFFF_FFFF
    for byte in bytes { crc = crc32cTable[Int((crc ^ UInt32(byte)) & 0xFF)] ^ (crc >> 8) }
    return crc ^ 0xFFFF_FFFF
}

private let crc32cTable: [UInt32] = (0..<256).map { index in
    var crc = UInt32(index)
    for _ in 0..<8 { crc = crc & 1 == 1 ? (crc >> 1) ^ 0x82F6_3B78 : crc >> 1 }
    return crc
}
