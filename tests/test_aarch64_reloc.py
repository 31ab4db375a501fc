"""tracer/arch/aarch64_reloc.py on the checked-in arm64 vDSO (tests/fixtures/vdso-aarch64.so,
its llvm-objdump -d as the oracle) and on instructions the image lacks (assembled by llvm-mc,
checked in as bytes with their assembly beside them).

Every pc-relative instruction of the image is relocated near (the vDSO's padding), beyond the
reach of its own form and far (still within a `b`'s +-128 MiB); the relocated code is then
decoded by capstone (not by the relocator) and run symbolically: the places it can leave to,
the registers it sets and the literals it loads must be what the original instruction does at
its own address."""
from __future__ import annotations

from pathlib import Path

import capstone
import pytest
from capstone import arm64 as cs64

from a64_oracles import parse_llvm_objdump
from tracer.arch import aarch64_reloc as R

FIXTURES = Path(__file__).resolve().parent / "fixtures"
IMAGE = (FIXTURES / "vdso-aarch64.so").read_bytes()
OD = parse_llvm_objdump((FIXTURES / "vdso-aarch64.llvm-objdump-d.txt").read_text())
PC_REL = ("b", "bl", "cbz", "cbnz", "tbz", "tbnz", "adr", "adrp", "ldr", "ldrsw", "prfm")

_MD = capstone.Cs(capstone.CS_ARCH_ARM64, capstone.CS_MODE_ARM)
_MD.detail = True


def _reg(i: capstone.CsInsn, op: object) -> str:
    name = i.reg_name(op.reg)            # type: ignore[attr-defined]
    return {"lr": "x30", "fp": "x29"}.get(name, name)


def run(code: bytes, at: int, mem: dict[int, int] | None = None) -> tuple[set[int], dict[str, int], list[str]]:
    """Symbolic run of `code` placed at `at`: (addresses it can leave to -- falling off its end
    counts as its end address --, registers given known values, loads made: 'ldr REG, [ADDR]').
    Both ways of every conditional branch are followed."""
    insns = {i.address: i for i in _MD.disasm(code, at)}
    exits: set[int] = set()
    regs: dict[str, int] = {}
    loads: list[str] = []
    todo, seen = [at], set()
    end = at + len(code)
    while todo:
        pc = todo.pop()
        while True:
            if pc in seen:
                break
            seen.add(pc)
            if not at <= pc < end:
                exits.add(pc)
                break
            i = insns[pc]
            ops = i.operands
            m = i.mnemonic
            if m == "bl":
                regs["x30"] = pc + 4
                pc = ops[-1].imm
                continue
            if m == "b" or m.startswith("b."):
                t = ops[-1].imm
                if m in ("b", "b.al", "b.nv"):          # (b.nv too: always, Arm ARM C1.2.4)
                    pc = t
                    continue
                todo.append(t)
            elif m in ("cbz", "cbnz", "tbz", "tbnz"):
                todo.append(ops[-1].imm)
            elif m in ("adr", "adrp"):
                regs[_reg(i, ops[0])] = ops[1].imm & 0xFFFFFFFFFFFFFFFF
            elif m in ("ldr", "ldrsw", "prfm") and ops[min(1, len(ops) - 1)].type == cs64.ARM64_OP_IMM:
                addr = ops[min(1, len(ops) - 1)].imm
                if m == "prfm":
                    loads.append(f"prfm [{addr:#x}]")
                elif at <= addr < end:       # one of the relocation's own literals
                    regs[_reg(i, ops[0])] = int.from_bytes(code[addr - at:addr - at + 8], "little")
                else:
                    loads.append(f"{m} {_reg(i, ops[0])}, [{addr:#x}]")
            elif m in ("ldr", "ldrsw") and ops[1].type == cs64.ARM64_OP_MEM:
                base = _reg(i, type("O", (), {"reg": ops[1].mem.base})())
                if base == "sp":                           # a register restored
                    loads.append(f"{m} {_reg(i, ops[0])}, [sp]")
                    regs.pop(_reg(i, ops[0]), None)
                else:
                    loads.append(f"{m} {_reg(i, ops[0])}, [{regs[base]:#x}]")
                    if _reg(i, ops[0])[1:] == base[1:]:        # w5/x5 loaded over x5
                        del regs[base]
            elif m == "str":
                loads.append(f"str {_reg(i, ops[0])}, [sp]")
            elif m != "nop":
                raise AssertionError(f"unexpected {m} {i.op_str} in relocated code")
            pc += 4
    return exits, regs, loads


