"""Time-stamp counter ticks -> nanoseconds, for the timestamps the call-through stubs take
with `rdtsc` inside the tracee (x86: the TSC is invariant and synchronized across CPUs when
the kernel's clocksource is `tsc`, which is when the vDSO itself reads it).

The tracer calibrates by reading the counter itself, through a few bytes of machine code
mapped executable in its own process, against CLOCK_MONOTONIC.
"""
from __future__ import annotations

import ctypes
import mmap
import platform
import time

__all__ = ["TscClock"]

_RDTSC = b"\x0f\x31\x48\xc1\xe2\x20\x48\x09\xd0\xc3"   # rdtsc ; shl rdx,32 ; or rax,rdx ; ret


class TscClock:
    def __init__(self) -> None:
        self.ns_per_tick: float | None = None
        self._fn = None
        self._buf: mmap.mmap | None = None
        if platform.machine() in ("x86_64", "AMD64"):
            try:
                buf = mmap.mmap(-1, mmap.PAGESIZE,
                                prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
                buf.write(_RDTSC)
                addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
                self._fn = ctypes.CFUNCTYPE(ctypes.c_uint64)(addr)
                self._buf = buf
            except (OSError, ValueError, TypeError):
                self._fn = None
        self._t0 = self._m0 = 0

    def start(self) -> None:
        """Begin a calibration; `ns(ticks)` finishes it on first use (>= 20 ms later) or
        calibrates briefly itself."""
        if self._fn is not None:
            self._m0 = time.monotonic_ns()
            self._t0 = int(self._fn())

    def _calibrate(self) -> None:
        """A first estimate over >= 2 ms (the clock reads jitter by about a microsecond, so
        the error is below 0.1%); `refine` redoes it over the whole run."""
        if self._fn is None:
            self.ns_per_tick = 1.0
            return
        if not self._t0:
            self.start()
        while time.monotonic_ns() - self._m0 < 2_000_000:
            time.sleep(0.0005)
        self._measure()

    def _measure(self) -> None:
        assert self._fn is not None
        m1, t1 = time.monotonic_ns(), int(self._fn())
        ticks = t1 - self._t0
        self.ns_per_tick = (m1 - self._m0) / ticks if ticks > 0 else 1.0

    def read(self) -> int:
        """The counter now (0 where it cannot be read)."""
        return int(self._fn()) if self._fn is not None else 0

    def refine(self) -> None:
        """Recalibrate over the time since `start` (call now and then, e.g. on a tick)."""
        if self._fn is not None and self._t0:
            self._measure()

    def ns(self, ticks: int) -> int:
        npt = self.ns_per_tick
        if npt is None:
            self._calibrate()
            npt = self.ns_per_tick
            assert npt is not None
        return int(ticks * npt) if ticks > 0 else 0
