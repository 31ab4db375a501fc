"""Events as console lines: the renderers' text, coloured (unless NO_COLOR), and JSON lines.

`tracer.render.text` / `tracer.render.jsonl` are used when they exist; `_fallback_*` below stand
in until they do (delete them then).
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable

from tracer import events as E

__all__ = ["text_line", "json_line", "paint", "RESET", "colors"]

RESET = "\x1b[0m"
_COLORS = {
    "func": "\x1b[36m",        # cyan: the vDSO function
    "syscall": "\x1b[34m",     # blue: a system call (i386 gateway, or a fallback's nested call)
    "fallback": "\x1b[33m",    # yellow: a call that entered the kernel
    "error": "\x1b[31m",       # red: a call that failed
    "anomaly": "\x1b[1;31m",   # bold red: a sigreturn nothing explains
    "signal": "\x1b[35m",      # magenta: a delivery / a return from a handler
    "life": "\x1b[32m",        # green: attach, detach, exec, exit
    "notice": "\x1b[1;33m",    # bold yellow: something the engine wants the user to know
    "dim": "\x1b[2m",
}


def colors(enabled: bool) -> dict[str, str]:
    return _COLORS if enabled else {k: "" for k in _COLORS}


def paint(text: str, role: str, enabled: bool) -> str:
    return f"{_COLORS[role]}{text}{RESET}" if enabled and text else text


def _load_text() -> Callable[[E.Event], str]:
    try:
        from tracer.render.text import format_event
    except ImportError:
        return _fallback_text
    return lambda ev: format_event(ev, timing=False)  # type: ignore[arg-type]


def _load_json() -> Callable[[E.Event], str]:
    try:
        from tracer.render.jsonl import format_event
    except ImportError:
        return _fallback_json
    return format_event  # type: ignore[no-any-return]


def text_line(ev: E.Event, color: bool) -> str:
    return colorize(ev, _text(ev), color)


def json_line(ev: E.Event) -> str:
    return _json(ev).rstrip("\n")


def colorize(ev: E.Event, line: str, color: bool) -> str:
    """Colour the parts of a rendered line that matter; never change its text."""
    if not color:
        return line
    c = _COLORS
    if isinstance(ev, E.CallEvent):
        head = f"{ev.func}("
        if head in line:
            line = line.replace(head, f"{c['func']}{ev.func}{RESET}(", 1)
        if ev.fallback:
            i = line.find("[fallback")
            if i >= 0:
                j = line.find("]", i)
                line = f"{line[:i]}{c['fallback']}{line[i:j + 1]}{RESET}{line[j + 1:]}"
        if ev.errno and ev.errno in line:
            k = line.rfind(ev.errno)
            line = f"{line[:k]}{c['error']}{ev.errno}{RESET}{line[k + len(ev.errno):]}"
        return line
    if isinstance(ev, E.SyscallEvent):
        head = f"{ev.name}("
        return line.replace(head, f"{c['syscall']}{ev.name}{RESET}(", 1)
    if isinstance(ev, E.SigreturnEvent) and ev.anomaly:
        return f"{c['anomaly']}{line}{RESET}"
    if isinstance(ev, (E.SignalEvent, E.SigreturnEvent)):
        return f"{c['signal']}{line}{RESET}"
    if isinstance(ev, E.NoticeEvent):
        return f"{c['notice']}{line}{RESET}"
    return f"{c['life']}{line}{RESET}"


# --------------------------------------------------------------------------- fallbacks

def _value(v: object) -> str:
    if isinstance(v, E.Addr):
        return f"{v.value:#x}"
    if isinstance(v, E.Unreadable):
        return f"{v.addr:#x}"
    if isinstance(v, E.Timespec):
        return f"{{tv_sec={v.tv_sec}, tv_nsec={v.tv_nsec}}}"
    if isinstance(v, E.Timeval):
        return f"{{tv_sec={v.tv_sec}, tv_usec={v.tv_usec}}}"
    if isinstance(v, E.Timezone):
        return f"{{tz_minuteswest={v.tz_minuteswest}, tz_dsttime={v.tz_dsttime}}}"
    if v is None:
        return "NULL"
    return str(v)


def _fallback_text(ev: E.Event) -> str:
    who = f"[pid {ev.tid}] "
    if isinstance(ev, E.CallEvent):
        args = ", ".join(_value(ev.out.get(k, v)) for k, v in ev.args.items())
        ret = f"{ev.ret}" + (f" {ev.errno}" if ev.errno else "")
        fb = f" [fallback{': ' + ev.fallback_reason if ev.fallback_reason else ''}]" \
            if ev.fallback else ""
        return f"{who}{ev.func}({args}) = {ret}{fb}"
    if isinstance(ev, E.SyscallEvent):
        ret = "?" if ev.ret is None else str(ev.ret)
        return f"{who}{ev.name}({', '.join(str(a) for a in ev.args)}) = {ret}"
    if isinstance(ev, E.SignalEvent):
        return f"{who}--- {ev.signame} handler={ev.handler:#x} ---"
    if isinstance(ev, E.SigreturnEvent):
        return (f"{who}sigreturn via {ev.via} -> {ev.resume_ip:#x}"
                + (f" [anomaly: {ev.anomaly}]" if ev.anomaly else ""))
    if isinstance(ev, E.ExitEvent):
        how = f"killed by {ev.signal}" if ev.signal else f"exited with {ev.status}"
        return f"{who}+++ {how} +++"
    if isinstance(ev, E.NoticeEvent):
        return f"{who}note: {ev.message}"
    return f"{who}{type(ev).__name__.removesuffix('Event').lower()}"


def _jsonable(v: Any) -> Any:
    if isinstance(v, E.Addr):
        return f"{v.value:#x}"
    if isinstance(v, E.Unreadable):
        return f"{v.addr:#x}"
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return {f.name: _jsonable(getattr(v, f.name)) for f in dataclasses.fields(v)}
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


def _fallback_json(ev: E.Event) -> str:
    doc = {"event": type(ev).__name__.removesuffix("Event").lower(), **_jsonable(ev)}
    return json.dumps(doc)


_text = _load_text()
_json = _load_json()
