/* sigstub: signal handlers that interrupt threads inside the tracer's code, across a detach.
 *
 *   sigstub RECORD hold [--altstack] [--ring]
 *   sigstub RECORD flood [--threads N]
 *
 * hold: after the go byte the main thread calls clock_gettime and gettimeofday through the
 * C library in a loop, and a second thread sends it SIGUSR1 every 50 us. The handler looks
 * at the interrupted pc (from its ucontext): the first time it lies in code the tracer wrote
 * -- the vDSO's padding (after the image's section headers, where the stop-based engine puts
 * its stubs) or the mapping /memfd:vdsotrace-code (--inject) -- it prints "held 0xPC" and
 * blocks reading one byte from stdin, inside the handler, with the interrupted context
 * saved in its signal frame. After that byte the handler returns, the loop makes 200000
 * more calls, and the target prints "calls=N bad=M signals=S held=0xPC" and exits.
 * --altstack: the handler runs on a sigaltstack. --ring (under --inject): hold only where the
 * interrupted context already holds the ring's address (r11 on x86_64, esi on i386: the
 * recorder's stubs load it there at the start of their ring-writing window), so it writes
 * the ring once the handler returns.
 *
 * flood: N threads (default 2) loop on the same calls while a sender thread keeps sending
 * each of them SIGUSR1 (a handler that only counts), until stdin gives a byte or end of
 * file; then the same line.
 *
 * A result that breaks a rule (clock_gettime: 0, tv_nsec in [0, 1e9), not before the
 * previous one; gettimeofday: 0, tv_usec in [0, 1e6)) counts as bad. Record:
 *   {"calls": N, "bad": M, "signals": S, "held": "0x..." | null}
 * Exit 0 when bad is 0.
 */
#include "common.h"

#include <pthread.h>
#include <signal.h>
#include <sys/time.h>
#include <time.h>
#include <ucontext.h>

static volatile int stop, armed;
static volatile unsigned long long signals;
static volatile uintptr_t held_pc;
static uintptr_t pad_lo, pad_hi, code_lo, code_hi, ring_lo;
static int want_ring;
static pid_t worker_tids[16];
static int nworkers = 1;

static void find_ours(void)
{
    const unsigned char *base = (const unsigned char *)getauxval(AT_SYSINFO_EHDR);
    const ElfW(Ehdr) *eh = (const ElfW(Ehdr) *)base;
    char line[512];
    FILE *f = fopen("/proc/self/maps", "r");
    if (!f)
        die("cannot read /proc/self/maps");
    while (fgets(line, sizeof line, f)) {
        unsigned long lo, hi;
        if (sscanf(line, "%lx-%lx", &lo, &hi) != 2)
            continue;
        if (strstr(line, "[vdso]")) {
            pad_lo = ((uintptr_t)base + eh->e_shoff + (uintptr_t)eh->e_shnum * eh->e_shentsize);
            pad_hi = hi;
        } else if (strstr(line, "vdsotrace-code")) {
            code_lo = lo;
            code_hi = hi;
        } else if (strstr(line, "vdsotrace-ring")) {
            ring_lo = lo;
        }
    }
    fclose(f);
}

static uintptr_t interrupted_pc(void *ucv)
{
    ucontext_t *uc = ucv;
#ifdef __x86_64__
    return (uintptr_t)uc->uc_mcontext.gregs[REG_RIP];
#else
    return (uintptr_t)uc->uc_mcontext.gregs[REG_EIP];
#endif
}

static uintptr_t interrupted_ring_reg(void *ucv)
{
    ucontext_t *uc = ucv;
#ifdef __x86_64__
    return (uintptr_t)uc->uc_mcontext.gregs[REG_R11];
#else
    return (uintptr_t)uc->uc_mcontext.gregs[REG_ESI];
#endif
}

/* i386, stop-based engine with marker stops: the stubs make their marker system calls through
 * the vDSO's own __kernel_vsyscall, so a thread stopped there has its pc in the gateway and a
 * return address into the padding on top of its stack (under the gateway's three pushes). */
static int returns_into_padding(void *ucv, uintptr_t pc)
{
#ifdef __x86_64__
    (void)ucv;
    (void)pc;
    return 0;
#else
    ucontext_t *uc = ucv;
    const uintptr_t *sp = (const uintptr_t *)uc->uc_mcontext.gregs[REG_ESP];
    uintptr_t vdso = (uintptr_t)getauxval(AT_SYSINFO_EHDR);
    int k;
    if (pc < vdso || pc >= pad_lo)
        return 0;
    for (k = 0; k < 4; k++)
        if (sp[k] >= pad_lo && sp[k] < pad_hi)
            return 1;
    return 0;
#endif
}

static void put_hex(char *p, uintptr_t v, int *n)
{
    char tmp[24];
    int k = 0;
    do {
        tmp[k++] = "0123456789abcdef"[v & 15];
        v >>= 4;
    } while (v);
    while (k)
        p[(*n)++] = tmp[--k];
}

