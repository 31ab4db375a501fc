/* vmove: moves its own vDSO (mremap of [vvar]/[vvar_vclock]/[vdso], as CRIU does) while
 * traced, and checks that nothing is written where it was.
 *
 *   vmove RECORD [--unmap]
 *
 * After the go byte: 200 clock_gettime(CLOCK_MONOTONIC) calls through the C library, then
 * every mapping of the vDSO block ([vvar], [vvar_vclock], [vdso]) is moved with
 * mremap(MREMAP_MAYMOVE|MREMAP_FIXED) into a reserved range elsewhere, keeping their
 * relative offsets (the vDSO's code reads [vvar] rip-relative); then an anonymous mapping
 * filled with 0xA5 is placed where the block was. With --unmap the vDSO block is
 * munmap'ed instead (and the 0xA5 mapping placed there all the same).
 * It prints "moved <old vdso> <new vdso>" and waits for a second byte on stdin (the test
 * lets the tracer leave meanwhile; the C library's clock_gettime still points at the old
 * address, so nothing calls the vDSO in this window). Then it checks the 0xA5 bytes are all
 * intact, and (unless --unmap) calls __vdso_clock_gettime at its new address 100 times,
 * checking each result.
 *
 * Record: {"moved": 1, "old": A, "new": B, "pattern_intact": 0|1, "calls": N, "bad": M}
 * Exit 0 when the pattern is intact and every call was good.
 */
#include "common.h"

#include <sys/mman.h>
#include <time.h>

struct region {
    unsigned long lo, hi;
};

static int find_block(struct region *r, int max, unsigned long *vdso)
{
    FILE *m = fopen("/proc/self/maps", "r");
    char line[512];
    int n = 0;
    if (!m)
        die("cannot read /proc/self/maps");
    while (fgets(line, sizeof line, m) && n < max) {
        unsigned long lo, hi;
        if (sscanf(line, "%lx-%lx", &lo, &hi) != 2)
            continue;
        if (strstr(line, "[vvar]") || strstr(line, "[vvar_vclock]") || strstr(line, "[vdso]")) {
            r[n].lo = lo;
            r[n].hi = hi;
            n++;
            if (strstr(line, "[vdso]"))
                *vdso = lo;
        }
    }
    fclose(m);
    return n;
}

typedef int (*cg_t)(clockid_t, struct timespec *);

int main(int argc, char **argv)
{
    struct region r[8];
    unsigned long vdso = 0, lo, hi, size, dest, newvdso;
    unsigned long off_cg;
    int n, i, unmap, intact = 1;
    unsigned long long calls = 0, bad = 0;
    struct timespec ts, prev = {0, 0};
    unsigned char *pat;
    FILE *f;
    char c;

    if (argc < 2)
        die("usage: vmove RECORD [--unmap]");
    unmap = arg_flag(argc, argv, "--unmap");
    record_truncate(argv[1]);
    off_cg = (unsigned long)vdso_sym_required("__vdso_clock_gettime") - getauxval(AT_SYSINFO_EHDR);
    n = find_block(r, 8, &vdso);
    if (!n || !vdso)
        die("no vDSO block in /proc/self/maps");
    lo = r[0].lo;
    hi = r[n - 1].hi;
    for (i = 1; i < n; i++)
        if (r[i].lo != r[i - 1].hi)
            die("the vDSO block is not contiguous");
    size = hi - lo;

    ready_and_wait();
    for (i = 0; i < 200; i++)
        clock_gettime(CLOCK_MONOTONIC, &ts);

    /* a destination far from the old block */
    dest = (unsigned long)mmap(NULL, size + (64UL << 20), PROT_NONE,
                               MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if ((void *)dest == MAP_FAILED)
        die("mmap failed");
    dest += 32UL << 20;
    if (unmap) {
        if (munmap((void *)lo, size))
            die("munmap of the vDSO block failed: %s", strerror(errno));
    } else {
        for (i = 0; i < n; i++)
            if (mremap((void *)r[i].lo, r[i].hi - r[i].lo, r[i].hi - r[i].lo,
                       MREMAP_MAYMOVE | MREMAP_FIXED, (void *)(dest + r[i].lo - lo)) == MAP_FAILED)
                die("mremap of %lx failed: %s", r[i].lo, strerror(errno));
    }
    newvdso = unmap ? 0 : dest + vdso - lo;
    pat = mmap((void *)lo, size, PROT_READ | PROT_WRITE,
               MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
    if ((void *)pat != (void *)lo)
        die("cannot map the pattern at the old address");
    memset(pat, 0xA5, size);
    printf("moved %lu %lu\n", vdso, newvdso);
    fflush(stdout);

    while (read(0, &c, 1) < 0 && errno == EINTR)
        ;
    for (i = 0; i < (int)size; i++)
        if (pat[i] != 0xA5)
            intact = 0;
    if (!unmap) {
        cg_t cg = (cg_t)(newvdso + off_cg);
        for (i = 0; i < 100; i++) {
            int rc = cg(CLOCK_MONOTONIC, &ts);
            calls++;
            if (bad_timespec(rc, &ts, &prev))
                bad++;
            prev = ts;
        }
    }
    printf("intact=%d calls=%llu bad=%llu\n", intact, calls, bad);
    fflush(stdout);
    f = record_open_append(argv[1]);
    fprintf(f, "{\"moved\": 1, \"old\": %lu, \"new\": %lu, \"pattern_intact\": %d, \"calls\": %llu, "
            "\"bad\": %llu}\n", vdso, newvdso, intact, calls, bad);
    if (fclose(f))
        die("cannot write the record");
    return intact && !bad ? 0 : 1;
}
