"""The -c table: per function calls, fallbacks, errors, total and mean time."""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["summary_text", "summary_dict"]


def summary_text(rows: Iterable[Any], unused: list[str] | None = None,
                 reasons: dict[str, int] | None = None) -> str:
    rows = sorted((r for r in rows if r.calls), key=lambda r: (-r.total_ns, r.func))
    total = sum(r.total_ns for r in rows) or 1
    out = [f"{'% time':>6} {'seconds':>11} {'usecs/call':>11} {'calls':>9} {'fallbacks':>9} "
           f"{'errors':>9} function",
           f"{'-' * 6} {'-' * 11} {'-' * 11} {'-' * 9} {'-' * 9} {'-' * 9} {'-' * 16}"]
    for r in rows:
        out.append(f"{100 * r.total_ns / total:6.2f} {r.total_ns / 1e9:11.6f} "
                   f"{r.total_ns / r.calls / 1e3:11.1f} {r.calls:9d} {r.fallbacks:>9} "
                   f"{r.errors:>9} {r.func}")
    calls = sum(r.calls for r in rows)
    out.append(f"{'-' * 6} {'-' * 11} {'-' * 11} {'-' * 9} {'-' * 9} {'-' * 9} {'-' * 16}")
    out.append(f"{100.0:6.2f} {sum(r.total_ns for r in rows) / 1e9:11.6f} "
               f"{(sum(r.total_ns for r in rows) / calls / 1e3) if calls else 0:11.1f} "
               f"{calls:9d} {sum(r.fallbacks for r in rows):>9} "
               f"{sum(r.errors for r in rows):>9} total")
    if reasons:
        out.append("")
        out.append("fallbacks by reason: " + ", ".join(f"{k} {v}" for k, v in
                                                        sorted(reasons.items(), key=lambda kv: -kv[1])))
    if unused:
        out.append("")
        out.append("never called: " + ", ".join(unused))
    return "\n".join(out)


def summary_dict(rows: Iterable[Any], unused: list[str] | None = None,
                 reasons: dict[str, int] | None = None) -> dict[str, Any]:
    return {"event": "summary",
            "functions": [{"func": r.func, "calls": r.calls, "fallbacks": r.fallbacks,
                           "errors": r.errors, "total_ns": r.total_ns,
                           "mean_ns": r.total_ns // r.calls if r.calls else 0}
                          for r in sorted(rows, key=lambda r: -r.total_ns) if r.calls],
            "fallback_reasons": reasons or {}, "unused": unused or []}
