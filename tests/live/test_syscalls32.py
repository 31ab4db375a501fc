"""i386: every system call the C library makes goes through __kernel_vsyscall,
so the default trace of a 32-bit tracee logs them as `syscall` events."""
from __future__ import annotations

from collections import Counter

import pytest

import targets as T

pytestmark = [
    pytest.mark.live,
    pytest.mark.i386,
]

# include/uapi/linux/time.h
CLOCK_NUMBERS = {"CLOCK_REALTIME": 0, "CLOCK_MONOTONIC": 1, "CLOCK_PROCESS_CPUTIME_ID": 2,
                 "CLOCK_BOOTTIME": 7, "CLOCK_MONOTONIC_COARSE": 6}


def _matches(ev: dict, rec: dict) -> bool:
    if ev.get("name") != rec["name"] or ev.get("nr") != rec["nr"] or ev.get("ret") != rec["ret"]:
        return False
    if "fd" in rec:
        args = ev.get("args") or []
        return len(args) >= 3 and args[0] == rec["fd"] and args[2] == rec["count"]
    return True


def test_libc_syscalls_through_gateway(target_bin, tmp_path):
    run = T.run_traced(target_bin("syscalls32", m32=True), tmp_path)
    pid = run.proc.pid
    assert len(run.record) == 20
    tid = run.record[0]["tid"]
    evs = [e for e in run.events if e["event"] == "syscall" and e["pid"] == pid and e["tid"] == tid]
    n = len(run.record)
    starts = [i for i in range(len(evs) - n + 1)
              if all(_matches(evs[i + k], run.record[k]) for k in range(n))]
    names = [(e.get("name"), e.get("args", [None])[:1], e.get("ret")) for e in evs]
    assert len(starts) == 1, (
        f"the run {[(r['name'], r['ret']) for r in run.record]} is not held contiguously "
        f"by the syscall events {names}; tracer stderr:\n{run.trace.stderr()}")


def test_fallbacks_show_nested_syscall(target_bin, tmp_path):
    """A 32-bit vDSO call that falls back calls __kernel_vsyscall: its system
    call appears as a `syscall` event of the same thread."""
    run = T.run_traced(target_bin("vcalls", m32=True), tmp_path, ["--rounds", "1"])
    for tid in {r["tid"] for r in run.record}:
        want = Counter(
            (r["func"], CLOCK_NUMBERS.get(r["clockid"], r["clockid"]), r["ret"])
            for r in run.record if r["tid"] == tid and r["fallback"])
        got = Counter(
            (e["name"], (e.get("args") or [None])[0], e["ret"])
            for e in run.events
            if e["event"] == "syscall" and e["tid"] == tid
            and e["name"] in ("clock_gettime", "clock_gettime64", "clock_getres"))
        assert got == want, f"thread {tid}: nested syscalls {got} != fallbacks {want}"
