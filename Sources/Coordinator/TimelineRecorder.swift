import Foundation

/// One thing a rank did, on its own clock: `start` and `end` in nanoseconds of `TimelineRecorder.now()`
/// (`end == start` for an instant). `index` says which layer, bucket or peer; `step` is the global step count
/// when it happened.
public struct TimelineEvent: Equatable, Sendable {
    public var start: Int64
    public var end: Int64
    public var kind: Kind
    public var index: Int32
    public var step: Int32

    public init(start: Int64, end: Int64, kind: Kind, index: Int32, step: Int32) {
        self.start = start
        self.end = end
        self.kind = kind
        self.index = index
        self.step = step
    }

    /// What a rank can be doing. Raw values travel between ranks (`flattened`), so they are fixed.
    public enum Kind: Int32, Sendable, CaseIterable {
        // The training step, on the rank's main thread.
        case step = 1, loadBatch, forward, layerForward, backward, layerBackward
        /// Counting a bucket's non-finite values and posting its sends or allreduce (inside a layer's backward).
        case bucketStart
        /// Blocked after backward until every bucket's communication has completed.
        case exchangeWait
        case gradientNorm, update, parameterGather
        case batchNormSync
        // Between steps.
        case progressReport, replicaCheck, checkpoint, evaluation, clockSync
        // A bucket's communication, on tracks of its own: from posting to the completion the rank saw.
        case bucketSend, bucketReceive, bucketAllreduce, bucketComplete, controlAllreduce
        /// Rank 0 rewriting report.html, between steps (last: raw values travel between ranks).
        case report
    }

    /// Int64 values per event in `flattened`.
    public static let fields = 5

    /// The event as `fields` Int64 values, for gathering to rank 0.
    public var flattened: [Int64] { [start, end, Int64(kind.rawValue), Int64(index), Int64(step)] }

    /// Reads back what `flattened` wrote; nil for a kind this build does not know.
    public init?(flattened values: ArraySlice<Int64>) {
        let v = Array(values)
        guard v.count == Self.fields, let kind = Kind(rawValue: Int32(truncatingIfNeeded: v[2])) else { return nil }
        self.init(start: v[0], end: v[1], kind: kind, index: Int32(truncatingIfNeeded: v[3]), step: Int32(truncatingIfNeeded: v[4]))
    }
}

/// Records `TimelineEvent`s into a buffer allocated once, so recording inside a training step allocates nothing.
///
/// Off (`isRecording == false`, or no recorder at all) it reads no clock: `begin()` returns 0 and `end` returns at
/// once, which is what keeps a run without `--timeline` exactly as fast as before. A full buffer drops further
/// events and counts them (`dropped`) instead of growing.
public final class TimelineRecorder {
    public let capacity: Int
    public private(set) var count = 0
    public private(set) var dropped = 0
    public private(set) var isRecording = false
    /// The global step count that new events are attributed to.
    public var step: Int32 = 0
    /// Whether the model's per-layer events are kept: off between steps, so an evaluation's forward passes are one
    /// event instead of one per layer and batch.
    public var recordsLayers = true
    private let events: UnsafeMutablePointer<TimelineEvent>

    public init(capacity: Int) {
        precondition(capacity > 0, "a timeline of \(capacity) events")
        self.capacity = capacity
        events = .allocate(capacity: capacity)
    }

    deinit { events.deallocate() }

    /// The clock every event is measured on: monotonic nanoseconds (the same clock `Model.layerTimer` reports).
    @inline(__always)
    public static func now() -> Int64 { Int64(bitPattern: DispatchTime.now().uptimeNanoseconds) }

    public func startRecording() { isRecording = true }
    public func stopRecording() { isRecording = false }

    /// The time to pass to `end`, or 0 without reading the clock when not recording.
    @inline(__always)
    public func begin() -> Int64 { isRecording ? Self.now() : 0 }

    /// Records `kind` from `start` (a `begin()` result) to now. Nothing when not recording, or when recording
    /// started after `begin()`.
    @inline(__always)
    public func end(_ kind: TimelineEvent.Kind, _ index: Int = 0, since start: Int64) {
        guard isRecording, start != 0 else { return }
        record(kind, index, start: start, end: Self.now())
    }

    /// Records an event whose times the caller measured.
    public func record(_ kind: TimelineEvent.Kind, _ index: Int = 0, start: Int64, end: Int64) {
        guard isRecording else { return }
        guard count < capacity else {
            dropped += 1
            return
        }
        events[count] = TimelineEvent(start: start, end: end, kind: kind, index: Int32(truncatingIfNeeded: index), step: step)
        count += 1
    }

    /// What was recorded, in the order it was recorded (an event is recorded when it ends).
    public var recorded: UnsafeBufferPointer<TimelineEvent> { UnsafeBufferPointer(start: events, count: count) }

    public func removeAll() {
        count = 0
        dropped = 0
    }
}
