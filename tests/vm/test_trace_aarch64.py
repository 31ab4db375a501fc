"""The stop-based engine on arm64 tracees, live (issue 13 items 3 and 6): inside the emulated
arm64 machine, `vdsotrace trace` (-p and -- CMD; --json, -c, -T, -e) and the console's control
interface trace tests/targets/a64trace.c, an arm64 program whose 2 threads call every function
of the arm64 vDSO directly through its __kernel_* symbols and through glibc, including calls
the vDSO answers through `svc #0` (CPU-time clocks, getrandom without state), and record what
they did. The trace equals the record exactly (every call, in order per thread, with the same
arguments, results, written values and fallback flags); after the tracer leaves, the target's
vDSO bytes are those read before the attach and it finishes normally; the console switches to
--inject and back; a SIGKILLed tracer's guardian puts the original code back. Also: fork (followed with
-f, and released clean without), exec, record + report, SIGINT/SIGTERM/--duration/the tracee's
exit as ways out, and a SECCOMP_RET_TRACE stop of the program's own filter.

One boot for the module (tests/vm/inside_trace.py, two scenarios at a time); deselected unless
VDSOTRACE_VM=1."""
from __future__ import annotations

import json
import re
from collections import Counter
from typing import Any, Iterator

import pytest

import targets as T
from pathlib import Path

from tracer.vdso import parse_image

pytestmark = pytest.mark.arm64vm

INSIDE = Path(__file__).resolve().parent / "inside_trace.py"
ROUNDS = 4                      # inside_trace.py's
FUNCS = ("clock_gettime", "gettimeofday", "clock_getres", "getrandom")


@pytest.fixture(scope="module")
def run() -> Iterator[dict[str, Any]]:
    with T.boot_aarch64("a64trace", INSIDE, "vdsotrace-vmtrace-") as (out, _):
        yield out


def scenario(run: dict[str, Any], name: str) -> dict[str, Any]:
    rep = run[name]
    assert "error" not in rep, (rep["error"], rep.get("stderr", ""))
    return rep


def record_calls(rep: dict[str, Any], child: bool = True) -> list[dict[str, Any]]:
    """The calls the program recorded (with `child`, its --fork child's too)."""
    rec = [r for r in rep["record"] if "func" in r]
    workers = [r for r in rec if r["t"] < 2]
    # 2 threads x ROUNDS x (11 calls with __kernel_getrandom, 10 without)
    per_round = 11 if any(r["func"] == "getrandom" for r in rec) else 10
    assert len(workers) == 2 * ROUNDS * per_round
    return rec if child else workers


def child_status(rep: dict[str, Any]) -> int:
    (line,) = [r for r in rep["record"] if "child" in r]
    assert len([r for r in rep["record"] if r.get("t") == 2]) == 6   # its calls, all made
    return int(line["status"])


def by_tid(calls: list[dict[str, Any]]) -> dict[int, list[tuple[Any, ...]]]:
    out: dict[int, list[tuple[Any, ...]]] = {}
    for c in calls:
        out.setdefault(c["tid"], []).append(
            (c["func"], c["args"], c["ret"], c.get("out"), c["fallback"]))
    return out


