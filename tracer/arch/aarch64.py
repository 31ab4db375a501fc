"""arm64 (AArch64, Linux): registers, instructions, signal frames, the vDSO; tracer.arch's `Arch`.

Every value cites where it comes from; "checked" means seen in the emulated machine (scripts/vm
aarch64: qemu -cpu max,pauth-impdef=on, Debian's 6.12 arm64 kernel; tests/vm).

Registers, as PTRACE_GETREGSET(NT_PRSTATUS) fills them (struct user_pt_regs,
arch/arm64/include/uapi/asm/ptrace.h): regs[31] (x0-x30), sp, pc, pstate; named x0..x30, sp,
pc, pstate here. arm64 has no PTRACE_GETREGS/SETREGS: registers go through
PTRACE_GETREGSET/SETREGSET only (tracer.target.getregset/setregset).

Signal frames (arch/arm64/kernel/signal.c, arch/arm64/include/uapi/asm/{ucontext,sigcontext}.h)::

    struct rt_sigframe { struct siginfo info (128); struct ucontext uc; }   (at the handler's sp)
    struct ucontext: uc_flags 8, uc_link 8, uc_stack 24, uc_sigmask 8, __unused[120], then
        struct sigcontext uc_mcontext, 16-byte aligned: at 176
    struct sigcontext: fault_address 8, regs[31], sp, pc, pstate, __reserved[4096]

  setup_return: x0 = signo, x29 = the frame record, x30 = the restorer (sa_restorer with
  SA_RESTORER, else the vDSO's __kernel_rt_sigreturn: glibc sets none), pc = the handler;
  setup_rt_frame sets x1 = &info, x2 = &uc only for SA_SIGINFO handlers.
  sys_rt_sigreturn: frame = sp (the handler returns with sp where it found it).
"""
from __future__ import annotations

import ctypes
import struct
from enum import IntFlag

from tracer import target
from tracer.arch.base import Arch, DwarfRegs, ReadMem, RegLayout, SigFrameLayout, StubLayout
from tracer.errors import MemoryReadError, TracerError

__all__ = [
    "AARCH64", "Aarch64Arch", "EM_AARCH64", "AUDIT_ARCH_AARCH64", "USER_PT_REGS", "REG_NAMES",
    "NT_PRSTATUS", "NT_ARM_SYSTEM_CALL", "NT_ARM_PAC_MASK", "BRK_0", "SVC_0", "NOP",
    "INSN_SIZE", "PACIASP", "AUTIASP", "BTI_C", "B_RANGE", "NR_RT_SIGRETURN",
    "RT_SIGRETURN_CODE", "VDSO_VERSION", "VDSO_FUNCTIONS", "UC_MCONTEXT", "SIGCONTEXT_PC",
    "SIGCONTEXT_SP", "PAC_MASK_CHECKED", "encode_b", "decode_b", "strip_pac", "stub_aarch64",
    "HOST_CNTVCT", "STUB_FRAME", "read_pac_mask", "SIGCONTEXT_REGS",
]

EM_AARCH64 = 183                     # include/uapi/linux/elf-em.h
AUDIT_ARCH_AARCH64 = 0xC00000B7      # include/uapi/linux/audit.h: EM_AARCH64 | 64BIT | LE

# struct user_pt_regs
REG_NAMES: tuple[str, ...] = (*(f"x{i}" for i in range(31)), "sp", "pc", "pstate")
USER_PT_REGS = RegLayout(REG_NAMES)

# include/uapi/linux/elf.h: regset note types for PTRACE_GETREGSET/SETREGSET
NT_PRSTATUS = 1                      # struct user_pt_regs (34 words, 272 bytes: checked)
NT_ARM_SYSTEM_CALL = 0x404           # int: the syscall number the kernel runs (syscall stops)
NT_ARM_PAC_MASK = 0x406              # struct user_pac_mask { data_mask, insn_mask }

