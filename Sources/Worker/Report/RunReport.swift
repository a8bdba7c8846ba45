import Engine
import Foundation
import Yams

/// RUN_DIR/report.html: a run (or several, overlaid) as one self-contained page a person reads in any browser,
/// offline: curves of loss, accuracy, learning rate, throughput and the time split between computing and waiting on
/// communication over the global step, with checkpoints, resumes, stops and skipped steps marked; the gradient-check
/// table; the model, the machine, the configuration and the result. Inline SVG and CSS only.
///
/// Made from the run directory's records alone (metrics.jsonl, status.json, gradcheck.json, config.yaml), so rank 0
/// during training (from the records it keeps in memory) and `bpworker report` afterwards (from the files) write the
/// same page.
enum RunReport {
    /// Reads the runs and writes the page atomically (a browser reloading it never sees half a file).
    static func write(runDirectories: [String], to path: String) throws {
        var runs: [RunRecords] = []
        for directory in runDirectories { runs.append(try RunRecords.read(directory)) }
        try write(runs, to: path)
    }

    /// Writes the page of runs already read (rank 0 keeps its run's records as it writes them).
    static func write(_ runs: [RunRecords], to path: String) throws {
        do {
            try RunDirectoryIdentity.requireWritable(path)
            try writeAtomically(Data(html(runs).utf8), to: path, durable: false)
        } catch {
            throw ReportError(description: "\(path): cannot write the report: \(error)")
        }
    }

    /// One colour per run when several are overlaid; a single run colours training and test apart.
    static let palette = ["#1f6fb4", "#d9480f", "#2b8a3e", "#862e9c", "#c2255c", "#0b7285", "#5c940d", "#495057"]
    static let trainColor = "#1f6fb4", testColor = "#d9480f"

