// CommCheck: exercises MPICommunicator on real ranks. CoordinatorTests runs it under mpirun.
//
//   mpirun -n N CommCheck            every check; one "CommCheck rank R/N: PASS|FAIL ..." line per rank,
//                                    exit 1 if any check failed on this rank
//   mpirun -n N CommCheck --abort    the last rank calls abort(code: 3) while the others wait in a barrier
//   CommCheck --local-abort CODE     LocalCommunicator.abort(code: CODE) with unflushed stdout pending
import Coordinator
import Engine
import Foundation

@main
struct CommCheck {
    static func main() {
        let arguments = CommandLine.arguments
        if arguments.count >= 3, arguments[1] == "--local-abort", let code = Int32(arguments[2]) {
            print("local abort pending", terminator: "")  // no newline: only a flush gets it out
            LocalCommunicator().abort(code: code)
        }

        guard MPICommunicator.isLaunchedByMPI else {
            FileHandle.standardError.write(Data("CommCheck: run me under mpirun\n".utf8))
            exit(2)
        }
        let comm: MPICommunicator
        do {
            // 4 slots so the 5 reductions in flight at once below force exactly one growth.
            comm = try MPICommunicator.initialize(requestSlots: 4)
        } catch {
            FileHandle.standardError.write(Data("CommCheck: \(error)\n".utf8))
            exit(2)
        }

        if arguments.contains("--abort") {
            if comm.rank == comm.size - 1 {
                print("CommCheck rank \(comm.rank): aborting")
                comm.abort(code: 3)
            }
            try? comm.barrier()  // never completes: the last rank does not arrive
            print("CommCheck rank \(comm.rank): SURVIVED abort")
            exit(0)
        }

        let checker = Checker(comm: comm)
        checker.section("setup") { try checker.checkSetup() }
        checker.section("allreduce") { try checker.checkAllreduce() }
        checker.section("broadcast") { try checker.checkBroadcast() }
        checker.section("broadcast(bytes:)") { try checker.checkByteBroadcast() }
        checker.section("startAllreduce") { try checker.checkStartAllreduce() }
        checker.section("send/receive") { try checker.checkSendReceive() }
        checker.section("allgather") { try checker.checkAllgather() }
        checker.section("gather") { try checker.checkGather() }
        checker.section("clock alignment") { try checker.checkClockAlignment() }
        for strategy in GradientReducer.Strategy.allCases {
            checker.section("GradientReducer \(strategy)") { try checker.checkReducer(strategy) }
        }
        checker.section("nodeLayout") { try checker.checkNodeLayout() }
        checker.section("errors") { try checker.checkErrors() }
        checker.section("finalize") { try checker.checkFinalize() }

        let header = "CommCheck rank \(comm.rank)/\(comm.size):"
        if checker.failures.isEmpty {
            print("\(header) PASS \(checker.count) checks")
        } else {
            print("\(header) FAIL \(checker.failures.count) of \(checker.count) checks: "
                  + checker.failures.joined(separator: "; "))
        }
        fflush(nil)
        exit(checker.failures.isEmpty ? 0 : 1)
    }
}

final class Checker {
    let comm: MPICommunicator
    var failures: [String] = []
    var count = 0

    init(comm: MPICommunicator) {
        self.comm = comm
    }

    var n: Int { comm.size }
    var rank: Int { comm.rank }

    func expect(_ condition: Bool, _ what: @autoclosure () -> String) {
        count += 1
        if !condition { failures.append(what()) }
    }

    func section(_ name: String, _ body: () throws -> Void) {
        do {
            try body()
        } catch {
            count += 1
            failures.append("\(name): unexpected \(error)")
        }
    }

    func checkSetup() throws {
        expect(n >= 2, "size \(n) < 2")
        expect((0..<n).contains(rank), "rank \(rank) outside 0..<\(n)")
        expect(comm.threadLevel >= .funneled, "thread level \(comm.threadLevel)")
        expect(!comm.processorName.isEmpty, "empty processor name")
        expect(comm.requestSlotCapacity == 4, "initial request slots \(comm.requestSlotCapacity)")
        // The job was launched without it, so initialize() applied bpworker's shipped setting before MPI_Init.
        let shipped = getenv("OMPI_MCA_coll_libnbc_iallreduce_algorithm").map { String(cString: $0) }
        expect(shipped == "3", "nonblocking allreduce algorithm \(shipped ?? "unset"), expected the shipped 3")
        try comm.barrier()
    }

