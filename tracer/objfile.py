"""Object files mapped into a tracee: symbols, call-frame information, load bias.

An `ObjectFile` is one ELF image (a file on disk, or the vDSO image read over ptrace):
its function and object symbols for `symbolize`, and its CFI (`.eh_frame`, found through
`.eh_frame_hdr`, and `.debug_frame` if present) decoded lazily, one FDE at a time, into
row tables that `tracer.unwind` executes. Addresses inside an object are in its own
`p_vaddr` space ("vaddr"); runtime addresses are vaddr + load bias.

A `ModuleMap` is a snapshot of /proc/PID/maps that maps runtime addresses to objects and
names them the way strace -k and perf do: `libc.so.6+0x1234` (vaddr, which for shared
objects is the offset from the load base) and `libc.so.6!clock_gettime+0x39`.

Symbol names are demangled where they are named (`locate`): C++ (Itanium, `_Z`) and Rust
(legacy `_ZN...17h<hash>E` and v0 `_R`), as gdb, perf and `c++filt` print them.

This module and tracer/vdso.py are the only ones that import elftools; this one alone
imports multi_demangle.
"""
from __future__ import annotations

import bisect
import functools
import hashlib
import io
import os
import struct
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import IO, Any, Final

from elftools.common.exceptions import DWARFError, ELFError, ELFParseError
from elftools.construct import ConstructError
from elftools.dwarf.callframe import CIE, FDE, CallFrameInfo, CFIEntry
from elftools.dwarf.structs import DWARFStructs
from elftools.elf.elffile import ELFFile
from multi_demangle import demangle_symbol


from tracer import procfs
from tracer.errors import ElfError

__all__ = [
    "RuleKind", "CfiRow", "Symbol", "LoadSegment", "ObjectFile", "load_object",
    "load_object_bytes", "clear_object_cache", "MapRegion", "parse_maps", "Module",
    "Location", "FrameRule", "ModuleMap", "demangle", "is_c_library",
]

# What pyelftools raises on malformed input. Besides its own error types it relies on
# `assert` and on plain lookups into its tables (for example an unknown pointer encoding
# in `CallFrameInfo._eh_encoding_to_field`), so those are input errors here too.
_ELF_INPUT_ERRORS: Final = (
    ELFError, ELFParseError, DWARFError, ConstructError, struct.error,
    AssertionError, KeyError, IndexError, ValueError, EOFError, OverflowError,
)

# x86 base pages are 4 KiB; mappings, and so the offsets /proc/PID/maps shows, are in pages
# (the psABIs' 2 MiB "maximum page size" only spaces PT_LOAD segments apart).
PAGE_SIZE: Final = 4096


# Mangled-name prefixes: the Itanium C++ ABI, section 5.1.2 (`_Z`, which legacy Rust names
# `_ZN...17h<hash>E` share), and Rust's v0 scheme, RFC 2603 (`_R`).
_MANGLED_PREFIXES: Final = ("_Z", "_R")


@functools.lru_cache(maxsize=16384)
def demangle(name: str) -> str:
    """A C++ or Rust symbol as its source spells it (`<std::sys::pal::unix::time::Timespec>
    ::now`, `demo::read_time()`); any other name, or one that does not demangle, as is.
    Mangled names are ASCII (both schemes encode everything else)."""
    if not name.startswith(_MANGLED_PREFIXES) or not name.isascii():
        return name
    try:
        out = demangle_symbol(name)
    except ValueError:
        return name
    return out or name


class RuleKind(IntEnum):
    """How a register of the caller is recovered: DWARF 5, section 6.4.1 "register rules"."""
    UNDEFINED = 0
    SAME_VALUE = 1
    OFFSET = 2           # saved at CFA + N
    VAL_OFFSET = 3       # value is CFA + N
    REGISTER = 4         # in another register
    EXPRESSION = 5       # saved at the address a DWARF expression computes (CFA pushed first)
    VAL_EXPRESSION = 6   # value is what the expression computes


# A rule as the unwinder consumes it: (register, RuleKind as int, N | register | expression).
RegRule = tuple[int, int, "int | bytes"]


@dataclass(frozen=True, slots=True)
class CfiRow:
    """One row of an FDE's decoded table: how to find the CFA and the caller's registers
    for pcs from `start` (vaddr) up to the next row. `cfa_expr` replaces reg+offset when
    set (DW_CFA_def_cfa_expression)."""
    start: int
    cfa_reg: int
    cfa_offset: int
    cfa_expr: bytes | None
    ra_reg: int
    rules: tuple[RegRule, ...]
    signal_frame: bool  # CIE augmentation "S": the frame of a signal trampoline
    # The common shape, precomputed for the unwinder's fast path: CFA = reg + offset and
    # every rule "saved at CFA + N": ((register, N), ...); None for any other row.
    offsets: tuple[tuple[int, int], ...] | None = None
    max_reg: int = -1   # highest register number any rule or the CFA uses

    @classmethod
    def build(cls, start: int, cfa_reg: int, cfa_offset: int, cfa_expr: bytes | None, ra_reg: int,
              rules: tuple[RegRule, ...], signal_frame: bool) -> CfiRow:
        simple = cfa_expr is None and all(kind == RuleKind.OFFSET for _, kind, _ in rules)
        offsets = tuple((reg, int(arg)) for reg, _, arg in rules) if simple else None
        max_reg = max([cfa_reg, ra_reg, *(reg for reg, _, _ in rules)])
        return cls(start, cfa_reg, cfa_offset, cfa_expr, ra_reg, rules, signal_frame, offsets, max_reg)