# Instructions (little-endian words; Arm ARM C6). Every arm64 instruction is 4 bytes.
INSN_SIZE = 4
BRK_0 = bytes.fromhex("000020d4")    # brk #0: SIGTRAP (TRAP_BRKPT), pc reported AT the brk
SVC_0 = bytes.fromhex("010000d4")    # svc #0: system call, number in x8, args x0-x5, ret x0
NOP = bytes.fromhex("1f2003d5")
PACIASP = bytes.fromhex("3f2303d5")  # hint #25: sign x30 with key A and sp (a NOP without PAC)
AUTIASP = bytes.fromhex("bf2303d5")  # hint #29: authenticate x30
BTI_C = bytes.fromhex("5f2403d5")    # hint #34: landing pad for BR/BLR calls
B_RANGE = 1 << 27                    # B imm26 * 4: a direct branch reaches +-128 MiB

# include/uapi/asm-generic/unistd.h (arm64 uses the generic table)
NR_NANOSLEEP = 101
NR_TGKILL = 131
NR_RT_SIGRETURN = 139
NR_GETTID = 178
# arch/arm64/kernel/vdso/sigreturn.S: the restorer of every handler without SA_RESTORER
RT_SIGRETURN_CODE = bytes.fromhex("681180d2") + SVC_0   # mov x8, #139; svc #0
VDSO_VERSION = "LINUX_2.6.39"        # arch/arm64/kernel/vdso/vdso.lds.S
# What the arm64 vDSO exports (vdso.lds.S); __kernel_getrandom from Linux 6.12; no time,
# no getcpu. __kernel_rt_sigreturn is NOTYPE (an assembly entry), the others FUNC.
VDSO_FUNCTIONS = ("__kernel_clock_gettime", "__kernel_gettimeofday", "__kernel_clock_getres",
                  "__kernel_rt_sigreturn", "__kernel_getrandom")

# arch/arm64/include/uapi/asm/sigcontext.h: FPSIMD_MAGIC, sizeof(struct fpsimd_context)
_FPSIMD_HEAD = 0x46508001 | 528 << 32
UC_MCONTEXT = 176
SIGCONTEXT_REGS = 8                  # regs[31], after fault_address
SIGCONTEXT_SP = 8 + 31 * 8           # 256
SIGCONTEXT_PC = SIGCONTEXT_SP + 8    # 264
_SIGINFO = 128

# ptrace on arm64, checked in the machine (tests/vm/test_ptrace_aarch64.py):
# - NT_PRSTATUS fills 272 bytes (34 words). A thread interrupted in a blocking system call has
#   pc rewound to its `svc #0` (the kernel restarts it) and x8 still holding its number.
# - `brk #0` raises SIGTRAP with pc AT the brk (x86's int3 reports the byte after it): after
#   writing the original instruction back, the thread resumes at pc as it is, nothing to rewind.
#   At a function's entry the stop shows the call's arguments in x0-x7 and its return address
#   in x30 (unsigned: a PAC-enabled callee signs x30 in its own prologue, after the entry).
# - Writes to the tracee's code through /proc/PID/mem (or POKETEXT) reach its instruction
#   fetch: the kernel's ptrace write path (access_remote_vm -> copy_to_user_page ->
#   flush_ptrace_access, arch/arm64/mm/flush.c) makes the instruction cache coherent for an
#   executable mapping. A brk planted over code called 20000 times just before is hit, and the
#   original instruction written back runs 20000 more calls without a stale brk. (Under qemu's
#   TCG any write invalidates translated code anyway; on hardware the kernel's flush does it.)
# - PTRACE_SETREGSET(NT_PRSTATUS) writes the whole struct; a changed x0 at the entry stop is
#   what the function runs with.
# - At a syscall-entry stop the kernel runs regs->syscallno, read and written through
#   NT_ARM_SYSTEM_CALL (an int); x8 is only what the program passed: changing x8 there changes
#   nothing (getppid still ran), changing NT_ARM_SYSTEM_CALL does (getpid ran instead). x7
#   reads 0 at entry stops and 1 at exit stops (ptrace_report_syscall's marker; the program's
#   x7 is put back when it resumes).
# - NT_ARM_PAC_MASK gives data_mask == insn_mask == 0x0070000000000000 there (bits 52-54: the
#   kernel's 52-bit user VA on -cpu max; 48-bit VA kernels give bits 48-54). Bit 55 selects
#   the address half and is never part of the mask.
PAC_MASK_CHECKED = 0x0070000000000000


