/* ringattack: a process that attacks the --inject recorder's ring while it is traced.
 *
 *   ringattack RECORD MODE [--threads N]
 *
 * After the go byte, N threads (default 2) call clock_gettime and gettimeofday through the C
 * library in a loop, checking every result (as spin.c), until stdin gives a byte or end of
 * file. 200 ms after the go byte the main thread finds the ring by its name
 * (/memfd:vdsotrace-ring in /proc/self/maps: it is mapped read-write in this process) and:
 *   head     writes HEAD = 2^63 + 12345 (no stub reaches it)
 *   headnear writes HEAD = HEAD + 10 * 65536 (past anything a stub can claim)
 *   headback writes HEAD = 0 (behind TAIL)
 *   lost     writes the lost counter = 15038334544005518715
 *   truncate opens the ring through /proc/self/map_files and ftruncates it to 0, then to
 *            4096 (root only; a sealed memfd refuses with EPERM)
 *   chaos    writes random words all over the ring (header and slots) for one second (it
 *            must stop before the tracer unmaps the ring: run the trace for longer)
 * The ring header: HEAD at +0, TAIL at +64, lost at +128 (tracer/inject/layout.py).
 * At the end it prints "calls=N bad=M attack=RESULT" and writes
 *   {"calls": N, "bad": M, "attack": "RESULT"}
 * where RESULT is "done", "no-ring", or for truncate "truncate:ERRNO-NAME|ok".
 * Exit 0 when bad is 0.
 */
#include "common.h"

#include <fcntl.h>
#include <pthread.h>
#include <sys/time.h>
#include <time.h>

static volatile int stop;
static pthread_barrier_t go_barrier;

struct spinner { pthread_t th; unsigned long long calls, bad; };

static void *spin_main(void *arg)
{
    struct spinner *s = arg;
    struct timespec prev = {0, 0};
    pthread_barrier_wait(&go_barrier);
    while (!__atomic_load_n(&stop, __ATOMIC_RELAXED))
        checked_pair(&s->calls, &s->bad, &prev);
    return NULL;
}

static void *chaos_main(void *arg)
{
    unsigned char *ring = arg;
    unsigned long long x = 88172645463325252ULL;
    struct timespec t0, t;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (unsigned long k = 0;; k++) {
        if ((k & 1023) == 0) {
            syscall(SYS_clock_gettime, CLOCK_MONOTONIC, &t);    /* no vDSO call */
            if ((t.tv_sec - t0.tv_sec) * 1000000000LL + t.tv_nsec - t0.tv_nsec > 1000000000LL)
                break;
        }
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        /* the header (HEAD, TAIL, lost) half the time, else anywhere in the slots */
        size_t off = (x & 1) ? ((x >> 8) % 3) * 64 : 4096 + ((x >> 8) % (65536 * 128 / 8)) * 8;
        __atomic_store_n((unsigned long long *)(ring + off), x * 0x9E3779B97F4A7C15ULL,
                         __ATOMIC_RELAXED);
    }
    return NULL;
}

int main(int argc, char **argv)
{
    int n = (int)arg_long(argc, argv, "--threads", 2), i;
    struct spinner *sp;
    unsigned long long calls = 0, bad = 0;
    unsigned long lo = 0, hi = 0;
    const char *mode;
    char result[64] = "done";
    pthread_t chaos;
    int have_chaos = 0;
    FILE *f;

    if (argc < 3)
        die("usage: ringattack RECORD MODE [--threads N]");
    mode = argv[2];
    if (n < 1 || n > 64)
        die("--threads 1..64");
    record_truncate(argv[1]);
    sp = calloc(n, sizeof *sp);
    pthread_barrier_init(&go_barrier, NULL, n + 1);
    for (i = 0; i < n; i++)
        pthread_create(&sp[i].th, NULL, spin_main, &sp[i]);
    ready_and_wait();
    pthread_barrier_wait(&go_barrier);
    usleep(200000);
    if (!maps_find("/memfd:vdsotrace-ring", &lo, &hi)) {
        strcpy(result, "no-ring");
    } else {
        volatile unsigned long long *w = (volatile unsigned long long *)lo;
        if (strcmp(mode, "head") == 0) {
            w[0] = (1ULL << 63) + 12345;
        } else if (strcmp(mode, "headnear") == 0) {
            w[0] = w[0] + 10 * 65536ULL;
        } else if (strcmp(mode, "headback") == 0) {
            w[0] = 0;
        } else if (strcmp(mode, "lost") == 0) {
            w[16] = 15038334544005518715ULL;
        } else if (strcmp(mode, "truncate") == 0) {
            char path[128];
            int fd;
            snprintf(path, sizeof path, "/proc/self/map_files/%lx-%lx", lo, hi);
            fd = open(path, O_RDWR);
            if (fd < 0) {
                snprintf(result, sizeof result, "truncate:open:%s", strerrorname_np(errno));
            } else if (ftruncate(fd, 0) != 0 || ftruncate(fd, 4096) != 0) {
                snprintf(result, sizeof result, "truncate:%s", strerrorname_np(errno));
                close(fd);
            } else {
                strcpy(result, "truncate:ok");
                close(fd);
            }
        } else if (strcmp(mode, "chaos") == 0) {
            pthread_create(&chaos, NULL, chaos_main, (void *)lo);
            have_chaos = 1;
        } else {
            die("unknown mode %s", mode);
        }
    }
    wait_stop_byte();
    __atomic_store_n(&stop, 1, __ATOMIC_RELAXED);
    if (have_chaos)
        pthread_join(chaos, NULL);
    for (i = 0; i < n; i++) {
        pthread_join(sp[i].th, NULL);
        calls += sp[i].calls;
        bad += sp[i].bad;
    }
    printf("calls=%llu bad=%llu attack=%s\n", calls, bad, result);
    fflush(stdout);
    f = record_open_append(argv[1]);
    fprintf(f, "{\"calls\": %llu, \"bad\": %llu, \"attack\": \"%s\"}\n", calls, bad, result);
    fclose(f);
    return bad != 0;
}
