"""`record` then `report` on real targets (vcalls.c: threads calling every vDSO function, each
call recorded by the target), 64- and 32-bit, both engines: report --json equals, call for
call, what the program recorded; report's text, -c and --hist have the shape and counts of a
live `trace` of the same kind; --perfetto is valid; -e works at report time."""
from __future__ import annotations

import json
import re
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

import targets as T
from chrome_trace import check_trace, load_trace

pytestmark = pytest.mark.live

ABIS = [pytest.param(False, id="x86_64"), pytest.param(True, id="i386", marks=pytest.mark.i386)]
ENGINES = [pytest.param([], id="stops"), pytest.param(["--inject"], id="inject")]


def _record(target: Path, tmp: Path, target_args: list[str], rec_args: list[str],
            name: str = "run") -> tuple[T.Proc, Path, list[dict[str, Any]]]:
    """Start TARGET, `record -p PID -o FILE REC_ARGS`, wait for its attach line, let the target
    run, wait for both; return (target, recording, the target's record)."""
    out = tmp / f"{name}.rec"
    trec = tmp / f"{name}.record.jsonl"
    proc = T.start(target, trec, *target_args)
    err = tmp / f"{name}.record.stderr"
    argv = [*T._tracer_argv(["record", "-p", str(proc.pid), "-o", str(out), *rec_args])]
    with open(err, "wb") as se:
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=se, cwd=T.REPO, env=T.tracer_env())
    T._track(p)
    deadline = time.monotonic() + T.ATTACH_TIMEOUT
    while "--- vdsotrace attached to pid" not in err.read_text(errors="replace"):
        if p.poll() is not None or time.monotonic() > deadline:
            p.kill()
            pytest.fail(f"record did not attach: {err.read_text(errors='replace')}")
        time.sleep(0.02)
    T.go(proc)
    rc, _, terr = proc.finish(30)
    assert rc == 0, f"target exited {rc} under record: {terr!r}; {err.read_text()}"
    try:
        assert p.wait(30) == 0, err.read_text()
    except subprocess.TimeoutExpired:
        p.kill()
        pytest.fail("record did not exit after its tracee")
    text = err.read_text(errors="replace")
    assert "Traceback" not in text, text
    assert re.search(r"recorded \d+ events \(\d+ calls\)", text), text
    return proc, out, T.read_record(trec)


def _items(path: Path) -> list[Any]:
    from tracer.recording.reader import Reader
    with open(path, "rb") as f:
        r = Reader(f, str(path))
        items = list(r.items())
        assert r.damage is None, r.damage
        return items


def _report(path: Path, *args: str) -> str:
    r = T.run_tracer(["report", str(path), *args], timeout=120)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    return r.stdout


def _json(path: Path, *args: str) -> list[dict[str, Any]]:
    return [json.loads(x) for x in _report(path, "--json", *args).splitlines()]