def encode_b(at: int, to: int, link: bool = False) -> bytes:
    """`b to` (or `bl to`) placed at address `at`: imm26 words, +-128 MiB (Arm ARM C6.2.26)."""
    off = to - at
    if off % 4 or not -B_RANGE <= off < B_RANGE:
        raise ValueError(f"b from {at:#x} cannot reach {to:#x}")
    word = (0x94000000 if link else 0x14000000) | ((off >> 2) & 0x03FFFFFF)
    return word.to_bytes(4, "little")


def decode_b(at: int, insn: bytes) -> int | None:
    """The target of a `b`/`bl` at `at`, None for any other instruction."""
    word = int.from_bytes(insn[:4], "little")
    if word & 0x7C000000 != 0x14000000:
        return None
    imm = word & 0x03FFFFFF
    if imm >> 25:
        imm -= 1 << 26
    return at + 4 * imm


def strip_pac(addr: int, insn_mask: int) -> int:
    """A return address signed by pointer authentication, unsigned: clear the PAC bits
    (NT_ARM_PAC_MASK's insn_mask) and sign-extend from bit 55 as XPACI does (user addresses
    have bit 55 clear)."""
    if addr >> 55 & 1:
        return addr | insn_mask
    return addr & ~insn_mask & 0xFFFFFFFFFFFFFFFF


def read_pac_mask(tid: int) -> int:
    """The thread's insn_mask of NT_ARM_PAC_MASK (struct user_pac_mask { data_mask, insn_mask
    }, arch/arm64/include/uapi/asm/ptrace.h); 0 on a kernel or CPU without address
    authentication (the regset is then inactive: EINVAL/ENODEV)."""
    buf = (ctypes.c_uint64 * 2)()
    try:
        if target.getregset(tid, NT_ARM_PAC_MASK, buf) < 16:
            return 0
    except TracerError:
        return 0
    return int(buf[1])


def _insns(*words: int) -> bytes:
    return b"".join(w.to_bytes(4, "little") for w in words)


# Instructions of the stub and the host counter read (llvm-mc -triple=aarch64 -show-encoding)
_ISB = 0xD5033FDF
_MRS_X16_CNTVCT = 0xD53BE050         # mrs x16, cntvct_el0
_MOV_X16_XZR = 0xAA1F03F0            # mov x16, xzr
_NOP_W = 0xD503201F
# The counter read: `isb` first, as the vDSO's own reads do (arch/arm64/include/asm/
# arch_timer.h __arch_counter_get_cntvct: the read is not speculated ahead of older code)
_COUNTER = {True: (_ISB, _MRS_X16_CNTVCT), False: (_NOP_W, _MOV_X16_XZR)}
# A host function returning the counter: isb; mrs x0, cntvct_el0; ret
HOST_CNTVCT = _insns(_ISB, 0xD53BE040, 0xD65F03C0)
STUB_FRAME = 96


def stub_aarch64(tsc: bool = True) -> tuple[bytes, StubLayout, int, int]:
    """The call-through stub (AAPCS64: arguments in x0-x7, result in x0, the return address
    in x30, unsigned at the entry; x16/x17 (IP0/IP1) are free at a call's entry, x1-x17 after
    it; no red zone below sp, which stays 16-byte aligned). Entered by the `b` that replaced
    the function's first instruction, it saves the arguments, x30 and a counter reading in a
    96-byte block below sp, calls the body copy with `bl` (direct: BTI allows it; a body that
    signs x30 with paciasp authenticates it with the same sp before its `ret`), saves x0 and
    a second reading, stops at `brk #0` (pc AT the brk: the tracer moves it past), then
    returns to the caller through the saved x30."""
    c = [0xD10183FF,                     # sub sp, sp, #96
         0xA90187E0,                     # stp x0, x1, [sp, #24]
         0xA9028FE2,                     # stp x2, x3, [sp, #40]
         0xA90397E4,                     # stp x4, x5, [sp, #56]
         0xA9049FE6,                     # stp x6, x7, [sp, #72]
         0xF9002FFE,                     # str x30, [sp, #88]
         *_COUNTER[tsc],                 # isb; mrs x16, cntvct_el0
         0xF9000BF0]                     # str x16, [sp, #16]       (t0)
    call_off = 4 * len(c)
    c += [0x94000000,                    # bl body (filled in by breakpoints.py)
          0xF90007E0,                    # str x0, [sp, #8]         (the result)
          *_COUNTER[tsc],
          0xF90003F0]                    # str x16, [sp]            (t1)
    exit_off = 4 * len(c)
    c += [0xD4200000,                    # brk #0: the one stop
          0xF9402FFE,                    # ldr x30, [sp, #88]
          0x910183FF,                    # add sp, sp, #96
          0xD65F03C0]                    # ret
    # at the brk, from sp: t1, result, t0, x0-x7, the return address; sp at entry = sp + 96
    layout = StubLayout(struct.Struct("<QqQ8QQ"), STUB_FRAME, 0, 1, 2, 11, tuple(range(3, 11)))
    return _insns(*c), layout, exit_off, call_off


