"""Pure tests (no tracee) of --inject --json's lines made from runs of ring slots
(render/jsonl.py SlotLines) against the events' way: the same slots (the checked-in
tests/fixtures/ring-slots.bin: six functions, three threads, fallbacks, errors, out copies
and pointers not copied, time() values, zero and negative durations) made CallEvents by the
engine's call assembly (engine/calls.py, through recording/replay.py's SlotReplay, which is
also `report`'s way) and formatted by format_call must give the very same bytes; and the
output (render/output.py) interleaves them with other events in order."""
from __future__ import annotations

import io
from typing import Any

import pytest

from test_ring_batch import _recorder

from tracer.events import CallEvent, ExitEvent, NoticeEvent, SignalEvent
from tracer.inject import Recorder, batch
from tracer.recording.format import SlotCaller, SlotContext, Slots
from tracer.recording.replay import SlotReplay
from tracer.render import jsonl
from tracer.render.output import Output


def _runs(rec: Recorder, limit: int = 65536) -> list[batch.SlotRun]:
    rec.producers_stopped()
    runs: list[batch.SlotRun] = []
    while items := rec.drain_view(limit):
        runs += [it for it in items if isinstance(it, batch.SlotRun)]
    return runs


def _ctx(rec: Recorder, fast_path: bool | None, timens: bool) -> SlotContext:
    return SlotContext(4242, rec.abi.name, tuple((f.plain, f.symbol) for f in rec.funcs),
                       1796000000.123456, fast_path, timens)


def _callers(runs: list[batch.SlotRun]) -> dict[int, tuple[str, str | None]]:
    """Names for every other distinct caller (the others as the engine names an address
    outside every mapping), one with a quote and a non-ASCII byte to escape."""
    addrs = sorted({a for r in runs for a in batch.distinct(r.slots["caller"])})
    names: dict[int, tuple[str, str | None]] = {}
    for j, a in enumerate(addrs[::2]):
        names[a] = (f"{a:#x} prog+{a & 0xFFF:#x}",
                    None if j % 3 == 0 else f'pr"og\udcff!main+{j:#x}')
    return names


def _event_lines(ctx: SlotContext, run: batch.SlotRun,
                 callers: dict[int, tuple[str, str | None]], replay: SlotReplay) -> list[str]:
    for a, (text, sym) in callers.items():
        replay.caller(SlotCaller(ctx.pid, a, text, sym))
    evs = replay.events(Slots(ctx, run.slots.tobytes(), run.rate, run.tsc0, run.ns0))
    return [jsonl.format_call(e) for e in evs]  # type: ignore[arg-type]


@pytest.mark.parametrize("arch", ["x86_64", "i386"])
@pytest.mark.parametrize("fast_path,timens", [(True, False), (False, True), (None, True)])
@pytest.mark.parametrize("limit", [65536, 37])
def test_lines_equal_the_events_way(arch: str, fast_path: bool | None, timens: bool,
                                    limit: int) -> None:
    rec = _recorder(arch)
    runs = _runs(rec, limit)
    ctx = _ctx(rec, fast_path, timens)
    callers = _callers(runs)
    lines, replay = jsonl.SlotLines(min_segment=1), SlotReplay()
    made = skipped = 0
    text = []
    for run in runs:
        want = _event_lines(ctx, run, callers, replay)
        got = lines.render(ctx, run, callers)
        if got is None:
            # only a run with a call too long to convert in float64 exactly goes the
            # events' way (the fixture's slot 310: 2^41 ticks)
            assert batch.durations(run) is None
            skipped += 1
            continue
        assert got == want
        made += len(got)
        text += got
    # every run but the one with the long call made lines; the runs hold every valid slot
    # before the uncommitted one (those after it come slot by slot, as RawRecords)
    assert skipped == 1 and made == sum(len(r) for r in runs if batch.durations(r) is not None)
    assert sum(len(r) for r in runs) >= 400 - rec.corrupt()
    joined = "\n".join(text)
    # what the comparison covered (the fixture is made for x86_64's functions)
    for needle in () if arch != "x86_64" else ('"fallback": true', '"errno": "EINVAL"', '"func": "time"',
                   '"tv_usec"', '"tz_minuteswest"', '"cpu": ', '"node": ', '"duration_ns": 0,',
                   '"caller_symbol": null', '\\"og', '"func": "getrandom"'):
        assert needle in joined, needle


