"""The console's door into the engine: typed commands and queries, run in the engine's thread.

Every ptrace request must come from the thread that attached, and the engine's tables change at
every stop, so another thread (the console's) never reads them. It calls `Control`, whose
methods queue the work on the engine loop (`Session.submit`) and return a typed Future; what it
shows between two commands comes from `snapshot()`, a frozen record the engine republishes at
each tick and after each command. Queries answer with data (the records below); the text is
made in tracer/render/reports.py.
"""
from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TypeVar

from tracer import inspect, sigtrack
from tracer.errors import ProcessGone
from tracer.inspect import AuxvReport
from tracer.engine.options import Summary, resolve_functions
from tracer.engine.state import _TICK, _WAKE_SIGNAL, _Space, _Thread
from tracer.engine.stats import Counts, summarize
from tracer.session import Session
from tracer.vdso import VdsoImage

__all__ = ["Control", "Snapshot", "Backtrace", "Explanation", "TimeNamespace", "Counts",
           "summarize", "snapshot_of"]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The engine's state as of its last tick (or command): what the console shows."""
    state: str                       # running | paused | detached | exited
    pid: int | None                  # the root process
    abi: str | None
    vdso_base: int | None
    image: VdsoImage | None          # the root's vDSO as read at attach (no breakpoint in it)
    threads: tuple[int, ...]         # every traced thread, sorted
    functions: tuple[str, ...]       # the root's traced functions, plain names
    calls: int
    fallbacks: int
    signals: bool
    inject: bool


DETACHED = Snapshot("detached", None, None, None, None, (), (), 0, 0, False, False)


@dataclass(frozen=True, slots=True)
class Backtrace:
    """The stack of a thread's last call."""
    tid: int
    func: str
    fallback: bool
    reason: str | None               # why it fell back into the kernel
    frames: tuple[str, ...]          # symbolized, innermost first


@dataclass(frozen=True, slots=True)
class TimeNamespace:
    pid: int
    offsets: tuple[tuple[str, int, int], ...]    # (clock, seconds, nanoseconds)


@dataclass(frozen=True, slots=True)
class Explanation:
    """Why calls fell back into the kernel: the clock source, time namespaces, and the
    per-function counts and reasons of the summary."""
    clocksource: str | None
    fast_path: bool | None           # the clock source has a vDSO read mode (None: unknown)
    namespaces: tuple[TimeNamespace, ...]
    summary: Summary


class Control:
    """The typed interface over one engine. Thread-safe: called from the engine's own thread,
    or before it runs or after it ended, the work is done at once; from any other thread it is
    queued to the engine loop and the Future completes there."""

    def __init__(self, engine: Session) -> None:
        self._engine = engine
        self._snapshot = DETACHED
        chained = engine.on_tick

        def on_tick() -> None:
            self._publish(engine)
            if chained is not None:
                chained()
        engine.on_tick = on_tick

    # ------------------------------------------------------------------ life
    def start(self, pid: int | None = None, cmd: list[str] | None = None) -> threading.Thread:
        """Attach to PID (or spawn CMD) and run the engine in a new thread; attach errors are
        raised here. Call from the main thread: it installs the wake-up signal's handler."""
        s = self._engine
        if threading.current_thread() is threading.main_thread():
            signal.signal(_WAKE_SIGNAL, lambda *_: s.tick())
        ready = threading.Event()
        failure: list[BaseException] = []
        done = threading.Event()

        def engine() -> None:
            try:
                if pid is not None:
                    s.attach(pid)
                else:
                    s.spawn(cmd or [])
            except BaseException as e:   # handed to the caller of start
                failure.append(e)
                ready.set()
                return
            s.loop.bind_thread()
            self._publish(s)
            ready.set()
            try:
                s.run()
            finally:
                self._publish(s)        # exited or detached: the engine's last word
                done.set()

        def ticker() -> None:
            # A wake-up sent just before the engine blocks in waitpid would be lost while
            # the tracee is paused; a tick every 100 ms bounds that.
            while not done.wait(_TICK):
                s.tick()
                s.loop.wake()

        t = threading.Thread(target=engine, name="vdsotrace-engine", daemon=True)
        t.start()
        ready.wait()
        if failure:
            raise failure[0]
        threading.Thread(target=ticker, name="vdsotrace-ticker", daemon=True).start()
        return t

    def stop(self, reason: str = "detach") -> None:
        """Ask the engine to detach from everything and end (async-signal and thread safe)."""
        self._engine.request_stop(reason)

    def snapshot(self) -> Snapshot:
        """The state the engine last published: never a read of the engine's own tables."""
        return self._snapshot

    # ------------------------------------------------------------------ commands
    def pause(self) -> Future[None]:
        """Stop every thread; the breakpoints stay."""
        return self._submit(lambda s: s.table.pause_now())

    def resume(self) -> Future[None]:
        return self._submit(lambda s: s.table.resume_now())

    def set_functions(self, specs: list[str] | None) -> Future[list[str]]:
        """Trace these -e specs from now on; the plain names now traced in the last process."""
        return self._submit(lambda s: set_functions_now(s, specs))

    def set_signals(self, on: bool) -> Future[None]:
        return self._submit(lambda s: set_signals_now(s, on))

    def set_inject(self, on: bool) -> Future[None]:
        """Switch engines: the in-tracee recorder (on) or a stop per call (off)."""
        return self._submit(lambda s: set_inject_now(s, on))

    # ------------------------------------------------------------------ queries
    def info(self) -> Future[Snapshot]:
        """A snapshot taken now, in the engine's thread."""
        return self._submit(snapshot_of)

    def summary(self, top: int = 5) -> Future[Summary]:
        """Everything -c prints (`stats`; `callers` with top=10)."""
        return self._submit(lambda s: summarize(s.stats, top))

    def backtrace(self, tid: int | None = None) -> Future[Backtrace | None]:
        """The stack of TID's last call (of the last thread that made one without TID);
        None when there is no such call."""
        return self._submit(lambda s: backtrace_of(s, tid))

    def explain(self) -> Future[Explanation]:
        return self._submit(explain)

    def read_memory(self, addr: int, size: int) -> Future[bytes]:
        """SIZE bytes of the root process's memory at ADDR."""
        return self._submit(lambda s: _root(s).mem.read(addr, size))

    def read_auxv(self) -> Future[AuxvReport]:
        """The root process's auxiliary vector (its initial stack, checked against procfs)."""
        return self._submit(lambda s: inspect.read_auxv(_root(s)))

    # ------------------------------------------------------------------ plumbing
    def _submit(self, fn: Callable[[Session], T]) -> Future[T]:
        def run(s: Session) -> T:
            try:
                return fn(s)
            finally:
                self._publish(s)
        return self._engine.submit(run)

    def _publish(self, s: Session) -> None:
        # engine thread (or no engine thread running): a reference swap, atomic for readers
        self._snapshot = snapshot_of(s)


