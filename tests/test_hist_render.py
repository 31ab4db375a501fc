"""Latency histograms on hand-made events: log2 buckets, bpftrace's hist() layout, per-clock
keys, fallbacks counted apart, interface.md's `histogram` JSON events."""
from __future__ import annotations

import json

from tracer.events import Addr, AttachEvent, CallEvent, SyscallEvent, Timespec
from tracer.render.hist import (BAR_WIDTH, LatencyHistograms, bucket_bounds, bucket_index,
                                hist_dicts, hist_json_lines, hist_text)


def _call(dur: int, clock: str | int = "CLOCK_MONOTONIC", func: str = "clock_gettime",
          fallback: bool = False, tid: int = 11) -> CallEvent:
    args = {"clockid": clock, "tp": Addr(0x1000)} if "clock" in func else {"tloc": None}
    return CallEvent(10, tid, 1700000000.0, func, f"__vdso_{func}", args, 0, None,
                     {"tp": Timespec(1, 2)}, fallback, "cpu-time-clock" if fallback else None,
                     dur, 0x1234, "0x1234", None, None)


def test_buckets_are_log2_in_ns() -> None:
    assert [bucket_index(d) for d in (0, 1, 2, 3, 4, 7, 8, 1023, 1024)] == \
        [0, 1, 2, 2, 3, 3, 4, 10, 11]
    assert bucket_bounds(0) == (0, 1) and bucket_bounds(1) == (1, 2)
    assert bucket_bounds(2) == (2, 4) and bucket_bounds(11) == (1024, 2048)
    for d in (0, 1, 5, 999, 12345, 1 << 40):
        lo, hi = bucket_bounds(bucket_index(d))
        assert lo <= d < hi


def test_text_layout_follows_bpftrace() -> None:
    h = LatencyHistograms()
    for d in [0] + [1] * 2 + [20] * 8 + [40] * 4 + [1500] + [3 << 20]:
        h.add(_call(d))
    text = hist_text(h.histograms())
    lines = text.splitlines()
    i = lines.index("@clock_gettime[CLOCK_MONOTONIC]: 17 calls")
    body = lines[i + 1:]
    # bpftrace: header left in 16 columns, count right in 8, " |", 52 columns of bar, "|"
    assert body[0] == "[0]" + " " * 13 + "       1 |" + "@" * (BAR_WIDTH // 8) + \
        " " * (BAR_WIDTH - BAR_WIDTH // 8) + "|"
    assert body[1].startswith("[1]              ")
    assert body[2].startswith("[2, 4)                 0 |" + " " * BAR_WIDTH + "|")
    assert body[3].startswith("[4, 8) ")
    assert body[5] == "[16, 32)               8 |" + "@" * BAR_WIDTH + "|"
    assert body[6].startswith("[32, 64)               4 |" + "@" * (BAR_WIDTH // 2) + " ")
    assert any(b.startswith("[1K, 2K)               1 |") for b in body)
    assert any(b.startswith("[2M, 4M)               1 |") for b in body)
    assert all(len(b) == 16 + 8 + 2 + BAR_WIDTH + 1 for b in body if b)


def test_per_clock_and_fallbacks_apart() -> None:
    h = LatencyHistograms()
    h.add(AttachEvent(10, 10, 1.0, 0x7000, "x86_64", "tsc", True, None, 1, (), None, True))
    for _ in range(5):
        h.add(_call(30))
    h.add(_call(25, clock="CLOCK_REALTIME"))
    h.add(_call(3000, clock="CLOCK_PROCESS_CPUTIME_ID", fallback=True))
    h.add(_call(31, clock="CLOCK_MONOTONIC"))
    h.add(_call(5000, clock="CLOCK_MONOTONIC", fallback=True))
    h.add(_call(33, clock=99))
    h.add(_call(18, func="time"))
    hists = h.histograms()
    keys = [(x.func, x.clock) for x in hists]
    # clocks in include/uapi/linux/time.h's order, unknown ids after
    assert keys == [("clock_gettime", "CLOCK_REALTIME"), ("clock_gettime", "CLOCK_MONOTONIC"),
                    ("clock_gettime", "CLOCK_PROCESS_CPUTIME_ID"), ("clock_gettime", 99),
                    ("time", None)]
    mono = hists[1]
    assert (mono.calls, mono.fallbacks) == (7, 1)
    assert sum(b.count for b in mono.buckets) == 7
    assert [(b.lo, b.hi, b.count) for b in mono.fallback_buckets] == [(4096, 8192, 1)]
    text = hist_text(hists)
    assert "@clock_gettime[CLOCK_MONOTONIC]: 7 calls, 1 fell back into the kernel" in text
    assert "@clock_gettime[CLOCK_MONOTONIC, fallback]: 1 of them" in text
    assert "@time: 1 call\n" in text
    # every call is in the buckets once: all of a clock's calls fell back, no second histogram
    assert "@clock_gettime[CLOCK_PROCESS_CPUTIME_ID, fallback]" not in text

    docs = [json.loads(line) for line in hist_json_lines(hists, h.pid or 0, h.pid or 0, 2.5)]
    assert len(docs) == 5
    for d in docs:
        assert {"event", "pid", "tid", "time", "func", "clock", "unit", "buckets",
                "fallbacks"} <= set(d)
        assert d["event"] == "histogram" and d["unit"] == "ns" and d["pid"] == 10
        assert all(set(b) == {"lo", "hi", "count"} and b["lo"] < b["hi"] for b in d["buckets"])
    byk = {(d["func"], d["clock"]): d for d in docs}
    assert byk[("time", None)]["buckets"] == [{"lo": 16, "hi": 32, "count": 1}]
    assert byk[("clock_gettime", "CLOCK_PROCESS_CPUTIME_ID")]["fallbacks"] == 1
    assert sum(b["count"] for d in docs for b in d["buckets"]) == 11


def test_gateway_syscalls_per_name() -> None:
    h = LatencyHistograms()
    h.add(SyscallEvent(3, 3, 1.0, 4, "write", (1, 2, 3), 3, None, 900, None))
    h.add(SyscallEvent(3, 3, 1.0, 4, "write", (1, 2, 3), 3, None, 1100, None))
    h.add(SyscallEvent(3, 3, 1.0, 20, "getpid", (), 3, None, 100, None))
    (g, w) = h.histograms()
    assert (g.func, g.syscall, g.calls, g.clock) == ("__kernel_vsyscall", "getpid", 1, None)
    assert [(b.lo, b.count) for b in w.buckets] == [(512, 1), (1024, 1)]
    assert "@__kernel_vsyscall[write]: 2 system calls" in hist_text([g, w])
    assert hist_dicts([w], 3, 3, 1.0)[0]["syscall"] == "write"


def test_nothing_traced() -> None:
    assert hist_text(LatencyHistograms().histograms()) == "latency histograms: no calls"
