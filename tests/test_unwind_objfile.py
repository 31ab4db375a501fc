"""tracer.objfile, tracer.cfi and tracer.modmap on real objects: symbols against nm, decoded CFI against readelf,
load biases, maps parsing, and what happens to deleted, replaced and broken files."""
from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tracer.cfi import RuleKind
from tracer.errors import ElfError
from tracer.modmap import Location, MapRegion, ModuleMap, parse_maps
from tracer.objfile import ObjectFile, load_object, load_object_bytes

TARGETS = Path(__file__).parent / "unwind_targets"
LIBC64 = "/lib/x86_64-linux-gnu/libc.so.6"
LIBC32 = "/usr/lib32/libc.so.6"

# readelf's register names (binutils dwarf.c, dwarf_regnames_x86_64 / _i386) to DWARF numbers
REGNAMES = {
    64: {n: i for i, n in enumerate("rax rdx rcx rbx rsi rdi rbp rsp r8 r9 r10 r11 r12 r13 r14 r15 rip".split())},
    32: {n: i for i, n in enumerate("eax ecx edx ebx esp ebp esi edi eip".split())},
}


def compile_c(out: Path, *flags: str) -> Path:
    result = subprocess.run(["gcc", "-O2", *flags, "-o", str(out), str(TARGETS / "nested_clock.c")],
                            capture_output=True, text=True)
    if result.returncode != 0:
        hint = " (gcc -m32 needs gcc-multilib: run scripts/test)" if "-m32" in flags else ""
        pytest.fail(result.stderr + hint)
    return out


@pytest.fixture(scope="module", params=[(), ("-no-pie",), ("-m32",), ("-m32", "-no-pie")],
                ids=["x86_64-pie", "x86_64-nopie", "i386-pie", "i386-nopie"])
