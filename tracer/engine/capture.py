"""Capture: a stop at a stub, a breakpoint or a marker -> the raw call (arguments, result,
times, caller) handed to call assembly."""
from __future__ import annotations

import time
from typing import Any

from tracer import seccomp as _seccomp
from tracer.breakpoints import ENTRY, EXIT, FALL, RET
from tracer.decoders import out_size
from tracer.decoders.syscalls import read_entry_strings, read_exit_strings, STRING_ARGS
from tracer.engine.state import _cont, _ENOSYS, _Pending, _SIGTRAP, _Space, _Thread, _WINDOW
from tracer.errors import MemoryReadError
from tracer.engine.core import EngineCore


class Capture(EngineCore):
    def _trap(self, th: _Thread) -> None:
        tid = th.tid
        space = th.space
        regs = th.regs
        buf = regs.buf
        arch = space.abi
        arch.regs_get(tid, regs)
        if th.expect_handler:
            signo, th.expect_handler = th.expect_handler, 0
            if self._handler_entry(th, space, signo):
                return
        pc = buf[arch.PC] - arch.trap_pc_adjust
        bp = space.instrument.stop_at(pc)
        if bp is None and space.patcher.planted and not space.base <= pc < space.base + space.size:
            # outside the vDSO as we know it: did the process move it (mremap)?
            if self._follow_vdso(space):
                bp = space.instrument.stop_at(pc)
        if bp is None:
            # Not ours: a SIGTRAP the program raised or a debugger-style int3 of its own.
            th.sig = _SIGTRAP
            self._resume(th)
            return
        kind = bp.kind
        if kind == EXIT:
            self._stub_exit(th, space, bp.func, buf)
        elif kind == RET:
            self._exit_hit(th, space, bp.func, buf)
        elif kind == ENTRY:
            self._entry_hit(th, space, bp.func, buf)
        else:  # FALL: this call enters the kernel
            t_in = self.tsc.read()
            th.fb_marks.append((buf[arch.SP], bp.func))
            pend = th.pending
            if pend and pend[-1].func == bp.func:
                pend[-1].fallback = True
            buf[arch.PC] = bp.slot
            arch.regs_set(tid, regs)
            # read before the thread runs on: it may finish its call before we run again
            th.stopped_ticks += self.tsc.read() - t_in
            self._resume(th)

    def _marker(self, th: _Thread) -> None:
        """A seccomp stop: one of our marker system calls (breakpoints.py), or a
        SECCOMP_RET_TRACE of a filter of the tracee's own, which gets what it gets with no
        tracer: -ENOSYS, the call not run (kernel/seccomp.c)."""
        tid = th.tid
        space = th.space
        regs = th.regs
        buf = regs.buf
        arch = space.abi
        arch.regs_get(tid, regs)
        idx = (buf[arch.SYSNR] & 0xFFFFFFFF) - _seccomp.MARKER_BASE
        bp = space.instrument.marker(idx)
        if bp is None:
            if not 0 <= idx < _seccomp.MARKER_SPAN:
                # skipped: the call not run, its result -ENOSYS
                arch.no_syscall(tid, regs)
                regs[arch.syscall_ret] = -_ENOSYS & 0xFFFFFFFFFFFFFFFF
                arch.regs_set(tid, regs)
            self._resume(th)
            return
        sp = (buf[arch.SP] & arch.mask) + bp.sp_adj
        kind = bp.kind
        if kind == EXIT:
            self._stub_exit(th, space, bp.func, buf, sp)
        elif kind == FALL:
            t_in = self.tsc.read()
            th.fb_marks.append((sp, bp.func))
            pend = th.pending
            if pend and pend[-1].func == bp.func:
                pend[-1].fallback = True
            th.stopped_ticks += self.tsc.read() - t_in
            self._resume(th)
        elif kind == ENTRY:
            self._entry_hit(th, space, bp.func, buf, sp)
        else:
            self._exit_hit(th, space, bp.func, buf, sp)

    def _stub_exit(self, th: _Thread, space: _Space, fidx: int, buf: Any,
                   sp: int | None = None) -> None:
        """The stub's int3 (or marker): arguments, result, timestamps and return address are
        in one block of stack at `sp`; the thread just continues into the stub's epilogue."""
        if sp is None:
            sp = buf[space.abi.SP]
            arch = space.abi
            if not arch.trap_pc_adjust:
                # pc is AT the trap (arm64's brk): on past it, into the stub's epilogue
                buf[arch.PC] += len(arch.trap)
                arch.regs_set(th.tid, th.regs)
        layout = space.patcher.layouts[fidx]
        assert layout is not None
        mem = space.mem
        st = layout.struct
        # One read covers the stub's block and, usually, the caller's stack variables that
        # the call wrote (a timespec on the caller's stack sits just above).
        try:
            window = mem.read(sp, _WINDOW)
        except MemoryReadError:
            try:
                window = mem.read(sp, st.size)
            except MemoryReadError:
                self._resume(th)
                return
        frame = st.unpack_from(window)
        dec = space.decoders[fidx]
        args = tuple([frame[i] for i in layout.i_args[:dec.nargs]])
        outs: list[bytes | None] = []
        if dec.outs:
            end = sp + len(window)
            for spec in dec.outs:
                addr = args[spec.arg]
                if not addr:
                    outs.append(None)
                    continue
                size = out_size(spec.layout, space.abi)
                if sp <= addr and addr + size <= end:
                    outs.append(window[addr - sp:addr - sp + size])
                    continue
                try:
                    outs.append(mem.read(addr, size))
                except MemoryReadError:
                    outs.append(None)
        stack = None
        depth = self.options.stack_depth
        if depth:
            stack = self.symbols.stack(space, th, depth, space.base + space.patcher.funcs[fidx]
                                .image_offset, sp + layout.retaddr)
        site = self.symbols.site(space, th, frame[layout.i_retaddr], sp + layout.retaddr, window, sp)
        if th.sig or self._paused or self.options.signals:
            self._resume(th)
        else:                           # the common case, without _resume's bookkeeping
            th.stopped = False
            th.undo_trap = 0
            _cont(th.tid, 0)
        t_stop = time.monotonic_ns()
        fallback = False
        marks = th.fb_marks
        if marks:
            # fallbacks marked below this frame belong to this call (nested calls, from a
            # signal handler, took theirs already)
            limit = sp + 16
            fallback = any(m[0] < limit for m in marks)
            th.fb_marks = [m for m in marks if m[0] >= limit]
        npt = self.tsc.ns_per_tick
        ticks = frame[layout.i_t1] - frame[layout.i_t0]
        if fallback and th.stopped_ticks:
            # the fallback's own stop is not the call's time (our handling of it, at least;
            # the two context switches around it remain)
            ticks -= min(th.stopped_ticks, ticks)
        th.stopped_ticks = 0
        dur = int(ticks * npt) if npt is not None and ticks > 0 else self.tsc.ns(ticks)
        # the call's time is the stub's own entry stamp, not when we got to its stop
        t0 = self.tsc.to_ns(frame[layout.i_t0]) if self.tsc.tsc0 else t_stop - dur
        self.assembly.call(th, space, fidx, args, frame[layout.i_ret], outs, t0, dur,
                        frame[layout.i_retaddr], fallback, stack, site)

    def _entry_hit(self, th: _Thread, space: _Space, fidx: int, buf: Any,
                   msp: int | None = None) -> None:
        """An entry int3, or (`msp` given) the entry marker of i386's gateway stub, whose
        saved eax (the system call's number) is at msp, the 6th argument (ebp, pushed by the
        gateway) at msp - 16 (breakpoints.py)."""
        t0 = time.monotonic_ns()
        arch = space.abi
        sp = buf[arch.SP] if msp is None else msp
        dec = space.decoders[fidx]
        gw = space.is_gateway[fidx]
        strs = None
        if gw:
            args = tuple(buf[i] & 0xFFFFFFFF for i in arch.SYSARGS) + (
                buf[arch.SYSNR_IN] & 0xFFFFFFFF,)
            if msp is not None:
                try:
                    raw = space.mem.read(msp - 16, 20)
                except MemoryReadError:
                    raw = bytes(20)
                args = args[:5] + (int.from_bytes(raw[0:4], "little"),
                                   int.from_bytes(raw[16:20], "little"))
            caller = 0
            name = arch.syscall_table()[0].get(args[6])
            if name in STRING_ARGS:     # paths and written buffers, read before they change
                strs = read_entry_strings(name, args, space.mem.read, self.options.string_size)
            # A vDSO function that calls the gateway has fallen back into the kernel (its
            # call site is a fallback int3 too, which marks calls made through a stub).
            if th.pending and not space.is_gateway[th.pending[-1].func]:
                th.pending[-1].fallback = True
        elif arch.ARGS:
            args = tuple([buf[i] for i in arch.ARGS[:dec.nargs]])
            caller = 0                                   # read at exit: [sp] is unchanged
        else:
            n = dec.nargs
            try:
                raw = space.mem.read(sp, 4 * (n + 1))
            except MemoryReadError:
                raw = bytes(4 * (n + 1))
            words = [int.from_bytes(raw[i:i + 4], "little") for i in range(0, len(raw), 4)]
            caller, args = words[0], tuple(words[1:])
        stack = None
        depth = self.options.stack_depth
        if depth and not gw:
            stack = self.symbols.stack(space, th, depth)
        site = 0
        if not gw:
            try:
                ret0 = caller or arch.return_address(th.regs, space.mem.read)
                site = self.symbols.site(space, th, ret0, sp, b"", 0)
            except MemoryReadError:
                pass
        if msp is None:
            buf[arch.PC] = space.patcher.bps[arch.trap_addr(buf[arch.PC])].slot
            arch.regs_set(th.tid, th.regs)
        self._resume(th)
        th.pending.append(_Pending(fidx, sp, args, t0, caller, False, stack, strs, site))

    def _exit_hit(self, th: _Thread, space: _Space, fidx: int, buf: Any,
                  msp: int | None = None) -> None:
        """A ret int3, or (`msp` given) the exit marker of i386's gateway stub, whose saved
        eax (the system call's result) is at msp."""
        abi = space.abi
        sp = buf[abi.SP] if msp is None else msp
        pend = th.pending
        p = None
        while pend:
            top = pend[-1]
            if top.sp < sp:
                pend.pop()          # a deeper call that never returned (longjmp, killed)
                continue
            if top.sp == sp and top.func == fidx:
                p = pend.pop()
            break
        ret = buf[abi.RET]
        if msp is not None:
            try:
                ret = space.mem.read_word(msp, 4)
            except MemoryReadError:
                ret = -_ENOSYS & 0xFFFFFFFF
        outs: list[bytes | None] = []
        if th.fb_marks:
            th.fb_marks = [m for m in th.fb_marks if m[0] >= sp]
        if p is not None and not space.is_gateway[fidx]:
            mem = space.mem
            for spec in space.decoders[fidx].outs:
                addr = p.args[spec.arg] & abi.mask
                if not addr:
                    outs.append(None)
                    continue
                try:
                    outs.append(mem.read(addr, out_size(spec.layout, abi)))
                except MemoryReadError:
                    outs.append(None)
            if abi.ARGS:                # arguments in registers: the caller not read at entry
                try:
                    p.caller = abi.return_address(th.regs, mem.read)
                except MemoryReadError:
                    p.caller = 0
        elif p is not None:
            name = abi.syscall_table()[0].get(p.args[6])
            if name in STRING_ARGS:     # what read() filled in, before the thread runs on
                got = read_exit_strings(name, p.args, abi.signed(ret), space.mem.read,
                                        self.options.string_size)
                if got:
                    p.strs = {**(p.strs or {}), **got}
        if msp is None:
            buf[abi.PC] = space.patcher.bps[abi.trap_addr(buf[abi.PC])].slot
            abi.regs_set(th.tid, th.regs)
        self._resume(th)
        if p is None:
            return                  # a call that began before we attached
        t1 = time.monotonic_ns()
        if space.is_gateway[fidx]:
            self.assembly.syscall(th, space, p, abi.signed(ret), t1)
        else:
            self.assembly.call(th, space, fidx, p.args, abi.signed(ret), outs, p.t0, t1 - p.t0,
                            p.caller, p.fallback, p.stack, p.site)