def test_output_interleaves_runs_with_events_in_order() -> None:
    """Output.write_slots and write_event in any order give the lines write_event alone
    gives for the same events in that order."""
    rec = _recorder("x86_64")
    runs = [r for r in _runs(rec, 50) if batch.durations(r) is not None]
    ctx = _ctx(rec, True, False)
    callers = _callers(runs)
    others: list[Any] = [SignalEvent(4242, 4243, 1.5, 10, "SIGUSR1", 0x401000, "prog!h",
                                     0x402000, None, 0x401500, 0x7FFC1000),
                         NoticeEvent(4242, 4242, 2.0, "a notice"),
                         ExitEvent(4242, 4243, 3.0, 0, None)]

    def out() -> tuple[Output, io.StringIO]:
        f = io.StringIO()
        return Output(f, False, True, False, False), f

    fast, ff = out()
    slow, sf = out()
    assert fast.slot_sink is fast
    fast._slot_lines = jsonl.SlotLines(min_segment=1)   # (the fixture's threads take turns)
    replay = SlotReplay()
    for j, run in enumerate(runs[:6]):
        assert fast.write_slots(ctx, run, callers)
        for a, (text, sym) in callers.items():
            replay.caller(SlotCaller(ctx.pid, a, text, sym))
        for e in replay.events(Slots(ctx, run.slots.tobytes(), run.rate, run.tsc0, run.ns0)):
            assert type(e) is CallEvent
            slow.write_event(e)
        if j < len(others):
            fast.write_event(others[j])
            slow.write_event(others[j])
    fast.finish(None)
    slow.finish(None)
    assert ff.getvalue() == sf.getvalue() and ff.getvalue().count('"event": "call"') > 100
    assert ff.getvalue().index('"signal"') < ff.getvalue().index('"notice"')


def test_no_slot_sink_where_events_are_needed() -> None:
    for json_mode, summary in ((False, False), (True, True)):
        assert Output(io.StringIO(), False, json_mode, False, summary).slot_sink is None
    o = Output(io.StringIO(), False, True, False, False)
    o.hist = None
    o.add_views(hist=True)
    assert o.slot_sink is None


def _slot(seq: int, fid: int, flags: int, args: tuple[int, ...], ret: int, o0: bytes = b"",
          o1: bytes = b"", tid: int = 4242, t0: int = 10_000, caller: int = 0x401000) -> bytes:
    import struct
    from tracer.inject import layout as L
    a = (*args, 0, 0, 0, 0, 0, 0)[:6]
    return struct.pack(L.SLOT_FORMAT, seq, tid, fid, flags, *a, ret, t0, t0 + 77, caller,
                       o0.ljust(16, b"\0"), o1.ljust(16, b"\0"))


@pytest.mark.parametrize("arch", ["x86_64", "i386"])
@pytest.mark.parametrize("epoch", [1796000000.5, 12.25])     # (12.25: times repr() writes)
def test_made_slots_equal_the_events_way(arch: str, epoch: float) -> None:
    """Hand-made slots for what the fixture lacks: a time namespace's clocks (ns_relative),
    one out copied and one not (an Unreadable between filled items), runs of the same key
    split by a thread, many keys."""
    import numpy as np
    import struct
    from tracer.inject import layout as L
    rec = _recorder(arch)
    fid = {f.plain: j for j, f in enumerate(rec.funcs)}
    w = rec.abi.word
    ts = struct.pack("<qq" if arch == "x86_64" else "<ii", 5, 999_999_999)
    raw = b"".join([
        _slot(1, fid["clock_gettime"], 2, (1, 0x7000), 0, ts),        # CLOCK_MONOTONIC
        _slot(2, fid["clock_gettime"], 2, (1, 0x7000), 0, ts, tid=4243),
        _slot(3, fid["clock_gettime"], 2, (0, 0x7000), 0, ts),        # CLOCK_REALTIME
        _slot(4, fid["gettimeofday"], 2, (0x7100, 0x7200), 0, ts),    # tz not copied
        _slot(5, fid["gettimeofday"], 4, (0x7100, 0x7200), 0, b"", b"\x88\xff\xff\xff"),
        _slot(6, fid["clock_gettime"], 1, (3, 0x7000), (1 << 8 * w) - 22),   # fallback, error
        *[_slot(7 + j, fid["clock_gettime"], 2, (1, 0x7000), 0,
                struct.pack("<qq" if arch == "x86_64" else "<ii", j, j * 1000), t0=10_000 + j)
          for j in range(50)],
    ])
    if "getcpu" in fid:
        raw += _slot(57, fid["getcpu"], 6, (0x7300, 0x7304, 0), 0, b"\x03\0\0\0", b"\x01\0\0\0")
    run = batch.SlotRun(np.frombuffer(raw, batch.FULL_DTYPE), 0.5, 9_000, 1_000_000)
    for timens in (False, True):
        ctx = SlotContext(4242, rec.abi.name, tuple((f.plain, f.symbol) for f in rec.funcs),
                          epoch, True, timens)
        callers = {0x401000: ("0x401000 prog+0x1000", "prog!main+0x10")}
        got = jsonl.SlotLines(min_segment=1).render(ctx, run, callers)
        want = _event_lines(ctx, run, callers, SlotReplay())
        assert got == want
        assert len(got) == len(raw) // L.SLOT
        assert ('"ns_relative": true' in got[0]) == timens
        assert '"ns_relative"' not in got[2]
        assert '"tz": "0x7200"' in got[3] and '"tv": "0x7100"' in got[4]


