"""The engine: attach -> auxv -> vDSO -> breakpoints -> decode -> events.

One thread (the one that attached: ptrace requires it) runs `Session.run`. A traced call costs
one stop (breakpoints.py: the entry jumps to a stub that stops once, on return): one
PTRACE_GETREGS, one read of the stub's block of stack, PTRACE_CONT; decoding and output happen
after the tracee runs again. With --inject there is no stop per call at all: the loop drains
the recorder's ring (inject/). The engine never prints: events go to `sink`.
"""
from __future__ import annotations

import ctypes
import dataclasses
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from queue import Empty, SimpleQueue
from typing import Any

from tracer import procfs, target
from tracer.abi import I386, X86_64, Abi
from tracer.auxv import auxv_from_stack, find, parse_auxv
from tracer.breakpoints import ENTRY, EXIT, FALL, RET, Patcher
from tracer.consts import AuxType
from tracer.decoders import Decoder, errno_name, for_function, out_decoder, out_size
from tracer.decoders.syscalls import (STRING_ARGS, clip_strings, read_entry_strings,
                                      read_exit_strings)
from tracer.disasm import gateway as find_gateway
from tracer.guardian import Guardian
from tracer.errors import (AuxvError, ElfError, MemoryReadError, MemoryWriteError,
                           ProcessGone, TracerError, UnknownFunction, UsageError, VdsoError)
from tracer.events import (AttachEvent, CallEvent, DetachEvent, Event, ExecEvent,
                           ExitEvent, NoticeEvent, SyscallEvent, Unreadable)
from tracer.tables import syscalls_i386
from tracer.tables.signals import signame
from tracer import sched, sigtrack, stackscan
from tracer import seccomp as _seccomp
from tracer import symload
from tracer import sigframes
from tracer.objfile import ModuleMap, is_c_library
from tracer.target import REG_INDEX, Regs
from tracer.tsc import TscClock
from tracer.unwind import ARCHES, unwind
from tracer.vdso import GATEWAY_SYMBOL, SIGRETURN_TRAMPOLINES, VdsoFunction, VdsoImage, parse_image

__all__ = ["TraceOptions", "Session", "SessionInfo", "FuncStats", "Summary", "resolve_functions",
           "clocksource_info"]

_RIP, _RSP, _RAX = REG_INDEX["rip"], REG_INDEX["rsp"], REG_INDEX["rax"]
_ORIG_RAX = REG_INDEX["orig_rax"]
_MARKER_STOP = 0x7057F      # a stop status: SIGTRAP | PTRACE_EVENT_SECCOMP << 8
_ENOSYS = 38
_ARG64 = tuple(REG_INDEX[r] for r in ("rdi", "rsi", "rdx", "rcx", "r8", "r9"))
_SYSARG32 = tuple(REG_INDEX[r] for r in ("rbx", "rcx", "rdx", "rsi", "rdi", "rbp"))
_SIGTRAP = signal.SIGTRAP
_SYSCALL_TRAP = signal.SIGTRAP | 0x80
_GROUP_STOP_SIGS = {signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU}
_FAULTS = {signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE}
_WAKE_SIGNAL = signal.SIGALRM
_TICK = 0.1
# --inject: records drained between two looks at waitpid (about 0.5 ms of work each: ~10 us
# per event built, ~1 us per record counted with -c), and the time a way out spends draining
_DRAIN_BATCH = 64
_DRAIN_BATCH_STATS = 512
_DRAIN_LEAVE_S = 1.0
# a single-step that has not come back by the step-out's timeout is looked at every
# _STEP_POLL_S: given up once the thread has slept in the kernel for _STEP_WAIT_S (a blocking
# system call), waited for while it is runnable (it waits for a CPU), _STEP_BOUND_S at most
_STEP_POLL_S = 0.05
_VFORK_RETRIES = 5     # leaving: stops of the tracee retried for vforks made meanwhile
_STEP_WAIT_S = 0.5
_STEP_BOUND_S = 30.0
_NAP_EMPTY = 0.0005     # --inject: the longest sleep when the ring is empty
_SLICE_S = 0.0002       # --inject: the engine thread's time slice (sched.py)


def _nap(seconds: float) -> None:
    """Sleep until a tracee stops (SIGCHLD, blocked in the engine thread) or `seconds`."""
    signal.sigtimedwait((signal.SIGCHLD,), seconds)


_cont = target.cont
_getregs = target.getregs
_RESTORE_RT = bytes.fromhex("48c7c00f0000000f05")
_AUDIT_ABI = {0xC000003E: X86_64, 0x40000003: I386}   # include/uapi/linux/audit.h AUDIT_ARCH_*
_WINDOW = 256           # bytes read from sp at a stub's stop (its block + the caller's locals)
_OUTSIDE = (0, 0)       # site rule: the caller is not in the C library, it is the site
_MISSING = (-1, -1)     # not in the site rule cache yet
_SITE_FRAMES = 4        # C library frames crossed to find the site (musl: time -> clock_gettime)
# Clocks a time namespace offsets (kernel/time/namespace.c: CLOCK_MONOTONIC and
# CLOCK_BOOTTIME, and the clocks derived from them).
_NS_READS = frozenset({"clock_gettime", "clock_gettime64"})   # a resolution is not offset
_NS_CLOCKS = frozenset({"CLOCK_MONOTONIC", "CLOCK_MONOTONIC_RAW", "CLOCK_MONOTONIC_COARSE",
                        "CLOCK_BOOTTIME", "CLOCK_BOOTTIME_ALARM"})

_libc = ctypes.CDLL(None, use_errno=True)
_waitpid = _libc["waitpid"]
_waitpid.restype = ctypes.c_int


# Clock sources with a vDSO read mode (arch/x86: vclock_mode VDSO_CLOCKMODE_TSC, PVCLOCK,
# HVCLOCK); others (hpet, acpi_pm, jiffies) make every clock_gettime a system call.
_FAST_CLOCKSOURCES = frozenset({"tsc", "kvm-clock", "hyperv_clocksource_tsc_page",
                                "arch_sys_counter", "riscv_clocksource", "timer"})


def _caught(pid: int, tid: int, sig: int) -> bool:
    """Has the thread's process a handler for `sig` (SigCgt in /proc/PID/task/TID/status)?"""
    try:
        with open(f"/proc/{pid}/task/{tid}/status", errors="surrogateescape") as f:
            for line in f:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    except (OSError, ValueError):
        pass
    return False


def clocksource_info() -> tuple[str | None, bool | None]:
    try:
        with open("/sys/devices/system/clocksource/clocksource0/current_clocksource") as f:
            name = f.read().strip()
    except OSError:
        return None, None
    return name, name in _FAST_CLOCKSOURCES


def timens_offsets(pid: int) -> dict[str, tuple[int, int]] | None:
    """/proc/PID/timens_offsets: null unless the tracee lives in a time namespace with offsets."""
    try:
        with open(f"/proc/{pid}/timens_offsets") as f:
            text = f.read()
    except OSError:
        return None
    out: dict[str, tuple[int, int]] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3:
            out[parts[0]] = (int(parts[1]), int(parts[2]))
    if not out or all(v == (0, 0) for v in out.values()):
        return None
    return out


@dataclass
class TraceOptions:
    funcs: list[str] | None = None       # -e specs; None: the default set
    follow_forks: bool = False
    signals: bool = False
    stack_depth: int | None = None
    inject: bool = False
    lossy: bool = False                  # --inject: a full ring drops calls instead of waiting
    pin: bool = True
    duration: float | None = None
    demangle: bool = True                # C++/Rust symbol names as their source spells them
    string_size: int = 32                # -s: bytes of a buffer shown (strace's default)


@dataclass(frozen=True, slots=True)
class FuncStats:
    func: str
    calls: int
    fallbacks: int
    errors: int
    total_ns: int


@dataclass(frozen=True, slots=True)
class Summary:
    rows: list[FuncStats]
    reasons: dict[str, dict[str, int]]                            # func -> reason -> calls
    sites: dict[str, list[tuple[str, int, int]]]                  # func -> (site, calls, ns)
    paths: dict[str, list[tuple[tuple[str, ...], int, int]]]      # func -> (frames, calls, ns)
    unused: list[str]
    diagnosis: str | None
    lost: int = 0                      # --inject: calls not recorded (ring full) or corrupt


@dataclass(frozen=True, slots=True)
class SessionInfo:
    pid: int | None
    abi: str | None
    vdso_base: int | None
    image: VdsoImage | None
    threads: list[int]
    functions: list[str]
    calls: int
    fallbacks: int
    state: str


def resolve_functions(image: VdsoImage, specs: list[str] | None) -> list[VdsoFunction]:
    """-e semantics: plain names or symbols, `!name` excludes; default: every export but the
    sigreturn trampolines. Unknown names are refused, listing the ones that exist."""
    default = [f for f in image.functions if f.symbol not in SIGRETURN_TRAMPOLINES]
    if specs is None:
        return default
    if not specs:
        return []                      # the console's "no breakpoints yet"
    names = [n.strip() for spec in specs for n in spec.split(",") if n.strip()]
    include: list[VdsoFunction] = []
    exclude: set[str] = set()
    for n in names:
        neg = n.startswith("!")
        key = n[1:] if neg else n
        if key in ("all", "*"):
            if not neg:
                include.extend(default)
            continue
        f = image.function(key)
        if f is None:
            known = ", ".join(f.plain for f in image.functions)
            raise UnknownFunction(f"no vDSO function {key!r} in this {image.abi.name} vDSO; "
                                  f"it exports: {known}")
        if neg:
            exclude.add(f.symbol)
        else:
            include.append(f)
    if not include and exclude:
        include = default              # only exclusions: everything else
    seen: set[str] = set()
    out = []
    for f in include:
        if f.symbol not in exclude and f.symbol not in seen:
            seen.add(f.symbol)
            out.append(f)
    if not out:
        raise UsageError(f"-e {','.join(names)} selects no function of this vDSO")
    return out


@dataclass(slots=True)
class _Pending:
    """A call that has entered and not yet returned, on one thread."""
    func: int                  # index into the space's patcher.funcs
    sp: int                    # sp at entry: points at the return address
    args: tuple[int, ...]
    t0: int                    # monotonic ns at entry
    caller: int
    fallback: bool = False
    stack: tuple[int, ...] | None = None
    strs: dict[int, bytes] | None = None     # i386 system calls: string arguments
    site: int = 0              # return address of the first frame outside the C library


@dataclass(slots=True)
class _Space:
    """One address space (a thread group) and what we patched into it."""
    pid: int
    abi: Abi
    mem: target.Memory
    image: VdsoImage
    base: int
    size: int
    patcher: Patcher
    decoders: list[Decoder]
    is_gateway: list[bool]
    traced: bool = True            # emit events (False: an unfollowed vfork child)
    threads: set[int] = field(default_factory=set)
    timens: dict[str, tuple[int, int]] | None = None
    signals: sigtrack.SignalTracker | None = None
    recorder: Any = None           # tracer.inject.Recorder with --inject
    fidx_by_name: dict[str, int] = field(default_factory=dict)
    modules: ModuleMap | None = None
    modules_time: float = 0.0
    names: dict[int, tuple[str, str | None]] = field(default_factory=dict)
    unmapped: set[int] = field(default_factory=set)
    frames: dict[int, str] = field(default_factory=dict)     # return address -> stack entry
    args_cache: dict[tuple[int, tuple[int, ...]], dict[str, Any]] = field(default_factory=dict)
    # return address -> how to find the next frame's: _OUTSIDE, (CFA offset from the
    # frame's sp, return address offset from the CFA) for the C library's sp-based frames,
    # or None (a full unwind)
    site_rules: dict[int, tuple[int, int] | None] = field(default_factory=dict)
    site_names: dict[int, str] = field(default_factory=dict)   # address -> -c's site name
    vdso_lost: bool = False        # unmapped or replaced by the process: never written again
    notices: list[str] = field(default_factory=list)         # emitted after attach/exec


