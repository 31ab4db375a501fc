"""Events as console lines: the renderers' text, coloured (unless NO_COLOR), and JSON lines."""
from __future__ import annotations

from tracer import events as E
from tracer.render import jsonl as _jsonl
from tracer.render import text as _text

__all__ = ["text_line", "json_line", "paint", "RESET", "colorize"]

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


def paint(text: str, role: str, enabled: bool) -> str:
    return f"{_COLORS[role]}{text}{RESET}" if enabled and text else text


def text_line(ev: E.Event, color: bool) -> str:
    if isinstance(ev, E.CallEvent) and ev.stack:
        ev = ev._replace(stack=None)      # stacks are for `bt`, not for the stream
    return colorize(ev, _text.format_event(ev, timing=False), color)


def json_line(ev: E.Event) -> str:
    return _jsonl.format_event(ev).rstrip("\n")


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
