/// PyTorch `nn.Flatten()`: [C, H, W] -> [C * H * W]. NCHW samples are contiguous, so flattening moves nothing: the
/// model runs it in place (its output is its input's buffer, its input gradient its output gradient's).
final class Flatten<T: Scalar>: Layer<T> {
    override func forward(count: Int, mode: ForwardMode) {
        // In place there is nothing to do; a model that could not run it in place gave it its own output.
        if y != x { Elementwise.copy(x, into: y, count * outputCount) }
    }

    override func backwardInput(count: Int, accumulate: Bool) {
        if let dx, dx != dy { Elementwise.copy(dy, into: dx, count * inputCount) }
    }
}
