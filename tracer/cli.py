"""argv -> command. The only place that turns errors into messages and exit codes."""
from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from tracer.errors import TracerError, UsageError

if TYPE_CHECKING:
    from tracer.commands.inspect import VdsoView
    from tracer.commands.trace import TraceArgs

__all__ = ["main", "build_parser"]

PROG = "vdsotrace"
_N = TypeVar("_N", int, float)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: {message} (see {PROG} --help)\n")
        raise SystemExit(2)


def _checked(text: str, parse: Callable[[str], _N], invalid: str, ok: Callable[[_N], bool],
             out_of_range: str) -> _N:
    """An option's value parsed, or argparse's one-line error: `invalid` when it does not
    parse, `out_of_range` when it parses but `ok` refuses it."""
    try:
        value = parse(text)
    except ValueError:
        raise argparse.ArgumentTypeError(invalid) from None
    if not ok(value):
        raise argparse.ArgumentTypeError(out_of_range)
    return value


def _pid(text: str) -> int:
    return _checked(text, lambda t: int(t, 10), f"invalid pid {text!r}: give a process id number",
                    lambda pid: pid > 0, f"invalid pid {text!r}: give a positive process id")


def _pids(text: str) -> list[int]:
    return [_pid(t) for t in text.split(",") if t.strip()]


def _depth(text: str) -> int:
    return _checked(text, int, f"invalid stack depth {text!r}",
                    lambda d: 1 <= d <= 256, "stack depth must be between 1 and 256")


def _seconds(text: str) -> float:
    # nan and inf parse as floats: a duration must be a finite number of seconds
    return _checked(text, float, f"invalid duration {text!r}: give seconds",
                    lambda s: math.isfinite(s) and s >= 0,
                    f"invalid duration {text!r}: give a finite, non-negative number of seconds")


def _size(text: str) -> int:
    return _checked(text, int, f"invalid string size {text!r}: give a number of bytes",
                    lambda n: 0 <= n <= 1 << 20, "string size must be between 0 and 1048576 bytes")


# What the top-level help lists: every function vdsotrace traces and decodes, per ABI.
TRACED_FUNCTIONS = """\
traced functions (every one the tracee's vDSO exports, unless -e says otherwise):
  x86_64   clock_gettime, gettimeofday, time, clock_getres, getcpu, getrandom
           (the __vdso_* symbols; -e takes the plain or the symbol name)
  i386     the same (clock_gettime64, clock_getres_time64 where the vDSO has them), and
           __kernel_vsyscall: every system call the C library makes, as `syscall` events
  arm64    __kernel_clock_gettime, __kernel_gettimeofday, __kernel_clock_getres,
           __kernel_getrandom (Linux 6.12+)
  with --signals, also the sigreturn trampolines (__kernel_sigreturn, __kernel_rt_sigreturn)
  and every signal delivery, handler entry and sigreturn

The trace goes to stderr, as strace's does (-o FILE, or -o - for stdout).
`vdsotrace COMMAND --help` explains each command's options."""


def _add_pid(p: argparse.ArgumentParser | Any, required: bool = False,
             what: str = "the process to inspect") -> None:
    p.add_argument("-p", "--pid", type=_pid, required=required, metavar="PID", help=what)


# strace's text options (-t, -r, -q, -z/-Z): `report`'s too; `record` writes every event
_TEXT = ("stamps", "relative", "quiet", "only")


def _reuse_options(src: argparse.ArgumentParser, dst: argparse.ArgumentParser,
                   names: set[str], keep: bool = False) -> None:
    """`record` and `report` take `trace`'s own option definitions: those named (keep=True),
    or all but those."""
    for action in src._actions:
        if action.dest == "help" or (action.dest in names) != keep:
            continue
        dst._add_action(action)