def _check_calls(events: list[dict[str, Any]], record: list[dict[str, Any]], pid: int,
                 label: str) -> None:
    by_tid = T.calls_by_tid(events)
    assert all(ev["pid"] == pid for evs in by_tid.values() for ev in evs)
    rec_by_tid: dict[int, list[dict[str, Any]]] = {}
    for r in record:
        rec_by_tid.setdefault(r["tid"], []).append(r)
    assert set(by_tid) == set(rec_by_tid), (sorted(by_tid), sorted(rec_by_tid))
    for tid, recs in rec_by_tid.items():
        T.compare_calls(by_tid[tid], recs, f"{label} thread {tid}")


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("m32", ABIS)
def test_report_json_equals_record(target_bin, tmp_path, m32, engine):
    proc, rec, record = _record(target_bin("vcalls", m32), tmp_path, [], engine)
    events = _json(rec)
    att = [e for e in events if e["event"] == "attach"]
    assert len(att) == 1 and att[0]["abi"] == ("i386" if m32 else "x86_64"), att
    if att[0]["vdso_fast_path"] is False:
        pytest.skip("the clocksource has no vDSO fast path")
    _check_calls(events, record, proc.pid, f"{'i386' if m32 else 'x86_64'} {engine}")
    if engine:      # --inject: the ring's slots were written as they were, not as events
        kinds = Counter(type(x).__name__ for x in _items(rec))
        assert kinds["Slots"] and not kinds["CallEvent"], kinds
    assert not [e for e in events if e["event"] == "notice"]
    # -e at report time: exactly the selected calls, in the same order
    only = _json(rec, "-e", "clock_gettime,__vdso_time")
    assert [e for e in only if e["event"] == "call"] == \
        [e for e in events if e["event"] == "call" and e["func"] in ("clock_gettime", "time")]
    # as a live `trace -e clock_gettime,__vdso_time` lists them: in the order -e gives
    assert [e["functions"] for e in only if e["event"] == "attach"] == \
        [["clock_gettime", "time"]]
    no_getcpu = _json(rec, "-e", "!getcpu")
    assert [e for e in no_getcpu if e["event"] == "call"] == \
        [e for e in events if e["event"] == "call" and e["func"] != "getcpu"]


def _norm(line: str) -> str:
    """A text line with what differs between two runs (ids, times, addresses) taken out."""
    line = re.sub(r"0x[0-9a-f]+", "ADDR", line)
    return re.sub(r"\d+(\.\d+)?", "N", line)


def _live_trace(target: Path, tmp: Path, trace_args: list[str], name: str,
                json_events: bool = False) -> str:
    out = tmp / f"{name}.out"
    trec = tmp / f"{name}.record.jsonl"
    proc = T.start(target, trec)
    tr = T.run_trace(["-p", str(proc.pid), *trace_args], out, json_events=json_events,
                     wait_attach=False)
    deadline = time.monotonic() + T.ATTACH_TIMEOUT
    while "--- vdsotrace attached" not in (out.read_text(errors="replace")
                                          if out.exists() else ""):
        assert time.monotonic() < deadline and tr.popen.poll() is None, tr.stderr()
        time.sleep(0.02)
    T.go(proc)
    rc, _, err = proc.finish(30)
    assert rc == 0, err
    tr.wait_ok(30)
    return out.read_text()


def _summary_shape(text: str) -> dict[str, Any]:
    rows, reasons, sites = {}, [], Counter()
    section = ""
    for line in text.splitlines():
        f = line.split()
        if line.startswith("fallbacks by reason"):
            section = "reasons"
        elif line.startswith("hottest call sites"):
            section = "sites"
        elif line.startswith("never called") or line.startswith("diagnosis"):
            section = line.split(":")[0]
            reasons.append(line)
        elif section == "" and len(f) == 7 and f[3].isdigit():
            rows[f[6]] = tuple(f[3:6])
        elif section == "reasons" and line.strip():
            reasons.append(line.strip())
        elif section == "sites" and "calls" in line:
            sites[(f[0], f[-1])] += 1
    return {"rows": rows, "reasons": reasons, "sites": sites}


def test_report_text_and_summary_equal_live_trace(target_bin, tmp_path):
    """Text, -c and --hist of a report and of a live trace of two runs of the same program:
    the same lines but for ids, times and addresses; the same -c rows, reasons and sites."""
    binary = target_bin("vcalls")
    _, rec, _ = _record(binary, tmp_path, [], [], "rec")
    live_text = _live_trace(binary, tmp_path, [], "text")
    rep = _report(rec)
    assert sorted(map(_norm, rep.splitlines())) == sorted(map(_norm, live_text.splitlines()))
    live_c = _live_trace(binary, tmp_path, ["-c"], "c")
    rep_c = _report(rec, "-c")
    a, b = _summary_shape(rep_c), _summary_shape(live_c)
    assert a["rows"] and a == b, f"report -c:\n{rep_c}\nlive -c:\n{live_c}"
    # --hist: the same histograms with the same call and fallback counts
    live_h = _live_trace(binary, tmp_path, ["-c", "--hist"], "h")
    rep_h = _report(rec, "-c", "--hist")

    def hist_shape(text: str) -> Counter:
        return Counter(re.sub(r"\d+ calls?", "", ln) for ln in text.splitlines()
                       if ln.startswith("@"))
    assert hist_shape(rep_h) and hist_shape(rep_h) == hist_shape(live_h), rep_h


