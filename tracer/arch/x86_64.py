"""x86_64 (System V AMD64 psABI, Linux): registers, instructions, frames, stubs.

Registers are named as in the 64-bit `struct user_regs_struct` (arch/x86/include/asm/user_64.h),
which is what PTRACE_GETREGS returns for both 64-bit and IA-32 tracees of a 64-bit tracer (the
32-bit registers zero-extended: eax is the low half of rax); i386.py shares this layout.
Encodings: Intel SDM vol. 2.

Signal frames (arch/x86/include/asm/sigframe.h, built by arch/x86/kernel/signal_64.c and
signal_32.c):

x86_64 `struct rt_sigframe` (every handler, SA_SIGINFO or not)::

    +0    char *pretcode            sa_restorer (x86_64 refuses a handler without SA_RESTORER)
    +8    struct ucontext uc        uc_flags 8, uc_link 8, uc_stack 24, uc_mcontext 256,
                                    uc_sigmask 8 (include/uapi/asm-generic/ucontext.h)
    +312  struct siginfo info       (copied only for SA_SIGINFO handlers)

  x64_setup_rt_frame: rdi = sig, rsi = &frame->info, rdx = &frame->uc, rax = 0, rsp = frame.

Where the kernel finds the frame it restores (the trampoline's `ret` has popped pretcode;
__kernel_sigreturn also pops sig):
  x86_64 rt_sigreturn (15):  frame = sp - 8   (signal_64.c: regs->sp - sizeof(long))
  i386 rt_sigreturn (173):   frame = sp - 4   (signal_32.c: regs->sp - 4)
  i386 sigreturn (119):      frame = sp - 8   (signal_32.c: regs->sp - 8)
"""
from __future__ import annotations

import struct
from enum import IntFlag

from tracer import target
from tracer.arch.base import (Arch, DwarfRegs, ReadMem, RegLayout, SigFrameLayout, StubLayout)
from tracer.errors import MemoryReadError

__all__ = ["X86_64", "X86_64Arch", "X86Arch", "USER_REGS", "INT3", "NOP", "JMP_REL32_LEN", "rel32",
           "rel32_wrap", "jmp_rel32", "call_rel32", "jcc_condition", "jcc_rel32", "push_value", "RDTSC", "TSC_OFF", "fill_stub_marker",
           "marker_fallback_head", "MARKER_FALLBACK_SP_ADJ", "stub_x86_64",
           "is_control_transfer"]

# arch/x86/include/asm/user_64.h: struct user_regs_struct
USER_REGS = RegLayout(("r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8",
                       "rax", "rcx", "rdx", "rsi", "rdi", "orig_rax", "rip", "cs", "eflags",
                       "rsp", "ss", "fs_base", "gs_base", "ds", "es", "fs", "gs"))

INT3 = b"\xcc"
NOP = b"\x90"
JMP_REL32_LEN = 5
SYSCALL = b"\x0f\x05"
RDTSC = b"\x0f\x31"
# rdtsc, or (the TSC disabled: prctl PR_SET_TSC, seccomp strict mode) `xor eax,eax; cdq`
TSC_OFF = b"\x31\xc0\x99"
_RDTSC_STUB = {True: RDTSC, False: TSC_OFF}
# the stub's stop: an int3, or a marker (number filled in): `mov eax, M; syscall`
_STOP64 = {False: INT3, True: b"\xb8\0\0\0\0\x0f\x05"}
# selectors: arch/x86/include/asm/segment.h
USER_CS = 0x33
USER32_CS = 0x23


def rel32(dest: int, after: int) -> bytes:
    """rel32 from the end of an instruction at `after` to `dest`; ValueError beyond +-2 GiB."""
    d = dest - after
    if not -(1 << 31) <= d < (1 << 31):
        raise ValueError(f"{dest:#x} is out of rel32 reach of {after:#x}")
    return (d & 0xFFFFFFFF).to_bytes(4, "little")


