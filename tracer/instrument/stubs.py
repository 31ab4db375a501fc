"""The stop-based stubs as an `Instrument`: installing (the stop mechanism the process allows,
every thread stepped out of the bytes about to be replaced, the plant, the guardian) and taking
them out (original code back, every stopped thread moved off our code, the padding cleared
unless a thread still needs a stub to return through)."""
from __future__ import annotations

from collections.abc import Callable, Sequence

from tracer import procfs, sigframes, stackscan, target
from tracer.abi import Abi
from tracer.breakpoints import Bp, EXIT, Patcher
from tracer.decoders import for_function
from tracer.errors import MemoryReadError, ProcessGone
from tracer.instrument import Instrument, Stopped, StubHooks
from tracer.vdso import VdsoFunction, VdsoImage


class StopStubs(Instrument):
    """Stop-based stubs (breakpoints.Patcher): the entries jump to stubs in the vDSO's padding
    that stop once per call, on return (or trap instructions, or seccomp marker stops). Installing plans
    the patches with the stop mechanism the process allows, steps every thread out of the
    bytes about to be replaced, plants, and has a guardian undo its traps if the tracer dies."""

    def __init__(self, pid: int, mem: target.Memory, abi: Abi, image: VdsoImage,
                 patcher: Patcher, funcs: list[VdsoFunction], hooks: StubHooks,
                 mechanism: tuple[bool, bool] | None = None) -> None:
        self.pid = pid
        self.mem = mem
        self.abi = abi
        self.image = image
        self.patcher = patcher
        self.funcs = funcs
        self.hooks = hooks
        # (marker stops, stubs read the TSC) once probed: a replan keeps them (the marker
        # filter, once installed, stays in the process for its life: seccomp(2))
        self.mechanism = mechanism

    @staticmethod
    def prepare(image: VdsoImage, base: int, size: int, funcs: list[VdsoFunction]) -> None:
        Patcher(image, base, size).plan(funcs, [for_function(f.plain).nargs for f in funcs])

    def install_in(self, tids: list[int]) -> list[str]:
        p = self.patcher
        notes: list[str] = []
        if self.mechanism is None:
            markers, use_tsc, notes = self.hooks.stop_mechanism(self.pid, tids, self.mem,
                                                                self.abi, self.image, p.base)
            self.mechanism = (markers, use_tsc)
        markers, use_tsc = self.mechanism
        p.plan(self.funcs, [for_function(f.plain).nargs for f in self.funcs],
               markers=markers, tsc=use_tsc)
        for tid in tids:
            self.hooks.step_out(tid, p.in_detour)
        p.plant(self.mem)
        if not markers:
            self.hooks.guard(self.pid, self.mem, p)
        return notes

    def take_out(self, threads: Sequence[Stopped]) -> tuple[bool, list[str]]:
        """Every thread stopped: restore the original code, move threads off our code, and
        clear the padding unless a thread still needs a stub to return through (then its
        stops are made no-ops). Whether the padding was cleared."""
        patcher = self.patcher
        if not patcher.planted:
            return True, []
        patcher.restore_code(self.mem)
        if not self.abi.trap_pc_adjust:
            # a trap that leaves pc AT itself (arm64's brk) would hold a single-step there for
            # ever: the stubs' stops become nops before threads are stepped out of them
            patcher.disarm(self.mem)
        self.hooks.unguard(self.pid)
        # a vfork child shares the address space, and so the patcher
        mine = [th for th in threads if th.space.patcher is patcher]
        for th in mine:
            try:
                self._unpatch_thread(th)
            except (ProcessGone, OSError):
                pass
        try:
            ranges = [(m.start, m.end) for m in procfs.read_maps(self.pid)]
        except OSError:
            ranges = []
        busy = [th.tid for th in mine if self._on_our_code(th, ranges)]
        if busy:
            # the stub stays, and stops no more: with no tracer its trap would kill the thread
            patcher.disarm(self.mem)
            self.hooks.notice(self.pid, busy[0],
                              f"thread {busy[0]} is inside a traced call (a signal handler "
                              "interrupted it): the stub code stays in the vDSO padding, "
                              "with its stop made a no-op, until the thread returns")
            return False, []
        patcher.clear_padding(self.mem)
        return True, []

    def reinstate(self) -> bool:
        p = self.patcher
        p.plant(self.mem)
        if not p.marker_mode:
            self.hooks.guard(self.pid, self.mem, p)
        return True

    @property
    def installed(self) -> bool:      # type: ignore[override]
        return self.patcher.planted

    def stop_at(self, pc: int) -> Bp | None:
        return self.patcher.bps.get(pc)

    def marker(self, idx: int) -> Bp | None:
        markers = self.patcher.markers
        return markers[idx] if 0 <= idx < len(markers) else None

    def fork_child(self, child: int, mem: target.Memory, abi: Abi, patcher: Patcher,
                   hooks: StubHooks | None = None) -> StopStubs:
        return super().fork_child(child, mem, abi, patcher, hooks or self.hooks)

    # ------------------------------------------------------------------ leaving
    def _unpatch_thread(self, th: Stopped) -> None:
        """After `restore_code`: put a stopped thread back on original code -- before a trap
        it took and we did not handle, out of any slot, out of any call made through a stub."""
        patcher = self.patcher
        regs = th.regs
        arch = self.abi
        arch.regs_get(th.tid, regs)
        pc = regs.buf[arch.PC]
        trap = th.undo_trap
        th.undo_trap = 0
        if trap:
            bp = patcher.bps.get(trap)
            if bp is not None and bp.kind != EXIT:
                pc = trap               # the original instruction runs again, untraced
        back = patcher.pc_back(pc)
        if back is not None:
            pc = back
        if pc != regs.buf[arch.PC]:
            regs.buf[arch.PC] = pc
            arch.regs_set(th.tid, regs)

        def inside(x: int) -> bool:
            return patcher.in_padding(x) or patcher.in_stub_function(x)

        if patcher.gw_real_ret:
            self._leave_gateway_stub(th, inside)
        else:
            self.hooks.step_out(th.tid, inside)

    def _leave_gateway_stub(self, th: Stopped, inside: Callable[[int], bool]) -> None:
        """i386 marker mode: step the thread off our code (a thread in __kernel_vsyscall
        with a return into the padding counts: a marker's call), except that one in the
        system call that gw_stub made for its caller gets the gateway's own `ret` as return
        address instead of gw_stub's: it returns to its caller directly (breakpoints.py)."""
        patcher = self.patcher
        mem = self.mem
        arch = self.abi
        regs = arch.new_regs()

        def gw_word() -> tuple[int, int] | None:
            arch.regs_get(th.tid, regs)
            off = patcher.gw_return_slot(regs.buf[arch.PC])
            if off is None:
                return None
            at = (regs.buf[arch.SP] & arch.mask) + off
            try:
                return at, mem.read_word(at, arch.word)
            except MemoryReadError:
                return None

        def ours(x: int) -> bool:
            if inside(x):
                return True
            got = gw_word()
            return got is not None and got[1] != patcher.gw_real_ret and patcher.in_padding(
                got[1])

        self.hooks.step_out(th.tid, ours)
        got = gw_word()
        if got is not None and got[1] == patcher.gw_real_ret:
            mem.write(got[0], arch.pack_word(patcher.gw_ret))

    def _on_our_code(self, th: Stopped, ranges: list[tuple[int, int]] | None = None) -> bool:
        """Will this thread still run code in the padding: its pc is there (it could not be
        stepped out), it is in the vDSO with a return into a stub on its stack, or a signal
        handler interrupted it in vDSO or stub code (a live signal frame whose saved pc is
        there: sigframes.py)? A return into a stub elsewhere on the stack of a thread outside
        the vDSO is a stale word of an earlier call (i386 stacks are full of them)."""
        patcher = self.patcher
        arch = self.abi
        mem = self.mem
        try:
            arch.regs_get(th.tid, th.regs)
        except ProcessGone:
            return False
        if patcher.in_padding(th.regs.buf[arch.PC]):
            return True
        if not patcher.stub_returns:
            return False
        word = arch.word
        sp = th.regs.buf[arch.SP] & arch.mask
        rets = patcher.stub_returns
        pc, vdso = th.regs.buf[arch.PC], (patcher.base, patcher.base + patcher.mapping_size)

        def gateway_returns_to_stub(ip: int, at: int) -> bool:
            """In __kernel_vsyscall at `ip` with sp `at`: its return address (or, past the
            gateway's own `ret` put there at leaving, the next word) is in the padding."""
            try:
                ra = mem.read(at + (patcher.gw_return_slot(ip) or 0), 2 * word)
            except MemoryReadError:
                return True
            first = int.from_bytes(ra[:word], "little")
            return patcher.in_padding(first) or (first == patcher.gw_ret and patcher.in_padding(
                int.from_bytes(ra[word:], "little")))

        if not vdso[0] <= pc < vdso[1] or patcher.gw_return_slot(pc) is not None:
            # Outside the vDSO (whose functions call nothing outside it) a thread gets back
            # into a stub only through a signal frame that interrupted vDSO or stub code
            # (sigframes.py); in __kernel_vsyscall, through its return address or such a
            # frame. Any other return into a stub on its stack is a stale word of an earlier
            # call. (A frame that interrupted __kernel_vsyscall counts as its return does.)
            if patcher.gw_return_slot(pc) is not None and gateway_returns_to_stub(pc, sp):
                return True
            return th.sig_in_vdso and any(
                patcher.gw_return_slot(ip) is None or gateway_returns_to_stub(ip, ssp)
                for ip, ssp in sigframes.interrupted(mem.read, sp, arch, [vdso]))
        lo = patcher.base + patcher.pad_start
        return bool(stackscan.scan(mem.read, sp, arch,
                                   [(lo, lo + len(patcher.pad_used))], rets.__contains__,
                                   end=stackscan.mapping_end(ranges or [], sp)))
