"""Reading a recording (`vdsotrace report`); the format is described in
tracer/recording/format.py. A damaged file is read up to its damage."""
from __future__ import annotations

import dataclasses
import json
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

from tracer import events as _events
from tracer.events import Addr, CallEvent, Timespec, Timeval, Timezone, Unreadable
from tracer.recording.format import (
    Damage, MAGIC, MAX_CHUNK, MAX_HEADER, Name, Process, READS, RecordingError, SLOT_BYTES,
    SlotCaller, SlotContext, Slots, T_ARGS, T_CALL, T_CALLER, T_CLASS, T_END, T_EVENT, T_FUNC,
    T_IMAGE, T_NAME, T_PROCESS, T_SLOTCALLER, T_SLOTCTX, T_SLOTS, T_STACK, T_STR, Trailer,
    VERSION, V_ADDR, V_BIGINT, V_BYTES, V_DICT, V_FALSE, V_FLOAT, V_INT, V_LIST, V_NONE, V_STR,
    V_TIMESPEC, V_TIMEVAL, V_TIMEZONE, V_TRUE, V_TUPLE, V_UNREADABLE, _CALL, _CALLER, _CHUNK,
    _CHUNK_MAGIC, _CLASS, _D, _DEF2, _EVENT, _FUNC, _F_FALLBACK, _F_NS_RELATIVE, _HEAD_N, _IMAGE,
    _NAME, _PRELUDE, _PROCESS, _Q, _SLOTCALLER, _SLOTCTX, _SLOTS, _U32, _UQ)

__all__ = ["Reader"]


class _Short(Exception):
    """A record runs past the data available."""


class _Bad(Exception):
    """Bytes that are no record."""


_EVENT_CLASSES: dict[str, type] = {
    name: cls for name in _events.__all__
    if isinstance(cls := getattr(_events, name), type)
    and (dataclasses.is_dataclass(cls) or hasattr(cls, "_fields"))}


