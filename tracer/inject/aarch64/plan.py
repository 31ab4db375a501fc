"""What the injector does to an arm64 vDSO image, decided from its bytes alone (no process).

Each traced function's entry word becomes `b stub` (4 bytes, +-128 MiB). A first instruction
that is a landing pad (bti c/jc, paciasp, pacibsp: a guarded page's BLR must land on one) stays,
and the `b` goes on the second word; after a paciasp/pacibsp there the stub first undoes the
signing (autiasp/autibsp, same sp) and calls the copy from its start, which signs its own
return address again. The body is copied word for word at the same relative offsets (internal
branches keep their bytes); what refers outside the function is re-aimed
(tracer/arch/aarch64_reloc.py): `bl`/`b` to vDSO code and `adrp` in place, `adr` and literal
loads (the [vvar] page: +-1 MiB) through a veneer (the relocated sequence, then `b` back), and
each `svc #0` becomes `b` to a fallback stub that flags the record, makes the call and branches
back. Anything else the copy cannot reproduce (an indirect branch, a conditional branch out of
the function, a system call in a helper it calls, a branch onto a patched word) refuses the
whole injection.
"""
from __future__ import annotations

from dataclasses import dataclass

from tracer.arch.aarch64_reloc import pc_relative_target
from tracer.inject.x86.plan import PlanError
from tracer.vdso import SIGRETURN_TRAMPOLINES, VdsoFunction, VdsoImage

__all__ = ["FunctionPlanA64", "PlanA64", "plan_image_a64", "PlanError", "LANDING_PADS",
           "AUTH_FOR", "SVC_0"]

# hint instructions a BR/BLR may land on in a guarded page (Arm ARM D8.4.2): bti c, bti jc,
# paciasp, pacibsp (PACIxSP are implicit landing pads for BLR and BR x16/x17)
BTI_C, BTI_JC = 0xD503245F, 0xD50324DF
PACIASP, PACIBSP = 0xD503233F, 0xD503237F
AUTIASP, AUTIBSP = 0xD50323BF, 0xD50323FF
LANDING_PADS = frozenset({BTI_C, BTI_JC, PACIASP, PACIBSP})
AUTH_FOR = {PACIASP: AUTIASP, PACIBSP: AUTIBSP}    # the instruction that undoes a signing
SVC_0 = 0xD4000001


def _kind(w: int) -> str | None:
    """How the copy treats a pc-relative instruction (the relocator's classes, Arm ARM C4.1):
    "b" (b, bl), "cond" (b.cond, bc.cond, cbz/cbnz, tbz/tbnz), "adrp", "near" (adr, literal
    loads: +-1 MiB), None for the rest."""
    if w & 0x7C000000 == 0x14000000:
        return "b"
    if w & 0xFF000000 == 0x54000000 or w & 0x7C000000 == 0x34000000:
        return "cond"
    if w & 0x9F000000 == 0x90000000:
        return "adrp"
    if w & 0x9F000000 == 0x10000000 or w & 0x3B000000 == 0x18000000:
        return "near"
    return None


def _target(w: int, at: int) -> int:
    t = pc_relative_target(w.to_bytes(4, "little"), at)
    assert t is not None
    return t


def _writes_sp(w: int) -> bool:
    """add/sub (immediate) with sp as destination (mov sp, xN too), or a load/store that
    writes back its sp base (pre/post-index: pair or single register)."""
    if w & 0x3F000000 == 0x11000000 and w & 0x1F == 31:         # (not adds/subs: xzr)
        return True
    if w & 0x3A000000 == 0x28000000 and (w >> 23 & 3) in (1, 3) and w >> 5 & 0x1F == 31:
        return True
    return (w & 0x3B200000 == 0x38000000 and (w >> 10 & 3) in (1, 3)
            and w >> 5 & 0x1F == 31)


def _indirect(w: int) -> bool:
    """br, blr and their authenticated forms (ret, retaa, retab: opc 2, are returns)."""
    return w & 0xFE000000 == 0xD6000000 and w >> 21 & 0xF != 2


@dataclass(frozen=True, slots=True)
class FunctionPlanA64:
    func: VdsoFunction
    words: tuple[int, ...]               # the body, one word per 4 bytes
    patch_at: int                        # image_offset of the word that becomes `b stub`
    entry_end: int                       # patch_at + 4
    auth: int | None                     # autiasp/autibsp the stub starts with, or None
    fallbacks: tuple[int, ...]           # image_offsets of each svc #0
    veneers: tuple[int, ...]             # image_offsets of adr / literal loads out of the body
    far: tuple[int, ...]                 # image_offsets of b/bl/adrp that leave the body
    # the body never moves sp nor calls anything (clock_gettime, gettimeofday, clock_getres):
    # a thread in its copy has the stub's frame at sp and x30 pointing into the stub, and can
    # be moved to the same offset of the original with the stub's frame popped (leaving)
    frameless: bool = False


