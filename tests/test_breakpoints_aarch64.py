"""breakpoints.Patcher's plan for arm64 on the checked-in vDSO (tests/fixtures/vdso-aarch64.so,
its llvm-objdump -d as the oracle): what gets patched where (each entry's first instruction
becomes a `b` to a call-through stub in the vDSO's own padding; each `svc #0` a brk whose slot
runs the svc and branches back; a function that never returns gets a brk at its entry, no
stub), the stub's code, and every byte back after unplant. Pure: the patches are written to a
copy of the image, not to a process."""
from __future__ import annotations

from pathlib import Path

import pytest

from a64_oracles import parse_llvm_objdump
from tracer.arch import aarch64 as A
from tracer.arch import aarch64_reloc as R
from tracer.breakpoints import ENTRY, EXIT, FALL, RET, Patcher
from tracer.decoders import for_function
from tracer.engine.options import resolve_functions
from tracer.vdso import parse_image

FIXTURES = Path(__file__).resolve().parent / "fixtures"
DATA = (FIXTURES / "vdso-aarch64.so").read_bytes()
OD = parse_llvm_objdump((FIXTURES / "vdso-aarch64.llvm-objdump-d.txt").read_text())
BASE = 0xFFFF8A5C0000


class ImageMemory:
    """A process's vDSO mapping as bytes: what Patcher.plant/unplant write lands here."""

    def __init__(self, data: bytes, base: int) -> None:
        self.data = bytearray(data)
        self.base = base

    def write(self, addr: int, data: bytes) -> None:
        off = addr - self.base
        assert 0 <= off and off + len(data) <= len(self.data), hex(addr)
        self.data[off:off + len(data)] = data

    def read(self, addr: int, n: int) -> bytes:
        return bytes(self.data[addr - self.base:addr - self.base + n])


def plan(specs: list[str] | None = None) -> Patcher:
    image = parse_image(DATA)
    funcs = resolve_functions(image, specs)
    p = Patcher(image, BASE, len(DATA))
    p.plan(funcs, [for_function(f.plain).nargs for f in funcs])
    return p


def word(mem: ImageMemory, addr: int) -> bytes:
    return mem.read(addr, 4)


def test_the_padding_is_empty_and_large_enough() -> None:
    image = parse_image(DATA)
    pad = (image.image_size + 15) & ~15
    assert not any(DATA[pad:])                        # the kernel's zeroed tail of the mapping
    p = plan()
    assert p.pad_start == pad and 0 < len(p.pad_used) <= len(DATA) - pad


def test_each_entry_branches_to_its_stub() -> None:
    p = plan()
    svcs = {a for a, o in OD.items() if o.mnemonic == "svc"}
    assert [f.symbol for f in p.funcs] == ["__kernel_clock_gettime", "__kernel_gettimeofday",
                                           "__kernel_clock_getres", "__kernel_getrandom"]
    assert p.stub_mode == [True] * 4 and not p.marker_mode and not p.warnings
    mem = ImageMemory(DATA, BASE)
    p.plant(mem)
    code, layout, exit_off, call_off = A.stub_aarch64(True)
    for i, f in enumerate(p.funcs):
        entry = BASE + f.image_offset
        stub = A.decode_b(entry, word(mem, entry))
        assert stub is not None and p.in_padding(stub)           # a direct `b`, nothing else
        got_layout = p.layouts[i]
        assert got_layout is not None and got_layout.struct.format == layout.struct.format
        assert (got_layout.retaddr, got_layout.i_args) == (A.STUB_FRAME, tuple(range(3, 11)))
        got = mem.read(stub, len(code))
        assert got[:call_off] == code[:call_off] and got[call_off + 4:] == code[call_off + 4:]
        body = A.decode_b(stub + call_off, got[call_off:call_off + 4])  # bl body
        assert got[call_off + 3] & 0xFC == 0x94 and body == stub + ((len(code) + 3) & ~3)
        # the body: the displaced instruction, relocated, then `b` to the next original one
        first = DATA[f.image_offset:f.image_offset + 4]
        moved, _ = R.relocate(first, entry, body)
        assert mem.read(body, len(moved)) == moved
        target = R.pc_relative_target(first, entry)
        if target is not None:                                   # adr: the same address
            assert R.pc_relative_target(moved, body) == target
        assert A.decode_b(body + len(moved), word(mem, body + len(moved))) == entry + 4
        # the one stop: the stub's brk
        bp = p.bps[stub + exit_off]
        assert (bp.kind, bp.func) == (EXIT, i) and word(mem, stub + exit_off) == A.BRK_0
        assert stub + call_off + 4 in p.stub_returns
        # every svc of the function: a brk, its slot runs the svc then branches back
        for s in sorted(a for a in svcs if f.image_offset <= a < f.image_offset + f.size):
            bp = p.bps[BASE + s]
            assert bp.kind == FALL and word(mem, BASE + s) == A.BRK_0
            assert word(mem, bp.slot) == A.SVC_0
            assert A.decode_b(bp.slot + 4, word(mem, bp.slot + 4)) == BASE + s + 4
            # a restarted system call (pc rewound to the svc) maps back to the original svc
            assert p.pc_back(bp.slot) == BASE + s and p.pc_back(bp.slot + 4) == BASE + s + 4
    kinds = sorted(b.kind for b in p.bps.values())
    assert kinds.count(EXIT) == 4 and ENTRY not in kinds and RET not in kinds
    assert kinds.count(FALL) == len([a for a in svcs if a < 0x820 or a >= 0x828])


