#include "AllocationCounter.h"
#include <stddef.h>
#include <errno.h>

// glibc's own entry points, which the replacements below forward to.
extern void *__libc_malloc(size_t);
extern void *__libc_calloc(size_t, size_t);
extern void *__libc_realloc(void *, size_t);
extern void *__libc_memalign(size_t, size_t);

// Per thread, so tests running in parallel on other threads do not disturb the count.
static _Thread_local unsigned long allocations;

unsigned long bp_thread_allocations(void) { return allocations; }

// ThreadSanitizer replaces malloc and free itself: memory from __libc_malloc handed to its free would be an
// error, so a TSan build (scripts/test runs one) leaves glibc's allocator to TSan and counts nothing; the TSan
// run skips the allocation tests.
#if defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define BP_THREAD_SANITIZER 1
#endif
#endif
#ifndef BP_THREAD_SANITIZER
void *malloc(size_t size) { allocations++; return __libc_malloc(size); }
void *calloc(size_t n, size_t size) { allocations++; return __libc_calloc(n, size); }
void *realloc(void *p, size_t size) { allocations++; return __libc_realloc(p, size); }
void *memalign(size_t alignment, size_t size) { allocations++; return __libc_memalign(alignment, size); }
void *aligned_alloc(size_t alignment, size_t size) { allocations++; return __libc_memalign(alignment, size); }
int posix_memalign(void **out, size_t alignment, size_t size) {
    allocations++;
    void *p = __libc_memalign(alignment, size);
    if (!p) return ENOMEM;
    *out = p;
    return 0;
}
#endif