@dataclass(frozen=True, slots=True)
class PlanA64:
    functions: tuple[FunctionPlanA64, ...]
    syscall_offset: int                  # an `svc #0` for remote system calls
    word: int = 8
    gateway_offset: int | None = None


def _words(image: VdsoImage, off: int, size: int) -> list[int]:
    data = image.data[off:off + size - size % 4]
    return [int.from_bytes(data[k:k + 4], "little") for k in range(0, len(data), 4)]


def _text_words(image: VdsoImage) -> list[tuple[int, int]]:
    lo, hi = image.text
    lo -= lo % 4
    return list(zip(range(lo, hi, 4), _words(image, lo, hi - lo)))


def syscall_site_a64(image: VdsoImage) -> int:
    for off, w in _text_words(image):
        if w == SVC_0:
            return off
    raise PlanError("the vDSO contains no svc #0 to run remote system calls from")


def plan_function(image: VdsoImage, func: VdsoFunction, targets: set[int]) -> FunctionPlanA64:
    name = func.symbol
    lo, hi = func.image_offset, func.image_offset + func.size
    if lo % 4 or func.size < 8:
        raise PlanError(f"{name} is not a whole arm64 function of two instructions or more")
    if func.symbol in SIGRETURN_TRAMPOLINES:
        raise PlanError(f"{name} is the signal return trampoline, not a function")
    words = _words(image, lo, func.size)
    patch = lo
    auth = None
    if words[0] in LANDING_PADS:
        patch = lo + 4
        auth = AUTH_FOR.get(words[0])
    falls, veneers, far = [], [], []
    for k, w in enumerate(words):
        at = lo + 4 * k
        if w == SVC_0:
            falls.append(at)
            continue
        if _indirect(w):
            raise PlanError(f"{name} has an indirect branch at {at:#x}")
        if w & 0xFFE0001F == 0xD4000001:
            raise PlanError(f"{name} enters the kernel with svc #{w >> 5 & 0xFFFF}")
        kind = _kind(w)
        if kind is None:
            continue
        t = _target(w, at)
        inside = lo <= t < hi
        if kind == "cond":
            if not inside:
                raise PlanError(f"{name} branches conditionally out of itself at {at:#x}")
        elif kind == "b":
            if not inside:
                far.append(at)
        elif kind == "adrp":
            far.append(at)
        elif not inside:                 # adr, ldr literal
            veneers.append(at)
    for t in targets:
        if patch <= t < patch + 4 and not (t == lo and patch == lo):
            raise PlanError(f"a branch targets {name}+{t - lo:#x}, the patched entry")
    frameless = auth is None and not any(
        _writes_sp(w) or w & 0xFC000000 == 0x94000000 for w in words)
    return FunctionPlanA64(func, tuple(words), patch, patch + 4, auth, tuple(falls),
                           tuple(veneers), tuple(far), frameless)


def _check_helpers(plans: list[FunctionPlanA64], image: VdsoImage) -> None:
    """A vDSO helper a copy calls (`bl` out of it) must not make a system call: it would not
    be flagged as a fallback."""
    text = _text_words(image)
    starts = sorted({f.image_offset for f in image.functions} | {image.text[1]})
    for p in plans:
        for at in p.far:
            w = p.words[(at - p.func.image_offset) // 4]
            if _kind(w) != "b":
                continue
            c = _target(w, at)
            nxt = min([s for s in starts if s > c] or [image.text[1]])
            if any(c <= off < nxt and x == SVC_0 for off, x in text):
                raise PlanError(f"a helper at {c:#x} called from {p.func.symbol} makes a system "
                                "call the injector cannot flag")


def plan_image_a64(image: VdsoImage, funcs: list[VdsoFunction]) -> PlanA64:
    if image.abi.name != "aarch64":
        raise PlanError(f"a {image.abi.name} vDSO, not an arm64 one")
    targets = set()
    for off, w in _text_words(image):
        if _kind(w) in ("b", "cond"):
            t = _target(w, off)
            if t != off:
                targets.add(t)
    plans = [plan_function(image, f, targets) for f in funcs]
    _check_helpers(plans, image)
    return PlanA64(tuple(plans), syscall_site_a64(image))