def _getregs(tid: int, regs: target.Regs) -> None:
    target.getregset(tid, NT_PRSTATUS, regs.buf)


def _setregs(tid: int, regs: target.Regs) -> None:
    target.setregset(tid, NT_PRSTATUS, regs.buf)


class Aarch64Arch(Arch):
    __slots__ = ()

    def no_restart(self, regs: target.Regs) -> None:
        # arm64 restarts a system call from regs->syscallno (arch/arm64/kernel/signal.c
        # do_signal), which is not in NT_PRSTATUS: it is written through NT_ARM_SYSTEM_CALL
        # (-1: none), a separate regset this buffer cannot carry.
        raise NotImplementedError("arm64: the restart is not in the register buffer: "
                                  "no_syscall(tid, regs) writes NT_ARM_SYSTEM_CALL")

    def no_syscall(self, tid: int, regs: target.Regs) -> None:
        # regs->syscallno = NO_SYSCALL (-1): at a syscall-entry or seccomp stop the kernel
        # skips the call, leaving x0 as the tracer set it (arch/arm64/kernel/syscall.c
        # el0_svc_common); an interrupted call is not restarted (signal.c do_signal)
        target.setregset(tid, NT_ARM_SYSTEM_CALL, (ctypes.c_int32 * 1)(-1))

    def emulate_cycle_counter(self, regs: target.Regs, value: int) -> None:
        # EL0 reads CNTVCT_EL0 without trapping (the kernel sets CNTKCTL_EL1.EL0VCTEN): no
        # faulting counter read to emulate (cycle_counter is b"")
        raise NotImplementedError("arm64 reads its counter without a trap: nothing to emulate")

    def return_address(self, regs: target.Regs, read: ReadMem) -> int:
        # `bl`/`blr` put it in x30 (the link register); at the entry it is not signed yet
        return regs["x30"]

    def pac_mask(self, tid: int) -> int:
        return read_pac_mask(tid)

    def jump(self, src: int, dst: int) -> bytes:
        return encode_b(src, dst)

    def call(self, src: int, dst: int) -> bytes:
        return encode_b(src, dst, link=True)

    def stub(self, nargs: int, marker: bool, tsc: bool) -> tuple[bytes, StubLayout, int, int]:
        if marker:
            raise ValueError("arm64 stubs stop on brk only (no seccomp marker stops)")
        return stub_aarch64(tsc)

    def counter_may_fault(self) -> bool:
        # Linux lets EL0 read CNTVCT_EL0 in every process (arch_timer: CNTKCTL_EL1.EL0VCTEN;
        # where an erratum makes the kernel trap it, it emulates the read): no per-thread
        # switch like x86's PR_SET_TSC
        return False

    def marker_stops(self) -> str | None:
        return ("it stops on brk breakpoints: vdsotrace has no seccomp marker stops for arm64 "
                "yet; a guardian process undoes the breakpoints if vdsotrace is killed")

    def saved_context(self, read: ReadMem, at: int) -> bool:
        # struct sigcontext: ... sp, pc, pstate. A saved user pstate has M[3:0] = 0 (EL0t),
        # nRW (4) = 0 (AArch64 state), D, A, I, F (6-9) = 0, and nothing in bits 32-63
        # (arch/arm64/kernel/ptrace.c valid_native_regs). After pstate, __reserved (16-byte
        # aligned: at + 24) starts with the fpsimd_context record the kernel always puts
        # first (signal.c setup_sigframe_layout): head {magic FPSIMD_MAGIC, size 528}. Without
        # it a stale pointer into the vDSO followed by a zero word passed for a frame.
        try:
            raw = read(at + 8, 24)
        except MemoryReadError:
            return False
        pstate = int.from_bytes(raw[:8], "little")
        head = int.from_bytes(raw[16:24], "little")
        return pstate & 0x3DF == 0 and pstate >> 32 == 0 and head == _FPSIMD_HEAD

    def syscall_table(self) -> tuple[dict[int, str], dict[int, int]]:
        from tracer.tables import syscalls_aarch64 as t
        return t.NAMES, t.NARGS

    def hwcap_names(self) -> tuple[type[IntFlag] | None, type[IntFlag] | None]:
        from tracer.tables.hwcap_aarch64 import Hwcap2Aarch64, HwcapAarch64
        return HwcapAarch64, Hwcap2Aarch64


