"""The engine: attach -> auxv -> vDSO -> breakpoints -> decode -> events.

One thread (the one that attached: ptrace requires it) runs `Session.run`. A traced call costs
one stop (breakpoints.py: the entry jumps to a stub that stops once, on return): one
PTRACE_GETREGS, one read of the stub's block of stack, PTRACE_CONT; decoding and output happen
after the tracee runs again. With --inject there is no stop per call at all: the loop drains
the recorder's ring (inject/). The engine never prints: events go to `sink`.

The engine's parts live in tracer/engine/ (one module per job); this module combines them into
`Session`. The console talks to it through engine/control.py; `trace` runs it from
commands/trace.py.
"""
from __future__ import annotations

from tracer.engine.capture import Capture
from tracer.engine.detach import Detach
from tracer.engine.lifecycle import Lifecycle
from tracer.engine.loop import Loop
from tracer.engine.options import (FuncStats, SessionInfo, Summary, TraceOptions,
                                   clocksource_info, resolve_functions)
from tracer.engine.processes import Processes
from tracer.engine.recorders import Recorders
from tracer.engine.threads import Threads

__all__ = ["TraceOptions", "Session", "SessionInfo", "FuncStats", "Summary", "resolve_functions",
           "clocksource_info"]


class Session(Loop, Capture, Recorders, Threads, Processes, Lifecycle, Detach):
    """Trace one process (and, with follow_forks, its children)."""
