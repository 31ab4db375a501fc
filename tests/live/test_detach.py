"""Leaving: on SIGINT, SIGTERM, SIGHUP or --duration the tracer removes every
breakpoint, detaches and exits 0 while the tracee keeps calling the vDSO
(spin.c); the tracee must not notice. And a tracee killed mid-trace ends the
tracer cleanly."""
from __future__ import annotations

import os
import signal
import time

import pytest

import targets as T

pytestmark = pytest.mark.live

ABIS = [pytest.param(False, id="x86_64"), pytest.param(True, id="i386", marks=pytest.mark.i386)]


def _start_spin(target_bin, tmp_path, m32: bool) -> tuple[T.Proc, bytes]:
    proc = T.start(target_bin("spin", m32), tmp_path / "spin.jsonl", "--threads", "2")
    return proc, T.read_vdso(proc.pid)


def _after_detach(proc: T.Proc, vdso_before: bytes, tr: T.Trace) -> None:
    assert proc.popen.poll() is None, (
        f"the tracee died ({proc.popen.returncode}) while or after the tracer left; "
        f"tracer stderr:\n{tr.stderr()}")
    assert T.tracer_pid(proc.pid) == 0
    for tid in os.listdir(f"/proc/{proc.pid}/task"):
        assert T.tracer_pid(proc.pid, int(tid)) == 0, f"thread {tid} still traced"
    after = T.read_vdso(proc.pid)
    assert len(after) == len(vdso_before)
    diff = [i for i in range(len(after)) if after[i] != vdso_before[i]]
    assert not diff, f"vDSO bytes differ after detach at offsets {[hex(i) for i in diff[:16]]}"
    # Let it run untraced a little longer, then stop it and check every result.
    time.sleep(0.3)
    assert proc.popen.stdin is not None
    proc.popen.stdin.close()
    rc, out, err = proc.finish(10)
    assert rc == 0 and "bad=0" in out, f"tracee after detach: rc={rc} out={out!r} err={err!r}"
    rec = T.read_record(proc.record)
    assert rec and rec[-1]["bad"] == 0 and rec[-1]["calls"] > 0, rec


@pytest.mark.parametrize(("sig", "m32"), [
    pytest.param(signal.SIGINT, False, id="SIGINT-x86_64"),
    pytest.param(signal.SIGTERM, False, id="SIGTERM-x86_64"),
    pytest.param(signal.SIGHUP, False, id="SIGHUP-x86_64"),
    # (the three signals take one way out: i386 once)
    pytest.param(signal.SIGINT, True, id="SIGINT-i386", marks=pytest.mark.i386)])
def test_detach_on_signal(target_bin, tmp_path, m32, sig):
    proc, before = _start_spin(target_bin, tmp_path, m32)
    tr = T.run_trace(["-p", str(proc.pid)], tmp_path / "ev.jsonl")
    T.go(proc, close=False)
    time.sleep(0.7)  # calls in flight in both threads
    assert proc.popen.poll() is None, f"tracee died under the tracer; stderr:\n{tr.stderr()}"
    # A live log can be followed: events reach the file while the tracer runs.
    assert T.count_events(tr.out, "call"), (
        f"no call event in {tr.out} after 0.7 s of tracing; stderr:\n{tr.stderr()}")
    tr.signal(sig)
    tr.wait_ok(10)
    assert tr.count("call"), "no call traced before the signal"
    det = [e for e in tr.events("detach") if e.get("pid") == proc.pid]
    assert len(det) == 1, f"expected one detach event for {proc.pid}: {det}"
    assert det[0]["abi"] == ("i386" if m32 else "x86_64")
    assert T.addr(det[0]["vdso_base"]) == T.vdso_range(proc.pid)[0]
    _after_detach(proc, before, tr)


@pytest.mark.parametrize("m32", ABIS)
def test_detach_after_duration(target_bin, tmp_path, m32):
    proc, before = _start_spin(target_bin, tmp_path, m32)
    tr = T.run_trace(["-p", str(proc.pid), "--duration", "1"], tmp_path / "ev.jsonl")
    T.go(proc, close=False)
    t0 = time.monotonic()
    tr.wait_ok(10)
    took = time.monotonic() - t0
    assert 0.5 <= took <= 6, f"--duration 1 ended after {took:.1f} s"
    assert tr.count("call"), "no call traced"
    assert any(e.get("pid") == proc.pid for e in tr.events("detach"))
    _after_detach(proc, before, tr)


@pytest.mark.parametrize("m32", ABIS)
def test_tracee_killed(target_bin, tmp_path, m32):
    proc, _ = _start_spin(target_bin, tmp_path, m32)
    tr = T.run_trace(["-p", str(proc.pid)], tmp_path / "ev.jsonl")
    T.go(proc, close=False)
    time.sleep(0.5)
    proc.popen.kill()
    proc.popen.wait(5)
    t0 = time.monotonic()
    tr.wait_ok(5)
    assert time.monotonic() - t0 < 5
    T.read_events(tr.out)  # every line written is whole JSON


def test_tracee_exits(target_bin, tmp_path):
    """The tracee ends by itself (--seconds): the tracer follows it out and exits 0."""
    proc = T.start(target_bin("spin"), tmp_path / "spin.jsonl", "--threads", "2", "--seconds", "1")
    tr = T.run_trace(["-p", str(proc.pid)], tmp_path / "ev.jsonl")
    T.go(proc)
    rc, out, err = proc.finish(15)
    assert rc == 0 and "bad=0" in out, (rc, out, err, tr.stderr())
    tr.wait_ok(5)
    events = tr.events()
    assert any(e["event"] == "call" for e in events)
    exits = [e for e in events if e["event"] == "exit" and e.get("pid") == proc.pid]
    assert all(e.get("status") in (None, 0) for e in exits), exits


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_detach_inject(target_bin, tmp_path, sig):
    """`--inject`: on leaving, the stubs are switched off, the vDSO restored byte for byte and
    the ring unmapped; the tracee runs on and finishes every call correctly."""
    proc, before = _start_spin(target_bin, tmp_path, False)
    tr = T.run_trace(["-p", str(proc.pid), "--inject"], tmp_path / "ev.jsonl")
    T.go(proc, close=False)
    time.sleep(0.7)
    assert proc.popen.poll() is None, f"tracee died under --inject; stderr:\n{tr.stderr()}"
    assert "vdsotrace-ring" in open(f"/proc/{proc.pid}/maps").read()
    tr.signal(sig)
    tr.wait_ok(10)
    assert tr.count("call") > 100, "the recorder recorded no calls"
    assert "vdsotrace-ring" not in open(f"/proc/{proc.pid}/maps").read()
    _after_detach(proc, before, tr)
