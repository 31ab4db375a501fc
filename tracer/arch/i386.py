"""i386 (System V i386 psABI as Linux and glibc use it; IA-32 tracees of a 64-bit tracer).

The registers are x86_64.py's 64-bit `struct user_regs_struct` (PTRACE_GETREGS on a 64-bit
kernel), the 32-bit ones zero-extended. Functions take their arguments on the stack (cdecl);
system calls enter the kernel through the vDSO's `__kernel_vsyscall` (sysenter/syscall) or
`int 0x80`. In 32-bit code a rel32 reaches every address (it wraps modulo 2**32).

Signal frames (arch/x86/include/asm/sigframe.h, built by arch/x86/kernel/signal_64.c and
signal_32.c):

i386 (IA-32 emulation) `struct rt_sigframe_ia32` (SA_SIGINFO handlers)::

    +0    u32 pretcode              sa_restorer, else the vDSO's __kernel_rt_sigreturn
    +4    int sig
    +8    u32 pinfo                 = frame + 16
    +12   u32 puc                   = frame + 144
    +16   compat_siginfo_t info     128 bytes (SI_MAX_SIZE, include/uapi/asm-generic/siginfo.h)
    +144  struct ucontext_ia32 uc   uc_mcontext at +20, its ip at +56

  ia32_setup_rt_frame: eax = sig, edx = &frame->info, ecx = &frame->uc ("make -mregparm=3 work").

i386 `struct sigframe_ia32` (plain handlers)::

    +0    u32 pretcode              sa_restorer, else the vDSO's __kernel_sigreturn
    +4    int sig
    +8    struct sigcontext_32 sc   its ip at +56

  ia32_setup_frame: eax = sig, edx = 0, ecx = 0.

The two i386 frames are told apart by the rt frame's self-pointers (pinfo, puc): in a plain
frame those words are the saved gs and fs selectors, never addresses inside the frame.

Where the kernel finds the frame it restores (the trampoline's `ret` has popped pretcode;
__kernel_sigreturn also pops sig):
  x86_64 rt_sigreturn (15):  frame = sp - 8   (signal_64.c: regs->sp - sizeof(long))
  i386 rt_sigreturn (173):   frame = sp - 4   (signal_32.c: regs->sp - 4)
  i386 sigreturn (119):      frame = sp - 8   (signal_32.c: regs->sp - 8)
"""
from __future__ import annotations

import struct

from tracer import target
from tracer.arch.base import Arch, DwarfRegs, ReadMem, SigFrameLayout, StubLayout
from tracer.arch.x86_64 import (X86Arch, INT3, JMP_REL32_LEN, NOP, RDTSC, TSC_OFF, USER32_CS, USER_CS,
                                USER_REGS, user_eflags,
                                call_rel32, jmp_rel32)
from tracer.errors import MemoryReadError

__all__ = ["I386", "I386Arch", "stub_i386", "INT80", "marker_fallback_stub", "gateway_stub",
           "GATEWAY_SP_ADJ", "FALLBACK_SP_ADJ", "STUB_SP_ADJ", "fill_stub_marker",
           "gateway_stack_depth"]

INT80 = b"\xcd\x80"
_RDTSC_STUB = {True: RDTSC, False: TSC_OFF}
# the stub's stop: an int3, or a marker `mov eax, M; call <gateway trampoline>` (filled in)
_STOP32 = {False: INT3, True: b"\xb8\0\0\0\0\xe8\0\0\0\0"}
# sp at a marker's stop below the site's: the call into the trampoline and what the
# trampoline's copy of __kernel_vsyscall pushed (ecx, edx, ebp) -- 16 bytes; the fallback
# stub's `push eax; call fb` adds 8
STUB_SP_ADJ = 16
GATEWAY_SP_ADJ = 16
FALLBACK_SP_ADJ = 24


