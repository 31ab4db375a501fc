/* Shared pieces of the live-test targets.
 *
 * Protocol (every target): `target RECORD_PATH [args]` does its setup, prints
 * "ready <pid>\n" on stdout, flushes, then blocks reading one byte from fd 0.
 * After that byte it makes its calls, buffering what it saw in memory, and
 * writes the record (JSON lines) to RECORD_PATH at the end, so that writing
 * the record adds no vDSO calls to the traced run.
 */
#ifndef VDSOTRACE_TARGET_COMMON_H
#define VDSOTRACE_TARGET_COMMON_H

#define _GNU_SOURCE
#include <elf.h>
#include <errno.h>
#include <link.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/auxv.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <unistd.h>

static inline void die(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "target: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    exit(2);
}

static inline pid_t gettid_raw(void)
{
    return (pid_t)syscall(SYS_gettid);
}

/* Print the ready line and block until the test writes the go byte. */
static inline void ready_and_wait(void)
{
    char c;
    ssize_t n;
    printf("ready %d\n", (int)getpid());
    fflush(stdout);
    do {
        n = read(0, &c, 1);
    } while (n < 0 && errno == EINTR);
    if (n != 1)
        die("no go byte on stdin (read returned %zd)", n);
}

/* Truncate the record file at setup time; everything later appends. */
static inline void record_truncate(const char *path)
{
    FILE *f = fopen(path, "w");
    if (!f)
        die("cannot create record %s", path);
    fclose(f);
}

static inline FILE *record_open_append(const char *path)
{
    FILE *f = fopen(path, "a");
    if (!f)
        die("cannot append to record %s", path);
    return f;
}

/* Clock ids by their names in include/uapi/linux/time.h; an unknown id is
 * written as its number. */
static inline void json_clockid(char *buf, size_t n, long id)
{
    static const char *const names[] = {
        [0] = "CLOCK_REALTIME",          [1] = "CLOCK_MONOTONIC",
        [2] = "CLOCK_PROCESS_CPUTIME_ID", [3] = "CLOCK_THREAD_CPUTIME_ID",
        [4] = "CLOCK_MONOTONIC_RAW",     [5] = "CLOCK_REALTIME_COARSE",
        [6] = "CLOCK_MONOTONIC_COARSE",  [7] = "CLOCK_BOOTTIME",
        [8] = "CLOCK_REALTIME_ALARM",    [9] = "CLOCK_BOOTTIME_ALARM",
        [11] = "CLOCK_TAI",
    };
    if (id >= 0 && id < (long)(sizeof names / sizeof names[0]) && names[id])
        snprintf(buf, n, "\"%s\"", names[id]);
    else
        snprintf(buf, n, "%ld", id);
}

/* Look a symbol up in the vDSO mapped in this process, from its section
 * headers (the whole image is mapped, headers included). The vDSO is linked
 * at 0, so an st_value is an offset from AT_SYSINFO_EHDR. Only defined
 * symbols of type FUNC count. */
static inline void *vdso_sym(const char *name)
{
    const unsigned char *base = (const unsigned char *)getauxval(AT_SYSINFO_EHDR);
    const ElfW(Ehdr) *eh;
    const ElfW(Shdr) *sh;
    int i;

    if (!base)
        die("no AT_SYSINFO_EHDR in the auxiliary vector");
    eh = (const ElfW(Ehdr) *)base;
    if (memcmp(eh->e_ident, ELFMAG, SELFMAG) != 0)
        die("AT_SYSINFO_EHDR does not point to an ELF image");
    sh = (const ElfW(Shdr) *)(base + eh->e_shoff);
    for (i = 0; i < eh->e_shnum; i++) {
        const ElfW(Sym) *syms;
        const char *strtab;
        size_t nsyms, j;
        if (sh[i].sh_type != SHT_DYNSYM)
            continue;
        syms = (const ElfW(Sym) *)(base + sh[i].sh_offset);
        strtab = (const char *)(base + sh[sh[i].sh_link].sh_offset);
        nsyms = sh[i].sh_size / sh[i].sh_entsize;
        for (j = 0; j < nsyms; j++) {
            if (syms[j].st_shndx == SHN_UNDEF)
                continue;
            if (ELF64_ST_TYPE(syms[j].st_info) != STT_FUNC)
                continue;
            if (strcmp(strtab + syms[j].st_name, name) == 0)
                return (void *)(base + syms[j].st_value);
        }
    }
    return NULL;
}

