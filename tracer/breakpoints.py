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

import struct
from dataclasses import dataclass, field
from typing import Any

from tracer.abi import Abi
from tracer.disasm import (JMP_REL32_LEN, branch_targets, disassemble, insn_length, relocate,
                           sites)
from tracer.errors import TracerError
from tracer.seccomp import MARKER_BASE, MARKER_SPAN
from tracer.target import Memory
from tracer.vdso import GATEWAY_SYMBOL, VdsoFunction, VdsoImage

__all__ = ["ENTRY", "RET", "FALL", "EXIT", "Bp", "Patcher", "INT3", "StubLayout"]

ENTRY, RET, FALL, EXIT = 0, 1, 2, 3
INT3 = b"\xcc"
NOP = b"\x90"
_MAX_INSN = 15


@dataclass(frozen=True, slots=True)
class StubLayout:
    """What the stub left on the stack at its int3: one struct unpacked from sp."""
    struct: struct.Struct
    retaddr: int                 # byte offset of the caller's return address (= sp at entry)
    i_t1: int                    # indexes into the unpacked tuple
    i_ret: int
    i_t0: int
    i_retaddr: int
    i_args: tuple[int, ...]

    @property
    def size(self) -> int:
        return self.struct.size


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
        if self.abi.word == 4 and gwf is None:
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
            while len(blob) % 4:
                blob.append(0xCC)           # never executed; keeps slots apart
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
            self.patches.append((addr, INT3, data[off:off + 1]))

        gwt = 0
        if markers and self.abi.word == 4:
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
                    if self.abi.word == 4:
                        if idx not in fb32:
                            m = self._marker(FALL, idx, 24)
                            code = (b"\x50\xb8" + m.to_bytes(4, "little") + b"\xe8\0\0\0\0"
                                    + b"\x58\xe9\0\0\0\0")
                            at = here()
                            stub = bytearray(code)
                            stub[7:11] = _rel(gwt, at + 11)
                            stub[13:17] = _rel(self.gw_range[0], at + 17)
                            add(bytes(stub))
                            self.stub_returns.add(at + 11)
                            fb32[idx] = at
                        call = b"\xe8" + _rel(fb32[idx], base + o + 5)
                        self.patches.append((base + o, call, data[o:o + 5]))
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
        while covered < JMP_REL32_LEN:
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
        covered = 0
        while covered < JMP_REL32_LEN:
            covered += insn_length(self.abi, data[gw.image_offset + covered:], entry + covered)
        at = here()
        m_in = self._marker(ENTRY, idx, 16)
        m_out = self._marker(RET, idx, 16)
        c = bytearray()
        c += b"\x50\xb8" + m_in.to_bytes(4, "little")        # push eax ; mov eax, M_ENTRY
        c += b"\xe8" + _rel(gwt, at + len(c) + 5)             # call gwt (the entry stop)
        self.stub_returns.add(at + len(c))
        c += b"\x58"                                          # pop eax (the system call's nr)
        c += b"\xe8" + _rel(gwt, at + len(c) + 5)             # call gwt (the system call)
        self.gw_real_ret = at + len(c)
        self.stub_returns.add(at + len(c))
        c += b"\x50\xb8" + m_out.to_bytes(4, "little")       # push eax ; mov eax, M_RET
        c += b"\xe8" + _rel(gwt, at + len(c) + 5)             # call gwt (the exit stop)
        self.stub_returns.add(at + len(c))
        c += b"\x58\xc3"                                      # pop eax ; ret
        got = add(bytes(c))
        assert got == at
        jmp = b"\xe9" + _rel(at, entry + 5)
        self.patches.append((entry, jmp + INT3 * (covered - JMP_REL32_LEN),
                             data[gw.image_offset:gw.image_offset + covered]))
        self.detour_ranges.append((entry, entry + covered))

    def _plan_fallback64(self, f: VdsoFunction, idx: int, off: int, targets: set[int],
                         add: Any, here: Any) -> None:
        """x86_64 marker mode: `<insns>; syscall` -> `jmp fb` over the instructions."""
        data, base, abi = self.image.data, self.base, self.abi
        insns = disassemble(self.image, f)
        k = next(i for i, x in enumerate(insns) if x.address == off)
        j = k
        while off - insns[j].address < JMP_REL32_LEN:
            j -= 1
            prev = insns[j] if j >= 0 else None
            if (prev is None or prev.target is not None or prev.is_ret or prev.is_syscall
                    or prev.mnemonic.startswith(("j", "call", "loop", "ret"))):
                raise TracerError(f"cannot patch the fallback of {f.symbol}+"
                                  f"{off - f.image_offset:#x}: trace without it (-e)")
        start = insns[j].address
        if any(start < t < off for t in targets):
            raise TracerError(f"cannot patch the fallback of {f.symbol}+"
                              f"{off - f.image_offset:#x}: a branch lands before it")
        at = here()
        m = self._marker(FALL, idx, 128 + 24)
        c = bytearray()
        c += b"\x48\x8d\x64\x24\x80"                       # lea rsp,[rsp-128] (red zone)
        c += b"\x50\x51\x41\x53"                             # push rax, rcx, r11
        c += b"\xb8" + m.to_bytes(4, "little") + b"\x0f\x05"  # mov eax, M ; syscall
        c += b"\x41\x5b\x59\x58"                             # pop r11, rcx, rax
        c += b"\x48\x8d\xa4\x24\x80\0\0\0"                 # lea rsp,[rsp+128]
        bounds = [(0, base + start)]
        for x in insns[j:k]:
            bounds.append((len(c), base + x.address))
            raw, _ = relocate(abi, x.raw, base + x.address, at + len(c), tail=False)
            c += raw
        bounds.append((len(c), base + off))
        c += b"\x0f\x05"                                       # the syscall
        end = off + insns[k].size
        bounds.append((len(c), base + end))
        c += b"\xe9" + _rel(base + end, at + len(c) + 5)
        got = add(bytes(c), bounds)
        assert got == at
        self.markers[-1].addr = at
        self.patches.append((base + start, b"\xe9" + _rel(at, base + start + 5)
                             + data[start + 5:off], data[start:off]))
        self.detour_ranges.append((base + start, base + off))

    def _plan_stub(self, f: VdsoFunction, idx: int, nargs: int, targets: set[int],
                   blob: bytearray, here: object, add: object,
                   gwt: int = 0) -> StubLayout | None:
        data, base, abi = self.image.data, self.base, self.abi
        # The instructions the 5-byte jmp covers; no branch may land inside them.
        covered = 0
        lengths = []
        while covered < JMP_REL32_LEN:
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
        if abi.word == 8:
            code, layout, exit_off, call_off = _stub_x86_64(marker, self.tsc)
        else:
            code, layout, exit_off, call_off = _stub_i386(nargs, marker, self.tsc)
        body_addr = stub_addr + ((len(code) + 3) & ~3)   # add() pads to 4
        # call rel32 to the body, at call_off
        stub = bytearray(code)
        if marker:
            m = self._marker(EXIT, idx, 0 if abi.word == 8 else 16)
            stub[exit_off + 1:exit_off + 5] = m.to_bytes(4, "little")
            if abi.word == 4:
                stub[exit_off + 6:exit_off + 10] = _rel(gwt, stub_addr + exit_off + 10)
                self.stub_returns.add(stub_addr + exit_off + 10)
            self.markers[-1].addr = stub_addr + exit_off
        stub[call_off + 1:call_off + 5] = (body_addr - (stub_addr + call_off + 5)
                                           & 0xFFFFFFFF).to_bytes(4, "little")
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
            self.bps[exit_addr] = Bp(exit_addr, EXIT, idx, 0, 0xCC)
        self.stub_returns.add(stub_addr + call_off + 5)
        jmp = b"\xe9" + ((stub_addr - (entry + 5)) & 0xFFFFFFFF).to_bytes(4, "little")
        new = jmp + INT3 * (covered - JMP_REL32_LEN)
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
        out += [(bp.addr, b"\x90") for bp in self.bps.values() if bp.kind == EXIT]
        return out

    def clear_padding(self, mem: Memory) -> None:
        if self.pad_used:
            mem.write(self.base + self.pad_start, bytes(len(self.pad_used)))

    def disarm(self, mem: Memory) -> None:
        """Make the stubs' stops no-ops (a nop over each stub's int3), for a padding left in
        place after the tracer is gone: a trap there would be a SIGTRAP nobody handles."""
        for bp in self.bps.values():
            if bp.kind == EXIT:
                mem.write(bp.addr, NOP)

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
        depth = 0
        for i in disassemble(self.image, gw, self.base):
            if i.address == pc:
                return depth
            if i.mnemonic == "push":
                depth += 4
            elif i.mnemonic == "pop":
                depth -= 4
        return None

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


