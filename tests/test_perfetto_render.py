"""The timeline renderer on hand-made events, checked by the trace-event format's rules
(tests/chrome_trace.py): tight loops whose times collide at the epoch float's resolution,
system calls nested in the call that fell back into them, calls in a handler inside an open
system call, late parents, odd thread names, an empty trace."""
from __future__ import annotations

import io
import json
import random
from typing import Any

import pytest

from chrome_trace import check_trace
from tracer.events import (Addr, CallEvent, ExitEvent, NoticeEvent, SignalEvent, SigreturnEvent,
                           SyscallEvent, Timespec)
from tracer.render.perfetto import PerfettoTimeline

EPOCH_NS = 1_796_000_000 * 10**9 + 123_456_789   # a time of this era: floats resolve ~0.24 us


def _t(ns: int) -> float:
    """An event's `time` as the engine makes it: seconds since the epoch, a float."""
    return (EPOCH_NS + ns) / 1e9


def _call(tid: int, start: int, dur: int, fallback: bool = False, func: str = "clock_gettime",
          pid: int = 100) -> CallEvent:
    return CallEvent(pid, tid, _t(start), func, f"__vdso_{func}",
                     {"clockid": "CLOCK_MONOTONIC", "tp": Addr(0x1000)}, 0, None,
                     {"tp": Timespec(5, 6)}, fallback, "cpu-time-clock" if fallback else None,
                     dur, 0x4000, "0x4000 libc.so.6+0x4000", "libc.so.6!clock_gettime+0x19",
                     None)


def _sys(tid: int, start: int, dur: int, nested_in: str | None = None,
         pid: int = 100) -> SyscallEvent:
    return SyscallEvent(pid, tid, _t(start), 265, "clock_gettime64", (1, 0x2000), 0, None, dur,
                        nested_in)


def _render(events: list[Any], hold: int = 4096, names: Any = None) -> tuple[str, Any]:
    buf = io.StringIO()
    tl = PerfettoTimeline(buf, names or (lambda pid, tid: f"t{tid}"), close=False, hold=hold)
    for e in events:
        tl.add(e)
    tl.close()
    text = buf.getvalue()
    checked = check_trace(json.loads(text, parse_float=__import__("decimal").Decimal))
    return text, checked


def test_tight_loop_collisions_nest_and_stay_in_order() -> None:
    # 2000 calls of 20-45 ns, 50-70 ns apart: dozens share one float time
    rng = random.Random(1)
    evs, t, real = [], 0, []
    for _ in range(2000):
        d = rng.randint(20, 45)
        evs.append(_call(7, t, d))
        real.append(t)
        t += d + rng.randint(5, 25)
    _, c = _render(evs)
    assert c.problems == []
    assert len(c.slices) == 2000
    starts = [s.start for s in c.slices]
    assert starts == sorted(starts)
    origin = c.doc["otherData"]["ts_origin_unix_s"]
    for s, r, e in zip(c.slices, real, evs):
        assert s.end - s.start == e.duration_ns            # durations are exact
        assert abs(s.start - (EPOCH_NS - origin * 10**9 + r)) <= 300   # moved < resolution


def test_fallback_contains_its_syscall() -> None:
    # i386: clock_gettime64 falls back through __kernel_vsyscall; the system call returns
    # first, inside the same float tick as the call's entry and in a later one
    evs = [_sys(7, 40, 900, "clock_gettime64"), _call(7, 0, 2000, True, "clock_gettime64"),
           _sys(7, 3000 + 300, 1500, "clock_gettime64"),
           _call(7, 3000, 2200, True, "clock_gettime64"),
           _call(7, 6000, 30)]
    _, c = _render(evs)
    assert c.problems == []
    sl = c.slices
    assert [s.name for s in sl] == ["clock_gettime64 [fallback]", "clock_gettime64",
                                    "clock_gettime64 [fallback]", "clock_gettime64",
                                    "clock_gettime"]
    assert [s.cat for s in sl] == ["vdso,fallback", "syscall", "vdso,fallback", "syscall",
                                   "vdso"]
    for parent, child in ((sl[0], sl[1]), (sl[2], sl[3])):
        assert parent.start <= child.start and child.end <= parent.end
        assert (parent.start, parent.end) != (child.start, child.end)
    assert sl[0].args["fallback_reason"] == "cpu-time-clock"
    assert sl[1].args["nested_in"] == "clock_gettime64"


