"""Frozen event records: what the engine yields and the renderers format.

Values inside `args` / `out` are plain data: int, str (a constant's name), `Addr` (a pointer),
`Unreadable` (a pointer whose memory could not be read), `Timespec`, `Timeval`, `Timezone`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Union

__all__ = ["Addr", "Unreadable", "Timespec", "Timeval", "Timezone", "Value", "CallEvent",
           "SyscallEvent", "AttachEvent", "DetachEvent", "ExecEvent", "ExitEvent",
           "SignalEvent", "SigreturnEvent", "NoticeEvent", "Event"]


@dataclass(frozen=True, slots=True)
class Addr:
    value: int


@dataclass(frozen=True, slots=True)
class Unreadable:
    addr: int


@dataclass(frozen=True, slots=True)
class Timespec:
    tv_sec: int
    tv_nsec: int


@dataclass(frozen=True, slots=True)
class Timeval:
    tv_sec: int
    tv_usec: int


@dataclass(frozen=True, slots=True)
class Timezone:
    tz_minuteswest: int
    tz_dsttime: int


Value = Union[int, str, Addr, Unreadable, Timespec, Timeval, Timezone, None]


class CallEvent(NamedTuple):
    """One vDSO call, complete. A NamedTuple rather than a frozen dataclass: it is built once
    per traced call on the hot path, and a frozen dataclass's __init__ costs about 2.2 us
    here against 0.5 us (measured, design.md: measure before you abstract)."""
    pid: int
    tid: int
    time: float
    func: str
    symbol: str
    args: dict[str, Value]
    ret: int
    errno: str | None                 # the error name when ret is a -errno
    out: dict[str, Value]
    fallback: bool
    fallback_reason: str | None
    duration_ns: int
    caller: int
    caller_text: str                  # "0x7f… libc.so.6+0x1234", or "0x…" alone
    caller_symbol: str | None
    stack: tuple[str, ...] | None
    ns_relative: bool = False         # MONOTONIC/BOOTTIME values inside a time namespace
    site: str | None = None           # "object!symbol+0xoff" of the first frame outside libc


@dataclass(frozen=True, slots=True)
class SyscallEvent:
    pid: int
    tid: int
    time: float
    nr: int
    name: str
    args: tuple[int, ...]
    ret: int | None                   # None: did not return (exit, execve, sigreturn)
    errno: str | None
    duration_ns: int
    nested_in: str | None             # the vDSO function that fell back into this call
    strings: dict[int, bytes] | None = None   # argument index -> its string or buffer (prefix)
    cut: tuple[int, ...] = ()         # indexes of strings longer than shown (strace's `...`)


@dataclass(frozen=True, slots=True)
class AttachEvent:
    pid: int
    tid: int
    time: float
    vdso_base: int
    abi: str
    clocksource: str | None
    vdso_fast_path: bool | None
    timens_offsets: dict[str, tuple[int, int]] | None
    threads: int
    functions: tuple[str, ...]
    gateway: tuple[str, ...] | None   # i386: the kernel-entry instructions of __kernel_vsyscall
    spawned: bool
    setup_ms: float = 0.0             # seize -> breakpoints planted -> running again


@dataclass(frozen=True, slots=True)
class DetachEvent:
    pid: int
    tid: int
    time: float
    vdso_base: int
    abi: str
    reason: str


@dataclass(frozen=True, slots=True)
class ExecEvent:
    pid: int
    tid: int
    time: float
    filename: str | None
    vdso_base: int
    abi: str
    status: int | None = None
    timens_offsets: dict[str, tuple[int, int]] | None = None


@dataclass(frozen=True, slots=True)
class ExitEvent:
    pid: int
    tid: int
    time: float
    status: int | None                # exit code
    signal: str | None                # killed by this signal


@dataclass(frozen=True, slots=True)
class SignalEvent:
    pid: int
    tid: int
    time: float
    signo: int
    signame: str
    handler: int
    handler_symbol: str | None
    restorer: int
    restorer_symbol: str | None
    resume_ip: int                    # the interrupted ip saved in the frame
    frame: int                        # the signal frame's address (the handler's sp)


@dataclass(frozen=True, slots=True)
class SigreturnEvent:
    pid: int
    tid: int
    time: float
    via: str                          # trampoline symbol, or its address
    resume_ip: int
    resume_symbol: str | None
    signo: int | None
    anomaly: str | None
    resume_changed: bool


@dataclass(frozen=True, slots=True)
class NoticeEvent:
    """Something the user should know that is not a call: a warning, lost records."""
    pid: int
    tid: int
    time: float
    message: str


Event = Union[CallEvent, SyscallEvent, AttachEvent, DetachEvent, ExecEvent, ExitEvent,
              SignalEvent, SigreturnEvent, NoticeEvent]
