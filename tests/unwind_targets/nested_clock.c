/* Target for tests/test_unwind_live.py: main -> f1 -> f2 -> f3 -> clock_gettime (libc)
 * -> the vDSO. f3 records its own stack with glibc's backtrace() just before the call,
 * so the frames from f2 outwards are the ones an unwind at the vDSO entry must find.
 *
 * With an argument N, main reaches f1 through N frames of deep() (N >= 1), for stacks
 * deeper than an unwind's depth limit.
 *
 * Protocol: prints "ready <pid>", waits for one byte on stdin (the test attaches and
 * plants its breakpoint meanwhile), makes the call, then prints one line per backtrace()
 * entry: "bt <address>", and "done".
 */
#define _GNU_SOURCE
#include <execinfo.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#define NOINLINE __attribute__((noinline, noclone))

static void *bt[64];
static int nbt;
volatile long sink;

/* backtrace()'s first entry is its own return address, into record(); the second is
 * the return address into f3. */
NOINLINE void record(void) { nbt = backtrace(bt, 64); __asm__ volatile("" ::: "memory"); }

NOINLINE long f3(long x)
{
    struct timespec ts;
    record();
    clock_gettime(CLOCK_MONOTONIC, &ts);
    sink = ts.tv_nsec;
    return x + sink;
}

/* The work after each call keeps it from being a tail call. */
NOINLINE long f2(long x) { long r = f3(x + 1); sink += r; return r * 3; }
NOINLINE long f1(long x) { long r = f2(x + 1); sink += r; return r * 5; }

NOINLINE long deep(int n, long x)
{
    long r = n <= 1 ? f1(x) : deep(n - 1, x + 1);
    sink += r;
    return r + 1;
}

int main(int argc, char **argv)
{
    int depth = argc > 1 ? atoi(argv[1]) : 0;
    char c;
    printf("ready %d\n", (int)getpid());
    fflush(stdout);
    if (read(0, &c, 1) != 1)
        return 2;
    long r = depth > 0 ? deep(depth, c) : f1(c);
    for (int i = 0; i < nbt; i++)
        printf("bt %p\n", bt[i]);
    printf("done %ld\n", r & 1);
    return 0;
}
