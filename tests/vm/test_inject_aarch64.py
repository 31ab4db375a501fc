"""--inject on arm64, live (issue 14 items 1-4): inside the emulated arm64 machine the
recorder (tracer.inject.Recorder) is installed into a 2-thread arm64 program
(tests/targets/a64inj.c) by remote system calls from its vDSO's `svc #0`, both threads make
their calls (through the vDSO's symbols and through libc; clocks the vDSO answers and clocks it
hands to the kernel), the tracer drains the ring while they run, then leaves while both block
in read(2). Checked: the two mappings as on x86 (`/memfd:vdsotrace-code` r-xs within a `b` of
the vDSO, `/memfd:vdsotrace-ring` rw-s), every thread's registers and pending system call kept
across install and leaving, the entries patched with `b stub` and restored byte for byte,
both mappings gone after, the program's own record of every call equal to the ring's (in order
per thread, same arguments, results, written bytes and fallback flags), and its normal exit.

One boot for the module (tests/vm/inside_inject.py); deselected unless VDSOTRACE_VM=1."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterator

import pytest

import targets as T

pytestmark = pytest.mark.arm64vm

INSIDE = Path(__file__).resolve().parent / "inside_inject.py"
B_REACH = 1 << 27
PSTATE_SS = 1 << 21     # PSTATE.SS: the kernel's single-step state, set while TIF_SINGLESTEP is
# (arch/arm64/kernel/ptrace.c user_regs_reset_single_step: a stopped thread that was
# single-stepped reads SS set until its next PTRACE_CONT clears it; not a register of the
# program's)
# the calls the vDSO hands to the kernel (a64inj.c): CPU-time clocks, an invalid clock
CPUTIME = {2, 3}


@pytest.fixture(scope="module")
def run() -> Iterator[dict[str, Any]]:
    with T.boot_aarch64("a64inj", INSIDE, "vdsotrace-vminject-") as (out, _):
        assert "error" not in out, out["error"]
        yield out


def maps(text: str) -> list[tuple[int, int, str, str]]:
    out = []
    for line in text.splitlines():
        f = line.split(None, 5)
        lo, hi = (int(x, 16) for x in f[0].split("-"))
        out.append((lo, hi, f[1], f[5] if len(f) > 5 else ""))
    return out


def one(ms: list[tuple[int, int, str, str]], name: str) -> tuple[int, int, str, str]:
    hits = [m for m in ms if name in m[3]]
    assert len(hits) == 1, (name, hits)
    return hits[0]


def same_state(pair: list[dict[str, Any]]) -> bool:
    before, after = pair
    for tid in before:
        b, a = before[tid], after[tid]
        if b["syscallno"] != a["syscallno"]:
            return False
        rb, ra = list(b["regs"]), list(a["regs"])
        rb[-1] &= ~PSTATE_SS
        ra[-1] &= ~PSTATE_SS
        if rb != ra:
            return False
    return True


def test_injected_mappings_are_named_and_placed_as_on_x86(run: dict[str, Any]) -> None:
    ms = maps(run["maps_installed"])
    vdso = one(ms, "[vdso]")
    code = one(ms, "/memfd:vdsotrace-code")
    ring = one(ms, "/memfd:vdsotrace-ring")
    assert code[2] == "r-xs" and ring[2] == "rw-s"
    assert code[0] == run["code_addr"] and ring[0] == run["ring_addr"]
    assert code[1] - code[0] == 16384 and ring[1] - ring[0] == 4096 + 65536 * 128
    # a single `b` reaches every stub from every entry
    for s in run["stubs"]:
        assert code[0] <= s["stub"] < code[1]
        assert abs(s["stub"] - s["func_addr"]) < B_REACH
        assert vdso[0] <= s["func_addr"] < vdso[1]
    assert not any("/memfd:vdsotrace" in m[3] for m in maps(run["maps_before"]))


def test_entries_are_b_to_their_stubs(run: dict[str, Any]) -> None:
    for (at, word), s in zip(run["entries"], run["stubs"]):
        w = int.from_bytes(bytes.fromhex(word), "little")
        assert w & 0xFC000000 == 0x14000000                      # b imm26
        off = w & 0x3FFFFFF
        off = off - (1 << 26) if off >> 25 else off
        assert at + 4 * off == s["stub"]
    assert len(run["entries"]) == len(run["funcs"])


def test_registers_and_pending_system_calls_kept(run: dict[str, Any]) -> None:
    """Installing (remote system calls in the first thread) and leaving (its munmaps) put back
    every register and regs->syscallno; leaving happens while both threads block in read(2),
    which goes on afterwards (the program got its quit byte and exited 0)."""
    assert same_state(run["state_install"])
    assert same_state(run["state_uninstall"])
    assert run["target"]["rc"] == 0, run["target"]["stderr"]


def test_leaving_restores_the_vdso_and_unmaps_both(run: dict[str, Any]) -> None:
    assert run["vdso_restored"] and run["detached"]
    assert not run["code_page_kept"] and not run["ring_kept"]
    assert not any("/memfd:vdsotrace" in m[3] for m in maps(run["maps_after"]))
    assert run["lost"] == 0 and run["corrupt"] == 0


def _program_calls(text: str) -> dict[int, list[dict[str, Any]]]:
    by_tid: dict[int, list[dict[str, Any]]] = {}
    for line in text.splitlines():
        tid, fn, a0, a1, ret, o0, o1 = line.split()
        if fn == "gettimeofday":
            args = [int(a0, 16), int(a1, 16)]
        elif fn == "getrandom":
            args = [int(a0, 16), int(a1)]
        else:
            args = [int(a0), int(a1, 16)]
        by_tid.setdefault(int(tid), []).append(
            {"func": fn, "args": args, "ret": int(ret),
             "outs": [None if o == "-" else o for o in (o0, o1)]})
    return by_tid


@pytest.mark.parametrize("stubs", ["lse", "llsc"])
def test_every_call_recorded_exactly(run: dict[str, Any], stubs: str) -> None:
    """Both threads' calls, in order per thread, with their arguments, results, written bytes
    and fallback flags, as the program recorded them: with the stubs for LSE (cas) and, on
    the same CPU, those for a CPU without (ldxr/stxr claims)."""
    if stubs == "llsc":
        run = run["llsc"]
        assert "error" not in run, run["error"]
        assert run["vdso_restored"] and run["target"]["rc"] == 0
        assert run["lost"] == 0 and run["corrupt"] == 0
    prog = _program_calls(run["record"])
    assert sorted(prog) == sorted(run["tids"])
    # every function, getrandom (paciasp at its entry) included
    assert {c["func"] for calls in prog.values() for c in calls} == set(run["funcs"])
    got: dict[int, list[dict[str, Any]]] = {}
    for r in run["records"]:
        got.setdefault(r["tid"], []).append(r)
    assert sorted(got) == sorted(prog)
    for tid, calls in prog.items():
        recs = got[tid]
        assert len(recs) == len(calls), tid
        for k, (c, r) in enumerate(zip(calls, recs)):
            where = (tid, k, c, r)
            assert r["func"] == c["func"], where
            # (an int argument's register above bit 31 is not the program's)
            args = [r["args"][0] & 0xFFFFFFFF, r["args"][1]] if c["func"] not in (
                "gettimeofday", "getrandom") else r["args"][:2]
            assert args == c["args"], where
            ret = r["ret"] - (1 << 64) if r["ret"] >> 63 else r["ret"]
            assert ret == c["ret"], where
            outs = [o for o in r["outs"]] + [None] * (2 - len(r["outs"]))
            if c["func"] == "gettimeofday" and c["args"][1] == 0:
                outs[1] = None
            if c["func"] in ("clock_gettime", "clock_getres"):
                outs = outs[:1] + [None]
            if c["func"] == "getrandom":
                outs = [None, None]         # (its bytes are never recorded)
            assert outs == c["outs"], where
            clk = c["args"][0]
            if c["func"] == "clock_gettime":
                want_fb = clk in CPUTIME or clk >= 100
            elif c["func"] == "clock_getres":
                want_fb = clk in CPUTIME
            elif c["func"] == "getrandom":
                want_fb = True              # no opaque state: its system call
            else:
                want_fb = False
            assert r["fallback"] is want_fb, where
            assert r["dur"] >= 0 and r["t"] > 0
        # entry times in order per thread
        ts = [r["t"] for r in recs]
        assert ts == sorted(ts)


def test_callers_are_the_programs_code(run: dict[str, Any]) -> None:
    ms = maps(run["maps_installed"])
    text = [m for m in ms if m[2] == "r-xp" and re.search(r"(a64inj|libc\.so)", m[3])]
    for r in run["records"]:
        assert any(lo <= r["caller"] < hi for lo, hi, _, _ in text), hex(r["caller"])


def test_refused_under_seccomp_and_with_a_sealed_vdso(run: dict[str, Any]) -> None:
    """One line each, suggesting the stop-based engine; nothing of ours left; the program
    runs on (a filter of its own, an mseal(2)ed vDSO)."""
    sc = run["refusals"]["--seccomp"]
    assert "error" not in sc, sc["error"]
    assert "seccomp" in sc["refused"] and sc["refused"].endswith("run without --inject")
    seal = run["refusals"]["--seal"]
    assert "error" not in seal, seal["error"]
    assert seal["ready"][3] == "0", "mseal of the vDSO failed in the program"
    assert "sealed" in seal["refused"] and seal["refused"].endswith("run without --inject")
    for r in (sc, seal):
        assert "\n" not in r["refused"] and "installed" not in r
        assert r["untouched"] and r["target"]["rc"] == 0, r["target"]["stderr"]


def test_leaving_threads_stopped_anywhere_in_the_recorder(run: dict[str, Any]) -> None:
    """Ten attach/install/leave cycles on a program whose two threads call clock_gettime
    without pause: each leaves with threads stopped in the stubs or copies (where they spend
    their time), takes them out, restores the vDSO byte for byte and unmaps the pages; in the
    "signal" cycles the second thread's handler is blocked while we leave, and the code page
    stays (with its notice) exactly when the pc it interrupted is in it, the ring when that pc
    is in a ring-writing window; the handler then returns there. The program never fails a
    call nor sees time go back, and exits 0. Lossless while the tracer beats (the ring filled in "wait" and nothing was
    lost); a silent tracer or --lossy counts what the full ring refused, with its notice."""
    sp = run["spin"]
    assert "error" not in sp, sp["error"]
    cycles = sp["cycles"]
    assert [c["mode"] for c in cycles] == ["drain", "drain", "wait", "silent", "lossy", "drain",
                                           "signal", "signal", "signal", "drain"]
    assert any("code" in c["pcs"].values() for c in cycles)
    for c in cycles:
        if c["mode"] != "signal":
            # threads stopped in a stub or copy were taken out: nothing of ours stays
            assert not c["code_page_kept"], c.get("why_kept")
        assert c["vdso_restored"], c
        if c["mode"] != "signal":
            assert c["corrupt"] == 0 and not c["ring_kept"], c
        else:
            # (at most the slot the handler's thread claimed and had not committed)
            assert c["corrupt"] <= (1 if c["ring_kept"] else 0), c
        assert c["records"] > 0, c
        mine = [m for m in c["memfd_left"] if int(m.split("-")[0], 16) in
                (c["code_addr"], c["ring_addr"])]
        if c["code_page_kept"]:
            assert any("code page stays mapped" in n for n in c["notices"]), c
            assert [m for m in mine if "vdsotrace-code" in m], c
        else:
            assert not mine, c
    by = {c["mode"]: c for c in cycles}
    assert by["wait"]["head"] == 65536
    for c in cycles:
        if c["mode"] in ("drain", "wait", "signal") and c["lost"]:
            # lossless unless the tracer itself could not run for longer than the stubs
            # wait (the emulated machine shares a loaded host): then the notice says so
            silent = [float(re.search(r"silent for up to ([0-9.]+) s", n).group(1))
                      for n in c["notices"] if "silent for up to" in n]
            assert silent and silent[0] >= 0.5, c
    for mode in ("silent", "lossy"):
        assert by[mode]["head"] == 65536 and by[mode]["lost"] > 0
        assert any(f"{by[mode]['lost']} calls were not recorded" in n for n in by[mode]["notices"])
    assert sp["target"]["rc"] == 0, sp["target"]["stderr"]
    for c in cycles:
        if c["mode"] != "signal":
            continue
        # the handler blocked while the recorder left: what it interrupted decides what stays
        in_code = c["code_addr"] <= c["sig_pc"] < c["code_addr"] + 16384
        in_window = any(lo <= c["sig_pc"] < hi for lo, hi in c["windows"])
        assert c["code_page_kept"] == in_code, c
        assert c["ring_kept"] == in_window, c
        assert c["released"] == "released"          # it returned there and ran on
    spin, calls, failed, backwards = sp["record"].split()
    assert spin == "spin" and int(calls) > sum(c["records"] for c in cycles)
    assert failed == "0" and backwards == "0"


def test_counter_frequency(run: dict[str, Any]) -> None:
    """The stubs' cntvct_el0 ticks at cntfrq_el0 (62.5 MHz in the machine: 16 ns); the
    tracer's conversion, calibrated against CLOCK_MONOTONIC, agrees with it."""
    f = run["cntfrq"]
    assert f > 0
    assert abs(run["ns_per_tick"] * f / 1e9 - 1) < 0.02, (run["ns_per_tick"], f)


