"""tracer.unwind on synthetic stacks: the CFA and register rules, the frame-pointer
fallback, DWARF expressions, and hostile stacks (garbage, loops, unmapped memory)."""
from __future__ import annotations

import struct
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tracer.cfi import CfiRow, FrameRule, RuleKind
from tracer.errors import MemoryReadError
from tracer.unwind import ARCHES, eval_dwarf_expr, unwind

# x86_64 DWARF numbers (psABI figure 3.36)
RBX, RBP, RSP, RIP = 3, 6, 7, 16
# i386 (psABI table 2.14)
EBP, ESP, EIP = 5, 4, 8

CODE_LO, CODE_HI = 0x400000, 0x500000
STACK = 0x7FFF0000
STACK_SIZE = 0x4000


@dataclass
class Memory:
    """Tracee memory: (start, bytes) regions; anything else is unreadable."""
    regions: list[tuple[int, bytearray]] = field(default_factory=list)
    reads: int = 0

    def read(self, addr: int, size: int) -> bytes:
        self.reads += 1
        for start, data in self.regions:
            if start <= addr and addr + size <= start + len(data):
                return bytes(data[addr - start:addr - start + size])
        raise MemoryReadError(addr, size, "unmapped")


def stack_memory(words: dict[int, int], fmt: str = "<Q") -> Memory:
    data = bytearray(STACK_SIZE)
    for addr, value in words.items():
        struct.pack_into(fmt, data, addr - STACK, value)
    return Memory([(STACK, data)])


@dataclass
class Modules:
    """Executable code at [CODE_LO, CODE_HI); rows by pc range; records every lookup."""
    rows: list[tuple[int, int, CfiRow]] = field(default_factory=list)
    lookups: list[int] = field(default_factory=list)

    def frame_rule(self, lookup_pc: int) -> FrameRule:
        self.lookups.append(lookup_pc)
        if not self.is_executable(lookup_pc):
            return None
        for lo, hi, row in self.rows:
            if lo <= lookup_pc < hi:
                return (0, row)
        return (0, None)

    def is_executable(self, addr: int) -> bool:
        return CODE_LO <= addr < CODE_HI


def row(cfa_reg: int, cfa_off: int, *rules: tuple[int, RuleKind, int | bytes], ra: int = RIP,
        expr: bytes | None = None, signal: bool = False) -> CfiRow:
    return CfiRow.build(0, cfa_reg, cfa_off, expr, ra, tuple((r, int(k), a) for r, k, a in rules), signal)


def entry_regs(sp: int, **extra: int) -> dict[int | str, int]:
    regs: dict[int | str, int] = {"pc": 0x7F0000000000, "sp": sp}
    for name, value in extra.items():
        regs[{"rbx": RBX, "rbp": RBP}[name]] = value
    return regs


def test_cfi_walk_with_saved_registers() -> None:
    # frame A (pc 0x401000..): CFA = rsp+32, rip at CFA-8, rbx at CFA-16
    # frame B (pc 0x402000..): CFA = rbx+16 (uses the rbx that A restored), rip at CFA-8
    # frame C (pc 0x403000..): rip undefined: the outermost frame
    sp = STACK + 0x100
    mods = Modules([
        (0x401000, 0x401100, row(RSP, 32, (RIP, RuleKind.OFFSET, -8), (RBX, RuleKind.OFFSET, -16))),
        (0x402000, 0x402100, row(RBX, 16, (RIP, RuleKind.OFFSET, -8))),
        (0x403000, 0x403100, row(RSP, 8, (RIP, RuleKind.UNDEFINED, 0))),
    ])
    cfa_a = sp + 8 + 32
    mem = stack_memory({
        sp: 0x401010,                     # return address of the function at its entry
        cfa_a - 8: 0x402020,
        cfa_a - 16: STACK + 0x300,        # saved rbx
        STACK + 0x300 + 16 - 8: 0x403030,
    })
    out = unwind(entry_regs(sp), mem.read, mods, "x86_64")
    assert out == [0x401010, 0x402020, 0x403030]
    # return addresses are looked up one byte back (the call may end its function)
    assert mods.lookups == [0x40100F, 0x40201F, 0x40302F]