def program(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    flags: tuple[str, ...] = request.param
    name = "prog" + "".join(flags).replace("-", "_")
    return compile_c(tmp_path_factory.mktemp("objfile") / name, *flags)


def nm_functions(path: Path) -> list[tuple[str, int, int]]:
    out = subprocess.run(["nm", "-S", "--defined-only", str(path)], capture_output=True, text=True,
                         check=True).stdout
    syms = []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[2] in "TtWi":
            syms.append((parts[3], int(parts[0], 16), int(parts[1], 16)))
    return syms


def test_symbols_agree_with_nm(program: Path) -> None:
    obj = load_object(str(program))
    funcs = nm_functions(program)
    assert {"main", "f1", "f2", "f3", "record"} <= {name for name, _, _ in funcs}
    by_addr: dict[int, set[str]] = {}
    for name, value, _ in funcs:
        by_addr.setdefault(value, set()).add(name)
    for name, value, size in funcs:
        if size == 0:
            continue
        for probe in (value, value + size - 1):
            found = obj.symbolize(probe)
            assert found is not None, name
            assert found[0] in by_addr[value] and found[1] == probe - value, (name, found)
    sym = obj.symbol("f3")
    assert sym is not None and sym.is_func and sym.size > 0
    assert obj.symbolize(sym.value + sym.size) != ("f3", sym.size)


def readelf_rows(path: str, every: int = 1) -> list[tuple[int, dict[str, str]]]:
    """(LOC, {column: rule}) for the .eh_frame rows readelf -wF prints, of every n-th FDE."""
    # readelf exits 1 over unrelated warnings (e.g. about .gnu_debuglink); its output is whole
    out = subprocess.run(["readelf", "-wF", path], capture_output=True, text=True).stdout
    assert "Contents of the .eh_frame section" in out
    rows = []
    header: list[str] | None = None
    fde_index = -1
    in_fde = False
    lo = hi = 0
    for line in out.splitlines():
        if line.startswith("Contents of the") and ".eh_frame" not in line:
            break
        if m := re.search(r" FDE cie=\S+ pc=([0-9a-f]+)\.\.([0-9a-f]+)", line):
            fde_index += 1
            in_fde = fde_index % every == 0
            lo, hi = int(m[1], 16), int(m[2], 16)
            header = None
        elif " CIE" in line or "ZERO terminator" in line:
            in_fde = False
        elif in_fde and line.strip().startswith("LOC"):
            header = line.split()
        elif in_fde and header and re.match(r"^[0-9a-f]+ +\S", line):
            # a register rule prints as "r3 (rbx)": keep the number
            cols = re.sub(r"\b(r\d+) \(\w+\)", r"\1", line).split()
            loc = int(cols[0], 16)
            if lo <= loc < hi:  # readelf also prints a row for an advance to the FDE's end
                rows.append((loc, dict(zip(header[1:], cols[1:]))))
    return rows


def check_rows(obj: ObjectFile, rows: list[tuple[int, dict[str, str]]], bits: int) -> int:
    names = REGNAMES[bits]
    checked = 0
    for loc, cols in rows:
        row = obj.cfi_row(loc)
        assert row is not None, hex(loc)
        rules = {reg: (kind, arg) for reg, kind, arg in row.rules}
        cfa = cols["CFA"]
        if cfa == "exp":
            assert row.cfa_expr is not None, hex(loc)
        else:
            m = re.fullmatch(r"([a-z0-9]+)([+-]\d+)", cfa)
            assert m is not None, cfa
            assert (row.cfa_reg, row.cfa_offset) == (names[m[1]], int(m[2])), (hex(loc), cfa, row)
        for col, text in cols.items():
            if col in ("CFA",):
                continue
            reg = row.ra_reg if col == "ra" else names.get(col)
            if reg is None:
                continue
            kind, arg = rules.get(reg, (None, None))
            if text == "u":
                assert kind in (None, RuleKind.UNDEFINED), (hex(loc), col, kind)
            elif text == "s":
                assert kind in (None, RuleKind.SAME_VALUE), (hex(loc), col, kind)
            elif text == "exp":
                assert kind == RuleKind.EXPRESSION, (hex(loc), col)
            elif text == "vexp":
                assert kind == RuleKind.VAL_EXPRESSION, (hex(loc), col)
            elif text[0] in "cv" and text[1] in "+-":
                want = RuleKind.OFFSET if text[0] == "c" else RuleKind.VAL_OFFSET
                assert (kind, arg) == (want, int(text[1:])), (hex(loc), col, text, kind, arg)
            else:
                m = re.fullmatch(r"r(\d+)", text)
                assert m is not None, text
                assert (kind, arg) == (RuleKind.REGISTER, int(m[1])), (hex(loc), col, text)
        checked += 1
    return checked


def test_cfi_rows_agree_with_readelf(program: Path) -> None:
    obj = load_object(str(program))
    bits = 32 if "m32" in program.name else 64
    rows = readelf_rows(str(program))
    assert check_rows(obj, rows, bits) >= 10


@pytest.mark.parametrize("path, bits", [(LIBC64, 64), (LIBC32, 32)])
def test_libc_cfi_rows_agree_with_readelf(path: str, bits: int) -> None:
    if not os.path.exists(path):
        pytest.fail(f"{path} not installed (scripts/test installs gcc-multilib, which brings it)")
    obj = load_object(path)
    rows = readelf_rows(path, every=9)
    assert check_rows(obj, rows, bits) > 1000


def test_no_cfi_outside_fdes(program: Path) -> None:
    obj = load_object(str(program))
    assert obj.has_cfi
    assert obj.cfi_row(0) is None
    assert obj.cfi_row(1 << 40) is None


def test_load_bias_pie_and_non_pie(program: Path) -> None:
    obj = load_object(str(program))
    text = next(s for s in obj.segments if s.flags & 1)
    page = text.offset & ~0xFFF
    if obj.e_type == "ET_EXEC":
        assert obj.load_bias(text.vaddr & ~0xFFF, page) == 0
    else:
        base = 0x5555_5555_4000 if "m32" not in program.name else 0x5655_5000
        assert obj.load_bias(base + (text.vaddr & ~0xFFF), page) == base
    assert obj.load_bias(0x1000, 1 << 40) is None


def test_locate_in_own_process() -> None:
    """A function of libc in this very process, through /proc/self/maps."""
    libc = ctypes.CDLL(None)
    addr = ctypes.cast(libc.clock_gettime, ctypes.c_void_p).value
    assert addr is not None
    modules = ModuleMap.from_pid(os.getpid())
    loc = modules.locate(addr + 4, is_return_address=False)
    assert loc is not None and loc.short_name == "libc.so.6"
    assert loc.symbol == "clock_gettime" and loc.symbol_offset == 4
    assert loc.caller_symbol == "libc.so.6!clock_gettime+0x4"
    sym = load_object(LIBC64).symbol("clock_gettime")
    assert sym is not None and loc.caller == f"libc.so.6+{sym.value + 4:#x}"
    rule = modules.frame_rule(addr)
    assert rule is not None and rule[1] is not None and rule[1].cfa_offset == 8
    assert modules.frame_rule(0) is None


def own_vdso() -> tuple[MapRegion, bytes]:
    with open("/proc/self/maps") as f:
        region = next(r for r in parse_maps(f.read()) if r.path == "[vdso]")
    with open("/proc/self/mem", "rb") as mem:
        mem.seek(region.start)
        return region, mem.read(region.end - region.start)


def test_vdso_image_from_bytes() -> None:
    region, image = own_vdso()
    obj = load_object_bytes(image)
    assert obj is load_object_bytes(bytes(image))  # cached by content
    sym = obj.symbol("__vdso_clock_gettime")
    assert sym is not None and sym.size > 0
    assert obj.symbolize(sym.value + 1) == ("__vdso_clock_gettime", 1)
    row = obj.cfi_row(sym.value)
    assert row is not None and (row.cfa_reg, row.cfa_offset) == (7, 8)  # at entry: CFA = rsp + 8
    assert (16, RuleKind.OFFSET, -8) in row.rules
    modules = ModuleMap([region], vdso_image=image)
    loc = modules.locate(region.start + sym.value, is_return_address=False)
    assert loc is not None and loc.caller_symbol == "[vdso]!__vdso_clock_gettime+0x0"
    # without the image: still named as an object, never symbolized
    loc = ModuleMap([region]).locate(region.start + sym.value, is_return_address=False)
    assert loc is not None and loc.caller == f"[vdso]+{sym.value:#x}" and loc.caller_symbol is None


def test_maps_parsing() -> None:
    lines = """\
55d8a3056000-55d8a3057000 r--p 00000000 08:01 1234   /usr/bin/my prog
55d8a3057000-55d8a3058000 r-xp 00001000 08:01 1234   /usr/bin/my prog
7f244f1c8000-7f244f1ee000 r-xp 00028000 08:01 99 /lib/libgone.so (deleted)
7f244f200000-7f244f201000 rw-p 00000000 00:00 0
7ffd1f9e6000-7ffd1f9e8000 r-xp 00000000 00:00 0                          [vdso]
"""
    regions = parse_maps(lines)
    assert regions[0] == MapRegion(0x55D8A3056000, 0x55D8A3057000, "r--p", 0, "/usr/bin/my prog", 1234)
    assert regions[1].executable and not regions[0].executable
    assert regions[2].path == "/lib/libgone.so (deleted)"
    assert regions[3].path == "" and regions[3].inode == 0
    assert regions[4].path == "[vdso]"
    with pytest.raises(ValueError):
        MapRegion.parse("garbage")


def test_deleted_and_replaced_objects_are_not_symbolized(program: Path, tmp_path: Path) -> None:
    obj = load_object(str(program))
    text = next(s for s in obj.segments if s.flags & 1)
    f3 = obj.symbol("f3")
    assert f3 is not None
    copy = tmp_path / "copy"
    shutil.copy(program, copy)
    inode = os.stat(copy).st_ino
    start = 0x10000000 + (text.vaddr & ~0xFFF) if obj.e_type == "ET_DYN" else text.vaddr & ~0xFFF
    bias = start - (text.vaddr & ~0xFFF)
    region = MapRegion(start, start + 0x10000, "r-xp", text.offset & ~0xFFF, str(copy), inode)

    good = ModuleMap([region]).locate(bias + f3.value + 3)
    assert good is not None and good.caller_symbol == "copy!f3+0x3"

    deleted = MapRegion(region.start, region.end, "r-xp", region.offset, f"{copy} (deleted)", inode)
    loc = ModuleMap([deleted]).locate(bias + f3.value + 3)
    assert loc is not None and loc.symbol is None and loc.caller_symbol is None
    assert loc.short_name == "copy"
    rule = ModuleMap([deleted]).frame_rule(bias + f3.value)
    assert rule is not None and rule[1] is None  # no CFI from a file that is not the one mapped

    other = tmp_path / "other"
    other.write_bytes(b"x")
    replaced = MapRegion(region.start, region.end, "r-xp", region.offset, str(copy), os.stat(other).st_ino)
    loc = ModuleMap([replaced]).locate(bias + f3.value + 3)
    assert loc is not None and loc.caller_symbol is None
    with pytest.raises(ElfError, match="replaced"):
        load_object(str(copy), inode=os.stat(other).st_ino)


def test_cache_follows_file_changes(program: Path, tmp_path: Path) -> None:
    copy = tmp_path / "prog"
    shutil.copy(program, copy)
    first = load_object(str(copy))
    assert load_object(str(copy)) is first
    os.utime(copy, ns=(1, 1))
    assert load_object(str(copy)) is not first


def test_broken_files_are_elf_errors(tmp_path: Path) -> None:
    with pytest.raises(ElfError):
        ObjectFile.from_bytes(b"\x7fELF" + b"\x02\x01\x01" + b"\0" * 20)
    with pytest.raises(ElfError):
        load_object_bytes(b"not an elf at all")
    junk = tmp_path / "junk"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(ElfError):
        load_object(str(junk))
    with pytest.raises(ElfError, match="cannot open"):
        load_object(str(tmp_path / "missing"))
    # and a module map around them names the object but symbolizes nothing
    region = MapRegion(0x1000, 0x2000, "r-xp", 0, str(junk), os.stat(junk).st_ino)
    loc = ModuleMap([region]).locate(0x1100)
    assert loc is not None and loc.caller == "junk+0x100" and loc.caller_symbol is None


def test_truncated_cfi_is_an_elf_error_not_a_crash(program: Path) -> None:
    data = bytearray(program.read_bytes())
    obj = ObjectFile.from_bytes(bytes(data), "prog")
    f3 = obj.symbol("f3")
    assert f3 is not None and obj.cfi_row(f3.value) is not None
    # overwrite .eh_frame with 0xff: every FDE becomes garbage
    out = subprocess.run(["readelf", "-SW", str(program)], capture_output=True, text=True, check=True).stdout
    m = re.search(r"\.eh_frame\s+PROGBITS\s+([0-9a-f]+)\s+([0-9a-f]+)\s+([0-9a-f]+)", out)
    assert m is not None
    off, size = int(m[2], 16), int(m[3], 16)
    data[off:off + size] = b"\xff" * size
    broken = ObjectFile.from_bytes(bytes(data), "broken")
    with pytest.raises(ElfError):
        broken.cfi_row(f3.value)


def test_location_formatting() -> None:
    loc = Location(0x7F0000001239, "libc.so.6", 0x1239, "clock_gettime", 0x39)
    assert loc.caller == "libc.so.6+0x1239"
    assert loc.caller_symbol == "libc.so.6!clock_gettime+0x39"
    assert loc.stack_entry == "0x7f0000001239 libc.so.6!clock_gettime+0x39"
    bare = Location(0x7F0000001239, "libc.so.6", 0x1239, None, 0)
    assert bare.caller_symbol is None and bare.stack_entry == "0x7f0000001239 libc.so.6+0x1239"


def test_eh_frame_without_hdr_is_parsed_in_full(tmp_path: Path) -> None:
    prog = compile_c(tmp_path / "nohdr", "-Wl,--no-eh-frame-hdr")
    out = subprocess.run(["readelf", "-SW", str(prog)], capture_output=True, text=True, check=True).stdout
    assert ".eh_frame_hdr" not in out and ".eh_frame" in out
    obj = load_object(str(prog))
    assert check_rows(obj, readelf_rows(str(prog)), 64) >= 10


@pytest.mark.parametrize("m32", [False, True], ids=["x86_64", "i386"])
def test_debug_frame(tmp_path: Path, m32: bool) -> None:
    """-g without unwind tables: the program's CFI is in .debug_frame only."""
    flags = ("-g", "-fno-asynchronous-unwind-tables", "-fno-unwind-tables", "-fomit-frame-pointer")
    prog = compile_c(tmp_path / "dbg", *flags, *(("-m32",) if m32 else ()))
    out = subprocess.run(["readelf", "-SW", str(prog)], capture_output=True, text=True, check=True).stdout
    assert ".debug_frame" in out
    obj = load_object(str(prog))
    f2 = obj.symbol("f2")
    assert f2 is not None
    row = obj.cfi_row(f2.value)
    assert row is not None
    assert (row.cfa_reg, row.cfa_offset) == ((4, 4) if m32 else (7, 8))
    later = obj.cfi_row(f2.value + f2.size // 2)
    assert later is not None and later.cfa_offset > row.cfa_offset  # after its push/sub