    static func html(_ runs: [RunRecords]) -> String {
        let overlay = runs.count > 1
        let names = uniqueNames(runs)
        func color(_ run: Int, test: Bool) -> String { overlay ? palette[run % palette.count] : test ? testColor : trainColor }
        func label(_ run: Int, _ what: String) -> String { overlay ? "\(names[run]): \(what)" : what }

        var loss: [Chart.Series] = [], accuracy: [Chart.Series] = [], rate: [Chart.Series] = []
        var throughput: [Chart.Series] = [], share: [Chart.Series] = []
        var markers: [Chart.Marker] = []
        for (i, run) in runs.enumerated() {
            let steps = run.train.map { Double($0.step) }
            func train(_ value: (RunRecords.Train) -> Double) -> [(x: Double, y: Double)] {
                zip(steps, run.train.map(value)).map { (x: $0, y: $1) }
            }
            func test(_ value: (RunRecords.Eval) -> Double) -> [(x: Double, y: Double)] {
                run.eval.map { (x: Double($0.step), y: value($0)) }
            }
            loss.append(.init(label: label(i, "training loss"), points: train(\.loss), color: color(i, test: false)))
            loss.append(.init(label: label(i, "test loss"), points: test(\.loss), color: color(i, test: true), dotted: true))
            accuracy.append(.init(label: label(i, "training accuracy"), points: train(\.accuracy), color: color(i, test: false)))
            accuracy.append(.init(label: label(i, "test accuracy"), points: test(\.accuracy), color: color(i, test: true), dotted: true))
            rate.append(.init(label: label(i, "learning rate"), points: train(\.learningRate), color: color(i, test: false)))
            throughput.append(.init(label: label(i, "samples/s"), points: train(\.samplesPerSecond), color: color(i, test: false)))
            let shares = share.count
            share.append(.init(label: label(i, "computing"), points: train { max(0, 1 - $0.commWaitFraction - ($0.dataWaitFraction ?? 0)) },
                               color: color(i, test: false)))
            share.append(.init(label: label(i, "waiting on communication"), points: train(\.commWaitFraction),
                               color: overlay ? color(i, test: true) : "#868e96", dashed: overlay))
            // Files of older versions have no data wait: no series rather than a line at 0.
            if run.train.contains(where: { $0.dataWaitFraction != nil }) {
                share.append(.init(label: label(i, "waiting for data"), points: train { $0.dataWaitFraction ?? 0 },
                                   color: overlay ? color(i, test: true) : "#e8590c", dotted: overlay, dashed: !overlay))
            }
            markers += self.markers(run, name: overlay ? names[i] : nil)
            let restarts = run.restarts
            for j in loss.indices.suffix(2) { loss[j].breaks = restarts }
            for j in accuracy.indices.suffix(2) { accuracy[j].breaks = restarts }
            for j in shares..<share.count { share[j].breaks = restarts }
            rate[rate.count - 1].breaks = restarts
            throughput[throughput.count - 1].breaks = restarts
        }
        let charts = [
            Chart(id: "chart-loss", title: "Loss", yLabel: "loss (\(lossName(runs)))", series: loss, markers: markers,
                  logWhenSpanning: 10),
            Chart(id: "chart-accuracy", title: "Accuracy", yLabel: "accuracy (%)", series: accuracy, markers: markers, percent: true),
            Chart(id: "chart-learning-rate", title: "Learning rate", yLabel: "learning rate", series: rate, markers: markers,
                  includeZero: true),
            Chart(id: "chart-throughput", title: "Throughput", yLabel: "samples/s (all ranks)", series: throughput,
                  markers: markers, includeZero: true),
            Chart(id: "chart-time-share", title: "Computing, waiting on communication, waiting for data", yLabel: "share of step time (%)",
                  series: share, markers: markers, percent: true, includeZero: true),
        ]

        var body = "<header><h1>bpworker report: \(escapeHTML(names.joined(separator: ", ")))</h1>"
        body += "<p class=\"generated\">written \(escapeHTML(RunStatus.now)) by bpworker</p></header>\n"
        body += resultSection(runs, names: names)
        if overlay { body += settingsSection(runs, names: names) }
        body += "<section id=\"charts\"><h2>Curves</h2>\n"
        for chart in charts {
            body += "<figure>" + legend(chart.series) + chart.svg() + "</figure>\n"
        }
        body += markerLegend + "</section>\n"
        for (i, run) in runs.enumerated() {
            let suffix = overlay ? ": \(escapeHTML(names[i]))" : ""
            body += "<section class=\"run\" id=\"run-\(i)\">"
            if overlay { body += "<h2>\(escapeHTML(names[i]))</h2>" }
            body += gradientCheckSection(run.gradientCheck, suffix: suffix,
                                         stoppedInCheck: run.status?.message == Trainer.stoppedInGradientCheck)
            body += modelAndMachineSection(run, suffix: suffix)
            body += "<h3>Configuration\(suffix)</h3><details class=\"configuration\"><summary>config.yaml (every key, resolved)</summary>"
            body += "<pre>\(escapeHTML(run.configuration ?? "(no config.yaml)"))</pre></details>"
            body += "</section>\n"
        }
        return "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            + "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            + "<title>bpworker report: \(escapeHTML(names.joined(separator: ", ")))</title>\n<style>\(style)</style></head>\n"
            + "<body>\n\(body)</body></html>\n"
    }

    // MARK: - Sections