def test_report_stack_perfetto_hist_json(target_bin, tmp_path):
    """--stack recorded: shown with report --stack (and -c's paths), not without; the
    timeline valid with a track per thread named by its comm; --hist --json counts."""
    proc, rec, record = _record(target_bin("vcalls"), tmp_path, ["--threads", "2"],
                                ["--stack=4"])
    plain = _json(rec)
    stacked = _json(rec, "--stack")
    assert all("stack" not in e for e in plain)
    calls = [e for e in stacked if e["event"] == "call"]
    assert calls and all(1 <= len(e["stack"]) <= 4 for e in calls)
    assert all(len(e["stack"]) <= 2 for e in _json(rec, "--stack=2") if e["event"] == "call")
    assert "hottest paths (--stack)" in _report(rec, "-c", "--stack")
    assert "hottest paths" not in _report(rec, "-c")
    pf = tmp_path / "t.json"
    hist = _json(rec, "--hist", "--perfetto", str(pf))
    c = check_trace(load_trace(pf))
    assert c.problems == [], c.problems[:10]
    slices = [s for s in c.slices if s.cat.startswith("vdso")]
    assert Counter(s.tid for s in slices) == Counter(r["tid"] for r in record)
    comm = target_bin("vcalls").name[:15]
    assert c.process_names.get(proc.pid) == comm, c.process_names
    for tid in {r["tid"] for r in record}:
        assert c.thread_names.get((proc.pid, tid)) == f"{comm} {tid}", c.thread_names
    hists = [e for e in hist if e["event"] == "histogram"]
    assert sum(b["count"] for h in hists for b in h["buckets"]) == len(record)
    assert sum(h["fallbacks"] for h in hists) == sum(r["fallback"] for r in record)


def test_record_spawned_and_refusals(target_bin, tmp_path):
    """`record -o FILE -- CMD`; bad input is one line and no file left behind."""
    rec = tmp_path / "s.rec"
    trec = tmp_path / "s.jsonl"
    r = subprocess.run([*T._tracer_argv(["record", "-o", str(rec), "--",
                                         str(target_bin("vcalls")), str(trec), "--threads", "2",
                                         "--rounds", "1"])],
                       input=b"g", capture_output=True, cwd=T.REPO, env=T.tracer_env(),
                       timeout=60)
    assert r.returncode == 0, r.stderr
    events = _json(rec)
    pid = [e for e in events if e["event"] == "attach"][0]["pid"]
    _check_calls(events, T.read_record(trec), pid, "spawned")
    for args, what in ((["record", "-o", str(tmp_path / "x.rec"), "-p", "999999999"],
                        "999999999"),
                       (["record", "-p", "1"], "-o"),
                       (["record", "-o", str(tmp_path / "y.rec"), "--lossy", "-p", "1"],
                        "--lossy")):
        r2 = T.run_tracer(args)
        assert r2.returncode != 0 and len(r2.stderr.splitlines()) == 1, r2.stderr
        assert what in r2.stderr and "Traceback" not in r2.stderr
    assert not (tmp_path / "x.rec").exists() and not (tmp_path / "y.rec").exists()


