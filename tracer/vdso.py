"""The vDSO image, parsed from bytes with pyelftools (one of its doors, with objfile.py and
cfi.py: no other module imports elftools). Nothing here touches a process: the image comes
from ptrace or a file.

Names: `image_offset` is an offset from the image's first byte (what `objdump -T` prints, since
the vDSO is linked at 0); `runtime_addr` = base + image_offset.
"""
from __future__ import annotations

import io
import struct
from dataclasses import dataclass, field
from typing import Any

from elftools.common.exceptions import ELFError as _PyElfError
from elftools.common.exceptions import ELFParseError as _PyElfParseError
from elftools.construct import ConstructError as _PyConstructError
from elftools.elf.dynamic import DynamicSection
from elftools.elf.elffile import ELFFile
from elftools.elf.gnuversions import GNUVerDefSection, GNUVerSymSection
from elftools.elf.sections import SymbolTableSection
from elftools.elf.segments import NoteSegment

from tracer import arch
from tracer.abi import Abi
from tracer.errors import VdsoError

__all__ = ["VdsoSymbol", "VdsoFunction", "VdsoImage", "parse_image", "plain_name",
           "SIGRETURN_TRAMPOLINES", "GATEWAY_SYMBOL", "MAX_IMAGE"]

MAX_IMAGE = 1 << 20          # a vDSO is a few pages; refuse anything absurd before parsing
GATEWAY_SYMBOL = "__kernel_vsyscall"
SIGRETURN_TRAMPOLINES = frozenset({"__kernel_sigreturn", "__kernel_rt_sigreturn"})
_VDSO_PREFIX = "__vdso_"
_KERNEL_PREFIX = "__kernel_"
# __kernel_* entries that are not a C library function of the same plain name
_KERNEL_ENTRIES = frozenset({GATEWAY_SYMBOL, *SIGRETURN_TRAMPOLINES})
# include/uapi/linux/elf.h / include/linux/elfnote.h
_NT_GNU_BUILD_ID = 3
_LINUX_NOTE_VERSION = 0      # LINUX_VERSION_CODE, 4 bytes
_LINUX_NOTE_BUILD_SALT = 0x100
_MAX_VERSIONS = 64           # a vDSO defines its file name and one or two versions (LINUX_2.6)
# Errors pyelftools (and the struct/construct layers under it) raise on malformed input.
# pyelftools lets construct's errors through where it parses strings itself (note names).
_FOREIGN = (_PyElfError, _PyElfParseError, _PyConstructError, struct.error, ValueError,
            IndexError, KeyError, UnicodeDecodeError, TypeError, AttributeError, AssertionError,
            OverflowError)


def plain_name(symbol: str) -> str:
    """`__vdso_clock_gettime` (x86) and `__kernel_clock_gettime` (arm64) -> `clock_gettime`;
    i386's gateway and the signal trampolines keep their `__kernel_*` names."""
    if symbol.startswith(_VDSO_PREFIX):
        return symbol[len(_VDSO_PREFIX):]
    if symbol.startswith(_KERNEL_PREFIX) and symbol not in _KERNEL_ENTRIES:
        return symbol[len(_KERNEL_PREFIX):]
    return symbol


@dataclass(frozen=True, slots=True)
class VdsoSymbol:
    name: str
    version: str | None
    value: int           # image_offset
    size: int
    bind: str            # GLOBAL, WEAK, LOCAL
    type: str            # FUNC, OBJECT, NOTYPE


@dataclass(frozen=True, slots=True)
class VdsoFunction:
    """One entry point: every exported name at one address folded together."""
    image_offset: int
    size: int
    symbol: str                  # the global exported name (`__vdso_clock_gettime`)
    plain: str                   # `clock_gettime`
    aliases: tuple[str, ...]     # every dynsym name at this address
    version: str | None


@dataclass(frozen=True, slots=True)
class VdsoImage:
    data: bytes
    abi: Abi
    symbols: tuple[VdsoSymbol, ...]
    functions: tuple[VdsoFunction, ...]
    build_id: str | None
    linux_version: str | None
    image_size: int                      # bytes the ELF file covers (headers, sections)
    text: tuple[int, int]                # .text image_offset range [start, end)
    soname: str | None
    eh_frame: tuple[int, int] | None     # image_offset range of .eh_frame
    by_name: dict[str, VdsoFunction] = field(default_factory=dict, compare=False)

    def function(self, name: str) -> VdsoFunction | None:
        """By plain name, global symbol or alias."""
        return self.by_name.get(name)

    def function_at(self, image_offset: int) -> VdsoFunction | None:
        for f in self.functions:
            if f.image_offset <= image_offset < f.image_offset + max(f.size, 1):
                return f
        return None

    def symbolize(self, image_offset: int) -> tuple[str, int] | None:
        f = self.function_at(image_offset)
        return (f.symbol, image_offset - f.image_offset) if f else None