static inline void *vdso_sym_required(const char *name)
{
    void *p = vdso_sym(name);
    if (!p)
        die("the vDSO does not export %s", name);
    return p;
}

static inline const char *arg_value(int argc, char **argv, const char *opt)
{
    int i;
    for (i = 2; i < argc; i++)
        if (strcmp(argv[i], opt) == 0 && i + 1 < argc)
            return argv[i + 1];
    return NULL;
}

static inline int arg_flag(int argc, char **argv, const char *opt)
{
    int i;
    for (i = 2; i < argc; i++)
        if (strcmp(argv[i], opt) == 0)
            return 1;
    return 0;
}

static inline long arg_long(int argc, char **argv, const char *opt, long dflt)
{
    const char *v = arg_value(argc, argv, opt);
    char *end;
    long r;
    if (!v)
        return dflt;
    r = strtol(v, &end, 0);
    if (*end)
        die("bad number for %s: %s", opt, v);
    return r;
}

/* a is earlier than b. */
static inline int ts_before(const struct timespec *a, const struct timespec *b)
{
    return a->tv_sec < b->tv_sec || (a->tv_sec == b->tv_sec && a->tv_nsec < b->tv_nsec);
}

/* A clock_gettime that returned r and wrote *now went wrong: it failed, tv_nsec is not in
 * [0, 1e9), or (prev not NULL) the clock went back from *prev. */
static inline int bad_timespec(int r, const struct timespec *now, const struct timespec *prev)
{
    return r != 0 || now->tv_nsec < 0 || now->tv_nsec >= 1000000000L ||
           (prev != NULL && ts_before(now, prev));
}

/* A gettimeofday that returned r and wrote *tv went wrong: it failed, or tv_usec is not in
 * [0, 1e6). */
static inline int bad_timeval(int r, const struct timeval *tv)
{
    return r != 0 || tv->tv_usec < 0 || tv->tv_usec >= 1000000L;
}

/* The calls most targets loop on: clock_gettime(CLOCK_MONOTONIC) then gettimeofday, each
 * checked (bad_timespec against *prev, bad_timeval). Adds 2 to *calls and what went wrong to
 * *bad; *prev moves on to a good reading only. */
static inline void checked_pair(unsigned long long *calls, unsigned long long *bad,
                                struct timespec *prev)
{
    struct timespec now;
    struct timeval tv;
    int r = clock_gettime(CLOCK_MONOTONIC, &now);
    if (bad_timespec(r, &now, prev))
        (*bad)++;
    else
        *prev = now;
    r = gettimeofday(&tv, NULL);
    if (bad_timeval(r, &tv))
        (*bad)++;
    *calls += 2;
}

/* Block until one more byte arrives on fd 0 (the test's stop byte); EOF counts too. */
static inline void wait_stop_byte(void)
{
    char c;
    while (read(0, &c, 1) < 0 && errno == EINTR)
        ;
}

/* Find the mapping whose /proc/self/maps line contains `name`: its [lo, hi); 0 if none. */
static inline int maps_find(const char *name, unsigned long *lo, unsigned long *hi)
{
    char line[512];
    int found = 0;
    FILE *f = fopen("/proc/self/maps", "r");
    if (!f)
        die("cannot read /proc/self/maps");
    while (!found && fgets(line, sizeof line, f))
        found = strstr(line, name) != NULL && sscanf(line, "%lx-%lx", lo, hi) == 2;
    fclose(f);
    return found;
}

#endif
