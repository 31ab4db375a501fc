"""arm64 `--signals` and `--stack`, pure, on bytes dumped from the emulated arm64 machine
(tests/fixtures/make-sigstack-aarch64.py; README there): signal frames read at a handler's
first instruction and at rt_sigreturn's entry (tracer.sigtrack), stacks unwound at
__kernel_clock_gettime's entry through frame records and .eh_frame CFI with pointer
authentication codes stripped (tracer.unwind), PAC stripping, the stack scan
(tracer.stackscan) over signed return addresses."""
from __future__ import annotations

import ctypes
import dataclasses
import json
import signal
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tracer.arch import by_name
from tracer.arch.aarch64 import PAC_MASK_CHECKED, strip_pac
from tracer.cfi import CfiRow, FrameRule, RuleKind
from tracer.errors import ElfError, MemoryReadError
from tracer.modmap import ModuleMap, parse_maps
from tracer.objfile import ObjectFile, load_object
from tracer.sigtrack import LAYOUTS, Anomaly, SignalTracker, sigreturn_event, signal_event
from tracer.stackscan import scan
from tracer.unwind import ARCHES, unwind

A = by_name("aarch64")
FIX = Path(__file__).resolve().parent / "fixtures"
SIGFRAMES = json.loads((FIX / "sigframes-aarch64.json").read_text())
STACKS = json.loads((FIX / "stack-aarch64.json").read_text())
VDSO = (FIX / "vdso-aarch64.so").read_bytes()
RT_SIGRETURN_OFF = 0x820          # vdso-aarch64.objdump-T.txt: __kernel_rt_sigreturn


def addr(s: str) -> int:
    return int(s, 16)


def reader(mem_at: int, mem_hex: str) -> Callable[[int, int], bytes]:
    mem = bytes.fromhex(mem_hex)

    def read(a: int, n: int) -> bytes:
        if mem_at <= a and a + n <= mem_at + len(mem):
            return mem[a - mem_at:a - mem_at + n]
        raise MemoryReadError(a, n, "not in the fixture")
    return read


def records(kind: str) -> list[dict[str, Any]]:
    return [r for r in SIGFRAMES["record"] if r["kind"] == kind]


# --------------------------------------------------------------------------- the layout

class Sigcontext(ctypes.Structure):       # arch/arm64/include/uapi/asm/sigcontext.h
    _fields_ = [("fault_address", ctypes.c_uint64), ("regs", ctypes.c_uint64 * 31),
                ("sp", ctypes.c_uint64), ("pc", ctypes.c_uint64), ("pstate", ctypes.c_uint64),
                ("_align", ctypes.c_uint8 * 8),    # __reserved is __aligned__(16)
                ("__reserved", ctypes.c_uint8 * 4096)]


