/* sigs: SIGUSR1 deliveries whose handler records what it saw.
 *
 *   sigs RECORD [--count N] [--raw-norestorer | --raw-restorer] [--forge]
 *
 * A SIGUSR1 handler is installed with SA_SIGINFO, through the C library's
 * sigaction by default. On x86_64 glibc sets SA_RESTORER (its __restore_rt);
 * glibc 2.36 on i386 does not (checked with strace), so the kernel makes the
 * handler return into the vDSO's __kernel_rt_sigreturn
 * (arch/x86/kernel/signal_32.c). i386 only: --raw-norestorer installs it with
 * the raw rt_sigaction system call and no SA_RESTORER (the vDSO path, whatever
 * the C library does); --raw-restorer with SA_RESTORER and a restorer of the
 * target's own, target_rt_restorer (movl $173,%eax; int $0x80). The old
 * spelling --raw-noreorer is accepted too. After the go byte the main thread sends
 * itself N (default 25) SIGUSR1 with tgkill. The handler records its own
 * address, its return address (the restorer the kernel pushed), the signal
 * number and the interrupted ip from its ucontext.
 *
 * --forge (x86_64 only), after the deliveries: an rt_sigreturn with no
 * signal pending. A frame (pretcode slot + struct ucontext) is built in a
 * buffer, its saved rip is forge_landing(), its rsp a private stack; rsp is
 * pointed at the ucontext and `mov $15,%eax; syscall` is executed
 * (arch/x86/kernel/signal_64.c: frame = regs->sp - sizeof(long)).
 * forge_landing() notes it ran and longjmps back.
 *
 * Record, one JSON line each:
 *   {"kind": "delivery", "n": i, "tid", "signo": 10, "handler": "0x…",
 *    "restorer": "0x…", "interrupted_ip": "0x…"}
 *   {"kind": "forge", "tid", "resume_ip": "0x…", "reached": true}   (--forge)
 *   {"kind": "summary", "tid", "sent": N, "delivered": M,
 *    "raw_norestorer": bool, "raw_restorer": bool, "abi": "x86_64"|"i386"}
 */
#include "common.h"

#include <setjmp.h>
#include <signal.h>
#include <ucontext.h>

#define MAX_SIGS 256

struct delivery {
    int signo;
    uintptr_t handler, restorer, ip;
};

static struct delivery deliveries[MAX_SIGS];
static volatile sig_atomic_t ndeliv;

static void handler(int sig, siginfo_t *si, void *uctx)
{
    ucontext_t *uc = uctx;
    struct delivery *d;
    (void)si;
    if (ndeliv >= MAX_SIGS)
        return;
    d = &deliveries[ndeliv];
    d->signo = sig;
    d->handler = (uintptr_t)&handler;
    d->restorer = (uintptr_t)__builtin_return_address(0);
#ifdef __i386__
    d->ip = (uintptr_t)uc->uc_mcontext.gregs[REG_EIP];
#else
    d->ip = (uintptr_t)uc->uc_mcontext.gregs[REG_RIP];
#endif
    ndeliv++;
}

#ifdef __i386__
/* The i386 struct sigaction of the rt_sigaction system call
 * (arch/x86/include/asm/signal.h, !__ARCH_WANT_... : handler, flags,
 * restorer, mask). */
struct ksigaction {
    void (*handler)(int, siginfo_t *, void *);
    unsigned long flags;
    void *restorer;
    unsigned long mask[2];
};
#define KSA_SIGINFO 0x00000004UL
#define KSA_RESTORER 0x04000000UL

/* A restorer of the target's own: rt_sigreturn (173 on i386) by int $0x80. */
__asm__(".text\n"
        ".globl target_rt_restorer\n"
        ".type target_rt_restorer, @function\n"
        "target_rt_restorer:\n"
        "\tmovl $173, %eax\n"
        "\tint $0x80\n"
        ".size target_rt_restorer, .-target_rt_restorer\n");
extern void target_rt_restorer(void);

static void install_raw(int with_restorer)
{
    struct ksigaction ksa;
    memset(&ksa, 0, sizeof ksa);
    ksa.handler = handler;
    ksa.flags = KSA_SIGINFO;
    if (with_restorer) {
        ksa.flags |= KSA_RESTORER;
        ksa.restorer = (void *)target_rt_restorer;
    }
    if (syscall(SYS_rt_sigaction, SIGUSR1, &ksa, NULL, 8) != 0)
        die("rt_sigaction failed: %s", strerror(errno));
}
#endif

#ifdef __x86_64__
static jmp_buf forge_env;
static volatile int forge_reached;
static unsigned char forge_stack[64 * 1024] __attribute__((aligned(16)));

__attribute__((noinline, noreturn)) static void forge_landing(void)
{
    forge_reached = 1;
    longjmp(forge_env, 1);
}

