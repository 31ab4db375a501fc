"""Every vDSO function called directly by several threads (vcalls.c), 64- and
32-bit: the trace's `call` events must equal, thread by thread and in order,
what the target saw."""
from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

import targets as T

pytestmark = pytest.mark.live

ABIS = [pytest.param(False, id="x86_64"), pytest.param(True, id="i386", marks=pytest.mark.i386)]
CLOCKSOURCE = Path("/sys/devices/system/clocksource/clocksource0/current_clocksource")


def _attach_event(events: list[dict], pid: int) -> dict:
    att = [e for e in events if e["event"] == "attach" and e.get("pid") == pid]
    assert len(att) == 1, f"expected one attach event for {pid}, got {att}"
    return att[0]


def _skip_without_fast_path(attach: dict) -> None:
    # The record's fallback expectations (only CPU-time clocks, invalid ids and
    # getrandom without state enter the kernel) hold only with a clocksource
    # the vDSO can read.
    if attach.get("vdso_fast_path") is False:
        pytest.skip(f"clocksource {attach.get('clocksource')!r} has no vDSO fast path")


def _check_all_threads(run: T.Run, label: str, pid: int | None = None) -> None:
    pid = run.proc.pid if pid is None else pid
    by_tid = T.calls_by_tid(run.events)
    stray = {tid: len(evs) for tid, evs in by_tid.items()
             if any(ev["pid"] != pid for ev in evs)}
    assert not stray, f"call events with a pid other than {pid}: {stray}"
    rec_by_tid: dict[int, list[dict]] = {}
    for r in run.record:
        rec_by_tid.setdefault(r["tid"], []).append(r)
    assert set(by_tid) == set(rec_by_tid), (
        f"threads with call events {sorted(by_tid)} != threads that made calls {sorted(rec_by_tid)}; "
        f"tracer stderr:\n{run.trace.stderr()}")
    for tid, recs in rec_by_tid.items():
        T.compare_calls(by_tid[tid], recs, f"{label} thread {tid}")


@pytest.mark.parametrize("m32", ABIS)
def test_calls_equal_record(target_bin, tmp_path, m32):
    binary = target_bin("vcalls", m32)
    rec = tmp_path / "r.jsonl"
    proc = T.start(binary, rec)
    lo, _ = T.vdso_range(proc.pid)
    tr = T.run_trace(["-p", str(proc.pid)], tmp_path / "ev.jsonl")
    T.go(proc)
    rc, _, err = proc.finish(20)
    assert rc == 0, f"target exited {rc} under the tracer: {err!r}; tracer stderr:\n{tr.stderr()}"
    tr.wait_ok(10)
    run = T.Run(proc, tr, T.read_record(rec), tr.events(), "")

    attach = _attach_event(run.events, proc.pid)
    assert attach["abi"] == ("i386" if m32 else "x86_64")
    assert T.addr(attach["vdso_base"]) == lo
    assert attach["clocksource"] == CLOCKSOURCE.read_text().strip()
    assert isinstance(attach["vdso_fast_path"], bool)
    tno = attach["timens_offsets"]
    assert tno is None or (set(tno) == {"monotonic", "boottime"}), tno
    _skip_without_fast_path(attach)

    for ev in run.events:
        assert isinstance(ev["time"], float), ev
        assert isinstance(ev["pid"], int) and isinstance(ev["tid"], int), ev
    for ev in (e for e in run.events if e["event"] == "call"):
        assert isinstance(ev.get("duration_ns"), int) and ev["duration_ns"] >= 0, ev
        assert isinstance(ev.get("caller"), str) and ev["caller"].startswith("0x"), ev
        assert ev["fallback_reason"] is None or isinstance(ev["fallback_reason"], str), ev

    _check_all_threads(run, "i386" if m32 else "x86_64")


