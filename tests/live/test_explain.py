"""Explaining calls (nested.c), through `python -m tracer trace`: each call's stack
(`--stack`) against the target's own backtrace(), `caller_symbol` and the -c call-site
table against the target's own counts, fallback reasons, the attach event's clocksource,
time-namespace offsets and namespace-relative values, and the exports never called."""
from __future__ import annotations

import os
import re
import subprocess
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import targets as T

pytestmark = pytest.mark.live

CLOCKSOURCE = Path("/sys/devices/system/clocksource/clocksource0/current_clocksource")
ABIS = [pytest.param(False, id="x86_64"), pytest.param(True, id="i386", marks=pytest.mark.i386)]
# direct mode of nested.c: __vdso_clock_gettime through a pointer, per function
DIRECT_COUNTS = {"direct_caller_a": 4, "direct_caller_b": 7, "direct_caller_c": 2}
NS_CLOCKS = {"CLOCK_MONOTONIC", "CLOCK_BOOTTIME"}
# "0x7f… object!symbol+0xoff" (or "0x7f… object+0xoff" where no symbol covers it)
FRAME = re.compile(r"^(0x[0-9a-f]+) (\S+?)(?:!(\S+?))?\+0x([0-9a-f]+)$")


# --------------------------------------------------------------------------- build

@dataclass(frozen=True)
class Variant:
    m32: bool
    omit_fp: bool

    @property
    def name(self) -> str:
        return f"nested-{'i386' if self.m32 else 'x86_64'}-{'nofp' if self.omit_fp else 'fp'}"

    @property
    def flags(self) -> list[str]:
        return [*(["-m32"] if self.m32 else []),
                "-fomit-frame-pointer" if self.omit_fp else "-fno-omit-frame-pointer"]


