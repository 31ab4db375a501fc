"""Checks of a Chrome trace-event JSON file (the Trace Event Format, JSON Object Format) by the
format's rules, as the Perfetto UI and chrome://tracing read it: no validator that runs offline
is packaged (PyPI's `perfetto` downloads its trace processor binary at run time).

Rules checked:
- the document is JSON: an object with a `traceEvents` list of objects;
- every event has a string `name`, a known `ph`, integer `pid` and `tid`; `X` (complete) events
  have numeric `ts` and `dur` >= 0 (microseconds), `i` (instant) events a numeric `ts` and a
  scope `s` of t, p or g; `M` (metadata) events name a process or a thread in `args.name`;
- each pid with events has exactly one `process_name`, each (pid, tid) with events exactly one
  `thread_name`;
- per thread, complete events appear with `ts` never decreasing, and their intervals nest: two
  slices either do not overlap or one contains the other (a partial overlap is an error; so are
  two distinct slices with the same non-empty interval, which no reader can order).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

__all__ = ["Slice", "Checked", "check_trace", "load_trace"]

_PHASES = {"X", "i", "I", "M", "B", "E", "C", "b", "e", "n", "s", "t", "f", "P", "O", "N", "D"}


@dataclass(frozen=True)
class Slice:
    pid: int
    tid: int
    start: int          # ns
    end: int            # ns
    name: str
    cat: str
    args: dict[str, Any]


@dataclass
class Checked:
    problems: list[str] = field(default_factory=list)
    slices: list[Slice] = field(default_factory=list)
    instants: list[dict[str, Any]] = field(default_factory=list)
    process_names: dict[int, str] = field(default_factory=dict)
    thread_names: dict[tuple[int, int], str] = field(default_factory=dict)
    doc: dict[str, Any] = field(default_factory=dict)


def _ns(v: Any) -> int:
    return int((v if isinstance(v, Decimal) else Decimal(v)) * 1000)


def load_trace(path: Path | str) -> Any:
    """The document, numbers with decimals kept exact."""
    return json.loads(Path(path).read_text(), parse_float=Decimal)


def check_trace(doc: Any) -> Checked:
    c = Checked()
    bad = c.problems
    if not isinstance(doc, dict) or not isinstance(doc.get("traceEvents"), list):
        bad.append("not a JSON object with a traceEvents list")
        return c
    c.doc = doc
    seen: set[tuple[int, int]] = set()
    pids: set[int] = set()
    pnames: dict[int, int] = {}
    tnames: dict[tuple[int, int], int] = {}
    last_ts: dict[tuple[int, int], int] = {}
    for n, ev in enumerate(doc["traceEvents"]):
        if not isinstance(ev, dict):
            bad.append(f"event {n} is not an object")
            continue
        ph, pid, tid, name = ev.get("ph"), ev.get("pid"), ev.get("tid"), ev.get("name")
        if ph not in _PHASES:
            bad.append(f"event {n}: unknown ph {ph!r}")
            continue
        if not isinstance(pid, int) or not isinstance(tid, int):
            bad.append(f"event {n}: pid/tid not integers: {pid!r}/{tid!r}")
            continue
        if not isinstance(name, str):
            bad.append(f"event {n}: name is not a string: {name!r}")
            continue
        if ph == "M":
            label = ev.get("args", {}).get("name") if isinstance(ev.get("args"), dict) else None
            if not isinstance(label, str):
                bad.append(f"event {n}: metadata {name} without a string args.name")
            if name == "process_name":
                pnames[pid] = pnames.get(pid, 0) + 1
                c.process_names[pid] = str(label)
            elif name == "thread_name":
                tnames[(pid, tid)] = tnames.get((pid, tid), 0) + 1
                c.thread_names[(pid, tid)] = str(label)
            continue
        ts = ev.get("ts")
        if not isinstance(ts, (int, Decimal)) or isinstance(ts, bool) or ts < 0:
            bad.append(f"event {n}: ts {ts!r} is not a number >= 0")
            continue
        if ph in ("i", "I"):
            if ev.get("s", "t") not in ("t", "p", "g"):
                bad.append(f"event {n}: instant scope {ev.get('s')!r}")
            c.instants.append(ev)
            if ev.get("s", "t") != "g":
                seen.add((pid, tid))
                pids.add(pid)
            continue
        if ph != "X":
            continue
        dur = ev.get("dur")
        if not isinstance(dur, (int, Decimal)) or isinstance(dur, bool) or dur < 0:
            bad.append(f"event {n}: dur {dur!r} is not a number >= 0")
            continue
        start = _ns(ts)
        key = (pid, tid)
        if start < last_ts.get(key, 0):
            bad.append(f"event {n}: ts {ts} goes back on thread {tid} (was "
                       f"{Decimal(last_ts[key]) / 1000})")
        last_ts[key] = start
        seen.add(key)
        pids.add(pid)
        args = ev.get("args") if isinstance(ev.get("args"), dict) else {}
        c.slices.append(Slice(pid, tid, start, start + _ns(dur), name, str(ev.get("cat", "")),
                              args))
    for pid in sorted(pids):
        if pnames.get(pid, 0) != 1:
            bad.append(f"pid {pid}: {pnames.get(pid, 0)} process_name metadata events")
    for key in sorted(seen):
        if tnames.get(key, 0) != 1:
            bad.append(f"thread {key}: {tnames.get(key, 0)} thread_name metadata events")
    by_thread: dict[tuple[int, int], list[Slice]] = {}
    for s in c.slices:
        by_thread.setdefault((s.pid, s.tid), []).append(s)
    for key, slices in by_thread.items():
        stack: list[Slice] = []
        for s in sorted(slices, key=lambda s: (s.start, -s.end)):
            while stack and stack[-1].end <= s.start:
                stack.pop()
            if stack:
                top = stack[-1]
                if s.end > top.end:
                    bad.append(f"thread {key}: {s.name} [{s.start}, {s.end}) overlaps "
                               f"{top.name} [{top.start}, {top.end}) partially")
                elif (s.start, s.end) == (top.start, top.end) and s.end > s.start:
                    bad.append(f"thread {key}: {s.name} and {top.name} share the interval "
                               f"[{s.start}, {s.end})")
            stack.append(s)
    return c
