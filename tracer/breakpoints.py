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
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field

from tracer.abi import Abi
from tracer.disasm import JMP_REL32_LEN, branch_targets, insn_length, relocate, sites
from tracer.errors import TracerError
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

    @property
    def abi(self) -> Abi:
        return self.image.abi

    def copy(self) -> Patcher:
        """The same patch for a forked child (same addresses, its own planted state)."""
        return Patcher(self.image, self.base, self.mapping_size, list(self.funcs),
                       dict(self.bps), list(self.patches), list(self.slots),
                       list(self.stub_mode), list(self.layouts), set(self.stub_returns),
                       self.pad_start, self.pad_used, self.planted, list(self.warnings),
                       list(self.detour_ranges))

    # ------------------------------------------------------------------ planning
    def plan(self, funcs: list[VdsoFunction], nargs: list[int], stubs: bool = True) -> None:
        """Decide every patch and slot for `funcs` (nothing is written yet)."""
        self.funcs = list(funcs)
        self.bps, self.patches, self.slots = {}, [], []
        self.stub_mode, self.layouts, self.stub_returns = [], [], set()
        self.warnings, self.detour_ranges = [], []
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

        for idx, f in enumerate(self.funcs):
            s = sites(self.image, f)
            layout = None
            if stubs and f.symbol != GATEWAY_SYMBOL:
                layout = self._plan_stub(f, idx, nargs[idx], targets, blob, here, add)
            self.stub_mode.append(layout is not None)
            self.layouts.append(layout)
            if layout is None:
                int3_site(s.entry, ENTRY, idx)
                for o in s.rets:
                    int3_site(o, RET, idx)
                if s.escapes:
                    self.warnings.append(f"{f.symbol} jumps out of its body: some of its "
                                         "returns may be missed")
            for o in s.fallbacks:
                int3_site(o, FALL, idx)
        if pad + len(blob) > self.mapping_size:
            raise TracerError(f"not enough room in the vDSO's padding for {len(self.funcs)} "
                              "functions: trace fewer with -e")
        self.pad_used = bytes(blob)

    def _plan_stub(self, f: VdsoFunction, idx: int, nargs: int, targets: set[int],
                   blob: bytearray, here: object, add: object) -> StubLayout | None:
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
        if abi.word == 8:
            code, layout, exit_off, call_off = _stub_x86_64()
        else:
            code, layout, exit_off, call_off = _stub_i386(nargs)
        body_addr = stub_addr + ((len(code) + 3) & ~3)   # add() pads to 4
        # call rel32 to the body, at call_off
        stub = bytearray(code)
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


def _stub_x86_64() -> tuple[bytes, StubLayout, int, int]:
    """The call-through stub (System V AMD64: arguments in rdi rsi rdx rcx r8 r9; at a
    function's entry rsp = 8 mod 16; rax, rdx and the flags are free to clobber at entry)."""
    c = bytearray()
    c += b"\x57\x56\x52\x51\x41\x50\x41\x51"      # push rdi, rsi, rdx, rcx, r8, r9
    c += b"\x0f\x31"                              # rdtsc
    c += b"\x48\xc1\xe2\x20\x48\x09\xd0"          # shl rdx,32 ; or rax,rdx
    c += b"\x50"                                  # push rax (t0): 56 bytes pushed, rsp = 0 mod 16
    c += b"\x48\x8b\x54\x24\x20"                  # mov rdx,[rsp+32] (the third argument again)
    call_off = len(c)
    c += b"\xe8\0\0\0\0"                          # call body
    c += b"\x50"                                  # push rax (the return value)
    c += b"\x0f\x31\x48\xc1\xe2\x20\x48\x09\xd0"  # rdtsc ; shl ; or
    c += b"\x50"                                  # push rax (t1)
    exit_off = len(c)
    c += INT3                                     # the one stop
    c += b"\x48\x8d\x64\x24\x08"                  # lea rsp,[rsp+8]   (drop t1)
    c += b"\x58"                                  # pop rax           (the return value)
    c += b"\x48\x8d\x64\x24\x38"                  # lea rsp,[rsp+56]  (t0, saved arguments)
    c += b"\xc3"                                  # ret to the caller
    # at the int3: t1, ret, t0, r9, r8, rcx, rdx, rsi, rdi, return address
    layout = StubLayout(struct.Struct("<QqQ6QQ"), 72, 0, 1, 2, 9, (8, 7, 6, 5, 4, 3))
    return bytes(c), layout, exit_off, call_off


def _stub_i386(nargs: int) -> tuple[bytes, StubLayout, int, int]:
    """cdecl: the arguments are on the stack above the return address; the stub copies them
    so the body finds them where it expects, keeping 16-byte alignment (i386 psABI as
    glibc uses it: esp = 12 mod 16 at a function's entry). eax and edx are free at entry."""
    nargs = min(nargs, 6)
    pad = (4 - 4 * nargs) % 16
    c = bytearray()
    c += b"\x0f\x31\x52\x50"                      # rdtsc ; push edx ; push eax  (t0)
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
    c += b"\x0f\x31\x52\x50"                      # rdtsc ; push edx ; push eax  (t1)
    exit_off = len(c)
    c += INT3
    c += b"\x8d\x64\x24\x08"                      # lea esp,[esp+8]
    c += b"\x58"                                  # pop eax
    c += b"\x8d\x64\x24" + bytes((8 + pad,))      # lea esp,[esp+8+pad]
    c += b"\xc3"                                  # ret
    # at the int3: t1 (8), ret (4), pad, t0 (8), return address, the arguments
    layout = StubLayout(struct.Struct(f"<Qi{pad}xQI{nargs}I"), 12 + pad + 8, 0, 1, 2, 3,
                        tuple(4 + i for i in range(nargs)))
    return bytes(c), layout, exit_off, call_off