def test_handler_calls_inside_an_open_syscall_and_late_parents() -> None:
    # a blocking system call open across a handler that makes calls; with a small hold the
    # earliest children are already written when the parent comes
    for hold in (4096, 3):
        evs = [_call(9, 2000 + 100 * i, 40) for i in range(8)]
        evs.append(_sys(9, 0, 50_000))
        evs.append(_call(9, 60_000, 30))
        _, c = _render(evs, hold=hold)
        assert c.problems == [], (hold, c.problems)
        assert len(c.slices) == 10


def _tree(rng: random.Random, start: int, end: int, depth: int, out: list[Any], tid: int,
          parent_fallback: str | None) -> None:
    """Random properly nested calls in [start, end), emitted as the engine does: a call when
    it returns, so children before their parent."""
    t = start
    while t < end - 60 and rng.random() < 0.85:
        dur = rng.randint(10, max(10, min(end - t - 1, 3000 if depth else 200_000)))
        if depth < 3 and dur > 500 and rng.random() < 0.5:
            fb = rng.random() < 0.5
            _tree(rng, t + rng.randint(0, 300), t + dur, depth + 1, out, tid,
                  "clock_gettime" if fb else None)
            out.append(_call(tid, t, dur, fallback=fb) if fb or rng.random() < 0.5
                       else _sys(tid, t, dur))
        elif parent_fallback:
            out.append(_sys(tid, t, dur, parent_fallback))
        else:
            out.append(_call(tid, t, dur))
        t += dur + rng.randint(0, 400)


@pytest.mark.parametrize("seed", range(40))
def test_random_nesting_always_valid(seed: int) -> None:
    rng = random.Random(seed)
    evs: list[Any] = []
    for tid in (1, 2, 3):
        one: list[Any] = []
        _tree(rng, 0, 2_000_000, 0, one, tid, None)
        evs.extend(one)
    total = len(evs)
    _, c = _render(evs, hold=rng.choice((2, 16, 4096)))
    assert c.problems == [], c.problems[:5]
    assert len(c.slices) == total


def test_metadata_once_names_escaped_instants() -> None:
    odd = 'we"ird\\\n\x01\u00e9\\xff'
    names = {(100, 100): "main", (100, 7): odd}
    evs = [_call(7, 0, 30), _call(100, 10, 30), _call(7, 1000, 30),
           SignalEvent(100, 7, _t(2000), 10, "SIGUSR1", 0x5000, "handler", 0x6000,
                       "__restore_rt", 0x7000, 0x8000),
           SigreturnEvent(100, 7, _t(3000), "forge", 0x9000, None, None, "no-delivery", False),
           NoticeEvent(100, 100, _t(3500), "12 calls were not recorded"),
           ExitEvent(100, 100, _t(4000), 0, None)]
    text, c = _render(evs, names=lambda pid, tid: names.get((pid, tid)))
    assert c.problems == []
    assert c.process_names == {100: "main"}
    assert c.thread_names == {(100, 7): f"{odd} 7", (100, 100): "main 100"}
    assert all(ord(ch) < 128 for ch in text)
    kinds = {(i["name"], i["s"]) for i in c.instants}
    assert kinds == {("SIGUSR1", "t"), ("sigreturn !no-delivery", "t"), ("notice", "g"),
                     ("exit", "p")}


def test_empty_trace_is_valid() -> None:
    text, c = _render([])
    assert c.problems == [] and c.slices == []
    assert json.loads(text)["traceEvents"] == []


