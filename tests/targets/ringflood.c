/* ringflood: another process that got hold of a traced process's recorder ring (root can,
 * through /proc/PID/map_files) and floods it with well-formed records of its own tid.
 *
 *   ringflood RECORD PID SECONDS
 *
 * Maps PID's `/memfd:vdsotrace-ring` MAP_SHARED, prints "ready <pid>", waits for the go
 * byte, then for SECONDS claims slots as the stubs do (HEAD by compare-and-swap, never
 * past TAIL + NSLOTS), fills them and commits seq last. Record: {"records": N}.
 */
#include "common.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <time.h>

#define R_HEAD 0
#define R_TAIL 64
#define R_DATA 4096
#define R_SLOT 128
#define R_NSLOTS (1u << 16)

int main(int argc, char **argv)
{
    char path[128], line[512];
    unsigned long lo = 0, hi = 0;
    unsigned long long n = 0;
    struct timespec t0, t;
    double secs;
    unsigned char *ring;
    FILE *m, *f;
    int fd;

    if (argc < 4)
        die("usage: ringflood RECORD PID SECONDS");
    secs = strtod(argv[3], NULL);
    record_truncate(argv[1]);
    snprintf(path, sizeof path, "/proc/%s/maps", argv[2]);
    m = fopen(path, "r");
    if (!m)
        die("cannot read %s", path);
    while (fgets(line, sizeof line, m))
        if (strstr(line, "/memfd:vdsotrace-ring") && sscanf(line, "%lx-%lx", &lo, &hi) == 2)
            break;
        else
            lo = 0;
    fclose(m);
    if (!lo)
        die("no vdsotrace-ring in %s", path);
    snprintf(path, sizeof path, "/proc/%s/map_files/%lx-%lx", argv[2], lo, hi);
    fd = open(path, O_RDWR);
    if (fd < 0)
        die("cannot open %s: %s", path, strerror(errno));
    ring = mmap(NULL, hi - lo, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (ring == MAP_FAILED)
        die("mmap failed");
    ready_and_wait();
    clock_gettime(CLOCK_MONOTONIC, &t0);
    do {
        int i;
        for (i = 0; i < 1000; i++) {
            uint64_t *head = (uint64_t *)(ring + R_HEAD), *tail = (uint64_t *)(ring + R_TAIL);
            uint64_t h = __atomic_load_n(head, __ATOMIC_RELAXED);
            unsigned char *slot;
            if (h - __atomic_load_n(tail, __ATOMIC_RELAXED) >= R_NSLOTS)
                continue;
            if (!__atomic_compare_exchange_n(head, &h, h + 1, 0, __ATOMIC_SEQ_CST,
                                             __ATOMIC_RELAXED))
                continue;
            slot = ring + R_DATA + (h & (R_NSLOTS - 1)) * R_SLOT;
            memset(slot + 8, 0, R_SLOT - 8);
            *(uint32_t *)(slot + 8) = (uint32_t)gettid_raw();
            __atomic_store_n((uint64_t *)slot, h + 1, __ATOMIC_RELEASE);
            n++;
        }
        clock_gettime(CLOCK_MONOTONIC, &t);
    } while ((t.tv_sec - t0.tv_sec) + (t.tv_nsec - t0.tv_nsec) / 1e9 < secs);
    f = record_open_append(argv[1]);
    fprintf(f, "{\"records\": %llu}\n", n);
    fclose(f);
    return 0;
}
