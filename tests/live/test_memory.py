"""The tracer's memory stays bounded by what is alive, not by what ever existed: 20,000
short-lived followed children (-f -c), and 400,000 distinct call sites (-c). Peak RSS of
the tracer process (ru_maxrss) at most 80 MiB in both."""
from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path

import pytest

import targets as T

SRC = Path(__file__).resolve().parent.parent / "symbol_targets"
LIMIT_KIB = 80 * 1024


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("memory")
    for name in ("forker", "sites"):
        r = subprocess.run(["gcc", "-O1", "-o", str(d / name), str(SRC / f"{name}.c")],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    return d


def _peak_rss(args: list[str], out: Path, timeout: float = 600) -> tuple[int, str]:
    """Run the tracer to its end; (its peak RSS in KiB, its -c report)."""
    argv = T._tracer_argv(["trace", "-c", "-o", str(out), "-e", "clock_gettime", *args])
    p = subprocess.Popen(argv, cwd=T.REPO, env=T.tracer_env(), stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    watchdog = threading.Timer(timeout, p.kill)
    watchdog.start()
    try:
        _, status, usage = os.wait4(p.pid, 0)       # the rusage of this one process
    finally:
        watchdog.cancel()
        p.returncode = 0                            # reaped here: Popen must not wait
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, \
        f"`{' '.join(argv)}` ended with status {status:#x} (killed after {timeout} s?)"
    return usage.ru_maxrss, out.read_text()


def test_followed_children_do_not_accumulate(built: Path, tmp_path: Path) -> None:
    peak, report = _peak_rss(["-f", "--", str(built / "forker"), "20000"], tmp_path / "f.txt")
    assert "20000 calls" in report or " 20000 " in report, report
    assert "forker!main+" in report, report
    assert peak <= LIMIT_KIB, f"peak RSS {peak} KiB over 20,000 children: more than 80 MiB"


def test_call_site_table_bounded(built: Path, tmp_path: Path) -> None:
    peak, report = _peak_rss(["--", str(built / "sites"), "400000"], tmp_path / "s.txt")
    assert "(other sites)" in report, report
    rows = [line for line in report.splitlines() if line.strip().endswith("clock_gettime")]
    assert rows and " 400000 " in rows[0], report
    assert peak <= LIMIT_KIB, f"peak RSS {peak} KiB over 400,000 call sites: more than 80 MiB"
