"""--inject across execve: wrappers (env, `sh -c 'exec ...'`, a 32-bit wrapper) exec the
program that matters; the recorder is injected into each new image, 64- and 32-bit either way,
and the program's calls are all recorded (vcalls.c records what it saw). Where the new image
cannot take the recorder (seccomp), the stop-based engine takes over, with a notice."""
from __future__ import annotations

import subprocess
from collections import Counter
from pathlib import Path

import pytest

import targets as T

pytestmark = pytest.mark.live

ABIS = [pytest.param(False, id="x86_64"), pytest.param(True, id="i386", marks=pytest.mark.i386)]


def _spawn(tmp_path: Path, argv: list[str], extra: list[str]) -> T.Trace:
    tr = T.run_trace(["--inject", *extra, "--", *argv], tmp_path / "ev.jsonl",
                     stdin=subprocess.PIPE)
    assert tr.popen.stdin is not None
    tr.popen.stdin.write(b"g")
    tr.popen.stdin.close()
    tr.wait_ok(60)
    return tr


def _vcalls(target_bin, m32: bool, rec: Path) -> list[str]:
    return [str(target_bin("vcalls", m32)), str(rec), "--threads", "2", "--rounds", "2"]


def _check_exact(tr: T.Trace, rec: Path, abi: str) -> None:
    events = tr.events()
    execs = [e for e in events if e["event"] == "exec"]
    assert execs and execs[-1]["abi"] == abi, execs
    notices = [e["message"] for e in events if e["event"] == "notice"]
    assert not any("cannot inject" in m or "detaching" in m for m in notices), notices
    record = T.read_record(rec)
    by_tid = T.calls_by_tid(events)
    rec_by_tid: dict[int, list[dict]] = {}
    for r in record:
        rec_by_tid.setdefault(r["tid"], []).append(r)
    assert set(rec_by_tid) <= set(by_tid), (sorted(by_tid), sorted(rec_by_tid), tr.stderr())
    for tid, recs in rec_by_tid.items():
        T.compare_calls(by_tid[tid], recs, f"thread {tid}")


@pytest.mark.parametrize("m32", ABIS)
def test_env(target_bin, tmp_path, m32):
    rec = tmp_path / "r.jsonl"
    tr = _spawn(tmp_path, ["env", *_vcalls(target_bin, m32, rec)], [])
    _check_exact(tr, rec, "i386" if m32 else "x86_64")


@pytest.mark.parametrize("m32", ABIS)
def test_sh_exec(target_bin, tmp_path, m32):
    rec = tmp_path / "r.jsonl"
    cmd = " ".join(_vcalls(target_bin, m32, rec))
    tr = _spawn(tmp_path, ["sh", "-c", f"exec {cmd}"], [])
    _check_exact(tr, rec, "i386" if m32 else "x86_64")


@pytest.mark.parametrize("m32", ABIS)
def test_32bit_wrapper(target_bin, tmp_path, m32):
    """A 32-bit image execs a 64-bit (or 32-bit) one."""
    rec = tmp_path / "r.jsonl"
    tr = _spawn(tmp_path, [str(target_bin("execwrap", True)), *_vcalls(target_bin, m32, rec)], [])
    _check_exact(tr, rec, "i386" if m32 else "x86_64")


@pytest.mark.parametrize("m32", ABIS)
def test_summary_counts_every_call(target_bin, tmp_path, m32):
    """`trace --inject -c -- env PROG`: the summary counts each of PROG's calls."""
    rec = tmp_path / "r.jsonl"
    tr = _spawn(tmp_path, ["env", *_vcalls(target_bin, m32, rec)], ["-c"])
    summary = [e for e in tr.events() if e["event"] == "summary"]
    assert len(summary) == 1, tr.events()
    got = {f["func"]: f["calls"] for f in summary[0]["functions"] if f["calls"]}
    want = Counter(r["func"] for r in T.read_record(rec))
    assert got == dict(want), (got, want)


def test_new_image_under_seccomp_falls_back_to_stops(target_bin, tmp_path):
    rec = tmp_path / "r.jsonl"
    tr = _spawn(tmp_path, [str(target_bin("execwrap")), "--seccomp",
                           *_vcalls(target_bin, False, rec)], [])
    notices = [e["message"] for e in tr.events() if e["event"] == "notice"]
    assert any("tracing it with stops instead" in m and "seccomp" in m for m in notices), notices
    _check_exact(tr, rec, "x86_64")