def build_parser() -> argparse.ArgumentParser:
    from tracer import __version__
    p = _Parser(prog=PROG, description="Trace the virtual system calls a process makes through "
                "the Linux vDSO (clock_gettime, gettimeofday, time, getcpu, getrandom, and i386's "
                "__kernel_vsyscall), which strace and ltrace cannot see.",
                epilog=TRACED_FUNCTIONS, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    c = sub.add_parser("console", help="interactive console, attached to PID or a new command",
                       description="The interactive console (type `help` in it). With -p it "
                       "attaches to PID, with -- CMD it starts CMD; either way the process is "
                       "paused until `continue`.")
    _add_pid(c, what="attach to this process")
    c.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD ARGS...",
                   help="start CMD ARGS... under the console")

    t = sub.add_parser("trace", help="strace-like stream of vDSO calls",
                       description="Log every vDSO call of a process (or of a command started "
                       "here), decoded, until it exits, --duration ends, or vdsotrace gets "
                       "SIGINT, SIGTERM or SIGHUP, or its output pipe closes; then every patch "
                       "is removed and the process runs on as before. Events go to stderr "
                       "unless -o says otherwise.")
    t.add_argument("-p", "--pid", type=_pids, metavar="PID[,PID...]",
                   help="attach to these running processes (all their threads)")
    t.add_argument("-e", dest="funcs", metavar="FUNCS", action="append",
                   help="comma list of vDSO functions to trace: plain names (clock_gettime), "
                   "symbols (__vdso_time), `all`, or !name to exclude; strace's "
                   "trace=FUNCS is accepted (default: every function the vDSO exports but the "
                   "sigreturn trampolines)")
    t.add_argument("-o", dest="output", metavar="FILE",
                   help="write events to FILE instead of stderr; `-o -` writes to stdout")
    t.add_argument("--json", action="store_true",
                   help="one JSON object per event and line instead of strace-like text")
    t.add_argument("-c", dest="summary", action="store_true",
                   help="no events: at the end, a summary per function (calls, fallbacks, "
                   "errors, time), the fallback reasons and the hottest call sites")
    t.add_argument("-T", dest="timing", action="store_true",
                   help="show the time spent in each call (measured in the tracee)")
    t.add_argument("-t", dest="stamps", action="count", default=0,
                   help="prefix each line with the time the call was made, as strace: -t "
                   "the time of day, -tt with microseconds, -ttt seconds since the epoch")
    t.add_argument("-r", dest="relative", action="store_true",
                   help="prefix each line with the time since the previous line's (strace "
                   "-r; lines come as calls return: a thread's call that began before the "
                   "previous line's shows a negative time)")
    t.add_argument("-q", dest="quiet", action="count", default=0,
                   help="no attach and detach lines; -qq: no exit lines either (text output)")
    t.add_argument("-z", dest="only", action="store_const", const="ok",
                   help="show only the calls that succeeded (strace -z)")
    t.add_argument("-Z", dest="only", action="store_const", const="err",
                   help="show only the calls that failed (strace -Z)")
    t.add_argument("-f", dest="follow_forks", action="store_true",
                   help="follow forked children too (threads are always followed)")
    t.add_argument("--duration", type=_seconds, metavar="SECONDS",
                   help="detach by itself after SECONDS")
    t.add_argument("--hist", action="store_true",
                   help="at the end, latency histograms per function (per clock for "
                   "clock_gettime): log2 buckets in ns, fallbacks counted apart")
    t.add_argument("--perfetto", metavar="OUT",
                   help="also write a timeline to OUT (Chrome trace JSON, for ui.perfetto.dev "
                   "or chrome://tracing): a track per thread, a slice per call")
    t.add_argument("--signals", action="store_true",
                   help="also trace signal deliveries, handlers and sigreturns (every system "
                   "call then costs two extra stops)")
    t.add_argument("--stack", nargs="?", const=16, type=_depth, metavar="DEPTH",
                   help="add each call's stack, symbolized, like strace -k (default depth 16)")
    t.add_argument("-k", dest="stack", action="store_const", const=16,
                   help="--stack, as strace spells it")
    t.add_argument("--inject", action="store_true",
                   help="record calls inside the tracee (a stub and a shared ring) instead of "
                   "stopping it at each call: same events, far cheaper; no call is lost: "
                   "when the ring is full the tracee waits for the tracer (for at most "
                   "~100 ms of tracer silence)")
    t.add_argument("--lossy", action="store_true",
                   help="with --inject: when the ring is full, drop (and count) calls "
                   "instead of waiting: the tracee never slows down")
    t.add_argument("--no-pin", dest="pin", action="store_false",
                   help="do not move the tracer onto its tracee's CPU")
    t.add_argument("--no-demangle", dest="demangle", action="store_false",
                   help="keep C++/Rust symbol names raw (they are demangled by default)")
    t.add_argument("-s", dest="string_size", type=_size, default=32, metavar="SIZE",
                   help="bytes of a system call's buffer shown (i386 syscall events; "
                   "default 32, as strace)")
    t.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD ARGS...",
                   help="start CMD ARGS... and trace it from its first instruction")

    r = sub.add_parser("record", help="record vDSO calls into a binary file, for `report`",
                       description="Trace as `trace` does (the same engines and options), "
                       "writing every event into a compact binary recording instead of text; "
                       "`vdsotrace report FILE` renders it later.")
    r.add_argument("-o", dest="output", metavar="FILE", required=True,
                   help="the recording to write")
    _reuse_options(t, r, {"output", "json", "summary", "timing", "hist", "perfetto", *_TEXT})

    rp = sub.add_parser("report", help="render a recording as `trace` would have printed it",
                        description="Render a recording made by `vdsotrace record`: the "
                        "events a live `trace` with these options would have printed (text, "
                        "--json, -c, --hist, --perfetto), selected by -e at report time.")
    rp.add_argument("file", metavar="FILE", help="a recording written by `record -o FILE`")
    rp.add_argument("-o", dest="output", metavar="OUT",
                    help="write to OUT instead of stdout")
    _reuse_options(t, rp, {"funcs", "json", "summary", "timing", "hist", "perfetto", "stack",
                           *_TEXT}, keep=True)

    a = sub.add_parser("auxv", help="the tracee's auxiliary vector, decoded",
                       description="The process's auxiliary vector, decoded, in the kernel's "
                       "order (read from its initial stack, checked against /proc/PID/auxv).")
    _add_pid(a, required=True)
    a.add_argument("--json", action="store_true", help="one JSON object instead of text")

    v = sub.add_parser("vdso", help="the vDSO: base, build-id, symbols, the syscall gateway",
                       description="Describe a vDSO: base, size, build-id, notes, symbols with "
                       "versions and sizes, the system call gateway.")
    g = v.add_mutually_exclusive_group(required=True)
    _add_pid(g, what="read the vDSO of this process")
    g.add_argument("--file", metavar="FILE", help="read a vDSO image written by `dump`")
    v.add_argument("--json", action="store_true", help="one JSON object instead of text")

    d = sub.add_parser("dump", help="write the tracee's vDSO image to FILE",
                       description="Write the process's vDSO, byte for byte, to FILE (a valid "
                       "ELF shared object: `file` and `objdump -T` accept it).")
    _add_pid(d, required=True, what="read the vDSO of this process")
    d.add_argument("-o", dest="output", metavar="FILE", required=True,
                   help="the file to write")

    s = sub.add_parser("disas", help="disassemble one vDSO function",
                       description="Disassemble one vDSO function, symbolized; instructions "
                       "that enter the kernel are marked.")
    g = s.add_mutually_exclusive_group(required=True)
    _add_pid(g, what="read the vDSO of this process")
    g.add_argument("--file", metavar="FILE", help="read a vDSO image written by `dump`")
    s.add_argument("symbol", metavar="SYMBOL",
                   help="the function, by plain name (clock_gettime) or symbol")
    s.add_argument("--syntax", choices=("intel", "att"), default="intel",
                   help="assembly syntax (default intel)")
    return p


