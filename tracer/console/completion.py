"""Tab completion: command names, then each command's arguments (vDSO symbols in both their
plain and `__vdso_` forms, traced functions, files, pids, on/off...)."""
from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

from prompt_toolkit.completion import CompleteEvent, Completer, Completion, PathCompleter
from prompt_toolkit.document import Document

from tracer import procfs
from tracer.console.commands import SPECS, COMMAND_NAMES, Console
from tracer.render.escape import escape_text

__all__ = ["ConsoleCompleter"]

_WORDS = {
    "onoff": ("on", "off"),
    "syntax": ("intel", "att"),
    "info": ("threads",),
}


class ConsoleCompleter(Completer):
    """Completions in a fixed, ranked order (the most used first): Tab takes the first."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self._paths = PathCompleter(expanduser=True)

    def get_completions(self, document: Document, complete_event: CompleteEvent
                        ) -> Iterator[Completion]:
        text = document.text_before_cursor
        words = text.split()
        if text.endswith(" ") or not text:
            words.append("")
        if len(words) <= 1:
            yield from _prefixed(COMMAND_NAMES, words[0] if words else "")
            return
        spec = SPECS.get(words[0])
        if spec is None:
            return
        word, nth = words[-1], len(words) - 1
        kind = spec.args
        if kind == "file" and nth == 1:
            sub = Document(word, len(word))
            yield from self._paths.get_completions(sub, complete_event)
        elif kind == "symbol" and nth == 1:
            yield from _prefixed(self.console.state.symbols, word)
        elif kind == "func":
            yield from _prefixed(("all",) + self.console.state.symbols, word, exclude=words[1:-1])
        elif kind == "traced":
            yield from _prefixed(self.console.traced(), word, exclude=words[1:-1])
        elif kind == "command" and nth == 1:
            yield from _prefixed(COMMAND_NAMES, word)
        elif kind in _WORDS and nth == 1:
            yield from _prefixed(_WORDS[kind], word)
        elif kind == "filter":
            if nth == 1:
                yield from _prefixed(("tid", "func", "off"), word)
            elif words[1] == "tid":
                yield from _prefixed([str(t) for t in self.console.thread_ids()], word)
            elif words[1] == "func":
                yield from _prefixed(self.console.traced() or self.console.state.symbols, word,
                                     exclude=words[2:-1])
        elif kind == "pid" and nth == 1:
            yield from _pids(word)


def _prefixed(names: Iterable[str], word: str, exclude: Iterable[str] = ()) -> Iterator[Completion]:
    skip = set(exclude)
    seen: set[str] = set()
    for n in names:
        if n.startswith(word) and n not in skip and n not in seen:
            seen.add(n)
            yield Completion(n, start_position=-len(word))


def _pids(word: str) -> Iterator[Completion]:
    """User processes, newest first, with their names."""
    me = os.getpid()
    pids = sorted((int(d) for d in os.listdir("/proc") if d.isdigit() and d.startswith(word)),
                  reverse=True)
    for pid in pids[:200]:
        if pid == me:
            continue
        try:
            st = procfs.read_stat(pid)
        except (OSError, ValueError, IndexError):
            continue
        if st.flags & procfs.PF_KTHREAD:
            continue
        yield Completion(str(pid), start_position=-len(word), display_meta=escape_text(st.comm))
