"""tracer.inject: the in-process recorder, driven directly (the engine wires it in later).

The live tests attach with tracer.target, install the Recorder, let a C workload run, drain,
stop every thread, uninstall and detach, then compare the records with what the workload
recorded itself, call by call per thread, and the vDSO's bytes with their state before.
"""
from __future__ import annotations

import os
import select
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tracer import procfs, target
from tracer.abi import I386, X86_64, Abi
from tracer.decoders import for_function
from tracer.inject import InjectError, RawRecord, Recorder
from tracer.inject import layout as L
from tracer.inject.plan import plan_image
from tracer.inject.stubs import build_code
from tracer.vdso import SIGRETURN_TRAMPOLINES, VdsoImage, parse_image

pytestmark = pytest.mark.skipif(sys.platform != "linux" or os.uname().machine != "x86_64",
                                reason="x86_64 Linux only")

# --------------------------------------------------------------------------- the workload

WORKLOAD_C = r"""
#define _GNU_SOURCE
#include <elf.h>
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/auxv.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

/* workload RECORD THREADS ROUNDS [--bench N]
 * Prints "ready PID", reads one byte, then every thread makes ROUNDS rounds of vDSO calls
 * (through libc and straight into the vDSO), keeps what each returned and wrote, writes
 * the record (one line per call, per thread in call order), prints "done", reads one more
 * byte and exits.  --bench N: the main thread alone makes N clock_gettime calls after the
 * go byte and prints "ns_per_call X". */

typedef int (*cg_t)(clockid_t, struct timespec *);
typedef int (*tod_t)(struct timeval *, struct timezone *);
typedef time_t (*time_t_fn)(time_t *);
typedef int (*cpu_t)(unsigned *, unsigned *, void *);
static cg_t v_cg, v_res;
static tod_t v_tod;
static time_t_fn v_time;
static cpu_t v_cpu;

static void *vsym(const char *name)
{
    uintptr_t base = getauxval(AT_SYSINFO_EHDR);
    Elf64_Ehdr *eh = (Elf64_Ehdr *)base;
    Elf64_Shdr *sh = (Elf64_Shdr *)(base + eh->e_shoff);
    for (int i = 0; i < eh->e_shnum; i++) {
        if (sh[i].sh_type != SHT_DYNSYM) continue;
        Elf64_Sym *sym = (Elf64_Sym *)(base + sh[i].sh_offset);
        const char *str = (const char *)(base + sh[sh[i].sh_link].sh_offset);
        for (size_t k = 0; k < sh[i].sh_size / sizeof(Elf64_Sym); k++)
            if (!strcmp(str + sym[k].st_name, name)) return (void *)(base + sym[k].st_value);
    }
    fprintf(stderr, "no %s\n", name);
    exit(2);
}

#define MAXREC 100000
struct rec { const char *func; int tid; long a0, a1, a2; long ret; int fb;
             int nout; int osz[2]; unsigned char out[2][16]; int has[2]; };
struct thr { pthread_t th; int tid; int n; struct rec *r; };
static int ROUNDS;
static pthread_barrier_t go, fin;

static struct rec *add(struct thr *t, const char *f, long a0, long a1, long a2, long ret, int fb)
{
    struct rec *r = &t->r[t->n++];
    memset(r, 0, sizeof *r);
    r->func = f; r->tid = t->tid; r->a0 = a0; r->a1 = a1; r->a2 = a2; r->ret = ret; r->fb = fb;
    return r;
}
static void out(struct rec *r, int k, const void *p, int size, int copied)
{
    r->nout = k + 1; r->osz[k] = size; r->has[k] = copied;
    if (copied) memcpy(r->out[k], p, size);
}

static void round_(struct thr *t, int i)
{
    struct timespec ts; struct timeval tv; struct timezone tz; time_t tt; unsigned cpu, node;
    struct rec *r; int ret; long lr;
    static const clockid_t clocks[] = {CLOCK_MONOTONIC, CLOCK_REALTIME, CLOCK_BOOTTIME,
                                       CLOCK_MONOTONIC_RAW, CLOCK_REALTIME_COARSE};
    clockid_t c = clocks[i % 5];
    ret = clock_gettime(c, &ts);
    r = add(t, "clock_gettime", c, (long)&ts, 0, ret, 0); out(r, 0, &ts, 16, ret == 0);
    ret = v_cg(CLOCK_MONOTONIC, &ts);
    r = add(t, "clock_gettime", CLOCK_MONOTONIC, (long)&ts, 0, ret, 0); out(r, 0, &ts, 16, 1);
    ret = clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    r = add(t, "clock_gettime", CLOCK_PROCESS_CPUTIME_ID, (long)&ts, 0, ret, 1); out(r, 0, &ts, 16, 1);
    ret = v_cg(CLOCK_THREAD_CPUTIME_ID, &ts);
    r = add(t, "clock_gettime", CLOCK_THREAD_CPUTIME_ID, (long)&ts, 0, ret, 1); out(r, 0, &ts, 16, 1);
    ret = v_cg(1000 + i, &ts);                     /* invalid: the kernel says EINVAL */
    r = add(t, "clock_gettime", 1000 + i, (long)&ts, 0, (long)ret, 1); out(r, 0, &ts, 16, 0);
    ret = gettimeofday(&tv, NULL);
    r = add(t, "gettimeofday", (long)&tv, 0, 0, ret, 0); out(r, 0, &tv, 16, 1); out(r, 1, 0, 8, 0);
    ret = v_tod(&tv, &tz);
    r = add(t, "gettimeofday", (long)&tv, (long)&tz, 0, ret, 0); out(r, 0, &tv, 16, 1); out(r, 1, &tz, 8, 1);
    ret = v_tod(NULL, &tz);
    r = add(t, "gettimeofday", 0, (long)&tz, 0, ret, 0); out(r, 0, 0, 16, 0); out(r, 1, &tz, 8, 1);
    lr = time(NULL);
    r = add(t, "time", 0, 0, 0, lr, 0); out(r, 0, 0, 8, 0);
    lr = v_time(&tt);
    r = add(t, "time", (long)&tt, 0, 0, lr, 0); out(r, 0, &tt, 8, 1);
    ret = v_cpu(&cpu, &node, NULL);
    r = add(t, "getcpu", (long)&cpu, (long)&node, 0, ret, 0); out(r, 0, &cpu, 4, 1); out(r, 1, &node, 4, 1);
    ret = getcpu(&cpu, NULL);
    r = add(t, "getcpu", (long)&cpu, 0, 0, ret, 0); out(r, 0, &cpu, 4, 1); out(r, 1, 0, 4, 0);
    ret = clock_getres(CLOCK_MONOTONIC, &ts);
    r = add(t, "clock_getres", CLOCK_MONOTONIC, (long)&ts, 0, ret, 0); out(r, 0, &ts, 16, 1);
    ret = v_res(CLOCK_PROCESS_CPUTIME_ID, &ts);
    r = add(t, "clock_getres", CLOCK_PROCESS_CPUTIME_ID, (long)&ts, 0, ret, 1); out(r, 0, &ts, 16, 1);
    ret = v_res(CLOCK_MONOTONIC, NULL);
    r = add(t, "clock_getres", CLOCK_MONOTONIC, 0, 0, ret, 0); out(r, 0, 0, 16, 0);
}

static void *worker(void *arg)
{
    struct thr *t = arg;
    t->tid = (int)syscall(SYS_gettid);
    pthread_barrier_wait(&go);
    for (int i = 0; i < ROUNDS; i++) round_(t, i);
    pthread_barrier_wait(&fin);
    return NULL;
}

static void wait_byte(void)
{
    char c;
    while (read(0, &c, 1) < 0 && errno == EINTR) ;
}

int main(int argc, char **argv)
{
    int T = atoi(argv[2]);
    ROUNDS = atoi(argv[3]);
    long bench = argc > 5 ? atol(argv[5]) : 0;
    v_cg = vsym("__vdso_clock_gettime"); v_res = vsym("__vdso_clock_getres");
    v_tod = vsym("__vdso_gettimeofday"); v_time = vsym("__vdso_time"); v_cpu = vsym("__vdso_getcpu");
    struct thr *ts = calloc(T, sizeof *ts);
    pthread_barrier_init(&go, NULL, T + 1);
    pthread_barrier_init(&fin, NULL, T + 1);
    for (int k = 0; k < T; k++) {
        ts[k].r = calloc(ROUNDS * 16 + 1, sizeof(struct rec));
        pthread_create(&ts[k].th, NULL, worker, &ts[k]);
    }
    printf("ready %d\n", getpid());
    fflush(stdout);
    wait_byte();
    if (bench) {
        struct timespec a, b, x;
        clock_gettime(CLOCK_MONOTONIC, &a);
        for (long i = 0; i < bench; i++) clock_gettime(CLOCK_MONOTONIC, &x);
        clock_gettime(CLOCK_MONOTONIC, &b);
        printf("ns_per_call %.1f\n", ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / bench);
        fflush(stdout);
    }
    pthread_barrier_wait(&go);
    pthread_barrier_wait(&fin);
    FILE *f = fopen(argv[1], "w");
    for (int k = 0; k < T; k++)
        for (int i = 0; i < ts[k].n; i++) {
            struct rec *r = &ts[k].r[i];
            fprintf(f, "%d %s %ld %ld %ld %ld %d %d", r->tid, r->func, r->a0, r->a1, r->a2, r->ret, r->fb, r->nout);
            for (int o = 0; o < r->nout; o++) {
                fprintf(f, " ");
                if (!r->has[o]) { fprintf(f, "-"); continue; }
                for (int b = 0; b < r->osz[o]; b++) fprintf(f, "%02x", r->out[o][b]);
            }
            fprintf(f, "\n");
        }
    fclose(f);
    printf("done\n");
    fflush(stdout);
    wait_byte();
    for (int k = 0; k < T; k++) pthread_join(ts[k].th, NULL);
    return 0;
}
"""


