/* spin: calls clock_gettime in a loop and checks every result, for the
 * detach tests (the tracer leaves while calls are in flight; the target must
 * not notice).
 *
 *   spin RECORD [--seconds S] [--threads N]
 *
 * After the go byte, N threads (default 2) loop until S seconds of
 * CLOCK_MONOTONIC have passed since the go byte or, without --seconds, until
 * stdin gives a second byte or end of file: clock_gettime
 * (CLOCK_MONOTONIC) through the C library, which must return 0, a tv_nsec in
 * [0, 1e9) and a time not before the previous one of the same thread; and
 * gettimeofday, which must return 0 and a tv_usec in [0, 1e6). A result that
 * breaks a rule counts as bad.
 *
 * At the end it prints "calls=N bad=M" on stdout, writes the record
 *   {"calls": N, "bad": M, "threads": n, "seconds": S}
 * and exits 0 when M is 0, 1 otherwise.
 */
#include "common.h"

#include <pthread.h>
#include <sys/time.h>
#include <time.h>

struct spinner {
    pthread_t th;
    unsigned long long calls, bad;
};

static double seconds = -1;
static struct timespec start;
static pthread_barrier_t go_barrier;
static volatile int stop;

static void *spin_main(void *arg)
{
    struct spinner *s = arg;
    struct timespec prev;
    pthread_barrier_wait(&go_barrier);
    prev = start;
    while (!__atomic_load_n(&stop, __ATOMIC_RELAXED)) {
        checked_pair(&s->calls, &s->bad, &prev);
        if (seconds >= 0 &&
            (double)(prev.tv_sec - start.tv_sec) + (prev.tv_nsec - start.tv_nsec) / 1e9 >= seconds)
            break;
    }
    return NULL;
}

int main(int argc, char **argv)
{
    const char *sv;
    struct spinner *ss;
    unsigned long long calls = 0, bad = 0;
    int n, i;
    FILE *f;

    if (argc < 2)
        die("usage: spin RECORD [--seconds S] [--threads N]");
    sv = arg_value(argc, argv, "--seconds");
    if (sv)
        seconds = strtod(sv, NULL);
    n = (int)arg_long(argc, argv, "--threads", 2);
    if (n < 1)
        die("bad --threads");
    record_truncate(argv[1]);
    ss = calloc(n, sizeof *ss);
    if (!ss)
        die("out of memory");
    pthread_barrier_init(&go_barrier, NULL, n + 1);
    for (i = 0; i < n; i++)
        if (pthread_create(&ss[i].th, NULL, spin_main, &ss[i]))
            die("pthread_create failed");

    ready_and_wait();
    clock_gettime(CLOCK_MONOTONIC, &start);
    pthread_barrier_wait(&go_barrier);
    if (seconds < 0) {
        wait_stop_byte();
        __atomic_store_n(&stop, 1, __ATOMIC_RELAXED);
    }
    for (i = 0; i < n; i++) {
        pthread_join(ss[i].th, NULL);
        calls += ss[i].calls;
        bad += ss[i].bad;
    }

    printf("calls=%llu bad=%llu\n", calls, bad);
    fflush(stdout);
    f = record_open_append(argv[1]);
    fprintf(f, "{\"calls\": %llu, \"bad\": %llu, \"threads\": %d, \"seconds\": %g}\n", calls, bad,
            n, seconds);
    if (fclose(f))
        die("cannot write the record");
    return bad ? 1 : 0;
}
