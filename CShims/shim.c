#define _GNU_SOURCE
#include <limits.h>
#include "CPlexus.h"
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <time.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>

int plexus_pipe2(int fds[2], int flags) { return pipe2(fds, flags); }

int plexus_accept4(int fd, struct sockaddr *address, socklen_t *length, int flags) {
    return accept4(fd, address, length, flags);
}

// A wait that polls (zero timeout) or blocks (no timeout) needs no timespec, and the
// calls without one are the cheaper ones: on a pipe ping-pong (kernel 6.x, 2M round trips)
// epoll_wait(0) cost ~50 ns less than epoll_pwait2 with a zero timespec, epoll_wait(-1)
// ~20 ns less than epoll_pwait2(NULL), poll(0) ~35 ns less than ppoll with a zero
// timespec and poll(-1) ~25 ns less than ppoll(NULL). Only a timed wait, which needs
// nanoseconds, takes the timespec calls.
static int plexus_is_zero(const struct timespec *t) { return t->tv_sec == 0 && t->tv_nsec == 0; }

// A poll that may wait adds a wait-queue entry on every fd up to the first ready one (and
// removes them after); a zero-timeout poll adds none. So a wait first polls without
// waiting, and waits only when nothing was ready: a pipe ping-pong in C, where the data
// is always there, took 630 against 722 ns per round trip on one fd, 650 against 853 ns
// with an idle eventfd (a loop's wake-up fd) before it. A loop that mostly sleeps would
// pay that first poll on every wait (plexus-bench wakeup: 10% slower), so after a miss
// the next `plexus_poll_probe_skips` waits go straight to the waiting poll.
enum { plexus_poll_probe_skips = 8 };

int plexus_poll(struct pollfd *fds, nfds_t count, const struct timespec *timeout, int *probe_skips) {
    if (timeout && plexus_is_zero(timeout)) return poll(fds, count, 0);
    if (*probe_skips > 0) {
        *probe_skips -= 1;
    } else {
        int ready = poll(fds, count, 0);
        if (ready != 0) return ready;
        *probe_skips = plexus_poll_probe_skips;
    }
    return timeout ? ppoll(fds, count, timeout, NULL) : poll(fds, count, -1);
}

// epoll_pwait2 (5.11) takes a timespec; older kernels (ENOSYS) and seccomp profiles older
// than it (EPERM) refuse it once and get epoll_wait, the timeout rounded up to whole
// milliseconds so no timer fires early.
static int plexus_no_epoll_pwait2;

int plexus_epoll_wait(int epfd, struct epoll_event *events, int max, const struct timespec *timeout) {
    if (!timeout) return epoll_wait(epfd, events, max, -1);
    if (plexus_is_zero(timeout)) return epoll_wait(epfd, events, max, 0);
    if (!__atomic_load_n(&plexus_no_epoll_pwait2, __ATOMIC_RELAXED)) {
        int n = epoll_pwait2(epfd, events, max, timeout, NULL);
        // ENOSYS: a kernel before 5.11; EPERM: a seccomp profile older than the call.
        if (n >= 0 || (errno != ENOSYS && errno != EPERM)) return n;
        __atomic_store_n(&plexus_no_epoll_pwait2, 1, __ATOMIC_RELAXED);
    }
    long long t = (long long)timeout->tv_sec * 1000 + (timeout->tv_nsec + 999999) / 1000000;
    return epoll_wait(epfd, events, max, t > INT_MAX ? INT_MAX : (int)t);
}

ssize_t plexus_preadv2(int fd, const struct iovec *iov, int count, off_t offset, int flags) {
    return preadv2(fd, iov, count, offset, flags);
}

ssize_t plexus_pwritev2(int fd, const struct iovec *iov, int count, off_t offset, int flags) {
    return pwritev2(fd, iov, count, offset, flags);
}

const char *plexus_secure_getenv(const char *name) { return secure_getenv(name); }

int plexus_set_thread_name(const char *name) {
    char short_name[16];
    strncpy(short_name, name, sizeof short_name - 1);
    short_name[sizeof short_name - 1] = 0;
    return pthread_setname_np(pthread_self(), short_name);
}

static __thread void *plexus_loop_of_this_thread;
void *plexus_current_loop(void) { return plexus_loop_of_this_thread; }
void plexus_set_current_loop(void *loop) { plexus_loop_of_this_thread = loop; }

int plexus_errno(void) { return errno; }

// Whether plexus_block_sigpipe blocked SIGPIPE on this thread, and whether the thread had
// it blocked already (then plexus_release_sigpipe leaves it blocked).
__thread int plexus_sigpipe_blocked;
static __thread int plexus_sigpipe_was_blocked;

