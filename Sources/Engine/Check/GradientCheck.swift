import Foundation

/// Settings of the finite-difference gradient check.
public struct GradientCheckOptions: Equatable, Sendable {
    /// Step of the two-sided difference. In float64, 1e-4 leaves a truncation error near 1e-9 relative and a
    /// rounding error near 1e-12, well inside the 4 significant digits the check promises.
    public var epsilon: Double = 1e-4
    /// Coordinates sampled from every tensor, one from each of this many equal strata (so a 10-element bias is
    /// checked as carefully as a 200,000-element weight).
    public var samplesPerTensor: Int = 8
    /// Check every coordinate instead of sampling (slow: two forward passes per parameter).
    public var checkAllCoordinates = false
    /// Seeds the coordinate sampling and the random direction.
    public var seed: UInt64 = 0
    /// Relative error at or below which a coordinate passes. Measured in float64 with eps = 1e-4 over every layer
    /// kind (tests "every layer passes the float64 check"), correct gradients agree to 1e-10 to 4e-6: the
    /// truncation error, eps^2 / 6 times the ratio of third to first derivative, of coordinates where that ratio is
    /// large. 1e-5 sits above it.
    public var passThreshold: Double = 1e-5
    /// Relative error at or below which a coordinate only warns; above it fails: the four significant digits the
    /// method promises. A backward pass 0.1% wrong fails.
    public var warnThreshold: Double = 1e-4
    /// Other coordinates tried within a stratum when a sample straddles a ReLU kink.
    public var kinkRetries: Int = 16

    public init() {}

    /// The steps `validate` takes.
    public static let smallestEpsilon = 1e-8, largestEpsilon = 0.1

    public func validate() throws(GradientCheckOptionsError) {
        // The level below which a difference counts as rounding grows as 1 / eps (100 ulp(J) / eps): at 1e-12 it
        // passed a gradient twice too large, at 1e-20 every quotient was NaN. At 1e-8 it is about 1e-6 of a cost near 1.
        guard epsilon >= Self.smallestEpsilon, epsilon <= Self.largestEpsilon else {
            throw GradientCheckOptionsError("gradcheck.eps must be in [1e-8, 0.1], got \(epsilon): below, rounding swallows real "
                + "errors; above, truncation fails correct ones")
        }
        guard samplesPerTensor > 0 else {
            throw GradientCheckOptionsError("gradcheck.samples (samples per tensor) must be positive, got \(samplesPerTensor)")
        }
        guard passThreshold > 0, warnThreshold >= passThreshold else {
            throw GradientCheckOptionsError("gradient check thresholds must satisfy 0 < pass <= warn")
        }
    }
}

public enum CheckVerdict: String, Codable, Sendable, Comparable {
    case pass, warn, fail
    public static func < (a: CheckVerdict, b: CheckVerdict) -> Bool {
        let order: [CheckVerdict] = [.pass, .warn, .fail]
        return order.firstIndex(of: a)! < order.firstIndex(of: b)!
    }
}

/// The result for one parameter tensor.
public struct TensorCheck: Codable, Equatable, Sendable {
    public struct Coordinate: Codable, Equatable, Sendable {
        /// Flat index within the tensor (row-major).
        public var index: Int
        public var analytic: Double
        public var numeric: Double
        public var relativeError: Double
    }
    public var name: String
    public var shape: [Int]
    public var checked: Int
    public var kinksSkipped: Int
    public var maxRelativeError: Double
    public var meanRelativeError: Double
    public var gradientNorm: Double
    /// The coordinate with the largest relative error, with its raw values.
    public var worst: Coordinate?
    public var verdict: CheckVerdict
    /// Why the verdict is what it is, when that is not just the error thresholds.
    public var note: String?
}

