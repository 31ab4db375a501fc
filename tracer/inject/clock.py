"""TSC -> CLOCK_MONOTONIC nanoseconds, calibrated in the tracer.

The stubs timestamp with `rdtsc`. Linux gives every process on a machine the same TSC (no
per-process offset; a time namespace offsets CLOCK_MONOTONIC, not the TSC), so the tracer reads
the TSC itself, from a few bytes of machine code in an executable anonymous mapping, next to
clock_gettime(CLOCK_MONOTONIC), and fits a line through the pairs: the first pair anchors it,
the latest sets the rate, refined at every drain.
"""
from __future__ import annotations

import ctypes
import mmap
import time

__all__ = ["TscClock"]

# rdtsc; shl rdx, 32; or rax, rdx; ret
_RDTSC_CODE = b"\x0f\x31\x48\xc1\xe2\x20\x48\x09\xd0\xc3"
_rdtsc_fn: ctypes._CFuncPtr | None = None   # type: ignore[name-defined]
_rdtsc_map: mmap.mmap | None = None


def rdtsc() -> int:
    global _rdtsc_fn, _rdtsc_map
    if _rdtsc_fn is None:
        m = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        m.write(_RDTSC_CODE)
        addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
        _rdtsc_map = m
        _rdtsc_fn = ctypes.CFUNCTYPE(ctypes.c_uint64)(addr)
    return int(_rdtsc_fn())


def _pair() -> tuple[int, int]:
    """(tsc, monotonic ns) read as close together as Python allows: the tighter of three."""
    best: tuple[int, int, int] | None = None
    for _ in range(3):
        a = time.monotonic_ns()
        t = rdtsc()
        b = time.monotonic_ns()
        if best is None or b - a < best[0]:
            best = (b - a, t, (a + b) // 2)
    assert best is not None
    return best[1], best[2]


class TscClock:
    def __init__(self, settle_s: float = 0.02) -> None:
        self.tsc0, self.ns0 = _pair()
        time.sleep(settle_s)
        self.rate = 1.0
        self.refine()

    def refine(self) -> None:
        tsc, ns = _pair()
        if tsc > self.tsc0 and ns > self.ns0:
            self.rate = (ns - self.ns0) / (tsc - self.tsc0)

    def to_ns(self, tsc: int) -> int:
        return self.ns0 + int((tsc - self.tsc0) * self.rate)

    def span_ns(self, ticks: int) -> int:
        return int(ticks * self.rate)
