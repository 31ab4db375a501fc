"""Pure tests on the vDSO images checked into tests/fixtures (see its README.md): the parser
against `file` and `objdump -T` recorded when the images were dumped, the disassembler against
`objdump -d` of the same bytes, the patch sites and the relocation of displaced instructions;
and property tests: truncated, corrupted or random bytes get a VdsoError/ElfError, nothing else.
"""
from __future__ import annotations

import re
import signal
import shutil
import struct
import subprocess
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import capstone
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tracer.abi import I386, X86_64, Abi
from tracer.disasm import Gateway, disassemble, gateway, relocate, sites
from tracer.errors import ElfError, VdsoError
from tracer.render.inspect import vdso_json, vdso_text
from tracer.vdso import GATEWAY_SYMBOL, SIGRETURN_TRAMPOLINES, VdsoImage, parse_image

FIXTURES = Path(__file__).resolve().parent / "fixtures"
ARCHES = ("x86_64", "i386")
ABIS = {"x86_64": X86_64, "i386": I386}

# Facts of the fixtures, from readelf -h/-S/-n and uname -r of the machine that made them.
KERNEL = "6.18.44"
FACTS = {
    "x86_64": dict(soname="linux-vdso.so.1", image_size=6688, text=(0x780, 0x780 + 0xCDC),
                   eh_frame=(0x660, 0x660 + 0x11C), versions={"LINUX_2.6"}),
    "i386": dict(soname="linux-gate.so.1", image_size=7576, text=(0x5E0, 0x5E0 + 0x1325),
                 eh_frame=(0x4CC, 0x4CC + 0x10C), versions={"LINUX_2.5", "LINUX_2.6"}),
}


# --------------------------------------------------------------------------- oracles

@dataclass(frozen=True)
class DynSym:
    value: int
    bind: str          # GLOBAL, WEAK, LOCAL
    type: str          # FUNC, OBJECT
    section: str
    size: int
    version: str
    name: str


_OBJDUMP_T = re.compile(r"^([0-9a-f]+) (.{7}) (\S+)\s+([0-9a-f]+)\s+(\S+)\s+(\S+)$")


def parse_objdump_t(text: str) -> list[DynSym]:
    """`objdump -T` lines: VALUE FLAGS SECTION SIZE VERSION NAME."""
    out = []
    for line in text.splitlines():
        m = _OBJDUMP_T.match(line)
        if not m:
            continue
        flags = m.group(2)
        bind = "WEAK" if "w" in flags else "GLOBAL" if "g" in flags else "LOCAL"
        typ = "FUNC" if "F" in flags else "OBJECT" if "O" in flags else "NOTYPE"
        out.append(DynSym(int(m.group(1), 16), bind, typ, m.group(3), int(m.group(4), 16),
                          m.group(5).strip("()"), m.group(6)))
    return out


@dataclass(frozen=True)
class OdInsn:
    address: int
    raw: bytes
    text: str          # "call   5e0 <__kernel_vsyscall@@LINUX_2.5>", Intel syntax

    @property
    def words(self) -> list[str]:
        return self.text.split()

    @property
    def target(self) -> int | None:
        """The hex target objdump prints for a direct branch or call."""
        m = re.match(r"^(?:bnd |notrack )?(j\w+|call|loop\w*)\s+([0-9a-f]+)(?: <|$)", self.text)
        return int(m.group(2), 16) if m else None


_OD_LINE = re.compile(r"^\s*([0-9a-f]+):\t([0-9a-f ]+?)\s*(?:\t(.*))?$")


def parse_objdump_d(text: str) -> dict[int, OdInsn]:
    """`objdump -d -M intel` instruction lines by address; a long instruction's bytes go on
    continuation lines without text."""
    out: dict[int, OdInsn] = {}
    last: int | None = None
    for line in text.splitlines():
        m = _OD_LINE.match(line)
        if not m:
            continue
        addr, raw = int(m.group(1), 16), bytes.fromhex(m.group(2))
        if m.group(3) is None and last is not None:
            prev = out[last]
            out[last] = OdInsn(prev.address, prev.raw + raw, prev.text)
            continue
        out[addr] = OdInsn(addr, raw, re.sub(r"\s+#.*$", "", m.group(3) or "").strip())
        last = addr
    return out