@pytest.fixture(scope="module")
def workload(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("inject")
    src = d / "workload.c"
    src.write_text(WORKLOAD_C)
    exe = d / "workload"
    subprocess.run(["gcc", "-O1", "-pthread", "-o", str(exe), str(src)], check=True)
    return exe


# --------------------------------------------------------------------------- driver


def vdso_of(pid: int) -> tuple[int, int]:
    for m in procfs.read_maps(pid):
        if m.path == "[vdso]":
            return m.start, m.end
    raise AssertionError("no [vdso]")


def traced_functions(image: VdsoImage) -> list:
    return [f for f in image.functions if f.symbol not in SIGRETURN_TRAMPOLINES]


@dataclass
class Session:
    """A minimal stand-in for the engine: attach, install, run, stop, uninstall, detach."""
    pid: int
    tids: list[int] = field(default_factory=list)
    mem: target.Memory | None = None
    rec: Recorder | None = None
    base: int = 0
    before: bytes = b""
    records: list[RawRecord] = field(default_factory=list)

    def attach(self, funcs_filter: object = None, abi: Abi = X86_64) -> None:
        self.tids, pending = target.attach_process(self.pid)
        assert not pending
        self.mem = target.Memory(self.pid)
        lo, hi = vdso_of(self.pid)
        self.base = lo
        self.before = self.mem.read(lo, hi - lo)
        image = parse_image(self.before)
        self.rec = Recorder(self.pid, self.mem, abi, image, lo, traced_functions(image))

    def install(self) -> None:
        assert self.rec is not None
        self.rec.install(self.tids[0])

    def resume(self) -> None:
        for t in self.tids:
            target.cont(t)

    def pump(self) -> None:
        """Drain, and let any thread that stopped (a signal, a clone) go on."""
        assert self.rec is not None
        self.records += self.rec.drain()
        while True:
            tid, status = target.wait_nohang()
            if tid <= 0:
                return
            if os.WIFEXITED(status) or os.WIFSIGNALED(status):
                if tid in self.tids:
                    self.tids.remove(tid)
                continue
            if tid not in self.tids:
                self.tids.append(tid)
            ev = target.stop_event(status)
            sig = os.WSTOPSIG(status)
            target.cont(tid, 0 if ev or sig == signal.SIGTRAP else sig)

    def stop_all(self) -> None:
        for t in self.tids:
            target.interrupt(t)
        want = set(self.tids)
        while want:
            tid, status = target.wait()
            if os.WIFEXITED(status) or os.WIFSIGNALED(status):
                want.discard(tid)
                if tid in self.tids:
                    self.tids.remove(tid)
                continue
            if target.stop_event(status) == target.PTRACE_EVENT_STOP:
                want.discard(tid)
            else:
                sig = os.WSTOPSIG(status)
                target.cont(tid, 0 if target.stop_event(status) or sig == signal.SIGTRAP else sig)

    def leave(self) -> None:
        assert self.rec is not None and self.mem is not None
        self.rec.uninstall(self.tids)
        self.records += self.rec.drain()
        lo, hi = vdso_of(self.pid)
        assert self.mem.read(lo, hi - lo) == self.before, "the vDSO bytes were not restored"
        for t in self.tids:
            target.detach(t)
        self.mem.close()


def read_line(p: subprocess.Popen[bytes], want: str, timeout: float = 20.0,
              pump: Session | None = None) -> str:
    assert p.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r, _, _ = select.select([p.stdout], [], [], 0.01)
        if r:
            line = p.stdout.readline().decode()
            if line.startswith(want):
                return line
            assert line, f"workload ended before {want!r}"
        elif pump is not None:
            pump.pump()
    raise AssertionError(f"no {want!r} from the workload")


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
            p.wait()


def start(procs: list, argv: list[str]) -> subprocess.Popen[bytes]:
    p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
    procs.append(p)
    read_line(p, "ready")
    return p


def go(p: subprocess.Popen[bytes]) -> None:
    assert p.stdin is not None
    p.stdin.write(b"g")
    p.stdin.flush()


# --------------------------------------------------------------------------- expectations

OUT_SIZES = {"clock_gettime": (16,), "clock_getres": (16,), "gettimeofday": (16, 8),
             "time": (8,), "getcpu": (4, 4)}


def expected_calls(path: Path) -> dict[int, list[tuple]]:
    by_tid: dict[int, list[tuple]] = {}
    for line in path.read_text().splitlines():
        parts = line.split()
        tid, func = int(parts[0]), parts[1]
        a = [int(x) for x in parts[2:5]]
        ret, fb, nout = int(parts[5]), bool(int(parts[6])), int(parts[7])
        outs = tuple(None if x == "-" else bytes.fromhex(x) for x in parts[8:8 + nout])
        nargs = for_function(func).nargs
        by_tid.setdefault(tid, []).append((func, tuple(a[:nargs]), ret, outs, fb))
    return by_tid


def normalize(r: RawRecord) -> tuple:
    args = list(r.args)
    if r.func in ("clock_gettime", "clock_getres"):
        args[0] = X86_64.signed(args[0] & 0xFFFFFFFF) if args[0] & 0x80000000 == 0 \
            else args[0] & 0xFFFFFFFF
    # getcpu's third word (tcache) is what the workload passed: 0
    ret = X86_64.signed(r.ret)
    if r.func != "time":
        ret = ret & 0xFFFFFFFF
        ret = ret - (1 << 32) if ret >> 31 else ret
    return (r.func, tuple(args), ret, r.outs, r.fallback)


# --------------------------------------------------------------------------- pure tests


def own_vdso() -> tuple[VdsoImage, int]:
    lo, hi = vdso_of(os.getpid())
    with open("/proc/self/mem", "rb") as f:
        f.seek(lo)
        return parse_image(f.read(hi - lo)), lo


def test_plan_and_code_page_for_this_machine() -> None:
    image, base = own_vdso()
    funcs = traced_functions(image)
    plan = plan_image(image, funcs, X86_64)
    assert {fp.func.plain for fp in plan.functions} >= {"clock_gettime", "gettimeofday", "time"}
    cg = next(fp for fp in plan.functions if fp.func.plain == "clock_gettime")
    assert cg.fallbacks, "clock_gettime has a syscall fallback to redirect"
    code = build_code(plan, base, base - (1 << 24), [for_function(f.plain) for f in funcs],
                      (0x1234, -0x5678), 0x7F0000000000)
    assert len(code.data) == L.CODE_SIZE
    assert code.data[:8] == (0x7F0000000000).to_bytes(8, "little")
    for s in code.stubs:
        assert s.window[0] < s.window[1]
        assert s.copy[1] - s.copy[0] == plan.functions[s.fid].func.size


FIXTURES = Path(__file__).resolve().parent / "fixtures"


def test_i386_plan_and_code_page_from_fixture() -> None:
    """The i386 vDSO (checked-in dump): thunk calls become `mov eax, <original return
    address>`, calls to __kernel_vsyscall go to a fallback stub that ends in a jump to the
    real gateway, other calls leave for the vDSO; the gateway itself is not planned."""
    from tracer import disasm
    from tracer.inject.stubs32 import build_code32
    image = parse_image((FIXTURES / "vdso-i386.so").read_bytes())
    funcs = traced_functions(image)
    rec = Recorder(0, None, I386, image, 0, funcs)  # type: ignore[arg-type]
    assert "__kernel_vsyscall" not in [f.symbol for f in rec.funcs]
    plan = plan_image(image, rec.funcs, I386)
    gw = image.function("__kernel_vsyscall")
    assert gw is not None and plan.gateway_offset == gw.image_offset
    assert image.data[plan.syscall_offset:plan.syscall_offset + 2] == b"\xcd\x80"
    by = {fp.func.plain: fp for fp in plan.functions}
    assert set(by) == {"clock_gettime", "clock_gettime64", "gettimeofday", "time",
                       "clock_getres", "getcpu"}
    for name in ("clock_gettime", "clock_gettime64", "gettimeofday", "clock_getres"):
        assert by[name].fallbacks, f"{name} falls back through __kernel_vsyscall"
    for name in ("clock_gettime", "clock_gettime64", "gettimeofday", "time"):
        assert (by[name].func.image_offset, 0) in by[name].thunks   # call get_pc_thunk.ax first
    base, code_base, ring = 0xF7F00000, 0xF7E00000, 0xF6000000
    code = build_code32(plan, base, code_base, [for_function(f.plain) for f in rec.funcs],
                        (0x1234, -0x5678), ring)
    assert code.data[:8] == ring.to_bytes(8, "little")

    def insns_at(addr: int, n: int) -> list[tuple[str, str]]:
        return [(m, o) for _, _, m, o in capstone_32(code.data[addr - code_base:], addr)][:n]
    for info, fp in zip(code.stubs, plan.functions):
        lo = fp.func.image_offset
        copy = code.data[info.copy[0] - code_base:info.copy[1] - code_base]
        for off, reg in fp.thunks:
            ret_addr = base + off + 5
            assert copy[off - lo:off - lo + 5] == bytes((0xB8 + reg,)) + ret_addr.to_bytes(4, "little")
        for site in fp.fallbacks:
            c = copy[site.start - lo:site.end - lo]
            assert c[0] == 0xE8
            fb = (info.copy[0] + site.end - lo + int.from_bytes(c[1:], "little")) & 0xFFFFFFFF
            assert code_base <= fb < info.copy[0]
            jumps = [o for m, o in insns_at(fb, 40) if m == "jmp"][:1]
            assert jumps and int(jumps[0], 16) == base + gw.image_offset
        for i in disasm.disassemble(image, fp.func):
            if i.mnemonic == "call" and i.target is not None and i.address not in dict(fp.thunks) \
                    and i.target != gw.image_offset:
                c = copy[i.address - lo:i.address - lo + 5]
                dest = (info.copy[0] + i.address - lo + 5 + int.from_bytes(c[1:], "little"))
                assert dest & 0xFFFFFFFF == base + i.target
        assert insns_at(info.stub, 1) == [("sub", f"esp, {L.FRAME32:#x}")]
        assert info.window[0] < info.window[1]


def capstone_32(data: bytes, origin: int) -> Iterator[tuple[int, int, str, str]]:
    import capstone
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_32)
    for i in md.disasm(data, origin):
        yield i.address, i.size, i.mnemonic, i.op_str


