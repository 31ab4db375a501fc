"""Pure tests (no tracee) of the -c drain's batch decoder (tracer/inject/batch.py) on checked-in
ring slots (tests/fixtures/ring-slots.bin, made by make-ring-slots.py: valid records of six
functions and three threads, corrupt and uncommitted slots, wrapping around the ring's end).
The oracles: the slots decoded here one by one with struct, and the per-record drain()
(the events' path) aggregated, which -c must equal to the nanosecond."""
from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path

import pytest

from tracer.abi import I386, X86_64, Abi
from tracer.inject import CallStats, Recorder, batch
from tracer.inject import layout as L
from tracer.tsc import TscClock
from tracer.vdso import parse_image

FIXTURES = Path(__file__).parent / "fixtures"
SLOTS = (FIXTURES / "ring-slots.bin").read_bytes()
COUNT = len(SLOTS) // L.SLOT
START = L.NSLOTS - 100                  # the fixture's first ring index (see its maker)
GAP = 400                               # the fixture's uncommitted slot
RATE = 0.3571428571428571               # ns per tick: int(ticks * RATE) truncates most of them
PID_LIMIT = 4 * 1024 * 1024
ABIS = {"x86_64": X86_64, "i386": I386}


def _recorder(arch: str) -> Recorder:
    abi: Abi = ABIS[arch]
    image = parse_image((FIXTURES / f"vdso-{arch}.so").read_bytes())
    rec = Recorder(os.getpid(), None, abi, image, 0,  # type: ignore[arg-type]
                   list(image.functions))
    ring = mmap.mmap(-1, L.RING_SIZE)
    for j in range(COUNT):
        off = L.DATA + ((START + j) & (L.NSLOTS - 1)) * L.SLOT
        ring[off:off + L.SLOT] = SLOTS[j * L.SLOT:(j + 1) * L.SLOT]
    ring[L.HEAD:L.HEAD + 8] = (START + COUNT).to_bytes(8, "little")
    ring[L.TAIL:L.TAIL + 8] = START.to_bytes(8, "little")
    clock = TscClock()
    clock.ns_per_tick = RATE
    rec._ring, rec._clock, rec._tail = ring, clock, START
    rec._last_refine = float("inf")     # keep RATE (no recalibration mid-test)
    return rec


def _oracle(rec: Recorder, upto: int, final: bool) -> tuple[dict[str, CallStats], int]:
    """(totals by function, corrupt slots) of fixture slots [0, upto), decoded one by one."""
    fmt = struct.Struct(L.SLOT_FORMAT)
    err_lo = (1 << (8 * rec.abi.word)) - 4095
    stats: dict[str, CallStats] = {}
    corrupt = 0
    for j in range(upto):
        seq, tid, fid, flags, *_, ret, t0, t1, _caller, _o0, _o1 = fmt.unpack_from(
            SLOTS, j * L.SLOT)
        if seq != START + j + 1:
            assert final
            corrupt += 1
            continue
        nouts = len(rec._outsz[fid]) if fid < len(rec.funcs) else 0
        if (fid >= len(rec.funcs) or not 0 < tid < PID_LIMIT or flags >= 8
                or flags >= 1 << (1 + nouts)):
            corrupt += 1
            continue
        st = stats.setdefault(rec.funcs[fid].plain, CallStats())
        error = not rec.decoders[fid].ret_is_value and ret & rec.abi.mask >= err_lo
        st.add(bool(flags & 1), error,
               int((t1 - t0) * RATE) if t1 > t0 else 0)
    return stats, corrupt


def _made(stats: dict[str, CallStats]) -> dict[str, CallStats]:
    """The functions called (drain_stats gives every function of the recorder an entry)."""
    return {name: st for name, st in stats.items() if st.calls}


def _events(rec: Recorder) -> dict[str, CallStats]:
    stats: dict[str, CallStats] = {}
    while records := rec.drain():
        for r in records:
            stats.setdefault(r.func, CallStats()).add(
                r.fallback, rec._is_error(r.fid, r.ret), r.duration_ns)
    return stats


@pytest.mark.parametrize("arch", ["x86_64", "i386"])
def test_counts_equal_the_slot_by_slot_decoding(arch: str) -> None:
    rec = _recorder(arch)
    stats: dict[str, CallStats] = {}
    assert rec.drain_stats(stats) == GAP              # waits at the uncommitted slot
    want, corrupt = _oracle(rec, GAP, final=False)
    assert _made(stats) == want and rec.corrupt() == corrupt
    if arch == "x86_64":                              # the fixture's four damaged slots
        assert corrupt == 4                           # (i386's functions differ: its own)
    rec.producers_stopped()                           # no stub can commit it any more
    assert rec.drain_stats(stats) == COUNT - GAP
    want, corrupt = _oracle(rec, COUNT, final=True)
    assert _made(stats) == want and rec.corrupt() == corrupt
    assert sum(s.calls for s in stats.values()) + corrupt == COUNT
    assert sum(s.errors for s in stats.values()) and sum(s.fallbacks for s in stats.values())