/// The random-direction check: (J(theta + eps u) - J(theta - eps u)) / 2 eps against grad . u.
public struct DirectionCheck: Codable, Equatable, Sendable {
    public var analytic: Double
    public var numeric: Double
    public var relativeError: Double
    public var verdict: CheckVerdict
    /// Directions discarded because they crossed a ReLU kink.
    public var kinksSkipped: Int
    /// The step of the difference compared (`FiniteDifferences.step(try:epsilon:)`), or of the last one tried.
    public var epsilon: Double
    /// Set when every direction tried crossed a kink, so nothing was compared.
    public var note: String?
}

extension DirectionCheck {
    /// Reads a report written before directions took smaller steps (an older run's gradcheck.json, which the run
    /// report reads): without `epsilon`, the step was the check's default.
    public init(from decoder: any Decoder) throws {
        let values = try decoder.container(keyedBy: CodingKeys.self)
        analytic = try values.decode(Double.self, forKey: .analytic)
        numeric = try values.decode(Double.self, forKey: .numeric)
        relativeError = try values.decode(Double.self, forKey: .relativeError)
        verdict = try values.decode(CheckVerdict.self, forKey: .verdict)
        kinksSkipped = try values.decode(Int.self, forKey: .kinksSkipped)
        epsilon = try values.decodeIfPresent(Double.self, forKey: .epsilon) ?? GradientCheckOptions().epsilon
        note = try values.decodeIfPresent(String.self, forKey: .note)
    }
}

public struct GradientCheckReport: Codable, Equatable, Sendable {
    public var dtype: String
    public var epsilon: Double
    /// Rows of the check batch on each rank.
    public var batchSize: Int
    /// Whether every rank checked together (J over all ranks' batches), over how many ranks, and the samples of the
    /// global check batch (`batchSize` times `ranks`). One rank checking alone: false, 1, `batchSize`.
    public var distributed: Bool
    public var ranks: Int
    public var samples: Int
    public var loss: Double
    public var parameterCount: Int
    public var deterministic: Bool
    public var tensors: [TensorCheck]
    public var direction: DirectionCheck
    public var forwardPasses: Int
    public var backwardPasses: Int
    public var seconds: Double
    public var verdict: CheckVerdict
    /// One line per problem, naming the tensor.
    public var failures: [String]

    public var passed: Bool { verdict != .fail }

    /// A table for people.
    public var text: String {
        func e(_ x: Double) -> String { String(format: "%.2e", x) }
        var lines: [String] = []
        let batch = distributed
            ? "distributed over \(ranks) rank\(ranks == 1 ? "" : "s"), batch \(batchSize) per rank (\(samples) samples)"
            : "batch \(batchSize)"
        lines.append("gradient check: \(verdict.rawValue.uppercased())  dtype \(dtype), eps \(e(epsilon)), \(batch), "
            + "loss \(String(format: "%.6f", loss)), \(parameterCount) parameters")
        lines.append("  cost: 1 forward+backward and \(forwardPasses) forward passes in \(String(format: "%.2f", seconds)) s")
        let header = ["tensor", "shape", "checked", "kinks", "max rel err", "mean rel err", "grad norm", "verdict"]
        var rows: [[String]] = [header]
        for t in tensors {
            rows.append([t.name, "[" + t.shape.map(String.init).joined(separator: ", ") + "]", "\(t.checked)", "\(t.kinksSkipped)",
                         e(t.maxRelativeError), e(t.meanRelativeError), e(t.gradientNorm), t.verdict.rawValue])
        }
        let widths = (0..<header.count).map { c in rows.map { $0[c].count }.max()! }
        for row in rows {
            lines.append("  " + row.enumerated().map { c, cell in
                c < 2 ? cell.padding(toLength: widths[c], withPad: " ", startingAt: 0)
                      : String(repeating: " ", count: widths[c] - cell.count) + cell
            }.joined(separator: "  "))
        }
        lines.append("  random direction (eps \(e(direction.epsilon))): grad.u \(e(direction.analytic)), "
            + "finite difference \(e(direction.numeric)), rel err \(e(direction.relativeError)) \(direction.verdict.rawValue)"
            + (direction.kinksSkipped > 0 ? " (\(direction.kinksSkipped) directions crossed a kink)" : ""))
        if let note = direction.note { lines.append("  random direction: \(note)") }
        for t in tensors where t.verdict != .pass {
            if let w = t.worst {
                lines.append("  worst in \(t.name): index \(w.index) analytic \(w.analytic) numeric \(w.numeric) rel err \(e(w.relativeError))")
            }
        }
        for f in failures { lines.append("  FAIL: \(f)") }
        return lines.joined(separator: "\n")
    }