def test_abi_mismatch_is_refused() -> None:
    image, base = own_vdso()
    rec = Recorder(os.getpid(), None, I386, image, base, traced_functions(image))  # type: ignore[arg-type]
    with pytest.raises(InjectError, match="without --inject"):
        rec.install(os.getpid())


# --------------------------------------------------------------------------- live tests


@pytest.mark.live
def test_exact_four_threads(workload: Path, tmp_path: Path, procs: list) -> None:
    record = tmp_path / "record"
    p = start(procs, [str(workload), str(record), "4", "200"])
    s = Session(p.pid)
    s.attach()
    s.install()
    maps = open(f"/proc/{p.pid}/maps").read()
    assert "/memfd:vdsotrace-ring" in maps and "/memfd:vdsotrace-code" in maps
    code_line = next(ln for ln in maps.splitlines() if "vdsotrace-code" in ln)
    assert code_line.split()[1] == "r-xs"
    s.resume()
    go(p)
    read_line(p, "done", pump=s)
    s.pump()
    s.stop_all()
    s.leave()
    assert s.rec is not None
    assert s.rec.lost() == 0 and s.rec.corrupt() == 0
    go(p)
    assert p.wait(timeout=20) == 0
    want = expected_calls(record)
    got: dict[int, list[tuple]] = {}
    for r in s.records:
        got.setdefault(r.tid, []).append(normalize(r))
    assert set(got) == set(want), f"threads: traced {sorted(got)}, workload {sorted(want)}"
    for tid in want:
        assert len(got[tid]) == len(want[tid]), tid
        for k, (g, w) in enumerate(zip(got[tid], want[tid])):
            assert g == w, f"thread {tid} call {k}: traced {g}, workload {w}"
    assert sum(len(v) for v in want.values()) == 4 * 200 * 15
    durations = [r.duration_ns for r in s.records]
    assert all(0 <= d < 5_000_000_000 for d in durations)  # preemption mid-call on a busy VM
    now = time.monotonic_ns()
    assert all(now - 60_000_000_000 < r.t_entry_ns <= now for r in s.records)


