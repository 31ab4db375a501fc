"""The tracer's memory stays bounded by what is alive, not by what ever existed: 20,000
short-lived followed children (-f -c), and 400,000 distinct call sites (-c). Peak RSS of
the tracer process (ru_maxrss) at most 80 MiB in both."""
from __future__ import annotations

import os
import subprocess
import sys
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


# Linux keeps a process's peak RSS across exec (fs/exec.c: setmax_mm_hiwater_rss), and a
# child forked from this (large) pytest process starts with pytest's: the tracer is started
# by a small Python that reports the tracer's own ru_maxrss (KiB) from wait4.
_MEASURE = """
import os, subprocess, sys
p = subprocess.Popen(sys.argv[1:], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL)
_, status, usage = os.wait4(p.pid, 0)
p.returncode = 0
print(usage.ru_maxrss, status)
"""


def _peak_rss(args: list[str], out: Path, timeout: float = 600) -> tuple[int, str]:
    """Run the tracer to its end; (its peak RSS in KiB, its -c report)."""
    argv = T._tracer_argv(["trace", "-c", "-o", str(out), "-e", "clock_gettime", *args])
    try:
        r = subprocess.run([sys.executable, "-c", _MEASURE, *argv], cwd=T.REPO,
                           env=T.tracer_env(), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"`{' '.join(argv)}` did not end within {timeout} s")
    assert r.returncode == 0, r.stderr
    peak, status = (int(w) for w in r.stdout.split())
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, \
        f"`{' '.join(argv)}` ended with status {status:#x}"
    return peak, out.read_text()


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
