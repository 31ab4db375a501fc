/* vcalls: threads that call the vDSO functions directly, in a fixed sequence,
 * and record the caller's view of every call.
 *
 *   vcalls RECORD [--threads N] [--rounds R]
 *
 * N threads (default 4 on x86_64, 2 on i386) are created and look their vDSO
 * symbols up before "ready". After the go byte and a barrier each thread runs
 * R rounds (default 3) of the sequence below, then one clock_gettime through
 * libc and calls with an invalid clock id. The main thread makes no calls.
 *
 * Record: one JSON line per call, per thread in order:
 *   {"tid", "seq", "func", "symbol", "clockid", "ret", "fallback",
 *    "fallback_reason", "via": "vdso"|"libc", and what the call wrote:
 *    "tv_sec"/"tv_nsec" | "tv_sec"/"tv_usec" (+ "tz_minuteswest"/"tz_dsttime")
 *    | "tloc" | "cpu"/"node" | "len"/"flags"}
 * Memory a call did not write holds the sentinel it was filled with before
 * the call, and is recorded as it is (the caller's view).
 *
 * Fallbacks (checked with strace: a call the vDSO serves makes no system
 * call): CLOCK_PROCESS_CPUTIME_ID is never served in user space; a clock id
 * the vDSO does not know (lib/vdso/gettimeofday.c: !vdso_clockid_valid())
 * goes to the system call, which returns -EINVAL, and the vDSO function
 * returns that -22 as is; __vdso_getrandom without opaque state
 * (opaque_len != sizeof(struct vgetrandom_state)) calls getrandom(2).
 */
#include "common.h"

#include <pthread.h>
#include <time.h>
#include <sys/time.h>

#define INVALID_CLOCK 12345
#define MAX_CALLS 512

enum func {
    F_CLOCK_GETTIME, F_CLOCK_GETTIME64, F_GETTIMEOFDAY, F_TIME,
    F_CLOCK_GETRES, F_GETCPU, F_GETRANDOM,
};
static const char *const func_names[] = {
    "clock_gettime", "clock_gettime64", "gettimeofday", "time",
    "clock_getres", "getcpu", "getrandom",
};

struct call {
    enum func func;
    int libc;        /* made through the C library, not a direct pointer */
    long clockid;    /* -1: none */
    long long ret;
    int fallback;
    const char *reason;
    long long a, b;  /* tv_sec/tv_nsec, tv_sec/tv_usec, tloc, cpu/node, len/flags */
    int has_a, has_b;
    int has_tz;
    int tz_minuteswest, tz_dsttime;
};

struct worker {
    pthread_t th;
    pid_t tid;
    int n;
    struct call calls[MAX_CALLS];
};

/* Layouts the i386 vDSO uses: include/vdso/time32.h and the uapi y2038 types. */
struct ts32 { int32_t tv_sec; int32_t tv_nsec; };
struct ts64 { int64_t tv_sec; int64_t tv_nsec; };
struct tv32 { int32_t tv_sec; int32_t tv_usec; };
struct tvl { long tv_sec; long tv_usec; };
struct tzone { int tz_minuteswest; int tz_dsttime; };

#ifdef __i386__
typedef int (*gettime32_fn)(long, struct ts32 *);
typedef int (*gettime64_fn)(long, struct ts64 *);
typedef int (*gettimeofday_fn)(struct tv32 *, struct tzone *);
typedef int32_t (*time_fn)(int32_t *);
typedef int (*getres_fn)(long, struct ts32 *);
static gettime32_fn p_clock_gettime;
static gettime64_fn p_clock_gettime64;
#define DEFAULT_THREADS 2
#else
typedef int (*gettime_fn)(long, struct timespec *);
typedef int (*gettimeofday_fn)(struct tvl *, struct tzone *);
typedef long (*time_fn)(long *);
typedef int (*getres_fn)(long, struct timespec *);
typedef long (*getrandom_fn)(void *, size_t, unsigned int, void *, size_t);
static gettime_fn p_clock_gettime;
static getrandom_fn p_getrandom;
#define DEFAULT_THREADS 4
#endif
typedef long (*getcpu_fn)(unsigned *, unsigned *, void *);
static gettimeofday_fn p_gettimeofday;
static time_fn p_time;
static getres_fn p_clock_getres;
static getcpu_fn p_getcpu;

static pthread_barrier_t setup_barrier, go_barrier;
static int rounds = 3;

#define SENT 0x5a5a5a5a

static struct call *next(struct worker *w, enum func f, long clockid)
{
    struct call *c;
    if (w->n >= MAX_CALLS)
        die("too many calls");
    c = &w->calls[w->n++];
    memset(c, 0, sizeof *c);
    c->func = f;
    c->clockid = clockid;
    return c;
}

static const char *clock_reason(long id)
{
    if (id == CLOCK_PROCESS_CPUTIME_ID || id == CLOCK_THREAD_CPUTIME_ID)
        return "cpu-time-clock";
    if (id == INVALID_CLOCK)
        return "invalid-clock";
    return NULL;
}

