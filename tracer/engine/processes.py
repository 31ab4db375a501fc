"""Processes: attach and spawn, one traced address space set up (the vDSO found, parsed and
patched by the chosen engine), its threads registered, the attach event."""
from __future__ import annotations

import os
import signal
import time

from tracer import arch as _arch, procfs, seccomp as _seccomp, sigtrack, symload, target
from tracer.abi import Abi
from tracer.auxv import auxv_from_stack, find, parse_auxv
from tracer.breakpoints import Patcher
from tracer.consts import AuxType
from tracer.decoders import for_function
from tracer.disasm import gateway as find_gateway
from tracer.engine.options import resolve_functions, timens_offsets
from tracer.engine.state import _fidx_by_name, _Space, _Thread
from tracer.errors import AuxvError, ElfError, ProcessGone, TracerError, UsageError, VdsoError
from tracer.events import AttachEvent, NoticeEvent
from tracer.guardian import Guardian
from tracer.instrument import Instrument, StopStubs
from tracer.vdso import GATEWAY_SYMBOL, parse_image, VdsoFunction, VdsoImage
from tracer.engine.core import EngineCore


def refuse_untraceable(pids: list[int], inject: bool = False) -> None:
    """UnsupportedArch (one line saying what to do) when the engine (with `inject`, the
    in-tracee recorder) is not written for the arch of processes `pids` or, with none (a
    command to start), of a child of ours, which runs the tracer's own arch (or its compat
    one)."""
    if not pids:
        _arch.check_traceable(_arch.native(), inject)
    for pid in pids:
        if procfs.exe_elf_class(pid) is not None:     # else attaching says what is wrong
            _arch.check_traceable(target.abi_of(pid), inject)


