/// When each gradient bucket's communication was posted and when this rank saw it complete, for the timeline
/// (`GradientReducer.timeline`). Completion is the first `MPI_Test` that returned true, or the return of
/// `MPI_Wait`: the moment the rank knew, as Horovod's timeline shows it, not the moment the network finished.
///
/// Every array is sized once for the reducer's plan, so noting times allocates nothing; the clock is read only while
/// the recorder records.
final class BucketTimes {
    let recorder: TimelineRecorder
    /// Per bucket: when its sends (or its allreduce) were posted.
    private var posted: [Int64]
    /// When this step's receives were posted (all at once, before the first send).
    private var receivesPosted: Int64 = 0
    /// Per send, receive and allreduce request: when it was first seen complete (0: not yet).
    private var sendDone: [Int64]
    private var receiveDone: [Int64]
    private var reductionDone: [Int64]
    private var controlPosted: Int64 = 0
    private var controlDone: Int64 = 0
    /// Which bucket each send and receive belongs to.
    private let sendBucket: [Int]
    private let receiveBucket: [Int]

    init(recorder: TimelineRecorder, buckets: Int, sendBucket: [Int], receiveBucket: [Int]) {
        self.recorder = recorder
        posted = Array(repeating: 0, count: buckets)
        reductionDone = Array(repeating: 0, count: buckets)
        sendDone = Array(repeating: 0, count: sendBucket.count)
        receiveDone = Array(repeating: 0, count: receiveBucket.count)
        self.sendBucket = sendBucket
        self.receiveBucket = receiveBucket
    }

    @inline(__always) func postingReceives() { if recorder.isRecording { receivesPosted = TimelineRecorder.now() } }
    @inline(__always) func posted(bucket: Int, at time: Int64) { posted[bucket] = time }
    @inline(__always) func postingControl() { if recorder.isRecording { controlPosted = TimelineRecorder.now() } }

    @inline(__always) func sendCompleted(_ i: Int) { if recorder.isRecording && sendDone[i] == 0 { sendDone[i] = TimelineRecorder.now() } }
    @inline(__always) func receiveCompleted(_ i: Int) { if recorder.isRecording && receiveDone[i] == 0 { receiveDone[i] = TimelineRecorder.now() } }
    @inline(__always) func reductionCompleted(_ b: Int) { if recorder.isRecording && reductionDone[b] == 0 { reductionDone[b] = TimelineRecorder.now() } }
    @inline(__always) func controlCompleted() { if recorder.isRecording && controlDone == 0 { controlDone = TimelineRecorder.now() } }

    /// After every request of the step has completed: one event per bucket and direction, its completion as an
    /// instant, then everything cleared for the next step.
    func recordStep(sharded: Bool) {
        // Outside the window nothing was written (every setter checks `isRecording`), so nothing needs clearing.
        guard recorder.isRecording else { return }
        defer { clear() }
        for b in posted.indices where posted[b] != 0 {
            var completed = posted[b]
            if sharded {
                var sent: Int64 = 0, received: Int64 = 0
                for i in sendDone.indices where sendBucket[i] == b { sent = max(sent, sendDone[i]) }
                for i in receiveDone.indices where receiveBucket[i] == b { received = max(received, receiveDone[i]) }
                if sent != 0 { recorder.record(.bucketSend, b, start: posted[b], end: sent) }
                if received != 0 && receivesPosted != 0 { recorder.record(.bucketReceive, b, start: receivesPosted, end: received) }
                completed = max(completed, sent, received)
            } else if reductionDone[b] != 0 {
                recorder.record(.bucketAllreduce, b, start: posted[b], end: reductionDone[b])
                completed = reductionDone[b]
            }
            recorder.record(.bucketComplete, b, start: completed, end: completed)
        }
        if controlPosted != 0 && controlDone != 0 { recorder.record(.controlAllreduce, start: controlPosted, end: controlDone) }
    }

    private func clear() {
        for i in posted.indices { posted[i] = 0; reductionDone[i] = 0 }
        for i in sendDone.indices { sendDone[i] = 0 }
        for i in receiveDone.indices { receiveDone[i] = 0 }
        receivesPosted = 0
        controlPosted = 0
        controlDone = 0
    }
}
