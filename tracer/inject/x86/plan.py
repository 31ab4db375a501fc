"""What the injector does to one vDSO image, decided from its bytes alone (no process).

For each traced function: the entry window the `jmp rel32` overwrites, and how its body is
copied into the code page: the same layout byte for byte (so internal branches need no change),
rip-relative operands and calls that leave the function re-aimed, and every `syscall`
instruction redirected, together with the instructions just before it that make room for a
`jmp rel32`, through a fallback stub that marks the call's record before entering the kernel.
Anything the copy cannot reproduce exactly (an indirect branch, a jump that leaves the
function, a syscall outside every traced function, a branch into a patched window) refuses the
whole injection: a partial one would lose calls or fallback flags.

i386 (arch/x86/entry/vdso/vdso32): the functions enter the kernel only through
`call __kernel_vsyscall`, so each such call is a fallback site (the copy calls a fallback
stub instead, which then jumps to the real gateway); `call __x86.get_pc_thunk.REG` (a helper
that is `mov REG, [esp]; ret`) loads the PIC base from the return address, so the copy gets
`mov REG, imm32` with the ORIGINAL return address instead: [vvar] references still resolve
against the vDSO. The gateway itself is not copied (its sysenter returns to a fixed place in
the vDSO); remote system calls use its `int 0x80`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from tracer.inject.codepage import PlanError
from tracer import disasm
from tracer.abi import Abi
from tracer.vdso import GATEWAY_SYMBOL, VdsoFunction, VdsoImage

__all__ = ["PlanError", "FallbackSite", "FunctionPlan", "Plan", "plan_image", "JMP_LEN",
           "syscall_site", "gateway_int80"]

JMP_LEN = disasm.JMP_REL32_LEN


@dataclass(frozen=True, slots=True)
class FallbackSite:
    """A syscall in the copied body: [start, syscall) are the displaced instructions. On i386
    a `call __kernel_vsyscall`: start == syscall, end after the call, nothing displaced."""
    start: int                  # image_offset of the first displaced instruction
    syscall: int                # image_offset of the syscall instruction
    end: int                    # image_offset just after it (where the stub jumps back)
    displaced: tuple[tuple[int, bytes], ...]   # (image_offset, bytes) of each displaced insn


@dataclass(frozen=True, slots=True)
class FunctionPlan:
    func: VdsoFunction
    insns: tuple[disasm.Insn, ...]       # at image offsets (base 0)
    entry_end: int                       # image_offset where the entry window ends (>= +5)
    fallbacks: tuple[FallbackSite, ...]
    thunks: tuple[tuple[int, int], ...] = ()   # i386: (image_offset of the call, register)


@dataclass(frozen=True, slots=True)
class Plan:
    functions: tuple[FunctionPlan, ...]
    syscall_offset: int                  # a `syscall` (i386: `int 0x80`) for remote system calls
    word: int = 8                        # 8: x86_64 code, 4: i386 code
    gateway_offset: int | None = None    # i386: __kernel_vsyscall


def _all_insns(image: VdsoImage) -> list[disasm.Insn]:
    lo, hi = image.text
    whole = VdsoFunction(lo, hi - lo, "<text>", "<text>", (), None)
    return disasm.disassemble(image, whole)


def _is_rip_relative(i: disasm.Insn) -> bool:
    return "rip" in i.op_str


def _branch_targets(insns: list[disasm.Insn]) -> set[int]:
    return {i.target for i in insns if i.target is not None}


def syscall_site(image: VdsoImage) -> int:
    for i in _all_insns(image):
        if i.mnemonic == "syscall":
            return i.address
    raise PlanError("the vDSO contains no syscall instruction to run remote system calls from")


def _fallback_site(insns: list[disasm.Insn], k: int, targets: set[int]) -> FallbackSite:
    sc = insns[k]
    j = k
    while sc.address + sc.size - insns[j].address < JMP_LEN:
        j -= 1
        if j < 0:
            raise PlanError(f"no room before the syscall at {sc.address:#x}")
        prev = insns[j]
        if prev.target is not None or prev.mnemonic in ("call", "jmp", "ret") \
                or prev.mnemonic.startswith("j") or prev.is_syscall:
            raise PlanError(f"a branch just before the syscall at {sc.address:#x}")
    start = insns[j].address
    for t in targets:
        if start < t < sc.address + sc.size:
            raise PlanError(f"a branch targets the middle of the window before the syscall at "
                            f"{sc.address:#x}")
    displaced = tuple((i.address, i.raw) for i in insns[j:k])
    return FallbackSite(start, sc.address, sc.address + sc.size, displaced)


def _pc_thunk(image: VdsoImage, off: int) -> int | None:
    """The register a `__x86.get_pc_thunk.REG` at image_offset `off` loads (`mov REG, [esp];
    ret`: 8B /r with an [esp] operand, then C3), or None."""
    b = image.data[off:off + 4]
    if len(b) == 4 and b[0] == 0x8B and b[1] & 0xC7 == 0x04 and b[2] == 0x24 and b[3] == 0xC3:
        reg = (b[1] >> 3) & 7
        return reg if reg != 4 else None
    return None


_ABSOLUTE_MEM = re.compile(r"\[0x[0-9a-f]+\]")


def plan_function(image: VdsoImage, func: VdsoFunction, all_insns: list[disasm.Insn],
                  targets: set[int], gateway_offset: int | None = None) -> FunctionPlan:
    name = func.symbol
    i386 = image.abi.word == 4
    if func.size < JMP_LEN:
        raise PlanError(f"{name} is {func.size} bytes, too short for a jmp rel32")
    if i386 and (gateway_offset is None or func.image_offset == gateway_offset):
        raise PlanError(f"{name} cannot be copied (its sysenter returns into the vDSO)")
    insns = disasm.disassemble(image, func)
    lo, hi = func.image_offset, func.image_offset + func.size
    covered = sum(i.size for i in insns)
    if not insns or insns[0].address != lo or covered < func.size - 16:
        raise PlanError(f"{name} does not disassemble cleanly")
    falls = []
    thunks = []
    for k, i in enumerate(insns):
        if i.is_syscall:
            if i386 or i.mnemonic != "syscall":
                raise PlanError(f"{name} enters the kernel with {i.mnemonic}")
            falls.append(_fallback_site(insns, k, targets))
        elif i.mnemonic in ("call", "jmp") or i.mnemonic.startswith("j") or i.mnemonic.startswith("loop"):
            if i.target is None:
                raise PlanError(f"{name} has an indirect branch at {i.address:#x}")
            if i.mnemonic != "call" and not lo <= i.target < hi:
                raise PlanError(f"{name} jumps out of itself at {i.address:#x}")
            if i.mnemonic == "call" and i.raw[0] != 0xE8:
                raise PlanError(f"{name} has an unusual call at {i.address:#x}")
            if i.mnemonic != "call" and not lo <= i.target < hi and i.size == 2:
                raise PlanError(f"{name} has a short jump out of itself at {i.address:#x}")
            if i386 and i.mnemonic == "call":
                if i.target == gateway_offset:
                    falls.append(FallbackSite(i.address, i.address, i.address + i.size, ()))
                elif (reg := _pc_thunk(image, i.target)) is not None:
                    thunks.append((i.address, reg))
        elif i386 and i.mnemonic != "lea" and _ABSOLUTE_MEM.search(i.op_str):
            # PIC code addresses memory through the PIC base; an absolute operand would be
            # a link-time address the copy cannot keep
            raise PlanError(f"{name} has an absolute memory operand at {i.address:#x}")
    end = lo
    for i in insns:
        if end >= lo + JMP_LEN:
            break
        end = i.address + i.size
    for t in targets:
        if lo < t < end:
            raise PlanError(f"a branch targets {name}+{t - lo:#x}, inside the patched entry")
    return FunctionPlan(func, tuple(insns), end, tuple(falls), tuple(thunks))


def _check_syscalls_covered(all_insns: list[disasm.Insn], plans: list[FunctionPlan],
                            image: VdsoImage, gateway_offset: int | None = None) -> None:
    """A syscall outside the copied bodies (in a helper they call) would not be flagged.
    (i386: the calls to the gateway are the fallback sites, the PC thunks are not called.)"""
    called: set[int] = set()
    for p in plans:
        sites = {s.start for s in p.fallbacks} | {off for off, _ in p.thunks}
        for i in p.insns:
            if i.mnemonic == "call" and i.target is not None and i.address not in sites:
                called.add(i.target)
    if not called:
        return
    starts = sorted({f.image_offset for f in image.functions} | called | {image.text[1]})
    for c in called:
        nxt = min(s for s in starts if s > c)
        for i in all_insns:
            if c <= i.address < nxt and i.is_syscall:
                raise PlanError(f"a helper at {c:#x} called from a traced function makes a "
                                "system call the injector cannot flag")


def gateway_int80(image: VdsoImage) -> tuple[int, int]:
    """i386: image offsets of __kernel_vsyscall and of its `int 0x80`."""
    gw = image.function(GATEWAY_SYMBOL)
    if gw is None:
        raise PlanError(f"the i386 vDSO exports no {GATEWAY_SYMBOL}")
    for i in disasm.disassemble(image, gw):
        if i.raw == b"\xcd\x80":
            return gw.image_offset, i.address
    raise PlanError(f"{GATEWAY_SYMBOL} has no int 0x80 to run remote system calls from")


def plan_image(image: VdsoImage, funcs: list[VdsoFunction], abi: Abi) -> Plan:
    if abi.word != image.abi.word or abi.word not in (4, 8):
        raise PlanError(f"a {image.abi.name} vDSO in a {abi.name} process")
    all_insns = _all_insns(image)
    targets = _branch_targets(all_insns)
    gw_off = None
    if abi.word == 4:
        gw_off, site = gateway_int80(image)
    else:
        site = syscall_site(image)
    plans = [plan_function(image, f, all_insns, targets, gw_off) for f in funcs]
    _check_syscalls_covered(all_insns, plans, image, gw_off)
    return Plan(tuple(plans), site, abi.word, gw_off)
