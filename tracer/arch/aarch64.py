"""arm64 (AArch64) facts: registers, instructions, ELF and ptrace constants.

A plain module of constants and functions until tracer/arch/ has its `Arch` interface. Every
value cites where it comes from; "checked" means seen in the emulated machine (scripts/vm
aarch64: qemu -cpu max,pauth-impdef=on, Debian's 6.12 arm64 kernel).

Registers, as PTRACE_GETREGSET(NT_PRSTATUS) returns them (struct user_pt_regs,
arch/arm64/include/uapi/asm/ptrace.h): regs[31] (x0-x30), sp, pc, pstate; python-ptrace names
them r0..r30, sp, pc, pstate. arm64 has no PTRACE_GETREGS/SETREGS (the kernel defines them only
for 32-bit tracees' compat interface): registers go through PTRACE_GETREGSET/SETREGSET only.
"""
from __future__ import annotations

from tracer.abi import Abi

__all__ = [
    "AARCH64", "EM_AARCH64", "REG_NAMES", "NT_PRSTATUS", "NT_ARM_SYSTEM_CALL", "NT_ARM_PAC_MASK",
    "BRK_0", "SVC_0", "NOP", "INSN_SIZE", "PACIASP", "AUTIASP", "BTI_C", "B_RANGE",
    "NR_RT_SIGRETURN", "RT_SIGRETURN_CODE", "VDSO_VERSION", "VDSO_FUNCTIONS",
    "UC_MCONTEXT", "SIGCONTEXT_PC", "SIGCONTEXT_SP", "PAC_MASK_CHECKED", "encode_b", "decode_b",
    "strip_pac",
]

EM_AARCH64 = 183                     # include/uapi/linux/elf-em.h

# struct user_pt_regs, in python-ptrace's names (ptrace/binding/linux_struct.py)
REG_NAMES: tuple[str, ...] = (*(f"r{i}" for i in range(31)), "sp", "pc", "pstate")

# include/uapi/linux/elf.h: regset note types for PTRACE_GETREGSET/SETREGSET
NT_PRSTATUS = 1                      # struct user_pt_regs (34 words)
NT_ARM_SYSTEM_CALL = 0x404           # int: the syscall number at a syscall-entry stop
NT_ARM_PAC_MASK = 0x406              # struct user_pac_mask { data_mask, insn_mask }

# Instructions (little-endian words; ARM ARM C6). Every arm64 instruction is 4 bytes.
INSN_SIZE = 4
BRK_0 = bytes.fromhex("000020d4")    # brk #0: SIGTRAP (TRAP_BRKPT), pc reported AT the brk
SVC_0 = bytes.fromhex("010000d4")    # svc #0: system call, number in x8, args x0-x5, ret x0
NOP = bytes.fromhex("1f2003d5")
PACIASP = bytes.fromhex("3f2303d5")  # hint #25: sign x30 with key A and sp (a NOP without PAC)
AUTIASP = bytes.fromhex("bf2303d5")  # hint #29: authenticate x30
BTI_C = bytes.fromhex("5f2403d5")    # hint #34: landing pad for BR/BLR calls
B_RANGE = 1 << 27                    # B imm26 * 4: a direct branch reaches +-128 MiB

# arch/arm64/kernel/vdso/sigreturn.S: glibc's restorer for every handler (no SA_RESTORER on
# arm64's glibc: the kernel sets x30 to the vDSO's __kernel_rt_sigreturn)
NR_RT_SIGRETURN = 139                # include/uapi/asm-generic/unistd.h
RT_SIGRETURN_CODE = bytes.fromhex("681180d2") + SVC_0   # mov x8, #139; svc #0
VDSO_VERSION = "LINUX_2.6.39"        # arch/arm64/kernel/vdso/vdso.lds.S
# What the arm64 vDSO exports (vdso.lds.S); __kernel_getrandom from Linux 6.12; no time,
# no getcpu. __kernel_rt_sigreturn is NOTYPE (an ENTRY in assembly), the others FUNC.
VDSO_FUNCTIONS = ("__kernel_clock_gettime", "__kernel_gettimeofday", "__kernel_clock_getres",
                  "__kernel_rt_sigreturn", "__kernel_getrandom")

# Signal frames: struct rt_sigframe { siginfo (128); struct ucontext uc; }
# (arch/arm64/kernel/signal.c). struct ucontext (arch/arm64/include/uapi/asm/ucontext.h):
# uc_flags 8, uc_link 8, uc_stack 24, uc_sigmask 8, __unused[120] -> uc_mcontext at 168
# rounded up to its 16-byte alignment = 176. struct sigcontext: fault_address 8, regs[31],
# sp, pc, pstate.
UC_MCONTEXT = 176
SIGCONTEXT_SP = 8 + 31 * 8           # 256
SIGCONTEXT_PC = SIGCONTEXT_SP + 8    # 264

AARCH64 = Abi(
    name="aarch64", word=8, elf_class=2, elf_machine="EM_AARCH64",
    pc="pc", sp="sp", fp="r29", retval="r0",
    # AAPCS64: arguments in x0-x7, result in x0; Linux system calls: number in x8, args x0-x5
    arg_regs=tuple(f"r{i}" for i in range(8)),
    syscall_nr="r8", syscall_arg_regs=tuple(f"r{i}" for i in range(6)),
    time_t="q", timespec="qq", timespec64="qq", timeval="qq", timezone="ii",
    uc_mcontext_ip=UC_MCONTEXT + SIGCONTEXT_PC, sigcontext_ip=SIGCONTEXT_PC,
    rt_sigreturn_nr=NR_RT_SIGRETURN, sigreturn_nr=None,
    # DWARF for the Arm 64-bit Architecture (AADWARF64): 0-30 are x0-x30, 31 is sp
    dwarf_regs=(*(f"r{i}" for i in range(31)), "sp"),
)


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
# - NT_ARM_PAC_MASK gives data_mask == insn_mask == 0x0070000000000000 there (bits 52-54: the
#   kernel's 52-bit user VA on -cpu max; 48-bit VA kernels give bits 48-54). Bit 55 selects
#   the address half and is never part of the mask.
PAC_MASK_CHECKED = 0x0070000000000000


def encode_b(at: int, to: int, link: bool = False) -> bytes:
    """`b to` (or `bl to`) placed at address `at`: imm26 words, +-128 MiB (ARM ARM C6.2.26)."""
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
