"""Processes: attach and spawn, one traced address space set up (the vDSO found, parsed and
instrumented by the chosen engine), its threads registered, the attach event."""
from __future__ import annotations

import os
import signal
import time

from collections.abc import Callable

from tracer import arch as _arch, procfs, sigtrack, symload, target
from tracer.abi import Abi
from tracer.auxv import auxv_from_stack, find, parse_auxv
from tracer.breakpoints import Patcher
from tracer.consts import AuxType
from tracer.disasm import gateway as find_gateway
from tracer.engine.instruments import Instruments
from tracer.engine.options import resolve_functions, timens_offsets, TraceOptions
from tracer.engine.state import _Space
from tracer.engine.symbols import Symbols
from tracer.engine.threads import Threads
from tracer.errors import AuxvError, ElfError, ProcessGone, TracerError, UsageError, VdsoError
from tracer.events import AttachEvent, Event, NoticeEvent
from tracer.vdso import parse_image


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


class Processes:
    """Owns which process is the root (the first attached or spawned); sets spaces up in the
    thread table, their instruments made and installed by `instruments`."""

    _dispatch: Callable[[int, int], None]    # the loop's (connected by the session)

    def __init__(self, options: TraceOptions, table: Threads, instruments: Instruments,
                 symbols: Symbols, clock: tuple[str | None, bool | None],
                 sink: Callable[[Event], None]) -> None:
        self.options = options
        self.table = table
        self.threads = table.threads
        self.spaces = table.spaces
        self.instruments = instruments
        self.symbols = symbols
        self.clocksource, self.fast_path = clock
        self._emit = sink
        self._add_thread = table.add_thread
        self._resume = table.resume
        self._instrument = instruments.instrument
        self._instrument_class = instruments.instrument_class
        self._install = instruments.install
        self.root_pid: int | None = None

    def connect(self, dispatch: Callable[[int, int], None]) -> None:
        self._dispatch = dispatch

    def _options(self) -> int:
        # Fork events are always wanted: a child inherits every breakpoint and must be cleaned.
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
            space = self.new_space(pid, tids[0] if pid not in tids else pid, tids=tids)
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
        self.table.state = "running"
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
            space = self.new_space(pid, pid)
            self._add_thread(pid, space).sig_in_vdso = False
            self._pin(pid)
        except BaseException:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
            raise
        self.table.state = "running"
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

    def new_space(self, pid: int, regs_tid: int, traced: bool = True,
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

    def _emit_attach(self, space: _Space, spawned: bool, t0: float | None = None) -> None:
        gw = find_gateway(space.image)
        setup = (time.monotonic() - t0) * 1e3 if t0 is not None else 0.0
        self._emit(AttachEvent(space.pid, space.pid, time.time(), space.base, space.abi.name,
                               self.clocksource, self.fast_path, space.timens,
                               len(space.threads), tuple(f.plain for f in space.patcher.funcs),
                               gw.instructions if gw else None, spawned, setup))
        self.flush_notices(space)

    def flush_notices(self, space: _Space) -> None:
        for text in space.notices:
            self._emit(NoticeEvent(space.pid, space.pid, time.time(), text))
        space.notices = []
