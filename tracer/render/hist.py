"""Latency histograms: log2 buckets of call durations in nanoseconds, per vDSO function and,
for clock_gettime, per clock; printed in bpftrace's hist() layout (src/output.cpp, TextOutput::hist
and hist_index_label: `[lo, hi)` labels with K/M/G... suffixes for powers of 1024, the count right
aligned in 8 columns, a bar of up to 52 `@`), the same buckets BCC's funclatency prints as
`lo -> hi-1`.

Bucket k holds the durations d with d.bit_length() == k: bucket 0 is [0], bucket 1 is [1], bucket
k >= 2 is [2**(k-1), 2**k). Every call counts in its bucket; the calls that fell back into the
kernel are also counted apart (`fallbacks`, and their own histogram), since their latency is
a system call's, not the vDSO's.

Pure: fed with events (`LatencyHistograms.add`), by the live trace, the console, or a report.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from tracer.consts import ClockId
from tracer.events import CallEvent, Event, SyscallEvent

__all__ = ["Bucket", "Histogram", "LatencyHistograms", "bucket_index", "bucket_bounds",
           "PER_CLOCK", "GATEWAY", "hist_text", "hist_dicts", "hist_json_lines", "BAR_WIDTH"]

# Functions whose histograms are kept per clock id (their first argument).
PER_CLOCK = frozenset({"clock_gettime", "clock_gettime64"})
GATEWAY = "__kernel_vsyscall"      # i386 system calls: one histogram per system call name
BAR_WIDTH = 52                     # bpftrace's max_width
_NBUCKETS = 65                     # durations are below 2**64 ns
_SUFFIX = " KMGTPE"


def bucket_index(ns: int) -> int:
    return ns.bit_length() if ns > 0 else 0


def bucket_bounds(k: int) -> tuple[int, int]:
    """[lo, hi) of bucket k, in ns."""
    if k == 0:
        return 0, 1
    return 1 << (k - 1), 1 << k


@dataclass(frozen=True, slots=True)
class Bucket:
    lo: int          # ns, inclusive
    hi: int          # ns, exclusive
    count: int


@dataclass(frozen=True, slots=True)
class Histogram:
    """One (function, clock) histogram, from its first non-empty bucket to its last (empty
    buckets in between kept, as bpftrace prints them)."""
    func: str
    clock: str | int | None          # the clock's name (CLOCK_MONOTONIC), or its number
    syscall: str | None              # __kernel_vsyscall: the system call's name
    calls: int
    fallbacks: int
    buckets: tuple[Bucket, ...]
    fallback_buckets: tuple[Bucket, ...]

    def label(self, *extra: str) -> str:
        """bpftrace's `@name[key, ...]`."""
        keys = [str(k) for k in (self.syscall if self.syscall is not None else self.clock,
                                 *extra) if k is not None]
        return f"@{self.func}[{', '.join(keys)}]" if keys else f"@{self.func}"


@dataclass(slots=True)
class _Counts:
    counts: list[int] = field(default_factory=lambda: [0] * _NBUCKETS)
    fallbacks: list[int] = field(default_factory=lambda: [0] * _NBUCKETS)
    nfallbacks: int = 0


def _trim(counts: list[int]) -> tuple[Bucket, ...]:
    used = [k for k, n in enumerate(counts) if n]
    if not used:
        return ()
    return tuple(Bucket(*bucket_bounds(k), counts[k]) for k in range(used[0], used[-1] + 1))


def _clock_order(clock: str | int | None) -> tuple[int, str]:
    if clock is None:
        return (-1 << 40, "")
    if isinstance(clock, int):
        return (clock if clock >= 0 else (1 << 40) - clock, "")
    try:
        return (ClockId[clock].value, clock)
    except KeyError:
        return (1 << 41, clock)


