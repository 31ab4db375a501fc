"""A process's life while traced: clone, fork, vfork, exec and exit events; unfollowed fork
children cleaned and let go."""
from __future__ import annotations

import os
import time
from collections.abc import Callable

from tracer import procfs, stops, symload, target
from tracer.breakpoints import Patcher
from tracer.engine.instruments import Instruments
from tracer.engine.options import TraceOptions
from tracer.engine.processes import Processes
from tracer.engine.recorders import Recorders
from tracer.engine.state import _Space, _Thread
from tracer.engine.threads import Threads
from tracer.errors import ProcessGone, TracerError
from tracer.events import Event, ExecEvent, ExitEvent, NoticeEvent
from tracer.instrument import Instrument
from tracer.stops import Kind, Stop
from tracer.tables.signals import signame


class Lifecycle:
    """Owns the unfollowed fork children still to clean; adds and removes threads and spaces
    of the thread table as processes clone, fork, exec and exit."""

    _dispatch: Callable[[int, int], None]    # the loop's (connected by the session)

    def __init__(self, options: TraceOptions, table: Threads, procs: Processes,
                 instruments: Instruments, recorders: Recorders,
                 sink: Callable[[Event], None]) -> None:
        self.options = options
        self.threads = table.threads
        self.spaces = table.spaces
        self.early = table.early
        self._dead = table.dead
        self._emit = sink
        self._add_thread = table.add_thread
        self._resume = table.resume
        self._new_space = procs.new_space
        self._hooks = instruments.hooks
        self._instrument_class = instruments.instrument_class
        self._follow_vdso = instruments.follow_vdso
        self._unguard = instruments.forget
        self._finish_recorder = recorders._finish_recorder
        # unfollowed fork child -> what its copy of the parent's space holds (a patcher copy
        # taken at the fork, with its own planted state; the parent's instrument): clean, let go
        self.release_forks: dict[int, tuple[Patcher, Instrument, _Space]] = {}

    def connect(self, dispatch: Callable[[int, int], None]) -> None:
        self._dispatch = dispatch

    def event(self, th: _Thread, stop: Stop) -> None:
        tid = th.tid
        kind = stop.kind
        if kind is Kind.GROUP_STOP:
            th.listening = True
            try:
                target.listen(tid)
            except ProcessGone:
                pass
            th.stopped = False
            return
        if kind is Kind.INTERRUPT:
            th.listening = False
            self._resume(th)
            return
        if kind is Kind.CLONE:
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
        if kind is Kind.FORK or kind is Kind.VFORK:
            child = target.geteventmsg(tid)
            self._new_child(th, child, vfork=kind is Kind.VFORK)
            self._resume(th)
            return
        if kind is Kind.EXEC:
            self._exec(th)
            return
        self._resume(th)

    def _new_child(self, parent: _Thread, child: int, vfork: bool) -> None:
        """A forked child inherits every breakpoint (and slot). Trace it with -f; otherwise clean
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
                           ps.instrument.fork_child(child, mem, ps.abi, patcher, self._hooks),
                           ps.decoders, ps.is_gateway, traced=follow)
            self.spaces[child] = space
            th = self._add_thread(child, space)
            th.stopped = False
        else:
            # what it inherited: the patch as planted now, and what the instrument put in
            self.release_forks[child] = (ps.patcher.copy(), ps.instrument, ps)
        early = self.early.pop(child, None)
        if early is not None:
            self._dispatch(child, early)

    def unknown(self, tid: int, status: int) -> None:
        stopped = stops.classify(status).stopped
        if tid in self.release_forks:
            if stopped:
                self.release_child(tid)
            else:
                self.release_forks.pop(tid, None)
            return
        if not stopped:
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

    def release_child(self, child: int, wait: bool = False) -> None:
        """Restore an unfollowed fork child's private copy of the vDSO (under --inject: its
        entries, and unmap the ring and code page it inherited) and let it go. `wait`: its
        first stop has not been seen yet (it cannot have run: an auto-attached child stops
        before its first instruction). Cleaning never touches the parent's state: the patcher
        is the copy taken at the fork."""
        entry = self.release_forks.pop(child, None)
        if entry is None:
            return
        patcher, inherited, ps = entry
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
                    stubs = inherited.fork_child(child, mem, ps.abi, patcher, self._hooks)
                    copy = _Space(child, ps.abi, mem, ps.image, ps.base, ps.size, patcher,
                                  stubs, ps.decoders, ps.is_gateway, traced=False)
                    stubs.take_out([_Thread(child, copy)])
                kept = inherited.release_fork(child, mem)
                if kept:
                    self._emit(NoticeEvent(child, child, time.time(), kept))
                problem = None
                break
            except ProcessGone:
                return
            except (TracerError, OSError) as e:     # a write, a remote system call
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
                return stops.classify(status).stopped
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
                if not self._instrument_class().polls or isinstance(e, ProcessGone):
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
                stop = stops.step(th.tid)
                if not stop.stopped:
                    raise ProcessGone(f"process {th.tid} exited right after its exec")
                if stop.kind is Kind.TRAP:
                    return
                if stop.kind is Kind.SIGNAL:
                    held.append(stop.sig)   # a signal-delivery stop: the step is still due
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

    def gone(self, th: _Thread, stop: Stop) -> None:
        tid = th.tid
        space = th.space
        if tid == space.pid:
            self._vfork_done(tid)
        self.threads.pop(tid, None)
        space.threads.discard(tid)
        th.pending.clear()
        if space.instrument.polls:
            # its last records are still in the ring (drained later, not here: a thread's exit
            # must not wait for the other threads' records)
            # (the oldest forgotten first: a record of a thread no longer known is skipped,
            # and the last-dead threads are the ones whose records may still be in a ring)
            if len(self._dead) >= 4096:
                self._dead.pop(next(iter(self._dead)))
            self._dead[tid] = th
        if space.signals is not None:
            space.signals.forget(tid)
        if tid == space.pid or not space.threads:
            if not space.threads:
                # the calls still in the ring happened before the exit: shown before it
                self._finish_recorder(space)
            if tid == space.pid:
                code = stop.sig if stop.kind is Kind.EXITED else None
                sig = signame(stop.sig) if stop.kind is Kind.KILLED else None
                if space.traced:
                    self._emit(ExitEvent(space.pid, tid, time.time(), code, sig))
            if not space.threads:
                self._unguard(space.pid)
                space.mem.close()
                self.spaces.pop(space.pid, None)
