"""The code page for an i386 tracee: per traced function a recording stub, a copy of the
function's body, and a fallback stub for each of its `call __kernel_vsyscall`s (32-bit code).

Stub, entered by the `jmp rel32` at the function's entry with the caller's return address on
top of the stack and the arguments above it (cdecl):

    sub esp, FRAME32; copy the arguments twice: for the copy (which owns and may overwrite
    them) and for the record; mark the frame live (two key words); flag = 0; t0 = rdtsc;
    call <copy>; ret = eax; t1 = rdtsc; unmark the frame; save ebx esi edi;
    tid = gettid() through __kernel_vsyscall (sysenter/syscall: `int 0x80` measured 9 us a
    call on this VM's kernel against 0.13 us through the gateway)
    window: esi = ring (a word of the code page; 0 once the tracer uninstalls)
            claim index = head with lock cmpxchg8b while head - tail < NSLOTS; when full,
            wait (spin, then nanosleep through the gateway, again) while the tracer's
            heartbeat is fresh, else (or with --lossy) count the call lost
            write the slot (32-bit words zero-extended), seq last (high half, then low half)
    restore ebx esi edi; eax = ret; zero ecx edx as the vDSO does; ret

The copy is the function byte for byte at the same relative offsets: calls that leave it (the
vclock helpers) are re-aimed at the vDSO, `call __x86.get_pc_thunk.REG` becomes
`mov REG, <original return address>` (the PIC base, so [vvar] operands resolve against the
vDSO as before), and `call __kernel_vsyscall` calls a fallback stub instead, which sets the flag
of the nearest live stub frame above esp and jumps to the real gateway (the gateway returns into
the copy). In 32-bit code a rel32 reaches every address, so the code page may lie anywhere.
The outs are copied only when the call succeeded (0, or time(), which stores before it returns).
"""
from __future__ import annotations

from tracer.abi import I386
from tracer.decoders import Decoder, out_size
from tracer.inject import layout as L
from tracer.inject.x86.asm import Asm, mem32
from tracer.inject.x86.plan import FunctionPlan, Plan, PlanError
from tracer.inject.x86.stubs64 import CodePage, StubInfo, place_function

__all__ = ["GETTID_NR_I386", "NANOSLEEP_NR_I386", "build_code32", "copy_body32"]

GETTID_NR_I386 = I386.gettid_nr      # arch/x86/entry/syscalls/syscall_32.tbl
NANOSLEEP_NR_I386 = I386.nanosleep_nr
_SCAN_LIMIT = 2048       # bytes above esp a fallback stub searches for its frame
_EAX, _ECX, _EDX, _EBX, _ESP, _EBP, _ESI, _EDI = range(8)
_CC_B, _CC_AE, _CC_E, _CC_NE, _CC_A, _CC_S = 2, 3, 4, 5, 7, 8


def _i32(v: int) -> bytes:
    return (v & 0xFFFFFFFF).to_bytes(4, "little")


def _rel(dest: int, after: int) -> bytes:
    return _i32(dest - after)


def _ld(a: Asm, reg: int, base: int, disp: int) -> None:
    a.raw(mem32(0x8B, reg, base, disp))              # mov reg, [base+disp]


def _ring_head(a: Asm, code_base: int) -> None:
    """esi = the ring (to "done" when there is none: the tracer left), edx:eax = its HEAD."""
    a.raw(b"\x8b\x35" + _i32(code_base + L.CODE_RINGPTR))    # mov esi, [ringptr]
    a.raw(b"\x85\xf6")                                       # test esi, esi
    a.jcc(_CC_E, "done")
    _ld(a, _EAX, _ESI, L.HEAD)
    _ld(a, _EDX, _ESI, L.HEAD + 4)


def _st(a: Asm, base: int, disp: int, reg: int) -> None:
    a.raw(mem32(0x89, reg, base, disp))              # mov [base+disp], reg


