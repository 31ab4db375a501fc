"""The loop: waitpid and dispatch on the classified stop (stops.py), the cross-thread queue
and its futures, the tick."""
from __future__ import annotations

import ctypes
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from queue import Empty, SimpleQueue
from typing import Any, TypeVar

from tracer import sched, stops, target
from tracer.engine.calls import CallAssembly
from tracer.engine.capture import Capture
from tracer.engine.detach import Detach
from tracer.engine.lifecycle import Lifecycle
from tracer.engine.options import TraceOptions
from tracer.engine.recorders import Recorders
from tracer.engine.signals import SignalWatch
from tracer.engine.state import (_DRAIN_BATCH, _DRAIN_BATCH_STATS, _DRAIN_FEW_STATS, _nap,
                                 _NAP_EMPTY, _SLICE_S, _WAKE_SIGNAL)
from tracer.engine.threads import Threads
from tracer.errors import ProcessGone
from tracer.stops import Kind
from tracer.tsc import TscClock

T = TypeVar("T")


class Loop:
    """Owns the wait loop's state: why it ends (`stop_reason`), the queue of work from other
    threads and its futures, the tick. The stops it waits for go to the parts that handle
    them: capture (traps, markers), the signal watch, the process lifecycle."""

    def __init__(self, options: TraceOptions, table: Threads, capture: Capture,
                 life: Lifecycle, watch: SignalWatch, recorders: Recorders, detach: Detach,
                 waiter: stops.Waiter, tsc: TscClock, assembly: CallAssembly) -> None:
        self.options = options
        self.table = table
        self.threads = table.threads
        self.spaces = table.spaces
        self.early = table.early
        self.tsc = tsc
        self.assembly = assembly
        self._waiter = waiter
        self._trap = capture.trap
        self._marker = capture.marker
        self._event = life.event
        self._unknown = life.unknown
        self._gone = life.gone
        self._signal = watch.signal
        self._syscall_stop = watch.syscall_stop
        self._drain_recorders = recorders._drain_recorders
        self.recorders = recorders
        self.detach_all = detach.detach_all
        self.stop_reason: str | None = None
        self.on_tick: Callable[[], None] | None = None
        self._queue: SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = SimpleQueue()
        self._engine_ident: int | None = None
        # (held while a submit decides to queue and while the loop ends: nothing is queued
        # after the loop's last look at the queue)
        self._queue_lock = threading.Lock()
        self._tick_due = False

    def bind_thread(self) -> None:
        """The calling thread is the engine's from now on (it attached): work submitted from
        other threads is queued to it."""
        self._engine_ident = threading.get_ident()

    def tick(self) -> None:
        """Async-signal and thread safe: ask the loop to flush, run queued calls and check
        --duration at its next turn, even while stops keep arriving."""
        self._tick_due = True

    def request_stop(self, reason: str) -> None:
        """Async-signal and thread safe: end `run` at the next wake-up."""
        if self.stop_reason is None:
            self.stop_reason = reason
        self.wake()

    def wake(self) -> None:
        """Thread safe: end the engine thread's wait (a signal to it) to look at its queue."""
        ident = self._engine_ident
        if ident is not None and ident != threading.get_ident():
            try:
                signal.pthread_kill(ident, _WAKE_SIGNAL)
            except (ProcessLookupError, OSError):
                pass

    def submit(self, fn: Callable[[], T]) -> Future[T]:
        """Run `fn` in the engine's thread (at once when called from it, or when no engine
        thread runs); its result or exception in the Future."""
        fut: Future[T] = Future()
        with self._queue_lock:
            ident = self._engine_ident
            queued = ident is not None and ident != threading.get_ident()
            if queued:
                self._queue.put((fn, fut))
        if not queued:
            try:
                fut.set_result(fn())
            except BaseException as e:  # delivered to the caller through the future
                fut.set_exception(e)
            return fut
        self._tick_due = True
        self.wake()
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
                fut.set_result(fn())
            except BaseException as e:
                fut.set_exception(e)

    def run(self) -> str:
        """Trace until the tracees exit or `request_stop`; then leave them as they were."""
        self._engine_ident = threading.get_ident()
        table = self.table
        table.state = "paused" if table.paused else "running"
        deadline = (time.monotonic() + self.options.duration
                    if self.options.duration is not None else None)
        waiter = self._waiter
        waitpid, status, ref = waiter.waitpid, waiter.cell, waiter.ref
        trap_status, seccomp_status = stops.TRAP_STATUS, stops.SECCOMP_STATUS
        dispatch = self.dispatch
        trap = self._trap
        marker = self._marker
        threads = self.threads
        reason = "exit"
        # an instrument that polls (the in-tracee recorder): drain between looks at waitpid;
        # else every call is a stop: block in waitpid
        polling = self._polling()
        sigmask = None
        if polling:
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
                    polling = self._polling()   # (the console may have switched engines)
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
                if polling:
                    tid = waiter.wait(nohang=True)
                    if tid > 0:
                        dispatch(tid, status.value)
                        continue
                    if tid == waiter.NOTHING_LEFT:
                        reason = "exit"
                        break
                    # a bounded batch, then waitpid again: stops (a thread being created, a
                    # signal) are served within one batch however fast the ring fills
                    slots = self.recorders.slot_sink
                    if self.assembly.summary_only or slots is not None:   # (batches of slots)
                        batch = (slots.slots_per_drain if slots is not None
                                 and not self.assembly.summary_only else _DRAIN_BATCH_STATS)
                        if self._drain_recorders(batch) < _DRAIN_FEW_STATS:
                            _nap(_NAP_EMPTY)  # (nearly) empty: let the tracee fill it
                    elif not self._drain_recorders(_DRAIN_BATCH):
                        _nap(_NAP_EMPTY)      # the ring is empty: let the tracee fill it
                    continue
                tid = waitpid(-1, ref, target.WALL)
                if tid > 0:
                    st = status.value
                    th = threads.get(tid) if st == trap_status or st == seccomp_status else None
                    if th is not None:          # the hot case: a stop of a known thread
                        th.stopped = True
                        try:
                            if st == seccomp_status:
                                marker(th)
                            else:
                                trap(th)
                        except ProcessGone:
                            th.stopped = False
                            th.pending.clear()
                        continue
                    dispatch(tid, st)
                    continue
                if ctypes.get_errno() == 10:  # ECHILD: nothing left to wait for (stops.Waiter)
                    reason = "exit"
                    break
                self._tick_due = True         # EINTR: a tick or a wake-up
        except BaseException:
            reason = "error"
            raise
        finally:
            if sigmask is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, sigmask)
            with self._queue_lock:
                self._engine_ident = None
            try:
                # every way out, an internal error included, leaves the tracee as it was
                self.detach_all(reason)
                if reason == "exit":
                    table.state = "exited"
            finally:
                # what was asked while the loop ended (a console's `bt` as the process
                # exits) is answered now, not left waiting for a loop that is gone
                self._run_queue()
        return reason

    def _polling(self) -> bool:
        return any(sp.instrument.polls for sp in self.spaces.values())

    def dispatch(self, tid: int, status: int) -> None:
        th = self.threads.get(tid)
        if th is None:
            self._unknown(tid, status)
            return
        stop = stops.classify(status)
        kind = stop.kind
        try:
            if not stop.stopped:
                self._gone(th, stop)
                return
            th.stopped = True
            if kind is Kind.TRAP:                          # a trap instruction (or a step)
                self._trap(th)
            elif kind is Kind.SECCOMP:
                self._marker(th)
            elif kind is Kind.SYSCALL:
                self._syscall_stop(th)
            elif kind is Kind.SIGNAL:
                self._signal(th, stop.sig)
            else:
                self._event(th, stop)
        except ProcessGone:
            # Killed under us (SIGKILL, or exit of the whole group): its exit status follows.
            th.stopped = False
            th.pending.clear()

    def _heartbeat(self) -> None:
        if self._engine_ident == threading.get_ident():
            for space in list(self.spaces.values()):
                space.instrument.heartbeat()
