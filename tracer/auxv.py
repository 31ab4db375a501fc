"""The auxiliary vector: bytes -> (type, value) pairs -> named, decoded entries.

Layout (fs/binfmt_elf.c create_elf_tables): the initial stack holds argc, argv[argc], NULL,
envp[], NULL, then the auxv as (type, value) word pairs ending with AT_NULL. /proc/PID/auxv is
the kernel's saved copy of the same pairs (mm->saved_auxv), in the tracee's word size.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import IntFlag

from tracer.abi import Abi
from tracer.consts import AuxType, Hwcap2X86, HwcapX86
from tracer.errors import AuxvError, MemoryReadError

__all__ = ["AuxvEntry", "parse_auxv", "decode", "aux_name", "auxv_from_stack", "find",
           "MAX_ENTRIES"]

MAX_ENTRIES = 128  # the kernel's AT_VECTOR_SIZE is well below this
_MAX_STACK_WORDS = 1 << 20  # argv + envp bound when walking an untrusted stack

ReadFn = Callable[[int, int], bytes]


@dataclass(frozen=True, slots=True)
class AuxvEntry:
    type: int
    name: str
    value: int
    text: str


def aux_name(t: int) -> str:
    try:
        return AuxType(t).name
    except ValueError:
        return f"AT_{t}"


def parse_auxv(data: bytes, word: int) -> list[tuple[int, int]]:
    """Word pairs up to AT_NULL (excluded). Raises AuxvError on a truncated vector."""
    if word not in (4, 8):
        raise AuxvError(f"bad word size {word}")
    pairs: list[tuple[int, int]] = []
    step = 2 * word
    for off in range(0, len(data) - step + 1, step):
        t = int.from_bytes(data[off:off + word], "little")
        v = int.from_bytes(data[off + word:off + step], "little")
        if t == AuxType.AT_NULL:
            return pairs
        pairs.append((t, v))
        if len(pairs) > MAX_ENTRIES:
            break
    raise AuxvError("the auxiliary vector has no AT_NULL terminator: truncated or corrupt")


def _hwcap_tables(abi: Abi | None) -> tuple[type[IntFlag] | None, type[IntFlag] | None]:
    """AT_HWCAP and AT_HWCAP2 flag tables of the traced process's machine (its arch, from its
    ELF header or registers), never the tracer's: each architecture numbers its own bits."""
    if abi is None:
        return HwcapX86, Hwcap2X86       # x86_64 and i386 (AT_HWCAP is CPUID.1:EDX on both)
    return abi.hwcap_names()


def _flags(value: int, flag_enum: type[IntFlag] | None) -> str:
    if flag_enum is None:
        return f"{value:#x}"
    names = [f.name or "" for f in flag_enum if value & f.value]
    rest = value & ~sum(f.value for f in flag_enum)
    if rest:
        names.append(f"{rest:#x}")
    return " | ".join(names) if names else "0"


def _cstring(read: ReadFn, addr: int, limit: int = 4096) -> str:
    out = bytearray()
    while len(out) < limit:
        # read up to the end of the page, so a short string near a boundary still reads
        chunk_len = min(256, 4096 - ((addr + len(out)) & 4095))
        chunk = read(addr + len(out), chunk_len)
        nul = chunk.find(b"\0")
        if nul >= 0:
            out += chunk[:nul]
            break
        out += chunk
    # as the bytes were (an invalid byte a lone surrogate): escaped on output
    return out.decode("utf-8", "surrogateescape")


_ADDRESS_TYPES = {AuxType.AT_PHDR, AuxType.AT_BASE, AuxType.AT_ENTRY, AuxType.AT_SYSINFO,
                  AuxType.AT_SYSINFO_EHDR, AuxType.AT_FLAGS}
_STRING_TYPES = {AuxType.AT_PLATFORM, AuxType.AT_BASE_PLATFORM, AuxType.AT_EXECFN}


def _text(t: int, v: int, read: ReadFn | None, abi: Abi | None) -> str:
    if t in _STRING_TYPES:
        if read is not None:
            try:
                return _cstring(read, v)
            except MemoryReadError:
                pass
        return f"{v:#x}"
    if t == AuxType.AT_RANDOM:
        if read is not None:
            try:
                return read(v, 16).hex(" ")
            except MemoryReadError:
                pass
        return f"{v:#x}"
    if t == AuxType.AT_HWCAP:
        return _flags(v, _hwcap_tables(abi)[0])
    if t == AuxType.AT_HWCAP2:
        return _flags(v, _hwcap_tables(abi)[1])
    if t in _ADDRESS_TYPES:
        return f"{v:#x}"
    if t in AuxType._value2member_map_:
        return str(v)
    return f"{v:#x}"


def decode(pairs: list[tuple[int, int]], read: ReadFn | None = None,
           abi: Abi | None = None) -> list[AuxvEntry]:
    """Name and decode each pair; `read` reads tracee memory for strings and AT_RANDOM; `abi`
    is the process's (its AT_HWCAP/AT_HWCAP2 flag names; x86's when not given)."""
    return [AuxvEntry(t, aux_name(t), v, _text(t, v, read, abi)) for t, v in pairs]


def auxv_from_stack(read: ReadFn, start_stack: int, word: int) -> list[tuple[int, int]]:
    """Walk argc, argv, envp on the initial stack to the auxv (fs/binfmt_elf.c)."""
    def w(addr: int) -> int:
        return int.from_bytes(read(addr, word), "little")

    argc = w(start_stack)
    if argc > _MAX_STACK_WORDS:
        raise AuxvError(f"implausible argc {argc} at the stack's start")
    p = start_stack + word * (argc + 2)  # past argc, argv[], NULL
    for _ in range(_MAX_STACK_WORDS):
        if w(p) == 0:
            break
        p += word
    else:
        raise AuxvError("no end of envp on the initial stack")
    p += word
    data = _read_pairs(read, p, word)
    return parse_auxv(data, word)


def _read_pairs(read: ReadFn, addr: int, word: int) -> bytes:
    out = bytearray()
    step = 2 * word
    while len(out) < step * (MAX_ENTRIES + 1):
        pair = read(addr + len(out), step)
        out += pair
        if int.from_bytes(pair[:word], "little") == AuxType.AT_NULL:
            break
    return bytes(out)


def find(pairs: list[tuple[int, int]], t: int) -> int | None:
    for k, v in pairs:
        if k == t:
            return v
    return None
