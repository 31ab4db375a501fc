"""Kernel constants, each stated once with the header it comes from.

An unknown value renders as its number: use `name_of(Enum, value)`.
"""
from __future__ import annotations

from enum import IntEnum, IntFlag
from typing import TypeVar

__all__ = [
    "AuxType", "ClockId", "HwcapX86", "Hwcap2X86", "name_of", "clock_name", "CPUCLOCK_NAMES",
    "MAX_CLOCKS",
]


class AuxType(IntEnum):  # include/uapi/linux/auxvec.h, arch/x86/include/uapi/asm/auxvec.h
    AT_NULL = 0
    AT_IGNORE = 1
    AT_EXECFD = 2
    AT_PHDR = 3
    AT_PHENT = 4
    AT_PHNUM = 5
    AT_PAGESZ = 6
    AT_BASE = 7
    AT_FLAGS = 8
    AT_ENTRY = 9
    AT_NOTELF = 10
    AT_UID = 11
    AT_EUID = 12
    AT_GID = 13
    AT_EGID = 14
    AT_PLATFORM = 15
    AT_HWCAP = 16
    AT_CLKTCK = 17
    AT_FPUCW = 18        # arch/sh: FPU control word
    AT_DCACHEBSIZE = 19  # arch/powerpc/include/uapi/asm/auxvec.h: cache block sizes
    AT_ICACHEBSIZE = 20
    AT_UCACHEBSIZE = 21
    AT_IGNOREPPC = 22
    AT_SECURE = 23
    AT_BASE_PLATFORM = 24
    AT_RANDOM = 25
    AT_HWCAP2 = 26
    AT_RSEQ_FEATURE_SIZE = 27
    AT_RSEQ_ALIGN = 28
    AT_HWCAP3 = 29
    AT_HWCAP4 = 30
    AT_EXECFN = 31
    AT_SYSINFO = 32  # arch/x86/include/uapi/asm/auxvec.h (i386 only)
    AT_SYSINFO_EHDR = 33
    # arch/powerpc/include/uapi/asm/auxvec.h: cache geometry (also used by other arches)
    AT_L1I_CACHESHAPE = 34
    AT_L1D_CACHESHAPE = 35
    AT_L2_CACHESHAPE = 36
    AT_L3_CACHESHAPE = 37
    AT_L1I_CACHESIZE = 40
    AT_L1I_CACHEGEOMETRY = 41
    AT_L1D_CACHESIZE = 42
    AT_L1D_CACHEGEOMETRY = 43
    AT_L2_CACHESIZE = 44
    AT_L2_CACHEGEOMETRY = 45
    AT_L3_CACHESIZE = 46
    AT_L3_CACHEGEOMETRY = 47
    AT_ADI_BLKSZ = 48    # arch/sparc/include/uapi/asm/auxvec.h: Application Data Integrity
    AT_ADI_NBITS = 49
    AT_ADI_UEONDEMAND = 50
    AT_MINSIGSTKSZ = 51  # include/uapi/linux/auxvec.h (x86, arm64)


class HwcapX86(IntFlag):  # arch/x86/include/asm/cpufeatures.h word 0 = CPUID leaf 1 EDX
    FPU = 1 << 0
    VME = 1 << 1
    DE = 1 << 2
    PSE = 1 << 3
    TSC = 1 << 4
    MSR = 1 << 5
    PAE = 1 << 6
    MCE = 1 << 7
    CX8 = 1 << 8
    APIC = 1 << 9
    SEP = 1 << 11
    MTRR = 1 << 12
    PGE = 1 << 13
    MCA = 1 << 14
    CMOV = 1 << 15
    PAT = 1 << 16
    PSE36 = 1 << 17
    PN = 1 << 18
    CLFLUSH = 1 << 19
    DS = 1 << 21
    ACPI = 1 << 22
    MMX = 1 << 23
    FXSR = 1 << 24
    SSE = 1 << 25
    SSE2 = 1 << 26
    SS = 1 << 27
    HT = 1 << 28
    TM = 1 << 29
    IA64 = 1 << 30
    PBE = 1 << 31


class Hwcap2X86(IntFlag):  # arch/x86/include/uapi/asm/hwcap2.h
    RING3MWAIT = 1 << 0
    FSGSBASE = 1 << 1


class ClockId(IntEnum):  # include/uapi/linux/time.h
    CLOCK_REALTIME = 0
    CLOCK_MONOTONIC = 1
    CLOCK_PROCESS_CPUTIME_ID = 2
    CLOCK_THREAD_CPUTIME_ID = 3
    CLOCK_MONOTONIC_RAW = 4
    CLOCK_REALTIME_COARSE = 5
    CLOCK_MONOTONIC_COARSE = 6
    CLOCK_BOOTTIME = 7
    CLOCK_REALTIME_ALARM = 8
    CLOCK_BOOTTIME_ALARM = 9
    CLOCK_SGI_CYCLE = 10
    CLOCK_TAI = 11


MAX_CLOCKS = 16  # include/uapi/linux/time.h

# include/linux/posix-timers_types.h: a negative clock id is a CPU clock,
# ~pid << 3 | flags; bit 2 (CPUCLOCK_PERTHREAD_MASK) is per thread; 3 is a dynamic (fd) clock.
CPUCLOCK_NAMES = ("PROF", "VIRT", "SCHED")
_CPUCLOCK_PERTHREAD = 4
_CPUCLOCK_CLOCK_MASK = 3
_CLOCKFD = 3

E = TypeVar("E", bound=IntEnum)


def name_of(enum: type[E], value: int) -> str | int:
    """The constant's name, or the bare number when the kernel defines none."""
    try:
        return enum(value).name
    except ValueError:
        return value


_CLOCK_NAMES: dict[int, str | int] = {}


def clock_name(clockid: int) -> str | int:
    """Name a clockid_t as strace does, including CPU clocks from clock_getcpuclockid()."""
    hit = _CLOCK_NAMES.get(clockid)
    if hit is None:
        if len(_CLOCK_NAMES) > 4096:
            _CLOCK_NAMES.clear()
        hit = _CLOCK_NAMES[clockid] = _clock_name(clockid)
    return hit


def _clock_name(clockid: int) -> str | int:
    if clockid >= 0:
        return name_of(ClockId, clockid)
    kind = clockid & _CPUCLOCK_CLOCK_MASK
    if kind == _CLOCKFD:
        return f"FD_TO_CLOCKID({(~clockid) >> 3})"
    owner = "tid" if clockid & _CPUCLOCK_PERTHREAD else "pid"
    return f"CPUCLOCK({owner} {(~clockid) >> 3}, {CPUCLOCK_NAMES[kind]})"