def build_nested(v: Variant) -> Path:
    """tests/targets/nested.c with -O1 -g -fno-inline and the variant's flags (rebuilt
    only when a source is newer); fails, never skips, when it cannot be built."""
    src = T.SRC_DIR / "nested.c"
    T.BUILD_DIR.mkdir(parents=True, exist_ok=True)
    out = T.BUILD_DIR / v.name
    stamp = max(p.stat().st_mtime for p in (src, *T.SRC_DIR.glob("*.h")))
    if out.exists() and out.stat().st_mtime >= stamp:
        return out
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    cmd = ["gcc", "-O1", "-g", "-fno-inline", "-Wall", *v.flags, "-o", str(tmp), str(src)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        tmp.unlink(missing_ok=True)
        hint = f"\n{T.M32_HINT}" if v.m32 else ""
        pytest.fail(f"{' '.join(cmd)} failed:\n{r.stderr}{hint}", pytrace=False)
    os.replace(tmp, out)
    return out


def nested(m32: bool = False) -> Path:
    return build_nested(Variant(m32, omit_fp=False))


# --------------------------------------------------------------------------- helpers

def _attach(events: list[dict[str, Any]], pid: int) -> dict[str, Any]:
    att = [e for e in events if e["event"] == "attach" and e.get("pid") == pid]
    assert len(att) == 1, f"expected one attach event for pid {pid}, got {att}"
    return att[0]


def _need_fast_path(attach: dict[str, Any]) -> None:
    # Which calls fall back holds only with a clocksource the vDSO can read.
    if attach.get("vdso_fast_path") is False:
        pytest.skip(f"clocksource {attach.get('clocksource')!r} has no vDSO fast path")


def _calls(events: list[dict[str, Any]], pid: int) -> list[dict[str, Any]]:
    return [e for e in events if e["event"] == "call" and e["pid"] == pid]


def _by_value(calls: list[dict[str, Any]]) -> dict[tuple[Any, ...], dict[str, Any]]:
    """Call events keyed by what they wrote: (clockid, tv_sec, tv_nsec) is unique per call."""
    out = {}
    for ev in calls:
        tp = (ev.get("out") or {}).get("tp")
        if isinstance(tp, dict):
            out[(ev["args"].get("clockid"), tp["tv_sec"], tp["tv_nsec"])] = ev
    return out


def _frame(text: str) -> tuple[int, str, str | None, int]:
    m = FRAME.match(text)
    assert m, f"stack frame {text!r} is not `0x… object!symbol+0xoff`"
    return int(m[1], 16), m[2], m[3], int(m[4], 16)


def _site_symbol(site: str) -> str:
    """`obj!func+0x1f` (or `0x… obj!func+0x1f`) -> `func`."""
    s = site.split()[-1]
    s = s.split("!", 1)[1] if "!" in s else s
    return s.rsplit("+", 1)[0]


def _run_text(binary: Path, tmp: Path, mode: str, trace_args: list[str],
              name: str = "run") -> tuple[T.Proc, T.Trace, list[dict[str, Any]], str]:
    """Like T.run_traced, for text output (no attach event to wait for)."""
    rec = tmp / f"{name}.record.jsonl"
    proc = T.start(binary, rec, mode)
    before = T.read_vdso(proc.pid)
    tr = T.run_trace(["-p", str(proc.pid), *trace_args], tmp / f"{name}.out.txt",
                     json_events=False, wait_attach=False)
    T.wait_traced(proc.pid, before)
    T.go(proc)
    rc, _, err = proc.finish(20)
    assert rc == 0, f"target exited {rc} under the tracer: {err!r}; tracer stderr:\n{tr.stderr()}"
    tr.wait_ok(10)
    return proc, tr, T.read_record(rec), tr.out.read_text()


def _section(text: str, title: str) -> list[str]:
    """The indented lines under a `title:` line of the -c report."""
    lines = text.splitlines()
    idx = next((i for i, ln in enumerate(lines) if ln.strip() == title), None)
    assert idx is not None, f"no {title!r} section in the -c report:\n{text}"
    out = []
    for ln in lines[idx + 1:]:
        if not ln.startswith(" "):
            break
        out.append(ln)
    return out


def _site_counts(lines: list[str], func: str) -> dict[str, int]:
    """From the "hottest call sites:" section: {site symbol: calls} under `  func:`."""
    counts: dict[str, int] = {}
    inside = False
    for ln in lines:
        if re.match(r"^  \S.*:$", ln):
            inside = ln.strip() == f"{func}:"
            continue
        if inside:
            m = re.match(r"^\s+(\d+) calls\s+[\d.]+ s\s+(\S.*)$", ln)
            assert m, f"unexpected call-site line {ln!r}"
            sym = _site_symbol(m[2])
            counts[sym] = counts.get(sym, 0) + int(m[1])
    return counts


# --------------------------------------------------------------------------- stacks

STACK_VARIANTS = [
    pytest.param(Variant(m32, fp), id=Variant(m32, fp).name.removeprefix("nested-"),
                 marks=[pytest.mark.i386] if m32 else [])
    for m32 in (False, True) for fp in (False, True)
]
CHAINS = {"inner_mono": ["inner_mono", "middle", "outer", "run_stack", "main"],
          "inner_real": ["inner_real", "outer", "run_stack", "main"]}


@pytest.mark.parametrize("variant", STACK_VARIANTS)
def test_stack_equals_own_backtrace(tmp_path, variant):
    """`--stack --json`: past the C library's frames, each call's stack is the return
    address into the calling function and then the return addresses backtrace() saw
    there, each frame named `binary!function+0xoff`."""
    binary = build_nested(variant)
    run = T.run_traced(binary, tmp_path, ["stack"], ["--stack"])
    _need_fast_path(_attach(run.events, run.proc.pid))
    calls = _calls(run.events, run.proc.pid)
    by_value = _by_value(calls)
    assert len(run.record) == 6, run.record
    assert len(calls) == len(run.record), (
        f"{len(calls)} call events for {len(run.record)} calls: {calls}")
    for rec in run.record:
        key = (rec["clockid"], rec["tv_sec"], rec["tv_nsec"])
        ev = by_value.get(key)
        assert ev is not None, f"no call event wrote {key}; events: {calls}"
        assert ev["func"] == rec["func"], (ev["func"], rec)
        stack = ev.get("stack")
        assert isinstance(stack, list) and stack, f"no stack in {ev}"
        frames = [_frame(s) for s in stack]
        addrs = [f[0] for f in frames]
        own = [T.addr(a) for a in rec["bt"]]
        fn = {k: T.addr(v) for k, v in rec["fn"].items()}

        # innermost: the C library's clock_gettime (and __clock_gettime64 on i386)
        first = next((i for i, f in enumerate(frames) if f[1] == binary.name), None)
        assert first is not None, f"no frame in {binary.name}: {stack}"
        assert 1 <= first <= 2, f"expected 1-2 libc frames before the target's: {stack}"
        assert all(f[1] == "libc.so.6" for f in frames[:first]), stack
        assert frames[0][2] in ("clock_gettime", "__clock_gettime64", "__clock_gettime"), stack
        assert ev["caller_symbol"] == f"{frames[0][1]}!{frames[0][2]}+{frames[0][3]:#x}", (
            ev["caller_symbol"], stack[0])

        # then the return address into the calling function, after its backtrace() call
        caller = rec["caller"]
        ret_into = addrs[first]
        assert fn[caller] < ret_into and ret_into > own[0], (
            f"frame {stack[first]} is not a return into {caller} after its backtrace() "
            f"(function at {fn[caller]:#x}, backtrace()'s return {own[0]:#x})")
        # ... and from there exactly the target's own return addresses
        assert addrs[first + 1:] == own[1:], (
            f"{caller}: traced stack past libc {[hex(a) for a in addrs[first:]]} != "
            f"return into {caller} + backtrace()[1:] {[hex(a) for a in own[1:]]}\n"
            f"stack: {stack}")

        # the frames name the target's functions, at the right offsets
        chain = CHAINS[caller]
        named = frames[first:first + len(chain)]
        assert [f[2] for f in named] == chain, f"expected {chain}: {stack}"
        for (a, obj, sym, off) in named:
            assert obj == binary.name and sym is not None
            assert a - fn[sym] == off, f"{stack}: {sym}+{off:#x} but {a:#x} - {fn[sym]:#x}"


# --------------------------------------------------------------------------- callers

@pytest.mark.parametrize("m32", ABIS)
def test_direct_caller_symbol(tmp_path, m32):
    """A call through a pointer to __vdso_clock_gettime: `caller_symbol` is the calling
    function, `binary!direct_caller_b+0xoff`, and the calls equal the record."""
    binary = nested(m32)
    run = T.run_traced(binary, tmp_path, ["direct"])
    _need_fast_path(_attach(run.events, run.proc.pid))
    calls = _calls(run.events, run.proc.pid)
    T.compare_calls(calls, run.record, "direct")
    assert Counter(r["caller"] for r in run.record) == DIRECT_COUNTS
    for ev, rec in zip(calls, run.record):
        caller = T.addr(ev["caller_addr"])
        off = caller - T.addr(rec["caller_addr"])
        assert 0 < off < 0x200, (ev, rec)
        want = f"{binary.name}!{rec['caller']}+{off:#x}"
        assert ev["caller_symbol"] == want, (
            f"call {rec['seq']}: caller_symbol {ev['caller_symbol']!r}, expected {want!r}")
        assert ev["caller"].startswith(f"{caller:#x} "), ev["caller"]
        assert ev["fallback_reason"] is None, ev


def _check_unused(unused: set[str], functions: list[str], called: set[str], m32: bool) -> None:
    # On i386 __kernel_vsyscall is traced by default and the target's own system calls
    # (writing its record, exiting) go through it.
    maybe = {"__kernel_vsyscall"} if m32 else set()
    want = set(functions) - called
    assert want - maybe <= unused <= want, (
        f"never called: {sorted(unused)}; traced {functions}, called {sorted(called)}")
    if not m32:
        assert {"getcpu", "getrandom", "gettimeofday", "time", "clock_getres"} <= unused


@pytest.mark.parametrize("m32", ABIS)
def test_call_site_table_text(tmp_path, m32):
    """`-c` (text): "hottest call sites" counts per calling function equal the target's
    own counts; "never called during the trace" lists the rest of the vDSO."""
    binary = nested(m32)
    _, _, record, text = _run_text(binary, tmp_path, "direct", ["-c"])
    want = Counter(r["caller"] for r in record)
    assert want == DIRECT_COUNTS
    got = _site_counts(_section(text, "hottest call sites:"), "clock_gettime")
    assert got == want, f"call sites {got} != the target's counts {dict(want)}\n{text}"

    line = next((ln for ln in text.splitlines()
                 if ln.startswith("never called during the trace:")), None)
    assert line is not None, f"no 'never called during the trace:' line:\n{text}"
    unused = {w.strip() for w in line.split(":", 1)[1].split(",") if w.strip()}
    m = re.search(r"; tracing (.*) ---$", text.splitlines()[0])
    assert m, f"first line is not the attach line: {text.splitlines()[0]!r}"
    functions = [w.strip() for w in m[1].split(",")]
    _check_unused(unused, functions, {"clock_gettime"}, m32)


@pytest.mark.parametrize("m32", ABIS)
def test_call_site_table_json(tmp_path, m32):
    """`-c --json`: the final summary object's `call_sites` of clock_gettime, per
    calling function, equal the target's own counts; `unused` lists the rest."""
    binary = nested(m32)
    run = T.run_traced(binary, tmp_path, ["direct"], ["-c"])
    attach = _attach(run.events, run.proc.pid)
    assert not _calls(run.events, run.proc.pid), "-c writes no call events"
    summaries = [e for e in run.events if e["event"] == "summary"]
    assert len(summaries) == 1 and run.events[-1] is summaries[0], run.events
    s = summaries[0]
    fn = {f["func"]: f for f in s["functions"]}
    assert fn["clock_gettime"]["calls"] == sum(DIRECT_COUNTS.values()), fn["clock_gettime"]
    assert fn["clock_gettime"]["fallbacks"] == 0
    got: dict[str, int] = {}
    for site in fn["clock_gettime"]["call_sites"]:
        sym = _site_symbol(site["site"])
        got[sym] = got.get(sym, 0) + site["calls"]
    assert got == Counter(r["caller"] for r in run.record) == DIRECT_COUNTS, (
        fn["clock_gettime"]["call_sites"])
    _check_unused(set(s["unused"]), attach["functions"], {"clock_gettime"}, m32)


# --------------------------------------------------------------------------- fallbacks

@pytest.mark.parametrize("m32", ABIS)
def test_fallback_reasons(tmp_path, m32):
    """CLOCK_PROCESS_CPUTIME_ID -> cpu-time-clock, getrandom without state ->
    getrandom-no-state, null on served calls; the attach event's clocksource is the
    sysfs one, with a fast path for tsc."""
    run = T.run_traced(nested(m32), tmp_path, ["fallback"])
    attach = _attach(run.events, run.proc.pid)
    sysfs = CLOCKSOURCE.read_text().strip()
    assert attach["clocksource"] == sysfs
    if sysfs == "tsc":
        assert attach["vdso_fast_path"] is True, attach
    _need_fast_path(attach)
    calls = _calls(run.events, run.proc.pid)
    T.compare_calls(calls, run.record, "fallback")   # func, args, ret, out, fallback, reason
    reasons = [(e["func"], e["args"].get("clockid"), e["fallback"], e["fallback_reason"])
               for e in calls]
    want = [("clock_gettime", "CLOCK_MONOTONIC", False, None),
            ("clock_gettime", "CLOCK_PROCESS_CPUTIME_ID", True, "cpu-time-clock"),
            ("clock_gettime", "CLOCK_REALTIME", False, None),
            *([] if m32 else [("getrandom", None, True, "getrandom-no-state")]),
            ("clock_gettime", "CLOCK_PROCESS_CPUTIME_ID", True, "cpu-time-clock")]
    assert reasons == want
    for e in calls:
        assert "fallback_reason" in e and (e["fallback_reason"] is None) == (not e["fallback"])


def test_fallback_reasons_summary(tmp_path):
    """`-c`: "fallbacks by reason" counts them per function."""
    _, _, _, text = _run_text(nested(), tmp_path, "fallback", ["-c"])
    lines = [ln.strip() for ln in _section(text, "fallbacks by reason:")]
    assert "clock_gettime: cpu-time-clock 2" in lines, text
    assert "getrandom: getrandom-no-state 1" in lines, text


# --------------------------------------------------------------------------- time namespaces

UNSHARE = ["unshare", "-T", "--monotonic", "1000", "--boottime", "2000", "--fork"]
OFFSETS = {"monotonic": [1000, 0], "boottime": [2000, 0]}


def _host_clocks() -> dict[str, float]:
    return {"CLOCK_MONOTONIC": time.clock_gettime(time.CLOCK_MONOTONIC),
            "CLOCK_BOOTTIME": time.clock_gettime(time.CLOCK_BOOTTIME)}


def _start_in_timens(binary: Path, record: Path, reaper: T.Reaper,
                     mode: str = "timens") -> tuple[subprocess.Popen[bytes], int]:
    """`unshare -T ... --fork BINARY RECORD MODE` in its own process group; returns
    (the unshare process, the target's pid from its ready line)."""
    p = subprocess.Popen([*UNSHARE, str(binary), str(record), mode], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    reaper.add(p, group=True)
    assert p.stdout is not None
    line = p.stdout.readline().decode()
    if not line.startswith("ready "):
        _, err = p.communicate(timeout=5)
        if b"unshare" in err and p.returncode not in (0, None):
            pytest.skip(f"cannot create a time namespace here: {err.decode().strip()}")
        pytest.fail(f"no ready line from {binary} under unshare: {line!r} {err!r}")
    pid = int(line.split()[1])
    assert pid != p.pid
    return p, pid


def _check_ns_calls(calls: list[dict[str, Any]], record: list[dict[str, Any]],
                    before: dict[str, float], after: dict[str, float]) -> None:
    T.compare_calls(calls, record, "time namespace")
    for ev in calls:
        clk = ev["args"]["clockid"]
        if ev["func"] == "clock_getres":
            # a resolution is the same in every namespace: nothing to mark
            assert not ev.get("ns_relative", False), f"clock_getres({clk}) marked ns_relative: {ev}"
            continue
        assert ev.get("ns_relative", False) is (clk in NS_CLOCKS), (
            f"{clk}: ns_relative {ev.get('ns_relative')!r}")
        if clk in NS_CLOCKS:
            off = OFFSETS["monotonic" if clk == "CLOCK_MONOTONIC" else "boottime"][0]
            tp = ev["out"]["tp"]
            v = tp["tv_sec"] + tp["tv_nsec"] / 1e9
            # the namespace's clock is the host's plus the offset (1 s of slack each way)
            assert before[clk] + off - 1 <= v <= after[clk] + off + 1, (clk, v, before, after)


def _traced_in_timens(tmp_path: Path, reaper: T.Reaper, m32: bool,
                      mode: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]],
                                          dict[str, float], dict[str, float], int]:
    """Start nested MODE in the time namespace, `trace -p` it (JSON), run it;
    (events, record, host clocks before, after, pid)."""
    rec = tmp_path / "r.jsonl"
    before = _host_clocks()
    p, pid = _start_in_timens(nested(m32), rec, reaper, mode)
    tr = T.run_trace(["-p", str(pid)], tmp_path / "ev.jsonl")
    assert p.stdin is not None
    p.stdin.write(b"g")
    p.stdin.close()
    assert p.wait(timeout=20) == 0, p.stderr.read() if p.stderr else ""
    tr.wait_ok(10)
    after = _host_clocks()
    return tr.events(), T.read_record(rec), before, after, pid