def test_only_entries_svcs_and_padding_are_written() -> None:
    p = plan()
    image = parse_image(DATA)
    entries = {BASE + f.image_offset for f in p.funcs}
    svcs = {BASE + a for a, o in OD.items() if o.mnemonic == "svc"}
    for addr, new, orig in p.patches:
        assert len(new) == len(orig) == 4 and addr in entries | svcs
        assert DATA[addr - BASE:addr - BASE + 4] == orig
    assert BASE + p.pad_start >= BASE + image.image_size


def test_a_function_that_never_returns_gets_no_stub() -> None:
    # __kernel_rt_sigreturn (mov x8, #139; svc #0) reads the signal frame at sp: a stub's
    # block below sp would make it restore garbage
    p = plan(["__kernel_rt_sigreturn", "clock_gettime"])
    assert [f.symbol for f in p.funcs] == ["__kernel_rt_sigreturn", "__kernel_clock_gettime"]
    assert p.stub_mode == [False, True]
    mem = ImageMemory(DATA, BASE)
    p.plant(mem)
    entry = BASE + 0x820
    bp = p.bps[entry]
    assert bp.kind == ENTRY and word(mem, entry) == A.BRK_0
    assert word(mem, bp.slot) == DATA[0x820:0x824]                   # mov x8, #139
    assert A.decode_b(bp.slot + 4, word(mem, bp.slot + 4)) == entry + 4
    assert p.bps[entry + 4].kind == FALL


def test_unplant_restores_every_byte_and_the_guardian_leaves_no_brk() -> None:
    p = plan()
    mem = ImageMemory(DATA, BASE)
    p.plant(mem)
    assert bytes(mem.data) != DATA
    p.unplant(mem)
    assert bytes(mem.data) == DATA
    # guardian.py's writes (tracer killed): original code back, each stub's brk a nop
    p.plant(mem)
    for addr, data in p.undo_int3s():
        mem.write(addr, data)
    size = p.image.image_size
    assert bytes(mem.data[:size]) == DATA[:size]
    lo = BASE + p.pad_start
    words = [(lo + k, mem.read(lo + k, 4)) for k in range(0, len(p.pad_used), 4)]
    # what stays in the padding: no stub's brk, and nothing that branches into a slot (whose
    # brks are then unreachable: the original code no longer leads there)
    assert not [a for a, w in words if w == A.BRK_0 and a in p.bps and p.bps[a].kind == EXIT]
    slots = [b.slot for b in p.bps.values() if b.slot]
    for a, w in words:
        t = R.pc_relative_target(w, a)
        assert t is None or not any(s <= t < s + 8 for s in slots), hex(a)
    for addr, _, orig in p.patches:
        assert mem.read(addr, 4) == orig


@pytest.mark.parametrize("delta", [0, 0x10000, 0x7FF0000])
def test_rebase_moves_the_plan(delta: int) -> None:
    p = plan()
    q = plan()
    q.rebase(delta)
    assert {a + delta for a in p.bps} == set(q.bps)
    assert [(a + delta, n, o) for a, n, o in p.patches] == q.patches
    assert p.pad_used == q.pad_used                    # position independent within the image


def test_markers_are_not_planned_on_arm64() -> None:
    assert A.AARCH64.marker_stops() is not None and not A.AARCH64.counter_may_fault()
    with pytest.raises(ValueError):
        A.AARCH64.stub(2, True, True)