def _st_imm(a: Asm, base: int, disp: int, imm: int) -> None:
    a.raw(mem32(0xC7, 0, base, disp) + _i32(imm))    # mov dword [base+disp], imm32


def copy_body32(fp: FunctionPlan, base: int, at: int, fb_addrs: list[int]) -> bytes:
    """The function's bytes for runtime address `at` (the vDSO at `base`)."""
    lo = fp.func.image_offset
    thunks = dict(fp.thunks)
    fb_by_site = {s.start: fb for s, fb in zip(fp.fallbacks, fb_addrs)}
    out = bytearray(b"\xcc" * fp.func.size)
    for i in fp.insns:
        off = i.address - lo
        if i.address in thunks:
            # eax (or the thunk's register) = the return address the original call pushes
            b = bytes((0xB8 + thunks[i.address],)) + _i32(base + i.address + i.size)
        elif i.address in fb_by_site:
            b = b"\xe8" + _rel(fb_by_site[i.address], at + off + 5)
        elif i.mnemonic == "call" and i.target is not None \
                and not lo <= i.target < lo + fp.func.size:
            b = b"\xe8" + _rel(base + i.target, at + off + 5)
        else:
            b = i.raw              # internal branches keep their layout; no rip-relative forms
        if len(b) != i.size:
            raise PlanError(f"cannot copy the instruction at {i.address:#x}")
        out[off:off + len(b)] = b
    return bytes(out)


def _fallback_stub(a: Asm, n: str, gateway: int, key: tuple[int, int]) -> None:
    a.raw(b"\x51\x52")                                       # push ecx; push edx
    a.raw(b"\x8d\x4c\x24\x08")                               # lea ecx, [esp+8]
    a.raw(b"\x8d\x94\x24" + _i32(8 + _SCAN_LIMIT))           # lea edx, [esp+8+LIMIT]
    a.label(n + "scan")
    a.raw(b"\x81\x39" + _i32(key[0]))                        # cmp dword [ecx], KA
    a.jcc8(_CC_NE, n + "next")
    a.raw(b"\x81\x79\x04" + _i32(key[1]))                    # cmp dword [ecx+4], KB
    a.jcc8(_CC_E, n + "found")
    a.label(n + "next")
    a.raw(b"\x83\xc1\x04")                                   # add ecx, 4
    a.raw(b"\x39\xd1")                                       # cmp ecx, edx
    a.jcc8(_CC_B, n + "scan")
    a.jcc8(_CC_AE, n + "done")
    a.label(n + "found")
    _st_imm(a, _ECX, L.FR32_FLAG - L.FR32_KEYA, 1)           # mov dword [ecx+8], 1
    a.label(n + "done")
    a.raw(b"\x5a\x59")                                       # pop edx; pop ecx
    a.jmp(gateway)                                           # it returns into the copy


