"""Leaving leaves nothing behind even when the tracee's stacks are full of stale words:
threads that read the clock and nap (napper.c) sit in a system call at detach with the
return addresses of their last traced call (into the stubs) still in the dead slots of
their callers' frames. Only a call really in flight (its frames live, or a signal frame
that interrupted it) may keep vdsotrace's code; a stale word must not. Before, the i386
stop-based engine kept its stubs in the vDSO's padding after almost every detach (and a
second trace of the same process was then refused), and --inject kept its code page in
node and Go programs."""
from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import time

import pytest

import targets as T

pytestmark = pytest.mark.live

ABIS = [pytest.param(False, id="x86_64"), pytest.param(True, id="i386", marks=pytest.mark.i386)]
ENGINES = [pytest.param([], id="stops"), pytest.param(["--inject"], id="inject")]


def _ours_left(pid: int) -> list[str]:
    with open(f"/proc/{pid}/maps", errors="surrogateescape") as f:
        return [line for line in f.read().splitlines() if "/memfd:vdsotrace" in line]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("m32", ABIS)
def test_stale_stack_words_keep_nothing(target_bin, tmp_path, m32, engine):
    proc = T.start(target_bin("napper", m32), tmp_path / "nap.jsonl", "--threads", "2")
    clean = T.read_vdso(proc.pid)
    T.go(proc, close=False)
    for round_ in range(3):
        tr = T.run_trace(["-p", str(proc.pid), "--duration", "0.6", *engine],
                         tmp_path / f"ev{round_}.jsonl")
        tr.wait_ok(20)
        assert proc.popen.poll() is None, f"the tracee died; tracer stderr:\n{tr.stderr()}"
        assert tr.count("call"), f"round {round_}: no call traced"
        notices = [e["message"] for e in tr.events("notice")]
        for tid in os.listdir(f"/proc/{proc.pid}/task"):
            assert T.tracer_pid(proc.pid, int(tid)) == 0, f"thread {tid} still traced"
        after = T.read_vdso(proc.pid)
        diff = [hex(i) for i in range(len(after)) if after[i] != clean[i]]
        assert not diff, (f"round {round_}: vDSO bytes differ from before the trace at "
                          f"{diff[:8]}; notices: {notices}")
        assert not _ours_left(proc.pid), (f"round {round_}: {_ours_left(proc.pid)} left; "
                                          f"notices: {notices}")
    assert proc.popen.stdin is not None
    proc.popen.stdin.close()
    rc, out, err = proc.finish(10)
    assert rc == 0 and "bad=0" in out, f"tracee: rc={rc} out={out!r} err={err!r}"


def _read_line(proc: T.Proc, what: bytes, timeout: float) -> str:
    """The first stdout line of the target that starts with `what` (within timeout s)."""
    assert proc.popen.stdout is not None
    fd, buf = proc.popen.stdout.fileno(), proc._stdout
    deadline = time.monotonic() + timeout
    while True:
        for line in buf.split(b"\n")[:-1]:
            if line.startswith(what):
                return line.decode()
        left = deadline - time.monotonic()
        if left <= 0 or proc.popen.poll() is not None:
            pytest.fail(f"no {what!r} line from the target within {timeout} s: {buf!r}")
        r, _, _ = select.select([fd], [], [], left)
        if r:
            buf += os.read(fd, 4096)


@pytest.mark.parametrize("altstack", [[], ["--altstack"]], ids=["stack", "altstack"])
@pytest.mark.parametrize("m32", ABIS)
def test_call_held_by_a_handler_keeps_its_stub(target_bin, tmp_path, m32, altstack):
    """The other side: a handler that interrupted a traced call (in the stub, or in the
    vDSO function the stub called) and holds there while the tracer leaves. The stub it will
    return through must stay (a notice says so), and the call must complete correctly."""
    proc = T.start(target_bin("holdsig", m32), tmp_path / "hold.jsonl", *altstack)
    clean = T.read_vdso(proc.pid)
    T.go(proc, close=False)
    tr = T.run_trace(["-p", str(proc.pid)], tmp_path / "ev.jsonl")
    held = _read_line(proc, b"held ", 20)
    tr.signal(signal.SIGINT)
    tr.wait_ok(20)
    notices = [e["message"] for e in tr.events() if e["event"] == "notice"]
    assert any("stays" in m for m in notices), f"{held}: no notice of a kept stub: {notices}"
    assert T.read_vdso(proc.pid) != clean, f"{held}: the stub was removed under the call"
    assert T.tracer_pid(proc.pid) == 0
    assert proc.popen.stdin is not None
    proc.popen.stdin.write(b"r")                 # the handler returns, into the kept stub
    proc.popen.stdin.close()
    rc, out, err = proc.finish(30)
    assert rc == 0 and "bad=0" in out, f"{held}: tracee rc={rc} out={out!r} err={err!r}"


NODE = """
process.stdout.write("ready\\n");
let n = 0, stop = false;
process.stdin.on("data", () => {});
process.stdin.on("end", () => { stop = true; });
const t = setInterval(() => {
  for (let i = 0; i < 200; i++) { process.hrtime.bigint(); performance.now(); n++; }
  if (stop) { clearInterval(t); console.log("done " + (n > 0)); }
}, 1);
"""


@pytest.mark.parametrize("engine", ENGINES)
def test_node_left_clean(tmp_path, engine):
    """A real runtime, node, reading the clock from a timer while vdsotrace comes and goes
    three times: its stacks hold many stale returns into our code (before, --inject kept its
    code page mapped in node every time)."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    p = subprocess.Popen([node, "-e", NODE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    try:
        assert p.stdout is not None and p.stdin is not None
        assert p.stdout.readline().strip() == b"ready"
        clean = T.read_vdso(p.pid)
        for round_ in range(2):
            tr = T.run_trace(["-p", str(p.pid), "--duration", "0.8", *engine],
                             tmp_path / f"ev{round_}.jsonl", attach_timeout=60)
            tr.wait_ok(60)
            notices = [e["message"] for e in tr.events("notice")]
            assert tr.count("call"), f"round {round_}: no call"
            assert p.poll() is None, f"node died: {p.stderr.read() if p.stderr else b''!r}"
            assert T.tracer_pid(p.pid) == 0
            assert T.read_vdso(p.pid) == clean, f"round {round_}: vDSO changed; {notices}"
            assert not _ours_left(p.pid), f"round {round_}: {_ours_left(p.pid)}; {notices}"
        p.stdin.close()
        p.stdin = None                       # communicate() would flush it
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0 and out.startswith(b"done true"), (p.returncode, out, err)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