    static func resultSection(_ runs: [RunRecords], names: [String]) -> String {
        var out = "<section id=\"result\"><h2>Result</h2><table class=\"result\"><thead><tr>"
        out += "<th>run</th><th>state</th><th>steps</th><th>epochs</th><th>test accuracy</th><th>test loss</th>"
        out += "<th>training loss</th><th>samples/s</th><th>ranks</th></tr></thead><tbody>\n"
        for (i, run) in runs.enumerated() {
            let status = run.status
            let state = status?.state.rawValue ?? (run.train.isEmpty ? "no status" : "unknown")
            let lastEval = run.eval.last, lastTrain = run.train.last
            let steps = status.map { "\(grouped($0.step)) / \(grouped($0.totalSteps))" } ?? lastTrain.map { grouped($0.step) } ?? "0"
            let epochs = status.map { "\(lastEval?.epoch ?? 0) / \($0.epochs)" } ?? "\(lastEval?.epoch ?? 0)"
            // Over the last 20 log intervals, as samples over time: intervals of equal samples, so the harmonic mean
            // of their rates (the plain mean let a fast interval outweigh one slowed by an evaluation or a checkpoint).
            let throughput = run.train.suffix(20).map(\.samplesPerSecond).filter { $0.isFinite && $0 > 0 }
            out += "<tr class=\"state-\(state)\"><td>\(escapeHTML(names[i]))</td><td class=\"state\">\(state)</td><td>\(steps)</td>"
            out += "<td>\(epochs)</td><td>\(lastEval.map { percent($0.accuracy) } ?? "–")</td>"
            out += "<td>\(lastEval.map { String(format: "%.4f", $0.loss) } ?? "–")</td>"
            out += "<td>\(lastTrain.map { String(format: "%.4f", $0.loss) } ?? "–")</td>"
            out += "<td>\(throughput.isEmpty ? "–" : groupedRounded(Double(throughput.count) / throughput.reduce(0) { $0 + 1 / $1 }))</td>"
            out += "<td>\(run.lastStart?.worldSize.map(String.init) ?? status.map { String($0.worldSize) } ?? "–")</td></tr>\n"
            if let message = status?.message {
                out += "<tr class=\"message\"><td></td><td colspan=\"8\">\(escapeHTML(message))</td></tr>\n"
            }
            if run.train.isEmpty {
                out += "<tr class=\"message\"><td></td><td colspan=\"8\">no training step was logged</td></tr>\n"
            }
            if run.unreadableLines > 0 {
                let skipped = "\(counted(run.unreadableLines, "unreadable line")) of metrics.jsonl skipped"
                out += "<tr class=\"message\"><td></td><td colspan=\"8\">\(skipped)</td></tr>\n"
            }
        }
        return out + "</tbody></table></section>\n"
    }

    /// With several runs, what was compared: every configuration key whose resolved value differs between them.
    static func settingsSection(_ runs: [RunRecords], names: [String]) -> String {
        let differing = differingSettings(runs)
        var out = "<section id=\"settings\"><h2>Settings that differ</h2>"
        guard !differing.isEmpty else { return out + "<p class=\"none\">none: the resolved configurations are identical</p></section>\n" }
        out += "<table class=\"settings\"><thead><tr><th>key</th>"
        for name in names { out += "<th>\(escapeHTML(name))</th>" }
        out += "</tr></thead><tbody>"
        for (key, values) in differing {
            out += "<tr><td>\(escapeHTML(key))</td>" + values.map { "<td>\(escapeHTML($0))</td>" }.joined() + "</tr>"
        }
        return out + "</tbody></table></section>\n"
    }

    /// The keys of the runs' config.yaml (flattened to `section.key`) whose values are not the same in all of them.
    static func differingSettings(_ runs: [RunRecords]) -> [(key: String, values: [String])] {
        let flat = runs.map { run in flatten((try? Yams.load(yaml: run.configuration ?? "")) ?? nil, prefix: "") }
        return Set(flat.flatMap(\.keys)).sorted().compactMap { key in
            let values = flat.map { $0[key] ?? "–" }
            return Set(values).count > 1 ? (key, values) : nil
        }
    }

    private static func flatten(_ node: Any?, prefix: String) -> [String: String] {
        if let map = node as? [AnyHashable: Any] {
            var out: [String: String] = [:]
            for (key, value) in map {
                out.merge(flatten(value, prefix: prefix.isEmpty ? "\(key)" : "\(prefix).\(key)")) { first, _ in first }
            }
            return out
        }
        guard let node, !prefix.isEmpty else { return [:] }
        if let list = node as? [Any] { return [prefix: "[" + list.map { "\($0)" }.joined(separator: ", ") + "]"] }
        return [prefix: "\(node)"]
    }