def _stub(a: Asm, fid: int, copy_at: int, code_base: int, gateway: int, dec: Decoder,
          nargs: int, key: tuple[int, int]) -> tuple[int, int]:
    F = L.FRAME32
    a.raw(b"\x83\xec" + bytes((F,)))                         # sub esp, FRAME32
    for k in range(nargs):
        _ld(a, _EAX, _ESP, F + 4 + 4 * k)
        _st(a, _ESP, L.FR32_ARGS + 4 * k, _EAX)
        _st(a, _ESP, L.FR32_OUTARGS + 4 * k, _EAX)
    _st_imm(a, _ESP, L.FR32_KEYA, key[0])
    _st_imm(a, _ESP, L.FR32_KEYB, key[1])
    _st_imm(a, _ESP, L.FR32_FLAG, 0)
    a.raw(b"\x0f\x31")                                       # rdtsc
    _st(a, _ESP, L.FR32_T0, _EAX)
    _st(a, _ESP, L.FR32_T0 + 4, _EDX)
    a.call(copy_at)
    a.label("tail")
    _st(a, _ESP, L.FR32_RET, _EAX)
    a.raw(b"\x0f\x31")                                       # rdtsc
    _st(a, _ESP, L.FR32_T1, _EAX)
    _st(a, _ESP, L.FR32_T1 + 4, _EDX)
    _st_imm(a, _ESP, L.FR32_KEYA, 0)
    for k, r in enumerate((_EBX, _ESI, _EDI)):
        _st(a, _ESP, L.FR32_SAVE + 4 * k, r)
    a.raw(b"\xb8" + _i32(GETTID_NR_I386))                    # mov eax, __NR_gettid
    a.call(gateway)
    _st(a, _ESP, L.FR32_TID, _EAX)
    win_start = a.here
    _ring_head(a, code_base)
    a.label("retry")
    a.raw(b"\x89\xc3\x89\xd1")                               # mov ebx, eax; mov ecx, edx
    a.raw(mem32(0x2B, _EBX, _ESI, L.TAIL))                   # sub ebx, [esi+TAIL]
    a.raw(mem32(0x1B, _ECX, _ESI, L.TAIL + 4))               # sbb ecx, [esi+TAIL+4]
    a.raw(b"\x85\xc9")                                       # test ecx, ecx
    a.jcc(_CC_NE, "full")                                    # (a torn tail read lands here too)
    a.raw(b"\x81\xfb" + _i32(L.NSLOTS))                      # cmp ebx, NSLOTS
    a.jcc(_CC_AE, "full")
    a.raw(b"\x89\xc3\x89\xd1")                               # mov ebx, eax; mov ecx, edx
    a.raw(b"\x83\xc3\x01\x83\xd1\x00")                       # add ebx, 1; adc ecx, 0
    a.raw(b"\xf0\x0f" + mem32(0xC7, 1, _ESI, L.HEAD))        # lock cmpxchg8b [esi+HEAD]
    a.jcc(_CC_NE, "retry")                                   # edx:eax = the current head
    a.raw(b"\x89\xc7")                                       # mov edi, eax
    a.raw(b"\x81\xe7" + _i32(L.NSLOTS - 1))                  # and edi, NSLOTS-1
    a.raw(b"\xc1\xe7" + bytes((L.SLOT_SHIFT,)))              # shl edi, SLOT_SHIFT
    a.raw(b"\x8d\xbc\x3e" + _i32(L.DATA))                    # lea edi, [esi+edi+DATA]
    _ld(a, _EAX, _ESP, L.FR32_TID)
    _st(a, _EDI, L.S_TID, _EAX)
    a.raw(b"\x0f" + mem32(0xB6, _EAX, _ESP, L.FR32_FLAG))    # movzx eax, byte [esp+FLAG]
    a.raw(b"\xc1\xe0\x10")                                   # shl eax, 16
    a.raw(b"\x0d" + _i32(fid))                               # or eax, fid
    _st(a, _EDI, L.S_FID, _EAX)                              # fid (u16) | flags (u16) << 16
    a.raw(b"\x31\xd2")                                       # xor edx, edx
    for k in range(L.MAX_ARGS):
        if k < nargs:
            _ld(a, _EAX, _ESP, L.FR32_ARGS + 4 * k)
            _st(a, _EDI, L.S_ARGS + 8 * k, _EAX)
        else:
            _st(a, _EDI, L.S_ARGS + 8 * k, _EDX)
        _st(a, _EDI, L.S_ARGS + 8 * k + 4, _EDX)
    _ld(a, _EAX, _ESP, L.FR32_RET)
    _st(a, _EDI, L.S_RET, _EAX)
    _st(a, _EDI, L.S_RET + 4, _EDX)
    for src, dst in ((L.FR32_T0, L.S_T0), (L.FR32_T1, L.S_T1)):
        _ld(a, _EAX, _ESP, src)
        _st(a, _EDI, dst, _EAX)
        _ld(a, _EAX, _ESP, src + 4)
        _st(a, _EDI, dst + 4, _EAX)
    _ld(a, _EAX, _ESP, L.FRAME32)                            # the caller's return address
    _st(a, _EDI, L.S_CALLER, _EAX)
    _st(a, _EDI, L.S_CALLER + 4, _EDX)
    for k, spec in enumerate(dec.outs[:L.NOUTS]):
        size = out_size(spec.layout, I386)
        if size not in (4, 8, 16):
            raise PlanError(f"{dec.func}: no stub copy for a {size}-byte out")
        skip = f"skip{k}"
        _ld(a, _EAX, _ESP, L.FR32_ARGS + 4 * spec.arg)
        a.raw(b"\x85\xc0")                                   # test eax, eax
        a.jcc(_CC_E, skip)
        if not dec.ret_is_value:
            a.raw(mem32(0x83, 7, _ESP, L.FR32_RET) + b"\x00")  # cmp dword [esp+RET], 0
            a.jcc(_CC_NE, skip)
        dst = L.S_OUT + L.OUT_MAX * k
        for j in range(0, size, 4):
            _ld(a, _EDX, _EAX, j)
            _st(a, _EDI, dst + j, _EDX)
        a.raw(mem32(0x80, 1, _EDI, L.S_FLAGS) + bytes((L.F_OUT0 << k,)))  # or byte [..], bit
        a.label(skip)
    _st(a, _EDI, L.S_SEQ + 4, _ECX)                          # commit: seq = index + 1,
    _st(a, _EDI, L.S_SEQ, _EBX)                              # its low half last
    a.jmp("done")
    # The ring is full: wait for the tracer to make room while its heartbeat is fresh (eax
    # ebx ecx edx edi are free here; the gateway keeps every register but eax).
    a.label("full")
    a.raw(b"\x0f\x31")                                       # rdtsc: edx:eax
    a.raw(b"\x2b\x05" + _i32(code_base + L.CODE_HEARTBEAT))  # sub eax, [heartbeat]
    a.raw(b"\x1b\x15" + _i32(code_base + L.CODE_HEARTBEAT + 4))  # sbb edx, [heartbeat+4]
    a.raw(b"\x85\xd2")                                       # test edx, edx
    a.jcc(_CC_S, "spin")                                     # the heartbeat is ahead: fresh
    a.jcc(_CC_NE, "lost")                                    # silent for 2^32 ticks and more
    a.raw(b"\x3b\x05" + _i32(code_base + L.CODE_PATIENCE))   # cmp eax, [patience]
    a.jcc(_CC_A, "lost")                                     # the tracer is silent: drop
    a.label("spin")
    a.raw(b"\xbf" + _i32(L.WAIT_SPINS))                      # mov edi, SPINS
    a.label("wait")
    a.raw(b"\xf3\x90")                                       # pause
    a.raw(b"\xa1" + _i32(code_base + L.CODE_RINGPTR))        # mov eax, [ringptr]
    a.raw(b"\x85\xc0")                                       # test eax, eax
    a.jcc(_CC_E, "done")                                     # the tracer is leaving
    _ld(a, _EAX, _ESI, L.HEAD)
    _ld(a, _EDX, _ESI, L.HEAD + 4)
    a.raw(b"\x89\xc3\x89\xd1")                               # mov ebx, eax; mov ecx, edx
    a.raw(mem32(0x2B, _EBX, _ESI, L.TAIL))                   # sub ebx, [esi+TAIL]
    a.raw(mem32(0x1B, _ECX, _ESI, L.TAIL + 4))               # sbb ecx, [esi+TAIL+4]
    a.raw(b"\x85\xc9")                                       # test ecx, ecx
    a.jcc(_CC_NE, "still")
    a.raw(b"\x81\xfb" + _i32(L.NSLOTS))                      # cmp ebx, NSLOTS
    a.jcc(_CC_B, "retry")                                    # room: claim again
    a.label("still")
    a.raw(b"\x4f")                                           # dec edi
    a.jcc(_CC_NE, "wait")
    # nanosleep, not sched_yield (see stubs.py); ebx and ecx are restored or zeroed later
    a.raw(b"\x83\xec\x08")                                   # sub esp, 8
    _st_imm(a, _ESP, 0, 0)                                   # tv_sec
    _st_imm(a, _ESP, 4, L.WAIT_SLEEP_NS)                     # tv_nsec
    a.raw(b"\x89\xe3")                                       # mov ebx, esp
    a.raw(b"\x31\xc9")                                       # xor ecx, ecx
    a.raw(b"\xb8" + _i32(NANOSLEEP_NR_I386))                 # mov eax, __NR_nanosleep
    a.call(gateway)
    a.raw(b"\x83\xc4\x08")                                   # add esp, 8
    _ring_head(a, code_base)
    a.jmp("retry")
    a.label("lost")
    a.raw(b"\xf0" + mem32(0x83, 0, _ESI, L.LOST) + b"\x01")      # lock add dword [LOST], 1
    a.raw(b"\xf0" + mem32(0x83, 2, _ESI, L.LOST + 4) + b"\x00")  # lock adc dword [LOST+4], 0
    a.label("done")
    win_end = a.here
    for k, r in enumerate((_EBX, _ESI, _EDI)):
        _ld(a, r, _ESP, L.FR32_SAVE + 4 * k)
    _ld(a, _EAX, _ESP, L.FR32_RET)
    a.raw(b"\x83\xc4" + bytes((F,)))                         # add esp, FRAME32
    a.raw(b"\x31\xc9\x31\xd2")                               # xor ecx, ecx; xor edx, edx
    a.raw(b"\xc3")
    return win_start, win_end


