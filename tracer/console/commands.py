"""The console's commands, without a terminal: `Console.execute(line)` runs one command line and
writes what it has to say through `out`. The prompt_toolkit side (app.py) only feeds it lines,
draws `state`, and calls `drain` / `refresh` from its pump thread.

The engine runs in its own thread, because every ptrace request must come from the thread that
attached; the console reaches it only through `tracer.engine.control.Control`: typed commands
and queries answered through Futures, and a snapshot the engine republishes each tick. Events
arrive through `EventStream.sink`, in the engine thread: it only appends to deques, so the
engine never waits for the terminal.
"""
from __future__ import annotations

import os
import shlex
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from tracer import procfs
from tracer.console.eventfmt import paint
from tracer.console.inspection import ENGINE_TIMEOUT, Attached, Inspection, number, wait
from tracer.console.specs import (ALIASES, COMMAND_NAMES, COMMANDS, SPECS, CommandSpec,
                                  rank_symbols)
from tracer.console.state import ConsoleState, Filter
from tracer.console.stream import EVENTS_KEPT, SHOW_PER_TICK, EventStream
from tracer.errors import TracerError, UnknownFunction, UsageError
from tracer.render.escape import escape_text
from tracer.render.hist import hist_text
from tracer.vdso import SIGRETURN_TRAMPOLINES, plain_name

if TYPE_CHECKING:
    from tracer.engine.control import Control

__all__ = ["Console", "CommandSpec", "COMMANDS", "COMMAND_NAMES", "SPECS", "rank_symbols",
           "EVENTS_KEPT", "SHOW_PER_TICK"]


