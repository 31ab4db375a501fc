/* a64inj: the target of the arm64 --inject tests (tests/vm/test_inject_aarch64.py).
 *
 *   a64inj RECORD [--iters N]
 *
 * Starts a second thread; both wait on a pipe, and "ready <pid> <tid1> <tid2>" is printed once
 * both are waiting. At the go byte on stdin both run N rounds of vDSO calls, each through the
 * vDSO's own symbols (vdso_sym) or through libc, with clocks the vDSO answers itself and
 * clocks it hands to the kernel (its `svc #0` fallback: CPU-time clocks, an invalid clock):
 *   clock_gettime(MONOTONIC) [vdso], clock_gettime(REALTIME) [libc],
 *   clock_gettime(PROCESS_CPUTIME_ID) [vdso], clock_gettime(100 + thread) [vdso: EINVAL],
 *   gettimeofday(&tv, round odd ? &tz : NULL) [vdso], gettimeofday(&tv, NULL) [libc],
 *   clock_getres(round odd ? PROCESS_CPUTIME_ID : MONOTONIC) [vdso],
 *   getrandom(buf, 16, 0, NULL, 0) [vdso, where it has one: no opaque state, so its
 *   getrandom system call fallback; the function starts with paciasp].
 * Each call appends a line to the thread's buffer: "tid fn a0 a1 ret out0hex out1hex" (outs:
 * the bytes the call wrote when it returned 0, else "-"); when both threads are done, main
 * writes the lines to RECORD, prints "done" and waits for a quit byte on stdin before it joins
 * the threads (which wait on the pipe too: their read is in progress while the tracer
 * leaves) and exits 0.
 *
 *   --seccomp   install a seccomp filter that allows everything first (Seccomp: 2)
 *   --seal      mseal(2) its [vdso] mapping first; the ready line's last field is mseal's result
 *   --spin      after the go byte both threads call clock_gettime (vDSO symbol and libc, in
 *               turn) until the quit byte (read by a third thread), checking every result;
 *               RECORD gets "spin CALLS FAILED BACKWARDS", then exit 0. The tracer comes and
 *               goes meanwhile. Commands on stdin then: 's' sends SIGUSR1 to the second
 *               thread, whose handler saves the pc it interrupted, prints "sig PC" (hex) and
 *               blocks reading a pipe; 'r' releases it (it makes a few calls of its own and
 *               returns through the vDSO's sigreturn to the pc it interrupted), "released";
 *               'q' quits.
 */
#include "common.h"

#include <linux/filter.h>
#include <linux/seccomp.h>
#include <pthread.h>
#include <signal.h>
#include <sys/prctl.h>
#include <ucontext.h>
#include <sys/time.h>
#include <time.h>

typedef int (*gettime_fn)(long, struct timespec *);
typedef int (*tod_fn)(struct timeval *, struct timezone *);

typedef long (*getrandom_fn)(void *, unsigned long, unsigned int, void *, unsigned long);
static getrandom_fn v_getrandom;
static gettime_fn v_gettime, v_getres;
static tod_fn v_tod;
static long iters;
static int go_pipe[2], quit_pipe[2];
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cond = PTHREAD_COND_INITIALIZER;
static int waiting;

struct buf {
    char *data;
    size_t len, cap;
};

static void add(struct buf *b, const char *fmt, ...)
{
    va_list ap;
    int n;
    if (b->cap - b->len < 512) {
        b->cap = b->cap ? b->cap * 2 : 1 << 16;
        b->data = realloc(b->data, b->cap);
        if (!b->data)
            die("out of memory");
    }
    va_start(ap, fmt);
    n = vsnprintf(b->data + b->len, b->cap - b->len, fmt, ap);
    va_end(ap);
    b->len += n;
}

static void hex(char *out, const void *p, size_t n, int ok)
{
    const unsigned char *c = p;
    size_t i;
    if (!ok) {
        strcpy(out, "-");
        return;
    }
    for (i = 0; i < n; i++)
        sprintf(out + 2 * i, "%02x", c[i]);
}

static void wait_pipe(int fd)
{
    char c;
    ssize_t r;
    pthread_mutex_lock(&lock);
    waiting++;
    pthread_cond_broadcast(&cond);
    pthread_mutex_unlock(&lock);
    do {
        r = read(fd, &c, 1);
    } while (r < 0 && errno == EINTR);
    if (r != 1)
        die("pipe closed");
}