    // MARK: - allreduce

    /// Element i on rank r is (r+1)*(i+1)*scale, negated at odd i for signed types, so sum, max and
    /// min have closed forms over n ranks and every type's upper bits and sign are exercised.
    func checkAllreduce() throws {
        try allreduceCase(Float.self, count: 1000, scale: 0.5, signed: true)
        try allreduceCase(Double.self, count: 1000, scale: 0.25, signed: true)
        try allreduceCase(Int32.self, count: 777, scale: 3, signed: true)
        try allreduceCase(Int64.self, count: 500, scale: 1 << 33, signed: true)
        try allreduceCase(UInt64.self, count: 300, scale: 1 << 40, signed: false)
        try allreduceCase(UInt8.self, count: 5, scale: 1, signed: false)
    }

    func allreduceCase<T: MPIScalar & Numeric>(_: T.Type, count: Int, scale: T, signed: Bool) throws {
        let triangle = n * (n + 1) / 2
        func sign(_ i: Int) -> T { signed && i % 2 == 1 ? 0 - 1 : 1 }
        func value(_ i: Int) -> T { T(exactly: (rank + 1) * (i + 1))! * scale * sign(i) }
        func expected(_ i: Int, _ op: ReduceOperation) -> T {
            let base = T(exactly: i + 1)! * scale
            let negative = signed && i % 2 == 1
            switch op {
            case .sum: return T(exactly: triangle)! * base * sign(i)
            case .max: return negative ? base * sign(i) : T(exactly: n)! * base
            case .min: return negative ? T(exactly: n)! * base * sign(i) : base
            }
        }
        for op in ReduceOperation.allCases {
            var buffer = (0..<count).map(value)
            try buffer.withUnsafeMutableBufferPointer { try comm.allreduce($0, op: op) }
            let wrong = (0..<count).filter { buffer[$0] != expected($0, op) }
            expect(wrong.isEmpty,
                   "allreduce \(T.mpiDatatype) \(op): \(wrong.count) wrong, first at \(wrong.first ?? -1): "
                   + "\(wrong.first.map { "\(buffer[$0]) != \(expected($0, op))" } ?? "")")
        }
    }

    // MARK: - broadcast

    func checkBroadcast() throws {
        for root in Set([0, n - 1]).sorted() {
            var doubles = (0..<513).map { Double(rank * 10_000 + $0) + 0.125 }
            try doubles.withUnsafeMutableBufferPointer { try comm.broadcast($0, root: root) }
            expect(doubles == (0..<513).map { Double(root * 10_000 + $0) + 0.125 }, "broadcast Double from \(root)")

            var ints = (0..<65).map { Int64(rank) << 40 | Int64($0) }
            try ints.withUnsafeMutableBufferPointer { try comm.broadcast($0, root: root) }
            expect(ints == (0..<65).map { Int64(root) << 40 | Int64($0) }, "broadcast Int64 from \(root)")
        }
    }

    func checkByteBroadcast() throws {
        func payload(_ root: Int) -> [UInt8] { (0..<(1000 + 37 * root)).map { UInt8(truncatingIfNeeded: $0 * 7 + root) } }
        for root in Set([0, n - 1]).sorted() {
            // Non-roots start with a payload of another length that must be replaced.
            var bytes = rank == root ? payload(root) : [UInt8](repeating: 0xEE, count: 3 + rank)
            try comm.broadcast(bytes: &bytes, root: root)
            expect(bytes == payload(root), "broadcast(bytes:) from \(root): got \(bytes.count) bytes")
        }
        var empty: [UInt8] = rank == 0 ? [] : [1, 2, 3]
        try comm.broadcast(bytes: &empty, root: 0)
        expect(empty.isEmpty, "broadcast(bytes:) of an empty payload left \(empty.count) bytes")
    }

    // MARK: - point to point and allgather

