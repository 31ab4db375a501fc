"""Events -> strace-shaped text lines."""
from __future__ import annotations

from tracer.events import (Addr, AttachEvent, CallEvent, DetachEvent, Event, ExecEvent,
                           ExitEvent, NoticeEvent, SignalEvent, SigreturnEvent, SyscallEvent,
                           Timespec, Timeval, Timezone, Unreadable, Value)
from tracer.render.escape import escape_text as _esc
from tracer.render.escape import quote_bytes
from tracer.tables.errnos import Errno

__all__ = ["format_value", "format_event", "format_call", "stamp_text"]

_ERRSTR: dict[str, str] = {}


def _strerror(name: str) -> str:
    if not _ERRSTR:
        import os
        for e in Errno:
            _ERRSTR[e.name] = os.strerror(e.value) if e.value < 512 else e.name
    return _ERRSTR.get(name, name)


def format_value(v: Value, ns_relative: bool = False) -> str:
    if v is None:
        return "NULL"
    if isinstance(v, bool):
        return str(int(v))
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return v
    if isinstance(v, Timespec):
        mark = " /* time namespace */" if ns_relative else ""
        return f"{{tv_sec={v.tv_sec}, tv_nsec={v.tv_nsec}}}{mark}"
    if isinstance(v, Timeval):
        return f"{{tv_sec={v.tv_sec}, tv_usec={v.tv_usec}}}"
    if isinstance(v, Timezone):
        return f"{{tz_minuteswest={v.tz_minuteswest}, tz_dsttime={v.tz_dsttime}}}"
    if isinstance(v, (Addr, Unreadable)):
        return f"{v.value if isinstance(v, Addr) else v.addr:#x}"
    return repr(v)


def _prefix(pid: int, tid: int, stamp: str = "") -> str:
    return f"[pid {tid}] {stamp}"


def stamp_text(t: float, stamps: int) -> str:
    """strace's -t (time of day), -tt (with microseconds), -ttt (seconds since the epoch,
    with microseconds) for an epoch time, with the space that follows it."""
    if stamps >= 3:
        return f"{t:.6f} "
    import time
    day = time.strftime("%H:%M:%S", time.localtime(t))
    if stamps == 2:
        return f"{day}.{int(t * 1e6) % 1000000:06d} "
    return f"{day} "


def format_call(e: CallEvent, timing: bool = False, stamp: str = "") -> str:
    parts = []
    for name, v in e.args.items():
        if name in e.out:
            o = e.out[name]
            if isinstance(o, int) and not isinstance(o, bool):
                parts.append(f"[{o}]")
            else:
                parts.append(format_value(o, e.ns_relative))
        else:
            parts.append(format_value(v))
    ret = f"{e.ret}"
    if e.errno:
        ret += f" {e.errno} ({_strerror(e.errno)})"
    line = f"{_prefix(e.pid, e.tid, stamp)}{e.func}({', '.join(parts)}) = {ret}"
    if e.fallback:
        line += f" [fallback] ({e.fallback_reason})" if e.fallback_reason else " [fallback]"
    if timing:
        line += f" <{e.duration_ns / 1e9:.9f}>"
    if e.stack:
        # frames name the tracee's files and symbols: escaped, one line each
        line += "".join(f"\n > {_esc(frame)}" for frame in e.stack)
    return line


def _sysarg(a: int) -> str:
    """A raw i386 system-call argument: small negatives (AT_FDCWD, -1) signed, pointers in
    hex, the rest (descriptors, pids, lengths, flags) in decimal."""
    if a >= 0xFFFFF000:
        return str(a - (1 << 32))
    return f"{a:#x}" if a >= 0x1000000 else str(a)


def format_event(e: Event, timing: bool = False, stamp: str = "") -> str:
    """An event's text line; `stamp` (stamp_text) goes after the [pid N] of the lines that
    have one, as strace puts it."""
    if isinstance(e, CallEvent):
        return format_call(e, timing, stamp)
    if isinstance(e, SyscallEvent):
        strs = e.strings or {}
        args = ", ".join(quote_bytes(strs[i], len(strs[i])) + ("..." if i in e.cut else "")
                         if i in strs else _sysarg(a) for i, a in enumerate(e.args))
        ret = "?" if e.ret is None else str(e.ret)
        if e.errno:
            ret += f" {e.errno} ({_strerror(e.errno)})"
        inner = f" [in {e.nested_in}]" if e.nested_in else ""
        line = f"{_prefix(e.pid, e.tid, stamp)}{e.name}({args}) = {ret}{inner}"
        if timing:
            line += f" <{e.duration_ns / 1e9:.9f}>"
        return line
    if isinstance(e, AttachEvent):
        how = "started" if e.spawned else "attached to"
        fast = {True: "with a vDSO fast path", False: "WITHOUT a vDSO fast path: clock calls "
                "fall back to the kernel", None: ""}[e.vdso_fast_path]
        gw = f"; gateway {', '.join(e.gateway)}" if e.gateway else ""
        ns = ""
        if e.timens_offsets:
            ns = "; time namespace offsets " + ", ".join(
                f"{k} {s}s {n}ns" for k, (s, n) in e.timens_offsets.items())
        return (f"--- vdsotrace {how} pid {e.pid} ({e.abi}, {e.threads} thread"
                f"{'s' if e.threads != 1 else ''}), vDSO at {e.vdso_base:#x}, clocksource "
                f"{e.clocksource or '?'} {fast}{gw}{ns}; tracing {', '.join(e.functions)} ---")
    if isinstance(e, DetachEvent):
        return f"--- vdsotrace detached from pid {e.pid} ({e.reason}) ---"
    if isinstance(e, ExecEvent):
        ns = ""
        if e.timens_offsets:
            ns = "; time namespace offsets " + ", ".join(
                f"{k} {s}s {n}ns" for k, (s, n) in e.timens_offsets.items())
        return (f"{_prefix(e.pid, e.tid, stamp)}--- exec {_esc(e.filename or '?')} ({e.abi}), new vDSO at "
                f"{e.vdso_base:#x}{ns} ---")
    if isinstance(e, ExitEvent):
        if e.signal:
            return f"{_prefix(e.pid, e.tid, stamp)}+++ killed by {e.signal} +++"
        return f"{_prefix(e.pid, e.tid, stamp)}+++ exited with {e.status} +++"
    if isinstance(e, SignalEvent):
        hs = f" <{_esc(e.handler_symbol)}>" if e.handler_symbol else ""
        rs = f" <{_esc(e.restorer_symbol)}>" if e.restorer_symbol else ""
        return (f"{_prefix(e.pid, e.tid, stamp)}--- {e.signame} delivered: handler {e.handler:#x}{hs}, "
                f"returns via {e.restorer:#x}{rs}, interrupted at {e.resume_ip:#x} ---")
    if isinstance(e, SigreturnEvent):
        what = f"{e.signame_text()}" if hasattr(e, "signame_text") else (
            f"signal {e.signo}" if e.signo is not None else "no delivery")
        rs = f" <{_esc(e.resume_symbol)}>" if e.resume_symbol else ""
        extra = ""
        if e.anomaly:
            extra = f" !!! ANOMALY: {e.anomaly}"
        elif e.resume_changed:
            extra = " (handler changed the resume address)"
        return (f"{_prefix(e.pid, e.tid, stamp)}--- <signal handler returned> via {_esc(e.via)} "
                f"({what}), resumes at {e.resume_ip:#x}{rs}{extra} ---")
    if isinstance(e, NoticeEvent):
        return f"--- vdsotrace: {_esc(e.message)} ---"
    return repr(e)
