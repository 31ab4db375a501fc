"""-c's aggregates: per-function counters, call sites and stack paths kept in bounded tables."""
from __future__ import annotations

from typing import Any


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
