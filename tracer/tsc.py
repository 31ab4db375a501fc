"""Cycle counter ticks -> nanoseconds, for the timestamps the stubs take with the arch's
counter read (`Arch.cycle_counter`: x86's rdtsc) inside the tracee (the call-through stubs of breakpoints.py and the recorder's of inject/).

Linux gives every process on a machine the same TSC (invariant and synchronized across CPUs
when the kernel's clocksource is `tsc`, which is when the vDSO itself reads it; a time
namespace offsets CLOCK_MONOTONIC, not the TSC), so the tracer reads the counter itself,
through a few bytes of machine code mapped executable in its own process (the tracer's arch's
`host_counter_fn`), next to CLOCK_MONOTONIC: the first pair anchors the line, later pairs set the rate.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import signal
import time
from typing import Any

from tracer import arch as _arch

__all__ = ["TscClock", "tsc_usable"]


class TscClock:
    def __init__(self) -> None:
        self.ns_per_tick: float | None = None
        self._fn = None
        self._buf: mmap.mmap | None = None
        try:
            code = _arch.native().host_counter_fn
        except _arch.UnsupportedArch:
            code = b""
        if code:
            try:
                # Written into a memfd before it is mapped: the page cache write path leaves the
                # page to be made coherent with the instruction cache when it is first mapped
                # executable (arm64: flush_dcache_folio, then __sync_icache_dcache at
                # set_pte_at); code stored through a mapping could be fetched stale there.
                fd = os.memfd_create("vdsotrace-counter", os.MFD_CLOEXEC)
                try:
                    os.write(fd, code.ljust(mmap.PAGESIZE, b"\0"))
                    buf = mmap.mmap(fd, mmap.PAGESIZE, flags=mmap.MAP_SHARED,
                                    prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
                finally:
                    os.close(fd)
                addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
                self._fn = ctypes.CFUNCTYPE(ctypes.c_uint64)(addr)
                self._buf = buf
            except (OSError, ValueError, TypeError):
                self._fn = None
        self.tsc0 = self.ns0 = 0

    _shared: TscClock | None = None

    @classmethod
    def anchored(cls, settle_s: float = 0.02) -> TscClock:
        """A clock anchored and calibrated over at least `settle_s` (for absolute times,
        `to_ns`). One per tracer: the first call sleeps `settle_s` (call it before stopping a
        tracee: --inject asks for one while every thread is held); later ones share it, and
        `refine` keeps improving it."""
        clock = TscClock._shared
        if clock is None:
            clock = cls()
            clock.start()
            time.sleep(settle_s)
            clock.refine()
            TscClock._shared = clock
        return clock

    def _pair(self) -> tuple[int, int]:
        """(tsc, monotonic ns) read as close together as Python allows: the tighter of three."""
        assert self._fn is not None
        best: tuple[int, int, int] | None = None
        for _ in range(3):
            a = time.monotonic_ns()
            t = int(self._fn())
            b = time.monotonic_ns()
            if best is None or b - a < best[0]:
                best = (b - a, t, (a + b) // 2)
        assert best is not None
        return best[1], best[2]

    def start(self) -> None:
        """Anchor the line; `ns(ticks)` calibrates on first use (over >= 2 ms), `refine` later."""
        if self._fn is not None:
            self.tsc0, self.ns0 = self._pair()

    def _calibrate(self) -> None:
        """A first estimate over >= 2 ms (the clock reads jitter by about a microsecond, so
        the error is below 0.1%); `refine` redoes it over the whole run."""
        if self._fn is None:
            self.ns_per_tick = 1.0
            return
        if not self.tsc0:
            self.start()
        while time.monotonic_ns() - self.ns0 < 2_000_000:
            time.sleep(0.0005)
        self._measure()

    def _measure(self) -> None:
        t1, m1 = self._pair()
        ticks = t1 - self.tsc0
        self.ns_per_tick = (m1 - self.ns0) / ticks if ticks > 0 and m1 > self.ns0 else 1.0

    def read(self) -> int:
        """The counter now (0 where it cannot be read)."""
        return int(self._fn()) if self._fn is not None else 0

    def refine(self) -> None:
        """Recalibrate over the time since `start` (call now and then, e.g. on a tick)."""
        if self._fn is not None and self.tsc0:
            self._measure()

    @property
    def rate(self) -> float:
        """Nanoseconds per tick (calibrating first if needed)."""
        if self.ns_per_tick is None:
            self._calibrate()
        assert self.ns_per_tick is not None
        return self.ns_per_tick

    def ns(self, ticks: int) -> int:
        """A span of ticks in nanoseconds."""
        npt = self.ns_per_tick
        if npt is None:
            npt = self.rate
        return int(ticks * npt) if ticks > 0 else 0

    def to_ns(self, tsc: int) -> int:
        """A counter value as CLOCK_MONOTONIC nanoseconds."""
        return self.ns0 + int((tsc - self.tsc0) * self.rate)


def tsc_usable(tids: list[int], mem: Any, scratch: int,
               arch: _arch.Arch = _arch.X86_64) -> bool:
    """Whether every thread may read the cycle counter: on x86 prctl(PR_SET_TSC,
    PR_TSC_SIGSEGV) and seccomp strict mode make rdtsc fault (CR4.TSD, per thread:
    arch/x86/kernel/process.c), and no system call tells without running in the tracee. So
    each stopped thread single-steps one counter read (`arch.cycle_counter`) written at
    `scratch` (a zeroed, writable spot of its vDSO, zeroed again after): SIGTRAP, it ran;
    SIGSEGV, it faulted (the signal is discarded with the registers put back).
    `arch.no_restart` keeps the kernel from restarting an interrupted system call there."""
    from tracer import stops, target
    from tracer.errors import ProcessGone
    ok = True
    insn = arch.cycle_counter
    if not insn:
        return False
    mem.write(scratch, insn)
    try:
        for tid in tids:
            saved = arch.new_regs()
            try:
                arch.regs_get(tid, saved)
            except ProcessGone:
                continue
            work = arch.new_regs()
            ctypes.memmove(work.buf, saved.buf, ctypes.sizeof(work.buf))
            work[arch.pc] = scratch
            arch.no_restart(work)
            arch.regs_set(tid, work)
            held = []
            try:
                for _ in range(16):
                    stop = stops.step(tid)
                    if not stop.stopped:
                        raise ProcessGone(f"thread {tid} exited")
                    if stop.kind is stops.Kind.TRAP:        # the step ran
                        break
                    if stop.kind is not stops.Kind.SIGNAL:
                        continue                   # an event stop: the step is still due
                    if stop.sig == signal.SIGSEGV:  # the counter read faulted
                        ok = False
                        break
                    held.append(stop.sig)          # another signal: send it again below
            finally:
                arch.regs_set(tid, saved)
                for sig in held:
                    target.tgkill(mem.pid, tid, sig)
    finally:
        mem.write(scratch, bytes(len(insn)))
    return ok
