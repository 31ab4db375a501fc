/* nested: vDSO calls from known functions, for the "explain" tests
 * (tests/live/test_explain.py): stacks, call sites, fallback reasons, time
 * namespaces.
 *
 *   nested RECORD MODE
 *
 * Protocol as every target (common.h): setup, "ready <pid>", wait for one byte
 * on stdin, make the calls (single-threaded), write RECORD (JSON lines).
 * Every record line has "tid", "seq", "func" (the vDSO function's plain name
 * as the tracer reports it), "clockid", "ret", "fallback", "fallback_reason",
 * "tv_sec"/"tv_nsec" (what the call wrote) and "caller" (the name of the
 * target's function that made the call) with "caller_addr" (that function's
 * address in this process). MODE:
 *
 *   stack     main -> outer -> middle -> inner_mono -> clock_gettime (libc),
 *             main -> outer -> inner_real -> clock_gettime (libc), a few times.
 *             Each inner_* records its own backtrace() just before its call:
 *             "bt" (list of "0x..."), bt[0] the return address into inner_*
 *             itself (after its call to backtrace, a different call site),
 *             bt[1:] the return addresses of inner_*'s own frame outwards,
 *             which equal the return addresses an unwind at the vDSO entry
 *             finds past the C library's frames and the return address into
 *             inner_*. "fn" maps every function of the chain to its address.
 *   direct    __vdso_clock_gettime(CLOCK_MONOTONIC) through a pointer taken
 *             from the vDSO's dynsym, from direct_caller_a (4 times),
 *             direct_caller_b (7 times) and direct_caller_c (2 times),
 *             interleaved. Nothing else calls the vDSO after the go byte.
 *   fallback  direct calls: CLOCK_MONOTONIC (served in user space),
 *             CLOCK_PROCESS_CPUTIME_ID (always the kernel: cpu-time-clock),
 *             CLOCK_REALTIME (served), and on x86_64 __vdso_getrandom without
 *             state (getrandom-no-state; the i386 vDSO has no getrandom).
 *   timens    clock_gettime through libc of CLOCK_MONOTONIC, CLOCK_BOOTTIME,
 *             CLOCK_REALTIME (run it inside `unshare -T ... --fork`).
 *   timens-res clock_gettime(CLOCK_MONOTONIC) through libc, then
 *             __vdso_clock_getres(CLOCK_MONOTONIC), (CLOCK_BOOTTIME) directly:
 *             a resolution is the same in every time namespace.
 *
 * Build: gcc -O1 -g -fno-inline [-m32] [-f(no-)omit-frame-pointer].
 */
#include "common.h"

#include <execinfo.h>
#include <time.h>

#define NOINLINE __attribute__((noinline, noclone))
#define MAX_CALLS 64
#define MAX_BT 32
#define SENT 0x5a5a5a5a

#ifdef __i386__
#define LIBC_GETTIME "clock_gettime64" /* glibc 2.34+ calls __vdso_clock_gettime64 */
#else
#define LIBC_GETTIME "clock_gettime"
#endif

struct call {
    const char *func;
    const char *caller;
    void *caller_addr;
    long clockid;
    long long ret;
    int fallback;
    const char *reason;
    long long tv_sec, tv_nsec;
    int has_tp;
    long long len, flags;
    int has_len;
    int nbt;
    void *bt[MAX_BT];
};

static struct call calls[MAX_CALLS];
static int ncalls;
volatile long sink;

typedef int (*gettime_fn)(long, struct timespec *);  /* 32-bit time_t on i386: __vdso_clock_gettime */
static gettime_fn p_clock_gettime;
#ifndef __i386__
typedef long (*getrandom_fn)(void *, size_t, unsigned int, void *, size_t);
static getrandom_fn p_getrandom;
#endif

static struct call *next_call(const char *func, const char *caller, void *caller_addr, long id)
{
    struct call *c;
    if (ncalls >= MAX_CALLS)
        die("too many calls");
    c = &calls[ncalls++];
    memset(c, 0, sizeof *c);
    c->func = func;
    c->caller = caller;
    c->caller_addr = caller_addr;
    c->clockid = id;
    return c;
}

/* ------------------------------------------------------------------ stack */

NOINLINE long inner_mono(long x);
NOINLINE long inner_real(long x);
NOINLINE long middle(long x);
NOINLINE long outer(long x, int which);

