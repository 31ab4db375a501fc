"""The typed control interface (tracer.engine.control.Control) against the real engine on a
spawned C target that makes a known set of calls and then waits: the snapshot, every query's
record, reconfiguration through Futures, and the console's bt / callers / why / stats text
built from them."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import TypeVar

import pytest

from tracer import procfs
from tracer.auxv import parse_auxv
from tracer.console.commands import Console
from tracer.engine.control import Control
from tracer.errors import UnknownFunction
from tracer.events import CallEvent, Event
from tracer.render.reports import backtrace_lines, callers_lines, why_lines
from tracer.session import Session, TraceOptions

pytestmark = pytest.mark.live
T = TypeVar("T")

# 10 CLOCK_MONOTONIC and 3 CLOCK_PROCESS_CPUTIME_ID (always answered by the kernel) reads in
# main, 4 CLOCK_REALTIME reads in a second thread, then 2 time() in main; then both wait.
FIXED_C = r"""
#define _GNU_SOURCE
#include <pthread.h>
#include <time.h>
#include <unistd.h>
static void *worker(void *a)
{
    struct timespec ts;
    (void)a;
    for (int i = 0; i < 4; i++)
        clock_gettime(CLOCK_REALTIME, &ts);
    for (;;)
        pause();
    return 0;
}
int main(void)
{
    struct timespec ts;
    pthread_t th;
    for (int i = 0; i < 10; i++)
        clock_gettime(CLOCK_MONOTONIC, &ts);
    for (int i = 0; i < 3; i++)
        clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    pthread_create(&th, 0, worker, 0);
    usleep(100000);
    for (int i = 0; i < 2; i++)
        time(0);
    for (;;)
        pause();
}
"""
CALLS = 19
CLOCKSOURCE = Path("/sys/devices/system/clocksource/clocksource0/current_clocksource")


@pytest.fixture(scope="module")
def fixed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("control-target")
    (d / "fixed.c").write_text(FIXED_C)
    subprocess.run(["gcc", "-O1", "-g", "-pthread", "-o", str(d / "fixed"), str(d / "fixed.c")],
                   check=True, capture_output=True)
    return d / "fixed"


@pytest.fixture(autouse=True)
def fast_clocksource() -> None:
    from tracer.session import clocksource_info
    name, fast = clocksource_info()
    if not fast:
        pytest.skip(f"clocksource {name!r} has no vDSO read mode: every call falls back")


def done(fut: Future[T]) -> T:
    return fut.result(20)


def wait_for(cond: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def reap(pid: int) -> None:
    """The engine spawned the target as our child: kill and reap it."""
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


def vdso_bytes(pid: int) -> bytes:
    m = next(m for m in procfs.read_maps(pid) if m.path == "[vdso]")
    with open(f"/proc/{pid}/mem", "rb") as f:
        f.seek(m.start)
        return f.read(m.size)


@pytest.fixture
def traced(fixed: Path) -> Iterator[tuple[Control, threading.Thread, list[Event]]]:
    events: list[Event] = []
    s = Session(TraceOptions(funcs=["clock_gettime,time"], stack_depth=16, pin=False),
                events.append)
    ctl = Control(s)
    engine = ctl.start(cmd=[str(fixed)])
    pid = ctl.snapshot().pid
    assert pid is not None
    try:
        yield ctl, engine, events
    finally:
        ctl.stop()
        engine.join(20)
        reap(pid)


def test_control_snapshot_queries_and_reconfiguration(
        traced: tuple[Control, threading.Thread, list[Event]]) -> None:
    ctl, engine, events = traced
    done(ctl.pause())
    snap = ctl.snapshot()
    pid = snap.pid
    assert pid is not None and snap.image is not None and snap.vdso_base is not None
    assert snap.state == "paused" and snap.abi == "x86_64"
    assert snap.functions == ("clock_gettime", "time") and pid in snap.threads
    done(ctl.resume())          # (a spawned target runs from the start: some calls are made)
    assert ctl.snapshot().state == "running"
    wait_for(lambda: sum(isinstance(e, CallEvent) for e in events) >= CALLS, "every call")
    done(ctl.pause())
    calls = [e for e in events if isinstance(e, CallEvent)]
    assert len(calls) == CALLS

    snap = ctl.snapshot()
    tids = procfs.list_tasks(pid)
    assert snap.state == "paused" and snap.threads == tuple(sorted(tids)) and len(tids) == 2
    assert (snap.calls, snap.fallbacks) == (CALLS, 3)
    assert done(ctl.info()) == snap               # nothing moves while paused

    summ = done(ctl.summary())
    rows = {r.func: (r.calls, r.fallbacks, r.errors) for r in summ.rows}
    assert rows["clock_gettime"] == (17, 3, 0) and rows["time"] == (2, 0, 0)
    assert summ.reasons == {"clock_gettime": {"cpu-time-clock": 3}}
    assert sum(n for _, n, _ in summ.sites["clock_gettime"]) == 17
    sites = {site.partition("+")[0] for site, _, _ in summ.sites["clock_gettime"]}
    assert sites == {"fixed!main", "fixed!worker"}
    assert summ.diagnosis is None and summ.lost == 0

    worker = max(tids)
    bt = done(ctl.backtrace(worker))
    assert bt is not None and (bt.tid, bt.func, bt.fallback) == (worker, "clock_gettime", False)
    assert any("fixed!worker+" in f for f in bt.frames), bt.frames
    bt = done(ctl.backtrace(pid))
    assert bt is not None and (bt.tid, bt.func) == (pid, "time")
    assert any("fixed!main+" in f for f in bt.frames), bt.frames
    assert done(ctl.backtrace(1)) is None

    ex = done(ctl.explain())
    assert ex.clocksource == CLOCKSOURCE.read_text().strip() and ex.fast_path is True
    assert ex.namespaces == () and ex.summary.rows == summ.rows

    assert done(ctl.read_memory(snap.vdso_base, 4)) == b"\x7fELF"
    rep = done(ctl.read_auxv())
    with open(f"/proc/{pid}/auxv", "rb") as f:
        assert list(rep.pairs) == parse_auxv(f.read(), 8)
    assert dict(rep.pairs)[33] == snap.vdso_base                 # AT_SYSINFO_EHDR

    # reconfiguration: errors come back through the Future; nothing changed then
    with pytest.raises(UnknownFunction):
        done(ctl.set_functions(["no_such_function"]))
    assert ctl.snapshot().functions == ("clock_gettime", "time")
    assert done(ctl.set_functions(["time"])) == ["time"]
    assert ctl.snapshot().functions == ("time",) and ctl.snapshot().state == "paused"
    done(ctl.set_signals(True))
    assert ctl.snapshot().signals
    done(ctl.set_inject(True))
    assert ctl.snapshot().inject
    done(ctl.set_inject(False))
    assert not ctl.snapshot().inject

    ctl.stop()
    engine.join(20)
    assert not engine.is_alive() and ctl.snapshot().state == "detached"
    # the engine ended: queries answer at once, from what it counted
    assert {r.func: r.calls for r in done(ctl.summary()).rows}["clock_gettime"] == 17
    assert "t" not in {procfs.read_stat(pid, t).state for t in procfs.list_tasks(pid)}
    assert vdso_bytes(pid) == snap.image.data              # every byte of ours removed


def test_console_reports_on_the_fixed_target(fixed: Path) -> None:
    """bt, callers, why, stats and info threads through the console: the same text as the
    engine's own Session methods wrote before the control interface."""
    lines: list[str] = []
    c = Console(lines.append, color=False)
    try:
        c.execute("break clock_gettime time")
        c.attach(cmd=[str(fixed)])
        pid = c.state.pid
        assert pid is not None
        c.execute("continue")
        wait_for(lambda: c.stream.received >= CALLS + 1, "every call")   # + the attach event
        c.execute("pause")
        tids = procfs.list_tasks(pid)
        worker = max(tids)

        def run(cmd: str) -> list[str]:
            lines.clear()
            c.execute(cmd)
            assert len(lines) == 1, lines
            return lines[0].splitlines()

        bt = run(f"bt {worker}")
        assert bt[0] == f"thread {worker}, last call clock_gettime"
        assert all(re.fullmatch(rf"#{i:<2} 0x[0-9a-f]+ \S+", ln) for i, ln in enumerate(bt[1:]))
        assert any("fixed!worker+" in ln for ln in bt[1:]), bt
        assert run("bt 1") == ["no call recorded yet on thread 1"]
        assert run("bt x") == ["error: tid 'x' is not a number"]

        callers = run("callers clock_gettime")
        assert callers[0] == "clock_gettime:" and len(callers) == 6
        assert sum(int(ln.split()[0]) for ln in callers[1:]) == 17
        assert all(re.fullmatch(r"  +\d+ calls +\d+\.\d{6} s  fixed!(main|worker)\+0x[0-9a-f]+",
                                ln) for ln in callers[1:]), callers
        assert run("callers time")[0] == "time:"

        why = run("why")
        assert why == [f"clocksource {CLOCKSOURCE.read_text().strip()} has a vDSO read mode "
                       "(calls can stay in user space)",
                       "clock_gettime: 3 of 17 calls fell back: cpu-time-clock 3",
                       "time: 0 of 2 calls fell back"]

        stats = run("stats")
        assert re.fullmatch(r" *\d+\.\d\d +\d+\.\d{6} +\d+\.\d{3} +17 +3 +0 clock_gettime",
                            next(ln for ln in stats if ln.endswith(" clock_gettime")))
        assert re.search(r" 19 +3 +0 total$", next(ln for ln in stats if ln.endswith("total")))
        assert "  clock_gettime: cpu-time-clock 3" in stats

        info = run("info threads")
        assert info[0].split() == ["tid", "state", "name", "calls", "last", "call"]
        assert info[1].split() == [f"{pid}*", "t", "fixed", "15", "time"]
        assert info[2].split() == [str(worker), "t", "fixed", "4", "clock_gettime"]
        c.execute("quit")
        assert c.done and not c.state.attached
    finally:
        c.shutdown()
        if c.state.pid is not None:
            reap(c.state.pid)