@pytest.mark.parametrize("spec,keep", [
    ("clock_gettime", {"clock_gettime"}),
    ("__vdso_getcpu,time", {"getcpu", "time"}),
    ("!getcpu", {"clock_gettime", "gettimeofday", "time", "clock_getres", "getrandom"}),
])
def test_function_filter(target_bin, tmp_path, spec, keep):
    run = T.run_traced(target_bin("vcalls"), tmp_path, ["--threads", "2", "--rounds", "1"],
                       ["-e", spec])
    _skip_without_fast_path(_attach_event(run.events, run.proc.pid))
    by_tid = T.calls_by_tid(run.events)
    for tid in {r["tid"] for r in run.record}:
        recs = [r for r in run.record if r["tid"] == tid and r["func"] in keep]
        T.compare_calls(by_tid.get(tid, []), recs, f"-e {spec} thread {tid}")
    assert set(by_tid) <= {r["tid"] for r in run.record}


def test_spawned_command(target_bin, tmp_path):
    """`trace -- CMD ARGS`: the tracer starts the target itself (its stdin is ours)."""
    rec = tmp_path / "r.jsonl"
    tr = T.run_trace(["--", str(target_bin("vcalls")), str(rec), "--threads", "2", "--rounds", "1"],
                     tmp_path / "ev.jsonl", stdin=subprocess.PIPE)
    assert tr.popen.stdin is not None
    tr.popen.stdin.write(b"g")
    tr.popen.stdin.close()
    tr.wait_ok(20)
    events = tr.events()
    attach = [e for e in events if e["event"] == "attach"]
    assert len(attach) == 1, attach
    pid = attach[0]["pid"]
    assert tr.stdout().startswith(f"ready {pid}\n"), tr.stdout()
    _skip_without_fast_path(attach[0])
    proc_stub = T.Proc(tr.popen, Path(), rec, [], pid)
    _check_all_threads(T.Run(proc_stub, tr, T.read_record(rec), events, ""), "spawned", pid)


def test_two_processes_two_abis(target_bin, tmp_path, request):
    """`-p A,B` with a 64-bit and a 32-bit tracee at once: one attach event each."""
    b64 = target_bin("vcalls")
    b32 = target_bin("vcalls", m32=True)
    p64 = T.start(b64, tmp_path / "r64.jsonl", "--threads", "2", "--rounds", "2")
    p32 = T.start(b32, tmp_path / "r32.jsonl", "--threads", "2", "--rounds", "2")
    tr = T.run_trace(["-p", f"{p64.pid},{p32.pid}"], tmp_path / "ev.jsonl")
    deadline = time.monotonic() + 10
    while True:
        pids = {e.get("pid") for e in T.peek_events(tr.out) if e.get("event") == "attach"}
        if {p64.pid, p32.pid} <= pids:
            break
        if time.monotonic() > deadline:
            pytest.fail(f"attach events only for {pids}, not for both {p64.pid} and {p32.pid}; "
                        f"stderr:\n{tr.stderr()}")
        time.sleep(0.05)
    T.go(p64)
    T.go(p32)
    for p in (p64, p32):
        rc, _, err = p.finish(20)
        assert rc == 0, f"{p.argv} exited {rc}: {err!r}; tracer stderr:\n{tr.stderr()}"
    tr.wait_ok(10)
    events = tr.events()
    for p, abi in ((p64, "x86_64"), (p32, "i386")):
        attach = _attach_event(events, p.pid)
        assert attach["abi"] == abi
        _skip_without_fast_path(attach)
        by_tid = T.calls_by_tid(events, pid=p.pid)
        recs = T.read_record(p.record)
        assert set(by_tid) == {r["tid"] for r in recs}, (sorted(by_tid), abi)
        for tid in by_tid:
            T.compare_calls(by_tid[tid], [r for r in recs if r["tid"] == tid], f"{abi} thread {tid}")


def _text_line_for(lines: list[str], needle: str) -> str | None:
    for ln in lines:
        if needle in ln:
            return ln
    return None


def _run_text(target_bin, tmp_path: Path, trace_args: list[str],
              target_args: list[str]) -> tuple[T.Trace, list[dict[str, Any]]]:
    """vcalls traced with text output (no attach event: wait until the tracee is traced,
    its vDSO carries the breakpoints and it runs), both ended cleanly; the tracer and the
    target's record."""
    rec = tmp_path / "r.jsonl"
    proc = T.start(target_bin("vcalls"), rec, *target_args)
    before = T.read_vdso(proc.pid)
    tr = T.run_trace([*trace_args, "-p", str(proc.pid)], tmp_path / "out.txt",
                     json_events=False, wait_attach=False)
    T.wait_traced(proc.pid, before)
    T.go(proc)
    rc, _, err = proc.finish(20)
    assert rc == 0, err
    tr.wait_ok(10)
    return tr, T.read_record(rec)


