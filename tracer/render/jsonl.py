"""Events -> one JSON object per line (interface.md's schema)."""
from __future__ import annotations

import json
from typing import Any

from tracer.events import (Addr, AttachEvent, CallEvent, DetachEvent, Event, ExecEvent,
                           ExitEvent, NoticeEvent, SignalEvent, SigreturnEvent, SyscallEvent,
                           Timespec, Timeval, Timezone, Unreadable, Value)
from tracer.render.escape import quote_bytes

__all__ = ["to_json_value", "event_dict", "format_event", "format_call", "quote", "json_value"]


def _hex(v: int) -> str:
    return f"{v:#x}"


def to_json_value(v: Value) -> Any:
    if v is None or isinstance(v, (int, str)):
        return v
    if isinstance(v, Timespec):
        return {"tv_sec": v.tv_sec, "tv_nsec": v.tv_nsec}
    if isinstance(v, Timeval):
        return {"tv_sec": v.tv_sec, "tv_usec": v.tv_usec}
    if isinstance(v, Timezone):
        return {"tz_minuteswest": v.tz_minuteswest, "tz_dsttime": v.tz_dsttime}
    if isinstance(v, Addr):
        return _hex(v.value)
    if isinstance(v, Unreadable):
        return _hex(v.addr)
    return str(v)


def event_dict(e: Event) -> dict[str, Any]:
    d: dict[str, Any]
    if isinstance(e, CallEvent):
        d = {"event": "call", "pid": e.pid, "tid": e.tid, "time": e.time, "func": e.func,
             "symbol": e.symbol, "args": {k: to_json_value(v) for k, v in e.args.items()},
             "ret": e.ret, "errno": e.errno,
             "out": {k: to_json_value(v) for k, v in e.out.items()},
             "fallback": e.fallback, "fallback_reason": e.fallback_reason,
             "duration_ns": e.duration_ns, "caller": e.caller_text,
             "caller_addr": _hex(e.caller), "caller_symbol": e.caller_symbol,
             "site": e.site}
        if e.stack is not None:
            d["stack"] = list(e.stack)
        if e.ns_relative:
            d["ns_relative"] = True
        return d
    if isinstance(e, SyscallEvent):
        return {"event": "syscall", "pid": e.pid, "tid": e.tid, "time": e.time, "nr": e.nr,
                "name": e.name, "args": list(e.args), "ret": e.ret, "errno": e.errno,
                "duration_ns": e.duration_ns, "nested_in": e.nested_in,
                # strace's form of each string: quoted, C escapes, `...` after a cut one
                **({"strings": {str(i): quote_bytes(v, len(v)) + ("..." if i in e.cut else "")
                                for i, v in e.strings.items()}} if e.strings else {})}
    if isinstance(e, AttachEvent):
        return {"event": "attach", "pid": e.pid, "tid": e.tid, "time": e.time,
                "vdso_base": _hex(e.vdso_base), "abi": e.abi, "clocksource": e.clocksource,
                "vdso_fast_path": e.vdso_fast_path,
                "timens_offsets": {k: list(v) for k, v in e.timens_offsets.items()}
                if e.timens_offsets else None,
                "threads": e.threads, "functions": list(e.functions),
                "gateway": list(e.gateway) if e.gateway else None, "spawned": e.spawned,
                "setup_ms": round(e.setup_ms, 3)}
    if isinstance(e, DetachEvent):
        return {"event": "detach", "pid": e.pid, "tid": e.tid, "time": e.time,
                "vdso_base": _hex(e.vdso_base), "abi": e.abi, "reason": e.reason}
    if isinstance(e, ExecEvent):
        return {"event": "exec", "pid": e.pid, "tid": e.tid, "time": e.time,
                "filename": e.filename, "vdso_base": _hex(e.vdso_base), "abi": e.abi,
                "status": e.status,
                "timens_offsets": {k: list(v) for k, v in e.timens_offsets.items()}
                if e.timens_offsets else None}
    if isinstance(e, ExitEvent):
        return {"event": "exit", "pid": e.pid, "tid": e.tid, "time": e.time,
                "status": e.status, "signal": e.signal}
    if isinstance(e, SignalEvent):
        return {"event": "signal", "pid": e.pid, "tid": e.tid, "time": e.time,
                "signo": e.signo, "signame": e.signame, "handler": _hex(e.handler),
                "handler_symbol": e.handler_symbol, "restorer": _hex(e.restorer),
                "restorer_symbol": e.restorer_symbol, "resume_ip": _hex(e.resume_ip),
                "frame": _hex(e.frame)}
    if isinstance(e, SigreturnEvent):
        return {"event": "sigreturn", "pid": e.pid, "tid": e.tid, "time": e.time,
                "via": e.via, "resume_ip": _hex(e.resume_ip), "resume_symbol": e.resume_symbol,
                "signo": e.signo, "anomaly": e.anomaly, "resume_changed": e.resume_changed}
    if isinstance(e, NoticeEvent):
        return {"event": "notice", "pid": e.pid, "tid": e.tid, "time": e.time,
                "message": e.message}
    raise TypeError(type(e))