def objdump_d(path: Path) -> dict[int, OdInsn]:
    if shutil.which("objdump") is None:
        pytest.fail("objdump is not installed (binutils): run scripts/setup")
    r = subprocess.run(["objdump", "-d", "-M", "intel", "-w", str(path)], capture_output=True,
                       text=True, check=True)
    return parse_objdump_d(r.stdout)


_PREFIXES = {"rep", "repz", "repe", "repnz", "repne", "lock", "bnd", "notrack", "data16"}
_SIZE_SUFFIX = {"BYTE": "b", "WORD": "w", "DWORD": "d", "QWORD": "q"}


def same_mnemonic(cs_mnemonic: str, od: OdInsn) -> bool:
    """Capstone and objdump spell a few instructions differently: `66 90` is capstone's
    `nop` and objdump's `xchg ax,ax`; `rep stosq` is objdump's `rep stos QWORD PTR ...`."""
    w = od.words
    if not w:
        return False
    od_mn = f"{w[0]} {w[1]}" if w[0] in _PREFIXES and len(w) > 1 else w[0]
    if cs_mnemonic == od_mn:
        return True
    if cs_mnemonic == "nop" and od.text.replace(" ", "") == "xchgax,ax":
        return True
    size = next((_SIZE_SUFFIX[x] for x in w if x in _SIZE_SUFFIX), "")
    return cs_mnemonic == od_mn + size


def function_insns(od: dict[int, OdInsn], start: int, size: int) -> list[OdInsn]:
    return [od[a] for a in sorted(od) if start <= a < start + size]


# --------------------------------------------------------------------------- fixtures

@cache
def image_bytes(arch: str) -> bytes:
    return (FIXTURES / f"vdso-{arch}.so").read_bytes()


@cache
def image(arch: str) -> VdsoImage:
    return parse_image(image_bytes(arch))


@cache
def objdump_t(arch: str) -> list[DynSym]:
    return parse_objdump_t((FIXTURES / f"vdso-{arch}.objdump-T.txt").read_text())


@cache
def od_insns(arch: str) -> dict[int, OdInsn]:
    return objdump_d(FIXTURES / f"vdso-{arch}.so")


def kernel_entries(arch: str, od: OdInsn, gw_offset: int | None) -> bool:
    """objdump's view of a fallback site: a system call instruction, or (i386) a call of
    __kernel_vsyscall."""
    w = od.words
    if w and w[0] in ("syscall", "sysenter"):
        return True
    if od.text.replace(" ", "") == "int0x80":
        return True
    return gw_offset is not None and w[:1] == ["call"] and od.target == gw_offset


# --------------------------------------------------------------------------- the images

@pytest.mark.parametrize("arch", ARCHES)
def test_file_calls_it_a_shared_object_with_our_build_id(arch):
    file_says = (FIXTURES / f"vdso-{arch}.file.txt").read_text()
    assert "ELF" in file_says and "shared object" in file_says
    assert ("64-bit" if arch == "x86_64" else "32-bit") in file_says
    m = re.search(r"BuildID\[sha1\]=([0-9a-f]+)", file_says)
    assert m, file_says
    assert image(arch).build_id == m.group(1)


@pytest.mark.parametrize("arch", ARCHES)
def test_header_facts(arch):
    img, facts = image(arch), FACTS[arch]
    assert img.abi is ABIS[arch]
    assert img.soname == facts["soname"]
    assert img.linux_version == KERNEL
    assert (FIXTURES / "kernel-release.txt").read_text().startswith(KERNEL)
    assert img.image_size == facts["image_size"]
    assert img.text == facts["text"]
    assert img.eh_frame == facts["eh_frame"]
    assert len(img.data) == 8192


@pytest.mark.parametrize("arch", ARCHES)
def test_image_size_is_where_the_section_headers_end(arch):
    data = image_bytes(arch)
    if arch == "x86_64":
        shoff, = struct.unpack_from("<Q", data, 0x28)
        shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    else:
        shoff, = struct.unpack_from("<I", data, 0x20)
        shentsize, shnum = struct.unpack_from("<HH", data, 0x2E)
    assert image(arch).image_size == shoff + shnum * shentsize


