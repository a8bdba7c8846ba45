import RealModule

/// The engine's pseudo-random number generator: xoshiro256** (Blackman and Vigna, 2018), seeded through
/// SplitMix64 so that any 64-bit seed, including 0, gives a well-mixed state.
///
/// Every random decision in a run (initial weights, the per-epoch shuffle, dropout masks, gradient-check
/// samples) draws from a generator made by `RandomGenerator(seed:stream:)`. Streams are independent sequences
/// for one seed, so adding a draw to one purpose never shifts another: the same seed gives the same run.
/// The state is four words (`state`), saved in checkpoints so a resumed run draws exactly what the
/// uninterrupted one would have.
public struct RandomGenerator: RandomNumberGenerator, Sendable, Equatable {
    /// Well-known stream numbers; any other value works too.
    public enum Stream: UInt64, Sendable {
        case initialization = 1, shuffle = 2, dropout = 3, gradientCheck = 4, augmentation = 5, test = 99
    }

    public private(set) var state: (UInt64, UInt64, UInt64, UInt64)

    public init(seed: UInt64, stream: UInt64 = 0) {
        // SplitMix64 over (seed, stream) fills the four words; it never yields the all-zero state in practice
        // for four consecutive outputs, and the xoshiro paper recommends exactly this seeding.
        // SplitMix64's k-th output from state s is mix(s + (k - 1) * gamma) (`mix` adds the first gamma itself).
        let gamma: UInt64 = 0x9E37_79B9_7F4A_7C15
        let sm = seed ^ (stream &* gamma) ^ 0xD1B5_4A32_D192_ED03
        state = (Self.mix(sm), Self.mix(sm &+ gamma), Self.mix(sm &+ 2 &* gamma), Self.mix(sm &+ 3 &* gamma))
    }

    public init(seed: UInt64, stream: Stream) { self.init(seed: seed, stream: stream.rawValue) }

    /// The stream of one draw keyed by (`purpose`, `epoch`, sample `index`): SplitMix64's finaliser chained over the
    /// purpose's number, the epoch and the index, so distinct keys get unrelated streams (collisions are 2^-64
    /// events). Augmentation and dropout draw per sample this way, so that what a sample gets depends on no rank,
    /// batch or position: N ranks train what one rank trains, and a resume on another world size draws the same.
    @inline(__always)
    public static func stream(_ purpose: Stream, epoch: Int, index: Int) -> UInt64 {
        mix(mix(mix(purpose.rawValue) ^ UInt64(bitPattern: Int64(epoch))) ^ UInt64(bitPattern: Int64(index)))
    }

    /// SplitMix64's finaliser: a bijection of 64-bit words that scatters every input bit over the output.
    @inline(__always)
    public static func mix(_ x: UInt64) -> UInt64 {
        var z = x &+ 0x9E37_79B9_7F4A_7C15
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }

    /// Restores a generator from a saved `state` (checkpoints).
    public init(state: (UInt64, UInt64, UInt64, UInt64)) { self.state = state }

    public static func == (a: RandomGenerator, b: RandomGenerator) -> Bool {
        a.state == b.state
    }

    @inline(__always)
    public mutating func next() -> UInt64 {
        let result = rotl(state.1 &* 5, 7) &* 9
        let t = state.1 << 17
        state.2 ^= state.0
        state.3 ^= state.1
        state.1 ^= state.2
        state.0 ^= state.3
        state.2 ^= t
        state.3 = rotl(state.3, 45)
        return result
    }

    @inline(__always)
    private func rotl(_ x: UInt64, _ k: UInt64) -> UInt64 { (x << k) | (x >> (64 - k)) }

    /// Uniform in [0, 1) with 53 random bits.
    @inline(__always)
    public mutating func nextUniform() -> Double {
        Double(next() >> 11) * 0x1.0p-53
    }

    /// Standard normal by Box-Muller (one value per call; simple and exactly reproducible).
    public mutating func nextNormal() -> Double {
        // 1 - u lies in (0, 1], so the logarithm is finite.
        let u1 = 1.0 - nextUniform()
        let u2 = nextUniform()
        return (-2.0 * Double.log(u1)).squareRoot() * Double.cos(2.0 * Double.pi * u2)
    }

    /// Uniform integer in 0..<bound without modulo bias (Lemire's multiply-shift with rejection).
    public mutating func nextInt(below bound: Int) -> Int {
        precondition(bound > 0, "bound must be positive")
        let b = UInt64(bound)
        var m = next().multipliedFullWidth(by: b)
        if m.low < b {
            let threshold = (0 &- b) % b
            while m.low < threshold { m = next().multipliedFullWidth(by: b) }
        }
        return Int(m.high)
    }

    /// Fisher-Yates shuffle driven by this generator: the same state gives the same permutation on every platform
    /// (unlike `Array.shuffle(using:)`, whose algorithm the standard library does not promise).
    public mutating func shuffle<C: MutableCollection & RandomAccessCollection>(_ items: inout C) where C.Index == Int {
        var i = items.count
        while i > 1 {
            let j = nextInt(below: i)
            i -= 1
            items.swapAt(items.startIndex + i, items.startIndex + j)
        }
    }

    /// A random permutation of 0..<count.
    public mutating func permutation(_ count: Int) -> [Int] {
        var p = Array(0..<count)
        shuffle(&p)
        return p
    }
}

