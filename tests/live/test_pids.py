"""`-p` given a thread of a process already in the list: one correct line, the process left
untouched."""
from __future__ import annotations

import os

import pytest

import targets as T

pytestmark = pytest.mark.live


@pytest.mark.parametrize("order", ["tgid-tid", "tid-tgid"])
def test_pid_and_its_thread(target_bin, tmp_path, order):
    proc = T.start(target_bin("spin"), tmp_path / "spin.jsonl", "--threads", "2")
    T.go(proc, close=False)
    before = T.read_vdso(proc.pid)
    tid = max(int(t) for t in os.listdir(f"/proc/{proc.pid}/task"))
    pids = f"{proc.pid},{tid}" if order == "tgid-tid" else f"{tid},{proc.pid}"
    r = T.run_tracer(["trace", "-p", pids, "-o", str(tmp_path / "ev")], timeout=60)
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1, r.stderr
    assert "root" not in lines[0] and "Traceback" not in r.stderr, lines[0]
    assert f"process {proc.pid}" in lines[0] and "once" in lines[0], lines[0]
    assert proc.popen.poll() is None and T.tracer_pid(proc.pid) == 0
    assert T.read_vdso(proc.pid) == before
    assert proc.popen.stdin is not None
    proc.popen.stdin.close()
    rc, out, err = proc.finish(20)
    assert rc == 0 and "bad=0" in out, (rc, out, err)