def test_recorder_killed_leaves_a_readable_file(target_bin, tmp_path):
    """SIGKILL of `record` mid-run: the chunks written so far (one per engine tick) are read,
    and report says in one line that the recording was cut short."""
    rec = tmp_path / "k.rec"
    trec = tmp_path / "k.jsonl"
    proc = T.start(target_bin("tightloop"), trec, "--calls", "100000000")
    err = tmp_path / "k.stderr"
    with open(err, "wb") as se:
        p = subprocess.Popen(T._tracer_argv(["record", "-p", str(proc.pid), "-o", str(rec),
                                             "--inject"]),
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=se,
                             cwd=T.REPO, env=T.tracer_env())
    T._track(p)
    deadline = time.monotonic() + T.ATTACH_TIMEOUT
    while "--- vdsotrace attached" not in err.read_text(errors="replace"):
        assert p.poll() is None and time.monotonic() < deadline, err.read_text()
        time.sleep(0.02)
    T.go(proc)
    deadline = time.monotonic() + 20
    while rec.stat().st_size < 200_000 and time.monotonic() < deadline:
        time.sleep(0.05)
    p.kill()
    p.wait(10)
    r = T.run_tracer(["report", str(rec), "--json"], timeout=120)
    assert r.returncode == 1, r.stderr
    assert len(r.stderr.splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "cut short" in r.stderr or "truncated" in r.stderr, r.stderr
    calls = [json.loads(x) for x in r.stdout.splitlines()]
    assert calls[0]["event"] == "attach"
    calls = [e for e in calls if e["event"] == "call"]
    assert len(calls) > 1000
    # in order, one thread, each a valid clock_gettime
    assert all(c["func"] == "clock_gettime" and c["ret"] == 0 for c in calls)
    assert [c["out"]["tp"] for c in calls] == sorted(
        (c["out"]["tp"] for c in calls), key=lambda tp: (tp["tv_sec"], tp["tv_nsec"]))


def test_report_summary_of_inject_recording(target_bin, tmp_path):
    """--inject: report -c has the rows (calls, fallbacks, errors per function) of a live
    `trace --inject -c` of the same program (which, counting ring records without events,
    names no sites or reasons; the report does, from the recorded calls)."""
    binary = target_bin("vcalls")
    _, rec, record = _record(binary, tmp_path, [], ["--inject"], "irec")
    live_c = _live_trace(binary, tmp_path, ["--inject", "-c"], "ic")
    rep_c = _report(rec, "-c")
    a, b = _summary_shape(rep_c), _summary_shape(live_c)
    assert a["rows"] and a["rows"] == b["rows"], f"report -c:\n{rep_c}\nlive -c:\n{live_c}"
    calls = Counter(r["func"] for r in record)
    assert {f: int(v[0]) for f, v in a["rows"].items() if f != "total"} == dict(calls)
    assert sum(a["sites"].values()) > 0


@pytest.mark.parametrize("m32", ABIS)
def test_live_inject_json_equals_record_and_report(target_bin, tmp_path, m32):
    """`trace --inject --json` (its lines made from runs of ring slots, render/jsonl.py
    SlotLines) equals, call for call, what vcalls recorded, as `report --json` of a
    `record --inject` of the same program does; both have the same keys, in the same order,
    as the events' way writes them."""
    binary = target_bin("vcalls", m32)
    rec = tmp_path / "live.record.jsonl"
    proc = T.start(binary, rec)
    tr = T.run_trace(["--inject", "-p", str(proc.pid)], tmp_path / "live.jsonl")
    T.go(proc)
    rc, _, err = proc.finish(30)
    assert rc == 0, err
    tr.wait_ok(30)
    live = tr.events()
    att = [e for e in live if e["event"] == "attach"]
    if att[0]["vdso_fast_path"] is False:
        pytest.skip("the clocksource has no vDSO fast path")
    label = "i386" if m32 else "x86_64"
    _check_calls(live, T.read_record(rec), proc.pid, f"live {label}")
    assert not [e for e in live if e["event"] == "notice"]
    proc2, recording, record = _record(binary, tmp_path, [], ["--inject"], name="rec")
    reported = _json(recording)
    _check_calls(reported, record, proc2.pid, f"report {label}")
    assert {tuple(e) for e in live if e["event"] == "call"} == \
        {tuple(e) for e in reported if e["event"] == "call"}
