/* a64smoke: the arm64 machine's smoke target (built for aarch64 with clang, run inside
 * scripts/vm aarch64). It looks up the arm64 vDSO's functions by their own symbols
 * (__kernel_*, version LINUX_2.6.39), prints "ready <pid>", waits for the go byte, then
 * calls each of them directly and through the C library (glibc calls the vDSO itself)
 * and records what it saw.
 *
 *   a64smoke RECORD [--rounds R]
 *
 * Record (JSON lines): first {"vdso": base, "symbols": {name: address, ...}}, then one
 * line per call: {"seq", "func", "via": "vdso"|"libc", "clockid", "ret", "a", "b"} where
 * a/b are tv_sec/tv_nsec (clock_gettime, clock_getres) or tv_sec/tv_usec (gettimeofday).
 * On arm64 the vDSO has no time and no getcpu (arch/arm64/kernel/vdso/vdso.lds.S), and
 * __kernel_getrandom only from Linux 6.12; it is recorded in "symbols" when present.
 */
#include "common.h"

#include <time.h>
#include <sys/time.h>

typedef int (*gettime_fn)(long, struct timespec *);
typedef int (*getres_fn)(long, struct timespec *);
typedef int (*gettimeofday_fn)(struct timeval *, void *);

#define MAX_CALLS 256

struct call {
    const char *func;
    const char *via;
    long clockid;
    long long ret, a, b;
};

static struct call calls[MAX_CALLS];
static int ncalls;

/* Like vdso_sym, but any symbol type: __kernel_rt_sigreturn is STT_NOTYPE on arm64 (it is
 * SYM_CODE in arch/arm64/kernel/vdso/sigreturn.S, not a C function). */
static void *vdso_sym_any(const char *name)
{
    const unsigned char *base = (const unsigned char *)getauxval(AT_SYSINFO_EHDR);
    const ElfW(Ehdr) *eh = (const ElfW(Ehdr) *)base;
    const ElfW(Shdr) *sh = (const ElfW(Shdr) *)(base + eh->e_shoff);
    int i;
    size_t j;

    for (i = 0; i < eh->e_shnum; i++) {
        const ElfW(Sym) *syms = (const ElfW(Sym) *)(base + sh[i].sh_offset);
        const char *strtab = (const char *)(base + sh[sh[i].sh_link].sh_offset);
        if (sh[i].sh_type != SHT_DYNSYM)
            continue;
        for (j = 0; j < sh[i].sh_size / sh[i].sh_entsize; j++)
            if (syms[j].st_shndx != SHN_UNDEF && strcmp(strtab + syms[j].st_name, name) == 0)
                return (void *)(base + syms[j].st_value);
    }
    return NULL;
}

static void add(const char *func, const char *via, long clockid, long long ret, long long a, long long b)
{
    if (ncalls < MAX_CALLS)
        calls[ncalls++] = (struct call){func, via, clockid, ret, a, b};
}

int main(int argc, char **argv)
{
    static const char *const names[] = {
        "__kernel_clock_gettime", "__kernel_gettimeofday", "__kernel_clock_getres",
        "__kernel_rt_sigreturn", "__kernel_getrandom",
    };
    static const long clocks[] = {CLOCK_REALTIME, CLOCK_MONOTONIC, CLOCK_BOOTTIME};
    gettime_fn p_gettime;
    gettimeofday_fn p_gettimeofday;
    getres_fn p_getres;
    FILE *rec;
    long rounds;
    int r, i, j;

    if (argc < 2)
        die("usage: a64smoke RECORD [--rounds R]");
    rounds = arg_long(argc, argv, "--rounds", 3);
    record_truncate(argv[1]);
    p_gettime = (gettime_fn)vdso_sym_required("__kernel_clock_gettime");
    p_gettimeofday = (gettimeofday_fn)vdso_sym_required("__kernel_gettimeofday");
    p_getres = (getres_fn)vdso_sym_required("__kernel_clock_getres");

    ready_and_wait();

    for (r = 0; r < rounds; r++) {
        for (i = 0; i < (int)(sizeof clocks / sizeof clocks[0]); i++) {
            struct timespec ts = {-1, -1};
            int ret = p_gettime(clocks[i], &ts);
            add("clock_gettime", "vdso", clocks[i], ret, ts.tv_sec, ts.tv_nsec);
            ts = (struct timespec){-1, -1};
            ret = clock_gettime((clockid_t)clocks[i], &ts);
            add("clock_gettime", "libc", clocks[i], ret, ts.tv_sec, ts.tv_nsec);
        }
        {
            struct timeval tv = {-1, -1};
            int ret = p_gettimeofday(&tv, NULL);
            add("gettimeofday", "vdso", -1, ret, tv.tv_sec, tv.tv_usec);
            tv = (struct timeval){-1, -1};
            ret = gettimeofday(&tv, NULL);
            add("gettimeofday", "libc", -1, ret, tv.tv_sec, tv.tv_usec);
        }
        {
            struct timespec ts = {-1, -1};
            int ret = p_getres(CLOCK_MONOTONIC, &ts);
            add("clock_getres", "vdso", CLOCK_MONOTONIC, ret, ts.tv_sec, ts.tv_nsec);
        }
    }

    rec = record_open_append(argv[1]);
    fprintf(rec, "{\"vdso\": %lu, \"symbols\": {", getauxval(AT_SYSINFO_EHDR));
    for (i = 0, j = 0; i < (int)(sizeof names / sizeof names[0]); i++) {
        void *p = vdso_sym_any(names[i]);
        if (p)
            fprintf(rec, "%s\"%s\": %lu", j++ ? ", " : "", names[i], (unsigned long)p);
    }
    fprintf(rec, "}}\n");
    for (i = 0; i < ncalls; i++)
        fprintf(rec, "{\"seq\": %d, \"func\": \"%s\", \"via\": \"%s\", \"clockid\": %ld, "
                "\"ret\": %lld, \"a\": %lld, \"b\": %lld}\n", i, calls[i].func, calls[i].via,
                calls[i].clockid, calls[i].ret, calls[i].a, calls[i].b);
    fclose(rec);
    return 0;
}
