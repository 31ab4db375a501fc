/* hotloop: threads in a hot vDSO loop, for the tests that kill the tracer mid-trace and for
 * processes whose TSC faults.
 *
 *   hotloop RECORD [--threads N] [--fallback] [--seconds S] [--notsc | --strict]
 *
 * After the go byte, N threads (default 2) loop until stdin gives end of file (or, with
 * --seconds, until S seconds of CLOCK_MONOTONIC_COARSE have passed): clock_gettime
 * (CLOCK_MONOTONIC), which must return 0, a tv_nsec in [0, 1e9) and a time not before the
 * previous one of the thread, and gettimeofday, which must return 0 and a tv_usec in
 * [0, 1e6). With --fallback each turn also reads CLOCK_PROCESS_CPUTIME_ID (always a system
 * call from the vDSO) and calls getppid() (a system call through __kernel_vsyscall on
 * i386), which must return the parent's pid.
 *
 * --notsc: prctl(PR_SET_TSC, PR_TSC_SIGSEGV) first (every thread inherits it: rdtsc then
 * raises SIGSEGV), and the threads call only time() and CLOCK_MONOTONIC_COARSE, which never
 * read the TSC. --strict: the main thread alone enters seccomp strict mode (read, write,
 * _exit and sigreturn only; the kernel disables the TSC), reads the go byte, calls time()
 * and CLOCK_MONOTONIC_COARSE until stdin gives end of file (or for S seconds) and leaves with
 * _exit.
 *
 * --hostile: installs (setting no_new_privs itself) a seccomp filter that kills the
 * process on any system call numbered 1000 or more, as allow-list sandboxes kill unknown
 * calls. --interval MS: each turn then sleeps MS milliseconds.
 *
 * A byte 'n' on stdin after the go byte makes every thread call prctl(PR_SET_TSC,
 * PR_TSC_SIGSEGV) for itself (while traced) and go on as with --notsc.
 *
 * At the end it prints "calls=N bad=M" on stdout, writes the record
 *   {"calls": N, "bad": M, "mode": "..."}
 * and exits 0 when M is 0, 1 otherwise.
 */
#include "common.h"

#include <fcntl.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stddef.h>
#include <pthread.h>
#include <sys/prctl.h>
#include <sys/time.h>
#include <time.h>

struct worker {
    pthread_t th;
    unsigned long long calls, bad;
};

static volatile int stop, late;
static int fallback, notsc;
static double seconds = -1;
static pid_t parent;
static long interval_ms;
static pthread_barrier_t go_barrier;

static double since(const struct timespec *a, const struct timespec *b)
{
    return (double)(b->tv_sec - a->tv_sec) + (b->tv_nsec - a->tv_nsec) / 1e9;
}

/* time() and the coarse clock: no TSC read, untraced. */
static void coarse_turn(unsigned long long *calls, unsigned long long *bad,
                        struct timespec *prev)
{
    struct timespec now;
    time_t t = time(NULL);
    (*calls)++;
    if (t < prev->tv_sec)
        (*bad)++;
    (*calls)++;
    if (bad_timespec(clock_gettime(CLOCK_MONOTONIC_COARSE, &now), &now, prev))
        (*bad)++;
    else if (now.tv_sec >= prev->tv_sec)
        *prev = now;
}

static void *work(void *arg)
{
    struct worker *w = arg;
    struct timespec prev = {0, 0}, now, start;
    int mine_notsc = notsc;
    pthread_barrier_wait(&go_barrier);
    clock_gettime(CLOCK_MONOTONIC_COARSE, &start);
    prev = start;
    while (!__atomic_load_n(&stop, __ATOMIC_RELAXED)) {
        if (!mine_notsc && __atomic_load_n(&late, __ATOMIC_RELAXED)) {
            if (prctl(PR_SET_TSC, PR_TSC_SIGSEGV) != 0)
                w->bad++;
            mine_notsc = 1;
            clock_gettime(CLOCK_MONOTONIC_COARSE, &prev);
        }
        if (mine_notsc) {
            coarse_turn(&w->calls, &w->bad, &prev);
            if (seconds >= 0 && since(&start, &prev) >= seconds)
                break;
            continue;
        }
        checked_pair(&w->calls, &w->bad, &prev);
        if (fallback) {
            int r = clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &now);
            w->calls++;
            if (bad_timespec(r, &now, NULL))
                w->bad++;
            w->calls++;
            if (getppid() != parent)
                w->bad++;
        }
        if (seconds >= 0 && since(&start, &prev) >= seconds)
            break;
        if (interval_ms)
            usleep((useconds_t)interval_ms * 1000);
    }
    return NULL;
}

