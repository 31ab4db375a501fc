"""The code page: per traced function a recording stub, a relocated copy of the function's
body, and a fallback stub for each of its syscall instructions (x86_64).

Stub, entered by the `jmp rel32` at the function's entry with the caller's return address on
top of the stack (the callee owns everything below it, so no red zone is in use):

    sub rsp, FRAME; save rdi rsi rdx rcx r8 r9; mark the frame live (two key words);
    flag = 0; t0 = rdtsc; call <copy>             -- the body returns into the stub
    ret = rax; unmark the frame; t1 = rdtsc; tid = gettid()
    window: r11 = ring (a word of the code page; 0 once the tracer uninstalls)
            claim index = head with lock cmpxchg while head - tail < NSLOTS; when full,
            wait (spin WAIT_SPINS `pause`s re-reading head and tail, then nanosleep, again)
            while the tracer's heartbeat is fresh, else (or with --lossy) lock inc lost
            write the slot (tid, function, flags, args, ret, t0, t1, caller, outs), seq last
    rax = ret; zero the scratch registers as the vDSO does; ret

The copy is the function byte for byte at the same relative offsets; calls that leave it
(the vclock helpers) and rip-relative operands ([vvar]) are re-aimed, so the code page must lie
within rel32 reach of the vDSO. A fallback stub runs the displaced instructions, finds the
nearest live stub frame above rsp (the two key words) and sets its flag, then makes the
system call and jumps back: rcx and r11 are free there because `syscall` clobbers them.
The outs are copied only when the call succeeded (0, or time(), which stores before it
returns): a pointer the kernel refused may fault.
"""
from __future__ import annotations


from tracer import disasm
from tracer.abi import X86_64
from tracer.decoders import Decoder, out_size
from tracer.inject import layout as L
from tracer.inject.x86.asm import Asm, rel32
from tracer.inject.codepage import CodePage, PlanError, StubInfo, align as _align, place_function
from tracer.inject.x86.plan import FunctionPlan, Plan

__all__ = ["StubInfo", "CodePage", "place_function", "build_code", "GETTID_NR", "NANOSLEEP_NR"]

GETTID_NR = X86_64.gettid_nr      # arch/x86/entry/syscalls/syscall_64.tbl
NANOSLEEP_NR = X86_64.nanosleep_nr
_SCAN_LIMIT = 2048       # bytes above rsp a fallback stub searches for its frame
_RDI, _RSI, _RDX, _RCX, _R8, _R9, _R10, _RAX = 7, 6, 2, 1, 8, 9, 10, 0
_ARG_REGS = (_RDI, _RSI, _RDX, _RCX, _R8, _R9)
_CC_B, _CC_AE, _CC_E, _CC_NE, _CC_G = 2, 3, 4, 5, 0xF


def _insn_bytes(i: disasm.Insn, orig: int, at: int) -> bytes:
    """One non-branch instruction moved from runtime `orig` to `at`."""
    if "rip" not in i.op_str:
        return i.raw
    out, bounds = disasm.relocate(X86_64, i.raw, orig, at)
    moved = out[:bounds[1][0]]
    if len(moved) != i.size:
        raise PlanError(f"cannot move the rip-relative instruction at {orig:#x}")
    return moved


def _copy_body(fp: FunctionPlan, base: int, at: int, fb_addrs: list[int]) -> bytes:
    lo = fp.func.image_offset
    out = bytearray(b"\xcc" * fp.func.size)
    for i in fp.insns:
        off = i.address - lo
        if i.mnemonic == "call" and i.target is not None and not lo <= i.target < lo + fp.func.size:
            b = b"\xe8" + rel32(base + i.target - (at + off + 5))
        elif i.target is not None:
            b = i.raw                       # an internal branch: same layout, same bytes
        else:
            b = _insn_bytes(i, base + i.address, at + off)
        out[off:off + len(b)] = b
    for site, fb in zip(fp.fallbacks, fb_addrs):
        off = site.start - lo
        out[off:off + 5] = b"\xe9" + rel32(fb - (at + off + 5))
        for k in range(off + 5, site.end - lo):
            out[k] = 0xCC                   # never reached: no branch targets the window
    return bytes(out)


