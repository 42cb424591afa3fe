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

// Two GNU-only calls the benchmarks need besides the counter (Swift's Glibc module
// does not import them).

/// Pins the calling thread to the CPU it runs on now (threads it creates inherit the
/// mask). Returns that CPU, or -errno. `saved` receives the previous mask (128 bytes).
int plexus_bench_pin_to_current_cpu(void *saved);

/// Restores a mask saved by plexus_bench_pin_to_current_cpu. Returns 0 or -errno.
int plexus_bench_restore_affinity(const void *saved);

/// Size of the buffer plexus_bench_pin_to_current_cpu needs.
enum { PLEXUS_BENCH_AFFINITY_SIZE = 128 };

#endif
