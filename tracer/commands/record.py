"""`vdsotrace record -o FILE (-p PID[,PID...] | -- CMD ARGS...) [trace options]`: the trace
engine, unchanged, with a recording writer in the place of the text/JSON output."""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from typing import IO, Any, Callable

from tracer import procfs
from tracer.errors import UsageError
from tracer.events import (AttachEvent, CallEvent, Event, ExecEvent, ExitEvent,
                           NoticeEvent)
from tracer.recording.format import Writer
from tracer.render import text

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
        self.session: Any = None
        self.on_broken: Callable[[], None] | None = None
        self.broken = False
        self._tids: set[int] = set()
        self._threads: dict[tuple[int, int], bool] = {}     # seen -> still alive
        self._call = self.w.call

    def bind(self, session: Any) -> None:
        self.session = session

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
        space = getattr(self.session, "spaces", {}).get(pid)
        image = getattr(space, "image", None)
        data = getattr(image, "data", b"")
        return bytes(data) if isinstance(data, (bytes, bytearray)) else b""

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
                    "reason": getattr(s, "stop_reason", None),
                    "lost": int(getattr(s, "lost_records", 0) or 0),
                    "functions": list(getattr(s, "counters", {}) or {}),
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


def _header(ns: argparse.Namespace, cmd: list[str]) -> dict[str, Any]:
    from tracer import __version__
    from tracer.session import clocksource_info
    cs, fast = clocksource_info()
    return {"format": "vdsotrace recording", "tool": f"vdsotrace {__version__}",
            "host_arch": platform.machine(), "start_time": time.time(),
            "command": cmd or None, "pids": list(dict.fromkeys(ns.pid or [])) or None,
            "clocksource": cs, "vdso_fast_path": fast,
            "options": {"funcs": ns.funcs, "follow_forks": ns.follow_forks,
                        "signals": ns.signals, "stack_depth": ns.stack, "inject": ns.inject,
                        "lossy": ns.lossy, "pin": ns.pin, "duration": ns.duration,
                        "demangle": ns.demangle, "string_size": ns.string_size}}


def run_record(ns: argparse.Namespace, cmd: list[str]) -> int:
    from tracer.session import run_trace
    if not ns.output or ns.output == "-":
        raise UsageError("record needs -o FILE: the recording is a binary file (read it with "
                         "`vdsotrace report FILE`)")
    if ns.lossy and not ns.inject:
        raise UsageError("--lossy applies to --inject only: add --inject, or drop --lossy")
    if ns.inject and ns.follow_forks:
        raise UsageError("--inject cannot follow forks (children share the recorder's ring): "
                         "drop -f, or trace without --inject")
    path = ns.output
    header = _header(ns, cmd)

    def open_sink(_ns: Any) -> RecordSink:
        try:
            f = open(path, "wb", buffering=0)
        except OSError as e:
            raise UsageError(f"cannot write {path}: {e.strerror}") from e
        return RecordSink(f, path, header)

    # the trace's rendering options do not apply: -c, -T, --hist... are `report`'s
    ns.summary = False
    return run_trace(ns, cmd, open_sink=open_sink)
