"""The tracee outlives the tracer, and processes whose TSC faults are traced safely.

* SIGKILL of the tracer at a random moment of steady tracing (issue 16.9): hotloop's threads
  keep calling (and, with --fallback, falling back into the kernel and, on i386, making system
  calls through __kernel_vsyscall) and must finish with every result right. The stop-based
  engine stops on seccomp-filtered marker system calls, which return -ENOSYS once no tracer is
  left; --inject never stops.
* A process in seccomp strict mode and one after prctl(PR_SET_TSC, PR_TSC_SIGSEGV) (issue
  16.8): rdtsc faults there, so the stubs must not run it; --inject refuses them in one line.
"""
from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import pytest

import targets as T

ROUNDS = 3


def _wait_calls(out: Path, n: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if T.count_events(out, "call") >= n:
            return
        time.sleep(0.05)
    pytest.fail(f"fewer than {n} call events in {out} after {timeout} s")


def _status(pid: int, key: str) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return line.split(":", 1)[1].strip()
    return ""


@pytest.mark.parametrize("engine", ["stops", "inject"])
@pytest.mark.parametrize(("m32", "fallback"), [
    pytest.param(False, False, id="x86_64-plain"), pytest.param(False, True, id="x86_64-fallback"),
    # (i386's plain calls are a subset of what its fallback run makes: its gateway besides)
    pytest.param(True, True, id="i386-fallback")])
def test_sigkill_of_the_tracer_leaves_the_process_running(tmp_path: Path, m32: bool,
                                                          fallback: bool, engine: str) -> None:
    exe = T.build("hotloop", m32=m32)
    rng = random.Random()
    for i in range(ROUNDS):
        rec = tmp_path / f"rec{i}.json"
        proc = T.start(exe, rec, *(["--fallback"] if fallback else []))
        T.go(proc, close=False)
        out = tmp_path / f"trace{i}.json"
        tr = T.run_trace(["-p", proc.pid, *(["--inject"] if engine == "inject" else [])], out,
                         attach_timeout=60)
        _wait_calls(out, 20)
        time.sleep(rng.uniform(0.0, 0.4))
        os.kill(tr.pid, signal.SIGKILL)
        tr.popen.wait(timeout=10)
        time.sleep(0.3)                       # the threads run on, untraced
        assert proc.popen.poll() is None, f"round {i}: the process died with the tracer"
        assert proc.popen.stdin is not None
        proc.popen.stdin.close()
        rc, stdout, stderr = proc.finish(timeout=30)
        assert rc == 0, f"round {i}: hotloop exited {rc}: {stdout!r} {stderr!r}"
        assert "bad=0" in stdout, stdout
        row = T.read_record(rec)[0]
        assert row["calls"] > 0 and row["bad"] == 0


def test_the_marker_filter_is_installed_once(tmp_path: Path) -> None:
    """A second trace of the same process reuses the filter the first one left."""
    proc = T.start(T.build("hotloop"), tmp_path / "rec.json")
    T.go(proc, close=False)
    for i in range(2):
        tr = T.run_trace(["-p", proc.pid, "--duration", "0.5"], tmp_path / f"t{i}.json")
        tr.wait_ok(30)
        assert _status(proc.pid, "Seccomp") == "2"
        assert _status(proc.pid, "Seccomp_filters") == "1"
        assert tr.count("call")
        assert not tr.events("notice"), tr.events("notice")
    # --inject accepts a process whose only filter is ours
    tr = T.run_trace(["-p", proc.pid, "--inject", "--duration", "0.5"], tmp_path / "ti.json")
    tr.wait_ok(30)
    assert tr.count("call")
    assert proc.popen.stdin is not None
    proc.popen.stdin.close()
    rc, stdout, _ = proc.finish(timeout=30)
    assert rc == 0 and "bad=0" in stdout


@pytest.mark.parametrize("mode", ["--notsc", "--strict"])
@pytest.mark.parametrize("m32", [False, True], ids=["x86_64", "i386"])
def test_a_process_whose_tsc_faults_is_traced_without_rdtsc(tmp_path: Path, m32: bool,
                                                           mode: str) -> None:
    exe = T.build("hotloop", m32=m32)
    rec = tmp_path / "rec.json"
    proc = T.start(exe, rec, mode)
    if mode == "--strict":
        assert _status(proc.pid, "Seccomp") == "1"
    T.go(proc, close=False)
    out = tmp_path / "t.json"
    tr = T.run_trace(["-p", proc.pid], out, attach_timeout=60)
    _wait_calls(out, 20)
    tr.signal(signal.SIGINT)
    tr.wait_ok(30)
    evs = tr.events()
    calls = [ev for ev in evs if ev["event"] == "call"]
    assert calls and all(ev["duration_ns"] == 0 for ev in calls)
    notices = [ev["message"] for ev in evs if ev["event"] == "notice"]
    assert any("time-stamp counter disabled" in n for n in notices), notices
    if mode == "--strict":
        # no system call may be added to it: int3 stops, and the notice says what that means
        assert any("would not survive a SIGKILL" in n for n in notices), notices
        assert _status(proc.pid, "Seccomp") == "1"
    # --inject's stubs read the TSC: one line, nothing done
    r = T.run_tracer(["trace", "-p", str(proc.pid), "--inject", "--duration", "0.5",
                      "-o", str(tmp_path / "ti.txt")], timeout=30)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "without --inject" in lines[0], r.stderr
    assert proc.popen.poll() is None
    assert proc.popen.stdin is not None
    proc.popen.stdin.close()
    rc, stdout, stderr = proc.finish(timeout=60)
    assert rc == 0, f"hotloop exited {rc}: {stdout!r} {stderr!r}"
    assert "bad=0" in stdout


def test_a_thread_that_disables_its_tsc_while_traced_keeps_running(tmp_path: Path) -> None:
    """prctl(PR_SET_TSC, PR_TSC_SIGSEGV) after the stubs were made: their rdtsc faults, and
    the tracer answers it (the same counter, read by itself) instead of the SIGSEGV."""
    proc = T.start(T.build("hotloop"), tmp_path / "rec.json")
    T.go(proc, close=False)
    out = tmp_path / "t.json"
    tr = T.run_trace(["-p", proc.pid], out, attach_timeout=60)
    _wait_calls(out, 20)
    assert proc.popen.stdin is not None
    proc.popen.stdin.write(b"n")
    proc.popen.stdin.flush()
    deadline = time.monotonic() + 60
    while not any(ev.get("func") == "time" for ev in T.peek_events(out)):
        assert time.monotonic() < deadline, "no time() call traced after the prctl"
        time.sleep(0.05)
    tr.signal(signal.SIGINT)
    tr.wait_ok(30)
    assert proc.popen.poll() is None
    proc.popen.stdin.close()
    rc, stdout, stderr = proc.finish(timeout=30)
    assert rc == 0 and "bad=0" in stdout, (rc, stdout, stderr)


def test_a_filter_that_kills_unknown_calls_gets_int3s_and_a_guardian(tmp_path: Path) -> None:
    """A process whose own seccomp filter would kill the marker calls: vdsotrace sees it (runs
    the filter), stops it on int3s instead and says it would not survive a SIGKILL; its
    guardian then puts the original code back the moment the tracer dies (a thread not at an
    int3 then, as here with calls 500 ms apart, runs on)."""
    from tracer.vdso import parse_image
    proc = T.start(T.build("hotloop"), tmp_path / "rec.json", "--hostile", "--interval", "500")
    before = T.read_vdso(proc.pid)
    size = parse_image(before).image_size
    T.go(proc, close=False)
    out = tmp_path / "t.json"
    tr = T.run_trace(["-p", proc.pid], out, attach_timeout=60)
    _wait_calls(out, 4)
    notices = [ev["message"] for ev in T.peek_events(out) if ev["event"] == "notice"]
    assert any("would not survive a SIGKILL" in n and "filter" in n for n in notices), notices
    assert T.read_vdso(proc.pid)[:size] != before[:size]
    # kill while every thread sleeps between calls (none is stopped at an int3, which no
    # guardian can save)
    deadline = time.monotonic() + 20
    while not all(s == "S" for s in T._task_states(proc.pid)):
        assert time.monotonic() < deadline
        time.sleep(0.001)
    os.kill(tr.pid, signal.SIGKILL)
    tr.popen.wait(timeout=10)
    deadline = time.monotonic() + 20
    while T.read_vdso(proc.pid)[:size] != before[:size]:
        assert time.monotonic() < deadline, "the guardian did not restore the vDSO"
        time.sleep(0.05)
    time.sleep(0.3)
    assert proc.popen.poll() is None
    assert proc.popen.stdin is not None
    proc.popen.stdin.close()
    rc, stdout, stderr = proc.finish(timeout=30)
    assert rc == 0 and "bad=0" in stdout, (rc, stdout, stderr)