def stub_i386(nargs: int, marker: bool = False,
              tsc: bool = True) -> tuple[bytes, StubLayout, int, int]:
    """cdecl: the arguments are on the stack above the return address; the stub copies them
    so the body finds them where it expects, keeping 16-byte alignment (i386 psABI as
    glibc uses it: esp = 12 mod 16 at a function's entry). eax and edx are free at entry."""
    nargs = min(nargs, 6)
    pad = (4 - 4 * nargs) % 16
    rdtsc = _RDTSC_STUB[tsc]
    c = bytearray()
    c += rdtsc + b"\x52\x50"                      # rdtsc ; push edx ; push eax  (t0)
    if pad:
        c += b"\x8d\x64\x24" + bytes(((-pad) & 0xFF,))          # lea esp,[esp-pad]
    disp = 8 + pad + 4 * nargs
    for _ in range(nargs):
        c += b"\xff\x74\x24" + bytes((disp,))     # push dword [esp+disp] (args, last first)
    call_off = len(c)
    c += b"\xe8\0\0\0\0"                          # call body
    if nargs:
        c += b"\x8d\x64\x24" + bytes((4 * nargs,))              # lea esp,[esp+4n]
    c += b"\x50"                                  # push eax (the return value)
    c += rdtsc + b"\x52\x50"                      # rdtsc ; push edx ; push eax  (t1)
    exit_off = len(c)
    c += _STOP32[marker]                          # the one stop (a marker keeps ecx edx)
    c += b"\x8d\x64\x24\x08"                      # lea esp,[esp+8]
    c += b"\x58"                                  # pop eax
    c += b"\x8d\x64\x24" + bytes((8 + pad,))      # lea esp,[esp+8+pad]
    c += b"\xc3"                                  # ret
    # at the int3: t1 (8), ret (4), pad, t0 (8), return address, the arguments
    layout = StubLayout(struct.Struct(f"<Qi{pad}xQI{nargs}I"), 12 + pad + 8, 0, 1, 2, 3,
                        tuple(4 + i for i in range(nargs)))
    return bytes(c), layout, exit_off, call_off


def fill_stub_marker(stub: bytearray, exit_off: int, marker: int, at: int,
                     trampoline: int) -> int:
    """Fill in a marker stub's `mov eax, M; call trampoline` at `exit_off` (the stub at `at`);
    returns the address the call pushes."""
    stub[exit_off + 1:exit_off + 5] = marker.to_bytes(4, "little")
    stub[exit_off + 5:exit_off + 10] = call_rel32(at + exit_off + 5, trampoline, wrap=True)
    return at + exit_off + 10


def marker_fallback_stub(marker: int, at: int, trampoline: int,
                         gateway: int) -> tuple[bytes, int]:
    """A fallback site `call __kernel_vsyscall`, re-aimed here: push eax; mov eax, M;
    call trampoline (the marker's stop); pop eax; jmp gateway (the real system call).
    Returns (code, the address its call pushes)."""
    c = bytearray(b"\x50\xb8" + marker.to_bytes(4, "little"))
    c += call_rel32(at + len(c), trampoline, wrap=True)
    ret = at + len(c)
    c += b"\x58"
    c += jmp_rel32(at + len(c), gateway, wrap=True)
    return bytes(c), ret


def gateway_stub(at: int, m_in: int, m_out: int, trampoline: int) -> tuple[bytes, list[int], int]:
    """__kernel_vsyscall's detour in marker mode: marker (entry), the real call through the
    trampoline, marker (exit), ret. Returns (code, the addresses its calls push, the one the
    real system call's call pushes)."""
    c = bytearray()
    returns = []
    c += b"\x50\xb8" + m_in.to_bytes(4, "little")        # push eax ; mov eax, M_ENTRY
    c += call_rel32(at + len(c), trampoline, wrap=True)   # call gwt (the entry stop)
    returns.append(at + len(c))
    c += b"\x58"                                          # pop eax (the system call's nr)
    c += call_rel32(at + len(c), trampoline, wrap=True)   # call gwt (the system call)
    real_ret = at + len(c)
    returns.append(real_ret)
    c += b"\x50\xb8" + m_out.to_bytes(4, "little")       # push eax ; mov eax, M_RET
    c += call_rel32(at + len(c), trampoline, wrap=True)   # call gwt (the exit stop)
    returns.append(at + len(c))
    c += b"\x58\xc3"                                      # pop eax ; ret
    return bytes(c), returns, real_ret


def gateway_stack_depth(mnemonics: list[tuple[int, str]], pc: int) -> int | None:
    """How many bytes __kernel_vsyscall has pushed when a thread's pc is at `pc`, from its
    instructions (address, mnemonic): it pushes ecx, edx, ebp and pops them back."""
    depth = 0
    for addr, mnemonic in mnemonics:
        if addr == pc:
            return depth
        if mnemonic == "push":
            depth += 4
        elif mnemonic == "pop":
            depth -= 4
    return None


