"""`vdsotrace record -o FILE (-p PID[,PID...] | -- CMD ARGS...) [trace options]`: the trace
engine, unchanged, with a recording writer in the place of the text/JSON output."""
from __future__ import annotations

import os
import platform
import sys
import time
from typing import IO, Any, Callable

from tracer import procfs
from tracer.errors import UsageError
from tracer.commands.trace import TraceArgs, run_trace
from tracer.events import (AttachEvent, CallEvent, Event, ExecEvent, ExitEvent,
                           NoticeEvent)
from tracer.inject import batch
from tracer.inject.batch import SlotRun
from tracer.recording.format import SlotContext
from tracer.recording.writer import Writer
from tracer.render import text
from tracer.session import Session

__all__ = ["run_record", "RecordSink"]


class RecordSink:
    """Takes the place of render.output.Output for the engine (write_event, flush on its
    ticks, check, finish): every event into the recording, plus what a report needs that
    events do not carry: each process's vDSO image (at its attach or exec), thread names (read
    when a thread is first seen, after an exec, and at the end, as --perfetto reads them), and
    a trailer (end time and reason, calls not recorded, the -c table's functions in order)."""

    needs_events = True      # every call as an event: -c is computed by `report`

    def __init__(self, f: IO[bytes], path: str, header: dict[str, Any]) -> None:
        self.path = path
        self.w = Writer(f, header)
        self._f = f
        self.session: Session | None = None
        self.on_broken: Callable[[], None] | None = None
        self.broken = False
        self._tids: set[int] = set()
        self._threads: dict[tuple[int, int], bool] = {}     # seen -> still alive
        self._call = self.w.call

    def bind(self, session: Session) -> None:
        self.session = session

    @property
    def slot_sink(self) -> RecordSink:
        """Under --inject the ring's slots come here in whole runs (write_slots)."""
        return self

    slots_per_drain = 8192          # (a slot costs about 0.15 µs to write)

    def write_slots(self, ctx: SlotContext, run: SlotRun,
                    callers: dict[int, tuple[str, str | None]]) -> bool:
        """A run of ring slots into the recording as the ring held them (`report` decodes
        them as the live drain does), with the names of their threads and callers."""
        if self.broken:
            return True
        try:
            for tid in batch.distinct(run.slots["tid"]):
                if tid not in self._tids:
                    self._new_thread(ctx.pid, tid)
            self.w.slot_callers(ctx.pid, callers)
            self.w.slots(ctx, batch.raw(run), run.rate, run.tsc0, run.ns0)
        except OSError as err:
            self._failed(err)
        return True

    def write_event(self, e: Event) -> None:
        if self.broken:
            return
        try:
            if type(e) is CallEvent:
                if e.tid not in self._tids:
                    self._new_thread(e.pid, e.tid)
                self._call(e)
                return
            self._other(e)
        except OSError as err:
            self._failed(err)

    def _other(self, e: Event) -> None:
        w = self.w
        if isinstance(e, (AttachEvent, ExecEvent)):
            w.process(e.pid, e.abi, e.vdso_base, self._image(e.pid))
            if isinstance(e, ExecEvent):
                for key in [k for k in self._threads if k[0] == e.pid]:
                    self._threads[key] = False
                self._tids.discard(e.tid)
        if e.tid not in self._tids:
            self._new_thread(e.pid, e.tid)
        if isinstance(e, ExitEvent):
            self._threads[(e.pid, e.tid)] = False
        w.event(e)
        if isinstance(e, (AttachEvent, NoticeEvent)):
            # what a user starting a recording should see at once, as `trace -c` shows it
            sys.stderr.write(text.format_event(e) + "\n")
            w.flush()

    def _new_thread(self, pid: int, tid: int) -> None:
        self._tids.add(tid)
        self._threads[(pid, tid)] = True
        self.w.name(pid, tid, procfs.thread_comm(pid, tid))

    def _image(self, pid: int) -> bytes:
        """The pristine vDSO image the engine parsed for this process (the process's own copy
        is patched by now)."""
        space = self.session.spaces.get(pid) if self.session is not None else None
        return space.image.data if space is not None else b""

    def flush(self) -> None:
        if self.broken:
            return
        try:
            self.w.flush()
        except OSError as err:
            self._failed(err)

    def check(self) -> None:
        pass

    def _failed(self, err: OSError) -> None:
        self.broken = True
        sys.stderr.write(f"vdsotrace: cannot write the recording {self.path}: {err.strerror}; "
                         "stopping the trace\n")
        if self.on_broken is not None:
            self.on_broken()

    def finish(self, started: Any) -> None:
        s = self.session
        try:
            if not self.broken:
                for (pid, tid), alive in self._threads.items():
                    if alive:
                        comm = procfs.thread_comm(pid, tid)
                        if comm is not None:
                            self.w.name(pid, tid, comm)
                self.w.end({
                    "end_time": time.time(),
                    "reason": s.stop_reason if s is not None else None,
                    "lost": s.stats.lost_records if s is not None else 0,
                    "functions": list(s.stats.counters) if s is not None else [],
                    "events": self.w.events, "calls": self.w.calls,
                    "started": started is not None,
                })
        except OSError as err:
            self._failed(err)
        finally:
            try:
                self._f.close()
            except OSError:
                pass
        if started is None:
            try:
                os.unlink(self.path)      # nothing was traced: no recording left behind
            except OSError:
                pass
            return
        if not self.broken:
            sys.stderr.write(f"vdsotrace: recorded {self.w.events} events ({self.w.calls} "
                             f"calls) in {self.w.bytes_written} bytes to {self.path}\n")


def _header(a: TraceArgs) -> dict[str, Any]:
    from tracer import __version__
    from tracer.session import clocksource_info
    cs, fast = clocksource_info()
    return {"format": "vdsotrace recording", "tool": f"vdsotrace {__version__}",
            "host_arch": platform.machine(), "start_time": time.time(),
            "command": list(a.cmd) or None, "pids": list(dict.fromkeys(a.pids)) or None,
            "clocksource": cs, "vdso_fast_path": fast,
            "options": {"funcs": a.funcs, "follow_forks": a.follow_forks,
                        "signals": a.signals, "stack_depth": a.stack, "inject": a.inject,
                        "lossy": a.lossy, "pin": a.pin, "duration": a.duration,
                        "demangle": a.demangle, "string_size": a.string_size}}


def run_record(a: TraceArgs) -> int:
    if not a.output or a.output == "-":
        raise UsageError("record needs -o FILE: the recording is a binary file (read it with "
                         "`vdsotrace report FILE`)")
    path = a.output
    header = _header(a)

    def open_sink(_a: TraceArgs) -> RecordSink:
        try:
            f = open(path, "wb", buffering=0)
        except OSError as e:
            raise UsageError(f"cannot write {path}: {e.strerror}") from e
        return RecordSink(f, path, header)

    return run_trace(a, open_sink=open_sink)
