"""Capstone (only here): disassembly of vDSO functions, the sites the engine patches, and the
relocation of a displaced instruction into an out-of-line slot.

x86_64 and i386 in capstone's x86 modes (Intel or AT&T syntax); aarch64 in its ARM64 mode, which
has one syntax, the Arm ARM's: `syntax` is ignored there. The image's ELF machine decides
(VdsoImage.abi), never the host. arm64 relocation is tracer/arch/aarch64_reloc.py's (pure
bit fields, no capstone); `relocate` hands arm64 code to it."""
from __future__ import annotations

from dataclasses import dataclass

import capstone
from capstone import arm64 as _arm64
from capstone import x86 as _x86

from tracer.abi import Abi
from tracer.arch import x86_64 as _x86_64
from tracer.vdso import GATEWAY_SYMBOL, VdsoFunction, VdsoImage

__all__ = ["Insn", "disassemble", "Gateway", "gateway", "Sites", "sites", "relocate",
           "SYNTAXES", "JMP_REL32_LEN", "insn_length", "branch_targets"]

SYNTAXES = ("intel", "att")
JMP_REL32_LEN = 5
_GRP_RET = capstone.CS_GRP_RET
_GRP_INT = capstone.CS_GRP_INT
_GRP_CALL = capstone.CS_GRP_CALL
_GRP_JUMP = capstone.CS_GRP_JUMP
_GRP_REL = capstone.CS_GRP_BRANCH_RELATIVE
_SYSCALL_MNEMONICS = frozenset({"syscall", "sysenter"})
# arm64 direct branches that are not calls: b, b.cond, cbz/cbnz, tbz/tbnz (ARM ARM C6);
# x86's jumps are the j* mnemonics.
_A64_JUMPS = frozenset({"b", "cbz", "cbnz", "tbz", "tbnz"})


def _is_a64(abi: Abi) -> bool:
    return abi.elf_machine == "EM_AARCH64"


def _is_jump(mnemonic: str) -> bool:
    return mnemonic.startswith(("j", "b.")) or mnemonic in _A64_JUMPS


@dataclass(frozen=True, slots=True)
class Insn:
    address: int                 # runtime_addr (or image_offset when base is 0)
    size: int
    raw: bytes
    mnemonic: str
    op_str: str
    target: int | None           # branch target of a relative jump or call
    target_symbol: str | None    # "__vdso_clock_gettime+0x10"
    is_ret: bool
    is_syscall: bool             # syscall, sysenter, int 0x80


def _cs(abi: Abi, syntax: str = "intel") -> capstone.Cs:
    if _is_a64(abi):
        md = capstone.Cs(capstone.CS_ARCH_ARM64, capstone.CS_MODE_ARM)
        md.detail = True
        return md
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64 if abi.word == 8
                     else capstone.CS_MODE_32)
    md.detail = True
    if syntax == "att":
        md.syntax = capstone.CS_OPT_SYNTAX_ATT
    return md


def _branch_target(i: capstone.CsInsn, a64: bool = False) -> int | None:
    """The target of a pc-relative branch or call: x86's only operand; arm64's last one
    (`b.cond L`, `cbz x0, L`, `tbz x0, #bit, L`)."""
    if not i.group(_GRP_REL) or not i.operands:
        return None
    op = i.operands[-1]
    return int(op.imm) if op.type == (_arm64.ARM64_OP_IMM if a64 else _x86.X86_OP_IMM) else None


def _is_syscall(i: capstone.CsInsn) -> bool:
    # x86: syscall, sysenter, int 0x80; arm64: svc #0 (the only kernel entry a vDSO uses)
    return i.mnemonic in _SYSCALL_MNEMONICS or i.mnemonic == "svc" or (
        i.group(_GRP_INT) and i.op_str in ("0x80", "$0x80"))


_INSNS: dict[tuple[bytes, int, int, int, str], tuple[Insn, ...]] = {}


