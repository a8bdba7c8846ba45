import Coordinator
import Testing

@Suite("Bucket times")
struct BucketTimesTests {
    /// The test's clock: whatever time the script has reached, so every time BucketTimes reads is known.
    final class ScriptClock {
        var now: Int64 = 0
        var reads = 0
        func read() -> Int64 {
            reads += 1
            return now
        }
    }

    func event(_ kind: TimelineEvent.Kind, _ index: Int, _ start: Int64, _ end: Int64) -> TimelineEvent {
        TimelineEvent(start: start, end: end, kind: kind, index: Int32(index), step: 0)
    }

    /// Rank 1 of 3 with three buckets, as `ShardedReducer` reports them: completions out of order and repeated, and a
    /// bucket too small for rank 1 to own a piece (it sends to both peers and receives nothing). Each bucket's send
    /// spans from its posting to its last send's first completion, its receive from the receives' posting to the
    /// last receive's, and it completes at the later of the two.
    @Test func aShardedStepOnThreeRanksIsOneEventPerBucketAndDirection() {
        let clock = ScriptClock(), recorder = TimelineRecorder(capacity: 100)
        let times = BucketTimes(recorder: recorder, buckets: 3, ranks: 3, clock: clock.read)
        recorder.startRecording()
        func at(_ t: Int64, _ call: () -> Void) {
            clock.now = t
            call()
        }
        at(10) { times.postingReceives() }
        at(20) { times.startingBucket(0) }
        at(21) { times.startedBucket(0) }
        at(30) { times.sendCompleted(bucket: 0, peer: 0) }
        at(31) { times.receiveCompleted(bucket: 0, peer: 2) }
        at(40) { times.startingBucket(1) }
        at(41) { times.startedBucket(1) }
        at(42) { times.sendCompleted(bucket: 0, peer: 0) }  // seen again: the first time counts
        at(50) { times.sendCompleted(bucket: 1, peer: 2) }
        at(51) { times.startingBucket(2) }
        at(52) { times.postingControl() }
        at(53) { times.startedBucket(2) }
        // finish(): every receive, then every send, then the control values.
        at(60) { times.receiveCompleted(bucket: 0, peer: 0) }
        at(61) { times.receiveCompleted(bucket: 1, peer: 0) }
        at(62) { times.receiveCompleted(bucket: 1, peer: 2) }
        at(63) { times.receiveCompleted(bucket: 0, peer: 2) }
        at(70) { times.sendCompleted(bucket: 0, peer: 0) }
        at(71) { times.sendCompleted(bucket: 0, peer: 2) }
        at(72) { times.sendCompleted(bucket: 1, peer: 0) }
        at(73) { times.sendCompleted(bucket: 1, peer: 2) }
        at(74) { times.sendCompleted(bucket: 2, peer: 0) }
        at(75) { times.sendCompleted(bucket: 2, peer: 2) }
        at(80) { times.controlCompleted() }
        at(90) { times.exchangeFinished(waitStart: 55, waitEnd: 81) }
        #expect(Array(recorder.recorded) == [
            event(.bucketStart, 0, 20, 21), event(.bucketStart, 1, 40, 41), event(.bucketStart, 2, 51, 53),
            event(.exchangeWait, 0, 55, 81),
            event(.bucketSend, 0, 20, 71), event(.bucketReceive, 0, 10, 60), event(.bucketComplete, 0, 71, 71),
            event(.bucketSend, 1, 40, 72), event(.bucketReceive, 1, 10, 62), event(.bucketComplete, 1, 72, 72),
            event(.bucketSend, 2, 51, 75), event(.bucketComplete, 2, 75, 75),
            event(.controlAllreduce, 0, 52, 80),
        ])

        // The next step starts clean: one allreduced bucket, nothing left of the sends, receives or control values.
        recorder.removeAll()
        at(100) { times.startingBucket(0) }
        at(101) { times.startedBucket(0) }
        at(102) { times.reductionCompleted(bucket: 0) }
        at(103) { times.reductionCompleted(bucket: 0) }
        at(104) { times.updating() }
        at(105) { times.updated() }
        at(106) { times.exchangeFinished(waitStart: 103, waitEnd: 104) }
        #expect(Array(recorder.recorded) == [
            event(.bucketStart, 0, 100, 101), event(.update, 0, 104, 105), event(.exchangeWait, 0, 103, 104),
            event(.bucketAllreduce, 0, 100, 102), event(.bucketComplete, 0, 102, 102),
        ])
    }

    /// Outside the recorder's window nothing is noted, recorded or read from the clock.
    @Test func notRecordingReadsNoClock() {
        let clock = ScriptClock(), recorder = TimelineRecorder(capacity: 100)
        let times = BucketTimes(recorder: recorder, buckets: 2, ranks: 2, clock: clock.read)
        for _ in 0..<2 {
            times.postingReceives()
            times.startingBucket(0)
            times.sendCompleted(bucket: 0, peer: 1)
            times.receiveCompleted(bucket: 0, peer: 1)
            times.startedBucket(0)
            times.startingBucket(1)
            times.postingControl()
            times.reductionCompleted(bucket: 1)
            times.startedBucket(1)
            times.controlCompleted()
            times.exchangeFinished(waitStart: 1, waitEnd: 2)
            times.updating()
            times.updated()
            times.gatheringParameters(bucket: 0)
            times.gatheredParameters(bucket: 0)
        }
        #expect(clock.reads == 0 && recorder.count == 0)
        // Recording from a step's middle: what began before it is not recorded, what began after it is.
        times.startingBucket(0)
        recorder.startRecording()
        clock.now = 7
        times.startedBucket(0)
        times.gatheringParameters(bucket: 1)
        times.gatheredParameters(bucket: 1)
        #expect(Array(recorder.recorded) == [event(.parameterGather, 1, 7, 7)])
    }
}