class Console:
    """Commands over one (or no) traced process."""

    def __init__(self, out: Callable[[str], None] = print, *, color: bool | None = None) -> None:
        self.state = ConsoleState(color=not os.environ.get("NO_COLOR") if color is None
                                  else color)
        self.done = False
        self._out = out
        self.stream = EventStream()
        self._attached: Attached | None = None
        self._last: Control | None = None      # for `stats`, `bt`... after a detach or exit
        self._lock = threading.RLock()         # attach / detach / exit handling
        self._rate_mark: tuple[float, int] = (time.monotonic(), 0)
        self.inspection = Inspection(self.state, self.stream, lambda: self._attached,
                                     self.write)
        self._handlers: dict[str, Callable[[list[str]], None]] = {
            "help": self.cmd_help, "attach": self.cmd_attach, "detach": self.cmd_detach,
            "break": self.cmd_break, "delete": self.cmd_delete, "continue": self.cmd_continue,
            "pause": self.cmd_pause, "stats": self.cmd_stats, "hist": self.cmd_hist,
            "filter": self.cmd_filter, "signals": self.cmd_signals, "save": self.cmd_save,
            "syntax": self.cmd_syntax, "bt": self.cmd_bt, "callers": self.cmd_callers,
            "why": self.cmd_why, "inject": self.cmd_inject, "quit": self.cmd_quit,
            **self.inspection.handlers()}
        assert set(self._handlers) == set(SPECS), "every command in the table has a handler"

    # ------------------------------------------------------------------ plumbing

    def write(self, text: str) -> None:
        self._out(text)

    def execute(self, line: str) -> None:
        """Run one command line. An error is one line; the console lives on."""
        try:
            words = shlex.split(line, comments=True)
        except ValueError as e:
            self.write(self._err(f"cannot parse the line: {e}"))
            return
        if not words:
            return
        name, args = words[0], words[1:]
        name = ALIASES.get(name, name)
        handler = self._handlers.get(name)
        if handler is None:
            near = [c for c in COMMAND_NAMES if c.startswith(name[:2])]
            hint = f" (did you mean {' or '.join(near)}?)" if near else ""
            self.write(self._err(f"unknown command {name!r}{hint}; `help` lists them"))
            return
        try:
            handler(args)
        except TracerError as e:
            self.write(self._err(str(e)))
        except OSError as e:
            where = f": {e.filename}" if e.filename else ""
            self.write(self._err(f"{e.strerror or e}{where}"))
        except Exception as e:  # the REPL boundary: a bug in one command must not end the
            # console (and the tracee with it); say what it was, in one line.
            self.write(self._err(f"internal error in {name}: {type(e).__name__}: {e}"))

    def _err(self, msg: str) -> str:
        # messages carry the tracee's names (comm, paths): escaped, never raw bytes
        return paint(f"error: {escape_text(msg)}", "error", self.state.color)

    def drain(self, limit: int = SHOW_PER_TICK) -> list[str]:
        """Lines for the events that arrived since the last drain (see EventStream.drain)."""
        return self.stream.drain(self.state.filter, self.state.color, limit)

    def refresh(self) -> None:
        """Pump thread: the toolbar's numbers from the engine's snapshot, and a tracee that
        went away."""
        with self._lock:
            a = self._attached
            if a is None:
                return
            snap = a.control.snapshot()
            if snap.state in ("exited", "detached"):
                self._end_session(snap.state)
                return
        now = time.monotonic()
        t0, c0 = self._rate_mark
        if now - t0 >= 0.2:
            self.state.rate = max(0.0, (snap.calls - c0) / (now - t0))
            self._rate_mark = (now, snap.calls)
        self.state.run_state = snap.state
        self.state.threads = len(snap.threads)
        self.state.calls = snap.calls
        self.state.fallbacks = snap.fallbacks

    def _end_session(self, st: str) -> None:
        """The engine ended without us asking: the tracee exited (or was lost)."""
        a, pid = self._attached, self.state.pid
        assert a is not None
        a.thread.join(ENGINE_TIMEOUT)
        self._let_go_of(a.control)
        self.state.run_state = st
        if st == "exited":
            ex = self.stream.exit
            how = ("" if ex is None else f" (killed by {ex.signal})" if ex.signal
                   else f" (status {ex.status})" if ex.status is not None else "")
            self.state.exit_status = how.strip(" ()") or None
            self.write(paint(f"process {pid} exited{how}; the console stays: `attach PID` "
                             "for another, `quit` to leave", "life", self.state.color))
        else:
            self.write(paint(f"the engine let go of {pid}; `attach {pid}` to trace it again",
                             "notice", self.state.color))

    def _let_go_of(self, control: Control) -> None:
        self._last, self._attached = control, None
        self.state.attached = False
        self.state.run_state = "detached"
        self.state.rate = 0.0

    def shutdown(self) -> None:
        """Leave nothing behind: detach if still attached (quit, Ctrl-D, a signal, a crash)."""
        with self._lock:
            if self._attached is not None and not self._detach():
                self.write(self._err(f"the engine did not finish detaching from "
                                     f"{self.state.pid}"))

    # ------------------------------------------------------------------ engine

    def attach(self, pid: int | None = None, cmd: list[str] | None = None) -> None:
        with self._lock:
            if self._attached is not None:
                raise UsageError(f"already attached to {self.state.pid}: `detach` first")
            from tracer.engine.control import Control
            from tracer.session import Session, TraceOptions
            opts = TraceOptions(funcs=list(self.state.breaks), signals=self.state.signals,
                                stack_depth=16, follow_forks=False,
                                inject=self.state.inject, pin=False)
            self.stream.new_session()
            ctl = Control(Session(opts, self.stream.sink))
            thread = ctl.start(pid=pid) if pid is not None else ctl.start(cmd=cmd)
            try:
                wait(ctl.pause())  # gdb-like: stopped
                snap = ctl.snapshot()
                if snap.pid is None or snap.image is None or snap.vdso_base is None:
                    raise TracerError("the engine attached but reports no process or vDSO")
            except TracerError:
                self._stop_engine(ctl, thread)
                self._let_go_of(ctl)
                raise
            self._attached = Attached(ctl, thread, snap.image, snap.vdso_base)
            st = self.state
            st.pid, st.abi, st.attached = snap.pid, snap.abi, True
            st.comm = escape_text(procfs.proc_name(snap.pid))   # shown in the toolbar too
            st.symbols = rank_symbols(snap.image)
            st.breaks = list(snap.functions)
            st.run_state, st.threads = snap.state, len(snap.threads)
            st.calls, st.fallbacks, st.rate, st.exit_status = snap.calls, snap.fallbacks, 0.0, None
            self._rate_mark = (time.monotonic(), snap.calls)
        how = "started" if pid is None else "attached to"
        traced = ", ".join(st.breaks) if st.breaks else "none yet (`break FUNC`)"
        self.write(paint(f"{how} {st.pid} ({st.comm}), {st.abi}, "
                         f"vDSO at {snap.vdso_base:#x}, "
                         f"{st.threads} thread{'s' if st.threads != 1 else ''}; {snap.state}",
                         "life", st.color))
        self.write(f"breakpoints: {traced}; `continue` lets it run, Ctrl-C pauses it")

    def _need_attached(self) -> Attached:
        if self._attached is None:
            if self.state.run_state == "exited":
                raise UsageError(f"process {self.state.pid} has exited: `attach PID` first")
            raise UsageError("not attached: `attach PID` first")
        return self._attached

    def _traced_before(self, what: str) -> Control:
        """The engine attached now, or the last one (its numbers outlive it)."""
        ctl = self._attached.control if self._attached is not None else self._last
        if ctl is None:
            raise UsageError(what)
        return ctl

    @staticmethod
    def _stop_engine(ctl: Control, thread: threading.Thread) -> bool:
        """Ask the engine to let go and wait for its thread. False when it did not finish in
        time (the process may still be stopped, with breakpoints in place)."""
        ctl.stop(reason="detach")
        thread.join(ENGINE_TIMEOUT)
        return not thread.is_alive()

    def _detach(self) -> bool:
        a = self._attached
        assert a is not None
        try:
            return self._stop_engine(a.control, a.thread)
        finally:
            self._let_go_of(a.control)

    # ------------------------------------------------------------------ commands

    def cmd_help(self, args: list[str]) -> None:
        if args:
            name = ALIASES.get(args[0], args[0])
            spec = SPECS.get(name)
            if spec is None:
                raise UsageError(f"no command {args[0]!r}; `help` lists them")
            self.write(f"{spec.usage}\n    {spec.help}")
            return
        width = max(len(c.usage) for c in COMMANDS)
        lines = [f"{c.usage:<{width}}  {c.help}" for c in COMMANDS]
        lines.append("Tab completes commands and vDSO symbols; Ctrl-C pauses a running "
                     "process; Ctrl-D quits.")
        self.write("\n".join(lines))

    def cmd_attach(self, args: list[str]) -> None:
        if len(args) != 1:
            raise UsageError("usage: attach PID")
        pid = number(args[0], "pid")
        if pid <= 0:
            raise UsageError(f"invalid pid {args[0]!r}: give a positive process id")
        if pid == os.getpid():
            raise UsageError(f"{pid} is this console: pick another process")
        self.attach(pid=pid)

    def cmd_detach(self, args: list[str]) -> None:
        with self._lock:
            self._need_attached()
            pid = self.state.pid
            finished = self._detach()
        if not finished:
            raise TracerError(f"the engine did not finish detaching from {pid} within "
                              f"{ENGINE_TIMEOUT:.0f} s: check it with `maps` and ps")
        self.write(paint(f"detached from {pid}; it runs on, every breakpoint removed "
                         "(inspection commands still read it)", "life", self.state.color))

    def cmd_quit(self, args: list[str]) -> None:
        if self._attached is not None:
            self.cmd_detach([])
        self.done = True

    def _resolve(self, names: list[str]) -> list[str]:
        """Plain names of the functions the user named (`__vdso_time` -> `time`)."""
        image = self._attached.image if self._attached is not None else None
        out = []
        for n in names:
            if image is None:
                out.append(plain_name(n))
                continue
            f = image.function(n)
            if f is None:
                known = ", ".join(sorted({f.plain for f in image.functions}))
                raise UnknownFunction(f"no function {n!r} in this vDSO; it exports: {known}")
            out.append(f.plain)
        return out

    def _default_funcs(self) -> list[str]:
        if self._attached is None:
            raise UsageError("`break all` needs a process: `attach PID` first")
        return [f.plain for f in self._attached.image.functions
                if not (set(f.aliases) | {f.symbol}) & SIGRETURN_TRAMPOLINES]

    def _set_breaks(self, new: list[str]) -> None:
        if self._attached is not None:
            wait(self._attached.control.set_functions(list(new)))
        self.state.breaks = list(new)

    def cmd_break(self, args: list[str]) -> None:
        if not args:
            if self.state.breaks:
                self.write("breakpoints: " + ", ".join(self.state.breaks))
            else:
                self.write("no breakpoints: `break FUNC` (Tab lists the vDSO's functions)")
            return
        wanted = self._default_funcs() if args == ["all"] else self._resolve(args)
        new = list(self.state.breaks)
        for n in wanted:
            if n not in new:
                new.append(n)
        self._set_breaks(new)
        where = "" if self._attached is not None else " (planted at the next attach)"
        self.write(f"breakpoints: {', '.join(new)}{where}")

    def cmd_delete(self, args: list[str]) -> None:
        if not args or args == ["all"]:
            gone = set(self.state.breaks)
        else:
            gone = set(self._resolve(args))
            missing = gone - set(self.state.breaks)
            if missing:
                raise UsageError(f"no breakpoint on {', '.join(sorted(missing))}; "
                                 f"set: {', '.join(self.state.breaks) or 'none'}")
        new = [n for n in self.state.breaks if n not in gone]
        self._set_breaks(new)
        self.write("breakpoints: " + (", ".join(new) if new else "none"))

    def cmd_continue(self, args: list[str]) -> None:
        ctl = self._need_attached().control
        if ctl.snapshot().state == "running":
            self.write("already running (Ctrl-C or `pause` stops it)")
            return
        wait(ctl.resume())
        self.state.run_state = ctl.snapshot().state
        note = "" if self.state.breaks else "; no breakpoints, so nothing is logged (`break FUNC`)"
        self.write(f"continuing {self.state.pid}: Ctrl-C pauses{note}")

    def cmd_pause(self, args: list[str]) -> None:
        self.pause(quiet=False)

    def pause(self, quiet: bool = True) -> bool:
        """Stop the tracee if it runs (Ctrl-C). True when it was running."""
        a = self._attached
        if a is None or a.control.snapshot().state != "running":
            if not quiet:
                a = self._need_attached()
                self.write(f"{self.state.pid} is already {a.control.snapshot().state}")
            return False
        wait(a.control.pause())
        self.state.run_state = a.control.snapshot().state
        self.state.rate = 0.0
        backlog = self.drain()           # the calls made before the stop, above the notice
        if backlog:
            self.write("\n".join(backlog))
        self.write(paint(f"paused {self.state.pid}: every thread stopped, breakpoints kept; "
                         "`continue` resumes", "life", self.state.color))
        return True

    def cmd_stats(self, args: list[str]) -> None:
        ctl = self._traced_before("no statistics: nothing has been traced yet (`attach PID`)")
        summ = wait(ctl.summary())
        if not any(r.calls for r in summ.rows):
            self.write("no calls yet")
            return
        from tracer.render.summary import summary_text
        self.write(summary_text(summ))

    def cmd_hist(self, args: list[str]) -> None:
        if args == ["reset"]:
            self.stream.clear_histograms()
            self.write("histograms cleared")
            return
        hists = self.stream.histograms()
        if args:
            want = {plain_name(a) for a in args}
            hists = [h for h in hists if h.func in want]
        if not hists:
            self.write("no calls yet" + (f" to {', '.join(args)}" if args else ""))
            return
        self.write(hist_text(hists))

    def cmd_filter(self, args: list[str]) -> None:
        st = self.state
        if not args:
            self.write(f"filter: {st.filter.describe()}")
            return
        kind, rest = args[0], args[1:]
        if kind in ("off", "none", "clear"):
            st.filter = Filter()
        elif kind == "tid" and rest:
            st.filter = Filter(frozenset(number(t, "tid") for t in rest), st.filter.funcs)
        elif kind in ("func", "function") and rest:
            st.filter = Filter(st.filter.tids, frozenset(self._resolve(rest)))
        else:
            raise UsageError("usage: filter [tid TID...|func FUNC...|off]")
        self.write(f"filter: {st.filter.describe()}")

    def _onoff(self, args: list[str], usage: str) -> bool:
        if len(args) != 1 or args[0] not in ("on", "off"):
            raise UsageError(f"usage: {usage}")
        return args[0] == "on"

    def cmd_signals(self, args: list[str]) -> None:
        if not args:
            self.write(f"signals: {'on' if self.state.signals else 'off'}")
            return
        on = self._onoff(args, "signals on|off")
        if self._attached is not None:
            wait(self._attached.control.set_signals(on))
            when = ""
        else:
            when = " from the next attach"
        self.state.signals = on
        self.write(f"signals: {'on' if on else 'off'}{when}")

    def cmd_inject(self, args: list[str]) -> None:
        on = self._onoff(args, "inject on|off")
        if self._attached is None:
            self.state.inject = on
            self.write(f"inject: {'on' if on else 'off'} from the next attach")
            return
        wait(self._attached.control.set_inject(on))
        self.state.inject = on
        self.write(f"inject: {'on' if on else 'off'} (calls are "
                   f"{'recorded inside the tracee, no stop per call' if on else 'caught with one ptrace stop each'})")

    # -- explanations: the engine answers with data, render/reports.py writes it

    def cmd_bt(self, args: list[str]) -> None:
        from tracer.render.reports import backtrace_lines
        ctl = self._traced_before("bt: nothing traced yet: `attach PID` first")
        tid = number(args[0], "tid") if args else None
        self.write("\n".join(backtrace_lines(wait(ctl.backtrace(tid)), tid)))

    def cmd_callers(self, args: list[str]) -> None:
        from tracer.render.reports import callers_lines
        ctl = self._traced_before("callers: nothing traced yet: `attach PID` first")
        self.write("\n".join(callers_lines(wait(ctl.summary(top=10)), args)))

    def cmd_why(self, args: list[str]) -> None:
        from tracer.render.reports import why_lines
        ctl = self._traced_before("why: nothing traced yet: `attach PID` first")
        self.write("\n".join(why_lines(wait(ctl.explain()))))

    def cmd_save(self, args: list[str]) -> None:
        if len(args) != 1:
            raise UsageError("usage: save FILE")
        self.write(self.stream.save(os.path.expanduser(args[0])))

    def cmd_syntax(self, args: list[str]) -> None:
        from tracer.disasm import SYNTAXES
        if not args:
            self.write(f"syntax: {self.state.syntax}")
            return
        if len(args) != 1 or args[0] not in SYNTAXES:
            raise UsageError(f"usage: syntax {'|'.join(SYNTAXES)}")
        self.state.syntax = args[0]
        self.write(f"syntax: {args[0]}")

    # ------------------------------------------------------------------ for completion

    def traced(self) -> list[str]:
        return list(self.state.breaks)

    def thread_ids(self) -> list[int]:
        if self.state.pid is None:
            return []
        try:
            return procfs.list_tasks(self.state.pid)
        except OSError:
            return []
