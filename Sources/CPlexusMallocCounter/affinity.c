#define _GNU_SOURCE
#include "CPlexusMallocCounter.h"

#include <errno.h>
#include <sched.h>
#include <string.h>

_Static_assert(sizeof(cpu_set_t) == PLEXUS_BENCH_AFFINITY_SIZE, "cpu_set_t size");

int plexus_bench_pin_to_current_cpu(void *saved) {
    if (sched_getaffinity(0, sizeof(cpu_set_t), (cpu_set_t *)saved) != 0) return -errno;
    int cpu = sched_getcpu();
    if (cpu < 0) return -errno;
    cpu_set_t one;
    CPU_ZERO(&one);
    CPU_SET(cpu, &one);
    if (sched_setaffinity(0, sizeof one, &one) != 0) return -errno;
    return cpu;
}

int plexus_bench_restore_affinity(const void *saved) {
    return sched_setaffinity(0, sizeof(cpu_set_t), (const cpu_set_t *)saved) == 0 ? 0 : -errno;
}
