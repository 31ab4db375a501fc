"""Load the ELF objects a process maps (symbols, and CFI for --stack) while it runs, never
while the tracer holds it: a call is named from objfile's cache, and parsing a big object
(node's 100 MB binary: over a second) would otherwise happen in the engine's loop, where
every thread of the tracee that makes a traced call waits for it.

`warm` loads what is mapped now, before the process is stopped (`trace -p`); `warm_later`
does the same in a background thread and keeps looking for objects mapped during the first
moments (the dynamic loader maps the C library after exec). The background thread only reads
/proc/PID/maps and ELF files: it never calls ptrace (only the engine's thread may).
"""
from __future__ import annotations

import sys
import threading
import time

from tracer.errors import ElfError
from tracer.modmap import ModuleMap

__all__ = ["warm", "warm_later"]

# While a background load runs, the engine's thread should get the interpreter back quickly
# after a stop arrives (CPython hands the GIL over every switch interval: 5 ms by default).
_SWITCH_WHILE_LOADING = 0.0005
_active = 0
_active_lock = threading.Lock()
_saved_interval = sys.getswitchinterval()


def warm(pid: int, cfi: bool = False, seen: set[tuple[str, int]] | None = None) -> int:
    """Parse every file-backed executable mapping of pid into objfile's cache (its symbols;
    its CFI index too with `cfi`). Returns how many objects it looked at; errors (a file gone,
    not an ELF) are left for the engine to meet and report as it does today."""
    try:
        mm = ModuleMap.from_pid(pid)
    except OSError:
        return 0
    n = 0
    for region in mm.regions:
        if not region.executable or not region.path.startswith("/"):
            continue
        key = (region.path, region.inode)
        if seen is not None:
            if key in seen:
                continue
            seen.add(key)
        n += 1
        try:
            module = mm.module_at(region.start)
            if cfi and module is not None and module.obj is not None:
                module.obj.cfi_row(region.start - module.bias)
        except (ElfError, OSError):
            pass
    return n


def _enter() -> None:
    global _active, _saved_interval
    with _active_lock:
        if _active == 0:
            _saved_interval = sys.getswitchinterval()
            sys.setswitchinterval(min(_saved_interval, _SWITCH_WHILE_LOADING))
        _active += 1


def _leave() -> None:
    global _active
    with _active_lock:
        _active -= 1
        if _active == 0:
            sys.setswitchinterval(_saved_interval)


def warm_later(pid: int, cfi: bool = False, follow_s: float = 3.0,
               done: threading.Event | None = None) -> threading.Thread:
    """`warm` in a background thread, then again whenever the maps change, for follow_s
    seconds (or until `done` is set): objects the dynamic loader maps after exec are parsed
    before the first call from them needs a name."""
    def run() -> None:
        _enter()
        try:
            seen: set[tuple[str, int]] = set()
            end = time.monotonic() + follow_s
            last = b""
            while True:
                try:
                    with open(f"/proc/{pid}/maps", "rb") as f:
                        now = f.read()
                except OSError:
                    return
                if now != last:
                    last = now
                    warm(pid, cfi, seen)
                if time.monotonic() >= end or (done is not None and done.is_set()):
                    return
                time.sleep(0.005)
        finally:
            _leave()

    t = threading.Thread(target=run, name=f"vdsotrace-symbols-{pid}", daemon=True)
    t.start()
    return t