def test_text_output(target_bin, tmp_path):
    """Default (text) output: strace's shape, `[fallback]` on calls that entered the kernel.

    Text has no attach event: wait until the tracee is traced, its vDSO carries
    the breakpoints and it runs."""
    tr, record = _run_text(target_bin, tmp_path, [], ["--threads", "1", "--rounds", "2"])
    lines = tr.out.read_text().splitlines()
    for r in record:
        if r["func"] != "clock_gettime" or r["ret"] != 0:
            continue
        needle = f"clock_gettime({r['clockid']}, {{tv_sec={r['tv_sec']}, tv_nsec={r['tv_nsec']}}}) = 0"
        line = _text_line_for(lines, needle)
        assert line is not None, f"no line with {needle!r} in:\n" + "\n".join(lines[:40])
        assert ("[fallback]" in line) == r["fallback"], line


def test_summary(target_bin, tmp_path):
    """`-c`: a summary row per function with its calls, fallbacks and errors."""
    tr, records = _run_text(target_bin, tmp_path, ["-c"], ["--threads", "2", "--rounds", "2"])
    text = tr.out.read_text() + "\n" + tr.stdout() + "\n" + tr.stderr()
    lines = text.splitlines()
    header = next((ln for ln in lines if re.search(r"\bcalls\b", ln) and "fallback" in ln
                   and re.search(r"\berrors\b", ln)), None)
    assert header is not None, f"no summary header with calls, fallbacks and errors in:\n{text}"
    spans = {name: re.search(rf"\b{name}\w*", header).span()  # type: ignore[union-attr]
             for name in ("calls", "fallback", "errors")}

    def column(row: str, name: str) -> int:
        # The number whose characters overlap the header word; a blank cell
        # (strace leaves zero error counts empty) is 0.
        lo, hi = spans[name]
        for m in re.finditer(r"\S+", row):
            if m.start() < hi and m.end() > lo:
                return int(m.group())
        return 0

    for func in sorted({r["func"] for r in records}):
        rs = [r for r in records if r["func"] == func]
        want = [len(rs), sum(r["fallback"] for r in rs), sum(r["ret"] < 0 for r in rs)]
        table = lines[lines.index(header) + 1:]
        rows = [ln for ln in table if re.search(rf"(^|\s)(__vdso_)?{func}(\s|$)", ln)]
        assert len(rows) == 1, f"expected one summary row for {func} in:\n{text}"
        got = [column(rows[0], c) for c in ("calls", "fallback", "errors")]
        assert got == want, f"{func}: calls, fallbacks, errors {got} != {want}:\n{text}"


def test_stack(target_bin, tmp_path):
    """`--stack=4`: each call carries up to 4 return addresses, innermost (its caller) first."""
    run = T.run_traced(target_bin("vcalls"), tmp_path, ["--threads", "1", "--rounds", "1"],
                       ["--stack=4"])
    calls = [e for e in run.events if e["event"] == "call"]
    assert calls
    for ev in calls:
        st = ev.get("stack")
        assert isinstance(st, list) and 1 <= len(st) <= 4, ev
        assert all(isinstance(s, str) and s.startswith("0x") for s in st), ev
        assert T.addr(st[0]) == T.addr(ev["caller"]), ev
    _check_all_threads(run, "--stack")


@pytest.mark.parametrize("m32", ABIS)
def test_calls_equal_record_inject(target_bin, tmp_path, m32):
    """`--inject`: the in-tracee recorder gives the same call events, in order per thread,
    with the same arguments, results and fallback flags (i386: the 32-bit stubs, fallbacks
    through __kernel_vsyscall, clock_gettime64's 64-bit timespec)."""
    run = T.run_traced(target_bin("vcalls", m32), tmp_path, trace_args=["--inject"])
    attach = _attach_event(run.events, run.proc.pid)
    assert attach["abi"] == ("i386" if m32 else "x86_64")
    _skip_without_fast_path(attach)
    _check_all_threads(run, "i386" if m32 else "x86_64")
    notices = [e for e in run.events if e["event"] == "notice"]
    assert not notices, notices