def test_checker_catches_what_it_should() -> None:
    """The rules the tests rely on do fail on bad documents."""
    def doc(events: list[dict[str, Any]]) -> dict[str, Any]:
        meta = [{"name": "process_name", "ph": "M", "pid": 1, "tid": 1, "args": {"name": "p"}},
                {"name": "thread_name", "ph": "M", "pid": 1, "tid": 1, "args": {"name": "t"}}]
        return {"traceEvents": meta + events}

    def x(ts: int, dur: int) -> dict[str, Any]:
        return {"name": "f", "ph": "X", "pid": 1, "tid": 1, "ts": ts, "dur": dur}

    assert check_trace(doc([x(0, 10), x(2, 3), x(20, 1)])).problems == []
    assert any("partially" in p for p in check_trace(doc([x(0, 10), x(5, 10)])).problems)
    assert any("goes back" in p for p in check_trace(doc([x(5, 1), x(0, 1)])).problems)
    assert any("share" in p for p in check_trace(doc([x(0, 10), x(0, 10)])).problems)
    twice = doc([x(0, 1)])
    twice["traceEvents"].append(twice["traceEvents"][1])
    assert any("2 thread_name" in p for p in check_trace(twice).problems)
    assert check_trace({"traceEvents": [x(0, 1)]}).problems   # no metadata at all


def test_slice_args_are_the_call() -> None:
    from tracer.events import Timeval, Timezone, Unreadable
    from tracer.render.jsonl import to_json_value
    e = CallEvent(5, 6, _t(0), "gettimeofday", "__vdso_gettimeofday",
                  {"tv": Addr(0x10), "tz": Unreadable(0x20), "odd": 'q"\\'}, -14, "EFAULT",
                  {"tv": Timeval(1, 2), "tz": Timezone(3, 4)}, True, "unknown", 77, 0x30,
                  "0x30 a.so+0x30", None, ("0x30 a.so!f+0x1", "0x40 b!main+0x2"))
    _, c = _render([e])
    (s,) = c.slices
    assert s.name == "gettimeofday [fallback]" and s.cat == "vdso,fallback"
    assert s.end - s.start == 77
    a = json.loads(json.dumps(s.args, default=str))
    assert a["args"] == {k: to_json_value(v) for k, v in e.args.items()}
    assert a["out"] == {k: to_json_value(v) for k, v in e.out.items()}
    assert (a["ret"], a["errno"], a["fallback"], a["fallback_reason"]) == \
        (-14, "EFAULT", True, "unknown")
    assert (a["caller"], a["caller_symbol"], a["symbol"]) == \
        ("0x30 a.so+0x30", None, "__vdso_gettimeofday")
    assert a["stack"] == list(e.stack)


def test_memory_bound_across_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past HOLD_ALL held slices every thread's are written: still valid, nothing lost."""
    import tracer.render.perfetto as P
    monkeypatch.setattr(P, "HOLD_ALL", 7)
    for seed in range(5):
        rng = random.Random(100 + seed)
        evs: list[Any] = []
        for tid in (1, 2, 3, 4):
            one: list[Any] = []
            _tree(rng, 0, 500_000, 0, one, tid, None)
            evs.extend(one)
        _, c = _render(evs)
        assert c.problems == [] and len(c.slices) == len(evs)


def test_names_follow_exec_and_renames_but_not_after_exit() -> None:
    from tracer.events import ExecEvent
    names = {(1, 1): "sh", (1, 2): "worker", (5, 5): "short"}
    buf = io.StringIO()
    tl = PerfettoTimeline(buf, lambda pid, tid: names.get((pid, tid)), close=False)
    tl.add(_call(2, 0, 30, pid=1))
    tl.add(_call(5, 100, 30, pid=5))
    tl.add(ExitEvent(5, 5, _t(200), 0, None))
    names[(1, 1)] = "python3"                      # exec: the leader's comm is the new image's
    tl.add(ExecEvent(1, 1, _t(300), "/usr/bin/python3", 0x7000, "x86_64"))
    tl.add(_call(1, 400, 30, pid=1))
    names[(1, 2)] = "renamed"                      # pthread_setname_np after its first call
    names[(5, 5)] = "pid reused"                   # gone: its name stays the one it had
    tl.close()
    c = check_trace(json.loads(buf.getvalue(), parse_float=__import__("decimal").Decimal))
    assert c.problems == []
    assert c.process_names == {1: "python3", 5: "short"}
    assert c.thread_names == {(1, 1): "python3 1", (1, 2): "renamed 2", (5, 5): "short 5"}