def rel32_wrap(dest: int, after: int) -> bytes:
    """rel32 in 32-bit code: the displacement wraps modulo 2**32, so it reaches everything."""
    return ((dest - after) & 0xFFFFFFFF).to_bytes(4, "little")


def jmp_rel32(src: int, dst: int, wrap: bool = False) -> bytes:
    return b"\xe9" + (rel32_wrap if wrap else rel32)(dst, src + 5)


def call_rel32(src: int, dst: int, wrap: bool = False) -> bytes:
    return b"\xe8" + (rel32_wrap if wrap else rel32)(dst, src + 5)


def jcc_condition(insn: bytes) -> int | None:
    """The condition code (0-15) of a `jcc rel8` (7x cb) or `jcc rel32` (0f 8x cd) given
    whole; None for anything else."""
    if len(insn) == 2 and insn[0] & 0xF0 == 0x70:
        return insn[0] & 0x0F
    if len(insn) == 6 and insn[0] == 0x0F and insn[1] & 0xF0 == 0x80:
        return insn[1] & 0x0F
    return None


def jcc_rel32(cond: int, src: int, dst: int) -> bytes:
    return bytes((0x0F, 0x80 | cond)) + rel32(dst, src + 6)


def push_value(value: int, wide: bool) -> bytes:
    """Push `value` as a return address: `push imm32` (i386); x86_64 has no push of a 64-bit
    immediate: `lea rsp,[rsp-8]; mov dword [rsp],lo; mov dword [rsp+4],hi` (lea keeps the
    flags)."""
    if not wide:
        return b"\x68" + (value & 0xFFFFFFFF).to_bytes(4, "little")
    return (b"\x48\x8d\x64\x24\xf8" + b"\xc7\x04\x24" + (value & 0xFFFFFFFF).to_bytes(4, "little")
            + b"\xc7\x44\x24\x04" + (value >> 32 & 0xFFFFFFFF).to_bytes(4, "little"))


def stub_x86_64(marker: bool = False, tsc: bool = True) -> tuple[bytes, StubLayout, int, int]:
    """The call-through stub (System V AMD64: arguments in rdi rsi rdx rcx r8 r9; at a
    function's entry rsp = 8 mod 16; rax, rdx and the flags are free to clobber at entry;
    after the call rcx and r11, which a marker's syscall clobbers, are scratch too)."""
    rdtsc = _RDTSC_STUB[tsc]
    c = bytearray()
    c += b"\x57\x56\x52\x51\x41\x50\x41\x51"      # push rdi, rsi, rdx, rcx, r8, r9
    c += rdtsc                                    # rdtsc
    c += b"\x48\xc1\xe2\x20\x48\x09\xd0"          # shl rdx,32 ; or rax,rdx
    c += b"\x50"                                  # push rax (t0): 56 bytes pushed, rsp = 0 mod 16
    c += b"\x48\x8b\x54\x24\x20"                  # mov rdx,[rsp+32] (the third argument again)
    call_off = len(c)
    c += b"\xe8\0\0\0\0"                          # call body
    c += b"\x50"                                  # push rax (the return value)
    c += rdtsc + b"\x48\xc1\xe2\x20\x48\x09\xd0"    # rdtsc ; shl ; or
    c += b"\x50"                                  # push rax (t1)
    exit_off = len(c)
    c += _STOP64[marker]                          # the one stop
    c += b"\x48\x8d\x64\x24\x08"                  # lea rsp,[rsp+8]   (drop t1)
    c += b"\x58"                                  # pop rax           (the return value)
    c += b"\x48\x8d\x64\x24\x38"                  # lea rsp,[rsp+56]  (t0, saved arguments)
    c += b"\xc3"                                  # ret to the caller
    # at the int3: t1, ret, t0, r9, r8, rcx, rdx, rsi, rdi, return address
    layout = StubLayout(struct.Struct("<QqQ6QQ"), 72, 0, 1, 2, 9, (8, 7, 6, 5, 4, 3))
    return bytes(c), layout, exit_off, call_off


