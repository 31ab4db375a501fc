/*
 * bench_workload: the program scripts/bench traces.
 *
 * usage: bench_workload CALLS [GATE]
 *   CALLS  number of clock_gettime(CLOCK_MONOTONIC, &ts) calls made through the C library,
 *          which glibc serves from the vDSO (__vdso_clock_gettime).
 *   GATE   "-"  : before the loop, print "gate pid=P" on stderr and wait for one byte on stdin;
 *          PATH : the same, on the FIFO at PATH (open() blocks until a writer appears).
 *          A tracer can attach to the sleeping process and be ready before the first call.
 *
 * Prints one line on stdout: "bench_workload calls=N ns_per_call=X loop_s=Y backwards=B".
 * The loop is timed with the raw system call (syscall(SYS_clock_gettime)): it never enters the
 * vDSO, so a vDSO tracer sees exactly CALLS calls and ns_per_call includes all of its cost.
 * Exit status: 0, or 1 if the clock ever went backwards, 2 on bad usage or a failed gate.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static long long raw_monotonic_ns(void)
{
    struct timespec t;
    if (syscall(SYS_clock_gettime, CLOCK_MONOTONIC, &t) != 0)
        return -1;
    return (long long)t.tv_sec * 1000000000LL + t.tv_nsec;
}

static int wait_gate(const char *gate)
{
    char byte;
    int fd = 0;
    ssize_t got;

    fprintf(stderr, "gate pid=%ld\n", (long)getpid());
    fflush(stderr);
    if (strcmp(gate, "-") != 0) {
        fd = open(gate, O_RDONLY);
        if (fd < 0) {
            fprintf(stderr, "bench_workload: open %s: %s\n", gate, strerror(errno));
            return -1;
        }
    }
    do
        got = read(fd, &byte, 1);
    while (got < 0 && errno == EINTR);
    if (fd != 0)
        close(fd);
    return got < 0 ? -1 : 0;
}

int main(int argc, char **argv)
{
    struct timespec ts, last = {0, 0};
    long long start, stop;
    long calls, backwards = 0;
    char *end;

    if (argc < 2 || argc > 3) {
        fprintf(stderr, "usage: %s CALLS [- | FIFO]\n", argv[0]);
        return 2;
    }
    calls = strtol(argv[1], &end, 10);
    if (*end != '\0' || calls <= 0) {
        fprintf(stderr, "bench_workload: CALLS must be a positive integer, not %s\n", argv[1]);
        return 2;
    }
    if (argc == 3 && wait_gate(argv[2]) != 0)
        return 2;

    start = raw_monotonic_ns();
    for (long i = 0; i < calls; i++) {
        clock_gettime(CLOCK_MONOTONIC, &ts);
        if (ts.tv_sec < last.tv_sec || (ts.tv_sec == last.tv_sec && ts.tv_nsec < last.tv_nsec))
            backwards++;
        last = ts;
    }
    stop = raw_monotonic_ns();

    printf("bench_workload calls=%ld ns_per_call=%.3f loop_s=%.6f backwards=%ld\n",
           calls, (double)(stop - start) / (double)calls, (double)(stop - start) / 1e9, backwards);
    fflush(stdout);
    return backwards != 0;
}
