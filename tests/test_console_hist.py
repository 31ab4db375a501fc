"""The console's `hist` on a live target: per clock, fallbacks apart, counts equal to the call
events the console received; `hist FUNC` narrows, `hist reset` clears."""
from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import pytest

from test_console import build_clockloop, running
from tracer.console.commands import Console

pytestmark = pytest.mark.live


@pytest.fixture(scope="module")
def clockloop(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_clockloop(tmp_path_factory.mktemp("console-hist-target"))


def test_hist_counts_the_calls(clockloop: Path, console: tuple[Console, list[str]],
                               tmp_path: Path) -> None:
    c, lines = console
    c.execute("hist")
    assert lines == ["no calls yet"]
    with running(clockloop, "500") as p:
        c.execute(f"attach {p.pid}")
        c.execute("break clock_gettime time")
        c.execute("continue")
        deadline = time.monotonic() + 20
        while True:
            c.drain()
            got = {(h.clock, h.fallbacks > 0) for h in c.stream.histograms()}
            if {("CLOCK_MONOTONIC", False), ("CLOCK_REALTIME", False),
                    ("CLOCK_PROCESS_CPUTIME_ID", True)} <= got:
                break
            assert time.monotonic() < deadline, f"histograms so far: {got}"
            time.sleep(0.1)
        c.execute("pause")
        lines.clear()
        c.execute(f"save {tmp_path / 'ev.jsonl'}")
        evs = [json.loads(ln) for ln in (tmp_path / "ev.jsonl").read_text().splitlines()]
        calls = Counter(e["args"]["clockid"] for e in evs if e["event"] == "call")
        falls = Counter(e["args"]["clockid"] for e in evs if e["event"] == "call" and
                        e["fallback"])
        lines.clear()
        c.execute("hist clock_gettime")
        text = lines[0]
        assert text.startswith("latency histograms, in nanoseconds")
        for clock, n in calls.items():
            fb = f", {falls[clock]} fell back into the kernel" if falls[clock] else ""
            assert f"@clock_gettime[{clock}]: {n} call{'s' if n != 1 else ''}{fb}\n" in text \
                or text.endswith(f"@clock_gettime[{clock}]: {n} calls{fb}"), (clock, n, text)
        total = sum(int(ln[16:24]) for ln in text.splitlines()
                    if ln.startswith("[") and ln.endswith("|"))
        assert total == sum(calls.values())
        lines.clear()
        c.execute("hist __vdso_time")
        assert lines == ["no calls yet to __vdso_time"]     # clockloop calls no time()
        c.execute("hist reset")
        lines.clear()
        c.execute("hist")
        assert lines == ["no calls yet"]
        c.execute("detach")