AARCH64 = Aarch64Arch(
    name="aarch64", word=8, elf_class=2, elf_machine="EM_AARCH64", e_machine=EM_AARCH64,
    audit_arch=AUDIT_ARCH_AARCH64,
    regs=USER_PT_REGS, regs_get=_getregs, regs_set=_setregs,
    pc="pc", sp="sp", fp="x29", retval="x0",
    # AAPCS64: arguments in x0-x7, result in x0; Linux system calls: number in x8, arguments
    # x0-x5, result x0 (at a syscall stop x8 still holds the number; the kernel's own copy is
    # NT_ARM_SYSTEM_CALL; x7 is clobbered at syscall stops: design.md)
    arg_regs=tuple(f"x{i}" for i in range(8)),
    syscall_nr="x8", syscall_nr_in="x8",
    syscall_arg_regs=tuple(f"x{i}" for i in range(6)), syscall_ret="x0",
    time_t="q", timespec="qq", timespec64="qq", timeval="qq", timezone="ii",
    uc_mcontext_ip=UC_MCONTEXT + SIGCONTEXT_PC, sigcontext_ip=SIGCONTEXT_PC,
    sigcontext_sp_back=SIGCONTEXT_PC - SIGCONTEXT_SP,
    rt_sigreturn_nr=NR_RT_SIGRETURN, sigreturn_nr=None,
    sigframe=SigFrameLayout(
        abi="aarch64", word=8, rt_ip=_SIGINFO + UC_MCONTEXT + SIGCONTEXT_PC,
        rt_sigreturn_nr=NR_RT_SIGRETURN, rt_sigreturn_sp_adjust=0,
        plain_ip=None, sigreturn_nr=None, sigreturn_sp_adjust=None,
        rt_info=0, rt_uc=_SIGINFO,
        handler_regs=("x0", "x1", "x2"), args_in_frame=False,
        restorer_reg="x30", rt_fp_lr=_SIGINFO + UC_MCONTEXT + SIGCONTEXT_REGS + 29 * 8),
    restorer_code=RT_SIGRETURN_CODE,
    # DWARF for the Arm 64-bit Architecture (AADWARF64): 0-30 are x0-x30, 31 is sp; the
    # return address column is x30
    dwarf=DwarfRegs((*(f"x{i}" for i in range(31)), "sp"), nregs=32, sp=31, fp=29, ra=30),
    trap=BRK_0, trap_pc_adjust=0, nop=NOP, syscall_insn=SVC_0,
    jump_len=INSN_SIZE, jump_reach=B_RANGE,
    cycle_counter=b"", host_counter_fn=HOST_CNTVCT,
    gettid_nr=NR_GETTID, tgkill_nr=NR_TGKILL, nanosleep_nr=NR_NANOSLEEP,
    vdso_prefixes=("__kernel_",),
)
