/* holdsig: a signal handler that interrupts a traced vDSO call and holds there across a
 * detach, so the call is still in flight (its return into the tracer's stub live on the
 * stack, or its pc in the stub itself) when the tracer leaves.
 *
 *   holdsig RECORD [--altstack]
 *
 * After the go byte the main thread calls clock_gettime (CLOCK_MONOTONIC) and
 * gettimeofday through the C library in a loop, and a second thread sends it SIGUSR1
 * every 50 us. The handler looks at the interrupted pc (its ucontext): the first time it
 * lies in the vDSO mapping (its functions or the padding after the image) while the
 * padding holds code (a stop-based tracer's stubs are there), it prints "held 0xPC in
 * vdso|padding" and blocks reading one byte from stdin, inside the handler. After that
 * byte the handler returns, the loop makes 200000 more calls of each, and the target
 * prints "calls=N bad=M held=0xPC" and exits. --altstack: the handler runs on a
 * sigaltstack. A result that breaks a rule (0, tv_nsec in [0, 1e9), not before the
 * previous one; tv_usec in [0, 1e6)) counts as bad. Record:
 *   {"calls": N, "bad": M, "held": "0x..." | null}
 * Exit 0 when bad is 0.
 */
#include "common.h"

#include <elf.h>
#include <link.h>
#include <pthread.h>
#include <signal.h>
#include <sys/auxv.h>
#include <sys/time.h>
#include <time.h>
#include <ucontext.h>

static volatile int stop, armed;
static volatile uintptr_t held_pc;
static uintptr_t vdso_lo, pad_lo, vdso_hi;
static pid_t main_tid;

static void find_vdso(void)
{
    const unsigned char *base = (const unsigned char *)getauxval(AT_SYSINFO_EHDR);
    const ElfW(Ehdr) *eh = (const ElfW(Ehdr) *)base;
    char line[512];
    FILE *f = fopen("/proc/self/maps", "r");
    if (!f)
        die("cannot read /proc/self/maps");
    while (fgets(line, sizeof line, f)) {
        unsigned long lo, hi;
        if (sscanf(line, "%lx-%lx", &lo, &hi) == 2 && strstr(line, "[vdso]")) {
            vdso_lo = lo;
            vdso_hi = hi;
        }
    }
    fclose(f);
    if (!vdso_lo || (uintptr_t)base != vdso_lo)
        die("no [vdso] mapping at AT_SYSINFO_EHDR");
    /* the image ends with its section headers; the rest of the mapping is padding */
    pad_lo = vdso_lo + eh->e_shoff + (uintptr_t)eh->e_shnum * eh->e_shentsize;
}

static int padding_used(void)
{
    for (uintptr_t a = pad_lo; a < vdso_hi; a++)
        if (*(volatile unsigned char *)a)
            return 1;
    return 0;
}

static void on_usr1(int sig, siginfo_t *si, void *uc_)
{
    ucontext_t *uc = uc_;
    char c, msg[96];
    int n;
    (void)sig;
    (void)si;
#ifdef __x86_64__
    uintptr_t pc = (uintptr_t)uc->uc_mcontext.gregs[REG_RIP];
#else
    uintptr_t pc = (uintptr_t)uc->uc_mcontext.gregs[REG_EIP];
#endif
    if (!armed || held_pc || pc < vdso_lo || pc >= vdso_hi || !padding_used())
        return;
    held_pc = pc;
    n = snprintf(msg, sizeof msg, "held %#lx in %s\n", (unsigned long)pc,
                 pc >= pad_lo ? "padding" : "vdso");
    if (write(1, msg, (size_t)n) != n)
        _exit(3);
    while (read(0, &c, 1) < 0 && errno == EINTR)
        ;
}

static void *sender(void *arg)
{
    (void)arg;
    while (!__atomic_load_n(&stop, __ATOMIC_RELAXED)) {
        if (!held_pc)
            syscall(SYS_tgkill, getpid(), main_tid, SIGUSR1);
        usleep(50);
    }
    return NULL;
}

int main(int argc, char **argv)
{
    struct sigaction sa;
    struct timespec prev = {0, 0};
    unsigned long long calls = 0, bad = 0, after = 0;
    pthread_t th;
    FILE *f;

    if (argc < 2)
        die("usage: holdsig RECORD [--altstack]");
    record_truncate(argv[1]);
    find_vdso();
    main_tid = gettid_raw();
    if (arg_flag(argc, argv, "--altstack")) {
        stack_t ss = {.ss_sp = malloc(1 << 16), .ss_size = 1 << 16};
        if (!ss.ss_sp || sigaltstack(&ss, NULL))
            die("sigaltstack failed");
    }
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_usr1;
    sa.sa_flags = SA_SIGINFO | SA_RESTART | (arg_flag(argc, argv, "--altstack") ? SA_ONSTACK : 0);
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGUSR1, &sa, NULL))
        die("sigaction failed");
    ready_and_wait();
    armed = 1;
    if (pthread_create(&th, NULL, sender, NULL))
        die("pthread_create failed");
    while (after < 200000) {
        checked_pair(&calls, &bad, &prev);
        if (held_pc)
            after++;
    }
    __atomic_store_n(&stop, 1, __ATOMIC_RELAXED);
    pthread_join(th, NULL);
    printf("calls=%llu bad=%llu held=%#lx\n", calls, bad, (unsigned long)held_pc);
    fflush(stdout);
    f = record_open_append(argv[1]);
    fprintf(f, "{\"calls\": %llu, \"bad\": %llu, \"held\": \"%#lx\"}\n", calls, bad,
            (unsigned long)held_pc);
    if (fclose(f))
        die("cannot write the record");
    return bad ? 1 : 0;
}
