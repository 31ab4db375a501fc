"""`--signals` and `--stack` on arm64, live (issue 13 items 4 and 5), in the emulated arm64
machine: one boot (tests/vm/inside_sigstack.py) for the module.

a64sigs (tests/targets/a64sigs.c) takes 25 SIGUSR1 deliveries whose handler records its
address, its restorer (x30: the vDSO's __kernel_rt_sigreturn, glibc sets no SA_RESTORER) and
the interrupted pc from its ucontext, then makes a forged rt_sigreturn (svc with x8 = 139 on
a getcontext() frame, no delivery). a64stack (a64stack.c, built with frame pointers and
without: CFI only) calls __kernel_clock_gettime from main -> level1 -> level2 -> level3,
directly and through glibc, with glibc's backtrace() of the chain as the oracle.

Checked twice: tracer.sigtrack / tracer.unwind on the live process under plain ptrace (the
"raw" part, no engine), and `vdsotrace trace --json --signals` / `--stack` (the "trace"
part). Deselected unless VDSOTRACE_VM=1."""
from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Iterator

import pytest

import targets as T

pytestmark = pytest.mark.arm64vm

INSIDE = Path(__file__).resolve().parent / "inside_sigstack.py"
SIGUSR1 = 10
BUILDS = tuple(T.A64STACK_VARIANTS)


@pytest.fixture(scope="module")
def run() -> Iterator[dict[str, Any]]:
    try:
        binaries = {"a64sigs": T.build_aarch64("a64sigs"),
                    **{v: T.build_aarch64_variant("a64stack", v, *f)
                       for v, f in T.A64STACK_VARIANTS.items()}}
    except T.BuildError as e:
        pytest.fail(str(e), pytrace=False)
    with tempfile.TemporaryDirectory(prefix="vdsotrace-vmsigstack-") as d:
        work = Path(d)
        for name, path in binaries.items():
            shutil.copy(path, work / name)
        r = subprocess.run([str(T.REPO / "scripts" / "vm"), "aarch64", "--timeout", "900",
                            "--with", str(work), "--", "python3", str(INSIDE), str(work)],
                           capture_output=True, timeout=1000)
        assert r.returncode == 0, r.stderr.decode(errors="replace")
        yield json.loads(r.stdout)


def addr(v: str | int) -> int:
    return v if isinstance(v, int) else int(v, 16)