@dataclass(frozen=True, slots=True)
class Symbol:
    name: str
    value: int      # vaddr
    size: int
    is_func: bool
    bind: int       # STB_* from elf.h: 0 LOCAL, 1 GLOBAL, 2 WEAK, 10 GNU_UNIQUE


@dataclass(frozen=True, slots=True)
class LoadSegment:
    vaddr: int
    offset: int
    filesz: int
    memsz: int
    flags: int      # PF_X 1, PF_W 2, PF_R 4 (elf.h)


# elf.h: symbol types and bindings, section index SHN_UNDEF.
_STT_OBJECT, _STT_FUNC, _STT_GNU_IFUNC = 1, 2, 10
_STB_LOCAL, _STB_GLOBAL, _STB_WEAK = 0, 1, 2
_SHN_UNDEF = 0
# elf.h: Elf64_Sym {st_name u32, st_info u8, st_other u8, st_shndx u16, st_value u64, st_size u64}
# and Elf32_Sym {st_name u32, st_value u32, st_size u32, st_info u8, st_other u8, st_shndx u16}.
_SYM64 = struct.Struct("<IBBHQQ")
_SYM32 = struct.Struct("<IIIBBH")

# LSB .eh_frame_hdr: version 1, then eh_frame_ptr_enc, fde_count_enc, table_enc; the binary
# search table that binutils, gold and lld emit is DW_EH_PE_datarel|DW_EH_PE_sdata4 (0x3b),
# pairs of (initial_location, FDE address) relative to the start of .eh_frame_hdr.
# Source: Linux Standard Base Core 5.0, section 10.6.2 ".eh_frame_hdr".
_DW_EH_PE_omit = 0xFF
_DW_EH_PE_datarel_sdata4 = 0x3B
_DW_EH_PE_udata4 = 0x03
_DW_EH_PE_sdata4 = 0x0B
_DW_EH_PE_pcrel = 0x10
_DW_EH_PE_absptr = 0x00


def _symbol_rank(sym: Symbol) -> tuple[int, int, int, int, str]:
    """Among aliases at one address, the name a person expects: a function, global before
    weak before local, then fewer leading underscores (`clock_gettime`, not `__clock_gettime`)."""
    bind_rank = {_STB_GLOBAL: 0, _STB_WEAK: 1}.get(sym.bind, 2)
    stripped = sym.name.lstrip("_")
    return (0 if sym.is_func else 1, bind_rank, len(sym.name) - len(stripped), len(sym.name), sym.name)


class _SymbolIndex:
    """Symbols sorted by value; one best name per address; sized intervals for bisect."""
    __slots__ = ("starts", "ends", "names", "by_name")

    # A symbol nested in another (rare; hand-written assembly) is found by looking back this
    # many entries; the bound keeps a lookup O(log n).
    LOOKBACK: Final = 8

    def __init__(self, symbols: Iterable[Symbol]) -> None:
        groups: dict[int, list[Symbol]] = {}
        by_name: dict[str, Symbol] = {}
        for sym in symbols:
            by_name.setdefault(sym.name, sym)
            groups.setdefault(sym.value, []).append(sym)
        best: dict[int, Symbol] = {}
        for value, group in groups.items():
            name_from = min(group, key=_symbol_rank)
            # the largest size among aliases: a zero-size alias must not hide a sized one
            size = max(s.size for s in group)
            best[value] = Symbol(name_from.name, value, size, name_from.is_func, name_from.bind)
        ordered = sorted(best.values(), key=lambda s: s.value)
        self.starts = [s.value for s in ordered]
        # A zero-size symbol (assembly without .size) covers only its first byte: claiming up
        # to the next symbol would name code it may not own.
        self.ends = [s.value + max(s.size, 1) for s in ordered]
        self.names = [s.name for s in ordered]
        self.by_name = by_name

    def lookup(self, vaddr: int) -> tuple[str, int] | None:
        i = bisect.bisect_right(self.starts, vaddr) - 1
        stop = max(i - self.LOOKBACK, -1)
        while i > stop:
            if vaddr < self.ends[i]:
                return self.names[i], vaddr - self.starts[i]
            i -= 1
        return None


