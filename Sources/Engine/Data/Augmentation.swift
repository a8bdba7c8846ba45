import RealModule

/// Random crop after zero padding, random horizontal flip and random erasing of image samples: torchvision's
/// `RandomCrop((H, W), padding=P)`, `RandomHorizontalFlip()`, then `Normalize` and
/// `RandomErasing(p, scale=(0.02, 0.33), ratio=(0.3, 3.3), value=0)`, applied while a training batch is gathered
/// (so the crop's padding is the stored value 0, a black pixel, normalised like every other, and an erased
/// rectangle is 0 in the model's input: the training set's mean under `standardize`).
///
/// A sample's draw depends on (seed, epoch, sample index) alone, never on the rank, the step or the position in
/// the batch: whichever rank gathers a sample augments it the same way, so N ranks with batch b still see exactly
/// the batches one rank with batch N·b sees, and a resumed run draws what the uninterrupted one drew. (With
/// `data.remainder=wrap` a sample that appears twice in one epoch is augmented the same way both times.)
///
/// Shapes: C = channels, H = height, W = width; a sample is [C, H, W] (C order), an [H, W] sample is one channel.
public struct Augmentation: Sendable, Equatable {
    /// P: zeros added on every side before a window of H x W is cropped. 0 = no cropping.
    public let cropPadding: Int
    /// Mirror left-right with probability 1/2.
    public let flip: Bool
    /// The probability of erasing one rectangle of the (cropped, flipped) sample, in every channel. 0 = off.
    public let erase: Double
    public let seed: UInt64
    public let channels: Int
    public let height: Int
    public let width: Int

    /// One sample's augmentation: the window's top-left corner in the padded image ([H + 2P, W + 2P]), each in 0...2P
    /// (P, P is the image itself), whether the window is mirrored, and the erased rectangle of the result (rows
    /// `eraseTop ..< eraseTop + eraseHeight`, columns likewise; height 0 = nothing erased).
    public struct Draw: Sendable, Equatable {
        public let top: Int
        public let left: Int
        public let flip: Bool
        public var eraseTop = 0, eraseLeft = 0, eraseHeight = 0, eraseWidth = 0
        public init(top: Int, left: Int, flip: Bool) {
            self.top = top
            self.left = left
            self.flip = flip
        }
    }

    /// torchvision's RandomErasing defaults: the erased area is a share of the image drawn from `eraseScale`, its
    /// aspect ratio (height / width) log-uniform in `eraseRatio`, and up to 10 attempts to fit it in the image.
    public static let eraseScale = 0.02...0.33
    public static let eraseRatio = 0.3...3.3

    /// - Parameter sampleShape: one sample as stored, [H, W] or [C, H, W]; anything else is not an image.
    public init(cropPadding: Int, flip: Bool, erase: Double = 0, seed: UInt64, sampleShape: [Int]) throws(AugmentationError) {
        let image: [Int]
        switch sampleShape.count {
        case 2: image = [1] + sampleShape
        case 3: image = sampleShape
        default:
            throw AugmentationError(description: "random crops, flips and erasing need image samples [H, W] or [C, H, W], "
                + "but the samples are \(sampleShape)")
        }
        guard cropPadding >= 0 else {
            throw AugmentationError(description: "crop_padding must be >= 0 (0 = no cropping), got \(cropPadding)")
        }
        guard cropPadding < image[1] && cropPadding < image[2] else {
            throw AugmentationError(description: "crop_padding \(cropPadding) must be smaller than the images' "
                + "\(image[1])x\(image[2]), or a crop could hold no pixel of the image")
        }
        guard erase >= 0, erase <= 1 else {
            throw AugmentationError(description: "erase must be a probability in [0, 1] (0 = off), got \(erase)")
        }
        self.cropPadding = cropPadding
        self.flip = flip
        self.erase = erase
        self.seed = seed
        (channels, height, width) = (image[0], image[1], image[2])
    }

