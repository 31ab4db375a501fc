"""The stubs' full-ring path (issue 15.1), read back from the code page's bytes: each stub
reads the heartbeat and the patience word once, only after its claim found the ring full
(the fast path is the claim, the slot and the commit, as before), waits with `pause` and
nanosleep, and counts the call lost otherwise. x86_64 from this machine's vDSO, i386 from the
checked-in dump."""
from __future__ import annotations

import os
from pathlib import Path

import capstone

from tracer import procfs
from tracer.abi import I386, X86_64
from tracer.decoders import for_function
from tracer.inject import layout as L
from tracer.inject.plan import plan_image
from tracer.inject.stubs import NANOSLEEP_NR, CodePage, build_code
from tracer.inject.stubs32 import NANOSLEEP_NR_I386, build_code32
from tracer.vdso import GATEWAY_SYMBOL, SIGRETURN_TRAMPOLINES, parse_image

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def _insns(code: CodePage, code_base: int, start: int, end: int, mode: int) -> list:
    md = capstone.Cs(capstone.CS_ARCH_X86, mode)
    return list(md.disasm(code.data[start - code_base:end - code_base], start))


def _check(code: CodePage, code_base: int, mode: int, hb_ref: str, pat_ref: str,
           nanosleep_imm: str) -> None:
    for s in code.stubs:
        ins = _insns(code, code_base, s.stub, s.tail[1], mode)
        text = [f"{i.mnemonic} {i.op_str}" for i in ins]
        assert sum(hb_ref in t for t in text) == 1, text
        assert sum(pat_ref in t for t in text) == 1, text
        assert [i.mnemonic for i in ins].count("rdtsc") == 3      # t0, t1, the heartbeat check
        assert [i.mnemonic for i in ins].count("pause") == 1
        assert any(t == f"mov eax, {nanosleep_imm}" for t in text), text
        # everything of the wait lies after the commit's jump to the way out: the fast path
        # (claim, slot, commit) is what it was
        hb_at = next(k for k, t in enumerate(text) if hb_ref in t)
        commit_jmp = max(k for k, i in enumerate(ins[:hb_at]) if i.mnemonic == "jmp")
        fast = [i.mnemonic for i in ins[:commit_jmp]]
        assert "pause" not in fast and fast.count("rdtsc") == 2
        assert s.window[0] <= ins[hb_at].address < s.window[1]


def test_x86_64_stub_waits_only_on_a_full_ring() -> None:
    lo = next(m.start for m in procfs.read_maps(os.getpid()) if m.path == "[vdso]")
    with open("/proc/self/mem", "rb") as f:
        f.seek(lo)
        image = parse_image(f.read(8 * 4096))
    funcs = [f for f in image.functions if f.symbol not in SIGRETURN_TRAMPOLINES]
    plan = plan_image(image, funcs, X86_64)
    code_base = lo - (1 << 24)
    code = build_code(plan, lo, code_base, [for_function(f.plain) for f in funcs],
                      (0x1234, -0x5678), 0x7F0000000000)
    # rip-relative operands print as [rip + disp]; resolve them to check the targets
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    md.detail = True
    for s in code.stubs:
        seen = set()
        for i in md.disasm(code.data[s.stub - code_base:s.tail[1] - code_base], s.stub):
            if "rip" in i.op_str and i.mnemonic in ("sub", "cmp"):
                disp = next(op.mem.disp for op in i.operands if op.type == capstone.x86.X86_OP_MEM)
                seen.add((i.mnemonic, i.address + i.size + disp - code_base))
        assert seen == {("sub", L.CODE_HEARTBEAT), ("cmp", L.CODE_PATIENCE)}
    _check(code, code_base, capstone.CS_MODE_64, "sub rax, qword ptr [rip",
           "cmp rax, qword ptr [rip", f"{NANOSLEEP_NR:#x}")


def test_i386_stub_waits_only_on_a_full_ring() -> None:
    image = parse_image((FIXTURES / "vdso-i386.so").read_bytes())
    funcs = [f for f in image.functions
             if f.symbol not in SIGRETURN_TRAMPOLINES and f.symbol != GATEWAY_SYMBOL]
    plan = plan_image(image, funcs, I386)
    base, code_base, ring = 0xF7F00000, 0xF7E00000, 0xF6000000
    code = build_code32(plan, base, code_base, [for_function(f.plain) for f in funcs],
                        (0x1234, -0x5678), ring)
    _check(code, code_base, capstone.CS_MODE_32,
           f"sub eax, dword ptr [{code_base + L.CODE_HEARTBEAT:#x}]",
           f"cmp eax, dword ptr [{code_base + L.CODE_PATIENCE:#x}]", f"{NANOSLEEP_NR_I386:#x}")
