"""Text for the console's reports: `bt`, `callers`, `why`, `info threads`, `x`. The engine
answers with records (tracer.engine.control); names in them come from the tracee (its files,
symbols, comm): every line is escaped here."""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from tracer.render.escape import escape_text

if TYPE_CHECKING:
    from tracer.engine.control import Backtrace, Explanation
    from tracer.session import Summary

__all__ = ["backtrace_lines", "callers_lines", "why_lines", "ThreadRow", "threads_text",
           "hexdump"]


def _escaped(lines: Iterable[str]) -> list[str]:
    return [escape_text(ln) for ln in lines]


def backtrace_lines(bt: Backtrace | None, tid: int | None = None) -> list[str]:
    """`bt [TID]`: the thread, its last function, then one line per frame."""
    if bt is None:
        return ["no call recorded yet" + (f" on thread {tid}" if tid else "")]
    lines = [f"thread {bt.tid}, last call {bt.func}"
             + (f" [fallback] ({bt.reason})" if bt.fallback else "")]
    lines.extend(f"#{i:<2} {a}" for i, a in enumerate(bt.frames))
    return _escaped(lines)


def callers_lines(summ: Summary, funcs: Iterable[str] = ()) -> list[str]:
    """`callers [FUNC...]`: the hottest call sites of each function."""
    want = set(funcs)
    lines = []
    for func, sites in summ.sites.items():
        if want and func not in want:
            continue
        if not sites:
            continue
        lines.append(f"{func}:")
        lines.extend(f"  {n:9d} calls {ns / 1e9:11.6f} s  {site}" for site, n, ns in sites)
    return _escaped(lines) or ["no calls recorded yet"]


def why_lines(ex: Explanation) -> list[str]:
    """`why`: the clock source, time namespaces, the fallbacks per function and reason."""
    fast = {True: "has a vDSO read mode (calls can stay in user space)",
            False: "has NO vDSO read mode: every clock read enters the kernel",
            None: "is unknown"}[ex.fast_path]
    lines = [f"clocksource {ex.clocksource or '?'} {fast}"]
    for ns in ex.namespaces:
        lines.append(f"pid {ns.pid} lives in a time namespace: " + ", ".join(
            f"{k} {a}s {b}ns" for k, a, b in ns.offsets))
    summ = ex.summary
    for r in summ.rows:
        if r.calls:
            per = summ.reasons.get(r.func)
            detail = (": " + ", ".join(f"{k} {v}" for k, v in per.items())) if per else ""
            lines.append(f"{r.func}: {r.fallbacks} of {r.calls} calls fell back{detail}")
    if summ.diagnosis:
        lines.append(summ.diagnosis)
    return _escaped(lines)


ThreadRow = tuple[int, str, str]     # (tid, state letter or "gone", comm)


def threads_text(pid: int, rows: Iterable[ThreadRow], calls: Mapping[int, int],
                 last: Mapping[int, str]) -> str:
    """`info threads`: a row per thread, the leader marked."""
    lines = [f"{'tid':>8}  {'state':<5} {'name':<16} {'calls':>8}  last call"]
    for tid, state, comm in rows:
        mark = "*" if tid == pid else " "
        lines.append(f"{tid:>7}{mark}  {state:<5} {escape_text(comm):<16} "
                     f"{calls.get(tid, 0):>8}  {last.get(tid, '-')}")
    lines.append("(* the thread-group leader; state t: stopped by the tracer)")
    return "\n".join(lines)


def hexdump(addr: int, data: bytes) -> str:
    """`x`: 16 bytes a line, printable ASCII beside."""
    lines = []
    for i in range(0, len(data), 16):
        chunk = data[i:i + 16]
        hexes = " ".join(f"{b:02x}" for b in chunk)
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
        lines.append(f"{addr + i:#014x}  {hexes:<47}  {text}")
    return "\n".join(lines)
