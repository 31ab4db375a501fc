"""The ptrace stop protocol: a wait status classified once into what happened (as strace's
next_event() does), waiting for one thread or any, and single-stepping a thread until its pc
leaves a range. The engine switches on `Stop.kind`; nothing else decodes a wait status.

A wait status (include/uapi/linux/wait.h, kernel/ptrace.c):
- exited:  (code << 8), low 7 bits 0;  killed: the signal in the low 7 bits (0x80: core);
- stopped: low byte 0x7F, the stop signal in bits 8-15, a PTRACE_EVENT_* in bits 16-23:
  SIGTRAP | 0x80 is a system-call stop (PTRACE_O_TRACESYSGOOD); PTRACE_EVENT_STOP is a
  group-stop (its signal is a stop signal) or a PTRACE_INTERRUPT/LISTEN stop (SIGTRAP);
  SIGTRAP with no event is a breakpoint or single-step trap; any other signal with no event
  is a signal-delivery stop.
"""
from __future__ import annotations

import ctypes
import enum
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

from tracer import procfs, target
from tracer.errors import ProcessGone

__all__ = ["Kind", "Stop", "classify", "TRAP_STATUS", "SECCOMP_STATUS", "Waiter", "wait_for",
           "step", "step_out", "FAULTS"]

_SIGTRAP = signal.SIGTRAP
_SYSCALL_TRAP = signal.SIGTRAP | 0x80
_GROUP_STOP_SIGS = frozenset({signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU})
FAULTS = frozenset({signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE})
_ECHILD = 10
# a single-step that has not come back by step_out's deadline is looked at every
# _STEP_POLL_S: given up once the thread has not been runnable for _STEP_WAIT_S (it sleeps in
# a blocking system call), waited for while it is runnable (it waits for a CPU), _STEP_BOUND_S
# at most
_STEP_POLL_S = 0.05
_STEP_WAIT_S = 0.5
_STEP_BOUND_S = 10.0
_EINTR = 4

# The two stops of the hot path, compared whole: a breakpoint or single-step trap of a known
# thread (SIGTRAP, no event), and a seccomp stop (SIGTRAP | PTRACE_EVENT_SECCOMP << 8).
TRAP_STATUS = 0x57F
SECCOMP_STATUS = 0x7057F


class Kind(enum.IntEnum):
    EXITED = 1          # sig: the exit code
    KILLED = 2          # sig: the terminating signal
    SIGNAL = 3          # a signal-delivery stop; sig: the signal
    GROUP_STOP = 4      # PTRACE_EVENT_STOP with a stop signal (resume with PTRACE_LISTEN)
    INTERRUPT = 5       # PTRACE_EVENT_STOP of PTRACE_INTERRUPT / a new thread's first stop
    CLONE = 6
    FORK = 7
    VFORK = 8
    VFORK_DONE = 9
    EXEC = 10
    EXIT = 11           # PTRACE_EVENT_EXIT
    SECCOMP = 12
    SYSCALL = 13        # a system-call entry or exit stop
    TRAP = 14           # SIGTRAP, no event: a breakpoint, a single step


_EVENTS = {target.EVENT_CLONE: Kind.CLONE, target.EVENT_FORK: Kind.FORK,
           target.EVENT_VFORK: Kind.VFORK, 5: Kind.VFORK_DONE,   # PTRACE_EVENT_VFORK_DONE
           target.EVENT_EXEC: Kind.EXEC, target.EVENT_EXIT: Kind.EXIT,
           target.EVENT_SECCOMP: Kind.SECCOMP}


@dataclass(frozen=True, slots=True)
class Stop:
    kind: Kind
    sig: int            # the stop signal, the exit code (EXITED) or the killing signal

    @property
    def stopped(self) -> bool:
        return self.kind > Kind.KILLED

    @property
    def is_event(self) -> bool:
        """A ptrace event stop (PTRACE_EVENT_*), the group-stop and interrupt included."""
        return Kind.GROUP_STOP <= self.kind <= Kind.SECCOMP


_CACHE: dict[int, Stop] = {}