class I386Arch(X86Arch):
    __slots__ = ()

    def thread_arch(self, regs: target.Regs) -> Arch:
        # a thread of a 32-bit x86 process that switched to the 64-bit code segment
        if regs["cs"] == USER_CS:
            from tracer.arch.x86_64 import X86_64
            return X86_64
        return self

    def jump(self, src: int, dst: int) -> bytes:
        return jmp_rel32(src, dst, wrap=True)

    def call(self, src: int, dst: int) -> bytes:
        return call_rel32(src, dst, wrap=True)

    def stub(self, nargs: int, marker: bool, tsc: bool) -> tuple[bytes, StubLayout, int, int]:
        return stub_i386(nargs, marker, tsc)

    def saved_context(self, read: ReadMem, at: int) -> bool:
        # struct sigcontext_32: ... ip, cs (u16) = __USER32_CS, __csh, flags, ...
        try:
            rest = read(at + 4, 8)
        except MemoryReadError:
            return False
        cs, flags = int.from_bytes(rest[:2], "little"), int.from_bytes(rest[4:], "little")
        return cs == USER32_CS and user_eflags(flags)

    def syscall_table(self) -> tuple[dict[int, str], dict[int, int]]:
        from tracer.tables import syscalls_i386 as t
        return t.NAMES, t.NARGS


# struct ucontext_ia32: uc_flags 4, uc_link 4, stack_ia32_t 12 -> uc_mcontext at 20;
# struct sigcontext_32: gs fs es ds di si bp sp bx dx cx ax trapno err ip -> ip at 56.
_UC_MCONTEXT_IP = 20 + 56
_COMPAT_SIGINFO = 128            # SI_MAX_SIZE, include/uapi/asm-generic/siginfo.h

I386 = I386Arch(
    name="i386", word=4, elf_class=1, elf_machine="EM_386", e_machine=3,
    audit_arch=0x40000003,
    regs=USER_REGS, regs_get=target.getregs, regs_set=target.setregs,
    pc="rip", sp="rsp", fp="rbp", retval="rax",
    arg_regs=(),
    # arch/x86/entry/entry_64_compat.S
    syscall_nr="orig_rax", syscall_nr_in="rax",
    syscall_arg_regs=("rbx", "rcx", "rdx", "rsi", "rdi", "rbp"), syscall_ret="rax",
    time_t="i", timespec="ii", timespec64="qq", timeval="ii", timezone="ii",
    uc_mcontext_ip=_UC_MCONTEXT_IP, sigcontext_ip=56,
    # sigcontext_32 has sp, bx, dx, cx, ax, trapno and err between sp and ip
    sigcontext_sp_back=28,
    rt_sigreturn_nr=173, sigreturn_nr=119,
    sigframe=SigFrameLayout(
        abi="i386", word=4, rt_ip=16 + _COMPAT_SIGINFO + _UC_MCONTEXT_IP,
        rt_sigreturn_nr=173, rt_sigreturn_sp_adjust=4,          # signal_32.c: regs->sp - 4
        plain_ip=8 + 56, sigreturn_nr=119, sigreturn_sp_adjust=8,  # regs->sp - 8
        rt_info=16, rt_uc=16 + _COMPAT_SIGINFO,
        # ia32_setup_rt_frame: eax = sig, edx = &frame->info, ecx = &frame->uc
        # ("make -mregparm=3 work"); ia32_setup_frame: eax = sig, edx = ecx = 0
        handler_regs=("rax", "rdx", "rcx"), args_in_frame=True),
    restorer_code=b"",
    # System V i386 psABI table 2.14: eax 0, ecx 1, edx 2, ebx 3, esp 4, ebp 5, esi 6, edi 7,
    # return address (eip) 8
    dwarf=DwarfRegs(("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi"),
                    nregs=9, sp=4, fp=5, ra=8),
    trap=INT3, trap_pc_adjust=1, nop=NOP, syscall_insn=INT80,
    jump_len=JMP_REL32_LEN, jump_reach=None,
    cycle_counter=RDTSC, host_counter_fn=b"",
    gettid_nr=224, tgkill_nr=270, nanosleep_nr=162,   # arch/x86/entry/syscalls/syscall_32.tbl
    vdso_prefixes=("__vdso_", "__kernel_"),
)
