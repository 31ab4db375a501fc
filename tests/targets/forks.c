/* forks: a process that forks, vforks, spawns and execs while traced, with a clock thread
 * that keeps calling the vDSO, for the tests that the tracee survives every way out.
 *
 *   forks RECORD [--mode M] [--count N] [--child-calls K]
 *
 * Setup: a clock thread is created; it waits for the go byte (a barrier), then calls
 * clock_gettime(CLOCK_MONOTONIC) and gettimeofday about every millisecond, checking each
 * result (0, a valid field range, monotonic), until told to stop.
 * After the go byte the main thread, N times (default 1):
 *   fork:       fork(); the child makes K (default 3) checked clock_gettime calls and exits
 *               0 if all were good (1 otherwise); the parent waits for it.
 *   vfork:      vfork() + execve("/bin/true").
 *   vforkslow:  prints "vforking", then vfork(); the child calls clock_gettime for K ms
 *               before its execve("/bin/true") (the parent waits in vfork meanwhile).
 *   spawn:      posix_spawn("/bin/true") (glibc: clone(CLONE_VM|CLONE_VFORK) + exec).
 *   forkexec:   fork() + execve("/bin/true") in the child.
 *   childloop:  fork(); the child exits 4 if a `/memfd:vdsotrace` mapping is in its
 *               /proc/self/maps, else calls clock_gettime K times (default 3), 200 us
 *               apart, checking each, and exits 0 if all were good.
 *   ringwrite:  fork(); the child looks for the recorder's ring (`vdsotrace-ring`) in its
 *               /proc/self/maps; if there, it writes K well-formed records into it (as the
 *               stubs would: claim HEAD, fill the slot, commit seq last); then makes K
 *               checked clock_gettime calls and exits 0 if all were good.
 * then prints "done <realtime ns>" on stdout (the CLOCK_REALTIME when the last
 * fork/spawn returned), and the main thread itself calls clock_gettime in a loop until
 * stdin gives a second byte or end of file. Then the clock thread is stopped and joined.
 *
 * At the end it prints "calls=C bad=B" and writes the record
 *   {"mode", "count", "children_failed", "ring_in_child", "calls", "bad",
 *    "calls_after_done", "done_ns"}
 * and exits 0 when nothing failed.
 */
#include "common.h"

#include <pthread.h>
#include <spawn.h>
#include <sys/select.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>

extern char **environ;

static pthread_barrier_t go_barrier;
static volatile int stop;
static volatile int done_flag;
static unsigned long long t_calls, t_bad, t_after;

static void *clock_main(void *arg)
{
    struct timespec prev = {0, 0}, nap = {0, 1000000};
    (void)arg;
    pthread_barrier_wait(&go_barrier);
    while (!__atomic_load_n(&stop, __ATOMIC_RELAXED)) {
        checked_pair(&t_calls, &t_bad, &prev);
        if (__atomic_load_n(&done_flag, __ATOMIC_RELAXED))
            t_after++;
        nanosleep(&nap, NULL);
    }
    return NULL;
}

static int checked_calls(int k, long gap_ns)
{
    struct timespec prev = {0, 0}, now, nap = {0, gap_ns};
    int i, bad = 0;
    for (i = 0; i < k; i++) {
        if (bad_timespec(clock_gettime(CLOCK_MONOTONIC, &now), &now, &prev))
            bad++;
        prev = now;
        if (gap_ns)
            nanosleep(&nap, NULL);
    }
    return bad;
}

/* The ring's layout (tracer/inject/layout.py). */
#define R_HEAD 0
#define R_TAIL 64
#define R_DATA 4096
#define R_SLOT 128
#define R_NSLOTS (1u << 16)

/* Is any of the recorder's memfds (`/memfd:vdsotrace-...`) mapped in this process? */
static int ours_mapped(void)
{
    FILE *m = fopen("/proc/self/maps", "r");
    char line[512];
    int found = 0;
    if (!m)
        return 0;
    while (fgets(line, sizeof line, m))
        if (strstr(line, "/memfd:vdsotrace"))
            found = 1;
    fclose(m);
    return found;
}

static int ring_flood(int k)
{
    FILE *m = fopen("/proc/self/maps", "r");
    char line[512];
    unsigned long lo = 0, hi = 0;
    int i;
    if (!m)
        return 0;
    while (fgets(line, sizeof line, m))
        if (strstr(line, "vdsotrace-ring") && sscanf(line, "%lx-%lx", &lo, &hi) == 2)
            break;
        else
            lo = 0;
    fclose(m);
    if (!lo)
        return 0;
    for (i = 0; i < k; i++) {
        unsigned char *ring = (unsigned char *)lo;
        uint64_t *head = (uint64_t *)(ring + R_HEAD), *tail = (uint64_t *)(ring + R_TAIL);
        uint64_t h = __atomic_load_n(head, __ATOMIC_RELAXED);
        unsigned char *slot;
        if (h - __atomic_load_n(tail, __ATOMIC_RELAXED) >= R_NSLOTS)
            continue;
        if (!__atomic_compare_exchange_n(head, &h, h + 1, 0, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED))
            continue;
        slot = ring + R_DATA + (h & (R_NSLOTS - 1)) * R_SLOT;
        memset(slot + 8, 0, R_SLOT - 8);
        *(uint32_t *)(slot + 8) = (uint32_t)gettid_raw();     /* tid */
        *(uint16_t *)(slot + 12) = 0;                         /* fid */
        __atomic_store_n((uint64_t *)slot, h + 1, __ATOMIC_RELEASE);
    }
    return 1;
}

