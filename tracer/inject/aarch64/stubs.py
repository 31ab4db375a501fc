"""The code page for an arm64 tracee: per traced function a recording stub, a copy of its body
(plan.py), veneers for the copy's references out of itself, and a fallback stub per `svc #0`.

Stub, entered by the `b` at the function's entry (x0-x7 the arguments, x30 the caller's return
address, sp 16-byte aligned; AAPCS64 lets a callee clobber x0-x17, and the stub uses x8-x16):

    [autiasp]  sub sp, FRAME; save x0-x5, the two key words, flag = 0, x30;
    t0 = cntvct_el0 (after an isb); bl <copy>         -- the body returns into the stub
    ret = x0; unmark the frame; t1 = cntvct_el0; tid = gettid()
    window: x9 = ring (a word of the code page; 0 once the tracer uninstalls)
            claim index = HEAD with cas (FEAT_LSE, AT_HWCAP `atomics`) or ldxr/stxr while
            HEAD - TAIL (load-acquire) < NSLOTS; when full, wait (WAIT_SPINS `yield`s
            re-reading HEAD and TAIL, then nanosleep, again) while the tracer's heartbeat is
            fresh, else (or with --lossy) add 1 to LOST (stadd, or ldxr/stxr)
            write the slot (tid, function, flags, args, ret, t0, t1, caller, outs), then
            seq with stlr (store-release: every store of the slot is visible before it)
    x0 = ret; x30 = the caller's return address; zero x8-x16; ret

arm64 does not order a store after earlier stores as x86 does: the reader must see seq before
it reads the slot's other words (ring.py reads seq, then a `dmb ish`, then the slot).
BTI: the stub, the copy and the veneers are in a page mapped without PROT_BTI (no landing pads
needed); the only branches into the vDSO are the copies' direct `bl`/`b` and the stub's return.
PAC: a signed x30 is left as the code signing it expects: a paciasp at the entry is undone by
autiasp (same sp) before the stub saves x30, and the copy signs and authenticates its own.
"""
from __future__ import annotations

from tracer.arch.aarch64_reloc import RelocationError, relocate
from tracer.arch.aarch64 import AARCH64, NR_GETTID, NR_NANOSLEEP, encode_b
from tracer.decoders import Decoder, out_size
from tracer.inject import layout as L
from tracer.inject.aarch64.asm import GT, HS, LO, NE, EQ, SP, ZR, Asm
from tracer.inject.aarch64.plan import FunctionPlanA64, PlanA64, PlanError
from tracer.inject.codepage import CodePage, StubInfo, align as _align, place_function

__all__ = ["build_code_a64", "SCAN_LIMIT"]

SCAN_LIMIT = 2048        # bytes above sp a fallback stub searches for its frame
_KEYA, _KEYB = L.CODE_KEYA, L.CODE_KEYB


def _sx26(w: int) -> int:
    """The imm26 word offset of a b/bl."""
    v = w & 0x3FFFFFF
    return v - (1 << 26) if v >> 25 else v


def _fallback_stub(a: Asm, code_base: int, back: int) -> None:
    """Flag the nearest live stub frame above sp, then `svc #0` and branch back to `back`.
    Every register but x0 (the call's result) is as the copy left it."""
    a.stp_pre(9, 10, SP, -48)
    a.stp(11, 12, SP, 16)
    a.str_(13, SP, 32)
    a.add_imm(9, SP, 48)                          # the copy's sp
    a.add_imm(10, 9, SCAN_LIMIT)
    a.ldr_lit(11, code_base + _KEYA)
    a.ldr_lit(13, code_base + _KEYB)
    a.label("scan")
    a.ldr(12, 9, 0)
    a.cmp(12, 11)
    a.bcond(NE, "next")
    a.ldr(12, 9, 8)
    a.cmp(12, 13)
    a.bcond(EQ, "found")
    a.label("next")
    a.add_imm(9, 9, 8)
    a.cmp(9, 10)
    a.bcond(LO, "scan")
    a.b("restore")
    a.label("found")
    a.movz(12, 1)
    a.str_(12, 9, L.FR_FLAG - L.FR_KEYA)
    a.label("restore")
    a.ldr(13, SP, 32)
    a.ldp(11, 12, SP, 16)
    a.ldp_post(9, 10, SP, 48)
    a.svc0()
    a.b(back)


