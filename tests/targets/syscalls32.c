/* syscalls32 (i386 only): a known run of system calls through the C library,
 * every one of which glibc makes through the vDSO's __kernel_vsyscall.
 *
 *   syscalls32 RECORD [--repeat N]
 *
 * After the go byte, N times (default 5): getpid, getppid, write(fd, "x", 1)
 * to a /dev/null descriptor opened before "ready", getuid (glibc uses the
 * getuid32 system call, i386 nr 199). Nothing else runs in between: the
 * record is written after the run.
 *
 * Record, one JSON line per call in order:
 *   {"tid", "seq", "name": "getpid"|"getppid"|"write"|"getuid32", "nr",
 *    "fd": <descriptor, write only>, "count": 1 (write only), "ret"}
 */
#include "common.h"

#include <fcntl.h>

#ifndef __i386__
#error "syscalls32 is an i386 target: build it with gcc -m32"
#endif

#define MAX_CALLS 1024

struct sc {
    const char *name;
    int nr;
    int fd;
    long ret;
};

static struct sc calls[MAX_CALLS];
static int ncalls;

static void note(const char *name, int nr, int fd, long ret)
{
    if (ncalls >= MAX_CALLS)
        die("too many calls");
    calls[ncalls].name = name;
    calls[ncalls].nr = nr;
    calls[ncalls].fd = fd;
    calls[ncalls].ret = ret;
    ncalls++;
}

int main(int argc, char **argv)
{
    int repeat, fd, i;
    pid_t tid;
    FILE *f;

    if (argc < 2)
        die("usage: syscalls32 RECORD [--repeat N]");
    repeat = (int)arg_long(argc, argv, "--repeat", 5);
    if (repeat < 1 || repeat * 4 > MAX_CALLS)
        die("bad --repeat");
    record_truncate(argv[1]);
    fd = open("/dev/null", O_WRONLY);
    if (fd < 0)
        die("cannot open /dev/null");
    tid = gettid_raw();

    ready_and_wait();

    for (i = 0; i < repeat; i++) {
        long r;
        r = getpid();
        note("getpid", SYS_getpid, -1, r);
        r = getppid();
        note("getppid", SYS_getppid, -1, r);
        r = write(fd, "x", 1);
        note("write", SYS_write, fd, r);
        r = getuid();
        note("getuid32", SYS_getuid32, -1, r);
    }

    f = record_open_append(argv[1]);
    for (i = 0; i < ncalls; i++) {
        fprintf(f, "{\"tid\": %d, \"seq\": %d, \"name\": \"%s\", \"nr\": %d", (int)tid, i,
                calls[i].name, calls[i].nr);
        if (calls[i].fd >= 0)
            fprintf(f, ", \"fd\": %d, \"count\": 1", calls[i].fd);
        fprintf(f, ", \"ret\": %ld}\n", calls[i].ret);
    }
    if (fclose(f))
        die("cannot write the record");
    return 0;
}
