/* a64sigs: arm64 SIGUSR1 deliveries whose handler records what it saw, and a forged
 * rt_sigreturn (tests/vm/test_signals_aarch64.py).
 *
 *   a64sigs RECORD [--count N] [--forge] [--own-restorer] [--in-vdso]
 *
 * A SIGUSR1 handler is installed with SA_SIGINFO through the C library's sigaction. glibc sets
 * no SA_RESTORER on arm64, so the kernel points the handler's x30 at the vDSO's
 * __kernel_rt_sigreturn (arch/arm64/kernel/signal.c setup_return). --own-restorer installs it
 * with the raw rt_sigaction system call, SA_RESTORER and a restorer of the program's own,
 * a64_restorer (mov x8, #139; svc #0), which the kernel then puts in x30. --in-vdso: instead of
 * sending them itself, the thread calls __kernel_clock_gettime (through the vDSO's symbol) in
 * a loop while a POSIX timer sends it SIGUSR1 300 us after each arming (armed again once the
 * last one was handled; the delay doubles after a round the signal ended before any call), until
 * N have been delivered: most interrupt it inside the vDSO, and
 * return there through __kernel_rt_sigreturn. After the go byte the main
 * thread sends itself N (default 25) SIGUSR1 with tgkill. The handler records its own address,
 * its return address (__builtin_return_address(0): x30 at its entry, the restorer), the
 * signal number, the interrupted pc from its ucontext (uc_mcontext.pc) and the frame (its
 * ucontext pointer minus the 128-byte siginfo: the handler's sp at entry).
 *
 * --forge, after the deliveries: an rt_sigreturn with no signal delivered. getcontext() fills
 * a struct ucontext (general registers, sp, pc = its return address, the FPSIMD record and
 * its terminator in __reserved, the signal mask: the layout the kernel's restore_sigframe
 * reads) in a 16-byte aligned rt_sigframe-shaped buffer; forge_sigreturn() points sp at it
 * and runs `mov x8, #139; svc #0` (sys_rt_sigreturn: frame = sp). The kernel restores that
 * context: getcontext "returns" a second time, which the program notes.
 *
 * Record, one JSON line each:
 *   {"kind": "delivery", "n": i, "tid", "signo": 10, "handler": "0x…", "restorer": "0x…",
 *    "interrupted_ip": "0x…", "frame": "0x…"}
 *   {"kind": "forge", "tid", "resume_ip": "0x…", "svc": "0x…", "frame": "0x…",
 *    "reached": true}                                                       (--forge)
 *   {"kind": "summary", "tid", "sent": N, "delivered": M, "sa_restorer": bool (the kernel's
 *    view of the flag), "vdso": "0x…" (getauxval(AT_SYSINFO_EHDR)), "own_restorer": "0x…"
 *    (a64_restorer), "calls": the __kernel_clock_gettime calls made (--in-vdso; else 0),
 *    "abi": "aarch64"}
 */
#include "common.h"

#include <signal.h>
#include <time.h>
#include <ucontext.h>

#ifndef __aarch64__
#error "a64sigs is an arm64 program"
#endif

#define MAX_SIGS 256

struct delivery {
    int signo;
    uintptr_t handler, restorer, ip, frame;
};

static struct delivery deliveries[MAX_SIGS];
static volatile sig_atomic_t ndeliv;

static void handler(int sig, siginfo_t *si, void *uctx)
{
    ucontext_t *uc = uctx;
    struct delivery *d;
    if (ndeliv >= MAX_SIGS)
        return;
    d = &deliveries[ndeliv];
    d->signo = sig;
    d->handler = (uintptr_t)&handler;
    /* clang strips the PAC (xpaclri) from __builtin_return_address on arm64 */
    d->restorer = (uintptr_t)__builtin_return_address(0);
    d->ip = (uintptr_t)uc->uc_mcontext.pc;
    d->frame = (uintptr_t)si; /* struct rt_sigframe { siginfo info; ucontext uc; } */
    ndeliv++;
}

/* forge_sigreturn(frame): rt_sigreturn (139, asm-generic/unistd.h) on the frame at x0. */
__asm__(".text\n"
        ".globl forge_sigreturn\n"
        ".type forge_sigreturn, %function\n"
        ".p2align 2\n"
        "forge_sigreturn:\n"
        "\thint #34\n" /* bti c */
        "\tmov sp, x0\n"
        "\tmov x8, #139\n"
        "\tsvc #0\n"
        "\tbrk #1\n"
        ".size forge_sigreturn, .-forge_sigreturn\n");
extern void forge_sigreturn(void *frame);

/* The asm-generic struct sigaction of the rt_sigaction system call (arm64 defines
 * SA_RESTORER): handler, flags, restorer, mask. */
struct ksigaction {
    void (*handler)(int, siginfo_t *, void *);
    unsigned long flags;
    void (*restorer)(void);
    unsigned long mask;
};
#define KSA_RESTORER 0x04000000UL

__asm__(".text\n"
        ".globl a64_restorer\n"
        ".type a64_restorer, %function\n"
        ".p2align 2\n"
        "a64_restorer:\n"
        "\tmov x8, #139\n"
        "\tsvc #0\n"
        ".size a64_restorer, .-a64_restorer\n");
extern void a64_restorer(void);

static struct {
    siginfo_t info;
    ucontext_t uc;
} forged __attribute__((aligned(16)));
static volatile int forge_sent, forge_reached;