def expected(insn: bytes, at: int) -> tuple[set[int], dict[str, int], list[str]]:
    """What the original instruction does at its own address, by the same symbolic run."""
    return run(insn, at)


def pc_relative_fixture() -> list[tuple[int, bytes, str]]:
    out = []
    for addr, o in sorted(OD.items()):
        if o.mnemonic in PC_REL or o.mnemonic.startswith("b."):
            if o.mnemonic == "ldr" and "#" not in o.operands.split(",")[-1]:
                continue
            if o.mnemonic == "ldr" and "[" in o.operands:
                continue
            out.append((addr, o.raw, o.mnemonic))
    return out


FIXTURE_CASES = pc_relative_fixture()

# Not in the image (llvm-mc -triple=aarch64 -show-encoding, at address 0):
EXTRA = [
    (bytes.fromhex("030000b0"), "adrp x3, #4096"),
    (bytes.fromhex("43002836"), "tbz w3, #5, #8"),
    (bytes.fromhex("450000d8"), "prfm pldl3strm, #8"),
    (bytes.fromhex("45000018"), "ldr w5, #8"),
    (bytes.fromhex("45000058"), "ldr x5, #8"),
    (bytes.fromhex("45000098"), "ldrsw x5, #8"),
    (bytes.fromhex("4300001c"), "ldr s3, #8"),
    (bytes.fromhex("4300005c"), "ldr d3, #8"),
    (bytes.fromhex("4300009c"), "ldr q3, #8"),
    (bytes.fromhex("4e0000b4"), "cbz x14, #8"),
    (bytes.fromhex("4e0000b5"), "cbnz x14, #8"),
    (bytes.fromhex("4e00f8b7"), "tbnz x14, #63, #8"),
    (bytes.fromhex("4e000054"), "b.al #8"),
]


def test_the_fixture_has_the_pc_relative_kinds_the_vdso_uses():
    kinds = {m if not m.startswith("b.") else "b.cond" for _, _, m in FIXTURE_CASES}
    assert {"b", "bl", "b.cond", "cbz", "cbnz", "tbnz", "adr"} <= kinds


def test_targets_equal_llvm_objdumps():
    n = 0
    for addr, raw, m in FIXTURE_CASES:
        t = R.pc_relative_target(raw, addr)
        o = OD[addr]
        if m == "adr":
            assert t == addr + int(o.operands.split("#")[-1])
        else:
            assert o.target is not None and t == o.target[0], (hex(addr), o)
        n += 1
    assert n > 80
    for addr, o in OD.items():
        if o.mnemonic not in PC_REL and not o.mnemonic.startswith("b."):
            assert R.pc_relative_target(o.raw, addr) is None, (hex(addr), o)


def _check(raw: bytes, at: int, to: int) -> tuple[bytes, list[tuple[int, int]]]:
    code, bounds = R.relocate(raw, at, to)
    want_exits, want_regs, want_loads = expected(raw, at)
    exits, regs, loads = run(code, to)
    # falling off the original's end is the next instruction; off the copy's end the same
    want = {at + 4 if e == at + 4 else e for e in want_exits}
    got = {at + 4 if e == to + len(code) else e for e in exits}
    mnem = next(_MD.disasm(raw, at)).mnemonic
    if mnem == "bl":
        assert regs["x30"] == want_regs["x30"] == at + 4        # the original return address
    assert got == want, (raw.hex(), hex(at), hex(to))
    assert regs == want_regs
    if mnem == "prfm" and not loads:
        pass                                              # out of reach: a nop
    else:
        assert [x for x in loads if "sp" not in x] == want_loads or (
            # ldr via a base register: the same address, then the same register
            [x.split(",")[1] for x in loads if "sp" not in x] ==
            [x.split(",")[1] for x in want_loads])
    saved = [x.split(",")[0].split()[1] for x in loads if "[sp]" in x]
    assert saved[::2] == saved[1::2]              # each register saved below sp is restored
    assert bounds[0] == (0, at)
    return code, bounds


