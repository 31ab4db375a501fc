"""Threads created, a child forked and the image exec'd after attach (threads.c):
the tracer follows clone always, fork with -f, and re-plants after exec."""
from __future__ import annotations

import pytest

import targets as T

pytestmark = pytest.mark.live


def _calls(record: list[dict], phase: str | None = None, tid: int | None = None) -> list[dict]:
    return [r for r in record if r.get("kind") == "call"
            and (phase is None or r["phase"] == phase) and (tid is None or r["tid"] == tid)]


def _compare_phases(run: T.Run, phases: tuple[str, ...]) -> None:
    pid = run.proc.pid
    by_tid = T.calls_by_tid(run.events, pid=pid)
    recs = [r for r in _calls(run.record) if r["phase"] in phases]
    want_tids = {r["tid"] for r in recs}
    assert set(by_tid) == want_tids, (
        f"threads with call events {sorted(by_tid)} != threads that made calls {sorted(want_tids)}; "
        f"tracer stderr:\n{run.trace.stderr()}")
    for tid in want_tids:
        T.compare_calls(by_tid[tid], [r for r in recs if r["tid"] == tid], f"thread {tid}")


def test_threads_created_after_attach(target_bin, tmp_path):
    run = T.run_traced(target_bin("threads"), tmp_path, ["--threads", "4", "--calls", "6"])
    assert len({r["tid"] for r in _calls(run.record)}) == 5
    _compare_phases(run, ("main", "thread"))


def test_fork_not_followed(target_bin, tmp_path):
    """Without -f the child is not traced, yet it inherits the breakpoints the
    tracer planted: it must still run correctly, and show no events."""
    run = T.run_traced(target_bin("threads"), tmp_path, ["--threads", "2", "--fork"])
    fork = [r for r in run.record if r.get("kind") == "fork"]
    assert len(fork) == 1 and fork[0]["status"] == 0, (
        f"forked child failed under a tracer without -f: {fork}; tracer stderr:\n{run.trace.stderr()}")
    child = fork[0]["child"]
    child_calls = _calls(run.record, "child")
    assert len(child_calls) == 5 and all(r["ret"] == 0 and r["tv_sec"] >= 0 for r in child_calls)
    stray = [e for e in run.events if e.get("pid") == child or e.get("tid") == child]
    assert not stray, f"events of the unfollowed child {child}: {stray[:3]}"
    _compare_phases(run, ("main", "thread"))


def test_fork_followed(target_bin, tmp_path):
    run = T.run_traced(target_bin("threads"), tmp_path, ["--threads", "2", "--fork"], ["-f"])
    fork = [r for r in run.record if r.get("kind") == "fork"]
    assert len(fork) == 1 and fork[0]["status"] == 0, fork
    child = fork[0]["child"]
    _compare_phases(run, ("main", "thread"))
    child_events = T.calls_by_tid(run.events, pid=child)
    assert set(child_events) == {child}, (
        f"-f: expected call events from the child {child}, got threads {sorted(child_events)}; "
        f"tracer stderr:\n{run.trace.stderr()}")
    T.compare_calls(child_events[child], _calls(run.record, "child"), f"child {child}")


def test_exec_replants(target_bin, tmp_path):
    """After exec the vDSO is new: calls made by the new image are traced too."""
    run = T.run_traced(target_bin("threads"), tmp_path, ["--threads", "2", "--exec"])
    pid = run.proc.pid
    execs = [i for i, e in enumerate(run.events) if e["event"] == "exec" and e["pid"] == pid]
    assert len(execs) == 1, (
        f"expected one exec event for {pid}: {[e for e in run.events if e['event'] == 'exec']}")
    before = run.events[:execs[0]]
    after = run.events[execs[0] + 1:]
    pre = [r for r in _calls(run.record) if r["phase"] in ("main", "thread")]
    by_tid = T.calls_by_tid(before, pid=pid)
    assert set(by_tid) == {r["tid"] for r in pre}, sorted(by_tid)
    for tid in by_tid:
        T.compare_calls(by_tid[tid], [r for r in pre if r["tid"] == tid], f"before exec, thread {tid}")
    post = _calls(run.record, "after-exec")
    assert post and all(r["tid"] == pid for r in post)
    after_calls = T.calls_by_tid(after, pid=pid)
    assert set(after_calls) == {pid}, (
        f"after exec: call events from threads {sorted(after_calls)}; tracer stderr:\n{run.trace.stderr()}")
    T.compare_calls(after_calls[pid], post, "after exec")