def _stub(a: Asm, fp: FunctionPlanA64, fid: int, copy_at: int, code_base: int, dec: Decoder,
          lse: bool) -> tuple[int, int]:
    if fp.auth is not None:
        a.w(fp.auth)                              # undo the entry's paciasp/pacibsp
    a.sub_imm(SP, SP, L.FRAME_A64)
    a.stp(0, 1, SP, L.FR_ARGS)
    a.stp(2, 3, SP, L.FR_ARGS + 16)
    a.stp(4, 5, SP, L.FR_ARGS + 32)
    a.ldr_lit(9, code_base + _KEYA)
    a.ldr_lit(10, code_base + _KEYB)
    a.stp(9, 10, SP, L.FR_KEYA)
    a.str_(ZR, SP, L.FR_FLAG)
    a.str_(30, SP, L.FRA_LR)
    a.isb()
    a.mrs_cntvct(9)
    a.str_(9, SP, L.FR_T0)
    a.bl(copy_at)
    a.label("tail")
    a.str_(0, SP, L.FR_RET)
    a.str_(ZR, SP, L.FR_KEYA)                     # the frame is no longer live
    a.isb()
    a.mrs_cntvct(9)
    a.str_(9, SP, L.FRA_T1)
    a.movz(8, NR_GETTID)
    a.svc0()
    a.str_(0, SP, L.FRA_TID)
    win_start = a.here
    a.ldr_lit(9, code_base + L.CODE_RINGPTR)
    a.cbz(9, "done")
    a.ldr(10, 9, L.HEAD)
    a.label("retry")
    a.add_imm(11, 9, L.TAIL)
    a.ldar(11, 11)                                # TAIL: the tracer is done with the slots below
    a.sub(12, 10, 11)
    a.cmp_imm(12, L.NSLOTS >> 12, shift12=True)
    a.bcond(HS, "full")
    a.add_imm(12, 10, 1)
    if lse:
        a.mov(13, 10)
        a.cas(13, 12, 9)                          # HEAD is at offset 0
        a.cmp(13, 10)
        a.mov(10, 13)
        a.bcond(NE, "retry")
    else:
        a.label("ll")
        a.ldxr(13, 9)
        a.cmp(13, 10)
        a.bcond(NE, "llfail")
        a.stxr(14, 12, 9)
        a.cbnz(14, "ll", wide=False)
        a.b("claimed")
        a.label("llfail")
        a.clrex()
        a.mov(10, 13)
        a.b("retry")
    a.label("claimed")
    a.and_low16(12, 10)
    a.add_lsl(12, 9, 12, L.SLOT_SHIFT)
    a.add_imm(12, 12, L.DATA >> 12, shift12=True)
    a.ldr(13, SP, L.FRA_TID)
    a.str_w(13, 12, L.S_TID)
    a.ldrb(13, SP, L.FR_FLAG)
    a.movz(14, fid, wide=False)
    a.orr_w_lsl(13, 14, 13, 16)
    a.str_w(13, 12, L.S_FID)                      # fid (u16) | flags (u16) << 16
    for k in range(0, L.MAX_ARGS, 2):
        a.ldp(13, 14, SP, L.FR_ARGS + 8 * k)
        a.stp(13, 14, 12, L.S_ARGS + 8 * k)
    a.ldr(13, SP, L.FR_RET)
    a.str_(13, 12, L.S_RET)
    a.ldr(13, SP, L.FR_T0)
    a.ldr(14, SP, L.FRA_T1)
    a.stp(13, 14, 12, L.S_T0)
    a.ldr(13, SP, L.FRA_LR)
    a.str_(13, 12, L.S_CALLER)
    for k, spec in enumerate(dec.outs[:L.NOUTS]):
        size = out_size(spec.layout, AARCH64)
        skip = f"skip{k}"
        a.ldr(13, SP, L.FR_ARGS + 8 * spec.arg)
        a.cbz(13, skip)
        if not dec.ret_is_value:
            a.ldr(14, SP, L.FR_RET)
            a.cbnz(14, skip)
        dst = L.S_OUT + L.OUT_MAX * k
        if size == 16:
            a.ldp(14, 15, 13, 0)
            a.stp(14, 15, 12, dst)
        elif size == 8:
            a.ldr(14, 13, 0)
            a.str_(14, 12, dst)
        elif size == 4:
            a.ldr_w(14, 13, 0)
            a.str_w(14, 12, dst)
        else:
            raise PlanError(f"{dec.func}: no stub copy for a {size}-byte out")
        a.ldrb(14, 12, L.S_FLAGS)
        a.orr_w_bit(14, 14, (L.F_OUT0 << k).bit_length() - 1)
        a.strb(14, 12, L.S_FLAGS)
        a.label(skip)
    a.add_imm(13, 10, 1)
    a.stlr(13, 12)                                # commit: seq = index + 1, store-release
    a.b("done")
    # The ring is full: wait for the tracer to make room while its heartbeat is fresh.
    a.label("full")
    a.isb()
    a.mrs_cntvct(13)
    a.ldr_lit(14, code_base + L.CODE_HEARTBEAT)
    a.sub(13, 13, 14)
    a.ldr_lit(14, code_base + L.CODE_PATIENCE)
    a.cmp(13, 14)
    a.bcond(GT, "lost")                           # the tracer is silent: drop
    a.movz(16, L.WAIT_SPINS, wide=False)
    a.label("wait")
    a.yield_()
    a.ldr_lit(13, code_base + L.CODE_RINGPTR)
    a.cbz(13, "done")                             # the tracer is leaving
    a.ldr(10, 9, L.HEAD)
    a.add_imm(11, 9, L.TAIL)
    a.ldar(11, 11)
    a.sub(13, 10, 11)
    a.cmp_imm(13, L.NSLOTS >> 12, shift12=True)
    a.bcond(LO, "retry")                          # room: claim again
    a.subs_w_imm(16, 16, 1)
    a.bcond(NE, "wait")
    a.sub_imm(SP, SP, 16)                         # nanosleep(&{0, WAIT_SLEEP_NS}, NULL)
    a.str_(ZR, SP, 0)
    a.movz(13, L.WAIT_SLEEP_NS)
    a.str_(13, SP, 8)
    a.add_imm(0, SP, 0)
    a.movz(1, 0)
    a.movz(8, NR_NANOSLEEP)
    a.svc0()
    a.add_imm(SP, SP, 16)
    a.ldr_lit(9, code_base + L.CODE_RINGPTR)
    a.cbz(9, "done")
    a.ldr(10, 9, L.HEAD)
    a.b("retry")
    a.label("lost")
    a.add_imm(14, 9, L.LOST)
    if lse:
        a.movz(13, 1)
        a.stadd(13, 14)
    else:
        a.label("lostll")
        a.ldxr(13, 14)
        a.add_imm(13, 13, 1)
        a.stxr(15, 13, 14)
        a.cbnz(15, "lostll", wide=False)
    a.label("done")
    win_end = a.here
    a.ldr(0, SP, L.FR_RET)
    a.ldr(30, SP, L.FRA_LR)
    a.add_imm(SP, SP, L.FRAME_A64)
    for r in range(8, 17):                        # nothing of the recorder left in registers
        a.mov(r, ZR)
    a.ret()
    return win_start, win_end


