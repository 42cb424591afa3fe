// plexus-nouring COMMAND [ARG...]
//
// Runs COMMAND under a seccomp filter that makes io_uring_setup(2) fail with EPERM, as
// Docker's default profile does, so the fallback from io_uring to epoll can be tested
// through the real mechanism. PLEXUS_NOURING_ERRNO picks another errno (e.g. 38 = ENOSYS).
// PLEXUS_NOURING_CALL=register refuses io_uring_register(2) instead, as a profile that
// allows setup but not registration would: the ring starts, its opcode probe fails.
// PLEXUS_NOURING_NO_EPOLL_PWAIT2=1 also makes epoll_pwait2(2) fail with ENOSYS, as on
// kernels before 5.11, whose epoll backend must fall back to epoll_wait; =EPERM with
// EPERM, as seccomp profiles older than the call do.
// The filter is inherited across execve; NO_NEW_PRIVS lets an unprivileged user install it.
#include <errno.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#if defined(__x86_64__)
#define PLEXUS_AUDIT_ARCH AUDIT_ARCH_X86_64
#elif defined(__aarch64__)
#define PLEXUS_AUDIT_ARCH AUDIT_ARCH_AARCH64
#else
#error "plexus-nouring: add this architecture's AUDIT_ARCH"
#endif

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: plexus-nouring COMMAND [ARG...]\n");
        return 2;
    }
    int denied = EPERM;
    const char *chosen = getenv("PLEXUS_NOURING_ERRNO");
    if (chosen) denied = atoi(chosen);
    unsigned refused = __NR_io_uring_setup;
    const char *call = getenv("PLEXUS_NOURING_CALL");
    if (call && strcmp(call, "register") == 0) refused = __NR_io_uring_register;
    // A syscall number no syscall has, unless epoll_pwait2 is to be refused too.
    unsigned noPwait2 = 0xffffffffu;
    int pwait2Errno = ENOSYS;
    const char *pwait2 = getenv("PLEXUS_NOURING_NO_EPOLL_PWAIT2");
    if (pwait2 && strcmp(pwait2, "1") == 0) noPwait2 = __NR_epoll_pwait2;
    if (pwait2 && strcmp(pwait2, "EPERM") == 0) {
        noPwait2 = __NR_epoll_pwait2;
        pwait2Errno = EPERM;
    }

    struct sock_filter filter[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, PLEXUS_AUDIT_ARCH, 1, 0),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, refused, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | (denied & SECCOMP_RET_DATA)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, noPwait2, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | (pwait2Errno & SECCOMP_RET_DATA)),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    struct sock_fprog program = {.len = sizeof(filter) / sizeof(filter[0]), .filter = filter};
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) {
        perror("plexus-nouring: prctl(PR_SET_NO_NEW_PRIVS)");
        return 126;
    }
    if (prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &program) != 0) {
        perror("plexus-nouring: prctl(PR_SET_SECCOMP)");
        return 126;
    }
    execvp(argv[1], argv + 1);
    fprintf(stderr, "plexus-nouring: execvp(%s): %s\n", argv[1], strerror(errno));
    return 127;
}
