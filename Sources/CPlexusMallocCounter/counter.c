#include "CPlexusMallocCounter.h"

#include <errno.h>
#include <stdatomic.h>
#include <stddef.h>
#include <string.h>

#ifndef __has_feature
#define __has_feature(x) 0
#endif

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__) || __has_feature(address_sanitizer) || \
    __has_feature(thread_sanitizer) || __has_feature(memory_sanitizer)
#define PLEXUS_COUNT_MALLOC 0
#else
#define PLEXUS_COUNT_MALLOC 1
#endif

static _Atomic uint64_t allocations;
static _Atomic uint64_t frees;

uint64_t plexus_malloc_count(void) { return atomic_load_explicit(&allocations, memory_order_relaxed); }
uint64_t plexus_free_count(void) { return atomic_load_explicit(&frees, memory_order_relaxed); }

#if PLEXUS_COUNT_MALLOC

// glibc's allocator under its own names (exported by libc.so.6 since GLIBC_2.0).
extern void *__libc_malloc(size_t size);
extern void *__libc_calloc(size_t count, size_t size);
extern void *__libc_realloc(void *pointer, size_t size);
extern void *__libc_memalign(size_t alignment, size_t size);
extern void *__libc_valloc(size_t size);
extern void *__libc_pvalloc(size_t size);
extern void __libc_free(void *pointer);

#define COUNT() atomic_fetch_add_explicit(&allocations, 1, memory_order_relaxed)
#define VISIBLE __attribute__((visibility("default"), used))

VISIBLE void *malloc(size_t size) {
    COUNT();
    return __libc_malloc(size);
}

VISIBLE void *calloc(size_t count, size_t size) {
    COUNT();
    return __libc_calloc(count, size);
}

VISIBLE void *realloc(void *pointer, size_t size) {
    COUNT();
    return __libc_realloc(pointer, size);
}

VISIBLE void *reallocarray(void *pointer, size_t count, size_t size) {
    size_t total;
    if (__builtin_mul_overflow(count, size, &total)) {
        errno = ENOMEM;
        return NULL;
    }
    COUNT();
    return __libc_realloc(pointer, total);
}

static int valid_alignment(size_t alignment) {
    return alignment != 0 && (alignment & (alignment - 1)) == 0;
}

VISIBLE int posix_memalign(void **out, size_t alignment, size_t size) {
    if (!valid_alignment(alignment) || alignment % sizeof(void *) != 0) return EINVAL;
    COUNT();
    void *pointer = __libc_memalign(alignment, size);
    if (!pointer && size != 0) return ENOMEM;
    *out = pointer;
    return 0;
}

VISIBLE void *aligned_alloc(size_t alignment, size_t size) {
    if (!valid_alignment(alignment)) {
        errno = EINVAL;
        return NULL;
    }
    COUNT();
    return __libc_memalign(alignment, size);
}

VISIBLE void *memalign(size_t alignment, size_t size) {
    COUNT();
    return __libc_memalign(alignment, size);
}

VISIBLE void *valloc(size_t size) {
    COUNT();
    return __libc_valloc(size);
}

VISIBLE void *pvalloc(size_t size) {
    COUNT();
    return __libc_pvalloc(size);
}

VISIBLE void free(void *pointer) {
    if (pointer) atomic_fetch_add_explicit(&frees, 1, memory_order_relaxed);
    __libc_free(pointer);
}

int plexus_malloc_counter_active(void) {
    // strdup allocates inside libc.so, through its PLT: if the counter moves, the
    // dynamic linker bound libc (and so every other library) to the interposers.
    uint64_t before = plexus_malloc_count();
    char *copy = strdup("plexus");
    free(copy);
    return plexus_malloc_count() > before;
}

#else

int plexus_malloc_counter_active(void) { return 0; }

#endif