# ---------------------------------------------------------------------- in the engine thread

def _root(s: Session) -> inspect.Stopped:
    """The root process: its memory (reads through /proc/PID/mem) and ABI."""
    space = s.spaces.get(s.root_pid or -1)
    if space is None:
        raise ProcessGone(f"process {s.root_pid} is not traced any more")
    return inspect.Stopped(space.pid, space.mem, space.abi)


def snapshot_of(s: Session) -> Snapshot:
    space = s.spaces.get(s.root_pid or -1) or next(iter(s.spaces.values()), None)
    return Snapshot(s.state, space.pid if space else s.root_pid,
                    space.abi.name if space else None, space.base if space else None,
                    space.image if space else None, tuple(sorted(s.threads)),
                    tuple(f.plain for f in space.patcher.funcs) if space else (),
                    s.stats.calls, s.stats.fallbacks, s.options.signals, s.options.inject)


def set_functions_now(s: Session, specs: list[str] | None) -> list[str]:
    """Replant with a new -e set."""
    was_paused = s.table.paused
    if not was_paused:
        s.table.pause_now()
    try:
        new_funcs: list[str] = []
        plans = {pid: resolve_functions(sp.image, specs) for pid, sp in s.spaces.items()}
        threads = list(s.threads.values())
        for space in _own_spaces(s, threads):
            s.instruments.replace_instrument(space, threads, None, plans[space.pid])
            new_funcs = [f.plain for f in space.patcher.funcs]
        s.options.funcs = specs
        return new_funcs
    finally:
        if not was_paused:
            s.table.resume_now()


def _own_spaces(s: Session, threads: list[_Thread]) -> list[_Space]:
    """The spaces with threads of their own, one per address space (a vfork child shares its
    parent's memory, and so its patch: handled with the parent)."""
    seen: set[int] = set()
    out = []
    for space in s.spaces.values():
        if id(space.patcher) in seen or not any(th.space is space for th in threads):
            continue
        seen.add(id(space.patcher))
        out.append(space)
    return out


def set_signals_now(s: Session, on: bool) -> None:
    """Switch --signals while attached; each thread follows from its next stop (then it is
    resumed with PTRACE_SYSCALL, or PTRACE_CONT again)."""
    if on == s.options.signals:
        return
    s.table.set_signals(on)
    for space in s.spaces.values():
        space.signals = sigtrack.SignalTracker(space.abi) if on else None
    if not on:
        for th in s.threads.values():
            th.expect_handler = 0


def set_inject_now(s: Session, on: bool) -> None:
    """Switch engines while attached: stop-based breakpoints <-> the in-tracee recorder."""
    if on == s.options.inject:
        return
    was_paused = s.table.paused
    if not was_paused:
        s.table.pause_now()
    try:
        threads = list(s.threads.values())
        for space in _own_spaces(s, threads):
            s.instruments.replace_instrument(space, threads, on, list(space.patcher.funcs))
            s.procs.flush_notices(space)
        s.options.inject = on
    finally:
        if not was_paused:
            s.table.resume_now()


def backtrace_of(s: Session, tid: int | None) -> Backtrace | None:
    if tid is not None:
        th = s.threads.get(tid)
    else:
        done = [t for t in s.threads.values() if t.last_call is not None]
        th = done[-1] if done else None
    if th is None or th.last_call is None:
        return None
    fidx, caller, stack, fallback, reason = th.last_call
    space = th.space
    func = space.patcher.funcs[fidx].plain if fidx < len(space.patcher.funcs) else "?"
    frames = stack if stack else (caller,)
    return Backtrace(th.tid, func, bool(fallback), reason,
                     tuple(s.symbols.stack_text(space, tuple(frames))))


def explain(s: Session) -> Explanation:
    namespaces = tuple(TimeNamespace(sp.pid, tuple((k, a, b) for k, (a, b) in sp.timens.items()))
                       for sp in s.spaces.values() if sp.timens)
    return Explanation(s.clocksource, s.fast_path, namespaces, summarize(s.stats))
