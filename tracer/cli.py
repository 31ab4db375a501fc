"""argv -> command. The only place that turns errors into messages and exit codes."""
from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn

from tracer.errors import TracerError, UsageError

__all__ = ["main", "build_parser"]

PROG = "vdsotrace"


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: {message} (see {PROG} --help)\n")
        raise SystemExit(2)


def _pid(text: str) -> int:
    try:
        pid = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid pid {text!r}: give a process id number")
    if pid <= 0:
        raise argparse.ArgumentTypeError(f"invalid pid {text!r}: give a positive process id")
    return pid


def _pids(text: str) -> list[int]:
    return [_pid(t) for t in text.split(",") if t.strip()]


def _depth(text: str) -> int:
    try:
        d = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid stack depth {text!r}")
    if not 1 <= d <= 256:
        raise argparse.ArgumentTypeError("stack depth must be between 1 and 256")
    return d


def _seconds(text: str) -> float:
    try:
        s = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: give seconds")
    if s < 0:
        raise argparse.ArgumentTypeError("duration must not be negative")
    return s


def _size(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid string size {text!r}: give a number of bytes")
    if not 0 <= n <= 1 << 20:
        raise argparse.ArgumentTypeError("string size must be between 0 and 1048576 bytes")
    return n


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Trace the virtual system calls a process makes through "
                "the Linux vDSO (clock_gettime, gettimeofday, time, getcpu, getrandom, and i386's "
                "__kernel_vsyscall), which strace and ltrace cannot see.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    c = sub.add_parser("console", help="interactive console, attached to PID or a new command")
    c.add_argument("-p", "--pid", type=_pid)
    c.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD ARGS... to run under the console")

    t = sub.add_parser("trace", help="strace-like stream of vDSO calls")
    t.add_argument("-p", "--pid", type=_pids, help="PID[,PID...] to attach to")
    t.add_argument("-e", dest="funcs", metavar="FUNCS", action="append",
                   help="comma list of vDSO functions (clock_gettime, __vdso_time, !getcpu)")
    t.add_argument("-o", dest="output", metavar="FILE", help="write events to FILE")
    t.add_argument("--json", action="store_true", help="one JSON object per line")
    t.add_argument("-c", dest="summary", action="store_true",
                   help="print a per-function summary at the end")
    t.add_argument("-T", dest="timing", action="store_true", help="show time spent in each call")
    t.add_argument("-f", dest="follow_forks", action="store_true", help="follow forks")
    t.add_argument("--duration", type=_seconds, metavar="SECONDS",
                   help="detach by itself after SECONDS")
    t.add_argument("--hist", action="store_true",
                   help="at the end, latency histograms per function (per clock for "
                   "clock_gettime): log2 buckets in ns, fallbacks counted apart")
    t.add_argument("--perfetto", metavar="OUT",
                   help="also write a timeline to OUT (Chrome trace JSON, for ui.perfetto.dev "
                   "or chrome://tracing): a track per thread, a slice per call")
    t.add_argument("--signals", action="store_true",
                   help="also trace signal deliveries, handlers and sigreturns")
    t.add_argument("--stack", nargs="?", const=16, type=_depth, metavar="DEPTH",
                   help="add each call's stack (default depth 16)")
    t.add_argument("--inject", action="store_true",
                   help="record calls inside the tracee instead of stopping it at each call")
    t.add_argument("--no-pin", dest="pin", action="store_false",
                   help="do not move the tracer onto its tracee's CPU")
    t.add_argument("--no-demangle", dest="demangle", action="store_false",
                   help="keep C++/Rust symbol names raw (they are demangled by default)")
    t.add_argument("-s", dest="string_size", type=_size, default=32, metavar="SIZE",
                   help="bytes of a system call's buffer shown (i386 syscall events; "
                   "default 32, as strace)")
    t.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD ARGS... to run traced")

    a = sub.add_parser("auxv", help="the tracee's auxiliary vector, decoded")
    a.add_argument("-p", "--pid", type=_pid, required=True)
    a.add_argument("--json", action="store_true")

    v = sub.add_parser("vdso", help="the vDSO: base, build-id, symbols, the syscall gateway")
    g = v.add_mutually_exclusive_group(required=True)
    g.add_argument("-p", "--pid", type=_pid)
    g.add_argument("--file", metavar="FILE")
    v.add_argument("--json", action="store_true")

    d = sub.add_parser("dump", help="write the tracee's vDSO image to FILE")
    d.add_argument("-p", "--pid", type=_pid, required=True)
    d.add_argument("-o", dest="output", metavar="FILE", required=True)

    s = sub.add_parser("disas", help="disassemble one vDSO function")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("-p", "--pid", type=_pid)
    g.add_argument("--file", metavar="FILE")
    s.add_argument("symbol", metavar="SYMBOL")
    s.add_argument("--syntax", choices=("intel", "att"), default="intel")
    return p


def _read_file_image(path: str) -> bytes:
    from tracer.vdso import MAX_IMAGE
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_IMAGE + 1)
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file; give a vDSO image written by `{PROG} dump`")
    except IsADirectoryError:
        raise UsageError(f"{path}: is a directory; give a vDSO image file")
    except OSError as e:
        raise UsageError(f"{path}: {e.strerror}")
    if not data:
        raise UsageError(f"{path}: empty file, not a vDSO image")
    return data