@pytest.mark.parametrize("arch", ARCHES)
def test_symbols_equal_objdump_T(arch):
    ours = {(s.value, s.version, s.name, s.size, s.bind, s.type) for s in image(arch).symbols}
    theirs = {(d.value, d.version, d.name, d.size, d.bind, d.type) for d in objdump_t(arch)}
    assert ours == theirs
    assert len(image(arch).symbols) == len(objdump_t(arch))
    assert {s.version for s in image(arch).symbols} == FACTS[arch]["versions"]


EXPECTED_FUNCTIONS = {
    "x86_64": {"__vdso_gettimeofday": "gettimeofday", "__vdso_time": "time",
               "__vdso_clock_gettime": "clock_gettime", "__vdso_clock_getres": "clock_getres",
               "__vdso_getcpu": "getcpu", "__vdso_getrandom": "getrandom"},
    "i386": {"__kernel_vsyscall": "__kernel_vsyscall", "__kernel_sigreturn": "__kernel_sigreturn",
             "__kernel_rt_sigreturn": "__kernel_rt_sigreturn",
             "__vdso_gettimeofday": "gettimeofday", "__vdso_time": "time",
             "__vdso_clock_gettime": "clock_gettime",
             "__vdso_clock_gettime64": "clock_gettime64",
             "__vdso_clock_getres": "clock_getres", "__vdso_getcpu": "getcpu"},
}


@pytest.mark.parametrize("arch", ARCHES)
def test_functions_fold_aliases(arch):
    img = image(arch)
    assert {f.symbol: f.plain for f in img.functions} == EXPECTED_FUNCTIONS[arch]
    by_addr: dict[int, set[str]] = {}
    for d in objdump_t(arch):
        if d.type == "FUNC":
            by_addr.setdefault(d.value, set()).add(d.name)
    assert {f.image_offset: set(f.aliases) for f in img.functions} == by_addr
    for f in img.functions:
        for name in (*f.aliases, f.plain):
            assert img.function(name) is f
        assert img.function_at(f.image_offset) is f
        assert img.function_at(f.image_offset + f.size - 1) is f
        assert img.symbolize(f.image_offset + 1) == (f.symbol, 1)
        assert img.text[0] <= f.image_offset < f.image_offset + f.size <= img.text[1]
    assert img.function("no_such_function") is None
    if arch == "x86_64":
        assert img.function("time").symbol == "__vdso_time"
        assert img.function("time").aliases == ("__vdso_time", "time")


def test_i386_sigreturn_trampolines_are_exported():
    names = {f.symbol for f in image("i386").functions}
    assert SIGRETURN_TRAMPOLINES <= names
    assert not SIGRETURN_TRAMPOLINES & {f.symbol for f in image("x86_64").functions}


def test_gateway():
    assert gateway(image("x86_64")) is None
    assert gateway(image("i386")) == Gateway(GATEWAY_SYMBOL, ("sysenter", "int 0x80"))


@pytest.mark.parametrize("arch", ARCHES)
def test_renderers_agree_with_the_image(arch):
    import json
    img = image(arch)
    doc = json.loads(vdso_json(img, 0, len(img.data), gateway(img)))
    assert doc["abi"] == arch and doc["build_id"] == img.build_id
    assert {(s["value"], s["version"], s["name"]) for s in doc["symbols"]} == \
        {(d.value, d.version, d.name) for d in objdump_t(arch)}
    assert (doc["gateway"] is None) == (arch == "x86_64")
    text = vdso_text(img, 0, len(img.data), gateway(img))
    assert img.build_id in text and all(f.symbol in text for f in img.functions)


# --------------------------------------------------------------------------- disassembly

@pytest.mark.parametrize("arch", ARCHES)
def test_disassembly_equals_objdump(arch):
    img, od = image(arch), od_insns(arch)
    for f in img.functions:
        ours = disassemble(img, f)
        theirs = function_insns(od, f.image_offset, f.size)
        assert [i.address for i in ours] == [o.address for o in theirs], f.symbol
        for i, o in zip(ours, theirs):
            assert i.raw == o.raw, (f.symbol, hex(i.address))
            assert same_mnemonic(i.mnemonic, o), (f.symbol, hex(i.address), i.mnemonic, o.text)
            if o.target is not None:
                assert i.target == o.target, (f.symbol, hex(i.address), o.text)
        assert sum(i.size for i in ours) == f.size, f.symbol


