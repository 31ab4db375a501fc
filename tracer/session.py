"""The engine: attach -> auxv -> vDSO -> breakpoints -> decode -> events.

One thread (the one that attached: ptrace requires it) runs `Session.run`. A traced call costs
one stop (breakpoints.py: the entry jumps to a stub that stops once, on return): one
PTRACE_GETREGS, one read of the stub's block of stack, PTRACE_CONT; decoding and output happen
after the tracee runs again. With --inject there is no stop per call at all: the loop drains
the recorder's ring (inject/). The engine never prints: events go to `sink`.

The engine's parts live in tracer/engine/ (one module per job, each a mixin of Session);
this module combines them and keeps the console's API and the CLI's entry.
"""
from __future__ import annotations

import signal
import threading
from concurrent.futures import Future
from typing import Any

from tracer import procfs, sigtrack, target
from tracer.decoders import for_function
from tracer.engine.options import (clocksource_info, FuncStats, resolve_functions, SessionInfo,
                                   Summary, TraceOptions)
from tracer.engine.state import _fidx_by_name, _TICK, _WAKE_SIGNAL
from tracer.engine.stats import _Counter, OTHER_SITES
from tracer.errors import ProcessGone, TracerError, UsageError
from tracer.vdso import GATEWAY_SYMBOL

from tracer.engine.calls import Calls
from tracer.engine.capture import Capture
from tracer.engine.detach import Detach
from tracer.engine.lifecycle import Lifecycle
from tracer.engine.loop import Loop
from tracer.engine.processes import Processes
from tracer.engine.recorders import Recorders
from tracer.engine.signals import Signals
from tracer.engine.threads import Threads

__all__ = ["TraceOptions", "Session", "SessionInfo", "FuncStats", "Summary", "resolve_functions",
           "run_trace", "clocksource_info"]


