/// Where each rank's clock stands against rank 0's, measured with MPI messages the way NTP measures a server.
///
/// Ranks on different hosts do not share a clock, so a timeline that puts them side by side must map each rank's
/// times onto rank 0's. Rank 0 sends its time t0 to rank r, which answers with its own time t1; rank 0 reads t2
/// when the answer arrives. If the two legs took equally long, r's clock is ahead by t1 - (t0 + t2) / 2, and
/// whatever the legs took, the error is at most half the round trip t2 - t0. Of several exchanges the one with
/// the smallest round trip is kept (the one least disturbed by scheduling), as NTP's clock filter does.
public struct ClockOffset: Sendable, Equatable {
    /// The rank's clock minus rank 0's, in nanoseconds.
    public var offset: Int64
    /// The round trip of the exchange kept: the offset is within half of it.
    public var roundTrip: Int64
    /// The rank's own clock when it answered that exchange.
    public var at: Int64

    public init(offset: Int64, roundTrip: Int64, at: Int64) {
        self.offset = offset
        self.roundTrip = roundTrip
        self.at = at
    }
}

public enum ClockAlignment {
    /// Exchanges per rank: on a shared host a few are delayed by scheduling; the quickest of 16 is close to the
    /// real latency and costs well under a millisecond per rank.
    public static let defaultExchanges = 16
    /// The message tag of the exchanges. The gradient reducer tags by bucket, but it has nothing in flight between
    /// steps, where alignment runs, so no message of it can match these.
    static let tag = 32767

    /// Measures every rank's offset to rank 0. Collective: rank 0 exchanges with each rank in turn, and gets one
    /// offset per rank (its own is 0); every other rank gets an empty list. `clock` is the clock being aligned
    /// (a test passes a shifted one).
    public static func measure(_ communicator: any Communicator, exchanges: Int = defaultExchanges,
                               clock: () -> Int64 = TimelineRecorder.now) throws(MPIError) -> [ClockOffset] {
        precondition(exchanges >= 1, "clock alignment needs at least one exchange")
        var value: Int64 = 0
        func send(to peer: Int) throws(MPIError) {
            try withUnsafePointer(to: &value) { (pointer) throws(MPIError) in
                try communicator.startSend(UnsafeBufferPointer(start: pointer, count: 1), to: peer, tag: tag).wait()
            }
        }
        func receive(from peer: Int) throws(MPIError) {
            try withUnsafeMutablePointer(to: &value) { (pointer) throws(MPIError) in
                try communicator.startReceive(UnsafeMutableBufferPointer(start: pointer, count: 1), from: peer, tag: tag).wait()
            }
        }
        guard communicator.rank == 0 else {
            for _ in 0..<exchanges {
                try receive(from: 0)
                value = clock()
                try send(to: 0)
            }
            return []
        }
        var offsets = [ClockOffset(offset: 0, roundTrip: 0, at: clock())]
        for peer in 1..<max(communicator.size, 1) {
            var best = ClockOffset(offset: 0, roundTrip: .max, at: 0)
            for _ in 0..<exchanges {
                let sent = clock()
                value = sent
                try send(to: peer)
                try receive(from: peer)
                let returned = clock()
                let roundTrip = returned - sent
                if roundTrip < best.roundTrip {
                    // (sent + returned) / 2 without overflowing.
                    best = ClockOffset(offset: value - (sent + roundTrip / 2), roundTrip: roundTrip, at: value)
                }
            }
            offsets.append(best)
        }
        return offsets
    }
}
