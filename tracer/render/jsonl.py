"""Events -> one JSON object per line (interface.md's schema)."""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from tracer.abi import Abi, abi_by_name
from tracer.decoders import Decoder, errno_name, for_function
from tracer.inject.layout import MAX_ARGS, NOUTS
from tracer.events import (Addr, AttachEvent, CallEvent, DetachEvent, Event, ExecEvent,
                           ExitEvent, NoticeEvent, SignalEvent, SigreturnEvent, SyscallEvent,
                           Timespec, Timeval, Timezone, Unreadable, Value)
from tracer.render.escape import quote_bytes

if TYPE_CHECKING:
    from tracer.inject.batch import SlotRun
    from tracer.recording.format import SlotContext

__all__ = ["to_json_value", "event_dict", "format_event", "format_call", "quote", "json_value",
           "SlotLines"]


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


# ------------------------------------------------------------------ runs of ring slots

_MIN_SEGMENT = 32       # slots a segment of one key holds on average, or the events' way
_FIELDS = {"timespec": ("tv_sec", "tv_nsec"), "timespec64": ("tv_sec", "tv_nsec"),
           "timeval": ("tv_sec", "tv_usec"), "timezone": ("tz_minuteswest", "tz_dsttime")}


class _Ctx:
    """What the lines of one SlotContext share: its ABI, decoders, and the constant parts of
    the lines already made, by slot key."""
    __slots__ = ("abi", "decoders", "nargs", "fmts", "keys")

    def __init__(self, ctx: SlotContext) -> None:
        self.abi: Abi = abi_by_name(ctx.abi)
        self.decoders: list[Decoder] = [for_function(p) for p, _ in ctx.funcs]
        self.nargs = [min(d.nargs, MAX_ARGS) for d in self.decoders]
        # per function, per out copied into the slot: the struct format of its fields
        self.fmts: list[list[str]] = []
        for d in self.decoders:
            fmts = []
            for o in d.outs[:NOUTS]:
                if o.layout == "u32":
                    fmts.append("I")
                else:
                    fmts.append(getattr(self.abi, o.layout if o.layout != "time_t"
                                        else "time_t"))
            self.fmts.append(fmts)
        self.keys: dict[tuple[Any, ...], tuple[str, str, list[str | tuple[int, str, str]],
                                               str, str]] = {}


def _value_text(layout: str, fields: tuple[int, ...]) -> str:
    """json_value of the decoded out value, from its integer fields."""
    names = _FIELDS.get(layout)
    if names is None:
        return str(fields[0])
    return f'{{"{names[0]}": {fields[0]}, "{names[1]}": {fields[1]}}}'