    /// - Parameter stoppedInCheck: a stop signal ended the check before its verdict (it wrote no gradcheck.json).
    static func gradientCheckSection(_ report: GradientCheckReport?, suffix: String, stoppedInCheck: Bool = false) -> String {
        guard let report else {
            let why = stoppedInCheck ? "stopped by a signal before its verdict: nothing verified, and the run stopped before its first step"
                : "not run (train --gradcheck runs it before the first step)"
            return "<h3>Gradient check\(suffix)</h3><p class=\"none\">\(why)</p>"
        }
        func e(_ x: Double) -> String { String(format: "%.2e", x) }
        let verdict = report.verdict.rawValue
        var out = "<h3>Gradient check\(suffix): <span class=\"verdict-\(verdict)\">\(verdict.uppercased())</span></h3>"
        // As the text report says it (GradientCheckReport.text).
        let batch = report.distributed ? "distributed over \(report.ranks) ranks, batch \(report.batchSize) per rank (\(report.samples) samples)"
            : "batch \(report.batchSize)"
        out += "<p>float64 two-sided differences, ε \(e(report.epsilon)), \(batch), loss "
            + "\(String(format: "%.6f", report.loss)), \(grouped(report.parameterCount)) parameters; relative error "
            + "|a − n| / max(|a|, |n|, 1e-8): pass ≤ 1e-5, warn ≤ 1e-4</p>"
        out += "<table class=\"gradcheck\"><thead><tr><th>tensor</th><th>shape</th><th>coordinates</th><th>kinks skipped</th>"
            + "<th>worst rel. error</th><th>mean rel. error</th><th>verdict</th></tr></thead><tbody>"
        for tensor in report.tensors {
            out += "<tr><td>\(escapeHTML(tensor.name))</td><td>[\(tensor.shape.map(String.init).joined(separator: ", "))]</td>"
            out += "<td>\(grouped(tensor.checked))</td><td>\(tensor.kinksSkipped)</td><td>\(e(tensor.maxRelativeError))</td>"
            out += "<td>\(e(tensor.meanRelativeError))</td><td class=\"verdict-\(tensor.verdict.rawValue)\">\(tensor.verdict.rawValue)</td></tr>"
        }
        let d = report.direction
        out += "<tr><td>random direction</td><td>all</td><td>1</td><td>\(d.kinksSkipped)</td><td>\(e(d.relativeError))</td>"
        out += "<td>\(e(d.relativeError))</td><td class=\"verdict-\(d.verdict.rawValue)\">\(d.verdict.rawValue)</td></tr>"
        out += "</tbody></table>"
        for failure in report.failures { out += "<p class=\"failure\">\(escapeHTML(failure))</p>" }
        return out
    }

    static func modelAndMachineSection(_ run: RunRecords, suffix: String) -> String {
        var out = "<div class=\"columns\"><div><h3>Model\(suffix)</h3>"
        if let start = run.lastStart {
            out += "<p>\(escapeHTML(start.model ?? "?")), "
            out += "\(grouped(start.parameters ?? 0)) parameters</p>"
            if let layers = start.layers, !layers.isEmpty {
                out += "<pre class=\"layers\">\(escapeHTML(layers.joined(separator: "\n")))</pre>"
            }
        } else {
            out += "<p class=\"none\">not recorded (the run did not start training)</p>"
        }
        out += "</div><div><h3>Machine\(suffix)</h3>"
        let starts = run.events.filter(\.isStart)
        if starts.isEmpty {
            out += "<p class=\"none\">not recorded</p>"
        } else {
            out += "<table class=\"machine\"><thead><tr><th></th><th>step</th><th>ranks</th><th>nodes</th><th>BLAS</th>"
                + "<th>threads per rank</th></tr></thead><tbody>"
            for start in starts {
                out += "<tr><td>\(start.kind == .resume ? "resumed" : "started")</td><td>\(grouped(start.step))</td>"
                out += "<td>\(start.worldSize.map(String.init) ?? "?")</td><td>\(start.nodes.map(String.init) ?? "?")</td>"
                out += "<td>\(escapeHTML(start.blas ?? "?"))</td>"
                out += "<td>\(start.blasThreads.map(String.init) ?? "?")</td></tr>"
            }
            out += "</tbody></table>"
        }
        return out + "</div></div>"
    }