@pytest.mark.parametrize("arch", ARCHES)
def test_disassembly_at_a_runtime_base(arch):
    img = image(arch)
    base = 0x7F0000000000 if arch == "x86_64" else 0xF7F00000
    f = img.function("clock_gettime")
    at0, atb = disassemble(img, f), disassemble(img, f, base)
    assert [i.address + base for i in at0] == [i.address for i in atb]
    assert [i.target_symbol for i in at0] == [i.target_symbol for i in atb]
    assert [i.mnemonic for i in at0] == [i.mnemonic for i in atb]
    att = disassemble(img, f, syntax="att")
    assert [i.address for i in att] == [i.address for i in at0]


def test_i386_gateway_disassembly():
    img = image("i386")
    insns = disassemble(img, img.function(GATEWAY_SYMBOL))
    assert [i.mnemonic for i in insns] == ["push", "push", "push", "mov", "sysenter", "int",
                                           "pop", "pop", "pop", "ret"]
    assert [i.is_syscall for i in insns].count(True) == 2
    assert insns[-1].is_ret


def test_i386_fallback_calls_are_symbolized():
    img = image("i386")
    gw = img.function(GATEWAY_SYMBOL)
    calls = [i for i in disassemble(img, img.function("clock_gettime")) if i.target == gw.image_offset]
    assert calls and all(i.mnemonic == "call" and i.target_symbol == GATEWAY_SYMBOL for i in calls)


# --------------------------------------------------------------------------- sites

@pytest.mark.parametrize("arch", ARCHES)
def test_sites_equal_objdump(arch):
    img, od = image(arch), od_insns(arch)
    gw = img.function(GATEWAY_SYMBOL)
    for f in img.functions:
        s = sites(img, f)
        theirs = function_insns(od, f.image_offset, f.size)
        gw_off = gw.image_offset if gw is not None and gw is not f else None
        lo, hi = f.image_offset, f.image_offset + f.size
        assert s.entry == f.image_offset
        assert s.rets == tuple(o.address for o in theirs if o.words[:1] == ["ret"]), f.symbol
        assert s.fallbacks == tuple(o.address for o in theirs
                                    if kernel_entries(arch, o, gw_off)), f.symbol
        assert s.escapes == tuple(o.address for o in theirs
                                  if o.words and o.words[0].startswith("j")
                                  and o.target is not None and not lo <= o.target < hi), f.symbol


def test_recorded_sites():
    """What the engine relies on, on these two kernels' images."""
    x = image("x86_64")
    for name in ("clock_gettime", "gettimeofday", "clock_getres", "getrandom"):
        s = sites(x, x.function(name))
        assert s.fallbacks and s.rets, name
        od = od_insns("x86_64")
        assert all(od[a].words[0] == "syscall" for a in s.fallbacks)
    assert sites(x, x.function("time")).fallbacks == ()
    i = image("i386")
    gw = i.function(GATEWAY_SYMBOL)
    assert sites(i, gw).fallbacks == (0x5E5, 0x5E7)       # sysenter, int 0x80
    assert sites(i, gw).rets == (0x5EC,)
    for name in ("clock_gettime", "clock_gettime64", "gettimeofday", "clock_getres"):
        s = sites(i, i.function(name))
        assert s.fallbacks and s.rets, name
        for a in s.fallbacks:
            assert i.data[a] == 0xE8                       # call rel32 __kernel_vsyscall
    assert 0xDC7 in sites(i, i.function("clock_gettime")).fallbacks


# --------------------------------------------------------------------------- relocate

def _cs(abi: Abi) -> capstone.Cs:
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64 if abi.word == 8 else capstone.CS_MODE_32)
    md.detail = True
    return md


def _target(i: capstone.CsInsn) -> int | None:
    if i.group(capstone.CS_GRP_BRANCH_RELATIVE) and i.operands[0].type == capstone.x86.X86_OP_IMM:
        return int(i.operands[0].imm)
    return None


def _rip_ea(i: capstone.CsInsn) -> int | None:
    for op in i.operands:
        if op.type == capstone.x86.X86_OP_MEM and op.mem.base == capstone.x86.X86_REG_RIP:
            return i.address + i.size + op.mem.disp
    return None