def is_control_transfer(mnemonic: str) -> bool:
    """A jump, call, loop or return (capstone's mnemonics): such an instruction cannot be
    displaced into a stub by copying it."""
    return mnemonic.startswith(("j", "call", "loop", "ret"))


def fill_stub_marker(stub: bytearray, exit_off: int, marker: int) -> None:
    """Fill in the marker number of a marker stub's `mov eax, M; syscall` at `exit_off`."""
    stub[exit_off + 1:exit_off + 5] = marker.to_bytes(4, "little")


# A marker fallback's head: `lea rsp,[rsp-128]` (past the red zone); push rax, rcx, r11;
# `mov eax, M; syscall` (the marker); pop them back; `lea rsp,[rsp+128]`. At the marker's stop
# sp is 128 + 24 below the site's.
MARKER_FALLBACK_SP_ADJ = 128 + 24


def marker_fallback_head(marker: int) -> bytes:
    c = bytearray()
    c += b"\x48\x8d\x64\x24\x80"                       # lea rsp,[rsp-128] (red zone)
    c += b"\x50\x51\x41\x53"                             # push rax, rcx, r11
    c += b"\xb8" + marker.to_bytes(4, "little") + SYSCALL  # mov eax, M ; syscall
    c += b"\x41\x5b\x59\x58"                             # pop r11, rcx, rax
    c += b"\x48\x8d\xa4\x24\x80\0\0\0"                 # lea rsp,[rsp+128]
    return bytes(c)


# A host function: rdtsc ; shl rdx,32 ; or rax,rdx ; ret
_HOST_RDTSC = RDTSC + b"\x48\xc1\xe2\x20\x48\x09\xd0\xc3"


class X86Arch(Arch):
    """What x86_64 and i386 share: the register buffer, rdtsc, the return address at [sp]."""
    __slots__ = ()

    def no_restart(self, regs: target.Regs) -> None:
        # orig_rax = -1: arch/x86/kernel/signal.c (arch_do_signal_or_restart) restarts only a
        # stop inside a system call
        regs[self.syscall_nr] = -1

    def emulate_cycle_counter(self, regs: target.Regs, value: int) -> None:
        # rdtsc: edx:eax = TSC, the upper halves of rax and rdx cleared
        regs["rax"] = value & 0xFFFFFFFF
        regs["rdx"] = (value >> 32) & 0xFFFFFFFF
        regs[self.pc] = regs[self.pc] + len(RDTSC)

    def return_address(self, regs: target.Regs, read: ReadMem) -> int:
        # `call` pushed it: the word at sp
        return int.from_bytes(read(regs[self.sp] & self.mask, self.word), "little")

    def hwcap_names(self) -> tuple[type[IntFlag] | None, type[IntFlag] | None]:
        from tracer.consts import Hwcap2X86, HwcapX86
        return HwcapX86, Hwcap2X86


def user_eflags(flags: int) -> bool:
    """Whether a saved eflags can be a user context's: reserved bit 1 is always set, and
    nothing is defined above bit 21 (Intel SDM vol. 1, 3.4.3 "EFLAGS Register")."""
    return flags & 2 == 2 and flags >> 22 == 0


class X86_64Arch(X86Arch):
    __slots__ = ()

    def thread_arch(self, regs: target.Regs) -> Arch:
        # a 64-bit process's thread in compat mode runs with the IA-32 code segment
        if regs["cs"] == USER32_CS:
            from tracer.arch.i386 import I386
            return I386
        return self

    def jump(self, src: int, dst: int) -> bytes:
        return jmp_rel32(src, dst)

    def call(self, src: int, dst: int) -> bytes:
        return call_rel32(src, dst)

    def stub(self, nargs: int, marker: bool, tsc: bool) -> tuple[bytes, StubLayout, int, int]:
        return stub_x86_64(marker, tsc)

    def saved_context(self, read: ReadMem, at: int) -> bool:
        # struct sigcontext_64 (arch/x86/include/uapi/asm/sigcontext.h): ... sp, ip, flags,
        # cs (u16) = __USER_CS
        try:
            rest = read(at + 8, 10)
        except MemoryReadError:
            return False
        flags, cs = int.from_bytes(rest[:8], "little"), int.from_bytes(rest[8:], "little")
        return cs == USER_CS and user_eflags(flags)

    def syscall_table(self) -> tuple[dict[int, str], dict[int, int]]:
        from tracer.tables import syscalls_x86_64 as t
        return t.NAMES, t.NARGS


