"""What the tracer needs to know about one CPU architecture and ABI: the `Arch` interface.

One module per ISA/ABI (x86_64.py, i386.py, aarch64.py) builds one instance of an `Arch`
subclass; tracer.arch's registry maps an ELF machine (and a stopped thread) to it. The tracer
names registers and instructions only through it.

An arch module provides:

* data (constructor fields): identity (name, word size, ELF class and machine), the register
  file (`regs`: the layout of the buffer its `getregs`/`setregs` fill, and the names of pc,
  sp, fp, return value, function and system call argument registers), C type formats, signal
  frame offsets, DWARF register numbers, instruction bytes (trap, nop, system call, the
  cycle counter read, the C library's sigreturn restorer), jump length and reach, system call
  numbers the tracer itself makes, vDSO symbol prefixes and the seccomp audit arch;
* behaviour (methods to override): `jump`/`call` encodings, `thread_arch` (a stopped
  thread's ABI from its registers), `saved_context` (is a stack word a signal frame's saved
  pc), `stub` (the call-through stub of breakpoints.py), `syscall_table`, `hwcap_names`.

A new arch (aarch64.py): subclass `Arch`, override the methods that raise NotImplementedError
(no_restart, emulate_cycle_counter, return_address, jump, call, stub, syscall_table) and those
whose default does not fit (thread_arch, saved_context, hwcap_names), build one instance with
every field set (`regs` = the NT_PRSTATUS layout, `regs_get`/`regs_set` = target's regset
accessor for it), and name it `AARCH64`: the registry loads tracer.arch.aarch64 on first use
for EM_AARCH64 (tracer/arch/__init__.py, `_LAZY`). tests/test_arch.py checks the interface is
filled for every arch the registry knows.

Hot path: `regs_get`/`regs_set` are plain functions stored in the instance and `PC`, `SP`,
... are precomputed buffer indexes, so `arch.regs_get(tid, regs); regs.buf[arch.PC]` costs an
attribute load more than a module-level call, no extra Python frame.
"""
from __future__ import annotations

import ctypes
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntFlag
from typing import TYPE_CHECKING

from tracer.errors import TracerError

if TYPE_CHECKING:
    from tracer.target import Regs

__all__ = ["Arch", "RegLayout", "StubLayout", "SigFrameLayout", "DwarfRegs", "ReadMem",
           "UnsupportedArch"]

ReadMem = Callable[[int, int], bytes]


class UnsupportedArch(TracerError):
    """An ELF machine or thread state no arch module describes."""


@dataclass(frozen=True, slots=True)
class RegLayout:
    """A register buffer: 64-bit slots named in the order the kernel's regset lays them out."""
    names: tuple[str, ...]
    index: dict[str, int] = field(init=False, compare=False)
    array: type[ctypes.Array[ctypes.c_uint64]] = field(init=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "index", {n: i for i, n in enumerate(self.names)})
        object.__setattr__(self, "array", ctypes.c_uint64 * len(self.names))


@dataclass(frozen=True, slots=True)
class StubLayout:
    """What a call-through stub left on the stack at its stop: one struct unpacked from sp."""
    struct: struct.Struct
    retaddr: int                 # byte offset of the caller's return address (= sp at entry)
    i_t1: int                    # indexes into the unpacked tuple
    i_ret: int
    i_t0: int
    i_retaddr: int
    i_args: tuple[int, ...]

    @property
    def size(self) -> int:
        return self.struct.size


@dataclass(frozen=True, slots=True)
class SigFrameLayout:
    """One ABI's signal frames: offsets from the frame's start (the handler's sp at entry)."""
    abi: str
    word: int
    rt_ip: int                   # saved ip: uc + uc_mcontext + sigcontext ip
    rt_sigreturn_nr: int
    rt_sigreturn_sp_adjust: int  # frame = sp - this at the entry of rt_sigreturn
    plain_ip: int | None         # non-rt frame (i386 only)
    sigreturn_nr: int | None
    sigreturn_sp_adjust: int | None
    rt_info: int                 # offsets of &info and &uc from the frame
    rt_uc: int
    # the handler's arguments at its first instruction: (signo, &info, &uc) registers
    handler_regs: tuple[str, str, str]
    # True: the frame itself holds signo and the &info/&uc pointers (i386's rt_sigframe_ia32,
    # whose plain frames have none); False: only the registers do (x86_64, arm64)
    args_in_frame: bool


