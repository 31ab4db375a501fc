"""The signal watch (--signals): signal-delivery stops, handler entries, sigreturns; and a
stub's faulting rdtsc answered by the tracer."""
from __future__ import annotations

import dataclasses
import signal
import time

from collections.abc import Callable

from tracer import arch as _arch, sigtrack, target
from tracer.engine.state import _caught, _Space, _Thread
from tracer.engine.symbols import Symbols
from tracer.errors import MemoryReadError, ProcessGone
from tracer.events import Event
from tracer.tsc import TscClock


class SignalWatch:
    """What the engine does at a signal-delivery stop, a handler's first instruction (a step
    into it) and a system-call stop (--signals' sigreturns), per space's SignalTracker."""

    def __init__(self, tsc: TscClock, symbols: Symbols, emit: Callable[[Event], None],
                 resume: Callable[[_Thread], None], note_signal: Callable[[_Thread], None],
                 paused: Callable[[], bool]) -> None:
        self.tsc = tsc
        self.symbols = symbols
        self._emit = emit
        self._resume = resume               # the engine's resume of a stopped thread
        self._note_signal = note_signal     # where a delivered signal interrupts the thread
        self._paused = paused               # every thread held (the console's pause)

    def signal(self, th: _Thread, sig: int) -> None:
        """A signal-delivery stop: deliver it (into the handler, step by step, with --signals),
        unless it is a stub's faulting rdtsc."""
        if sig == signal.SIGSEGV and self.emulate_rdtsc(th):
            return
        th.sig = sig
        self._note_signal(th)
        if th.space.signals is not None and not self._paused() and _caught(th.space.pid, th.tid,
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

    def emulate_rdtsc(self, th: _Thread, resume: bool = True) -> bool:
        """A stub's rdtsc faulted (the thread called prctl(PR_SET_TSC, PR_TSC_SIGSEGV) after
        the stubs were made): give it the tracer's own reading of the same counter and step
        it over the instruction; the program never sees the SIGSEGV."""
        space = th.space
        patcher = space.patcher
        arch = space.abi
        insn = arch.cycle_counter
        try:
            arch.regs_get(th.tid, th.regs)
            pc = th.regs.buf[arch.PC]
            if not (insn and patcher.pad_used and patcher.in_padding(pc)
                    and space.mem.read(pc, len(insn)) == insn):
                return False
        except MemoryReadError:
            return False
        arch.emulate_cycle_counter(th.regs, self.tsc.read())
        arch.regs_set(th.tid, th.regs)
        if resume:
            self._resume(th)
        return True

    def handler_entry(self, th: _Thread, space: _Space, signo: int) -> bool:
        tracker = space.signals
        if tracker is None:
            return False
        d = tracker.on_handler_entry(th.tid, signo, th.regs, space.mem.read)
        if d is None:
            return False
        self._resume(th)
        if space.traced:
            self._emit(sigtrack.signal_event(d, space.pid, time.time(),
                                             lambda a: self.symbols.code_name(space, a)))
        return True

    def syscall_stop(self, th: _Thread) -> None:
        space = th.space
        tracker = space.signals
        if tracker is None:
            self._resume(th)
            return
        info = target.get_syscall_info(th.tid)
        abi = _arch.for_audit(info.arch) or space.abi
        if info.op != 1 or not sigtrack.is_sigreturn(abi, info.nr):
            self._resume(th)
            return
        space.abi.regs_get(th.tid, th.regs)
        via_addr = info.instruction_pointer - len(abi.syscall_insn)
        r = tracker.on_sigreturn(th.tid, info.nr, th.regs, space.mem.read, "", abi=abi)
        self._resume(th)
        # naming may parse an object: only once the thread runs again
        via = self.symbols.code_name(space, via_addr, trampoline=True) or f"{via_addr:#x}"
        r = dataclasses.replace(r, via=via)
        if space.traced:
            self._emit(sigtrack.sigreturn_event(r, space.pid, time.time(),
                                                lambda a: self.symbols.code_name(space, a)))
