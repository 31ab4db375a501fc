"""The console's event stream: what the engine sends (`sink`, in the engine's thread, only
appends), what the prompt shows of it (`drain`, filtered, bounded per tick), what `save`
writes, what `hist` and `info threads` count."""
from __future__ import annotations

import threading
from collections import Counter, deque

from tracer import events as E
from tracer.console.eventfmt import json_line, paint, text_line
from tracer.console.state import Filter
from tracer.render.hist import Histogram, LatencyHistograms

__all__ = ["EventStream", "EVENTS_KEPT", "SHOW_PER_TICK"]

EVENTS_KEPT = 200_000        # events `save` can write: the most recent ones
SHOW_PER_TICK = 200          # lines the stream prints per pump tick; the rest are counted


class EventStream:
    def __init__(self) -> None:
        self._events: deque[E.Event] = deque(maxlen=EVENTS_KEPT)
        self._pending: deque[E.Event] = deque()
        self.received = 0
        self.tid_calls: Counter[int] = Counter()
        self.tid_last: dict[int, str] = {}
        self.exit: E.ExitEvent | None = None       # the root process's exit, when seen
        self._hist = LatencyHistograms()
        self._hist_lock = threading.Lock()

    def sink(self, ev: E.Event) -> None:
        """Called by the engine, in its thread, for every event: appends, nothing more."""
        self._events.append(ev)
        self._pending.append(ev)
        self.received += 1
        with self._hist_lock:
            self._hist.add(ev)
        if isinstance(ev, E.CallEvent):
            self.tid_calls[ev.tid] += 1
            self.tid_last[ev.tid] = ev.func
        elif isinstance(ev, E.ExitEvent) and ev.tid == ev.pid:
            self.exit = ev

    def new_session(self) -> None:
        """A new attach: a new exit to wait for, histograms from zero."""
        self.exit = None
        self.clear_histograms()

    def drain(self, flt: Filter, color: bool, limit: int = SHOW_PER_TICK) -> list[str]:
        """Lines for the events that arrived since the last drain, filtered; beyond `limit`
        they are only counted (the terminal cannot keep up with a busy tracee)."""
        lines: list[str] = []
        hidden = 0
        for _ in range(len(self._pending)):
            ev = self._pending.popleft()
            if flt.active and not passes(flt, ev):
                continue
            if len(lines) < limit:
                lines.append(text_line(ev, color))
            else:
                hidden += 1
        if hidden:
            lines.append(paint(f"... {hidden} more events not shown (`stats` counts them, "
                               "`save FILE` keeps them, `filter` narrows the stream)",
                               "dim", color))
        return lines

    def save(self, path: str) -> str:
        """Write the events kept to PATH as JSON lines; the line that says so."""
        evs = list(self._events)
        with open(path, "w") as f:
            for ev in evs:
                f.write(json_line(ev) + "\n")
        lost = self.received - len(evs)
        note = f" (the {lost} before them were not kept: the console keeps the last " \
               f"{EVENTS_KEPT})" if lost > 0 else ""
        return f"wrote {len(evs)} events to {path}{note}"

    def histograms(self) -> list[Histogram]:
        with self._hist_lock:
            return self._hist.histograms()

    def clear_histograms(self) -> None:
        with self._hist_lock:
            self._hist = LatencyHistograms()


def passes(flt: Filter, ev: E.Event) -> bool:
    if flt.tids and ev.tid not in flt.tids:
        return False
    if flt.funcs:
        if isinstance(ev, E.CallEvent):
            return ev.func in flt.funcs
        if isinstance(ev, E.SyscallEvent):
            return ev.nested_in in flt.funcs
        return not isinstance(ev, (E.SignalEvent, E.SigreturnEvent))
    return True
