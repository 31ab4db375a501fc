"""The --inject code page, whatever the arch: what a stub's function occupies in it and how
each function's code is put there (tracer/inject/x86/ and tracer/inject/aarch64/ assemble the
code itself)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Protocol

from tracer.errors import TracerError
from tracer.inject import layout as L

__all__ = ["PlanError", "StubInfo", "CodePage", "Assembled", "align", "place_function"]


class PlanError(TracerError):
    """The vDSO is not the shape the injector can patch exactly."""


class Assembled(Protocol):
    """An arch's assembler once a stub is assembled in it."""

    def finish(self) -> bytes: ...

    def addr(self, label: str) -> int: ...


def align(x: int, a: int = 16) -> int:
    return (x + a - 1) & -a


@dataclass(frozen=True, slots=True)
class StubInfo:
    fid: int
    func_addr: int               # runtime_addr of the function's entry
    stub: int                    # runtime_addr of the stub
    window: tuple[int, int]      # [start, end): the instructions that touch the ring
    copy: tuple[int, int]        # runtime range of the body copy
    tail: tuple[int, int] = (0, 0)   # [after the call into the copy, after the stub's ret)
    # arm64 without LSE: the ldxr..stxr spans of its claim loops, which a single step cannot
    # get through (every step clears the exclusive monitor, so the stxr always fails), and
    # where a thread found in one goes instead: the stub's exit, nothing written to the ring
    exclusive: tuple[tuple[int, int], ...] = ()
    done: int = 0


@dataclass(frozen=True, slots=True)
class CodePage:
    data: bytes                  # CODE_SIZE bytes, the ring pointer word included
    stubs: tuple[StubInfo, ...]


def place_function(page: bytearray, code_base: int, at: int, fb_code: bytes, copy_at: int,
                   copy: bytes, s: Assembled, info: StubInfo) -> tuple[StubInfo, int]:
    """Put one function's fallback stubs (at `at`), relocated copy and stub (assembled in `s`,
    at info.stub) in the code page; the stub's tail span completes `info`. Returns it and
    where the next function's code starts."""
    stub_at = info.stub
    stub_code = s.finish()
    end = stub_at + len(stub_code) - code_base
    if end > L.CODE_SIZE:
        raise PlanError("the stubs do not fit in the code page")
    page[at:at + len(fb_code)] = fb_code
    page[copy_at - code_base:copy_at - code_base + len(copy)] = copy
    page[stub_at - code_base:end] = stub_code
    return dataclasses.replace(info, tail=(s.addr("tail"), stub_at + len(stub_code))), align(end)