_QUOTED: dict[str, str] = {}


def quote(text: str | None) -> str:
    """A JSON string literal (cached: names repeat on every event), or null."""
    if text is None:
        return "null"
    r = _QUOTED.get(text)
    if r is None:
        if len(_QUOTED) > 65536:
            _QUOTED.clear()
        r = _QUOTED[text] = json.dumps(text)
    return r


def json_value(v: Value) -> str:
    """One decoded value as JSON text (the common shapes formatted directly)."""
    t = type(v)
    if t is int:
        return str(v)
    if t is str:
        return quote(v)  # type: ignore[arg-type]
    if t is Timespec:
        return f'{{"tv_sec": {v.tv_sec}, "tv_nsec": {v.tv_nsec}}}'  # type: ignore[union-attr]
    if t is Addr:
        return f'"{v.value:#x}"'  # type: ignore[union-attr]
    if v is None:
        return "null"
    return json.dumps(to_json_value(v))


_HEADS: dict[tuple[int, int], str] = {}
_FUNCS: dict[tuple[str, str], str] = {}
_CALLERS: dict[tuple[int, str, str | None], str] = {}
_ITEMS: dict[tuple[str, object], str] = {}
_ARGS: dict[tuple[object, ...], str] = {}   # (func, argument values) -> rendered arguments


def _cached(cache: dict, key: object, make: object) -> str:  # type: ignore[type-arg]
    r = cache.get(key)
    if r is None:
        if len(cache) > 65536:
            cache.clear()
        r = cache[key] = make()  # type: ignore[operator]
    return r  # type: ignore[no-any-return]


def _item(k: str, v: Value) -> str:
    t = type(v)
    if t is str or t is int or v is None:
        key = (k, v)
        r = _ITEMS.get(key)
        if r is None:
            if len(_ITEMS) > 65536:
                _ITEMS.clear()
            r = _ITEMS[key] = f"{quote(k)}: {json_value(v)}"
        return r
    return f"{quote(k)}: {json_value(v)}"


def format_call(e: CallEvent) -> str:
    """The same object as json.dumps(event_dict(e)), built directly from cached pieces: the
    hot path (a call event per traced call; json.dumps costs about 4x more, design.md)."""
    hkey = (e.pid, e.tid)
    head = _HEADS.get(hkey)
    if head is None:
        head = _cached(_HEADS, hkey,
                       lambda: f'{{"event": "call", "pid": {e.pid}, "tid": {e.tid}, "time": ')
    fkey = (e.func, e.symbol)
    fn = _FUNCS.get(fkey)
    if fn is None:
        fn = _cached(_FUNCS, fkey,
                     lambda: f', "func": {quote(e.func)}, "symbol": {quote(e.symbol)}, "args": {{')
    ckey = (e.caller, e.caller_text, e.caller_symbol)
    caller = _CALLERS.get(ckey)
    if caller is None:
        caller = _cached(_CALLERS, ckey,
                         lambda: f', "caller": {quote(e.caller_text)}, '
                                 f'"caller_addr": "{e.caller:#x}", "caller_symbol": '
                                 f'{quote(e.caller_symbol) if e.caller_symbol else "null"}')
    akey = (e.func, *e.args.values())
    args = _ARGS.get(akey)
    if args is None:
        if len(_ARGS) > 65536:
            _ARGS.clear()
        args = _ARGS[akey] = ", ".join([_item(k, v) for k, v in e.args.items()])
    out = ", ".join([_item(k, v) for k, v in e.out.items()])
    line = (f'{head}{e.time!r}{fn}{args}}}, "ret": {e.ret}, '
            f'"errno": {quote(e.errno) if e.errno else "null"}, "out": {{{out}}}, '
            f'"fallback": {"true" if e.fallback else "false"}, '
            f'"fallback_reason": {quote(e.fallback_reason) if e.fallback_reason else "null"}, '
            f'"duration_ns": {e.duration_ns}{caller}, "site": '
            f'{quote(e.site) if e.site is not None else "null"}')
    if e.stack is not None:
        line += ', "stack": ' + json.dumps(list(e.stack))
    if e.ns_relative:
        line += ', "ns_relative": true'
    return line + "}"


def format_event(e: Event) -> str:
    if type(e) is CallEvent:
        return format_call(e)
    return json.dumps(event_dict(e), separators=(", ", ": "))