class _LazyCallFrameInfo(CallFrameInfo):
    """pyelftools' CallFrameInfo parses every entry at once (0.4 s for libc, 1.3 s for
    python3.11 here). Entries are self-describing, so one FDE (and its CIE) can be parsed
    at the offset that .eh_frame_hdr gives; `_parse_entry_at` is the parser's own
    per-entry step (pyelftools 0.27 through 0.33), used through this subclass only."""

    def entry_at(self, offset: int) -> CFIEntry:
        entry = self._parse_entry_at(offset)
        if not isinstance(entry, CFIEntry):
            raise ElfError(f"no CFI entry at .eh_frame offset {offset:#x}")
        return entry


# Without the per-entry parser (a pyelftools other than the ones above), parse in full.
_HAS_ENTRY_PARSER: Final = callable(getattr(CallFrameInfo, "_parse_entry_at", None))


@dataclass(slots=True)
class _FdeTable:
    """Decoded rows of one FDE: `locs[i]` is where `rows[i]` starts; `end` is exclusive."""
    locs: list[int]
    rows: list[CfiRow]
    end: int

    def row_for(self, vaddr: int) -> CfiRow | None:
        if vaddr >= self.end:
            return None
        i = bisect.bisect_right(self.locs, vaddr) - 1
        return self.rows[i] if i >= 0 else None


def _decode_fde(fde: FDE) -> _FdeTable:
    """Run the CIE's initial instructions, then the FDE's, into a row table.

    pyelftools' own `get_decoded` is not used: it rejects DW_CFA_GNU_args_size (129 uses
    in i386 libc.so.6 here) and factors DW_CFA_def_cfa_sf by the code alignment factor;
    the rules are those of DWARF 5, section 6.4.2 "Call Frame Instructions".
    """
    cie = fde.cie
    if not isinstance(cie, CIE):
        raise ElfError(f"FDE at {fde.offset:#x} has no CIE")
    caf = int(cie["code_alignment_factor"])
    daf = int(cie["data_alignment_factor"])
    ra_reg = int(cie["return_address_register"])
    signal_frame = b"S" in bytes(cie.header.get("augmentation") or b"")
    start = int(fde["initial_location"])
    end = start + int(fde["address_range"])

    cfa: tuple[int, int, bytes | None] = (-1, 0, None)
    regs: dict[int, tuple[int, int | bytes]] = {}
    initial: dict[int, tuple[int, int | bytes]] = {}
    stack: list[tuple[tuple[int, int, bytes | None], dict[int, tuple[int, int | bytes]]]] = []
    locs: list[int] = []
    rows: list[CfiRow] = []
    loc = start

    def emit() -> None:
        row = CfiRow.build(loc, cfa[0], cfa[1], cfa[2], ra_reg,
                     tuple((r, int(k), a) for r, (k, a) in sorted(regs.items())), signal_frame)
        if locs and locs[-1] == loc:
            rows[-1] = row
        else:
            locs.append(loc)
            rows.append(row)

    def run(instructions: Sequence[Any], in_cie: bool) -> None:
        nonlocal cfa, loc, regs
        for ins in instructions:
            op, args = int(ins.opcode), ins.args
            if op in _ADVANCE:
                if not in_cie:
                    emit()
                loc += int(args[0]) * caf
            elif op == _CFA["set_loc"]:
                if not in_cie:
                    emit()
                loc = int(args[0])
            elif op == _CFA["def_cfa"]:
                cfa = (int(args[0]), int(args[1]), None)
            elif op == _CFA["def_cfa_sf"]:
                cfa = (int(args[0]), int(args[1]) * daf, None)
            elif op == _CFA["def_cfa_register"]:
                cfa = (int(args[0]), cfa[1], None)
            elif op == _CFA["def_cfa_offset"]:
                cfa = (cfa[0], int(args[0]), None)
            elif op == _CFA["def_cfa_offset_sf"]:
                cfa = (cfa[0], int(args[0]) * daf, None)
            elif op == _CFA["def_cfa_expression"]:
                cfa = (-1, 0, bytes(args[0]))
            elif op == _CFA["undefined"]:
                regs[int(args[0])] = (RuleKind.UNDEFINED, 0)
            elif op == _CFA["same_value"]:
                regs[int(args[0])] = (RuleKind.SAME_VALUE, 0)
            elif op in _OFFSET_OPS:
                regs[int(args[0])] = (RuleKind.OFFSET, int(args[1]) * daf)
            elif op in _VAL_OFFSET_OPS:
                regs[int(args[0])] = (RuleKind.VAL_OFFSET, int(args[1]) * daf)
            elif op == _CFA["register"]:
                regs[int(args[0])] = (RuleKind.REGISTER, int(args[1]))
            elif op == _CFA["expression"]:
                regs[int(args[0])] = (RuleKind.EXPRESSION, bytes(args[1]))
            elif op == _CFA["val_expression"]:
                regs[int(args[0])] = (RuleKind.VAL_EXPRESSION, bytes(args[1]))
            elif op in _RESTORE_OPS:
                reg = int(args[0])
                if reg in initial:
                    regs[reg] = initial[reg]
                else:
                    regs.pop(reg, None)
            elif op == _CFA["remember_state"]:
                stack.append((cfa, dict(regs)))
            elif op == _CFA["restore_state"]:
                if not stack:
                    raise ElfError(f"FDE at {fde.offset:#x}: DW_CFA_restore_state without remember_state")
                cfa, regs = stack.pop()
            elif op in _IGNORED:
                pass
            else:
                raise ElfError(f"FDE at {fde.offset:#x}: unsupported CFA opcode {op:#x}")

    run(cie.instructions, in_cie=True)
    initial = dict(regs)
    loc = start
    run(fde.instructions, in_cie=False)
    emit()
    return _FdeTable(locs, rows, end)