int main(int argc, char **argv)
{
    const char *mode;
    int count, k, i, failed = 0, ring_seen = 0;
    unsigned long long main_calls = 0, main_bad = 0;
    struct timespec done_ts, prev = {0, 0}, now;
    pthread_t th;
    FILE *f;
    char c;

    if (argc < 2)
        die("usage: forks RECORD [--mode M] [--count N] [--child-calls K]");
    mode = arg_value(argc, argv, "--mode");
    if (!mode)
        mode = "fork";
    count = (int)arg_long(argc, argv, "--count", 1);
    k = (int)arg_long(argc, argv, "--child-calls", 3);
    record_truncate(argv[1]);
    pthread_barrier_init(&go_barrier, NULL, 2);
    if (pthread_create(&th, NULL, clock_main, NULL))
        die("pthread_create failed");

    ready_and_wait();
    pthread_barrier_wait(&go_barrier);
    for (i = 0; i < count; i++) {
        pid_t child;
        int status = 0;
        char *targv[] = {"/bin/true", NULL};
        if (strcmp(mode, "spawn") == 0) {
            if (posix_spawn(&child, "/bin/true", NULL, NULL, targv, environ) != 0)
                die("posix_spawn failed");
        } else if (strcmp(mode, "vfork") == 0 || strcmp(mode, "vforkslow") == 0) {
            int slow = strcmp(mode, "vforkslow") == 0;
            if (slow) {
                printf("vforking\n");
                fflush(stdout);
            }
            child = vfork();
            if (child == 0) {
                struct timespec t0, t;
                clock_gettime(CLOCK_MONOTONIC, &t0);
                t = t0;
                while (slow && (t.tv_sec - t0.tv_sec) * 1000000000LL + t.tv_nsec - t0.tv_nsec
                       < k * 1000000LL)
                    clock_gettime(CLOCK_MONOTONIC, &t);
                execve("/bin/true", targv, environ);
                _exit(127);
            }
        } else {
            child = fork();
            if (child == 0) {
                int bad;
                if (strcmp(mode, "forkexec") == 0) {
                    execve("/bin/true", targv, environ);
                    _exit(127);
                }
                if (strcmp(mode, "ringwrite") == 0 && ring_flood(k))
                    _exit(3);           /* the ring must not be there any more */
                if (strcmp(mode, "childloop") == 0 && ours_mapped())
                    _exit(4);
                bad = checked_calls(k, strcmp(mode, "childloop") == 0 ? 200000 : 0);
                _exit(bad ? 1 : 0);
            }
        }
        if (child < 0)
            die("fork failed");
        if (waitpid(child, &status, 0) != child)
            die("waitpid failed");
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
            failed++;
            if (WIFEXITED(status) && WEXITSTATUS(status) == 3)
                ring_seen++;
        }
    }
    clock_gettime(CLOCK_REALTIME, &done_ts);
    __atomic_store_n(&done_flag, 1, __ATOMIC_RELAXED);
    printf("done %lld\n", (long long)done_ts.tv_sec * 1000000000LL + done_ts.tv_nsec);
    fflush(stdout);

    /* the main thread calls the vDSO too, until a second byte or end of file */
    for (;;) {
        struct timespec nap = {0, 1000000};
        struct timeval zero = {0, 0};
        fd_set rd;
        FD_ZERO(&rd);
        FD_SET(0, &rd);
        if (select(1, &rd, NULL, NULL, &zero) > 0) {
            while (read(0, &c, 1) < 0 && errno == EINTR)
                ;
            break;
        }
        if (clock_gettime(CLOCK_MONOTONIC, &now) != 0 || ts_before(&now, &prev))
            main_bad++;
        prev = now;
        main_calls++;
        nanosleep(&nap, NULL);
    }
    __atomic_store_n(&stop, 1, __ATOMIC_RELAXED);
    pthread_join(th, NULL);

    printf("calls=%llu bad=%llu failed=%d\n", t_calls + main_calls, t_bad + main_bad, failed);
    fflush(stdout);
    f = record_open_append(argv[1]);
    fprintf(f, "{\"mode\": \"%s\", \"count\": %d, \"children_failed\": %d, \"ring_in_child\": %d, "
            "\"calls\": %llu, \"bad\": %llu, \"calls_after_done\": %llu, \"done_ns\": %lld}\n",
            mode, count, failed, ring_seen, t_calls + main_calls, t_bad + main_bad, t_after,
            (long long)done_ts.tv_sec * 1000000000LL + done_ts.tv_nsec);
    if (fclose(f))
        die("cannot write the record");
    return (t_bad + main_bad || failed) ? 1 : 0;
}