class Session(Loop, Capture, Calls, Recorders, Signals, Threads, Processes, Lifecycle, Detach):
    """Trace one process (and, with follow_forks, its children)."""

    # ---------------------------------------------------------------- console API
    def _set_functions_now(self, specs: list[str] | None) -> list[str]:
        """Replant with a new -e set (engine thread)."""
        was_paused = self._paused
        if not was_paused:
            self._pause_now()
        try:
            new_funcs: list[str] = []
            plans = {pid: resolve_functions(sp.image, specs) for pid, sp in self.spaces.items()}
            threads = list(self.threads.values())
            done: set[int] = set()
            for pid, space in self.spaces.items():
                if id(space.patcher) in done:
                    continue            # a vfork child: the parent's memory, handled with it
                done.add(id(space.patcher))
                if not self._unpatch_space(space, threads):
                    space.patcher.plant(space.mem)
                    raise TracerError("a thread is inside a traced call right now: try again")
                funcs = plans[pid]
                for th in threads:
                    if th.space is space:
                        th.pending.clear()
                        th.fb_marks.clear()
                decs = [for_function(f.plain) for f in funcs]
                if space.recorder is not None:
                    # the in-tracee recorder: install a new one over the new set
                    from tracer.inject import Recorder
                    self._uninstall(space, threads)
                    space.recorder = None
                    space.patcher.funcs = list(funcs)
                    mine = [th.tid for th in threads if th.space is space]
                    if funcs and mine:
                        rec = Recorder(space.pid, space.mem, space.abi, space.image,
                                       space.base, funcs, lossy=self.options.lossy)
                        rec.install(mine[0])
                        space.recorder = rec
                else:
                    space.patcher.plan(funcs, [d.nargs for d in decs],
                                       markers=space.patcher.marker_mode,
                                       tsc=space.patcher.tsc)
                    for th in threads:
                        if th.space is space:
                            self._step_out(th.tid, space.patcher.in_detour)
                    space.patcher.plant(space.mem)
                    if not space.patcher.marker_mode:
                        self._guard(space.pid, space.mem, space.patcher)
                space.decoders = decs
                space.is_gateway = [f.symbol == GATEWAY_SYMBOL for f in funcs]
                space.fidx_by_name = _fidx_by_name(space)
                space.args_cache.clear()
                for f in funcs:
                    self.counters.setdefault(f.plain, _Counter())
                new_funcs = [f.plain for f in funcs]
            self.options.funcs = specs
            return new_funcs
        finally:
            if not was_paused:
                self._resume_now()

    # Thread-safe: from the console's thread these run in the engine thread (a Future); from
    # the engine thread itself, or before it runs, at once.
    def pause(self) -> Future[None]:
        return self.submit(lambda s: s._pause_now())

    def resume(self) -> Future[None]:
        return self.submit(lambda s: s._resume_now())

    def set_functions(self, specs: list[str] | None) -> Future[list[str]]:
        return self.submit(lambda s: s._set_functions_now(specs))

    def set_signals(self, on: bool) -> Future[None]:
        return self.submit(lambda s: s._set_signals_now(on))

    def _set_signals_now(self, on: bool) -> None:
        """Switch --signals while attached; each thread follows from its next stop (then it
        is resumed with PTRACE_SYSCALL, or PTRACE_CONT again)."""
        if on == self.options.signals:
            return
        self.options.signals = on
        for space in self.spaces.values():
            space.signals = sigtrack.SignalTracker(space.abi) if on else None
        if not on:
            for th in self.threads.values():
                th.expect_handler = 0

    def set_inject(self, on: bool) -> Future[None]:
        return self.submit(lambda s: s._set_inject_now(on))

    def _set_inject_now(self, on: bool) -> None:
        """Switch engines while attached: stop-based breakpoints <-> the in-tracee recorder."""
        if on == self.options.inject:
            return
        was_paused = self._paused
        if not was_paused:
            self._pause_now()
        try:
            threads = list(self.threads.values())
            done: set[int] = set()
            for space in self.spaces.values():
                mine = [th for th in threads if th.space is space]
                if not mine or id(space.patcher) in done:
                    continue            # (a vfork child: the parent's memory, done with it)
                done.add(id(space.patcher))
                funcs = list(space.patcher.funcs)
                if on:
                    from tracer.inject import Recorder
                    if not self._unpatch_space(space, threads):
                        space.patcher.plant(space.mem)
                        raise TracerError("a thread is inside a traced call right now: "
                                          "try again")
                    rec = Recorder(space.pid, space.mem, space.abi, space.image, space.base,
                                   funcs, lossy=self.options.lossy)
                    try:
                        rec.install(mine[0].tid)
                    except TracerError:
                        space.patcher.plant(space.mem)
                        raise
                    space.recorder = rec
                else:
                    self._uninstall(space, threads)
                    space.recorder = None
                    markers, use_tsc, notes = self._stop_mechanism(
                        space.pid, [th.tid for th in mine], space.mem, space.abi, space.image,
                        space.base)
                    space.patcher.plan(funcs, [for_function(f.plain).nargs for f in funcs],
                                       markers=markers, tsc=use_tsc)
                    space.notices = notes
                    self._flush_notices(space)
                    for th in mine:
                        self._step_out(th.tid, space.patcher.in_detour)
                    space.patcher.plant(space.mem)
                    if not markers:
                        self._guard(space.pid, space.mem, space.patcher)
            self.options.inject = on
        finally:
            if not was_paused:
                self._resume_now()

    def stop(self, reason: str = "detach") -> None:
        self.request_stop(reason)

    def memory(self) -> target.Memory:
        """The root process's memory (reads through /proc/PID/mem work from any thread)."""
        space = self.spaces.get(self.root_pid or -1)
        if space is None:
            raise ProcessGone(f"process {self.root_pid} is not traced any more")
        return space.mem

    def start_thread(self, pid: int | None = None,
                     cmd: list[str] | None = None) -> threading.Thread:
        """Attach (or spawn) and run in a new thread; attach errors are raised here. Call
        from the main thread: it installs the wake-up signal's handler."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(_WAKE_SIGNAL, lambda *_: self.tick())
        ready = threading.Event()
        failure: list[BaseException] = []
        done = threading.Event()

        def engine() -> None:
            try:
                if pid is not None:
                    self.attach(pid)
                else:
                    self.spawn(cmd or [])
            except BaseException as e:   # handed to the caller of start_thread
                failure.append(e)
                ready.set()
                return
            self._engine_ident = threading.get_ident()
            ready.set()
            try:
                self.run()
            finally:
                done.set()

        def ticker() -> None:
            # A wake-up sent just before the engine blocks in waitpid would be lost while
            # the tracee is paused; a tick every 100 ms bounds that.
            while not done.wait(_TICK):
                self.tick()
                self._wake()

        t = threading.Thread(target=engine, name="vdsotrace-engine", daemon=True)
        t.start()
        ready.wait()
        if failure:
            raise failure[0]
        threading.Thread(target=ticker, name="vdsotrace-ticker", daemon=True).start()
        return t

    def bt(self, *args: str) -> list[str]:
        """The stack of a thread's last call (`bt [TID]`)."""
        tid = int(args[0]) if args else None
        th = None
        if tid is not None:
            th = self.threads.get(tid)
        else:
            done = [t for t in self.threads.values() if t.last_call is not None]
            th = done[-1] if done else None
        if th is None or th.last_call is None:
            return ["no call recorded yet" + (f" on thread {tid}" if tid else "")]
        fidx, caller, stack, fallback, reason = th.last_call
        space = th.space
        func = space.patcher.funcs[fidx].plain if fidx < len(space.patcher.funcs) else "?"
        lines = [f"thread {th.tid}, last call {func}"
                 + (f" [fallback] ({reason})" if fallback else "")]
        frames = stack if stack else (caller,)
        for i, a in enumerate(self._stack_text(space, tuple(frames))):
            lines.append(f"#{i:<2} {a}")
        return lines

    def callers(self, *args: str) -> list[str]:
        """The hottest call sites of each function (or of one: `callers FUNC`)."""
        summ = self.summary(top=10)
        lines = []
        for func, sites in summ.sites.items():
            if args and func not in args:
                continue
            if not sites:
                continue
            lines.append(f"{func}:")
            lines.extend(f"  {n:9d} calls {ns / 1e9:11.6f} s  {site}" for site, n, ns in sites)
        return lines or ["no calls recorded yet"]

    def why(self, *args: str) -> list[str]:
        """Why calls fell back into the kernel: clock source, reasons per function."""
        summ = self.summary()
        fast = {True: "has a vDSO read mode (calls can stay in user space)",
                False: "has NO vDSO read mode: every clock read enters the kernel",
                None: "is unknown"}[self.fast_path]
        lines = [f"clocksource {self.clocksource or '?'} {fast}"]
        for space in self.spaces.values():
            if space.timens:
                lines.append(f"pid {space.pid} lives in a time namespace: " + ", ".join(
                    f"{k} {a}s {b}ns" for k, (a, b) in space.timens.items()))
        for r in summ.rows:
            if r.calls:
                per = summ.reasons.get(r.func)
                detail = (": " + ", ".join(f"{k} {v}" for k, v in per.items())) if per else ""
                lines.append(f"{r.func}: {r.fallbacks} of {r.calls} calls fell back{detail}")
        if summ.diagnosis:
            lines.append(summ.diagnosis)
        return lines

    def summary(self, top: int = 5) -> Summary:
        """Everything -c prints: per function totals, fallback reasons, hottest call sites
        (and stack paths), the exports never called, a diagnosis when fallbacks dominate."""
        rows = self.stats()
        reasons: dict[str, dict[str, int]] = {}
        sites: dict[str, list[tuple[str, int, int]]] = {}
        paths: dict[str, list[tuple[tuple[str, ...], int, int]]] = {}
        for name, c in self.counters.items():
            if c.reasons:
                reasons[name] = dict(c.reasons)
            hot = sorted(c.sites.items(), key=lambda kv: (-kv[1][0], -kv[1][1]))[:top]
            sites[name] = [(site, n, ns) for site, (n, ns) in hot]
            if c.other[0]:
                sites[name].append((OTHER_SITES, c.other[0], c.other[1]))
            hotp = sorted(c.paths.items(), key=lambda kv: (-kv[1][0], -kv[1][1]))[:top]
            paths[name] = [(frames, n, ns) for frames, (n, ns) in hotp]
            if c.other[2]:
                paths[name].append(((OTHER_SITES,), c.other[2], c.other[3]))
        unused = [r.func for r in rows if not r.calls]
        return Summary(rows, reasons, sites, paths, unused, self._diagnosis(rows, reasons),
                       self.lost_records)

    def _diagnosis(self, rows: list[FuncStats], reasons: dict[str, dict[str, int]]) -> str | None:
        calls = sum(r.calls for r in rows if r.func != GATEWAY_SYMBOL)
        falls = sum(r.fallbacks for r in rows if r.func != GATEWAY_SYMBOL)
        if not calls or falls * 2 < calls:
            return None
        total: dict[str, int] = {}
        for per in reasons.values():
            for k, v in per.items():
                total[k] = total.get(k, 0) + v
        main = max(total, key=lambda k: total[k]) if total else "unknown"
        why = {
            "no-vdso-clocksource": f"the clocksource {self.clocksource!r} has no vDSO read "
                                   "mode: every clock read is a system call (tsc, kvm-clock "
                                   "or hyperv_clocksource_tsc_page would serve them in user "
                                   "space)",
            "cpu-time-clock": "CPU-time clocks (CLOCK_PROCESS_CPUTIME_ID, "
                              "CLOCK_THREAD_CPUTIME_ID, clock_getcpuclockid) are always "
                              "answered by the kernel",
            "invalid-clock": "the clock ids are invalid or have no vDSO mode",
            "getrandom-no-state": "getrandom is called without the opaque per-thread state "
                                  "(the C library does not use the vDSO getrandom)",
        }.get(main, "the reason is unknown")
        return (f"diagnosis: {falls} of {calls} vDSO calls ({100 * falls // calls}%) fell back "
                f"to the kernel; mostly because {why}")

    def stats(self) -> list[FuncStats]:
        extra = self._inject_stats
        return [FuncStats(k, c.calls + (extra[k].calls if k in extra else 0),
                          c.fallbacks + (extra[k].fallbacks if k in extra else 0),
                          c.errors + (extra[k].errors if k in extra else 0),
                          c.total_ns + (extra[k].total_ns if k in extra else 0))
                for k, c in self.counters.items()]

    def info(self) -> SessionInfo:
        space = self.spaces.get(self.root_pid or -1) or next(iter(self.spaces.values()), None)
        return SessionInfo(space.pid if space else self.root_pid,
                           space.abi.name if space else None,
                           space.base if space else None, space.image if space else None,
                           sorted(self.threads), [f.plain for f in space.patcher.funcs]
                           if space else [], self.calls, self.fallbacks, self.state)

