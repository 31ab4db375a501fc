"""The -c report: per function calls, fallbacks, errors, total and mean time (strace -c's
shape), then fallback reasons, the hottest call sites and paths, unused exports, a diagnosis."""
from __future__ import annotations

from typing import Any

from tracer.render.escape import escape_text

__all__ = ["summary_text", "summary_dict"]


def _table(rows: list[Any]) -> list[str]:
    rows = sorted((r for r in rows if r.calls), key=lambda r: (-r.total_ns, r.func))
    total = sum(r.total_ns for r in rows)
    calls = sum(r.calls for r in rows)
    rule = f"{'-' * 6} {'-' * 11} {'-' * 11} {'-' * 9} {'-' * 9} {'-' * 9} {'-' * 16}"
    out = [f"{'% time':>6} {'seconds':>11} {'usecs/call':>11} {'calls':>9} {'fallbacks':>9} "
           f"{'errors':>9} function", rule]
    for r in rows:
        out.append(f"{100 * r.total_ns / (total or 1):6.2f} {r.total_ns / 1e9:11.6f} "
                   f"{r.total_ns / r.calls / 1e3:11.3f} {r.calls:9d} {r.fallbacks:>9} "
                   f"{r.errors:>9} {r.func}")
    out.append(rule)
    out.append(f"{100.0:6.2f} {total / 1e9:11.6f} {(total / calls / 1e3) if calls else 0:11.3f} "
               f"{calls:9d} {sum(r.fallbacks for r in rows):>9} "
               f"{sum(r.errors for r in rows):>9} total")
    return out


def summary_text(s: Any) -> str:
    """`s` is a tracer.session.Summary."""
    out = _table(s.rows)
    if s.reasons:
        out.append("")
        out.append("fallbacks by reason:")
        for func, per in sorted(s.reasons.items()):
            out.append(f"  {func}: " + ", ".join(f"{k} {v}" for k, v in
                                                  sorted(per.items(), key=lambda kv: -kv[1])))
    hot = {f: v for f, v in s.sites.items() if v}
    if hot:
        out.append("")
        out.append("hottest call sites:")
        for func in sorted(hot, key=lambda f: -sum(n for _, n, _ in hot[f])):
            out.append(f"  {func}:")
            for site, n, ns in hot[func]:
                out.append(f"    {n:9d} calls {ns / 1e9:11.6f} s  {escape_text(site)}")
    paths = {f: v for f, v in s.paths.items() if v}
    if paths:
        out.append("")
        out.append("hottest paths (--stack):")
        for func in sorted(paths):
            out.append(f"  {func}:")
            for frames, n, ns in paths[func]:
                out.append(f"    {n:9d} calls {ns / 1e9:11.6f} s")
                out.extend(f"        {escape_text(fr)}" for fr in frames)
    if s.unused:
        out.append("")
        out.append("never called during the trace: " + ", ".join(s.unused))
    if s.diagnosis:
        out.append("")
        out.append(s.diagnosis)
    if s.lost:
        out.append("")
        out.append(f"{s.lost} calls were not recorded: the tracee outran the recorder's ring "
                   "(the counts above are of the calls recorded)")
    return "\n".join(out)


def summary_dict(s: Any) -> dict[str, Any]:
    return {"event": "summary",
            "functions": [{"func": r.func, "calls": r.calls, "fallbacks": r.fallbacks,
                           "errors": r.errors, "total_ns": r.total_ns,
                           "mean_ns": r.total_ns // r.calls if r.calls else 0,
                           "fallback_reasons": s.reasons.get(r.func, {}),
                           "call_sites": [{"site": site, "calls": n, "total_ns": ns}
                                          for site, n, ns in s.sites.get(r.func, [])],
                           "paths": [{"stack": list(fr), "calls": n, "total_ns": ns}
                                     for fr, n, ns in s.paths.get(r.func, [])]}
                          for r in sorted(s.rows, key=lambda r: -r.total_ns) if r.calls],
            "unused": s.unused, "diagnosis": s.diagnosis, "lost": s.lost}
