"""--inject on arm64, leaving: a thread taken out of a copied body without single-stepping it
through. A copy's seqlock loops (the vDSO's read of [vvar], retried while the kernel updates
it every tick) can retry for ever under single-stepping, each step a ptrace round trip (seen
in the emulated machine: a thread stepped 2000 times and still in the copy). A copy is the
original function word for word at the same offsets, so a thread in the copy of a frameless
function (plan.py: it never moves sp nor calls: sp is the stub's, the stub's frame is right
there) goes on at the same offset of the original with the stub's frame popped: x30 = the
caller's return address the stub saved, sp above the frame. The call is not recorded (the
ring pointer is already 0: nothing is any more). The stub's head (before its `bl`) is
straight-line code and is stepped into the copy first; a fallback stub or veneer is stepped
back into the copy (its own loop is bounded)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from tracer import target
from tracer.arch import Arch
from tracer.errors import MemoryReadError
from tracer.inject import layout as L
from tracer.inject.remote import Stepper

if TYPE_CHECKING:
    from tracer.inject.aarch64.plan import PlanA64
    from tracer.inject.codepage import CodePage

__all__ = ["out_of_copy"]

_AUX_STEPS = 4000        # a fallback stub's scan of 2048 bytes is ~1800 instructions


def out_of_copy(arch: Arch, mem: target.Memory, tid: int, regs: target.Regs, stepper: Stepper,
                plan: PlanA64, code: CodePage, base: int, code_base: int) -> bool:
    """Move `tid` out of a frameless copy (or the stub head / fallback stub / veneer on the
    way into one) to the original function. True when it was moved."""
    keys = code.data[L.CODE_KEYA:L.CODE_KEYA + 8] + code.data[L.CODE_KEYB:L.CODE_KEYB + 8]
    spans = []
    lo = code_base + L.CODE_START
    for fp, info in zip(plan.functions, code.stubs):
        # [lo, copy): its fallback stubs and veneers; [stub, after the bl): the stub's head
        spans.append((fp, info, lo))
        lo = (info.tail[1] + 15) & -16
    for _ in range(3):
        arch.regs_get(tid, regs)
        pc = regs[arch.pc]
        for fp, info, aux in spans:
            if not fp.frameless:
                continue
            c0, c1 = info.copy
            if aux <= pc < c0 or info.stub <= pc < info.tail[0]:
                stepper.step_while(tid, regs, lambda ip: aux <= ip < c0 or
                                   info.stub <= ip < info.tail[0], limit=_AUX_STEPS)
                break
            if c0 <= pc < c1:
                sp = regs[arch.sp]
                try:
                    frame = mem.read(sp, L.FRAME_A64)
                except MemoryReadError:
                    return False
                if frame[L.FR_KEYA:L.FR_KEYA + 16] != keys:
                    return False            # not the stub's frame: leave it to the stepping
                regs["x30"] = int.from_bytes(frame[L.FRA_LR:L.FRA_LR + 8], "little")
                regs[arch.sp] = sp + L.FRAME_A64
                regs[arch.pc] = base + fp.func.image_offset + (pc - c0)
                arch.regs_set(tid, regs)
                return True
        else:
            return False
    return False