def _rel(dest: int, after: int) -> bytes:
    """rel32 from the end of an instruction at `after` to `dest` (wrapping: i386 reaches all)."""
    return ((dest - after) & 0xFFFFFFFF).to_bytes(4, "little")


# rdtsc, or (the TSC disabled: prctl PR_SET_TSC, seccomp strict mode) `xor eax,eax; cdq`
_RDTSC = {True: b"\x0f\x31", False: b"\x31\xc0\x99"}
# the stop: an int3, or a marker (the number is filled in): x86_64 `mov eax, M; syscall`,
# i386 `mov eax, M; call <gateway trampoline>` (rel32 filled in)
_STOP64 = {False: INT3, True: b"\xb8\0\0\0\0\x0f\x05"}
_STOP32 = {False: INT3, True: b"\xb8\0\0\0\0\xe8\0\0\0\0"}


def _stub_x86_64(marker: bool = False, tsc: bool = True) -> tuple[bytes, StubLayout, int, int]:
    """The call-through stub (System V AMD64: arguments in rdi rsi rdx rcx r8 r9; at a
    function's entry rsp = 8 mod 16; rax, rdx and the flags are free to clobber at entry;
    after the call rcx and r11, which a marker's syscall clobbers, are scratch too)."""
    rdtsc = _RDTSC[tsc]
    c = bytearray()
    c += b"\x57\x56\x52\x51\x41\x50\x41\x51"      # push rdi, rsi, rdx, rcx, r8, r9
    c += rdtsc                                    # rdtsc
    c += b"\x48\xc1\xe2\x20\x48\x09\xd0"          # shl rdx,32 ; or rax,rdx
    c += b"\x50"                                  # push rax (t0): 56 bytes pushed, rsp = 0 mod 16
    c += b"\x48\x8b\x54\x24\x20"                  # mov rdx,[rsp+32] (the third argument again)
    call_off = len(c)
    c += b"\xe8\0\0\0\0"                          # call body
    c += b"\x50"                                  # push rax (the return value)
    c += rdtsc + b"\x48\xc1\xe2\x20\x48\x09\xd0"    # rdtsc ; shl ; or
    c += b"\x50"                                  # push rax (t1)
    exit_off = len(c)
    c += _STOP64[marker]                          # the one stop
    c += b"\x48\x8d\x64\x24\x08"                  # lea rsp,[rsp+8]   (drop t1)
    c += b"\x58"                                  # pop rax           (the return value)
    c += b"\x48\x8d\x64\x24\x38"                  # lea rsp,[rsp+56]  (t0, saved arguments)
    c += b"\xc3"                                  # ret to the caller
    # at the int3: t1, ret, t0, r9, r8, rcx, rdx, rsi, rdi, return address
    layout = StubLayout(struct.Struct("<QqQ6QQ"), 72, 0, 1, 2, 9, (8, 7, 6, 5, 4, 3))
    return bytes(c), layout, exit_off, call_off


