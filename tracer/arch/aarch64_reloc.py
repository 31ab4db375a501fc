"""arm64 instruction relocation: an instruction (or a run of them) moved from the address it was
linked for to another, with the same effect there. Pure (bytes in, bytes out), no capstone.

The stop-based engine (breakpoints.py: the body copy a stub calls, the out-of-line slots of
brk sites) and the in-tracee recorder (inject/aarch64/) both use it. API (kept stable):

    relocate(insn, at, to) -> (code, bounds)          one 4-byte instruction, no jump back
    relocate_run(code, at, to, tail=True) -> (code, bounds)
                                                      a run, then `b` to the instruction after
    falls_through(insn) -> bool                       runs on into the next instruction
    pc_relative_target(insn, at) -> int | None        what a pc-relative instruction addresses
    RelocationError (a ValueError)                    cannot be moved there

`bounds` maps offsets in the new code to the equivalent original addresses: a thread whose pc
is at such an offset can be put at that address instead (at most one per original instruction
plus the jump back; none inside a multi-instruction rewrite whose effect is half done).

Every arm64 instruction is 4 bytes; the pc-relative ones (Arm ARM C4.1, the encodings below)
are the only ones whose effect depends on their address:

    b/bl imm26 (+-128 MiB)      b.cond/bc.cond imm19 (+-1 MiB)   cbz/cbnz imm19
    tbz/tbnz imm14 (+-32 KiB)   adr imm21 (+-1 MiB)              adrp imm21 pages (+-4 GiB)
    ldr/ldrsw/prfm literal and ldr s/d/q literal imm19 (+-1 MiB)

Each is re-encoded for its new address when its target is in reach from there, else rewritten:

* b -> RelocationError out of +-128 MiB (a `br` would need a landing pad at its target in a
  BTI-guarded page: arm64's vDSO pages and ours are reached with direct branches only);
* bl T -> `ldr x30, =at+4; b T`: the callee returns to the original code after the call, with
  the return address it would have had (as a relocated x86 `call` pushes the original one);
* b.cond, cbz/cbnz, tbz/tbnz out of reach -> the inverted test skipping a `b T`;
* adr/adrp out of reach -> `ldr xd, =T`;
* ldr w/x/sw literal out of reach -> `ldr xt, =T; ldr wt/xt/ldrsw xt, [xt]`;
* ldr s/d/q literal out of reach -> x16 saved below sp (sp moved first: no red zone on arm64,
  and sp stays 16-byte aligned), `ldr x16, =T; ldr st/dt/qt, [x16]`, x16 restored;
* prfm literal out of reach -> nop (a hint: no architectural effect).

`ldr xN, =V` is `ldr xN, lit; b over; [nop]; .quad V` (the literal 8-byte aligned).
"""
from __future__ import annotations

__all__ = ["RelocationError", "relocate", "relocate_run", "falls_through",
           "pc_relative_target", "B_REACH", "IMM19_REACH", "IMM14_REACH", "ADRP_REACH"]

B_REACH = 1 << 27            # imm26 words
IMM19_REACH = 1 << 20        # imm19 words: b.cond, cbz/cbnz, ldr literal; adr's imm21 bytes
IMM14_REACH = 1 << 15        # tbz/tbnz
ADRP_REACH = 1 << 32         # imm21 pages

_NOP = 0xD503201F
_X16, _X30, _SP = 16, 30, 31


class RelocationError(ValueError):
    """An instruction that cannot be moved to the address asked (out of every form's reach)."""


def _sx(v: int, bits: int) -> int:
    return v - (1 << bits) if v >> (bits - 1) & 1 else v


def _w(word: int) -> bytes:
    return (word & 0xFFFFFFFF).to_bytes(4, "little")


def _word(insn: bytes) -> int:
    if len(insn) < 4:
        raise RelocationError("an arm64 instruction is 4 bytes")
    return int.from_bytes(insn[:4], "little")


# ---- classes (Arm ARM C4.1: top-level encoding groups)
def _is_b(w: int) -> bool:          # b / bl
    return w & 0x7C000000 == 0x14000000


