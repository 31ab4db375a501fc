"""Call-frame information: an object's `.eh_frame` (found through `.eh_frame_hdr`) and
`.debug_frame`, decoded lazily, one FDE at a time, into the row tables that `tracer.unwind`
executes (DWARF 5, section 6.4 "Call Frame Information"). Addresses are the object's own
`p_vaddr` space ("vaddr").

`tracer.objfile` builds a `CfiSection` per section of an `ObjectFile`; `tracer.modmap` hands
the unwinder a `FrameRule` (a module's load bias and the row for a pc).

The doors to pyelftools are this module, tracer/objfile.py and tracer/vdso.py: no other
module imports elftools.
"""
from __future__ import annotations

import bisect
import io
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Final

from elftools.common.exceptions import DWARFError, ELFError, ELFParseError
from elftools.construct import ConstructError
from elftools.dwarf.callframe import CIE, FDE, CallFrameInfo, CFIEntry
from elftools.dwarf.structs import DWARFStructs

from tracer.errors import ElfError

__all__ = ["RuleKind", "RegRule", "CfiRow", "FrameRule", "CfiSection", "ELF_INPUT_ERRORS"]

# What pyelftools raises on malformed input. Besides its own error types it relies on
# `assert` and on plain lookups into its tables (for example an unknown pointer encoding
# in `CallFrameInfo._eh_encoding_to_field`), so those are input errors here too.
ELF_INPUT_ERRORS: Final = (
    ELFError, ELFParseError, DWARFError, ConstructError, struct.error,
    AssertionError, KeyError, IndexError, ValueError, EOFError, OverflowError,
)


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


# A FrameRule tells the unwinder what it knows about a pc: None = not in executable
# memory (stop); otherwise (bias, row) with row None when no CFI covers the pc.
FrameRule = tuple[int, "CfiRow | None"] | None


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


class CfiSection:
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
            except ELF_INPUT_ERRORS as e:
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
