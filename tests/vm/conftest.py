"""Tests that boot the emulated arm64 machine (scripts/vm aarch64). They take tens of seconds
warm and minutes on the first run (the machine is built), so they are deselected unless
VDSOTRACE_VM=1: `VDSOTRACE_VM=1 .venv/bin/python -m pytest -q tests/vm`."""
from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("VDSOTRACE_VM") == "1":
        return
    vm = [it for it in items if it.get_closest_marker("arm64vm")]
    if vm:
        config.hook.pytest_deselected(items=vm)
        items[:] = [it for it in items if not it.get_closest_marker("arm64vm")]