def _fallback_stub(a: Asm, fp: FunctionPlan, site_index: int, base: int, copy_at: int,
                   key: tuple[int, int]) -> None:
    site = fp.fallbacks[site_index]
    for off, raw in site.displaced:
        insn = next(i for i in fp.insns if i.address == off)
        a.raw(_insn_bytes(insn, base + off, a.here))
    n = f"fb{site_index}"
    a.raw(b"\x48\x89\xe1")                                   # mov rcx, rsp
    a.raw(b"\x4c\x8d\x9c\x24" + _SCAN_LIMIT.to_bytes(4, "little"))  # lea r11, [rsp+LIMIT]
    a.label(n + "scan")
    a.raw(b"\x48\x81\x39" + (key[0] & 0xFFFFFFFF).to_bytes(4, "little"))    # cmp [rcx], KA
    a.jcc8(_CC_NE, n + "next")
    a.raw(b"\x48\x81\x79\x08" + (key[1] & 0xFFFFFFFF).to_bytes(4, "little"))  # cmp [rcx+8], KB
    a.jcc8(_CC_E, n + "found")
    a.label(n + "next")
    a.raw(b"\x48\x83\xc1\x08")                               # add rcx, 8
    a.raw(b"\x4c\x39\xd9")                                   # cmp rcx, r11
    a.jcc8(_CC_B, n + "scan")
    a.jmp(n + "done")
    a.label(n + "found")
    a.raw(b"\x48\xc7\x41" + bytes((L.FR_FLAG - L.FR_KEYA,)) + b"\x01\0\0\0")  # mov [rcx+16], 1
    a.label(n + "done")
    a.syscall()
    a.jmp(copy_at + site.end - fp.func.image_offset)