def _cfa_opcodes() -> dict[str, int]:
    """DW_CFA_* values from pyelftools' constants (DWARF 5, table 7.29), by short name."""
    from elftools.dwarf import constants as c
    return {name[len("DW_CFA_"):]: int(getattr(c, name)) for name in dir(c) if name.startswith("DW_CFA_")}


_CFA: Final = _cfa_opcodes()
_ADVANCE: Final = frozenset({_CFA["advance_loc"], _CFA["advance_loc1"], _CFA["advance_loc2"], _CFA["advance_loc4"]})
_OFFSET_OPS: Final = frozenset({_CFA["offset"], _CFA["offset_extended"], _CFA["offset_extended_sf"]})
_VAL_OFFSET_OPS: Final = frozenset({_CFA["val_offset"], _CFA["val_offset_sf"]})
_RESTORE_OPS: Final = frozenset({_CFA["restore"], _CFA["restore_extended"]})
# DW_CFA_GNU_args_size (0x2e) only matters for landing pads; AArch64's negate_ra_state only
# for pointer authentication.
_IGNORED: Final = frozenset({_CFA["nop"], _CFA["GNU_args_size"], _CFA.get("AARCH64_negate_ra_state", 0x2D)})


class _CfiSection:
    """One CFI section (.eh_frame or .debug_frame) with an address index over its FDEs."""
    __slots__ = ("_cfi", "_index_locs", "_index_offsets", "_index_ends", "_tables", "_lock", "_full")

    def __init__(self, data: bytes, sh_addr: int, address_size: int, little_endian: bool,
                 for_eh_frame: bool, hdr: tuple[bytes, int] | None) -> None:
        structs = DWARFStructs(little_endian=little_endian, dwarf_format=32, address_size=address_size)
        self._cfi = _LazyCallFrameInfo(io.BytesIO(data), len(data), sh_addr, structs, for_eh_frame=for_eh_frame)
        self._tables: dict[int, _FdeTable | None] = {}
        self._lock = threading.Lock()  # pyelftools parses through one shared stream
        self._index_locs: list[int] = []
        self._index_offsets: list[int] = []
        self._index_ends: list[int] | None = None  # known only after a full parse
        self._full = False
        if hdr is not None and for_eh_frame and _HAS_ENTRY_PARSER:
            parsed = _parse_eh_frame_hdr(hdr[0], hdr[1], sh_addr, little_endian)
            if parsed is not None:
                self._index_locs, self._index_offsets = parsed
                return
        self._full = True

    def _build_full_index(self) -> None:
        entries = []
        for entry in self._cfi.get_entries():
            if isinstance(entry, FDE):
                lo = int(entry["initial_location"])
                entries.append((lo, lo + int(entry["address_range"]), entry.offset))
        entries.sort()
        self._index_locs = [e[0] for e in entries]
        self._index_ends = [e[1] for e in entries]
        self._index_offsets = [e[2] for e in entries]
        self._full = False

    def row_for(self, vaddr: int) -> CfiRow | None:
        """The row that covers vaddr, or None; raises ElfError on malformed CFI."""
        with self._lock:
            try:
                if self._full:
                    self._build_full_index()
                i = bisect.bisect_right(self._index_locs, vaddr) - 1
                if i < 0:
                    return None
                if self._index_ends is not None and vaddr >= self._index_ends[i]:
                    return None
                offset = self._index_offsets[i]
                if offset in self._tables:
                    table = self._tables[offset]
                else:
                    entry = self._cfi.entry_at(offset)
                    table = _decode_fde(entry) if isinstance(entry, FDE) else None
                    self._tables[offset] = table
            except ElfError:
                raise
            except _ELF_INPUT_ERRORS as e:
                raise ElfError(f"malformed call frame information: {e}") from e
        return table.row_for(vaddr) if table is not None else None