def _fidx_by_name(space: _Space) -> dict[str, int]:
    return {f.plain: i for i, f in enumerate(space.patcher.funcs)}


@dataclass(slots=True)
class _Thread:
    tid: int
    space: _Space
    regs: Regs = field(default_factory=Regs)
    pending: list[_Pending] = field(default_factory=list)
    stopped: bool = True           # in a ptrace stop we have not resumed
    listening: bool = False        # group-stopped (PTRACE_LISTEN)
    undo_trap: int = 0             # breakpoint address to re-execute if we detach now
    sig: int = 0                   # signal to deliver on resume/detach
    fb_marks: list[tuple[int, int]] = field(default_factory=list)  # (sp, func) at fallbacks
    last_call: tuple[Any, ...] | None = None   # (func index, caller, stack, fallback, reason)
    expect_handler: int = 0        # stepped into a handler for this signal (--signals)
    stopped_ticks: int = 0         # TSC ticks spent handling fallback stops of the open call
    vfork_child: int = 0           # in vfork until this child execs or exits (unstoppable)
    marker_stop: bool = False      # in a marker's seccomp stop not handled yet (paused)
    # a signal may have interrupted it in the vDSO or our code while traced (then a signal
    # frame on its stack may lead back into a stub); False only where none was delivered
    # since it was first seen with a fresh stack or before any stub existed
    sig_in_vdso: bool = True


_MAX_KEYS = 10000   # distinct call sites / stack paths kept per function (-c stays bounded)
OTHER_SITES = "(other sites)"   # the -c row that counts the sites the table let go


class _Counter:
    """Aggregates for -c: never per-event data, so a long trace stays in constant memory.
    Sites and paths are keyed by their names (`prog!main+0x2a`): named while the process
    exists, they outlive it, and the same site in many forked children is one row."""
    __slots__ = ("calls", "fallbacks", "errors", "total_ns", "reasons", "sites", "paths",
                 "other")

    def __init__(self) -> None:
        self.calls = self.fallbacks = self.errors = self.total_ns = 0
        self.reasons: dict[str, int] = {}
        self.sites: dict[str, list[int]] = {}              # site -> [calls, ns]
        self.paths: dict[tuple[str, ...], list[int]] = {}  # frames -> [calls, ns]
        self.other = [0, 0, 0, 0]      # sites' calls and ns, paths' calls and ns, let go

    def add_site(self, site: str, path: tuple[str, ...] | None, dur: int) -> None:
        _count(self.sites, site, dur, self.other, 0)
        if path:
            _count(self.paths, path, dur, self.other, 2)


def _count(table: dict[Any, list[int]], key: Any, dur: int, other: list[int],
           slot: int) -> None:
    """[calls, ns] += [1, dur]; a full table first lets its colder half go (counted in
    other[slot:slot + 2])."""
    row = table.get(key)
    if row is None:
        if len(table) >= _MAX_KEYS:
            _prune(table, other, slot)
        row = table[key] = [0, 0]
    row[0] += 1
    row[1] += dur


