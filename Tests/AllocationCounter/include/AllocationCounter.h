// Counts heap allocations made by the calling thread, to prove that a steady-state training step
// allocates nothing. Linked into the test binary only: it replaces malloc and friends with versions that
// count and forward to glibc's implementations.
#ifndef BP_ALLOCATION_COUNTER_H
#define BP_ALLOCATION_COUNTER_H

/// Allocations (malloc, calloc, realloc, posix_memalign, aligned_alloc, memalign) made by this thread so far.
unsigned long bp_thread_allocations(void);

#endif
