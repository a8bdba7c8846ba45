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