    public var json: String {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        encoder.nonConformingFloatEncodingStrategy = .convertToString(
            positiveInfinity: "inf", negativeInfinity: "-inf", nan: "nan")
        return String(decoding: (try? encoder.encode(self)) ?? Data(), as: UTF8.self)
    }
}

/// Relative error |a - n| / max(|a|, |n|, 1e-8).
public func relativeError(_ a: Double, _ n: Double) -> Double {
    abs(a - n) / max(abs(a), abs(n), 1e-8)
}

/// Two-sided finite-difference check of a model's backward pass, in float64.
///
/// Cost: one forward and backward pass, then two forward passes per checked coordinate (plus retries at kinks)
/// and two for the random direction, all on the first `count` rows of the model's input buffer.
/// Dropout is off and batch norm uses the batch's statistics without keeping them (`ForwardMode.check`), so the cost is a
/// deterministic function of the parameters that still couples the samples; this is verified first.
///
/// Distributed (`ranks` given): every rank of a data-parallel job calls this at once, with the same model, options
/// and `count` but its own check batch in the model's input buffer, and `ranks` summing across them. J is then the
/// mean over the ranks of their mean losses, which with `count` rows on every rank is the mean loss over the global
/// check batch: the objective data-parallel training follows (each rank's loss is the mean over its batch, and the
/// gradients are averaged over the ranks). Its analytic gradient is the average of the ranks' gradients: with
/// synchronized batch norm (the model's `crossRankReducer`) each rank's backward pass carries the terms through the
/// global batch statistics, so perturbing one coordinate on every rank checks those cross-rank terms too. Every
/// decision (a kink, a retry, a verdict) is taken from summed values, so every rank takes the same branch and the
/// collectives (the loss sums here and batch norm's inside the passes) stay matched; every rank returns the same
/// report.
public func checkGradients(model: Model<Double>, count: Int, options: GradientCheckOptions = .init(),
                           acrossRanks ranks: CrossRankReducer? = nil) -> GradientCheckReport {
    guard case .finished(let report) = checkGradients(model: model, count: count, options: options, acrossRanks: ranks,
                                                      stopRequested: { false }) else {
        preconditionFailure("a gradient check that nothing can stop stopped")
    }
    return report
}

/// How a check that can be stopped ended: with its report, or stopped before its verdict.
public enum GradientCheckOutcome: Sendable {
    case finished(GradientCheckReport)
    /// `stopRequested` answered true on some rank: every rank stopped after the same coordinate, `coordinates` into
    /// the check, after `seconds`. Nothing is verified: no verdict.
    case stopped(coordinates: Int, forwardPasses: Int, seconds: Double)
}