    func checkSendReceive() throws {
        // Around the ring, two messages per rank with distinct tags; odd ranks post their receives late, so
        // those messages arrive before anyone waits for them.
        let next = (rank + 1) % n, previous = (rank + n - 1) % n
        func payload(_ from: Int, _ tag: Int) -> [Float] { (0..<(5000 + tag)).map { Float(from * 100_000 + tag * 10_000 + $0) } }
        let outgoing = [payload(rank, 1), payload(rank, 2)]
        var first = [Float](repeating: -1, count: 5001), second = [Float](repeating: -1, count: 5002)
        try outgoing[0].withUnsafeBufferPointer { a in
            try outgoing[1].withUnsafeBufferPointer { b in
                try first.withUnsafeMutableBufferPointer { x in
                    try second.withUnsafeMutableBufferPointer { y in
                        var requests: [PendingRequest] = []
                        if rank % 2 == 0 {
                            requests += [try comm.startReceive(y, from: previous, tag: 2), try comm.startReceive(x, from: previous, tag: 1)]
                        }
                        requests += [try comm.startSend(a, to: next, tag: 1), try comm.startSend(b, to: next, tag: 2)]
                        if rank % 2 == 1 {
                            usleep(50_000)
                            requests += [try comm.startReceive(x, from: previous, tag: 1), try comm.startReceive(y, from: previous, tag: 2)]
                        }
                        for request in requests { try request.wait() }
                    }
                }
            }
        }
        expect(first == payload(previous, 1) && second == payload(previous, 2), "ring messages differ")
        // Nothing to send: complete at once, without MPI.
        let empty = UnsafeBufferPointer<Float>(start: nil, count: 0)
        expect(try comm.startSend(empty, to: next, tag: 3).test(), "empty send not complete")
        // A rank that does not exist is an MPI error, not a crash.
        let one: [Float] = [1]
        do {
            _ = try one.withUnsafeBufferPointer { (buffer) throws(MPIError) in try comm.startSend(buffer, to: n, tag: 0) }
            expect(false, "send to rank \(n) did not throw")
        } catch {
            expect(error.description.contains("MPI_Isend"), "send error names the call: \(error)")
        }
        try comm.barrier()
    }

    func checkAllgather() throws {
        for count in [1, n, 1001] {
            let partition = Partition(count: count, parts: n)
            var buffer = [Double](repeating: -7, count: count)
            for i in partition.range(of: rank) { buffer[i] = Double(rank * 1_000_000 + i) }
            try buffer.withUnsafeMutableBufferPointer { try comm.allgather($0, partition: partition) }
            let expected = (0..<count).map { i in Double((0..<n).first { partition.range(of: $0).contains(i) }! * 1_000_000 + i) }
            expect(buffer == expected, "allgather of \(count) elements")
        }
        var small = [Float](repeating: 0, count: 10)
        do {
            try small.withUnsafeMutableBufferPointer { (buffer) throws(MPIError) in
                try comm.allgather(buffer, partition: Partition(count: 9, parts: n))
            }
            expect(false, "allgather with a partition of the wrong size did not throw")
        } catch {
            expect(error.description.contains("MPI_ERR_COUNT"), "wrong partition: \(error)")
        }
    }

    func checkGather() throws {
        // Rank r contributes 3r values (rank 0 none), r * 1000 + i: every root gets them all, in rank order.
        let mine = (0..<(3 * rank)).map { Int64(rank * 1000 + $0) }
        for root in [0, n - 1] {
            let all = try mine.withUnsafeBufferPointer { try comm.gather($0, root: root) }
            if rank == root {
                let expected = (0..<n).map { r in (0..<(3 * r)).map { Int64(r * 1000 + $0) } }
                expect(all == expected, "gather to rank \(root): \(all)")
            } else {
                expect(all.isEmpty, "gather to rank \(root): rank \(rank) got \(all.count) parts")
            }
        }
        do {
            _ = try mine.withUnsafeBufferPointer { (buffer) throws(MPIError) in try comm.gather(buffer, root: n) }
            expect(false, "gather to rank \(n) did not throw")
        } catch {
            expect(error.description.contains("MPI_ERR_ROOT"), "gather to a rank that does not exist: \(error)")
        }
    }

    func checkClockAlignment() throws {
        // Rank r's clock runs r seconds ahead, on top of the one clock the host's ranks share: the estimate must lie
        // within half its round trip of r seconds (the peer's reading happened between rank 0's two readings).
        let offsets = try ClockAlignment.measure(comm, clock: { TimelineRecorder.now() + Int64(self.rank) * 1_000_000_000 })
        guard rank == 0 else {
            expect(offsets.isEmpty, "alignment on rank \(rank): \(offsets)")
            return
        }
        expect(offsets.count == n && offsets[0].offset == 0, "alignment: \(offsets)")
        for (r, clock) in offsets.enumerated().dropFirst() {
            let error = abs(clock.offset - Int64(r) * 1_000_000_000)
            expect(clock.roundTrip > 0 && clock.roundTrip < 1_000_000_000 && error <= clock.roundTrip / 2 + 1,
                   "rank \(r): offset \(clock.offset) ns, round trip \(clock.roundTrip) ns, expected \(r) s")
        }
    }