def _parse_eh_frame_hdr(hdr: bytes, hdr_addr: int, eh_frame_addr: int,
                        little_endian: bool) -> tuple[list[int], list[int]] | None:
    """The sorted (initial_location, .eh_frame offset) table, or None for encodings other
    than the one every linker emits (then the caller parses .eh_frame in full)."""
    if len(hdr) < 12 or hdr[0] != 1:
        return None
    _, ptr_enc, count_enc, table_enc = hdr[:4]
    if count_enc not in (_DW_EH_PE_udata4, _DW_EH_PE_sdata4) or table_enc != _DW_EH_PE_datarel_sdata4:
        return None
    if ptr_enc & 0x0F not in (_DW_EH_PE_sdata4, _DW_EH_PE_udata4):
        return None
    e = "<" if little_endian else ">"
    (count,) = struct.unpack_from(e + "I", hdr, 8)
    if 12 + 8 * count > len(hdr):
        return None
    pairs = struct.unpack_from(f"{e}{2 * count}i", hdr, 12)
    locs = [hdr_addr + v for v in pairs[0::2]]
    offsets = [hdr_addr + v - eh_frame_addr for v in pairs[1::2]]
    if any(b < a for a, b in zip(locs, locs[1:])):
        order = sorted(range(count), key=locs.__getitem__)
        locs = [locs[i] for i in order]
        offsets = [offsets[i] for i in order]
    return locs, offsets


class ObjectFile:
    """One ELF image: its PT_LOAD segments, symbols and CFI. Build with `load_object`
    (cached) or `ObjectFile.from_bytes`; lookups take vaddrs."""
    __slots__ = ("name", "elf_class", "machine", "e_type", "segments", "_symbols",
                 "_eh_frame", "_debug_frame")

    def __init__(self, stream: IO[bytes], name: str) -> None:
        self.name = name
        try:
            elf = ELFFile(stream)
            self.elf_class: int = elf.elfclass
            self.machine: str = elf["e_machine"]
            self.e_type: str = elf["e_type"]
            little = elf.little_endian
            self.segments: tuple[LoadSegment, ...] = tuple(
                LoadSegment(seg["p_vaddr"], seg["p_offset"], seg["p_filesz"], seg["p_memsz"], seg["p_flags"])
                for seg in elf.iter_segments() if seg["p_type"] == "PT_LOAD")
            # One pass over the section headers: pyelftools parses a header again on every
            # get_section / iter_sections, which costs milliseconds on libc.
            all_sections = list(elf.iter_sections())
            sections = {sec.name: sec for sec in all_sections}
            self._symbols = _SymbolIndex(self._read_symbols(all_sections, sections))
            addr_size = 8 if self.elf_class == 64 else 4
            eh = sections.get(".eh_frame")
            hdr = sections.get(".eh_frame_hdr")
            self._eh_frame = None if eh is None or eh["sh_type"] == "SHT_NOBITS" else _CfiSection(
                eh.data(), eh["sh_addr"], addr_size, little, True,
                (hdr.data(), hdr["sh_addr"]) if hdr is not None else None)
            dbg = sections.get(".debug_frame")
            self._debug_frame = None if dbg is None or dbg["sh_type"] == "SHT_NOBITS" else _CfiSection(
                dbg.data(), 0, addr_size, little, False, None)
        except _ELF_INPUT_ERRORS as e:
            raise ElfError(f"{name}: not a usable ELF object ({e})") from e

    @classmethod
    def from_bytes(cls, data: bytes, name: str = "[vdso]") -> ObjectFile:
        return cls(io.BytesIO(data), name)

    def _read_symbols(self, all_sections: list[Any], by_name: dict[str, Any]) -> list[Symbol]:
        out: list[Symbol] = []
        is64 = self.elf_class == 64
        for sec_name in (".symtab", ".dynsym"):
            sec = by_name.get(sec_name)
            if sec is None or sec["sh_type"] == "SHT_NOBITS":
                continue
            link = sec["sh_link"]
            if not 0 <= link < len(all_sections):
                continue
            strtab = all_sections[link].data()
            data = sec.data()
            fmt = _SYM64 if is64 else _SYM32
            usable = len(data) - len(data) % fmt.size
            for fields in fmt.iter_unpack(data[:usable]):
                if is64:
                    st_name, st_info, _other, shndx, value, size = fields
                else:
                    st_name, value, size, st_info, _other, shndx = fields
                stype, bind = st_info & 0xF, st_info >> 4
                if stype not in (_STT_FUNC, _STT_GNU_IFUNC, _STT_OBJECT) or shndx == _SHN_UNDEF or value == 0:
                    continue
                end = strtab.find(b"\0", st_name)
                # as the bytes were (an invalid byte a lone surrogate), escaped on output
                name = strtab[st_name:end if end >= 0 else None].decode("utf-8", "surrogateescape")
                if name:
                    out.append(Symbol(name, value, size, stype != _STT_OBJECT, bind))
        return out

    # -- lookups (vaddr space) ------------------------------------------------------------

    def symbolize(self, vaddr: int) -> tuple[str, int] | None:
        """(symbol, offset into it) for a vaddr inside a sized symbol, else None."""
        return self._symbols.lookup(vaddr)

    def symbol(self, name: str) -> Symbol | None:
        return self._symbols.by_name.get(name)

    @property
    def has_cfi(self) -> bool:
        return self._eh_frame is not None or self._debug_frame is not None

    def cfi_row(self, vaddr: int) -> CfiRow | None:
        """The CFI row covering vaddr (.eh_frame first, then .debug_frame); ElfError if the
        CFI that covers it is malformed."""
        row = self._eh_frame.row_for(vaddr) if self._eh_frame is not None else None
        if row is None and self._debug_frame is not None:
            row = self._debug_frame.row_for(vaddr)
        return row

    def load_bias(self, map_start: int, map_offset: int, perms: str | None = None,
                  siblings: Sequence[tuple[int, int, str]] = ()) -> int | None:
        """runtime - vaddr for a mapping of this file at map_start with file offset
        map_offset (the maps' offset column). The kernel maps file page P of a PT_LOAD at
        (p_vaddr rounded down to a page) + (P - p_offset rounded down) + bias
        (fs/binfmt_elf.c: elf_map, and glibc's _dl_map_segments), so the segment whose
        file range holds map_offset gives the bias. None when no segment holds it.

        Segments may share a file page (lld packs them: a read-only segment ending at
        0x694 and the text segment starting at file offset 0x6a0 but vaddr 0x16a0 are both
        in page 0), so several segments can hold map_offset. Then the one whose PF_X
        matches the mapping's `x` (mprotect never adds or removes it for a loaded
        segment; RELRO only drops `w`) and which explains the most `siblings` (the other
        mappings of the same file: (start, offset, perms)) at the same bias wins."""
        mask = ~(PAGE_SIZE - 1)
        candidates = [map_start - ((seg.vaddr & mask) + (map_offset - (seg.offset & mask)))
                      for seg in self._holding(map_offset, perms)]
        if len(candidates) <= 1:
            return candidates[0] if candidates else None

        def explained(bias: int) -> int:
            n = 0
            for start, offset, sperms in siblings:
                for seg in self._holding(offset, sperms):
                    if start - bias == (seg.vaddr & mask) + (offset - (seg.offset & mask)):
                        n += 1
                        break
            return n
        return max(candidates, key=explained)     # the first among equals: file order

    def _holding(self, map_offset: int, perms: str | None) -> list[LoadSegment]:
        """The PT_LOADs whose file pages hold map_offset, those with the mapping's PF_X
        first (only those, when any)."""
        mask = ~(PAGE_SIZE - 1)
        found = [seg for seg in self.segments
                 if seg.offset & mask <= map_offset < seg.offset + max(seg.filesz, 1)]
        if perms is not None and len(found) > 1:
            x = len(perms) > 2 and perms[2] == "x"
            same = [seg for seg in found if bool(seg.flags & 1) == x]   # PF_X = 1
            if same:
                return same
        return found

    def __repr__(self) -> str:
        return f"ObjectFile({self.name!r}, {self.e_type}, {len(self._symbols.names)} symbols)"


