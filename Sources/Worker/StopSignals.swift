import Foundation

/// Stop requests from the scheduler or the user: SIGTERM, SIGINT, SIGUSR1 or SIGUSR2 on any rank. SLURM and
/// srun signal every task; OpenMPI's mpirun forwards SIGUSR1, SIGUSR2 and SIGTERM to the ranks.
///
/// The handler only records the signal (async-signal-safe); the training loop reads it once per step and sends
/// it to every rank as one of the control values reduced with the step's gradients, so all ranks stop after the
/// same step. A second SIGINT
/// exits at once, for the user who really means it.
enum StopSignals {
    /// [0]: the last stop signal received (0 = none); [1]: SIGINTs received. Allocated before any handler is
    /// installed, so the handler never runs lazy initialisation.
    nonisolated(unsafe) private static var flags: UnsafeMutablePointer<sig_atomic_t> = {
        let p = UnsafeMutablePointer<sig_atomic_t>.allocate(capacity: 2)
        p.initialize(repeating: 0, count: 2)
        return p
    }()

    static let handled: [Int32] = [SIGTERM, SIGINT, SIGUSR1, SIGUSR2]

    static func install() {
        _ = flags
        for signal in handled {
            var action = sigaction()
            action.__sigaction_handler.sa_handler = { signal in
                if signal == SIGINT {
                    if StopSignals.flags[1] > 0 { _exit(130) }
                    StopSignals.flags[1] = 1
                }
                StopSignals.flags[0] = signal
            }
            sigemptyset(&action.sa_mask)
            action.sa_flags = SA_RESTART
            sigaction(signal, &action, nil)
        }
    }

    /// The signal that asked this rank to stop, or nil.
    static var requested: Int32? {
        let signal = flags[0]
        return signal == 0 ? nil : signal
    }

    static func name(_ signal: Int32) -> String {
        switch signal {
        case SIGTERM: "SIGTERM"
        case SIGINT: "SIGINT"
        case SIGUSR1: "SIGUSR1"
        case SIGUSR2: "SIGUSR2"
        default: "signal \(signal)"
        }
    }
}