class Ucontext(ctypes.Structure):         # arch/arm64/include/uapi/asm/ucontext.h
    _fields_ = [("uc_flags", ctypes.c_uint64), ("uc_link", ctypes.c_uint64),
                ("uc_stack", ctypes.c_uint64 * 3), ("uc_sigmask", ctypes.c_uint64),
                ("__unused", ctypes.c_uint8 * (1024 // 8 - 8)),
                ("_align", ctypes.c_uint8 * 8),    # uc_mcontext is __aligned__(16)
                ("uc_mcontext", Sigcontext)]


class RtSigframe(ctypes.Structure):       # arch/arm64/kernel/signal.c
    _fields_ = [("info", ctypes.c_uint8 * 128), ("uc", Ucontext)]


def test_layout_matches_the_kernel_structs() -> None:
    lay = LAYOUTS["aarch64"]
    assert Ucontext.uc_mcontext.offset == 176
    mc = RtSigframe.uc.offset + Ucontext.uc_mcontext.offset
    assert (lay.rt_info, lay.rt_uc) == (RtSigframe.info.offset, RtSigframe.uc.offset)
    assert lay.rt_ip == mc + Sigcontext.pc.offset == 568
    assert lay.rt_fp_lr == mc + Sigcontext.regs.offset + 29 * 8
    assert (lay.rt_sigreturn_nr, lay.rt_sigreturn_sp_adjust, lay.restorer_reg) == (139, 0, "x30")
    assert A.sigcontext_sp_back == Sigcontext.pc.offset - Sigcontext.sp.offset
    # what the dumping script read at each rt_sigreturn: struct rt_sigframe
    assert ctypes.sizeof(RtSigframe) == 128 + 4560


# --------------------------------------------------------------------------- deliveries

def test_handler_entries_match_what_the_handler_recorded() -> None:
    tr = SignalTracker(A)
    summary = records("summary")[0]
    assert summary["sa_restorer"] is False      # glibc sets none on arm64
    for entry, rec in zip(SIGFRAMES["entries"], records("delivery"), strict=True):
        d = tr.on_handler_entry(rec["tid"], signal.SIGUSR1, entry["regs"],
                                reader(entry["mem_at"], entry["mem"]))
        assert d is not None
        assert (d.handler, d.restorer, d.resume_ip, d.frame) == (
            addr(rec["handler"]), addr(rec["restorer"]), addr(rec["interrupted_ip"]),
            addr(rec["frame"]))
        assert d.rt and d.abi == "aarch64" and d.signo == signal.SIGUSR1
        # no SA_RESTORER: x30 is the vDSO's __kernel_rt_sigreturn
        assert d.restorer - addr(summary["vdso"]) == RT_SIGRETURN_OFF
        tr.forget(rec["tid"])


def test_a_handler_without_sa_siginfo_is_told_by_the_frame_record() -> None:
    """x1/x2 hold &info/&uc only for SA_SIGINFO handlers (setup_return); the frame record
    x29 points at is there for every handler."""
    entry, rec = SIGFRAMES["entries"][0], records("delivery")[0]
    regs = dict(entry["regs"], x1=0x1234, x2=0)
    d = SignalTracker(A).on_handler_entry(1, signal.SIGUSR1, regs,
                                          reader(entry["mem_at"], entry["mem"]))
    assert d is not None and d.resume_ip == addr(rec["interrupted_ip"])


@pytest.mark.parametrize("change", ["signo", "x29", "record", "unreadable"])
def test_not_a_handler_entry(change: str) -> None:
    entry = SIGFRAMES["entries"][0]
    regs = dict(entry["regs"])
    mem = bytearray(bytes.fromhex(entry["mem"]))
    signo = signal.SIGUSR1
    if change == "signo":
        signo = signal.SIGUSR2
    elif change == "x29":
        regs["x29"] = regs["sp"] + 64           # inside the frame: not its record
    elif change == "record":
        off = regs["x29"] - entry["mem_at"]
        mem[off + 8:off + 16] = struct.pack("<Q", 0xdead0)
    else:
        mem = mem[:regs["x29"] - entry["mem_at"]]
    tr = SignalTracker(A)
    assert tr.on_handler_entry(1, signo, regs, reader(entry["mem_at"], mem.hex())) is None
    assert tr.open_deliveries(1) == ()


def test_returns_close_deliveries_and_the_forged_one_is_flagged() -> None:
    tr = SignalTracker(A)
    dels = records("delivery")
    forge = records("forge")[0]
    tid = dels[0]["tid"]
    closed = []
    for entry, rec, ret in zip(SIGFRAMES["entries"], dels, SIGFRAMES["sigreturns"]):
        d = tr.on_handler_entry(tid, signal.SIGUSR1, entry["regs"],
                                reader(entry["mem_at"], entry["mem"]))
        assert d is not None
        regs = ret["regs"]
        # the entry of rt_sigreturn in __kernel_rt_sigreturn: pc after its svc, sp the frame
        assert regs["pc"] - 8 == d.restorer and regs["x8"] == 139
        r = tr.on_sigreturn(tid, 139, regs, reader(ret["mem_at"], ret["mem"]), "via")
        assert r.delivery == d and r.anomaly is None and not r.resume_changed
        assert r.resume_ip == addr(rec["interrupted_ip"]) and r.frame == addr(rec["frame"])
        closed.append(r)
    forged = SIGFRAMES["sigreturns"][len(dels)]
    regs = forged["regs"]
    assert regs["sp"] == addr(forge["frame"]) and regs["pc"] - 4 == addr(forge["svc"])
    r = tr.on_sigreturn(tid, 139, regs, reader(forged["mem_at"], forged["mem"]), "forge")
    assert r.anomaly == Anomaly.NO_DELIVERY and r.delivery is None
    assert r.resume_ip == addr(forge["resume_ip"]) and forge["reached"]
    ev = sigreturn_event(r, 1, 0.0, lambda a: None)
    assert ev.anomaly == "no-delivery" and ev.signo is None


def test_signal_event_names_the_vdso_restorer() -> None:
    entry, rec = SIGFRAMES["entries"][0], records("delivery")[0]
    base = addr(records("summary")[0]["vdso"])
    mm = ModuleMap(parse_maps(f"{base:x}-{base + 0x2000:x} r-xp 00000000 00:00 0 [vdso]\n"),
                   VDSO)
    d = SignalTracker(A).on_handler_entry(1, signal.SIGUSR1, entry["regs"],
                                          reader(entry["mem_at"], entry["mem"]))
    assert d is not None

    def name(a: int) -> str | None:
        loc = mm.locate(a, is_return_address=False)
        return loc.symbol if loc is not None else None
    ev = signal_event(d, 1, 0.0, name)
    assert ev.restorer_symbol == "__kernel_rt_sigreturn" and ev.restorer == addr(rec["restorer"])


def test_the_vdso_restorer_is_a_symbol() -> None:
    """__kernel_rt_sigreturn is NOTYPE (an assembly entry), sized 8: named like a function."""
    obj = ObjectFile.from_bytes(VDSO, "[vdso]")
    assert obj.symbolize(RT_SIGRETURN_OFF) == ("__kernel_rt_sigreturn", 0)
    assert obj.symbolize(RT_SIGRETURN_OFF + 4) == ("__kernel_rt_sigreturn", 4)
    assert VDSO[RT_SIGRETURN_OFF:RT_SIGRETURN_OFF + 8] == A.restorer_code


# --------------------------------------------------------------------------- PAC

def test_strip_pac() -> None:
    mask = PAC_MASK_CHECKED
    assert strip_pac(0x0030AAAAAE3515A8, mask) == 0xAAAAAE3515A8
    assert strip_pac(0xAAAAAE3515A8, mask) == 0xAAAAAE3515A8          # unsigned: unchanged
    assert strip_pac(0x0008FFFFA9966B8C, mask) == 0x0008FFFFA9966B8C  # bits 48-51: address
    # bit 55 set (the upper half): the PAC bits are set, as XPACI does
    assert strip_pac(0xFF80_0000_1234_5678, mask) == 0xFFF0_0000_1234_5678
    assert strip_pac(0x0035AAAAAE3515A8, 0) == 0x0035AAAAAE3515A8


def test_the_dumped_stacks_hold_signed_return_addresses() -> None:
    """The saved x30 of level2's frame (paciasp before it is stored) carries a PAC."""
    for build, s in STACKS.items():
        assert s["pac_mask"] == PAC_MASK_CHECKED, build
        stop = s["stops"][0]
        read = reader(stop["mem_at"], stop["mem"])
        sp, top = stop["regs"]["sp"], stop["mem_at"] + len(stop["mem"]) // 2
        words = [int.from_bytes(read(a, 8), "little") for a in range(sp, top - 7, 8)]
        bt = [addr(a) for a in s["record"][0]["backtrace"]]
        signed = [w for w in words if w != bt[1] and strip_pac(w, s["pac_mask"]) == bt[1]]
        assert signed, build


# --------------------------------------------------------------------------- unwinding

def module_map(build: str, stop: dict[str, Any]) -> ModuleMap:
    def loader(path: str, inode: int | None) -> ObjectFile:
        if path.endswith("/" + build):
            return load_object(str(FIX / build))
        raise ElfError(f"{path} is not in the fixtures")    # libc: its frame records only
    return ModuleMap(parse_maps(stop["maps"]), VDSO, loader=loader)


def entry_regs(stop: dict[str, Any]) -> dict[int | str, int]:
    r = stop["regs"]
    regs: dict[int | str, int] = {i: r[n] for i, n in enumerate(A.dwarf.names)}
    regs["pc"], regs["sp"] = r["pc"], r["sp"]
    return regs


def names(mm: ModuleMap, addrs: list[int]) -> list[str]:
    out = []
    for a in addrs:
        loc = mm.locate(a)
        out.append(loc.caller_symbol or loc.caller if loc is not None else hex(a))
    return out


@pytest.mark.parametrize("build", ["a64stack_fp", "a64stack_nofp"])
def test_stack_at_vdso_entry_matches_the_programs_backtrace(build: str) -> None:
    s = STACKS[build]
    bt = [addr(a) for a in s["record"][0]["backtrace"]]
    direct, via_libc = s["stops"]
    for stop, skip in ((direct, 0), (via_libc, 1)):
        assert stop["regs"]["pc"] == s["vdso_start"] + 0x340    # __kernel_clock_gettime
        mm = module_map(build, stop)
        out = unwind(entry_regs(stop), reader(stop["mem_at"], stop["mem"]), mm, "aarch64",
                     16, pac_mask=s["pac_mask"])
        got = names(mm, out)
        if skip:
            assert got[0].startswith("libc.so.6+"), got        # glibc's clock_gettime
        assert f"{build}!level3+" in got[skip], got
        # the frames above level3 are the ones glibc's backtrace() saw from level3
        assert out[skip + 1:] == bt[1:], (got, bt)
        assert [g.split("!")[1].split("+")[0] for g in got[skip + 1:skip + 4]] == \
            ["level2", "level1", "main"]


def test_without_the_pac_mask_the_walk_stops_at_the_first_signed_address() -> None:
    for build, s in STACKS.items():
        stop = s["stops"][0]
        out = unwind(entry_regs(stop), reader(stop["mem_at"], stop["mem"]),
                     module_map(build, stop), "aarch64", 16)
        assert len(out) == 1, build             # x30 at the entry is unsigned; the rest are


def test_no_frame_pointer_build_needs_its_cfi() -> None:
    """In the CFI-only build x29 holds no frame record at the stop: without the object's
    .eh_frame the walk ends after x30."""
    s = STACKS["a64stack_nofp"]
    stop = s["stops"][0]
    mm = ModuleMap(parse_maps(stop["maps"]), VDSO,
                   loader=lambda p, i: (_ for _ in ()).throw(ElfError("none")))
    out = unwind(entry_regs(stop), reader(stop["mem_at"], stop["mem"]), mm, "aarch64", 16,
                 pac_mask=s["pac_mask"])
    assert len(out) < 4


class _Rows:
    """Code at [0x1000, 0x9000): one CFI row per (lo, hi)."""
    def __init__(self, rows: list[tuple[int, int, CfiRow]]) -> None:
        self.rows = rows

    def frame_rule(self, pc: int) -> FrameRule:
        if not self.is_executable(pc):
            return None
        return next(((0, r) for lo, hi, r in self.rows if lo <= pc < hi), (0, None))

    def is_executable(self, a: int) -> bool:
        return 0x1000 <= a < 0x9000


def test_leaf_frame_not_at_entry() -> None:
    """Not at an entry (at_entry=False), in a leaf: its CFI has no rule for x30 (it is never
    saved) and CFA = sp; the return address is x30 itself, signed or not. The caller's row
    (CFA = sp + 32, x29/x30 saved at CFA-32/-24) goes on from there."""
    X29, X30, SP = 29, 30, 31
    leaf = CfiRow.build(0x1000, SP, 0, None, X30, (), False)
    caller = CfiRow.build(0x2000, SP, 32, None, X30,
                          ((X29, int(RuleKind.OFFSET), -32), (X30, int(RuleKind.OFFSET), -24)),
                          False)
    sp = 0x7000_0000
    stack = {sp: 0, sp + 8: 0x0030_0000_0000_3004}      # the caller's saved x29, x30 (signed)

    def read(a: int, n: int) -> bytes:
        if sp <= a and a + n <= sp + 64:
            return b"".join(stack.get(a + k, 0).to_bytes(8, "little") for k in range(0, n, 8))[:n]
        raise MemoryReadError(a, n, "unmapped")
    regs: dict[int | str, int] = {"pc": 0x1010, "sp": sp, X30: 0x0030_0000_0000_2010, X29: 0}
    out = unwind(regs, read, _Rows([(0x1000, 0x2000, leaf), (0x2000, 0x3000, caller)]),
                 "aarch64", 8, at_entry=False, pac_mask=PAC_MASK_CHECKED)
    assert out == [0x2010, 0x3004]
    # a leaf row is not taken twice: below the innermost frame CFA = sp ends the walk
    regs2 = {**regs, X30: 0x1020}
    assert unwind(regs2, read, _Rows([(0x1000, 0x2000, leaf)]), "aarch64", 8,
                  at_entry=False) == [0x1020]


def test_dwarf_numbers_come_from_the_arch() -> None:
    u = ARCHES["aarch64"]
    assert (u.sp, u.fp, u.ra, u.nregs, u.word, u.link) == (31, 29, 30, 32, 8, True)
    assert not ARCHES["x86_64"].link and not ARCHES["i386"].link


# --------------------------------------------------------------------------- stack scans

def test_scan_finds_signed_return_addresses_with_the_mask() -> None:
    s = STACKS["a64stack_fp"]
    stop = s["stops"][0]
    read = reader(stop["mem_at"], stop["mem"])
    bt = [addr(a) for a in s["record"][0]["backtrace"]]
    span = [(bt[1] - 4, bt[1] + 4)]                # level2's call site
    sp = stop["regs"]["sp"]
    with_mask = scan(read, sp, A, span, lambda v: True, pac_mask=s["pac_mask"])
    assert [h.value for h in with_mask] == [bt[1]] and not with_mask[0].signal
    assert scan(read, sp, A, span, lambda v: True, pac_mask=0) == []  # signed: not bt[1]
    # no mask given: every bit a PAC may use on Linux arm64 (48-54) is stripped
    assert scan(read, sp, A, span, lambda v: True) == with_mask


def test_scan_finds_the_saved_pc_of_a_signal_frame() -> None:
    """stackscan's saved_context on arm64: a sigcontext pc followed by a user pstate."""
    entry, rec = SIGFRAMES["entries"][0], records("delivery")[0]
    read = reader(entry["mem_at"], entry["mem"])
    ip = addr(rec["interrupted_ip"])
    hits = scan(read, entry["regs"]["sp"], A, [(ip, ip + 4)], lambda v: False,
                pac_mask=PAC_MASK_CHECKED)
    assert [(h.at - addr(rec["frame"]), h.value, h.signal) for h in hits] == \
        [(LAYOUTS["aarch64"].rt_ip, ip, True)]
    hits0 = scan(read, entry["regs"]["sp"], A, [(ip, ip + 4)], lambda v: False, pac_mask=0)
    assert [(h.at, h.signal) for h in hits0] == [(h.at, h.signal) for h in hits]


def test_layout_replace_guard() -> None:
    with pytest.raises(ValueError):
        SignalTracker(dataclasses.replace(A, name="x86_64"))


# --------------------------------------------------------------------------- arm64 CFI

@pytest.mark.parametrize("build", ["a64stack_fp", "a64stack_nofp"])
def test_arm64_cfi_rows_agree_with_readelf(build: str) -> None:
    """tracer.cfi on an arm64 object's .eh_frame (its CIE's return address column 30, the
    AArch64 negate_ra_state opcode of pointer authentication) against readelf -wF."""
    from test_unwind_objfile import readelf_rows
    obj = load_object(str(FIX / build))
    names = {**{f"x{i}": i for i in range(31)}, "sp": 31}
    checked = 0
    for loc, cols in readelf_rows(str(FIX / build)):
        row = obj.cfi_row(loc)
        assert row is not None and row.ra_reg == 30, hex(loc)
        reg, off = cols["CFA"].split("+") if "+" in cols["CFA"] else cols["CFA"].split("-")
        assert (row.cfa_reg, abs(row.cfa_offset)) == (names[reg], int(off)), (hex(loc), cols)
        rules = {r: (k, a) for r, k, a in row.rules}
        for col, text in cols.items():
            if col == "CFA":
                continue
            kind, arg = rules.get(30 if col == "ra" else names[col], (None, None))
            if text == "u":
                assert kind in (None, RuleKind.UNDEFINED), (hex(loc), col, kind)
            else:
                assert text[0] == "c" and (kind, arg) == (RuleKind.OFFSET, int(text[1:])), \
                    (hex(loc), col, text, kind, arg)
        checked += 1
    assert checked >= 10
