"""Module maps: a process's /proc/PID/maps, runtime addresses mapped to the objects
(`tracer.objfile`) that hold them, and named the way strace -k and perf do:
`libc.so.6+0x1234` (vaddr, which for shared objects is the offset from the load base) and
`libc.so.6!clock_gettime+0x39`. For the unwinder, `ModuleMap.frame_rule` gives a pc's load
bias and CFI row (`tracer.cfi`).

This module does not import elftools (its doors are tracer/objfile.py, tracer/cfi.py and
tracer/vdso.py); objects are parsed there, lazily, on the first address that falls in them.
"""
from __future__ import annotations

import bisect
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from tracer import procfs
from tracer.cfi import FrameRule
from tracer.errors import ElfError
from tracer.objfile import ObjectFile, demangle, load_object, load_object_bytes

__all__ = ["MapRegion", "parse_maps", "Module", "Location", "ModuleMap", "is_c_library"]

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