@pytest.mark.live
def test_detach_midrun_and_cpython_finishes(tmp_path: Path, procs: list) -> None:
    """A real runtime: CPython threads calling time.* while we install, drain, uninstall;
    it must finish normally, with the vDSO as before and the ring gone."""
    script = tmp_path / "busy.py"
    script.write_text(
        "import sys, threading, time\n"
        "print('ready', flush=True); sys.stdin.read(1)\n"
        "stop = False\n"
        "def work():\n"
        "    while not stop: time.time(); time.perf_counter()\n"
        "ts = [threading.Thread(target=work) for _ in range(3)]\n"
        "[t.start() for t in ts]\n"
        # (running until told: still mid-run however late the tracer leaves)
        "sys.stdin.read(1); stop = True\n"
        "[t.join() for t in ts]\n"
        "print('done', flush=True)\n")
    p = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, bufsize=0,
                         stdout=subprocess.PIPE)
    procs.append(p)
    read_line(p, "ready")
    s = Session(p.pid)
    s.attach()
    s.install()
    s.resume()
    go(p)
    t_end = time.monotonic() + 0.7
    while time.monotonic() < t_end:
        s.pump()
        time.sleep(0.005)
    s.stop_all()
    s.leave()        # in the middle of the run: threads are inside calls
    maps = open(f"/proc/{p.pid}/maps").read()
    assert "vdsotrace-ring" not in maps
    go(p)
    assert p.wait(timeout=30) == 0
    assert len(s.records) > 1000
    funcs = {r.func for r in s.records}
    assert "clock_gettime" in funcs
    assert s.rec is not None and s.rec.corrupt() == 0