# x86_64 struct rt_sigframe: pretcode 8, then struct ucontext (uc_flags 8, uc_link 8, uc_stack
# 24, uc_mcontext 256, uc_sigmask 8 = 304), then siginfo
_UCONTEXT = 8 + 8 + 24 + 256 + 8
# struct ucontext: uc_flags 8, uc_link 8, stack_t 24 -> uc_mcontext at 40;
# struct sigcontext_64: r8..r15, rdi, rsi, rbp, rbx, rdx, rax, rcx, rsp, rip -> rip at 128.
_UC_MCONTEXT_IP = 40 + 128

X86_64 = X86_64Arch(
    name="x86_64", word=8, elf_class=2, elf_machine="EM_X86_64", e_machine=62,
    audit_arch=0xC000003E,
    regs=USER_REGS, regs_get=target.getregs, regs_set=target.setregs,
    pc="rip", sp="rsp", fp="rbp", retval="rax",
    arg_regs=("rdi", "rsi", "rdx", "rcx", "r8", "r9"),
    # arch/x86/entry/entry_64.S
    syscall_nr="orig_rax", syscall_nr_in="rax",
    syscall_arg_regs=("rdi", "rsi", "rdx", "r10", "r8", "r9"), syscall_ret="rax",
    time_t="q", timespec="qq", timespec64="qq", timeval="qq", timezone="ii",
    uc_mcontext_ip=_UC_MCONTEXT_IP, sigcontext_ip=128, sigcontext_sp_back=8,
    rt_sigreturn_nr=15, sigreturn_nr=None,
    sigframe=SigFrameLayout(
        abi="x86_64", word=8, rt_ip=8 + _UC_MCONTEXT_IP, rt_sigreturn_nr=15,
        rt_sigreturn_sp_adjust=8,              # signal_64.c: regs->sp - sizeof(long)
        plain_ip=None, sigreturn_nr=None, sigreturn_sp_adjust=None,
        rt_info=8 + _UCONTEXT, rt_uc=8,
        # x64_setup_rt_frame: rdi = sig, rsi = &frame->info, rdx = &frame->uc
        handler_regs=("rdi", "rsi", "rdx"), args_in_frame=False),
    # glibc's and musl's restorer: mov $15,%rax ; syscall
    restorer_code=b"\x48\xc7\xc0\x0f\x00\x00\x00\x0f\x05",
    # System V AMD64 psABI figure 3.36: rax 0, rdx 1, rcx 2, rbx 3, rsi 4, rdi 5, rbp 6, rsp 7,
    # r8-r15 8-15, return address (rip) 16
    dwarf=DwarfRegs(("rax", "rdx", "rcx", "rbx", "rsi", "rdi", "rbp", "rsp", "r8", "r9",
                     "r10", "r11", "r12", "r13", "r14", "r15"), nregs=17, sp=7, fp=6, ra=16),
    trap=INT3, trap_pc_adjust=1, nop=NOP, syscall_insn=SYSCALL,
    jump_len=JMP_REL32_LEN, jump_reach=1 << 31,
    cycle_counter=RDTSC, host_counter_fn=_HOST_RDTSC,
    gettid_nr=186, tgkill_nr=234, nanosleep_nr=35,      # arch/x86/entry/syscalls/syscall_64.tbl
    vdso_prefixes=("__vdso_",),
)
