"""Pure tests of the auxv parser and decoder on the vectors checked into tests/fixtures (see its
README.md), against a struct-level reading of the same bytes and glibc's LD_SHOW_AUXV output
of the same process; a fake memory reader for strings and AT_RANDOM; and property tests:
truncated, corrupted or random vectors get an AuxvError, nothing else."""
from __future__ import annotations

import json
import os
import re
import struct
from functools import cache
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tracer.auxv import (MAX_ENTRIES, AuxvEntry, aux_name, auxv_from_stack, decode, find,
                         parse_auxv)
from tracer.consts import AuxType, Hwcap2X86, HwcapX86
from tracer.errors import AuxvError, MemoryReadError
from tracer.inspect import AuxvReport
from tracer.render.escape import escape_text
from tracer.render.inspect import auxv_json, auxv_text

FIXTURES = Path(__file__).resolve().parent / "fixtures"
WORD = {"x86_64": 8, "i386": 4}
ARCHES = tuple(WORD)
PAGE = 4096


@cache
def blob(arch: str) -> bytes:
    return (FIXTURES / f"auxv-{arch}.bin").read_bytes()


def struct_pairs(data: bytes, word: int) -> list[tuple[int, int]]:
    """The oracle: (type, value) words up to AT_NULL, read with struct."""
    out = []
    for t, v in struct.iter_unpack("<QQ" if word == 8 else "<II", data):
        if t == 0:
            return out
        out.append((t, v))
    raise AssertionError("no AT_NULL")


@cache
def ld_show_auxv(arch: str) -> list[tuple[str, int | None, str]]:
    """glibc's lines `AT_NAME: value`, as (name, type number where glibc gives it, value)."""
    out = []
    for line in (FIXTURES / f"auxv-{arch}.ld_show_auxv.txt").read_text().splitlines():
        m = re.match(r"^AT_\?\?\? \((0x[0-9a-f]+)\): (.*)$", line)
        if m:
            out.append(("?", int(m.group(1), 16), m.group(2).strip()))
            continue
        name, _, value = line.partition(":")
        out.append((name, None, value.strip()))
    return out