def _stub(a: Asm, fid: int, copy_at: int, code_base: int, dec: Decoder,
          key: tuple[int, int]) -> tuple[int, int]:
    a.sub_rsp(L.FRAME)
    for k, r in enumerate(_ARG_REGS):
        a.store_rsp(L.FR_ARGS + 8 * k, r)
    a.store_rsp_imm(L.FR_KEYA, key[0])
    a.store_rsp_imm(L.FR_KEYB, key[1])
    a.store_rsp_imm(L.FR_FLAG, 0)
    a.rdtsc64()
    a.store_rsp(L.FR_T0, _RAX)
    a.load_rsp(_RDX, L.FR_ARGS + 16)                          # rdtsc clobbered rdx (arg 3)
    a.call(copy_at)
    a.label("tail")
    a.store_rsp(L.FR_RET, _RAX)
    a.store_rsp_imm(L.FR_KEYA, 0)
    a.rdtsc64()                                              # t1 first: the call's own
    a.raw(b"\x49\x89\xc0")                                   # mov r8, rax   (t1) time only
    a.mov_eax_imm(GETTID_NR)
    a.syscall()                                              # keeps r8 (clobbers rcx, r11)
    a.raw(b"\x49\x89\xc1")                                   # mov r9, rax   (tid)
    win_start = a.here
    a.rip_ref(b"\x4c\x8b\x1d", code_base + L.CODE_RINGPTR)   # mov r11, [rip+ringptr]
    a.raw(b"\x4d\x85\xdb")                                   # test r11, r11
    a.jcc(_CC_E, "done")
    a.raw(b"\x49\x8b\x83" + L.HEAD.to_bytes(4, "little"))    # mov rax, [r11+HEAD]
    a.label("retry")
    a.raw(b"\x48\x89\xc1")                                   # mov rcx, rax
    a.raw(b"\x49\x2b\x8b" + L.TAIL.to_bytes(4, "little"))    # sub rcx, [r11+TAIL]
    a.raw(b"\x48\x81\xf9" + L.NSLOTS.to_bytes(4, "little"))  # cmp rcx, NSLOTS
    a.jcc(_CC_AE, "full")
    a.raw(b"\x48\x8d\x48\x01")                               # lea rcx, [rax+1]
    a.raw(b"\xf0\x49\x0f\xb1\x8b" + L.HEAD.to_bytes(4, "little"))  # lock cmpxchg [r11+HEAD], rcx
    a.jcc(_CC_NE, "retry")
    a.raw(b"\x48\x89\xc2")                                   # mov rdx, rax
    a.raw(b"\x81\xe2" + (L.NSLOTS - 1).to_bytes(4, "little"))  # and edx, NSLOTS-1
    a.raw(b"\x48\xc1\xe2" + bytes((L.SLOT_SHIFT,)))          # shl rdx, SLOT_SHIFT
    a.raw(b"\x49\x8d\x94\x13" + L.DATA.to_bytes(4, "little"))  # lea rdx, [r11+rdx+DATA]
    a.store_rdx(L.S_TID, _R9, 4)
    a.raw(b"\x0f\xb6\x4c\x24" + bytes((L.FR_FLAG,)))         # movzx ecx, byte [rsp+FLAG]
    a.raw(b"\xc1\xe1\x10")                                   # shl ecx, 16
    a.raw(b"\x81\xc9" + fid.to_bytes(4, "little"))           # or ecx, fid
    a.store_rdx(L.S_FID, _RCX, 4)                            # fid (u16) | flags (u16) << 16
    for k in range(L.MAX_ARGS):
        a.load_rsp(_RCX, L.FR_ARGS + 8 * k)
        a.store_rdx(L.S_ARGS + 8 * k, _RCX)
    a.load_rsp(_RCX, L.FR_RET)
    a.store_rdx(L.S_RET, _RCX)
    a.load_rsp(_RCX, L.FR_T0)
    a.store_rdx(L.S_T0, _RCX)
    a.store_rdx(L.S_T1, _R8)
    a.load_rsp(_RCX, L.FRAME)
    a.store_rdx(L.S_CALLER, _RCX)
    for k, spec in enumerate(dec.outs[:L.NOUTS]):
        size = out_size(spec.layout, X86_64)
        skip = f"skip{k}"
        a.load_rsp(_RCX, L.FR_ARGS + 8 * spec.arg)
        a.raw(b"\x48\x85\xc9")                               # test rcx, rcx
        a.jcc(_CC_E, skip)
        if not dec.ret_is_value:
            a.raw(b"\x48\x83\x7c\x24" + bytes((L.FR_RET,)) + b"\x00")  # cmp qword [rsp+RET], 0
            a.jcc(_CC_NE, skip)
        dst = L.S_OUT + L.OUT_MAX * k
        if size == 16:
            a.load_rcx_mem(_R10, 0)
            a.store_rdx(dst, _R10)
            a.load_rcx_mem(_R10, 8)
            a.store_rdx(dst + 8, _R10)
        elif size == 8:
            a.load_rcx_mem(_R10, 0)
            a.store_rdx(dst, _R10)
        elif size == 4:
            a.load_rcx_mem(_R10, 0, 4)
            a.store_rdx(dst, _R10, 4)
        else:
            raise PlanError(f"{dec.func}: no stub copy for a {size}-byte out")
        a.raw(b"\x80\x4a" + bytes((L.S_FLAGS, L.F_OUT0 << k)))  # or byte [rdx+FLAGS], bit
        a.label(skip)
    a.raw(b"\x48\x8d\x48\x01")                               # lea rcx, [rax+1]
    a.raw(b"\x48\x89\x0a")                                   # mov [rdx], rcx   (commit)
    a.jmp("done")
    # The ring is full: wait for the tracer to make room while its heartbeat is fresh
    # (rax, rcx, rdx, r10 are free here; the syscall clobbers rcx and r11, keeps r8-r10).
    a.label("full")
    a.rdtsc64()
    a.rip_ref(b"\x48\x2b\x05", code_base + L.CODE_HEARTBEAT)  # sub rax, [rip+heartbeat]
    a.rip_ref(b"\x48\x3b\x05", code_base + L.CODE_PATIENCE)   # cmp rax, [rip+patience]
    a.jcc(_CC_G, "lost")                                     # the tracer is silent: drop
    a.raw(b"\x41\xba" + L.WAIT_SPINS.to_bytes(4, "little"))  # mov r10d, SPINS
    a.label("wait")
    a.raw(b"\xf3\x90")                                       # pause
    a.rip_ref(b"\x48\x8b\x0d", code_base + L.CODE_RINGPTR)  # mov rcx, [rip+ringptr]
    a.raw(b"\x48\x85\xc9")                                   # test rcx, rcx
    a.jcc(_CC_E, "done")                                     # the tracer is leaving
    a.raw(b"\x49\x8b\x83" + L.HEAD.to_bytes(4, "little"))    # mov rax, [r11+HEAD]
    a.raw(b"\x48\x89\xc1")                                   # mov rcx, rax
    a.raw(b"\x49\x2b\x8b" + L.TAIL.to_bytes(4, "little"))    # sub rcx, [r11+TAIL]
    a.raw(b"\x48\x81\xf9" + L.NSLOTS.to_bytes(4, "little"))  # cmp rcx, NSLOTS
    a.jcc(_CC_B, "retry")                                    # room: claim again
    a.raw(b"\x41\xff\xca")                                   # dec r10d
    a.jcc(_CC_NE, "wait")
    # nanosleep, not sched_yield: 4 threads yielding on 2 CPUs kept the tracer off them for
    # 0.4 s at a time (the heartbeat went stale); a sleep gives the CPU up for real
    a.raw(b"\x48\x83\xec\x10")                               # sub rsp, 16
    a.raw(b"\x48\xc7\x04\x24\x00\x00\x00\x00")               # mov qword [rsp], 0
    a.raw(b"\x48\xc7\x44\x24\x08" + L.WAIT_SLEEP_NS.to_bytes(4, "little"))  # tv_nsec
    a.raw(b"\x48\x89\xe7")                                   # mov rdi, rsp
    a.raw(b"\x31\xf6")                                       # xor esi, esi
    a.mov_eax_imm(NANOSLEEP_NR)
    a.syscall()                                              # (rdi, rsi: zeroed on the way out)
    a.raw(b"\x48\x83\xc4\x10")                               # add rsp, 16
    a.rip_ref(b"\x4c\x8b\x1d", code_base + L.CODE_RINGPTR)   # mov r11, [rip+ringptr]
    a.raw(b"\x4d\x85\xdb")                                   # test r11, r11
    a.jcc(_CC_E, "done")
    a.raw(b"\x49\x8b\x83" + L.HEAD.to_bytes(4, "little"))    # mov rax, [r11+HEAD]
    a.jmp("retry")
    a.label("lost")
    a.raw(b"\xf0\x49\xff\x83" + L.LOST.to_bytes(4, "little"))  # lock inc qword [r11+LOST]
    a.label("done")
    win_end = a.here
    a.load_rsp(_RAX, L.FR_RET)
    a.add_rsp(L.FRAME)
    # The vDSO functions clear their scratch registers before returning (no kernel data left
    # in registers); do the same for what the stub used.
    a.raw(b"\x31\xd2\x31\xc9\x31\xf6\x31\xff\x45\x31\xc0\x45\x31\xc9\x45\x31\xd2\x45\x31\xdb")
    a.ret()
    return win_start, win_end