    // MARK: - GradientReducer

    /// Both strategies on real ranks against closed forms: two SGD-with-momentum steps from gradients whose sum
    /// over ranks is known, for several bucket sizes; the gradient norm; the gathered momentum; the control slots
    /// and the non-finite count; identical parameters on every rank.
    func checkReducer(_ strategy: GradientReducer.Strategy) throws {
        let ranges = [0..<5, 5..<105, 105..<106, 106..<1106, 1106..<1116]
        let count = 1116, controlCount = 2
        let storage = UnsafeMutableBufferPointer<Float>.allocate(capacity: controlCount + count)
        defer { storage.deallocate() }
        let control = UnsafeMutableBufferPointer(rebasing: storage[0..<controlCount])
        let gradients = UnsafeMutableBufferPointer(rebasing: storage[controlCount...])
        let parameters = UnsafeMutableBufferPointer<Float>.allocate(capacity: count)
        defer { parameters.deallocate() }
        // Rank r's gradient at i, and the sum over ranks: small multiples of 1/4, so every sum is exact.
        func gradient(_ r: Int, _ i: Int, _ step: Int) -> Float { Float((r + 1) * (i % 13 + step)) * 0.25 - Float(i % 7) }
        func mean(_ i: Int, _ step: Int) -> Double { (0..<n).map { Double(gradient($0, i, step)) }.reduce(0, +) / Double(n) }
        let (lr, mu) = (0.5, 0.9)
        for bucketElements in [0, 1, 100] {
            let optimizer = try Optimizer<Float>(config: .init(kind: .sgd, momentum: mu), parameterCount: count)
            let buckets = GradientBuckets(tensorRanges: ranges, bucketElements: bucketElements, totalCount: count)
            // With several buckets the steps are recorded for a timeline: the closed form below must still hold.
            let recorder = TimelineRecorder(capacity: 1000)
            let observer = bucketElements == 100 ? BucketTimes(recorder: recorder, buckets: buckets.count, ranks: n) : nil
            let reducer = makeGradientReducer(strategy: strategy, communicator: comm, buckets: buckets, gradients: gradients,
                                              parameters: parameters, update: optimizer, control: control, nonFiniteSlot: 1,
                                              observer: observer)
            expect(reducer.strategy == strategy, "the factory made a \(reducer.strategy) reducer for \(strategy)")
            if observer != nil { recorder.startRecording() }
            for i in 0..<count { parameters[i] = Float(i % 11) }
            for step in 0..<4 {
                for i in 0..<count { gradients[i] = gradient(rank, i, step) }
                control[0] = rank == 0 ? 1 : 0
                control[1] = 0
                // Backward reports tensor by tensor from the top, as the model does.
                for range in ranges.reversed() { try reducer.gradientsReady(from: range.lowerBound) }
                try reducer.finish()
                if step == 0 {
                    let norm = (0..<count).map { mean($0, 0) * mean($0, 0) }.reduce(0, +).squareRoot()
                    let measured = try reducer.gradientNorm(scale: reducer.gradientScale)
                    expect(abs(measured - norm) <= 1e-5 * norm, "\(strategy) bucket \(bucketElements): norm \(measured), expected \(norm)")
                }
                try reducer.update(learningRate: lr, gradientScale: reducer.gradientScale)
                expect(control[0] == 1 && control[1] == 0, "\(strategy): control slots \(Array(control))")
            }
            if bucketElements == 100 {
                recorder.stopRecording()
                let events = Array(recorder.recorded), b = reducer.buckets.count
                func count(_ kind: TimelineEvent.Kind) -> Int { events.filter { $0.kind == kind }.count }
                expect(b == 3 && count(.exchangeWait) == 4 && count(.update) == 4 && count(.bucketStart) == 4 * b
                       && count(.bucketComplete) == 4 * b, "\(strategy) timeline: \(b) buckets, \(events.map(\.kind))")
                if strategy == .sharded {
                    expect(count(.bucketSend) == 4 * b && count(.bucketReceive) == 4 * b && count(.parameterGather) == 4 * b
                           && count(.controlAllreduce) == 4, "sharded timeline: \(events.map(\.kind))")
                } else {
                    expect(count(.bucketAllreduce) == 4 * b, "allreduce timeline: \(events.map(\.kind))")
                }
                expect(events.allSatisfy { $0.start > 0 && $0.start <= $0.end }, "\(strategy) timeline: an event ends before it starts")
                // A bucket completes once its communication has: never before it was posted.
                for complete in events where complete.kind == .bucketComplete {
                    let posted = events.last { $0.kind == .bucketStart && $0.index == complete.index && $0.start <= complete.start }
                    expect(posted != nil, "\(strategy) timeline: bucket \(complete.index) completed before it was posted")
                }
                // ... and at the end of the last of its step's communication (every piece here is non-empty).
                var latest: [Int32: Int64] = [:]
                for event in events {
                    switch event.kind {
                    case .exchangeWait: latest = [:]
                    case .bucketSend, .bucketReceive, .bucketAllreduce: latest[event.index] = max(latest[event.index] ?? 0, event.end)
                    case .bucketComplete:
                        expect(latest[event.index] == event.start, "\(strategy) timeline: bucket \(event.index) completed at "
                               + "\(event.start), its communication ended at \(latest[event.index].map(String.init) ?? "none")")
                    default: break
                    }
                }
            }
            // Closed form of four momentum steps from p0.
            try reducer.gatherUpdateState()
            var wrong = 0, wrongState = 0, firstWrong = -1
            for i in 0..<count {
                var p = Double(i % 11), b = 0.0
                for step in 0..<4 {
                    b = mu * b + mean(i, step)
                    p -= lr * b
                }
                if abs(Double(parameters[i]) - p) > 1e-4 * max(1, abs(p)) {
                    if wrong == 0 { firstWrong = i }
                    wrong += 1
                }
                if abs(Double(optimizer.state[0].buffer[i]) - b) > 1e-4 * max(1, abs(b)) { wrongState += 1 }
            }
            expect(wrong == 0, "\(strategy) bucket \(bucketElements): \(wrong) parameters differ from the closed form, the first at \(firstWrong)")
            expect(wrongState == 0, "\(strategy) bucket \(bucketElements): \(wrongState) momentum values differ after gathering")
            // Every rank holds the very same bits.
            var low = parameters.map { $0.bitPattern }.map(UInt64.init), high = low
            try low.withUnsafeMutableBufferPointer { try comm.allreduce($0, op: .min) }
            try high.withUnsafeMutableBufferPointer { try comm.allreduce($0, op: .max) }
            expect(low == high, "\(strategy) bucket \(bucketElements): replicas differ")

            // Gradients that nearly cancel over the ranks (rank 0 has v, rank 1 0.5 - v, the others 0, with v about
            // 1e4): the sum is 0.5 everywhere, and its norm must not drown in the rounding of squares near 1e8.
            for i in 0..<count { gradients[i] = rank == 0 ? 1e4 + Float(i) : rank == 1 ? 0.5 - (1e4 + Float(i)) : 0 }
            try reducer.finish()
            let nearlyCancelled = try reducer.gradientNorm(scale: 1), exact = 0.5 * Double(count).squareRoot()
            expect(abs(nearlyCancelled - exact) <= 1e-5 * exact,
                   "\(strategy) bucket \(bucketElements): norm of nearly cancelling gradients \(nearlyCancelled), expected \(exact)")

            // A NaN on the last rank reaches every rank's count; only the last rank counts it as its own.
            for i in 0..<count { gradients[i] = 1 }
            if rank == n - 1 { gradients[50] = .nan }
            control[0] = 0
            control[1] = 0
            try reducer.finish()
            expect(control[1] == 1, "\(strategy): non-finite count \(control[1]) after a NaN on rank \(n - 1)")
            expect(reducer.localNonFiniteCount == (rank == n - 1 ? 1 : 0), "\(strategy): local count \(reducer.localNonFiniteCount)")
        }
    }