def test_not_at_entry_looks_up_the_exact_pc() -> None:
    sp = STACK + 0x100
    mods = Modules([(0x401000, 0x401100, row(RSP, 16, (RIP, RuleKind.OFFSET, -8)))])
    mem = stack_memory({sp + 8: 0x401050})
    regs: dict[int | str, int] = {"pc": 0x401000, "sp": sp}
    assert unwind(regs, mem.read, mods, "x86_64", max_depth=1, at_entry=False) == [0x401050]
    assert mods.lookups == [0x401000]


def test_signal_frame_makes_the_next_pc_exact() -> None:
    # a trampoline (signal frame) whose CFA is an expression: deref(rsp + 160), the shape of
    # glibc's __restore_rt; the interrupted pc is restored by an expression rule
    sp = STACK + 0x100
    frame_sp = sp + 8
    ctx = STACK + 0x800
    deref_rsp_160 = bytes([0x77]) + bytes([0xA0, 0x01]) + bytes([0x06])  # breg7 160; deref
    rip_at_ctx = bytes([0x77, 0x28])                                       # breg7 40
    mods = Modules([
        (0x401000, 0x401100, row(-1, 0, (RIP, RuleKind.EXPRESSION, rip_at_ctx), expr=deref_rsp_160,
                                 signal=True)),
        (0x402000, 0x402100, row(RSP, 8, (RIP, RuleKind.UNDEFINED, 0))),
    ])
    mem = stack_memory({sp: 0x401001, frame_sp + 160: ctx, frame_sp + 40: 0x402000})
    out = unwind(entry_regs(sp), mem.read, mods, "x86_64")
    assert out == [0x401001, 0x402000]
    assert mods.lookups == [0x401000, 0x402000]  # the interrupted pc is exact


def test_register_and_value_rules() -> None:
    sp = STACK + 0x100
    mods = Modules([
        # rbp = rbx (REGISTER), rbx = CFA+0x200 (VAL_OFFSET), then rbp is the next CFA base
        (0x401000, 0x401100, row(RSP, 16, (RIP, RuleKind.OFFSET, -8), (RBP, RuleKind.REGISTER, RBX),
                                 (RBX, RuleKind.VAL_OFFSET, 0x200))),
        (0x402000, 0x402100, row(RBP, 16, (RIP, RuleKind.OFFSET, -8), (RBX, RuleKind.SAME_VALUE, 0))),
        (0x403000, 0x403100, row(RBX, 8, (RIP, RuleKind.OFFSET, -8))),
    ])
    rbx = STACK + 0x200
    cfa_a = sp + 8 + 16
    cfa_c = cfa_a + 0x200 + 8
    mem = stack_memory({sp: 0x401010, cfa_a - 8: 0x402010, rbx + 16 - 8: 0x403010, cfa_c - 8: 0x404010})
    out = unwind(entry_regs(sp, rbx=rbx), mem.read, mods, "x86_64")
    assert out == [0x401010, 0x402010, 0x403010, 0x404010]


def test_frame_pointer_fallback_and_depth() -> None:
    # no CFI anywhere: a chain of rbp frames, 20 deep
    sp = STACK + 0x100
    words = {sp: 0x401000}
    frames = [STACK + 0x200 + 0x40 * i for i in range(20)]
    for i, fp in enumerate(frames):
        words[fp] = frames[i + 1] if i + 1 < len(frames) else 0
        words[fp + 8] = 0x402000 + i
    mem = stack_memory(words)
    out = unwind(entry_regs(sp, rbp=frames[0]), mem.read, Modules(), "x86_64")
    assert out == [0x401000] + [0x402000 + i for i in range(15)]
    assert len(unwind(entry_regs(sp, rbp=frames[0]), mem.read, Modules(), "x86_64", max_depth=40)) == 21
    assert unwind(entry_regs(sp, rbp=frames[0]), mem.read, Modules(), "x86_64", max_depth=0) == []


