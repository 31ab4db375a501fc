"""clock_gettime, clock_gettime64, clock_getres, gettimeofday, time (kernel/time/time.c,
lib/vdso/gettimeofday.c)."""
from __future__ import annotations

from tracer.abi import Abi
from tracer.consts import ClockId, MAX_CLOCKS, clock_name
from tracer.decoders import Decoder, OutSpec, ptr, register
from tracer.events import Value

_CPU_CLOCKS = (ClockId.CLOCK_PROCESS_CPUTIME_ID, ClockId.CLOCK_THREAD_CPUTIME_ID)
_EINVAL = -22


def clockid_of(raw: int) -> int:
    """clockid_t is a 32-bit int on both ABIs."""
    raw &= 0xFFFFFFFF
    return raw - (1 << 32) if raw >> 31 else raw


def clock_reason(args: tuple[int, ...], ret: int) -> str | None:
    """Why a clock call entered the kernel (lib/vdso/gettimeofday.c: only clocks in
    VDSO_HRES | VDSO_COARSE | VDSO_RAW | VDSO_AUX are served in user space)."""
    cid = clockid_of(args[0])
    if cid < 0 or cid in _CPU_CLOCKS:
        return "cpu-time-clock"
    if cid >= MAX_CLOCKS or ret == _EINVAL:
        return "invalid-clock"
    if cid in (ClockId.CLOCK_REALTIME_ALARM, ClockId.CLOCK_BOOTTIME_ALARM,
               ClockId.CLOCK_SGI_CYCLE):
        return "invalid-clock"  # no vDSO mode: the kernel answers (or refuses) these
    return None  # a served clock that fell back: decided by the session (clocksource)


def _clock_args(out: str) -> object:
    def decode(a: tuple[int, ...], abi: Abi) -> dict[str, Value]:
        return {"clockid": clock_name(clockid_of(a[0])), out: ptr(a[1])}
    return decode


register(Decoder("clock_gettime", ("clockid", "tp"), (OutSpec("tp", 1, "timespec"),),
                 _clock_args("tp"), clock_reason))  # type: ignore[arg-type]
register(Decoder("clock_gettime64", ("clockid", "tp"), (OutSpec("tp", 1, "timespec64"),),
                 _clock_args("tp"), clock_reason))  # type: ignore[arg-type]
register(Decoder("clock_getres", ("clockid", "res"), (OutSpec("res", 1, "timespec"),),
                 _clock_args("res"), clock_reason))  # type: ignore[arg-type]
register(Decoder("clock_getres_time64", ("clockid", "res"), (OutSpec("res", 1, "timespec64"),),
                 _clock_args("res"), clock_reason))  # type: ignore[arg-type]


def _tod_reason(args: tuple[int, ...], ret: int) -> str | None:
    return None


register(Decoder("gettimeofday", ("tv", "tz"),
                 (OutSpec("tv", 0, "timeval"), OutSpec("tz", 1, "timezone")),
                 lambda a, abi: {"tv": ptr(a[0]), "tz": ptr(a[1])}, _tod_reason))
register(Decoder("time", ("tloc",), (OutSpec("tloc", 0, "time_t"),),
                 lambda a, abi: {"tloc": ptr(a[0])}, _tod_reason, ret_is_value=True))