def _copy_body(fp: FunctionPlanA64, base: int, at: int, fb_addrs: list[int],
               veneer_addrs: dict[int, int]) -> bytes:
    lo = fp.func.image_offset
    out = []
    for k, w in enumerate(fp.words):
        off = lo + 4 * k
        pc = at + 4 * k
        raw = w.to_bytes(4, "little")
        if off in fp.fallbacks:
            raw = encode_b(pc, fb_addrs[fp.fallbacks.index(off)])
        elif off in veneer_addrs:
            raw = encode_b(pc, veneer_addrs[off])
        elif off in fp.far:
            # bl/b to vDSO code and adrp, re-encoded in place (the page is within a `b` of
            # the vDSO): one word, or the copy would lose its layout
            try:
                if w & 0xFC000000 == 0x94000000:
                    # bl: the helper returns into the copy (the relocator's `bl` would make
                    # it return into the original code)
                    raw = encode_b(pc, base + off + 4 * _sx26(w), link=True)
                else:
                    raw, _ = relocate(raw, base + off, pc)
            except (RelocationError, ValueError) as e:
                raise PlanError(f"the copy of {fp.func.symbol} cannot be placed: {e}") from e
            if len(raw) != 4:
                raise PlanError(f"the copy of {fp.func.symbol}+{off - lo:#x} is out of reach")
        out.append(raw)
    return b"".join(out)