class Processes(EngineCore):
    def _options(self) -> int:
        # Fork events are always wanted: a child inherits every int3 and must be cleaned.
        # PTRACE_O_TRACESECCOMP: the marker stops (seccomp.py)
        return int(target.DEFAULT_OPTIONS | target.FORK_OPTIONS | target.SECCOMP_OPTION)

    def attach(self, pid: int) -> None:
        try:
            tgid = int(procfs.read_status(pid).get("Tgid", pid))
        except (OSError, ValueError):
            tgid = pid
        if pid in self.threads or tgid in self.spaces:
            what = (f"{pid} is a thread of process {tgid}, which this vdsotrace already traces"
                    if tgid != pid else f"process {pid} is already traced by this vdsotrace")
            raise UsageError(f"{what} (every thread of a process is followed): give each "
                             "process once to -p")
        if tgid > 0:
            pid = tgid          # a thread's id stands for its process (strace -p does so)
        refuse_untraceable([pid], self.options.inject)      # before the process is touched
        # Parse the objects it maps now, while it runs: naming a call (or unwinding it) must
        # never wait for a parse while the tracee waits for us (node: over a second).
        symload.warm(pid, cfi=bool(self.options.stack_depth))
        self._prepare(pid)
        t0 = time.monotonic()           # setup_ms: from the seize to running again
        tids, pending = target.attach_process(pid, self._options())
        if self.root_pid is None:
            self.root_pid = pid
        try:
            space = self._new_space(pid, tids[0] if pid not in tids else pid, tids=tids)
            for tid in tids:
                self._add_thread(tid, space).sig_in_vdso = False
            if self.root_pid == pid:
                self._pin(pid)
        except BaseException:
            for t in tids:
                self.threads.pop(t, None)
                try:
                    target.detach(t)
                except (ProcessGone, OSError):
                    pass
            self.spaces.pop(pid, None)
            raise
        self.state = "running"
        for tid, status in pending.items():
            th = self.threads.get(tid)
            if th is not None:
                self._dispatch(tid, status)
        for th in list(self.threads.values()):
            if th.stopped:
                self._resume(th)
        self._preload(space)
        self._emit_attach(space, spawned=False, t0=t0)

    def _prepare(self, pid: int) -> None:
        """Before seizing: parse the vDSO and plan its patches from a read through
        /proc/PID/mem (root may read a process it does not trace), so that doing it again
        while every thread is stopped finds both in parse_image's and disasm's caches. A
        failure other than a bad -e is met again, and reported, on the real path."""
        try:
            vmap = next((m for m in procfs.read_maps(pid) if m.path == "[vdso]"), None)
            if vmap is None:
                return
            mem = target.Memory(pid)
            try:
                image = parse_image(mem.read(vmap.start, vmap.size))
            finally:
                mem.close()
        except (OSError, TracerError):
            return
        # an unknown or empty -e is refused before the process is touched at all
        funcs = resolve_functions(image, self.options.funcs)
        try:
            self._instrument_class().prepare(image, vmap.start, vmap.size, funcs)
        except (OSError, TracerError):
            pass

    def _preload(self, space: _Space) -> None:
        """Have the symbols (and CFI) of every object the tracee maps, and of those it maps in
        the next moments (the C library, after exec), parsed in the background, not at the
        first call, whose naming would otherwise hold up the engine and every stopped thread."""
        symload.warm_later(space.pid, cfi=bool(self.options.stack_depth))
        try:
            self.symbols.modules(space, space.base)
        except (OSError, ElfError):
            pass

    def spawn(self, argv: list[str]) -> None:
        refuse_untraceable([], self.options.inject)         # before the child exists
        t0 = time.monotonic()
        pid = target.spawn(argv, self._options())
        self.root_pid = pid
        try:
            # At the exec event the thread is still inside execve's exit path, where a
            # system call made for the recorder (or the marker filter) does not run: step
            # one instruction first.
            target.singlestep(pid)
            target.wait(pid)
            space = self._new_space(pid, pid)
            self._add_thread(pid, space).sig_in_vdso = False
            self._pin(pid)
        except BaseException:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
            raise
        self.state = "running"
        self._preload(space)
        self._emit_attach(space, spawned=True, t0=t0)
        self._resume(self.threads[pid])

    def _pin(self, pid: int) -> None:
        """Share a CPU with the tracee: a stop costs about 2.2x less (anchors/README.md).
        With --inject there are no stops: take the other CPU."""
        if not self.options.pin:
            return
        try:
            cpu = procfs.read_stat(pid).processor
            allowed = os.sched_getaffinity(0)
            space = self.spaces.get(pid)
            if space is not None and space.instrument.polls:
                # no stops to share a CPU for: drain the ring beside the tracee, not on its CPU
                others = allowed - {cpu}
                if others:
                    os.sched_setaffinity(0, {min(others)})
                return
            if cpu in allowed and len(allowed) > 1:
                os.sched_setaffinity(0, {cpu})
        except OSError:
            pass

    def _read_pairs(self, pid: int, mem: target.Memory, abi: Abi) -> list[tuple[int, int]]:
        try:
            return parse_auxv(procfs.read_auxv_file(pid), abi.word)
        except (OSError, AuxvError):
            start = procfs.read_stat(pid).start_stack
            return auxv_from_stack(mem.read, start, abi.word)

    def _new_space(self, pid: int, regs_tid: int, traced: bool = True,
                   tids: list[int] | None = None, inject: bool | None = None) -> _Space:
        host = _arch.native()           # whose register layout ptrace fills
        regs = host.new_regs()
        host.regs_get(regs_tid, regs)
        abi = target.abi_of(pid, regs)
        _arch.check_traceable(abi)
        mem = target.Memory(pid)
        try:
            pairs = self._read_pairs(pid, mem, abi)
            base = find(pairs, AuxType.AT_SYSINFO_EHDR)
            maps = procfs.read_maps(pid)
            vmap = next((m for m in maps if m.path == "[vdso]"), None)
            if vmap is None or not base:
                raise VdsoError(f"process {pid} has no vDSO mapped: nothing to trace")
            image = parse_image(mem.read(vmap.start, vmap.size))
            funcs = resolve_functions(image, self.options.funcs)
            patcher = Patcher(image, vmap.start, vmap.size)
            inst = self._instrument(inject, pid, mem, abi, image, patcher, funcs)
            space = _Space(pid, abi, mem, image, vmap.start, vmap.size, patcher, inst,
                           traced=traced)
            self._install(space, inst, [regs_tid] + [t for t in tids or [] if t != regs_tid])
        except BaseException:
            mem.close()
            raise
        space.timens = timens_offsets(pid)
        if self.options.signals:
            space.signals = sigtrack.SignalTracker(abi)
        self.spaces[pid] = space
        return space

    def _install(self, space: _Space, inst: Instrument, tids: list[int]) -> None:
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

    def _replace_instrument(self, space: _Space, threads: list[_Thread], inject: bool | None,
                            funcs: list[VdsoFunction]) -> None:
        """Every thread stopped: take the space's instrument out and install one of the class
        `inject` chooses (None: of the same class; the stop-based stubs replanned) over
        `funcs`. When either step fails, the old instrument is put back as far as it can be
        and the error raised."""
        old = space.instrument
        if inject:
            _arch.check_traceable(space.abi, inject=True)      # before anything is taken out
        if not self._uninstall(space, threads):
            old.reinstate()
            raise TracerError("a thread is inside a traced call right now: try again")
        mine = [th for th in threads if th.space is space]
        for th in mine:
            th.pending.clear()
            th.fb_marks.clear()
        new = self._instrument(old.polls if inject is None else inject, space.pid, space.mem,
                               space.abi, space.image, space.patcher, funcs, prev=old)
        try:
            self._install(space, new, [th.tid for th in mine])
        except TracerError:
            old.reinstate()
            raise

    def _stop_stubs(self, pid: int, mem: target.Memory, abi: Abi, image: VdsoImage,
                    patcher: Patcher) -> StopStubs:
        """The stop-based stubs over `patcher` (a fork child's copy keeps the mechanism its
        parent's patch was planned with)."""
        mechanism = (patcher.marker_mode, patcher.tsc) if patcher.planted else None
        return StopStubs(pid, mem, abi, image, patcher, patcher.funcs, self._stop_mechanism,
                         self._step_out, self._guard, self._unpatch, mechanism)

    def _instrument_class(self, inject: bool | None = None) -> type[Instrument]:
        """Which instrumentation a new space gets: the in-tracee recorder (--inject; `inject`
        overrides the option) or the stop-based stubs."""
        if self.options.inject if inject is None else inject:
            from tracer.inject import Recorder
            return Recorder
        return StopStubs

    def _instrument(self, inject: bool | None, pid: int, mem: target.Memory, abi: Abi,
                    image: VdsoImage, patcher: Patcher, funcs: list[VdsoFunction],
                    prev: Instrument | None = None) -> Instrument:
        """The one place that makes an instrument, for `funcs` (not installed yet): of the
        class `_instrument_class` chooses; the stop-based stubs `prev` (replanned over
        another set) keep their stop mechanism."""
        cls = self._instrument_class(inject)
        if cls is not StopStubs:
            _arch.check_traceable(abi, inject=True)
            from tracer.inject import Recorder
            # the in-tracee recorder patches the entries itself; the patcher only names the
            # functions (nothing of it is planted). i386's gateway is not recorded in the
            # tracee (its calls may block; the stop-based engine shows them as syscall events)
            funcs = [f for f in funcs if f.symbol != GATEWAY_SYMBOL]
            patcher.funcs = list(funcs)
            return Recorder(pid, mem, abi, image, patcher.base, funcs, lossy=self.options.lossy)
        stubs = prev if isinstance(prev, StopStubs) else self._stop_stubs(pid, mem, abi, image,
                                                                          patcher)
        stubs.funcs = funcs
        return stubs

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
        """int3 stops: a guardian undoes them if the tracer dies (guardian.py)."""
        if self._guardian is None:
            self._guardian = Guardian()
        self._guardian.watch(pid, mem.fd, patcher.undo_int3s())

    def _unguard(self, pid: int) -> None:
        if self._guardian is not None:
            self._guardian.forget(pid)

    def _add_thread(self, tid: int, space: _Space) -> _Thread:
        th = _Thread(tid, space)
        self.threads[tid] = th
        space.threads.add(tid)
        return th

    def _emit_attach(self, space: _Space, spawned: bool, t0: float | None = None) -> None:
        gw = find_gateway(space.image)
        setup = (time.monotonic() - t0) * 1e3 if t0 is not None else 0.0
        self._emit(AttachEvent(space.pid, space.pid, time.time(), space.base, space.abi.name,
                               self.clocksource, self.fast_path, space.timens,
                               len(space.threads), tuple(f.plain for f in space.patcher.funcs),
                               gw.instructions if gw else None, spawned, setup))
        self._flush_notices(space)

    def _flush_notices(self, space: _Space) -> None:
        for text in space.notices:
            self._emit(NoticeEvent(space.pid, space.pid, time.time(), text))
        space.notices = []