/// `checkGradients`, asking `stopRequested` after every pair of passes (each coordinate, each retry, each direction):
/// once it answers true on any rank (the answer is summed with the pair's losses, so no collective is added and
/// every rank stops after the same one), the check ends without a verdict. A `gradcheck.all` check of a large model
/// runs for hours; a scheduler's stop must not wait for it.
public func checkGradients(model: Model<Double>, count: Int, options: GradientCheckOptions = .init(),
                           acrossRanks ranks: CrossRankReducer? = nil, stopRequested: @escaping () -> Bool) -> GradientCheckOutcome {
    let start = Date()
    let check = FiniteDifferences(model: model, count: count, options: options, ranks: ranks, stopRequested: stopRequested)
    var failures: [String] = []
    let (loss, deterministic) = check.measureDeterminism(failures: &failures)
    let analytic = check.analyticGradient()
    var generator = RandomGenerator(seed: options.seed, stream: .gradientCheck)
    var tensors: [TensorCheck] = []
    var stopped: GradientCheckOutcome {
        .stopped(coordinates: check.coordinatesCompared, forwardPasses: check.forwardPasses, seconds: Date().timeIntervalSince(start))
    }
    for info in model.parameterTable {
        tensors.append(check.checkTensor(info, analytic: analytic, generator: &generator, failures: &failures))
        if check.stopped { return stopped }
    }
    let direction = check.checkDirection(analytic: analytic, generator: &generator, failures: &failures)
    if check.stopped { return stopped }
    var verdict = max(tensors.map(\.verdict).max() ?? .pass, direction.verdict)
    if !deterministic { verdict = .fail }
    let rankCount = Int(check.ranksTakingPart)
    return .finished(GradientCheckReport(
        dtype: Double.dtypeName, epsilon: options.epsilon, batchSize: count, distributed: ranks != nil, ranks: rankCount,
        samples: count * rankCount, loss: loss,
        parameterCount: model.parameterCount, deterministic: deterministic, tensors: tensors, direction: direction,
        forwardPasses: check.forwardPasses, backwardPasses: 1, seconds: Date().timeIntervalSince(start),
        verdict: verdict, failures: failures))
}

/// The steps of `checkGradients`, over the ranks when `ranks` is given: J at perturbed parameters, the kinks
/// between two passes, and every decision, each taken from values summed over the ranks.
private final class FiniteDifferences {
    let model: Model<Double>
    let count: Int
    let options: GradientCheckOptions
    let ranks: CrossRankReducer?
    let theta: UnsafeMutablePointer<Double>
    var forwardPasses = 0
    /// Asked after every pair of passes; once it is true on any rank, `stopped` is set on every rank.
    let stopRequested: () -> Bool
    private(set) var stopped = false
    /// Pairs of passes compared so far (coordinates, their retries, directions).
    private(set) var coordinatesCompared = 0
    /// Ranks taking part (1 alone), counted by the first collective.
    private(set) var ranksTakingPart = 1.0
    /// Below this, an analytic and a numeric value both are rounding: the difference quotient's rounding error is
    /// about ulp(J) / eps, and a coordinate where both sides are within a hundred times that agrees at rounding level
    /// (a dead unit's weight, a channel that max-pooling never picks). Set from J by `measureDeterminism`.
    private(set) var roundingLevel = 0.0

    init(model: Model<Double>, count: Int, options: GradientCheckOptions, ranks: CrossRankReducer?, stopRequested: @escaping () -> Bool) {
        (self.model, self.count, self.options, self.ranks, self.stopRequested) = (model, count, options, ranks, stopRequested)
        theta = model.parameters.baseAddress!
    }

    /// This rank's J at the current parameters, recomputing layers `fromLayer...` only.
    func cost(fromLayer: Int = 0) -> Double {
        forwardPasses += 1
        return model.forward(count: count, mode: .check, fromLayer: fromLayer).loss
    }

    /// Sums `values` over the ranks (one collective); alone, they are the sums.
    func summed(_ values: [Double]) -> [Double] {
        guard let ranks else { return values }
        var values = values
        values.withUnsafeMutableBufferPointer { ranks.sumAcrossRanks($0) }
        return values
    }