    /// The markers of one run: every checkpoint, start after the first, stop, skipped step and failure.
    static func markers(_ run: RunRecords, name: String?) -> [Chart.Marker] {
        let prefix = name.map { "\($0): " } ?? ""
        var out: [Chart.Marker] = []
        for event in run.events {
            let at = "step \(grouped(event.step))"
            switch event.kind {
            case .checkpoint:
                out.append(.init(kind: "checkpoint", step: event.step, tooltip: "\(prefix)checkpoint at \(at)"))
            case .resume:
                let ranks = event.worldSize.map { "\($0) rank\($0 == 1 ? "" : "s")" } ?? "?"
                out.append(.init(kind: "resume", step: event.step, label: "\(prefix)resumed, \(ranks)",
                                 tooltip: "\(prefix)resumed at \(at) on \(ranks)" + (event.message.map { ": \($0)" } ?? "")))
            case .skip:
                let tooltip = "\(prefix)step \(grouped(event.step)) skipped: non-finite loss or gradient"
                out.append(.init(kind: "skip", step: event.step, tooltip: tooltip))
            case .end where event.state == .stopped:
                out.append(.init(kind: "stop", step: event.step, label: "\(prefix)stopped",
                                 tooltip: "\(prefix)stopped at \(at)" + (event.message.map { ": \($0)" } ?? "")))
            case .end where event.state == .failed:
                out.append(.init(kind: "failure", step: event.step, label: "\(prefix)failed",
                                 tooltip: "\(prefix)failed at \(at)" + (event.message.map { ": \($0)" } ?? "")))
            default:
                break
            }
        }
        return out
    }