def events(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def assert_left_clean(rep: dict[str, Any]) -> None:
    assert rep["after"] == rep["before"]              # every byte, the padding included
    assert rep["target"] == {"rc": 0, "stderr": ""}


def assert_trace_equals_record(rep: dict[str, Any], funcs: tuple[str, ...] = FUNCS,
                               child: bool = False) -> None:
    rec = [r for r in record_calls(rep, child) if r["func"] in funcs]
    evs = events(rep["stdout"])
    calls = [e for e in evs if e["event"] == "call"]
    assert by_tid(calls) == by_tid(rec)
    assert len(by_tid(rec)) == 2 + child and len(calls) == len(rec)
    # who called: the program itself for direct calls, glibc's wrappers for the others
    for t in by_tid(calls):
        for c, r in zip([c for c in calls if c["tid"] == t], [r for r in rec if r["tid"] == t]):
            # (glibc's gettimeofday is an IFUNC resolved to the vDSO's own function:
            # sysdeps/unix/sysv/linux/gettimeofday.c; the program calls it directly)
            direct = r["via"] == "vdso" or r["func"] == "gettimeofday"
            lib = ("libc.so.6!" if not direct else
                   "a64trace!main+" if r["t"] == 2 else "a64trace!work+")   # (the child: main)
            assert (c["caller_symbol"] or "").startswith(lib), (c, r)
            assert c["duration_ns"] > 0                 # the stub's two counter reads
            assert c["symbol"] == "__kernel_" + c["func"]
    att = [e for e in evs if e["event"] == "attach"]
    assert att and att[0]["abi"] == "aarch64"
    assert att[0]["functions"] == [f for f in FUNCS if f in funcs and (
        f != "getrandom" or any(r.get("func") == "getrandom" for r in rep["record"]))]


def test_attached_json_trace_equals_the_record(run: dict[str, Any]) -> None:
    rep = scenario(run, "json")
    assert rep["threads_at_attach"] == 3 and rep["tracer_rc"] == 0
    assert_trace_equals_record(rep)
    assert any(r["fallback"] for r in rep["record"]) and not all(
        r["fallback"] for r in rep["record"])
    det = [e for e in events(rep["stdout"]) if e["event"] == "detach"]
    assert len(det) == 1 and det[0]["reason"] != "error"
    assert_left_clean(rep)


def test_spawned_json_trace_equals_the_record(run: dict[str, Any]) -> None:
    rep = scenario(run, "spawn")
    assert rep["tracer_rc"] == 0 and rep["stderr"] == ""
    assert_trace_equals_record(rep)
    evs = events(rep["stdout"])
    assert evs[0]["event"] == "attach" and evs[0]["spawned"] is True
    assert evs[-1]["event"] == "exit" and evs[-1]["status"] == 0


def test_select_with_e(run: dict[str, Any]) -> None:
    rep = scenario(run, "select")
    assert rep["tracer_rc"] == 0
    assert_trace_equals_record(rep, ("clock_getres", "getrandom"))
    assert_left_clean(rep)


def test_count_summary(run: dict[str, Any]) -> None:
    rep = scenario(run, "count")
    assert rep["tracer_rc"] == 0
    rec = record_calls(rep)
    calls = Counter(r["func"] for r in rec)
    falls = Counter(r["func"] for r in rec if r["fallback"])
    rows = {}
    for line in rep["stdout"].splitlines():
        m = re.match(r"^\s*[\d.]+\s+[\d.]+\s+[\d.]+\s+(\d+)\s+(\d+)\s+(\d+)\s+(\w+)$", line)
        if m:
            rows[m.group(4)] = (int(m.group(1)), int(m.group(2)), int(m.group(3)))
    assert rows.pop("total") == (len(rec), sum(falls.values()), 0)
    assert rows == {f: (calls[f], falls[f], 0) for f in calls}
    assert_left_clean(rep)


def test_timing_lines(run: dict[str, Any]) -> None:
    rep = scenario(run, "timing")
    assert rep["tracer_rc"] == 0
    rec = record_calls(rep)
    lines = [x for x in rep["stdout"].splitlines() if x.startswith("[pid ")]
    assert len(lines) == len(rec)
    assert all(re.search(r" <\d+\.\d{9}>$", x) for x in lines), lines[:3]
    assert sum("[fallback]" in x for x in lines) == sum(r["fallback"] for r in rec)
    assert_left_clean(rep)


def test_console_control_interface(run: dict[str, Any]) -> None:
    rep = scenario(run, "console")
    assert rep["paused"] == {"state": "paused", "abi": "aarch64", "functions": [
        f for f in FUNCS if f != "getrandom" or any(
            r["func"] == "getrandom" for r in rep["record"])], "threads": 3}
    assert rep["set_functions"] == ["clock_gettime", "gettimeofday"]
    # switched to the in-tracee recorder and back while paused (--inject works on arm64)
    assert rep["inject"] == "accepted" and rep["inject_on"] is True, rep["inject"]
    assert rep["after_inject"] == {"inject": False, "functions": ["clock_gettime", "gettimeofday"]}
    rec = [r for r in record_calls(rep) if r["func"] in ("clock_gettime", "gettimeofday")]
    summ = rep["summary"]
    assert summ["clock_gettime"] == [sum(r["func"] == "clock_gettime" for r in rec),
                                     sum(r["fallback"] for r in rec), 0]
    assert summ["gettimeofday"] == [sum(r["func"] == "gettimeofday" for r in rec), 0, 0]
    def brief(calls: list[dict[str, Any]]) -> dict[int, list[tuple[Any, ...]]]:
        out: dict[int, list[tuple[Any, ...]]] = {}
        for c in calls:
            out.setdefault(c["tid"], []).append(
                (c["func"], c["args"].get("clockid"), c["ret"], c["fallback"]))
        return out
    assert brief(rep["calls"]) == brief(rec)
    assert not rep["engine_alive"] and rep["state"] == "detached"
    assert_left_clean(rep)


def test_a_killed_tracers_guardian_restores_the_code(run: dict[str, Any]) -> None:
    rep = scenario(run, "guardian")
    before, planted, after = (bytes.fromhex(rep[k]) for k in ("before", "planted", "after"))
    size = parse_image(before).image_size
    assert planted[:size] != before[:size]            # the entries were patched
    assert after[:size] == before[:size]              # and are original again
    assert rep["target"] == {"rc": 0, "stderr": ""}
    record_calls(rep)                                 # every call made, untraced


def test_timing_lines_and_sigterm(run: dict[str, Any]) -> None:
    """(the "timing" run leaves on SIGTERM)"""
    rep = scenario(run, "timing")
    assert "(SIGTERM)" in rep["stdout"].splitlines()[-1]


def test_followed_fork_child_is_traced(run: dict[str, Any]) -> None:
    rep = scenario(run, "fork")
    assert rep["tracer_rc"] == 0 and child_status(rep) == 0
    assert_trace_equals_record(rep, child=True)
    child = next(r["tid"] for r in rep["record"] if r.get("t") == 2)
    evs = events(rep["stdout"])
    assert {e["pid"] for e in evs if e["event"] == "call" and e["tid"] == child} == {child}
    assert_left_clean(rep)


def test_unfollowed_fork_child_runs_clean(run: dict[str, Any]) -> None:
    """Without -f the child is let go with its copy of the vDSO restored: its calls (two of
    them through `svc` in the vDSO) run untraced and it exits normally."""
    rep = scenario(run, "nofork")
    assert rep["tracer_rc"] == 0 and child_status(rep) == 0
    assert_trace_equals_record(rep)
    assert_left_clean(rep)


def test_exec_is_followed(run: dict[str, Any]) -> None:
    """`trace -- sh -c 'exec a64trace ...'`: the shell's image is planned, then the program's
    after the exec; the trace equals the program's record."""
    rep = scenario(run, "exec")
    assert rep["tracer_rc"] == 0 and rep["stderr"] == ""
    evs = events(rep["stdout"])
    assert [e["event"] for e in evs].count("exec") == 1
    assert_trace_equals_record(rep)
    assert evs[-1]["event"] == "exit" and evs[-1]["status"] == 0


def test_record_and_report(run: dict[str, Any]) -> None:
    """`record -p` then `report --json`: the recording renders the calls the program made."""
    rep = scenario(run, "record")
    assert rep["tracer_rc"] == 0 and rep["report_rc"] == 0, (rep["stderr"], rep["report_stderr"])
    assert_trace_equals_record(rep)
    assert_left_clean(rep)


def test_duration_ends_the_trace_and_leaves_clean(run: dict[str, Any]) -> None:
    rep = scenario(run, "duration")
    assert rep["tracer_rc"] == 0 and rep["stderr"] == ""
    evs = events(rep["stdout"])
    assert [e["event"] for e in evs if e["event"] != "notice"] == ["attach", "detach"]
    assert_left_clean(rep)
    record_calls(rep)                                 # every call made, untraced


def test_the_programs_own_seccomp_trace_stop(run: dict[str, Any]) -> None:
    """A filter of the program's own answers getppid with SECCOMP_RET_TRACE: traced or not,
    the call is not run and fails with ENOSYS (the engine skips it through
    NT_ARM_SYSTEM_CALL, as the kernel does with no tracer)."""
    rep = scenario(run, "seccomp")
    assert rep["tracer_rc"] == 0, rep["stderr"]
    (line,) = [r for r in rep["record"] if "getppid" in r]
    assert line["getppid"] == [-1, 38] and line["traced"] == [-1, 38]      # ENOSYS
    assert_trace_equals_record(rep)
    assert_left_clean(rep)