static void do_gettime(struct worker *w, long id)
{
    struct call *c = next(w, F_CLOCK_GETTIME, id);
#ifdef __i386__
    struct ts32 ts = { SENT, SENT };
    c->ret = p_clock_gettime(id, &ts);
#else
    struct timespec ts = { SENT, SENT };
    c->ret = p_clock_gettime(id, &ts);
#endif
    c->a = ts.tv_sec; c->b = ts.tv_nsec; c->has_a = c->has_b = 1;
    c->reason = clock_reason(id);
    c->fallback = c->reason != NULL;
}

#ifdef __i386__
static void do_gettime64(struct worker *w, long id)
{
    struct call *c = next(w, F_CLOCK_GETTIME64, id);
    struct ts64 ts = { SENT, SENT };
    c->ret = p_clock_gettime64(id, &ts);
    c->a = ts.tv_sec; c->b = ts.tv_nsec; c->has_a = c->has_b = 1;
    c->reason = clock_reason(id);
    c->fallback = c->reason != NULL;
}
#endif

static void do_gettimeofday(struct worker *w, int with_tz)
{
    struct call *c = next(w, F_GETTIMEOFDAY, -1);
    struct tzone tz = { SENT, SENT };
#ifdef __i386__
    struct tv32 tv = { SENT, SENT };
#else
    struct tvl tv = { SENT, SENT };
#endif
    c->ret = p_gettimeofday(&tv, with_tz ? &tz : NULL);
    c->a = tv.tv_sec; c->b = tv.tv_usec; c->has_a = c->has_b = 1;
    if (with_tz) {
        c->has_tz = 1;
        c->tz_minuteswest = tz.tz_minuteswest;
        c->tz_dsttime = tz.tz_dsttime;
    }
}

static void do_time(struct worker *w, int with_tloc)
{
    struct call *c = next(w, F_TIME, -1);
#ifdef __i386__
    int32_t t = SENT;
#else
    long t = SENT;
#endif
    c->ret = p_time(with_tloc ? &t : NULL);
    if (with_tloc) {
        c->a = t;
        c->has_a = 1;
    }
}

static void do_getres(struct worker *w, long id)
{
    struct call *c = next(w, F_CLOCK_GETRES, id);
#ifdef __i386__
    struct ts32 ts = { SENT, SENT };
#else
    struct timespec ts = { SENT, SENT };
#endif
    c->ret = p_clock_getres(id, &ts);
    c->a = ts.tv_sec; c->b = ts.tv_nsec; c->has_a = c->has_b = 1;
    c->reason = clock_reason(id);
    c->fallback = c->reason != NULL;
}

static void do_getcpu(struct worker *w)
{
    struct call *c = next(w, F_GETCPU, -1);
    unsigned cpu = SENT, node = SENT;
    c->ret = p_getcpu(&cpu, &node, NULL);
    c->a = cpu; c->b = node; c->has_a = c->has_b = 1;
}

#ifndef __i386__
static void do_getrandom(struct worker *w)
{
    struct call *c = next(w, F_GETRANDOM, -1);
    unsigned char buf[16];
    c->ret = p_getrandom(buf, sizeof buf, 0, NULL, 0);
    c->a = sizeof buf; c->b = 0; c->has_a = c->has_b = 1;
    c->fallback = 1;
    c->reason = "getrandom-no-state";
}
#endif

static void do_libc_gettime(struct worker *w)
{
    /* glibc calls the vDSO through a pointer it looked up at startup:
     * __vdso_clock_gettime on x86_64, __vdso_clock_gettime64 on i386. */
#ifdef __i386__
    struct call *c = next(w, F_CLOCK_GETTIME64, CLOCK_MONOTONIC);
#else
    struct call *c = next(w, F_CLOCK_GETTIME, CLOCK_MONOTONIC);
#endif
    struct timespec ts = { SENT, SENT };
    c->libc = 1;
    c->ret = clock_gettime(CLOCK_MONOTONIC, &ts);
    c->a = ts.tv_sec; c->b = ts.tv_nsec; c->has_a = c->has_b = 1;
}

static void *worker_main(void *arg)
{
    struct worker *w = arg;
    static const long clocks[] = {
        CLOCK_REALTIME, CLOCK_MONOTONIC, CLOCK_BOOTTIME,
        CLOCK_MONOTONIC_COARSE, CLOCK_PROCESS_CPUTIME_ID,
    };
    int r;
    size_t i;

    w->tid = gettid_raw();
    pthread_barrier_wait(&setup_barrier);
    pthread_barrier_wait(&go_barrier);

    for (r = 0; r < rounds; r++) {
        for (i = 0; i < sizeof clocks / sizeof clocks[0]; i++)
            do_gettime(w, clocks[i]);
#ifdef __i386__
        for (i = 0; i < sizeof clocks / sizeof clocks[0]; i++)
            do_gettime64(w, clocks[i]);
#endif
        do_gettimeofday(w, 0);
        do_gettimeofday(w, 1);
        do_time(w, 1);
        do_time(w, 0);
        do_getres(w, CLOCK_MONOTONIC);
        do_getcpu(w);
#ifndef __i386__
        do_getrandom(w);
#endif
    }
    do_libc_gettime(w);
    do_gettime(w, INVALID_CLOCK);
#ifdef __i386__
    do_gettime64(w, INVALID_CLOCK);
#endif
    do_getres(w, INVALID_CLOCK);
    return NULL;
}

