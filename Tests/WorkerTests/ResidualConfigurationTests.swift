import Engine
import Foundation
import Testing
@testable import Worker

/// Residual blocks in `model.layers`: YAML mappings, block style as docs/convolutional-networks.md shows them and flow
/// style as `--set` takes them, read into the block's entry text, which the resolved configuration writes back.
@Suite("Residual blocks in the configuration", .serialized, .temporaryFiles)
struct ResidualConfigurationTests {
    static let expected = [
        "conv 16 3 pad 1 nobias", "batchnorm", "relu",
        "residual [conv 16 3 pad 1 nobias, batchnorm, relu, conv 16 3 pad 1 nobias, batchnorm]", "relu",
        "residual [conv 32 3 stride 2 pad 1 nobias, batchnorm, relu, conv 32 3 pad 1 nobias, batchnorm] "
            + "shortcut [conv 32 1 stride 2 nobias, batchnorm]",
        "relu", "globalavgpool", "flatten",
    ]

    @Test func blockStyleYAMLAsTheDocsShowIt() throws {
        let docs = try String(contentsOf: ModelFileTests.repository.appendingPathComponent("docs/convolutional-networks.md"),
                              encoding: .utf8)
        let start = try #require(docs.range(of: "```yaml\nmodel:\n  layers:\n"))
        let end = try #require(docs.range(of: "```", range: start.upperBound..<docs.endIndex))
        let file = TemporaryFiles.path("bpworker-config-").appendingPathExtension("yaml")
        try ("model:\n  layers:\n" + docs[start.upperBound..<end.lowerBound]).write(to: file, atomically: true, encoding: .utf8)
        let config = try Configuration.load(file: file.path, overrides: [])
        #expect(config.layers == Self.expected)
        // The resolved configuration reads back as the same list.
        let resolved = TemporaryFiles.path("bpworker-config-").appendingPathExtension("yaml")
        try config.yaml.write(to: resolved, atomically: true, encoding: .utf8)
        #expect(try Configuration.load(file: resolved.path, overrides: []).layers == Self.expected)
        let spec = try config.modelSpec(sampleShape: [8, 8], classes: 3)
        #expect(spec.parameterTable.map(\.name).contains("5.shortcut.1.bias"))
        #expect(spec.layers.dropLast().map(\.entry) == Self.expected)
    }

    /// An entry nested far too deep is refused at once, with its text cut short in the message: deciding whether
    /// it was spatial split it level by level first (3,000 deep took 8 s, 10,000 deep in a model file minutes, and the
    /// message quoted all of it).
    @Test func anEntryNestedThousandsDeepIsRefusedAtOnce() throws {
        let depth = 20_000
        let entry = String(repeating: "residual [", count: depth) + "relu" + String(repeating: "]", count: depth)
        let file = TemporaryFiles.path("deep-").appendingPathExtension("yaml")
        try Data("model:\n  layers: [\"\(entry)\", linear 10]\n".utf8).write(to: file)
        let r = try Harness.local(["train", "--local", "--run-dir", temporaryRunDirectory(), "-c", file.path], timeout: 60)
        #expect(r.status == 1, "\(r.output.prefix(500))")
        #expect(r.output.contains("... (\(entry.count) characters)': blocks nest \(depth) deep; at most 8 are taken"), "\(r.output.prefix(500))")
        #expect(r.output.count < 1000, "\(r.output.prefix(500))")
    }

    /// A huge layer name or number is cut short in the message too: an unknown name was quoted whole (a megabyte),
    /// and a width's reason repeated the number the entry had already cut.
    @Test func hugeNamesAndNumbersAreCutShortInMessages() throws {
        let name = String(repeating: "x", count: 1_000_000), number = String(repeating: "9", count: 100_000)
        for (overrides, fragment) in [(["model.activation=\(name)"], "unknown layer 'xxxx"),
                                      (["model.layers=[\(name)]"], "unknown layer 'xxxx"),
                                      (["model.layers=[flatten, linear \(number)]"], "linear width must be at most 16777216, got 9999")] {
            do {
                let config = try Configuration.load(file: nil, overrides: overrides)
                _ = try config.modelSpec(sampleShape: [8, 8], classes: 3)
                Issue.record("no error for \(overrides.first!.prefix(40))")
            } catch {
                let message = "\(error)"
                #expect(message.contains(fragment) && message.contains(" characters)") && message.count < 1000, "\(message.prefix(300))")
            }
        }
    }

    @Test func flowStyleAsSetTakesIt() throws {
        let config = try Configuration.load(file: nil, overrides: [
            "model.layers=[conv 16 3 pad 1 nobias, batchnorm, relu, {residual: [conv 16 3 pad 1 nobias, batchnorm, relu, "
                + "conv 16 3 pad 1 nobias, batchnorm]}, relu, {shortcut: [conv 32 1 stride 2 nobias, batchnorm], "
                + "residual: [conv 32 3 stride 2 pad 1 nobias, batchnorm, relu, conv 32 3 pad 1 nobias, batchnorm]}, "
                + "relu, globalavgpool, flatten]",
        ])
        #expect(config.layers == Self.expected)
    }
}
