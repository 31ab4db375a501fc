"""The engine's records (an address space, a thread, a call in flight) and the facts its
parts share."""
from __future__ import annotations

import signal
from dataclasses import dataclass, field
from typing import Any

from tracer import sigtrack, target
from tracer.abi import Abi
from tracer.breakpoints import Patcher
from tracer.decoders import Decoder
from tracer.modmap import ModuleMap
from tracer.target import Regs
from tracer.instrument import Instrument
from tracer.vdso import VdsoImage


_ENOSYS = 38
_SIGTRAP = signal.SIGTRAP
_WAKE_SIGNAL = signal.SIGALRM
_TICK = 0.1
# --inject: records drained between two looks at waitpid (about 0.5 ms of work each: ~10 us
# per event built; with -c ~25 us per batch plus ~20 ns per record counted, inject/batch.py)
_DRAIN_BATCH = 64
_DRAIN_BATCH_STATS = 8192
# -c: a drain that found fewer records than this naps as if the ring were empty. Each drain
# costs the same ~25 us (numpy's calls, a waitpid, the preads) however few records it finds,
# and a tracer that keeps up would pay that for a few hundred; a nap's worth of calls (0.5 ms
# at 5 M calls/s: 2500) is far from filling the ring (65536).
_DRAIN_FEW_STATS = 1024
_NAP_EMPTY = 0.0005     # --inject: the longest sleep when the ring is empty
_SLICE_S = 0.0002       # --inject: the engine thread's time slice (sched.py)


def _nap(seconds: float) -> None:
    """Sleep until a tracee stops (SIGCHLD, blocked in the engine thread) or `seconds`."""
    signal.sigtimedwait((signal.SIGCHLD,), seconds)


_cont = target.cont
_WINDOW = 256           # bytes read from sp at a stub's stop (its block + the caller's locals)
_OUTSIDE = (0, 0)       # site rule: the caller is not in the C library, it is the site
_MISSING = (-1, -1)     # not in the site rule cache yet
_SITE_FRAMES = 4        # C library frames crossed to find the site (musl: time -> clock_gettime)
# Clocks a time namespace offsets (kernel/time/namespace.c: CLOCK_MONOTONIC and
# CLOCK_BOOTTIME, and the clocks derived from them).
_NS_READS = frozenset({"clock_gettime", "clock_gettime64"})   # a resolution is not offset
_NS_CLOCKS = frozenset({"CLOCK_MONOTONIC", "CLOCK_MONOTONIC_RAW", "CLOCK_MONOTONIC_COARSE",
                        "CLOCK_BOOTTIME", "CLOCK_BOOTTIME_ALARM"})


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
    instrument: Instrument          # our code in it (stop-based stubs, or the recorder)
    decoders: list[Decoder] = field(default_factory=list)     # by function index
    is_gateway: list[bool] = field(default_factory=list)
    traced: bool = True            # emit events (False: an unfollowed vfork child)
    threads: set[int] = field(default_factory=set)
    timens: dict[str, tuple[int, int]] | None = None
    signals: sigtrack.SignalTracker | None = None
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