def build_code(plan: Plan, base: int, code_base: int, decoders: list[Decoder],
               key: tuple[int, int], ring_addr: int) -> CodePage:
    """The code page's bytes for runtime address `code_base`, the vDSO at `base`."""
    page = bytearray(L.CODE_SIZE)
    page[L.CODE_RINGPTR:L.CODE_RINGPTR + 8] = ring_addr.to_bytes(8, "little")
    at = L.CODE_START
    infos = []
    for fid, (fp, dec) in enumerate(zip(plan.functions, decoders)):
        # fallback stubs first (their addresses go into the copy), then the copy, then the stub
        fb = Asm(code_base + at)
        fb_addrs = []
        copy_at = _align(code_base + at + 128 * len(fp.fallbacks) + 16)
        for k in range(len(fp.fallbacks)):
            fb.raw(b"\xcc" * (_align(fb.here) - fb.here))
            fb_addrs.append(fb.here)
            _fallback_stub(fb, fp, k, base, copy_at, key)
        fb_code = fb.finish()
        if code_base + at + len(fb_code) > copy_at:
            raise PlanError("fallback stubs larger than planned")
        copy = _copy_body(fp, base, copy_at, fb_addrs)
        stub_at = _align(copy_at + len(copy))
        s = Asm(stub_at)
        win = _stub(s, fid, copy_at, code_base, dec, key)
        info, at = place_function(page, code_base, at, fb_code, copy_at, copy, s,
                                  StubInfo(fid, base + fp.func.image_offset, stub_at, win,
                                           (copy_at, copy_at + len(copy)), (0, 0)))
        infos.append(info)
    return CodePage(bytes(page), tuple(infos))
