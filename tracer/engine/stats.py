"""-c's aggregates (per-function counters, call sites and stack paths kept in bounded tables;
the totals the console shows) and the summary made of them."""
from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Protocol

from tracer.engine.options import FuncStats, Summary
from tracer.vdso import GATEWAY_SYMBOL

if TYPE_CHECKING:
    from tracer.inject import CallStats


_MAX_KEYS = 10000   # distinct call sites / stack paths kept per function (-c stays bounded)
OTHER_SITES = "(other sites)"   # the -c row that counts the sites the table let go


class _Counter:
    """Aggregates for -c: never per-event data, so a long trace stays in constant memory.
    Sites and paths are keyed by their names (`prog!main+0x2a`): named while the process
    exists, they outlive it, and the same site in many forked children is one row."""
    __slots__ = ("calls", "fallbacks", "errors", "total_ns", "reasons", "sites", "paths",
                 "other")

    def __init__(self) -> None:
        self.calls = self.fallbacks = self.errors = self.total_ns = 0
        self.reasons: dict[str, int] = {}
        self.sites: dict[str, list[int]] = {}              # site -> [calls, ns]
        self.paths: dict[tuple[str, ...], list[int]] = {}  # frames -> [calls, ns]
        self.other = [0, 0, 0, 0]      # sites' calls and ns, paths' calls and ns, let go

    def add_site(self, site: str, path: tuple[str, ...] | None, dur: int) -> None:
        _count(self.sites, site, dur, self.other, 0)
        if path:
            _count(self.paths, path, dur, self.other, 2)


class Stats:
    """The statistics of one trace, fed by call assembly (engine/calls.py) and by the
    recorders' -c drain; what `summarize` reads (a `Counts`)."""

    def __init__(self, clocksource: str | None) -> None:
        self.clocksource = clocksource
        self.counters: dict[str, _Counter] = {}     # function (plain name) -> its counters
        self.inject_stats: dict[str, CallStats] = {}   # --inject -c: counted in the ring
        self.lost_records = 0       # --inject: calls the ring could not hold (or corrupt)
        self.calls = 0              # calls assembled (the console's totals)
        self.fallbacks = 0

    def track(self, funcs: Iterable[str]) -> None:
        """These functions (plain names) are traced: they get a row, even with no call."""
        for name in funcs:
            if name not in self.counters:
                self.counters[name] = _Counter()


def _count(table: dict[Any, list[int]], key: Any, dur: int, other: list[int],
           slot: int) -> None:
    """[calls, ns] += [1, dur]; a full table first lets its colder half go (counted in
    other[slot:slot + 2])."""
    row = table.get(key)
    if row is None:
        if len(table) >= _MAX_KEYS:
            _prune(table, other, slot)
        row = table[key] = [0, 0]
    row[0] += 1
    row[1] += dur


def _prune(table: dict[Any, list[int]], other: list[int], at: int) -> None:
    """Keep the hottest half of a full table; count the rest in other[at:at + 2]. A site
    seen again starts over, so the table holds the sites hot now and in the long run."""
    rows = sorted(table.items(), key=lambda kv: (kv[1][0], kv[1][1]))
    for key, (n, ns) in rows[:len(rows) // 2]:
        other[at] += n
        other[at + 1] += ns
        del table[key]


class Counts(Protocol):
    """What the -c summary is made of: the live engine's counters (or a replay of them)."""
    counters: dict[str, _Counter]
    inject_stats: dict[str, CallStats]     # --inject -c: the recorder's own per-function counts
    clocksource: str | None
    lost_records: int


def stats(s: Counts) -> list[FuncStats]:
    extra = s.inject_stats
    return [FuncStats(k, c.calls + (extra[k].calls if k in extra else 0),
                      c.fallbacks + (extra[k].fallbacks if k in extra else 0),
                      c.errors + (extra[k].errors if k in extra else 0),
                      c.total_ns + (extra[k].total_ns if k in extra else 0))
            for k, c in s.counters.items()]


def summarize(s: Counts, top: int = 5) -> Summary:
    """Everything -c prints: per function totals, fallback reasons, hottest call sites (and
    stack paths), the exports never called, a diagnosis when fallbacks dominate. Runs in the
    engine's thread, or after the engine ended."""
    rows = stats(s)
    reasons: dict[str, dict[str, int]] = {}
    sites: dict[str, list[tuple[str, int, int]]] = {}
    paths: dict[str, list[tuple[tuple[str, ...], int, int]]] = {}
    for name, c in s.counters.items():
        if c.reasons:
            reasons[name] = dict(c.reasons)
        hot = sorted(c.sites.items(), key=lambda kv: (-kv[1][0], -kv[1][1]))[:top]
        sites[name] = [(site, n, ns) for site, (n, ns) in hot]
        if c.other[0]:
            sites[name].append((OTHER_SITES, c.other[0], c.other[1]))
        hotp = sorted(c.paths.items(), key=lambda kv: (-kv[1][0], -kv[1][1]))[:top]
        paths[name] = [(frames, n, ns) for frames, (n, ns) in hotp]
        if c.other[2]:
            paths[name].append(((OTHER_SITES,), c.other[2], c.other[3]))
    unused = [r.func for r in rows if not r.calls]
    return Summary(rows, reasons, sites, paths, unused,
                   _diagnosis(s.clocksource, rows, reasons), s.lost_records)


def _diagnosis(clocksource: str | None, rows: list[FuncStats],
               reasons: dict[str, dict[str, int]]) -> str | None:
    calls = sum(r.calls for r in rows if r.func != GATEWAY_SYMBOL)
    falls = sum(r.fallbacks for r in rows if r.func != GATEWAY_SYMBOL)
    if not calls or falls * 2 < calls:
        return None
    total: dict[str, int] = {}
    for per in reasons.values():
        for k, v in per.items():
            total[k] = total.get(k, 0) + v
    main = max(total, key=lambda k: total[k]) if total else "unknown"
    why = {
        "no-vdso-clocksource": f"the clocksource {clocksource!r} has no vDSO read "
                               "mode: every clock read is a system call (tsc, kvm-clock "
                               "or hyperv_clocksource_tsc_page would serve them in user "
                               "space)",
        "cpu-time-clock": "CPU-time clocks (CLOCK_PROCESS_CPUTIME_ID, "
                          "CLOCK_THREAD_CPUTIME_ID, clock_getcpuclockid) are always "
                          "answered by the kernel",
        "invalid-clock": "the clock ids are invalid or have no vDSO mode",
        "getrandom-no-state": "getrandom is called without the opaque per-thread state "
                              "(the C library does not use the vDSO getrandom)",
    }.get(main, "the reason is unknown")
    return (f"diagnosis: {falls} of {calls} vDSO calls ({100 * falls // calls}%) fell back "
            f"to the kernel; mostly because {why}")
