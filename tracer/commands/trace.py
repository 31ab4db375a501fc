"""`vdsotrace trace`: options -> engine -> output, until the tracee exits or we are told to stop."""
from __future__ import annotations

import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from tracer import procfs
from tracer.engine.control import summarize
from tracer.engine.processes import refuse_untraceable
from tracer.errors import UsageError
from tracer.events import Event
from tracer.engine.state import _TICK, _WAKE_SIGNAL
from tracer.session import Session, Summary, TraceOptions

__all__ = ["TraceArgs", "TraceSink", "BoundSink", "run_trace"]


@dataclass(frozen=True, slots=True)
class TraceArgs:
    """`trace`'s options, as the CLI parsed them."""
    pids: tuple[int, ...]
    cmd: tuple[str, ...]
    funcs: list[str] | None
    follow_forks: bool
    signals: bool
    stack: int | None
    inject: bool
    lossy: bool
    pin: bool
    duration: float | None
    demangle: bool
    string_size: int
    output: str | None
    json: bool
    timing: bool
    summary: bool
    hist: bool
    perfetto: str | None
    stamps: int = 0                 # -t, -tt, -ttt
    relative: bool = False          # -r
    quiet: int = 0                  # -q, -qq
    only: str | None = None         # -z: "ok", -Z: "err"


class TraceSink(Protocol):
    """Where the engine's events go (render.output.Output)."""
    on_broken: Callable[[], None] | None       # called when the reader went away

    @property
    def needs_events(self) -> bool: ...
    def write_event(self, ev: Event) -> None: ...
    def flush(self) -> None: ...
    def check(self) -> None: ...
    def finish(self, summary: Callable[[], Summary] | None) -> None: ...


class BoundSink(TraceSink, Protocol):
    """A sink that takes the output's place (`record`'s writer) and looks at the engine."""
    def bind(self, session: Session) -> None: ...


def _install_signal_handlers(session: Session) -> dict[int, Any]:
    """SIGINT/SIGTERM/SIGHUP end the trace cleanly; SIGALRM ticks wake waitpid (a handler
    installed by Python interrupts system calls: no SA_RESTART)."""
    old: dict[int, Any] = {}

    def stop(signum: int, _frame: object) -> None:
        session.request_stop(signal.Signals(signum).name)

    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        old[s] = signal.signal(s, stop)
    old[_WAKE_SIGNAL] = signal.signal(_WAKE_SIGNAL, lambda *_: session.tick())
    signal.setitimer(signal.ITIMER_REAL, _TICK, _TICK)
    return old


def _restore_signal_handlers(old: dict[int, Any]) -> None:
    signal.setitimer(signal.ITIMER_REAL, 0, 0)
    for s, h in old.items():
        signal.signal(s, h)


def run_trace(a: TraceArgs, open_sink: Callable[[TraceArgs], BoundSink] | None = None) -> int:
    """Trace until the tracees exit, --duration ends, a signal or a closed pipe; every way
    out detaches. The events go to the text/JSON output, or to what `open_sink` gives."""
    from tracer.render.output import open_output
    opts = TraceOptions(funcs=a.funcs, follow_forks=a.follow_forks, signals=a.signals,
                        stack_depth=a.stack, inject=a.inject, lossy=a.lossy, pin=a.pin,
                        duration=a.duration, demangle=a.demangle,
                        string_size=a.string_size)
    if a.lossy and not a.inject:
        raise UsageError("--lossy applies to --inject only: add --inject, or drop --lossy")
    if a.inject and a.follow_forks:
        raise UsageError("--inject cannot follow forks (children share the recorder's ring): "
                         "drop -f, or trace without --inject")
    if a.inject and a.stack:
        raise UsageError("--inject records no stacks (a stack is read while the call is stopped): "
                         "drop --stack, or trace without --inject")
    pids: list[int] = list(dict.fromkeys(a.pids))
    refuse_untraceable(pids, a.inject)  # before an output file is made or a process touched
    out: TraceSink
    bound: BoundSink | None = None
    if open_sink is None:
        output = open_output(a.output, json=a.json, timing=a.timing, summary=a.summary)
        output.text_options(a.stamps, a.relative, a.quiet, a.only)
        output.add_views(hist=a.hist, perfetto=a.perfetto, names=procfs.thread_comm)
        out = output
    else:
        out = bound = open_sink(a)
    session = Session(opts, out.write_event)
    if bound is not None:
        bound.bind(session)
    session.summary_only = a.summary and not out.needs_events   # --hist needs each duration
    # an output that takes whole runs of ring slots (--inject: `record`, JSON lines)
    session.recorders.slot_sink = getattr(out, "slot_sink", None)
    old = _install_signal_handlers(session)
    # a reader gone from our output pipe (`| head`) ends the trace as SIGINT does
    out.on_broken = lambda: session.request_stop("EPIPE")

    def tick() -> None:
        out.flush()
        out.check()
    session.on_tick = tick
    started = False
    try:
        if pids:
            for pid in pids:
                session.attach(pid)
        else:
            session.spawn(list(a.cmd))
        started = True
        out.flush()
        session.run()
    finally:
        _restore_signal_handlers(old)
        if session.threads:
            session.detach_all("error")
        out.finish((lambda: summarize(session.stats)) if started else None)
    return 0