@pytest.mark.live
def test_full_ring_counts_lost_and_corrupt_slots_are_skipped(workload: Path, tmp_path: Path,
                                                             procs: list) -> None:
    record = tmp_path / "record"
    # 2 threads x 3000 rounds x 15 calls = 90000 calls > NSLOTS, not drained while running
    p = start(procs, [str(workload), str(record), "2", "3000"])
    s = Session(p.pid)
    s.attach()
    s.install()
    s.resume()
    go(p)
    assert p.stdout is not None
    read_line(p, "done")
    assert s.rec is not None
    assert s.rec.lost() == 2 * 3000 * 15 - L.NSLOTS
    # corrupt one committed slot (a bad function id) the way a tracee could
    ring = s.rec._ring
    assert ring is not None
    ring[L.DATA + 5 * L.SLOT + L.S_FID:L.DATA + 5 * L.SLOT + L.S_FID + 2] = b"\xff\x7f"
    s.pump()
    s.stop_all()
    s.leave()
    assert s.rec.corrupt() == 1
    assert len(s.records) == L.NSLOTS - 1
    go(p)
    assert p.wait(timeout=20) == 0


SECCOMP_C = r"""
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stdio.h>
#include <sys/prctl.h>
#include <unistd.h>
int main(void) {
    struct sock_filter f[] = { BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW) };
    struct sock_fprog prog = { 1, f };
    prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
    prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog);
    printf("ready %d\n", getpid()); fflush(stdout);
    char c; read(0, &c, 1); return 0;
}
"""


