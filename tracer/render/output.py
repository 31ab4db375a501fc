"""Where a trace's events go: a buffered file or stdout, flushed on a timer tick (so a live log
can be followed with tail -f) and on every way out."""
from __future__ import annotations

import json
import time
import sys
from typing import IO, Any

from tracer.errors import UsageError
from tracer.events import AttachEvent, CallEvent, Event, NoticeEvent
from tracer.render import jsonl, text
from tracer.render.summary import summary_dict, summary_text

__all__ = ["Output", "open_output", "FLUSH_INTERVAL"]

FLUSH_INTERVAL = 0.05  # seconds: how stale a live log may get while calls come


class Output:
    def __init__(self, f: IO[str], close: bool, json_mode: bool, timing: bool,
                 summary: bool) -> None:
        self.f = f
        self.close = close
        self.json = json_mode
        self.timing = timing
        self.summary = summary
        self.lines: list[str] = []
        self.broken = False
        self.flushed = 0.0

    def write_event(self, e: Event) -> None:
        if self.summary:
            # -c: the table at the end, the attach line, and what the user should know
            if not isinstance(e, (AttachEvent, NoticeEvent)):
                return
            self.lines.append(jsonl.format_event(e) if self.json else text.format_event(e))
            self.flush()
            return
        lines = self.lines
        if type(e) is CallEvent:
            lines.append(jsonl.format_call(e) if self.json else text.format_call(e, self.timing))
        else:
            lines.append(jsonl.format_event(e) if self.json
                         else text.format_event(e, self.timing))
        if isinstance(e, AttachEvent):
            # interface.md: flushed once every breakpoint is planted; it does not count as a
            # write of events, so the first call after it goes out at once too
            last = self.flushed
            self.flush()
            self.flushed = last
        elif time.monotonic() - self.flushed > FLUSH_INTERVAL:
            # at most one write per interval however fast calls come; the engine's tick
            # flushes what a burst leaves behind
            self.flush()

    def flush(self) -> None:
        if not self.lines:
            return
        self.flushed = time.monotonic()
        data = "\n".join(self.lines) + "\n"
        self.lines.clear()
        if self.broken:
            return
        try:
            self.f.write(data)
            self.f.flush()
        except BrokenPipeError:
            self.broken = True
        except OSError as e:
            self.broken = True
            sys.stderr.write(f"vdsotrace: cannot write events: {e.strerror}\n")

    def finish(self, session: Any) -> None:
        if self.summary and session is not None:
            s = session.summary()
            self.lines.append(json.dumps(summary_dict(s)) if self.json else summary_text(s))
        self.flush()
        if self.close:
            try:
                self.f.close()
            except OSError:
                pass


def open_output(path: str | None, json: bool, timing: bool, summary: bool) -> Output:
    if path is None or path == "-":
        return Output(sys.stdout, False, json, timing, summary)
    try:
        f = open(path, "w", buffering=1 << 16)
    except OSError as e:
        raise UsageError(f"cannot write {path}: {e.strerror}") from e
    return Output(f, True, json, timing, summary)
