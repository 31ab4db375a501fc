/* a64trace: the arm64 target of the stop-based engine's checks (tests/vm/test_trace_aarch64.py;
 * built for aarch64 with clang, run inside scripts/vm aarch64).
 *
 *   a64trace RECORD [--rounds R] [--fork] [--seccomp]
 *
 * Starts 2 worker threads (before the ready line: an attach finds 3 threads), prints
 * "ready <pid>", waits for the go byte, then each worker makes R rounds of calls of every
 * function the arm64 vDSO has, directly through its __kernel_* symbols and through the C
 * library (glibc 2.36 calls the vDSO's clock_gettime, gettimeofday and clock_getres; its
 * getrandom does not use the vDSO), including calls the vDSO answers by entering the kernel
 * (`svc #0` in it): CPU-time clocks, and __kernel_getrandom without opaque state. The
 * workers are joined and the record written. With --fork a child process (worker index 2)
 * then makes 3 rounds of __kernel_clock_gettime(CLOCK_MONOTONIC) and
 * (CLOCK_PROCESS_CPUTIME_ID), appends them to the record and exits 0; the parent records
 * {"child": pid, "status": wait status}. With --seccomp a filter of the program's own answers
 * getppid with SECCOMP_RET_TRACE (no tracer: the call fails with ENOSYS, kernel/seccomp.c),
 * installed before the ready line; getppid is called once then and once after the workers:
 * {"getppid": [ret, errno] untraced, "traced": [ret, errno]}. Then "done" is printed; the program waits for a
 * second byte (so that a tracer can leave while it still runs) and exits 0.
 *
 * Record (JSON lines), one per call in each worker's order:
 *   {"t": worker index, "tid", "func", "via": "vdso"|"libc", "args": {...}, "ret",
 *    "out": {...}, "fallback": true|false}
 * args/out as vdsotrace's JSON names them: clockid by name, pointers as "0x..." strings,
 * "tp"/"res": {"tv_sec", "tv_nsec"}, "tv": {"tv_sec", "tv_usec"}. "fallback" is what the
 * program knows of the call: the vDSO serves no CPU-time clock, and no getrandom without state.
 */
#include "common.h"

#include <linux/filter.h>
#include <linux/seccomp.h>
#include <pthread.h>
#include <stddef.h>
#include <sys/prctl.h>
#include <sys/wait.h>

typedef int (*gettime_fn)(clockid_t, struct timespec *);
typedef int (*gettimeofday_fn)(struct timeval *, void *);
typedef ssize_t (*getrandom_fn)(void *, size_t, unsigned int, void *, size_t);

#define MAX_CALLS 4096
#define LINE 512

static gettime_fn k_gettime, k_getres;
static gettimeofday_fn k_gettimeofday;
static getrandom_fn k_getrandom;
static long rounds;
static int go_pipe[2];

struct worker {
    int index;
    pid_t tid;
    pthread_t th;
    int n;
    char (*lines)[LINE];
};

static void rec(struct worker *w, const char *fmt, ...)
{
    va_list ap;
    if (w->n >= MAX_CALLS)
        die("too many calls");
    va_start(ap, fmt);
    vsnprintf(w->lines[w->n++], LINE, fmt, ap);
    va_end(ap);
}

static void clock_call(struct worker *w, const char *func, const char *via, gettime_fn fn,
                       clockid_t id, int fallback, const char *outname)
{
    struct timespec ts = {-1, -1};
    char cid[48];
    int r = fn(id, &ts);
    json_clockid(cid, sizeof cid, id);
    rec(w, "{\"t\": %d, \"tid\": %d, \"func\": \"%s\", \"via\": \"%s\", "
        "\"args\": {\"clockid\": %s, \"%s\": \"%#lx\"}, \"ret\": %d, "
        "\"out\": {\"%s\": {\"tv_sec\": %lld, \"tv_nsec\": %lld}}, \"fallback\": %s}",
        w->index, (int)w->tid, func, via, cid, outname, (unsigned long)&ts, r, outname,
        (long long)ts.tv_sec, (long long)ts.tv_nsec, fallback ? "true" : "false");
}

static void tod_call(struct worker *w, const char *via, gettimeofday_fn fn)
{
    struct timeval tv = {-1, -1};
    int r = fn(&tv, NULL);
    rec(w, "{\"t\": %d, \"tid\": %d, \"func\": \"gettimeofday\", \"via\": \"%s\", "
        "\"args\": {\"tv\": \"%#lx\", \"tz\": null}, \"ret\": %d, "
        "\"out\": {\"tv\": {\"tv_sec\": %lld, \"tv_usec\": %lld}}, \"fallback\": false}",
        w->index, (int)w->tid, via, (unsigned long)&tv, r, (long long)tv.tv_sec,
        (long long)tv.tv_usec);
}

static int libc_gettime(clockid_t id, struct timespec *ts) { return clock_gettime(id, ts); }
static int libc_getres(clockid_t id, struct timespec *ts) { return clock_getres(id, ts); }
static int libc_gettimeofday(struct timeval *tv, void *tz) { return gettimeofday(tv, tz); }