    /// The draw of sample `index` in `epoch`: a generator of its own, seeded from (seed, epoch, index), so no state
    /// is kept between samples and nothing depends on who gathers them.
    @inline(__always)
    public func draw(epoch: Int, index: Int) -> Draw {
        var generator = RandomGenerator(seed: seed, stream: Self.stream(epoch: epoch, index: index))
        let span = 2 * cropPadding + 1
        let top = generator.nextInt(below: span)
        let left = generator.nextInt(below: span)
        let mirrored = flip && generator.next() >> 63 == 1
        var draw = Draw(top: top, left: left, flip: mirrored)
        // Drawn after the crop and the flip, so turning erasing on changes neither.
        guard erase > 0, generator.nextUniform() < erase else { return draw }
        let area = Double(height * width)
        let (logLow, logHigh) = (Double.log(Self.eraseRatio.lowerBound), Double.log(Self.eraseRatio.upperBound))
        for _ in 0..<10 {
            let target = area * (Self.eraseScale.lowerBound
                + (Self.eraseScale.upperBound - Self.eraseScale.lowerBound) * generator.nextUniform())
            let ratio = Double.exp(logLow + (logHigh - logLow) * generator.nextUniform())
            let h = Int((target * ratio).squareRoot().rounded()), w = Int((target / ratio).squareRoot().rounded())
            guard h < height, w < width else { continue }
            draw.eraseTop = generator.nextInt(below: height - h + 1)
            draw.eraseLeft = generator.nextInt(below: width - w + 1)
            (draw.eraseHeight, draw.eraseWidth) = (h, w)
            break
        }
        return draw
    }

    /// The generator stream of one (epoch, index) (`RandomGenerator.stream`).
    @inline(__always)
    static func stream(epoch: Int, index: Int) -> UInt64 {
        RandomGenerator.stream(.augmentation, epoch: epoch, index: index)
    }

    /// Writes one augmented sample: `out[c, y, x] = map(padded[c, y + top, x' + left])` with x' = W - 1 - x when
    /// mirrored, else x, and `padding` where the window lies outside the image; then `erased` over the erased
    /// rectangle. Per row, the columns inside the image are found once, so the element loop has no branch.
    @inline(__always)
    func apply<S, T>(_ draw: Draw, from source: UnsafePointer<S>, into out: UnsafeMutablePointer<T>, padding: T,
                     erased: T, map: (S) -> T) {
        defer {
            for c in 0..<channels {
                for y in draw.eraseTop..<(draw.eraseTop + draw.eraseHeight) {
                    (out + (c * height + y) * width + draw.eraseLeft).update(repeating: erased, count: draw.eraseWidth)
                }
            }
        }
        let (h, w, p) = (height, width, cropPadding)
        let direction = draw.flip ? -1 : 1
        // Output column x reads source column first + direction * x; the range of x where that is inside 0..<W.
        let first = draw.flip ? w - 1 + draw.left - p : draw.left - p
        let begin = draw.flip ? max(0, first - (w - 1)) : max(0, -first)
        let end = draw.flip ? min(w, first + 1) : min(w, w - first)
        for c in 0..<channels {
            let plane = source + c * h * w
            for y in 0..<h {
                let row = out + (c * h + y) * w
                let sourceY = y + draw.top - p
                guard sourceY >= 0 && sourceY < h && begin < end else {
                    row.update(repeating: padding, count: w)
                    continue
                }
                let sourceRow = plane + sourceY * w + first
                for x in 0..<begin { row[x] = padding }
                var x = begin
                while x < end {
                    row[x] = map(sourceRow[direction &* x])
                    x &+= 1
                }
                for x in end..<w { row[x] = padding }
            }
        }
    }
}

public struct AugmentationError: Error, CustomStringConvertible, Equatable {
    public let description: String
    public init(description: String) { self.description = description }
}