@pytest.mark.live
def test_seccomp_is_refused(tmp_path: Path, procs: list) -> None:
    src = tmp_path / "sec.c"
    src.write_text(SECCOMP_C)
    exe = tmp_path / "sec"
    subprocess.run(["gcc", "-o", str(exe), str(src)], check=True)
    p = start(procs, [str(exe)])
    s = Session(p.pid)
    s.attach()
    with pytest.raises(InjectError, match="seccomp.*run without --inject"):
        s.install()
    assert s.mem is not None
    lo, hi = vdso_of(p.pid)
    assert s.mem.read(lo, hi - lo) == s.before
    for t in s.tids:
        target.detach(t)
    go(p)
    assert p.wait(timeout=10) == 0


SPIN_C = r"""
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>
/* 4 threads call clock_gettime (a fallback clock every 16th call) and gettimeofday until
 * the stop byte; each checks that time never goes backwards and counts its calls. */
static volatile int stop;
static void *spin(void *arg) {
    struct timespec a = {0, 0}, b, c; struct timeval tv; long n = 0;
    while (!stop) {
        clock_gettime(CLOCK_MONOTONIC, &b);
        if (b.tv_sec < a.tv_sec || (b.tv_sec == a.tv_sec && b.tv_nsec < a.tv_nsec)) {
            printf("backwards\n"); fflush(stdout); exit(3); }
        a = b;
        if ((n & 15) == 0) clock_gettime(CLOCK_THREAD_CPUTIME_ID, &c);
        gettimeofday(&tv, NULL);
        n++;
    }
    *(long *)arg = n;
    return NULL;
}
int main(void) {
    pthread_t th[4]; long n[4]; char ch;
    for (int i = 0; i < 4; i++) pthread_create(&th[i], NULL, spin, &n[i]);
    printf("ready %d\n", getpid()); fflush(stdout);
    read(0, &ch, 1);
    stop = 1;
    for (int i = 0; i < 4; i++) pthread_join(th[i], NULL);
    printf("done %ld\n", n[0] + n[1] + n[2] + n[3]); fflush(stdout);
    return 0;
}
"""