@dataclass
class Reader:
    """Reads a recording: `header` at once (a file that is not a readable recording raises
    RecordingError), then `items()` yields events, Process, name updates (pid, tid, comm) and
    the Trailer, in file order, stopping at damage (then `damage` says where and what)."""
    f: IO[bytes]
    path: str
    header: dict[str, Any] = field(default_factory=dict)
    damage: Damage | None = None
    trailer: Trailer | None = None
    _strs: dict[int, str | None] = field(default_factory=lambda: {0: None})
    _funcs: dict[int, tuple[str, str]] = field(default_factory=dict)
    _args: dict[int, dict[str, Any]] = field(default_factory=dict)
    _callers: dict[int, tuple[int, str, str | None]] = field(default_factory=dict)
    _stacks: dict[int, tuple[str, ...]] = field(default_factory=dict)
    _classes: dict[int, tuple[type | None, tuple[str, ...]]] = field(default_factory=dict)
    _images: dict[int, bytes] = field(default_factory=dict)
    _slot_ctx: dict[int, SlotContext] = field(default_factory=dict)
    version: int = 0
    _offset: int = 0
    _chunk_at: int = 0

    def __post_init__(self) -> None:
        pre = self.f.read(_PRELUDE.size)
        if len(pre) < _PRELUDE.size or pre[:8] != MAGIC:
            raise RecordingError(f"{self.path}: not a vdsotrace recording (no {MAGIC[:7].decode()}"
                                 " magic at its start); give a file written by "
                                 "`vdsotrace record -o FILE`")
        magic, version, _flags, n = _PRELUDE.unpack(pre)
        if version not in READS:
            raise RecordingError(f"{self.path}: recording format version {version}, this "
                                 f"vdsotrace reads versions {READS[0]} to {READS[-1]} only"
                                 + (": report it with a newer vdsotrace" if version > VERSION
                                    else ": record it again"))
        head = self.f.read(n + 4) if n <= MAX_HEADER else b""
        if len(head) < n + 4:
            raise RecordingError(f"{self.path}: the recording's header is cut short (the file "
                                 "ends inside it): nothing to report")
        if zlib.crc32(head[:n]) != _U32.unpack_from(head, n)[0]:
            raise RecordingError(f"{self.path}: the recording's header is damaged (its "
                                 "checksum does not match): nothing to report")
        try:
            hdr = json.loads(head[:n])
        except ValueError:
            hdr = None
        if not isinstance(hdr, dict):
            raise RecordingError(f"{self.path}: the recording's header is not readable")
        self.header = hdr
        self.version = version
        self._offset = _PRELUDE.size + n + 4

    @property
    def offset(self) -> int:
        """Where the chunk being read starts (or the end of what was read)."""
        return self._chunk_at

    # ---------------------------------------------------------------- chunks
    def items(self) -> Iterator[Any]:
        while True:
            at = self._chunk_at = self._offset
            head = self.f.read(_CHUNK.size)
            if not head:
                if self.trailer is None:
                    self.damage = Damage(at, "the recording has no end record: it was cut "
                                         "short (vdsotrace record killed, or the file "
                                         "truncated)")
                return
            if len(head) < _CHUNK.size:
                self.damage = Damage(at, "the file ends inside a chunk header (truncated)")
                return
            magic, n, crc = _CHUNK.unpack(head)
            if magic != _CHUNK_MAGIC or n > MAX_CHUNK:
                self.damage = Damage(at, "corrupt data (no chunk starts there)")
                return
            data = self.f.read(n)
            self._offset = at + _CHUNK.size + len(data)
            whole = len(data) == n
            if whole and zlib.crc32(data) != crc:
                self.damage = Damage(at, "corrupt data (a chunk fails its checksum)")
                return
            base = at + _CHUNK.size
            pos = 0
            try:
                while pos < len(data):
                    item, pos = self._record(data, pos)
                    if item is not None:
                        yield item
            except (_Short, struct.error, IndexError):
                self.damage = Damage(base + pos, "the file ends inside a record (truncated)"
                                     if not whole else "corrupt record (it runs past its "
                                     "chunk)")
                return
            except (_Bad, KeyError, ValueError, TypeError, UnicodeDecodeError) as e:
                self.damage = Damage(base + pos, f"corrupt record ({e or type(e).__name__})")
                return
            if not whole:
                self.damage = Damage(base + len(data), "the file ends inside a chunk "
                                     "(truncated)")
                return
            if self.trailer is not None:
                return

    # ---------------------------------------------------------------- records
    def _str(self, n: int) -> str | None:
        try:
            return self._strs[n]
        except KeyError:
            raise _Bad(f"string {n} used before it is defined") from None

    def _strings(self, d: bytes, p: int, n: int) -> tuple[tuple[str, ...], int]:
        """n u32 string ids at p, as the strings."""
        ids = struct.unpack_from(f"<{n}I", d, p)
        return tuple(self._str(i) or "" for i in ids), p + 4 * n

    def _named_values(self, d: bytes, p: int, n: int) -> tuple[dict[str, Any], int]:
        """n pairs (u32 string id, value) at p, as a dict by name."""
        out: dict[str, Any] = {}
        for _ in range(n):
            k = self._str(_U32.unpack_from(d, p)[0])
            v, p = self._value(d, p + 4)
            out[k or ""] = v
        return out, p

    def _record(self, d: bytes, p: int) -> tuple[Any, int]:
        tag = d[p]
        if tag == T_CALL:
            (_, pid, tid, t, fid, aid, ret, errno, flags, reason, dur, cid, site, stid,
             nout) = _CALL.unpack_from(d, p)
            out, p = self._named_values(d, p + _CALL.size, nout)
            func, symbol = self._funcs[fid]
            caller, ctext, csym = self._callers[cid]
            return CallEvent(pid, tid, t, func, symbol, self._args[aid], ret, self._str(errno),
                             out, bool(flags & _F_FALLBACK), self._str(reason), dur, caller,
                             ctext, csym, self._stacks[stid] if stid else None,
                             bool(flags & _F_NS_RELATIVE), self._str(site)), p
        if tag == T_SLOTS and self.version >= 2:
            _, n, rate, tsc0, ns0, count = _SLOTS.unpack_from(d, p)
            p += _SLOTS.size
            end = p + count * SLOT_BYTES
            if end > len(d):
                raise _Short()
            try:
                ctx = self._slot_ctx[n]
            except KeyError:
                raise _Bad(f"slots of context {n} before it is defined") from None
            return Slots(ctx, d[p:end], rate, tsc0, ns0), end
        if tag == T_STR:
            _, n, ln = _DEF2.unpack_from(d, p)
            p += _DEF2.size
            if p + ln > len(d):
                raise _Short()
            self._strs[n] = d[p:p + ln].decode("utf-8", "surrogatepass")
            return None, p + ln
        if tag == T_FUNC:
            _, n, a, b = _FUNC.unpack_from(d, p)
            self._funcs[n] = (self._str(a) or "", self._str(b) or "")
            return None, p + _FUNC.size
        if tag == T_ARGS:
            _, n, cnt = _HEAD_N.unpack_from(d, p)
            self._args[n], p = self._named_values(d, p + _HEAD_N.size, cnt)
            return None, p
        if tag == T_CALLER:
            _, n, addr, text, sym = _CALLER.unpack_from(d, p)
            self._callers[n] = (addr, self._str(text) or "", self._str(sym))
            return None, p + _CALLER.size
        if tag == T_STACK:
            _, n, cnt = _HEAD_N.unpack_from(d, p)
            self._stacks[n], p = self._strings(d, p + _HEAD_N.size, cnt)
            return None, p
        if tag == T_CLASS:
            _, n, name, cnt = _CLASS.unpack_from(d, p)
            names, p = self._strings(d, p + _CLASS.size, cnt)
            self._classes[n] = (_EVENT_CLASSES.get(self._str(name) or ""), names)
            return None, p
        if tag == T_EVENT:
            _, cid = _EVENT.unpack_from(d, p)
            p += _EVENT.size
            cls, names = self._classes[cid]
            vals = {}
            for nm in names:
                vals[nm], p = self._value(d, p)
            if cls is None:
                return None, p             # a class this vdsotrace does not know: skipped
            known = (set(f.name for f in dataclasses.fields(cls)) if dataclasses.is_dataclass(cls)
                     else set(getattr(cls, "_fields")))
            return cls(**{k: v for k, v in vals.items() if k in known}), p
        if tag == T_PROCESS:
            _, pid, abi, base, n = _PROCESS.unpack_from(d, p)
            image = self._images[n] if n else b""
            return Process(pid, self._str(abi) or "?", base, image), p + _PROCESS.size
        if tag == T_IMAGE:
            _, n, ln = _IMAGE.unpack_from(d, p)
            p += _IMAGE.size
            if p + ln > len(d):
                raise _Short()
            self._images[n] = d[p:p + ln]
            return None, p + ln
        if tag == T_NAME:
            _, pid, tid, comm = _NAME.unpack_from(d, p)
            return Name(pid, tid, self._str(comm)), p + _NAME.size
        if tag == T_SLOTCTX and self.version >= 2:
            _, n, pid, abi, m2e, fast, timens, cnt = _SLOTCTX.unpack_from(d, p)
            names, p = self._strings(d, p + _SLOTCTX.size, 2 * cnt)
            if fast > 2 or timens > 1:
                raise _Bad("a slot context with flags no writer sets")
            self._slot_ctx[n] = SlotContext(pid, self._str(abi) or "?",
                                            tuple(zip(names[::2], names[1::2])), m2e,
                                            None if fast == 2 else bool(fast), bool(timens))
            return None, p
        if tag == T_SLOTCALLER and self.version >= 2:
            _, pid, addr, text, sym = _SLOTCALLER.unpack_from(d, p)
            return SlotCaller(pid, addr, self._str(text) or "", self._str(sym)), \
                p + _SLOTCALLER.size
        if tag == T_END:
            v, p = self._value(d, p + 1)
            if not isinstance(v, dict):
                raise _Bad("the end record holds no table")
            self.trailer = Trailer(v)
            return self.trailer, p
        raise _Bad(f"unknown record type {tag}")

    def _value(self, d: bytes, p: int) -> tuple[Any, int]:
        tag = d[p]
        p += 1
        if tag == V_INT:
            return _Q.unpack_from(d, p)[0], p + 8
        if tag == V_STR:
            return self._str(_U32.unpack_from(d, p)[0]), p + 4
        if tag == V_TIMESPEC:
            a, b = struct.unpack_from("<qq", d, p)
            return Timespec(a, b), p + 16
        if tag == V_NONE:
            return None, p
        if tag == V_FALSE or tag == V_TRUE:
            return tag == V_TRUE, p
        if tag == V_ADDR:
            return Addr(_UQ.unpack_from(d, p)[0]), p + 8
        if tag == V_UNREADABLE:
            return Unreadable(_UQ.unpack_from(d, p)[0]), p + 8
        if tag == V_TIMEVAL:
            a, b = struct.unpack_from("<qq", d, p)
            return Timeval(a, b), p + 16
        if tag == V_TIMEZONE:
            a, b = struct.unpack_from("<qq", d, p)
            return Timezone(a, b), p + 16
        if tag in (V_TIMESPEC + 16, V_TIMEVAL + 16, V_TIMEZONE + 16):
            pair, p = self._value(d, p)
            cls: Callable[..., Any] = {V_TIMESPEC + 16: Timespec, V_TIMEVAL + 16: Timeval,
                                       V_TIMEZONE + 16: Timezone}[tag]
            return cls(*pair), p
        if tag == V_FLOAT:
            return _D.unpack_from(d, p)[0], p + 8
        if tag == V_BIGINT or tag == V_BYTES:
            n = _U32.unpack_from(d, p)[0]
            p += 4
            if p + n > len(d):
                raise _Short()
            raw = d[p:p + n]
            return (int.from_bytes(raw, "little", signed=True) if tag == V_BIGINT
                    else bytes(raw)), p + n
        if tag == V_TUPLE or tag == V_LIST:
            n = _U32.unpack_from(d, p)[0]
            p += 4
            if n > len(d) - p:
                raise _Short()
            items = []
            for _ in range(n):
                v, p = self._value(d, p)
                items.append(v)
            return (tuple(items) if tag == V_TUPLE else items), p
        if tag == V_DICT:
            n = _U32.unpack_from(d, p)[0]
            p += 4
            if n > len(d) - p:
                raise _Short()
            out = {}
            for _ in range(n):
                k, p = self._value(d, p)
                v, p = self._value(d, p)
                out[k] = v
            return out, p
        raise _Bad(f"unknown value type {tag}")
