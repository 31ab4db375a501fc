"""One interface for the two ways a traced call reaches the engine: stop-based stubs (a stop
per call, read by the engine: `StopStubs` over breakpoints.Patcher, instrument/stubs.py) and
the in-tracee recorder (calls written to a shared ring and polled: tracer.inject.Recorder).
The engine holds one `Instrument` per address space (`_Space.instrument`), chosen in one place
(engine/instruments.py `Instruments.instrument`), and calls it without asking which it is: it
is installed, replanned over another function set and taken out through the same engine paths
(`Instruments.install`, `Instruments.uninstall`), a stop at an address or a marker stop is
asked of it (`stop_at`, `marker`), the loop drains whatever polls, a fork child's instrument is
made by it (`fork_child`) and the child cleaned of what it inherits, the vDSO moved by mremap
is followed, and the losses are reported the same way.

Both yield the same raw call record for a call: `tracer.inject.RawRecord` from a ring, the
same fields read at a stub's stop (engine/capture.py), with the function as an index into
the space's function list (`fid`).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Protocol

from tracer import target
from tracer.abi import Abi
from tracer.breakpoints import Bp, Patcher
from tracer.target import Regs
from tracer.vdso import VdsoFunction, VdsoImage

if TYPE_CHECKING:
    from tracer.inject import CallStats, RawRecord

__all__ = ["Instrument", "StopStubs", "Stopped", "StubHooks"]


class Stopped(Protocol):
    """A traced thread as an instrument's removal sees it (engine/state.py `_Thread`)."""
    tid: int
    stopped: bool           # in a ptrace stop the engine has not resumed
    regs: Regs              # its register buffer (read again before use)
    undo_trap: int          # the address of a trap it took that was not handled, or 0
    sig_in_vdso: bool       # a signal may have interrupted it in the vDSO or our code

    @property
    def space(self) -> _HasInstrument: ...


class _HasInstrument(Protocol):
    @property
    def instrument(self) -> Instrument: ...

    @property
    def patcher(self) -> Patcher: ...


@dataclass(frozen=True, slots=True)
class StubHooks:
    """What the stop-based stubs ask of the engine: the stop mechanism a process allows
    (pid, stopped tids, memory, abi, image, base -> marker stops, stubs may read the TSC,
    notices), stepping a stopped thread until a pc test is false (whether it got out), the
    guardian that undoes trap instructions if the tracer dies (watch, forget), and a notice (pid, tid,
    text) for the user."""
    stop_mechanism: Callable[[int, list[int], target.Memory, Abi, VdsoImage, int],
                             tuple[bool, bool, list[str]]]
    step_out: Callable[[int, Callable[[int], bool]], bool]
    guard: Callable[[int, target.Memory, Patcher], None]
    unguard: Callable[[int], None]
    notice: Callable[[int, int, str], None]


class Instrument(ABC):
    """The code vdsotrace puts into one address space, as the engine sees it."""
    polls: ClassVar[bool] = False       # calls arrive as records to poll, not as stops
    funcs: list[VdsoFunction]
    installed: bool

    @staticmethod
    def prepare(image: VdsoImage, base: int, size: int, funcs: list[VdsoFunction]) -> None:
        """Before attaching, while the process runs: do the planning an install will do, so
        that its first run (imports, caches) does not hold the stopped tracee. May raise."""

    @abstractmethod
    def install_in(self, tids: list[int]) -> list[str]:
        """Every thread of the process stopped: put the code in; notices for the user."""

    def uninstall(self, tids: list[int]) -> None:
        """Every thread in `tids` stopped: take the code out (the recorder's own removal)."""
        raise NotImplementedError

    def take_out(self, threads: Sequence[Stopped]) -> tuple[bool, list[str]]:
        """Every thread stopped (`threads` may hold other spaces' threads): take the code out.
        (whether all of it is out, notices). Not all out: what stays is harmless, and
        `reinstate` puts the rest back as it was."""
        tids = [th.tid for th in threads if th.space.instrument is self and th.stopped]
        if not tids:
            return False, ["no thread of the process could be stopped (waiting for a vfork "
                           "child?): the recorder stays in it"]
        self.uninstall(tids)
        for th in threads:
            if th.tid == tids[0] and th.space.instrument is self:
                th.stopped = True       # (the remote calls made through it leave it stopped)
        return True, []

    def reinstate(self) -> bool:
        """After a `take_out` that left part of the code in, or a failed switch to another
        instrument: put back what was taken out. Whether the instrument is in."""
        return self.installed

    def stop_at(self, pc: int) -> Bp | None:
        """What a trap stop (its trap instruction at `pc`) means: one of ours, or None (the tracee's)."""
        return None

    def marker(self, idx: int) -> Bp | None:
        """What a seccomp marker stop (marker number `idx`) means: one of ours, or None (the
        tracee's own filter's SECCOMP_RET_TRACE)."""
        return None

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

    def fork_child(self, child: int, mem: target.Memory, abi: Abi, patcher: Patcher,
                   hooks: StubHooks) -> StopStubs:
        """The instrument of a fork child's copy of the vDSO (`patcher`: the copy of the
        parent's patch taken at the fork, with its own planted state): the stop-based stubs
        over it, with the stop mechanism the parent's patch was planned with. Followed, it
        traces the child; unfollowed, it takes the copy's stubs out before the child runs."""
        mechanism = (patcher.marker_mode, patcher.tsc) if patcher.planted else None
        return StopStubs(child, mem, abi, patcher.image, patcher, patcher.funcs, hooks,
                         mechanism)

    def release_fork(self, child: int, mem: target.Memory) -> str | None:
        """An unfollowed fork child at its first stop: remove what it inherited from us
        (beyond the vDSO copy the engine restores); a notice when something must stay."""
        return None

    def leave_report(self) -> tuple[int, list[str]]:
        """(calls not recorded, notices) once the instrument is out or its process gone."""
        return 0, []


from tracer.instrument.stubs import StopStubs  # noqa: E402  (it builds on Instrument)