def _versions(elf: ELFFile) -> dict[int, str]:
    vd = elf.get_section_by_name(".gnu.version_d")
    out: dict[int, str] = {}
    if not isinstance(vd, GNUVerDefSection):
        return out
    # sh_info is the number of definitions: pyelftools walks that many, and each one's vd_cnt
    # auxiliaries, whatever the section holds.
    if vd["sh_info"] > _MAX_VERSIONS:
        raise VdsoError(f"{vd['sh_info']} version definitions: corrupt image")
    for verdef, aux in vd.iter_versions():
        first = next(iter(aux), None)     # the version's own name; the rest name its parents
        if first is not None and not verdef["vd_flags"] & 1:  # VER_FLG_BASE names the file
            out[verdef["vd_ndx"]] = first.name
    return out


def _soname(elf: ELFFile) -> str | None:
    dyn = elf.get_section_by_name(".dynamic")
    if not isinstance(dyn, DynamicSection):
        return None
    for tag in dyn.iter_tags():
        if tag.entry.d_tag == "DT_SONAME":
            return str(getattr(tag, "soname", ""))  # set by pyelftools for DT_SONAME
    return None


def _notes(elf: ELFFile) -> tuple[str | None, str | None]:
    build_id = version = None
    for seg in elf.iter_segments():
        if not isinstance(seg, NoteSegment):
            continue
        for note in seg.iter_notes():
            name = note["n_name"]
            ntype: Any = note["n_type"]        # a name for known types, else the number
            if name == "GNU" and ntype in ("NT_GNU_BUILD_ID", _NT_GNU_BUILD_ID):
                desc = note["n_desc"]
                build_id = desc if isinstance(desc, str) else bytes(desc).hex()
            elif name == "Linux" and ntype == _LINUX_NOTE_VERSION and note["n_descsz"] == 4:
                raw = note["n_desc"]
                code = int.from_bytes(raw if isinstance(raw, bytes) else raw.encode("latin-1"),
                                      "little")
                version = f"{code >> 16}.{(code >> 8) & 0xFF}.{code & 0xFF}"
    return build_id, version


def _validate_headers(data: bytes) -> Abi:
    if len(data) < 52 or data[:4] != b"\x7fELF":
        raise VdsoError("not an ELF image (no \\x7fELF magic): give a vDSO dumped with "
                        "`vdsotrace dump`")
    if len(data) > MAX_IMAGE:
        raise VdsoError(f"{len(data)} bytes is far larger than any vDSO: not a vDSO image")
    cls, endian = data[4], data[5]
    if cls not in (1, 2):
        raise VdsoError(f"bad ELF class {cls}: not a vDSO image")
    if endian != 1:
        raise VdsoError("a big-endian ELF image: vdsotrace reads little-endian vDSOs only "
                        "(x86_64, i386, aarch64)")
    # e_machine decides the architecture, with the class (tracer.arch's registry): an aarch64
    # image is 64-bit like an x86_64 one, the class alone would parse it as x86.
    try:
        abi = arch.for_elf(int.from_bytes(data[18:20], "little"), cls)
    except arch.UnsupportedArch as e:
        raise VdsoError(f"{e}: not a vDSO vdsotrace can read") from None
    return abi


def _check_bounds(elf: ELFFile, size: int) -> None:
    """Refuse headers that point outside the bytes, so pyelftools never loops on garbage."""
    if elf.num_sections() > 256 or elf.num_segments() > 64:
        raise VdsoError("implausible section or segment count: not a vDSO image")
    for sec in elf.iter_sections():
        if sec["sh_type"] != "SHT_NOBITS" and sec["sh_offset"] + sec["sh_size"] > size:
            raise VdsoError(f"section {sec.name or '?'} runs past the end of the image "
                            "(truncated?)")
        if sec["sh_type"] in ("SHT_DYNSYM", "SHT_SYMTAB") and sec["sh_entsize"] == 0:
            raise VdsoError("a symbol table with entry size 0: corrupt image")
    for seg in elf.iter_segments():
        if seg["p_type"] == "PT_NOTE" and seg["p_offset"] + seg["p_filesz"] > size:
            raise VdsoError("a note segment runs past the end of the image (truncated?)")