class FakeMemory:
    """A tracee's memory as a few mapped pages; anything else raises MemoryReadError, as
    target.Memory does for an unmapped address."""

    def __init__(self) -> None:
        self.pages: dict[int, bytearray] = {}

    def map(self, addr: int, data: bytes) -> None:
        for i, b in enumerate(data):
            page = self.pages.setdefault((addr + i) // PAGE, bytearray(PAGE))
            page[(addr + i) % PAGE] = b

    def read(self, addr: int, size: int) -> bytes:
        out = bytearray()
        for a in range(addr, addr + size):
            page = self.pages.get(a // PAGE)
            if page is None:
                raise MemoryReadError(addr, size, "unmapped")
            out.append(page[a % PAGE])
        return bytes(out)


# --------------------------------------------------------------------------- the blobs

@pytest.mark.parametrize("arch", ARCHES)
def test_pairs_equal_struct_reading(arch):
    pairs = parse_auxv(blob(arch), WORD[arch])
    assert pairs == struct_pairs(blob(arch), WORD[arch])
    assert len(pairs) == (22 if arch == "x86_64" else 23)


def test_i386_file_has_zeros_after_at_null():
    """The kernel sizes /proc/PID/auxv of a compat task in native words: the parser stops at
    the first AT_NULL, whatever follows."""
    data = blob("i386")
    assert len(data) == 208 and data[-24:] == bytes(24)
    assert parse_auxv(data[:192], 4) == parse_auxv(data, 4)


@pytest.mark.parametrize("arch", ARCHES)
def test_names_and_values_equal_ld_show_auxv(arch):
    """Same order, same types, same values as glibc printed for the same process; where glibc
    knows no name (27, 28) it gives the number and we give the kernel's name."""
    pairs = parse_auxv(blob(arch), WORD[arch])
    glibc = ld_show_auxv(arch)
    assert len(glibc) == len(pairs)
    entries = decode(pairs)
    for (t, v), e, (gname, gtype, gvalue) in zip(pairs, entries, glibc):
        assert e.type == t and e.value == v
        if gname == "?":
            assert gtype == t and int(gvalue, 16) == v
            assert e.name == {27: "AT_RSEQ_FEATURE_SIZE", 28: "AT_RSEQ_ALIGN"}[t]
            continue
        assert e.name == gname
        if t in (AuxType.AT_PLATFORM, AuxType.AT_EXECFN):
            continue                                       # glibc prints the string
        if t == AuxType.AT_HWCAP and arch == "i386":
            # glibc's i386 loader names the bits, lower case, in bit order
            assert e.text.lower().split(" | ") == gvalue.split()
            continue
        if t == AuxType.AT_HWCAP:
            assert int(gvalue, 16) == v                    # x86_64 glibc: bare hex
            continue
        assert int(gvalue, 0) == v, (gname, gvalue, v)


@pytest.mark.parametrize("arch", ARCHES)
def test_texts_without_memory(arch):
    entries = {e.name: e for e in decode(parse_auxv(blob(arch), WORD[arch]))}
    for name in ("AT_PLATFORM", "AT_EXECFN", "AT_RANDOM", "AT_SYSINFO_EHDR", "AT_PHDR",
                 "AT_BASE", "AT_ENTRY"):
        assert entries[name].text == f"{entries[name].value:#x}", name
    assert entries["AT_MINSIGSTKSZ"].text == "3632"
    assert entries["AT_PAGESZ"].text == "4096"
    assert entries["AT_RSEQ_FEATURE_SIZE"].text == "28"
    assert entries["AT_RSEQ_ALIGN"].text == "32"
    assert entries["AT_HWCAP2"].text == "FSGSBASE"
    hw = entries["AT_HWCAP"]
    assert hw.value == 0x1F8BFBFF
    names = hw.text.split(" | ")
    assert names[:4] == ["FPU", "VME", "DE", "PSE"] and names[-1] == "HT"
    assert sum(HwcapX86[n].value for n in names) == hw.value
    if arch == "i386":
        assert entries["AT_SYSINFO"].text == f"{entries['AT_SYSINFO'].value:#x}"
        assert entries["AT_SYSINFO"].value - entries["AT_SYSINFO_EHDR"].value == 0x5E0
    else:
        assert "AT_SYSINFO" not in entries


def test_names_of_every_type_the_kernel_defines():
    # include/uapi/linux/auxvec.h and arch/x86/include/uapi/asm/auxvec.h
    kernel = {0: "AT_NULL", 1: "AT_IGNORE", 2: "AT_EXECFD", 3: "AT_PHDR", 4: "AT_PHENT",
              5: "AT_PHNUM", 6: "AT_PAGESZ", 7: "AT_BASE", 8: "AT_FLAGS", 9: "AT_ENTRY",
              10: "AT_NOTELF", 11: "AT_UID", 12: "AT_EUID", 13: "AT_GID", 14: "AT_EGID",
              15: "AT_PLATFORM", 16: "AT_HWCAP", 17: "AT_CLKTCK", 23: "AT_SECURE",
              24: "AT_BASE_PLATFORM", 25: "AT_RANDOM", 26: "AT_HWCAP2",
              27: "AT_RSEQ_FEATURE_SIZE", 28: "AT_RSEQ_ALIGN", 29: "AT_HWCAP3",
              30: "AT_HWCAP4", 31: "AT_EXECFN", 32: "AT_SYSINFO", 33: "AT_SYSINFO_EHDR",
              51: "AT_MINSIGSTKSZ"}
    for t, name in kernel.items():
        assert aux_name(t) == name
    assert aux_name(1000) == "AT_1000"
    assert decode([(1000, 5)]) == [AuxvEntry(1000, "AT_1000", 5, "0x5")]


def test_flag_texts():
    assert decode([(AuxType.AT_HWCAP, 0)])[0].text == "0"
    assert decode([(AuxType.AT_HWCAP, 1 << 31 | 1)])[0].text == "FPU | PBE"
    # bit 10 and bit 20 are reserved in CPUID.1:EDX: shown as a number, not dropped
    assert decode([(AuxType.AT_HWCAP, 1 << 10 | 1 << 20 | 1)])[0].text == "FPU | 0x100400"
    assert decode([(AuxType.AT_HWCAP2, 3)])[0].text == "RING3MWAIT | FSGSBASE"
    assert decode([(AuxType.AT_HWCAP2, 1 << 40)])[0].text == f"{1 << 40:#x}"
    assert {f.name for f in Hwcap2X86} == {"RING3MWAIT", "FSGSBASE"}


def test_find():
    pairs = parse_auxv(blob("x86_64"), 8)
    assert find(pairs, AuxType.AT_PAGESZ) == 4096
    assert find(pairs, AuxType.AT_SYSINFO) is None


# --------------------------------------------------------------------------- memory

def test_strings_and_random_from_memory():
    mem = FakeMemory()
    mem.map(0x7FFF0000, b"x86_64\0")
    mem.map(0x7FFF0100, b"/usr/bin/sleep\0")
    mem.map(0x7FFF0200, bytes(range(0xA0, 0xB0)))
    pairs = [(AuxType.AT_PLATFORM, 0x7FFF0000), (AuxType.AT_EXECFN, 0x7FFF0100),
             (AuxType.AT_RANDOM, 0x7FFF0200), (AuxType.AT_BASE_PLATFORM, 0x1000)]
    e = decode(pairs, mem.read)
    assert [x.text for x in e] == ["x86_64", "/usr/bin/sleep",
                                   "a0 a1 a2 a3 a4 a5 a6 a7 a8 a9 aa ab ac ad ae af", "0x1000"]


def test_string_at_the_end_of_the_last_mapped_page():
    """The stack's top page ends the mapping: a string there must not need a read past it."""
    mem = FakeMemory()
    top = 0x7FFF1000
    mem.map(top - 9, b"/bin/ab\0\0")
    assert decode([(AuxType.AT_EXECFN, top - 9)], mem.read)[0].text == "/bin/ab"
    mem.map(top - PAGE - 3, b"/ab")                      # crosses into the next page
    mem.map(top - PAGE, b"cd\0")
    assert decode([(AuxType.AT_EXECFN, top - PAGE - 3)], mem.read)[0].text == "/abcd"


def test_random_on_an_unreadable_page_falls_back_to_the_address():
    mem = FakeMemory()
    mem.map(0x5000 - 8, bytes(8))                         # only half of the 16 bytes
    assert decode([(AuxType.AT_RANDOM, 0x5000 - 8)], mem.read)[0].text == "0x4ff8"


def test_non_utf8_string():
    mem = FakeMemory()
    mem.map(0x9000, b"/tmp/\xff\xfe\0")
    # kept as the bytes were (os.fsdecode's surrogateescape): the same file opens again,
    # and the text output escapes it as strace does
    text = decode([(AuxType.AT_EXECFN, 0x9000)], mem.read)[0].text
    assert os.fsencode(text) == b"/tmp/\xff\xfe"
    assert escape_text(text) == "/tmp/\\377\\376"


def _stack(arch: str, base: int, argv: list[bytes], envp: list[bytes]) -> FakeMemory:
    """An initial stack as fs/binfmt_elf.c create_elf_tables lays it out: argc, argv[],
    NULL, envp[], NULL, auxv pairs; the strings above."""
    w = WORD[arch]
    pack = (lambda v: v.to_bytes(w, "little"))
    strings = base + 0x800
    ptrs, blobs = [], b""
    for s in argv + envp:
        ptrs.append(strings + len(blobs))
        blobs += s + b"\0"
    words = [len(argv), *ptrs[:len(argv)], 0, *ptrs[len(argv):], 0]
    mem = FakeMemory()
    mem.map(base, b"".join(pack(v) for v in words) + blob(arch))
    mem.map(strings, blobs)
    return mem


@pytest.mark.parametrize("arch", ARCHES)
def test_auxv_from_stack(arch):
    base = 0x7FFFFFFDE000 if arch == "x86_64" else 0xFFFDE000
    mem = _stack(arch, base, [b"./prog", b"-x"], [b"HOME=/root", b"A=1", b"B=2"])
    assert auxv_from_stack(mem.read, base, WORD[arch]) == parse_auxv(blob(arch), WORD[arch])


@pytest.mark.parametrize("arch", ARCHES)
def test_auxv_from_stack_errors(arch):
    w = WORD[arch]
    mem = FakeMemory()
    mem.map(0x10000, (1 << 40 if w == 8 else 0xFFFFFFFF).to_bytes(w, "little"))
    with pytest.raises(AuxvError, match="argc"):
        auxv_from_stack(mem.read, 0x10000, w)
    mem = FakeMemory()
    mem.map(0x20000, (1).to_bytes(w, "little") + b"\x01" * (PAGE - w))   # envp never ends
    with pytest.raises(MemoryReadError):
        auxv_from_stack(mem.read, 0x20000, w)


def test_parse_errors():
    with pytest.raises(AuxvError, match="word size"):
        parse_auxv(blob("x86_64"), 2)
    with pytest.raises(AuxvError, match="AT_NULL"):
        parse_auxv(b"", 8)
    with pytest.raises(AuxvError, match="AT_NULL"):
        parse_auxv(struct.pack("<QQ", 6, 4096) * (MAX_ENTRIES + 5) + bytes(16), 8)
    assert parse_auxv(bytes(16), 8) == []


@pytest.mark.parametrize("arch", ARCHES)
def test_every_truncation(arch):
    data, w = blob(arch), WORD[arch]
    end = len(struct_pairs(data, w)) * 2 * w                # offset of AT_NULL
    for n in range(len(data) + 1):
        if n >= end + 2 * w:
            assert parse_auxv(data[:n], w) == struct_pairs(data, w)
        else:
            with pytest.raises(AuxvError):
                parse_auxv(data[:n], w)


# --------------------------------------------------------------------------- rendering

@pytest.mark.parametrize("arch", ARCHES)
def test_json_and_text(arch):
    pairs = parse_auxv(blob(arch), WORD[arch])
    rep = AuxvReport(tuple(pairs), tuple(decode(pairs)), "stack", ())
    doc = json.loads(auxv_json(42, arch, rep))
    assert doc["pid"] == 42 and doc["abi"] == arch and doc["source"] == "stack"
    assert [(e["type"], e["value"]) for e in doc["entries"]] == pairs
    assert all(e["name"] == aux_name(e["type"]) for e in doc["entries"])
    assert "stack_mismatch" not in doc
    text = auxv_text(42, arch, rep)
    assert len(text.splitlines()) == len(pairs) + 1
    assert "AT_RSEQ_ALIGN" in text and "AT_NULL" not in text
    rep2 = AuxvReport(tuple(pairs), tuple(decode(pairs)), "procfs", ("AT_RANDOM",))
    assert json.loads(auxv_json(42, arch, rep2))["stack_mismatch"] == ["AT_RANDOM"]
    assert "AT_RANDOM" in auxv_text(42, arch, rep2).splitlines()[1]


# --------------------------------------------------------------------------- properties

_FAST = settings(deadline=1000, max_examples=200, derandomize=True,
                 suppress_health_check=[HealthCheck.too_slow])


def _parse_or_our_error(data: bytes, word: int) -> list[tuple[int, int]] | None:
    try:
        pairs = parse_auxv(data, word)
    except AuxvError:
        return None
    assert len(pairs) <= MAX_ENTRIES
    assert all(t != 0 for t, _ in pairs)
    decode(pairs)
    return pairs


@_FAST
@given(st.binary(max_size=2048), st.sampled_from([4, 8]))
def test_random_bytes(raw, word):
    _parse_or_our_error(raw, word)


@_FAST
@given(st.binary(max_size=64), st.integers(-4, 64))
def test_any_word_size(raw, word):
    try:
        parse_auxv(raw, word)
    except AuxvError:
        pass


@pytest.mark.parametrize("arch", ARCHES)
@_FAST
@given(data=st.data())
def test_random_byte_flips(arch, data):
    buf = bytearray(blob(arch))
    for _ in range(data.draw(st.integers(1, 8))):
        buf[data.draw(st.integers(0, len(buf) - 1))] ^= data.draw(st.integers(1, 255))
    cut = data.draw(st.integers(0, len(buf)))
    _parse_or_our_error(bytes(buf[:cut]), WORD[arch])


@_FAST
@given(st.lists(st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1)), max_size=40),
       st.binary(min_size=0, max_size=256), st.integers(0, 2**64 - 1))
def test_decode_never_raises(pairs, memory, at):
    """decode() renders any pair, with memory that is partly mapped, garbage or absent."""
    mem = FakeMemory()
    mem.map(at % (2**64 - len(memory) - 1), memory)
    entries = decode(pairs, mem.read)
    assert [(e.type, e.value) for e in entries] == pairs
    assert all(isinstance(e.text, str) and e.text for e in entries)
    decode(pairs)


@pytest.mark.parametrize("arch", ARCHES)
@_FAST
@given(words=st.lists(st.integers(0, 2**32 - 1), max_size=200), start=st.integers(0, 16))
def test_auxv_from_stack_on_garbage(arch, words, start):
    """A stack of random words: our errors only, and quickly (the reads hit the end)."""
    w = WORD[arch]
    mem = FakeMemory()
    mem.map(0x40000, b"".join(x.to_bytes(w, "little") for x in words))
    try:
        pairs = auxv_from_stack(mem.read, 0x40000 + start * w, w)
    except (AuxvError, MemoryReadError):
        return
    assert len(pairs) <= MAX_ENTRIES