def _operands(i: capstone.CsInsn) -> list[tuple[int, int]]:
    """Each operand's kind and register or immediate; memory operands by kind only (their
    rip-relative displacement differs by design)."""
    out = []
    for op in i.operands:
        if op.type == capstone.x86.X86_OP_REG:
            out.append((op.type, op.reg))
        elif op.type == capstone.x86.X86_OP_IMM:
            out.append((op.type, op.imm))
        else:
            out.append((op.type, op.size))
    return out


def _pushed(abi: Abi, insns: list[capstone.CsInsn]) -> int:
    """The return address a relocated call leaves on the stack (push imm32, or lea+2 movs)."""
    if abi.word == 4:
        assert insns[0].mnemonic == "push"
        return int(insns[0].operands[0].imm) & 0xFFFFFFFF
    assert [i.mnemonic for i in insns[:3]] == ["lea", "mov", "mov"]
    assert insns[0].op_str == "rsp, [rsp - 8]"
    assert insns[1].op_str.startswith("dword ptr [rsp],")
    assert insns[2].op_str.startswith("dword ptr [rsp + 4],")
    lo = int(insns[1].operands[1].imm) & 0xFFFFFFFF
    hi = int(insns[2].operands[1].imm) & 0xFFFFFFFF
    return hi << 32 | lo


def check_relocation(abi: Abi, code: bytes, orig: int, slot: int) -> None:
    """relocate()'s slot does what the instruction at `orig` did: same instruction, same
    effective memory address or branch target, then a jump back to the next instruction."""
    md = _cs(abi)
    first = next(md.disasm(code, orig, 1))
    nxt = orig + first.size
    out, bounds = relocate(abi, code, orig, slot)
    got = list(md.disasm(out, slot))
    assert sum(i.size for i in got) == len(out), "the slot holds undecodable bytes"
    starts = {i.address - slot for i in got}
    assert bounds[0] == (0, orig)
    assert all(off in starts or off == len(out) for off, _ in bounds), bounds
    t = _target(first)
    if first.group(capstone.CS_GRP_CALL) and t is not None:
        assert _pushed(abi, got) == nxt
        assert got[-1].mnemonic == "jmp" and _target(got[-1]) == t
        return
    if first.group(capstone.CS_GRP_RET):
        assert out == bytes(first.bytes)
        return
    if first.mnemonic == "jmp" and t is not None:
        assert len(got) == 1 and got[0].mnemonic == "jmp" and _target(got[0]) == t
        return
    head = got[0]
    assert head.mnemonic == first.mnemonic, (head.mnemonic, first.mnemonic)
    if t is not None:                                      # jcc
        assert _target(head) == t
    elif _rip_ea(first) is not None:
        assert _rip_ea(head) == _rip_ea(first)
        assert _operands(head) == _operands(first)
    else:
        assert bytes(head.bytes) == bytes(first.bytes)
    assert got[-1].mnemonic == "jmp" and _target(got[-1]) == nxt
    assert (len(out) - 5, nxt) in bounds


@pytest.mark.parametrize("arch", ARCHES)
def test_relocate_every_instruction(arch):
    img = image(arch)
    abi = img.abi
    base = 0x7FFFF7FC1000 if arch == "x86_64" else 0xF7F00000
    slot = base + 0x1C00                                   # the image's free tail
    refused = set()
    for f in img.functions:
        for i in disassemble(img, f, base):
            code = img.data[i.address - base:i.address - base + 16]
            try:
                check_relocation(abi, code, i.address, slot)
            except ValueError:
                refused.add(i.mnemonic)
    assert refused <= {"loop", "loope", "loopne", "jecxz", "jcxz", "jrcxz"}, refused


def test_relocate_rip_relative_time_entry():
    """__vdso_time starts with a rip-relative cmp that reads [vvar]: the copy must read the
    same address from the slot."""
    img = image("x86_64")
    f = img.function("time")
    base = 0x7FFFF7FC1000
    first = disassemble(img, f, base)[0]
    assert first.mnemonic == "cmp" and "rip" in first.op_str
    slot = base + 0x1C80
    check_relocation(X86_64, img.data[f.image_offset:f.image_offset + 16], first.address, slot)


