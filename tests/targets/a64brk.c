/* a64brk: the target of the arm64 breakpoint test (tests/vm/test_ptrace_aarch64.py).
 *
 *   a64brk RECORD [--warm N]
 *
 * Calls the vDSO's __kernel_clock_gettime (by its own symbol) N times with CLOCK_MONOTONIC, so
 * its code is hot in the instruction cache and translated, prints "ready <pid> <entry>"
 * (entry: the function's address, hex) and waits for the go byte; then makes ONE call with
 * CLOCK_REALTIME (the call the tracer stops at), then N calls with CLOCK_MONOTONIC again, each
 * checked to be monotonic, then two getppid system calls (syscall(SYS_getppid): the tracer
 * changes the first one's x8 and the second one's NT_ARM_SYSTEM_CALL to getpid). Record (one
 * JSON line): {"entry", "probe": {ret, sec, nsec}, "after"/"before": {"calls", "failed",
 * "backwards"}, "pid", "ppid" (both read before "ready"), "getppid": [first, second]}, exit 0.
 */
#include "common.h"

#include <time.h>

typedef int (*gettime_fn)(long, struct timespec *);

static int warm(gettime_fn f, long n, long *failed, long *backwards)
{
    struct timespec prev = {0, 0}, ts;
    long i;
    for (i = 0; i < n; i++) {
        if (f(CLOCK_MONOTONIC, &ts) != 0) {
            (*failed)++;
            continue;
        }
        if (ts.tv_sec < prev.tv_sec || (ts.tv_sec == prev.tv_sec && ts.tv_nsec < prev.tv_nsec))
            (*backwards)++;
        prev = ts;
    }
    return 0;
}

int main(int argc, char **argv)
{
    gettime_fn f;
    struct timespec ts = {-1, -1};
    long n, failed = 0, backwards = 0, f0 = 0, b0 = 0, pid, ppid, got1, got2;
    int ret;
    FILE *rec;

    if (argc < 2)
        die("usage: a64brk RECORD [--warm N]");
    n = arg_long(argc, argv, "--warm", 10000);
    record_truncate(argv[1]);
    f = (gettime_fn)vdso_sym_required("__kernel_clock_gettime");
    warm(f, n, &f0, &b0);
    pid = getpid();
    ppid = getppid();
    printf("ready %d %lx\n", (int)getpid(), (unsigned long)f);
    fflush(stdout);
    {
        char c;
        ssize_t r;
        do {
            r = read(0, &c, 1);
        } while (r < 0 && errno == EINTR);
        if (r != 1)
            die("no go byte on stdin");
    }
    ret = f(CLOCK_REALTIME, &ts);
    warm(f, n, &failed, &backwards);
    got1 = syscall(SYS_getppid);
    got2 = syscall(SYS_getppid);
    rec = record_open_append(argv[1]);
    fprintf(rec, "{\"entry\": %lu, \"probe\": {\"ret\": %d, \"sec\": %lld, \"nsec\": %lld}, "
            "\"after\": {\"calls\": %ld, \"failed\": %ld, \"backwards\": %ld}, "
            "\"before\": {\"calls\": %ld, \"failed\": %ld, \"backwards\": %ld}, "
            "\"pid\": %ld, \"ppid\": %ld, \"getppid\": [%ld, %ld]}\n",
            (unsigned long)f, ret, (long long)ts.tv_sec, (long long)ts.tv_nsec, n, failed,
            backwards, n, f0, b0, pid, ppid, got1, got2);
    fclose(rec);
    return 0;
}
