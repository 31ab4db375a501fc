"""The console's inspection commands (auxv, vdso, disas, dump, maps, info threads, x): the
commands of tracer/commands/inspect.py, read through the engine while it traces the process
(its memory, the vDSO image as it was before any breakpoint) and through a short ptrace peek
otherwise."""
from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from tracer import procfs
from tracer.commands import inspect as cmds
from tracer.console.eventfmt import paint
from tracer.console.specs import rank_symbols
from tracer.console.state import ConsoleState
from tracer.console.stream import EventStream
from tracer.errors import ProcessGone, TracerError, UsageError
from tracer.render.reports import ThreadRow, hexdump, threads_text
from tracer.vdso import VdsoImage

if TYPE_CHECKING:
    from tracer.engine.control import Control

__all__ = ["Attached", "Inspection", "wait", "number", "ENGINE_TIMEOUT"]

ENGINE_TIMEOUT = 20.0        # seconds to wait for the engine thread to answer
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Attached:
    """The engine tracing the console's process, and what it saw at attach."""
    control: Control
    thread: threading.Thread          # the engine's
    image: VdsoImage                  # the vDSO as read at attach: no breakpoint in it
    base: int


def wait(fut: Future[T], timeout: float = ENGINE_TIMEOUT) -> T:
    """The engine's answer (its error raised here)."""
    try:
        return fut.result(timeout)
    except FutureTimeout as e:
        raise TracerError(f"the engine did not answer within {timeout:.0f} s") from e


def number(text: str, what: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise UsageError(f"{what} {text!r} is not a number") from None


class Inspection:
    def __init__(self, state: ConsoleState, stream: EventStream,
                 attached: Callable[[], Attached | None], write: Callable[[str], None]) -> None:
        self.state = state
        self._stream = stream
        self._attached = attached
        self._write = write

    def handlers(self) -> dict[str, Callable[[list[str]], None]]:
        return {"auxv": self.cmd_auxv, "vdso": self.cmd_vdso, "disas": self.cmd_disas,
                "dump": self.cmd_dump, "maps": self.cmd_maps, "info": self.cmd_info,
                "x": self.cmd_x}

    def _target_pid(self) -> int:
        if self.state.pid is None:
            raise UsageError("no process: `attach PID` first")
        return self.state.pid

    def view(self) -> cmds.VdsoView:
        """The vDSO: while attached, the image read at attach time (the bytes as they were
        before any breakpoint); otherwise read now (and its symbols offered to Tab)."""
        pid = self._target_pid()
        a = self._attached()
        if a is not None:
            from tracer import inspect
            try:
                mapping: inspect.VdsoMapping | None = inspect.find_vdso(pid, [])
            except (OSError, TracerError):
                mapping = None
            size = mapping.size if mapping is not None else len(a.image.data)
            return cmds.VdsoView(a.image, a.base, size, mapping, f"pid {pid}")
        v = cmds.peek_vdso(pid)
        self.state.symbols = rank_symbols(v.image)
        return v

    def cmd_auxv(self, args: list[str]) -> None:
        pid = self._target_pid()
        a = self._attached()
        if a is not None:
            rep = wait(a.control.read_auxv())
            abi = a.image.abi.name
        else:
            abi, rep = cmds.peek_auxv(pid)
        text = cmds.auxv_output(pid, abi, rep)
        self._write(text.replace("AT_SYSINFO_EHDR", paint("AT_SYSINFO_EHDR", "func",
                                                          self.state.color)))

    def cmd_vdso(self, args: list[str]) -> None:
        self._write(cmds.vdso_output(self.view()))

    def cmd_disas(self, args: list[str]) -> None:
        if len(args) != 1:
            raise UsageError("usage: disas SYMBOL (Tab completes the names)")
        text = cmds.disas_output(self.view(), args[0], self.state.syntax)
        if self.state.color:
            text = "\n".join(paint(ln, "fallback", True) if "enters the kernel" in ln else ln
                             for ln in text.splitlines())
        self._write(text)

    def cmd_dump(self, args: list[str]) -> None:
        if len(args) != 1:
            raise UsageError("usage: dump FILE")
        v = self.view()
        self._write(cmds.write_image(v, os.path.expanduser(args[0])))

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
        self._write("\n".join(lines))

    def cmd_info(self, args: list[str]) -> None:
        if args[:1] not in (["threads"], ["thread"]):
            raise UsageError("usage: info threads")
        pid = self._target_pid()
        a = self._attached()
        if a is not None:
            tids = list(a.control.snapshot().threads)
        else:
            try:
                tids = procfs.list_tasks(pid)
            except FileNotFoundError:
                raise ProcessGone(f"process {pid} is gone") from None
        rows: list[ThreadRow] = []
        for tid in tids:
            try:
                stt = procfs.read_stat(pid, tid)
                rows.append((tid, stt.state, stt.comm))
            except OSError:
                rows.append((tid, "gone", "?"))
        self._write(threads_text(pid, rows, self._stream.tid_calls, self._stream.tid_last))

    def _address(self, text: str) -> int:
        sym, plus, off = text.partition("+")
        try:
            return int(text, 0)
        except ValueError:
            pass
        v = self.view()
        f = v.image.function(sym)
        if f is None:
            raise UsageError(f"{text!r} is neither an address nor a vDSO symbol")
        return v.base + f.image_offset + (number(off, "offset") if plus else 0)

    def cmd_x(self, args: list[str]) -> None:
        if not 1 <= len(args) <= 2:
            raise UsageError("usage: x ADDR|SYMBOL[+OFF] [N]")
        addr = self._address(args[0])
        n = number(args[1], "count") if len(args) > 1 else 64
        if not 1 <= n <= 65536:
            raise UsageError("count must be between 1 and 65536")
        pid = self._target_pid()
        a = self._attached()
        if a is not None:
            data = wait(a.control.read_memory(addr, n))
        else:
            data = cmds.read_memory(pid, addr, n)
        self._write(hexdump(addr, data))
