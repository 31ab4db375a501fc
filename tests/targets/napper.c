/* napper: threads that read the clock and then nap, so that most of the time
 * each sits in a system call (clock_nanosleep, through __kernel_vsyscall on
 * i386) with the stale stack words of its last vDSO call just above its stack
 * pointer: what a tracer leaving must not take for a call still in flight.
 *
 *   napper RECORD [--threads N] [--nap US]
 *
 * After the go byte, N threads (default 2) loop until stdin gives a second
 * byte or end of file: clock_gettime(CLOCK_MONOTONIC), which must return 0, a
 * tv_nsec in [0, 1e9) and a time not before the previous one of the thread;
 * gettimeofday, which must return 0 and a tv_usec in [0, 1e6); then usleep(US)
 * (default 100). A result that breaks a rule counts as bad.
 *
 * At the end it prints "calls=N bad=M" on stdout, writes the record
 *   {"calls": N, "bad": M, "threads": n}
 * and exits 0 when M is 0, 1 otherwise.
 */
#include "common.h"

#include <pthread.h>
#include <sys/time.h>
#include <time.h>

struct napper {
    pthread_t th;
    unsigned long long calls, bad;
};

static long nap_us = 100;
static pthread_barrier_t go_barrier;
static volatile int stop;

static void *nap_main(void *arg)
{
    struct napper *s = arg;
    struct timespec prev = {0, 0};
    pthread_barrier_wait(&go_barrier);
    while (!__atomic_load_n(&stop, __ATOMIC_RELAXED)) {
        checked_pair(&s->calls, &s->bad, &prev);
        usleep(nap_us);
    }
    return NULL;
}

int main(int argc, char **argv)
{
    struct napper *ss;
    unsigned long long calls = 0, bad = 0;
    int n, i;
    FILE *f;

    if (argc < 2)
        die("usage: napper RECORD [--threads N] [--nap US]");
    n = (int)arg_long(argc, argv, "--threads", 2);
    nap_us = arg_long(argc, argv, "--nap", 100);
    if (n < 1 || nap_us < 0)
        die("bad --threads or --nap");
    record_truncate(argv[1]);
    ss = calloc(n, sizeof *ss);
    if (!ss)
        die("out of memory");
    pthread_barrier_init(&go_barrier, NULL, n + 1);
    for (i = 0; i < n; i++)
        if (pthread_create(&ss[i].th, NULL, nap_main, &ss[i]))
            die("pthread_create failed");

    ready_and_wait();
    pthread_barrier_wait(&go_barrier);
    wait_stop_byte();
    __atomic_store_n(&stop, 1, __ATOMIC_RELAXED);
    for (i = 0; i < n; i++) {
        pthread_join(ss[i].th, NULL);
        calls += ss[i].calls;
        bad += ss[i].bad;
    }

    printf("calls=%llu bad=%llu\n", calls, bad);
    fflush(stdout);
    f = record_open_append(argv[1]);
    fprintf(f, "{\"calls\": %llu, \"bad\": %llu, \"threads\": %d}\n", calls, bad, n);
    if (fclose(f))
        die("cannot write the record");
    return bad ? 1 : 0;
}
