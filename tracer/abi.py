"""Per-ABI facts: word size, where arguments live, struct layouts, signal frames.

Registers are named as in the 64-bit `struct user_regs_struct` (arch/x86/include/asm/user_64.h),
which is what PTRACE_GETREGS returns for both 64-bit and IA-32 tracees of a 64-bit tracer
(the 32-bit registers zero-extended: eax is the low half of rax).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

__all__ = ["Abi", "X86_64", "I386", "ABIS", "abi_by_name"]


@dataclass(frozen=True, slots=True)
class Abi:
    name: str
    word: int                       # bytes in a pointer / long
    elf_class: int                  # e_ident[EI_CLASS]
    elf_machine: str                # pyelftools' e_machine name
    pc: str
    sp: str
    fp: str
    retval: str
    arg_regs: tuple[str, ...]       # function arguments in registers; empty for cdecl (stack)
    syscall_nr: str
    syscall_arg_regs: tuple[str, ...]
    time_t: str                     # struct format of time_t / long
    timespec: str                   # struct timespec
    timespec64: str                 # struct __kernel_timespec (64-bit on both ABIs)
    timeval: str
    timezone: str
    # Signal frames (arch/x86/include/asm/sigframe.h, arch/x86/kernel/signal_{64,32}.c):
    # offset of uc_mcontext's saved instruction pointer inside struct ucontext.
    uc_mcontext_ip: int
    sigcontext_ip: int              # offset of ip inside struct sigcontext (non-rt i386 frames)
    rt_sigreturn_nr: int
    sigreturn_nr: int | None
    # Registers in DWARF number order (psABI register mappings), by their user_regs names.
    dwarf_regs: tuple[str, ...] = ()

    @property
    def mask(self) -> int:
        return (1 << (8 * self.word)) - 1

    def signed(self, value: int) -> int:
        value &= self.mask
        return value - (1 << (8 * self.word)) if value >> (8 * self.word - 1) else value

    def unpack_word(self, data: bytes, offset: int = 0) -> int:
        return int.from_bytes(data[offset:offset + self.word], "little")

    def pack_word(self, value: int) -> bytes:
        return (value & self.mask).to_bytes(self.word, "little")

    def unpack(self, fmt: str, data: bytes) -> tuple[int, ...]:
        return struct.unpack("<" + fmt, data)

    @staticmethod
    def size(fmt: str) -> int:
        return struct.calcsize("<" + fmt)


X86_64 = Abi(
    name="x86_64", word=8, elf_class=2, elf_machine="EM_X86_64",
    pc="rip", sp="rsp", fp="rbp", retval="rax",
    arg_regs=("rdi", "rsi", "rdx", "rcx", "r8", "r9"),
    syscall_nr="orig_rax", syscall_arg_regs=("rdi", "rsi", "rdx", "r10", "r8", "r9"),
    time_t="q", timespec="qq", timespec64="qq", timeval="qq", timezone="ii",
    # struct ucontext: uc_flags 8, uc_link 8, stack_t 24 -> uc_mcontext at 40;
    # struct sigcontext_64: r8..r15, rdi, rsi, rbp, rbx, rdx, rax, rcx, rsp, rip -> rip at 128.
    uc_mcontext_ip=40 + 128, sigcontext_ip=128,
    rt_sigreturn_nr=15, sigreturn_nr=None,
    # System V AMD64 psABI figure 3.36
    dwarf_regs=("rax", "rdx", "rcx", "rbx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10",
                "r11", "r12", "r13", "r14", "r15"),
)

I386 = Abi(
    name="i386", word=4, elf_class=1, elf_machine="EM_386",
    pc="rip", sp="rsp", fp="rbp", retval="rax",
    arg_regs=(),
    syscall_nr="orig_rax", syscall_arg_regs=("rbx", "rcx", "rdx", "rsi", "rdi", "rbp"),
    time_t="i", timespec="ii", timespec64="qq", timeval="ii", timezone="ii",
    # struct ucontext_ia32: uc_flags 4, uc_link 4, stack_ia32_t 12 -> uc_mcontext at 20;
    # struct sigcontext_32: gs fs es ds di si bp sp bx dx cx ax trapno err ip -> ip at 56.
    uc_mcontext_ip=20 + 56, sigcontext_ip=56,
    rt_sigreturn_nr=173, sigreturn_nr=119,
    # System V i386 psABI table 2.14 (eax ecx edx ebx esp ebp esi edi)
    dwarf_regs=("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi"),
)

ABIS = {a.name: a for a in (X86_64, I386)}


def abi_by_name(name: str) -> Abi:
    return ABIS[name]
