"""Where a trace's events go: stderr (strace's default, so the traced program keeps its
stdout), stdout (`-o -`) or a file, buffered, flushed on a timer tick (so a live log can be
followed with tail -f) and on every way out. A reader that goes away (`| head`) is noticed at
the next write (EPIPE) or tick (POLLERR on the pipe) and ends the trace."""
from __future__ import annotations

import json
import os
import select
import stat
import time
import sys
from collections.abc import Callable
from typing import IO, TYPE_CHECKING, Any

from tracer.errors import UsageError
from tracer.events import (AttachEvent, CallEvent, DetachEvent, Event, ExitEvent, NoticeEvent,
                           SyscallEvent)
from tracer.render import jsonl, text
from tracer.render.hist import LatencyHistograms, hist_json_lines, hist_text
from tracer.render.perfetto import Names, PerfettoTimeline
from tracer.render.summary import summary_dict, summary_text

if TYPE_CHECKING:
    from tracer.inject.batch import SlotRun
    from tracer.recording.format import SlotContext
    from tracer.session import Summary

__all__ = ["Output", "open_output", "silence_stream", "FLUSH_INTERVAL"]

FLUSH_INTERVAL = 0.05  # seconds: how stale a live log may get while calls come
_PIECE = 1024          # lines joined and written at once


