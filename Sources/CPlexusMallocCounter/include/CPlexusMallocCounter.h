// CPlexusMallocCounter: counts heap allocations in the process that links it.
//
// Linking this target into an executable interposes malloc, calloc, realloc,
// reallocarray, posix_memalign, aligned_alloc, memalign, valloc, pvalloc and free:
// each forwards to glibc's own allocator (__libc_malloc and friends) and bumps one
// process-wide relaxed atomic counter. The executable exports these symbols, so the
// dynamic linker binds every shared library (libswiftCore, Foundation, libc itself
// through its PLT) to them: no LD_PRELOAD, no set-up.
//
// Under AddressSanitizer, ThreadSanitizer or MemorySanitizer the interposers are not
// compiled (the sanitizer runtime owns malloc there) and the counter reports that it
// is unavailable.
#ifndef CPLEXUS_MALLOC_COUNTER_H
#define CPLEXUS_MALLOC_COUNTER_H

#include <stdint.h>

/// Allocation calls so far (malloc, calloc, realloc, reallocarray, posix_memalign,
/// aligned_alloc, memalign, valloc, pvalloc), from every thread.
uint64_t plexus_malloc_count(void);

/// free calls with a non-NULL pointer so far, from every thread.
uint64_t plexus_free_count(void);

/// 1 when allocations are being counted in this process, 0 when the interposers are
/// not compiled in (sanitizers) or not bound (the symbols were not exported).
int plexus_malloc_counter_active(void);

#endif