class LatencyHistograms:
    """Aggregates call durations from events; constant memory per (function, clock)."""

    def __init__(self) -> None:
        self._calls: dict[tuple[str, str | int | None], _Counts] = {}
        self._syscalls: dict[str, _Counts] = {}
        self.pid: int | None = None         # the first process seen: the histograms' `pid`

    def clear(self) -> None:
        self._calls.clear()
        self._syscalls.clear()

    def add(self, e: Event) -> None:
        if type(e) is CallEvent:
            self.add_call(e)
        elif isinstance(e, SyscallEvent):
            c = self._syscalls.get(e.name)
            if c is None:
                c = self._syscalls[e.name] = _Counts()
            c.counts[bucket_index(e.duration_ns)] += 1
            if self.pid is None:
                self.pid = e.pid
        elif self.pid is None:
            self.pid = e.pid

    def add_call(self, e: CallEvent) -> None:
        if self.pid is None:
            self.pid = e.pid
        clock = e.args.get("clockid") if e.func in PER_CLOCK else None
        self.add_raw(e.func, clock if isinstance(clock, (str, int)) else None, e.duration_ns,
                     e.fallback)

    def add_raw(self, func: str, clock: str | int | None, duration_ns: int,
                fallback: bool) -> None:
        """One call without its event (for a path that aggregates without building events;
        `clock` is the clock's name, or its number when it has none, for PER_CLOCK functions)."""
        c = self._calls.get((func, clock))
        if c is None:
            c = self._calls[(func, clock)] = _Counts()
        k = bucket_index(duration_ns)
        c.counts[k] += 1
        if fallback:
            c.nfallbacks += 1
            c.fallbacks[k] += 1

    def histograms(self) -> list[Histogram]:
        """A snapshot, by function, then clock in include/uapi/linux/time.h's order, then the
        i386 system calls by name."""
        out = []
        for (func, clock), c in sorted(self._calls.items(),
                                       key=lambda kv: (kv[0][0], _clock_order(kv[0][1]))):
            out.append(Histogram(func, clock, None, sum(c.counts), c.nfallbacks, _trim(c.counts),
                                 _trim(c.fallbacks)))
        for name, c in sorted(self._syscalls.items()):
            out.append(Histogram(GATEWAY, None, name, sum(c.counts), 0, _trim(c.counts), ()))
        return out


def _label(power: int) -> str:
    """bpftrace's hist_index_label: 2**power, with a suffix for each factor of 1024."""
    decade = min(power // 10, len(_SUFFIX) - 1)
    return f"{1 << (power - 10 * decade)}{_SUFFIX[decade].strip()}"


def _bucket_header(b: Bucket) -> str:
    if b.hi - b.lo == 1:
        return f"[{b.lo}]"
    return f"[{_label(b.lo.bit_length() - 1)}, {_label(b.hi.bit_length() - 1)})"


def _bars(buckets: tuple[Bucket, ...]) -> list[str]:
    top = max((b.count for b in buckets), default=0) or 1
    return [f"{_bucket_header(b):<16}{b.count:>8} |"
            f"{'@' * (b.count * BAR_WIDTH // top):<{BAR_WIDTH}}|" for b in buckets]


def hist_text(hists: list[Histogram]) -> str:
    """The histograms as bpftrace prints maps of hist(): a `@name[key]:` line (here with the
    call and fallback counts), the buckets, a blank line."""
    if not hists:
        return "latency histograms: no calls"
    out = ["latency histograms, in nanoseconds ([lo, hi) log2 buckets; K = 1024, M = 1024K):", ""]
    for h in hists:
        what = "system call" if h.syscall is not None else "call"
        fb = f", {h.fallbacks} fell back into the kernel" if h.fallbacks else ""
        out.append(f"{h.label()}: {h.calls} {what}{'' if h.calls == 1 else 's'}{fb}")
        out.extend(_bars(h.buckets))
        out.append("")
        if h.fallbacks and h.fallbacks != h.calls:
            out.append(f"{h.label('fallback')}: {h.fallbacks} of them")
            out.extend(_bars(h.fallback_buckets))
            out.append("")
    return "\n".join(out).rstrip("\n")


def hist_dicts(hists: list[Histogram], pid: int, tid: int, time: float) -> list[dict[str, Any]]:
    """interface.md's `histogram` events (one per function and clock), with the calls counted,
    the fallbacks' own buckets and, for i386 system calls, the call's name."""
    out = []
    for h in hists:
        d: dict[str, Any] = {
            "event": "histogram", "pid": pid, "tid": tid, "time": time, "func": h.func,
            "clock": h.clock, "unit": "ns",
            "buckets": [{"lo": b.lo, "hi": b.hi, "count": b.count} for b in h.buckets],
            "fallbacks": h.fallbacks, "calls": h.calls,
            "fallback_buckets": [{"lo": b.lo, "hi": b.hi, "count": b.count}
                                 for b in h.fallback_buckets]}
        if h.syscall is not None:
            d["syscall"] = h.syscall
        out.append(d)
    return out


def hist_json_lines(hists: list[Histogram], pid: int, tid: int, time: float) -> list[str]:
    return [json.dumps(d, separators=(", ", ": ")) for d in hist_dicts(hists, pid, tid, time)]