    static func legend(_ series: [Chart.Series]) -> String {
        "<figcaption class=\"legend\">" + series.map { s in
            "<span class=\"key\"><svg width=\"26\" height=\"10\"><line x1=\"1\" x2=\"25\" y1=\"5\" y2=\"5\" stroke=\"\(s.color)\" "
                + "stroke-width=\"2.5\"\(s.dotted || s.dashed ? " stroke-dasharray=\"5 3\"" : "")/></svg>\(escapeHTML(s.label))</span>"
        }.joined() + "</figcaption>"
    }

    static let markerLegend = """
        <p class="legend markers"><span class="key"><svg width="14" height="12">\
        <line x1="7" x2="7" y1="0" y2="12" class="m-checkpoint"/></svg>checkpoint</span>\
        <span class="key"><svg width="14" height="12"><line x1="7" x2="7" y1="0" y2="12" class="m-resume"/></svg>resume (with its ranks)</span>\
        <span class="key"><svg width="14" height="12"><line x1="7" x2="7" y1="0" y2="12" class="m-stop"/></svg>stop</span>\
        <span class="key"><svg width="14" height="12"><path d="M7 2 l-5 9 h10 z" class="m-skip"/></svg>skipped step</span>\
        <span class="key"><svg width="14" height="12"><line x1="7" x2="7" y1="0" y2="12" class="m-failure"/></svg>failure</span></p>
        """

    /// Run names as shown: the directory's name, or its path where two runs share a name.
    static func uniqueNames(_ runs: [RunRecords]) -> [String] {
        let names = runs.map(\.name)
        return runs.indices.map { i in names.filter { $0 == names[i] }.count > 1 ? runs[i].directory : names[i] }
    }

    static func lossName(_ runs: [RunRecords]) -> String {
        let lossLines = runs.compactMap { run in
            run.configuration?.split(separator: "\n").first { $0.trimmingCharacters(in: .whitespaces).hasPrefix("loss:") }
        }
        let losses = Set(lossLines
            .map { $0.split(separator: ":").last.map { $0.trimmingCharacters(in: .whitespaces) } ?? "" })
        return losses.count == 1 ? (losses.first == "mse" ? "mean squared error" : "cross-entropy") : "per sample"
    }

    static let style = """
        body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;
        color:#212529;background:#fff;margin:0 auto;max-width:1180px;padding:16px 28px}
        h1{font-size:22px;margin:8px 0 0}h2{font-size:18px;margin:26px 0 8px;border-bottom:1px solid #dee2e6;padding-bottom:4px}
        h3{font-size:15px;margin:18px 0 6px}
        .generated{color:#868e96;margin:2px 0 0;font-size:12px}
        #charts{display:grid;grid-template-columns:1fr 1fr;gap:6px 22px;align-items:end}#charts h2,#charts .markers{grid-column:1/-1}
        figure{margin:0}svg.chart{width:100%;height:auto;display:block}
        .chart .title{font-weight:600;font-size:17px;fill:#212529}.chart text{font-size:15px;fill:#495057;font-variant-numeric:tabular-nums}
        .chart .axis-label{font-size:15px;fill:#343a40}.chart .grid line{stroke:#e9ecef;stroke-width:1}
        .chart .frame{fill:none;stroke:#adb5bd}.chart .series{fill:none;stroke-width:1.8;stroke-linejoin:round}
        .chart .series.dotted{stroke-dasharray:6 4;stroke-width:2}
        .chart .series.dashed{stroke-dasharray:3 3}.chart .empty{font-size:15px;fill:#868e96}
        .marker line{stroke-width:1.3}.chart .marker text{font-size:14px}
        .marker-checkpoint line,.m-checkpoint{stroke:#adb5bd;stroke-dasharray:3 3}.marker-resume line,.m-resume{stroke:#1971c2;stroke-width:2}
        .marker-resume text{fill:#1971c2}.marker-stop line,.m-stop{stroke:#f08c00;stroke-width:2}.marker-stop text{fill:#f08c00}
        .marker-skip path,.m-skip{fill:#e03131}.marker-failure line,.m-failure{stroke:#e03131;stroke-width:2}.marker-failure text{fill:#e03131}
        .legend{font-size:12px;color:#495057;margin:0 0 2px}
        .legend .key{margin-right:14px;white-space:nowrap}.legend svg{vertical-align:middle;margin-right:4px}
        .m-checkpoint,.m-resume,.m-stop,.m-failure{stroke-width:2}
        table{border-collapse:collapse;font-variant-numeric:tabular-nums;font-size:13px}
        th,td{padding:3px 10px;border-bottom:1px solid #e9ecef;text-align:right}
        th:first-child,td:first-child{text-align:left}th{background:#f8f9fa;font-weight:600}
        .result td.state{font-weight:600}.state-finished td.state{color:#2b8a3e}
        .state-failed td.state{color:#e03131}.state-stopped td.state{color:#f08c00}
        tr.message td{color:#495057;font-size:12px;text-align:left}
        .verdict-pass{color:#2b8a3e}.verdict-warn{color:#f08c00}.verdict-fail{color:#e03131;font-weight:600}.failure{color:#e03131}
        .none{color:#868e96}.columns{display:grid;grid-template-columns:1fr 1fr;gap:22px}
        pre{background:#f8f9fa;padding:8px 10px;font-size:12px;overflow-x:auto;border-radius:4px}
        @media (max-width:900px){#charts,.columns{grid-template-columns:1fr}}
        """
}