static void write_call(FILE *f, pid_t tid, int seq, const struct call *c)
{
    char clk[48];
    const char *fn = func_names[c->func];
    fprintf(f, "{\"tid\": %d, \"seq\": %d, \"func\": \"%s\", \"symbol\": \"__vdso_%s\", "
               "\"via\": \"%s\"",
            (int)tid, seq, fn, fn, c->libc ? "libc" : "vdso");
    if (c->clockid != -1) {
        json_clockid(clk, sizeof clk, c->clockid);
        fprintf(f, ", \"clockid\": %s", clk);
    }
    fprintf(f, ", \"ret\": %lld", c->ret);
    switch (c->func) {
    case F_CLOCK_GETTIME: case F_CLOCK_GETTIME64: case F_CLOCK_GETRES:
        fprintf(f, ", \"tv_sec\": %lld, \"tv_nsec\": %lld", c->a, c->b);
        break;
    case F_GETTIMEOFDAY:
        fprintf(f, ", \"tv_sec\": %lld, \"tv_usec\": %lld", c->a, c->b);
        if (c->has_tz)
            fprintf(f, ", \"tz_minuteswest\": %d, \"tz_dsttime\": %d",
                    c->tz_minuteswest, c->tz_dsttime);
        break;
    case F_TIME:
        if (c->has_a)
            fprintf(f, ", \"tloc\": %lld", c->a);
        else
            fprintf(f, ", \"tloc\": null");
        break;
    case F_GETCPU:
        fprintf(f, ", \"cpu\": %lld, \"node\": %lld", c->a, c->b);
        break;
    case F_GETRANDOM:
        fprintf(f, ", \"len\": %lld, \"flags\": %lld", c->a, c->b);
        break;
    }
    fprintf(f, ", \"fallback\": %s, \"fallback_reason\": ", c->fallback ? "true" : "false");
    if (c->reason)
        fprintf(f, "\"%s\"}\n", c->reason);
    else
        fprintf(f, "null}\n");
}

int main(int argc, char **argv)
{
    struct worker *workers;
    int nthreads, i, j;
    FILE *f;

    if (argc < 2)
        die("usage: vcalls RECORD [--threads N] [--rounds R]");
    nthreads = (int)arg_long(argc, argv, "--threads", DEFAULT_THREADS);
    rounds = (int)arg_long(argc, argv, "--rounds", 3);
    if (nthreads < 1 || rounds < 0 || rounds * 20 + 10 > MAX_CALLS)
        die("bad --threads or --rounds");
    record_truncate(argv[1]);

#ifdef __i386__
    p_clock_gettime = (gettime32_fn)vdso_sym_required("__vdso_clock_gettime");
    p_clock_gettime64 = (gettime64_fn)vdso_sym_required("__vdso_clock_gettime64");
#else
    p_clock_gettime = (gettime_fn)vdso_sym_required("__vdso_clock_gettime");
    p_getrandom = (getrandom_fn)vdso_sym_required("__vdso_getrandom");
#endif
    p_gettimeofday = (gettimeofday_fn)vdso_sym_required("__vdso_gettimeofday");
    p_time = (time_fn)vdso_sym_required("__vdso_time");
    p_clock_getres = (getres_fn)vdso_sym_required("__vdso_clock_getres");
    p_getcpu = (getcpu_fn)vdso_sym_required("__vdso_getcpu");

    workers = calloc(nthreads, sizeof *workers);
    if (!workers)
        die("out of memory");
    pthread_barrier_init(&setup_barrier, NULL, nthreads + 1);
    pthread_barrier_init(&go_barrier, NULL, nthreads + 1);
    for (i = 0; i < nthreads; i++)
        if (pthread_create(&workers[i].th, NULL, worker_main, &workers[i]))
            die("pthread_create failed");
    pthread_barrier_wait(&setup_barrier);

    ready_and_wait();
    pthread_barrier_wait(&go_barrier);
    for (i = 0; i < nthreads; i++)
        pthread_join(workers[i].th, NULL);

    f = record_open_append(argv[1]);
    for (i = 0; i < nthreads; i++)
        for (j = 0; j < workers[i].n; j++)
            write_call(f, workers[i].tid, j, &workers[i].calls[j]);
    if (fclose(f))
        die("cannot write the record");
    return 0;
}