class SlotLines:
    """JSON lines for runs of ring slots (--inject --json), byte for byte the lines
    format_call makes of the CallEvents the engine's call assembly (engine/calls.py) makes
    of the same slots, without building those events: the parts of a line that only depend
    on a slot's thread, function, arguments, return value, flags and caller are made once per
    distinct such key, the times, durations and out values are filled in from numpy columns
    (inject/batch.py). tests/test_slot_lines.py holds it to the events' way."""

    def __init__(self, min_segment: int = _MIN_SEGMENT) -> None:
        self._ctx: dict[SlotContext, _Ctx] = {}
        self.min_segment = min_segment
        # numpy's door (imported here: a trace that renders no slots does without it)
        from tracer.inject import batch
        self._batch = batch

    def render(self, ctx: SlotContext, run: SlotRun,
               callers: dict[int, tuple[str, str | None]]) -> list[str] | None:
        """The lines of `run`, in order; None when the run needs the events' way (a time or
        duration out of the range the columns compute exactly, or fewer than min_segment
        slots per distinct key on average)."""
        cx = self._ctx.get(ctx)
        if cx is None:
            if len(self._ctx) > 64:
                self._ctx.clear()
            cx = self._ctx[ctx] = _Ctx(ctx)
        batch = self._batch
        slots = run.slots
        durs = batch.durations(run)
        if durs is None:
            return None
        # each time as repr() writes the float (format_call's {e.time!r}), from two integers
        # where batch.time_digits is sure of the digits (5x cheaper than repr)
        # the time's whole seconds go with the line's head, its fraction is str(p)[1:]
        digits = batch.time_digits(run, ctx.mono_to_epoch)
        if digits is not None:
            secs, times = digits
        else:
            seconds = batch.entry_times(run, ctx.mono_to_epoch)
            if seconds is None:
                return None
            secs, times = None, ["#" + repr(x) for x in seconds]
        nargs = max(cx.nargs[f] for f in batch.distinct(slots["fid"]))
        n = len(slots)
        bounds = batch.key_bounds(slots, nargs, secs)
        if (len(bounds) - 1) * self.min_segment <= n:
            lines: list[str] = []
            for s, e in zip(bounds, bounds[1:]):
                lines += self._segment(ctx, cx, slots[s:e], times[s:e], durs[s:e],
                                       None if secs is None else int(secs[s]), callers)
            return lines
        # keys that take turns (threads sharing the ring): made group by group, put back in
        # ring order
        groups = batch.key_groups(slots, nargs, secs, n // self.min_segment)
        if groups is None:
            return None         # more keys than is worth it: the events' way
        out: list[str] = [""] * n
        for g in groups:
            idx = g.tolist()
            made = self._segment(ctx, cx, slots[g], [times[i] for i in idx],
                                 [durs[i] for i in idx],
                                 None if secs is None else int(secs[idx[0]]), callers)
            for i, line in zip(idx, made):
                out[i] = line
        return out

    def _segment(self, ctx: SlotContext, cx: _Ctx, seg: Any, t: list[Any], d: list[int],
                 sec: int | None, callers: dict[int, tuple[str, str | None]]) -> list[str]:
        """The lines of slots that share a key (thread, function, arguments, result, flags,
        caller, whole seconds `sec`), in order; t: each time's fraction as str(x)[1:]
        gives it (or its whole repr() where sec is None), d: the durations."""
        r0 = seg[0]
        fid = int(r0["fid"])
        raw = tuple(int(r0[f"a{k}"]) for k in range(cx.nargs[fid]))
        caller = int(r0["caller"])
        # (the caller's names in the key: the engine names an address anew when the
        # process maps something there)
        key = (int(r0["tid"]), fid, int(r0["flags"]), int(r0["ret"]), caller,
               callers.get(caller), *raw)
        parts = cx.keys.get(key)
        if parts is None:
            if len(cx.keys) > 65536:
                cx.keys.clear()
            parts = cx.keys[key] = self._parts(ctx, cx, key, raw, callers)
        head, mid, outs, tail, rest = parts
        if sec is not None:
            head = f"{head}{sec}."
        if not outs:
            return [f"{head}{str(x)[1:]}{mid}{tail}{y}{rest}" for x, y in zip(t, d)]
        if len(outs) == 1 and type(outs[0]) is tuple:
            k, layout, name = outs[0]
            cols = self._batch.out_fields(seg, k, cx.fmts[fid][k])
            names = _FIELDS.get(layout)
            if names is not None:
                pre = f'{mid}{name}{{"{names[0]}": '
                sep = f', "{names[1]}": '
                post = "}" + tail
                return [f"{head}{str(x)[1:]}{pre}{a}{sep}{b}{post}{y}{rest}"
                        for x, a, b, y in zip(t, cols[0], cols[1], d)]
            pre = mid + name
            return [f"{head}{str(x)[1:]}{pre}{a}{tail}{y}{rest}"
                    for x, a, y in zip(t, cols[0], d)]
        # several items, some filled per slot: each slot's `out` text made apart
        texts: list[list[str]] = []
        for o in outs:
            if type(o) is tuple:
                k, layout, name = o
                cols = self._batch.out_fields(seg, k, cx.fmts[fid][k])
                texts.append([name + _value_text(layout, v) for v in zip(*cols)])
            else:
                texts.append([o] * len(seg))  # type: ignore[list-item]
        return [f"{head}{str(x)[1:]}{mid}{', '.join(o)}{tail}{y}{rest}"
                for x, o, y in zip(t, zip(*texts), d)]

    def _parts(self, ctx: SlotContext, cx: _Ctx, key: tuple[Any, ...], raw: tuple[int, ...],
               callers: dict[int, tuple[str, str | None]]
               ) -> tuple[str, str, list[str | tuple[int, str, str]], str, str]:
        """The constant parts of a line, as CallAssembly.call and format_call make them:
        (the head up to the time; from the time to the out items, with the leading items
        that are constant; the items to fill per slot: (out index, layout, '"name": '), or
        constant text between them; from the out items to the duration; after it)."""
        tid, fid, flags, uret, caller = key[:5]
        func, symbol = ctx.funcs[fid]
        dec = cx.decoders[fid]
        abi = cx.abi
        ret = abi.signed(uret)
        err = None if ret >= 0 or dec.ret_is_value else errno_name(ret)
        fallback = bool(flags & 1)
        reason = None
        if fallback:
            reason = dec.fallback_reason(raw, ret)
            if reason is None:
                reason = "no-vdso-clocksource" if ctx.fast_path is False else "unknown"
        args = dec.decode_args(raw, abi)
        from tracer.engine.state import _NS_CLOCKS, _NS_READS
        ns_rel = (ctx.timens and func in _NS_READS and args.get("clockid") in _NS_CLOCKS)
        outs: list[str | tuple[int, str, str]] = []
        for k, spec in enumerate(dec.outs[:NOUTS]):
            addr = raw[spec.arg]
            if not addr:
                continue
            if flags & (2 << k):
                outs.append((k, spec.layout, f"{quote(spec.name)}: "))
            else:
                outs.append(_item(spec.name, Unreadable(addr)))
        text, sym = callers.get(caller) or (f"{caller:#x}", None)
        head = f'{{"event": "call", "pid": {ctx.pid}, "tid": {tid}, "time": '
        mid = (f', "func": {quote(func)}, "symbol": {quote(symbol)}, "args": {{'
               + ", ".join([_item(k, v) for k, v in args.items()])
               + f'}}, "ret": {ret}, "errno": {quote(err) if err else "null"}, "out": {{')
        rest = (f', "caller": {quote(text)}, "caller_addr": "{caller:#x}", "caller_symbol": '
                f'{quote(sym) if sym else "null"}, "site": null'
                + (', "ns_relative": true' if ns_rel else "") + "}")
        tail = (f'}}, "fallback": {"true" if fallback else "false"}, '
                f'"fallback_reason": {quote(reason) if reason else "null"}, "duration_ns": ')
        if all(type(o) is str for o in outs):   # nothing to fill: all in mid
            mid += ", ".join(outs)  # type: ignore[arg-type]
            outs = []
        return head, mid, outs, tail, rest
