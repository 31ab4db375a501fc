"""--hist and --perfetto OUT on real targets, 64- and 32-bit: histogram counts per (function,
clock) equal the calls the target recorded, fallbacks apart; the timeline is valid by the
trace-event format's rules (tests/chrome_trace.py) with one slice per recorded call, on every
way out (tracee exit, SIGINT, --duration), and signals show as instants."""
from __future__ import annotations

import signal
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

import targets as T
from chrome_trace import Checked, check_trace, load_trace

pytestmark = pytest.mark.live

ABIS = [pytest.param(False, id="x86_64"), pytest.param(True, id="i386", marks=pytest.mark.i386)]
PER_CLOCK = ("clock_gettime", "clock_gettime64")


def _key(func: str, clock: Any) -> tuple[str, Any]:
    return (func, clock if func in PER_CLOCK else None)


def _record_counts(record: list[dict]) -> tuple[Counter, Counter]:
    calls: Counter = Counter()
    falls: Counter = Counter()
    for r in record:
        k = _key(r["func"], r.get("clockid"))
        calls[k] += 1
        falls[k] += bool(r["fallback"])
    return calls, falls


def _hist_counts(events: list[dict]) -> tuple[Counter, Counter, list[dict]]:
    hists = [e for e in events if e["event"] == "histogram" and e["func"] != "__kernel_vsyscall"]
    calls: Counter = Counter()
    falls: Counter = Counter()
    for h in hists:
        k = (h["func"], h["clock"])
        assert k not in calls, f"two histograms for {k}"
        assert h["unit"] == "ns"
        for b in h["buckets"]:
            assert set(b) == {"lo", "hi", "count"} and 0 <= b["lo"] < b["hi"], b
        calls[k] = sum(b["count"] for b in h["buckets"])
        falls[k] = h["fallbacks"]
    return calls, falls, hists


def _check_timeline(path: Path, pid: int, record: list[dict], comm: str) -> Checked:
    c = check_trace(load_trace(path))
    assert c.problems == [], \
        "timeline breaks the format's rules:\n  " + "\n  ".join(c.problems[:10])
    calls = [s for s in c.slices if s.cat.startswith("vdso")]
    by_tid = Counter(s.tid for s in calls)
    want = Counter(r["tid"] for r in record)
    assert by_tid == want, f"call slices per thread {dict(by_tid)} != recorded {dict(want)}"
    assert sum(s.name.endswith("[fallback]") for s in calls) == sum(r["fallback"] for r in record)
    assert all((s.cat == "vdso,fallback") == s.args["fallback"] for s in calls)
    assert Counter(s.name.removesuffix(" [fallback]") for s in calls) == \
        Counter(r["func"] for r in record)
    assert c.process_names.get(pid) == comm, c.process_names
    for tid in want:
        assert c.thread_names.get((pid, tid)) == f"{comm} {tid}", c.thread_names
    return c


@pytest.mark.parametrize("engine", [[], ["--inject"]], ids=["stops", "inject"])
@pytest.mark.parametrize("m32", ABIS)
def test_hist_and_timeline_equal_record(target_bin, tmp_path, m32, engine):
    pf = tmp_path / "timeline.json"
    run = T.run_traced(target_bin("vcalls", m32), tmp_path, ["--rounds", "8"],
                       ["--hist", "--perfetto", str(pf), *engine])
    pid = run.proc.pid
    want_calls, want_falls = _record_counts(run.record)
    got_calls, got_falls, hists = _hist_counts(run.events)
    assert got_calls == want_calls, \
        f"histogram counts {dict(got_calls)} != record {dict(want_calls)}"
    assert got_falls == want_falls, f"fallbacks {dict(got_falls)} != record {dict(want_falls)}"
    assert all(h["pid"] == pid and isinstance(h["time"], float) for h in hists)
    # the histograms come at the end, after every call
    kinds = [e["event"] for e in run.events]
    assert kinds.index("histogram") > max(i for i, k in enumerate(kinds) if k == "call")

    c = _check_timeline(pf, pid, run.record, "vcalls-m32"[:15] if m32 else "vcalls")
    if m32 and not engine:
        # i386: the system calls of fallbacks sit inside the call that made them (--inject
        # records no __kernel_vsyscall calls)
        sys_nested = [s for s in c.slices if s.cat == "syscall" and s.args.get("nested_in")]
        assert sys_nested, "no nested system call slice on i386"
        parents = [s for s in c.slices if s.cat == "vdso,fallback"]
        for s in sys_nested:
            assert any(p.tid == s.tid and p.start <= s.start and s.end <= p.end
                       and p.name == f"{s.args['nested_in']} [fallback]" for p in parents), s