def _cmd_auxv(ns: argparse.Namespace) -> int:
    from tracer.commands import inspect
    abi, rep = inspect.peek_auxv(ns.pid)
    print(inspect.auxv_output(ns.pid, abi, rep, json=ns.json))
    return 0


def _vdso_view(ns: argparse.Namespace) -> VdsoView:
    from tracer.commands import inspect
    return inspect.file_vdso(ns.file) if ns.file else inspect.peek_vdso(ns.pid)


def _cmd_vdso(ns: argparse.Namespace) -> int:
    from tracer.commands import inspect
    print(inspect.vdso_output(_vdso_view(ns), json=ns.json))
    return 0


def _cmd_dump(ns: argparse.Namespace) -> int:
    from tracer.commands import inspect
    print(inspect.dump_vdso(ns.pid, ns.output), file=sys.stderr)
    return 0


def _cmd_disas(ns: argparse.Namespace) -> int:
    from tracer.commands import inspect
    print(inspect.disas_output(_vdso_view(ns), ns.symbol, ns.syntax))
    return 0


def _split_cmd(cmd: list[str]) -> list[str]:
    return cmd[1:] if cmd and cmd[0] == "--" else cmd


# strace's -e qualifiers other than trace=: none of them means anything for vDSO calls.
_OTHER_QUALIFIERS = ("signal", "signals", "s", "abbrev", "a", "verbose", "v", "raw", "x", "read",
                     "r", "write", "w", "fault", "inject", "status", "quiet", "q", "silent",
                     "silence", "decode-fds", "decode-fd", "kvm", "decode-pids", "secontext",
                     "trace-fds", "trace-fd", "fd", "fds")


