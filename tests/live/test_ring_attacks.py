"""The --inject ring is memory the tracee can write (ringattack.c): whatever it writes there --
a HEAD no stub can produce, a lost counter no process can reach, random words all over,
a truncation of the file under the tracer's feet -- the tracer leaves within its duration,
exits 0, reports what it could not believe, and leaves the process as it was."""
from __future__ import annotations

import time

import pytest

import targets as T

pytestmark = pytest.mark.live

ABIS = [pytest.param(False, id="x86_64"), pytest.param(True, id="i386", marks=pytest.mark.i386)]
DURATION = 1.5


def _attack(target_bin, tmp_path, mode: str, m32: bool, extra: list[str]) -> tuple[T.Trace, str]:
    proc = T.start(target_bin("ringattack", m32), tmp_path / f"{mode}.jsonl", mode)
    before = T.read_vdso(proc.pid)
    tr = T.run_trace(["-p", str(proc.pid), "--inject", "--duration", str(DURATION), *extra],
                     tmp_path / f"{mode}.out")
    T.go(proc, close=False)
    t0 = time.monotonic()
    tr.wait_ok(DURATION + 15)
    took = time.monotonic() - t0
    assert took < DURATION + 10, f"the tracer left {took:.1f} s after the go byte"
    assert proc.popen.poll() is None, (
        f"the tracee died ({proc.popen.returncode}) under the tracer; stderr:\n{tr.stderr()}")
    assert T.tracer_pid(proc.pid) == 0
    maps = open(f"/proc/{proc.pid}/maps").read()
    assert "vdsotrace-ring" not in maps, maps
    # (a thread that waited in a stub for room in a ring the attack made look full can
    # leave a stale return address into the code page on its stack: then the page stays,
    # and a notice says so, as in test_forks' flood)
    notices = " ".join(str(e.get("message")) for e in tr.events("notice"))
    if "code page stays mapped" not in notices:
        assert "vdsotrace-code" not in maps, maps
    assert T.read_vdso(proc.pid) == before, "the vDSO differs from before the trace"
    assert proc.popen.stdin is not None
    proc.popen.stdin.close()
    rc, out, err = proc.finish(20)
    assert rc == 0 and "bad=0" in out, (rc, out, err)
    rec = T.read_record(proc.record)[-1]
    assert rec["calls"] > 0 and rec["attack"] != "no-ring", rec
    return tr, rec["attack"]


@pytest.mark.parametrize("m32", ABIS)
@pytest.mark.parametrize("mode", ["head", "headnear", "headback", "chaos"])
def test_scribbled_ring_summary(target_bin, tmp_path, mode, m32):
    """`--inject -c` (the case that hung for ever at detach) under every header attack."""
    tr, _ = _attack(target_bin, tmp_path, mode, m32, ["-c"])
    events = tr.events()
    summary = [e for e in events if e["event"] == "summary"]
    assert len(summary) == 1, events
    assert sum(f["calls"] for f in summary[0]["functions"]) > 0, summary
    notices = " ".join(e["message"] for e in events if e["event"] == "notice")
    if mode.startswith("head"):
        assert "header was overwritten" in notices, notices


@pytest.mark.parametrize("mode", ["head", "chaos"])
def test_scribbled_ring_events(target_bin, tmp_path, mode):
    """With events (not -c), the same: calls before the attack are there, the notice says
    what happened."""
    tr, _ = _attack(target_bin, tmp_path, mode, False, ["--json"])
    events = tr.events()
    assert any(e["event"] == "call" for e in events)
    assert any(e["event"] == "detach" for e in events)


@pytest.mark.parametrize("m32", ABIS)
def test_scribbled_lost_counter_is_not_believed(target_bin, tmp_path, m32):
    tr, _ = _attack(target_bin, tmp_path, "lost", m32, ["-c"])
    events = tr.events()
    summary = [e for e in events if e["event"] == "summary"]
    assert len(summary) == 1 and summary[0]["lost"] < 10**12, summary
    notices = " ".join(e["message"] for e in events if e["event"] == "notice")
    assert "150383345440" in notices, notices    # named as the value it could not be
    assert "count of calls not recorded was overwritten" in notices, notices


@pytest.mark.parametrize("m32", ABIS)
def test_truncated_ring(target_bin, tmp_path, m32):
    """Root truncating the ring through /proc/self/map_files: the memfd is sealed (EPERM),
    and the tracer, which never maps it, could not fault anyway."""
    tr, attack = _attack(target_bin, tmp_path, "truncate", m32, ["-c"])
    assert attack == "truncate:EPERM", attack
    assert any(e["event"] == "summary" for e in tr.events())