static void handler(int sig, siginfo_t *si, void *ucv)
{
    uintptr_t pc = interrupted_pc(ucv);
    int saved = errno;
    (void)sig;
    (void)si;
    signals++;
    int ours = (pc >= pad_lo && pc < pad_hi) || (pc >= code_lo && pc < code_hi)
               || returns_into_padding(ucv, pc);
    if (want_ring)
        ours = pc >= code_lo && pc < code_hi && ring_lo && interrupted_ring_reg(ucv) == ring_lo;
    if (armed && ours) {
        char line[48] = "held 0x", c;
        int n = 7;
        ssize_t r;
        armed = 0;
        held_pc = pc;
        put_hex(line, pc, &n);
        line[n++] = '\n';
        if (write(1, line, n) != n)
            _exit(3);
        do {
            r = read(0, &c, 1);
        } while (r < 0 && errno == EINTR);
    }
    errno = saved;
}

struct counts { unsigned long long calls, bad; };

static void calls(struct counts *c, struct timespec *prev)
{
    checked_pair(&c->calls, &c->bad, prev);
}

static void *sender(void *arg)
{
    long period_us = (long)(intptr_t)arg;
    while (!stop) {
        for (int i = 0; i < nworkers; i++)
            if (worker_tids[i])
                syscall(SYS_tgkill, getpid(), worker_tids[i], SIGUSR1);
        if (period_us)
            usleep(period_us);
    }
    return NULL;
}

static struct counts totals[16];

static void *flood_worker(void *arg)
{
    int i = (int)(intptr_t)arg;
    struct timespec prev = {0, 0};
    worker_tids[i] = gettid_raw();
    clock_gettime(CLOCK_MONOTONIC, &prev);
    while (!stop)
        calls(&totals[i], &prev);
    return NULL;
}

int main(int argc, char **argv)
{
    struct sigaction sa;
    pthread_t snd, workers[16];
    struct counts c = {0, 0};
    const char *mode;
    char b;
    FILE *f;

    if (argc < 3)
        die("usage: sigstub RECORD hold|flood [--altstack] [--threads N]");
    mode = argv[2];
    record_truncate(argv[1]);
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = handler;
    sa.sa_flags = SA_SIGINFO | SA_RESTART;
    if (arg_flag(argc, argv, "--altstack")) {
        stack_t ss;
        ss.ss_sp = malloc(1 << 16);
        ss.ss_size = 1 << 16;
        ss.ss_flags = 0;
        if (sigaltstack(&ss, NULL))
            die("sigaltstack");
        sa.sa_flags |= SA_ONSTACK;
    }
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGUSR1, &sa, NULL))
        die("sigaction");

    want_ring = arg_flag(argc, argv, "--ring");
    ready_and_wait();
    find_ours();
    if (strcmp(mode, "hold") == 0) {
        struct timespec prev = {0, 0};
        unsigned long long after = 0;
        worker_tids[0] = gettid_raw();
        armed = 1;
        pthread_create(&snd, NULL, sender, (void *)(intptr_t)50);
        clock_gettime(CLOCK_MONOTONIC, &prev);
        while (armed)
            calls(&c, &prev);
        stop = 1;
        pthread_join(snd, NULL);
        while (after < 200000) {
            calls(&c, &prev);
            after += 2;
        }
    } else if (strcmp(mode, "flood") == 0) {
        nworkers = (int)arg_long(argc, argv, "--threads", 2);
        if (nworkers < 1 || nworkers > 16)
            die("--threads 1..16");
        for (int i = 0; i < nworkers; i++)
            pthread_create(&workers[i], NULL, flood_worker, (void *)(intptr_t)i);
        pthread_create(&snd, NULL, sender, (void *)(intptr_t)0);
        while (read(0, &b, 1) < 0 && errno == EINTR)
            ;
        stop = 1;
        for (int i = 0; i < nworkers; i++) {
            pthread_join(workers[i], NULL);
            c.calls += totals[i].calls;
            c.bad += totals[i].bad;
        }
        pthread_join(snd, NULL);
    } else {
        die("unknown mode %s", mode);
    }
    printf("calls=%llu bad=%llu signals=%llu held=%#lx\n", c.calls, c.bad, signals,
           (unsigned long)held_pc);
    fflush(stdout);
    f = record_open_append(argv[1]);
    if (held_pc)
        fprintf(f, "{\"calls\": %llu, \"bad\": %llu, \"signals\": %llu, \"held\": \"%#lx\"}\n",
                c.calls, c.bad, signals, (unsigned long)held_pc);
    else
        fprintf(f, "{\"calls\": %llu, \"bad\": %llu, \"signals\": %llu, \"held\": null}\n",
                c.calls, c.bad, signals);
    fclose(f);
    return c.bad != 0;
}