@dataclass(frozen=True, slots=True)
class DwarfRegs:
    """DWARF register numbers: the general registers (by name, in number order), the return
    address column, and the sp and fp numbers."""
    names: tuple[str, ...]
    nregs: int                   # registers tracked: the general ones and the return address
    sp: int
    fp: int
    ra: int


@dataclass(frozen=True, slots=True, eq=False)
class Arch:
    # ---- identity
    name: str
    word: int                       # bytes in a pointer / long
    elf_class: int                  # e_ident[EI_CLASS]
    elf_machine: str                # pyelftools' e_machine name
    e_machine: int                  # its number (include/uapi/linux/elf-em.h)
    audit_arch: int                 # AUDIT_ARCH_* (include/uapi/linux/audit.h), seccomp_data.arch
    # ---- registers (names of `regs`)
    regs: RegLayout
    regs_get: Callable[[int, Regs], None]
    regs_set: Callable[[int, Regs], None]
    pc: str
    sp: str
    fp: str
    retval: str
    arg_regs: tuple[str, ...]       # function arguments in registers; empty for cdecl (stack)
    syscall_nr: str                 # at a stop: the system call number the kernel runs
    syscall_nr_in: str              # where a program puts the number before the instruction
    syscall_arg_regs: tuple[str, ...]
    syscall_ret: str
    # ---- C types (struct formats)
    time_t: str
    timespec: str
    timespec64: str                 # struct __kernel_timespec
    timeval: str
    timezone: str
    # ---- signal frames
    uc_mcontext_ip: int             # offset of the saved ip inside struct ucontext
    sigcontext_ip: int              # offset of ip inside struct sigcontext
    sigcontext_sp_back: int         # saved ip's offset minus saved sp's, in sigcontext
    rt_sigreturn_nr: int
    sigreturn_nr: int | None
    sigframe: SigFrameLayout
    restorer_code: bytes            # the C library's restorer (no symbol of its own); b"" none
    # ---- unwinding
    dwarf: DwarfRegs
    # ---- instructions
    trap: bytes                     # the breakpoint instruction
    trap_pc_adjust: int             # pc at its SIGTRAP stop minus its address
    nop: bytes
    syscall_insn: bytes             # the system call instruction (remote calls, fallbacks)
    jump_len: int                   # bytes of the direct jump that detours an entry
    jump_reach: int | None          # how far it reaches either way; None: everywhere
    cycle_counter: bytes            # the instruction that reads the cycle counter; b"" none
    host_counter_fn: bytes          # a host function returning that counter (tsc.py)
    # ---- system calls the tracer makes itself
    gettid_nr: int
    tgkill_nr: int
    nanosleep_nr: int
    # ---- the vDSO
    vdso_prefixes: tuple[str, ...]  # exported function names start with one of these
    # ---- precomputed buffer indexes (hot path)
    PC: int = field(init=False)
    SP: int = field(init=False)
    RET: int = field(init=False)
    SYSNR: int = field(init=False)
    SYSNR_IN: int = field(init=False)
    ARGS: tuple[int, ...] = field(init=False)
    SYSARGS: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        ix = self.regs.index
        object.__setattr__(self, "PC", ix[self.pc])
        object.__setattr__(self, "SP", ix[self.sp])
        object.__setattr__(self, "RET", ix[self.retval])
        object.__setattr__(self, "SYSNR", ix[self.syscall_nr])
        object.__setattr__(self, "SYSNR_IN", ix[self.syscall_nr_in])
        object.__setattr__(self, "ARGS", tuple(ix[r] for r in self.arg_regs))
        object.__setattr__(self, "SYSARGS", tuple(ix[r] for r in self.syscall_arg_regs))

    def __repr__(self) -> str:
        return f"<Arch {self.name}>"

    # ---- words
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

    @property
    def dwarf_regs(self) -> tuple[str, ...]:
        """Registers in DWARF number order, by name."""
        return self.dwarf.names

    # ---- registers
    def new_regs(self) -> Regs:
        from tracer.target import Regs
        return Regs(self.regs)

    def trap_addr(self, pc: int) -> int:
        """The trap instruction's address from the pc of its SIGTRAP stop."""
        return pc - self.trap_pc_adjust

    def no_restart(self, regs: Regs) -> None:
        """Make the kernel not restart an interrupted system call when `regs` are set."""
        raise NotImplementedError

    def no_syscall(self, tid: int, regs: Regs) -> None:
        """A thread stopped at a system call's entry (or interrupted in one): make the kernel
        run (or restart) no system call when it resumes; `regs` are written after this. Where
        that is in the register buffer (x86: orig_rax), `no_restart`."""
        self.no_restart(regs)

    def emulate_cycle_counter(self, regs: Regs, value: int) -> None:
        """Give a thread stopped at a faulting `cycle_counter` instruction the reading `value`
        and move its pc past the instruction (it must be in `regs`' pc)."""
        raise NotImplementedError

    def return_address(self, regs: Regs, read: ReadMem) -> int:
        """At a function's first instruction: where it returns to (x86: the word at sp)."""
        raise NotImplementedError

    def thread_arch(self, regs: Regs) -> Arch:
        """The ABI a stopped thread of a process of this arch runs in (a 64-bit x86 process
        may run 32-bit code); `self` unless the registers say otherwise."""
        return self

    # ---- encodings
    def jump(self, src: int, dst: int) -> bytes:
        """A direct jump at `src` to `dst` (`jump_len` bytes); ValueError out of reach."""
        raise NotImplementedError

    def call(self, src: int, dst: int) -> bytes:
        """A direct call at `src` to `dst`; ValueError out of reach."""
        raise NotImplementedError

    def fill(self, n: int) -> bytes:
        """`n` bytes that trap if executed (between and after patched instructions)."""
        k = len(self.trap)
        return self.trap * (n // k) + self.trap[:n % k]

    def stub(self, nargs: int, marker: bool, tsc: bool) -> tuple[bytes, StubLayout, int, int]:
        """breakpoints.py's call-through stub: (code, what it leaves on the stack at its stop,
        offset of the stop, offset of the call to the relocated body)."""
        raise NotImplementedError

    def counter_may_fault(self) -> bool:
        """Can a thread be made to fault on `cycle_counter` (x86: prctl PR_SET_TSC), so that
        tsc.tsc_usable must probe each thread before stubs read it?"""
        return True

    def marker_stops(self) -> str | None:
        """None when seccomp.py's marker stops are written for this arch; else why not (the
        stop-based engine then stops on `trap`, and says so in a notice)."""
        return None

    # ---- signal frames
    def saved_context(self, read: ReadMem, at: int) -> bool:
        """Is the word at `at` the ip of a saved signal context (told by the words around it)?"""
        return False

    # ---- tables
    def syscall_table(self) -> tuple[dict[int, str], dict[int, int]]:
        """System call names and argument counts by number."""
        raise NotImplementedError

    def syscall_number(self, name: str) -> int:
        """A system call's number by name (KeyError: this arch has none of that name)."""
        names, _ = self.syscall_table()
        for nr, n in names.items():
            if n == name:
                return nr
        raise KeyError(f"no system call {name!r} on {self.name}")

    def hwcap_names(self) -> tuple[type[IntFlag] | None, type[IntFlag] | None]:
        """The flag enums naming AT_HWCAP and AT_HWCAP2 bits (None: no names)."""
        return None, None