def test_i386_words() -> None:
    sp = STACK + 0x100
    mods = Modules([(0x401000, 0x401100, row(ESP, 8, (EIP, RuleKind.OFFSET, -4), (EBP, RuleKind.OFFSET, -8),
                                             ra=EIP))])
    mem = stack_memory({sp: 0x401010, sp + 4 + 8 - 4: 0x402000, sp + 4 + 8 - 8: STACK + 0x400,
                        STACK + 0x400: 0, STACK + 0x404: 0x403000}, fmt="<I")
    regs: dict[int | str, int] = {"pc": 0xF7FC0000, "sp": sp}
    assert unwind(regs, mem.read, mods, "i386") == [0x401010, 0x402000, 0x403000]


def test_plt_cfa_expression() -> None:
    # The x86_64 PLT's CFA (binutils elf_x86_64_eh_frame_plt):
    # DW_OP_breg7 8; DW_OP_breg16 0; DW_OP_lit15; DW_OP_and; DW_OP_lit11; DW_OP_ge;
    # DW_OP_lit3; DW_OP_shl; DW_OP_plus  ->  rsp + 8 + (((rip & 15) >= 11) << 3)
    code = bytes([0x77, 0x08, 0x80, 0x00, 0x3F, 0x1A, 0x3B, 0x2A, 0x33, 0x24, 0x22])
    arch = ARCHES["x86_64"]
    regs: list[int | None] = [None] * arch.nregs
    regs[RSP] = 0x1000

    def no_memory(addr: int, size: int = 0) -> int | None:
        return None

    regs[RIP] = 0x401026
    assert eval_dwarf_expr(code, regs, no_memory, arch) == 0x1008
    regs[RIP] = 0x40102C
    assert eval_dwarf_expr(code, regs, no_memory, arch) == 0x1010
    regs[RSP] = None
    assert eval_dwarf_expr(code, regs, no_memory, arch) is None


@pytest.mark.parametrize("code", [
    b"", b"\x06", b"\x22", b"\xff", b"\x0e\x01", b"\x2f\x00\x80", b"\x1b", b"\x30\x30\x1b",
    b"\x77", b"\x2f\xfd\xff",  # DW_OP_skip -3: a loop, cut by the operation limit
])
def test_bad_expressions_give_none(code: bytes) -> None:
    arch = ARCHES["x86_64"]
    regs: list[int | None] = [0] * arch.nregs

    def no_memory(addr: int, size: int = 0) -> int | None:
        return None

    assert eval_dwarf_expr(code, regs, no_memory, arch) is None


# -- hostile stacks ---------------------------------------------------------------------

def test_sp_unmapped() -> None:
    assert unwind(entry_regs(0x1234), Memory().read, Modules(), "x86_64") == []
    assert unwind(entry_regs(2**64 - 4), Memory().read, Modules(), "x86_64") == []
    assert unwind(entry_regs(-8), Memory().read, Modules(), "x86_64") == []


def test_garbage_return_address() -> None:
    sp = STACK + 0x100
    mem = stack_memory({sp: 0xDEADBEEFCAFE})
    assert unwind(entry_regs(sp), mem.read, Modules(), "x86_64") == []
    mem = stack_memory({sp: 0})
    assert unwind(entry_regs(sp), mem.read, Modules(), "x86_64") == []


def test_frame_pointer_loop() -> None:
    sp = STACK + 0x100
    fp = STACK + 0x200
    mem = stack_memory({sp: 0x401000, fp: fp, fp + 8: 0x402000})  # saved rbp points at itself
    out = unwind(entry_regs(sp, rbp=fp), mem.read, Modules(), "x86_64")
    assert out == [0x401000, 0x402000]


def test_frame_pointer_below_sp() -> None:
    sp = STACK + 0x100
    mem = stack_memory({sp: 0x401000, STACK: STACK + 0x200, STACK + 8: 0x402000})
    assert unwind(entry_regs(sp, rbp=STACK), mem.read, Modules(), "x86_64") == [0x401000]