def test_reports_escape_the_tracee_names() -> None:
    """The text of bt / callers / why is made in render/reports.py, escaped there."""
    from tracer.engine.control import Backtrace, Explanation, TimeNamespace
    from tracer.session import FuncStats, Summary
    bt = Backtrace(7, "clock_gettime", True, "cpu-time-clock",
                   ("0x1000 libc.so.6!clock_gettime+0x19", "0x2000 evil\x1b[2J!main+0x4"))
    assert backtrace_lines(bt) == ["thread 7, last call clock_gettime [fallback] "
                                   "(cpu-time-clock)",
                                   "#0  0x1000 libc.so.6!clock_gettime+0x19",
                                   "#1  0x2000 evil\\33[2J!main+0x4"]
    assert backtrace_lines(None) == ["no call recorded yet"]
    summ = Summary([FuncStats("clock_gettime", 4, 4, 0, 2000), FuncStats("time", 0, 0, 0, 0)],
                   {"clock_gettime": {"cpu-time-clock": 4}},
                   {"clock_gettime": [("p\nq!main+0x1", 4, 2000)], "time": []}, {}, ["time"],
                   "diagnosis: 4 of 4 vDSO calls (100%) fell back", 0)
    assert callers_lines(summ) == ["clock_gettime:",
                                   "          4 calls    0.000002 s  p\\nq!main+0x1"]
    assert callers_lines(summ, ["time"]) == ["no calls recorded yet"]
    ex = Explanation("hpet", False, (TimeNamespace(9, (("monotonic", 5, 0),)),), summ)
    assert why_lines(ex) == [
        "clocksource hpet has NO vDSO read mode: every clock read enters the kernel",
        "pid 9 lives in a time namespace: monotonic 5s 0ns",
        "clock_gettime: 4 of 4 calls fell back: cpu-time-clock 4",
        "diagnosis: 4 of 4 vDSO calls (100%) fell back"]