@pytest.mark.parametrize("m32", ABIS)
def test_time_namespace_attached(tmp_path, reaper, m32):
    """`trace -p` of a process inside `unshare -T --monotonic 1000 --boottime 2000`:
    the offsets in its attach event, MONOTONIC/BOOTTIME values ~1000/2000 s ahead of the
    host's and marked "ns_relative": true, REALTIME not marked."""
    events, record, before, after, pid = _traced_in_timens(tmp_path, reaper, m32, "timens")
    attach = _attach(events, pid)
    assert attach["timens_offsets"] == OFFSETS, attach
    _need_fast_path(attach)
    _check_ns_calls(_calls(events, pid), record, before, after)


def test_time_namespace_getres_not_marked(tmp_path, reaper):
    """clock_getres(CLOCK_MONOTONIC) in a time namespace: a resolution, not a point on
    the namespace's clock, so not namespace-relative (only clock_gettime's values are)."""
    events, record, before, after, pid = _traced_in_timens(tmp_path, reaper, False,
                                                           "timens-res")
    _need_fast_path(_attach(events, pid))
    calls = _calls(events, pid)
    assert [e["func"] for e in calls] == ["clock_gettime", "clock_getres", "clock_getres"]
    _check_ns_calls(calls, record, before, after)


def test_time_namespace_text(tmp_path, reaper):
    """Text output: namespace-relative values carry `/* time namespace */`, others not;
    the attach line names the offsets."""
    rec = tmp_path / "r.jsonl"
    p, pid = _start_in_timens(nested(), rec, reaper)
    vdso_before = T.read_vdso(pid)
    tr = T.run_trace(["-p", str(pid)], tmp_path / "out.txt", json_events=False,
                     wait_attach=False)
    T.wait_traced(pid, vdso_before)
    assert p.stdin is not None
    p.stdin.write(b"g")
    p.stdin.close()
    assert p.wait(timeout=20) == 0
    tr.wait_ok(10)
    lines = tr.out.read_text().splitlines()
    assert "time namespace offsets monotonic 1000s 0ns, boottime 2000s 0ns" in lines[0], lines[0]
    record = T.read_record(rec)
    for r in record:
        needle = f"({r['clockid']}, {{tv_sec={r['tv_sec']}, tv_nsec={r['tv_nsec']}}}"
        line = next((ln for ln in lines if needle in ln), None)
        assert line is not None, f"no line with {needle!r} in:\n" + "\n".join(lines)
        assert ("/* time namespace */" in line) == (r["clockid"] in NS_CLOCKS), line


