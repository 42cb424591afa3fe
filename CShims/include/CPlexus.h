// CPlexus: the thin C layer under Plexus.
//
// Swift imports liburing's static inline helpers (io_uring_get_sqe, io_uring_prep_*,
// io_uring_cqe_seen, ...) directly and they run at C speed, so this module wraps only
// what Swift cannot import: macros built from enum bits, GNU-only calls, helpers
// that Debian's liburing 2.3 lacks although the kernel has them, and feature probes.
#ifndef CPLEXUS_H
#define CPLEXUS_H

// A glibc header must come before <liburing.h>: liburing.h defines _XOPEN_SOURCE 500 and
// _GNU_SOURCE before its own glibc includes, and when it is first the module's fd_set and
// environ clash with Foundation's, XCTest's and Dispatch's (FIELD-NOTES.md, "The trap").
#include <sys/types.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <time.h>
#include <unistd.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/timerfd.h>
#include <sys/uio.h>
#include <sys/un.h>
// swift-system's CSystem module includes the kernel's <linux/io_uring.h>; liburing.h would
// otherwise bring its own, older copy of the same structs under the same include guard,
// and Swift rejects the two differing definitions of io_uring_sqe. Including the kernel's
// first makes both modules see one definition (liburing 2.3 builds against it).
#include <linux/io_uring.h>
#include <liburing.h>

// SQE flags: liburing defines these as (1U << IOSQE_*_BIT), which Swift cannot import.
enum {
    PLEXUS_IOSQE_FIXED_FILE = IOSQE_FIXED_FILE,
    PLEXUS_IOSQE_IO_DRAIN = IOSQE_IO_DRAIN,
    PLEXUS_IOSQE_IO_LINK = IOSQE_IO_LINK,
    PLEXUS_IOSQE_IO_HARDLINK = IOSQE_IO_HARDLINK,
    PLEXUS_IOSQE_ASYNC = IOSQE_ASYNC,
    PLEXUS_IOSQE_BUFFER_SELECT = IOSQE_BUFFER_SELECT,
    PLEXUS_IOSQE_CQE_SKIP_SUCCESS = IOSQE_CQE_SKIP_SUCCESS,
};

// GNU-only bits, hidden by the header order above.
enum { PLEXUS_POLLRDHUP = 0x2000, PLEXUS_RWF_NOWAIT = 0x00000008, PLEXUS_F_SETPIPE_SZ = 1031 };

// Newer than liburing 2.3's headers; the kernel probe decides whether they are used.
#define PLEXUS_IORING_TIMEOUT_MULTISHOT (1U << 6)
#define PLEXUS_IORING_FEAT_REG_REG_RING (1U << 13)

/// Everything an operation needs the kernel to read after submission, kept in one
/// stable place per operation (addresses, message headers, vectors, timeouts).
typedef struct plexus_op_scratch {
    struct sockaddr_storage address;
    struct msghdr message;
    struct iovec vector;
    struct __kernel_timespec timeout;
    /// A copy of an openat path, freed at the operation's final completion.
    char *path;
    socklen_t address_length;
    uint32_t reserved;
} plexus_op_scratch;

// GNU-only calls (hidden from Swift by the header order above).
int plexus_pipe2(int fds[2], int flags);
int plexus_accept4(int fd, struct sockaddr *address, socklen_t *length, int flags);
/// Waits on `fds` without a signal mask: poll(2) with a zero timeout, then, when nothing
/// was ready and the timeout is not zero, poll(2) with -1 (no timeout) or ppoll(2).
/// `probe_skips` (the caller's, initially 0) makes the next 8 waits after a zero-timeout
/// poll that found nothing skip that poll.
int plexus_poll(struct pollfd *fds, nfds_t count, const struct timespec *timeout, int *probe_skips);
/// Waits on `epfd` without a signal mask: epoll_wait(2) with -1 (no timeout) or 0 (a zero
/// timeout), epoll_pwait2(2) for any other timeout; where it is refused (ENOSYS before
/// 5.11, EPERM under an older seccomp profile) epoll_wait(2) with the timeout rounded up
/// to milliseconds.
int plexus_epoll_wait(int epfd, struct epoll_event *events, int max, const struct timespec *timeout);
ssize_t plexus_preadv2(int fd, const struct iovec *iov, int count, off_t offset, int flags);
ssize_t plexus_pwritev2(int fd, const struct iovec *iov, int count, off_t offset, int flags);

