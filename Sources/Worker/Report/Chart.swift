import Foundation

/// A line chart over global steps, drawn as inline SVG: no script, no font or file fetched from anywhere, so a
/// report opens offline and on a cluster's login node.
///
/// Readable by construction: ticks at 1, 2 and 5 times a power of ten, thousands separators on steps, units on the
/// axes, a logarithmic y axis when the values span a decade or more (loss falling from 2.3 to 0.02), and at most
/// two points per pixel column, so 100,000 logged steps still make a small file.
struct Chart {
    enum Scale: Equatable { case linear, logarithmic }

    struct Series {
        var label: String
        var points: [(x: Double, y: Double)]
        var color: String
        /// Test results, one per epoch: dashed, every point a dot.
        var dotted = false
        /// Dashed without dots: a second curve of the same run (waiting on communication, beside computing).
        var dashed = false
        /// Steps where the curve starts again instead of joining its last point: resumes on another world size, whose
        /// global steps are counted anew from the samples seen (see `RunRecords.restarts`).
        var breaks: [Double] = []
    }

    /// A vertical line at a step: a checkpoint, a resume, a stop, a skipped step, the end of a failed run.
    struct Marker {
        var kind: String
        var step: Int
        /// Shown beside the line (resumes, stops, failures); checkpoints and skips have only their tooltip.
        var label: String?
        var tooltip: String
    }

    var id: String
    var title: String
    var yLabel: String
    var series: [Series]
    var markers: [Marker] = []
    /// Values of a share (accuracy, time fractions) are drawn as percentages.
    var percent = false
    /// Whether the y axis may start elsewhere than at zero (loss and accuracy: yes; throughput: no).
    var includeZero = false
    /// Log scale where the values allow it and span `logWhenSpanning` or more (nil: always linear).
    var logWhenSpanning: Double? = nil

    // Layout in SVG units (the chart scales to the page's width).
    static let width = 880.0, height = 300.0
    static let left = 84.0, right = 24.0, top = 34.0, bottom = 52.0
    static var plotWidth: Double { width - left - right }
    static var plotHeight: Double { height - top - bottom }
    /// At most this many points per series: two per pixel column (its minimum and maximum).
    static var maxPoints: Int { 2 * Int(plotWidth) }

    var finitePoints: [(x: Double, y: Double)] { series.flatMap { $0.points.filter { $0.x.isFinite && $0.y.isFinite } } }

    var scale: Scale {
        guard let span = logWhenSpanning else { return .linear }
        let ys = series.flatMap { $0.points.map(\.y).filter(\.isFinite) }
        guard let low = ys.min(), let high = ys.max(), low > 0 else { return .linear }
        return high / low >= span ? .logarithmic : .linear
    }

