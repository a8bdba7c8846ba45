/// The timeline's `BucketObserver`: records a reducer's buckets into a `TimelineRecorder` while it records. Each
/// bucket's posting (with its non-finite count) is an event on the main thread, as are the wait after backward, the
/// update and each bucket's parameter gather; after the step, each bucket's send, receive or allreduce and its
/// completion are recorded for tracks of their own. Completion is the first time the reducer reported it: the
/// moment the rank knew, as Horovod's timeline shows it, not the moment the network finished.
///
/// Every array is sized once, for the buckets and ranks, so noting times allocates nothing; the clock is read only
/// while the recorder records.
public final class BucketTimes: BucketObserver {
    public let recorder: TimelineRecorder
    private let clock: () -> Int64
    private let ranks: Int
    /// Per bucket: when its counting and posting began (0: not this step).
    private var posted: [Int64]
    /// When this step's receives were posted (all at once, before the first send).
    private var receivesPosted: Int64 = 0
    /// Per bucket and peer (`bucket * ranks + peer`), and per bucket: when it was first seen complete (0: not yet).
    private var sendDone: [Int64]
    private var receiveDone: [Int64]
    private var reductionDone: [Int64]
    private var controlPosted: Int64 = 0
    private var controlDone: Int64 = 0
    private var updateStarted: Int64 = 0
    private var gatherStarted: Int64 = 0

    /// - Parameters:
    ///   - buckets: how many buckets the reducer has (`GradientBuckets.count`).
    ///   - ranks: the world size.
    ///   - clock: nanoseconds on the recorder's clock; a test passes its own to know every time read.
    public init(recorder: TimelineRecorder, buckets: Int, ranks: Int, clock: @escaping () -> Int64 = TimelineRecorder.now) {
        self.recorder = recorder
        self.clock = clock
        self.ranks = ranks
        posted = Array(repeating: 0, count: buckets)
        reductionDone = Array(repeating: 0, count: buckets)
        sendDone = Array(repeating: 0, count: buckets * ranks)
        receiveDone = Array(repeating: 0, count: buckets * ranks)
    }

    @inline(__always) private func now() -> Int64 { recorder.isRecording ? clock() : 0 }

    /// Records `kind` from `start` (a `now()` result) to now; nothing if the recorder was off at either end.
    @inline(__always) private func end(_ kind: TimelineEvent.Kind, _ index: Int = 0, since start: Int64) {
        guard recorder.isRecording, start != 0 else { return }
        recorder.record(kind, index, start: start, end: clock())
    }

    /// Sets `times[i]` to now unless it is already set, while recording.
    @inline(__always) private func first(_ times: inout [Int64], _ i: Int) {
        if recorder.isRecording && times[i] == 0 { times[i] = clock() }
    }

    public func postingReceives() { receivesPosted = now() }
    public func startingBucket(_ bucket: Int) { posted[bucket] = now() }
    public func startedBucket(_ bucket: Int) { end(.bucketStart, bucket, since: posted[bucket]) }
    public func postingControl() { controlPosted = now() }

    public func sendCompleted(bucket: Int, peer: Int) { first(&sendDone, bucket * ranks + peer) }
    public func receiveCompleted(bucket: Int, peer: Int) { first(&receiveDone, bucket * ranks + peer) }
    public func reductionCompleted(bucket: Int) { first(&reductionDone, bucket) }
    public func controlCompleted() { if recorder.isRecording && controlDone == 0 { controlDone = clock() } }

    public func updating() { updateStarted = now() }
    public func updated() { end(.update, since: updateStarted) }
    public func gatheringParameters(bucket: Int) { gatherStarted = now() }
    public func gatheredParameters(bucket: Int) { end(.parameterGather, bucket, since: gatherStarted) }

    /// Records the wait, then per bucket its communication and its completion as an instant (at the latest of its
    /// requests), then clears everything for the next step. One pass over buckets and peers, as many as the requests.
    public func exchangeFinished(waitStart: Int64, waitEnd: Int64) {
        // Outside the window nothing was written (every note checks `isRecording`), so nothing needs clearing.
        guard recorder.isRecording else { return }
        recorder.record(.exchangeWait, start: waitStart, end: waitEnd)
        for b in posted.indices where posted[b] != 0 {
            var sent: Int64 = 0, received: Int64 = 0
            for k in (b * ranks)..<((b + 1) * ranks) {
                sent = max(sent, sendDone[k])
                received = max(received, receiveDone[k])
            }
            if sent != 0 { recorder.record(.bucketSend, b, start: posted[b], end: sent) }
            if received != 0 && receivesPosted != 0 { recorder.record(.bucketReceive, b, start: receivesPosted, end: received) }
            if reductionDone[b] != 0 { recorder.record(.bucketAllreduce, b, start: posted[b], end: reductionDone[b]) }
            let completed = max(max(posted[b], sent), max(received, reductionDone[b]))
            recorder.record(.bucketComplete, b, start: completed, end: completed)
        }
        if controlPosted != 0 && controlDone != 0 { recorder.record(.controlAllreduce, start: controlPosted, end: controlDone) }
        clear()
    }

    private func clear() {
        for i in posted.indices { posted[i] = 0; reductionDone[i] = 0 }
        for i in sendDone.indices { sendDone[i] = 0; receiveDone[i] = 0 }
        receivesPosted = 0
        controlPosted = 0
        controlDone = 0
    }
}