def _is_bcond(w: int) -> bool:      # b.cond (bit 4 = 0), bc.cond (bit 4 = 1, FEAT_HBC)
    return w & 0xFF000000 == 0x54000000


def _is_cb(w: int) -> bool:         # cbz / cbnz
    return w & 0x7E000000 == 0x34000000


def _is_tb(w: int) -> bool:         # tbz / tbnz
    return w & 0x7E000000 == 0x36000000


def _is_adr(w: int) -> bool:        # adr (bit 31 = 0) / adrp (1)
    return w & 0x1F000000 == 0x10000000


def _is_ldr_lit(w: int) -> bool:    # ldr/ldrsw/prfm literal, ldr s/d/q literal
    return w & 0x3B000000 == 0x18000000


def pc_relative_target(insn: bytes, at: int) -> int | None:
    """The address a pc-relative instruction at `at` branches to, loads from or computes
    (adrp: the page); None for any other instruction."""
    w = _word(insn)
    if _is_b(w):
        return at + 4 * _sx(w & 0x03FFFFFF, 26)
    if _is_bcond(w) or _is_cb(w) or _is_ldr_lit(w):
        return at + 4 * _sx(w >> 5 & 0x7FFFF, 19)
    if _is_tb(w):
        return at + 4 * _sx(w >> 5 & 0x3FFF, 14)
    if _is_adr(w):
        imm = _sx((w >> 5 & 0x7FFFF) << 2 | (w >> 29 & 3), 21)
        return (at & ~0xFFF) + (imm << 12) if w >> 31 else at + imm
    return None


def falls_through(insn: bytes) -> bool:
    """Does the instruction (in its relocated form) run on into the next one? Not b, bl
    (relocated: the callee returns to the original code), br, ret and their authenticated
    forms (blr/blraa return to the next instruction)."""
    w = _word(insn)
    if _is_b(w):
        return False
    if _is_bcond(w) and w & 0xF >= 0xE:          # b.al / b.nv: always taken
        return False
    if w & 0xFE000000 == 0xD6000000:             # branch (register): opc in bits 24..21
        return w >> 21 & 0xF in (0b0001, 0b1001)  # blr, blraa(z)/blrab(z)
    return True


def _b(at: int, to: int, link: bool = False) -> int:
    off = to - at
    if off % 4 or not -B_REACH <= off < B_REACH:
        raise RelocationError(f"a branch at {at:#x} cannot reach {to:#x}")
    return (0x94000000 if link else 0x14000000) | (off >> 2 & 0x03FFFFFF)


def _fits(off: int, reach: int, align: int = 4) -> bool:
    return off % align == 0 and -reach <= off < reach


def _imm19(w: int, off: int) -> int:
    return (w & ~(0x7FFFF << 5)) | ((off >> 2) & 0x7FFFF) << 5


def _load_literal(rt: int, value: int, pos: int, to: int) -> bytearray:
    """`ldr xRt, lit; b over; [nop]; lit: .quad value` placed at to + pos."""
    lit = 8 + (4 if (to + pos + 8) % 8 else 0)
    out = bytearray(_w(0x58000000 | (lit >> 2) << 5 | rt))      # ldr xRt, [pc + lit]
    out += _w(0x14000000 | ((lit + 8 - 4) >> 2))                 # b past the literal
    if lit == 12:
        out += _w(_NOP)
    out += (value & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "little")
    return out


