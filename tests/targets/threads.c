/* threads: threads, a fork and an exec that all happen after the go byte, so
 * the tracer must follow clone, fork (with -f) and exec.
 *
 *   threads RECORD [--threads T] [--calls K] [--fork] [--exec]
 *
 * After the go byte: the main thread makes K (default 5) clock_gettime
 * (CLOCK_MONOTONIC) calls through the C library, then creates T (default 3)
 * threads, each making K such calls, and joins them.
 * --fork: then forks a child that makes K calls, appends its own lines to the
 *   record and exits 0; the parent waits for it.
 * --exec: after writing its record, the process execs itself
 *   (/proc/self/exe, or the --exec-path P binary: the other ABI's build) with --after-exec, and the new image makes K more calls
 *   in the same thread (same pid and tid) and appends them.
 *
 * Record, one JSON line each, every line appended with O_APPEND:
 *   {"kind": "call", "phase": "main"|"thread"|"child"|"after-exec",
 *    "pid", "tid", "seq", "func": "clock_gettime", "symbol": "__vdso_clock_gettime",
 *    "clockid": "CLOCK_MONOTONIC", "ret", "tv_sec", "tv_nsec", "fallback": false}
 *   {"kind": "fork", "pid": parent, "child": pid, "status": exit status}
 *   {"kind": "exec", "pid", "tid", "path": "/proc/self/exe"}   (before exec)
 */
#include "common.h"

#include <pthread.h>
#include <sys/wait.h>
#include <time.h>

#define MAX_K 256

struct batch {
    const char *phase;
    pid_t pid, tid;
    int n;
    int ret[MAX_K];
    struct timespec ts[MAX_K];
    pthread_t th;
};

static int K = 5;

static void run_batch(struct batch *b)
{
    int i;
    b->pid = getpid();
    b->tid = gettid_raw();
    for (i = 0; i < K; i++) {
        b->ts[i].tv_sec = -1;
        b->ts[i].tv_nsec = -1;
        b->ret[i] = clock_gettime(CLOCK_MONOTONIC, &b->ts[i]);
    }
    b->n = K;
}

static void *thread_main(void *arg)
{
    run_batch(arg);
    return NULL;
}

static void write_batch(FILE *f, const struct batch *b)
{
    int i;
    for (i = 0; i < b->n; i++)
        fprintf(f, "{\"kind\": \"call\", \"phase\": \"%s\", \"pid\": %d, \"tid\": %d, "
                   "\"seq\": %d, \"func\": \"clock_gettime\", \"symbol\": \"__vdso_clock_gettime\", "
                   "\"clockid\": \"CLOCK_MONOTONIC\", \"ret\": %d, \"tv_sec\": %lld, "
                   "\"tv_nsec\": %lld, \"fallback\": false}\n",
                b->phase, (int)b->pid, (int)b->tid, i, b->ret[i],
                (long long)b->ts[i].tv_sec, (long long)b->ts[i].tv_nsec);
}

static int write_record(const char *path, const struct batch *bs, int n)
{
    FILE *f = record_open_append(path);
    int i;
    for (i = 0; i < n; i++)
        write_batch(f, &bs[i]);
    return fclose(f);
}

int main(int argc, char **argv)
{
    int nthreads, do_fork, do_exec, i;
    struct batch *bs;
    FILE *f;

    if (argc < 2)
        die("usage: threads RECORD [--threads T] [--calls K] [--fork] [--exec]");
    nthreads = (int)arg_long(argc, argv, "--threads", 3);
    K = (int)arg_long(argc, argv, "--calls", 5);
    do_fork = arg_flag(argc, argv, "--fork");
    do_exec = arg_flag(argc, argv, "--exec");
    if (nthreads < 0 || K < 1 || K > MAX_K)
        die("bad --threads or --calls");

    if (arg_flag(argc, argv, "--after-exec")) {
        struct batch b = { .phase = "after-exec" };
        run_batch(&b);
        if (write_record(argv[1], &b, 1))
            die("cannot write the record");
        return 0;
    }

    bs = calloc(nthreads + 1, sizeof *bs);
    if (!bs)
        die("out of memory");
    record_truncate(argv[1]);

    ready_and_wait();

    bs[0].phase = "main";
    run_batch(&bs[0]);
    for (i = 1; i <= nthreads; i++) {
        bs[i].phase = "thread";
        if (pthread_create(&bs[i].th, NULL, thread_main, &bs[i]))
            die("pthread_create failed");
    }
    for (i = 1; i <= nthreads; i++)
        pthread_join(bs[i].th, NULL);

    if (do_fork) {
        int status;
        pid_t child = fork();
        if (child < 0)
            die("fork failed");
        if (child == 0) {
            struct batch b = { .phase = "child" };
            run_batch(&b);
            _exit(write_record(argv[1], &b, 1) ? 3 : 0);
        }
        if (waitpid(child, &status, 0) != child)
            die("waitpid failed");
        f = record_open_append(argv[1]);
        fprintf(f, "{\"kind\": \"fork\", \"pid\": %d, \"child\": %d, \"status\": %d}\n",
                (int)getpid(), (int)child, WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status));
        fclose(f);
    }

    if (write_record(argv[1], bs, nthreads + 1))
        die("cannot write the record");

    if (do_exec) {
        char kbuf[16];
        char *args[] = { argv[0], argv[1], "--after-exec", "--calls", kbuf, NULL };
        snprintf(kbuf, sizeof kbuf, "%d", K);
        const char *path = arg_value(argc, argv, "--exec-path");
        if (!path)
            path = "/proc/self/exe";
        f = record_open_append(argv[1]);
        fprintf(f, "{\"kind\": \"exec\", \"pid\": %d, \"tid\": %d, \"path\": \"%s\"}\n",
                (int)getpid(), (int)gettid_raw(), path);
        fclose(f);
        execv(path, args);
        die("execv failed: %s", strerror(errno));
    }
    return 0;
}
