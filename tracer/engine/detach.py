"""Leaving: every thread stopped, every space's instrument taken out (a vDSO moved by mremap
followed; the stubs move threads off our code: instrument/stubs.py), every thread let go
whatever a step raises, unfollowed fork children cleaned."""
from __future__ import annotations

import functools
import time
from collections.abc import Callable

from tracer import stops, target
from tracer.engine.instruments import Instruments
from tracer.engine.lifecycle import Lifecycle
from tracer.engine.processes import Processes
from tracer.engine.recorders import Recorders
from tracer.engine.state import _Space, _Thread
from tracer.engine.threads import Threads
from tracer.errors import ProcessGone, TracerError
from tracer.events import DetachEvent, Event, NoticeEvent

_VFORK_RETRIES = 5     # leaving: stops of the tracee retried for vforks made meanwhile


class Detach:
    """Every way out: `detach_all`. Holds no state of its own."""

    _dispatch: Callable[[int, int], None]    # the loop's (connected by the session)

    def __init__(self, table: Threads, procs: Processes, life: Lifecycle,
                 instruments: Instruments, recorders: Recorders, waiter: stops.Waiter,
                 sink: Callable[[Event], None]) -> None:
        self.table = table
        self.threads = table.threads
        self.spaces = table.spaces
        self.procs = procs
        self.life = life
        self.instruments = instruments
        self._waiter = waiter
        self._emit = sink
        self._follow_vdso = instruments.follow_vdso
        self._uninstall = instruments.uninstall
        self._finish_recorder = recorders._finish_recorder
        self._drain_recorders = recorders._drain_recorders
        self._quiesce_recorders = recorders._quiesce_recorders

    def connect(self, dispatch: Callable[[int, int], None]) -> None:
        self._dispatch = dispatch

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
                return
            except ProcessGone:
                # gone while we left: what its stubs committed is still in the ring (read
                # through the tracer's own descriptor), and its losses are still to be told
                if space.instrument.installed:
                    self._finish_recorder(space)
                return
            except (TracerError, OSError) as e:     # a write, a remote system call, a step
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
            tid = self._waiter.wait(nohang=True)
            if tid > 0:
                self._dispatch(tid, self._waiter.status)
            elif tid == self._waiter.NOTHING_LEFT:
                return
            else:
                self._drain_recorders()
                time.sleep(0.001)
        for t in self.threads.values():
            if t.vfork_child:
                self._emit(NoticeEvent(t.space.pid, t.tid, time.time(),
                                       f"thread {t.tid} still waits for its vfork child "
                                       f"{t.vfork_child}: it is let go without being stopped"))

    def detach_all(self, reason: str = "detach") -> None:
        """Remove every breakpoint, put every thread back on original code, let go. Every
        thread is let go whatever a step before raises: an error of ours (a failed write or
        remote system call) becomes a notice; any other (a bug) is raised once all are let go."""
        table = self.table
        if not self.threads and not self.spaces:
            table.state = "exited" if reason == "exit" else "detached"
            return
        bug: list[BaseException] = []

        def attempt(what: str, pid: int, fn: Callable[[], object]) -> bool:
            try:
                fn()
                return True
            except ProcessGone:
                return True
            except (TracerError, OSError) as e:
                self._emit(NoticeEvent(pid, pid, time.time(),
                                       f"while detaching, {what} failed ({e}); "
                                       "the threads are let go all the same"))
            except Exception as e:      # raised below, once every thread is let go
                bug.append(e)
            return False

        root = self.procs.root_pid or 0
        attempt("waiting for vfork children", root, self._settle_vforks)
        attempt("stopping the recorders", root, self._quiesce_recorders)
        table.paused = True
        got: list[list[_Thread]] = []
        for tries in range(_VFORK_RETRIES, 0, -1):
            got.clear()
            attempt("stopping every thread", root, lambda: got.append(table.stop_all()))
            if tries == 1 or not got or not any(t.vfork_child for t in got[0]):
                break
            # a vfork made while stopping: its parent cannot be stopped (nor cleaned, nor its
            # recorder taken out) until the child execs or exits; let them run to that
            attempt("waiting for vfork children", root, table.resume_now)
            attempt("waiting for vfork children", root, self._settle_vforks)
            table.paused = True
        threads = got[0] if got else list(self.threads.values())
        for space in list(self.spaces.values()):
            attempt(f"restoring the vDSO of {space.pid}", space.pid,
                    functools.partial(self._restore_space, space, threads))
        for th in threads:
            try:
                target.detach(th.tid, th.sig)
            except (TracerError, OSError):
                pass
        for space in list(self.spaces.values()):
            if space.traced:
                self._emit(DetachEvent(space.pid, space.pid, time.time(), space.base,
                                       space.abi.name, reason))
            space.mem.close()
        release_forks = self.life.release_forks
        for child in list(release_forks):
            if not attempt(f"cleaning fork child {child}", child,
                           functools.partial(self.life.release_child, child, wait=True)):
                release_forks.pop(child, None)
                try:
                    target.detach(child)
                except (TracerError, OSError):
                    pass
        self.threads.clear()
        self.spaces.clear()
        table.paused = False
        table.state = "detached"
        self.instruments.close()
        if bug:
            raise bug[0]
