"""--inject on arm64, pure parts: the plan of the arm64 vDSO fixture (tests/fixtures/
vdso-aarch64.so, dumped from the emulated machine) and the code page the stub builder makes
from it, disassembled through tracer/disasm.py's capstone (the live check is
tests/vm/test_inject_aarch64.py)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from tracer import disasm
from tracer.arch.aarch64_reloc import pc_relative_target
from tracer.decoders import for_function
from tracer.inject import layout as L
from tracer.inject.aarch64.plan import PlanError, plan_image_a64
from tracer.inject.aarch64.stubs import build_code_a64
from tracer.vdso import SIGRETURN_TRAMPOLINES, VdsoFunction, VdsoImage, parse_image

IMAGE = Path(__file__).resolve().parent / "fixtures" / "vdso-aarch64.so"
BASE = 0xFFFF89C1F000
RING = 0xFFFF88A1F000
KEYS = (0x1122334455667788, 0x8877665544332211)


@pytest.fixture(scope="module")
def image() -> VdsoImage:
    return parse_image(IMAGE.read_bytes())


def funcs_of(image: VdsoImage) -> list[VdsoFunction]:
    return [f for f in image.functions if f.symbol not in SIGRETURN_TRAMPOLINES]


def disas(image: VdsoImage, code: bytes, at: int) -> list[tuple[int, str, str]]:
    """`code` (words at runtime address `at`) one word at a time through tracer.disasm
    (capstone's arm64 mode): (address, mnemonic, operands), "?" for a word it does not
    decode (a literal)."""
    img = dataclasses.replace(image, data=code, symbols=(), functions=(), by_name={})
    out = []
    for k in range(0, len(code) - len(code) % 4, 4):
        got = disasm.disassemble(img, VdsoFunction(k, 4, "<code>", "<code>", (), None), at)
        out.append((at + k, got[0].mnemonic, got[0].op_str) if got else (at + k, "?", ""))
    return out


def build(image: VdsoImage, code_base: int, lse: bool = True):  # type: ignore[no-untyped-def]
    funcs = funcs_of(image)
    plan = plan_image_a64(image, funcs)
    page = build_code_a64(plan, BASE, code_base, [for_function(f.plain) for f in funcs], KEYS,
                          RING, lse)
    return plan, page


def test_plan_of_the_arm64_vdso(image: VdsoImage) -> None:
    plan = plan_image_a64(image, funcs_of(image))
    by = {fp.func.plain: fp for fp in plan.functions}
    assert set(by) == {"clock_gettime", "gettimeofday", "clock_getres", "getrandom"}
    # one svc #0 each in the time functions: the fallback the kernel's vDSO makes
    assert [len(by[n].fallbacks) for n in ("clock_gettime", "gettimeofday", "clock_getres")] \
        == [1, 1, 1]
    # getrandom starts with paciasp: the `b` goes after it, the stub starts with autiasp
    gr = by["getrandom"]
    assert gr.words[0] == 0xD503233F and gr.patch_at == gr.func.image_offset + 4
    assert gr.auth == 0xD50323BF
    ct = by["clock_gettime"]
    assert ct.patch_at == ct.func.image_offset and ct.auth is None
    # the [vvar] references (adr, +-1 MiB) go through veneers
    assert ct.veneers and all(image.data[o + 3] & 0x9F == 0x10 for o in ct.veneers)
    assert image.data[plan.syscall_offset:plan.syscall_offset + 4] == bytes.fromhex("010000d4")


def test_the_signal_trampoline_is_refused(image: VdsoImage) -> None:
    tramp = [f for f in image.functions if f.symbol in SIGRETURN_TRAMPOLINES]
    assert tramp
    with pytest.raises(PlanError):
        plan_image_a64(image, tramp)


@pytest.mark.parametrize("delta", [-0x100000, 0x7000000])
def test_copies_reach_what_the_originals_reach(image: VdsoImage, delta: int) -> None:
    """Every pc-relative instruction of a copy (with its veneer) addresses what the original
    addressed; internal branches keep their layout; each svc #0 became a `b` to a fallback
    stub ending in `svc #0; b <the word after it>`. Near the vDSO the veneers are one
    instruction, 112 MiB away the relocator's literal form."""
    code_base = BASE + delta
    plan, page = build(image, code_base)
    for fp, info in zip(plan.functions, page.stubs):
        lo = fp.func.image_offset
        c0, c1 = info.copy
        copy = page.data[c0 - code_base:c1 - code_base]
        assert len(copy) == fp.func.size - fp.func.size % 4
        for k in range(0, len(copy), 4):
            orig, new = image.data[lo + k:lo + k + 4], copy[k:k + 4]
            off = lo + k
            t_orig = pc_relative_target(orig, BASE + off)
            t_new = pc_relative_target(new, c0 + k)
            if off in fp.fallbacks:
                fb = t_new
                assert fb is not None and code_base <= fb < c0
                tail = disas(image, page.data[fb - code_base:fb - code_base + 4 * 40], fb)
                svc = next(i for i, x in enumerate(tail) if x[1] == "svc")
                assert tail[svc + 1][1] == "b"
                assert int(tail[svc + 1][2].lstrip("#"), 16) == c0 + k + 4
            elif off in fp.veneers:
                assert t_new is not None and code_base <= t_new < c0
                v = disas(image, page.data[t_new - code_base:t_new - code_base + 32], t_new)
                if delta == -0x100000:
                    assert v[0][1] == "adr"
                    assert int(v[0][2].split("#")[1], 16) == t_orig
                    assert v[1][1] == "b" and int(v[1][2].lstrip("#"), 16) == c0 + k + 4
                else:
                    # ldr xN, =T (the literal holds the original target)
                    assert v[0][1] == "ldr"
                    lit = int(v[0][2].split("#")[1], 16)
                    assert int.from_bytes(page.data[lit - code_base:lit - code_base + 8],
                                          "little") == t_orig
            elif t_orig is not None and lo <= t_orig - BASE < lo + fp.func.size:
                assert new == orig                       # internal: same bytes
            elif t_orig is not None:
                assert t_new == t_orig, hex(off)         # bl/b/adrp out: re-aimed in place
            else:
                assert new == orig


def test_stub_shape_lse(image: VdsoImage) -> None:
    code_base = BASE - 0x100000
    plan, page = build(image, code_base, lse=True)
    info = page.stubs[0]
    stub = page.data[info.stub - code_base:info.tail[1] - code_base]
    ops = disas(image, stub, info.stub)
    names = [m for _, m, _ in ops]
    # saves x0-x5 and x30, stamps with cntvct_el0 after an isb, calls the copy
    assert names[:4] == ["sub", "stp", "stp", "stp"] and ops[0][2] == "sp, sp, #0x70"
    assert "str x30, [sp, #0x58]" in [f"{m} {o}" for _, m, o in ops]
    bl = next(x for x in ops if x[1] == "bl")
    assert int(bl[2].lstrip("#"), 16) == info.copy[0]
    k = names.index("mrs")
    assert names[k - 1] == "isb" and ops[k][2].endswith("cntvct_el0")
    # gettid, claim with cas, publish with stlr, LOST with stadd, the wait yields
    svc = [i for i, n in enumerate(names) if n == "svc"]
    assert ops[svc[0] - 1][2] == "x8, #0xb2"              # gettid (178)
    assert "cas" in names and "ldxr" not in names and "stadd" in names
    assert "ldar" in names and "yield" in names
    stlr = names.index("stlr")
    assert names[stlr + 1] == "b"                          # commit is the last slot store
    # the ring window holds the claim and the commit
    assert info.window[0] <= ops[names.index("cas")][0] < info.window[1]
    assert info.window[0] <= ops[stlr][0] < info.window[1]
    # returns with x30 as it came and sp restored
    assert names[-1] == "ret"
    assert "ldr x30, [sp, #0x58]" in [f"{m} {o}" for _, m, o in ops]
    assert "add sp, sp, #0x70" in [f"{m} {o}" for _, m, o in ops]


def test_stub_shape_llsc(image: VdsoImage) -> None:
    code_base = BASE - 0x100000
    _, page = build(image, code_base, lse=False)
    info = page.stubs[0]
    names = [m for _, m, _ in disas(image, page.data[info.stub - code_base:info.tail[1] - code_base],
                                    info.stub)]
    assert "cas" not in names and "stadd" not in names
    assert names.count("ldxr") == 2 and names.count("stxr") == 2 and "clrex" in names
    assert "stlr" in names


def test_exclusive_spans_llsc(image: VdsoImage) -> None:
    """Leaving redirects a thread found between a claim loop's ldxr and its stxr to the
    stub's exit (no single step gets through: each clears the exclusive monitor): the spans
    must cover exactly those words, and `done` must be the exit, which restores x0 and x30
    from the frame at sp and nothing of the ring. With LSE there is no such span."""
    code_base = BASE - 0x100000
    _, lse_page = build(image, code_base, lse=True)
    assert all(info.exclusive == () for info in lse_page.stubs)
    _, page = build(image, code_base, lse=False)
    for info in page.stubs:
        assert len(info.exclusive) == 2
        words = []
        for lo, hi in info.exclusive:
            got = disas(image, page.data[lo - code_base:hi - code_base], lo)
            words.append([m for _, m, _ in got])
            # the span ends right after the stxr: a thread past it is stepped on normally
            assert got[-1][1] == "stxr"
        assert words == [["ldxr", "cmp", "b.ne", "stxr"], ["ldxr", "add", "stxr"]], words
        exit_ = disas(image, page.data[info.done - code_base:info.tail[1] - code_base],
                      info.done)
        assert [(m, o) for _, m, o in exit_[:3]] == [
            ("ldr", f"x0, [sp, #{L.FR_RET:#x}]"), ("ldr", f"x30, [sp, #{L.FRA_LR:#x}]"),
            ("add", f"sp, sp, #{L.FRAME_A64:#x}")], exit_[:3]
        assert exit_[-1][1] == "ret"
        assert info.window[0] < info.done <= info.window[1]


def test_getrandom_stub_undoes_the_entry_signing(image: VdsoImage) -> None:
    code_base = BASE - 0x100000
    plan, page = build(image, code_base)
    k = [fp.func.plain for fp in plan.functions].index("getrandom")
    info = page.stubs[k]
    assert info.func_addr == BASE + plan.functions[k].patch_at
    first = disas(image, page.data[info.stub - code_base:info.stub - code_base + 4], info.stub)[0]
    assert first[1] in ("autiasp", "hint") and page.data[
        info.stub - code_base:info.stub - code_base + 4] == bytes.fromhex("bf2303d5")
    # the copy starts with the function's own paciasp
    assert page.data[info.copy[0] - code_base:info.copy[0] - code_base + 4] == \
        bytes.fromhex("3f2303d5")


def test_code_page_words(image: VdsoImage) -> None:
    _, page = build(image, BASE - 0x100000)
    d = page.data
    assert int.from_bytes(d[L.CODE_RINGPTR:L.CODE_RINGPTR + 8], "little") == RING
    assert int.from_bytes(d[L.CODE_KEYA:L.CODE_KEYA + 8], "little") == KEYS[0]
    assert int.from_bytes(d[L.CODE_KEYB:L.CODE_KEYB + 8], "little") == KEYS[1]
    assert len(d) == L.CODE_SIZE