# -- the object cache -------------------------------------------------------------------

_CACHE_SIZE: Final = 64
_cache: OrderedDict[tuple[Any, ...], ObjectFile | ElfError] = OrderedDict()
_cache_lock = threading.Lock()


_building: dict[tuple[Any, ...], threading.Event] = {}
# Called every few ms by a thread waiting for another's parse (set by the engine: under
# --inject its heartbeat tells the tracee's stubs the tracer is alive, not stuck).
wait_hook: Callable[[], None] | None = None


def _cached(key: tuple[Any, ...], build: Callable[[], ObjectFile]) -> ObjectFile:
    """One parse per object: a thread that wants an object another thread is parsing (the
    background loader of symload.py) waits for that parse instead of starting its own."""
    while True:
        with _cache_lock:
            hit = _cache.get(key)
            if hit is not None:
                _cache.move_to_end(key)
                break
            busy = _building.get(key)
            if busy is None:
                mine = _building[key] = threading.Event()
        if busy is not None:
            while not busy.wait(0.005):
                hook = wait_hook
                if hook is not None:
                    hook()
            continue
        try:
            hit = build()
        except ElfError as e:
            hit = e
        finally:
            with _cache_lock:
                if hit is not None:
                    _cache[key] = hit
                    while len(_cache) > _CACHE_SIZE:
                        _cache.popitem(last=False)
                del _building[key]
            mine.set()
        break
    if isinstance(hit, ElfError):
        raise hit
    return hit