def kinds(rec: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [r for r in rec if r["kind"] == kind]


# --------------------------------------------------------------------------- raw (no engine)

def test_sigtrack_live_on_25_deliveries_and_a_forged_return(run: dict[str, Any]) -> None:
    raw = run["raw"]["signals"]
    assert "error" not in raw, raw["error"]
    rec = raw["record"]
    dels, forge = kinds(rec, "delivery"), kinds(rec, "forge")[0]
    summary = kinds(rec, "summary")[0]
    assert summary["delivered"] == summary["sent"] == len(dels) == 25 and forge["reached"]
    assert summary["sa_restorer"] is False
    got = raw["tracker"]
    entries = [t for t in got if t is not None and t["kind"] == "delivery"]
    returns = [t for t in got if t is not None and t["kind"] == "sigreturn"]
    assert None not in got and len(entries) == 25 and len(returns) == 26
    for d, r in zip(entries, dels):
        assert (d["handler"], d["restorer"], d["resume_ip"], d["frame"]) == (
            addr(r["handler"]), addr(r["restorer"]), addr(r["interrupted_ip"]), addr(r["frame"]))
        assert d["restorer"] - addr(summary["vdso"]) == 0x820   # __kernel_rt_sigreturn
    for s, r in zip(returns, dels):
        assert (s["resume_ip"], s["signo"], s["anomaly"]) == (addr(r["interrupted_ip"]), SIGUSR1,
                                                              None)
    last = returns[-1]
    assert last["anomaly"] == "no-delivery" and last["signo"] is None
    assert (last["resume_ip"], last["frame"]) == (addr(forge["resume_ip"]), addr(forge["frame"]))


@pytest.mark.parametrize("build", BUILDS)
def test_unwind_live_matches_backtrace(run: dict[str, Any], build: str) -> None:
    raw = run["raw"]["stacks"][build]
    assert "error" not in raw, raw["error"]
    bt = [addr(a) for a in raw["record"][0]["backtrace"]]
    direct, via_libc = raw["stops"]
    assert f"{build}!level3+" in direct["names"][0], direct["names"]
    assert direct["unwound"][1:] == bt[1:], (direct["names"], bt)
    assert via_libc["names"][0].split()[1].startswith("libc.so.6!"), via_libc["names"]
    assert f"{build}!level3+" in via_libc["names"][1], via_libc["names"]
    assert via_libc["unwound"][2:] == bt[1:], (via_libc["names"], bt)


# --------------------------------------------------------------------------- vdsotrace

def check_signals(t: dict[str, Any], restorer: str, forged: bool) -> None:
    err = f"tracer: {t['tracer']}"
    assert t["target"]["rc"] == 0, (t["target"], err)
    assert t["tracer"]["rc"] == 0, err
    rec = t["record"]
    dels = kinds(rec, "delivery")
    summary = kinds(rec, "summary")[0]
    n = summary["delivered"]
    assert n == len(dels) == 25
    sig_evs = [e for e in t["events"] if e["event"] == "signal"]
    ret_evs = [e for e in t["events"] if e["event"] == "sigreturn"]
    assert len(sig_evs) == n and len(ret_evs) == n + forged, err
    for ev, r in zip(sig_evs, dels):
        assert ev["tid"] == r["tid"] and ev["signo"] == SIGUSR1 and ev["signame"] == "SIGUSR1"
        assert addr(ev["handler"]) == addr(r["handler"]), (ev, r)
        assert ev["handler_symbol"] == "handler", ev
        assert addr(ev["restorer"]) == addr(r["restorer"]), (ev, r)
        assert ev["restorer_symbol"] == restorer, ev
        assert addr(ev["resume_ip"]) == addr(r["interrupted_ip"]), (ev, r)
    for ev, r in zip(ret_evs, dels):
        assert addr(ev["resume_ip"]) == addr(r["interrupted_ip"]), (ev, r)
        assert ev["signo"] == SIGUSR1 and ev["anomaly"] is None, ev
        assert ev["via"] == restorer, ev
    if forged:
        forge = kinds(rec, "forge")[0]
        assert forge["reached"]
        last = ret_evs[-1]
        assert last["tid"] == forge["tid"] and last["anomaly"] == "no-delivery", last
        assert addr(last["resume_ip"]) == addr(forge["resume_ip"]) and last["signo"] is None
        assert last["via"] == "forge_sigreturn", last


def test_trace_signals(run: dict[str, Any]) -> None:
    """glibc's sigaction: no SA_RESTORER, handlers return through the vDSO."""
    t = run["trace"]["signals"]
    assert kinds(t["record"], "summary")[0]["sa_restorer"] is False
    check_signals(t, "__kernel_rt_sigreturn", forged=True)
    for r in kinds(t["record"], "delivery"):
        assert addr(r["restorer"]) - addr(kinds(t["record"], "summary")[0]["vdso"]) == 0x820


def test_trace_signals_own_restorer(run: dict[str, Any]) -> None:
    """SA_RESTORER with the program's own restorer: x30 is it, not the vDSO's."""
    t = run["trace"]["signals_own"]
    summary = kinds(t["record"], "summary")[0]
    assert summary["sa_restorer"] is True
    for r in kinds(t["record"], "delivery"):
        assert addr(r["restorer"]) == addr(summary["own_restorer"])
    check_signals(t, "a64_restorer", forged=False)


@pytest.mark.parametrize("build", BUILDS)
def test_trace_stack(run: dict[str, Any], build: str) -> None:
    t = run["trace"][build]
    err = f"tracer: {t['tracer']}"
    assert t["target"]["rc"] == 0 and t["tracer"]["rc"] == 0, (t["target"], err)
    rec = t["record"][0]
    bt = [addr(a) for a in rec["backtrace"]]
    calls = [e for e in t["events"] if e["event"] == "call" and e["func"] == "clock_gettime"]
    assert len(calls) == 2 * rec["calls"] == 6, err
    for i, ev in enumerate(calls):
        stack = ev["stack"]
        skip = 0 if i < rec["calls"] else 1          # direct first, then through glibc
        if skip:
            assert stack[0].split()[1].startswith("libc.so.6!"), stack
        assert f"{build}!level3+" in stack[skip], stack
        assert [addr(s.split()[0]) for s in stack[skip + 1:]] == bt[1:], (stack, bt)
        for name, s in zip(("level2", "level1", "main"), stack[skip + 1:]):
            assert f"{build}!{name}+" in s, stack


VDSO_SIZE = 0x2000                  # the arm64 [vdso] mapping (tests/fixtures/README.md)


def test_trace_signals_interrupting_the_vdso(run: dict[str, Any]) -> None:
    """A timer's signals interrupt __kernel_clock_gettime (untraced: -e gettimeofday); the
    handler returns through __kernel_rt_sigreturn into it, where the tracer names it."""
    t = run["trace"]["signals_vdso"]
    check_signals(t, "__kernel_rt_sigreturn", forged=False)
    vdso = addr(kinds(t["record"], "summary")[0]["vdso"])
    ret_evs = [e for e in t["events"] if e["event"] == "sigreturn"]
    inside = [(r, e) for r, e in zip(kinds(t["record"], "delivery"), ret_evs)
              if vdso <= addr(r["interrupted_ip"]) < vdso + VDSO_SIZE]
    assert inside, "no signal interrupted the vDSO"
    for r, e in inside:
        # (at its first instruction the name alone, as gdb and strace -k write it)
        sym = str(e["resume_symbol"])
        assert sym == "__kernel_clock_gettime" or sym.startswith("__kernel_clock_gettime+"), \
            (r, e)


def test_trace_signals_interrupting_traced_calls(run: dict[str, Any]) -> None:
    """The same with __kernel_clock_gettime traced: the signals interrupt its stub and body
    too; every handler returns where it interrupted, every call the program made (its own count)
    is traced, and returns 0."""
    t = run["trace"]["signals_stub"]
    check_signals(t, "__kernel_rt_sigreturn", forged=False)
    calls = [e for e in t["events"] if e["event"] == "call"]
    made = kinds(t["record"], "summary")[0]["calls"]
    assert made and len(calls) == made, (made, len(calls))
    assert all(e["func"] == "clock_gettime" and e["ret"] == 0 for e in calls), calls[:3]