@pytest.mark.live
def test_install_uninstall_cycles_while_threads_spin(tmp_path: Path, procs: list) -> None:
    """Stop the threads wherever they are (inside stubs, copies, ring windows), uninstall,
    detach, and again: the process never notices, and the vDSO is always restored."""
    src = tmp_path / "spin.c"
    src.write_text(SPIN_C)
    exe = tmp_path / "spin"
    subprocess.run(["gcc", "-O1", "-pthread", "-o", str(exe), str(src)], check=True)
    p = start(procs, [str(exe)])
    total = 0
    for cycle in range(4):
        s = Session(p.pid)
        s.attach()
        s.install()
        s.resume()
        t_end = time.monotonic() + 0.15
        while time.monotonic() < t_end:
            s.pump()
        s.stop_all()
        s.leave()                 # asserts the vDSO bytes are back
        assert s.rec is not None and s.rec.corrupt() == 0
        total += len(s.records)
        by_tid: dict[int, list[RawRecord]] = {}
        for r in s.records:
            by_tid.setdefault(r.tid, []).append(r)
        for recs in by_tid.values():
            cg = [r for r in recs if r.func == "clock_gettime" and r.args[0] == 1]
            secs = [struct.unpack("<qq", r.outs[0]) for r in cg if r.outs[0] is not None]
            assert secs == sorted(secs)
            assert all(r.fallback == (r.args[0] == 3) for r in recs if r.func == "clock_gettime")
        time.sleep(0.05)
    go(p)
    line = read_line(p, "done")
    assert p.wait(timeout=20) == 0
    assert total > 1000 and int(line.split()[1]) > total