@pytest.mark.parametrize("arch", ["x86_64", "i386"])
def test_counts_equal_the_events_path(arch: str) -> None:
    counted, evented = _recorder(arch), _recorder(arch)
    for rec in (counted, evented):
        rec.producers_stopped()
    stats: dict[str, CallStats] = {}
    while counted.drain_stats(stats, limit=97):       # runs cut anywhere
        pass
    assert _made(stats) == _events(evented)
    assert counted.corrupt() == evented.corrupt() and counted._tail == START + COUNT


def test_a_slot_committed_late_is_counted_once() -> None:
    rec = _recorder("x86_64")
    stats: dict[str, CallStats] = {}
    assert rec.drain_stats(stats) == GAP
    off = L.DATA + ((START + GAP) & (L.NSLOTS - 1)) * L.SLOT
    rec._ring[off:off + 8] = (START + GAP + 1).to_bytes(8, "little")   # the stub commits
    assert rec.drain_stats(stats) == COUNT - GAP
    assert rec.corrupt() == 4
    assert sum(s.calls for s in stats.values()) == COUNT - 4


def test_batch_takes_clean_runs_and_leaves_damage_to_the_slot_path() -> None:
    rec = _recorder("x86_64")
    max_flags = [min(8, 1 << (1 + len(z))) for z in rec._outsz]
    value_ret = [d.ret_is_value for d in rec.decoders]
    err_lo = (1 << 64) - 4095

    def agg(a: int, b: int) -> list[batch.FuncTotals] | None:
        return batch.aggregate(SLOTS[a * L.SLOT:b * L.SLOT], max_flags, value_ret, err_lo,
                               (1 << 64) - 1, RATE, PID_LIMIT)

    totals = agg(0, 256)
    assert totals is not None
    want, _ = _oracle(rec, 256, final=False)
    assert {rec.funcs[t.fid].plain: CallStats(t.calls, t.fallbacks, t.errors, t.total_ns)
            for t in totals} == want
    for a, b in ((250, 257), (299, 301), (301, 311), (330, 332), (332, 333)):
        assert agg(a, b) is None, (a, b)
    assert agg(311, 331) is not None and agg(333, 400) is not None
    assert batch.committed(SLOTS, START + 1) == GAP
    assert batch.committed(SLOTS[GAP * L.SLOT:], START + GAP + 1) == 0
    assert batch.committed(SLOTS[(GAP + 1) * L.SLOT:], START + GAP + 2) == COUNT - GAP - 1


def _viewed(rec: Recorder, limit: int = 65536) -> tuple[list[object], int]:
    """Every item drain_view gives (SlotRuns turned into RawRecords through slot_records), and
    how many SlotRuns there were."""
    out: list[object] = []
    runs = 0
    while items := rec.drain_view(limit):
        for it in items:
            if isinstance(it, batch.SlotRun):
                runs += 1
                out.extend(rec.slot_records(it))
            else:
                out.append(it)
    return out, runs


@pytest.mark.parametrize("arch", ["x86_64", "i386"])
@pytest.mark.parametrize("limit", [65536, 97, 5])
def test_slot_runs_are_the_records_of_the_events_path(arch: str, limit: int) -> None:
    """drain_view's SlotRuns, decoded, are exactly what drain() gives record by record, in the
    same order, with the same slots judged corrupt (and the wait at the uncommitted slot)."""
    viewed, evented = _recorder(arch), _recorder(arch)
    got, runs = _viewed(viewed, limit)
    want: list[object] = []
    while records := evented.drain(limit):
        want.extend(records)
    assert got == want and len(want) == GAP - (viewed.corrupt())
    assert runs >= 1 and viewed.corrupt() == evented.corrupt() and viewed._tail == START + GAP
    for rec in (viewed, evented):
        rec.producers_stopped()
    more, _ = _viewed(viewed, limit)
    while records := evented.drain(limit):
        want.extend(records)
    assert got + more == want
    assert viewed.corrupt() == evented.corrupt() and viewed._tail == START + COUNT


def test_slot_runs_leave_out_invalid_slots() -> None:
    rec = _recorder("x86_64")
    max_flags = [min(8, 1 << (1 + len(z))) for z in rec._outsz]
    good = batch.valid(SLOTS[:GAP * L.SLOT], max_flags, PID_LIMIT)
    assert len(good) == GAP - 4
    assert sorted(set(range(GAP)) - {int(s) - START - 1 for s in good["seq"]}) == \
        [256, 300, 331, 332]