def _install_signal_handlers(session: Session) -> dict[int, Any]:
    """SIGINT/SIGTERM/SIGHUP end the trace cleanly; SIGALRM ticks wake waitpid (a handler
    installed by Python interrupts system calls: no SA_RESTART)."""
    old: dict[int, Any] = {}

    def stop(signum: int, _frame: object) -> None:
        session.request_stop(signal.Signals(signum).name)

    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        old[s] = signal.signal(s, stop)
    old[_WAKE_SIGNAL] = signal.signal(_WAKE_SIGNAL, lambda *_: session.tick())
    signal.setitimer(signal.ITIMER_REAL, _TICK, _TICK)
    return old

def _restore_signal_handlers(old: dict[int, Any]) -> None:
    signal.setitimer(signal.ITIMER_REAL, 0, 0)
    for s, h in old.items():
        signal.signal(s, h)

def run_trace(ns: Any, cmd: list[str]) -> int:
    """`vdsotrace trace`: the CLI's entry into the engine."""
    from tracer.render.output import open_output
    opts = TraceOptions(funcs=ns.funcs, follow_forks=ns.follow_forks, signals=ns.signals,
                        stack_depth=ns.stack, inject=ns.inject, lossy=ns.lossy, pin=ns.pin,
                        duration=ns.duration, demangle=ns.demangle,
                        string_size=ns.string_size)
    if ns.lossy and not ns.inject:
        raise UsageError("--lossy applies to --inject only: add --inject, or drop --lossy")
    if ns.inject and ns.follow_forks:
        raise UsageError("--inject cannot follow forks (children share the recorder's ring): "
                         "drop -f, or trace without --inject")
    pids: list[int] = list(dict.fromkeys(ns.pid or []))
    out = open_output(ns.output, json=ns.json, timing=ns.timing, summary=ns.summary)
    out.add_views(hist=ns.hist, perfetto=ns.perfetto, names=procfs.thread_comm)
    session = Session(opts, out.write_event)
    session.summary_only = ns.summary and not out.needs_events   # --hist needs each duration
    old = _install_signal_handlers(session)
    # a reader gone from our output pipe (`| head`) ends the trace as SIGINT does
    out.on_broken = lambda: session.request_stop("EPIPE")

    def tick() -> None:
        out.flush()
        out.check()
    session.on_tick = tick
    started = False
    try:
        if pids:
            for pid in pids:
                session.attach(pid)
        else:
            session.spawn(cmd)
        started = True
        out.flush()
        session.run()
    finally:
        _restore_signal_handlers(old)
        if session.threads:
            session.detach_all("error")
        out.finish(session if started else None)
    return 0