def _prune(table: dict[Any, list[int]], other: list[int], at: int) -> None:
    """Keep the hottest half of a full table; count the rest in other[at:at + 2]. A site
    seen again starts over, so the table holds the sites hot now and in the long run."""
    rows = sorted(table.items(), key=lambda kv: (kv[1][0], kv[1][1]))
    for key, (n, ns) in rows[:len(rows) // 2]:
        other[at] += n
        other[at + 1] += ns
        del table[key]


class Session:
    """Trace one process (and, with follow_forks, its children)."""

    def __init__(self, options: TraceOptions, sink: Callable[[Event], None]) -> None:
        self.options = options
        self.sink = sink
        self.spaces: dict[int, _Space] = {}
        self.threads: dict[int, _Thread] = {}
        self.early: dict[int, int] = {}            # stops of tids we do not know yet
        # unfollowed fork child -> what its copy of the parent's space holds (a patcher copy
        # taken at the fork, with its own planted state; the parent's recorder): clean, let go
        self.release_forks: dict[int, tuple[Patcher, Any, _Space]] = {}
        self.counters: dict[str, _Counter] = {}
        self.state = "detached"
        self.stop_reason: str | None = None
        self.root_pid: int | None = None
        self.calls = 0
        self.fallbacks = 0
        self._queue: SimpleQueue[tuple[Callable[[Session], Any], Future[Any]]] = SimpleQueue()
        self._engine_ident: int | None = None
        self._status = ctypes.c_int()
        self._status_ref = ctypes.byref(self._status)
        self._mono_to_epoch = time.time() - time.monotonic()
        self._paused = False
        self.clocksource, self.fast_path = clocksource_info()
        self.tsc = TscClock()
        self.tsc.start()
        self.on_tick: Callable[[], None] | None = None
        self._tick_due = False
        self.summary_only = False      # -c: aggregate, build no events
        self._inject_stats: dict[str, Any] = {}    # --inject -c: per-function counts
        self.lost_records = 0          # --inject: calls the ring could not hold (or corrupt)
        self._dead: dict[int, _Thread] = {}    # --inject: exited threads, for late records
        self._guardian: Guardian | None = None     # for processes stopped on int3s

    def tick(self) -> None:
        """Async-signal and thread safe: ask the loop to flush, run queued calls and check
        --duration at its next turn, even while stops keep arriving."""
        self._tick_due = True

    # ---------------------------------------------------------------- setup
    def _options(self) -> int:
        # Fork events are always wanted: a child inherits every int3 and must be cleaned.
        # PTRACE_O_TRACESECCOMP: the marker stops (seccomp.py)
        return int(target.DEFAULT_OPTIONS | target.FORK_OPTIONS | target.SECCOMP_OPTION)

    def attach(self, pid: int) -> None:
        try:
            tgid = int(procfs.read_status(pid).get("Tgid", pid))
        except (OSError, ValueError):
            tgid = pid
        if pid in self.threads or tgid in self.spaces:
            what = (f"{pid} is a thread of process {tgid}, which this vdsotrace already traces"
                    if tgid != pid else f"process {pid} is already traced by this vdsotrace")
            raise UsageError(f"{what} (every thread of a process is followed): give each "
                             "process once to -p")
        if tgid > 0:
            pid = tgid          # a thread's id stands for its process (strace -p does so)
        # Parse the objects it maps now, while it runs: naming a call (or unwinding it) must
        # never wait for a parse while the tracee waits for us (node: over a second).
        symload.warm(pid, cfi=bool(self.options.stack_depth))
        self._prepare(pid)
        t0 = time.monotonic()           # setup_ms: from the seize to running again
        tids, pending = target.attach_process(pid, self._options())
        if self.root_pid is None:
            self.root_pid = pid
        try:
            space = self._new_space(pid, tids[0] if pid not in tids else pid, tids=tids)
            for tid in tids:
                self._add_thread(tid, space).sig_in_vdso = False
            if self.root_pid == pid:
                self._pin(pid)
        except BaseException:
            for t in tids:
                self.threads.pop(t, None)
                try:
                    target.detach(t)
                except (ProcessGone, OSError):
                    pass
            self.spaces.pop(pid, None)
            raise
        self.state = "running"
        for tid, status in pending.items():
            th = self.threads.get(tid)
            if th is not None:
                self._dispatch(tid, status)
        for th in list(self.threads.values()):
            if th.stopped:
                self._resume(th)
        self._preload(space)
        self._emit_attach(space, spawned=False, t0=t0)

    def _prepare(self, pid: int) -> None:
        """Before seizing: parse the vDSO and plan its patches from a read through
        /proc/PID/mem (root may read a process it does not trace), so that doing it again
        while every thread is stopped finds both in parse_image's and disasm's caches. A
        failure other than a bad -e is met again, and reported, on the real path."""
        try:
            vmap = next((m for m in procfs.read_maps(pid) if m.path == "[vdso]"), None)
            if vmap is None:
                return
            mem = target.Memory(pid)
            try:
                image = parse_image(mem.read(vmap.start, vmap.size))
            finally:
                mem.close()
        except (OSError, TracerError):
            return
        # an unknown or empty -e is refused before the process is touched at all
        funcs = resolve_functions(image, self.options.funcs)
        try:
            if self.options.inject:
                from tracer.inject.plan import plan_image
                TscClock.anchored()
                plan_image(image, [f for f in funcs if f.symbol != GATEWAY_SYMBOL], image.abi)
            else:
                Patcher(image, vmap.start, vmap.size).plan(
                    funcs, [for_function(f.plain).nargs for f in funcs])
        except (OSError, TracerError):
            pass

    def _preload(self, space: _Space) -> None:
        """Have the symbols (and CFI) of every object the tracee maps, and of those it maps in
        the next moments (the C library, after exec), parsed in the background, not at the
        first call, whose naming would otherwise hold up the engine and every stopped thread."""
        symload.warm_later(space.pid, cfi=bool(self.options.stack_depth))
        try:
            self._modules(space, space.base)
        except (OSError, ElfError):
            pass

    def spawn(self, argv: list[str]) -> None:
        t0 = time.monotonic()
        pid = target.spawn(argv, self._options())
        self.root_pid = pid
        try:
            # At the exec event the thread is still inside execve's exit path, where a
            # system call made for the recorder (or the marker filter) does not run: step
            # one instruction first.
            target.singlestep(pid)
            target.wait(pid)
            space = self._new_space(pid, pid)
            self._add_thread(pid, space).sig_in_vdso = False
            self._pin(pid)
        except BaseException:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
            raise
        self.state = "running"
        self._preload(space)
        self._emit_attach(space, spawned=True, t0=t0)
        self._resume(self.threads[pid])

    def _pin(self, pid: int) -> None:
        """Share a CPU with the tracee: a stop costs about 2.2x less (anchors/README.md).
        With --inject there are no stops: take the other CPU."""
        if not self.options.pin:
            return
        try:
            cpu = procfs.read_stat(pid).processor
            allowed = os.sched_getaffinity(0)
            if self.options.inject:
                # no stops to share a CPU for: drain the ring beside the tracee, not on its CPU
                others = allowed - {cpu}
                if others:
                    os.sched_setaffinity(0, {min(others)})
                return
            if cpu in allowed and len(allowed) > 1:
                os.sched_setaffinity(0, {cpu})
        except OSError:
            pass

    def _read_pairs(self, pid: int, mem: target.Memory, abi: Abi) -> list[tuple[int, int]]:
        try:
            return parse_auxv(procfs.read_auxv_file(pid), abi.word)
        except (OSError, AuxvError):
            start = procfs.read_stat(pid).start_stack
            return auxv_from_stack(mem.read, start, abi.word)

    def _new_space(self, pid: int, regs_tid: int, traced: bool = True,
                   tids: list[int] | None = None, inject: bool | None = None) -> _Space:
        regs = Regs()
        target.getregs(regs_tid, regs)
        abi = target.abi_of(pid, regs)
        mem = target.Memory(pid)
        try:
            pairs = self._read_pairs(pid, mem, abi)
            base = find(pairs, AuxType.AT_SYSINFO_EHDR)
            maps = procfs.read_maps(pid)
            vmap = next((m for m in maps if m.path == "[vdso]"), None)
            if vmap is None or not base:
                raise VdsoError(f"process {pid} has no vDSO mapped: nothing to trace")
            image = parse_image(mem.read(vmap.start, vmap.size))
            funcs = resolve_functions(image, self.options.funcs)
            patcher = Patcher(image, vmap.start, vmap.size)
            recorder = None
            if self.options.inject if inject is None else inject:
                # the in-tracee recorder patches the entries itself; the patcher only names
                # the functions (nothing of it is planted)
                from tracer.inject import Recorder
                # i386's gateway is not recorded in the tracee (its calls may block; the
                # stop-based engine shows them as syscall events)
                funcs = [f for f in funcs if f.symbol != GATEWAY_SYMBOL]
                patcher.funcs = list(funcs)
                recorder = Recorder(pid, mem, abi, image, vmap.start, funcs,
                                    lossy=self.options.lossy)
                recorder.install(regs_tid)
            else:
                markers, use_tsc, notes = self._stop_mechanism(pid, tids or [regs_tid], mem,
                                                               abi, image, vmap.start)
                patcher.plan(funcs, [for_function(f.plain).nargs for f in funcs],
                             markers=markers, tsc=use_tsc)
                for tid in tids or [regs_tid]:
                    self._step_out(tid, patcher.in_detour)
                patcher.plant(mem)
                if not markers:
                    self._guard(pid, mem, patcher)
        except BaseException:
            mem.close()
            raise
        space = _Space(pid, abi, mem, image, vmap.start, vmap.size, patcher,
                       [for_function(f.plain) for f in funcs],
                       [f.symbol == GATEWAY_SYMBOL for f in funcs], traced)
        space.timens = timens_offsets(pid)
        space.recorder = recorder
        if recorder is None:
            space.notices = notes
        space.fidx_by_name = _fidx_by_name(space)
        if self.options.signals:
            space.signals = sigtrack.SignalTracker(abi)
        self.spaces[pid] = space
        for f in funcs:
            self.counters.setdefault(f.plain, _Counter())
        return space

    def _stop_mechanism(self, pid: int, tids: list[int], mem: target.Memory, abi: Abi,
                        image: VdsoImage, base: int) -> tuple[bool, bool, list[str]]:
        """(marker stops, stubs may read the TSC, notices): the marker filter is installed
        when it can be (seccomp.py); the TSC is probed without a system call (tsc.py)."""
        from tracer.tsc import tsc_usable
        notes: list[str] = []
        scratch = base + ((image.image_size + 15) & ~15)
        modes = _seccomp.seccomp_modes(pid, tids)
        use_tsc = 1 not in modes and tsc_usable(tids, mem, scratch)
        if not use_tsc:
            notes.append(f"process {pid} has the time-stamp counter disabled (prctl PR_SET_TSC "
                         "or seccomp strict mode): call durations read 0")
        why = _seccomp.ensure(pid, tids, mem, abi, scratch, _seccomp.syscall_site(image, base),
                              _seccomp.MARKER_SPAN)
        if why is not None:
            notes.append(f"process {pid} would not survive a SIGKILL of vdsotrace (it stops on "
                         f"int3 breakpoints, not on seccomp markers: {why})")
        return why is None, use_tsc, notes

    def _guard(self, pid: int, mem: target.Memory, patcher: Patcher) -> None:
        """int3 stops: a guardian undoes them if the tracer dies (guardian.py)."""
        if self._guardian is None:
            self._guardian = Guardian()
        self._guardian.watch(pid, mem.fd, patcher.undo_int3s())

    def _unguard(self, pid: int) -> None:
        if self._guardian is not None:
            self._guardian.forget(pid)

    def _add_thread(self, tid: int, space: _Space) -> _Thread:
        th = _Thread(tid, space)
        self.threads[tid] = th
        space.threads.add(tid)
        return th

    def _emit_attach(self, space: _Space, spawned: bool, t0: float | None = None) -> None:
        gw = find_gateway(space.image)
        setup = (time.monotonic() - t0) * 1e3 if t0 is not None else 0.0
        self._emit(AttachEvent(space.pid, space.pid, time.time(), space.base, space.abi.name,
                               self.clocksource, self.fast_path, space.timens,
                               len(space.threads), tuple(f.plain for f in space.patcher.funcs),
                               gw.instructions if gw else None, spawned, setup))
        self._flush_notices(space)

    def _flush_notices(self, space: _Space) -> None:
        for text in space.notices:
            self._emit(NoticeEvent(space.pid, space.pid, time.time(), text))
        space.notices = []

    # ---------------------------------------------------------------- control
    def _emit(self, ev: Event) -> None:
        self.sink(ev)

    def _note_signal(self, th: _Thread) -> None:
        """A signal is delivered to the stopped thread now: where it interrupts it."""
        if not th.sig_in_vdso:
            try:
                target.getregs(th.tid, th.regs)
            except ProcessGone:
                return
            pc = th.regs.buf[_RIP]
            th.sig_in_vdso = th.space.base <= pc < th.space.base + th.space.size

    def _resume(self, th: _Thread) -> None:
        if self._paused:
            return
        if th.sig:
            self._note_signal(th)
        sig, th.sig = th.sig, 0
        th.stopped = False
        th.undo_trap = 0
        th.marker_stop = False
        try:
            if self.options.signals:
                # every system-call entry stops: rt_sigreturn is seen however it is made
                target.syscall(th.tid, sig)
            else:
                target.cont(th.tid, sig)
        except ProcessGone:
            pass

    def request_stop(self, reason: str) -> None:
        """Async-signal and thread safe: end `run` at the next wake-up."""
        if self.stop_reason is None:
            self.stop_reason = reason
        self._wake()

    def _wake(self) -> None:
        ident = self._engine_ident
        if ident is not None and ident != threading.get_ident():
            try:
                signal.pthread_kill(ident, _WAKE_SIGNAL)
            except (ProcessLookupError, OSError):
                pass

    def submit(self, fn: Callable[[Session], Any]) -> Future[Any]:
        fut: Future[Any] = Future()
        if self._engine_ident is None or self._engine_ident == threading.get_ident():
            try:
                fut.set_result(fn(self))
            except BaseException as e:  # delivered to the caller through the future
                fut.set_exception(e)
            return fut
        self._queue.put((fn, fut))
        self._tick_due = True
        self._wake()
        return fut

    def _run_queue(self) -> None:
        while True:
            try:
                fn, fut = self._queue.get_nowait()
            except Empty:
                return
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(self))
            except BaseException as e:
                fut.set_exception(e)

    # ---------------------------------------------------------------- the loop
    def run(self) -> str:
        """Trace until the tracees exit or `request_stop`; then leave them as they were."""
        self._engine_ident = threading.get_ident()
        self.state = "paused" if self._paused else "running"
        deadline = (time.monotonic() + self.options.duration
                    if self.options.duration is not None else None)
        waitpid, status, ref = _waitpid, self._status, self._status_ref
        dispatch = self._dispatch
        trap = self._trap
        marker = self._marker
        threads = self.threads
        options = self.options
        reason = "exit"
        if options.inject:
            # a ptrace stop sends the tracer SIGCHLD: blocked here, it ends a nap at once
            sigmask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
            # never idle while the ring fills: ask to run often and briefly rather than
            # seldom and long, so a stop waits less for our next waitpid (sched.py)
            sched.request_short_slice(_SLICE_S)
            # waiting for the symbol loader's parse of an object (the first call named from
            # it) is not silence: keep the stubs waiting for us
            from tracer import objfile
            objfile.wait_hook = self._heartbeat
        try:
            while True:
                if self._tick_due:
                    self._tick_due = False
                    if self.tsc.ns_per_tick is not None:
                        self.tsc.refine()
                    self._run_queue()
                    if self.on_tick is not None:
                        self.on_tick()
                    if deadline is not None and time.monotonic() >= deadline:
                        self.request_stop("duration")
                if self.stop_reason is not None:
                    reason = self.stop_reason
                    break
                if not threads and not self.early:
                    reason = "exit"
                    break
                if options.inject:
                    tid = waitpid(-1, ref, target.WALL | os.WNOHANG)
                    if tid > 0:
                        dispatch(tid, status.value)
                        continue
                    if tid < 0 and ctypes.get_errno() == 10:
                        reason = "exit"
                        break
                    # a bounded batch, then waitpid again: stops (a thread being created, a
                    # signal) are served within one batch however fast the ring fills
                    if not self._drain_recorders(_DRAIN_BATCH_STATS if self.summary_only
                                                 else _DRAIN_BATCH):
                        _nap(_NAP_EMPTY)      # the ring is empty: let the tracee fill it
                    continue
                tid = waitpid(-1, ref, target.WALL)
                if tid > 0:
                    st = status.value
                    th = threads.get(tid) if st == 0x57F or st == _MARKER_STOP else None
                    if th is not None:          # the hot case: a stop of a known thread
                        th.stopped = True
                        try:
                            if st == _MARKER_STOP:
                                marker(th)
                            else:
                                trap(th)
                        except ProcessGone:
                            th.stopped = False
                            th.pending.clear()
                        continue
                    dispatch(tid, st)
                    continue
                if ctypes.get_errno() == 10:  # ECHILD: nothing left to wait for
                    reason = "exit"
                    break
                self._tick_due = True         # EINTR: a tick or a wake-up
        except BaseException:
            reason = "error"
            raise
        finally:
            if options.inject:
                signal.pthread_sigmask(signal.SIG_SETMASK, sigmask)
            self._engine_ident = None
            # every way out, an internal error included, leaves the tracee as it was
            self.detach_all(reason)
            if reason == "exit":
                self.state = "exited"
        return reason

    def _dispatch(self, tid: int, status: int) -> None:
        th = self.threads.get(tid)
        if th is None:
            self._unknown(tid, status)
            return
        try:
            if status & 0x7F == 0x7F:                      # WIFSTOPPED
                th.stopped = True
                if status == 0x57F:                        # SIGTRAP, no event: an int3
                    self._trap(th)
                    return
                if status == _MARKER_STOP:
                    self._marker(th)
                    return
                sig = (status >> 8) & 0xFF
                ev = status >> 16
                if ev:
                    self._event(th, ev, sig)
                elif sig == _SYSCALL_TRAP:
                    self._syscall_stop(th)
                else:
                    self._signal(th, sig)
            else:
                self._gone(th, status)
        except ProcessGone:
            # Killed under us (SIGKILL, or exit of the whole group): its exit status follows.
            th.stopped = False
            th.pending.clear()

    def _trap(self, th: _Thread) -> None:
        tid = th.tid
        space = th.space
        regs = th.regs
        buf = regs.buf
        _getregs(tid, regs)
        if th.expect_handler:
            signo, th.expect_handler = th.expect_handler, 0
            if self._handler_entry(th, space, signo):
                return
        pc = buf[_RIP] - 1
        bp = space.patcher.bps.get(pc)
        if bp is None and space.patcher.planted and not space.base <= pc < space.base + space.size:
            # outside the vDSO as we know it: did the process move it (mremap)?
            if self._follow_vdso(space):
                bp = space.patcher.bps.get(pc)
        if bp is None:
            # Not ours: a SIGTRAP the program raised or a debugger-style int3 of its own.
            th.sig = _SIGTRAP
            self._resume(th)
            return
        kind = bp.kind
        if kind == EXIT:
            self._stub_exit(th, space, bp.func, buf)
        elif kind == RET:
            self._exit_hit(th, space, bp.func, buf)
        elif kind == ENTRY:
            self._entry_hit(th, space, bp.func, buf)
        else:  # FALL: this call enters the kernel
            t_in = self.tsc.read()
            th.fb_marks.append((buf[_RSP], bp.func))
            pend = th.pending
            if pend and pend[-1].func == bp.func:
                pend[-1].fallback = True
            buf[_RIP] = bp.slot
            target.setregs(tid, regs)
            self._resume(th)
            th.stopped_ticks += self.tsc.read() - t_in

    def _marker(self, th: _Thread) -> None:
        """A seccomp stop: one of our marker system calls (breakpoints.py), or a
        SECCOMP_RET_TRACE of a filter of the tracee's own, which gets what it gets with no
        tracer: -ENOSYS, the call not run (kernel/seccomp.c)."""
        tid = th.tid
        space = th.space
        regs = th.regs
        buf = regs.buf
        _getregs(tid, regs)
        markers = space.patcher.markers
        idx = (buf[_ORIG_RAX] & 0xFFFFFFFF) - _seccomp.MARKER_BASE
        if not 0 <= idx < len(markers) or space.recorder is not None:
            if not 0 <= idx < _seccomp.MARKER_SPAN:
                buf[_ORIG_RAX] = -1 & 0xFFFFFFFFFFFFFFFF
                buf[_RAX] = -_ENOSYS & 0xFFFFFFFFFFFFFFFF
                target.setregs(tid, regs)
            self._resume(th)
            return
        bp = markers[idx]
        sp = (buf[_RSP] & space.abi.mask) + bp.sp_adj
        kind = bp.kind
        if kind == EXIT:
            self._stub_exit(th, space, bp.func, buf, sp)
        elif kind == FALL:
            t_in = self.tsc.read()
            th.fb_marks.append((sp, bp.func))
            pend = th.pending
            if pend and pend[-1].func == bp.func:
                pend[-1].fallback = True
            self._resume(th)
            th.stopped_ticks += self.tsc.read() - t_in
        elif kind == ENTRY:
            self._entry_hit(th, space, bp.func, buf, sp)
        else:
            self._exit_hit(th, space, bp.func, buf, sp)

    def _heartbeat(self) -> None:
        if self._engine_ident == threading.get_ident():
            for space in list(self.spaces.values()):
                if space.recorder is not None:
                    space.recorder.heartbeat()

    def _drain_recorders(self, limit: int = 65536) -> int:
        """--inject: turn what the stubs recorded into events (or, with -c, counts), at
        most `limit` records per ring."""
        n = 0
        for space in list(self.spaces.values()):
            rec = space.recorder
            if rec is None:
                continue
            if self.summary_only:
                n += rec.drain_stats(self._inject_stats, limit)
                continue
            records = rec.drain(limit)
            n += len(records)
            if not records:
                continue
            index = space.fidx_by_name
            signed = space.abi.signed
            threads = self.threads
            dead = self._dead
            for r in records:
                th = threads.get(r.tid) or dead.get(r.tid)
                if th is None or th.space is not space:
                    continue            # a forked child's call through the shared ring
                self._call_done(th, space, index[r.func], r.args, signed(r.ret), list(r.outs),
                                r.t_entry_ns, r.duration_ns, r.caller, r.fallback, None)
        return n

    def _uninstall(self, space: _Space, threads: list[_Thread]) -> None:
        """--inject: every thread stopped; switch the stubs off, restore the vDSO, unmap the
        ring, and emit what was still in it."""
        rec = space.recorder
        if rec is None or not rec.installed:
            return
        self._drain_for(_DRAIN_LEAVE_S)
        tids = [th.tid for th in threads if th.space is space and th.stopped]
        if not tids:
            self._emit(NoticeEvent(space.pid, space.pid, time.time(),
                                   "no thread of the process could be stopped (waiting for "
                                   "a vfork child?): the recorder stays in it"))
            return
        rec.uninstall(tids)
        self._drain_for(_DRAIN_LEAVE_S)
        for th in threads:
            if th.space is space and th.tid == tids[0]:
                th.stopped = True
        self._report_losses(space)

    def _finish_recorder(self, space: _Space) -> None:
        """The process exited or exec'd: everything still in its ring, then the losses."""
        space.recorder.producers_stopped()
        self._drain_for(_DRAIN_LEAVE_S)
        self._report_losses(space)
        space.recorder.abandon()

    def _drain_for(self, seconds: float) -> None:
        """Drain until the rings are empty, for at most `seconds`: on a way out the work must
        end whatever the rings say (a producer we do not stop, a forked child sharing a
        ring, may never let one run empty)."""
        deadline = time.monotonic() + seconds
        while self._drain_recorders(_DRAIN_BATCH_STATS) and time.monotonic() < deadline:
            pass

    def _report_losses(self, space: _Space) -> None:
        rec = space.recorder
        lost, corrupt = rec.lost(), rec.corrupt()
        self.lost_records += lost + corrupt
        now = time.time()
        if lost:
            self._emit(NoticeEvent(space.pid, space.pid, now,
                                   f"{lost} calls were not recorded: the ring was full"
                                   + ("" if rec.lossy else
                                      f" while the tracer was stopped or could not run (it "
                                      f"was silent for up to {rec.longest_silence:.2f} s; the "
                                      f"tracee waits {rec.patience_s} s at most)")))
        bad = rec.lost_counter_corrupt()
        if bad is not None:
            self._emit(NoticeEvent(space.pid, space.pid, now,
                                   f"the ring's count of calls not recorded was overwritten "
                                   f"(it read {bad}, more than the process can have made): "
                                   "how many calls were not recorded is unknown"))
        if corrupt:
            self._emit(NoticeEvent(space.pid, space.pid, now,
                                   f"{corrupt} corrupt ring records were skipped"))
        if rec.header_corrupt():
            self._emit(NoticeEvent(space.pid, space.pid, now,
                                   f"the ring's header was overwritten by the process "
                                   f"{rec.header_corrupt()} time(s): the calls in flight then "
                                   "were not recorded"))
        if rec.ring_broken():
            self._emit(NoticeEvent(space.pid, space.pid, now,
                                   "the ring could not be read any more (its header or file "
                                   "was damaged by the process): later calls were not "
                                   "recorded"))
        if rec.code_page_kept:
            self._emit(NoticeEvent(space.pid, space.pid, now,
                                   "the recorder's code page stays mapped: a thread may still "
                                   "return through it"))
        if rec.ring_kept:
            self._emit(NoticeEvent(space.pid, space.pid, now,
                                   "the recorder's ring stays mapped: a signal handler "
                                   "interrupted a thread while it wrote a record"))

    def _stub_exit(self, th: _Thread, space: _Space, fidx: int, buf: Any,
                   sp: int | None = None) -> None:
        """The stub's int3 (or marker): arguments, result, timestamps and return address are
        in one block of stack at `sp`; the thread just continues into the stub's epilogue."""
        if sp is None:
            sp = buf[_RSP]
        layout = space.patcher.layouts[fidx]
        assert layout is not None
        mem = space.mem
        st = layout.struct
        # One read covers the stub's block and, usually, the caller's stack variables that
        # the call wrote (a timespec on the caller's stack sits just above).
        try:
            window = mem.read(sp, _WINDOW)
        except MemoryReadError:
            try:
                window = mem.read(sp, st.size)
            except MemoryReadError:
                self._resume(th)
                return
        frame = st.unpack_from(window)
        dec = space.decoders[fidx]
        args = tuple([frame[i] for i in layout.i_args[:dec.nargs]])
        outs: list[bytes | None] = []
        if dec.outs:
            end = sp + len(window)
            for spec in dec.outs:
                addr = args[spec.arg]
                if not addr:
                    outs.append(None)
                    continue
                size = out_size(spec.layout, space.abi)
                if sp <= addr and addr + size <= end:
                    outs.append(window[addr - sp:addr - sp + size])
                    continue
                try:
                    outs.append(mem.read(addr, size))
                except MemoryReadError:
                    outs.append(None)
        stack = None
        depth = self.options.stack_depth
        if depth:
            stack = self._stack(space, th, depth, space.base + space.patcher.funcs[fidx]
                                .image_offset, sp + layout.retaddr)
        site = self._site(space, th, frame[layout.i_retaddr], sp + layout.retaddr, window, sp)
        if th.sig or self._paused or self.options.signals:
            self._resume(th)
        else:                           # the common case, without _resume's bookkeeping
            th.stopped = False
            th.undo_trap = 0
            _cont(th.tid, 0)
        t_stop = time.monotonic_ns()
        fallback = False
        marks = th.fb_marks
        if marks:
            # fallbacks marked below this frame belong to this call (nested calls, from a
            # signal handler, took theirs already)
            limit = sp + 16
            fallback = any(m[0] < limit for m in marks)
            th.fb_marks = [m for m in marks if m[0] >= limit]
        npt = self.tsc.ns_per_tick
        ticks = frame[layout.i_t1] - frame[layout.i_t0]
        if fallback and th.stopped_ticks:
            # the fallback's own stop is not the call's time (our handling of it, at least;
            # the two context switches around it remain)
            ticks -= min(th.stopped_ticks, ticks)
        th.stopped_ticks = 0
        dur = int(ticks * npt) if npt is not None and ticks > 0 else self.tsc.ns(ticks)
        # the call's time is the stub's own entry stamp, not when we got to its stop
        t0 = self.tsc.to_ns(frame[layout.i_t0]) if self.tsc.tsc0 else t_stop - dur
        self._call_done(th, space, fidx, args, frame[layout.i_ret], outs, t0, dur,
                        frame[layout.i_retaddr], fallback, stack, site)

    def _entry_hit(self, th: _Thread, space: _Space, fidx: int, buf: Any,
                   msp: int | None = None) -> None:
        """An entry int3, or (`msp` given) the entry marker of i386's gateway stub, whose
        saved eax (the system call's number) is at msp, the 6th argument (ebp, pushed by the
        gateway) at msp - 16 (breakpoints.py)."""
        t0 = time.monotonic_ns()
        sp = buf[_RSP] if msp is None else msp
        dec = space.decoders[fidx]
        gw = space.is_gateway[fidx]
        strs = None
        if gw:
            args = tuple(buf[i] & 0xFFFFFFFF for i in _SYSARG32) + (buf[_RAX] & 0xFFFFFFFF,)
            if msp is not None:
                try:
                    raw = space.mem.read(msp - 16, 20)
                except MemoryReadError:
                    raw = bytes(20)
                args = args[:5] + (int.from_bytes(raw[0:4], "little"),
                                   int.from_bytes(raw[16:20], "little"))
            caller = 0
            name = syscalls_i386.NAMES.get(args[6])
            if name in STRING_ARGS:     # paths and written buffers, read before they change
                strs = read_entry_strings(name, args, space.mem.read, self.options.string_size)
            # A vDSO function that calls the gateway has fallen back into the kernel (its
            # call site is a fallback int3 too, which marks calls made through a stub).
            if th.pending and not space.is_gateway[th.pending[-1].func]:
                th.pending[-1].fallback = True
        elif space.abi.word == 8:
            n = dec.nargs
            args = (buf[_ARG64[0]], buf[_ARG64[1]], buf[_ARG64[2]], buf[_ARG64[3]],
                    buf[_ARG64[4]], buf[_ARG64[5]])[:n]
            caller = 0                                   # read at exit: [sp] is unchanged
        else:
            n = dec.nargs
            try:
                raw = space.mem.read(sp, 4 * (n + 1))
            except MemoryReadError:
                raw = bytes(4 * (n + 1))
            words = [int.from_bytes(raw[i:i + 4], "little") for i in range(0, len(raw), 4)]
            caller, args = words[0], tuple(words[1:])
        stack = None
        depth = self.options.stack_depth
        if depth and not gw:
            stack = self._stack(space, th, depth)
        site = 0
        if not gw:
            try:
                ret0 = caller or space.mem.read_word(sp, space.abi.word)
                site = self._site(space, th, ret0, sp, b"", 0)
            except MemoryReadError:
                pass
        if msp is None:
            buf[_RIP] = space.patcher.bps[buf[_RIP] - 1].slot
            target.setregs(th.tid, th.regs)
        self._resume(th)
        th.pending.append(_Pending(fidx, sp, args, t0, caller, False, stack, strs, site))

    def _exit_hit(self, th: _Thread, space: _Space, fidx: int, buf: Any,
                  msp: int | None = None) -> None:
        """A ret int3, or (`msp` given) the exit marker of i386's gateway stub, whose saved
        eax (the system call's result) is at msp."""
        sp = buf[_RSP] if msp is None else msp
        pend = th.pending
        p = None
        while pend:
            top = pend[-1]
            if top.sp < sp:
                pend.pop()          # a deeper call that never returned (longjmp, killed)
                continue
            if top.sp == sp and top.func == fidx:
                p = pend.pop()
            break
        ret = buf[_RAX]
        if msp is not None:
            try:
                ret = space.mem.read_word(msp, 4)
            except MemoryReadError:
                ret = -_ENOSYS & 0xFFFFFFFF
        outs: list[bytes | None] = []
        abi = space.abi
        if th.fb_marks:
            th.fb_marks = [m for m in th.fb_marks if m[0] >= sp]
        if p is not None and not space.is_gateway[fidx]:
            mem = space.mem
            for spec in space.decoders[fidx].outs:
                addr = p.args[spec.arg] & abi.mask
                if not addr:
                    outs.append(None)
                    continue
                try:
                    outs.append(mem.read(addr, out_size(spec.layout, abi)))
                except MemoryReadError:
                    outs.append(None)
            if abi.word == 8:
                try:
                    p.caller = mem.read_word(sp, 8)
                except MemoryReadError:
                    p.caller = 0
        elif p is not None:
            name = syscalls_i386.NAMES.get(p.args[6])
            if name in STRING_ARGS:     # what read() filled in, before the thread runs on
                got = read_exit_strings(name, p.args, abi.signed(ret), space.mem.read,
                                        self.options.string_size)
                if got:
                    p.strs = {**(p.strs or {}), **got}
        if msp is None:
            buf[_RIP] = space.patcher.bps[buf[_RIP] - 1].slot
            target.setregs(th.tid, th.regs)
        self._resume(th)
        if p is None:
            return                  # a call that began before we attached
        t1 = time.monotonic_ns()
        if space.is_gateway[fidx]:
            self._syscall_done(th, space, p, abi.signed(ret), t1)
        else:
            self._call_done(th, space, fidx, p.args, abi.signed(ret), outs, p.t0, t1 - p.t0,
                            p.caller, p.fallback, p.stack, p.site)

    def _call_done(self, th: _Thread, space: _Space, fidx: int, raw: tuple[int, ...],
                   ret: int, outs: list[bytes | None], t0: int, dur: int, caller: int,
                   fallback: bool, stack: tuple[int, ...] | None, site: int = 0) -> None:
        func = space.patcher.funcs[fidx]
        dec = space.decoders[fidx]
        c = self.counters[func.plain]
        c.calls += 1
        c.total_ns += dur
        self.calls += 1
        err = None if ret >= 0 or dec.ret_is_value else errno_name(ret)
        if err:
            c.errors += 1
        reason = None
        if fallback:
            c.fallbacks += 1
            self.fallbacks += 1
            reason = dec.fallback_reason(raw, ret)
            if reason is None:
                reason = "no-vdso-clocksource" if self.fast_path is False else "unknown"
            c.reasons[reason] = c.reasons.get(reason, 0) + 1
        if not space.traced:
            return
        pid = space.pid
        # -c's call sites: who called (under --inject, which does not find the site, the
        # return address), named now, while the process (and /proc/PID/root) exists
        key = site or caller
        site_name = space.site_names.get(key) or self._site_name(space, key)
        path = None
        if stack:
            path = tuple([e.partition(" ")[2] or e for e in self._stack_text(space, stack)])
        c.add_site(site_name, path, dur)
        th.last_call = (fidx, caller, stack, fallback, reason)
        if self.summary_only:
            return
        abi = space.abi
        out = {}
        for spec, data in zip(dec.outs, outs):
            addr = raw[spec.arg]
            if addr:
                out[spec.name] = (out_decoder(spec.layout, abi)(data) if data is not None
                                  else Unreadable(addr))
        names = space.names.get(caller) or self._symbolize(space, caller)
        akey = (fidx, raw)
        args = space.args_cache.get(akey)
        if args is None:        # the same arguments come again and again (a loop's tp)
            if len(space.args_cache) > 4096:
                space.args_cache.clear()
            args = space.args_cache[akey] = dec.decode_args(raw, abi)
        self.sink(CallEvent(pid, th.tid, t0 / 1e9 + self._mono_to_epoch, func.plain,
                            func.symbol, args, ret, err, out, fallback, reason, dur, caller,
                            names[0], names[1],
                            self._stack_text(space, stack) if stack is not None else None,
                            space.timens is not None and func.plain in _NS_READS
                            and args.get("clockid") in _NS_CLOCKS, site_name if site else None))

    def _syscall_done(self, th: _Thread, space: _Space, p: _Pending, ret: int | None,
                      t1: int) -> None:
        nr = p.args[6]
        c = self.counters[GATEWAY_SYMBOL]
        c.calls += 1
        c.total_ns += t1 - p.t0
        if ret is not None and -4096 < ret < 0:
            c.errors += 1
        if not space.traced:
            return
        nested = None
        if th.pending and not space.is_gateway[th.pending[-1].func]:
            nested = space.patcher.funcs[th.pending[-1].func].plain
        elif th.fb_marks and th.fb_marks[-1][0] > p.sp:
            nested = space.patcher.funcs[th.fb_marks[-1][1]].plain
        name = syscalls_i386.NAMES.get(nr, f"syscall_{nr}")
        nargs = syscalls_i386.NARGS.get(nr, 6)
        strs, cut = clip_strings(name, p.strs, self.options.string_size) if p.strs else (None, ())
        self._emit(SyscallEvent(space.pid, th.tid, p.t0 / 1e9 + self._mono_to_epoch, nr, name,
                                p.args[:nargs], ret, errno_name(ret) if ret is not None else None,
                                t1 - p.t0, nested, strs, cut))

    def _modules(self, space: _Space, addr: int) -> ModuleMap:
        """The space's module map, rebuilt when addr is not in it (a library loaded since),
        once per unknown address (anonymous memory, JIT code, is in the map: no rebuild)."""
        mm = space.modules
        if mm is not None and (mm.region_at(addr) is not None or addr in space.unmapped):
            return mm
        now = time.monotonic()
        try:
            mm = ModuleMap.from_pid(space.pid, space.image.data, self.options.demangle)
        except OSError:
            mm = ModuleMap([], space.image.data, demangle=self.options.demangle)
        space.modules, space.modules_time = mm, now
        space.names.clear()
        space.frames.clear()
        space.site_names.clear()
        space.site_rules.clear()
        if mm.region_at(addr) is None:
            if len(space.unmapped) > 4096:
                space.unmapped.clear()
            space.unmapped.add(addr)
        return mm

    def _symbolize(self, space: _Space, addr: int) -> tuple[str, str | None]:
        """(caller, caller_symbol) for a return address, cached per address."""
        hit = space.names.get(addr)
        if hit is not None:
            return hit
        loc = self._modules(space, addr).locate(addr) if addr else None
        if loc is None:
            return f"{addr:#x}", None
        hit = (f"{addr:#x} {loc.caller}", loc.caller_symbol)
        if len(space.names) > 65536:
            space.names.clear()
        space.names[addr] = hit
        return hit

    def _stack(self, space: _Space, th: _Thread, depth: int, pc: int | None = None,
               sp: int | None = None) -> tuple[int, ...]:
        """Return addresses at a function's entry (sp points at the first one), CFI-unwound.
        Callee-saved registers hold their entry values at entry and again after the return."""
        buf = th.regs.buf
        regs: dict[int | str, int] = {i: buf[REG_INDEX[n]]
                                      for i, n in enumerate(space.abi.dwarf_regs)}
        regs["pc"] = buf[_RIP] if pc is None else pc
        regs["sp"] = buf[_RSP] if sp is None else sp
        try:
            # the map must know the caller's object (it may have been loaded since we looked)
            ret0 = space.mem.read_word(int(regs["sp"]), space.abi.word)
        except MemoryReadError:
            return ()
        self._modules(space, int(regs["sp"]))  # a thread's stack mapped since: rebuild
        mm = self._modules(space, ret0)
        try:
            return tuple(unwind(regs, space.mem.read, mm, space.abi.name, depth))
        except (ElfError, MemoryReadError):
            return ()

    def _site_name(self, space: _Space, addr: int) -> str:
        """`prog!main+0x2a` (or `prog+0x1234`, or the address) for -c and `site`."""
        text, sym = self._symbolize(space, addr)
        name = sym or text.partition(" ")[2] or text
        if len(space.site_names) > 65536:
            space.site_names.clear()
        space.site_names[addr] = name
        return name

    def _site(self, space: _Space, th: _Thread, ret: int, entry_sp: int, window: bytes,
              wbase: int) -> int:
        """The return address of the first frame outside the C library, for a call entered
        with sp = entry_sp ([entry_sp] = ret): ret itself, unless the C library made the call
        (its clock_gettime wrapper): then the next frames' return addresses, found with the
        CFI of each return address (cached per address: its row is fixed), read from
        `window` (the stack bytes at wbase) when they are in it. 0 when unknown."""
        rules = space.site_rules
        rule = rules.get(ret, _MISSING)
        if rule is _OUTSIDE:
            return ret                      # the common case: called from outside libc
        word = space.abi.word
        sp = entry_sp + word                # the caller's sp after the call returns
        for _ in range(_SITE_FRAMES):
            if rule is _MISSING:
                rule = self._site_rule(space, ret)
            if rule is _OUTSIDE:
                return ret
            if rule is None:
                return self._site_unwound(space, th, entry_sp)
            cfa = sp + rule[0]
            off = cfa + rule[1] - wbase
            if 0 <= off <= len(window) - word:
                ret = int.from_bytes(window[off:off + word], "little")
            else:
                try:
                    ret = space.mem.read_word(cfa + rule[1], word)
                except MemoryReadError:
                    return 0
            sp = cfa
            rule = rules.get(ret, _MISSING)
        return 0

    def _site_rule(self, space: _Space, ret: int) -> tuple[int, int] | None:
        mm = self._modules(space, ret)
        module = mm.module_at(ret)
        rule: tuple[int, int] | None = _OUTSIDE
        if module is not None and is_c_library(module.short_name):
            rule = None
            found = mm.frame_rule(ret - 1)
            row = found[1] if found is not None else None
            arch = ARCHES[space.abi.name]
            if row is not None and row.offsets is not None and row.cfa_reg == arch.sp:
                ra = [off for reg, off in row.offsets if reg == arch.ra]
                if ra:
                    rule = (row.cfa_offset, ra[0])
        rules = space.site_rules
        if len(rules) > 65536:
            rules.clear()
        rules[ret] = rule
        return rule

    def _site_unwound(self, space: _Space, th: _Thread, entry_sp: int) -> int:
        """The site through a full unwind (a C library frame whose CFA is not sp-based)."""
        try:
            entry_pc = space.base   # any vDSO address: the walk starts from [sp]
            for a in self._stack(space, th, _SITE_FRAMES + 1, entry_pc, entry_sp):
                module = self._modules(space, a).module_at(a)
                if module is None or not is_c_library(module.short_name):
                    return a
        except (ElfError, MemoryReadError):
            pass
        return 0

    def _stack_text(self, space: _Space, addrs: tuple[int, ...]) -> tuple[str, ...]:
        frames = space.frames
        out = []
        for a in addrs:
            text = frames.get(a)
            if text is None:
                loc = self._modules(space, a).locate(a)
                text = loc.stack_entry if loc is not None else f"{a:#x}"
                if len(frames) > 65536:
                    frames.clear()
                frames[a] = text
            out.append(text)
        return tuple(out)

    # ---------------------------------------------------------------- other stops
    def _signal(self, th: _Thread, sig: int) -> None:
        if sig == signal.SIGSEGV and self._emulate_rdtsc(th):
            return
        th.sig = sig
        self._note_signal(th)
        if th.space.signals is not None and not self._paused and _caught(th.space.pid, th.tid,
                                                                         sig):
            # Step into the handler: the kernel builds the frame and stops at its first
            # instruction, where the frame tells handler, restorer and interrupted ip.
            th.expect_handler = sig
            th.sig = 0
            th.stopped = False
            try:
                target.singlestep(th.tid, sig)
            except ProcessGone:
                pass
            return
        self._resume(th)

    def _emulate_rdtsc(self, th: _Thread, resume: bool = True) -> bool:
        """A stub's rdtsc faulted (the thread called prctl(PR_SET_TSC, PR_TSC_SIGSEGV) after
        the stubs were made): give it the tracer's own reading of the same counter and step
        it over the instruction; the program never sees the SIGSEGV."""
        space = th.space
        patcher = space.patcher
        try:
            target.getregs(th.tid, th.regs)
            buf = th.regs.buf
            pc = buf[_RIP]
            if not (patcher.pad_used and patcher.in_padding(pc)
                    and space.mem.read(pc, 2) == b"\x0f\x31"):
                return False
        except MemoryReadError:
            return False
        t = self.tsc.read()
        buf[_RAX] = t & 0xFFFFFFFF
        buf[REG_INDEX["rdx"]] = t >> 32
        buf[_RIP] = pc + 2
        target.setregs(th.tid, th.regs)
        if resume:
            self._resume(th)
        return True

    def _handler_entry(self, th: _Thread, space: _Space, signo: int) -> bool:
        tracker = space.signals
        if tracker is None:
            return False
        d = tracker.on_handler_entry(th.tid, signo, th.regs, space.mem.read)
        if d is None:
            return False
        self._resume(th)
        if space.traced:
            self._emit(sigtrack.signal_event(d, space.pid, time.time(),
                                             lambda a: self._code_name(space, a)))
        return True

    def _syscall_stop(self, th: _Thread) -> None:
        space = th.space
        tracker = space.signals
        if tracker is None:
            self._resume(th)
            return
        info = target.get_syscall_info(th.tid)
        abi = _AUDIT_ABI.get(info.arch, space.abi)
        if info.op != 1 or not sigtrack.is_sigreturn(abi, info.nr):
            self._resume(th)
            return
        target.getregs(th.tid, th.regs)
        via_addr = info.instruction_pointer - 2        # syscall / int 0x80: 2 bytes
        r = tracker.on_sigreturn(th.tid, info.nr, th.regs, space.mem.read, "", abi=abi)
        self._resume(th)
        # naming may parse an object: only once the thread runs again
        via = self._code_name(space, via_addr, trampoline=True) or f"{via_addr:#x}"
        r = dataclasses.replace(r, via=via)
        if space.traced:
            self._emit(sigtrack.sigreturn_event(r, space.pid, time.time(),
                                                lambda a: self._code_name(space, a)))

    def _code_name(self, space: _Space, addr: int, trampoline: bool = False) -> str | None:
        """`symbol` or `symbol+0xoff` for a code address (not a return address); for a
        trampoline the bare symbol that contains it, or its address."""
        loc = self._modules(space, addr).locate(addr, is_return_address=False)
        if loc is not None and loc.symbol is not None:
            if trampoline or loc.symbol_offset == 0:
                return loc.symbol
            return f"{loc.symbol}+{loc.symbol_offset:#x}"
        try:
            code = space.mem.read(addr - 7 if trampoline else addr, 9)
        except MemoryReadError:
            code = b""
        # glibc's and musl's x86_64 restorer: mov $15,%rax ; syscall (no dynamic symbol)
        if code.endswith(_RESTORE_RT) or (not trampoline and code.startswith(_RESTORE_RT)):
            return "__restore_rt"
        if trampoline:
            return f"{addr:#x}"
        return loc.caller if loc is not None else None

    def _event(self, th: _Thread, ev: int, sig: int) -> None:
        tid = th.tid
        if ev == target.PTRACE_EVENT_STOP:
            if sig in _GROUP_STOP_SIGS:
                th.listening = True
                try:
                    target.listen(tid)
                except ProcessGone:
                    pass
                th.stopped = False
                return
            th.listening = False
            self._resume(th)
            return
        if ev == target.EVENT_CLONE:
            new = target.geteventmsg(tid)
            if new not in self.threads:
                nt = self._add_thread(new, th.space)
                early = self.early.pop(new, None)
                if early is not None:
                    self._dispatch(new, early)
                else:
                    nt.stopped = False   # its first stop will arrive
            self._resume(th)
            return
        if ev in (target.EVENT_FORK, target.EVENT_VFORK):
            child = target.geteventmsg(tid)
            self._new_child(th, child, vfork=ev == target.EVENT_VFORK)
            self._resume(th)
            return
        if ev == target.EVENT_EXEC:
            self._exec(th)
            return
        self._resume(th)

    def _new_child(self, parent: _Thread, child: int, vfork: bool) -> None:
        """A forked child inherits every int3 (and slot). Trace it with -f; otherwise clean
        its copy before it runs. A vfork child shares our address space: keep it traced,
        silently, until it execs or exits."""
        ps = parent.space
        follow = self.options.follow_forks
        # the child's copy is taken from the patch as it is now: where the vDSO is now
        self._follow_vdso(ps)
        if vfork:
            # the parent waits in the kernel (killable only: PTRACE_INTERRUPT does not stop
            # it) until the child execs or exits (kernel/fork.c wait_for_vfork_done)
            parent.vfork_child = child
        if follow or vfork:
            # Each space owns its /proc/PID/mem handle (a vfork child's refers to the parent's
            # memory, and is closed at the child's exec or exit). A vfork child shares the
            # parent's address space, so it shares the patcher too: one planted state per
            # address space. A fork child's copy has its own.
            try:
                mem = target.Memory(child)
            except ProcessGone:
                return
            patcher = ps.patcher if vfork else ps.patcher.copy()
            space = _Space(child, ps.abi, mem, ps.image, ps.base, ps.size, patcher,
                           ps.decoders, ps.is_gateway, traced=follow)
            self.spaces[child] = space
            th = self._add_thread(child, space)
            th.stopped = False
        else:
            self.release_forks[child] = (ps.patcher.copy(), ps.recorder, ps)
        early = self.early.pop(child, None)
        if early is not None:
            self._dispatch(child, early)

    def _unknown(self, tid: int, status: int) -> None:
        if tid in self.release_forks:
            if status & 0x7F == 0x7F:
                self._release_child(tid)
            else:
                self.release_forks.pop(tid, None)
            return
        if status & 0x7F != 0x7F:
            self.early.pop(tid, None)
            return
        # A new thread whose first stop beat its parent's clone event.
        try:
            tgid = int(procfs.read_status(tid).get("Tgid", "0"))
        except OSError:
            tgid = 0
        space = self.spaces.get(tgid)
        if space is not None and tgid != tid:
            th = self._add_thread(tid, space)
            th.stopped = True
            self._dispatch(tid, status)
            return
        self.early[tid] = status

    def _release_child(self, child: int, wait: bool = False) -> None:
        """Restore an unfollowed fork child's private copy of the vDSO (under --inject: its
        entries, and unmap the ring and code page it inherited) and let it go. `wait`: its
        first stop has not been seen yet (it cannot have run: an auto-attached child stops
        before its first instruction). Cleaning never touches the parent's state: the patcher
        is the copy taken at the fork."""
        entry = self.release_forks.pop(child, None)
        if entry is None:
            return
        patcher, recorder, ps = entry
        if wait and not self._await_first_stop(child):
            return
        problem = None
        for _ in range(2):               # a failed write: once more, through a fresh handle
            try:
                mem = target.Memory(child)
            except ProcessGone:
                return
            try:
                if patcher.planted:
                    # as at detach: its thread may be on our code (i386: a fork made through
                    # __kernel_vsyscall returns inside the gateway stub in the padding)
                    copy = _Space(child, ps.abi, mem, ps.image, ps.base, ps.size, patcher,
                                  ps.decoders, ps.is_gateway, traced=False)
                    self._unpatch_space(copy, [_Thread(child, copy)])
                if recorder is not None:
                    kept = recorder.release_fork(child, mem)
                    if kept:
                        self._emit(NoticeEvent(child, child, time.time(), kept))
                problem = None
                break
            except ProcessGone:
                return
            except (MemoryWriteError, OSError) as e:
                problem = str(e)
            finally:
                mem.close()
        try:
            target.detach(child)
        except (ProcessGone, OSError):
            pass
        if problem is not None:
            self._emit(NoticeEvent(child, child, time.time(),
                                   f"cannot remove vdsotrace's code from fork child {child} "
                                   f"({problem}): it may die at its next vDSO call"))

    def _await_first_stop(self, child: int, timeout: float = 2.0) -> bool:
        """Wait (bounded) for a fork child's first stop; False if it is gone or never came."""
        deadline = time.monotonic() + timeout
        while True:
            got, status = target.wait_nohang(child)
            if got == child:
                return bool(os.WIFSTOPPED(status))
            if time.monotonic() > deadline:
                self._emit(NoticeEvent(child, child, time.time(),
                                       f"fork child {child} never stopped: it could not be "
                                       "cleaned of vdsotrace's code"))
                return False
            time.sleep(0.001)

    def _vfork_done(self, child: int) -> None:
        for t in self.threads.values():
            if t.vfork_child == child:
                t.vfork_child = 0

    def _exec(self, th: _Thread) -> None:
        """execve replaced the address space: a new vDSO to read and patch."""
        old = th.space
        self._vfork_done(old.pid)
        former = target.geteventmsg(th.tid)
        pid = old.pid
        for t in list(old.threads):
            if t != th.tid:
                self.threads.pop(t, None)
        old.threads.clear()
        if former != th.tid:
            self.threads.pop(former, None)
        # Calls open in the old image never return (execve itself, through i386's gateway,
        # left its fallback mark): nothing per call survives into the new image.
        th.pending.clear()
        th.fb_marks.clear()
        th.stopped_ticks = 0
        th.expect_handler = 0
        th.undo_trap = 0
        th.last_call = None
        th.tid = pid
        self.threads[pid] = th
        if old.recorder is not None:
            self._finish_recorder(old)
        self._unguard(pid)
        old.mem.close()
        self.spaces.pop(pid, None)
        if not old.traced:      # an unfollowed vfork child: its new image is clean
            self._let_go(pid)
            return
        fell_back = None
        try:
            # (both engines: the recorder's injection and the marker filter's installation
            # make system calls in the tracee, as spawn() does)
            self._step_past_exec(th)
            try:
                space = self._new_space(pid, pid)
            except TracerError as e:
                if not self.options.inject or isinstance(e, ProcessGone):
                    raise
                # the new image cannot take the recorder: trace it with stops instead
                fell_back = str(e)
                space = self._new_space(pid, pid, inject=False)
        except TracerError as e:
            self._emit(NoticeEvent(pid, pid, time.time(), f"after exec: {e}; detaching"))
            self._let_go(pid)
            return
        th.space = space
        space.threads.add(pid)
        # the new image's objects: parsed in the background, as after spawn
        symload.warm_later(pid, cfi=bool(self.options.stack_depth))
        exe = None
        try:
            exe = os.readlink(f"/proc/{pid}/exe")
        except OSError:
            pass
        self._emit(ExecEvent(pid, pid, time.time(), exe, space.base, space.abi.name,
                             timens_offsets=space.timens))
        if fell_back is not None:
            self._emit(NoticeEvent(pid, pid, time.time(),
                                   f"after exec: --inject is not possible in the new image "
                                   f"({fell_back.removesuffix('; run without --inject')}): "
                                   "tracing it with stops instead"))
        self._resume(th)

    def _step_past_exec(self, th: _Thread) -> None:
        """At the exec event the thread is still inside execve's exit path, where a system
        call made for the recorder does not run: one PTRACE_SINGLESTEP reports at once, on
        the way out to user space, before the new image's first instruction. A signal that
        arrives instead is delivered on the thread's next resume (a second one sent again)."""
        held: list[int] = []
        try:
            for _ in range(16):
                target.singlestep(th.tid, 0)
                _, status = target.wait(th.tid)
                if status & 0x7F != 0x7F:
                    raise ProcessGone(f"process {th.tid} exited right after its exec")
                sig = (status >> 8) & 0xFF
                if sig == _SIGTRAP and not status >> 16:
                    return
                if not status >> 16:
                    held.append(sig)        # a signal-delivery stop: the step is still due
        finally:
            if held:
                th.sig = held[0]
                for sig in held[1:]:
                    try:
                        target.tgkill(th.space.pid, th.tid, sig)
                    except ProcessGone:
                        pass

    def _let_go(self, tid: int) -> None:
        """Stop tracing a thread whose image carries none of our code."""
        self.threads.pop(tid, None)
        try:
            target.detach(tid)
        except ProcessGone:
            pass

    def _gone(self, th: _Thread, status: int) -> None:
        tid = th.tid
        space = th.space
        if tid == space.pid:
            self._vfork_done(tid)
        self.threads.pop(tid, None)
        space.threads.discard(tid)
        th.pending.clear()
        if space.recorder is not None:
            # its last records are still in the ring (drained later, not here: a thread's exit
            # must not wait for the other threads' records)
            if len(self._dead) > 4096:
                self._dead.clear()
            self._dead[tid] = th
        if space.signals is not None:
            space.signals.forget(tid)
        if tid == space.pid or not space.threads:
            if tid == space.pid:
                code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
                sig = signame(os.WTERMSIG(status)) if os.WIFSIGNALED(status) else None
                if space.traced:
                    self._emit(ExitEvent(space.pid, tid, time.time(), code, sig))
            if not space.threads:
                if space.recorder is not None:
                    self._finish_recorder(space)
                self._unguard(space.pid)
                space.mem.close()
                self.spaces.pop(space.pid, None)

    # ---------------------------------------------------------------- pause / detach
    def _stop_all(self) -> list[_Thread]:
        """Bring every thread into a ptrace stop (PTRACE_INTERRUPT), handling what arrives."""
        for th in list(self.threads.values()):
            if not th.stopped:
                try:
                    target.interrupt(th.tid)
                except ProcessGone:
                    pass
        while True:
            # a thread in vfork stops only once its child execs or exits: not waited for
            waiting = [t for t in self.threads.values() if not t.stopped and not t.vfork_child]
            if not waiting:
                break
            tid = _waitpid(-1, self._status_ref, target.WALL)
            if tid <= 0:
                if ctypes.get_errno() == 10:
                    break
                continue
            status = self._status.value
            found = self.threads.get(tid)
            if found is None:
                self._unknown(tid, status)
                continue
            th = found
            if status & 0x7F != 0x7F:
                self._gone(th, status)
                continue
            th.stopped = True
            sig = (status >> 8) & 0xFF
            ev = status >> 16
            if ev == target.PTRACE_EVENT_STOP:
                th.listening = sig in _GROUP_STOP_SIGS
                continue
            if ev == target.EVENT_SECCOMP:
                th.marker_stop = True   # handled on resume; harmless if we detach now
                continue
            if ev:
                # clone/fork/exec while stopping: handle it fully, then stop again
                self._paused = False
                self._event(th, ev, sig)
                self._paused = True
                if not th.stopped:
                    try:
                        target.interrupt(th.tid)
                    except ProcessGone:
                        pass
                continue
            if sig == _SIGTRAP:
                target.getregs(tid, th.regs)
                if th.expect_handler:
                    signo, th.expect_handler = th.expect_handler, 0
                    if self._handler_entry(th, th.space, signo):
                        continue
                pc = th.regs.buf[_RIP] - 1
                sp = th.space
                if (pc not in sp.patcher.bps and sp.patcher.planted
                        and not sp.base <= pc < sp.base + sp.size):
                    self._follow_vdso(sp)          # moved by mremap?
                if pc in th.space.patcher.bps:
                    th.undo_trap = pc   # a hit not yet handled: on resume, or undone on detach
                    continue
            if sig == _SYSCALL_TRAP:
                continue
            if sig == signal.SIGSEGV and self._emulate_rdtsc(th, resume=False):
                continue
            th.sig = sig                # a real signal: deliver it when we let go
        return list(self.threads.values())

    def _pause_now(self) -> None:
        self._paused = True
        self._stop_all()
        self.state = "paused"

    def _resume_now(self) -> None:
        self._paused = False
        for th in list(self.threads.values()):
            if th.stopped:
                if th.undo_trap:
                    # The trap was taken while pausing: handle it as a normal hit now.
                    th.undo_trap = 0
                    self._trap(th)
                elif th.marker_stop:
                    th.marker_stop = False
                    self._marker(th)
                else:
                    self._resume(th)
        self.state = "running"

    def _step_out(self, tid: int, inside: Callable[[int], bool], limit: int = 200_000,
                  timeout: float = 0.5) -> bool:
        """Single-step a stopped thread until `inside(pc)` is false. False when it could not
        be done (a blocking system call, a signal, the thread died): it is left stopped.
        Past `timeout` s it gives up only on a thread that sleeps in the kernel; one that
        waits for a CPU (a loaded machine, the tracer itself descheduled) is waited for:
        a thread left in our code keeps the stubs in the tracee."""
        regs = Regs()
        target.getregs(tid, regs)
        if not inside(regs.buf[_RIP]):
            return True
        deadline = time.monotonic() + timeout
        held: list[int] = []
        try:
            return self._step_loop(tid, inside, limit, deadline, regs, held)
        finally:
            th = self.threads.get(tid)
            for sig in held:            # queued again: delivered when the thread runs
                try:
                    tgid = (th.space.pid if th is not None
                            else int(procfs.read_status(tid).get("Tgid", tid)))
                    target.tgkill(tgid, tid, sig)
                except (ProcessGone, OSError, ValueError):
                    pass

    def _step_loop(self, tid: int, inside: Callable[[int], bool], limit: int,
                   deadline: float, regs: Regs, held: list[int]) -> bool:
        bound = time.monotonic() + _STEP_BOUND_S
        for _ in range(limit):
            target.singlestep(tid)
            asleep_since = 0.0
            while True:
                got, status = target.wait_nohang(tid)
                if got:
                    break
                now = time.monotonic()
                if now > deadline:
                    if not procfs.sleeping(tid):
                        asleep_since = 0.0      # runnable, not yet run: it is not blocked
                    elif not asleep_since:
                        asleep_since = now
                    if now < bound and (not asleep_since or now - asleep_since < _STEP_WAIT_S):
                        deadline = now + _STEP_POLL_S
                        continue
                    target.interrupt(tid)
                    target.wait(tid)
                    return False
                time.sleep(0.0002)
            if status & 0x7F != 0x7F:
                raise ProcessGone(f"thread {tid} exited")
            if status >> 16 in (target.PTRACE_EVENT_STOP, target.EVENT_SECCOMP):
                continue                # an interrupt we sent earlier, or a marker: step again
            if status == (signal.SIGSEGV << 8) | 0x7F:
                known = self.threads.get(tid)
                if known is not None and self._emulate_rdtsc(known, resume=False):
                    target.getregs(tid, regs)   # a stub's rdtsc, answered: step on
                    if not inside(regs.buf[_RIP]):
                        return True
                    continue
            sig = (status >> 8) & 0xFF
            if sig != _SIGTRAP and not status >> 16:
                # a signal arrived (a SIGCHLD from a child that exited...): hold it for the
                # thread's next resume and step on; the step has not been taken yet
                th = self.threads.get(tid)
                again = (th is not None and sig == th.sig) or sig in held
                if again and sig in _FAULTS:
                    return False        # the stepped instruction itself faults
                if again:
                    continue            # a standard signal already pending: one is kept
                if th is not None and not th.sig:
                    th.sig = sig
                else:
                    held.append(sig)
                continue
            if sig != _SIGTRAP or status >> 16:
                return False
            target.getregs(tid, regs)
            if not inside(regs.buf[_RIP]):
                return True
        return False

    def _unpatch_thread(self, th: _Thread, patcher: Patcher) -> None:
        """After `restore_code`: put a stopped thread back on original code -- before a trap
        it took and we did not handle, out of any slot, out of any call made through a stub."""
        regs = th.regs
        target.getregs(th.tid, regs)
        pc = regs.buf[_RIP]
        trap = th.undo_trap
        th.undo_trap = 0
        if trap:
            bp = patcher.bps.get(trap)
            if bp is not None and bp.kind != EXIT:
                pc = trap               # the original instruction runs again, untraced
        back = patcher.pc_back(pc)
        if back is not None:
            pc = back
        if pc != regs.buf[_RIP]:
            regs.buf[_RIP] = pc
            target.setregs(th.tid, regs)

        def inside(x: int) -> bool:
            return patcher.in_padding(x) or patcher.in_stub_function(x)

        if patcher.gw_real_ret:
            self._leave_gateway_stub(th, patcher, inside)
        else:
            self._step_out(th.tid, inside)

    def _leave_gateway_stub(self, th: _Thread, patcher: Patcher,
                            inside: Callable[[int], bool]) -> None:
        """i386 marker mode: step the thread off our code (a thread in __kernel_vsyscall
        with a return into the padding counts: a marker's call), except that one in the
        system call that gw_stub made for its caller gets the gateway's own `ret` as return
        address instead of gw_stub's: it returns to its caller directly (breakpoints.py)."""
        mem = th.space.mem
        regs = Regs()

        def gw_word() -> tuple[int, int] | None:
            target.getregs(th.tid, regs)
            off = patcher.gw_return_slot(regs.buf[_RIP])
            if off is None:
                return None
            at = (regs.buf[_RSP] & 0xFFFFFFFF) + off
            try:
                return at, mem.read_word(at, 4)
            except MemoryReadError:
                return None

        def ours(x: int) -> bool:
            if inside(x):
                return True
            got = gw_word()
            return got is not None and got[1] != patcher.gw_real_ret and patcher.in_padding(
                got[1])

        self._step_out(th.tid, ours)
        got = gw_word()
        if got is not None and got[1] == patcher.gw_real_ret:
            mem.write(got[0], patcher.gw_ret.to_bytes(4, "little"))

    def _on_our_code(self, th: _Thread, patcher: Patcher,
                     ranges: list[tuple[int, int]] | None = None) -> bool:
        """Will this thread still run code in the padding: its pc is there (it could not be
        stepped out), it is in the vDSO with a return into a stub on its stack, or a signal
        handler interrupted it in vDSO or stub code (a live signal frame whose saved pc is
        there: sigframes.py)? A return into a stub elsewhere on the stack of a thread outside
        the vDSO is a stale word of an earlier call (i386 stacks are full of them)."""
        try:
            target.getregs(th.tid, th.regs)
        except ProcessGone:
            return False
        if patcher.in_padding(th.regs.buf[_RIP]):
            return True
        if not patcher.stub_returns:
            return False
        word = th.space.abi.word
        sp = th.regs.buf[_RSP] & th.space.abi.mask
        rets = patcher.stub_returns
        pc, vdso = th.regs.buf[_RIP], (th.space.base, th.space.base + th.space.size)

        def gateway_returns_to_stub(ip: int, at: int) -> bool:
            """In __kernel_vsyscall at `ip` with sp `at`: its return address (or, past the
            gateway's own `ret` put there at leaving, the next word) is in the padding."""
            try:
                ra = th.space.mem.read(at + (patcher.gw_return_slot(ip) or 0), 2 * word)
            except MemoryReadError:
                return True
            first = int.from_bytes(ra[:word], "little")
            return patcher.in_padding(first) or (first == patcher.gw_ret and patcher.in_padding(
                int.from_bytes(ra[word:], "little")))

        if not vdso[0] <= pc < vdso[1] or patcher.gw_return_slot(pc) is not None:
            # Outside the vDSO (whose functions call nothing outside it) a thread gets back
            # into a stub only through a signal frame that interrupted vDSO or stub code
            # (sigframes.py); in __kernel_vsyscall, through its return address or such a
            # frame. Any other return into a stub on its stack is a stale word of an earlier
            # call. (A frame that interrupted __kernel_vsyscall counts as its return does.)
            if patcher.gw_return_slot(pc) is not None and gateway_returns_to_stub(pc, sp):
                return True
            return th.sig_in_vdso and any(
                patcher.gw_return_slot(ip) is None or gateway_returns_to_stub(ip, ssp)
                for ip, ssp in sigframes.interrupted(th.space.mem.read, sp, word, [vdso]))
        lo = patcher.base + patcher.pad_start
        return bool(stackscan.scan(th.space.mem.read, sp, word,
                                   [(lo, lo + len(patcher.pad_used))], rets.__contains__,
                                   end=stackscan.mapping_end(ranges or [], sp)))

    def _unpatch_space(self, space: _Space, threads: list[_Thread]) -> bool:
        """Every thread stopped: restore the original code, move threads off our code, and
        clear the padding unless a thread still needs a stub to return through. Returns
        whether the padding was cleared."""
        patcher = space.patcher
        if not patcher.planted:
            return True
        patcher.restore_code(space.mem)
        self._unguard(space.pid)
        # a vfork child shares the address space, and so the patcher
        mine = [th for th in threads if th.space.patcher is patcher]
        for th in mine:
            try:
                self._unpatch_thread(th, patcher)
            except (ProcessGone, OSError):
                pass
        try:
            ranges = [(m.start, m.end) for m in procfs.read_maps(space.pid)]
        except OSError:
            ranges = []
        busy = [th.tid for th in mine if self._on_our_code(th, patcher, ranges)]
        if busy:
            # the stub stays, and stops no more: with no tracer its trap would kill the thread
            patcher.disarm(space.mem)
            self._emit(NoticeEvent(space.pid, busy[0], time.time(),
                                   f"thread {busy[0]} is inside a traced call (a signal handler "
                                   "interrupted it): the stub code stays in the vDSO padding, "
                                   "with its stop made a no-op, until the thread returns"))
            return False
        patcher.clear_padding(space.mem)
        return True

    def _follow_vdso(self, space: _Space) -> bool:
        """Is the vDSO still where we patched it? No ptrace event tells of an mremap: the
        [vdso] line of /proc/PID/maps does. If it moved with its bytes, follow it there
        (every address of the patch moves with it); if it is gone or is not the image we
        patched, nothing is written where it was. Says so in a notice either way. Returns
        whether restoring writes may be made."""
        if space.vdso_lost:
            return False
        try:
            maps = procfs.read_maps(space.pid)
        except OSError:
            return True                 # gone: any write fails with ProcessGone
        vmap = next((m for m in maps if m.path == "[vdso]"), None)
        old = space.base
        if vmap is not None and vmap.start == old:
            return True
        if vmap is not None and vmap.size == space.size and self._same_image(space, vmap.start):
            delta = vmap.start - old
            patcher = space.patcher
            if patcher.base == old:
                patcher.rebase(delta)
            for sp in self.spaces.values():
                if sp.patcher is patcher:          # a vfork child shares the memory
                    sp.base = vmap.start
            space.base = vmap.start
            if space.recorder is not None:
                space.recorder.rebase(delta)
            space.modules = None
            self._emit(NoticeEvent(space.pid, space.pid, time.time(),
                                   f"the vDSO moved from {old:#x} to {vmap.start:#x} (mremap): "
                                   "vdsotrace follows it there"))
            return True
        msg = (f"the process unmapped its vDSO (at {old:#x}): nothing of it is left to "
               "restore, and nothing is written there any more" if vmap is None else
               f"the vDSO moved from {old:#x} to {vmap.start:#x} and is not the image "
               "vdsotrace patched: its patches cannot be restored (nothing is written at "
               "either address)")
        self._emit(NoticeEvent(space.pid, space.pid, time.time(), msg))
        space.vdso_lost = True
        space.patcher.planted = False
        space.patcher.pad_used = b""
        if space.recorder is not None:
            space.recorder.vdso_lost = True
        return False

    def _same_image(self, space: _Space, start: int) -> bool:
        """The bytes at `start` are our patched image: the original outside what we wrote."""
        size = space.image.image_size
        try:
            live = bytearray(space.mem.read(start, size))
        except MemoryReadError:
            return False
        want = bytearray(space.image.data[:size])
        written = [(a - space.base, len(new)) for a, new, _ in space.patcher.patches]
        if space.recorder is not None:
            written += space.recorder.patched_ranges(space.base)
        for off, n in written:
            if 0 <= off < size:
                live[off:off + n] = want[off:off + n]
        return live == want

    def _restore_space(self, space: _Space, threads: list[_Thread]) -> None:
        """Take everything of ours out of one space. A failed write is never taken for
        success: it is retried through a freshly opened /proc/PID/mem, then reported."""
        problem = None
        self._follow_vdso(space)
        for attempt in range(2):
            try:
                if attempt:
                    space.mem.reopen()
                self._uninstall(space, threads)
                self._unpatch_space(space, threads)
                return
            except ProcessGone:
                return
            except (MemoryWriteError, OSError) as e:
                problem = str(e)
        self._emit(NoticeEvent(space.pid, space.pid, time.time(),
                               f"cannot restore the vDSO of {space.pid} ({problem}): "
                               "vdsotrace's code stays in it and it may die at its next "
                               "vDSO call"))

    def _settle_vforks(self, timeout: float = 5.0) -> None:
        """Before stopping everything: a thread waiting in vfork cannot be stopped until its
        child execs or exits, so trace on (bounded) until no vfork is in flight."""
        deadline = time.monotonic() + timeout
        while (any(t.vfork_child for t in self.threads.values())
               and time.monotonic() < deadline):
            tid = _waitpid(-1, self._status_ref, target.WALL | os.WNOHANG)
            if tid > 0:
                self._dispatch(tid, self._status.value)
            elif tid < 0 and ctypes.get_errno() == 10:
                return
            else:
                if self.options.inject:
                    self._drain_recorders()
                time.sleep(0.001)
        for t in self.threads.values():
            if t.vfork_child:
                self._emit(NoticeEvent(t.space.pid, t.tid, time.time(),
                                       f"thread {t.tid} still waits for its vfork child "
                                       f"{t.vfork_child}: it is let go without being stopped"))

    def _quiesce_recorders(self, limit_s: float = 5.0) -> None:
        """--inject, before stopping the tracee to leave: switch recording off and drain the
        ring while it runs on, so that it is held for milliseconds, not for as long as
        decoding a full ring takes (a second and more). What the stop finds is left over."""
        recs = [sp.recorder for sp in self.spaces.values()
                if sp.recorder is not None and sp.recorder.installed]
        if not recs:
            return
        for rec in recs:
            try:
                rec.stop_recording()
            except OSError:
                pass
        end = time.monotonic() + limit_s
        while self._drain_recorders() and time.monotonic() < end:
            pass

    def detach_all(self, reason: str = "detach") -> None:
        """Remove every breakpoint, put every thread back on original code, let go."""
        if not self.threads and not self.spaces:
            self.state = "exited" if reason == "exit" else "detached"
            return
        try:
            self._settle_vforks()
        except (TracerError, OSError):
            pass                        # whatever happened there, the restore below is due
        self._quiesce_recorders()
        self._paused = True
        for attempt in range(_VFORK_RETRIES):
            try:
                threads = self._stop_all()
            except ProcessGone:
                threads = list(self.threads.values())
            if attempt + 1 == _VFORK_RETRIES or not any(t.vfork_child for t in threads):
                break
            # a vfork made while stopping: its parent cannot be stopped (nor cleaned, nor
            # its recorder taken out) until the child execs or exits; let them run to that
            try:
                self._resume_now()
                self._settle_vforks()
            except (TracerError, OSError):
                pass
            self._paused = True
        for space in list(self.spaces.values()):
            self._restore_space(space, threads)
        for th in threads:
            try:
                target.detach(th.tid, th.sig)
            except (ProcessGone, OSError):
                pass
        for space in list(self.spaces.values()):
            if space.traced:
                self._emit(DetachEvent(space.pid, space.pid, time.time(), space.base,
                                       space.abi.name, reason))
            space.mem.close()
        for child in list(self.release_forks):
            self._release_child(child, wait=True)
        self.threads.clear()
        self.spaces.clear()
        self._paused = False
        self.state = "detached"
        if self._guardian is not None:
            self._guardian.close()
            self._guardian = None