@pytest.mark.live
@pytest.mark.i386
def test_i386_install_run_uninstall(target_bin, tmp_path: Path, procs: list) -> None:
    """A 32-bit tracee (spin -m32: two threads in clock_gettime/gettimeofday loops): the code
    page and the ring are mapped below 4 GiB, the records come through the 32-bit stubs, and
    leaving restores the vDSO, unmaps both and lets the target finish with every result good."""
    spin = target_bin("spin", True)
    p = start(procs, [str(spin), str(tmp_path / "r.json"), "--threads", "2"])
    s = Session(p.pid)
    s.attach(abi=I386)
    s.install()
    assert s.rec is not None and s.rec.installed
    maps = [m for m in procfs.read_maps(p.pid) if "memfd:vdsotrace" in m.path]
    assert sorted(m.path.split()[0] for m in maps) == ["/memfd:vdsotrace-code",
                                                       "/memfd:vdsotrace-ring"], maps
    assert all(m.end <= 1 << 32 for m in maps), maps
    s.resume()
    go(p)
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline or not s.records:
        s.pump()
        time.sleep(0.01)
        assert time.monotonic() < deadline + 10, "no records from the 32-bit stubs"
    s.stop_all()
    s.leave()
    # a thread stopped inside a function's copy keeps the code page (it returns through it)
    left = [m.path.split()[0] for m in procfs.read_maps(p.pid) if "memfd:vdsotrace" in m.path]
    assert left == (["/memfd:vdsotrace-code"] if s.rec.code_page_kept else []), left
    assert s.rec.corrupt() == 0          # (spinning threads may outrun the drain: lost() > 0)
    threads = set(procfs.list_tasks(p.pid))
    funcs = {r.func for r in s.records}
    assert funcs <= {"clock_gettime", "clock_gettime64", "gettimeofday"} and funcs, funcs
    for r in s.records:
        assert r.tid in threads and r.ret == 0 and not r.fallback, r
        assert r.outs[0] is not None and len(r.outs[0]) == (16 if r.func == "clock_gettime64" else 8)
        assert 0 < r.caller < 1 << 32
    go(p)
    assert p.wait(timeout=20) == 0
