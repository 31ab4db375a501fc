"""The tracee moves its vDSO (mremap of [vvar]/[vvar_vclock]/[vdso], as CRIU does) or unmaps
it while traced (vmove.c): no write lands where it was (the target maps a pattern there and
checks it), the tracer leaves within its --duration saying what happened, nothing of ours
stays mapped, and the moved vDSO, restored byte for byte, still serves calls.

x86_64 only: a 32-bit glibc makes every system call through __kernel_vsyscall at the address
it found at startup, so a 32-bit process cannot move its vDSO and live."""
from __future__ import annotations

import pytest

import targets as T
from test_forks import ATTACH, _wait_line, ours_mapped

pytestmark = pytest.mark.live


@pytest.mark.parametrize("engine", [pytest.param([], id="stops"),
                                    pytest.param(["--inject"], id="inject")])
@pytest.mark.parametrize("unmap", [pytest.param(False, id="mremap"),
                                   pytest.param(True, id="munmap")])
def test_vdso_moved(target_bin, tmp_path, engine, unmap):
    proc = T.start(target_bin("vmove"), tmp_path / "vmove.jsonl", *(["--unmap"] if unmap else []))
    before = T.read_vdso(proc.pid)
    tr = T.run_trace(["-p", str(proc.pid), "--duration", "3", *engine], tmp_path / "ev.jsonl",
                     attach_timeout=ATTACH)
    T.go(proc, close=False)
    old, new = map(int, _wait_line(proc, "moved ", 30).split()[1:])
    tr.wait_ok(60)                      # --duration 3: leaves by itself (a loaded machine)
    assert proc.popen.poll() is None, f"tracee died: {tr.stderr()}"
    assert T.tracer_pid(proc.pid) == 0
    assert not ours_mapped(proc.pid), ours_mapped(proc.pid)
    notes = [e["message"] for e in tr.events() if e["event"] == "notice"]
    if unmap:
        assert any("unmapped its vDSO" in m for m in notes), notes
    else:
        assert T.vdso_range(proc.pid)[0] == new
        assert T.read_vdso(proc.pid) == before, "the moved vDSO was not restored"
        assert any(f"moved from {old:#x} to {new:#x}" in m for m in notes), notes
    assert sum(e["event"] == "call" for e in tr.events()) >= 200
    assert proc.popen.stdin is not None
    proc.popen.stdin.write(b"g")
    proc.popen.stdin.close()
    rc, out, err = proc.finish(20)
    rec = T.read_record(proc.record)[-1]
    assert rec["pattern_intact"] == 1, f"something was written where the vDSO was: {rec}"
    assert rc == 0 and rec["bad"] == 0, (rc, out, err, rec)


def test_calls_after_the_move_are_traced(target_bin, tmp_path):
    """Stop-based engine: calls made through the moved vDSO while traced stop at an address
    the tracer did not patch; it finds the vDSO's new place and goes on (the process
    neither gets a stray SIGTRAP nor loses a call). (--inject cannot: its entry jumps are
    relative to where they were written, and nothing tells of an mremap before the call.)"""
    proc = T.start(target_bin("vmove"), tmp_path / "vmove.jsonl")
    tr = T.run_trace(["-p", str(proc.pid)], tmp_path / "ev.jsonl", attach_timeout=ATTACH)
    T.go(proc, close=False)
    _wait_line(proc, "moved ", 30)
    assert proc.popen.stdin is not None
    proc.popen.stdin.write(b"g")
    proc.popen.stdin.close()
    rc, out, err = proc.finish(30)
    assert rc == 0 and "bad=0" in out and "intact=1" in out, (rc, out, err, tr.stderr())
    tr.wait_ok(30)
    calls = [e for e in tr.events() if e["event"] == "call"]
    assert len(calls) == 300, len(calls)
    assert all(not e["fallback"] and e["ret"] == 0 for e in calls)