def test_console_switches_engines_while_attached(tmp_path: Path) -> None:
    """`inject on` / `inject off` on a running tracee, through Control.set_inject: the calls
    keep coming with each engine, and detach leaves the vDSO as it was."""
    from test_console import build_clockloop, running
    lines: list[str] = []
    c = Console(lines.append, color=False)
    with running(build_clockloop(tmp_path), "2000") as p:
        try:
            before = vdso_bytes(p.pid)
            c.execute(f"attach {p.pid}")
            c.execute("break clock_gettime")
            for mode in ("on", "off"):
                lines.clear()
                c.execute(f"inject {mode}")
                assert len(lines) == 1 and lines[0].startswith(f"inject: {mode} ("), lines
                attached = c._attached
                assert attached is not None
                assert attached.control.snapshot().inject is (mode == "on")
                c.execute("continue")
                seen = c.stream.received
                wait_for(lambda: c.stream.received >= seen + 20, f"calls with inject {mode}")
                c.execute("pause")
            c.execute("detach")
            assert not c.state.attached
            assert p.poll() is None and vdso_bytes(p.pid) == before
        finally:
            c.shutdown()


def test_set_functions_with_the_recorder_in(tmp_path: Path) -> None:
    """Control.set_functions while --inject's recorder is in: the recorder is taken out and a
    new one over the new set put in (one ring in the tracee, never two); its calls come; the
    stop-based engine switched back to traces the same set; detach leaves the vDSO as it was."""
    from test_console import build_clockloop, running
    with running(build_clockloop(tmp_path), "2000") as p:
        before = vdso_bytes(p.pid)
        events: list[Event] = []
        s = Session(TraceOptions(inject=True, pin=False), events.append)
        ctl = Control(s)
        engine = ctl.start(pid=p.pid)
        try:
            snap = ctl.snapshot()
            assert snap.inject and "time" in snap.functions
            assert done(ctl.set_functions(["clock_gettime"])) == ["clock_gettime"]
            snap = ctl.snapshot()
            assert snap.inject and snap.functions == ("clock_gettime",)
            maps = open(f"/proc/{p.pid}/maps").read()
            assert maps.count("vdsotrace-ring") == 1, maps
            n = len(events)

            def calls_since(k: int) -> int:
                return sum(isinstance(e, CallEvent) for e in events[k:])
            wait_for(lambda: calls_since(n) >= 20, "calls through the new recorder")
            assert {e.func for e in events[n:] if isinstance(e, CallEvent)} == {"clock_gettime"}
            done(ctl.set_inject(False))
            snap = ctl.snapshot()
            assert not snap.inject and snap.functions == ("clock_gettime",)
            assert "vdsotrace-ring" not in open(f"/proc/{p.pid}/maps").read()
            n = len(events)
            wait_for(lambda: calls_since(n) >= 20, "calls through the stop-based stubs")
        finally:
            ctl.stop()
            engine.join(20)
        assert not engine.is_alive()
        assert p.poll() is None and vdso_bytes(p.pid) == before
