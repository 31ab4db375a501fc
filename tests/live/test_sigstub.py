"""A signal handler that interrupted a thread inside the tracer's code while the tracer leaves
(sigstub.c): the interrupted context, saved in the signal frame, resumes there once the
handler returns, so every byte it may still run (the stop-based stub in the vDSO's padding;
under --inject the code page, and the ring its window writes) must stay, and stop no more.
The process must survive every run, in every engine."""
from __future__ import annotations

import os
import select
import signal
import time

import pytest

import targets as T

pytestmark = pytest.mark.live

ABIS = [pytest.param(False, id="x86_64"), pytest.param(True, id="i386", marks=pytest.mark.i386)]
ENGINES = [pytest.param([], id="stops"), pytest.param(["--signals"], id="signals"),
           pytest.param(["--inject"], id="inject")]


def _read_line(proc: T.Proc, timeout: float) -> str:
    """The next line the target writes on stdout (after its ready line)."""
    assert proc.popen.stdout is not None
    fd = proc.popen.stdout.fileno()
    buf = proc._stdout
    deadline = time.monotonic() + timeout
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            pytest.fail(f"target wrote no line within {timeout} s (so far {buf!r})")
        r, _, _ = select.select([fd], [], [], left)
        if r:
            chunk = os.read(fd, 4096)
            if not chunk:
                pytest.fail(f"target closed stdout (exit {proc.popen.wait()}) after {buf!r}")
            buf += chunk
    line, _, proc._stdout = buf.partition(b"\n")
    return line.decode()


def _survived(proc: T.Proc, tr: T.Trace) -> None:
    rc, out, err = proc.finish(60)
    assert rc == 0 and "bad=0" in out, (
        f"the tracee did not survive the tracer: rc={rc} out={out!r} err={err!r}; "
        f"tracer stderr:\n{tr.stderr()}")


@pytest.mark.parametrize("m32", ABIS)
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("altstack", [False, True], ids=["stack", "altstack"])
def test_handler_holds_inside_our_code_across_detach(target_bin, tmp_path, engine, m32,
                                                     altstack):
    proc = T.start(target_bin("sigstub", m32), tmp_path / "r.jsonl", "hold",
                   *(["--altstack"] if altstack else []))
    tr = T.run_trace(["-p", str(proc.pid), *engine], tmp_path / "ev.jsonl")
    T.go(proc, close=False)
    held = _read_line(proc, 60)
    assert held.startswith("held 0x"), held
    tr.signal(signal.SIGINT)
    tr.wait_ok(60)
    assert T.tracer_pid(proc.pid) == 0
    notices = [e["message"] for e in tr.events() if e["event"] == "notice"]
    assert any("stays" in m for m in notices), (
        f"no notice says our code stays for the held thread: {notices}")
    _release(proc, tr)


def _release(proc: T.Proc, tr: T.Trace) -> None:
    """The byte that lets the held handler return into the interrupted context."""
    time.sleep(0.2)
    rc = proc.popen.poll()
    assert rc is None, (f"the tracee died ({rc}) while its handler held, after the tracer "
                        f"left; tracer stderr:\n{tr.stderr()}")
    assert proc.popen.stdin is not None
    proc.popen.stdin.write(b"r")
    proc.popen.stdin.close()
    _survived(proc, tr)


@pytest.mark.parametrize("m32", ABIS)
def test_handler_holds_inside_ring_window_across_detach(target_bin, tmp_path, m32):
    """--inject: the handler interrupted a stub after it loaded the ring's address: the ring
    stays mapped until the thread has written its record."""
    proc = T.start(target_bin("sigstub", m32), tmp_path / "r.jsonl", "hold", "--ring")
    tr = T.run_trace(["-p", str(proc.pid), "--inject"], tmp_path / "ev.jsonl")
    T.go(proc, close=False)
    held = _read_line(proc, 60)
    assert held.startswith("held 0x"), held
    tr.signal(signal.SIGINT)
    tr.wait_ok(60)
    notices = [e["message"] for e in tr.events() if e["event"] == "notice"]
    assert any("ring stays mapped" in m for m in notices), notices
    assert "vdsotrace-ring" in open(f"/proc/{proc.pid}/maps").read()
    _release(proc, tr)


@pytest.mark.parametrize("m32", ABIS)
@pytest.mark.parametrize("engine", ENGINES)
def test_signal_flood_across_detach(target_bin, tmp_path, engine, m32):
    for k in range(2):
        proc = T.start(target_bin("sigstub", m32), tmp_path / f"r{k}.jsonl", "flood")
        tr = T.run_trace(["-p", str(proc.pid), *engine], tmp_path / f"ev{k}.jsonl")
        T.go(proc, close=False)
        time.sleep(0.5)
        tr.signal(signal.SIGINT)
        tr.wait_ok(60)
        time.sleep(0.3)                 # run on untraced, through whatever we left
        assert proc.popen.stdin is not None
        proc.popen.stdin.close()
        _survived(proc, tr)
        assert T.read_record(proc.record)[-1]["signals"] > 0