NOINLINE long inner_mono(long x)
{
    struct call *c = next_call(LIBC_GETTIME, "inner_mono", (void *)inner_mono, CLOCK_MONOTONIC);
    struct timespec ts = { SENT, SENT };
    c->nbt = backtrace(c->bt, MAX_BT);
    c->ret = clock_gettime(CLOCK_MONOTONIC, &ts);
    c->tv_sec = ts.tv_sec; c->tv_nsec = ts.tv_nsec; c->has_tp = 1;
    sink += ts.tv_nsec;
    return x + sink;
}

NOINLINE long inner_real(long x)
{
    struct call *c = next_call(LIBC_GETTIME, "inner_real", (void *)inner_real, CLOCK_REALTIME);
    struct timespec ts = { SENT, SENT };
    c->nbt = backtrace(c->bt, MAX_BT);
    c->ret = clock_gettime(CLOCK_REALTIME, &ts);
    c->tv_sec = ts.tv_sec; c->tv_nsec = ts.tv_nsec; c->has_tp = 1;
    sink += ts.tv_nsec;
    return x + sink;
}

/* The work after each call keeps it from being a tail call. */
NOINLINE long middle(long x) { long r = inner_mono(x + 1); sink += r; return r * 3; }

NOINLINE long outer(long x, int which)
{
    long r = which ? middle(x + 1) : inner_real(x + 1);
    sink += r;
    return r * 5;
}

static void run_stack(void)
{
    int i;
    for (i = 0; i < 3; i++) {
        sink += outer(i, 1);
        sink += outer(i, 0);
    }
}

/* ------------------------------------------------------------------ direct */