def test_relocate_i386_pc_thunk_call():
    img = image("i386")
    f = img.function("clock_gettime")
    base = 0xF7F00000
    first = disassemble(img, f, base)[0]
    assert first.mnemonic == "call"
    out, bounds = relocate(I386, img.data[f.image_offset:f.image_offset + 16], first.address,
                           base + 0x1E00)
    assert out[:5] == b"\x68" + (first.address + 5).to_bytes(4, "little")
    assert bounds == [(0, first.address), (5, first.target)]


def test_relocate_refuses_what_it_cannot_move():
    img = image("x86_64")
    base = 0x7FFFF7FC1000
    first = disassemble(img, img.function("time"), base)[0]
    far = base + (1 << 33)                                 # out of rel32 reach
    code = img.data[first.address - base:first.address - base + 16]
    with pytest.raises(ValueError):
        relocate(X86_64, code, first.address, far)
    with pytest.raises(ValueError):
        relocate(X86_64, b"\x75\x10", base, base + 0x1C00, tail=False)   # jne: not last
    with pytest.raises(ValueError):
        relocate(X86_64, b"", base, base + 0x1C00)
    out, bounds = relocate(X86_64, b"\x55", base, base + 0x1C00, tail=False)   # push rbp
    assert out == b"\x55" and bounds == [(0, base), (1, base + 1)]


# --------------------------------------------------------------------------- properties

