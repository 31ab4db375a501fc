/* a64stack: arm64 clock_gettime calls from a known chain of functions, with the chain's own
 * backtrace as the oracle (tests/vm/test_signals_aarch64.py's stack tests; fixtures).
 *
 *   a64stack RECORD [--calls N]
 *
 * Built twice (tests/targets.py build_aarch64_variant): with frame pointers
 * (-fno-omit-frame-pointer: every frame has its AAPCS64 frame record at x29) and without
 * (-fomit-frame-pointer: only the .eh_frame CFI describes the frames); both with
 * -mbranch-protection=standard, so every saved return address is signed (paciasp).
 *
 * After the go byte: main -> level1 -> level2 -> level3, which first takes glibc's
 * backtrace() (libgcc's CFI unwinder: an independent oracle of the frames above level3), then
 * calls __kernel_clock_gettime N times directly through the vDSO's symbol and N times through
 * glibc's clock_gettime (which calls the vDSO). Each level does work after its call, so no
 * call is a tail call.
 *
 * Record (one JSON line):
 *   {"kind": "stack", "backtrace": ["0x…", ...], "level1": "0x…", "level2": "0x…",
 *    "level3": "0x…", "main": "0x…", "vdso_clock_gettime": "0x…", "calls": N, "failed": F}
 * backtrace[0] is in level3 (after its call to backtrace), [1] in level2, [2] in level1, [3]
 * in main, then the C library's start code.
 */
#include "common.h"

#include <execinfo.h>

#ifndef __aarch64__
#error "a64stack is an arm64 program"
#endif

typedef int (*gettime_fn)(clockid_t, struct timespec *);

static void *bt[32];
static int nbt;
static long ncalls = 3;
static volatile long failed;
static gettime_fn vdso_gettime;

__attribute__((noinline)) static long level3(long x)
{
    struct timespec ts;
    long i;
    nbt = backtrace(bt, 32);
    for (i = 0; i < ncalls; i++)
        if (vdso_gettime(CLOCK_MONOTONIC, &ts) != 0)
            failed++;
    for (i = 0; i < ncalls; i++)
        if (clock_gettime(CLOCK_MONOTONIC, &ts) != 0)
            failed++;
    return x + ts.tv_nsec % 2;
}

__attribute__((noinline)) static long level2(long x)
{
    long r = level3(x + 1);
    return r * 3 + (long)failed;
}

__attribute__((noinline)) static long level1(long x)
{
    long r = level2(x + 2);
    return r * 5 + (long)failed;
}

int main(int argc, char **argv)
{
    long r;
    int i;
    FILE *f;

    if (argc < 2)
        die("usage: a64stack RECORD [--calls N]");
    ncalls = arg_long(argc, argv, "--calls", 3);
    record_truncate(argv[1]);
    vdso_gettime = (gettime_fn)vdso_sym_required("__kernel_clock_gettime");

    ready_and_wait();

    r = level1(argc);

    f = record_open_append(argv[1]);
    fprintf(f, "{\"kind\": \"stack\", \"backtrace\": [");
    for (i = 0; i < nbt; i++)
        fprintf(f, "%s\"%#lx\"", i ? ", " : "", (unsigned long)(uintptr_t)bt[i]);
    fprintf(f, "], \"level1\": \"%#lx\", \"level2\": \"%#lx\", \"level3\": \"%#lx\", "
               "\"main\": \"%#lx\", \"vdso_clock_gettime\": \"%#lx\", \"calls\": %ld, "
               "\"failed\": %ld, \"r\": %ld}\n",
            (unsigned long)(uintptr_t)&level1, (unsigned long)(uintptr_t)&level2,
            (unsigned long)(uintptr_t)&level3, (unsigned long)(uintptr_t)&main,
            (unsigned long)(uintptr_t)vdso_gettime, ncalls, (long)failed, r);
    if (fclose(f))
        die("cannot write the record");
    return failed ? 1 : 0;
}