def build_code_a64(plan: PlanA64, base: int, code_base: int, decoders: list[Decoder],
                   key: tuple[int, int], ring_addr: int, lse: bool) -> CodePage:
    """The code page's bytes for runtime address `code_base`, the vDSO at `base`; `lse`: the
    CPU has FEAT_LSE atomics (AT_HWCAP `atomics`)."""
    page = bytearray(L.CODE_SIZE)
    page[L.CODE_RINGPTR:L.CODE_RINGPTR + 8] = ring_addr.to_bytes(8, "little")
    page[_KEYA:_KEYA + 8] = (key[0] & (1 << 64) - 1).to_bytes(8, "little")
    page[_KEYB:_KEYB + 8] = (key[1] & (1 << 64) - 1).to_bytes(8, "little")
    at = L.CODE_START
    infos = []
    for fid, (fp, dec) in enumerate(zip(plan.functions, decoders)):
        lo = fp.func.image_offset
        # fallback stubs and veneers first (their addresses go into the copy), then the copy,
        # then the stub; the fallback stubs' size does not depend on where they are
        probe = Asm(0)
        _fallback_stub(probe, 0, 0)
        fb_len = 4 * len(probe.words)
        fb_addrs = [code_base + at + fb_len * k for k in range(len(fp.fallbacks))]
        # veneers: each a relocated adr / literal load (one word when its target is in reach
        # from there, else the relocator's longer form) and a `b` back into the copy
        v_at = code_base + at + fb_len * len(fp.fallbacks)
        veneer_addrs: dict[int, int] = {}
        veneer_code: list[bytes] = []
        for off in fp.veneers:
            w = fp.words[(off - lo) // 4].to_bytes(4, "little")
            try:
                seq, _ = relocate(w, base + off, v_at)
            except RelocationError as e:
                raise PlanError(f"{fp.func.symbol}+{off - lo:#x}: {e}") from e
            veneer_addrs[off] = v_at
            veneer_code.append(seq)
            v_at += len(seq) + 4
        copy_at = _align(v_at)
        region = bytearray()
        for k, off in enumerate(fp.fallbacks):
            fb = Asm(fb_addrs[k])
            _fallback_stub(fb, code_base, copy_at + off - lo + 4)
            region += fb.finish()
        for off, seq in zip(fp.veneers, veneer_code):
            v = Asm(veneer_addrs[off])
            v.raw(seq)
            v.b(copy_at + off - lo + 4)
            region += v.finish()
        copy = _copy_body(fp, base, copy_at, fb_addrs, veneer_addrs)
        stub_at = _align(copy_at + len(copy))
        s = Asm(stub_at)
        win = _stub(s, fp, fid, copy_at, code_base, dec, lse)
        # ldxr, cmp, b.ne, stxr / ldxr, add, stxr: the words no step gets through
        spans = () if lse else ((s.addr("ll"), s.addr("ll") + 16),
                                (s.addr("lostll"), s.addr("lostll") + 12))
        info, at = place_function(page, code_base, at, bytes(region), copy_at, copy, s,
                                  StubInfo(fid, base + fp.patch_at, stub_at, win,
                                           (copy_at, copy_at + len(copy)), exclusive=spans,
                                           done=s.addr("done")))
        infos.append(info)
    return CodePage(bytes(page), tuple(infos))