def classify(status: int) -> Stop:
    """What a wait status means (cached: a tracee makes few distinct statuses)."""
    hit = _CACHE.get(status)
    if hit is not None:
        return hit
    if status & 0x7F == 0:
        stop = Stop(Kind.EXITED, (status >> 8) & 0xFF)
    elif status & 0xFF != 0x7F:
        stop = Stop(Kind.KILLED, status & 0x7F)
    else:
        sig = (status >> 8) & 0xFF
        ev = (status >> 16) & 0xFF
        if ev == target.PTRACE_EVENT_STOP:
            stop = Stop(Kind.GROUP_STOP if sig in _GROUP_STOP_SIGS else Kind.INTERRUPT, sig)
        elif ev:
            stop = Stop(_EVENTS.get(ev, Kind.INTERRUPT), sig)
        elif sig == _SYSCALL_TRAP:
            stop = Stop(Kind.SYSCALL, sig)
        elif sig == _SIGTRAP:
            stop = Stop(Kind.TRAP, sig)
        else:
            stop = Stop(Kind.SIGNAL, sig)
    if len(_CACHE) < 4096:
        _CACHE[status] = stop
    return stop


_libc = ctypes.CDLL(None, use_errno=True)
_waitpid = _libc["waitpid"]
_waitpid.restype = ctypes.c_int


class Waiter:
    """waitpid(2) without Python's retry on EINTR (a tick or a wake-up signal must end the
    wait) and without allocating per call: `wait` returns the thread id (> 0), 0 (WNOHANG:
    nothing yet), NOTHING_LEFT (ECHILD) or INTERRUPTED (EINTR); the status is in `status`.
    The engine's hot loop calls `waitpid(-1, ref, WALL)` itself and reads `cell.value`."""
    NOTHING_LEFT = -_ECHILD
    INTERRUPTED = -_EINTR
    waitpid = _waitpid

    def __init__(self) -> None:
        self.cell = ctypes.c_int()
        self.ref = ctypes.byref(self.cell)

    @property
    def status(self) -> int:
        return self.cell.value

    def wait(self, pid: int = -1, nohang: bool = False) -> int:
        tid: int = _waitpid(pid, self.ref, target.WALL | os.WNOHANG if nohang else target.WALL)
        if tid >= 0:
            return tid
        return -_ECHILD if ctypes.get_errno() == _ECHILD else -_EINTR


def wait_for(tid: int) -> Stop:
    """Block until the thread's next stop or exit."""
    return classify(target.wait(tid)[1])


def step(tid: int, sig: int = 0) -> Stop:
    """One PTRACE_SINGLESTEP and the stop (or exit) that follows."""
    target.singlestep(tid, sig)
    return wait_for(tid)


def step_out(tid: int, inside: Callable[[int], bool], limit: int, deadline: float,
             regs: target.Regs, pc_of: Callable[[target.Regs], int],
             on_fault: Callable[[int], bool], on_signal: Callable[[int, list[int]], bool],
             held: list[int]) -> bool:
    """Single-step a stopped thread until `inside(pc)` is false: True once it is out; False
    when it could not be done (a blocking system call past `deadline`, an instruction that
    faults, `limit` steps): it is left stopped. A signal-delivery stop does not take the
    step: `on_signal(sig, held)` decides (False: give up), `on_fault(sig)` may answer a
    fault (a stub's rdtsc) and return True to step on. Raises ProcessGone if it exits.
    Past `deadline` it gives up only on a thread that is not runnable (it sleeps in the
    kernel); one that waits for a CPU (a loaded machine, the tracer itself descheduled) is
    waited for: a thread left in our code keeps the stubs in the tracee."""
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
                if procfs.runnable(tid):
                    asleep_since = 0.0          # runnable, not yet run: it is not blocked
                elif not asleep_since:
                    asleep_since = now
                if now < bound and (not asleep_since or now - asleep_since < _STEP_WAIT_S):
                    deadline = now + _STEP_POLL_S
                    continue
                target.interrupt(tid)
                target.wait(tid)
                return False
            time.sleep(0.0002)
        stop = classify(status)
        kind = stop.kind
        if not stop.stopped:
            raise ProcessGone(f"thread {tid} exited")
        if kind is Kind.INTERRUPT or kind is Kind.GROUP_STOP or kind is Kind.SECCOMP:
            continue                # an interrupt we sent earlier, or a marker: step again
        if kind is Kind.SIGNAL:
            if stop.sig == signal.SIGSEGV and on_fault(stop.sig):
                target.getregs(tid, regs)   # answered: step on
                if not inside(pc_of(regs)):
                    return True
                continue
            # a signal arrived (a SIGCHLD from a child that exited...): the step has not been
            # taken yet
            if not on_signal(stop.sig, held):
                return False
            continue
        if kind is not Kind.TRAP:
            return False
        target.getregs(tid, regs)
        if not inside(pc_of(regs)):
            return True
    return False