def test_c_hist_json_builds_no_call_lines(target_bin, tmp_path):
    """-c --hist: the summary and the histograms, no call events; both count every call."""
    run = T.run_traced(target_bin("vcalls"), tmp_path, ["--rounds", "4"], ["-c", "--hist"])
    assert not [e for e in run.events if e["event"] == "call"]
    want_calls, want_falls = _record_counts(run.record)
    got_calls, got_falls, _ = _hist_counts(run.events)
    assert (got_calls, got_falls) == (want_calls, want_falls)
    (summ,) = [e for e in run.events if e["event"] == "summary"]
    assert sum(f["calls"] for f in summ["functions"]) == len(run.record)


def test_hist_text_spawned(target_bin, tmp_path):
    """Text: bpftrace's layout at the end of the stream, after the -c table."""
    rec = tmp_path / "r.jsonl"
    out = tmp_path / "out.txt"
    argv = [*T._tracer_argv(["trace", "-c", "--hist", "-o", str(out), "--",
                             str(target_bin("vcalls")), str(rec), "--threads", "2"])]
    p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, cwd=T.REPO, env=T.tracer_env())
    try:
        so, se = p.communicate(b"g", timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, se.decode()
    text = out.read_text()
    want_calls, want_falls = _record_counts(T.read_record(rec))
    assert "% time" in text and "latency histograms, in nanoseconds" in text
    n = want_calls[("clock_gettime", "CLOCK_MONOTONIC")]
    assert f"@clock_gettime[CLOCK_MONOTONIC]: {n} calls\n" in text
    n = want_calls[("clock_gettime", "CLOCK_PROCESS_CPUTIME_ID")]
    assert f"@clock_gettime[CLOCK_PROCESS_CPUTIME_ID]: {n} calls, {n} fell back into the kernel" \
        in text
    sections: dict[str, list[str]] = {}
    for line in text.split("latency histograms, in nanoseconds", 1)[1].splitlines():
        if line.startswith("@"):
            head = line.split(":")[0]
            sections[head] = []
        elif line.startswith("[") and line.endswith("|"):
            sections[head].append(line)
    bars = [b for lines in sections.values() for b in lines]
    assert bars and all(len(b) == 16 + 8 + 2 + 52 + 1 for b in bars)
    # every call once in its function's (and clock's) histogram; the fallbacks again apart
    assert sum(int(b[16:24]) for h, lines in sections.items() if not h.endswith("fallback]")
               for b in lines) == sum(want_calls.values())
    assert sum(int(b[16:24]) for h, lines in sections.items() if h.endswith("fallback]")
               for b in lines) == sum(n for k, n in want_falls.items() if n != want_calls[k])


@pytest.mark.parametrize("how", ["SIGINT", "duration"])
def test_timeline_valid_when_cut(target_bin, tmp_path, how):
    """The tracer leaves while calls are in flight: the timeline is a whole document, with a
    slice for every call event written."""
    pf = tmp_path / "cut.json"
    proc = T.start(target_bin("spin"), tmp_path / "spin.jsonl", "--threads", "2")
    extra = ["--duration", "1"] if how == "duration" else []
    tr = T.run_trace(["-p", str(proc.pid), "--perfetto", str(pf), *extra], tmp_path / "ev.jsonl")
    T.go(proc, close=False)
    if how == "SIGINT":
        time.sleep(0.7)
        tr.signal(signal.SIGINT)
    tr.wait_ok(15)
    proc.popen.stdin.close()
    rc, out, err = proc.finish(10)
    assert rc == 0 and "bad=0" in out, (rc, out, err)
    calls = [e for e in tr.events() if e["event"] == "call"]
    assert calls
    c = check_trace(load_trace(pf))
    assert c.problems == [], c.problems[:10]
    slices = [s for s in c.slices if s.cat.startswith("vdso")]
    assert Counter(s.tid for s in slices) == Counter(e["tid"] for e in calls)
    assert any(i["name"] == "detach" for i in c.instants)


def test_signals_are_instants(target_bin, tmp_path):
    pf = tmp_path / "sig.json"
    run = T.run_traced(target_bin("sigs"), tmp_path, ["--count", "5"],
                       ["--signals", "--perfetto", str(pf)])
    c = check_trace(load_trace(pf))
    assert c.problems == [], c.problems[:10]
    deliveries = [r for r in run.record if r.get("kind") == "delivery"]
    inst = Counter(i["name"] for i in c.instants if i.get("cat", "").startswith("signal"))
    assert inst["SIGUSR1"] == len(deliveries) == 5
    assert inst["sigreturn"] == 5
    assert all(i["s"] == "t" for i in c.instants if i.get("cat") == "signal")


def test_unwritable_timeline_refused_before_attaching(target_bin, tmp_path):
    proc = T.start(target_bin("spin"), tmp_path / "spin.jsonl", "--threads", "1")
    r = T.run_tracer(["trace", "-p", str(proc.pid), "--perfetto", str(tmp_path / "no" / "t.json")])
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.count("\n") == 1 and "cannot write the timeline" in r.stderr, r.stderr
    assert T.tracer_pid(proc.pid) == 0
    T.go(proc)
    rc, out, _ = proc.finish(10)
    assert rc == 0 and "bad=0" in out
