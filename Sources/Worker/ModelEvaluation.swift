import Coordinator
import Engine
import Foundation

/// Evaluating model files that describe themselves (ModelFile.swift): `eval --model`, and what `eval --run-dir` /
/// `--parameters` takes from a file's description.
extension Evaluation {
    /// `bpworker eval --model FILE`: the model is built from the file's description and its preprocessing applied
    /// to the configured test set; the rest of the configuration (model.*, data.normalize, the training set) is not
    /// consulted. Rank 0 reads and checks the file; the other ranks receive its metadata and parameters.
    static func runModel(_ session: Session, modelPath: String) {
        let config = session.config
        session.agree("configuration") { try config.validateSettings() }
        var file: SafeTensorsFile? = nil
        var encoded: [UInt8] = []
        session.agree("model file") {
            guard session.isRoot else { return }
            let opened = try ModelFile.open(path: modelPath)
            if let note = opened.unverified { session.logger.notice("\(note)") }
            file = opened.file
            encoded = Array(try JSONEncoder().encode(opened.file.metadata))
        }
        session.agree("model file") { try session.communicator.broadcast(bytes: &encoded, root: 0) }
        let description = session.agree("model file") {
            try ModelDescription(metadata: try JSONDecoder().decode([String: String].self, from: Data(encoded)), path: modelPath)
        }
        // eval reads its test set into memory, mapped or not (loadTestData).
        DataReadCheck.require(session, features: [config.testFeatures], mapped: false, mappable: false)
        let test = session.agree("data") {
            var test = try loadTestData(config)
            try requireTestSamples(test, config)
            try description.checkInput(test, modelPath: modelPath)
            // A NaN would make the loss NaN and the accuracy whatever the NaN rows' scores gave (as in Setup.normalize).
            try test.requireFinite()
            try test.validateLabels(classCount: description.classes)
            description.preprocessing.apply(to: &test)
            return test
        }
        // As `eval --run-dir` does in Setup.plan: a batch no memory holds (training.batch_size=16777216) is refused
        // with the biggest items, not a crash allocating the model.
        session.agree("memory check") {
            let estimate = MemoryEstimate.estimate(config: config, spec: description.spec, datasets: [test], rank: session.rank,
                                                   worldSize: session.worldSize, usage: .current(), training: false)
            try estimate.check(against: .read(), ranksOnNode: session.layout.localSize)
        }
        let model = session.agree("model") { try Model<Float>(spec: description.spec, batchCapacity: config.batchSize) }
        session.agree("parameters \(modelPath)") {
            if let file { try readState(from: file, into: model) }
        }
        session.agree("parameters") { try broadcastState(session, model) }
        session.logger.info("model: \(model.spec.summary), \(grouped(model.parameterCount)) parameters, from \(modelPath)")
        let data = "data: \(grouped(test.count)) test samples (\(config.testFeatures)) shaped \(description.inputShape) "
            + "\(description.inputType.rawValue), preprocessing from the file: \(description.preprocessing.summary)"
        session.logger.info("\(data)")
        report(session, model, on: test, source: "model \(modelPath)")
    }

    private static func loadTestData(_ config: Configuration) throws -> Dataset {
        switch config.dataFormat {
        case .idx: try Dataset.loadIDX(images: config.testFeatures, labels: config.testLabels)
        case .npy: try Dataset.loadNPY(features: config.testFeatures, labels: config.testLabels)
        case .hdf5: try Dataset.loadHDF5(features: config.testFeatures, labels: config.testLabels)
        }
    }

    /// `eval --run-dir` / `--parameters`: the configuration describes the model, but a file that records how its
    /// inputs were preprocessed is evaluated with exactly that. A file that records nothing (version 1, or written
    /// by another tool) is evaluated as the configuration says, with a warning naming what is assumed.
    static func preprocessing(_ session: Session, of parametersPath: String, model: Model<Float>, test: Dataset) -> Dataset {
        let config = session.config
        var encoded: [UInt8] = []
        session.agree("parameters \(parametersPath)") {
            if session.isRoot { encoded = Array(try JSONEncoder().encode(try SafeTensorsFile(path: parametersPath).metadata)) }
        }
        session.agree("parameters") { try session.communicator.broadcast(bytes: &encoded, root: 0) }
        let (metadata, recorded) = session.agree("parameters \(parametersPath)") {
            let metadata = try JSONDecoder().decode([String: String].self, from: Data(encoded))
            return (metadata, try ModelDescription.recordedPreprocessing(metadata, path: parametersPath))
        }
        var test = test
        guard let recorded else {
            let version = metadata["format"].map { "\($0) format_version \(metadata["format_version"] ?? "1")" } ?? "no bpworker format"
            let warning = "\(parametersPath) records no preprocessing, layer list or input shape (\(version)): assuming the "
                + "configuration's data.normalize=\(config.normalization.rawValue) (x * \(test.scale) + \(test.shift), "
                + "from \(config.trainFeatures)), model \(model.spec.summary) and input \(test.sampleShape) "
                + "\(ModelDescription.InputType(test).rawValue)"
            session.logger.warning("\(warning)")
            return test
        }
        if recorded.scale != test.scale || recorded.shift != test.shift {
            let note = "\(parametersPath): using its recorded preprocessing \(recorded.summary), not the configuration's "
                + "data.normalize=\(config.normalization.rawValue) (x * \(test.scale) + \(test.shift))"
            session.logger.info("\(note)")
        }
        if let layers = metadata["layers"],
           (try? JSONSerialization.jsonObject(with: Data(layers.utf8))) as? [String] != model.spec.layers.map(ModelDescription.layerText) {
            let warning = "\(parametersPath) was trained as \(layers); evaluating it as the configuration's "
                + "\(model.spec.summary) (bpworker eval --model \(parametersPath) builds the recorded model)"
            session.logger.warning("\(warning)")
        }
        recorded.apply(to: &test)
        return test
    }
}