void plexus_block_sigpipe_now(void) {
    sigset_t set, old;
    sigemptyset(&set);
    sigaddset(&set, SIGPIPE);
    pthread_sigmask(SIG_BLOCK, &set, &old);
    plexus_sigpipe_was_blocked = sigismember(&old, SIGPIPE) == 1;
    plexus_sigpipe_blocked = 1;
}

void plexus_release_sigpipe(void) {
    if (!plexus_sigpipe_blocked) return;
    plexus_sigpipe_blocked = 0;
    if (plexus_sigpipe_was_blocked) return;
    plexus_discard_sigpipe();
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGPIPE);
    pthread_sigmask(SIG_UNBLOCK, &set, NULL);
}

void plexus_discard_sigpipe(void) {
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGPIPE);
    struct timespec zero = {0, 0};
    while (sigtimedwait(&set, NULL, &zero) > 0) {}
}

int plexus_usable_cpus(void) {
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) != 0) return -errno;
    return CPU_COUNT(&set);
}

int plexus_probe_opcodes(struct io_uring *ring, unsigned char supported[256]) {
    memset(supported, 0, 256);
    size_t size = sizeof(struct io_uring_probe) + 256 * sizeof(struct io_uring_probe_op);
    struct io_uring_probe *probe = calloc(1, size);
    if (!probe) return -ENOMEM;
    int r = io_uring_register_probe(ring, probe, 256);
    if (r >= 0) {
        for (int op = 0; op < 256; op++) supported[op] = io_uring_opcode_supported(probe, op) ? 1 : 0;
    }
    free(probe);
    return r < 0 ? r : 0;
}

struct io_uring_buf_ring *plexus_setup_buf_ring(struct io_uring *ring, unsigned entries, int group, int *error) {
    size_t size = entries * sizeof(struct io_uring_buf);
    void *memory = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_ANONYMOUS | MAP_PRIVATE, -1, 0);
    if (memory == MAP_FAILED) {
        *error = -errno;
        return NULL;
    }
    struct io_uring_buf_reg reg = {0};
    reg.ring_addr = (unsigned long)memory;
    reg.ring_entries = entries;
    reg.bgid = (unsigned short)group;
    int ret = io_uring_register_buf_ring(ring, &reg, 0);
    if (ret) {
        munmap(memory, size);
        *error = ret;
        return NULL;
    }
    struct io_uring_buf_ring *br = memory;
    io_uring_buf_ring_init(br);
    *error = 0;
    return br;
}

int plexus_free_buf_ring(struct io_uring *ring, struct io_uring_buf_ring *br, unsigned entries, int group) {
    int ret = io_uring_unregister_buf_ring(ring, group);
    munmap(br, entries * sizeof(struct io_uring_buf));
    return ret;
}

int plexus_enable_rings(struct io_uring *ring) {
    long ret = syscall(__NR_io_uring_register, ring->ring_fd, IORING_REGISTER_ENABLE_RINGS, NULL, 0);
    return ret < 0 ? -errno : 0;
}

unsigned plexus_cq_overflow(const struct io_uring *ring) {
    return ring->cq.koverflow ? *ring->cq.koverflow : 0;
}

// --- Swift task cancellation records ---------------------------------------------------
// libswift_Concurrency's exported pair that the standard library's
// withTaskCancellationHandler is built on (swift/Runtime/Concurrency.h): the handler is a
// swiftcall function taking its context in the Swift context register.
typedef void (*plexus_swift_cancel_handler)(void *context __attribute__((swift_context))) __attribute__((swiftcall));
extern const void *swift_task_addCancellationHandler(plexus_swift_cancel_handler handler, void *context) __attribute__((swiftcall));
extern void swift_task_removeCancellationHandler(const void *record) __attribute__((swiftcall));
extern void *swift_task_getCurrent(void) __attribute__((swiftcall));

static plexus_cancel_hook plexus_task_cancel_hook;

static __attribute__((swiftcall)) void plexus_cancel_trampoline(void *context __attribute__((swift_context))) {
    plexus_cancel_hook hook = __atomic_load_n(&plexus_task_cancel_hook, __ATOMIC_ACQUIRE);
    if (hook) hook(context);
}

void plexus_set_task_cancel_hook(plexus_cancel_hook hook) {
    __atomic_store_n(&plexus_task_cancel_hook, hook, __ATOMIC_RELEASE);
}

const void *plexus_task_add_cancellation_handler(void *context) {
    return swift_task_addCancellationHandler(plexus_cancel_trampoline, context);
}

void plexus_task_remove_cancellation_handler(const void *record) {
    swift_task_removeCancellationHandler(record);
}

const void *plexus_current_task(void) {
    return swift_task_getCurrent();
}
