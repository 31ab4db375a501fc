"""What the console knows, in one object. Layout builders read it; commands and the pump
thread write it. Plain fields, each written by one side only (see the comments)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

__all__ = ["ConsoleState", "Filter", "history_path"]


@dataclass(slots=True)
class Filter:
    """What the event stream shows; `save` and `stats` always see every event."""
    tids: frozenset[int] = frozenset()
    funcs: frozenset[str] = frozenset()

    @property
    def active(self) -> bool:
        return bool(self.tids or self.funcs)

    def describe(self) -> str:
        parts = []
        if self.tids:
            parts.append("tid " + ",".join(str(t) for t in sorted(self.tids)))
        if self.funcs:
            parts.append("func " + ",".join(sorted(self.funcs)))
        return " and ".join(parts) if parts else "off"


@dataclass(slots=True)
class ConsoleState:
    # written by commands (main thread)
    pid: int | None = None              # the attached process, or the last one (inspection)
    comm: str = ""
    abi: str | None = None
    attached: bool = False
    breaks: list[str] = field(default_factory=list)   # plain names; planted when attached
    syntax: str = "intel"
    signals: bool = False
    inject: bool = False
    filter: Filter = field(default_factory=Filter)
    color: bool = True
    # written by the pump thread (from the engine's snapshot: Control.snapshot())
    run_state: str = "detached"         # running | paused | detached | exited
    threads: int = 0
    calls: int = 0
    fallbacks: int = 0
    rate: float = 0.0                   # calls per second, over the last refresh interval
    exit_status: str | None = None      # "status 0", "killed by SIGKILL"
    symbols: tuple[str, ...] = ()       # completion candidates, ranked


def history_path() -> str:
    """$XDG_STATE_HOME/vdsotrace/history, else ~/.local/state/vdsotrace/history
    (XDG Base Directory Specification 0.8: state data)."""
    base = os.environ.get("XDG_STATE_HOME") or ""
    if not os.path.isabs(base):   # the spec: relative paths are invalid, ignore them
        base = os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "vdsotrace", "history")
