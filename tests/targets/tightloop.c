/* tightloop: a fixed number of clock_gettime calls as fast as they go, for the tests of
 * lossless --inject (every call recorded, the tracee slowed to the tracer's pace).
 *
 *   tightloop RECORD [--calls N] [--threads T]
 *
 * After the go byte, T threads (default 1) each call clock_gettime(CLOCK_MONOTONIC) N times
 * (default 3000000) through the C library, checking that it returns 0, a tv_nsec in
 * [0, 1e9) and a time not before the thread's previous one. Nothing else calls into the
 * vDSO between the go byte and the end of the loops.
 *
 * At the end it prints "calls=C bad=B" on stdout (C = T * N), writes the record
 *   {"calls": C, "bad": B, "threads": T, "seconds": S}
 * (S: the loops' wall time, measured with the raw system call) and exits 0 when B is 0.
 */
#include "common.h"

#include <pthread.h>
#include <time.h>

struct looper {
    pthread_t th;
    unsigned long long calls, bad;
};

static unsigned long long ncalls = 3000000;
static pthread_barrier_t go_barrier;

static double raw_now(void)
{
    struct timespec t;
    syscall(SYS_clock_gettime, CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + t.tv_nsec / 1e9;
}

static void *loop_main(void *arg)
{
    struct looper *w = arg;
    struct timespec prev = {0, 0}, t;
    pthread_barrier_wait(&go_barrier);
    for (unsigned long long i = 0; i < ncalls; i++) {
        int r = clock_gettime(CLOCK_MONOTONIC, &t);
        if (r != 0 || t.tv_nsec < 0 || t.tv_nsec >= 1000000000 || t.tv_sec < prev.tv_sec
            || (t.tv_sec == prev.tv_sec && t.tv_nsec < prev.tv_nsec))
            w->bad++;
        prev = t;
        w->calls++;
    }
    return NULL;
}

int main(int argc, char **argv)
{
    int nthreads = 1;
    if (argc < 2)
        die("usage: tightloop RECORD [--calls N] [--threads T]");
    for (int i = 2; i < argc; i++) {
        if (!strcmp(argv[i], "--calls") && i + 1 < argc)
            ncalls = strtoull(argv[++i], NULL, 10);
        else if (!strcmp(argv[i], "--threads") && i + 1 < argc)
            nthreads = atoi(argv[++i]);
        else
            die("unknown argument %s", argv[i]);
    }
    if (nthreads < 1 || nthreads > 64)
        die("--threads must be 1..64");
    record_truncate(argv[1]);
    struct looper *w = calloc(nthreads, sizeof *w);
    if (!w)
        die("out of memory");
    pthread_barrier_init(&go_barrier, NULL, nthreads + 1);
    for (int i = 0; i < nthreads; i++)
        if (pthread_create(&w[i].th, NULL, loop_main, &w[i]))
            die("pthread_create failed");
    ready_and_wait();
    double t0 = raw_now();
    pthread_barrier_wait(&go_barrier);
    unsigned long long calls = 0, bad = 0;
    for (int i = 0; i < nthreads; i++) {
        pthread_join(w[i].th, NULL);
        calls += w[i].calls;
        bad += w[i].bad;
    }
    double secs = raw_now() - t0;
    printf("calls=%llu bad=%llu\n", calls, bad);
    fflush(stdout);
    FILE *f = record_open_append(argv[1]);
    fprintf(f, "{\"calls\": %llu, \"bad\": %llu, \"threads\": %d, \"seconds\": %.6f}\n",
            calls, bad, nthreads, secs);
    fclose(f);
    return bad ? 1 : 0;
}