def relocate(insn: bytes, at: int, to: int) -> tuple[bytes, list[tuple[int, int]]]:
    """The instruction at `at` (its first 4 bytes) rewritten to run at `to`, no jump back.
    Returns the code and its bounds (module docstring); RelocationError if it cannot be."""
    w = _word(insn)
    if at % 4 or to % 4:
        raise RelocationError("arm64 instructions are 4-byte aligned")
    target = pc_relative_target(insn, at)
    bounds = [(0, at)]
    if target is None:
        return bytes(insn[:4]), bounds
    off = target - to
    if _is_b(w):
        if not w >> 31:
            return _w(_b(to, target)), bounds
        out = _load_literal(_X30, at + 4, 0, to)         # x30 = the original return address
        bounds.append((len(out), target))
        out += _w(_b(to + len(out), target))
        return bytes(out), bounds
    if _is_bcond(w) or _is_cb(w) or _is_tb(w):
        if _is_tb(w):
            if _fits(off, IMM14_REACH):
                return _w((w & ~(0x3FFF << 5)) | ((off >> 2) & 0x3FFF) << 5), bounds
            skip = (w & ~(0x3FFF << 5)) ^ (1 << 24) | 2 << 5      # tbnz <-> tbz, to +8
        elif _is_bcond(w) and w & 0xF >= 0xE:
            return _w(_b(to, target)), bounds                  # b.al, b.nv: always
        elif _fits(off, IMM19_REACH):
            return _w(_imm19(w, off)), bounds
        elif _is_bcond(w):
            skip = _imm19(w, 8) ^ 1                           # the inverse condition, to +8
        else:
            skip = _imm19(w, 8) ^ (1 << 24)                   # cbz <-> cbnz, to +8
        out = bytearray(_w(skip))
        bounds.append((4, target))
        out += _w(_b(to + 4, target))
        return bytes(out), bounds
    rd = w & 0x1F
    if _is_adr(w):
        if w >> 31:                                         # adrp: pages from to's page
            poff = target - (to & ~0xFFF)
            if _fits(poff, ADRP_REACH, 0x1000):
                imm = poff >> 12
                return _w((w & 0x9F00001F) | (imm & 3) << 29 | (imm >> 2 & 0x7FFFF) << 5), bounds
        elif _fits(off, IMM19_REACH, 1):
            return _w((w & 0x9F00001F) | (off & 3) << 29 | (off >> 2 & 0x7FFFF) << 5), bounds
        if rd == 31:                                        # xzr: computes nothing
            return _w(_NOP), bounds
        return bytes(_load_literal(rd, target, 0, to)), bounds
    # ldr (literal) family: opc in bits 31..30, V (SIMD&FP) in bit 26
    if _fits(off, IMM19_REACH):
        return _w(_imm19(w, off)), bounds
    opc, simd = w >> 30, bool(w >> 26 & 1)
    if not simd and opc == 3:                               # prfm: a hint
        return _w(_NOP), bounds
    if not simd:
        if rd == 31:
            raise RelocationError(f"cannot relocate a literal load into xzr at {at:#x}")
        load = {0: 0xB9400000, 1: 0xF9400000, 2: 0xB9800000}[opc]   # ldr w / ldr x / ldrsw
        out = _load_literal(rd, target, 0, to)
        out += _w(load | rd << 5 | rd)                       # ... [xRt]
        return bytes(out), bounds
    if opc == 3:
        raise RelocationError(f"unallocated literal load at {at:#x}")
    load = {0: 0xBD400000, 1: 0xFD400000, 2: 0x3DC00000}[opc]       # ldr s / d / q, [x16]
    out = bytearray(_w(0xF81F0FF0))                          # str x16, [sp, #-16]!
    out += _load_literal(_X16, target, 4, to)
    out += _w(load | _X16 << 5 | rd)
    out += _w(0xF84107F0)                                    # ldr x16, [sp], #16
    return bytes(out), bounds


def relocate_run(code: bytes, at: int, to: int,
                 tail: bool = True) -> tuple[bytes, list[tuple[int, int]]]:
    """The instructions of `code` (linked at `at`) rewritten to run at `to`, one after the
    other, then (with `tail`, unless the last one does not fall through) `b at + len(code)`.
    Only the last instruction may be one that does not fall through."""
    if len(code) % 4:
        raise RelocationError("arm64 code is a whole number of 4-byte instructions")
    out = bytearray()
    bounds: list[tuple[int, int]] = []
    n = len(code) // 4
    for i in range(n):
        insn = code[4 * i:4 * i + 4]
        if i < n - 1 and not falls_through(insn):
            raise RelocationError(f"the instruction at {at + 4 * i:#x} does not fall through: "
                                  "it must be the last one relocated")
        raw, b = relocate(insn, at + 4 * i, to + len(out))
        bounds += [(len(out) + o, a) for o, a in b]
        out += raw
    if tail and (not n or falls_through(code[-4:])):
        end = at + len(code)
        bounds.append((len(out), end))
        out += _w(_b(to + len(out), end))
    return bytes(out), bounds
