"""--inject loses no call by default (issue 15.1): when the ring is full the stubs wait for
the tracer (tightloop.c: a fixed number of clock_gettime calls as fast as they go, counted
by the program itself), and never for a tracer that is gone or stopped: its heartbeat goes
stale and the stubs count drops instead. --lossy drops and counts at once. Both ABIs.

A loss in the lossless runs passes only with the tracer's own account of a silence over the
stubs' patience (0.5 s) in its notice: this shared machine has kept a runnable tracer off
every CPU that long; any other loss fails."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

import targets as T

pytestmark = pytest.mark.live


SILENT = re.compile(r"^(\d+) calls were not recorded: .* silent for up to ([0-9.]+) s")


def _unexplained(notices: list[str]) -> list[str]:
    """Notices other than calls not recorded while the tracer itself saw it had been silent
    longer than the stubs wait (0.5 s): on a loaded shared machine a runnable tracer can
    wait that long for a CPU, and then the stubs rightly stop waiting. A loss the tracer
    cannot explain so is a failure."""
    bad = []
    for n in notices:
        m = SILENT.match(n)
        if m is None or float(m.group(2)) < 0.45:
            bad.append(n)
    return bad


def _lost(notices: list[str]) -> int:
    return sum(int(m.group(1)) for n in notices if (m := SILENT.match(n)))


def _clock_calls(summary: dict[str, Any]) -> int:
    # i386 glibc calls clock_gettime64 (the y2038-safe entry); x86_64 clock_gettime
    return sum(f["calls"] for f in summary["functions"]
               if f["func"] in ("clock_gettime", "clock_gettime64"))


def _spawned(target_bin: Any, tmp_path: Path, m32: bool, trace_args: list[str],
             calls: int, threads: int, *kinds: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """trace --json -o OUT TRACE_ARGS -- tightloop: the target's record and the events (of
    those kinds only, when some are named)."""
    rec = tmp_path / "r.jsonl"
    out = tmp_path / "ev.jsonl"
    tr = T.run_trace([*trace_args, "--", str(target_bin("tightloop", m32)), str(rec),
                      "--calls", str(calls), "--threads", str(threads)], out,
                     stdin=subprocess.PIPE)
    assert tr.popen.stdin is not None
    tr.popen.stdin.write(b"g")
    tr.popen.stdin.close()
    tr.wait_ok(180)
    r = T.read_record(rec)[-1]
    assert r["calls"] == calls * threads and r["bad"] == 0, r
    return r, tr.events(*kinds)


# a clock call's line, read without parsing the JSON of its 240,000 lines (seconds each)
_CLOCK_LINE = re.compile(r'^\{"event": "call", "pid": \d+, "tid": (\d+), "time": [^,]+, '
                         r'"func": "clock_gettime(?:64)?"', re.M)


@pytest.mark.parametrize("threads", [1, 4])
@pytest.mark.parametrize("m32", [False, True], ids=["x86_64", "i386"])
def test_summary_counts_every_call(target_bin, tmp_path, m32, threads):
    r, evs = _spawned(target_bin, tmp_path, m32, ["--inject", "-c"], 3_000_000 // threads,
                      threads)
    notices = [e["message"] for e in evs if e["event"] == "notice"]
    assert not _unexplained(notices), notices
    summary = next(e for e in evs if e["event"] == "summary")
    assert summary["lost"] == _lost(notices), (summary, notices)
    assert _clock_calls(summary) + summary["lost"] == r["calls"], summary
    if notices:
        print(f"\n(the tracer could not run for a while: {notices})")


@pytest.mark.parametrize("threads", [1, 4])
@pytest.mark.parametrize("m32", [False, True], ids=["x86_64", "i386"])
def test_one_event_per_call(target_bin, tmp_path, m32, threads):
    # 4 rings' worth of calls: the ring is full most of the run
    r, evs = _spawned(target_bin, tmp_path, m32, ["--inject"], 240_000 // threads, threads,
                      "notice")
    notices = [e["message"] for e in evs]
    assert not _unexplained(notices), notices
    lost = _lost(notices)
    if notices:
        print(f"\n(the tracer could not run for a while: {notices})")
    per_tid: dict[int, int] = {}
    for tid in _CLOCK_LINE.findall((tmp_path / "ev.jsonl").read_text()):
        per_tid[int(tid)] = per_tid.get(int(tid), 0) + 1
    if not lost:
        loopers = sorted(n for n in per_tid.values() if n >= 240_000 // threads)
        assert loopers == [240_000 // threads] * threads, per_tid
    assert sum(per_tid.values()) + lost == r["calls"], (per_tid, notices)


@pytest.mark.parametrize("m32", [False, True], ids=["x86_64", "i386"])
def test_lossy_drops_and_counts(target_bin, tmp_path, m32):
    r, evs = _spawned(target_bin, tmp_path, m32, ["--inject", "--lossy", "-c"], 3_000_000, 1)
    summary = next(e for e in evs if e["event"] == "summary")
    # every call is either counted or counted as lost
    assert _clock_calls(summary) + summary["lost"] == r["calls"], summary
    notices = [e["message"] for e in evs if e["event"] == "notice"]
    assert bool(summary["lost"]) == any("not recorded" in n for n in notices), notices
    print(f"\n--lossy: {summary['lost']} of {r['calls']} calls not recorded")


def _attached(target_bin: Any, tmp_path: Path, m32: bool, calls: int, threads: int
              ) -> tuple[T.Proc, T.Trace]:
    """tightloop started and held, then `trace -p PID --inject -c --json`; the go byte sent
    once the first calls are counted in the ring (the tracer is draining)."""
    rec = tmp_path / "r.jsonl"
    proc = T.start(target_bin("tightloop", m32), rec, "--calls", str(calls),
                   "--threads", str(threads))
    tr = T.run_trace(["-p", str(proc.pid), "--inject", "-c"], tmp_path / "ev.jsonl",
                     attach_timeout=60)
    T.go(proc)
    return proc, tr


def _record_written(rec: Path, timeout: float) -> dict[str, Any] | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if rec.exists():
            for line in rec.read_text().splitlines():
                try:
                    return dict(json.loads(line))
                except json.JSONDecodeError:
                    break
        time.sleep(0.05)
    return None


@pytest.mark.parametrize("m32", [False, True], ids=["x86_64", "i386"])
def test_sigkill_of_the_tracer_never_hangs_the_program(target_bin, tmp_path, m32):
    # far more calls than the tracer drains before the kill: the ring is full when it dies
    proc, tr = _attached(target_bin, tmp_path, m32, 5_000_000, 2)
    time.sleep(0.5)
    os.kill(tr.pid, signal.SIGKILL)
    tr.popen.wait(timeout=10)
    # the stubs wait at most the heartbeat's patience (0.5 s), then run at full speed
    rc, stdout, stderr = proc.finish(timeout=30)
    assert rc == 0, (rc, stdout, stderr)
    assert "calls=10000000 bad=0" in stdout, stdout


@pytest.mark.parametrize("m32", [False, True], ids=["x86_64", "i386"])
def test_sigstop_of_the_tracer_lets_the_program_run(target_bin, tmp_path, m32):
    proc, tr = _attached(target_bin, tmp_path, m32, 3_000_000, 1)
    time.sleep(0.3)
    tr.signal(signal.SIGSTOP)
    try:
        # the program ends its loops while the tracer is stopped (it writes its record
        # before it exits, and its exit may wait for the tracer)
        r = _record_written(proc.record, 30)
    finally:
        tr.signal(signal.SIGCONT)
    assert r is not None, "the program did not finish its loop while the tracer was stopped"
    assert r == {**r, "calls": 3_000_000, "bad": 0}, r
    rc, stdout, stderr = proc.finish(timeout=30)
    assert rc == 0, (rc, stdout, stderr)
    tr.wait_ok(60)
    evs = tr.events()
    summary = next(e for e in evs if e["event"] == "summary")
    notices = [e["message"] for e in evs if e["event"] == "notice"]
    assert summary["lost"] > 0, summary
    assert any(f"{summary['lost']} calls were not recorded" in n for n in notices), notices
    assert _clock_calls(summary) + summary["lost"] == 3_000_000, summary


@pytest.mark.parametrize("m32", [False, True], ids=["x86_64", "i386"])
def test_a_full_ring_at_exit_is_shown_whole(target_bin, tmp_path, m32):
    """The program fills the ring and ends while the tracer is stopped; the tracer, stopped
    again for 1.5 s while it drains that ring after the exit event, still shows all of it,
    and counts every other call as lost. (A way out that drained for 1 s at most left the
    rest of the ring neither shown nor counted: a slow tracer under load did that.)"""
    rec = tmp_path / "r.jsonl"
    out = tmp_path / "ev.jsonl"
    tr = T.run_trace(["--inject", "--", str(target_bin("tightloop", m32)), str(rec),
                      "--calls", "500000", "--threads", "2"], out, stdin=subprocess.PIPE)
    assert tr.popen.stdin is not None
    tr.popen.stdin.write(b"g")
    tr.popen.stdin.close()
    time.sleep(0.2)
    tr.signal(signal.SIGSTOP)
    try:
        r = _record_written(rec, 60)
        before = T.count_events(out, "call")
    finally:
        tr.signal(signal.SIGCONT)
    assert r is not None, "the program did not finish its loops while the tracer was stopped"
    assert r["calls"] == 1_000_000 and r["bad"] == 0, r
    # the ring's last drain (65536 records: about a second of work, before the exit event):
    # a stop in the middle of it, once its first lines are out
    deadline = time.monotonic() + 60
    while T.count_events(out, "call") == before and time.monotonic() < deadline:
        time.sleep(0.01)
    tr.signal(signal.SIGSTOP)
    time.sleep(1.5)
    tr.signal(signal.SIGCONT)
    tr.wait_ok(180)
    evs = tr.events()
    notices = [e["message"] for e in evs if e["event"] == "notice"]
    assert not _unexplained(notices), notices
    lost = _lost(notices)
    calls = sum(e["event"] == "call" and e["func"] in ("clock_gettime", "clock_gettime64")
                for e in evs)
    assert lost > 0, notices
    # the ring was full when the program ended: all of it is shown
    assert calls >= 65536, (calls, notices)
    assert calls + lost == 1_000_000, (calls, notices)
    # and before the exit event: every call shown happened before it
    kinds = [e["event"] for e in evs]
    assert kinds.index("exit") > max(i for i, k in enumerate(kinds) if k == "call"), kinds[-5:]


def test_a_tracer_blocked_on_its_output_never_hangs_the_program(target_bin, tmp_path):
    """Events to a pipe nobody reads (a hung terminal): the tracer blocks in write() once the
    pipe is full and stops beating; the program runs on, its calls counted as not recorded.
    Once the pipe is read again the tracer goes on and ends normally."""
    rec = tmp_path / "r.jsonl"
    proc = T.start(target_bin("tightloop"), rec, "--calls", "3000000")
    argv = [*T._tracer_argv(["trace", "-p", str(proc.pid), "--inject", "--json", "-o", "-"])]
    tr = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=T.REPO,
                          env=T.tracer_env())
    assert tr.stdout is not None
    try:
        while True:                     # the attach event: the stubs are in
            line = tr.stdout.readline()
            assert line, f"the tracer ended before attaching: {tr.stderr.read()!r}"
            if line.startswith(b'{"event": "attach"'):
                break
        T.go(proc)
        r = _record_written(rec, 30)    # nothing reads the pipe meanwhile
        assert r is not None, "the program did not finish while the tracer was blocked"
        assert r["calls"] == 3_000_000 and r["bad"] == 0, r
        out, err = tr.communicate(timeout=120)
    finally:
        if tr.poll() is None:
            tr.kill()
            tr.wait()
    assert tr.returncode == 0, err
    evs = []
    for x in out.splitlines():
        try:
            evs.append(json.loads(x))
        except ValueError:
            # (a line cut by the blocked write: the output layer's, not the recorder's;
            # seen on main too, left to the owner of render/output.py)
            pass
    calls = sum(e.get("event") == "call" for e in evs)
    lost = [e["message"] for e in evs
            if e.get("event") == "notice" and "not recorded" in e["message"]]
    assert lost, "no notice of the calls not recorded"
    assert 0 < int(lost[0].split()[0]) <= 3_000_000 - calls, (calls, lost)
    rc, _, stderr = proc.finish(timeout=30)
    assert rc == 0, stderr


def test_lossy_without_inject_is_refused():
    r = T.run_tracer(["trace", "--lossy", "--", "/bin/true"])
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "--lossy" in lines[0] and "--inject" in lines[0], r.stderr
