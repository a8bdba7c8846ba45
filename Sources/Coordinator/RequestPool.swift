import CMPI

/// Reusable MPI_Request storage behind `PendingRequest` (see there for why it exists).
///
/// A slot is free when its request is MPI_REQUEST_NULL: MPI writes that back when the request completes.
/// Used from the communicator's single MPI thread only.
final class RequestPool {
    private(set) var capacity: Int
    private(set) var requests: UnsafeMutablePointer<MPI_Request?>
    private var generations: UnsafeMutablePointer<UInt64>
    private let null: MPI_Request = bp_mpi_request_null()

    init(capacity: Int) {
        self.capacity = Swift.max(capacity, 1)
        requests = .allocate(capacity: self.capacity)
        requests.initialize(repeating: null, count: self.capacity)
        generations = .allocate(capacity: self.capacity)
        generations.initialize(repeating: 0, count: self.capacity)
    }

    deinit {
        requests.deallocate()
        generations.deallocate()
    }

    /// A free slot and its new generation; doubles the storage only if every slot is in flight.
    /// Slots are identified by index, so moving the storage is safe: MPI keeps no pointer to it.
    func acquire() -> (index: Int, generation: UInt64) {
        var index = 0
        while index < capacity, requests[index] != null { index += 1 }
        if index == capacity { grow() }
        generations[index] &+= 1
        return (index, generations[index])
    }

    /// Whether the request started as (`index`, `generation`) may still be running.
    @inline(__always)
    func isInFlight(_ index: Int, _ generation: UInt64) -> Bool {
        generations[index] == generation && requests[index] != null
    }

    /// Marks a slot free again after a start that failed before MPI handed out a request.
    func release(_ index: Int) {
        requests[index] = null
    }

    private func grow() {
        let newCapacity = capacity * 2
        let newRequests = UnsafeMutablePointer<MPI_Request?>.allocate(capacity: newCapacity)
        newRequests.moveInitialize(from: requests, count: capacity)
        (newRequests + capacity).initialize(repeating: null, count: newCapacity - capacity)
        let newGenerations = UnsafeMutablePointer<UInt64>.allocate(capacity: newCapacity)
        newGenerations.moveInitialize(from: generations, count: capacity)
        (newGenerations + capacity).initialize(repeating: 0, count: newCapacity - capacity)
        requests.deallocate()
        generations.deallocate()
        requests = newRequests
        generations = newGenerations
        capacity = newCapacity
    }
}
