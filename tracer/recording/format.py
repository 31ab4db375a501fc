"""The recording format (`vdsotrace record` writes it, `vdsotrace report` reads it): the events
the engine hands to its sink, serialized compactly. README.md ("The recording format")
documents it.

    prelude   8s magic b"VDSOREC\\n", u16 version, u16 flags (0), u32 n
    header    n bytes of UTF-8 JSON (tool version, host arch, command or pids, options,
              clocksource, start time), then u32 crc32 of those n bytes
    chunks    4s b"CHNK", u32 length, u32 crc32 of the payload, payload: whole records

Little-endian throughout. A record is a u8 type tag and struct-packed fields. Strings
(function names, symbols, callers, errno names, ...) are defined once (STR) and referred to by
a u32 id (0: None); argument maps, callers, stacks and event classes are interned the same way,
so a call record is 63 bytes plus its `out` values. Definitions always precede their use, so a
reader that stops at damage can render everything before it. The writer emits whole chunks
(at most ~256 KiB, on every tick of the engine), so a recorder killed mid-run leaves a file
whose chunks are all readable; a file ends with an END record (the trailer).

Version 2 adds raw ring slots (`record --inject`): SLOTS records hold runs of the in-tracee
recorder's ring slots as the ring held them (inject/layout.py), with the clock calibration in
force; a SLOTCTX record says how to decode them (the process, ABI, the recorder's function
table, the clock's epoch offset), SLOTCALLER records name their return addresses. `report`
decodes them through the live drain's own code (recording/replay.py).

Version rule: VERSION changes with any change of a layout or of a record's meaning; a reader
reads exactly the versions it knows (READS) and refuses others in one line.
"""
from __future__ import annotations

import dataclasses
import json
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

from tracer import events as _events
from tracer.errors import TracerError
from tracer.events import Addr, CallEvent, Timespec, Timeval, Timezone, Unreadable

__all__ = ["MAGIC", "VERSION", "READS", "RecordingError", "Writer", "Reader", "Process",
           "Name", "Trailer", "Damage", "SlotContext", "Slots", "SlotCaller"]

MAGIC = b"VDSOREC\n"
VERSION = 2
READS = (1, 2)                  # version 1: no slot records (otherwise the same)
_PRELUDE = struct.Struct("<8sHHI")
_U32 = struct.Struct("<I")
_CHUNK = struct.Struct("<4sII")
_CHUNK_MAGIC = b"CHNK"
CHUNK_BYTES = 256 << 10         # a chunk is written once the buffer holds this much
MAX_CHUNK = 64 << 20            # larger lengths are damage, not data
MAX_HEADER = 16 << 20

# record tags
T_STR, T_FUNC, T_ARGS, T_CALLER, T_STACK, T_CLASS, T_PROCESS, T_NAME, T_IMAGE = (
    1, 2, 3, 4, 5, 6, 7, 8, 9)
T_CALL, T_EVENT, T_END = 16, 17, 18
T_SLOTCTX, T_SLOTCALLER, T_SLOTS = 10, 11, 19      # version 2

# SLOTCTX: tag, id, pid, abi, mono_to_epoch, fast_path (0 false, 1 true, 2 unknown), timens
# (1: the process has a time namespace), count (then count x (u32 func, u32 symbol))
_SLOTCTX = struct.Struct("<BIIIdBBH")
_SLOTCALLER = struct.Struct("<BIQII")   # tag, pid, return address, text, symbol
# SLOTS: tag, SLOTCTX id, rate (ns per tick), tsc0, ns0, count (then count x SLOT bytes)
_SLOTS = struct.Struct("<BIdQqI")
SLOT_BYTES = 128                        # inject/layout.py's SLOT

# CALL: tag, pid, tid, time, func, args, ret, errno, flags, fallback_reason, duration_ns,
# caller, site, stack, number of `out` items (each: u32 key, a value)
_CALL = struct.Struct("<BIIdIIqIBIqIIIB")
_F_FALLBACK, _F_NS_RELATIVE = 1, 2
_CALL_FIELDS = len(CallEvent._fields)
_DEF2 = struct.Struct("<BII")           # STR: tag, id, length (then the UTF-8 bytes)
_FUNC = struct.Struct("<BIII")          # tag, id, func, symbol
_CALLER = struct.Struct("<BIQII")       # tag, id, address, text, symbol
_HEAD_N = struct.Struct("<BIH")         # ARGS / STACK: tag, id, count
_CLASS = struct.Struct("<BIIH")         # tag, id, name, count (then count field-name ids)
_PROCESS = struct.Struct("<BIIQI")      # tag, pid, abi, vdso base, IMAGE id
_IMAGE = struct.Struct("<BII")          # tag, id, length (then the image)
_NAME = struct.Struct("<BIII")          # tag, pid, tid, comm
_EVENT = struct.Struct("<BI")           # tag, class id (then one value per field)

# value tags
V_NONE, V_FALSE, V_TRUE, V_INT, V_BIGINT, V_FLOAT, V_STR, V_BYTES = 0, 1, 2, 3, 4, 5, 6, 7
V_TUPLE, V_LIST, V_DICT, V_ADDR, V_UNREADABLE, V_TIMESPEC, V_TIMEVAL, V_TIMEZONE = (
    8, 9, 10, 11, 12, 13, 14, 15)
_Q = struct.Struct("<q")
_UQ = struct.Struct("<Q")
_D = struct.Struct("<d")
_BQ = struct.Struct("<Bq")
_BUQ = struct.Struct("<BQ")
_BQQ = struct.Struct("<Bqq")
_BI = struct.Struct("<BI")
_KEY_TS = struct.Struct("<IBqq")        # an `out` item holding a timespec (the common case)
_KEY_INT = struct.Struct("<IBq")


class RecordingError(TracerError):
    """A file that is not a recording this vdsotrace can read."""


def _enc_str(s: str) -> bytes:
    # surrogatepass: strings decoded from the tracee with surrogateescape survive as they are
    return s.encode("utf-8", "surrogatepass")


# ------------------------------------------------------------------------------------ writer

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


# ------------------------------------------------------------------------------------ reader

@dataclass(frozen=True, slots=True)
class Process:
    pid: int
    abi: str
    vdso_base: int
    image: bytes


@dataclass(frozen=True, slots=True)
class Name:
    """A thread's comm as read at this point of the trace (None: it was gone)."""
    pid: int
    tid: int
    comm: str | None


@dataclass(frozen=True, slots=True)
class Trailer:
    values: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Damage:
    """Where reading stopped, and why (one line for the user)."""
    offset: int
    message: str


@dataclass(frozen=True, slots=True)
class SlotContext:
    """How to decode a process's ring slots (version 2): its pid and ABI, the recorder's
    function index -> (plain name, symbol) as the engine names the call, the epoch offset of
    CLOCK_MONOTONIC (seconds), whether the clock source has a vDSO fast path (None:
    unknown), whether the process has a time namespace."""
    pid: int
    abi: str
    funcs: tuple[tuple[str, str], ...]
    mono_to_epoch: float
    fast_path: bool | None
    timens: bool


@dataclass(frozen=True, slots=True)
class Slots:
    """A run of ring slots (bytes, a multiple of SLOT_BYTES) and how to decode them."""
    ctx: SlotContext
    data: bytes
    rate: float
    tsc0: int
    ns0: int


@dataclass(frozen=True, slots=True)
class SlotCaller:
    """How the engine named a return address of a process's slots from here on."""
    pid: int
    addr: int
    text: str
    symbol: str | None


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

