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

import struct
from dataclasses import dataclass
from typing import Any

from tracer.errors import TracerError
from tracer.events import CallEvent

__all__ = ["MAGIC", "VERSION", "READS", "RecordingError", "Process", "Name", "Trailer", "Damage",
           "SlotContext", "Slots", "SlotCaller"]

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


# ---------------------------------------------------------------- what a reader yields

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
