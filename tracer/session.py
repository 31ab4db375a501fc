"""The engine: attach -> auxv -> vDSO -> instrument -> decode -> events.

One thread (the one that attached: ptrace requires it) runs `Session.run`. A traced call costs
one stop (breakpoints.py: the entry jumps to a stub that stops once, on return): one
PTRACE_GETREGS, one read of the stub's block of stack, PTRACE_CONT; decoding and output happen
after the tracee runs again. With --inject there is no stop per call at all: the loop drains
the recorder's ring (inject/). The engine never prints: events go to `sink`.

The engine's parts live in tracer/engine/ (one module per job, each an object owning its
state and given what it needs); `Session` builds them and connects them. The console talks to
it through engine/control.py; `trace` runs it from commands/trace.py.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

from tracer import stops
from tracer.engine.calls import CallAssembly
from tracer.engine.capture import Capture
from tracer.engine.detach import Detach
from tracer.engine.instruments import Instruments
from tracer.engine.lifecycle import Lifecycle
from tracer.engine.loop import Loop
from tracer.engine.options import (FuncStats, SessionInfo, Summary, TraceOptions,
                                   clocksource_info, resolve_functions)
from tracer.engine.processes import Processes
from tracer.engine.recorders import Recorders
from tracer.engine.signals import SignalWatch
from tracer.engine.state import _Space, _Thread
from tracer.engine.stats import Stats
from tracer.engine.symbols import Symbols
from tracer.engine.threads import Threads
from tracer.events import Event
from tracer.tsc import TscClock

__all__ = ["TraceOptions", "Session", "SessionInfo", "FuncStats", "Summary", "resolve_functions",
           "clocksource_info"]

T = TypeVar("T")


class Session:
    """Trace one process (and, with follow_forks, its children): the engine's parts, built in
    the order they depend on each other; the few back edges (a stop that arrives while the
    table stops every thread is handled by the lifecycle and capture; a process's first stops
    are dispatched by the loop) are connected once all exist."""

    def __init__(self, options: TraceOptions, sink: Callable[[Event], None]) -> None:
        self.options = options
        self.sink = sink
        mono_to_epoch = time.time() - time.monotonic()
        self.clocksource, self.fast_path = clocksource_info()
        self.tsc = tsc = TscClock()
        tsc.start()
        waiter = stops.Waiter()
        self.symbols = symbols = Symbols(options)
        self.stats = stats = Stats(self.clocksource)
        self.assembly = assembly = CallAssembly(options, symbols, stats, sink, mono_to_epoch,
                                                self.fast_path)
        self.table = table = Threads(options, waiter)
        self.watch = watch = SignalWatch(tsc, symbols, sink, table.resume, table.note_signal,
                                         lambda: table.paused)
        self.recorders = recorders = Recorders(table, assembly, stats, symbols, sink)
        self.instruments = instruments = Instruments(options, table, recorders, stats, sink)
        self.procs = procs = Processes(options, table, instruments, symbols,
                                       (self.clocksource, self.fast_path), sink)
        self.capture = capture = Capture(options, table, instruments, watch, tsc, symbols,
                                         assembly)
        self.life = life = Lifecycle(options, table, procs, instruments, recorders, sink)
        self.detach = detach = Detach(table, procs, life, instruments, recorders, waiter, sink)
        self.loop = loop = Loop(options, table, capture, life, watch, recorders, detach, waiter,
                                tsc, assembly)
        table.connect(life.event, life.unknown, life.gone, capture.trap, capture.marker,
                      watch.handler_entry, watch.emulate_rdtsc, instruments.follow_vdso)
        for part in (procs, life, detach):
            part.connect(loop.dispatch)
        # the tables, shared by reference (never rebound)
        self.threads: dict[int, _Thread] = table.threads
        self.spaces: dict[int, _Space] = table.spaces

    # ------------------------------------------------------------------ life
    def attach(self, pid: int) -> None:
        self.procs.attach(pid)

    def spawn(self, argv: list[str]) -> None:
        self.procs.spawn(argv)

    def run(self) -> str:
        """Trace until the tracees exit or `request_stop`; then leave them as they were."""
        return self.loop.run()

    def detach_all(self, reason: str = "detach") -> None:
        self.detach.detach_all(reason)

    def request_stop(self, reason: str) -> None:
        """Async-signal and thread safe: end `run` at the next wake-up."""
        self.loop.request_stop(reason)

    def tick(self) -> None:
        """Async-signal and thread safe: see Loop.tick."""
        self.loop.tick()

    def submit(self, fn: Callable[[Session], T]) -> Future[T]:
        """Run `fn(self)` in the engine's thread (at once from it or with no engine running)."""
        return self.loop.submit(lambda: fn(self))

    # ------------------------------------------------------------------ state
    @property
    def on_tick(self) -> Callable[[], None] | None:
        return self.loop.on_tick

    @on_tick.setter
    def on_tick(self, fn: Callable[[], None] | None) -> None:
        self.loop.on_tick = fn

    @property
    def state(self) -> str:
        """running | paused | detached | exited"""
        return self.table.state

    @property
    def stop_reason(self) -> str | None:
        return self.loop.stop_reason

    @property
    def root_pid(self) -> int | None:
        return self.procs.root_pid

    @property
    def calls(self) -> int:
        """Calls assembled so far."""
        return self.stats.calls

    @property
    def fallbacks(self) -> int:
        return self.stats.fallbacks

    @property
    def summary_only(self) -> bool:
        """-c: aggregate, build no events."""
        return self.assembly.summary_only

    @summary_only.setter
    def summary_only(self, on: bool) -> None:
        self.assembly.summary_only = on