    func svg() -> String {
        let scale = self.scale
        let w = Self.width, h = Self.height, left = Self.left, top = Self.top
        let pw = Self.plotWidth, ph = Self.plotHeight
        var out = "<svg class=\"chart\" id=\"\(id)\" data-scale=\"\(scale == .logarithmic ? "log" : "linear")\" "
            + "viewBox=\"0 0 \(Int(w)) \(Int(h))\" role=\"img\" aria-label=\"\(escapeHTML(title))\" xmlns=\"http://www.w3.org/2000/svg\">\n"
        out += "<text class=\"title\" x=\"\(Int(left))\" y=\"20\">\(escapeHTML(title))</text>\n"
        let points = finitePoints
        let maxStep = max(1, points.map(\.x).max() ?? 0, Double(markers.map(\.step).max() ?? 0))
        // Steps are whole: ticks at least 1 apart (a run of 3 steps had ticks at 0.5 labelled 0 1 1 2 2 3 3).
        let xAxis = Axis.linear(low: 0, high: maxStep, includeZero: true, targetTicks: 8, integral: true)
        let ys = points.map(\.y).filter { scale == .linear || $0 > 0 }
        let yAxis: Axis = scale == .logarithmic
            ? Axis.logarithmic(low: ys.min() ?? 1, high: ys.max() ?? 10)
            : Axis.linear(low: ys.min() ?? 0, high: ys.max() ?? 1, includeZero: includeZero, targetTicks: 6,
                          unitInterval: percent)
        func x(_ step: Double) -> Double { left + pw * (step - xAxis.low) / (xAxis.high - xAxis.low) }
        func y(_ value: Double) -> Double { top + ph * (1 - yAxis.position(value)) }

        // Grid, ticks and their labels.
        out += "<g class=\"grid\">"
        for tick in yAxis.ticks {
            let py = f(y(tick))
            out += "<line x1=\"\(f(left))\" x2=\"\(f(left + pw))\" y1=\"\(py)\" y2=\"\(py)\"/>"
            let label = yAxis.label(tick, percent: percent)
            out += "<text class=\"ytick\" x=\"\(f(left - 8))\" y=\"\(py)\" dy=\"0.32em\" text-anchor=\"end\">\(label)</text>"
        }
        for tick in xAxis.ticks {
            let px = f(x(tick))
            out += "<line x1=\"\(px)\" x2=\"\(px)\" y1=\"\(f(top))\" y2=\"\(f(top + ph))\"/>"
            out += "<text class=\"xtick\" x=\"\(px)\" y=\"\(f(top + ph + 20))\" text-anchor=\"middle\">\(groupedRounded(tick))</text>"
        }
        out += "</g>\n"
        out += "<rect class=\"frame\" x=\"\(f(left))\" y=\"\(f(top))\" width=\"\(f(pw))\" height=\"\(f(ph))\"/>\n"
        out += "<text class=\"axis-label\" x=\"\(f(left + pw / 2))\" y=\"\(f(h - 8))\" text-anchor=\"middle\">global step</text>\n"
        let yTitle = yLabel + (scale == .logarithmic ? ", log scale" : "")
        out += "<text class=\"axis-label\" transform=\"translate(20 \(f(top + ph / 2))) rotate(-90)\" text-anchor=\"middle\">"
            + "\(escapeHTML(yTitle))</text>\n"

        // Markers under the curves.
        for marker in markers {
            let px = f(x(Double(marker.step)))
            out += "<g class=\"marker marker-\(marker.kind)\" data-step=\"\(marker.step)\"><title>\(escapeHTML(marker.tooltip))</title>"
            if marker.kind == "skip" {
                let bottomY = top + ph
                out += "<path d=\"M\(px) \(f(bottomY - 9)) l-5 9 h10 z\"/>"
            } else {
                out += "<line x1=\"\(px)\" x2=\"\(px)\" y1=\"\(f(top))\" y2=\"\(f(top + ph))\"/>"
                if let label = marker.label {
                    out += "<text x=\"\(px)\" y=\"\(f(top - 5))\" text-anchor=\"middle\">\(escapeHTML(label))</text>"
                }
            }
            out += "</g>\n"
        }

        if points.isEmpty {
            out += "<text class=\"empty\" x=\"\(f(left + pw / 2))\" y=\"\(f(top + ph / 2))\" text-anchor=\"middle\">no steps recorded</text>\n"
        }
        for (index, series) in series.enumerated() {
            let usable = series.points.filter { $0.x.isFinite && $0.y.isFinite && (scale == .linear || $0.y > 0) }
            let drawn = Self.decimate(usable, columns: Int(pw), xLow: xAxis.low, xHigh: xAxis.high)
            // A path rather than a polyline, so that the curve can stop at a break and start again after it.
            var path = ""
            for (i, point) in drawn.enumerated() {
                // The earlier process's records end at the break's step, the resumed one's start after it.
                let restarts = i > 0 && series.breaks.contains { drawn[i - 1].x <= $0 && $0 < point.x }
                path += (i == 0 ? "M" : restarts ? " M" : " L") + "\(f(x(point.x))),\(f(y(point.y)))"
            }
            out += "<path class=\"series\(series.dotted ? " dotted" : series.dashed ? " dashed" : "")\" data-series=\"\(escapeHTML(series.label))\" "
                + "data-index=\"\(index)\" data-records=\"\(series.points.count)\" data-points=\"\(drawn.count)\" "
                + "stroke=\"\(series.color)\" d=\"\(path)\"/>\n"
            if series.dotted || drawn.count == 1 {
                out += "<g class=\"dots\" fill=\"\(series.color)\">"
                for point in drawn { out += "<circle cx=\"\(f(x(point.x)))\" cy=\"\(f(y(point.y)))\" r=\"3.2\"/>" }
                out += "</g>\n"
            }
        }
        return out + "</svg>"
    }

    /// Min-max decimation: more points than two per pixel column become each column's lowest and highest point, in
    /// step order, so spikes survive (a plain stride would drop them) and the file stays small. Fewer pass as they are.
    static func decimate(_ points: [(x: Double, y: Double)], columns: Int, xLow: Double, xHigh: Double) -> [(x: Double, y: Double)] {
        guard points.count > 2 * columns, xHigh > xLow else { return points }
        var out: [(x: Double, y: Double)] = []
        out.reserveCapacity(2 * columns)
        // The last step sits on the right edge: it belongs to the last column, not to one of its own.
        func column(_ x: Double) -> Int { min(columns - 1, Int(Double(columns) * (x - xLow) / (xHigh - xLow))) }
        var start = 0
        while start < points.count {
            let current = column(points[start].x)
            var end = start, lowest = start, highest = start
            while end < points.count && column(points[end].x) == current {
                if points[end].y < points[lowest].y { lowest = end }
                if points[end].y > points[highest].y { highest = end }
                end += 1
            }
            out.append(points[min(lowest, highest)])
            if lowest != highest { out.append(points[max(lowest, highest)]) }
            start = end
        }
        return out
    }
}

