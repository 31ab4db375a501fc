/* threadmake: how long pthread_create takes while other threads keep calling the vDSO.
 *
 *   threadmake RECORD [--hot N] [--create M]
 *
 * After the go byte, N threads (default 4) call clock_gettime(CLOCK_MONOTONIC) through the
 * C library in a tight loop; the main thread then creates M threads (default 100), one at a
 * time, each of which makes one clock_gettime call and exits, and joins each. Every
 * pthread_create is timed with the raw clock_gettime system call (no vDSO call of its own).
 * At the end it prints "created=M mean_us=X median_us=Z max_us=Y hot_calls=C" and writes
 *   {"created": M, "mean_us": X, "median_us": Z, "max_us": Y, "hot_calls": C}
 */
#include "common.h"

#include <pthread.h>
#include <time.h>

static volatile int stop;
static unsigned long long hot_calls[64];

static double now_us(void)
{
    struct timespec t;
    syscall(SYS_clock_gettime, CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

static void *hot(void *arg)
{
    int i = (int)(intptr_t)arg;
    struct timespec t;
    while (!__atomic_load_n(&stop, __ATOMIC_RELAXED)) {
        clock_gettime(CLOCK_MONOTONIC, &t);
        hot_calls[i]++;
    }
    return NULL;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static void *brief(void *arg)
{
    struct timespec t;
    (void)arg;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return NULL;
}

int main(int argc, char **argv)
{
    int n = (int)arg_long(argc, argv, "--hot", 4);
    int m = (int)arg_long(argc, argv, "--create", 100);
    pthread_t hots[64], t;
    double sum = 0, max = 0, *each, median;
    unsigned long long calls = 0;
    FILE *f;

    if (argc < 2 || n < 0 || n > 64 || m < 1)
        die("usage: threadmake RECORD [--hot 0..64] [--create M>0]");
    record_truncate(argv[1]);
    each = calloc(m, sizeof *each);
    ready_and_wait();
    for (int i = 0; i < n; i++)
        pthread_create(&hots[i], NULL, hot, (void *)(intptr_t)i);
    usleep(100000);
    for (int k = 0; k < m; k++) {
        double t0 = now_us(), dt;
        if (pthread_create(&t, NULL, brief, NULL) != 0)
            die("pthread_create");
        dt = now_us() - t0;
        sum += dt;
        each[k] = dt;
        if (dt > max)
            max = dt;
        pthread_join(t, NULL);
    }
    __atomic_store_n(&stop, 1, __ATOMIC_RELAXED);
    for (int i = 0; i < n; i++) {
        pthread_join(hots[i], NULL);
        calls += hot_calls[i];
    }
    qsort(each, m, sizeof *each, cmp_double);
    median = each[m / 2];
    printf("created=%d mean_us=%.1f median_us=%.1f max_us=%.1f hot_calls=%llu\n", m, sum / m,
           median, max, calls);
    fflush(stdout);
    f = record_open_append(argv[1]);
    fprintf(f, "{\"created\": %d, \"mean_us\": %.1f, \"median_us\": %.1f, \"max_us\": %.1f, "
            "\"hot_calls\": %llu}\n", m, sum / m, median, max, calls);
    fclose(f);
    return 0;
}
