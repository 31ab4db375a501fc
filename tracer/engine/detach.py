"""Leaving: original code back (a vDSO moved by mremap followed), threads moved off our
code, every thread let go whatever a step raises."""
from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence

from tracer import procfs, sigframes, stackscan, target
from tracer.breakpoints import EXIT, Patcher
from tracer.engine.state import _Space, _Thread
from tracer.errors import MemoryReadError, ProcessGone, TracerError
from tracer.events import DetachEvent, NoticeEvent
from tracer.instrument import Stopped, StopStubs
from tracer.engine.core import EngineCore

_VFORK_RETRIES = 5     # leaving: stops of the tracee retried for vforks made meanwhile


class Detach(EngineCore):
    def _unpatch_thread(self, th: _Thread, patcher: Patcher) -> None:
        """After `restore_code`: put a stopped thread back on original code -- before a trap
        it took and we did not handle, out of any slot, out of any call made through a stub."""
        regs = th.regs
        arch = th.space.abi
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
            self._leave_gateway_stub(th, patcher, inside)
        else:
            self._step_out(th.tid, inside)

    def _leave_gateway_stub(self, th: _Thread, patcher: Patcher,
                            inside: Callable[[int], bool]) -> None:
        """i386 marker mode: step the thread off our code (a thread in __kernel_vsyscall
        with a return into the padding counts: a marker's call), except that one in the
        system call that gw_stub made for its caller gets the gateway's own `ret` as return
        address instead of gw_stub's: it returns to its caller directly (breakpoints.py)."""
        mem = th.space.mem
        arch = th.space.abi
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

        self._step_out(th.tid, ours)
        got = gw_word()
        if got is not None and got[1] == patcher.gw_real_ret:
            mem.write(got[0], arch.pack_word(patcher.gw_ret))

    def _on_our_code(self, th: _Thread, patcher: Patcher,
                     ranges: list[tuple[int, int]] | None = None) -> bool:
        """Will this thread still run code in the padding: its pc is there (it could not be
        stepped out), it is in the vDSO with a return into a stub on its stack, or a signal
        handler interrupted it in vDSO or stub code (a live signal frame whose saved pc is
        there: sigframes.py)? A return into a stub elsewhere on the stack of a thread outside
        the vDSO is a stale word of an earlier call (i386 stacks are full of them)."""
        arch = th.space.abi
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
        pc, vdso = th.regs.buf[arch.PC], (th.space.base, th.space.base + th.space.size)

        def gateway_returns_to_stub(ip: int, at: int) -> bool:
            """In __kernel_vsyscall at `ip` with sp `at`: its return address (or, past the
            gateway's own `ret` put there at leaving, the next word) is in the padding."""
            try:
                ra = th.space.mem.read(at + (patcher.gw_return_slot(ip) or 0), 2 * word)
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
                for ip, ssp in sigframes.interrupted(th.space.mem.read, sp, arch, [vdso]))
        lo = patcher.base + patcher.pad_start
        return bool(stackscan.scan(th.space.mem.read, sp, arch,
                                   [(lo, lo + len(patcher.pad_used))], rets.__contains__,
                                   end=stackscan.mapping_end(ranges or [], sp)))

    def _uninstall(self, space: _Space, threads: list[_Thread]) -> bool:
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

    def _unpatch(self, stubs: StopStubs, threads: Sequence[Stopped]) -> bool:
        """The stop-based stubs' removal (`StopStubs.take_out`), every thread stopped: restore
        the original code, move threads off our code, and clear the padding unless a thread
        still needs a stub to return through. Returns whether the padding was cleared."""
        patcher = stubs.patcher
        if not patcher.planted:
            return True
        patcher.restore_code(stubs.mem)
        if not stubs.abi.trap_pc_adjust:
            # a trap that leaves pc AT itself (arm64's brk) would hold a single-step there for
            # ever: the stubs' stops become nops before threads are stepped out of them
            patcher.disarm(stubs.mem)
        self._unguard(stubs.pid)
        # a vfork child shares the address space, and so the patcher
        mine = [th for th in threads
                if isinstance(th, _Thread) and th.space.patcher is patcher]
        for th in mine:
            try:
                self._unpatch_thread(th, patcher)
            except (ProcessGone, OSError):
                pass
        try:
            ranges = [(m.start, m.end) for m in procfs.read_maps(stubs.pid)]
        except OSError:
            ranges = []
        busy = [th.tid for th in mine if self._on_our_code(th, patcher, ranges)]
        if busy:
            # the stub stays, and stops no more: with no tracer its trap would kill the thread
            patcher.disarm(stubs.mem)
            self._emit(NoticeEvent(stubs.pid, busy[0], time.time(),
                                   f"thread {busy[0]} is inside a traced call (a signal handler "
                                   "interrupted it): the stub code stays in the vDSO padding, "
                                   "with its stop made a no-op, until the thread returns"))
            return False
        patcher.clear_padding(stubs.mem)
        return True

    def _follow_vdso(self, space: _Space) -> bool:
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

    def _restore_space(self, space: _Space, threads: list[_Thread]) -> None:
        """Take everything of ours out of one space. A failed write is never taken for
        success: it is retried through a freshly opened /proc/PID/mem, then reported."""
        problem = None
        self._follow_vdso(space)
        for attempt in range(2):
            try:
                if attempt:
                    space.mem.reopen()
                self._uninstall(space, threads)
                return
            except ProcessGone:
                # gone while we left: what its stubs committed is still in the ring (read
                # through the tracer's own descriptor), and its losses are still to be told
                if space.instrument.installed:
                    self._finish_recorder(space)
                return
            except (TracerError, OSError) as e:     # a write, a remote system call, a step
                problem = str(e)
        self._emit(NoticeEvent(space.pid, space.pid, time.time(),
                               f"cannot restore the vDSO of {space.pid} ({problem}): "
                               "vdsotrace's code stays in it and it may die at its next "
                               "vDSO call"))

    def _settle_vforks(self, timeout: float = 5.0) -> None:
        """Before stopping everything: a thread waiting in vfork cannot be stopped until its
        child execs or exits, so trace on (bounded) until no vfork is in flight."""
        deadline = time.monotonic() + timeout
        while (any(t.vfork_child for t in self.threads.values())
               and time.monotonic() < deadline):
            tid = self._waiter.wait(nohang=True)
            if tid > 0:
                self._dispatch(tid, self._waiter.status)
            elif tid == self._waiter.NOTHING_LEFT:
                return
            else:
                self._drain_recorders()
                time.sleep(0.001)
        for t in self.threads.values():
            if t.vfork_child:
                self._emit(NoticeEvent(t.space.pid, t.tid, time.time(),
                                       f"thread {t.tid} still waits for its vfork child "
                                       f"{t.vfork_child}: it is let go without being stopped"))

    def detach_all(self, reason: str = "detach") -> None:
        """Remove every breakpoint, put every thread back on original code, let go. Every
        thread is let go whatever a step before raises: an error of ours (a failed write or
        remote system call) becomes a notice; any other (a bug) is raised once all are let go."""
        if not self.threads and not self.spaces:
            self.state = "exited" if reason == "exit" else "detached"
            return
        bug: list[BaseException] = []

        def attempt(what: str, pid: int, fn: Callable[[], object]) -> bool:
            try:
                fn()
                return True
            except ProcessGone:
                return True
            except (TracerError, OSError) as e:
                self._emit(NoticeEvent(pid, pid, time.time(),
                                       f"while detaching, {what} failed ({e}); "
                                       "the threads are let go all the same"))
            except Exception as e:      # raised below, once every thread is let go
                bug.append(e)
            return False

        root = self.root_pid or 0
        attempt("waiting for vfork children", root, self._settle_vforks)
        attempt("stopping the recorders", root, self._quiesce_recorders)
        self._paused = True
        got: list[list[_Thread]] = []
        for tries in range(_VFORK_RETRIES, 0, -1):
            got.clear()
            attempt("stopping every thread", root, lambda: got.append(self._stop_all()))
            if tries == 1 or not got or not any(t.vfork_child for t in got[0]):
                break
            # a vfork made while stopping: its parent cannot be stopped (nor cleaned, nor its
            # recorder taken out) until the child execs or exits; let them run to that
            attempt("waiting for vfork children", root, self._resume_now)
            attempt("waiting for vfork children", root, self._settle_vforks)
            self._paused = True
        threads = got[0] if got else list(self.threads.values())
        for space in list(self.spaces.values()):
            attempt(f"restoring the vDSO of {space.pid}", space.pid,
                    functools.partial(self._restore_space, space, threads))
        for th in threads:
            try:
                target.detach(th.tid, th.sig)
            except (TracerError, OSError):
                pass
        for space in list(self.spaces.values()):
            if space.traced:
                self._emit(DetachEvent(space.pid, space.pid, time.time(), space.base,
                                       space.abi.name, reason))
            space.mem.close()
        for child in list(self.release_forks):
            if not attempt(f"cleaning fork child {child}", child,
                           functools.partial(self._release_child, child, wait=True)):
                self.release_forks.pop(child, None)
                try:
                    target.detach(child)
                except (TracerError, OSError):
                    pass
        self.threads.clear()
        self.spaces.clear()
        self._paused = False
        self.state = "detached"
        if self._guardian is not None:
            self._guardian.close()
            self._guardian = None
        if bug:
            raise bug[0]
