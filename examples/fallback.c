/* fallback: calls that go through the vDSO but end in the kernel anyway.
 *
 *   gcc -O1 -o build/fallback examples/fallback.c
 *   vdsotrace trace -c -- build/fallback
 *
 * CLOCK_PROCESS_CPUTIME_ID and CLOCK_THREAD_CPUTIME_ID are CPU-time clocks, which only the
 * kernel can answer; clock id 12345 is invalid (the vDSO asks the kernel, which says EINVAL).
 * The -c report counts them per reason and ends with a diagnosis. */
#include <stdio.h>
#include <time.h>

int main(void)
{
    struct timespec ts;
    for (int i = 0; i < 100; i++) {
        clock_gettime(CLOCK_MONOTONIC, &ts);                 /* served in user space */
        clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);        /* always the kernel */
        clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);         /* always the kernel */
    }
    int r = clock_gettime((clockid_t)12345, &ts);            /* invalid: EINVAL */
    printf("fallback: invalid clock gave %d\n", r);
    return 0;
}
