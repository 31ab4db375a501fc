"""Object files mapped into a tracee: an ELF image, its symbols and load bias, cached.

An `ObjectFile` is one ELF image (a file on disk, or the vDSO image read over ptrace):
its PT_LOAD segments (for `load_bias`), its function and object symbols for `symbolize`,
and its CFI (`.eh_frame` and `.debug_frame`, decoded by `tracer.cfi`) for `cfi_row`.
Addresses inside an object are in its own `p_vaddr` space ("vaddr"); runtime addresses are
vaddr + load bias. `load_object` and `load_object_bytes` parse each object once (the cache
below); `tracer.modmap` maps a process's runtime addresses to these objects.

Symbol names are demangled where they are named (`demangle`, called by `tracer.modmap`):
C++ (Itanium, `_Z`) and Rust (legacy `_ZN...17h<hash>E` and v0 `_R`), as gdb, perf and
`c++filt` print them.

The doors to pyelftools are this module, tracer/cfi.py and tracer/vdso.py: no other module
imports elftools. This module alone imports multi_demangle.
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
from dataclasses import dataclass
from typing import IO, Any, Final

from elftools.elf.elffile import ELFFile
from multi_demangle import demangle_symbol

from tracer.cfi import ELF_INPUT_ERRORS, CfiRow, CfiSection
from tracer.errors import ElfError

__all__ = [
    "Symbol", "LoadSegment", "ObjectFile", "load_object", "load_object_bytes",
    "clear_object_cache", "demangle", "PAGE_SIZE",
]

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
_STT_NOTYPE, _STT_OBJECT, _STT_FUNC, _STT_GNU_IFUNC = 0, 1, 2, 10
_STB_LOCAL, _STB_GLOBAL, _STB_WEAK = 0, 1, 2
_SHN_UNDEF = 0
# elf.h: Elf64_Sym {st_name u32, st_info u8, st_other u8, st_shndx u16, st_value u64, st_size u64}
# and Elf32_Sym {st_name u32, st_value u32, st_size u32, st_info u8, st_other u8, st_shndx u16}.
_SYM64 = struct.Struct("<IBBHQQ")
_SYM32 = struct.Struct("<IIIBBH")

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
            self._eh_frame = None if eh is None or eh["sh_type"] == "SHT_NOBITS" else CfiSection(
                eh.data(), eh["sh_addr"], addr_size, little, True,
                (hdr.data(), hdr["sh_addr"]) if hdr is not None else None)
            dbg = sections.get(".debug_frame")
            self._debug_frame = None if dbg is None or dbg["sh_type"] == "SHT_NOBITS" else CfiSection(
                dbg.data(), 0, addr_size, little, False, None)
        except ELF_INPUT_ERRORS as e:
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
                # A sized NOTYPE symbol is an assembly entry: the arm64 vDSO's
                # __kernel_rt_sigreturn (vdso/sigreturn.S), where every handler returns. Unsized
                # ones are labels and arm64's $x/$d mapping symbols (AAELF64 5.5.4).
                if (stype not in (_STT_FUNC, _STT_GNU_IFUNC, _STT_OBJECT)
                        and not (stype == _STT_NOTYPE and size)) or shndx == _SHN_UNDEF or value == 0:
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