static void put(int fd, const char *s)
{
    size_t n = strlen(s);
    while (n) {
        ssize_t k = write(fd, s, n);
        if (k <= 0)
            return;
        s += k;
        n -= (size_t)k;
    }
}

/* Seccomp strict mode: only read, write, _exit, sigreturn from here on. */
static void strict_main(int rec)
{
    unsigned long long calls = 0, bad = 0;
    struct timespec start, prev;
    char c, line[160];
    ssize_t n;
    int pid = (int)getpid();
    /* (fcntl is not allowed in strict mode: stdin non-blocking from here, so that the loop
     * can look for its end of file between turns) */
    if (fcntl(0, F_SETFL, fcntl(0, F_GETFL) | O_NONBLOCK) != 0)
        die("cannot make stdin non-blocking");
    if (prctl(PR_SET_SECCOMP, SECCOMP_MODE_STRICT) != 0)
        die("cannot enter seccomp strict mode");
    snprintf(line, sizeof line, "ready %d\n", pid);
    put(1, line);                              /* a write: stdio could fstat first */
    do {
        n = read(0, &c, 1);
    } while (n < 0 && (errno == EINTR || errno == EAGAIN));
    if (n != 1)
        syscall(SYS_exit, 2);
    clock_gettime(CLOCK_MONOTONIC_COARSE, &start);
    prev = start;
    for (;;) {
        coarse_turn(&calls, &bad, &prev);
        if (seconds >= 0 ? since(&start, &prev) >= seconds
                         : (calls & 255) == 0 && read(0, &c, 1) == 0)
            break;
    }
    snprintf(line, sizeof line, "calls=%llu bad=%llu\n", calls, bad);
    put(1, line);
    snprintf(line, sizeof line, "{\"calls\": %llu, \"bad\": %llu, \"mode\": \"strict\"}\n",
             calls, bad);
    put(rec, line);
    syscall(SYS_exit, bad ? 1 : 0);
}

int main(int argc, char **argv)
{
    const char *sv;
    struct worker *ws;
    unsigned long long calls = 0, bad = 0;
    int n, i;
    FILE *f;

    if (argc < 2)
        die("usage: hotloop RECORD [--threads N] [--fallback] [--seconds S] [--notsc|--strict]");
    sv = arg_value(argc, argv, "--seconds");
    if (sv)
        seconds = strtod(sv, NULL);
    n = (int)arg_long(argc, argv, "--threads", 2);
    fallback = arg_flag(argc, argv, "--fallback");
    notsc = arg_flag(argc, argv, "--notsc");
    parent = getppid();
    record_truncate(argv[1]);
    if (arg_flag(argc, argv, "--strict")) {
        int rec = open(argv[1], O_WRONLY | O_APPEND);
        if (rec < 0)
            die("cannot open the record");
        strict_main(rec);
    }
    interval_ms = arg_long(argc, argv, "--interval", 0);
    if (arg_flag(argc, argv, "--hostile")) {
        struct sock_filter f[] = {
            BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
            BPF_JUMP(BPF_JMP | BPF_JGE | BPF_K, 1000, 0, 1),
            BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS),
            BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
        };
        struct sock_fprog prog = {sizeof f / sizeof f[0], f};
        if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 ||
            prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog) != 0)
            die("cannot install the hostile filter");
    }
    if (notsc && prctl(PR_SET_TSC, PR_TSC_SIGSEGV) != 0)
        die("prctl(PR_SET_TSC) failed");
    if (n < 1)
        die("bad --threads");
    ws = calloc(n, sizeof *ws);
    if (!ws)
        die("out of memory");
    pthread_barrier_init(&go_barrier, NULL, n + 1);
    for (i = 0; i < n; i++)
        if (pthread_create(&ws[i].th, NULL, work, &ws[i]))
            die("pthread_create failed");
    ready_and_wait();
    pthread_barrier_wait(&go_barrier);
    if (seconds < 0) {
        char c;
        for (;;) {
            ssize_t k = read(0, &c, 1);
            if (k == 0 || (k < 0 && errno != EINTR))
                break;
            if (k == 1 && c == 'n')
                __atomic_store_n(&late, 1, __ATOMIC_RELAXED);
        }
        __atomic_store_n(&stop, 1, __ATOMIC_RELAXED);
    }
    for (i = 0; i < n; i++) {
        pthread_join(ws[i].th, NULL);
        calls += ws[i].calls;
        bad += ws[i].bad;
    }
    printf("calls=%llu bad=%llu\n", calls, bad);
    fflush(stdout);
    f = record_open_append(argv[1]);
    fprintf(f, "{\"calls\": %llu, \"bad\": %llu, \"mode\": \"%s\"}\n", calls, bad,
            notsc ? "notsc" : fallback ? "fallback" : "plain");
    if (fclose(f))
        die("cannot write the record");
    return bad ? 1 : 0;
}