def _cmd_auxv(ns: argparse.Namespace) -> int:
    from tracer import inspect
    from tracer.render.inspect import auxv_json, auxv_text
    with inspect.peek(ns.pid) as p:
        rep = inspect.read_auxv(p)
    out = auxv_json(ns.pid, p.abi.name, rep) if ns.json else auxv_text(ns.pid, p.abi.name, rep)
    print(out)
    return 0


def _load_image(ns: argparse.Namespace) -> tuple[object, int, int, object]:
    from tracer import inspect
    from tracer.vdso import parse_image
    if ns.file:
        image = parse_image(_read_file_image(ns.file))
        return image, 0, len(image.data), None
    with inspect.peek(ns.pid) as p:
        rep = inspect.read_auxv(p)
        mapping = inspect.find_vdso(ns.pid, rep.pairs)
        image = inspect.read_vdso(p, mapping)
    return image, mapping.base, mapping.size, mapping


def _cmd_vdso(ns: argparse.Namespace) -> int:
    from tracer.disasm import gateway
    from tracer.render.inspect import vdso_json, vdso_text
    image, base, size, mapping = _load_image(ns)
    gw = gateway(image)  # type: ignore[arg-type]
    if ns.json:
        print(vdso_json(image, base, size, gw, mapping,  # type: ignore[arg-type]
                        source=ns.file or f"pid {ns.pid}"))
    else:
        print(vdso_text(image, base, size, gw, mapping))  # type: ignore[arg-type]
    return 0


def _cmd_dump(ns: argparse.Namespace) -> int:
    from tracer import inspect
    with inspect.peek(ns.pid) as p:
        rep = inspect.read_auxv(p)
        mapping = inspect.find_vdso(ns.pid, rep.pairs)
        data = p.mem.read(mapping.base, mapping.size)
    from tracer.vdso import parse_image
    image = parse_image(data)  # refuse to write something that is not a vDSO
    try:
        with open(ns.output, "wb") as f:
            f.write(data)
    except OSError as e:
        raise UsageError(f"cannot write {ns.output}: {e.strerror}")
    print(f"wrote {len(data)} bytes of {image.soname or 'vDSO'} ({image.abi.name}) from "
          f"{mapping.base:#x} to {ns.output}", file=sys.stderr)
    return 0


def _cmd_disas(ns: argparse.Namespace) -> int:
    from tracer.disasm import disassemble
    from tracer.errors import UnknownFunction
    from tracer.render.inspect import disas_text
    from tracer.vdso import VdsoImage
    image, base, _, _ = _load_image(ns)
    assert isinstance(image, VdsoImage)
    func = image.function(ns.symbol)
    if func is None:
        names = ", ".join(sorted({n for f in image.functions for n in f.aliases}))
        raise UnknownFunction(f"no function {ns.symbol!r} in this vDSO; it exports: {names}")
    print(disas_text(func.symbol, base, disassemble(image, func, base, ns.syntax)))
    return 0


def _split_cmd(cmd: list[str]) -> list[str]:
    return cmd[1:] if cmd and cmd[0] == "--" else cmd


def _cmd_trace(ns: argparse.Namespace) -> int:
    from tracer.session import run_trace
    cmd = _split_cmd(ns.cmd)
    if ns.pid and cmd:
        raise UsageError("give either -p PID or -- CMD, not both")
    if not ns.pid and not cmd:
        raise UsageError("nothing to trace: give -p PID or -- CMD ARGS")
    return run_trace(ns, cmd)


def _cmd_console(ns: argparse.Namespace) -> int:
    from tracer.console.app import run_console
    cmd = _split_cmd(ns.cmd or [])
    if ns.pid and cmd:
        raise UsageError("give either -p PID or -- CMD, not both")
    return run_console(pid=ns.pid, cmd=cmd)


_COMMANDS = {"auxv": _cmd_auxv, "vdso": _cmd_vdso, "dump": _cmd_dump, "disas": _cmd_disas,
             "trace": _cmd_trace, "console": _cmd_console}


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
        # the reader went away (| head): nothing left to say
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0