def build_code32(plan: Plan, base: int, code_base: int, decoders: list[Decoder],
                 key: tuple[int, int], ring_addr: int) -> CodePage:
    """The code page's bytes for runtime address `code_base`, the i386 vDSO at `base`."""
    if plan.word != 4 or plan.gateway_offset is None:
        raise PlanError("not an i386 plan")
    if ring_addr >> 32 or code_base >> 32:
        raise PlanError("an i386 tracee's code page and ring must lie below 4 GiB")
    key = (key[0] & 0xFFFFFFFF, key[1] & 0xFFFFFFFF)
    gateway = base + plan.gateway_offset
    page = bytearray(L.CODE_SIZE)
    page[L.CODE_RINGPTR:L.CODE_RINGPTR + 8] = ring_addr.to_bytes(8, "little")
    at = L.CODE_START
    infos = []
    for fid, (fp, dec) in enumerate(zip(plan.functions, decoders)):
        fb = Asm(code_base + at, wrap=True)
        fb_addrs = []
        for k in range(len(fp.fallbacks)):
            fb.raw(b"\xcc" * (_align(fb.here) - fb.here))
            fb_addrs.append(fb.here)
            _fallback_stub(fb, f"fb{k}", gateway, key)
        fb_code = fb.finish()
        copy_at = _align(code_base + at + len(fb_code))
        copy = copy_body32(fp, base, copy_at, fb_addrs)
        stub_at = _align(copy_at + len(copy))
        s = Asm(stub_at, wrap=True)
        win = _stub(s, fid, copy_at, code_base, gateway, dec, min(dec.nargs, L.MAX_ARGS), key)
        info, at = place_function(page, code_base, at, fb_code, copy_at, copy, s,
                                  StubInfo(fid, base + fp.func.image_offset, stub_at, win,
                                           (copy_at, copy_at + len(copy)), (0, 0)))
        infos.append(info)
    return CodePage(bytes(page), tuple(infos))


def _align(x: int, a: int = 16) -> int:
    return (x + a - 1) & -a