_PARSED: dict[bytes, VdsoImage] = {}   # every process of a machine maps the same few images


def parse_image(data: bytes) -> VdsoImage:
    """Parse a vDSO image from bytes (once per distinct image: the tracer parses it again
    while the tracee is stopped, where tens of milliseconds count). Raises VdsoError for
    anything that is not one."""
    data = bytes(data)
    hit = _PARSED.get(data)
    if hit is None:
        hit = _parse_image(data)
        if len(_PARSED) >= 8:
            _PARSED.clear()
        _PARSED[data] = hit
    return hit


def _parse_image(data: bytes) -> VdsoImage:
    abi = _validate_headers(data)
    try:
        elf = ELFFile(io.BytesIO(data))
        if elf.header["e_type"] != "ET_DYN":
            raise VdsoError(f"ELF type {elf.header['e_type']}, not a shared object: not a vDSO")
        if elf.header["e_machine"] != abi.elf_machine:
            raise VdsoError(f"machine {elf.header['e_machine']} is not supported")
        _check_bounds(elf, len(data))
        dynsym = elf.get_section_by_name(".dynsym")
        if not isinstance(dynsym, SymbolTableSection):
            raise VdsoError("no .dynsym: not a vDSO image (a vDSO exports its functions)")
        versym = elf.get_section_by_name(".gnu.version")
        if not isinstance(versym, GNUVerSymSection):
            versym = None
        versions = _versions(elf)
        symbols = []
        for i, sym in enumerate(dynsym.iter_symbols()):
            if i == 0 or not sym.name:
                continue
            ndx = versym.get_symbol(i)["ndx"] if versym is not None else None
            ver = versions.get(ndx & 0x7FFF) if isinstance(ndx, int) else None
            symbols.append(VdsoSymbol(sym.name, ver, sym["st_value"], sym["st_size"],
                                      sym["st_info"]["bind"].removeprefix("STB_"),
                                      sym["st_info"]["type"].removeprefix("STT_")))
        build_id, linux_version = _notes(elf)
        text = elf.get_section_by_name(".text")
        text_range = (text["sh_addr"], text["sh_addr"] + text["sh_size"]) if text else (0, 0)
        ehf = elf.get_section_by_name(".eh_frame")
        eh = (ehf["sh_offset"], ehf["sh_offset"] + ehf["sh_size"]) if ehf else None
        end = elf.header["e_shoff"] + elf.header["e_shnum"] * elf.header["e_shentsize"]
        for seg in elf.iter_segments():
            end = max(end, seg["p_offset"] + seg["p_filesz"])
        soname = _soname(elf)
    except _FOREIGN as e:
        raise VdsoError(f"corrupt ELF image: {e}") from e
    # Every vDSO names its entries __vdso_* (x86, riscv, ...) or __kernel_* (i386's gateway
    # and trampolines, arm64, powerpc, s390); a program or library exports neither.
    if not any(s.type == "FUNC" and s.name.startswith((_VDSO_PREFIX, "__kernel_"))
               for s in symbols):
        raise VdsoError("the image exports no __vdso_* or __kernel_* function: not a vDSO "
                        "image (give one written by `vdsotrace dump`)")
    functions = _fold(symbols)
    by_name: dict[str, VdsoFunction] = {}
    for f in functions:
        for n in (*f.aliases, f.plain):
            by_name.setdefault(n, f)
    return VdsoImage(data, abi, tuple(symbols), functions, build_id, linux_version,
                     min(end, len(data)), text_range, soname, eh, by_name)


def _fold(symbols: list[VdsoSymbol]) -> tuple[VdsoFunction, ...]:
    """Group FUNC symbols by address; the global (non-weak) name is the symbol. A sized
    NOTYPE `__kernel_*` entry is code too: arm64's __kernel_rt_sigreturn is an assembly ENTRY
    without a type (arch/arm64/kernel/vdso/sigreturn.S)."""
    groups: dict[int, list[VdsoSymbol]] = {}
    for s in symbols:
        if s.type == "FUNC" or (s.type == "NOTYPE" and s.size > 0
                                and s.name.startswith("__kernel_")):
            groups.setdefault(s.value, []).append(s)
    out = []
    for addr in sorted(groups):
        syms = groups[addr]
        glob = sorted(syms, key=lambda s: (s.bind != "GLOBAL", not s.name.startswith("__"),
                                           s.name))[0]
        out.append(VdsoFunction(addr, max(s.size for s in syms), glob.name,
                                plain_name(glob.name), tuple(sorted(s.name for s in syms)),
                                glob.version))
    return tuple(out)


