import Engine
import Foundation
import Testing

/// `data.augment`: crops, flips and erasing against NumPy on the same draws, and draws that depend on (seed, epoch,
/// index) alone.
@Suite("Augmentation")
struct AugmentationTests {
    func gathered<T: BinaryFloatingPoint>(_ data: Dataset, _ indices: [Int], as: T.Type, augmentation: Augmentation?,
                                          epoch: Int) -> [T] {
        var inputs = [T](repeating: -12345, count: indices.count * data.featureCount)
        var labels = [Int32](repeating: -1, count: indices.count)
        indices.withUnsafeBufferPointer { idx in
            try! data.gather(indices: idx, into: &inputs, labels: &labels, augmentation: augmentation, epoch: epoch)
        }
        #expect(labels == indices.map { data.labels[$0] })
        return inputs
    }

    func floats(_ path: String) throws -> [Float] {
        guard case let .float32(values) = try NPY.read(path: path).storage else { throw AugmentationError(description: "\(path): not float32") }
        return values
    }

    func doubles(_ path: String) throws -> [Double] {
        guard case let .float64(values) = try NPY.read(path: path).storage else { throw AugmentationError(description: "\(path): not float64") }
        return values
    }

    /// NumPy pads the stored images with zeros (np.pad), slices the drawn window, mirrors it with [..., ::-1],
    /// normalises in float64 and sets the erased rectangle to 0: bpworker's gathered batch must be exactly that, in
    /// Float and in Double, for bytes [C, H, W] and for floats [H, W] (non-square, so rows and columns cannot be
    /// confused).
    @Test(arguments: [("uint8", [2, 5, 7]), ("float32", [5, 7])])
    func cropsAndFlipsMatchNumPy(dtype: String, shape: [Int]) throws {
        let dir = try TemporaryDirectory()
        let samples = 40
        _ = try runPython("""
            import sys, numpy as np
            d, dtype, shape = sys.argv[1], sys.argv[2], [int(s) for s in sys.argv[3].split(",")]
            rng = np.random.default_rng(5)
            x = rng.integers(1, 256, [\(samples)] + shape) if dtype == "uint8" else rng.normal(3, 2, [\(samples)] + shape)
            np.save(d + "/x.npy", x.astype(dtype))
            np.save(d + "/y.npy", rng.integers(0, 3, \(samples)).astype(np.uint8))
            """, arguments: [dir.path, dtype, shape.map(String.init).joined(separator: ",")])
        var data = try Dataset.loadNPY(features: dir.file("x.npy"), labels: dir.file("y.npy"))
        try data.standardize()
        let augmentation = try Augmentation(cropPadding: 2, flip: true, erase: 0.5, seed: 11, sampleShape: shape)
        let indices = Array(0..<samples).reversed() + [3, 3, 17]  // a sample twice in a batch is augmented the same way twice
        let epoch = 6
        let draws = indices.map { augmentation.draw(epoch: epoch, index: $0) }
        // The batch exercises both flips and both extreme offsets, so an off-by-one at either edge shows.
        try #require(draws.contains { $0.flip } && draws.contains { !$0.flip })
        try #require(draws.contains { $0.top == 0 } && draws.contains { $0.top == 4 } && draws.contains { $0.left == 0 }
                     && draws.contains { $0.left == 4 })
        // Erased and whole samples, and rectangles at the bottom and right edges.
        try #require(draws.contains { $0.eraseHeight > 0 } && draws.contains { $0.eraseHeight == 0 })
        try #require(draws.contains { $0.eraseHeight > 0 && $0.eraseTop + $0.eraseHeight == shape[shape.count - 2] }
                     && draws.contains { $0.eraseWidth > 0 && $0.eraseLeft + $0.eraseWidth == shape[shape.count - 1] })
        let drawText = zip(indices, draws).map {
            "\($0):\($1.top):\($1.left):\($1.flip ? 1 : 0):\($1.eraseTop):\($1.eraseLeft):\($1.eraseHeight):\($1.eraseWidth)"
        }.joined(separator: ",")
        _ = try runPython("""
            import sys, numpy as np
            d, scale, shift, padding = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
            x = np.load(d + "/x.npy")
            images = x.reshape(x.shape[0], -1, x.shape[-2], x.shape[-1]).astype(np.float64)  # [N, C, H, W]
            h, w = images.shape[2:]
            padded = np.pad(images, ((0, 0), (0, 0), (padding, padding), (padding, padding)))  # zeros, as stored
            rows = []
            for item in sys.argv[5].split(","):
                index, top, left, flip, etop, eleft, eh, ew = map(int, item.split(":"))
                window = padded[index, :, top:top + h, left:left + w]
                window = (window[:, :, ::-1] if flip else window) * scale + shift
                window[:, etop:etop + eh, eleft:eleft + ew] = 0  # after normalising, as RandomErasing(value=0)
                rows.append(window.reshape(-1))
            expected = np.stack(rows)
            np.save(d + "/expected64.npy", expected)
            np.save(d + "/expected32.npy", expected.astype(np.float32))
            """, arguments: [dir.path, "\(data.scale)", "\(data.shift)", "2", drawText])
        let float32 = gathered(data, indices, as: Float.self, augmentation: augmentation, epoch: epoch)
        let float64 = gathered(data, indices, as: Double.self, augmentation: augmentation, epoch: epoch)
        let expected32 = try floats(dir.file("expected32.npy")), expected64 = try doubles(dir.file("expected64.npy"))
        // The same float64 arithmetic on both sides, rounded once to Float: equal bit for bit.
        #expect(float32.count == expected32.count && float64.count == expected64.count)
        let difference32 = zip(float32, expected32).enumerated().first { $0.element.0 != $0.element.1 }
        let difference64 = zip(float64, expected64).enumerated().first { $0.element.0 != $0.element.1 }
        #expect(difference32 == nil, "Float: first difference at \(String(describing: difference32)) of [batch, C, H, W] \(indices.count) x \(shape)")
        #expect(difference64 == nil, "Double: first difference at \(String(describing: difference64))")
        // Without augmentation the same gather is the plain one: nothing leaks into evaluation batches. And the crop
        // code with no padding and no flip gathers exactly what the plain gather does.
        let plain = gathered(data, indices, as: Float.self, augmentation: nil, epoch: epoch)
        let identity = try Augmentation(cropPadding: 0, flip: false, seed: 11, sampleShape: shape)
        #expect(gathered(data, indices, as: Float.self, augmentation: identity, epoch: epoch) == plain)
        #expect(plain != float32)
    }

    /// What makes N ranks equal one rank: a sample's augmentation is a function of (seed, epoch, index), whoever
    /// gathers it in whatever position of whatever batch.
    @Test func drawsDependOnSeedEpochAndIndexAlone() throws {
        let shape = [3, 4]
        let pixels: [UInt8] = (0..<72).map { (i: Int) -> UInt8 in UInt8(i * 3 % 251 + 1) }
        let data = try Dataset(name: "images", featureCount: 12, sampleShape: shape, features: .uint8(pixels), labels: [0, 1, 2, 0, 1, 2])
        let a = try Augmentation(cropPadding: 1, flip: true, erase: 0.5, seed: 3, sampleShape: shape)
        let again = try Augmentation(cropPadding: 1, flip: true, erase: 0.5, seed: 3, sampleShape: shape)
        for epoch in 0..<3 {
            for index in 0..<6 { #expect(a.draw(epoch: epoch, index: index) == again.draw(epoch: epoch, index: index)) }
            // Batch position and neighbours do not matter: one batch, the same batch reversed, one sample at a time.
            let forward = gathered(data, [0, 1, 2, 3, 4, 5], as: Float.self, augmentation: a, epoch: epoch)
            let backward = gathered(data, [5, 4, 3, 2, 1, 0], as: Float.self, augmentation: again, epoch: epoch)
            for row in 0..<6 {
                let alone: [Float] = gathered(data, [row], as: Float.self, augmentation: a, epoch: epoch)
                let inForward: [Float] = Array(forward[(row * 12)..<((row + 1) * 12)])
                let reversedRow = 5 - row
                let inBackward: [Float] = Array(backward[(reversedRow * 12)..<((reversedRow + 1) * 12)])
                #expect(inForward == alone)
                #expect(inBackward == alone)
            }
        }
        // Every epoch and every seed draws anew.
        let other = try Augmentation(cropPadding: 1, flip: true, seed: 4, sampleShape: shape)
        let draws = (0..<200).map { a.draw(epoch: 0, index: $0) }
        #expect(draws != (0..<200).map { a.draw(epoch: 1, index: $0) })
        #expect(draws != (0..<200).map { other.draw(epoch: 0, index: $0) })
    }

    /// Each random field on its own depends on the seed, the epoch and the index: another value of any one of the
    /// three redraws the top, the left and the flip as independent draws would, so each differs from its first draw
    /// with probability 1 - 1/(2P + 1) (the offsets) or 1/2 (the flip). Comparing whole draws is not enough: a flip
    /// drawn without the epoch repeats every epoch while the crops still change.
    @Test func eachFieldDependsOnSeedEpochAndIndex() throws {
        let a = try Augmentation(cropPadding: 2, flip: true, erase: 0.5, seed: 3, sampleShape: [28, 28])
        let otherSeed = try Augmentation(cropPadding: 2, flip: true, erase: 0.5, seed: 4, sampleShape: [28, 28])
        let n = 4000
        // Whether a sample is erased differs with probability 2 p (1 - p) = 1/2; the rectangle (none counting as one)
        // with 1 - 1/4 less the rare equal pair, about 0.745.
        let fields: [(name: String, value: (Augmentation.Draw) -> Int, differs: Double)] = [
            ("top", { $0.top }, 0.8), ("left", { $0.left }, 0.8), ("flip", { $0.flip ? 1 : 0 }, 0.5),
            ("erased", { $0.eraseHeight > 0 ? 1 : 0 }, 0.5),
            ("erased rectangle", { (($0.eraseTop * 32 + $0.eraseLeft) * 32 + $0.eraseHeight) * 32 + $0.eraseWidth }, 0.745),
        ]
        // Epochs 5 and 6, not 0: a field drawn as if in epoch 0 must not pass by comparing epoch 0 with itself.
        let variations: [(name: String, pair: (Int) -> (Augmentation.Draw, Augmentation.Draw))] = [
            ("epoch", { (a.draw(epoch: 5, index: $0), a.draw(epoch: 6, index: $0)) }),
            ("seed", { (a.draw(epoch: 5, index: $0), otherSeed.draw(epoch: 5, index: $0)) }),
            ("index", { (a.draw(epoch: 5, index: $0), a.draw(epoch: 5, index: $0 + n)) }),
        ]
        for field in fields {
            for variation in variations {
                let differing = (0..<n).filter { let (x, y) = variation.pair($0); return field.value(x) != field.value(y) }.count
                // Binomial standard deviations: 25 (p = 0.8) and 32 (p = 0.5); a fixed seed, so the counts never change.
                let deviation = (Double(n) * field.differs * (1 - field.differs)).squareRoot()
                #expect(abs(Double(differing) - Double(n) * field.differs) < 5 * deviation,
                        "\(field.name) with another \(variation.name): \(differing) of \(n) differ")
            }
        }
    }

    /// Offsets uniform over 0...2P, flips fair and the three independent, over many samples (a fixed seed: the counts
    /// are the same every run).
    @Test func drawsAreUniform() throws {
        let augmentation = try Augmentation(cropPadding: 2, flip: true, seed: 0, sampleShape: [28, 28])
        var tops = [Int](repeating: 0, count: 5), lefts = [Int](repeating: 0, count: 5), flips = 0
        var joint = [Int](repeating: 0, count: 50)
        let n = 20_000
        for index in 0..<n {
            let draw = augmentation.draw(epoch: 2, index: index)
            tops[draw.top] += 1
            lefts[draw.left] += 1
            flips += draw.flip ? 1 : 0
            joint[(draw.top * 5 + draw.left) * 2 + (draw.flip ? 1 : 0)] += 1
        }
        // Binomial standard deviations: 57 for an offset count of 4000, 71 for 10000 flips; 5 of them is a wide margin.
        #expect(tops.allSatisfy { abs($0 - n / 5) < 300 } && lefts.allSatisfy { abs($0 - n / 5) < 300 }, "\(tops) \(lefts)")
        #expect(abs(flips - n / 2) < 360, "\(flips)")
        // The three fields are independent: each (top, left, flip) of the 50 comes up about n / 50 = 400 times
        // (standard deviation 20).
        #expect(joint.allSatisfy { abs($0 - n / 50) < 100 }, "\(joint)")
        let noFlip = try Augmentation(cropPadding: 0, flip: false, seed: 0, sampleShape: [28, 28])
        #expect((0..<1000).allSatisfy { noFlip.draw(epoch: 0, index: $0) == .init(top: 0, left: 0, flip: false) })
    }

    /// Erasing as torchvision draws it: about a share p of the samples, each rectangle inside the image with an area
    /// of 2 to 33% of it and a height / width ratio in 0.3...3.3 (both up to the rounding of the sides), the areas
    /// spread over that range; and turning erasing on leaves every crop and flip as it was.
    @Test func erasingDrawsLikeRandomErasing() throws {
        let (height, width) = (28, 20)
        let erasing = try Augmentation(cropPadding: 2, flip: true, erase: 0.3, seed: 5, sampleShape: [height, width])
        let plain = try Augmentation(cropPadding: 2, flip: true, seed: 5, sampleShape: [height, width])
        let n = 20_000
        var erased = 0, smallAreas = 0, largeAreas = 0, tall = 0
        for index in 0..<n {
            let d = erasing.draw(epoch: 1, index: index), p = plain.draw(epoch: 1, index: index)
            #expect(d.top == p.top && d.left == p.left && d.flip == p.flip)
            guard d.eraseHeight > 0 else { continue }
            erased += 1
            #expect(d.eraseTop >= 0 && d.eraseTop + d.eraseHeight <= height && d.eraseLeft >= 0 && d.eraseLeft + d.eraseWidth <= width)
            let (h, w) = (Double(d.eraseHeight), Double(d.eraseWidth))
            // Rounding moves each side by at most 1/2.
            #expect((h - 0.5) * (w - 0.5) <= 0.33 * Double(height * width) && (h + 0.5) * (w + 0.5) >= 0.02 * Double(height * width),
                    "\(d)")
            #expect((h - 0.5) / (w + 0.5) <= 3.3 && (h + 0.5) / (w - 0.5) >= 0.3, "\(d)")
            let share = h * w / Double(height * width)
            smallAreas += share < 0.1 ? 1 : 0
            largeAreas += share > 0.25 ? 1 : 0
            tall += h > w ? 1 : 0
        }
        // Binomial standard deviation 65 around 6000; the areas and shapes spread over their ranges.
        #expect(abs(erased - 6000) < 325, "\(erased) of \(n) erased")
        #expect(smallAreas > erased / 10 && largeAreas > erased / 20 && tall > erased / 4 && tall < 3 * erased / 4,
                "\(smallAreas) small, \(largeAreas) large, \(tall) taller than wide of \(erased)")
        let always = try Augmentation(cropPadding: 0, flip: false, erase: 1, seed: 5, sampleShape: [height, width])
        #expect((0..<1000).allSatisfy { always.draw(epoch: 0, index: $0).eraseHeight > 0 })
        #expect(throws: AugmentationError(description: "erase must be a probability in [0, 1] (0 = off), got 1.5")) {
            try Augmentation(cropPadding: 0, flip: false, erase: 1.5, seed: 0, sampleShape: [28, 28])
        }
    }

    @Test func onlyImagesWithAPaddingSmallerThanThemselves() {
        #expect(throws: AugmentationError(description: "random crops, flips and erasing need image samples [H, W] or [C, H, W], but the samples are [12]")) {
            try Augmentation(cropPadding: 2, flip: false, seed: 0, sampleShape: [12])
        }
        #expect(throws: AugmentationError(description: "crop_padding must be >= 0 (0 = no cropping), got -1")) {
            try Augmentation(cropPadding: -1, flip: false, seed: 0, sampleShape: [28, 28])
        }
        #expect(throws: AugmentationError(description: "crop_padding 5 must be smaller than the images' 5x9, or a crop could hold no pixel of the image")) {
            try Augmentation(cropPadding: 5, flip: true, seed: 0, sampleShape: [3, 5, 9])
        }
        #expect(throws: Never.self) { try Augmentation(cropPadding: 4, flip: true, seed: 0, sampleShape: [3, 5, 9]) }
    }
}
