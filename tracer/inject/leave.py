"""--inject, leaving: the recorder taken out of a stopped process (the ring pointer cleared,
threads stepped out of the stubs, the vDSO restored, the pages unmapped unless still in use),
or out of an unfollowed fork child."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

from tracer import procfs, sigframes, stackscan, target
from tracer.abi import I386, Abi
from tracer.errors import MemoryReadError
from tracer.inject import layout as L
from tracer.inject.aarch64.leave import out_of_copy
from tracer.inject.aarch64.plan import PlanA64
from tracer.inject.plan import Plan
from tracer.inject.remote import RemoteCaller, RemoteError, Stepper
from tracer.inject.ring import RawRecord, RingReader
from tracer.inject.stubs import CodePage
from tracer.vdso import GATEWAY_SYMBOL, VdsoImage

if TYPE_CHECKING:
    from tracer.inject import _Numbers


_COPY_STEPS = 2000                   # single steps spent taking a thread out of a copied body


class Leaving(RingReader):
    """Taking the recorder out of a stopped process, or out of an unfollowed fork child."""
    _code: CodePage | None
    _code_addr: int
    _code_fd: int
    _lost_final: int | None
    _nr: _Numbers
    _pending: list[RawRecord]
    _plan: Plan | PlanA64 | None
    _ring_addr: int
    _saved: list[tuple[int, bytes]]
    abi: Abi
    base: int
    code_page_kept: bool
    image: VdsoImage
    mem: target.Memory
    pid: int
    ring_kept: bool
    vdso_lost: bool

    if TYPE_CHECKING:
        def _caller(self, stepper: Stepper, tid: int, plan: Plan | PlanA64) -> RemoteCaller: ...
        def _close_local(self) -> None: ...

    def stop_recording(self) -> None:
        """Switch every stub off while the tracee runs (each loads the ring pointer afresh on
        every call: 0 means record nothing); what is in the ring stays to be drained. Used
        before stopping the tracee to leave, so the stop does not last a full ring's drain."""
        if self.installed and self._code_fd >= 0:
            os.pwrite(self._code_fd, bytes(8), L.CODE_RINGPTR)

    def uninstall(self, tids: list[int]) -> None:
        if not self.installed:
            return
        assert self._code is not None and self._plan is not None
        stepper = Stepper(self.pid, self.abi)
        try:
            os.pwrite(self._code_fd, bytes(8), L.CODE_RINGPTR)   # every stub stops recording
            # out of the ring-writing window, and on through the stub's return: a thread left
            # in a stub's tail (e.g. stopped after its gettid) would keep the code page
            tails = [s.tail for s in self._code.stubs]
            gw = self._gateway_range()
            code_lo, code_hi = self._code_addr, self._code_addr + L.CODE_SIZE
            # the vDSO's own code our code calls (a vclock helper, i386's gateway): a thread
            # there got there from our code (or never blocks: see the gateway just below)
            vlo, vhi = self.base, self.base + len(self.image.data)
            arch = self.abi
            regs = arch.new_regs()
            # arm64 without LSE: a thread in a claim loop's ldxr..stxr goes to its stub's exit
            # (the call is not recorded: counted as lost), since no step gets it through
            spans = [(lo, hi, s.done) for s in self._code.stubs for lo, hi in s.exclusive]
            abandoned = 0

            def out_of_exclusive(ip: int) -> int | None:
                nonlocal abandoned
                for lo, hi, done in spans:
                    if lo <= ip < hi:
                        abandoned += 1
                        return done
                return None

            redirect = out_of_exclusive if spans else None
            for t in tids:
                if gw[0] < gw[1]:
                    # i386: the stub calls __kernel_vsyscall for gettid, a copy for its
                    # fallback system call (neither blocks); a thread stopped in there on such
                    # a call is stepped on through our code. One there on any other call (a
                    # blocking read) is left alone: a step would restart it and wait for it.
                    arch.regs_get(t, regs)
                    if gw[0] <= regs.buf[arch.PC] < gw[1] and not self._returns_to(
                            regs, [(code_lo, code_hi)]):
                        continue
                # a thread in a copied body (or a fallback stub, or vDSO code our code
                # called) too: on through its return, a few hundred instructions, so the code
                # page can go. One that does not leave in time (a long getrandom, a flood of
                # signals) keeps the page, and the ring if it is in a ring-writing window
                # (_code_in_use)
                try:
                    stepper.step_while(t, regs, lambda ip: gw[0] <= ip < gw[1]
                                       or any(lo <= ip < hi for lo, hi in tails),
                                       redirect=redirect)
                    if isinstance(self._plan, PlanA64):
                        # arm64: moved, not stepped, out of a copy (aarch64/leave.py); a
                        # thread in the vDSO itself runs the original once it is restored
                        out_of_copy(arch, self.mem, t, regs, stepper, self._plan,
                                    self._code, self.base, code_lo)
                        vlo = vhi = 0
                    stepper.step_while(t, regs, lambda ip: code_lo <= ip < code_hi
                                       or vlo <= ip < vhi, limit=_COPY_STEPS,
                                       redirect=redirect)
                except RemoteError:
                    pass
            if not self.vdso_lost:      # else: nothing of it to restore, nothing written there
                for at, orig in reversed(self._saved):
                    self.mem.write(at, orig)
            self._saved.clear()
            self.producers_stopped()
            self._drain_ring(L.NSLOTS, self._pending, None)
            self._lost_final = self.lost() + abandoned
            keep, keep_ring = self._code_in_use(tids, regs)
            call = self._caller(stepper, tids[0], self._plan)
            try:
                if not keep_ring:
                    call(self._nr.MUNMAP, self._ring_addr, L.RING_SIZE)
                if not keep:
                    call(self._nr.MUNMAP, self._code_addr, L.CODE_SIZE)
            finally:
                call.restore()
            self.code_page_kept = keep
            self.ring_kept = keep_ring
            self.installed = False
        finally:
            stepper.resend_held()
            if not self.installed:
                self._close_local()

    def release_fork(self, child: int, mem: target.Memory) -> str | None:
        """A fork child we do not follow, at its first stop (it has not run yet): it inherited
        the patched entries (in its private copy of the vDSO), the ring and the code page
        (MAP_SHARED: still ours). Put its entries back, unmap both pages in it by remote
        system calls, so none of its calls reaches our ring. Returns a notice when a page has
        to stay (the child may still return into the code page)."""
        if not self.installed or self._plan is None:
            return None
        if not self.vdso_lost:
            for at, orig in reversed(self._saved):
                mem.write(at, orig)
        stepper = Stepper(child, self.abi)
        regs = self.abi.new_regs()
        try:
            if any(self._code_in_use([child], regs, mem, child)):
                # (forked from a handler that interrupted a stub): the stub still writes to
                # the ring on its way out; keep both, the code page stops recording when the
                # tracer leaves
                return (f"fork child {child} may still return through vdsotrace's stub code: "
                        "the recorder's pages stay mapped in it")
            call = self._caller(stepper, child, self._plan)
            try:
                call.check(self._nr.MUNMAP, self._ring_addr, L.RING_SIZE, what="munmap")
                call.check(self._nr.MUNMAP, self._code_addr, L.CODE_SIZE, what="munmap")
            finally:
                call.restore()
        finally:
            stepper.resend_held()
        return None

    def _gateway_range(self) -> tuple[int, int]:
        """i386: runtime range of __kernel_vsyscall (which the stubs call); (0, 0) otherwise."""
        gw = (self.image.function(GATEWAY_SYMBOL) if self.abi is I386 and not self.vdso_lost
              else None)
        if gw is None:
            return 0, 0
        return self.base + gw.image_offset, self.base + gw.image_offset + gw.size

    def _returns_to(self, regs: target.Regs, spans: list[tuple[int, int]]) -> bool:
        """Whether one of the four words on top of the stack (the return address, under at
        most the gateway's three pushes) points into `spans`."""
        a = self.abi
        try:
            raw = self.mem.read(regs.buf[a.SP] & a.mask, 4 * a.word)
        except MemoryReadError:
            return False
        return any(lo <= a.unpack_word(raw, k) < hi
                   for k in range(0, 4 * a.word, a.word) for lo, hi in spans)

    def _code_in_use(self, tids: list[int], regs: target.Regs, mem: target.Memory | None = None,
                     pid: int | None = None) -> tuple[bool, bool]:
        """(code, ring): whether some thread may still run code of the code page, and
        whether one may still write the ring (it is in a ring-writing window, or was when a
        signal handler interrupted it).

        Code: its pc is there or in the vDSO (a helper called from a copied body), or a
        word on its stack points there as a return address (conservative: a stale word keeps
        the page) or as the ip a signal handler interrupted. Ring: such an interrupted ip lies
        in a stub's ring-writing window, where the ring's address is already in a register
        (saved in the frame too) and the cleared ring pointer is not read again. `mem` and
        `pid`: another process's (a fork child's), not the tracee's."""
        mem = mem or self.mem
        lo, hi = self._code_addr, self._code_addr + L.CODE_SIZE
        vlo, vhi = self.base, self.base + len(self.image.data)
        windows = [s.window for s in self._code.stubs] if self._code is not None else []
        arch = self.abi
        w = arch.word
        code = ring = False
        try:
            ranges = [(m.start, m.end) for m in procfs.read_maps(pid or self.pid)]
        except OSError:
            ranges = []
        for t in tids:
            arch.regs_get(t, regs)
            ip = regs.buf[arch.PC]
            # (an i386 thread sits in __kernel_vsyscall during every system call: there the
            # stack scan below decides, it finds the return address into a copy if any)
            if lo <= ip < hi or (arch is not I386 and vlo <= ip < vhi and (
                    not isinstance(self._plan, PlanA64)
                    or lo <= arch.return_address(regs, self.mem.read) < hi)):
                # (arm64: in the vDSO, only on its way back into a copy through x30, or
                # through a saved x30 the stack scan below finds)
                code = True
            if any(a <= ip < b for a, b in windows):
                ring = True
            sp = regs.buf[arch.SP] & arch.mask
            if not vlo <= ip < vhi:
                # outside the vDSO (and in the code page), a thread gets back into the code
                # page only through a signal frame that interrupted it there or in a vDSO
                # helper (sigframes.py): a return address into it elsewhere is a stale word
                # (i386: a frame that interrupted __kernel_vsyscall counts if the gateway
                # returns there, into the code page). Such a frame in a ring-writing window
                # keeps the ring too.
                gw = self._gateway_range()
                for fip, fsp in sigframes.interrupted(mem.read, sp, arch, [(lo, hi), (vlo, vhi)]):
                    if any(a <= fip < b for a, b in windows):
                        ring = True
                    if not gw[0] <= fip < gw[1]:
                        code = True
                        continue
                    try:
                        raw = mem.read(fsp, 4 * w)
                    except MemoryReadError:
                        code = True
                        continue
                    if any(lo <= arch.unpack_word(raw, k) < hi for k in range(0, 4 * w, w)):
                        code = True
                continue
            hits = stackscan.scan(mem.read, sp, arch, [(lo, hi)], lambda v: True,
                                  end=stackscan.mapping_end(ranges, sp))
            if hits:
                code = True
            if any(h.signal and any(a <= h.value < b for a, b in windows) for h in hits):
                ring = True
        return code, ring