static void rounds(struct buf *b, int t)
{
    long i;
    pid_t tid = gettid_raw();
    for (i = 0; i < iters; i++) {
        struct timespec ts;
        struct timeval tv;
        struct timezone tz;
        char o0[64], o1[64];
        long clk;
        int r;

        memset(&ts, 0, sizeof ts);
        r = v_gettime(CLOCK_MONOTONIC, &ts);
        hex(o0, &ts, sizeof ts, r == 0);
        add(b, "%d clock_gettime %d %lx %d %s -\n", tid, CLOCK_MONOTONIC, (unsigned long)&ts, r, o0);

        r = clock_gettime(CLOCK_REALTIME, &ts);
        hex(o0, &ts, sizeof ts, r == 0);
        add(b, "%d clock_gettime %d %lx %d %s -\n", tid, CLOCK_REALTIME, (unsigned long)&ts, r, o0);

        r = v_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
        hex(o0, &ts, sizeof ts, r == 0);
        add(b, "%d clock_gettime %d %lx %d %s -\n", tid, CLOCK_PROCESS_CPUTIME_ID,
            (unsigned long)&ts, r, o0);

        r = v_gettime(100 + t, &ts);
        hex(o0, &ts, sizeof ts, r == 0);
        add(b, "%d clock_gettime %d %lx %d %s -\n", tid, 100 + t, (unsigned long)&ts, r, o0);

        if (i & 1) {
            r = v_tod(&tv, &tz);
            hex(o0, &tv, sizeof tv, r == 0);
            hex(o1, &tz, sizeof tz, r == 0);
            add(b, "%d gettimeofday %lx %lx %d %s %s\n", tid, (unsigned long)&tv,
                (unsigned long)&tz, r, o0, o1);
        } else {
            r = v_tod(&tv, NULL);
            hex(o0, &tv, sizeof tv, r == 0);
            add(b, "%d gettimeofday %lx 0 %d %s -\n", tid, (unsigned long)&tv, r, o0);
        }

        r = gettimeofday(&tv, NULL);
        hex(o0, &tv, sizeof tv, r == 0);
        add(b, "%d gettimeofday %lx 0 %d %s -\n", tid, (unsigned long)&tv, r, o0);

        clk = (i & 1) ? CLOCK_PROCESS_CPUTIME_ID : CLOCK_MONOTONIC;
        r = v_getres(clk, &ts);
        hex(o0, &ts, sizeof ts, r == 0);
        add(b, "%d clock_getres %ld %lx %d %s -\n", tid, clk, (unsigned long)&ts, r, o0);

        if (v_getrandom) {
            unsigned char rnd[16];
            long n = v_getrandom(rnd, sizeof rnd, 0, NULL, 0);
            add(b, "%d getrandom %lx %zu %ld - -\n", tid, (unsigned long)rnd, sizeof rnd, n);
        }
    }
}

static struct buf bufs[2];
static volatile int stop_spin;
static long spin_calls[2], spin_failed[2], spin_back[2];

static void spin(int t)
{
    struct timespec prev = {0, 0}, ts;
    long n = 0;
    while (!stop_spin) {
        int r = (n & 1) ? clock_gettime(CLOCK_MONOTONIC, &ts) : v_gettime(CLOCK_MONOTONIC, &ts);
        n++;
        if (r != 0) {
            spin_failed[t]++;
            continue;
        }
        if (ts_before(&ts, &prev))
            spin_back[t]++;
        prev = ts;
    }
    spin_calls[t] = n;
}

static int spinning;
static pthread_t worker_th;
static int hpipe[2];
static volatile unsigned long sig_pc;
static volatile int sig_in, sig_done;

static void on_usr1(int sig, siginfo_t *si, void *ctx)
{
    ucontext_t *uc = ctx;
    struct timespec ts;
    char c;
    int k;
    (void)sig;
    (void)si;
    sig_pc = uc->uc_mcontext.pc;
    sig_in = 1;
    while (read(hpipe[0], &c, 1) < 0 && errno == EINTR)
        ;
    for (k = 0; k < 10; k++)
        if (v_gettime(CLOCK_MONOTONIC, &ts) != 0)
            spin_failed[1]++;
    sig_in = 0;
    sig_done++;
}

static void wait_for(volatile int *flag, int value)
{
    struct timespec d = {0, 1000000};
    while (*flag != value)
        nanosleep(&d, NULL);
}

