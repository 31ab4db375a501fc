"""The console's terminal side: a PromptSession over `Console`, events streamed above the prompt
through `patch_stdout` by a pump thread, a toolbar redrawn twice a second."""
from __future__ import annotations

import os
import signal
import sys
import threading
from types import FrameType
from collections.abc import Callable

from prompt_toolkit import PromptSession
from prompt_toolkit.auto_suggest import AutoSuggestFromHistory
from prompt_toolkit.history import FileHistory, History, InMemoryHistory
from prompt_toolkit.input import Input
from prompt_toolkit.output import Output
from prompt_toolkit.patch_stdout import patch_stdout

from tracer.console.commands import Console
from tracer.console.completion import ConsoleCompleter
from tracer.console.keys import console_bindings
from tracer.console.layout import console_style, prompt_message, toolbar
from tracer.console.state import history_path
from tracer.errors import TracerError

__all__ = ["run_console", "make_prompt", "repl", "Pump", "open_history"]

TICK = 0.1            # seconds between drains of the event stream
REFRESH_TICKS = 5     # toolbar numbers every REFRESH_TICKS drains


def open_history() -> History:
    """The persistent history, or one in memory when its directory cannot be made."""
    path = history_path()
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        with open(path, "a"):
            pass
    except OSError:
        return InMemoryHistory()
    return FileHistory(path)


def make_prompt(console: Console, *, input: Input | None = None, output: Output | None = None,
                history: History | None = None) -> PromptSession[str]:
    return PromptSession(
        message=lambda: prompt_message(console.state),
        bottom_toolbar=lambda: toolbar(console.state),
        completer=ConsoleCompleter(console),
        complete_while_typing=False,
        key_bindings=console_bindings(console),
        history=history if history is not None else InMemoryHistory(),
        auto_suggest=AutoSuggestFromHistory(),
        style=console_style(),
        include_default_pygments_style=False,
        refresh_interval=0.5,
        input=input, output=output,
    )


class Pump(threading.Thread):
    """Prints new events (through the patched stdout: above the prompt, never inside the line
    being typed) and refreshes the toolbar's numbers."""

    def __init__(self, console: Console, write: Callable[[str], object]) -> None:
        super().__init__(name="vdsotrace-console-pump", daemon=True)
        self.console = console
        self.write = write
        self._stop_evt = threading.Event()

    def run(self) -> None:
        n = 0
        while not self._stop_evt.wait(TICK):
            self.flush()
            n += 1
            if n % REFRESH_TICKS == 0:
                try:
                    self.console.refresh()
                except TracerError as e:
                    self.write(f"error: {e}\n")
        self.flush()

    def flush(self) -> None:
        lines = self.console.drain()
        if lines:
            self.write("\n".join(lines) + "\n")

    def stop(self) -> None:
        self._stop_evt.set()
        self.join(2.0)


def _raise_exit(signo: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signo)


def run_console(pid: int | None = None, cmd: list[str] | None = None, *,
                input: Input | None = None, output: Output | None = None) -> int:
    """The interactive console; attached first to PID or to CMD when given. Returns the exit
    code. An attach that fails raises (the CLI prints it) before any prompt is shown."""
    def out(text: str) -> None:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()

    console = Console(out)
    if pid is not None or cmd:
        console.attach(pid=pid, cmd=cmd or None)
    prompt = make_prompt(console, input=input, output=output,
                         history=open_history() if input is None else None)
    old = {s: signal.signal(s, _raise_exit) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        with patch_stdout(raw=True):
            pump = Pump(console, lambda t: (sys.stdout.write(t), sys.stdout.flush()))
            pump.start()
            try:
                repl(console, prompt)
            finally:
                pump.stop()
                console.shutdown()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return 0


def repl(console: Console, prompt: PromptSession[str]) -> None:
    """Read and run command lines until `quit` or Ctrl-D."""
    while not console.done:
        try:
            line = prompt.prompt()
        except KeyboardInterrupt:      # Ctrl-C is bound; this is a SIGINT from elsewhere
            console.pause()
            continue
        except EOFError:               # Ctrl-D on an empty line: as `quit`, which stays when
            console.execute("quit")    # the engine could not detach (it says why)
            continue
        try:
            console.execute(line)
        except KeyboardInterrupt:      # Ctrl-C while a command ran (the terminal was cooked)
            paused = console.pause()
            console.write("interrupted" + ("; the process is paused" if paused else ""))