def disassemble(image: VdsoImage, func: VdsoFunction, base: int = 0,
                syntax: str = "intel") -> list[Insn]:
    """The function's instructions at runtime addresses base + image_offset (once per image,
    function, base and syntax: the --inject plan disassembles while the tracee is stopped)."""
    if _is_a64(image.abi):
        syntax = "arm"                   # one syntax: one cache entry whatever was asked
    key = (image.data, func.image_offset, func.size, base, syntax)
    hit = _INSNS.get(key)
    if hit is None:
        hit = tuple(_disassemble(image, func, base, syntax))
        if len(_INSNS) >= 256:
            _INSNS.clear()
        _INSNS[key] = hit
    return list(hit)


def _disassemble(image: VdsoImage, func: VdsoFunction, base: int,
                 syntax: str) -> list[Insn]:
    md = _cs(image.abi, syntax)
    a64 = _is_a64(image.abi)
    start = func.image_offset
    code = image.data[start:start + func.size]
    out = []
    for i in md.disasm(code, base + start):
        target = _branch_target(i, a64)
        tsym = None
        if target is not None:
            hit = image.symbolize(target - base)
            if hit:
                tsym = hit[0] if hit[1] == 0 else f"{hit[0]}+{hit[1]:#x}"
        out.append(Insn(i.address, i.size, bytes(i.bytes), i.mnemonic, i.op_str, target, tsym,
                        i.group(_GRP_RET), _is_syscall(i)))
    return out


@dataclass(frozen=True, slots=True)
class Gateway:
    symbol: str
    instructions: tuple[str, ...]    # the kernel-entry instructions in order: fast, then fallback


def gateway(image: VdsoImage) -> Gateway | None:
    """i386's __kernel_vsyscall: `sysenter` (Intel) or `syscall` (AMD), then `int 0x80`."""
    f = image.function(GATEWAY_SYMBOL)
    if f is None:
        return None
    found = tuple(f"{i.mnemonic} {i.op_str}".strip() for i in disassemble(image, f)
                  if i.is_syscall)
    return Gateway(f.symbol, found)


@dataclass(frozen=True, slots=True)
class Sites:
    """Image offsets inside one function that the engine patches."""
    entry: int
    rets: tuple[int, ...]
    fallbacks: tuple[int, ...]       # syscall instructions, or calls to __kernel_vsyscall
    escapes: tuple[int, ...]         # jumps that leave the function (a return we cannot see)


# Disassembly is pure in the image's bytes: done once per image and function, so that planning
# again while the tracee is stopped (attach, exec) costs no capstone pass.
_SITES: dict[tuple[bytes, int, int], Sites] = {}
_TARGETS: dict[bytes, frozenset[int]] = {}


def sites(image: VdsoImage, func: VdsoFunction) -> Sites:
    key = (image.data, func.image_offset, func.size)
    hit = _SITES.get(key)
    if hit is None:
        hit = _sites(image, func)
        if len(_SITES) >= 256:
            _SITES.clear()
        _SITES[key] = hit
    return hit


def _sites(image: VdsoImage, func: VdsoFunction) -> Sites:
    gw = image.function(GATEWAY_SYMBOL)
    gw_off = gw.image_offset if gw is not None and gw is not func else None
    lo, hi = func.image_offset, func.image_offset + func.size
    rets, falls, escapes = [], [], []
    for i in disassemble(image, func):
        if i.is_ret:
            rets.append(i.address)
        elif i.is_syscall:
            falls.append(i.address)
        elif i.target is not None and i.mnemonic == "call" and i.target == gw_off:
            falls.append(i.address)
        elif i.target is not None and _is_jump(i.mnemonic) and not lo <= i.target < hi:
            escapes.append(i.address)
    return Sites(func.image_offset, tuple(rets), tuple(falls), tuple(escapes))


def _rel32(value: int) -> bytes:
    if not -(1 << 31) <= value < (1 << 31):
        raise ValueError("displacement out of rel32 range")
    return (value & 0xFFFFFFFF).to_bytes(4, "little")


