// An LD_PRELOAD library for the tests: accept4(2) calls number PLEXUS_FAIL_FROM through
// PLEXUS_FAIL_FROM + PLEXUS_FAIL_COUNT - 1 (counted from 1 in this process) fail with errno
// PLEXUS_FAIL_ERRNO without reaching the kernel, so the connection stays queued. It
// stands in for errors the kernel gives rarely and on no cue (ECONNABORTED, EPROTO).
// Built by the test that uses it, with the toolchain's clang: cc -shared -fPIC -o x.so x.c -ldl
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdlib.h>
#include <sys/socket.h>

static long plexus_fail_calls;

int accept4(int fd, struct sockaddr *address, socklen_t *length, int flags) {
    static int (*real)(int, struct sockaddr *, socklen_t *, int);
    if (!real) real = (int (*)(int, struct sockaddr *, socklen_t *, int))dlsym(RTLD_NEXT, "accept4");
    const char *from = getenv("PLEXUS_FAIL_FROM"), *count = getenv("PLEXUS_FAIL_COUNT");
    const char *code = getenv("PLEXUS_FAIL_ERRNO");
    long n = __atomic_add_fetch(&plexus_fail_calls, 1, __ATOMIC_SEQ_CST);
    if (from && count && code && n >= atol(from) && n < atol(from) + atol(count)) {
        errno = atoi(code);
        return -1;
    }
    return real(fd, address, length, flags);
}