/// An axis's range, ticks and labels.
struct Axis {
    var low: Double
    var high: Double
    var ticks: [Double]
    var logarithmic = false
    /// Decimals that tell the ticks apart.
    var decimals = 0
    /// Labels in scientific notation (three significant digits): for ranges `linear` cannot step through.
    var scientific = false

    /// Position in 0...1 along the axis.
    func position(_ value: Double) -> Double {
        guard high > low else { return 0.5 }
        return logarithmic ? (log10(value) - log10(low)) / (log10(high) - log10(low)) : (value - low) / (high - low)
    }

    func label(_ value: Double, percent: Bool) -> String {
        if scientific { return String(format: "%.3g", percent ? 100 * value : value) + (percent ? "%" : "") }
        if percent { return String(format: "%.\(max(0, decimals - 2))f%%", 100 * value) }
        if logarithmic { return Self.plain(value) }
        if decimals == 0 && abs(value) >= 1000 { return groupedRounded(value) }
        return String(format: "%.\(decimals)f", value)
    }

    /// 0.001 -> "0.001", 20 -> "20", 5e-6 -> "5e-06": short and exact for the 1-2-5 values of a log axis.
    static func plain(_ value: Double) -> String {
        value >= 1e-4 && value < 1e6 ? (value >= 1000 ? grouped(Int(value.rounded())) : String(format: "%g", value))
            : String(format: "%.0e", value)
    }

    /// A tick spacing of 1, 2 or 5 times a power of ten, about `targetTicks` ticks over the range, and the range
    /// widened to whole ticks.
    /// `integral`: whole-number values (steps), so a tick spacing of at least 1.
    static func linear(low: Double, high: Double, includeZero: Bool, targetTicks: Int, unitInterval: Bool = false,
                       integral: Bool = false) -> Axis {
        var low = includeZero ? min(0, low) : low
        var high = includeZero ? max(0, high) : high
        if unitInterval { low = max(0, low); high = min(1, high) }
        if !(high > low) {
            // One value (a run of one logged step): a range around it.
            let pad = low == 0 ? 1 : abs(low) * 0.1
            low = includeZero && low >= 0 ? 0 : low - pad
            high += pad
            if unitInterval { low = max(0, low); high = min(1, max(high, low + 0.01)) }
        }
        let raw = (high - low) / Double(max(1, targetTicks))
        // A range Double cannot tick in steps: wider than its largest value (losses of -1e308 and 1e308), or so narrow
        // that a step is no normal number (a learning rate of 1e-323). Its two ends alone, in scientific notation.
        guard raw.isNormal, (high - low).isFinite else { return Axis(low: low, high: high, ticks: [low, high], scientific: true) }
        let power = pow(10, floor(log10(raw)))
        let spacing = max(integral ? 1 : 0, [1.0, 2, 5, 10].map { $0 * power }.first { $0 >= raw } ?? 10 * power)
        let first = floor(low / spacing) * spacing
        let last = ceil(high / spacing) * spacing
        let count = Int(((last - first) / spacing).rounded())
        let ticks = (0...count).map { first + Double($0) * spacing }
        let decimals = max(0, Int(-floor(log10(spacing) + 1e-9)))
        return Axis(low: first, high: last, ticks: ticks, decimals: decimals)
    }

    /// Powers of ten over the range (and 2 and 5 times them when it spans less than three decades).
    static func logarithmic(low: Double, high: Double) -> Axis {
        let lowPower = floor(log10(low) + 1e-9), highPower = ceil(log10(high) - 1e-9)
        let top = max(highPower, lowPower + 1)
        var ticks: [Double] = []
        for power in Int(lowPower)...Int(top) {
            let base = pow(10, Double(power))
            ticks.append(base)
            if top - lowPower < 3 && Double(power) < top { ticks += [2 * base, 5 * base] }
        }
        return Axis(low: pow(10, lowPower), high: pow(10, top), ticks: ticks, logarithmic: true)
    }
}

/// SVG coordinates with one decimal: enough for a pixel, and half the bytes of full precision.
private func f(_ value: Double) -> String { String(format: "%.1f", value) }

/// Text for HTML and SVG: the five characters that could end an element or an attribute, escaped.
func escapeHTML(_ text: String) -> String {
    var out = ""
    out.reserveCapacity(text.count)
    for character in text {
        switch character {
        case "&": out += "&amp;"
        case "<": out += "&lt;"
        case ">": out += "&gt;"
        case "\"": out += "&quot;"
        case "'": out += "&#39;"
        default: out.append(character)
        }
    }
    return out
}
