"""Writing a recording (`vdsotrace record`); the format is described in
tracer/recording/format.py."""
from __future__ import annotations

import dataclasses
import json
import struct
import zlib
from typing import IO, Any

from tracer.events import Addr, CallEvent, Timespec, Timeval, Timezone, Unreadable
from tracer.recording.format import (
    CHUNK_BYTES, MAGIC, SLOT_BYTES, SlotContext, T_ARGS, T_CALL, T_CALLER, T_CLASS, T_END,
    T_EVENT, T_FUNC, T_IMAGE, T_NAME, T_PROCESS, T_SLOTCALLER, T_SLOTCTX, T_SLOTS, T_STACK, T_STR,
    VERSION, V_ADDR, V_BIGINT, V_BYTES, V_DICT, V_FALSE, V_FLOAT, V_INT, V_LIST, V_STR,
    V_TIMESPEC, V_TIMEVAL, V_TIMEZONE, V_TRUE, V_TUPLE, V_UNREADABLE, _BI, _BQ, _BQQ, _BUQ, _CALL,
    _CALLER, _CALL_FIELDS, _CHUNK, _CHUNK_MAGIC, _CLASS, _D, _DEF2, _EVENT, _FUNC, _F_FALLBACK,
    _F_NS_RELATIVE, _HEAD_N, _IMAGE, _KEY_INT, _KEY_TS, _NAME, _PRELUDE, _PROCESS, _SLOTCALLER,
    _SLOTCTX, _SLOTS, _U32, _enc_str)

__all__ = ["Writer"]