def _digits_of(xs: Any, monkeypatch: pytest.MonkeyPatch) -> list[str] | None:
    import numpy as np
    monkeypatch.setattr(batch, "_entry_seconds",
                        lambda run, m: np.asarray(xs, dtype=np.float64))
    r = batch.time_digits(batch.SlotRun(np.zeros(len(xs), batch.FULL_DTYPE), 1.0, 0, 0), 0.0)
    return None if r is None else [f"{i}.{str(p)[1:]}" for i, p in zip(*r)]


def test_time_digits_are_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    """batch.time_digits writes a time as repr() does: random floats of its whole range,
    times as the engine makes them (ns / 1e9 + an offset), whole seconds and their
    neighbours, decimals of every length, and ties between two shortest decimals."""
    import numpy as np
    rng = np.random.default_rng(15)
    cases = [
        *(np.ldexp(rng.random(150_000) + 1.0, e) for e in (30, 31, 32)),
        [int(v) / 1e9 + 1796136000.123456 for v in rng.integers(10**12, 10**14, 100_000)],
        [1796157579.0 + j * 1e-7 for j in range(50_000)]
        + [1796157579.0 + j / 10 ** (j % 8) for j in range(10_000)],
        [x for j in range(2000) for x in (float(1796157580 + j),
                                          np.nextafter(1796157580.0 + j, 0),
                                          np.nextafter(1796157580.0 + j, 1e10))],
        # f * 10^7 = 2^21 mod 2^22: halfway between two 7-digit decimals
        [1796157579 + j + (2 * (j % 100) + 1) * 2 ** 14 / 2 ** 22 for j in range(20_000)],
    ]
    for xs in cases:
        got = _digits_of(list(xs), monkeypatch)
        assert got is not None
        want = [repr(float(x)) for x in xs]
        assert got == want
    # outside the range it is sure of: repr's way
    assert _digits_of([1.5, 1796157579.25], monkeypatch) is None
    assert _digits_of([2.0 ** 31], monkeypatch) is None
    assert _digits_of([2.0 ** 31 - 0.5, 2.0 ** 31 + 0.5], monkeypatch) is None  # two exponents


def test_a_caller_named_anew_is_written_anew() -> None:
    """The engine names an address anew when the process maps something else there: the
    lines follow the names they are given, not the first ones."""
    rec = _recorder("x86_64")
    runs = [r for r in _runs(rec) if batch.durations(r) is not None]
    ctx = _ctx(rec, True, False)
    lines = jsonl.SlotLines(min_segment=1)
    callers = _callers(runs)
    first = lines.render(ctx, runs[0], callers)
    renamed = {a: (t.replace("prog", "other"), s) for a, (t, s) in callers.items()}
    again = lines.render(ctx, runs[0], renamed)
    assert first is not None and again is not None
    assert again == [x.replace("prog+", "other+") for x in first] != first
    assert again == _event_lines(ctx, runs[0], renamed, SlotReplay())


def test_threads_taking_turns_are_made_by_key() -> None:
    """Slots of threads taking turns in the ring (segments of one slot) are made group by
    group of one key and put back in ring order; a run with more distinct keys than
    min_segment slots each goes the events' way (None)."""
    import numpy as np
    rec = _recorder("x86_64")
    fid = {f.plain: j for j, f in enumerate(rec.funcs)}
    ts = (5).to_bytes(8, "little") + (7).to_bytes(8, "little")
    turns = b"".join(_slot(1 + j, fid["clock_gettime"], 2, (1 + j % 3 // 2, 0x7000), 0,
                           ts[:8] + (j * 1000).to_bytes(8, "little"), tid=4242 + j % 2,
                           t0=10_000 + 40 * j)
                     for j in range(300))
    turns += b"".join(_slot(301 + j, fid["getcpu"], 6, (0x7300, 0x7304, 0), 0,
                            bytes([j % 2, 0, 0, 0]), b"\x01\0\0\0", tid=4242 + j % 2,
                            t0=30_000 + 40 * j) for j in range(100))
    ctx = _ctx(rec, True, False)
    callers = {0x401000: ("0x401000 prog+0x1000", None)}
    run = batch.SlotRun(np.frombuffer(turns, batch.FULL_DTYPE), 0.5, 9_000, 1_000_000)
    assert len(batch.key_bounds(run.slots, 3)) > 300          # turns: segments of one slot
    got = jsonl.SlotLines().render(ctx, run, callers)
    assert got is not None and len(got) == 400
    assert got == _event_lines(ctx, run, callers, SlotReplay())
    many = b"".join(_slot(1 + j, fid["clock_gettime"], 2, (1, 0x7000 + 16 * j), 0, ts)
                    for j in range(256))
    run = batch.SlotRun(np.frombuffer(many, batch.FULL_DTYPE), 0.5, 9_000, 1_000_000)
    assert jsonl.SlotLines().render(ctx, run, callers) is None
