import Engine
import Testing

@Suite("Seeded random generator")
struct RandomTests {
    @Test func matchesTheXoshiroReference() {
        // First outputs of the reference C xoshiro256** from state {1, 2, 3, 4}.
        var g = RandomGenerator(state: (1, 2, 3, 4))
        #expect([g.next(), g.next(), g.next(), g.next()] == [11520, 0, 1_509_978_240, 1_215_971_899_390_074_240])
    }

    @Test func seedsAndStreamsAreReproducibleAndIndependent() {
        var a = RandomGenerator(seed: 42, stream: .shuffle)
        var b = RandomGenerator(seed: 42, stream: .shuffle)
        var c = RandomGenerator(seed: 42, stream: .dropout)
        var d = RandomGenerator(seed: 43, stream: .shuffle)
        let sa = (0..<8).map { _ in a.next() }
        #expect(sa == (0..<8).map { _ in b.next() })
        #expect(sa != (0..<8).map { _ in c.next() })
        #expect(sa != (0..<8).map { _ in d.next() })
        // Saving and restoring the state continues the sequence exactly.
        let saved = RandomGenerator(state: a.state)
        var restored = saved
        #expect((0..<4).map { _ in a.next() } == (0..<4).map { _ in restored.next() })
    }

    @Test func boundedIntegersAndPermutations() {
        var g = RandomGenerator(seed: 1)
        var counts = [Int](repeating: 0, count: 6)
        for _ in 0..<60_000 { counts[g.nextInt(below: 6)] += 1 }
        #expect(counts.allSatisfy { abs($0 - 10_000) < 500 })
        let p = g.permutation(1000)
        #expect(p.sorted() == Array(0..<1000))
        #expect(p != Array(0..<1000))
        var h = RandomGenerator(seed: 1)
        for _ in 0..<60_000 { _ = h.nextInt(below: 6) }
        #expect(h.permutation(1000) == p)
    }

    @Test func normalDrawsHaveUnitVariance() {
        var g = RandomGenerator(seed: 2)
        let xs = (0..<100_000).map { _ in g.nextNormal() }
        let mean = xs.reduce(0, +) / Double(xs.count)
        let variance = xs.map { ($0 - mean) * ($0 - mean) }.reduce(0, +) / Double(xs.count)
        #expect(abs(mean) < 0.02)
        #expect(abs(variance - 1) < 0.02)
        let us = (0..<100_000).map { _ in g.nextUniform() }
        #expect(us.allSatisfy { $0 >= 0 && $0 < 1 })
    }
}

@Suite("BLAS kernel choice")
struct BLASKernelTests {
    @Test func aFallbackOnAModernProcessorGetsBetterKernels() {
        let avx512: Set<String> = ["sse3", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512dq", "avx512vl"]
        #expect(BLASKernels.betterCoreType(current: "Prescott", cpuFlags: avx512) == "SkylakeX")
        #expect(BLASKernels.betterCoreType(current: "Prescott", cpuFlags: ["sse3", "avx", "avx2", "fma"]) == "Haswell")
        #expect(BLASKernels.betterCoreType(current: "Prescott", cpuFlags: ["sse3"]) == nil)
        // A good choice by OpenBLAS stands.
        #expect(BLASKernels.betterCoreType(current: "Haswell", cpuFlags: avx512) == nil)
        #expect(BLASKernels.betterCoreType(current: "SkylakeX", cpuFlags: avx512) == nil)
        #expect(!BLASKernels.coreName.isEmpty)
    }
}