def load_object(path: str, inode: int | None = None) -> ObjectFile:
    """The object at path, cached per (device, inode, mtime, size). With inode given
    (the maps' inode column), a file that has been replaced since it was mapped is an
    ElfError: its symbols would name someone else's code."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if inode is not None and inode != 0 and st.st_ino != inode:
                raise ElfError(f"{path}: replaced on disk since it was mapped (inode {st.st_ino}, mapped {inode})")
            # by identity, not path: one libc reached as /proc/PID/root/... for many
            # processes is parsed once
            key = ("file", st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
            return _cached(key, lambda: ObjectFile(f, path))
    except OSError as e:
        raise ElfError(f"cannot open {path}: {e.strerror}") from e


def load_object_bytes(data: bytes, name: str = "[vdso]") -> ObjectFile:
    """An image held in memory (the vDSO read over ptrace), cached by content."""
    key = ("bytes", name, hashlib.blake2b(data, digest_size=16).digest())
    return _cached(key, lambda: ObjectFile.from_bytes(data, name))


def clear_object_cache() -> None:
    with _cache_lock:
        _cache.clear()


# -- /proc/PID/maps ---------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class MapRegion:
    """One line of /proc/PID/maps (fs/proc/task_mmu.c: show_map_vma)."""
    start: int
    end: int
    perms: str
    offset: int
    path: str = ""
    inode: int = 0

    @classmethod
    def parse(cls, line: str) -> MapRegion:
        """`start-end perms offset dev inode [path]`; the path may hold spaces and ends
        with " (deleted)" when the file was unlinked."""
        e = procfs.parse_map_line(line)
        return cls(e.start, e.end, e.perms, e.offset, e.path, e.inode)

    @property
    def executable(self) -> bool:
        return len(self.perms) > 2 and self.perms[2] == "x"


def parse_maps(text: str) -> list[MapRegion]:
    # split at "\n" only: the kernel escapes it in paths (seq_path), not \x1c or \x85
    return [MapRegion.parse(line) for line in text.split("\n") if line.strip()]


_DELETED_SUFFIX: Final = " (deleted)"
_MAPS_NEWLINE: Final = "\\012"


@dataclass(frozen=True, slots=True)
class Module:
    """An object as mapped: `bias` = runtime address - vaddr. `obj` is None when the file
    cannot be trusted or read (deleted, replaced, not ELF, anonymous memory)."""
    path: str
    short_name: str
    bias: int
    obj: ObjectFile | None


@dataclass(frozen=True, slots=True)
class Location:
    """A runtime address named: `object_offset` is its vaddr (for shared objects and PIEs
    the offset from the load base, as strace -k and perf print it)."""
    runtime_addr: int
    short_name: str
    object_offset: int
    symbol: str | None
    symbol_offset: int

    @property
    def caller(self) -> str:
        return f"{self.short_name}+{self.object_offset:#x}"

    @property
    def caller_symbol(self) -> str | None:
        if self.symbol is None:
            return None
        return f"{self.short_name}!{self.symbol}+{self.symbol_offset:#x}"

    @property
    def stack_entry(self) -> str:
        """`0x7f… libc.so.6!clock_gettime+0x39` (or `… libc.so.6+0x1234` without a symbol)."""
        return f"{self.runtime_addr:#x} {self.caller_symbol or self.caller}"


# A FrameRule tells the unwinder what it knows about a pc: None = not in executable
# memory (stop); otherwise (bias, row) with row None when no CFI covers the pc.
FrameRule = tuple[int, "CfiRow | None"] | None

_NO_MODULE: Final = Module("", "", 0, None)

# The C libraries' file names: glibc (libc.so.6, libc-2.x.so, and librt, whose
# clock_gettime wrapped libc's before glibc 2.17), musl (libc.so, and its dynamic linker
# ld-musl-ARCH.so.1, which is the same object).
_C_LIBRARY_PREFIXES: Final = ("libc.so", "libc-", "librt.so", "librt-", "ld-musl-")


def is_c_library(short_name: str) -> bool:
    return short_name.startswith(_C_LIBRARY_PREFIXES)

_RULE_CACHE_MAX: Final = 1 << 16


@dataclass(slots=True)
class ModuleMap:
    """Runtime addresses of one process, from its maps, to modules. Objects load lazily,
    on the first address that falls in them. `root` prefixes paths (e.g. /proc/PID/root
    for a tracee in another mount namespace)."""
    regions: list[MapRegion]
    vdso_image: bytes | None = None
    root: str = ""
    loader: Callable[[str, int | None], ObjectFile] = load_object
    demangle: bool = True          # name C++/Rust symbols as their source spells them
    _starts: list[int] = field(init=False)
    _modules: dict[tuple[str, int], Module] = field(init=False)
    _region_module: dict[int, Module] = field(init=False)
    _rules: dict[int, FrameRule] = field(init=False)
    _executable: dict[int, bool] = field(init=False)

    def __post_init__(self) -> None:
        self.regions = sorted((r if isinstance(r, MapRegion) else MapRegion(*r) for r in self.regions),
                              key=lambda r: r.start)
        self._starts = [r.start for r in self.regions]
        self._modules = {}
        self._region_module = {}
        self._rules = {}
        self._executable = {}

    @classmethod
    def from_pid(cls, pid: int, vdso_image: bytes | None = None,
                 demangle: bool = True) -> ModuleMap:
        # paths are bytes: decoded as os.fsdecode does, so they open the same files again
        with open(f"/proc/{pid}/maps", encoding="utf-8", errors="surrogateescape") as f:
            return cls(parse_maps(f.read()), vdso_image, root=f"/proc/{pid}/root",
                       demangle=demangle)

    def region_at(self, addr: int) -> MapRegion | None:
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0 and addr < self.regions[i].end:
            return self.regions[i]
        return None

    def is_executable(self, addr: int) -> bool:
        try:
            return self._executable[addr]
        except KeyError:
            pass
        region = self.region_at(addr)
        result = region is not None and region.executable
        if len(self._executable) >= _RULE_CACHE_MAX:
            self._executable.clear()
        self._executable[addr] = result
        return result

    def module_at(self, addr: int) -> Module | None:
        """The module that maps addr, or None for unmapped and anonymous memory."""
        i = bisect.bisect_right(self._starts, addr) - 1
        if i < 0 or addr >= self.regions[i].end:
            return None
        module = self._region_module.get(i)
        if module is None:
            module = self._module_for(self.regions[i])
            self._region_module[i] = module
        return module if module is not _NO_MODULE else None

    def _module_for(self, region: MapRegion) -> Module:
        path = region.path
        if not path or (path.startswith("[") and path != "[vdso]"):
            return _NO_MODULE
        if path == "[vdso]":
            obj: ObjectFile | None = None
            if self.vdso_image is not None:
                try:
                    obj = load_object_bytes(self.vdso_image, "[vdso]")
                except ElfError:
                    obj = None
            bias = obj.load_bias(region.start, region.offset) if obj is not None else None
            return self._intern(Module(path, path, region.start if bias is None else bias, obj))
        short = os.path.basename(path)
        if path.endswith(_DELETED_SUFFIX):
            # The file the process runs is gone; a new file at that path is not it.
            return self._intern(Module(path, short[: -len(_DELETED_SUFFIX)], region.start - region.offset, None))
        try:
            obj = self.loader(self.root + path, region.inode or None)
        except ElfError:
            # The maps show a newline in a path as "\012" (fs/proc/task_mmu.c: seq_file_path
            # with "\n" escaped); the inode check makes sure the file found is the one mapped.
            if _MAPS_NEWLINE not in path:
                return self._intern(Module(path, short, region.start - region.offset, None))
            try:
                obj = self.loader(self.root + path.replace(_MAPS_NEWLINE, "\n"), region.inode or None)
            except ElfError:
                return self._intern(Module(path, short, region.start - region.offset, None))
        siblings = [(r.start, r.offset, r.perms) for r in self.regions
                    if r.path == path and r.inode == region.inode and r is not region]
        bias = obj.load_bias(region.start, region.offset, region.perms, siblings)
        if bias is None:
            return self._intern(Module(path, short, region.start - region.offset, None))
        return self._intern(Module(path, short, bias, obj))

    def _intern(self, module: Module) -> Module:
        return self._modules.setdefault((module.path, module.bias), module)

    def locate(self, runtime_addr: int, is_return_address: bool = True) -> Location | None:
        """Name an address. A return address is looked up at addr - 1 (the call may be the
        last instruction of a function that does not return) but printed as itself."""
        module = self.module_at(runtime_addr)
        if module is None:
            return None
        vaddr = runtime_addr - module.bias
        found = None
        if module.obj is not None:
            found = module.obj.symbolize(vaddr - 1 if is_return_address else vaddr)
        if found is None:
            return Location(runtime_addr, module.short_name, vaddr, None, 0)
        name, off = found
        if self.demangle:
            name = demangle(name)
        return Location(runtime_addr, module.short_name, vaddr, name, off + (1 if is_return_address else 0))

    def frame_rule(self, lookup_pc: int) -> FrameRule:
        """For the unwinder: the CFI row for lookup_pc (cached per pc)."""
        try:
            return self._rules[lookup_pc]
        except KeyError:
            pass
        rule: FrameRule
        region = self.region_at(lookup_pc)
        if region is None or not region.executable:
            rule = None
        else:
            module = self.module_at(lookup_pc)
            row = None
            bias = module.bias if module is not None else 0
            if module is not None and module.obj is not None:
                try:
                    row = module.obj.cfi_row(lookup_pc - bias)
                except ElfError:
                    row = None
            rule = (bias, row)
        if len(self._rules) >= _RULE_CACHE_MAX:
            self._rules.clear()
        self._rules[lookup_pc] = rule
        return rule
