"""Shared fixtures. The C targets are compiled once per session (64- and 32-bit)
into a temporary directory, and reused across sessions while their sources are
unchanged (see tests/targets.py: build)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import pytest

import targets as T

if TYPE_CHECKING:
    from tracer.console.commands import Console

# Every (target, 32-bit?) the live tests use.
ALL_TARGETS: list[tuple[str, bool]] = [
    ("vcalls", False), ("vcalls", True),
    ("sigs", False), ("sigs", True),
    ("syscalls32", True),
    ("threads", False),
    ("spin", False), ("spin", True),
    ("napper", False), ("napper", True),
    ("holdsig", False), ("holdsig", True),
    ("stamp", False), ("stamp", True),
]


@pytest.fixture(scope="session")
def compiled_targets() -> dict[tuple[str, bool], Path | T.BuildError]:
    """Compile every target, 64- and 32-bit, once per session.

    A failure is kept, not raised, so that only the tests needing that binary
    fail (a missing gcc -m32 fails the 32-bit tests, with the hint to run
    scripts/test, and leaves the 64-bit ones alone)."""
    built: dict[tuple[str, bool], Path | T.BuildError] = {}
    for name, m32 in ALL_TARGETS:
        try:
            built[(name, m32)] = T.build(name, m32=m32)
        except T.BuildError as e:
            built[(name, m32)] = e
    return built


@pytest.fixture(scope="session")
def target_bin(compiled_targets: dict[tuple[str, bool], Path | T.BuildError]) -> Callable[..., Path]:
    """target_bin(name, m32=False) -> the compiled binary; fails (never skips) if it
    cannot be built."""

    def get(name: str, m32: bool = False) -> Path:
        r = compiled_targets.get((name, m32))
        if r is None:
            try:
                r = T.build(name, m32=m32)
            except T.BuildError as e:
                r = e
            compiled_targets[(name, m32)] = r
        if isinstance(r, T.M32Unavailable):
            pytest.fail(str(r), pytrace=False)
        if isinstance(r, T.BuildError):
            pytest.fail(f"cannot build target {name}{' (-m32)' if m32 else ''}: {r}", pytrace=False)
        return r

    return get


@pytest.fixture
def reaper() -> Iterator[T.Reaper]:
    """Every process a test starts through tests/targets.py is killed (by pid) when it ends."""
    r = T.Reaper()
    T.set_reaper(r)
    try:
        yield r
    finally:
        T.set_reaper(None)
        r.reap()


@pytest.fixture
def console() -> Iterator[tuple[Console, list[str]]]:
    """A console (tracer.console.commands) whose output lines collect in a list; shut down
    (detaching whatever it attached) after the test."""
    from tracer.console.commands import Console
    lines: list[str] = []
    c = Console(lines.append, color=False)
    yield c, lines
    c.shutdown()
