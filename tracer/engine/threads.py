"""The thread table's control: stop every thread, pause, resume, step a thread out of a
range of code."""
from __future__ import annotations

import signal
import time
from collections.abc import Callable

from tracer import procfs, stops, target
from tracer.arch import native
from tracer.abi import Abi
from tracer.engine.state import _Thread
from tracer.errors import ProcessGone
from tracer.stops import Kind
from tracer.target import Regs
from tracer.engine.core import EngineCore


class Threads(EngineCore):
    def _stop_all(self) -> list[_Thread]:
        """Bring every thread into a ptrace stop (PTRACE_INTERRUPT), handling what arrives."""
        for th in list(self.threads.values()):
            if not th.stopped:
                try:
                    target.interrupt(th.tid)
                except ProcessGone:
                    pass
        waiter = self._waiter
        while True:
            # a thread in vfork stops only once its child execs or exits: not waited for
            waiting = [t for t in self.threads.values() if not t.stopped and not t.vfork_child]
            if not waiting:
                break
            tid = waiter.wait()
            if tid <= 0:
                if tid == waiter.NOTHING_LEFT:
                    break
                continue
            status = waiter.status
            found = self.threads.get(tid)
            if found is None:
                self._unknown(tid, status)
                continue
            th = found
            stop = stops.classify(status)
            kind = stop.kind
            if not stop.stopped:
                self._gone(th, stop)
                continue
            th.stopped = True
            if kind is Kind.GROUP_STOP or kind is Kind.INTERRUPT:
                th.listening = kind is Kind.GROUP_STOP
                continue
            if kind is Kind.SECCOMP:
                th.marker_stop = True   # handled on resume; harmless if we detach now
                continue
            if stop.is_event:
                # clone/fork/exec while stopping: handle it fully, then stop again
                self._paused = False
                self._event(th, stop)
                self._paused = True
                if not th.stopped:
                    try:
                        target.interrupt(th.tid)
                    except ProcessGone:
                        pass
                continue
            if kind is Kind.TRAP:
                arch = th.space.abi
                arch.regs_get(tid, th.regs)
                if th.expect_handler:
                    signo, th.expect_handler = th.expect_handler, 0
                    if self._handler_entry(th, th.space, signo):
                        continue
                pc = th.regs.buf[arch.PC] - arch.trap_pc_adjust
                sp = th.space
                if (sp.instrument.stop_at(pc) is None and sp.patcher.planted
                        and not sp.base <= pc < sp.base + sp.size):
                    self._follow_vdso(sp)          # moved by mremap?
                if th.space.instrument.stop_at(pc) is not None:
                    th.undo_trap = pc   # a hit not yet handled: on resume, or undone on detach
                    continue
            if kind is Kind.SYSCALL:
                continue
            if stop.sig == signal.SIGSEGV and self._emulate_rdtsc(th, resume=False):
                continue
            th.sig = stop.sig           # a real signal: deliver it when we let go
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
        be done (a blocking system call, a signal, the thread died): it is left stopped."""
        known = self.threads.get(tid)
        arch = known.space.abi if known is not None else native()
        regs = arch.new_regs()
        arch.regs_get(tid, regs)
        if not inside(regs.buf[arch.PC]):
            return True
        deadline = time.monotonic() + timeout
        held: list[int] = []
        try:
            return self._step_loop(tid, inside, limit, deadline, regs, held, arch)
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
                   deadline: float, regs: Regs, held: list[int], arch: Abi) -> bool:
        def on_fault(sig: int) -> bool:
            known = self.threads.get(tid)
            return known is not None and self._emulate_rdtsc(known, resume=False)

        def on_signal(sig: int, held: list[int]) -> bool:
            # hold it for the thread's next resume and step on
            th = self.threads.get(tid)
            again = (th is not None and sig == th.sig) or sig in held
            if again and sig in stops.FAULTS:
                return False            # the stepped instruction itself faults
            if again:
                return True             # a standard signal already pending: one is kept
            if th is not None and not th.sig:
                th.sig = sig
            else:
                held.append(sig)
            return True

        return stops.step_out(tid, inside, limit, deadline, regs, arch, on_fault, on_signal,
                              held)