@pytest.mark.parametrize("delta", [0x1400, -0x2000, 3 << 20, -(5 << 20), 100 << 20])
def test_every_pc_relative_instruction_of_the_image_relocates(delta: int) -> None:
    base = 0xFFFF8A5C0000            # where the machine's kernel maps such a vDSO
    for addr, raw, m in FIXTURE_CASES:
        to = base + addr + delta
        code, _ = _check(raw, base + addr, to)
        if abs(delta) < 1 << 14:         # in reach of every form: one re-encoded instruction
            assert len(code) == (4 if m != "bl" else 20 + 4 * ((to + 8) % 8 != 0)), hex(addr)


@pytest.mark.parametrize("delta", [0x1400, 3 << 20, -(5 << 20), 100 << 20, 6 << 30])
@pytest.mark.parametrize(("raw", "asm"), EXTRA)
def test_what_the_image_lacks_relocates(raw: bytes, asm: str, delta: int) -> None:
    at = 0x7F0000001000
    if abs(delta) >= R.B_REACH and asm.split()[0] in ("tbz", "tbnz", "cbz", "cbnz", "b.al"):
        with pytest.raises(R.RelocationError):      # no `br` (BTI): out of every b's reach
            R.relocate(raw, at, at + delta)
        return
    _check(raw, at, at + delta)


def test_near_is_one_instruction_far_is_rewritten():
    at = 0x7F0000001000
    # b.ne 0x3f8 style: in reach, the same instruction with a new offset
    code, _ = R.relocate(bytes.fromhex("41000054"), at, at + 0x800)
    assert len(code) == 4 and R.pc_relative_target(code, at + 0x800) == at + 8
    # out of b.cond's reach: inverted condition over a b
    code, bounds = R.relocate(bytes.fromhex("41000054"), at, at + (3 << 20))
    assert code[:4] == bytes.fromhex("40000054")                    # b.eq +8
    assert bounds == [(0, at), (4, at + 8)]
    # b out of reach is refused (never a `br`: BTI)
    with pytest.raises(R.RelocationError):
        R.relocate(bytes.fromhex("02000014"), at, at + (200 << 20))
    # a literal of the SIMD kind: x16 saved and restored around, sp moved first
    code, _ = R.relocate(bytes.fromhex("4300009c"), at, at + (3 << 20))
    assert code[:4] == bytes.fromhex("f00f1ff8") and code[-4:] == bytes.fromhex("f00741f8")


def test_literals_are_aligned():
    at = 0x7F0000001000
    for to in (at + (3 << 20), at + (3 << 20) + 4):
        code, _ = R.relocate(bytes.fromhex("030000b0"), at, to + (6 << 30))
        lit = next(i.operands[-1].imm for i in _MD.disasm(code, to + (6 << 30)) if i.mnemonic == "ldr")
        assert lit % 8 == 0


def test_runs_and_the_jump_back():
    # the entry of __kernel_clock_gettime: cmp; b.hi -- two instructions, then b back
    at = 0x340
    run_code = IMAGE[at:at + 8]
    code, bounds = R.relocate_run(run_code, at, 0x1300)
    assert bounds == [(0, 0x340), (4, 0x344), (8, 0x348)]
    assert code[:4] == run_code[:4]
    assert R.pc_relative_target(code[4:8], 0x1304) == 0x3F8
    assert R.pc_relative_target(code[8:12], 0x1308) == 0x348 and len(code) == 12
    # ret last: no jump back; a b in the middle is refused
    code, bounds = R.relocate_run(IMAGE[0x3F0:0x3F8], 0x3F0, 0x1300)
    assert len(code) == 8 and bounds == [(0, 0x3F0), (4, 0x3F4)]
    with pytest.raises(R.RelocationError):
        R.relocate_run(IMAGE[0x5D0:0x5D8], 0x5D0, 0x1300)           # b, then nop
    # tail=False: nothing appended
    assert R.relocate_run(IMAGE[0x348:0x350], 0x348, 0x1300, tail=False)[0] == IMAGE[0x348:0x350]


def test_falls_through():
    assert not R.falls_through(bytes.fromhex("c0035fd6"))         # ret
    assert not R.falls_through(bytes.fromhex("e2ffff17"))         # b
    assert not R.falls_through(bytes.fromhex("4e000054"))         # b.al
    assert R.falls_through(bytes.fromhex("00013fd6"))             # blr x8
    assert not R.falls_through(bytes.fromhex("00011fd6"))         # br x8
    assert R.falls_through(bytes.fromhex("010000d4"))             # svc #0
    assert R.falls_through(bytes.fromhex("a8050054"))             # b.hi
