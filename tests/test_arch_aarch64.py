"""tracer/arch/aarch64.py against the Arch interface (tracer/arch/base.py) and against the
checked-in arm64 vDSO (tests/fixtures/vdso-aarch64.so, llvm-objdump -d): the registry picks it
from an arm64 ELF header, its branch encodings equal the image's own, its register layout is
struct user_pt_regs, its frame offsets follow the kernel's structs."""
from __future__ import annotations

from pathlib import Path

import pytest

from a64_oracles import parse_llvm_objdump
from tracer import arch
from tracer.arch import aarch64 as A
from tracer.arch.base import Arch
from tracer.tables.hwcap_aarch64 import Hwcap2Aarch64, HwcapAarch64

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def test_the_registry_picks_it_from_an_arm64_header():
    head = (FIXTURES / "vdso-aarch64.so").read_bytes()[:64]
    assert arch.for_header(head) is A.AARCH64
    assert arch.by_name("aarch64") is A.AARCH64
    assert isinstance(A.AARCH64, Arch) and A.AARCH64.e_machine == arch.EM_AARCH64 == 183


def test_registers_are_user_pt_regs():
    a = A.AARCH64
    assert a.regs.names == A.REG_NAMES and len(a.regs.names) == 34   # 272 bytes of NT_PRSTATUS
    assert (a.PC, a.SP, a.RET, a.SYSNR) == (32, 31, 0, 8)
    assert a.ARGS == tuple(range(8)) and a.SYSARGS == tuple(range(6))
    regs = a.new_regs()
    regs["x30"] = 0x1234
    assert a.return_address(regs, lambda addr, n: b"") == 0x1234
    assert a.trap_addr(0x4000) == 0x4000                            # pc AT the brk


def test_branches_equal_the_images_own():
    od = parse_llvm_objdump((FIXTURES / "vdso-aarch64.llvm-objdump-d.txt").read_text())
    seen = set()
    for addr, o in od.items():
        if o.mnemonic in ("b", "bl"):
            t = o.target
            assert t is not None
            enc = A.AARCH64.call(addr, t[0]) if o.mnemonic == "bl" else A.AARCH64.jump(addr, t[0])
            assert enc == o.raw
            seen.add(o.mnemonic)
    assert seen == {"b", "bl"}
    assert len(A.AARCH64.jump(0, 4)) == A.AARCH64.jump_len == 4
    assert A.AARCH64.jump(0x10000, 0x10000 - A.B_RANGE) == bytes.fromhex("00000016")  # -2^25 words
    with pytest.raises(ValueError):
        A.AARCH64.jump(0, A.B_RANGE)
    with pytest.raises(ValueError):
        A.AARCH64.jump(0, 2)                                        # not a word boundary


def test_instructions():
    a = A.AARCH64
    assert a.trap == A.BRK_0 == bytes.fromhex("000020d4")
    assert a.fill(8) == A.BRK_0 * 2
    assert a.syscall_insn == A.SVC_0 and a.restorer_code == A.RT_SIGRETURN_CODE
    img = (FIXTURES / "vdso-aarch64.so").read_bytes()
    assert img[0x820:0x828] == a.restorer_code                       # __kernel_rt_sigreturn


def test_signal_frame_offsets():
    f = A.AARCH64.sigframe
    # siginfo 128, then ucontext: uc_mcontext at 176, sigcontext pc at 8 + 31*8 + 8
    assert f.rt_uc == 128 and f.rt_info == 0
    assert f.rt_ip == 128 + 176 + 264 == 568
    assert A.AARCH64.uc_mcontext_ip == 440 and A.AARCH64.sigcontext_sp_back == 8
    assert f.rt_sigreturn_nr == 139 and f.rt_sigreturn_sp_adjust == 0


def test_saved_context():
    # struct sigcontext from its pc: pc, pstate, 8 bytes of alignment, then __reserved's
    # first record head {FPSIMD_MAGIC, 528}
    mem = bytearray(64)
    mem[0:8] = (0x0000AAAA00001234).to_bytes(8, "little")        # pc
    mem[8:16] = (0x60000000).to_bytes(8, "little")               # pstate: Z, C; EL0t
    mem[24:32] = (0x46508001 | 528 << 32).to_bytes(8, "little")
    read = lambda addr, n: bytes(mem[addr - 0x1000:addr - 0x1000 + n])  # noqa: E731
    assert A.AARCH64.saved_context(read, 0x1000)
    mem[8:16] = (0x3C5).to_bytes(8, "little")                    # EL1h, DAIF masked
    assert not A.AARCH64.saved_context(read, 0x1000)
    mem[8:16] = (0x60000000).to_bytes(8, "little")
    mem[24:32] = bytes(8)          # a pointer and a zero word, no frame: stale stack words
    assert not A.AARCH64.saved_context(read, 0x1000)


def test_dwarf_and_syscalls():
    a = A.AARCH64
    assert a.dwarf_regs[a.dwarf.sp] == a.sp and a.dwarf_regs[a.dwarf.fp] == a.fp
    assert a.dwarf_regs[a.dwarf.ra] == "x30"
    assert (a.gettid_nr, a.tgkill_nr, a.nanosleep_nr) == (178, 131, 101)
    assert a.hwcap_names() == (HwcapAarch64, Hwcap2Aarch64)
    assert a.vdso_prefixes == ("__kernel_",)


def test_arm64_is_traced_with_and_without_inject() -> None:
    """The stop-based engine and the in-tracee recorder (tracer/inject/aarch64/) both take
    arm64 processes."""
    a64 = arch.by_name("aarch64")
    arch.check_traceable(a64)
    arch.check_traceable(a64, inject=True)
    for a in (arch.X86_64, arch.I386):
        arch.check_traceable(a)
        arch.check_traceable(a, inject=True)