    /// J(theta) twice must agree exactly on every rank, or no difference quotient means anything. The same
    /// collective counts the ranks. Returns J, the mean over the ranks, and whether it was deterministic.
    func measureDeterminism(failures: inout [String]) -> (loss: Double, deterministic: Bool) {
        let localLoss = cost()
        let localAgain = cost()
        let totals = summed([localLoss, localAgain, localLoss.bitPattern == localAgain.bitPattern ? 0 : 1, 1])
        ranksTakingPart = totals[3]
        let loss = totals[0] / totals[3], again = totals[1] / totals[3]
        let deterministic = totals[2] == 0
        if !deterministic {
            failures.append("the cost is not deterministic: J(theta) gave \(loss) then \(again)"
                + (ranks == nil ? "" : " (on \(Int(totals[2])) of \(Int(totals[3])) ranks)"))
        }
        roundingLevel = 100 * max(abs(loss), 1) * Double.ulpOfOne / options.epsilon
        return (loss, deterministic)
    }

    /// The analytic gradient of the mean over the ranks: the ranks' average.
    func analyticGradient() -> [Double] {
        model.zeroGradients()
        model.forward(count: count, mode: .check)
        model.backward(count: count)
        return summed(Array(model.gradients)).map { $0 / ranksTakingPart }
    }

    /// J at theta + eps u and theta - eps u, over every rank, and whether the two passes straddle a kink on any rank,
    /// and whether any rank was asked to stop (`stopped`): one collective for the four.
    func evaluate(plus: () -> Void, minus: () -> Void, restore: () -> Void, fromLayer layer: Int)
        -> (plus: Double, minus: Double, kink: Bool) {
        plus()
        let plusCost = cost(fromLayer: layer)
        let plusPattern = model.kinkPattern(count: count)
        minus()
        let minusCost = cost(fromLayer: layer)
        let minusPattern = model.kinkPattern(count: count)
        restore()
        let sums = summed([plusCost, minusCost, plusPattern == minusPattern ? 0 : 1, stopRequested() ? 1 : 0])
        coordinatesCompared += 1
        if sums[3] > 0 { stopped = true }
        return (sums[0] / ranksTakingPart, sums[1] / ranksTakingPart, sums[2] > 0)
    }

    /// Central difference at coordinate `index` with step `step`; nil when the two evaluations straddle a kink.
    /// Only layers from `layer` on see the change, so only they are recomputed (the layers below keep the
    /// activations of the last full pass at theta).
    func difference(at index: Int, layer: Int, step: Double) -> Double? {
        let saved = theta[index]
        let plusStep = saved + step, minusStep = saved - step
        let (plus, minus, kink) = evaluate(plus: { theta[index] = plusStep }, minus: { theta[index] = minusStep },
                                           restore: { theta[index] = saved }, fromLayer: layer)
        // Divide by the steps actually taken: saved +- eps is rounded to a representable number.
        return kink ? nil : (plus - minus) / (plusStep - minusStep)
    }

    /// What the sampled coordinates of one tensor gave: their relative errors, the worst, the kinks skipped and
    /// the largest finite difference.
    struct Samples {
        var errors: [Double] = []
        var worst: TensorCheck.Coordinate? = nil
        var kinks = 0
        var largestNumeric = 0.0
    }

