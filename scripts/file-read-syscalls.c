// What a page-cached 4 KiB read costs through each call Plexus could use, on this kernel.
// The numbers behind README, "Benchmarks", "File reads on io_uring".
//
//   gcc -O2 -o /tmp/file-read-syscalls scripts/file-read-syscalls.c -luring && /tmp/file-read-syscalls
//
// Prints ns per read, three rounds: pread(2); preadv2(2) without flags and with
// RWF_NOWAIT (what the io_uring backend does for a cached positional read); 32
// IORING_OP_READs per io_uring_enter (plexus-bench's raw-io_uring file-qd32); one per enter.
#define _GNU_SOURCE
#include <fcntl.h>
#include <liburing.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

enum { block = 4096, blocks = 256, reads = 400000, batch = 32 };

static double seconds(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static void report(const char *what, double start) {
    printf("%-28s %5.0f ns/read\n", what, (seconds() - start) / reads * 1e9);
}

static void reap(struct io_uring *ring, unsigned want) {
    io_uring_submit_and_wait(ring, want);
    struct io_uring_cqe *cqe;
    unsigned head, seen = 0;
    io_uring_for_each_cqe(ring, head, cqe) {
        if (cqe->res != block) { fprintf(stderr, "read returned %d\n", cqe->res); exit(1); }
        seen++;
    }
    io_uring_cq_advance(ring, seen);
}

int main(void) {
    char path[] = "/tmp/file-read-syscalls-XXXXXX";
    int fd = mkstemp(path);
    if (fd < 0) { perror("mkstemp"); return 1; }
    unlink(path);
    char *buffer = aligned_alloc(64, block * batch);
    for (int i = 0; i < blocks; i++) {  // written, so every page is in the cache
        for (int j = 0; j < block; j++) buffer[j] = (char)(i + j);
        if (pwrite(fd, buffer, block, (off_t)i * block) != block) { perror("pwrite"); return 1; }
    }
    struct io_uring ring;
    if (io_uring_queue_init(256, &ring, 0) < 0) { fprintf(stderr, "io_uring_queue_init failed\n"); return 1; }
    for (int round = 0; round < 3; round++) {
        double start = seconds();
        for (long i = 0; i < reads; i++) pread(fd, buffer, block, (i % blocks) * block);
        report("pread", start);
        start = seconds();
        for (long i = 0; i < reads; i++) {
            struct iovec v = {buffer, block};
            preadv2(fd, &v, 1, (i % blocks) * block, 0);
        }
        report("preadv2", start);
        start = seconds();
        for (long i = 0; i < reads; i++) {
            struct iovec v = {buffer, block};
            preadv2(fd, &v, 1, (i % blocks) * block, RWF_NOWAIT);
        }
        report("preadv2 RWF_NOWAIT", start);
        start = seconds();
        for (long i = 0; i < reads; i += batch) {
            for (int k = 0; k < batch; k++)
                io_uring_prep_read(io_uring_get_sqe(&ring), fd, buffer + k * block, block, ((i + k) % blocks) * block);
            reap(&ring, batch);
        }
        report("IORING_OP_READ, 32 per enter", start);
        start = seconds();
        for (long i = 0; i < reads; i++) {
            io_uring_prep_read(io_uring_get_sqe(&ring), fd, buffer, block, (i % blocks) * block);
            reap(&ring, 1);
        }
        report("IORING_OP_READ, 1 per enter", start);
    }
    io_uring_queue_exit(&ring);
    close(fd);
    free(buffer);
    return 0;
}
