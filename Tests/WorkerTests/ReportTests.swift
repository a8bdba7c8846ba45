import Coordinator
import Engine
import Foundation
import Testing
@testable import Worker

/// The run report and the TensorBoard event files, checked against independent readers: headless Chromium (Debian's
/// `chromium`) renders the report and dumps its DOM, and the real `tensorboard` package from PyPI reads the event
/// files back. Both are installed by scripts/setup (the venv: `--python`) and by CI.
@Suite("Report and TensorBoard", .serialized, .suiteFiles, .temporaryFiles)
struct ReportTests {
    static let repository = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent()
    /// scripts/setup --python puts tensorboard in it.
    static let venvPython = repository.appendingPathComponent(".venv-bench/bin/python").path
    static let chromium = ["/usr/bin/chromium", "/usr/bin/chromium-browser"].first { FileManager.default.isExecutableFile(atPath: $0) }

    static func job(_ data: SyntheticData, runDir: String, extra: [String] = []) -> [String] {
        ["train", "--run-dir", runDir, "--progress", "plain"] + data.arguments + [
            "--set", "model.hidden=[16]", "--set", "training.batch_size=8", "--set", "data.normalize=scale",
            "--set", "checkpoint.every_steps=5", "--set", "logging.interval=2", "--set", "schedule.warmup_steps=2",
        ] + extra
    }

    /// One run with every kind of marker but a stop, shared by the tests: 2 epochs on 2 ranks with the gradient check,
    /// a checkpoint every 5 steps and a NaN batch skipped at step 5; then resumed on 1 rank for a third epoch.
    static let sharedRun: (directory: String, outputs: [Harness.Result]) = {
        let directory = TemporaryFiles.suitePath("bpworker-run-").path
        guard let data = try? SyntheticData(samples: 160) else { return (directory, []) }
        defer { data.remove() }
        var outputs: [Harness.Result] = []
        if let first = try? Harness.mpirun(2, job(data, runDir: directory, extra: [
            "--gradcheck", "--set", "training.epochs=2", "--set", "numerics.policy=skip"]),
            environment: ["BPWORKER_TEST_NAN": "1:5"]) {
            outputs.append(first)
        }
        if let resumed = try? Harness.local(job(data, runDir: directory, extra: ["--local", "--resume", "--set", "training.epochs=3"])) {
            outputs.append(resumed)
        }
        return (directory, outputs)
    }()

