"""tracer.unwind across a stack switch: Go's runtime calls the vDSO on the thread's system
stack (g0) with its frame pointer left on the goroutine's stack, and its CFI describes sp
only. Synthetic stacks; the frame-pointer rule may change stacks once per walk, and only
where CFI gave a return address that is not code."""
from __future__ import annotations

import struct

from tracer.cfi import CfiRow, RuleKind
from tracer.errors import MemoryReadError
from tracer.unwind import unwind

RBP, RSP, RIP = 6, 7, 16
CODE_LO, CODE_HI = 0x400000, 0x500000
G0 = 0x7FFF0000                  # the system stack (higher)
GOR = 0xC000040000               # a goroutine's stack (lower)
SIZE = 0x4000


class Mem:
    def __init__(self, words: dict[int, int]) -> None:
        self.regions = [(G0, bytearray(SIZE)), (GOR, bytearray(SIZE))]
        for a, v in words.items():
            for start, data in self.regions:
                if start <= a < start + SIZE:
                    struct.pack_into("<Q", data, a - start, v)

    def read(self, addr: int, size: int) -> bytes:
        for start, data in self.regions:
            if start <= addr and addr + size <= start + len(data):
                return bytes(data[addr - start:addr - start + size])
        raise MemoryReadError(addr, size, "unmapped")


class Mods:
    """CFI for [0x401000, 0x402000): CFA = rsp + 24, return address at CFA - 8 (Go's
    nanotime1: a 16-byte frame); no rule for the return address column elsewhere
    (the outermost frame)."""

    def frame_rule(self, pc: int):  # type: ignore[no-untyped-def]
        if not CODE_LO <= pc < CODE_HI:
            return None
        if 0x401000 <= pc < 0x402000:
            return (0, CfiRow.build(0, RSP, 24, None, RIP, ((RIP, int(RuleKind.OFFSET), -8),), False))
        if 0x402000 <= pc < 0x403000:
            return (0, CfiRow.build(0, RSP, 8, None, RIP, ((RIP, int(RuleKind.OFFSET), -8),), False))
        return (0, CfiRow.build(0, RSP, 8, None, RIP, (), False))

    def is_executable(self, addr: int) -> bool:
        return CODE_LO <= addr < CODE_HI


def _go_like(fp_ra: int) -> tuple[dict[int | str, int], Mem]:
    sp = G0 + 0x1000                     # at the vDSO's entry, on g0
    fp = GOR + 0x2000                    # nanotime1's frame, on the goroutine's stack
    words = {sp: 0x401073,               # return into nanotime1
             sp + 16: 0xDEAD,            # what nanotime1's CFI takes for its return address
             fp: GOR + 0x2100, fp + 8: fp_ra,
             fp + 16: 0x403010}          # time.Now's CFI: return address at its CFA - 8
    return {"pc": 0x7F0000000000, "sp": sp, RBP: fp}, Mem(words)


def test_go_system_stack_switch() -> None:
    regs, mem = _go_like(0x402050)
    # nanotime1 (CFI fails), its caller by the frame pointer on the goroutine's stack,
    # then that caller's CFI from there
    assert unwind(regs, mem.read, Mods(), "x86_64") == [0x401073, 0x402050, 0x403010]


def test_no_switch_to_a_frame_pointer_that_is_not_code() -> None:
    regs, mem = _go_like(0xDEADBEEF)
    assert unwind(regs, mem.read, Mods(), "x86_64") == [0x401073]


def test_no_switch_where_the_cfi_ends_the_stack() -> None:
    # the outermost frame (no rule for the return address): rbp is not followed
    regs, mem = _go_like(0x402050)
    words = {G0 + 0x1000: 0x405000}
    mem2 = Mem(words)
    regs[RBP] = GOR + 0x2000
    mem2.regions[1] = mem.regions[1]
    assert unwind(regs, mem2.read, Mods(), "x86_64") == [0x405000]
