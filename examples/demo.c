/* demo: the bundled example that `scripts/demo` traces.
 *
 * Two threads read the clocks the way real programs do -- through libc, which glibc sends
 * straight into the vDSO -- plus one call that always falls back to the kernel (a CPU-time
 * clock). Under vdsotrace every call shows up decoded; under strace none of them does. */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

static void *worker(void *arg)
{
    long id = (long)arg;
    struct timespec ts;
    struct timeval tv;
    for (int i = 0; i < 3; i++) {
        clock_gettime(CLOCK_MONOTONIC, &ts);
        clock_gettime(CLOCK_REALTIME, &ts);
        gettimeofday(&tv, NULL);
        usleep(1000 * (int)(id + 1));
    }
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);   /* a CPU-time clock: the kernel answers */
    return NULL;
}

int main(void)
{
    pthread_t t[2];
    struct timespec res;
    for (long i = 0; i < 2; i++)
        pthread_create(&t[i], NULL, worker, (void *)i);
    for (int i = 0; i < 2; i++)
        pthread_join(t[i], NULL);
    clock_getres(CLOCK_MONOTONIC, &res);
    printf("demo: time() says %ld, on CPU %d, clock resolution %ld ns\n",
           (long)time(NULL), sched_getcpu(), res.tv_nsec);
    return 0;
}
