"""The console's command table: names, usage, help, what each argument completes to; the
aliases; and the order in which vDSO symbols are offered."""
from __future__ import annotations

from dataclasses import dataclass

from tracer.vdso import VdsoImage, plain_name

__all__ = ["CommandSpec", "COMMANDS", "COMMAND_NAMES", "SPECS", "ALIASES", "rank_symbols"]

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
ALIASES = {"c": "continue", "cont": "continue", "b": "break", "d": "delete", "q": "quit",
            "exit": "quit", "h": "help", "?": "help", "i": "info", "disassemble": "disas",
            "where": "bt", "backtrace": "bt", "stop": "pause"}


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