    // MARK: - startAllreduce

    func checkStartAllreduce() throws {
        // Disjoint sub-ranges of one buffer, one of them empty; five reductions in flight at once.
        let ranges = [0..<1, 1..<700, 700..<700, 700..<2048, 2048..<2050, 2050..<4096]
        for round in 0..<12 {
            let op = ReduceOperation.allCases[round % 3]
            var buffer = (0..<4096).map { Float((rank + 1) * ($0 % 97)) - Float(round) }
            var reference = buffer
            try reference.withUnsafeMutableBufferPointer { try comm.allreduce($0, op: op) }

            try buffer.withUnsafeMutableBufferPointer { whole in
                let pending = try ranges.map { range in
                    try comm.startAllreduce(UnsafeMutableBufferPointer(rebasing: whole[range]), op: op)
                }
                var done = [Bool](repeating: false, count: pending.count)
                let deadline = Date().addingTimeInterval(60)
                while done.contains(false) && Date() < deadline {
                    for i in pending.indices where !done[i] {
                        done[i] = try pending[i].test()
                    }
                }
                expect(!done.contains(false), "round \(round): reductions not done after 60 s")
                // Completed reductions stay completed without touching MPI again.
                for reduction in pending {
                    expect(try reduction.test(), "round \(round): test() after completion returned false")
                    try reduction.wait()
                }
            }
            expect(buffer == reference, "round \(round) \(op): startAllreduce differs from allreduce")
        }
        // The first round grew 4 slots to 8 for 5 in flight; later rounds reused them.
        expect(comm.requestSlotCapacity == 8, "request slots \(comm.requestSlotCapacity), expected 8")

        // A stale handle whose slot was reused must not test or wait on the new request. Rank 0 starts
        // the second reduction late, so on the other ranks that request cannot have completed yet and
        // a stale test() that reached it would return false.
        var a = [Double](repeating: Double(rank + 1), count: 64)
        var b = [Double](repeating: Double(rank + 1) * 2, count: 64)
        try a.withUnsafeMutableBufferPointer { a in
            try b.withUnsafeMutableBufferPointer { b in
                let first = try comm.startAllreduce(a, op: .sum)
                try first.wait()
                if rank == 0 { usleep(200_000) }
                let second = try comm.startAllreduce(b, op: .max)
                expect(try first.test(), "stale handle: test() returned false")
                try first.wait()
                try second.wait()
                expect(try second.test(), "second reduction: test() after wait returned false")
            }
        }
        expect(a.allSatisfy { $0 == Double(n * (n + 1) / 2) }, "stale-handle sum wrong: \(a[0])")
        expect(b.allSatisfy { $0 == Double(n * 2) }, "stale-handle max wrong: \(b[0])")

        var nothing: [Int32] = []
        let empty = try nothing.withUnsafeMutableBufferPointer { try comm.startAllreduce($0, op: .sum) }
        expect(try empty.test(), "empty startAllreduce not complete")
    }