static __attribute__((noinline)) void forge(void)
{
    memset(&forged, 0, sizeof forged);
    if (getcontext(&forged.uc) != 0)
        die("getcontext failed");
    if (forge_sent) {
        /* back from the forged rt_sigreturn: the kernel restored this context */
        forge_reached = 1;
        return;
    }
    if (sigaltstack(NULL, &forged.uc.uc_stack) != 0)
        die("sigaltstack failed");
    forge_sent = 1;
    forge_sigreturn(&forged);
    die("rt_sigreturn returned");
}

typedef int (*gettime_fn)(clockid_t, struct timespec *);

static long ncalls; /* --in-vdso: the calls made (each returned) */

static void spin_in_vdso(int count, pid_t tid)
{
    gettime_fn f = (gettime_fn)vdso_sym_required("__kernel_clock_gettime");
    struct sigevent sev;
    struct itimerspec its;
    struct timespec ts;
    timer_t timer;
    long delay_ns = 300 * 1000;
    memset(&sev, 0, sizeof sev);
    sev.sigev_notify = SIGEV_THREAD_ID;
    sev.sigev_signo = SIGUSR1;
    sev._sigev_un._tid = tid;
    if (timer_create(CLOCK_MONOTONIC, &sev, &timer) != 0)
        die("timer_create failed: %s", strerror(errno));
    /* one shot at a time, armed again once it has been handled: a periodic timer would keep a
     * signal pending all the time under a tracer slower than its period */
    while (ndeliv < count) {
        int before = ndeliv;
        long calls = 0;
        memset(&its, 0, sizeof its);
        its.it_value.tv_nsec = delay_ns;
        if (timer_settime(timer, 0, &its, NULL) != 0)
            die("timer_settime failed");
        while (ndeliv == before) {
            f(CLOCK_MONOTONIC, &ts);
            calls++;
        }
        ncalls += calls;
        /* The signal came before the first call: on an emulated machine under load the timer
         * can expire before timer_settime has even returned. Longer next time (to 0.4 s),
         * so that the signals land in the loop, that is in the vDSO. */
        if (calls == 0 && delay_ns < 400 * 1000 * 1000)
            delay_ns *= 2;
    }
    timer_delete(timer);
}

int main(int argc, char **argv)
{
    int count, do_forge, own, in_vdso, i;
    struct sigaction sa, now;
    pid_t pid, tid;
    FILE *f;

    if (argc < 2)
        die("usage: a64sigs RECORD [--count N] [--forge]");
    count = (int)arg_long(argc, argv, "--count", 25);
    do_forge = arg_flag(argc, argv, "--forge");
    own = arg_flag(argc, argv, "--own-restorer");
    in_vdso = arg_flag(argc, argv, "--in-vdso");
    if (count < 0 || count > MAX_SIGS)
        die("bad --count");
    record_truncate(argv[1]);
    pid = getpid();
    tid = gettid_raw();

    if (own) {
        struct ksigaction ksa;
        memset(&ksa, 0, sizeof ksa);
        ksa.handler = handler;
        ksa.flags = SA_SIGINFO | KSA_RESTORER;
        ksa.restorer = a64_restorer;
        if (syscall(SYS_rt_sigaction, SIGUSR1, &ksa, NULL, 8) != 0)
            die("rt_sigaction failed: %s", strerror(errno));
    } else {
        memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = handler;
        sa.sa_flags = SA_SIGINFO;
        sigemptyset(&sa.sa_mask);
        if (sigaction(SIGUSR1, &sa, NULL) != 0)
            die("sigaction failed");
    }
    if (sigaction(SIGUSR1, NULL, &now) != 0)
        die("sigaction failed");

    ready_and_wait();

    if (in_vdso)
        spin_in_vdso(count, tid);
    else
        for (i = 0; i < count; i++)
            syscall(SYS_tgkill, pid, tid, SIGUSR1);
    if (do_forge)
        forge();

    f = record_open_append(argv[1]);
    for (i = 0; i < ndeliv; i++)
        fprintf(f, "{\"kind\": \"delivery\", \"n\": %d, \"tid\": %d, \"signo\": %d, "
                   "\"handler\": \"%#lx\", \"restorer\": \"%#lx\", \"interrupted_ip\": \"%#lx\", "
                   "\"frame\": \"%#lx\"}\n",
                i, (int)tid, deliveries[i].signo, (unsigned long)deliveries[i].handler,
                (unsigned long)deliveries[i].restorer, (unsigned long)deliveries[i].ip,
                (unsigned long)deliveries[i].frame);
    if (do_forge)
        fprintf(f, "{\"kind\": \"forge\", \"tid\": %d, \"resume_ip\": \"%#lx\", "
                   "\"svc\": \"%#lx\", \"frame\": \"%#lx\", \"reached\": %s}\n",
                (int)tid, (unsigned long)forged.uc.uc_mcontext.pc,
                (unsigned long)((uintptr_t)&forge_sigreturn + 12),
                (unsigned long)(uintptr_t)&forged, forge_reached ? "true" : "false");
    fprintf(f, "{\"kind\": \"summary\", \"tid\": %d, \"sent\": %d, \"delivered\": %d, "
               "\"sa_restorer\": %s, \"vdso\": \"%#lx\", \"own_restorer\": \"%#lx\", "
               "\"calls\": %ld, \"abi\": \"aarch64\"}\n",
            (int)tid, count, (int)ndeliv, (now.sa_flags & 0x04000000) ? "true" : "false",
            getauxval(AT_SYSINFO_EHDR), (unsigned long)(uintptr_t)&a64_restorer, ncalls);
    if (fclose(f))
        die("cannot write the record");
    if (do_forge && !forge_reached)
        return 1;
    return ndeliv == count ? 0 : 1;
}
