"""The console's commands, without a terminal: `Console.execute(line)` runs one command line and
writes what it has to say through `out`. The prompt_toolkit side (app.py) only feeds it lines,
draws `state`, and calls `drain` / `refresh` from its pump thread.

The engine (`tracer.session.Session`) runs in its own thread, because every ptrace request must
come from the thread that attached; the console reaches it only through the Session's
thread-safe calls. Events arrive through `sink`, in the engine thread: it only appends to
deques, so the engine never waits for the terminal.
"""
from __future__ import annotations

import concurrent.futures
import os
import shlex
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any, Callable

from tracer import events as E
from tracer import procfs
from tracer.errors import (MemoryReadError, ProcessGone, TracerError, UnknownFunction,
                           UsageError)
from tracer.render.hist import LatencyHistograms, hist_text
from tracer.vdso import SIGRETURN_TRAMPOLINES, VdsoImage, plain_name

from tracer.console.eventfmt import json_line, paint, text_line
from tracer.render.escape import escape_text
from tracer.console.state import ConsoleState, Filter

__all__ = ["Console", "CommandSpec", "COMMANDS", "COMMAND_NAMES", "SPECS", "rank_symbols",
           "EVENTS_KEPT", "SHOW_PER_TICK"]

EVENTS_KEPT = 200_000        # events `save` can write: the most recent ones
SHOW_PER_TICK = 200          # lines the stream prints per pump tick; the rest are counted
ENGINE_TIMEOUT = 20.0        # seconds to wait for the engine thread to answer
# Completion order: what programs call most comes first, so Tab picks it among equals.
_RANK = ("clock_gettime", "gettimeofday", "time", "getcpu", "clock_getres", "getrandom",
         "clock_gettime64", "clock_getres_time64", "__kernel_vsyscall", "__kernel_sigreturn",
         "__kernel_rt_sigreturn")


@dataclass(frozen=True, slots=True)
class CommandSpec:
    name: str
    usage: str
    help: str
    args: str = ""           # what completes after it: symbol, func, traced, file, onoff, ...


COMMANDS: tuple[CommandSpec, ...] = (
    CommandSpec("help", "help [COMMAND]", "this list, or one command's usage", "command"),
    CommandSpec("attach", "attach PID", "attach to a process (it stops: `continue` lets it run)",
                "pid"),
    CommandSpec("detach", "detach", "remove every breakpoint and let the process go"),
    CommandSpec("break", "break [FUNC...|all]", "log calls to these vDSO functions "
                "(no argument: list them)", "func"),
    CommandSpec("delete", "delete [FUNC...]", "stop logging these functions (no argument: all)",
                "traced"),
    CommandSpec("continue", "continue", "let the process run; events stream above the prompt"),
    CommandSpec("pause", "pause", "stop every thread of the process, keep the breakpoints "
                "(Ctrl-C does it too)"),
    CommandSpec("stats", "stats", "calls, fallbacks, errors and time per function"),
    CommandSpec("hist", "hist [FUNC...|reset]", "latency histograms of the calls so far "
                "(log2, ns), per function and per clock; fallbacks apart", "traced"),
    CommandSpec("auxv", "auxv", "the process's auxiliary vector, decoded"),
    CommandSpec("vdso", "vdso", "the vDSO: base, build-id, symbols, the syscall gateway"),
    CommandSpec("disas", "disas SYMBOL", "disassemble one vDSO function", "symbol"),
    CommandSpec("dump", "dump FILE", "write the vDSO image to FILE (an ELF file)", "file"),
    CommandSpec("maps", "maps", "the memory map, [vdso] and [vvar] marked"),
    CommandSpec("info", "info threads", "the process's threads: state, calls, last function",
                "info"),
    CommandSpec("x", "x ADDR|SYMBOL[+OFF] [N]", "read N bytes of memory (default 64)", "symbol"),
    CommandSpec("filter", "filter [tid TID...|func FUNC...|off]",
                "show only these threads or functions (save and stats see everything)",
                "filter"),
    CommandSpec("signals", "signals on|off", "trace signal deliveries and sigreturns", "onoff"),
    CommandSpec("save", "save FILE", "write the events so far to FILE as JSON lines", "file"),
    CommandSpec("syntax", "syntax intel|att", "assembler syntax of disas", "syntax"),
    CommandSpec("bt", "bt [TID]", "the stack of a thread's last call"),
    CommandSpec("callers", "callers [FUNC]", "who calls the traced functions", "traced"),
    CommandSpec("why", "why [FUNC]", "why calls fell back into the kernel", "traced"),
    CommandSpec("inject", "inject on|off", "record calls inside the process instead of "
                "stopping it at each call", "onoff"),
    CommandSpec("quit", "quit", "detach (if attached) and leave; Ctrl-D does it too"),
)
COMMAND_NAMES: tuple[str, ...] = tuple(c.name for c in COMMANDS)
SPECS = {c.name: c for c in COMMANDS}
_ALIASES = {"c": "continue", "cont": "continue", "b": "break", "d": "delete", "q": "quit",
            "exit": "quit", "h": "help", "?": "help", "i": "info", "disassemble": "disas",
            "where": "bt", "backtrace": "bt", "stop": "pause"}