/// getenv that returns NULL in setuid/setgid programs (secure_getenv, GNU-only).
const char *plexus_secure_getenv(const char *name);

/// Names the calling thread (pthread_setname_np, GNU-only); at most 15 bytes are kept.
int plexus_set_thread_name(const char *name);

/// The Plexus loop running on the calling thread, or NULL (a C thread-local, which Swift lacks).
void *plexus_current_loop(void);
void plexus_set_current_loop(void *loop);

/// Returns errno of the calling thread (Swift 6 mode makes the global awkward to read).
int plexus_errno(void);

/// Blocks SIGPIPE on the calling thread, once per thread: a write to a pipe or socket
/// whose reader is gone then fails with EPIPE and kills nothing, whatever the process's
/// disposition. Called by every backend on the thread that submits and waits, on every
/// turn: inline, so the common case (blocked already) is a thread-local load, not a call.
extern __thread int plexus_sigpipe_blocked;
void plexus_block_sigpipe_now(void);
static inline void plexus_block_sigpipe(void) {
    if (!plexus_sigpipe_blocked) plexus_block_sigpipe_now();
}

/// Undoes plexus_block_sigpipe on the calling thread (discarding a pending SIGPIPE first),
/// unless the thread had SIGPIPE blocked before. Backends call it when they go away; any
/// later backend call on the thread blocks it again before it can raise one.
void plexus_release_sigpipe(void);

/// Discards a SIGPIPE left pending on the calling thread by an EPIPE, so it is never
/// delivered should the thread unblock it later.
void plexus_discard_sigpipe(void);

/// The CPUs this thread may run on (sched_getaffinity, CPU_COUNT: taskset, cpusets), or
/// -errno (EINVAL on machines with more CPUs than a cpu_set_t holds).
int plexus_usable_cpus(void);

/// IORING_REGISTER_PROBE, once: `supported[op]` is 1 for each opcode the kernel supports
/// on this ring. 0, or -errno when the probe itself failed (EPERM from a seccomp profile
/// that refuses io_uring_register): a refused probe is not a missing opcode.
int plexus_probe_opcodes(struct io_uring *ring, unsigned char supported[256]);

/// io_uring_setup_buf_ring, which liburing 2.3 lacks: maps a ring of `entries` provided
/// buffers, registers it as group `group`, and initialises it. NULL and *error = -errno on failure.
struct io_uring_buf_ring *plexus_setup_buf_ring(struct io_uring *ring, unsigned entries, int group, int *error);
/// Unregisters group `group` and unmaps its ring.
int plexus_free_buf_ring(struct io_uring *ring, struct io_uring_buf_ring *br, unsigned entries, int group);

/// io_uring_enable_rings, declared by liburing 2.3 but missing from its library:
/// IORING_REGISTER_ENABLE_RINGS, which makes the calling thread the single issuer.
int plexus_enable_rings(struct io_uring *ring);

/// Number of CQEs the kernel dropped because the CQ ring was full (kernel counter).
unsigned plexus_cq_overflow(const struct io_uring *ring);

/// Called with the context given to plexus_task_add_cancellation_handler when that
/// task is cancelled, on the cancelling thread.
typedef void (*plexus_cancel_hook)(void *context);
/// Sets the one hook every cancellation record calls (the same function each time).
void plexus_set_task_cancel_hook(plexus_cancel_hook hook);
/// swift_task_addCancellationHandler for the current task: until the record is removed,
/// cancelling the task calls the hook with `context` (at once if already cancelled).
/// The same runtime call withTaskCancellationHandler makes, without its closure nesting.
const void *plexus_task_add_cancellation_handler(void *context);
/// swift_task_removeCancellationHandler: after it returns the hook no longer runs.
void plexus_task_remove_cancellation_handler(const void *record);
/// swift_task_getCurrent: the task running on this thread (NULL outside one). An
/// identity only, for telling tasks apart; never dereferenced.
const void *plexus_current_task(void);

#endif