#define DIRECT_CALLER(name)                                                   \
    NOINLINE int name(long id)                                                \
    {                                                                         \
        struct call *c = next_call("clock_gettime", #name, (void *)name, id); \
        struct timespec ts = { SENT, SENT };                                  \
        c->ret = p_clock_gettime(id, &ts);                                    \
        c->tv_sec = ts.tv_sec; c->tv_nsec = ts.tv_nsec; c->has_tp = 1;        \
        if (id == CLOCK_PROCESS_CPUTIME_ID || id == CLOCK_THREAD_CPUTIME_ID) { \
            c->fallback = 1;                                                  \
            c->reason = "cpu-time-clock";                                     \
        }                                                                     \
        return (int)c->ret + 1;                                               \
    }

DIRECT_CALLER(direct_caller_a)
DIRECT_CALLER(direct_caller_b)
DIRECT_CALLER(direct_caller_c)

static void run_direct(void)
{
    /* a: 4, b: 7, c: 2 */
    static const char plan[] = "abbabcbbabbca";
    const char *p;
    for (p = plan; *p; p++) {
        switch (*p) {
        case 'a': sink += direct_caller_a(CLOCK_MONOTONIC); break;
        case 'b': sink += direct_caller_b(CLOCK_MONOTONIC); break;
        case 'c': sink += direct_caller_c(CLOCK_MONOTONIC); break;
        }
    }
}

/* ------------------------------------------------------------------ fallback */

#ifndef __i386__
NOINLINE long random_caller(void)
{
    struct call *c = next_call("getrandom", "random_caller", (void *)random_caller, -1);
    unsigned char buf[16];
    c->ret = p_getrandom(buf, sizeof buf, 0, NULL, 0);
    c->len = sizeof buf; c->flags = 0; c->has_len = 1;
    c->fallback = 1;
    c->reason = "getrandom-no-state";
    sink += buf[0];
    return c->ret;
}
#endif

static void run_fallback(void)
{
    sink += direct_caller_a(CLOCK_MONOTONIC);
    sink += direct_caller_b(CLOCK_PROCESS_CPUTIME_ID);
    sink += direct_caller_c(CLOCK_REALTIME);
#ifndef __i386__
    sink += random_caller();
#endif
    sink += direct_caller_b(CLOCK_PROCESS_CPUTIME_ID);
}

/* ------------------------------------------------------------------ timens */

NOINLINE long ns_caller(long id)
{
    struct call *c = next_call(LIBC_GETTIME, "ns_caller", (void *)ns_caller, id);
    struct timespec ts = { SENT, SENT };
    c->ret = clock_gettime((clockid_t)id, &ts);
    c->tv_sec = ts.tv_sec; c->tv_nsec = ts.tv_nsec; c->has_tp = 1;
    return c->ret;
}

typedef int (*getres_fn)(long, struct timespec *);   /* 32-bit time_t on i386 */
static getres_fn p_clock_getres;

NOINLINE long res_caller(long id)
{
    struct call *c = next_call("clock_getres", "res_caller", (void *)res_caller, id);
    struct timespec ts = { SENT, SENT };
    c->ret = p_clock_getres(id, &ts);
    c->tv_sec = ts.tv_sec; c->tv_nsec = ts.tv_nsec; c->has_tp = 1;
    return c->ret;
}

static void run_timens_res(void)
{
    sink += ns_caller(CLOCK_MONOTONIC);
    sink += res_caller(CLOCK_MONOTONIC);
    sink += res_caller(CLOCK_BOOTTIME);
}

static void run_timens(void)
{
    sink += ns_caller(CLOCK_MONOTONIC);
    sink += ns_caller(CLOCK_BOOTTIME);
    sink += ns_caller(CLOCK_REALTIME);
    sink += ns_caller(CLOCK_MONOTONIC);
}

/* ------------------------------------------------------------------ record */

int main(int argc, char **argv);

static void write_record(const char *path)
{
    FILE *f = record_open_append(path);
    pid_t tid = gettid_raw();
    int i, j;
    for (i = 0; i < ncalls; i++) {
        struct call *c = &calls[i];
        char clk[64];
        fprintf(f, "{\"tid\": %d, \"seq\": %d, \"func\": \"%s\", \"caller\": \"%s\", "
                "\"caller_addr\": \"%p\"", (int)tid, i, c->func, c->caller, c->caller_addr);
        if (c->clockid >= 0) {
            json_clockid(clk, sizeof clk, c->clockid);
            fprintf(f, ", \"clockid\": %s", clk);
        }
        fprintf(f, ", \"ret\": %lld, \"fallback\": %s", c->ret, c->fallback ? "true" : "false");
        if (c->reason)
            fprintf(f, ", \"fallback_reason\": \"%s\"", c->reason);
        else
            fprintf(f, ", \"fallback_reason\": null");
        if (c->has_tp)
            fprintf(f, ", \"tv_sec\": %lld, \"tv_nsec\": %lld", c->tv_sec, c->tv_nsec);
        if (c->has_len)
            fprintf(f, ", \"len\": %lld, \"flags\": %lld", c->len, c->flags);
        if (c->nbt) {
            fprintf(f, ", \"bt\": [");
            for (j = 0; j < c->nbt; j++)
                fprintf(f, "%s\"%p\"", j ? ", " : "", c->bt[j]);
            fprintf(f, "]");
            fprintf(f, ", \"fn\": {\"inner_mono\": \"%p\", \"inner_real\": \"%p\", "
                    "\"middle\": \"%p\", \"outer\": \"%p\", \"run_stack\": \"%p\", \"main\": \"%p\"}",
                    (void *)inner_mono, (void *)inner_real, (void *)middle, (void *)outer, (void *)run_stack,
                    (void *)main);
        }
        fprintf(f, "}\n");
    }
    fclose(f);
}

int main(int argc, char **argv)
{
    const char *mode;
    void *warm[4];

    if (argc < 3)
        die("usage: nested RECORD stack|direct|fallback|timens|timens-res");
    mode = argv[2];
    record_truncate(argv[1]);
    p_clock_gettime = (gettime_fn)vdso_sym_required("__vdso_clock_gettime");
    p_clock_getres = (getres_fn)vdso_sym_required("__vdso_clock_getres");
#ifndef __i386__
    p_getrandom = (getrandom_fn)vdso_sym_required("__vdso_getrandom");
#endif
    /* The first backtrace() loads libgcc_s: do it before the traced part. */
    sink += backtrace(warm, 4);
    if (strcmp(mode, "stack") && strcmp(mode, "direct") && strcmp(mode, "fallback")
        && strcmp(mode, "timens") && strcmp(mode, "timens-res"))
        die("unknown mode %s", mode);
    ready_and_wait();
    if (!strcmp(mode, "stack"))
        run_stack();
    else if (!strcmp(mode, "direct"))
        run_direct();
    else if (!strcmp(mode, "fallback"))
        run_fallback();
    else if (!strcmp(mode, "timens"))
        run_timens();
    else
        run_timens_res();
    write_record(argv[1]);
    return 0;
}