def _trace_specs(specs: list[str] | None) -> list[str] | None:
    """-e as strace takes it: `-e FUNCS` or `-e trace=FUNCS` (`t=`), repeatable. A selection
    that is empty or excludes all it includes is refused here, before anything is attached."""
    if specs is None:
        return None
    from tracer.vdso import plain_name
    out: list[str] = []
    for spec in specs:
        qual, eq, rest = spec.partition("=")
        if eq and qual.strip() in ("trace", "t"):
            spec = rest
        elif eq and qual.strip() in _OTHER_QUALIFIERS:
            raise UsageError(f"-e {spec}: vdsotrace takes only -e FUNCS or -e trace=FUNCS "
                             "(signals: --signals)")
        names = [n.strip() for n in spec.split(",") if n.strip()]
        if not names:
            raise UsageError(f"-e {spec!r} selects no function: give a comma list of vDSO "
                             "functions, e.g. -e clock_gettime,time (or leave -e out for all)")
        out.extend(names)
    include = {plain_name(n) for n in out if not n.startswith("!")}
    exclude = {plain_name(n[1:]) for n in out if n.startswith("!")}
    if "none" in include or (include and not include & {"all", "*"} and include <= exclude):
        raise UsageError(f"-e {','.join(out)} selects no function: every function it names "
                         "is also excluded")
    return [",".join(out)]


def _trace_args(ns: argparse.Namespace, verb: str = "trace") -> TraceArgs:
    """`trace`'s options (shared by the commands that run the engine as `trace` does)."""
    from tracer.commands.trace import TraceArgs
    funcs = _trace_specs(ns.funcs)
    cmd = _split_cmd(ns.cmd)
    if ns.pid and cmd:
        raise UsageError("give either -p PID or -- CMD, not both")
    if not ns.pid and not cmd:
        raise UsageError(f"nothing to {verb}: give -p PID or -- CMD ARGS")
    return TraceArgs(
        pids=tuple(ns.pid or ()), cmd=tuple(cmd), funcs=funcs, follow_forks=ns.follow_forks,
        signals=ns.signals, stack=ns.stack, inject=ns.inject, lossy=ns.lossy, pin=ns.pin,
        duration=ns.duration, demangle=ns.demangle, string_size=ns.string_size,
        output=ns.output, json=ns.json, timing=ns.timing, summary=ns.summary, hist=ns.hist,
        perfetto=ns.perfetto, stamps=getattr(ns, "stamps", 0),
        relative=getattr(ns, "relative", False), quiet=getattr(ns, "quiet", 0),
        only=getattr(ns, "only", None))


def _cmd_trace(ns: argparse.Namespace) -> int:
    from tracer.commands.trace import run_trace
    return run_trace(_trace_args(ns))


def _cmd_console(ns: argparse.Namespace) -> int:
    from tracer.console.app import run_console
    cmd = _split_cmd(ns.cmd or [])
    if ns.pid and cmd:
        raise UsageError("give either -p PID or -- CMD, not both")
    return run_console(pid=ns.pid, cmd=cmd)


def _cmd_record(ns: argparse.Namespace) -> int:
    from tracer.commands.record import run_record
    # the rendering options are `report`'s: a recording holds every event
    ns.json = ns.timing = ns.summary = ns.hist = False
    ns.perfetto = None
    return run_record(_trace_args(ns, "record"))


def _cmd_report(ns: argparse.Namespace) -> int:
    from tracer.commands.report import run_report
    ns.funcs = _trace_specs(ns.funcs)
    return run_report(ns)


_COMMANDS = {"auxv": _cmd_auxv, "vdso": _cmd_vdso, "dump": _cmd_dump, "disas": _cmd_disas,
             "trace": _cmd_trace, "console": _cmd_console, "record": _cmd_record,
             "report": _cmd_report}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    if ns.command is None:
        if sys.stdin.isatty() and sys.stdout.isatty():
            ns = parser.parse_args(["console"])
        else:
            parser.print_help(sys.stderr)
            return 2
    try:
        return _COMMANDS[ns.command](ns)
    except TracerError as e:
        from tracer.render.escape import escape_text
        # one line; a task's comm or a path in it is the tracee's: escaped
        sys.stderr.write(f"{PROG}: {escape_text(str(e))}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG}: interrupted\n")
        return 130
    except BrokenPipeError:
        # the reader went away (| head): nothing left to say, and nothing for Python's own
        # flush of stdout at exit to fail on
        from tracer.render.output import silence_stream
        silence_stream(sys.stdout)
        return 0