static void *watcher(void *arg)
{
    char c;
    (void)arg;
    for (;;) {
        ssize_t r = read(0, &c, 1);
        if (r < 0 && errno == EINTR)
            continue;
        if (r != 1 || c == 'q')
            break;
        if (c == 's') {
            pthread_kill(worker_th, SIGUSR1);
            wait_for(&sig_in, 1);
            printf("sig %lx\n", sig_pc);
            fflush(stdout);
        } else if (c == 'r') {
            int done = sig_done;
            if (write(hpipe[1], "r", 1) != 1)
                die("write");
            while (sig_done == done)
                usleep(1000);
            printf("released\n");
            fflush(stdout);
        }
    }
    stop_spin = 1;
    return NULL;
}

static long seal_vdso(void)
{
    char line[512];
    unsigned long lo, hi;
    FILE *f = fopen("/proc/self/maps", "r");
    if (!f)
        return -1;
    while (fgets(line, sizeof line, f)) {
        if (strstr(line, "[vdso]") && sscanf(line, "%lx-%lx", &lo, &hi) == 2) {
            fclose(f);
            return syscall(462, lo, hi - lo, 0) == 0 ? 0 : errno;   /* __NR_mseal */
        }
    }
    fclose(f);
    return -1;
}

static void allow_all_filter(void)
{
    struct sock_filter insns[] = {BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW)};
    struct sock_fprog prog = {1, insns};
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) || prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog))
        die("seccomp: %s", strerror(errno));
}

static void *worker(void *arg)
{
    (void)arg;
    wait_pipe(go_pipe[0]);
    if (spinning) {
        spin(1);
        return NULL;
    }
    rounds(&bufs[1], 1);
    wait_pipe(quit_pipe[0]);
    return NULL;
}

int main(int argc, char **argv)
{
    pthread_t th, wt;
    char c;
    FILE *rec;
    long sealed = 0;

    if (argc < 2)
        die("usage: a64inj RECORD [--iters N]");
    iters = arg_long(argc, argv, "--iters", 300);
    record_truncate(argv[1]);
    v_gettime = (gettime_fn)vdso_sym_required("__kernel_clock_gettime");
    v_getres = (gettime_fn)vdso_sym_required("__kernel_clock_getres");
    v_tod = (tod_fn)vdso_sym_required("__kernel_gettimeofday");
    v_getrandom = (getrandom_fn)vdso_sym("__kernel_getrandom");
    if (pipe(go_pipe) || pipe(quit_pipe))
        die("pipe: %s", strerror(errno));
    spinning = arg_flag(argc, argv, "--spin");
    if (arg_flag(argc, argv, "--seccomp"))
        allow_all_filter();
    if (arg_flag(argc, argv, "--seal"))
        sealed = seal_vdso();
    if (pipe(hpipe))
        die("pipe: %s", strerror(errno));
    {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = on_usr1;
        sa.sa_flags = SA_SIGINFO | SA_RESTART;
        sigemptyset(&sa.sa_mask);
        if (sigaction(SIGUSR1, &sa, NULL))
            die("sigaction");
    }
    if (pthread_create(&th, NULL, worker, NULL))
        die("pthread_create");
    worker_th = th;
    pthread_mutex_lock(&lock);
    while (waiting < 1)
        pthread_cond_wait(&cond, &lock);
    pthread_mutex_unlock(&lock);
    printf("ready %d %d %ld\n", (int)getpid(), (int)gettid_raw(), sealed);
    fflush(stdout);
    if (read(0, &c, 1) != 1)
        die("no go byte on stdin");
    if (write(go_pipe[1], "gg", 2) != 2)
        die("write");
    wait_pipe(go_pipe[0]);
    if (spinning) {
        if (pthread_create(&wt, NULL, watcher, NULL))
            die("pthread_create");
        spin(0);
        pthread_join(th, NULL);
        pthread_join(wt, NULL);
        rec = record_open_append(argv[1]);
        fprintf(rec, "spin %ld %ld %ld\n", spin_calls[0] + spin_calls[1],
                spin_failed[0] + spin_failed[1], spin_back[0] + spin_back[1]);
        fclose(rec);
        return 0;
    }
    rounds(&bufs[0], 0);
    pthread_mutex_lock(&lock);
    while (waiting < 3)
        pthread_cond_wait(&cond, &lock);
    pthread_mutex_unlock(&lock);
    rec = record_open_append(argv[1]);
    fwrite(bufs[0].data, 1, bufs[0].len, rec);
    fwrite(bufs[1].data, 1, bufs[1].len, rec);
    fclose(rec);
    printf("done\n");
    fflush(stdout);
    if (read(0, &c, 1) != 1)
        die("no quit byte on stdin");
    if (write(quit_pipe[1], "q", 1) != 1)
        die("write");
    pthread_join(th, NULL);
    return 0;
}
