/* stamp: one clock_gettime(CLOCK_REALTIME) through the C library after the go
 * byte, recorded, so a test can compare an event's `time` (when the call was
 * entered) with the time the call itself returned.
 *
 *   stamp RECORD
 *
 * Record: {"tv_sec": S, "tv_nsec": N, "ret": R}. Exits 0 when R is 0.
 */
#include "common.h"

#include <time.h>

int main(int argc, char **argv)
{
    struct timespec ts = {0, 0};
    FILE *f;
    int r;

    if (argc != 2)
        die("usage: stamp RECORD");
    record_truncate(argv[1]);
    ready_and_wait();
    r = clock_gettime(CLOCK_REALTIME, &ts);
    f = record_open_append(argv[1]);
    fprintf(f, "{\"tv_sec\": %lld, \"tv_nsec\": %ld, \"ret\": %d}\n", (long long)ts.tv_sec,
            (long)ts.tv_nsec, r);
    fclose(f);
    return r != 0;
}