    /// One coordinate from each stratum of the tensor (every coordinate with `checkAllCoordinates`). A coordinate
    /// that straddles a kink at eps (or disagrees beyond truncation, `refine`) is tried again at eps / 10 and eps / 100
    /// (`step(try:epsilon:)`): in a deep
    /// network a batch norm parameter of an early layer moves every activation after it, and at eps some ReLU input
    /// near zero crosses. On fashion-resnet `1.bias` had 1 of its 8 coordinates checked (119 skipped). Only a
    /// coordinate that straddles at all three steps is skipped, counted, and replaced by another of its stratum.
    func sample(_ info: ParameterInfo, analytic: [Double], generator: inout RandomGenerator) -> Samples {
        // A full pass at theta, so every activation below this tensor's layer is the unperturbed one.
        _ = cost()
        let n = info.count
        let samples = options.checkAllCoordinates ? n : min(options.samplesPerTensor, n)
        var found = Samples()
        for s in 0..<samples where !stopped {
            // Stratum s covers [s n / k, (s + 1) n / k).
            let lower = s * n / samples, upper = (s + 1) * n / samples
            var candidate = options.checkAllCoordinates ? lower : lower + generator.nextInt(below: upper - lower)
            var tries = 0
            while true {
                let a = analytic[info.offset + candidate]
                let compared = compare(analytic: a) { step in
                    difference(at: info.offset + candidate, layer: info.layerIndex, step: step)
                }
                if let (numeric, r) = compared {
                    found.largestNumeric = max(found.largestNumeric, abs(numeric))
                    found.errors.append(r)
                    if found.worst == nil || r > found.worst!.relativeError {
                        found.worst = .init(index: candidate, analytic: a, numeric: numeric, relativeError: r)
                    }
                    break
                }
                found.kinks += 1
                tries += 1
                if tries > options.kinkRetries || upper - lower == 1 || stopped { break }
                candidate = lower + generator.nextInt(below: upper - lower)
            }
        }
        return found
    }

    /// The verdict on one tensor from its samples, with a note (and a failure line) when the error thresholds
    /// alone do not explain it.
    func checkTensor(_ info: ParameterInfo, analytic: [Double], generator: inout RandomGenerator,
                     failures: inout [String]) -> TensorCheck {
        let found = sample(info, analytic: analytic, generator: &generator)
        let errors = found.errors
        let gradient = analytic[info.range]
        let norm = gradient.reduce(0) { $0 + $1 * $1 }.squareRoot()
        let maxError = errors.max() ?? 0
        var verdict: CheckVerdict = maxError <= options.passThreshold ? .pass : maxError <= options.warnThreshold ? .warn : .fail
        var note: String? = nil
        let atRounding = !errors.isEmpty && found.largestNumeric <= roundingLevel && gradient.allSatisfy { abs($0) <= roundingLevel }
        if atRounding {
            // Mathematically zero: the cost does not depend on the tensor, e.g. a bias right before a normalisation
            // layer, whose mean it removes, or units saturated on the check batch (finite differences exactly 0 too:
            // that was failed as a missing write). Not a backpropagation bug, but worth knowing. A missing write shows
            // as a zero gradient against finite differences above rounding, below.
            verdict = .warn
            note = "neither the gradient nor finite differences rise above rounding: the cost does not depend on this "
                + "tensor on the check batch (a bias right before batch or layer norm, which removes it? use 'conv ... nobias'; "
                + "or units saturated there)"
        } else if gradient.allSatisfy({ $0 == 0 }) {
            verdict = .fail
            note = "gradient is identically zero on the check batch: the tensor does not influence the cost (a missing backward write?)"
            failures.append("\(info.name): \(note!)")
        } else if errors.isEmpty {
            verdict = .warn
            note = "every sampled coordinate straddled a kink; none could be checked"
        } else if verdict == .fail, let w = found.worst {
            failures.append("\(info.name) \(info.shape): relative error \(String(format: "%.2e", w.relativeError)) "
                + "at index \(w.index) (analytic \(w.analytic), numeric \(w.numeric))")
        }
        return TensorCheck(
            name: info.name, shape: info.shape, checked: errors.count, kinksSkipped: found.kinks,
            maxRelativeError: maxError, meanRelativeError: errors.isEmpty ? 0 : errors.reduce(0, +) / Double(errors.count),
            gradientNorm: norm, worst: found.worst, verdict: verdict, note: note)
    }