def test_time_namespace_spawned(tmp_path):
    """`trace -f -- unshare -T ... --fork TARGET`: the tracer starts unshare and follows
    its child into the namespace. The child's calls are namespace-relative, and the
    offsets are announced for it (an attach event of its own)."""
    rec = tmp_path / "r.jsonl"
    before = _host_clocks()
    tr = T.run_trace(["-f", "--", *UNSHARE, str(nested()), str(rec), "timens"],
                     tmp_path / "ev.jsonl", stdin=subprocess.PIPE)
    assert tr.popen.stdin is not None
    tr.popen.stdin.write(b"g")
    tr.popen.stdin.close()
    tr.wait_ok(20)
    after = _host_clocks()
    events = tr.events()
    m = re.match(r"ready (\d+)\n", tr.stdout())
    assert m, tr.stdout()
    pid = int(m[1])
    root = [e for e in events if e["event"] == "attach" and e["pid"] != pid]
    assert len(root) == 1 and root[0]["timens_offsets"] is None, root   # unshare itself
    _need_fast_path(root[0])
    _check_ns_calls(_calls(events, pid), T.read_record(rec), before, after)
    # The target lives in the namespace: its offsets must show in an attach event.
    mine = [e for e in events if e["event"] in ("attach", "exec") and e["pid"] == pid
            and e.get("timens_offsets") is not None]
    assert mine and all(e["timens_offsets"] == OFFSETS for e in mine), (
        "no attach (or exec) event for the followed child in the time namespace carries "
        f"its timens_offsets; events for pid {pid}: "
        f"{[e for e in events if e['pid'] == pid and e['event'] != 'call']}")
