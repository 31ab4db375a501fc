"""Every way out lets every thread go, whatever a step of the restore raises (issue 12.6): an
error of ours in a restoring step (here: --inject's uninstall failing in the middle of a live
detach) becomes a notice, a bug is raised only after the restore, every thread of the tracee
is detached all the same, and the tracee runs on and finishes with every result right. The failure is made by wrapping the real step (ptrace is not mocked: the
tracee is real, attached, traced and detached)."""
from __future__ import annotations

import os
import time

import pytest

import targets as T
from tracer.events import AttachEvent, Event, NoticeEvent
from tracer.inject import Recorder
from tracer.inject.remote import RemoteError
from tracer.engine.control import Control
from tracer.engine.detach import Detach
from tracer.session import Session, TraceOptions

pytestmark = pytest.mark.live


def _tracer_pids(pid: int) -> dict[int, int]:
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/status") as f:
            for line in f:
                if line.startswith("TracerPid:"):
                    out[int(tid)] = int(line.split()[1])
    return out


@pytest.mark.parametrize("where", ["before", "after"])
def test_a_failing_uninstall_still_detaches_every_thread(target_bin, tmp_path, monkeypatch,
                                                         where):
    """--inject: the uninstall raises a remote system call's error, before it did anything
    (the recorder stays, recording nothing: said in a notice) or after it did its work."""
    real = Recorder.uninstall

    def uninstall(self: Recorder, tids: list[int]) -> None:
        if where == "after":
            real(self, tids)
        raise RemoteError(0, "injected failure of a remote system call")
    monkeypatch.setattr(Recorder, "uninstall", uninstall)

    proc = T.start(target_bin("spin"), tmp_path / "spin.jsonl", "--threads", "3")
    T.go(proc, close=False)
    events: list[Event] = []
    s = Session(TraceOptions(inject=True), events.append)
    control = Control(s)
    engine = control.start(pid=proc.pid)
    try:
        deadline = time.monotonic() + 10
        while s.calls == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        control.stop()
        engine.join(30)
    assert not engine.is_alive()
    assert any(isinstance(e, AttachEvent) for e in events)
    if where == "before":
        notices = [e.message for e in events if isinstance(e, NoticeEvent)]
        assert any("injected failure" in n for n in notices), notices
    _survives(proc)


def test_a_bug_in_a_restore_step_is_raised_after_every_thread_is_let_go(target_bin, tmp_path,
                                                                       monkeypatch):
    """The stop-based engine: an unexpected error (not one of ours: a bug) in the restore is
    raised, but only once the original code is back and every thread is let go."""
    real = Detach._restore_space

    def restore_space(self: Detach, space: object, threads: object) -> None:
        real(self, space, threads)      # type: ignore[arg-type]
        raise RuntimeError("injected bug")
    monkeypatch.setattr(Detach, "_restore_space", restore_space)

    proc = T.start(target_bin("spin"), tmp_path / "spin.jsonl", "--threads", "3")
    T.go(proc, close=False)
    events: list[Event] = []
    s = Session(TraceOptions(), events.append)
    s.attach(proc.pid)                  # this thread traces it: stops wait for detach_all
    assert len(s.threads) == 4
    with pytest.raises(RuntimeError, match="injected bug"):
        s.detach_all()
    assert not s.threads and not s.spaces
    _survives(proc)


def _survives(proc: T.Proc) -> None:
    tracers = _tracer_pids(proc.pid)
    assert len(tracers) == 4 and set(tracers.values()) == {0}, tracers
    assert proc.popen.poll() is None
    time.sleep(0.3)                     # the threads call on, untraced
    assert proc.popen.poll() is None
    assert proc.popen.stdin is not None
    proc.popen.stdin.close()
    rc, out, err = proc.finish(15)
    assert rc == 0 and "bad=0" in out, (rc, out, err)
