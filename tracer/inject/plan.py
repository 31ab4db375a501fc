"""What the injector does to one vDSO image, decided from its bytes alone (no process).

For each traced function: the entry window the `jmp rel32` overwrites, and how its body is
copied into the code page: the same layout byte for byte (so internal branches need no change),
rip-relative operands and calls that leave the function re-aimed, and every `syscall`
instruction redirected, together with the instructions just before it that make room for a
`jmp rel32`, through a fallback stub that marks the call's record before entering the kernel.
Anything the copy cannot reproduce exactly (an indirect branch, a jump that leaves the
function, a syscall outside every traced function, a branch into a patched window) refuses the
whole injection: a partial one would lose calls or fallback flags.
"""
from __future__ import annotations

from dataclasses import dataclass

from tracer import disasm
from tracer.abi import Abi
from tracer.errors import TracerError
from tracer.vdso import VdsoFunction, VdsoImage

__all__ = ["PlanError", "FallbackSite", "FunctionPlan", "Plan", "plan_image", "JMP_LEN",
           "syscall_site"]

JMP_LEN = disasm.JMP_REL32_LEN


class PlanError(TracerError):
    """The vDSO is not the shape the injector can patch exactly."""


@dataclass(frozen=True, slots=True)
class FallbackSite:
    """A syscall in the copied body: [start, syscall) are the displaced instructions."""
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


@dataclass(frozen=True, slots=True)
class Plan:
    functions: tuple[FunctionPlan, ...]
    syscall_offset: int                  # a `syscall` in the image, for remote system calls


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


def plan_function(image: VdsoImage, func: VdsoFunction, all_insns: list[disasm.Insn],
                  targets: set[int]) -> FunctionPlan:
    name = func.symbol
    if func.size < JMP_LEN:
        raise PlanError(f"{name} is {func.size} bytes, too short for a jmp rel32")
    insns = disasm.disassemble(image, func)
    lo, hi = func.image_offset, func.image_offset + func.size
    covered = sum(i.size for i in insns)
    if not insns or insns[0].address != lo or covered < func.size - 16:
        raise PlanError(f"{name} does not disassemble cleanly")
    falls = []
    for k, i in enumerate(insns):
        if i.is_syscall:
            if i.mnemonic != "syscall":
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
    end = lo
    for i in insns:
        if end >= lo + JMP_LEN:
            break
        end = i.address + i.size
    for t in targets:
        if lo < t < end:
            raise PlanError(f"a branch targets {name}+{t - lo:#x}, inside the patched entry")
    return FunctionPlan(func, tuple(insns), end, tuple(falls))


def _check_syscalls_covered(all_insns: list[disasm.Insn], plans: list[FunctionPlan],
                            image: VdsoImage) -> None:
    """A syscall outside the copied bodies (in a helper they call) would not be flagged."""
    called: set[int] = set()
    for p in plans:
        for i in p.insns:
            if i.mnemonic == "call" and i.target is not None:
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


def plan_image(image: VdsoImage, funcs: list[VdsoFunction], abi: Abi) -> Plan:
    if abi.word != 8 or image.abi.word != 8:
        raise PlanError("only x86_64 tracees are supported")
    all_insns = _all_insns(image)
    targets = _branch_targets(all_insns)
    plans = [plan_function(image, f, all_insns, targets) for f in funcs]
    _check_syscalls_covered(all_insns, plans, image)
    return Plan(tuple(plans), syscall_site(image))
