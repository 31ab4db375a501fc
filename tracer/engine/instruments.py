"""The instruments of the traced spaces: the one place that makes one (stop-based stubs or the
in-tracee recorder), installs it, replaces it and takes it out; the stop mechanism and the
guardian the stubs use; a vDSO moved by mremap followed."""
from __future__ import annotations

import time
from collections.abc import Callable

from tracer import arch as _arch, procfs, seccomp as _seccomp, target
from tracer.abi import Abi
from tracer.breakpoints import Patcher
from tracer.decoders import for_function
from tracer.engine.options import TraceOptions
from tracer.engine.recorders import Recorders
from tracer.engine.state import _fidx_by_name, _Space, _Thread
from tracer.engine.stats import Stats
from tracer.engine.threads import Threads
from tracer.errors import MemoryReadError, TracerError
from tracer.events import Event, NoticeEvent
from tracer.guardian import Guardian
from tracer.instrument import Instrument, StopStubs, StubHooks
from tracer.vdso import GATEWAY_SYMBOL, VdsoFunction, VdsoImage


class Instruments:
    """Owns the guardian (trap stops undone if the tracer dies) and the hooks the stop-based
    stubs are given; reads and writes the spaces of the thread table."""

    def __init__(self, options: TraceOptions, table: Threads, recorders: Recorders,
                 stats: Stats, sink: Callable[[Event], None]) -> None:
        self.options = options
        self.spaces = table.spaces
        self.stats = stats
        self._emit = sink
        self._drain_out = recorders._drain_out
        self._report_losses = recorders._report_losses
        self._guardian: Guardian | None = None     # for processes stopped on traps
        self.hooks = StubHooks(self._stop_mechanism, table.step_out, self._guard, self._unguard,
                               self._notice)

    def _notice(self, pid: int, tid: int, text: str) -> None:
        self._emit(NoticeEvent(pid, tid, time.time(), text))

    def stop_stubs(self, pid: int, mem: target.Memory, abi: Abi, image: VdsoImage,
                   patcher: Patcher) -> StopStubs:
        """The stop-based stubs over `patcher`, not planned yet."""
        return StopStubs(pid, mem, abi, image, patcher, patcher.funcs, self.hooks)

    def instrument_class(self, inject: bool | None = None) -> type[Instrument]:
        """Which instrumentation a new space gets: the in-tracee recorder (--inject; `inject`
        overrides the option) or the stop-based stubs."""
        if self.options.inject if inject is None else inject:
            from tracer.inject import Recorder
            return Recorder
        return StopStubs

    def instrument(self, inject: bool | None, pid: int, mem: target.Memory, abi: Abi,
                   image: VdsoImage, patcher: Patcher, funcs: list[VdsoFunction],
                   prev: Instrument | None = None) -> Instrument:
        """The one place that makes an instrument, for `funcs` (not installed yet): of the
        class `instrument_class` chooses; the stop-based stubs `prev` (replanned over
        another set) keep their stop mechanism."""
        cls = self.instrument_class(inject)
        if cls is not StopStubs:
            _arch.check_traceable(abi, inject=True)
            from tracer.inject import Recorder
            # the in-tracee recorder patches the entries itself; the patcher only names the
            # functions (nothing of it is planted). i386's gateway is not recorded in the
            # tracee (its calls may block; the stop-based engine shows them as syscall events)
            funcs = [f for f in funcs if f.symbol != GATEWAY_SYMBOL]
            patcher.funcs = list(funcs)
            return Recorder(pid, mem, abi, image, patcher.base, funcs, lossy=self.options.lossy)
        stubs = prev if isinstance(prev, StopStubs) else self.stop_stubs(pid, mem, abi, image,
                                                                         patcher)
        stubs.funcs = funcs
        return stubs

    def install(self, space: _Space, inst: Instrument, tids: list[int]) -> None:
        """Put `inst` into the space (every thread in `tids` stopped; the first one makes the
        remote calls an install needs): it becomes the space's instrument, its functions the
        space's function list. Its notices wait in `space.notices`."""
        space.notices += inst.install_in(tids)
        space.instrument = inst
        funcs = inst.funcs
        space.decoders = [for_function(f.plain) for f in funcs]
        space.is_gateway = [f.symbol == GATEWAY_SYMBOL for f in funcs]
        space.fidx_by_name = _fidx_by_name(space)
        space.args_cache.clear()
        self.stats.track(f.plain for f in funcs)

    def uninstall(self, space: _Space, threads: list[_Thread]) -> bool:
        """Every thread stopped: take the space's instrument out, what it recorded drained
        and its losses reported (`threads` may hold other spaces' threads). Returns whether
        all of it is out (else what stays is harmless: `Instrument.take_out`)."""
        inst = space.instrument
        if not inst.installed:
            return True
        self._drain_out()
        out, notes = inst.take_out(threads)
        for text in notes:
            self._emit(NoticeEvent(space.pid, space.pid, time.time(), text))
        if out:
            self._drain_out()
        self._report_losses(space)      # (an instrument left in place counts its own too)
        return out

    def replace_instrument(self, space: _Space, threads: list[_Thread], inject: bool | None,
                           funcs: list[VdsoFunction]) -> None:
        """Every thread stopped: take the space's instrument out and install one of the class
        `inject` chooses (None: of the same class; the stop-based stubs replanned) over
        `funcs`. When either step fails, the old instrument is put back as far as it can be
        and the error raised."""
        old = space.instrument
        if inject:
            _arch.check_traceable(space.abi, inject=True)      # before anything is taken out
        if not self.uninstall(space, threads):
            old.reinstate()
            raise TracerError("a thread is inside a traced call right now: try again")
        mine = [th for th in threads if th.space is space]
        for th in mine:
            th.pending.clear()
            th.fb_marks.clear()
        new = self.instrument(old.polls if inject is None else inject, space.pid, space.mem,
                              space.abi, space.image, space.patcher, funcs, prev=old)
        try:
            self.install(space, new, [th.tid for th in mine])
        except TracerError:
            old.reinstate()
            raise

    def _stop_mechanism(self, pid: int, tids: list[int], mem: target.Memory, abi: Abi,
                        image: VdsoImage, base: int) -> tuple[bool, bool, list[str]]:
        """(marker stops, stubs may read the TSC, notices): the marker filter is installed
        when it can be (seccomp.py); the TSC is probed without a system call (tsc.py)."""
        from tracer.tsc import tsc_usable
        notes: list[str] = []
        scratch = base + ((image.image_size + 15) & ~15)
        modes = _seccomp.seccomp_modes(pid, tids)
        use_tsc = not abi.counter_may_fault() or (
            1 not in modes and tsc_usable(tids, mem, scratch, arch=abi))
        if not use_tsc:
            notes.append(f"process {pid} has the time-stamp counter disabled (prctl PR_SET_TSC "
                         "or seccomp strict mode): call durations read 0")
        unsupported = abi.marker_stops()
        if unsupported is not None:
            notes.append(f"process {pid} would not survive a SIGKILL of vdsotrace ({unsupported})")
            return False, use_tsc, notes
        why = _seccomp.ensure(pid, tids, mem, abi, scratch, _seccomp.syscall_site(image, base),
                              _seccomp.MARKER_SPAN)
        if why is not None:
            notes.append(f"process {pid} would not survive a SIGKILL of vdsotrace (it stops on "
                         f"int3 breakpoints, not on seccomp markers: {why})")
        return why is None, use_tsc, notes

    def _guard(self, pid: int, mem: target.Memory, patcher: Patcher) -> None:
        """Trap stops: a guardian undoes them if the tracer dies (guardian.py)."""
        if self._guardian is None:
            self._guardian = Guardian()
        self._guardian.watch(pid, mem.fd, patcher.undo_int3s())

    def _unguard(self, pid: int) -> None:
        if self._guardian is not None:
            self._guardian.forget(pid)

    def forget(self, pid: int) -> None:
        """The process exited or exec'd: the guardian has nothing to undo in it any more."""
        self._unguard(pid)

    def close(self) -> None:
        """Every process let go: the guardian ends."""
        if self._guardian is not None:
            self._guardian.close()
            self._guardian = None

    # ------------------------------------------------------------------ mremap
    def follow_vdso(self, space: _Space) -> bool:
        """Is the vDSO still where we patched it? No ptrace event tells of an mremap: the
        [vdso] line of /proc/PID/maps does. If it moved with its bytes, follow it there
        (every address of the patch moves with it); if it is gone or is not the image we
        patched, nothing is written where it was. Says so in a notice either way. Returns
        whether restoring writes may be made."""
        if space.vdso_lost:
            return False
        try:
            maps = procfs.read_maps(space.pid)
        except OSError:
            return True                 # gone: any write fails with ProcessGone
        vmap = next((m for m in maps if m.path == "[vdso]"), None)
        old = space.base
        if vmap is not None and vmap.start == old:
            return True
        if vmap is not None and vmap.size == space.size and self._same_image(space, vmap.start):
            delta = vmap.start - old
            patcher = space.patcher
            if patcher.base == old:
                patcher.rebase(delta)
            for sp in self.spaces.values():
                if sp.patcher is patcher:          # a vfork child shares the memory
                    sp.base = vmap.start
            space.base = vmap.start
            space.instrument.rebase(delta)
            space.modules = None
            self._emit(NoticeEvent(space.pid, space.pid, time.time(),
                                   f"the vDSO moved from {old:#x} to {vmap.start:#x} (mremap): "
                                   "vdsotrace follows it there"))
            return True
        msg = (f"the process unmapped its vDSO (at {old:#x}): nothing of it is left to "
               "restore, and nothing is written there any more" if vmap is None else
               f"the vDSO moved from {old:#x} to {vmap.start:#x} and is not the image "
               "vdsotrace patched: its patches cannot be restored (nothing is written at "
               "either address)")
        self._emit(NoticeEvent(space.pid, space.pid, time.time(), msg))
        space.vdso_lost = True
        space.patcher.planted = False
        space.patcher.pad_used = b""
        space.instrument.lose_vdso()
        return False

    def _same_image(self, space: _Space, start: int) -> bool:
        """The bytes at `start` are our patched image: the original outside what we wrote."""
        size = space.image.image_size
        try:
            live = bytearray(space.mem.read(start, size))
        except MemoryReadError:
            return False
        want = bytearray(space.image.data[:size])
        written = [(a - space.base, len(new)) for a, new, _ in space.patcher.patches]
        written += space.instrument.patched_ranges(space.base)
        for off, n in written:
            if 0 <= off < size:
                live[off:off + n] = want[off:off + n]
        return live == want