# Engine operations the console offers once the Session has them (duck-typed, not required).
_LATER = {"bt": "bt", "callers": "callers", "why": "why"}


def rank_symbols(image: VdsoImage) -> tuple[str, ...]:
    """Every name a function can be given: plain (`clock_gettime`) and exported
    (`__vdso_clock_gettime`, aliases), most used first."""
    names: set[str] = set()
    for f in image.functions:
        names.add(f.plain)
        names.update(f.aliases)

    def key(n: str) -> tuple[int, str, bool]:
        p = plain_name(n)
        return (_RANK.index(p) if p in _RANK else len(_RANK), p, n.startswith("__vdso_"))
    return tuple(sorted(names, key=key))


def _wait(result: Any, timeout: float = ENGINE_TIMEOUT) -> Any:
    """The value of an engine call, whether it answered directly or with a Future."""
    if isinstance(result, concurrent.futures.Future):
        try:
            return result.result(timeout)
        except concurrent.futures.TimeoutError as e:
            raise TracerError(f"the engine did not answer within {timeout:.0f} s") from e
    return result


def _number(text: str, what: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise UsageError(f"{what} {text!r} is not a number") from None


class Console:
    """Commands over one (or no) traced process."""

    def __init__(self, out: Callable[[str], None] = print, *, color: bool | None = None) -> None:
        self.state = ConsoleState(color=not os.environ.get("NO_COLOR") if color is None
                                  else color)
        self.done = False
        self._out = out
        self._session: Any = None          # tracer.session.Session while attached
        self._last_session: Any = None     # for `stats` after a detach or an exit
        self._thread: threading.Thread | None = None
        self._lock = threading.RLock()     # attach / detach / exit handling
        self._image: VdsoImage | None = None
        self._base = 0
        self._events: deque[E.Event] = deque(maxlen=EVENTS_KEPT)
        self._pending: deque[E.Event] = deque()
        self._received = 0
        self._tid_calls: Counter[int] = Counter()
        self._tid_last: dict[int, str] = {}
        self._exit: E.ExitEvent | None = None
        self._rate_mark: tuple[float, int] = (time.monotonic(), 0)
        self._hist = LatencyHistograms()      # fed by sink (engine thread), read by `hist`
        self._hist_lock = threading.Lock()

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
        name = _ALIASES.get(name, name)
        handler = getattr(self, f"cmd_{name}", None)
        if name not in SPECS or handler is None:
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

    def sink(self, ev: E.Event) -> None:
        """Called by the engine, in its thread, for every event: appends, nothing more."""
        self._events.append(ev)
        self._pending.append(ev)
        self._received += 1
        with self._hist_lock:
            self._hist.add(ev)
        if isinstance(ev, E.CallEvent):
            self._tid_calls[ev.tid] += 1
            self._tid_last[ev.tid] = ev.func
        elif isinstance(ev, E.ExitEvent) and ev.tid == ev.pid:
            self._exit = ev

    def drain(self, limit: int = SHOW_PER_TICK) -> list[str]:
        """Lines for the events that arrived since the last drain, filtered; beyond `limit`
        they are only counted (the terminal cannot keep up with a busy tracee)."""
        lines: list[str] = []
        hidden = 0
        flt, color = self.state.filter, self.state.color
        for _ in range(len(self._pending)):
            ev = self._pending.popleft()
            if flt.active and not _passes(flt, ev):
                continue
            if len(lines) < limit:
                lines.append(text_line(ev, color))
            else:
                hidden += 1
        if hidden:
            lines.append(paint(f"... {hidden} more events not shown (`stats` counts them, "
                               "`save FILE` keeps them, `filter` narrows the stream)",
                               "dim", color))
        return lines

    def refresh(self) -> None:
        """Pump thread: the toolbar's numbers from the engine, and a tracee that went away."""
        with self._lock:
            s = self._session
            if s is None:
                return
            st = s.state
            if st in ("exited", "detached"):
                self._end_session(st)
                return
            info = s.info()
        now = time.monotonic()
        t0, c0 = self._rate_mark
        if now - t0 >= 0.2:
            self.state.rate = max(0.0, (info.calls - c0) / (now - t0))
            self._rate_mark = (now, info.calls)
        self.state.run_state = st
        self.state.threads = len(info.threads)
        self.state.calls = info.calls
        self.state.fallbacks = info.fallbacks

    def _end_session(self, st: str) -> None:
        """The engine ended without us asking: the tracee exited (or was lost)."""
        s, pid = self._session, self.state.pid
        if self._thread is not None:
            self._thread.join(ENGINE_TIMEOUT)
        self._last_session, self._session, self._thread = s, None, None
        self.state.attached = False
        self.state.run_state = st
        self.state.rate = 0.0
        if st == "exited":
            ex = self._exit
            how = ("" if ex is None else f" (killed by {ex.signal})" if ex.signal
                   else f" (status {ex.status})" if ex.status is not None else "")
            self.state.exit_status = how.strip(" ()") or None
            self.write(paint(f"process {pid} exited{how}; the console stays: `attach PID` "
                             "for another, `quit` to leave", "life", self.state.color))
        else:
            self.write(paint(f"the engine let go of {pid}; `attach {pid}` to trace it again",
                             "notice", self.state.color))

    def shutdown(self) -> None:
        """Leave nothing behind: detach if still attached (quit, Ctrl-D, a signal, a crash)."""
        with self._lock:
            if self._session is not None and not self._detach():
                self.write(self._err(f"the engine did not finish detaching from "
                                     f"{self.state.pid}"))

    # ------------------------------------------------------------------ engine

    def attach(self, pid: int | None = None, cmd: list[str] | None = None) -> None:
        with self._lock:
            if self._session is not None:
                raise UsageError(f"already attached to {self.state.pid}: `detach` first")
            from tracer.session import Session, TraceOptions
            opts = TraceOptions(funcs=list(self.state.breaks), signals=self.state.signals,
                                stack_depth=16, follow_forks=False,
                                inject=self.state.inject, pin=False)
            s = Session(opts, self.sink)
            self._exit = None
            with self._hist_lock:
                self._hist = LatencyHistograms()
            thread = s.start_thread(pid=pid) if pid is not None else s.start_thread(cmd=cmd)
            self._session, self._thread = s, thread
            try:
                _wait(s.pause())  # gdb-like: stopped
                info = s.info()
                if info.pid is None or info.image is None or info.vdso_base is None:
                    raise TracerError("the engine attached but reports no process or vDSO")
            except TracerError:
                self._detach()
                raise
            self._image, self._base = info.image, info.vdso_base
            st = self.state
            st.pid, st.abi, st.attached = info.pid, info.abi, True
            st.comm = escape_text(procfs.proc_name(info.pid))   # shown in the toolbar too
            st.symbols = rank_symbols(info.image)
            st.breaks = list(info.functions)
            st.run_state, st.threads = s.state, len(info.threads)
            st.calls, st.fallbacks, st.rate, st.exit_status = info.calls, info.fallbacks, 0.0, None
            self._rate_mark = (time.monotonic(), info.calls)
        how = "started" if pid is None else "attached to"
        traced = ", ".join(st.breaks) if st.breaks else "none yet (`break FUNC`)"
        self.write(paint(f"{how} {st.pid} ({st.comm}), {st.abi}, "
                         f"vDSO at {info.vdso_base:#x}, "
                         f"{st.threads} thread{'s' if st.threads != 1 else ''}; {s.state}",
                         "life", st.color))
        self.write(f"breakpoints: {traced}; `continue` lets it run, Ctrl-C pauses it")

    def _need_session(self) -> Any:
        if self._session is None:
            if self.state.run_state == "exited":
                raise UsageError(f"process {self.state.pid} has exited: `attach PID` first")
            raise UsageError("not attached: `attach PID` first")
        return self._session

    def _detach(self) -> bool:
        """Ask the engine to let go and wait for its thread. False when it did not finish
        in time (the process may still be stopped, with breakpoints in place)."""
        s, t = self._session, self._thread
        try:
            _wait(s.stop(reason="detach"))
        finally:
            finished = True
            if t is not None:
                t.join(ENGINE_TIMEOUT)
                finished = not t.is_alive()
            self._last_session, self._session, self._thread = s, None, None
            self.state.attached = False
            self.state.run_state = "detached"
            self.state.rate = 0.0
        return finished

    # ------------------------------------------------------------------ commands

    def cmd_help(self, args: list[str]) -> None:
        if args:
            name = _ALIASES.get(args[0], args[0])
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
        pid = _number(args[0], "pid")
        if pid <= 0:
            raise UsageError(f"invalid pid {args[0]!r}: give a positive process id")
        if pid == os.getpid():
            raise UsageError(f"{pid} is this console: pick another process")
        self.attach(pid=pid)

    def cmd_detach(self, args: list[str]) -> None:
        with self._lock:
            self._need_session()
            pid = self.state.pid
            finished = self._detach()
        if not finished:
            raise TracerError(f"the engine did not finish detaching from {pid} within "
                              f"{ENGINE_TIMEOUT:.0f} s: check it with `maps` and ps")
        self.write(paint(f"detached from {pid}; it runs on, every breakpoint removed "
                         "(inspection commands still read it)", "life", self.state.color))

    def cmd_quit(self, args: list[str]) -> None:
        if self._session is not None:
            self.cmd_detach([])
        self.done = True

    def _resolve(self, names: list[str]) -> list[str]:
        """Plain names of the functions the user named (`__vdso_time` -> `time`)."""
        image = self._image_for_names()
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

    def _image_for_names(self) -> VdsoImage | None:
        if self._image is not None:
            return self._image
        return None

    def _default_funcs(self) -> list[str]:
        image = self._image_for_names()
        if image is None:
            raise UsageError("`break all` needs a process: `attach PID` first")
        return [f.plain for f in image.functions
                if not (set(f.aliases) | {f.symbol}) & SIGRETURN_TRAMPOLINES]

    def _set_breaks(self, new: list[str]) -> None:
        if self._session is not None:
            _wait(self._session.set_functions(list(new)))
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
        where = "" if self._session is not None else " (planted at the next attach)"
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
        s = self._need_session()
        if s.state == "running":
            self.write("already running (Ctrl-C or `pause` stops it)")
            return
        _wait(s.resume())
        self.state.run_state = s.state
        note = "" if self.state.breaks else "; no breakpoints, so nothing is logged (`break FUNC`)"
        self.write(f"continuing {self.state.pid}: Ctrl-C pauses{note}")

    def cmd_pause(self, args: list[str]) -> None:
        self.pause(quiet=False)

    def pause(self, quiet: bool = True) -> bool:
        """Stop the tracee if it runs (Ctrl-C). True when it was running."""
        s = self._session
        if s is None or s.state != "running":
            if not quiet:
                self._need_session()
                self.write(f"{self.state.pid} is already {s.state}")
            return False
        _wait(s.pause())
        self.state.run_state = s.state
        self.state.rate = 0.0
        backlog = self.drain()           # the calls made before the stop, above the notice
        if backlog:
            self.write("\n".join(backlog))
        self.write(paint(f"paused {self.state.pid}: every thread stopped, breakpoints kept; "
                         "`continue` resumes", "life", self.state.color))
        return True

    def cmd_stats(self, args: list[str]) -> None:
        s = self._session or self._last_session
        if s is None:
            raise UsageError("no statistics: nothing has been traced yet (`attach PID`)")
        summ = _wait(s.submit(lambda engine: engine.summary()))
        if not any(r.calls for r in summ.rows):
            self.write("no calls yet")
            return
        from tracer.render.summary import summary_text
        self.write(summary_text(summ))

    def cmd_hist(self, args: list[str]) -> None:
        if args == ["reset"]:
            with self._hist_lock:
                self._hist.clear()
            self.write("histograms cleared")
            return
        with self._hist_lock:
            hists = self._hist.histograms()
        if args:
            want = {plain_name(a) for a in args}
            hists = [h for h in hists if h.func in want]
        if not hists:
            self.write("no calls yet" + (f" to {', '.join(args)}" if args else ""))
            return
        self.write(hist_text(hists))

    # -- inspection: through the engine while attached, through a short peek otherwise

    def _target_pid(self) -> int:
        if self.state.pid is None:
            raise UsageError("no process: `attach PID` first")
        return self.state.pid

    def _with_image(self) -> tuple[VdsoImage, int, Any]:
        """(image, base, VdsoMapping or None). While attached, the image read at attach time:
        the bytes as they were before any breakpoint."""
        from tracer import inspect
        pid = self._target_pid()
        if self._session is not None and self._image is not None:
            try:
                mapping = inspect.find_vdso(pid, [])
            except (OSError, TracerError):
                mapping = None
            return self._image, self._base, mapping
        with inspect.peek(pid) as p:
            rep = inspect.read_auxv(p)
            mapping = inspect.find_vdso(pid, rep.pairs)
            image = inspect.read_vdso(p, mapping)
        self.state.symbols = rank_symbols(image)
        return image, mapping.base, mapping

    def cmd_auxv(self, args: list[str]) -> None:
        from tracer import inspect
        from tracer.render.inspect import auxv_text
        pid = self._target_pid()
        if self._session is not None and self._image is not None:
            st = inspect.Stopped(pid, self._session.memory(), self._image.abi)
            rep = inspect.read_auxv(st)
            abi = self._image.abi.name
        else:
            with inspect.peek(pid) as p:
                rep = inspect.read_auxv(p)
                abi = p.abi.name
        text = auxv_text(pid, abi, rep)
        self.write(text.replace("AT_SYSINFO_EHDR", paint("AT_SYSINFO_EHDR", "func",
                                                         self.state.color)))

    def cmd_vdso(self, args: list[str]) -> None:
        from tracer.disasm import gateway
        from tracer.render.inspect import vdso_text
        image, base, mapping = self._with_image()
        size = mapping.size if mapping is not None else len(image.data)
        self.write(vdso_text(image, base, size, gateway(image), mapping))

    def cmd_disas(self, args: list[str]) -> None:
        from tracer.disasm import disassemble
        from tracer.render.inspect import disas_text
        if len(args) != 1:
            raise UsageError("usage: disas SYMBOL (Tab completes the names)")
        image, base, _ = self._with_image()
        func = image.function(args[0])
        if func is None:
            names = ", ".join(sorted({n for f in image.functions for n in f.aliases}))
            raise UnknownFunction(f"no function {args[0]!r} in this vDSO; it exports: {names}")
        text = disas_text(func.symbol, base, disassemble(image, func, base, self.state.syntax))
        if self.state.color:
            text = "\n".join(paint(ln, "fallback", True) if "enters the kernel" in ln else ln
                             for ln in text.splitlines())
        self.write(text)

    def cmd_dump(self, args: list[str]) -> None:
        if len(args) != 1:
            raise UsageError("usage: dump FILE")
        image, base, _ = self._with_image()
        path = os.path.expanduser(args[0])
        with open(path, "wb") as f:
            f.write(image.data)
        self.write(f"wrote {len(image.data)} bytes of {image.soname or 'vDSO'} "
                   f"({image.abi.name}) from {base:#x} to {path}")

    def cmd_maps(self, args: list[str]) -> None:
        from tracer.render.inspect import maps_text
        try:
            maps = procfs.read_maps(self._target_pid())
        except FileNotFoundError:
            raise ProcessGone(f"process {self.state.pid} is gone") from None
        lines = maps_text(maps).splitlines()
        if self.state.color:
            lines = [paint(ln, "func", True) if "<- vDSO (" in ln
                     else paint(ln, "fallback", True) if "<- vDSO data" in ln else ln
                     for ln in lines]
        self.write("\n".join(lines))

    def cmd_info(self, args: list[str]) -> None:
        if args[:1] not in (["threads"], ["thread"]):
            raise UsageError("usage: info threads")
        pid = self._target_pid()
        if self._session is not None:
            tids = list(self._session.info().threads)
        else:
            try:
                tids = procfs.list_tasks(pid)
            except FileNotFoundError:
                raise ProcessGone(f"process {pid} is gone") from None
        lines = [f"{'tid':>8}  {'state':<5} {'name':<16} {'calls':>8}  last call"]
        for tid in tids:
            try:
                stt = procfs.read_stat(pid, tid)
                comm, state = escape_text(stt.comm), stt.state
            except OSError:
                comm, state = "?", "gone"
            mark = "*" if tid == pid else " "
            lines.append(f"{tid:>7}{mark}  {state:<5} {comm:<16} {self._tid_calls[tid]:>8}  "
                         f"{self._tid_last.get(tid, '-')}")
        lines.append("(* the thread-group leader; state t: stopped by the tracer)")
        self.write("\n".join(lines))

    def _address(self, text: str) -> int:
        sym, plus, off = text.partition("+")
        try:
            return int(text, 0)
        except ValueError:
            pass
        image, base, _ = self._with_image()
        f = image.function(sym)
        if f is None:
            raise UsageError(f"{text!r} is neither an address nor a vDSO symbol")
        return base + f.image_offset + (_number(off, "offset") if plus else 0)

    def cmd_x(self, args: list[str]) -> None:
        if not 1 <= len(args) <= 2:
            raise UsageError("usage: x ADDR|SYMBOL[+OFF] [N]")
        addr = self._address(args[0])
        n = _number(args[1], "count") if len(args) > 1 else 64
        if not 1 <= n <= 65536:
            raise UsageError("count must be between 1 and 65536")
        pid = self._target_pid()
        if self._session is not None:
            data = self._session.memory().read(addr, n)
        else:
            from tracer import target
            mem = target.Memory(pid)
            try:
                data = mem.read(addr, n)
            except MemoryReadError as e:
                raise MemoryReadError(addr, n, _why_unreadable(pid, addr, e)) from e
            finally:
                mem.close()
        self.write(_hexdump(addr, data))

    def cmd_filter(self, args: list[str]) -> None:
        st = self.state
        if not args:
            self.write(f"filter: {st.filter.describe()}")
            return
        kind, rest = args[0], args[1:]
        if kind in ("off", "none", "clear"):
            st.filter = Filter()
        elif kind == "tid" and rest:
            st.filter = Filter(frozenset(_number(t, "tid") for t in rest), st.filter.funcs)
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
        s = self._session
        if s is not None:
            _wait(s.set_signals(on))
            when = ""
        else:
            when = " from the next attach"
        self.state.signals = on
        self.write(f"signals: {'on' if on else 'off'}{when}")

    def cmd_inject(self, args: list[str]) -> None:
        on = self._onoff(args, "inject on|off")
        s = self._session
        if s is None:
            self.state.inject = on
            self.write(f"inject: {'on' if on else 'off'} from the next attach")
            return
        _wait(s.set_inject(on))
        self.state.inject = on
        self.write(f"inject: {'on' if on else 'off'} (calls are "
                   f"{'recorded inside the tracee, no stop per call' if on else 'caught with one ptrace stop each'})")

    def _later(self, name: str, args: list[str]) -> None:
        s = self._session or self._last_session
        if s is None:
            raise UsageError(f"{name}: nothing traced yet: `attach PID` first")
        res = _wait(s.submit(lambda engine: getattr(engine, _LATER[name])(*args)))
        # bt and callers name the tracee's files and symbols: each line escaped
        self.write(escape_text(res) if isinstance(res, str)
                   else "\n".join(escape_text(str(r)) for r in res))

    def cmd_bt(self, args: list[str]) -> None:
        self._later("bt", args)

    def cmd_callers(self, args: list[str]) -> None:
        self._later("callers", args)

    def cmd_why(self, args: list[str]) -> None:
        self._later("why", args)

    def cmd_save(self, args: list[str]) -> None:
        if len(args) != 1:
            raise UsageError("usage: save FILE")
        path = os.path.expanduser(args[0])
        evs = list(self._events)
        with open(path, "w") as f:
            for ev in evs:
                f.write(json_line(ev) + "\n")
        lost = self._received - len(evs)
        note = f" (the {lost} before them were not kept: the console keeps the last " \
               f"{EVENTS_KEPT})" if lost > 0 else ""
        self.write(f"wrote {len(evs)} events to {path}{note}")

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


def _passes(flt: Filter, ev: E.Event) -> bool:
    if flt.tids and ev.tid not in flt.tids:
        return False
    if flt.funcs:
        if isinstance(ev, E.CallEvent):
            return ev.func in flt.funcs
        if isinstance(ev, E.SyscallEvent):
            return ev.nested_in in flt.funcs
        return not isinstance(ev, (E.SignalEvent, E.SigreturnEvent))
    return True


def _why_unreadable(pid: int, addr: int, e: MemoryReadError) -> str:
    try:
        for m in procfs.read_maps(pid):
            if m.contains(addr):
                if m.path.startswith("[vvar"):
                    return f"{m.path} is the vDSO's data: the kernel refuses ptrace reads (EIO)"
                return f"{e.__cause__ or e} in {m.path or 'an anonymous mapping'}"
    except OSError:
        pass
    return "not mapped"


def _hexdump(addr: int, data: bytes) -> str:
    lines = []
    for i in range(0, len(data), 16):
        chunk = data[i:i + 16]
        hexes = " ".join(f"{b:02x}" for b in chunk)
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
        lines.append(f"{addr + i:#014x}  {hexes:<47}  {text}")
    return "\n".join(lines)
