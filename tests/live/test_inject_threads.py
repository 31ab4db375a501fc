"""--inject must not make ptrace stops wait for the ring (threadmake.c): a thread being
created stops its creator at the clone event, and the tracer serves it between bounded drain
batches however fast 4 hot threads fill the ring. The bound here is generous (the machine is
shared); the figure is printed."""
from __future__ import annotations

import subprocess

import pytest

import targets as T

pytestmark = pytest.mark.live


@pytest.mark.parametrize("mode", [["-c"], []], ids=["summary", "events"])
def test_pthread_create_with_hot_threads(target_bin, tmp_path, mode):
    rec = tmp_path / "r.jsonl"
    tr = T.run_trace(["--inject", *mode, "--", str(target_bin("threadmake")), str(rec),
                      "--hot", "4", "--create", "100"], tmp_path / "ev.jsonl",
                     stdin=subprocess.PIPE)
    assert tr.popen.stdin is not None
    tr.popen.stdin.write(b"g")
    tr.popen.stdin.close()
    tr.wait_ok(120)
    r = T.read_record(rec)[-1]
    print(f"\npthread_create under --inject {' '.join(mode)}: mean {r['mean_us']:.0f} us, "
          f"median {r['median_us']:.0f} us, max {r['max_us']:.0f} us")
    assert r["created"] == 100
    assert r["mean_us"] < 250_000, r
