// CommCheck: exercises MPICommunicator on real ranks. CoordinatorTests runs it under mpirun.
//
//   mpirun -n N CommCheck            every check; one "CommCheck rank R/N: PASS|FAIL ..." line per rank,
//                                    exit 1 if any check failed on this rank
//   mpirun -n N CommCheck --abort    the last rank calls abort(code: 3) while the others wait in a barrier
//   CommCheck --local-abort CODE     LocalCommunicator.abort(code: CODE) with unflushed stdout pending
import Coordinator
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
