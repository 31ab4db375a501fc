"""Bad input: one line on stderr that says what is wrong, a non-zero exit, never
a traceback; and a tracee we refused (or failed) to trace is left untouched."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

import targets as T

pytestmark = pytest.mark.live


def _assert_one_line_error(r: subprocess.CompletedProcess[str], what: str) -> str:
    assert r.returncode != 0, f"{what}: exit 0; stdout={r.stdout!r} stderr={r.stderr!r}"
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, f"{what}:\n{r.stderr}"
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, f"{what}: expected exactly one line on stderr, got:\n{r.stderr}"
    return lines[0]


def _untouched(proc: T.Proc, before: bytes) -> None:
    assert proc.popen.poll() is None
    assert T.tracer_pid(proc.pid) == 0
    assert T.read_vdso(proc.pid) == before
    T.go(proc)
    rc, out, err = proc.finish(10)
    assert rc == 0 and "bad=0" in out, (rc, out, err)


def test_unknown_function(target_bin, tmp_path):
    proc = T.start(target_bin("spin"), tmp_path / "s.jsonl", "--seconds", "0.2")
    before = T.read_vdso(proc.pid)
    r = T.run_tracer(["trace", "-p", str(proc.pid), "-e", "no_such_function", "-o",
                      str(tmp_path / "ev")])
    line = _assert_one_line_error(r, "unknown function")
    assert "no_such_function" in line, line
    _untouched(proc, before)


def test_no_such_process(tmp_path):
    pid = T.free_pid()
    r = T.run_tracer(["trace", "-p", str(pid), "-o", str(tmp_path / "ev")])
    line = _assert_one_line_error(r, "no such process")
    assert str(pid) in line, line


def test_kernel_thread(tmp_path):
    status = Path("/proc/2/status")
    if not status.exists() or "kthreadd" not in status.read_text():
        pytest.skip("pid 2 is not kthreadd here (a pid namespace?)")
    r = T.run_tracer(["trace", "-p", "2", "-o", str(tmp_path / "ev")])
    _assert_one_line_error(r, "kernel thread")


def test_no_target():
    r = T.run_tracer(["trace"])
    _assert_one_line_error(r, "trace without -p or a command")


@pytest.mark.parametrize("debugger", ["gdb", "strace"])
def test_already_traced(target_bin, tmp_path, debugger):
    if shutil.which(debugger) is None:
        pytest.fail(f"{debugger} is not installed: run scripts/test")
    proc = T.start(target_bin("spin"), tmp_path / "s.jsonl", "--seconds", "0.2")
    dbg = T.held_by(debugger, proc.pid)
    r = T.run_tracer(["trace", "-p", str(proc.pid), "-o", str(tmp_path / "ev")])
    line = _assert_one_line_error(r, f"already traced by {debugger}")
    assert str(proc.pid) in line or "traced" in line, line
    assert T.tracer_pid(proc.pid) == dbg.pid, "the tracer disturbed the existing tracer"


def test_not_a_vdso_image(tmp_path):
    elf = tmp_path / "truncated-elf"
    elf.write_bytes(b"\x7fELF" + b"\0" * 60)
    text = tmp_path / "text"
    text.write_text("not an ELF file\n")
    for args in (["vdso", "--file", str(elf)], ["vdso", "--file", str(text)]):
        r = T.run_tracer(args)
        _assert_one_line_error(r, " ".join(args))


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "2x"])
def test_bad_duration(value):
    # nan/inf parse as floats; none of these is a duration (nan would never end the trace)
    r = T.run_tracer(["trace", "--duration", value, "--", "true"])
    line = _assert_one_line_error(r, f"--duration {value}")
    assert "duration" in line and repr(value) in line, line