class Output:
    def __init__(self, f: IO[str], close: bool, json_mode: bool, timing: bool,
                 summary: bool) -> None:
        self.f = f
        self.close = close
        self.json = json_mode
        self.timing = timing
        self.summary = summary
        # strace's -t/-tt/-ttt, -r, -q/-qq (text only) and -z/-Z (which calls are shown)
        self.stamps = 0
        self.relative = False
        self.quiet = 0
        self.only: str | None = None    # "ok" (-z) or "err" (-Z)
        self._last_time: float | None = None
        self.hist: LatencyHistograms | None = None          # --hist
        self.timeline: PerfettoTimeline | None = None       # --perfetto OUT
        self._views: list[Callable[[Event], None]] = []
        self._slot_lines: jsonl.SlotLines | None = None
        self.lines: list[str] = []
        self.broken = False
        self.flushed = 0.0
        self.on_broken: Callable[[], None] | None = None   # the reader is gone: end the trace
        self.end_time: float | None = None      # `report`: the recording's end, for --hist
        self._poll: select.poll | None = None
        try:
            if stat.S_ISFIFO(os.fstat(f.fileno()).st_mode):
                # Linux's pipe_poll reports POLLERR on the write end once no reader is left
                self._poll = select.poll()
                self._poll.register(f.fileno(), select.POLLERR)
        except (OSError, ValueError):
            pass

    def add_views(self, hist: bool = False, perfetto: str | None = None,
                  names: Names | None = None) -> None:
        """--hist and --perfetto OUT: renderers that see every event (also under -c). A
        timeline that cannot be written is refused here, before anything is traced."""
        if perfetto is not None:
            try:
                f = open(perfetto, "w", buffering=1 << 16)
            except OSError as e:
                self.finish(None)
                raise UsageError(f"cannot write the timeline {perfetto}: {e.strerror}") from e
            self.timeline = PerfettoTimeline(f, names)
            self._views.append(self.timeline.add)
        if hist:
            self.hist = LatencyHistograms()
            self._views.append(self.hist.add)

    def text_options(self, stamps: int = 0, relative: bool = False, quiet: int = 0,
                     only: str | None = None) -> None:
        """strace's -t (-tt, -ttt: stamps 1-3) and -r (time since the previous line) before
        each line, -q (no attach/detach lines; -qq: no exit lines either) for text; -z/-Z
        (only = "ok"/"err": only the calls that succeeded / failed) for text and JSON."""
        self.stamps, self.relative, self.quiet, self.only = stamps, relative, quiet, only

    def _stamp(self, t: float) -> str:
        s = text.stamp_text(t, self.stamps) if self.stamps else ""
        if self.relative:
            prev, self._last_time = self._last_time, t
            s += f"{t - prev if prev is not None else 0.0:13.6f} "
        return s

    @property
    def slot_sink(self) -> Output | None:
        """--inject --json: runs of ring slots come here as they are (write_slots), made
        JSON lines without an event each, when nothing else needs the events (or filters
        them: -z/-Z)."""
        if self.json and not self.summary and not self._views and self.only is None:
            return self
        return None

    slots_per_drain = 2048          # (a JSON line costs about 1 µs)

    def write_slots(self, ctx: SlotContext, run: SlotRun,
                    callers: dict[int, tuple[str, str | None]]) -> bool:
        """The lines of a run of ring slots (jsonl.SlotLines); False: they need events."""
        if self._slot_lines is None:
            self._slot_lines = jsonl.SlotLines()
        lines = self._slot_lines.render(ctx, run, callers)
        if lines is None:
            return False
        self.lines += lines
        if len(self.lines) >= _PIECE or time.monotonic() - self.flushed > FLUSH_INTERVAL:
            self.flush()
        return True

    @property
    def needs_events(self) -> bool:
        """True when a view needs every call as an event, even with -c."""
        return bool(self._views)

    def write_event(self, e: Event) -> None:
        for view in self._views:
            view(e)
        if self.summary:
            # -c: the table at the end, the attach line, and what the user should know
            if not isinstance(e, (AttachEvent, NoticeEvent)):
                return
            self.lines.append(jsonl.format_event(e) if self.json else text.format_event(e))
            self.flush()
            return
        lines = self.lines
        if self.only is not None and isinstance(e, (CallEvent, SyscallEvent)) \
                and bool(e.errno) != (self.only == "err"):
            return
        if self.json:
            lines.append(jsonl.format_call(e) if type(e) is CallEvent else jsonl.format_event(e))
        elif self.quiet and (isinstance(e, (AttachEvent, DetachEvent))
                             or (self.quiet > 1 and isinstance(e, ExitEvent))):
            return
        elif self.stamps or self.relative:
            lines.append(text.format_event(e, self.timing, self._stamp(e.time)))
        elif type(e) is CallEvent:
            lines.append(text.format_call(e, self.timing))
        else:
            lines.append(text.format_event(e, self.timing))
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
        lines = self.lines
        if not lines:
            return
        self.flushed = time.monotonic()
        if self.broken:
            lines.clear()
            return
        try:
            # (in pieces of a few hundred KiB: each joined, encoded and written while it is
            # in the CPU's cache)
            for at in range(0, len(lines), _PIECE):
                piece = lines[at:at + _PIECE]
                piece.append("")
                self.f.write("\n".join(piece))
            lines.clear()
            self.f.flush()
        except BrokenPipeError:
            self._reader_gone()
        except OSError as e:
            lines.clear()
            self.broken = True
            sys.stderr.write(f"vdsotrace: cannot write events: {e.strerror}\n")

    def check(self) -> None:
        """On a tick: end the trace when the pipe we write to has no reader left, even if
        no event has come to fail on."""
        if self._poll is not None and not self.broken:
            try:
                if self._poll.poll(0):
                    self._reader_gone()
            except OSError:
                pass

    def _reader_gone(self) -> None:
        if self.broken:
            return
        self.broken = True
        self.lines.clear()
        # What is still buffered would fail again at close or at Python's exit flush: let
        # the descriptor point at /dev/null from now on.
        silence_stream(self.f)
        if self.on_broken is not None:
            self.on_broken()

    def finish(self, summary: Callable[[], Summary] | None) -> None:
        """The end of the output: -c's summary (from `summary`; None when nothing was
        traced), --hist's histograms, the timeline closed."""
        if self.summary and summary is not None:
            s = summary()
            self.lines.append(json.dumps(summary_dict(s)) if self.json else summary_text(s))
        if self.hist is not None and summary is not None:
            hists = self.hist.histograms()
            if self.json:
                pid = self.hist.pid or 0
                self.lines.extend(hist_json_lines(hists, pid, pid, self.end_time or time.time()))
            else:
                if self.summary:
                    self.lines.append("")
                self.lines.append(hist_text(hists))
        self.flush()
        if self.timeline is not None:
            self.timeline.close()
        if self.close:
            try:
                self.f.close()
            except OSError:
                pass


def silence_stream(stream: Any) -> None:
    """Point a stream whose reader is gone at /dev/null (the descriptor itself, so that what is
    still buffered, flushed at close or at Python's exit, finds somewhere to go)."""
    try:
        fd = stream.fileno()
        null = os.open(os.devnull, os.O_WRONLY)
    except (OSError, ValueError):
        return
    try:
        os.dup2(null, fd)
    except OSError:
        pass
    finally:
        os.close(null)


def open_output(path: str | None, json: bool, timing: bool, summary: bool) -> Output:
    if path == "-":
        return Output(sys.stdout, False, json, timing, summary)
    if path is None:
        # our own buffer on descriptor 2 (sys.stderr is line-buffered: a write per line)
        try:
            err = open(sys.stderr.fileno(), "w", buffering=1 << 16, closefd=False,
                       errors="backslashreplace")
        except (OSError, ValueError, AttributeError):
            return Output(sys.stderr, False, json, timing, summary)
        return Output(err, True, json, timing, summary)
    try:
        f = open(path, "w", buffering=1 << 16)
    except OSError as e:
        raise UsageError(f"cannot write {path}: {e.strerror}") from e
    return Output(f, True, json, timing, summary)
