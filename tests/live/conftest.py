"""Live tests: real targets traced by `python -m tracer`, compared with what the
targets recorded. Every process a test starts is killed (by pid) when it ends."""
from __future__ import annotations

import pytest

import targets as T


@pytest.fixture(autouse=True)
def _reap_everything(reaper: T.Reaper) -> T.Reaper:
    return reaper