PARSE_ERRORS = (VdsoError, ElfError)
_FAST = settings(deadline=2000, max_examples=150, derandomize=True,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


class Hung(Exception):
    pass


def parse_in_time(data: bytes, seconds: float = 3.0) -> VdsoImage:
    """parse_image, with a hang turned into a test failure (hypothesis' deadline only judges
    an example that ends). The failure carries no traceback: the interrupted frames are deep
    in pyelftools."""
    def expire(signum: int, frame: object) -> None:
        raise Hung()
    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    hung = False
    try:
        return parse_image(data)
    except Hung:
        hung = True
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert hung
    pytest.fail(f"parse_image did not finish within {seconds} s", pytrace=False)


def _parse_or_our_error(data: bytes) -> VdsoImage | None:
    try:
        img = parse_in_time(data)
    except PARSE_ERRORS:
        return None
    # what `vdso --file` and `disas --file` do next with an image that parsed
    gw = gateway(img)
    vdso_json(img, 0, len(img.data), gw)
    for f in img.functions[:8]:
        sites(img, f)
    return img


@pytest.mark.parametrize("arch", ARCHES)
def test_every_truncation(arch):
    """Prefixes of each image: byte by byte over the ELF header, in steps after, and around
    the end of the section headers (the ELF's last byte)."""
    data = image_bytes(arch)
    size = FACTS[arch]["image_size"]
    for n in sorted({*range(0, 72), *range(72, len(data) + 1, 37), size - 1, size, size + 1}):
        img = _parse_or_our_error(data[:n])
        if n < size:
            # the section headers are the image's last bytes: no prefix short of them parses
            assert img is None, n


@pytest.mark.parametrize("arch", ARCHES)
@_FAST
@given(data=st.data())
def test_random_byte_flips(arch, data):
    buf = bytearray(image_bytes(arch))
    n = data.draw(st.integers(1, 16), label="flips")
    header_heavy = data.draw(st.booleans(), label="in headers")
    hi = 0x200 if header_heavy else len(buf) - 1
    for _ in range(n):
        pos = data.draw(st.integers(0, hi), label="pos")
        buf[pos] ^= data.draw(st.integers(1, 255), label="xor")
    _parse_or_our_error(bytes(buf))


def _header_tables(arch: str) -> list[tuple[int, int]]:
    """(start, end) of the ELF header, the program headers and the section headers, read
    with struct (not with the parser under test)."""
    data = image_bytes(arch)
    if arch == "x86_64":
        phoff, shoff = struct.unpack_from("<QQ", data, 0x20)
        phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", data, 0x36)
        ehsize = 0x40
    else:
        phoff, shoff = struct.unpack_from("<II", data, 0x1C)
        phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", data, 0x2A)
        ehsize = 0x34
    return [(0, ehsize), (phoff, phoff + phnum * phentsize), (shoff, shoff + shnum * shentsize)]


def _section_header(arch: str, sh_type: int) -> int:
    """Offset of the first section header of type sh_type."""
    data = image_bytes(arch)
    (_, _), (_, _), (lo, hi) = _header_tables(arch)
    step = 64 if arch == "x86_64" else 40
    for off in range(lo, hi, step):
        if struct.unpack_from("<I", data, off + 4)[0] == sh_type:
            return off
    raise AssertionError(f"no section of type {sh_type:#x}")


@pytest.mark.parametrize("arch", ARCHES)
@_FAST
@given(data=st.data())
def test_random_field_overwrites(arch, data):
    """Header fields (ELF header, program and section headers) set to extreme values:
    offsets, counts and sizes past the end, zero entry sizes, huge counts."""
    buf = bytearray(image_bytes(arch))
    tables = _header_tables(arch)
    for _ in range(data.draw(st.integers(1, 4), label="fields")):
        lo, hi = data.draw(st.sampled_from(tables), label="table")
        pos = lo + 4 * data.draw(st.integers(0, (hi - lo) // 4 - 1), label="field")
        val = data.draw(st.sampled_from([0, 1, 3, 0x7F, 0xFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF,
                                         len(buf) - 1, len(buf), len(buf) + 1]), label="value")
        buf[pos:pos + 4] = val.to_bytes(4, "little")
    _parse_or_our_error(bytes(buf))


# Found by the property tests, kept as plain examples: each hung or crashed parse_image.
_SHT_GNU_VERDEF = 0x6FFFFFFD


@pytest.mark.parametrize("arch", ARCHES)
def test_huge_version_definition_count(arch):
    """sh_info of .gnu.version_d is the number of definitions pyelftools walks: 2**32-1 used
    to loop (practically) forever."""
    buf = bytearray(image_bytes(arch))
    info = _section_header(arch, _SHT_GNU_VERDEF) + (44 if arch == "x86_64" else 28)
    assert struct.unpack_from("<I", buf, info)[0] in (2, 3)
    buf[info:info + 4] = b"\xff\xff\xff\xff"
    t0 = time.monotonic()
    with pytest.raises(VdsoError, match="version definitions"):
        parse_in_time(bytes(buf))
    assert time.monotonic() - t0 < 1.0


@pytest.mark.parametrize("arch", ARCHES)
def test_unterminated_note_name(arch):
    """A note whose n_namesz cuts "Linux" to "Linu": pyelftools raised construct's
    ArrayError ("missing terminator") through parse_image."""
    buf = bytearray(image_bytes(arch))
    note = next(o for o in range(0, FACTS[arch]["image_size"], 4)
                if buf[o + 12:o + 18] == b"Linux\0" and struct.unpack_from("<I", buf, o)[0] == 6)
    buf[note:note + 4] = (4).to_bytes(4, "little")
    with pytest.raises(VdsoError):
        parse_image(bytes(buf))


@_FAST
@given(st.binary(max_size=4096))
def test_random_bytes(raw):
    _parse_or_our_error(raw)


@pytest.mark.parametrize("arch", ARCHES)
@_FAST
@given(tail=st.binary(min_size=0, max_size=2048))
def test_real_headers_random_rest(arch, tail):
    data = image_bytes(arch)
    cut = 0x40 if arch == "x86_64" else 0x34
    _parse_or_our_error(data[:cut] + tail)


def test_not_an_image():
    for raw, what in [(b"", "magic"), (b"\x7fELF", "magic"), (b"root:x:0:0\n" * 10, "magic"),
                      (b"\x7fELF\x03" + bytes(100), "class"),
                      (image_bytes("x86_64") + bytes(1 << 20), "larger")]:
        with pytest.raises(VdsoError, match=what):
            parse_image(raw)


@pytest.mark.parametrize("arch", ARCHES)
def test_an_elf_that_exports_no_vdso_entry_is_refused(arch):
    """The same ELF with its __vdso_*/__kernel_* names renamed is a valid shared object that
    exports functions, but not a vDSO (a program or library given by mistake)."""
    data = image_bytes(arch).replace(b"__vdso_", b"__vdzo_").replace(b"__kernel_", b"__kernal_")
    with pytest.raises(VdsoError, match="not a vDSO"):
        parse_image(data)
