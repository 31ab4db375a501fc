/* scripts/bench's pause workload: a busy thread reading CLOCK_MONOTONIC through libc (the
 * vDSO) as fast as it can for SECONDS, which reports the largest gap between two consecutive
 * reads: how long it was held at once (by a tracer attaching, tracing, leaving; or by the
 * scheduler).
 *
 *   pause_workload SECONDS
 *
 * Prints "ready PID" at start, and at the end "gap END_NS LEN_NS" for every gap over 2 ms (END_NS
 * on CLOCK_MONOTONIC, at most 4096 of them) and "pause_workload maxgap_ns=G reads=N backwards=B";
 * exits 3 if the clock ever went backwards (a wrong result).
 */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    double secs = argc > 1 ? atof(argv[1]) : 4;
    struct timespec ts;
    long long start, prev, now, max = 0, n = 0, back = 0;
    static long long gap_end[4096], gap_len[4096];
    int ngaps = 0;

    printf("ready %d\n", (int)getpid());
    fflush(stdout);
    clock_gettime(CLOCK_MONOTONIC, &ts);
    start = prev = ts.tv_sec * 1000000000LL + ts.tv_nsec;
    for (;;) {
        clock_gettime(CLOCK_MONOTONIC, &ts);
        now = ts.tv_sec * 1000000000LL + ts.tv_nsec;
        if (now < prev)
            back++;
        if (now - prev > max)
            max = now - prev;
        if (now - prev > 2000000 && ngaps < 4096) {
            gap_end[ngaps] = now;
            gap_len[ngaps++] = now - prev;
        }
        prev = now;
        n++;
        if (now - start >= (long long)(secs * 1e9))
            break;
    }
    for (int i = 0; i < ngaps; i++)
        printf("gap %lld %lld\n", gap_end[i], gap_len[i]);
    printf("pause_workload maxgap_ns=%lld reads=%lld backwards=%lld\n", max, n, back);
    return back ? 3 : 0;
}