    /// The numeric value and relative error of one coordinate's comparison, nil when every step straddles a kink:
    /// `difference(step)` is the quotient at that step, nil at a kink. A kink between the two passes moves on to the
    /// next step, down to eps / 100 (`step(try:epsilon:)`); the first quotient compared is then `refined`.
    func compare(analytic: Double, difference: (Double) -> Double?) -> (numeric: Double, relativeError: Double)? {
        for attempt in 0..<Self.steps {
            guard let numeric = difference(Self.step(try: attempt, epsilon: options.epsilon)) else { continue }
            let refined = refine(analytic: analytic, numeric: numeric, at: attempt, difference: difference)
            return (refined.numeric, refined.relativeError)
        }
        return nil
    }

    /// A quotient `numeric` taken at attempt `first` (a coordinate's or the random direction's), measured again at the
    /// smaller steps while its error is above the pass threshold: the truncation error of a two-sided difference falls
    /// with the step squared, and a wrong backward pass does not. With `gradcheck.all` on an MLP with batch norm over a
    /// check batch of 4, a correct coordinate of 2.4e-6 (next to a tensor norm of 43) was 7e-10 off at eps, 2.8e-4
    /// relative: failed. At eps / 10 it agrees to 3e-6.
    ///
    /// A smaller step's error stands only where the discrepancy itself shrank, by `truncationShrink` at least:
    /// truncation shrinks a hundredfold at a tenth of the step, a wrong gradient not at all. Taking the smallest error
    /// of any step passed wrong ones: at eps / 100 the rounding level is a hundred times eps's, and a coordinate of
    /// 7.6e-6 made 0.1% wrong fell within it there (tested).
    func refine(analytic: Double, numeric: Double, at first: Int, difference: (Double) -> Double?)
        -> (numeric: Double, relativeError: Double, step: Double) {
        let firstStep = Self.step(try: first, epsilon: options.epsilon)
        var best = (numeric: numeric, relativeError: comparisonError(analytic, numeric, step: firstStep), step: firstStep)
        let discrepancy = abs(analytic - numeric)
        for attempt in (first + 1)..<max(first + 1, Self.steps) where best.relativeError > options.passThreshold {
            let step = Self.step(try: attempt, epsilon: options.epsilon)
            guard let smaller = difference(step), abs(analytic - smaller) <= discrepancy / Self.truncationShrink else { continue }
            let error = comparisonError(analytic, smaller, step: step)
            if error < best.relativeError { best = (smaller, error, step) }
        }
        return best
    }

    /// How much a discrepancy must shrink at a smaller step to count as truncation: 20, where truncation gives 100 at
    /// a tenth of the step (10,000 at a hundredth) and rounding grows tenfold.
    static let truncationShrink = 20.0

    /// The step of a difference's `attempt`-th try (from 0): eps, then eps / 10, then eps / 100 (`steps` of them).
    /// A coordinate is tried again at the smaller steps where it straddles a kink, and so is each new random
    /// direction. A direction moves every parameter, so in a network of many ReLUs and max pools some activation
    /// close to its kink crosses it at eps: on fashion-resnet the first direction crosses a ReLU input within 1e-6
    /// of zero, and the second, at eps / 10, is compared. The chance falls with the step. Within float64, eps / 100
    /// still leaves the difference's rounding near 1e-8 relative, well inside the pass threshold.
    static func step(try attempt: Int, epsilon: Double) -> Double {
        epsilon * [1, 0.1, 0.01][min(attempt, steps - 1)]
    }
    static let steps = 3

    /// The relative error of a difference quotient with step `step` against the analytic value, 0 where both are
    /// rounding. A difference within the quotient's rounding error (`roundingLevel` at eps, growing as the step
    /// shrinks) counts as no more than the pass threshold: it can be a visible part of a small gradient without
    /// saying anything about backpropagation. With `gradcheck.all` a correct convolution's coordinates of 2e-8 (next
    /// to a tensor norm of 1) were 3e-11 off at eps, truncation far below that level, and failed at 1e-3 relative.
    func comparisonError(_ analytic: Double, _ numeric: Double, step: Double) -> Double {
        let level = roundingLevel * options.epsilon / step
        if max(abs(analytic), abs(numeric)) <= level { return 0 }
        let error = relativeError(analytic, numeric)
        return abs(analytic - numeric) <= level ? min(error, options.passThreshold) : error
    }