static void *work(void *arg)
{
    struct worker *w = arg;
    unsigned char buf[16];
    char c;
    long i;

    w->tid = gettid_raw();
    if (read(go_pipe[0], &c, 1) != 1)        /* released by main after the go byte */
        die("no go from main");
    for (i = 0; i < rounds; i++) {
        clock_call(w, "clock_gettime", "vdso", k_gettime, CLOCK_MONOTONIC, 0, "tp");
        clock_call(w, "clock_gettime", "vdso", k_gettime, CLOCK_REALTIME, 0, "tp");
        clock_call(w, "clock_gettime", "vdso", k_gettime, CLOCK_PROCESS_CPUTIME_ID, 1, "tp");
        tod_call(w, "vdso", k_gettimeofday);
        clock_call(w, "clock_getres", "vdso", k_getres, CLOCK_MONOTONIC, 0, "res");
        clock_call(w, "clock_getres", "vdso", k_getres, CLOCK_THREAD_CPUTIME_ID, 1, "res");
        if (k_getrandom) {
            /* no opaque state: lib/vdso/getrandom.c makes the getrandom system call */
            ssize_t r = k_getrandom(buf, sizeof buf, 0, NULL, 0);
            rec(w, "{\"t\": %d, \"tid\": %d, \"func\": \"getrandom\", \"via\": \"vdso\", "
                "\"args\": {\"buffer\": \"%#lx\", \"len\": %zu, \"flags\": 0, "
                "\"opaque_state\": null, \"opaque_len\": 0}, \"ret\": %zd, \"out\": {}, "
                "\"fallback\": true}", w->index, (int)w->tid, (unsigned long)buf, sizeof buf, r);
        }
        clock_call(w, "clock_gettime", "libc", libc_gettime, CLOCK_MONOTONIC, 0, "tp");
        clock_call(w, "clock_gettime", "libc", libc_gettime, CLOCK_THREAD_CPUTIME_ID, 1, "tp");
        tod_call(w, "libc", libc_gettimeofday);
        clock_call(w, "clock_getres", "libc", libc_getres, CLOCK_REALTIME, 0, "res");
    }
    return NULL;
}

static void own_seccomp_filter(void)
{
    struct sock_filter f[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_getppid, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_TRACE),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    struct sock_fprog prog = {sizeof f / sizeof f[0], f};
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 ||
        prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog) != 0)
        die("cannot install the seccomp filter");
}

int main(int argc, char **argv)
{
    long untraced = 0, traced = 0;
    int untraced_errno = 0, traced_errno = 0, seccomp;
    static struct worker workers[2];
    FILE *rec_file;
    char c;
    int i, j;

    if (argc < 2)
        die("usage: a64trace RECORD [--rounds R]");
    rounds = arg_long(argc, argv, "--rounds", 5);
    k_gettime = (gettime_fn)vdso_sym_required("__kernel_clock_gettime");
    k_getres = (gettime_fn)vdso_sym_required("__kernel_clock_getres");
    k_gettimeofday = (gettimeofday_fn)vdso_sym_required("__kernel_gettimeofday");
    k_getrandom = (getrandom_fn)vdso_sym("__kernel_getrandom");
    record_truncate(argv[1]);
    if (pipe(go_pipe) != 0)
        die("pipe");
    for (i = 0; i < 2; i++) {
        workers[i].index = i;
        workers[i].lines = calloc(MAX_CALLS, LINE);
        if (!workers[i].lines || pthread_create(&workers[i].th, NULL, work, &workers[i]) != 0)
            die("cannot start worker %d", i);
    }
    seccomp = arg_flag(argc, argv, "--seccomp");
    if (seccomp) {
        own_seccomp_filter();
        errno = 0;
        untraced = syscall(SYS_getppid);
        untraced_errno = errno;
    }
    ready_and_wait();
    if (write(go_pipe[1], "gg", 2) != 2)
        die("cannot release the workers");
    for (i = 0; i < 2; i++)
        pthread_join(workers[i].th, NULL);
    if (seccomp) {
        errno = 0;
        traced = syscall(SYS_getppid);
        traced_errno = errno;
    }
    rec_file = record_open_append(argv[1]);
    if (seccomp)
        fprintf(rec_file, "{\"getppid\": [%ld, %d], \"traced\": [%ld, %d]}\n", untraced,
                untraced_errno, traced, traced_errno);
    for (i = 0; i < 2; i++)
        for (j = 0; j < workers[i].n; j++)
            fprintf(rec_file, "%s\n", workers[i].lines[j]);
    fclose(rec_file);
    if (arg_flag(argc, argv, "--fork")) {
        static struct worker child = {.index = 2};
        int status = -1;
        pid_t pid;
        fflush(stdout);
        pid = fork();
        if (pid < 0)
            die("fork");
        if (pid == 0) {
            child.tid = gettid_raw();
            child.lines = calloc(MAX_CALLS, LINE);
            for (i = 0; i < 3; i++) {
                clock_call(&child, "clock_gettime", "vdso", k_gettime, CLOCK_MONOTONIC, 0, "tp");
                clock_call(&child, "clock_gettime", "vdso", k_gettime,
                           CLOCK_PROCESS_CPUTIME_ID, 1, "tp");
            }
            rec_file = record_open_append(argv[1]);
            for (j = 0; j < child.n; j++)
                fprintf(rec_file, "%s\n", child.lines[j]);
            fclose(rec_file);
            _exit(0);
        }
        if (waitpid(pid, &status, 0) != pid)
            die("waitpid");
        rec_file = record_open_append(argv[1]);
        fprintf(rec_file, "{\"child\": %d, \"status\": %d}\n", (int)pid, status);
        fclose(rec_file);
    }
    printf("done\n");
    fflush(stdout);
    while (read(0, &c, 1) < 0 && errno == EINTR)
        ;
    return 0;
}
