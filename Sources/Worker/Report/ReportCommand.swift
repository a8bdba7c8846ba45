import ArgumentParser
import Foundation

/// `bpworker report RUN_DIR [RUN_DIR ...]`: the report of a run, or of several overlaid to compare settings. Reads
/// the run directories only; needs no MPI and no data.
struct Report: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Write a run's report.html, or overlay several runs in one report.",
        discussion: """
              bpworker report runs/default
              bpworker report runs/lr-0.1 runs/lr-0.3 --output compare.html

            One run: RUN_DIR/report.html (rank 0 also rewrites it at every evaluation and at the end). Several: their \
            curves in one page, report.html in the current directory unless --output says otherwise.
            """)

    @Argument(help: "Run directories.")
    var runDirectories: [String] = ["runs/default"]

    @Option(help: "Where to write the report (default: RUN_DIR/report.html for one run, report.html for several).")
    var output: String?

    func run() throws {
        let path = output ?? (runDirectories.count == 1 ? runDirectories[0] + "/report.html" : "report.html")
        do { try RunReport.write(runDirectories: runDirectories, to: path) } catch {
            // One line naming the directory or file and the reason; not ArgumentParser's usage text.
            FileHandle.standardError.write(Data("error: \(error)\n".utf8))
            throw ExitCode.failure
        }
        print("report: \(path)")
    }
}
