"""Load bias from program headers whose addresses differ from their file offsets (lld's
layout), and demangling. Pure: the ELF is built here, byte for byte."""
from __future__ import annotations

import io
import struct

from tracer.modmap import MapRegion, ModuleMap
from tracer.objfile import ObjectFile, demangle

# elf.h: PT_LOAD 1, PF_X 1, PF_W 2, PF_R 4; Elf64_Ehdr is 64 bytes, Elf64_Phdr 56.
_PT_LOAD = 1
R, RX, RW = 4, 5, 6


def _elf(segments: list[tuple[int, int, int, int]]) -> bytes:
    """An ELF64 ET_DYN x86_64 with only program headers: (offset, vaddr, filesz, flags)."""
    phoff, n = 64, len(segments)
    ehdr = struct.pack("<4sBBBBB7sHHIQQQIHHHHHH", b"\x7fELF", 2, 1, 1, 0, 0, bytes(7),
                       3, 62, 1, 0, phoff, 0, 0, 64, 56, n, 64, 0, 0)
    ph = b"".join(struct.pack("<IIQQQQQQ", _PT_LOAD, flags, off, vaddr, vaddr, size, size, 0x1000)
                  for off, vaddr, size, flags in segments)
    data = ehdr + ph
    end = max(off + size for off, _, size, _ in segments)
    return data + bytes(max(0, end - len(data)))


# What `gcc -fuse-ld=lld` (LLD 14) laid out for a small C program: four PT_LOADs, the first
# two and the last two sharing a file page each, every vaddr one page past its offset.
LLD = [(0x0, 0x0, 0x694, R), (0x6A0, 0x16A0, 0x1A0, RX), (0x840, 0x2840, 0x1D8, RW),
       (0xA18, 0x3A18, 0x40, RW)]
BASE = 0x5634B8A06000


def _lld_maps(path: str = "/prog") -> list[MapRegion]:
    # as the kernel maps it (RELRO has made the third segment read-only)
    return [MapRegion(BASE, BASE + 0x1000, "r--p", 0x0, path, 7),
            MapRegion(BASE + 0x1000, BASE + 0x2000, "r-xp", 0x0, path, 7),
            MapRegion(BASE + 0x2000, BASE + 0x3000, "r--p", 0x0, path, 7),
            MapRegion(BASE + 0x3000, BASE + 0x4000, "rw-p", 0x0, path, 7)]


def test_bias_of_lld_text_mapping() -> None:
    obj = ObjectFile(io.BytesIO(_elf(LLD)), "prog")
    regions = _lld_maps()
    for region in regions:
        siblings = [(r.start, r.offset, r.perms) for r in regions if r is not region]
        assert obj.load_bias(region.start, region.offset, region.perms, siblings) == BASE, region


def test_module_map_names_lld_text() -> None:
    obj = ObjectFile(io.BytesIO(_elf(LLD)), "prog")
    mm = ModuleMap(_lld_maps(), loader=lambda path, inode: obj)
    loc = mm.locate(BASE + 0x179A)
    assert loc is not None and loc.object_offset == 0x179A and loc.short_name == "prog"


def test_bias_of_classic_layout_unchanged() -> None:
    # binutils' layout: every segment starts a page of its own, vaddr == offset
    obj = ObjectFile(io.BytesIO(_elf([(0, 0, 0x600, R), (0x1000, 0x1000, 0x200, RX)])), "p")
    assert obj.load_bias(BASE + 0x1000, 0x1000, "r-xp") == BASE
    assert obj.load_bias(BASE + 0x1000, 0x1000) == BASE
    assert obj.load_bias(BASE, 0x5000) is None


def test_demangle_cxx_and_rust() -> None:
    assert demangle("_ZN4demo5Clock4readEi") == "demo::Clock::read(int)"
    assert demangle("_ZN1r7measure17hfc4c42037d259cb7E") == "r::measure"      # legacy Rust
    assert (demangle("_RNvMNtNtNtNtCsjrHSEGnQ3l9_3std3sys3pal4unix4timeNtB2_8Timespec3now")
            == "<std::sys::pal::unix::time::Timespec>::now")                 # Rust v0
    for plain in ("main", "clock_gettime", "_Zinvalid", "_R", "_Z\x1b]0;x\x07", "_Z\udcff"):
        assert demangle(plain) == plain
