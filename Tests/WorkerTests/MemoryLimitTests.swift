import Foundation
import Testing

/// The memory estimate against what a real run measures, and each limit really imposed on a real process.
@Suite("Memory limits, for real", .serialized, .temporaryFiles)
struct MemoryLimitTests {
    func job(_ data: SyntheticData, runDir: String, hidden: String, optimizer: String = "adam") -> [String] {
        ["train", "--run-dir", runDir, "--progress", "plain"] + data.arguments + [
            "--set", "model.hidden=\(hidden)", "--set", "optimizer.name=\(optimizer)", "--set", "training.epochs=1",
            "--set", "training.batch_size=16", "--set", "schedule.warmup_steps=0", "--set", "data.normalize=scale",
        ]
    }

    func mebibytes(after prefix: String, in output: String) -> Double? {
        guard let range = output.range(of: prefix) else { return nil }
        let number = output[range.upperBound...].prefix { $0.isNumber || $0 == "." }
        return Double(number)
    }

    @Test func theEstimateMatchesTheMeasuredPeak() throws {
        let data = try SyntheticData(samples: 200)
        defer { data.remove() }
        for (ranks, hidden, optimizer) in [(2, "[2048, 2048]", "adam"), (1, "[3072, 3072]", "sgd")] {
            let run = temporaryRunDirectory()
            defer { try? FileManager.default.removeItem(atPath: run) }
            let r = ranks == 1 ? try Harness.local(job(data, runDir: run, hidden: hidden, optimizer: optimizer))
                               : try Harness.mpirun(ranks, job(data, runDir: run, hidden: hidden, optimizer: optimizer))
            #expect(r.status == 0, "\(r.output)")
            let expected = try #require(mebibytes(after: "memory: rank 0 expects ", in: r.output), "\(r.output)")
            let measured = try #require(mebibytes(after: "(rank 0: ", in: r.output), "\(r.output)")
            #expect(abs(expected - measured) <= 0.2 * measured, "\(ranks) ranks, \(hidden): expected \(expected) MiB, measured \(measured) MiB")
            #expect(measured > 150, "the model must dominate the process for the comparison to mean something")
        }
    }

    @Test func anImpossibleModelEndsEveryRankWithOneMessage() throws {
        let run = temporaryRunDirectory()
        let r = try Harness.mpirun(2, ["train", "--run-dir", run, "--set", "model.hidden=[100000,100000]"], timeout: 60)
        #expect(r.status == 1, "\(r.output)")
        #expect(occurrences(of: "the model does not fit in memory: each rank needs", in: r.output) == 1, "\(r.output)")
        #expect(r.output.contains("largest: checkpoint serialization 150 GiB, parameters 37.6 GiB"), "\(r.output)")
        #expect(r.output.contains("x 2 ranks on this node"), "\(r.output)")
        #expect(!r.output.contains("Fatal error") && !r.output.contains("backtrace"), "\(r.output)")
        #expect(r.seconds < 30)
        #expect(!FileManager.default.fileExists(atPath: run), "a failed start writes nothing")
    }

    @Test func ulimitVIsRespected() throws {
        let data = try SyntheticData(samples: 200)
        defer { data.remove() }
        let run = temporaryRunDirectory()
        let command = (["ulimit -v 1048576 && exec", Harness.executable.path, "train", "--local"]
            + job(data, runDir: run, hidden: "[8192, 8192]").dropFirst()).map { "'\($0)'" }.joined(separator: " ")
            .replacingOccurrences(of: "'ulimit -v 1048576 && exec'", with: "ulimit -v 1048576 && exec")
        let r = try Harness.run("/bin/sh", ["-c", command], environment: [:], timeout: 60)
        #expect(r.status == 1, "\(r.output)")
        #expect(r.output.contains("but ulimit -v allows 1.00 GiB of address space"), "\(r.output)")
        #expect(!FileManager.default.fileExists(atPath: run))
    }

    /// A memory cgroup made for the test (root; v1 or v2), with the process moved into it before it starts.
    @Test func aCgroupLimitIsRespected() throws {
        let name = "bpworker-test-\(UUID().uuidString.prefix(8))"
        let candidates = [("/sys/fs/cgroup/memory/\(name)", "memory.limit_in_bytes"), ("/sys/fs/cgroup/\(name)", "memory.max")]
        var made: (String, String)? = nil
        for (directory, file) in candidates where FileManager.default.fileExists(atPath: (directory as NSString).deletingLastPathComponent) {
            guard (try? FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: false)) != nil else { continue }
            if (try? Data("268435456\n".utf8).write(to: URL(fileURLWithPath: directory + "/" + file))) != nil {
                made = (directory, file)
                break
            }
            rmdir(directory)
        }
        guard let (cgroup, _) = made else {
            print("skipped: cannot make a memory cgroup here (not root, or no writable memory controller)")
            return
        }
        defer { rmdir(cgroup) }
        let data = try SyntheticData(samples: 200)
        defer { data.remove() }
        let run = temporaryRunDirectory()
        let arguments = job(data, runDir: run, hidden: "[4096, 4096]").dropFirst().map { "'\($0)'" }.joined(separator: " ")
        let r = try Harness.run("/bin/sh", ["-c", "echo $$ > \(cgroup)/cgroup.procs && exec '\(Harness.executable.path)' train --local \(arguments)"],
                                environment: [:], timeout: 60)
        #expect(r.status == 1, "\(r.output)")
        #expect(r.output.contains("but the memory cgroup allows 256 MiB"), "\(r.output)")
        #expect(!FileManager.default.fileExists(atPath: run))
    }
}