    // MARK: - nodeLayout

    func checkNodeLayout() throws {
        let layout = try comm.nodeLayout()
        expect(layout.nodeNames.count == n, "nodeNames has \(layout.nodeNames.count) entries")
        expect(layout.nodeNames.allSatisfy { $0 == comm.processorName },
               "nodeNames \(layout.nodeNames) vs \(comm.processorName)")
        expect(layout.nodeCount == 1, "nodeCount \(layout.nodeCount)")
        expect(layout.localRanks == Array(0..<n), "localRanks \(layout.localRanks)")
        expect(layout.localSize == n, "localSize \(layout.localSize)")
        expect(layout.localIndex == rank, "localIndex \(layout.localIndex) for rank \(rank)")
    }

    // MARK: - errors

    func checkErrors() throws {
        for badRoot in [n + 3, -5] {
            var values = [Int32](repeating: 7, count: 8)
            do {
                try values.withUnsafeMutableBufferPointer { try comm.broadcast($0, root: badRoot) }
                expect(false, "broadcast with root \(badRoot) did not throw")
            } catch let error as MPIError {
                expect(error.call == "MPI_Bcast", "root \(badRoot): call \(error.call)")
                expect(error.message.contains("MPI_ERR_ROOT"), "root \(badRoot): message \(error.message)")
                expect(error.description == "MPI_Bcast failed: \(error.message) (code \(error.code))",
                       "root \(badRoot): description \(error.description)")
            }
            expect(values == [Int32](repeating: 7, count: 8), "failed broadcast changed the buffer")
        }
        // The job survives the error: collectives still work.
        var one: [Int64] = [1]
        try one.withUnsafeMutableBufferPointer { try comm.allreduce($0, op: .sum) }
        expect(one == [Int64(n)], "allreduce after error: \(one)")
        try comm.barrier()
    }

    func checkFinalize() throws {
        try comm.barrier()
        try comm.finalize()
        try comm.finalize()
        do {
            try comm.barrier()
            expect(false, "barrier after finalize did not throw")
        } catch {
            expect(error.call == "MPI_Barrier" && error.message.contains("finalize"), "after finalize: \(error)")
        }
    }
}
