"""The thread table: every traced thread and address space, the stops of threads not known yet,
the exited threads whose records may still come; resuming a thread, stopping every thread,
pausing, stepping a thread out of a range of code."""
from __future__ import annotations

import signal
import time
from collections.abc import Callable

from tracer import procfs, stops, target
from tracer.arch import native
from tracer.abi import Abi
from tracer.engine.options import TraceOptions
from tracer.engine.state import _Space, _Thread
from tracer.errors import ProcessGone
from tracer.stops import Kind, Stop
from tracer.target import Regs


class Threads:
    """Owns the tables of what is traced (`threads`, `spaces`, `early`, `dead`) and the engine's
    state (`state`, `paused`). What a stop that arrives while stopping everything means is
    asked of the parts that handle stops (`connect`)."""

    # the handlers of stops that arrive while every thread is being stopped, and of the stops
    # a pause held (connected by the session: they are built after the table)
    _event: Callable[[_Thread, Stop], None]
    _unknown: Callable[[int, int], None]
    _gone: Callable[[_Thread, Stop], None]
    _trap: Callable[[_Thread], None]
    _marker: Callable[[_Thread], None]
    _handler_entry: Callable[[_Thread, _Space, int], bool]
    _emulate_counter: Callable[..., bool]
    _follow_vdso: Callable[[_Space], bool]

    def __init__(self, options: TraceOptions, waiter: stops.Waiter) -> None:
        self.options = options
        self._waiter = waiter
        self.threads: dict[int, _Thread] = {}
        self.spaces: dict[int, _Space] = {}
        self.early: dict[int, int] = {}            # stops of tids we do not know yet
        self.dead: dict[int, _Thread] = {}         # --inject: exited threads, for late records
        self.state = "detached"                    # running | paused | detached | exited
        self._paused = False
        # a stopped thread may be resumed with a bare PTRACE_CONT: not paused, no --signals
        # (capture's hot path reads this one flag)
        self.plain = not options.signals

    def connect(self, event: Callable[[_Thread, Stop], None], unknown: Callable[[int, int], None],
                gone: Callable[[_Thread, Stop], None], trap: Callable[[_Thread], None],
                marker: Callable[[_Thread], None],
                handler_entry: Callable[[_Thread, _Space, int], bool],
                emulate_counter: Callable[..., bool], follow_vdso: Callable[[_Space], bool]) -> None:
        self._event = event
        self._unknown = unknown
        self._gone = gone
        self._trap = trap
        self._marker = marker
        self._handler_entry = handler_entry
        self._emulate_counter = emulate_counter   # a stub's faulting cycle-counter read
        self._follow_vdso = follow_vdso

    @property
    def paused(self) -> bool:
        """Every thread is held (the console's pause, or leaving): nothing is resumed."""
        return self._paused

    @paused.setter
    def paused(self, on: bool) -> None:
        self._paused = on
        self.plain = not on and not self.options.signals

    def set_signals(self, on: bool) -> None:
        """--signals switched: each thread follows from its next resume (PTRACE_SYSCALL)."""
        self.options.signals = on
        self.plain = not self._paused and not on

    def add_thread(self, tid: int, space: _Space) -> _Thread:
        th = _Thread(tid, space)
        self.threads[tid] = th
        space.threads.add(tid)
        return th

    def note_signal(self, th: _Thread) -> None:
        """A signal is delivered to the stopped thread now: where it interrupts it."""
        if not th.sig_in_vdso:
            arch = th.space.abi
            try:
                arch.regs_get(th.tid, th.regs)
            except ProcessGone:
                return
            pc = th.regs.buf[arch.PC]
            th.sig_in_vdso = th.space.base <= pc < th.space.base + th.space.size

    def resume(self, th: _Thread) -> None:
        if self._paused:
            return
        if th.sig:
            self.note_signal(th)
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

    def stop_all(self) -> list[_Thread]:
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
                self.paused = False
                self._event(th, stop)
                self.paused = True
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
            if stop.sig == signal.SIGSEGV and self._emulate_counter(th, resume=False):
                continue
            th.sig = stop.sig           # a real signal: deliver it when we let go
        return list(self.threads.values())

    def pause_now(self) -> None:
        self.paused = True
        self.stop_all()
        self.state = "paused"

    def resume_now(self) -> None:
        self.paused = False
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
                    self.resume(th)
        self.state = "running"

    def step_out(self, tid: int, inside: Callable[[int], bool], limit: int = 200_000,
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
            return known is not None and self._emulate_counter(known, resume=False)

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