struct forged_frame {
    uint64_t pretcode;  /* the slot the restorer's address would occupy */
    ucontext_t uc;      /* same prefix layout as the kernel's struct ucontext */
} __attribute__((aligned(16)));

static struct forged_frame frame;

static void forge(void)
{
    stack_t ss;
    sigset_t mask;
    greg_t *g;

    memset(&frame, 0, sizeof frame);
    if (sigaltstack(NULL, &ss) != 0)
        die("sigaltstack failed");
    sigprocmask(SIG_SETMASK, NULL, &mask);
    frame.uc.uc_stack = ss;
    frame.uc.uc_sigmask = mask;
    frame.uc.uc_mcontext.fpregs = NULL; /* kernel: no FPU state -> init state */
    g = frame.uc.uc_mcontext.gregs;
    g[REG_RIP] = (greg_t)(uintptr_t)&forge_landing;
    /* As if just called: (rsp + 8) % 16 == 0. */
    g[REG_RSP] = (greg_t)(((uintptr_t)(forge_stack + sizeof forge_stack) & ~(uintptr_t)15) - 8);
    g[REG_EFL] = 0x202;
    /* cs | gs << 16 | fs << 32 | ss << 48: __USER_CS 0x33, __USER_DS 0x2b */
    g[REG_CSGSFS] = (greg_t)(0x33ULL | (0x2bULL << 48));

    if (setjmp(forge_env) == 0) {
        __asm__ volatile("mov %0, %%rsp\n\t"
                         "mov $15, %%eax\n\t" /* __NR_rt_sigreturn */
                         "syscall\n\t"
                         "ud2"
                         :
                         : "r"(&frame.uc)
                         : "memory");
        __builtin_unreachable();
    }
}
#endif

int main(int argc, char **argv)
{
    int count, raw, raw_restorer, do_forge, i;
    pid_t pid, tid;
    FILE *f;

    if (argc < 2)
        die("usage: sigs RECORD [--count N] [--raw-norestorer | --raw-restorer] [--forge]");
    count = (int)arg_long(argc, argv, "--count", 25);
    raw = arg_flag(argc, argv, "--raw-norestorer") || arg_flag(argc, argv, "--raw-noreorer");
    raw_restorer = arg_flag(argc, argv, "--raw-restorer");
    do_forge = arg_flag(argc, argv, "--forge");
    if (count < 0 || count > MAX_SIGS)
        die("bad --count");
    record_truncate(argv[1]);
    pid = getpid();
    tid = gettid_raw();

    if (raw || raw_restorer) {
#ifdef __i386__
        install_raw(raw_restorer);
#else
        die("--raw-norestorer and --raw-restorer are for i386");
#endif
    } else {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = handler;
        sa.sa_flags = SA_SIGINFO;
        sigemptyset(&sa.sa_mask);
        if (sigaction(SIGUSR1, &sa, NULL) != 0)
            die("sigaction failed");
    }
#ifndef __x86_64__
    if (do_forge)
        die("--forge is for x86_64");
#endif

    ready_and_wait();

    for (i = 0; i < count; i++)
        syscall(SYS_tgkill, pid, tid, SIGUSR1);
#ifdef __x86_64__
    if (do_forge)
        forge();
#endif

    f = record_open_append(argv[1]);
    for (i = 0; i < ndeliv; i++)
        fprintf(f, "{\"kind\": \"delivery\", \"n\": %d, \"tid\": %d, \"signo\": %d, "
                   "\"handler\": \"%#lx\", \"restorer\": \"%#lx\", \"interrupted_ip\": \"%#lx\"}\n",
                i, (int)tid, deliveries[i].signo, (unsigned long)deliveries[i].handler,
                (unsigned long)deliveries[i].restorer, (unsigned long)deliveries[i].ip);
#ifdef __x86_64__
    if (do_forge)
        fprintf(f, "{\"kind\": \"forge\", \"tid\": %d, \"resume_ip\": \"%#lx\", \"reached\": %s}\n",
                (int)tid, (unsigned long)(uintptr_t)&forge_landing,
                forge_reached ? "true" : "false");
#endif
    fprintf(f, "{\"kind\": \"summary\", \"tid\": %d, \"sent\": %d, \"delivered\": %d, "
               "\"raw_norestorer\": %s, \"raw_restorer\": %s, \"abi\": \"%s\"}\n",
            (int)tid, count, (int)ndeliv, raw ? "true" : "false",
            raw_restorer ? "true" : "false",
#ifdef __i386__
            "i386"
#else
            "x86_64"
#endif
    );
    if (fclose(f))
        die("cannot write the record");
#ifdef __x86_64__
    if (do_forge && !forge_reached)
        return 1;
#endif
    return ndeliv == count ? 0 : 1;
}
