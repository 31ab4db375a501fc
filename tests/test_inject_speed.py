"""Speed of --inject, printed, never asserted (run with `pytest -s tests/test_inject_speed.py`;
scripts/bench measures it side by side): ns per clock_gettime call untraced and injected
(while the tracer drains), and the tracer's drain rate in records per second. What is
asserted is that nothing is lost on the way."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from test_inject import Session, go, procs, read_line, start, workload  # noqa: F401  (fixtures)

N = 300_000


def _ns_per_call(line: str) -> float:
    return float(line.split()[1])


@pytest.mark.live
def test_print_speed(workload: Path, tmp_path: Path, procs: list) -> None:  # noqa: F811
    argv = [str(workload), str(tmp_path / "rec"), "1", "1", "--bench", str(N)]
    p = start(procs, argv)
    go(p)
    untraced = _ns_per_call(read_line(p, "ns_per_call"))
    read_line(p, "done")
    go(p)
    p.wait(timeout=30)

    p = start(procs, argv)
    s = Session(p.pid)
    s.attach()
    s.install()
    s.resume()
    go(p)
    drained = 0
    busy = 0.0
    assert p.stdout is not None
    import select
    line = ""
    while not line:
        t0 = time.perf_counter()
        got = s.rec.drain() if s.rec else []
        busy += time.perf_counter() - t0
        drained += len(got)
        if select.select([p.stdout], [], [], 0)[0]:
            line = p.stdout.readline().decode()
        if not got:
            time.sleep(0.0005)
    injected = _ns_per_call(line)
    read_line(p, "done", pump=s)
    s.pump()
    drained += len(s.records)
    s.stop_all()
    s.leave()
    drained += len(s.records)
    go(p)
    assert p.wait(timeout=30) == 0
    assert s.rec is not None
    lost = s.rec.lost()
    assert lost == 0 and drained >= N, (lost, drained)     # every call of the loop recorded
    print(f"\nclock_gettime untraced: {untraced:.1f} ns/call; --inject: {injected:.1f} ns/call "
          f"(+{injected - untraced:.1f} ns)")
    print(f"drained {drained} records in {busy:.3f} s of drain(): "
          f"{drained / busy if busy else 0:,.0f} records/s; lost {lost}")


def _full_ring(flags, ret):  # type: ignore[no-untyped-def]
    """A Recorder over a ring of NSLOTS synthetic committed clock_gettime slots (no tracee):
    slot i has flags(i) and return value ret(i)."""
    import mmap
    import os
    import struct

    from tracer.abi import X86_64
    from tracer.inject import Recorder
    from tracer.inject import layout as L
    from tracer.tsc import TscClock
    from test_inject import own_vdso, traced_functions

    image, base = own_vdso()
    funcs = traced_functions(image)
    fid = next(i for i, f in enumerate(funcs) if f.plain == "clock_gettime")
    rec = Recorder(os.getpid(), None, X86_64, image, base, funcs)  # type: ignore[arg-type]
    ring = mmap.mmap(-1, L.RING_SIZE)
    fmt = struct.Struct(L.SLOT_FORMAT)
    for i in range(L.NSLOTS):
        fmt.pack_into(ring, L.DATA + i * L.SLOT, i + 1, 1234, fid, flags(i), 1, 0x7ffd0000,
                      0, 0, 0, 0, ret(i), 1000, 1100, 0x401000, b"\1" * 16, b"\0" * 16)
    ring[L.HEAD:L.HEAD + 8] = L.NSLOTS.to_bytes(8, "little")
    rec._ring = ring
    rec._clock = TscClock.anchored(0.001)
    return rec


def test_print_drain_rate_offline() -> None:
    """drain() alone on a full ring of synthetic committed slots (no tracee)."""
    from tracer.inject import layout as L

    rec = _full_ring(lambda i: 2, lambda i: 0)
    t0 = time.perf_counter()
    n = 0
    while True:
        got = rec.drain()
        if not got:
            break
        n += len(got)
    dt = time.perf_counter() - t0
    assert n == L.NSLOTS
    print(f"\ndrain(): {n / dt:,.0f} records/s ({dt / n * 1e9:.0f} ns per record)")


def test_print_drain_stats_rate_offline() -> None:
    from tracer.inject import CallStats
    from tracer.inject import layout as L

    rec = _full_ring(lambda i: 2 | (i % 7 == 0), lambda i: (1 << 64) - 22 if i % 5 == 0 else 0)
    stats: dict[str, CallStats] = {}
    t0 = time.perf_counter()
    n = rec.drain_stats(stats)
    dt = time.perf_counter() - t0
    assert n == L.NSLOTS and stats["clock_gettime"].calls == L.NSLOTS
    assert stats["clock_gettime"].errors == len(range(0, L.NSLOTS, 5))
    assert stats["clock_gettime"].fallbacks == len(range(0, L.NSLOTS, 7))
    print(f"\ndrain_stats(): {n / dt:,.0f} records/s ({dt / n * 1e9:.0f} ns per record)")
