"""One interface for the two ways a traced call reaches the engine: stop-based stubs (a stop
per call, read by the engine: breakpoints.Patcher) and the in-tracee recorder (calls written
to a shared ring and polled: tracer.inject.Recorder). The engine holds one `Instrument` per
address space (`_Space.instrument`) and calls it without asking which it is: the loop drains
whatever polls, a fork child is cleaned of what it inherits, the vDSO moved by mremap is
followed, and the losses are reported the same way.

Both yield the same raw call record for a call: `tracer.inject.RawRecord` from a ring, the
same fields read at a stub's stop (engine/capture.py), with the function as an index into
the space's function list (`fid`).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar

from tracer import target
from tracer.abi import Abi
from tracer.breakpoints import Patcher
from tracer.decoders import for_function
from tracer.vdso import VdsoFunction, VdsoImage

if TYPE_CHECKING:
    from tracer.inject import CallStats, RawRecord

__all__ = ["Instrument", "StopStubs"]


class Instrument(ABC):
    """The code vdsotrace puts into one address space, as the engine sees it."""
    polls: ClassVar[bool] = False       # calls arrive as records to poll, not as stops
    funcs: list[VdsoFunction]
    installed: bool

    @abstractmethod
    def install_in(self, tids: list[int]) -> list[str]:
        """Every thread of the process stopped: put the code in; notices for the user."""

    def owns_markers(self) -> bool:
        """A seccomp marker stop in this space is one of this instrument's (else the
        tracee's own filter's SECCOMP_RET_TRACE)."""
        return False

    def drain(self, limit: int = 65536) -> list[RawRecord]:
        """Calls recorded since the last drain, at most `limit`."""
        return []

    def drain_stats(self, stats: dict[str, CallStats], limit: int = 1 << 20) -> int:
        """-c: add what was recorded to `stats` without building records; how many."""
        return 0

    def heartbeat(self) -> None:
        """The tracer is alive and draining (the recorder's stubs wait for room only then)."""

    def stop_recording(self) -> None:
        """Before stopping the tracee to leave: record nothing more (the process runs on)."""

    def producers_stopped(self) -> None:
        """No thread can record a call any more (all stopped, or the process gone)."""

    def abandon(self) -> None:
        """The process exited or exec'd: drop the tracer's own handles on it."""

    def rebase(self, delta: int) -> None:
        """The vDSO moved (mremap) with our code in it."""

    def lose_vdso(self) -> None:
        """The vDSO was unmapped or replaced: never write where it was."""

    def patched_ranges(self, base: int) -> list[tuple[int, int]]:
        """(offset from the vDSO's base, length) of the bytes written into the vDSO beyond
        the space's Patcher's own."""
        return []

    def release_fork(self, child: int, mem: target.Memory) -> str | None:
        """An unfollowed fork child at its first stop: remove what it inherited from us
        (beyond the vDSO copy the engine restores); a notice when something must stay."""
        return None

    def leave_report(self) -> tuple[int, list[str]]:
        """(calls not recorded, notices) once the instrument is out or its process gone."""
        return 0, []


class StopStubs(Instrument):
    """Stop-based stubs (breakpoints.Patcher): the entries jump to stubs in the vDSO's padding
    that stop once per call, on return (or int3s, or seccomp marker stops). Installing plans
    the patches with the stop mechanism the process allows, steps every thread out of the
    bytes about to be replaced, plants, and has a guardian undo int3s if the tracer dies."""

    def __init__(self, pid: int, mem: target.Memory, abi: Abi, image: VdsoImage,
                 patcher: Patcher, funcs: list[VdsoFunction],
                 stop_mechanism: Callable[[int, list[int], target.Memory, Abi, VdsoImage, int],
                                          tuple[bool, bool, list[str]]],
                 step_out: Callable[[int, Callable[[int], bool]], bool],
                 guard: Callable[[int, target.Memory, Patcher], None]) -> None:
        self.pid = pid
        self.mem = mem
        self.abi = abi
        self.image = image
        self.patcher = patcher
        self.funcs = funcs
        self._stop_mechanism = stop_mechanism
        self._step_out = step_out
        self._guard = guard

    def install_in(self, tids: list[int]) -> list[str]:
        p = self.patcher
        markers, use_tsc, notes = self._stop_mechanism(self.pid, tids, self.mem, self.abi,
                                                       self.image, p.base)
        p.plan(self.funcs, [for_function(f.plain).nargs for f in self.funcs],
               markers=markers, tsc=use_tsc)
        for tid in tids:
            self._step_out(tid, p.in_detour)
        p.plant(self.mem)
        if not markers:
            self._guard(self.pid, self.mem, p)
        return notes

    @property
    def installed(self) -> bool:      # type: ignore[override]
        return self.patcher.planted

    def owns_markers(self) -> bool:
        return True