def _stub_i386(nargs: int, marker: bool = False,
               tsc: bool = True) -> tuple[bytes, StubLayout, int, int]:
    """cdecl: the arguments are on the stack above the return address; the stub copies them
    so the body finds them where it expects, keeping 16-byte alignment (i386 psABI as
    glibc uses it: esp = 12 mod 16 at a function's entry). eax and edx are free at entry."""
    nargs = min(nargs, 6)
    pad = (4 - 4 * nargs) % 16
    rdtsc = _RDTSC[tsc]
    c = bytearray()
    c += rdtsc + b"\x52\x50"                      # rdtsc ; push edx ; push eax  (t0)
    if pad:
        c += b"\x8d\x64\x24" + bytes(((-pad) & 0xFF,))          # lea esp,[esp-pad]
    disp = 8 + pad + 4 * nargs
    for _ in range(nargs):
        c += b"\xff\x74\x24" + bytes((disp,))     # push dword [esp+disp] (args, last first)
    call_off = len(c)
    c += b"\xe8\0\0\0\0"                          # call body
    if nargs:
        c += b"\x8d\x64\x24" + bytes((4 * nargs,))              # lea esp,[esp+4n]
    c += b"\x50"                                  # push eax (the return value)
    c += rdtsc + b"\x52\x50"                      # rdtsc ; push edx ; push eax  (t1)
    exit_off = len(c)
    c += _STOP32[marker]                          # the one stop (a marker keeps ecx edx)
    c += b"\x8d\x64\x24\x08"                      # lea esp,[esp+8]
    c += b"\x58"                                  # pop eax
    c += b"\x8d\x64\x24" + bytes((8 + pad,))      # lea esp,[esp+8+pad]
    c += b"\xc3"                                  # ret
    # at the int3: t1 (8), ret (4), pad, t0 (8), return address, the arguments
    layout = StubLayout(struct.Struct(f"<Qi{pad}xQI{nargs}I"), 12 + pad + 8, 0, 1, 2, 3,
                        tuple(4 + i for i in range(nargs)))
    return bytes(c), layout, exit_off, call_off