def relocate(abi: Abi, code: bytes, orig: int, slot: int,
             tail: bool = True) -> tuple[bytes, list[tuple[int, int]]]:
    """Out-of-line copy of the single instruction at the start of `code` (runtime address
    `orig`) for execution at `slot`, followed by a jump back to the next instruction.

    Returns the slot bytes and a map of (slot offset, equivalent original address) for every
    instruction boundary in the slot, so a thread stopped inside the slot can be put back at
    the matching original address. A relative call is rewritten as push of the original return
    address + jmp, so the callee sees exactly the return address it would have seen
    (i386's `call __x86.get_pc_thunk.ax` depends on it). With `tail=False` the jump back is
    left out (the caller relocates the next instruction right after); only a non-branch
    instruction can be relocated that way.
    """
    if _is_a64(abi):
        from tracer.arch.aarch64_reloc import relocate_run
        return relocate_run(code[:4], orig, slot, tail=tail)
    md = _cs(abi)
    insn = next(md.disasm(code, orig, 1), None)
    if insn is None:
        raise ValueError(f"cannot decode the instruction at {orig:#x}")
    size = insn.size
    if not tail and (_branch_target(insn) is not None or insn.group(_GRP_RET)
                     or insn.group(_GRP_JUMP) or insn.group(_GRP_CALL)):
        raise ValueError(f"{insn.mnemonic} must be the last relocated instruction")
    nxt = orig + size
    raw = bytearray(insn.bytes)
    target = _branch_target(insn)
    out = bytearray()
    bounds = [(0, orig)]
    if insn.group(_GRP_CALL) and target is not None:
        out += _x86_64.push_value(nxt, abi.word == 8)
        bounds.append((len(out), target))  # the return address is pushed: only the jump is left
        out += _x86_64.jmp_rel32(slot + len(out), target)
        return bytes(out), bounds
    if target is not None and insn.group(_GRP_JUMP):
        if insn.mnemonic == "jmp":
            out += _x86_64.jmp_rel32(slot, target)
            return bytes(out), bounds
        cond = _x86_64.jcc_condition(bytes(raw))
        if cond is None:
            raise ValueError(f"cannot relocate {insn.mnemonic} {insn.op_str}")
        out += _x86_64.jcc_rel32(cond, slot, target)
        bounds.append((len(out), nxt))
        out += _x86_64.jmp_rel32(slot + len(out), nxt)
        return bytes(out), bounds
    if insn.group(_GRP_RET):
        return bytes(raw), bounds
    if insn.disp_size == 4 and any(op.type == _x86.X86_OP_MEM and op.mem.base == _x86.X86_REG_RIP
                                   for op in insn.operands):
        disp = int.from_bytes(raw[insn.disp_offset:insn.disp_offset + 4], "little", signed=True)
        raw[insn.disp_offset:insn.disp_offset + 4] = _rel32(disp + orig - slot)
    elif target is not None:
        raise ValueError(f"cannot relocate {insn.mnemonic} {insn.op_str}")
    out += raw
    bounds.append((len(out), nxt))
    if tail:
        out += _x86_64.jmp_rel32(slot + len(out), nxt)
    return bytes(out), bounds


def insn_length(abi: Abi, code: bytes, addr: int) -> int:
    if _is_a64(abi):
        if len(code) < 4:
            raise ValueError(f"cannot decode the instruction at {addr:#x}")
        return 4                       # every arm64 instruction
    insn = next(_cs(abi).disasm(code, addr, 1), None)
    if insn is None:
        raise ValueError(f"cannot decode the instruction at {addr:#x}")
    return int(insn.size)


def branch_targets(image: VdsoImage) -> set[int]:
    """Every relative branch target (image offsets) in the image's .text, by linear sweep."""
    hit = _TARGETS.get(image.data)
    if hit is None:
        hit = frozenset(_branch_targets(image))
        if len(_TARGETS) >= 8:
            _TARGETS.clear()
        _TARGETS[image.data] = hit
    return set(hit)


def _branch_targets(image: VdsoImage) -> set[int]:
    md = _cs(image.abi)
    a64 = _is_a64(image.abi)
    md.skipdata = True
    lo, hi = image.text
    out = set()
    for i in md.disasm(image.data[lo:hi], lo):
        t = _branch_target(i, a64)
        if t is not None:
            out.add(t)
    return out