class Writer:
    """Serializes events into an open binary file; nothing of it needs a live process."""

    def __init__(self, f: IO[bytes], header: dict[str, Any]) -> None:
        self.f = f
        self.buf = bytearray()
        self.events = 0
        self.calls = 0
        self.bytes_written = 0
        self._strs: dict[str, int] = {}
        self._funcs: dict[str, tuple[int, str]] = {}          # symbol -> (id, func)
        self._args: dict[int, tuple[dict[str, Any], int]] = {}   # id(dict) -> (dict, id)
        self._args_by_value: dict[tuple[Any, ...], int] = {}
        self._callers: dict[int, tuple[int, str, str | None]] = {}  # address -> (id, names)
        self._stacks: dict[tuple[str, ...], int] = {}
        self._classes: dict[type, tuple[int, tuple[str, ...]]] = {}
        self._images: dict[bytes, int] = {}
        self._slot_ctx: dict[SlotContext, int] = {}
        self._slot_callers: dict[tuple[int, int], tuple[str, str | None]] = {}
        self._next = 1
        head = json.dumps(header, sort_keys=True).encode()
        self._write(_PRELUDE.pack(MAGIC, VERSION, 0, len(head)) + head
                    + _U32.pack(zlib.crc32(head)))

    # ---------------------------------------------------------------- interning
    def _id(self) -> int:
        n = self._next
        self._next = n + 1
        return n

    def sid(self, s: str | None) -> int:
        if s is None:
            return 0
        n = self._strs.get(s)
        if n is None:
            if len(self._strs) > 1 << 18:
                self._strs.clear()  # ids already written stay valid in the reader
            n = self._strs[s] = self._id()
            b = _enc_str(s)
            self.buf += _DEF2.pack(T_STR, n, len(b))
            self.buf += b
        return n

    def _func(self, func: str, symbol: str) -> tuple[int, str]:
        n = self._id()
        self.buf += _FUNC.pack(T_FUNC, n, self.sid(func), self.sid(symbol))
        r = self._funcs[symbol] = (n, func)
        return r

    def _argmap(self, args: dict[str, Any]) -> int:
        # the engine hands the same dict for the same raw arguments (its cache): by identity
        # first (the dict kept alive here, so its id cannot be reused), then by value
        key: tuple[Any, ...] | None = tuple(args.items())
        try:
            n = self._args_by_value.get(key)  # type: ignore[arg-type]
        except TypeError:           # an unhashable value: not interned by value
            key, n = None, None
        if n is None:
            body = b"".join([_U32.pack(self.sid(k)) + self.value(v) for k, v in args.items()])
            n = self._id()
            if key is not None:
                if len(self._args_by_value) > 65536:
                    self._args_by_value.clear()
                self._args_by_value[key] = n
            self.buf += _HEAD_N.pack(T_ARGS, n, len(args))
            self.buf += body
        if len(self._args) > 65536:
            self._args.clear()
        self._args[id(args)] = (args, n)
        return n

    def _caller(self, key: tuple[int, str, str | None]) -> tuple[int, str, str | None]:
        text, sym = self.sid(key[1]), self.sid(key[2])
        n = self._id()
        self.buf += _CALLER.pack(T_CALLER, n, key[0] & 0xFFFFFFFFFFFFFFFF, text, sym)
        if len(self._callers) > 65536:
            self._callers.clear()
        r = self._callers[key[0]] = (n, key[1], key[2])
        return r

    def _stack(self, stack: tuple[str, ...]) -> int:
        ids = [self.sid(s) for s in stack]
        if len(self._stacks) > 65536:
            self._stacks.clear()
        n = self._stacks[stack] = self._id()
        self.buf += _HEAD_N.pack(T_STACK, n, len(ids))
        self.buf += struct.pack(f"<{len(ids)}I", *ids)
        return n

    def _class(self, cls: type) -> tuple[int, tuple[str, ...]]:
        names: tuple[str, ...]
        if dataclasses.is_dataclass(cls):
            names = tuple(f.name for f in dataclasses.fields(cls))
        else:
            names = tuple(getattr(cls, "_fields"))
        ids = [self.sid(nm) for nm in names]
        n = self._id()
        self.buf += _CLASS.pack(T_CLASS, n, self.sid(cls.__name__), len(ids))
        self.buf += struct.pack(f"<{len(ids)}I", *ids)
        self._classes[cls] = (n, names)
        return n, names

    # ---------------------------------------------------------------- values
    def value(self, v: Any) -> bytes:
        t = type(v)
        if t is int:
            if -(1 << 63) <= v < (1 << 63):
                return _BQ.pack(V_INT, v)
            b = v.to_bytes((v.bit_length() + 8) // 8, "little", signed=True)
            return bytes((V_BIGINT,)) + _U32.pack(len(b)) + bytes(b)
        if t is str:
            return _BI.pack(V_STR, self.sid(v))
        if v is None:
            return b"\x00"
        if t is bool:
            return bytes((V_TRUE if v else V_FALSE,))
        if t is Timespec:
            return self._pair(V_TIMESPEC, v.tv_sec, v.tv_nsec)
        if t is Addr:
            return _BUQ.pack(V_ADDR, v.value & 0xFFFFFFFFFFFFFFFF)
        if t is Unreadable:
            return _BUQ.pack(V_UNREADABLE, v.addr & 0xFFFFFFFFFFFFFFFF)
        if t is Timeval:
            return self._pair(V_TIMEVAL, v.tv_sec, v.tv_usec)
        if t is Timezone:
            return self._pair(V_TIMEZONE, v.tz_minuteswest, v.tz_dsttime)
        if t is float:
            return bytes((V_FLOAT,)) + _D.pack(v)
        if t is bytes:
            return bytes((V_BYTES,)) + _U32.pack(len(v)) + bytes(v)
        if t is tuple or t is list:
            return (bytes((V_TUPLE if t is tuple else V_LIST,)) + _U32.pack(len(v))
                    + b"".join([self.value(x) for x in v]))
        if t is dict:
            return (bytes((V_DICT,)) + _U32.pack(len(v))
                    + b"".join([self.value(k) + self.value(x) for k, x in v.items()]))
        return _BI.pack(V_STR, self.sid(str(v)))   # no such value in events.Value today

    def _pair(self, tag: int, a: int, b: int) -> bytes:
        try:
            return _BQQ.pack(tag, a, b)
        except struct.error:       # outside 64 bits: a tuple of ints, rebuilt as the type
            return bytes((tag + 16,)) + bytes(self.value((a, b)))

    # ---------------------------------------------------------------- records
    def call(self, e: CallEvent) -> None:
        if len(e) != _CALL_FIELDS:  # a CallEvent with fields this layout does not know
            self.event(e)
            return
        (pid, tid, t, func, symbol, args, ret, errno, out, fallback, reason, dur, caller,
         ctext, csym, stack, ns_rel, site) = e
        fid = self._funcs.get(symbol)
        if fid is None or fid[1] != func:
            fid = self._func(func, symbol)
        hit = self._args.get(id(args))
        aid = hit[1] if hit is not None and hit[0] is args else self._argmap(args)
        cid = self._callers.get(caller)
        if cid is None or cid[1] != ctext or cid[2] != csym:
            cid = self._caller((caller, ctext, csym))
        strs = self._strs
        try:
            head = _CALL.pack(
                T_CALL, pid, tid, t, fid[0], aid, ret,
                0 if errno is None else (strs.get(errno) or self.sid(errno)),
                (_F_FALLBACK if fallback else 0) | (_F_NS_RELATIVE if ns_rel else 0),
                0 if reason is None else (strs.get(reason) or self.sid(reason)),
                dur, cid[0], 0 if site is None else (strs.get(site) or self.sid(site)),
                0 if stack is None else (self._stacks.get(stack) or self._stack(stack)),
                len(out))
        except struct.error:        # a field outside its width: the generic layout
            self.event(e)
            return
        buf = self.buf
        buf += head
        v: Any
        for k, v in out.items():
            ks = strs.get(k) or self.sid(k)
            ty = type(v)
            if ty is Timespec:
                try:
                    buf += _KEY_TS.pack(ks, V_TIMESPEC, v.tv_sec, v.tv_nsec)
                    continue
                except struct.error:
                    pass
            elif ty is int and -(1 << 63) <= v < (1 << 63):
                buf += _KEY_INT.pack(ks, V_INT, v)
                continue
            val = self.value(v)
            buf += _U32.pack(ks)
            buf += val
        self.events += 1
        self.calls += 1
        if len(buf) >= CHUNK_BYTES:
            self.flush()

    def event(self, e: Any) -> None:
        """Any event (a frozen dataclass or a NamedTuple of tracer.events) by its fields."""
        hit = self._classes.get(type(e))
        cid, names = hit if hit is not None else self._class(type(e))
        body = b"".join([self.value(getattr(e, nm)) for nm in names])
        self.buf += _EVENT.pack(T_EVENT, cid)
        self.buf += body
        self.events += 1
        if type(e) is CallEvent:
            self.calls += 1
        if len(self.buf) >= CHUNK_BYTES:
            self.flush()

    def process(self, pid: int, abi: str, base: int, image: bytes) -> None:
        """The vDSO image of a process (at its attach or exec), before that event; each
        distinct image is written once."""
        n = self._images.get(image, 0) if image else 0
        if image and not n:
            n = self._images[image] = self._id()
            self.buf += _IMAGE.pack(T_IMAGE, n, len(image))
            self.buf += image
        self.buf += _PROCESS.pack(T_PROCESS, pid, self.sid(abi), base, n)

    def slot_context(self, ctx: SlotContext) -> int:
        """The id of a SLOTCTX record for ctx (written the first time)."""
        n = self._slot_ctx.get(ctx)
        if n is None:
            n = self._slot_ctx[ctx] = self._id()
            ids = [self.sid(x) for pair in ctx.funcs for x in pair]
            self.buf += _SLOTCTX.pack(T_SLOTCTX, n, ctx.pid, self.sid(ctx.abi),
                                      ctx.mono_to_epoch,
                                      2 if ctx.fast_path is None else int(ctx.fast_path),
                                      int(ctx.timens), len(ctx.funcs))
            self.buf += struct.pack(f"<{len(ids)}I", *ids)
        return n

    def slot_callers(self, pid: int, names: dict[int, tuple[str, str | None]]) -> None:
        """How the engine names these return addresses now (written when it changed)."""
        known = self._slot_callers
        for addr, nm in names.items():
            key = (pid, addr)
            if known.get(key) != nm:
                if len(known) > 65536:
                    known.clear()
                known[key] = nm
                self.buf += _SLOTCALLER.pack(T_SLOTCALLER, pid, addr & 0xFFFFFFFFFFFFFFFF,
                                             self.sid(nm[0]), self.sid(nm[1]))

    def slots(self, ctx: SlotContext, data: bytes | memoryview, rate: float, tsc0: int,
              ns0: int) -> None:
        """Ring slots as the ring held them (len(data) a multiple of SLOT_BYTES), decoded with
        ctx and this calibration: a chunk of their own, written from `data` as it is (what is
        buffered goes first, in its own chunk)."""
        n = self.slot_context(ctx)
        count = len(data) // SLOT_BYTES
        self.flush()
        head = _SLOTS.pack(T_SLOTS, n, rate, tsc0 & 0xFFFFFFFFFFFFFFFF, ns0, count)
        self._write(_CHUNK.pack(_CHUNK_MAGIC, len(head) + len(data),
                                zlib.crc32(data, zlib.crc32(head))) + head)
        self._write(data)
        self.events += count
        self.calls += count

    def name(self, pid: int, tid: int, comm: str | None) -> None:
        """A thread's comm as it was read at this point of the trace."""
        self.buf += _NAME.pack(T_NAME, pid, tid, self.sid(comm))

    def end(self, trailer: dict[str, Any]) -> None:
        self.buf += bytes((T_END,)) + self.value(trailer)
        self.flush()

    def flush(self) -> None:
        buf = self.buf
        if not buf:
            return
        head = _CHUNK.pack(_CHUNK_MAGIC, len(buf), zlib.crc32(buf))
        if len(buf) < 4096:
            self._write(head + buf)
        else:                   # (a run of slots: not copied once more)
            self._write(head)
            self._write(buf)
        buf.clear()

    def _write(self, data: bytes | bytearray | memoryview) -> None:
        self.f.write(data)
        self.f.flush()
        self.bytes_written += len(data)