def test_trace_inject_cli_exact(run: dict[str, Any]) -> None:
    """`vdsotrace trace -p PID --inject --json` (the engine with the arm64 recorder): every call
    of both threads as a `call` event, in order per thread, with the pointer argument, result,
    fallback flag and written values the program recorded; the vDSO restored and nothing of
    ours left after SIGINT; the program exits 0."""
    c = run["cli"]
    assert "error" not in c, (c["error"], c["stderr"])
    assert c["tracer_rc"] == 0 and c["vdso_restored"] and not c["memfd_left"], c["stderr"]
    assert c["target"]["rc"] == 0, c["target"]["stderr"]
    assert not [e for e in c["events"] if e["event"] == "notice"]
    prog = _program_calls(c["record"])
    got: dict[int, list[dict[str, Any]]] = {}
    for e in c["events"]:
        if e["event"] == "call":
            got.setdefault(e["tid"], []).append(e)
    assert sorted(got) == sorted(prog)
    for tid, calls in prog.items():
        assert len(got[tid]) == len(calls)
        for k, (p, e) in enumerate(zip(calls, got[tid])):
            where = (tid, k, p, e)
            assert e["func"] == p["func"] and e["ret"] == p["ret"], where
            ptr = list(e["args"].values())[0 if p["func"] in ("gettimeofday", "getrandom")
                                           else 1]
            assert int(ptr, 16) == p["args"][0 if p["func"] in ("gettimeofday", "getrandom")
                                             else 1], where
            clk = p["args"][0]
            want_fb = (p["func"] == "getrandom"
                       or (p["func"] == "clock_gettime" and (clk in CPUTIME or clk >= 100))
                       or (p["func"] == "clock_getres" and clk in CPUTIME))
            assert e["fallback"] is want_fb, where
            if p["outs"][0] is not None:
                raw = bytes.fromhex(p["outs"][0])
                vals = [int.from_bytes(raw[i:i + 8], "little", signed=True) for i in (0, 8)]
                first = list(e["out"].values())[0]
                assert list(first.values()) == vals, where