def test_cfi_that_does_not_grow_the_stack() -> None:
    # CFA = rsp + 0 with the return address at CFA+0: the same frame forever
    sp = STACK + 0x100
    mods = Modules([(0x401000, 0x401100, row(RSP, -8, (RIP, RuleKind.OFFSET, 0)))])
    mem = stack_memory({sp: 0x401010})
    assert unwind(entry_regs(sp), mem.read, mods, "x86_64") == [0x401010]


def test_stack_running_off_the_mapping() -> None:
    # the return address is found at the very top of the stack mapping: the next read fails
    top = STACK + STACK_SIZE
    sp = top - 8
    mods = Modules([(0x401000, 0x401100, row(RSP, 16, (RIP, RuleKind.OFFSET, -8)))])
    mem = stack_memory({sp: 0x401010})
    assert unwind(entry_regs(sp), mem.read, mods, "x86_64") == [0x401010]


def test_short_reads_are_unreadable() -> None:
    def short(addr: int, size: int) -> bytes:
        return b"\x01"
    assert unwind(entry_regs(STACK), short, Modules(), "x86_64") == []


def test_reads_are_bounded() -> None:
    # every read fails: the walk ends after a few attempts
    mem = Memory()
    assert unwind(entry_regs(STACK + 0x100), mem.read, Modules(), "x86_64") == []
    assert mem.reads <= 3


def test_unknown_abi_is_a_programming_error() -> None:
    with pytest.raises(KeyError):
        unwind(entry_regs(STACK), Memory().read, Modules(), "sparc")


words = st.integers(min_value=0, max_value=2**64 - 1)
stack_words = st.one_of(
    st.integers(min_value=CODE_LO, max_value=CODE_HI - 1),      # plausible return addresses
    st.integers(min_value=STACK, max_value=STACK + STACK_SIZE),  # plausible frame pointers
    words,
)
rule_kinds = st.sampled_from(list(RuleKind))


@st.composite
def random_rows(draw: st.DrawFn) -> CfiRow:
    rules = []
    for reg in draw(st.lists(st.integers(min_value=0, max_value=20), max_size=4, unique=True)):
        kind = draw(rule_kinds)
        arg: int | bytes
        if kind in (RuleKind.EXPRESSION, RuleKind.VAL_EXPRESSION):
            arg = draw(st.binary(max_size=12))
        else:
            arg = draw(st.integers(min_value=-64, max_value=64))
        rules.append((reg, kind, arg))
    expr = draw(st.one_of(st.none(), st.binary(max_size=12)))
    return row(draw(st.integers(min_value=-1, max_value=20)), draw(st.integers(min_value=-64, max_value=256)),
               *rules, expr=expr, signal=draw(st.booleans()))


@settings(max_examples=300, deadline=None)
@given(
    stack=st.lists(stack_words, min_size=0, max_size=STACK_SIZE // 8),
    sp_off=st.integers(min_value=-64, max_value=STACK_SIZE + 64),
    rbp=stack_words,
    rows=st.lists(random_rows(), max_size=6),
    depth=st.integers(min_value=0, max_value=40),
    abi=st.sampled_from(["x86_64", "i386"]),
)
def test_fuzzed_stacks_never_raise(stack: list[int], sp_off: int, rbp: int, rows: list[CfiRow],
                                   depth: int, abi: str) -> None:
    data = bytearray(STACK_SIZE)
    for i, w in enumerate(stack):
        struct.pack_into("<Q", data, i * 8, w)
    mem = Memory([(STACK, data)])
    span = (CODE_HI - CODE_LO) // max(len(rows), 1)
    mods = Modules([(CODE_LO + i * span, CODE_LO + (i + 1) * span, r) for i, r in enumerate(rows)])
    regs: dict[int | str, int] = {"pc": 0x7F0000000000, "sp": STACK + sp_off, 6: rbp, 5: rbp, 3: rbp}
    out = unwind(regs, mem.read, mods, abi, max_depth=depth)
    assert len(out) <= depth
    assert all(mods.is_executable(a) for a in out)
    assert mem.reads <= 64
