"""Per-function decoders: what a vDSO function takes (read at entry) and what it writes (read
at exit), as data. One module per family, as strace's src/time.c; `for_function` finds one.

The engine reads raw words at entry and the bytes behind each `OutSpec` pointer at exit; the
decoders turn those into `events` values after the tracee runs again.
"""
from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from tracer.abi import Abi
from tracer.events import Addr, Timespec, Timeval, Timezone, Unreadable, Value
from tracer.tables.errnos import Errno

__all__ = ["OutSpec", "Decoder", "for_function", "decode_out", "out_decoder", "out_size",
           "errno_name",
           "generic", "REGISTRY"]


@dataclass(frozen=True, slots=True)
class OutSpec:
    name: str       # key in the event's `out`
    arg: int        # index of the pointer argument
    layout: str     # timespec, timespec64, timeval, timezone, time_t, u32


@dataclass(frozen=True, slots=True)
class Decoder:
    func: str
    arg_names: tuple[str, ...]
    outs: tuple[OutSpec, ...]
    # raw argument words -> named values (constants by name, pointers as Addr)
    decode_args: Callable[[tuple[int, ...], Abi], dict[str, Value]]
    # (raw args, signed return) -> reason or None; called only for calls that fell back
    fallback_reason: Callable[[tuple[int, ...], int], str | None]
    ret_is_value: bool = False   # time() returns a value, not 0/-errno

    @property
    def nargs(self) -> int:
        return len(self.arg_names)


def out_size(layout: str, abi: Abi) -> int:
    if layout == "u32":
        return 4
    if layout == "time_t":
        return abi.size(abi.time_t)
    fmt = {"timespec": abi.timespec, "timespec64": abi.timespec64, "timeval": abi.timeval,
           "timezone": abi.timezone}[layout]
    return abi.size(fmt)


def decode_out(layout: str, data: bytes | None, addr: int, abi: Abi) -> Value:
    """The value a call wrote behind `addr`; Unreadable when it could not be read."""
    if data is None:
        return Unreadable(addr)
    if layout == "u32":
        return int.from_bytes(data, "little")
    if layout == "time_t":
        return abi.unpack(abi.time_t, data)[0]
    if layout == "timespec":
        return Timespec(*abi.unpack(abi.timespec, data))
    if layout == "timespec64":
        return Timespec(*abi.unpack(abi.timespec64, data))
    if layout == "timeval":
        return Timeval(*abi.unpack(abi.timeval, data))
    if layout == "timezone":
        return Timezone(*abi.unpack(abi.timezone, data))
    raise ValueError(layout)


_OUT_DECODERS: dict[tuple[str, str], Callable[[bytes], Value]] = {}


def out_decoder(layout: str, abi: Abi) -> Callable[[bytes], Value]:
    """`decode_out` for one layout, with its struct compiled once (the hot path's version)."""
    key = (layout, abi.name)
    fn = _OUT_DECODERS.get(key)
    if fn is None:
        if layout == "u32":
            fn = _u32
        else:
            fmt = {"time_t": abi.time_t, "timespec": abi.timespec, "timespec64": abi.timespec64,
                   "timeval": abi.timeval, "timezone": abi.timezone}[layout]
            unpack = struct.Struct("<" + fmt).unpack
            if layout == "time_t":
                def fn(data: bytes, _u: Callable[[bytes], tuple[int, ...]] = unpack) -> Value:
                    return _u(data)[0]
            else:
                cls = {"timespec": Timespec, "timespec64": Timespec, "timeval": Timeval,
                       "timezone": Timezone}[layout]

                def fn(data: bytes, _u: Callable[[bytes], tuple[int, ...]] = unpack,
                       _c: type = cls) -> Value:
                    return _c(*_u(data))  # type: ignore[no-any-return]
        _OUT_DECODERS[key] = fn
    return fn


def _u32(data: bytes) -> Value:
    return int.from_bytes(data, "little")


def errno_name(ret: int) -> str | None:
    """`-22` -> `EINVAL`; None for a non-error return. The kernel's -MAX_ERRNO..-1 range."""
    if -4095 <= ret < 0:
        try:
            return Errno(-ret).name
        except ValueError:
            return f"errno {-ret}"
    return None


def ptr(v: int) -> Value:
    return None if v == 0 else Addr(v)


def _no_reason(args: tuple[int, ...], ret: int) -> str | None:
    return "unknown"


def generic(func: str) -> Decoder:
    """A function without a decoder: six raw argument words."""
    names = tuple(f"arg{i}" for i in range(6))
    return Decoder(func, names, (), lambda a, abi: dict(zip(names, a)), _no_reason)


REGISTRY: dict[str, Decoder] = {}


def register(d: Decoder) -> Decoder:
    REGISTRY[d.func] = d
    return d


def for_function(plain: str) -> Decoder:
    return REGISTRY.get(plain) or generic(plain)


from tracer.decoders import cpu as _cpu, random as _random, time as _time  # noqa: E402,F401