    func trainedRun() throws -> String {
        let outputs = Self.sharedRun.outputs
        try #require(outputs.count == 2, "training did not run")
        for result in outputs { try #require(result.status == 0, "\(result.output)") }
        return Self.sharedRun.directory
    }

    func metrics(_ run: String) throws -> [[String: Any]] {
        try String(contentsOfFile: run + "/metrics.jsonl", encoding: .utf8).split(separator: "\n")
            .map { try #require(JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any]) }
    }

    func python(_ script: String, _ arguments: [String] = []) throws -> String {
        let r = try Harness.run(Self.venvPython, ["-c", script] + arguments, environment: [:], timeout: 180)
        guard r.status == 0 else {
            throw ReportError(description: "python failed (scripts/setup --python installs tensorboard into .venv-bench):\n\(r.output)")
        }
        return r.output
    }

    // MARK: - Markers in metrics.jsonl

    @Test func metricsRecordTheMarkers() throws {
        let records = try metrics(try trainedRun())
        let events = records.filter { $0["type"] as? String == "event" }
        let kinds = events.map { $0["event"] as! String }
        #expect(kinds.first == "start" && events.first?["world_size"] as? Int == 2)
        let resume = try #require(events.first { $0["event"] as? String == "resume" })
        #expect(resume["world_size"] as? Int == 1)
        #expect(events.filter { $0["event"] as? String == "skip" }.map { $0["step"] as? Int } == [6])
        #expect(kinds.filter { $0 == "end" }.count == 2)
        // Checkpoints every 5 steps and at epoch ends each leave an event with their step.
        let checkpointSteps = events.filter { $0["event"] as? String == "checkpoint" }.compactMap { $0["step"] as? Int }
        #expect(checkpointSteps.count >= 4 && checkpointSteps.contains(10))
        // Train records carry the share of time waiting on communication, which the report plots.
        let train = records.filter { $0["type"] as? String == "train" }
        #expect(!train.isEmpty && train.allSatisfy { ($0["comm_wait_fraction"] as? Double).map { (0...1).contains($0) } ?? false })
    }

    // MARK: - TensorBoard

    @Test func crc32cMatchesRFC3720() {
        // RFC 3720, appendix B.4: 32 bytes of zeros, of ones, ascending and descending.
        #expect(crc32c([UInt8](repeating: 0, count: 32)) == 0x8A91_36AA)
        #expect(crc32c([UInt8](repeating: 0xFF, count: 32)) == 0x62A8_AB43)
        #expect(crc32c((0..<32).map { UInt8($0) }) == 0x46DD_794E)
        #expect(crc32c((0..<32).reversed().map { UInt8($0) }) == 0x113F_DB5C)
        #expect(crc32c(Array("123456789".utf8)) == 0xE306_9283)
    }

    @Test func tensorBoardReadsEveryScalarOfMetrics() throws {
        let run = try trainedRun()
        let files = try FileManager.default.contentsOfDirectory(atPath: run + "/tensorboard").filter { $0.hasPrefix("events.out.tfevents.") }
        #expect(files.count == 2, "one event file per process start: \(files)")
        let output = try python("""
            import json, sys
            from tensorboard.backend.event_processing import event_accumulator
            acc = event_accumulator.EventAccumulator(sys.argv[1], size_guidance={event_accumulator.SCALARS: 0})
            acc.Reload()
            print(json.dumps({tag: [[e.step, e.value] for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}))
            """, [run + "/tensorboard"])
        let line = try #require(output.split(separator: "\n").last)
        // TensorBoard keeps float32; compared as float32, since Foundation's JSON reader may land an ulp off a double.
        let scalars = try #require(JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: [[Double]]])
            .mapValues { $0.map { [$0[0], Double(Float($0[1]))] } }
        let records = try metrics(run)
        let tags: [(String, String, String)] = [
            ("train/loss", "train", "loss"), ("train/accuracy", "train", "accuracy"), ("train/learning_rate", "train", "lr"),
            ("train/samples_per_second", "train", "samples_per_second"), ("train/comm_wait_fraction", "train", "comm_wait_fraction"),
            ("train/data_wait_fraction", "train", "data_wait_fraction"), ("test/loss", "eval", "loss"), ("test/accuracy", "eval", "accuracy"),
        ]
        #expect(Set(scalars.keys) == Set(tags.map(\.0)))
        for (tag, type, key) in tags {
            let expected = records.filter { $0["type"] as? String == type }
                .map { [Double($0["step"] as! Int), Double(Float(($0[key] as! NSNumber).doubleValue))] }
            #expect(!expected.isEmpty)
            #expect(scalars[tag] == expected, "\(tag)")
        }
        // The resumed process continued the curves: its steps follow the first process's.
        let steps = try #require(scalars["train/loss"]).map { $0[0] }
        #expect(steps == steps.sorted() && Set(steps).count == steps.count)
        #expect(try #require(scalars["test/accuracy"]).count == 3)
    }

    /// The steps of `train/loss` as the real `tensorboard` package reads RUN_DIR/tensorboard.
    func trainLossSteps(_ run: String) throws -> [Int] {
        let output = try python("""
            import json, sys
            from tensorboard.backend.event_processing import event_accumulator
            acc = event_accumulator.EventAccumulator(sys.argv[1], size_guidance={event_accumulator.SCALARS: 0})
            acc.Reload()
            print(json.dumps([e.step for e in acc.Scalars("train/loss")]))
            """, [run + "/tensorboard"])
        let line = try #require(output.split(separator: "\n").last)
        return try #require(JSONSerialization.jsonObject(with: Data(line.utf8)) as? [Int])
    }

    /// A run killed after its last checkpoint logs the steps since again when it resumes. Its event file begins with
    /// TensorFlow's restart marker (a SessionLog START at the resumed step), so TensorBoard drops what the earlier file
    /// holds from there: every curve has each step once, in order. Before, steps 6 to 10 were there twice and the curve
    /// stepped back from 10 to 6.
    @Test func aResumeAfterAKillDoesNotRepeatTensorBoardSteps() throws {
        let data = try SyntheticData(samples: 160)
        defer { data.remove() }
        let run = temporaryRunDirectory()
        let every = ["--local", "--set", "logging.interval=1", "--set", "training.epochs=1"]
        // SIGKILL half-way through step 10's checkpoint: the last good one is step 5's; steps 6 to 10 were logged.
        let killed = try Harness.local(Self.job(data, runDir: run, extra: every), environment: ["BPWORKER_TEST_CHECKPOINT_CRASH": "10"])
        #expect(killed.status != 0, "\(killed.output)")
        let resumed = try Harness.local(Self.job(data, runDir: run, extra: every + ["--resume"]))
        #expect(resumed.status == 0 && resumed.output.contains("step-00000005.safetensors: step 5"), "\(resumed.output)")
        let logged = try metrics(run).filter { $0["type"] as? String == "train" }.map { $0["step"] as! Int }
        #expect(logged.count > Set(logged).count, "metrics.jsonl holds the repeated steps: \(logged)")
        let steps = try trainLossSteps(run)
        #expect(steps == Array(Set(logged)).sorted(), "\(steps)")
    }

    /// The same on another world size, where the resume numbers its steps anew (2 ranks' step 5 is one rank's step
    /// 10): the earlier records end at the checkpoint's own step, in its numbering. Cut at the new numbering, the killed
    /// process's steps 6 to 10, trained again as steps 11 to 20, stayed in TensorBoard and the report.
    @Test func aResumeOnAnotherWorldSizeDropsTheStepsTrainedAgain() throws {
        let data = try SyntheticData(samples: 160)
        defer { data.remove() }
        let run = temporaryRunDirectory()
        let every = ["--set", "logging.interval=1", "--set", "training.epochs=1"]
        let killed = try Harness.mpirun(2, Self.job(data, runDir: run, extra: every), environment: ["BPWORKER_TEST_CHECKPOINT_CRASH": "10"])
        #expect(killed.status != 0, "\(killed.output)")
        let resumed = try Harness.local(Self.job(data, runDir: run, extra: every + ["--local", "--resume"]))
        #expect(resumed.status == 0 && resumed.output.contains("step-00000005.safetensors: step 10,"), "\(resumed.output)")
        let steps = try trainLossSteps(run)
        #expect(steps == Array(1...5) + Array(11...20), "\(steps)")
        // The report's records (`bpworker report` reads them so) keep the same steps.
        let records = try RunRecords.read(run)
        #expect(records.train.map(\.step) == Array(1...5) + Array(11...20), "\(records.train.map(\.step))")

        // And on more ranks, where the new numbering is smaller: one rank's checkpoint at step 5 (the one at 10 was
        // never written) is 2 ranks' step 2, and the earlier records end there. Cut at the checkpoint's step, one rank's
        // steps 3 to 5 stayed beside the new process's 3 to 10, and every curve ran back over itself.
        let more = temporaryRunDirectory()
        let one = try Harness.local(Self.job(data, runDir: more, extra: every + ["--local"]), environment: ["BPWORKER_TEST_CHECKPOINT_CRASH": "10"])
        #expect(one.status != 0, "\(one.output)")
        let two = try Harness.mpirun(2, Self.job(data, runDir: more, extra: every + ["--resume"]))
        #expect(two.status == 0 && two.output.contains("step-00000005.safetensors: step 2,"), "\(two.output)")
        let moreSteps = try trainLossSteps(more)
        #expect(moreSteps == Array(1...10), "\(moreSteps)")
        #expect(try RunRecords.read(more).train.map(\.step) == Array(1...10))
    }

    // MARK: - The report in a real browser

    /// Chromium's DOM of `file` after loading it (scripts run: none in the report), and its screenshot.
    func render(_ file: String, screenshot: String? = nil) throws -> String {
        let chromium = try #require(Self.chromium)
        let common = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
                      "--user-data-dir=\(TemporaryFiles.path("chromium-profile-").path)"]
        if let screenshot {
            let shot = try Harness.run(chromium, common + ["--screenshot=\(screenshot)", "--window-size=1240,2200",
                                                           "file://\(file)"], environment: [:], timeout: 180)
            try #require(FileManager.default.fileExists(atPath: screenshot), "chromium wrote no screenshot:\n\(shot.output)")
        }
        let dom = try Harness.run(chromium, common + ["--dump-dom", "file://\(file)"], environment: [:], timeout: 180)
        try #require(dom.status == 0 && dom.output.contains("</html>"), "\(dom.output)")
        return dom.output
    }

    /// The elements of `dom` with this class (in its `class` attribute), each as its opening tag's attributes.
    func elements(_ dom: String, tag: String, class name: String) -> [[String: String]] {
        let pattern = "<\(tag)\\b([^>]*)>"
        let regex = try! NSRegularExpression(pattern: pattern)
        return regex.matches(in: dom, range: NSRange(dom.startIndex..., in: dom)).compactMap { match in
            let text = String(dom[Range(match.range(at: 1), in: dom)!])
            var attributes: [String: String] = [:]
            let attribute = try! NSRegularExpression(pattern: #"([\w-]+)="([^"]*)""#)
            for a in attribute.matches(in: text, range: NSRange(text.startIndex..., in: text)) {
                attributes[String(text[Range(a.range(at: 1), in: text)!])] = String(text[Range(a.range(at: 2), in: text)!])
            }
            return (attributes["class"] ?? "").split(separator: " ").contains(Substring(name)) ? attributes : nil
        }
    }

    /// The charts of a DOM, by id, each as its own markup.
    func charts(_ dom: String) -> [String: String] {
        var out: [String: String] = [:]
        var rest = dom[...]
        while let start = rest.range(of: "<svg class=\"chart\""), let end = rest[start.lowerBound...].range(of: "</svg>") {
            let chart = String(rest[start.lowerBound..<end.upperBound])
            if let id = elements(chart, tag: "svg", class: "chart").first?["id"] { out[id] = chart }
            rest = rest[end.upperBound...]
        }
        return out
    }

    @Test(.enabled(if: chromium != nil, "needs Debian's chromium (scripts/setup and .ci/run install it)"))
    func chromiumRendersTheReport() throws {
        let run = try trainedRun()
        let file = run + "/report.html"
        // Rank 0 wrote it at the end of the resumed run; `bpworker report` writes the same page on demand.
        #expect(FileManager.default.fileExists(atPath: file))
        let regenerated = try Harness.local(["report", run])
        #expect(regenerated.status == 0 && regenerated.output.contains(file), "\(regenerated.output)")
        let png = TemporaryFiles.path("report-").appendingPathExtension("png").path
        let dom = try render(file, screenshot: png)
        let records = try metrics(run)
        let trainCount = records.filter { $0["type"] as? String == "train" }.count
        let evalCount = records.filter { $0["type"] as? String == "eval" }.count
        let events = records.filter { $0["type"] as? String == "event" }
        let byId = charts(dom)
        #expect(Set(byId.keys) == ["chart-loss", "chart-accuracy", "chart-learning-rate", "chart-throughput", "chart-time-share"])
        for (id, chart) in byId {
            let series = elements(chart, tag: "path", class: "series")
            #expect(!series.isEmpty, "\(id)")
            for s in series {
                let expected = (s["data-series"] ?? "").hasPrefix("test") ? evalCount : trainCount
                let plotted = (s["d"] ?? "").split(separator: " ").filter { $0.contains(",") }.count
                #expect(plotted == expected, "\(id) \(s["data-series"] ?? ""): \(plotted) points for \(expected) records")
                #expect(s["data-records"] == "\(expected)")
            }
            #expect(elements(chart, tag: "g", class: "marker-checkpoint").count
                    == events.filter { $0["event"] as? String == "checkpoint" }.count, "\(id)")
            #expect(elements(chart, tag: "g", class: "marker-skip").map { $0["data-step"] } == ["6"], "\(id)")
            let resumes = elements(chart, tag: "g", class: "marker-resume")
            #expect(resumes.count == 1, "\(id)")
            #expect(chart.contains("resumed, 1 rank"), "\(id)")
            // The resume on 1 rank counts global steps anew (from the samples seen): every training curve breaks there.
            for s in series where !(s["data-series"] ?? "").hasPrefix("test") {
                #expect((s["d"] ?? "").components(separatedBy: " M").count == 2, "\(id) \(s["data-series"] ?? ""): one break")
            }
            #expect(chart.contains("global step"), "\(id)")
        }
        // The gradient-check table: a row per tensor and the random direction, all passing.
        let tensors = 4
        #expect(dom.components(separatedBy: "<td class=\"verdict-pass\">pass</td>").count - 1 == tensors + 1)
        #expect(dom.contains("id=\"result\"") && dom.contains(">finished<"))
        #expect(dom.contains("Linear(12, 16)") && dom.contains("OpenBLAS") && dom.contains("config.yaml"))
        // Self-contained: no script, and no address but the SVG namespace's.
        #expect(!dom.contains("<script"))
        #expect(!dom.contains("https://") && dom.replacingOccurrences(of: "http://www.w3.org/2000/svg", with: "").contains("http://") == false)

        // The screenshot is a picture of the report, not a blank page.
        let colours = try python("""
            import sys, zlib, struct
            data = open(sys.argv[1], "rb").read()
            assert data[:8] == b"\\x89PNG\\r\\n\\x1a\\n"
            pos, idat, width, height, kind = 8, b"", 0, 0, 0
            while pos < len(data):
                length, tag = struct.unpack(">I4s", data[pos:pos + 8])
                body = data[pos + 8:pos + 8 + length]
                if tag == b"IHDR": width, height, depth, kind = struct.unpack(">IIBB", body[:10])
                if tag == b"IDAT": idat += body
                pos += 12 + length
            channels = {2: 3, 6: 4}[kind]
            raw, stride, rows, prev = zlib.decompress(idat), width * channels, [], bytearray(width * channels)
            for y in range(height):
                f, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
                for i in range(stride):
                    a = line[i - channels] if i >= channels else 0
                    b, c = prev[i], prev[i - channels] if i >= channels else 0
                    p = a + b - c
                    pred = [0, a, b, (a + b) // 2, a if abs(p - a) <= abs(p - b) and abs(p - a) <= abs(p - c) else b if abs(p - b) <= abs(p - c) else c][f]
                    line[i] = (line[i] + pred) & 255
                rows.append(bytes(line)); prev = line
            pixels = [row[i:i + 3] for row in rows[::4] for i in range(0, stride, channels * 4)]
            white = sum(1 for p in pixels if p == b"\\xff\\xff\\xff")
            print(len(set(pixels)), 1 - white / len(pixels))
            """, [png])
        let numbers = try #require(colours.split(separator: "\n").last).split(separator: " ").compactMap { Double($0) }
        try #require(numbers.count == 2, "\(colours)")
        #expect(numbers[0] >= 20, "the screenshot has \(numbers[0]) colours: blank or unstyled")
        #expect(numbers[1] > 0.02, "the screenshot is \(Int(100 - 100 * numbers[1]))% white")
    }

    @Test(.enabled(if: chromium != nil, "needs Debian's chromium (scripts/setup and .ci/run install it)"))
    func severalRunsOverlayInOneReport() throws {
        let run = try trainedRun()
        let data = try SyntheticData(samples: 160)
        defer { data.remove() }
        let other = TemporaryFiles.path("lr-0.3-").path
        let second = try Harness.local(Self.job(data, runDir: other, extra: ["--local", "--set", "training.epochs=1", "--set", "optimizer.lr=0.3"]))
        try #require(second.status == 0, "\(second.output)")
        let output = TemporaryFiles.path("compare-").appendingPathExtension("html").path
        let made = try Harness.local(["report", run, other, "--output", output])
        #expect(made.status == 0, "\(made.output)")
        let dom = try render(output)
        let loss = try #require(charts(dom)["chart-loss"])
        let labels = elements(loss, tag: "path", class: "series").compactMap { $0["data-series"] }
        let names = [URL(fileURLWithPath: run).lastPathComponent, URL(fileURLWithPath: other).lastPathComponent]
        #expect(labels == names.flatMap { ["\($0): training loss", "\($0): test loss"] })
        let otherTrain = try metrics(other).filter { $0["type"] as? String == "train" }.count
        #expect(elements(loss, tag: "path", class: "series")[2]["data-points"] == "\(otherTrain)")
        #expect(elements(loss, tag: "g", class: "marker-resume").count == 1, "only the first run was resumed")
        #expect(dom.components(separatedBy: "<tr class=\"state-finished\">").count - 1 == 2, "a result row per run")
        // What was compared: the keys whose values differ, and only those.
        let start = try #require(dom.range(of: "<section id=\"settings\">"), "a settings section")
        let settings = String(dom[start.lowerBound..<(dom[start.lowerBound...].range(of: "</section>")?.upperBound ?? dom.endIndex)])
        #expect(settings.contains("<td>optimizer.lr</td><td>0.05</td><td>0.3</td>"), "\(settings.prefix(2000))")
        #expect(settings.contains("<td>training.epochs</td><td>3</td><td>1</td>"))
        #expect(!settings.contains("<td>training.batch_size</td>"), "equal settings are not listed")
    }

    @Test(.enabled(if: chromium != nil, "needs Debian's chromium (scripts/setup and .ci/run install it)"))
    func aRunThatFailedAtStepZeroHasAReport() throws {
        let data = try SyntheticData(samples: 160)
        defer { data.remove() }
        let run = TemporaryFiles.path("failed-").path
        let failed = try Harness.mpirun(2, Self.job(data, runDir: run, extra: ["--gradcheck", "--set", "training.epochs=1"]),
                                        environment: ["BPWORKER_TEST_GRADIENT_FAULT": "scaled:0.weight:1.5"])
        #expect(failed.status == 1, "\(failed.output)")
        let dom = try render(run + "/report.html")
        #expect(dom.contains(">failed<") && dom.contains("gradient check failed"))
        #expect(dom.contains("no training step was logged") && dom.contains("no steps recorded"))
        #expect(dom.contains("<td class=\"verdict-fail\">fail</td>"), "the failing tensor in the gradient-check table")
        #expect(elements(dom, tag: "g", class: "marker-failure").count == 5, "a failure marker on every chart")
    }

    // MARK: - Without a browser

    @Test func aHundredThousandStepsMakeASmallFile() throws {
        let run = TemporaryFiles.path("long-").path
        try FileManager.default.createDirectory(atPath: run, withIntermediateDirectories: true)
        var lines = [#"{"type":"event","event":"start","step":0,"world_size":4}"#]
        for step in 1...100_000 {
            // Loss falling over two decades with one spike, which decimation must keep.
            let loss = step == 54_321 ? 9.0 : 2.3 * pow(0.01, Double(step) / 100_000)
            lines.append(#"{"type":"train","epoch":1,"step":\#(step),"loss":\#(loss),"accuracy":0.5,"lr":0.1,"samples_per_second":1000,"comm_wait_fraction":0.1}"#)
            if step % 10_000 == 0 {
                lines.append(#"{"type":"eval","epoch":\#(step / 10_000),"step":\#(step),"loss":\#(loss),"accuracy":0.8,"samples":100}"#)
            }
        }
        lines.append(#"{"type":"event","event":"end","step":100000,"state":"stopped","message":"stop requested by SIGTERM"}"#)
        try lines.joined(separator: "\n").write(toFile: run + "/metrics.jsonl", atomically: true, encoding: .utf8)
        try RunReport.write(runDirectories: [run], to: run + "/report.html")
        let html = try String(contentsOfFile: run + "/report.html", encoding: .utf8)
        #expect(html.utf8.count < 400_000, "\(html.utf8.count) bytes")
        let loss = try #require(charts(html)["chart-loss"])
        #expect(loss.contains("data-scale=\"log\""), "a loss spanning two decades is drawn on a log scale")
        let train = try #require(elements(loss, tag: "path", class: "series").first)
        #expect(train["data-records"] == "100000")
        #expect(Int(train["data-points"] ?? "") ?? .max <= Chart.maxPoints)
        #expect(loss.contains(">10<") || loss.contains(">10</text>"), "a decade tick")
        #expect(html.contains(">100,000<"), "step ticks with thousands separators")
        // The spike survives decimation: the highest point drawn is the spike's.
        let ys = (train["d"] ?? "").split(separator: " ").compactMap { Double($0.split(separator: ",")[1]) }
        let spikeY = try #require(ys.min())
        #expect(spikeY < Chart.top + 0.05 * Chart.plotHeight, "the spike (9.0, near the top of a 0.01-10 axis) is drawn: highest point at y \(spikeY)")
        #expect(elements(loss, tag: "g", class: "marker-stop").count == 1)
    }

    /// A resume after a crash continues from its checkpoint: what the earlier process logged past that step is
    /// replaced, as TensorBoard does, and only the earlier process's ending stays. (The shared run resumes from its
    /// last record, where there is nothing to drop.)
    @Test func aResumeDropsTheEarlierProcessesRecordsPastItsCheckpoint() {
        var records = RunRecords(directory: "run")
        for step in stride(from: 2, through: 8, by: 2) {
            records.add(.train(.init(epoch: 0, step: step, loss: 1.0 / Double(step), accuracy: 0.5, learningRate: 0.1,
                                     samplesPerSecond: 100, commWaitFraction: 0.1)))
        }
        records.add(.eval(.init(epoch: 1, step: 4, loss: 0.5, accuracy: 0.8, samples: 10)))
        records.add(.eval(.init(epoch: 2, step: 8, loss: 0.4, accuracy: 0.9, samples: 10)))
        records.add(.event(.init(kind: .checkpoint, step: 4)))
        records.add(.event(.init(kind: .checkpoint, step: 6)))
        var end = MetricsRecord.Event(kind: .end, step: 7)
        end.state = .failed
        records.add(.event(end))
        var resume = MetricsRecord.Event(kind: .resume, step: 4)
        resume.worldSize = 2
        records.add(.event(resume))
        #expect(records.train.map(\.step) == [2, 4])
        #expect(records.eval.map(\.step) == [4])
        #expect(records.events.map(\.kind) == [.checkpoint, .end, .resume])
        #expect(records.events.map(\.step) == [4, 7, 4])
    }

    /// The result row's samples/s is samples over time across the last intervals: 100 and 300 samples/s over equal
    /// samples is 150 samples/s (the plain mean, 200, let a fast interval outweigh a slow one).
    @Test func theResultsThroughputIsSamplesOverTime() {
        var records = RunRecords(directory: "run")
        for (step, rate) in [(2, 100.0), (4, 300.0)] {
            records.add(.train(.init(epoch: 0, step: step, loss: 1, accuracy: 0.5, learningRate: 0.1, samplesPerSecond: rate,
                                     commWaitFraction: 0)))
        }
        let page = RunReport.html([records])
        #expect(page.contains("<td>150</td>"), "\(page.prefix(4000))")
        #expect(!page.contains("<td>200</td>"))
    }

    /// Records with quotes, backslashes and a newline in their strings go through MetricsLog into metrics.jsonl and
    /// come back whole, read by Python's json and by `RunRecords.read`; the records MetricsLog keeps in memory are
    /// those read from the file, also after a resume that drops what followed its checkpoint, and make the same page.
    @Test func metricsRecordsRoundTripAndTheRecordsInMemoryAreTheFilesRecords() throws {
        let run = TemporaryFiles.path("escaped-").path
        try FileManager.default.createDirectory(atPath: run, withIntermediateDirectories: true)
        let path = run + "/metrics.jsonl"
        let log = MetricsLog(path: path)
        var start = MetricsRecord.Event(kind: .start, step: 0, elapsedSeconds: 0.5)
        start.worldSize = 2
        start.model = #"mlp "quoted" \ model"#
        start.layers = [#"linear "8""#, #"a\b"#]
        start.blas = "blas\n\"kernels\""
        log.write(.event(start))
        for step in [2, 4, 6] {
            log.write(.train(.init(epoch: 1, step: step, loss: 1 / Double(step), accuracy: 0.25, learningRate: 0.1,
                                   samplesPerSecond: 1000, commWaitFraction: 0.125, elapsedSeconds: Double(step))))
        }
        log.write(.eval(.init(epoch: 1, step: 6, loss: 0.75, accuracy: 0.5, samples: 40, elapsedSeconds: 7)))
        log.write(.event(.init(kind: .checkpoint, step: 4)))
        var end = MetricsRecord.Event(kind: .end, step: 6)
        end.state = .stopped
        end.message = #"stop "requested" by C:\runs\x\"#
        log.write(.event(end))
        #expect(throws: (any Error).self, "JSON has no NaN") {
            try MetricsRecord.train(.init(epoch: 1, step: 7, loss: .nan, accuracy: 0, learningRate: 0, samplesPerSecond: 0,
                                          commWaitFraction: 0)).line()
        }

        let output = try Harness.run("/usr/bin/env", ["python3", "-c", """
            import json, sys
            records = [json.loads(line) for line in open(sys.argv[1])]
            print(json.dumps([[r["type"], r.get("event"), r.get("model"), r.get("layers"), r.get("blas"), r.get("message")]
                              for r in records if r["type"] == "event"] + [sorted(records[1])]))
            """, path], environment: [:], timeout: 60)
        try #require(output.status == 0, "\(output.output)")
        let line = try #require(output.output.split(separator: "\n").last)
        let read = try #require(try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [[Any]])
        #expect(read.count == 4)
        #expect(read.first?[2] as? String == start.model && read.first?[3] as? [String] == start.layers)
        #expect(read.first?[4] as? String == start.blas && read.dropLast().last?[5] as? String == end.message)
        #expect(read.last as? [String] == ["accuracy", "comm_wait_fraction", "elapsed_seconds", "epoch", "loss", "lr",
                                           "samples_per_second", "step", "type"], "the keys users read")

        func expectSame(_ memory: RunRecords, _ disk: RunRecords, _ when: String) {
            #expect(memory.train == disk.train && memory.eval == disk.eval && memory.events == disk.events, "\(when)")
            #expect(memory.unreadableLines == disk.unreadableLines, "\(when)")
        }
        expectSame(log.records, try RunRecords.read(run), "as written")
        #expect(log.records.events.map(\.kind) == [.start, .checkpoint, .end] && log.records.lastStart == start)

        // A process killed mid-line, then a resume from the checkpoint at step 4: records past it are dropped.
        let handle = try #require(FileHandle(forWritingAtPath: path))
        _ = try handle.seekToEnd()
        handle.write(Data(#"{"type":"train","ep"#.utf8))
        try handle.close()
        let resumed = MetricsLog(path: path, append: true)
        var resume = MetricsRecord.Event(kind: .resume, step: 4)
        resume.worldSize = 1
        resumed.write(.event(resume))
        let disk = try RunRecords.read(run)
        expectSame(resumed.records, disk, "resumed")
        #expect(disk.unreadableLines == 1 && disk.train.map(\.step) == [2, 4] && disk.events.last == resume)
        let page = { (records: RunRecords) in
            RunReport.html([records]).split(separator: "\n").filter { !$0.contains("class=\"generated\"") }
        }
        #expect(page(resumed.records) == page(disk))
    }

    /// A recorder sized for a window counts what does not fit instead of growing, and records nothing outside it.
    @Test func aFullTimelineRecorderCountsWhatItDrops() {
        let recorder = TimelineRecorder(capacity: 2)
        recorder.record(.forward, start: 1, end: 2)
        #expect(recorder.count == 0 && recorder.begin() == 0, "not recording yet")
        recorder.startRecording()
        for t in 1...3 { recorder.record(.forward, start: Int64(t), end: Int64(t + 1)) }
        #expect(recorder.count == 2 && recorder.dropped == 1)
        #expect(recorder.recorded.map(\.start) == [1, 2])
        recorder.removeAll()
        #expect(recorder.count == 0 && recorder.dropped == 0)
    }

    /// A distributed check's batch is per rank: the report says over how many ranks, as the text report does.
    @Test func theGradientCheckSectionSaysADistributedCheckIsPerRank() throws {
        let model = try Model<Double>(spec: .mlp(widths: [3, 4, 2]), batchCapacity: 2, seed: 1)
        var report = checkGradients(model: model, count: 2)
        #expect(RunReport.gradientCheckSection(report, suffix: "").contains(", batch 2, loss"))
        report.distributed = true
        report.ranks = 3
        report.samples = 6
        #expect(RunReport.gradientCheckSection(report, suffix: "").contains("distributed over 3 ranks, batch 2 per rank (6 samples), loss"))
    }

    @Test func ticksAreRoundAndLabelled() {
        let steps = Axis.linear(low: 0, high: 9_370, includeZero: true, targetTicks: 8)
        #expect(steps.ticks == [0, 2_000, 4_000, 6_000, 8_000, 10_000])
        #expect(steps.label(6_000, percent: false) == "6,000")
        let accuracy = Axis.linear(low: 0.81, high: 0.905, includeZero: false, targetTicks: 6, unitInterval: true)
        #expect(abs((accuracy.ticks.first ?? 0) - 0.8) < 1e-12 && accuracy.label(0.84, percent: true) == "84%")
        let loss = Axis.logarithmic(low: 0.023, high: 2.3)
        #expect(loss.ticks.first == 0.01 && loss.ticks.last == 10)
        #expect(loss.label(0.05, percent: false) == "0.05")
        // Steps are whole numbers: a run of 3 steps has ticks 0, 1, 2, 3 (at 0.5 apart they read 0 1 1 2 2 3 3).
        let short = Axis.linear(low: 0, high: 3, includeZero: true, targetTicks: 8, integral: true)
        #expect(short.ticks == [0, 1, 2, 3] && short.ticks.map { short.label($0, percent: false) } == ["0", "1", "2", "3"], "\(short)")
        let one = Axis.linear(low: 0.5, high: 0.5, includeZero: false, targetTicks: 6)
        #expect(one.low < 0.5 && one.high > 0.5, "a single value gets a range around it")
        // A diverging run's loss: ticks beyond Int's range are labelled in exponent form (rounding them to an Int
        // crashed the run at its epoch end, its resume, and `bpworker report`).
        let diverged = Axis.linear(low: 0, high: 6.37e35, includeZero: true, targetTicks: 6)
        #expect(diverged.ticks.allSatisfy(\.isFinite) && diverged.label(diverged.ticks.last!, percent: false) == "8e+35",
                "\(diverged.ticks)")
        #expect(diverged.label(-2e20, percent: false) == "-2e+20")
        let chart = Chart(id: "loss", title: "loss", yLabel: "loss", series: [.init(label: "train", points: [(1, 0), (2, 6.37e35)], color: "#000")],
                          includeZero: true)
        #expect(chart.svg().contains("8e+35"))
        // Ranges no step can tick: -1e308 to 1e308 (their span overflows) and a learning rate of 1e-323 (a subnormal
        // span). Both crashed rank 0 at its first evaluation, leaving status.json at "training", and `bpworker report`.
        for (low, high, label) in [(-1e308, 1e308, "1e+308"), (0.0, 2 * Double.leastNonzeroMagnitude, "9.88e-324")] {
            let axis = Axis.linear(low: low, high: high, includeZero: true, targetTicks: 6)
            #expect(axis.ticks == [low, high] && axis.label(high, percent: false) == label, "\(axis)")
            let extreme = Chart(id: "x", title: "x", yLabel: "x", series: [.init(label: "train", points: [(1, low), (2, high)], color: "#000")],
                                includeZero: true)
            #expect(extreme.svg().contains(label))
        }
    }

    /// A break at a resume's step (the cut: the earlier records end at it, the resumed ones start after it) separates
    /// the record at the cut from the next one. It came one point early: the record at the checkpoint was joined to the
    /// resumed process's first across the jump.
    @Test func aCurveBreaksAfterTheRecordAtTheResumeStep() {
        var series = Chart.Series(label: "train", points: [(10, 1), (20, 2), (32, 3), (68, 4), (80, 5)], color: "#000")
        series.breaks = [32]
        let svg = Chart(id: "x", title: "x", yLabel: "x", series: [series]).svg()
        let path = String(svg.split(separator: "d=\"").last!.prefix { $0 != "\"" })
        let pieces = path.components(separatedBy: " M")
        #expect(pieces.count == 2 && pieces[0].components(separatedBy: " L").count == 3, "\(path)")
    }

    @Test func badRunDirectoriesAreOneLine() throws {
        let missing = try Harness.local(["report", "/nonexistent/run"])
        #expect(missing.status == 1)
        #expect(missing.output.trimmingCharacters(in: .whitespacesAndNewlines) == "error: /nonexistent/run: no such run directory")
        let empty = TemporaryFiles.path("empty-").path
        try FileManager.default.createDirectory(atPath: empty, withIntermediateDirectories: true)
        let notARun = try Harness.local(["report", empty])
        #expect(notARun.status == 1 && notARun.output.contains("not a bpworker run directory"), "\(notARun.output)")
        #expect(!FileManager.default.fileExists(atPath: empty + "/report.html"))
    }
}
