"""Making a stopped tracee thread run one system call, and stepping threads out of a range.

A remote system call: the thread's registers are saved, pc is set to a system call instruction
the vDSO already contains (the arch's `syscall_insn`: x86_64's `syscall`; an i386 tracee: the
`int 0x80` of __kernel_vsyscall, a 32-bit result), number and arguments go in the arch's
system call registers, `Arch.no_syscall` keeps the kernel from restarting a system call the
thread was interrupted in, one PTRACE_SINGLESTEP runs it, the arch's `syscall_ret` register is
the result, and the saved registers go back exactly (with them the pending restart, if any). A signal that arrives while we step is held back and sent
again with tgkill once the thread's registers are restored.

arm64: the kernel keeps the number of the system call a thread is in (what it would restart or
is tracing) in regs->syscallno, outside NT_PRSTATUS: it is read through NT_ARM_SYSTEM_CALL,
set to -1 (NO_SYSCALL: nothing to restart, arch/arm64/kernel/signal.c do_signal) while our
calls run, and written back with the registers. A thread stopped while blocked in a system
call already has pc rewound to its `svc` and x0 = orig_x0 (do_signal does that before the
stop), so restoring NT_PRSTATUS keeps its restart: it runs that `svc` again when resumed.
"""
from __future__ import annotations

import ctypes
import os
from collections.abc import Callable

from tracer import stops, target
from tracer.arch import Arch
from tracer.arch.aarch64 import NT_ARM_SYSTEM_CALL
from tracer.errors import ProcessGone, TracerError
from tracer.stops import FAULTS as _FAULTS, Kind

__all__ = ["Stepper", "RemoteError"]

_MAX_STEPS = 10000
_MAX_HELD = 1000         # stops (signals, events) taken while one step is due


class RemoteError(TracerError):
    """A system call or single step made in the tracee on our behalf failed (errno: the
    call's error number, 0 when it is not one)."""

    def __init__(self, errno: int, message: str) -> None:
        super().__init__(message)
        self.errno = errno


class Stepper:
    """Single-steps threads of one stopped process, holding back signals that arrive."""

    def __init__(self, pid: int, arch: Arch) -> None:
        self.pid = pid
        self.arch = arch                          # whose registers step_while reads
        self.held: list[tuple[int, int]] = []     # (tid, signo) to send again

    def step(self, tid: int) -> None:
        """One instruction; returns with the thread stopped again."""
        start = len(self.held)
        target.singlestep(tid, 0)
        for n in range(_MAX_HELD):
            stop = stops.wait_for(tid)
            if not stop.stopped:
                raise ProcessGone(f"thread {tid} exited while vdsotrace stepped it")
            if stop.kind is Kind.TRAP:
                return
            if stop.kind is Kind.SIGNAL:
                sig = stop.sig
                self.held.append((tid, sig))        # a signal-delivery stop: hold it back
                if sig in _FAULTS and [h[1] for h in self.held[start:]].count(sig) >= 3:
                    break       # the same fault again and again: the instruction itself faults
            if n + 1 < _MAX_HELD:
                # an event stop (or a held signal): step on, the instruction has not run yet
                target.singlestep(tid, 0)
        # given up, the thread stopped: a flood of signals from outside, or an instruction
        # that faults (its code is gone); those faults are ours, not the thread's: they are
        # not sent again
        mine = self.held[start:]
        del self.held[start:]
        self.held.extend(dict.fromkeys(h for h in mine if h[1] not in _FAULTS))
        raise RemoteError(0, f"thread {tid} could not execute one instruction (signals "
                             f"{sorted({s for _, s in mine})})")

    def step_while(self, tid: int, regs: target.Regs, inside: Callable[[int], bool],
                   limit: int = _MAX_STEPS,
                   redirect: Callable[[int], int | None] | None = None) -> None:
        """Step `tid` until its pc is no longer `inside` (at most `limit` steps). `redirect`:
        where a thread at a pc goes instead of being stepped there (None: stepped)."""
        pc = self.arch.pc
        for _ in range(limit):
            self.arch.regs_get(tid, regs)
            if not inside(regs[pc]):
                return
            if redirect is not None:
                to = redirect(regs[pc])
                if to is not None:
                    regs[pc] = to
                    self.arch.regs_set(tid, regs)
                    continue
            self.step(tid)
        self.arch.regs_get(tid, regs)
        if not inside(regs[pc]):
            return
        raise RemoteError(0, f"thread {tid} did not leave the injected code in {limit} steps")

    def resend_held(self) -> None:
        for tid, sig in self.held:
            try:
                target.tgkill(self.pid, tid, sig)
            except ProcessGone:
                pass
        self.held.clear()


class RemoteCaller:
    """Runs system calls in one stopped thread; `restore()` puts its registers back."""

    def __init__(self, stepper: Stepper, tid: int, site: int, arch: Arch) -> None:
        """`arch`: the ABI of the system call the thread makes at `site`."""
        self.stepper = stepper
        self.tid = tid
        self.site = site
        self.arch = arch
        self.word = arch.word
        self.arg_regs = arch.syscall_arg_regs
        self.saved = arch.new_regs()
        arch.regs_get(tid, self.saved)
        self.work = arch.new_regs()
        # arm64: regs->syscallno (an int), restored with the registers
        self.sysno: ctypes.Array[ctypes.c_int32] | None = None
        if arch.name == "aarch64":
            self.sysno = (ctypes.c_int32 * 1)()
            target.getregset(tid, NT_ARM_SYSTEM_CALL, self.sysno)

    def __call__(self, nr: int, *args: int) -> int:
        a = self.arch
        ctypes.memmove(self.work.buf, self.saved.buf, ctypes.sizeof(self.work.buf))
        w = self.work
        w[a.syscall_nr_in] = nr
        for name, value in zip(self.arg_regs, args):
            w[name] = value
        w[a.pc] = self.site
        a.no_syscall(self.tid, w)           # (x86: orig_rax in w; arm64: NT_ARM_SYSTEM_CALL)
        a.regs_set(self.tid, w)
        self.stepper.step(self.tid)
        a.regs_get(self.tid, w)
        if w[a.pc] != self.site + len(a.syscall_insn):
            raise RemoteError(0, f"remote system call {nr} in thread {self.tid} ended at "
                                 f"{w[a.pc]:#x}, not after the system call instruction")
        rv = w[a.syscall_ret]
        if self.word == 4:
            # a 32-bit result: -4095..-1 are errors, anything else (an address up to 4 GiB
            # included) is a value
            rv &= 0xFFFFFFFF
            return rv - (1 << 32) if rv >= (1 << 32) - 4095 else rv
        return rv - (1 << 64) if rv >> 63 else rv

    def check(self, nr: int, *args: int, what: str) -> int:
        rv = self(nr, *args)
        if -4095 <= rv < 0:
            raise RemoteError(-rv, f"{what} in the tracee failed: {os.strerror(-rv)}")
        return rv

    def restore(self) -> None:
        self.arch.regs_set(self.tid, self.saved)
        if self.sysno is not None:
            target.setregset(self.tid, NT_ARM_SYSTEM_CALL, self.sysno)