    /// Random direction over the whole flat vector: touches every parameter with two forward passes.
    func checkDirection(analytic: [Double], generator: inout RandomGenerator, failures: inout [String]) -> DirectionCheck {
        let original = Array(model.parameters)
        var direction = DirectionCheck(
            analytic: 0, numeric: 0, relativeError: 0, verdict: .warn, kinksSkipped: 0, epsilon: options.epsilon,
            note: "every random direction crossed a kink; the direction check compared nothing")
        for attempt in 0...options.kinkRetries where !stopped {
            let u = randomSigns(generator: &generator)
            let theta = theta
            // The quotient along u at `epsilon`, nil at a kink.
            func along(_ epsilon: Double) -> Double? {
                let (plus, minus, kink) = evaluate(
                    plus: { for i in u.indices { theta[i] = original[i] + epsilon * u[i] } },
                    minus: { for i in u.indices { theta[i] = original[i] - epsilon * u[i] } },
                    restore: { for i in u.indices { theta[i] = original[i] } }, fromLayer: 0)
                return kink ? nil : (plus - minus) / (2 * epsilon)
            }
            let epsilon = Self.step(try: attempt, epsilon: options.epsilon)
            direction.epsilon = epsilon
            guard let numeric = along(epsilon) else {
                direction.kinksSkipped += 1
                continue
            }
            direction.analytic = zip(analytic, u).reduce(0) { $0 + $1.0 * $1.1 }
            // Above the pass threshold: the same direction at the smaller steps too (`refine`).
            (direction.numeric, direction.relativeError, direction.epsilon) =
                refine(analytic: direction.analytic, numeric: numeric, at: attempt, difference: along)
            direction.note = nil
            direction.verdict = direction.relativeError <= options.passThreshold ? .pass
                : direction.relativeError <= options.warnThreshold ? .warn : .fail
            if direction.verdict == .fail {
                failures.append("random direction: grad.u \(direction.analytic) but finite difference \(direction.numeric)")
            }
            break
        }
        return direction
    }

    /// A random unit vector with entries +-1/sqrt(n) (Rademacher): one random bit per parameter instead of a
    /// Gaussian draw (measured: the Gaussian draws were most of the check's cost on a 535,818-parameter model), and
    /// every parameter moves by the same amount, so none is left out by a small component.
    func randomSigns(generator: inout RandomGenerator) -> [Double] {
        let n = model.parameterCount
        let magnitude = 1 / Double(n).squareRoot()
        var u = [Double](repeating: 0, count: n)
        var bits: UInt64 = 0
        for i in 0..<n {
            if i % 64 == 0 { bits = generator.next() }
            u[i] = (bits & 1) == 0 ? magnitude : -magnitude
            bits >>= 1
        }
        return u
    }
}

extension Model {
    /// A float64 copy of this model for gradient checking: same architecture, parameters and test fault,
    /// with room for `batchCapacity` rows, its batch norm summing across ranks through `crossRankReducer` (nil: alone).
    public func float64Copy(batchCapacity: Int, crossRankReducer: CrossRankReducer? = nil) -> Model<Double> {
        // The architecture was validated when this model was made, so this cannot throw.
        let copy = try! Model<Double>(spec: spec, batchCapacity: batchCapacity, crossRankReducer: crossRankReducer)
        copyParameters(to: copy)
        copy.installGradientFault(gradientFault)
        copy.targetsFromLabels = targetsFromLabels
        return copy
    }
}

/// Gradient-check settings that cannot work (eps outside (0, 1), no samples, thresholds out of order).
public struct GradientCheckOptionsError: Error, CustomStringConvertible, Equatable {
    public let description: String
    public init(_ description: String) { self.description = description }
}
