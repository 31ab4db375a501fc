"""Live tests: real targets traced by `python -m tracer`, compared with what the
targets recorded. Every process a test starts is killed (by pid) when it ends."""
from __future__ import annotations

from typing import Iterator

import pytest

import targets as T


@pytest.fixture(autouse=True)
def reaper() -> Iterator[T.Reaper]:
    r = T.Reaper()
    T.set_reaper(r)
    try:
        yield r
    finally:
        T.set_reaper(None)
        r.reap()
