"""Patching the vDSO so that a traced call costs one ptrace stop, and no breakpoint is ever
lifted (so no thread can slip past one while another is handled, and nothing is single-stepped).

Two ways to patch a function, both living in the vDSO's own padding: the image ends well before
its mapping does (about 1.5 KiB free on x86_64, 0.6 KiB on i386, design.md), and that tail
accepts ptrace writes.

* stub (one stop per call): the entry's first instructions (>= 5 bytes) become `jmp stub`. The
  stub saves the argument registers and a TSC timestamp on the stack, calls the function body
  (the displaced instructions, relocated, then a jump back), and on return saves the return
  value and a second timestamp and executes an int3: at that single stop the tracer reads
  arguments, result, times and return address from one block of stack, and the thread simply
  continues (the int3 is followed by the stub's epilogue): no register is written.
* int3 (two stops per call): an int3 at the entry and at each `ret`, each patched instruction
  executed out of line in a slot. Used where the stub cannot be (i386's `__kernel_vsyscall`,
  whose calls may block for ever; a branch into the entry's first bytes).

Fallback sites (a `syscall`, or i386's `call __kernel_vsyscall`) get an int3 executed out of
line in both modes: a stop only when a call really enters the kernel.
Everything written is restored byte for byte by `unplant`.

Marker mode (`plan(..., markers=True)`, when seccomp.py's filter is in the tracee): every stop
is a marker system call instead of an int3, so a tracer that dies leaves nothing that can kill
the tracee (the marker then returns -ENOSYS and the code runs on):
* the stub's stop is `mov eax, MARKER; syscall` (x86_64: rax is saved, rcx and r11 are scratch
  after a call) or `mov eax, MARKER; call gateway` (i386: the vDSO's own sysenter, through a
  copy of __kernel_vsyscall's first instructions, the "gateway trampoline"; `int 0x80` costs
  7 us a call on this VM against 0.1 us);
* an x86_64 fallback site `<insns>; syscall` becomes `jmp fb` over the instructions before the
  syscall (>= 5 bytes, no branch into them; the syscall itself stays, so a restarted system
  call finds it); fb saves rax rcx r11 below the red zone, makes the marker call, restores
  them, runs the displaced instructions and the syscall, and jumps back after it. An i386
  fallback site `call __kernel_vsyscall` is re-aimed at a stub that makes the marker call and
  jumps to the gateway;
* i386's `__kernel_vsyscall` starts with `jmp gw_stub`: marker (entry), the real call through
  the trampoline, marker (exit), ret. The one word it leaves under a blocking system call (the
  return into gw_stub) is rewritten at detach to the address of the gateway's own `ret`.
The stop's orig_rax (MARKER_BASE + index into `markers`) tells which site it is.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tracer.abi import Abi
from tracer.arch import aarch64 as _aarch64
from tracer.arch import i386 as _i386
from tracer.arch import x86_64 as _x86_64
from tracer.arch.base import StubLayout
from tracer.disasm import branch_targets, disassemble, insn_length, relocate, sites
from tracer.errors import TracerError
from tracer.seccomp import MARKER_BASE, MARKER_SPAN
from tracer.target import Memory
from tracer.vdso import GATEWAY_SYMBOL, VdsoFunction, VdsoImage

__all__ = ["ENTRY", "RET", "FALL", "EXIT", "Bp", "Patcher", "INT3", "StubLayout"]

ENTRY, RET, FALL, EXIT = 0, 1, 2, 3
INT3 = _x86_64.INT3          # kept for importers; the patcher uses its image's arch.trap
_MAX_INSN = 15


@dataclass(slots=True)
class Bp:
    addr: int                 # runtime_addr of the int3
    kind: int                 # ENTRY, RET, FALL (in original code) or EXIT (in a stub)
    func: int                 # index into Patcher.funcs
    slot: int                 # out-of-line copy (ENTRY/RET/FALL); 0 for EXIT
    orig: int                 # the original byte (ENTRY/RET/FALL)
    sp_adj: int = 0           # marker: stop's sp + sp_adj = the site's sp (see _stop_sp)


@dataclass(slots=True)
class Patcher:
    image: VdsoImage
    base: int
    mapping_size: int
    funcs: list[VdsoFunction] = field(default_factory=list)
    bps: dict[int, Bp] = field(default_factory=dict)
    # original-code writes: (runtime_addr, new bytes, original bytes)
    patches: list[tuple[int, bytes, bytes]] = field(default_factory=list)
    # out-of-line slots: (start, end, [(offset in slot, equivalent original address)])
    slots: list[tuple[int, int, list[tuple[int, int]]]] = field(default_factory=list)
    stub_mode: list[bool] = field(default_factory=list)
    layouts: list[StubLayout | None] = field(default_factory=list)
    stub_returns: set[int] = field(default_factory=set)   # addresses `call body` pushes
    pad_start: int = 0
    pad_used: bytes = b""
    planted: bool = False
    warnings: list[str] = field(default_factory=list)
    detour_ranges: list[tuple[int, int]] = field(default_factory=list)
    marker_mode: bool = False
    markers: list[Bp] = field(default_factory=list)      # index: orig_rax - MARKER_BASE
    gw_real_ret: int = 0        # i386 marker mode: gw_stub's return from the real call
    gw_range: tuple[int, int] = (0, 0)   # runtime range of __kernel_vsyscall (i386)
    gw_ret: int = 0             # runtime address of the gateway's `ret`
    tsc: bool = True            # stubs read the TSC (False: the tracee has it disabled)

    @property
    def abi(self) -> Abi:
        return self.image.abi

    def copy(self) -> Patcher:
        """The same patch for a forked child (same addresses, its own planted state)."""
        return Patcher(self.image, self.base, self.mapping_size, list(self.funcs),
                       dict(self.bps), list(self.patches), list(self.slots),
                       list(self.stub_mode), list(self.layouts), set(self.stub_returns),
                       self.pad_start, self.pad_used, self.planted, list(self.warnings),
                       list(self.detour_ranges), self.marker_mode, list(self.markers),
                       self.gw_real_ret, self.gw_range, self.gw_ret, self.tsc)

    def rebase(self, delta: int) -> None:
        """The tracee moved its vDSO (mremap: no ptrace event tells): the same patches,
        `delta` bytes away. Every address moves; the code itself is position independent
        (stubs, slots and the jumps between them are relative within the mapping). Bp
        records are shared with copies of this patcher: new ones are made."""
        self.base += delta
        def moved(b: Bp) -> Bp:
            return Bp(b.addr + delta, b.kind, b.func, b.slot + delta if b.slot else 0, b.orig,
                      b.sp_adj)

        self.bps = {a + delta: moved(b) for a, b in self.bps.items()}
        self.markers = [moved(b) for b in self.markers]
        if self.gw_real_ret:
            self.gw_real_ret += delta
        if self.gw_range != (0, 0):
            self.gw_range = (self.gw_range[0] + delta, self.gw_range[1] + delta)
        if self.gw_ret:
            self.gw_ret += delta
        self.patches = [(a + delta, new, orig) for a, new, orig in self.patches]
        self.slots = [(lo + delta, hi + delta, [(off, orig + delta) for off, orig in bounds])
                      for lo, hi, bounds in self.slots]
        self.stub_returns = {a + delta for a in self.stub_returns}
        self.detour_ranges = [(lo + delta, hi + delta) for lo, hi in self.detour_ranges]

    # ------------------------------------------------------------------ planning
    def plan(self, funcs: list[VdsoFunction], nargs: list[int], stubs: bool = True,
             markers: bool = False, tsc: bool = True) -> None:
        """Decide every patch and slot for `funcs` (nothing is written yet). With `markers`
        the stops are marker system calls (the tracee must have seccomp.py's filter); `tsc`
        False builds stubs that never execute rdtsc (their times read 0)."""
        self.funcs = list(funcs)
        self.bps, self.patches, self.slots = {}, [], []
        self.stub_mode, self.layouts, self.stub_returns = [], [], set()
        self.warnings, self.detour_ranges = [], []
        self.markers, self.gw_real_ret, self.gw_range, self.gw_ret = [], 0, (0, 0), 0
        self.tsc = tsc
        gwf = self.image.function(GATEWAY_SYMBOL)
        gateway = self.abi is _i386.I386      # system calls go through __kernel_vsyscall
        if gateway and gwf is None:
            markers = False
        self.marker_mode = markers
        data, base = self.image.data, self.base
        pad = (self.image.image_size + 15) & ~15
        self.pad_start = pad
        if any(data[pad:self.mapping_size]):
            raise TracerError("the vDSO's padding is not empty (another tool patched it?): "
                              "refusing to write there")
        targets = branch_targets(self.image) if stubs else set()
        blob = bytearray()
        ret_slots: dict[bytes, int] = {}

        def here() -> int:
            return base + pad + len(blob)

        def add(code: bytes, bounds: list[tuple[int, int]] | None = None) -> int:
            addr = here()
            blob.extend(code)
            if len(blob) % 4:
                blob.extend(self.abi.fill(-len(blob) % 4))  # never executed; keeps slots apart
            if bounds is not None:
                self.slots.append((addr, addr + len(code), bounds))
            return addr

        def int3_site(off: int, kind: int, idx: int) -> None:
            addr = base + off
            if addr in self.bps:
                return
            code = data[off:off + _MAX_INSN]
            if kind == RET:
                # One shared slot per ret encoding (position independent); a thread parked
                # there maps back to any ret site with the same bytes.
                raw, _ = relocate(self.abi, code, addr, 0)
                if raw not in ret_slots:
                    ret_slots[raw] = add(raw, [(0, addr)])
                slot = ret_slots[raw]
            else:
                try:
                    raw, bounds = relocate(self.abi, code, addr, here())
                except ValueError as e:
                    raise TracerError(f"cannot patch {self.funcs[idx].symbol}+"
                                      f"{off - self.funcs[idx].image_offset:#x}: {e}") from e
                slot = add(raw, bounds)
            self.bps[addr] = Bp(addr, kind, idx, slot, data[off])
            self.patches.append((addr, self.abi.trap, data[off:off + len(self.abi.trap)]))

        gwt = 0
        if markers and gateway:
            assert gwf is not None
            gwt, covered = self._trampoline(gwf, add)
            self.gw_range = (base + gwf.image_offset, base + gwf.image_offset + gwf.size)
            rets = sites(self.image, gwf).rets
            self.gw_ret = base + rets[-1] if rets else 0
            if not self.gw_ret:
                raise TracerError("__kernel_vsyscall has no ret: cannot patch it")
        if markers and not targets:
            targets = branch_targets(self.image)
        fb32: dict[int, int] = {}              # i386: function index -> its fallback stub
        for idx, f in enumerate(self.funcs):
            s = sites(self.image, f)
            layout = None
            if stubs and f.symbol != GATEWAY_SYMBOL:
                layout = self._plan_stub(f, idx, nargs[idx], targets, blob, here, add, gwt)
            self.stub_mode.append(layout is not None)
            self.layouts.append(layout)
            if markers and f.symbol == GATEWAY_SYMBOL:
                self._plan_gateway(f, idx, add, here, gwt)
                continue
            if markers:
                for o in s.fallbacks:
                    if gateway:
                        if idx not in fb32:
                            m = self._marker(FALL, idx, _i386.FALLBACK_SP_ADJ)
                            at = here()
                            code, ret = _i386.marker_fallback_stub(m, at, gwt, self.gw_range[0])
                            add(code)
                            self.stub_returns.add(ret)
                            fb32[idx] = at
                        call = self.abi.call(base + o, fb32[idx])
                        self.patches.append((base + o, call, data[o:o + len(call)]))
                    else:
                        self._plan_fallback64(f, idx, o, targets, add, here)
            if layout is None:
                int3_site(s.entry, ENTRY, idx)
                for o in s.rets:
                    int3_site(o, RET, idx)
                if s.escapes:
                    self.warnings.append(f"{f.symbol} jumps out of its body: some of its "
                                         "returns may be missed")
            if not markers:
                for o in s.fallbacks:
                    int3_site(o, FALL, idx)
        if len(self.markers) > MARKER_SPAN:
            raise TracerError("too many patched sites for the marker range: trace fewer with -e")
        if pad + len(blob) > self.mapping_size:
            raise TracerError(f"not enough room in the vDSO's padding for {len(self.funcs)} "
                              "functions: trace fewer with -e")
        self.pad_used = bytes(blob)

    def _marker(self, kind: int, idx: int, sp_adj: int, addr: int = 0) -> int:
        """A new marker site: its system call number."""
        self.markers.append(Bp(addr, kind, idx, 0, 0, sp_adj))
        return MARKER_BASE + len(self.markers) - 1

    def _trampoline(self, gw: VdsoFunction, add: Any) -> tuple[int, int]:
        """i386: a copy of __kernel_vsyscall's first instructions (>= 5 bytes) and a jump to
        the rest: `call` it to enter the kernel through the gateway whatever its entry holds."""
        data, base, abi = self.image.data, self.base, self.abi
        covered, lengths = 0, []
        while covered < abi.jump_len:
            n = insn_length(abi, data[gw.image_offset + covered:], base + gw.image_offset
                            + covered)
            lengths.append(n)
            covered += n
        at = add(b"")            # the address it will get (nothing added yet)
        code = bytearray()
        pos = 0
        for i, n in enumerate(lengths):
            raw, _ = relocate(abi, data[gw.image_offset + pos:gw.image_offset + pos + _MAX_INSN],
                              base + gw.image_offset + pos, at + len(code),
                              tail=i == len(lengths) - 1)
            code += raw
            pos += n
        got = add(bytes(code))
        assert got == at
        return at, covered

    def _plan_gateway(self, gw: VdsoFunction, idx: int, add: Any, here: Any, gwt: int) -> None:
        """i386 marker mode: __kernel_vsyscall enters gw_stub (see the module's docstring)."""
        data, base = self.image.data, self.base
        entry = base + gw.image_offset
        abi = self.abi
        covered = 0
        while covered < abi.jump_len:
            covered += insn_length(abi, data[gw.image_offset + covered:], entry + covered)
        at = here()
        m_in = self._marker(ENTRY, idx, _i386.GATEWAY_SP_ADJ)
        m_out = self._marker(RET, idx, _i386.GATEWAY_SP_ADJ)
        code, returns, self.gw_real_ret = _i386.gateway_stub(at, m_in, m_out, gwt)
        self.stub_returns.update(returns)
        got = add(code)
        assert got == at
        self.patches.append((entry, abi.jump(entry, at) + abi.fill(covered - abi.jump_len),
                             data[gw.image_offset:gw.image_offset + covered]))
        self.detour_ranges.append((entry, entry + covered))

    def _plan_fallback64(self, f: VdsoFunction, idx: int, off: int, targets: set[int],
                         add: Any, here: Any) -> None:
        """x86_64 marker mode: `<insns>; syscall` -> `jmp fb` over the instructions."""
        data, base, abi = self.image.data, self.base, self.abi
        insns = disassemble(self.image, f)
        k = next(i for i, x in enumerate(insns) if x.address == off)
        j = k
        while off - insns[j].address < abi.jump_len:
            j -= 1
            prev = insns[j] if j >= 0 else None
            if (prev is None or prev.target is not None or prev.is_ret or prev.is_syscall
                    or _x86_64.is_control_transfer(prev.mnemonic)):
                raise TracerError(f"cannot patch the fallback of {f.symbol}+"
                                  f"{off - f.image_offset:#x}: trace without it (-e)")
        start = insns[j].address
        if any(start < t < off for t in targets):
            raise TracerError(f"cannot patch the fallback of {f.symbol}+"
                              f"{off - f.image_offset:#x}: a branch lands before it")
        at = here()
        m = self._marker(FALL, idx, _x86_64.MARKER_FALLBACK_SP_ADJ)
        c = bytearray(_x86_64.marker_fallback_head(m))
        bounds = [(0, base + start)]
        for x in insns[j:k]:
            bounds.append((len(c), base + x.address))
            raw, _ = relocate(abi, x.raw, base + x.address, at + len(c), tail=False)
            c += raw
        bounds.append((len(c), base + off))
        c += abi.syscall_insn                                  # the syscall
        end = off + insns[k].size
        bounds.append((len(c), base + end))
        c += abi.jump(at + len(c), base + end)
        got = add(bytes(c), bounds)
        assert got == at
        self.markers[-1].addr = at
        jmp = abi.jump(base + start, at)
        self.patches.append((base + start, jmp + data[start + len(jmp):off], data[start:off]))
        self.detour_ranges.append((base + start, base + off))

    def _plan_stub(self, f: VdsoFunction, idx: int, nargs: int, targets: set[int],
                   blob: bytearray, here: object, add: object,
                   gwt: int = 0) -> StubLayout | None:
        data, base, abi = self.image.data, self.base, self.abi
        if abi is _aarch64.AARCH64 and not sites(self.image, f).rets:
            # a function that never returns (arm64's __kernel_rt_sigreturn reads the signal
            # frame at sp): a stub's block below sp would break it; brk at its entry instead
            return None
        # The instructions the jump covers (x86: >= 5 bytes; arm64: its one `b`); no branch
        # may land inside them.
        covered = 0
        lengths = []
        while covered < abi.jump_len:
            try:
                n = insn_length(abi, data[f.image_offset + covered:], base + f.image_offset
                                + covered)
            except ValueError:
                return None
            lengths.append(n)
            covered += n
        if covered > f.size or any(f.image_offset < t < f.image_offset + covered
                                   for t in targets):
            return None
        entry = base + f.image_offset
        stub_addr = here()  # type: ignore[operator]
        marker = self.marker_mode
        code, layout, exit_off, call_off = abi.stub(nargs, marker, self.tsc)
        body_addr = stub_addr + ((len(code) + 3) & ~3)   # add() pads to 4
        # call rel32 to the body, at call_off
        stub = bytearray(code)
        if marker:
            if abi is _i386.I386:
                m = self._marker(EXIT, idx, _i386.STUB_SP_ADJ)
                self.stub_returns.add(_i386.fill_stub_marker(stub, exit_off, m, stub_addr, gwt))
            else:
                m = self._marker(EXIT, idx, 0)
                _x86_64.fill_stub_marker(stub, exit_off, m)
            self.markers[-1].addr = stub_addr + exit_off
        call = abi.call(stub_addr + call_off, body_addr)
        stub[call_off:call_off + len(call)] = call
        body = bytearray()
        pos = 0
        for i, n in enumerate(lengths):
            last = i == len(lengths) - 1
            try:
                raw, _ = relocate(abi, data[f.image_offset + pos:f.image_offset + pos + _MAX_INSN],
                                  entry + pos, body_addr + len(body), tail=last)
            except ValueError:
                return None
            body += raw
            pos += n
        add(bytes(stub))  # type: ignore[operator]
        # Not an out-of-line slot: a thread in the body has the stub's frame on its stack,
        # so it cannot be moved back to the entry; it is stepped out instead.
        slot = add(bytes(body))  # type: ignore[operator]
        assert slot == body_addr
        exit_addr = stub_addr + exit_off
        if not marker:
            self.bps[exit_addr] = Bp(exit_addr, EXIT, idx, 0, abi.trap[0])
        self.stub_returns.add(stub_addr + call_off + len(call))
        new = abi.jump(entry, stub_addr) + abi.fill(covered - abi.jump_len)
        self.patches.append((entry, new, data[f.image_offset:f.image_offset + covered]))
        self.detour_ranges.append((entry, entry + covered))
        return layout

    # ------------------------------------------------------------------ writing
    def plant(self, mem: Memory) -> None:
        """Write the padding first, then the original-code patches: a thread never sees a
        half-made patch (each patch is one write of at most 6 bytes, made while every
        thread is stopped)."""
        if self.pad_used:
            mem.write(self.base + self.pad_start, self.pad_used)
        for addr, new, _ in self.patches:
            mem.write(addr, new)
        self.planted = True

    def restore_code(self, mem: Memory) -> None:
        """Put back every original-code byte; the padding (stubs, slots) stays."""
        for addr, _, orig in self.patches:
            mem.write(addr, orig)
        self.planted = False

    def undo_int3s(self) -> list[tuple[int, bytes]]:
        """Writes that leave no int3 a thread could still reach, whatever it is doing: the
        original code back, and a nop over each stub's exit int3 (for guardian.py)."""
        out = [(addr, orig) for addr, _, orig in self.patches]
        nop = self.abi.nop
        out += [(bp.addr, nop) for bp in self.bps.values() if bp.kind == EXIT]
        return out

    def clear_padding(self, mem: Memory) -> None:
        if self.pad_used:
            mem.write(self.base + self.pad_start, bytes(len(self.pad_used)))

    def disarm(self, mem: Memory) -> None:
        """Make the stubs' stops no-ops (a nop over each stub's int3), for a padding left in
        place after the tracer is gone: a trap there would be a SIGTRAP nobody handles."""
        for bp in self.bps.values():
            if bp.kind == EXIT:
                mem.write(bp.addr, self.abi.nop)

    def unplant(self, mem: Memory) -> None:
        """Put back every original byte, the padding included."""
        self.restore_code(mem)
        self.clear_padding(mem)

    # ------------------------------------------------------------------ thread positions
    def in_padding(self, pc: int) -> bool:
        lo = self.base + self.pad_start
        return lo <= pc < lo + len(self.pad_used)

    def in_stub_function(self, pc: int) -> bool:
        """Inside a function traced through a stub (whose frame may be on the stack)."""
        off = pc - self.base
        return any(m and f.image_offset <= off < f.image_offset + f.size
                   for f, m in zip(self.funcs, self.stub_mode))

    def in_detour(self, pc: int) -> bool:
        """Strictly inside an entry's overwritten bytes (a pc there would run garbage)."""
        return any(lo < pc < hi for lo, hi in self.detour_ranges)

    def gw_return_slot(self, pc: int) -> int | None:
        """i386: where, relative to sp, __kernel_vsyscall's return address is while a thread's
        pc is at `pc` inside it (the gateway pushes ecx, edx, ebp and pops them back); None
        outside it."""
        lo, hi = self.gw_range
        if not lo <= pc < hi:
            return None
        gw = self.image.function(GATEWAY_SYMBOL)
        if gw is None:
            return None
        return _i386.gateway_stack_depth(
            [(i.address, i.mnemonic) for i in disassemble(self.image, gw, self.base)], pc)

    def pc_back(self, pc: int) -> int | None:
        """The original address equivalent to a pc at an instruction boundary inside an
        out-of-line slot; None when pc is elsewhere in the padding (a stub: step on)."""
        for start, end, bounds in self.slots:
            if start <= pc < end:
                for off, orig in bounds:
                    if start + off == pc:
                        return orig
                return None
        return None


# the call-through stubs, kept under their old names (tracer.arch builds them)
_stub_x86_64 = _x86_64.stub_x86_64
_stub_i386 = _i386.stub_i386
