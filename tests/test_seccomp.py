"""The marker filter and the marker-mode patch plan, on checked-in bytes (no process)."""
from __future__ import annotations

import struct
from pathlib import Path

import pytest

from tracer import seccomp
from tracer.breakpoints import ENTRY, EXIT, FALL, RET, Patcher
from tracer.decoders import for_function
from tracer.vdso import GATEWAY_SYMBOL, SIGRETURN_TRAMPOLINES, parse_image

FIX = Path(__file__).resolve().parent / "fixtures"
X86_64, I386 = 0xC000003E, 0x40000003
KILL, ERRNO_EPERM = 0x80000000, 0x00050001


def _prog(*insns: tuple[int, int, int, int]) -> bytes:
    return b"".join(struct.pack("<HBBI", *i) for i in insns)


def test_our_filter_traces_the_markers_only() -> None:
    p = seccomp.program()
    run = seccomp.run_filter
    for arch in (X86_64, I386):
        assert run(p, {0: seccomp.MARKER_BASE, 4: arch}) == seccomp.ACTION_TRACE
        assert run(p, {0: seccomp.MARKER_BASE + seccomp.MARKER_SPAN - 1, 4: arch}) \
            == seccomp.ACTION_TRACE
        assert run(p, {0: seccomp.MARKER_BASE + seccomp.MARKER_SPAN, 4: arch}) \
            == seccomp.ACTION_ALLOW
        assert run(p, {0: seccomp.MARKER_BASE - 1, 4: arch}) == seccomp.ACTION_ALLOW
        for nr in (0, 1, 39, 60, 231, 317, 354, 0x40000000 | 39):
            assert run(p, {0: nr, 4: arch}) == seccomp.ACTION_ALLOW
    # another architecture (arm64's audit arch) is never traced
    assert run(p, {0: seccomp.MARKER_BASE, 4: 0xC00000B7}) == seccomp.ACTION_ALLOW
    # nothing else of seccomp_data is read: unknown args and ip do not matter
    assert run(p, {0: seccomp.MARKER_BASE, 4: X86_64, 16: None, 8: None}) \
        == seccomp.ACTION_TRACE


def test_foreign_filters_are_run_as_the_kernel_would() -> None:
    run = seccomp.run_filter
    # an allow-list: getppid (110) allowed, everything else killed
    allow_list = _prog((0x20, 0, 0, 0), (0x15, 0, 1, 110), (0x06, 0, 0, seccomp.ACTION_ALLOW),
                       (0x06, 0, 0, KILL))
    assert run(allow_list, {0: 110, 4: X86_64}) == seccomp.ACTION_ALLOW
    assert run(allow_list, {0: seccomp.MARKER_BASE, 4: X86_64}) == KILL
    # a deny-list: ptrace (101) -> EPERM, the rest allowed
    deny = _prog((0x20, 0, 0, 0), (0x15, 0, 1, 101), (0x06, 0, 0, ERRNO_EPERM),
                 (0x06, 0, 0, seccomp.ACTION_ALLOW))
    assert run(deny, {0: seccomp.MARKER_BASE, 4: X86_64}) == seccomp.ACTION_ALLOW
    # a decision on an argument nobody knows yet: undecided
    on_arg = _prog((0x20, 0, 0, 16), (0x15, 0, 1, 7), (0x06, 0, 0, KILL),
                   (0x06, 0, 0, seccomp.ACTION_ALLOW))
    assert run(on_arg, {0: 1, 4: X86_64}) is None
    assert run(on_arg, {0: 1, 4: X86_64, 16: 8}) == seccomp.ACTION_ALLOW
    # ALU, scratch memory, RET A
    alu = _prog((0x20, 0, 0, 0), (0x54, 0, 0, 0xFF), (0x02, 0, 0, 3), (0x00, 0, 0, 0),
                (0x60, 0, 0, 3), (0x16, 0, 0, 0))
    assert run(alu, {0: 0x1234, 4: X86_64}) == 0x34
    # what the kernel would refuse: a jump off the end, an unaligned load
    assert run(_prog((0x05, 0, 0, 5)), {}) is None
    assert run(_prog((0x20, 0, 0, 2), (0x06, 0, 0, 0)), {0: 1}) is None


def _plan(name: str, markers: bool, tsc: bool = True) -> Patcher:
    image = parse_image((FIX / name).read_bytes())
    funcs = [f for f in image.functions if f.symbol not in SIGRETURN_TRAMPOLINES]
    p = Patcher(image, 0x10000, 8192)
    p.plan(funcs, [for_function(f.plain).nargs for f in funcs], markers=markers, tsc=tsc)
    return p


@pytest.mark.parametrize("name", ["vdso-x86_64.so", "vdso-i386.so"])
def test_marker_mode_leaves_no_int3_stop(name: str) -> None:
    p = _plan(name, markers=True)
    assert p.marker_mode and not p.bps            # no int3 anywhere
    assert len(p.pad_used) + p.pad_start <= p.mapping_size
    kinds = [m.kind for m in p.markers]
    assert kinds.count(EXIT) == sum(p.stub_mode)
    assert FALL in kinds
    word = p.image.abi.word
    for i, m in enumerate(p.markers):
        nr = (seccomp.MARKER_BASE + i).to_bytes(4, "little")
        assert b"\xb8" + nr in p.pad_used         # mov eax, MARKER + i
        if word == 8:
            at = p.pad_used.index(b"\xb8" + nr)
            assert p.pad_used[at + 5:at + 7] == b"\x0f\x05"
    for addr, new, orig in p.patches:
        assert len(new) == len(orig) and INT3_FREE(new), (hex(addr), new)
    if word == 4:
        assert ENTRY in kinds and RET in kinds    # __kernel_vsyscall's entry and exit
        gw = p.image.function(GATEWAY_SYMBOL)
        assert gw is not None
        lo = p.base + gw.image_offset
        # the return address sits under the three pushes, and is popped back to [sp]
        assert [p.gw_return_slot(lo + k) for k in (0, 1, 2, 3, 5, 7, 9, 10, 11, 12)] == \
            [0, 4, 8, 12, 12, 12, 12, 8, 4, 0]
        assert p.gw_ret == lo + 12 and p.gw_real_ret and p.gw_real_ret in p.stub_returns
    else:
        # the syscall of each fallback site stays where it was (a restarted call finds it)
        entries = {p.base + f.image_offset for f in p.funcs}
        falls = [(a, n) for a, n, _ in p.patches if a not in entries]
        assert len(falls) == kinds.count(FALL)
        for addr, new in falls:
            end = addr - p.base + len(new)
            assert p.image.data[end:end + 2] == b"\x0f\x05"


def INT3_FREE(code: bytes) -> bool:
    """A patch of original code starts with a jmp or a call and may end in filler bytes."""
    return code[:1] in (b"\xe9", b"\xe8")


@pytest.mark.parametrize("name", ["vdso-x86_64.so", "vdso-i386.so"])
def test_stubs_without_the_tsc_never_run_rdtsc(name: str) -> None:
    for markers in (False, True):
        assert b"\x0f\x31" in _plan(name, markers, tsc=True).pad_used
        p = _plan(name, markers, tsc=False)
        assert b"\x0f\x31" not in p.pad_used
        assert b"\x31\xc0\x99" in p.pad_used          # xor eax, eax ; cdq: t = 0
