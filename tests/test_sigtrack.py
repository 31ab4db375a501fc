"""tracer.sigtrack: signal frames read at handler entry and at sigreturn.

Pure tests build the kernel's frames as bytes from ctypes mirrors of the kernel structs
(arch/x86/include/asm/sigframe.h, arch/x86/include/uapi/asm/sigcontext.h,
include/uapi/asm-generic/ucontext.h, arch/x86/include/asm/ia32.h), independent of the offsets
the module computes. Live tests do the engine's ptrace dance themselves (PTRACE_SYSCALL,
PTRACE_SINGLESTEP with the signal at a delivery stop) on real targets, 64- and 32-bit, and
compare the tracker's deliveries and sigreturns with what the handlers recorded.
"""
from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import signal
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import targets as T
from tracer import target
from tracer.abi import I386, X86_64, Abi
from tracer.errors import MemoryReadError, ProcessGone
from tracer.events import SignalEvent, SigreturnEvent
from tracer.render.jsonl import event_dict
from tracer.sigtrack import (LAYOUTS, Anomaly, Delivery, Sigreturn, SignalTracker, is_sigreturn,
                             parse_handler_frame, sigreturn_event, sigreturn_frame, signal_event)

# --------------------------------------------------------------------------- kernel structs

u16, u32, u64 = ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64


class Sigcontext64(ctypes.Structure):   # struct sigcontext_64, uapi/asm/sigcontext.h
    _fields_ = [*((f"r{i}", u64) for i in range(8, 16)),
                *((n, u64) for n in ("rdi", "rsi", "rbp", "rbx", "rdx", "rax", "rcx", "rsp",
                                     "rip", "eflags")),
                *((n, u16) for n in ("cs", "gs", "fs", "ss")),
                *((n, u64) for n in ("err", "trapno", "oldmask", "cr2", "fpstate")),
                ("reserved1", u64 * 8)]


class Stack64(ctypes.Structure):        # stack_t, uapi/asm-generic/signal.h
    _fields_ = [("ss_sp", u64), ("ss_flags", ctypes.c_int32), ("ss_size", u64)]


class Ucontext64(ctypes.Structure):     # struct ucontext, uapi/asm-generic/ucontext.h
    _fields_ = [("uc_flags", u64), ("uc_link", u64), ("uc_stack", Stack64),
                ("uc_mcontext", Sigcontext64), ("uc_sigmask", u64)]


class RtSigframe64(ctypes.Structure):   # struct rt_sigframe, asm/sigframe.h
    _fields_ = [("pretcode", u64), ("uc", Ucontext64), ("info", ctypes.c_uint8 * 128)]


class Sigcontext32(ctypes.Structure):   # struct sigcontext_32, uapi/asm/sigcontext.h
    _fields_ = [*((n, u16) for n in ("gs", "gsh", "fs", "fsh", "es", "esh", "ds", "dsh")),
                *((n, u32) for n in ("di", "si", "bp", "sp", "bx", "dx", "cx", "ax", "trapno",
                                     "err", "ip")),
                ("cs", u16), ("csh", u16), ("flags", u32), ("sp_at_signal", u32),
                ("ss", u16), ("ssh", u16), ("fpstate", u32), ("oldmask", u32), ("cr2", u32)]


class Stack32(ctypes.Structure):        # stack_ia32_t, asm/ia32.h
    _fields_ = [("ss_sp", u32), ("ss_flags", ctypes.c_int32), ("ss_size", u32)]


class Ucontext32(ctypes.Structure):     # struct ucontext_ia32, asm/ia32.h
    _fields_ = [("uc_flags", u32), ("uc_link", u32), ("uc_stack", Stack32),
                ("uc_mcontext", Sigcontext32), ("uc_sigmask", u32 * 2)]


class RtSigframe32(ctypes.Structure):   # struct rt_sigframe_ia32, asm/sigframe.h
    _fields_ = [("pretcode", u32), ("sig", ctypes.c_int32), ("pinfo", u32), ("puc", u32),
                ("info", ctypes.c_uint8 * 128), ("uc", Ucontext32), ("retcode", ctypes.c_char * 8)]


class Sigframe32(ctypes.Structure):     # struct sigframe_ia32, asm/sigframe.h
    _fields_ = [("pretcode", u32), ("sig", ctypes.c_int32), ("sc", Sigcontext32),
                ("fpstate_unused", ctypes.c_uint8 * 624), ("extramask", u32),
                ("retcode", ctypes.c_char * 8)]


# --------------------------------------------------------------------------- fake tracee

class FakeMem:
    """Sparse tracee memory: reads outside a region raise MemoryReadError, like /proc/PID/mem."""

    def __init__(self) -> None:
        self.regions: dict[int, bytearray] = {}

    def map(self, addr: int, data: bytes) -> None:
        self.regions[addr] = bytearray(data)

    def write(self, addr: int, data: bytes) -> None:
        for base, buf in self.regions.items():
            if base <= addr and addr + len(data) <= base + len(buf):
                buf[addr - base:addr - base + len(data)] = data
                return
        raise AssertionError(f"write outside the fake memory at {addr:#x}")

    def read(self, addr: int, size: int) -> bytes:
        for base, buf in self.regions.items():
            if base <= addr and addr + size <= base + len(buf):
                return bytes(buf[addr - base:addr - base + size])
        raise MemoryReadError(addr, size, "unmapped")


HANDLER64, RESTORER64, IP64 = 0x5555_5555_1000, 0x7F00_0000_2A50, 0x7F00_0001_0029
HANDLER32, VDSO_RT32, VDSO_PLAIN32, IP32 = 0x5655_6000, 0xF7F9_5590, 0xF7F9_5580, 0xF7F9_5569
SYSCALL_RIP_ADVANCE = 2     # `syscall` and `int $0x80` are 2 bytes: the engine's rip - 2


def frame64(mem: FakeMem, sp: int, signo: int, restorer: int = RESTORER64, ip: int = IP64,
            handler: int = HANDLER64) -> dict[str, int]:
    """Place the frame x64_setup_rt_frame builds at sp; return the registers at the handler."""
    f = RtSigframe64()
    f.pretcode = restorer
    f.uc.uc_mcontext.rip = ip
    f.uc.uc_mcontext.rsp = sp + 0x1000
    mem.map(sp, bytes(f))
    return {"rip": handler, "rsp": sp, "rdi": signo, "rsi": sp + RtSigframe64.info.offset,
            "rdx": sp + RtSigframe64.uc.offset, "rax": 0, "rcx": 0xdead}


def frame32_rt(mem: FakeMem, sp: int, signo: int, restorer: int = VDSO_RT32, ip: int = IP32,
               handler: int = HANDLER32) -> dict[str, int]:
    """The frame ia32_setup_rt_frame builds (SA_SIGINFO handlers)."""
    f = RtSigframe32()
    f.pretcode, f.sig = restorer, signo
    f.pinfo, f.puc = sp + RtSigframe32.info.offset, sp + RtSigframe32.uc.offset
    f.uc.uc_mcontext.ip = ip
    f.uc.uc_mcontext.gs, f.uc.uc_mcontext.fs = 0x63, 0
    f.retcode = b"\xb8\xad\x00\x00\x00\xcd\x80\x00"
    mem.map(sp, bytes(f))
    return {"rip": handler, "rsp": sp, "rax": signo, "rdx": f.pinfo, "rcx": f.puc}


def frame32_plain(mem: FakeMem, sp: int, signo: int, restorer: int = VDSO_PLAIN32,
                  ip: int = IP32, handler: int = HANDLER32) -> dict[str, int]:
    """The frame ia32_setup_frame builds (plain handlers): edx = ecx = 0."""
    f = Sigframe32()
    f.pretcode, f.sig = restorer, signo
    f.sc.ip = ip
    f.sc.gs, f.sc.fs, f.sc.es, f.sc.ds = 0x63, 0, 0x2b, 0x2b
    mem.map(sp, bytes(f))
    return {"rip": handler, "rsp": sp, "rax": signo, "rdx": 0, "rcx": 0}


def at_sigreturn(d: Delivery, abi: Abi, rt: bool = True) -> dict[str, int]:
    """Registers at the entry of the sigreturn that the trampoline makes for frame d.frame:
    `ret` popped pretcode; __kernel_sigreturn's `popl %eax` popped sig too."""
    pop = abi.word if rt else 2 * abi.word
    return {"rsp": d.frame + pop, "rip": d.restorer + 7 + SYSCALL_RIP_ADVANCE}


# --------------------------------------------------------------------------- layouts

def test_layouts_match_the_kernel_structs() -> None:
    assert ctypes.sizeof(Ucontext64) == 304
    assert ctypes.sizeof(Sigcontext64) == 256
    x = LAYOUTS["x86_64"]
    assert x.rt_uc == RtSigframe64.uc.offset
    assert x.rt_info == RtSigframe64.info.offset
    assert x.rt_ip == (RtSigframe64.uc.offset + Ucontext64.uc_mcontext.offset
                       + Sigcontext64.rip.offset)
    i = LAYOUTS["i386"]
    assert ctypes.sizeof(Sigcontext32) == 88
    assert i.rt_info == RtSigframe32.info.offset == 16
    assert i.rt_uc == RtSigframe32.uc.offset == 144
    assert i.rt_ip == (RtSigframe32.uc.offset + Ucontext32.uc_mcontext.offset
                       + Sigcontext32.ip.offset)
    assert i.plain_ip == Sigframe32.sc.offset + Sigcontext32.ip.offset
    assert (i.rt_sigreturn_nr, i.sigreturn_nr, x.rt_sigreturn_nr) == (173, 119, 15)


def test_is_sigreturn_and_frame_addresses() -> None:
    assert is_sigreturn(X86_64, 15) and not is_sigreturn(X86_64, 119)
    assert is_sigreturn(I386, 173) and is_sigreturn(I386, 119) and not is_sigreturn(I386, 15)
    # signal_64.c: frame = sp - sizeof(long); signal_32.c: sp - 4 (rt), sp - 8 (sigreturn)
    assert sigreturn_frame(X86_64, 15, 0x7ffc_0000_1008)[0] == 0x7ffc_0000_1000
    assert sigreturn_frame(I386, 173, 0xffff_1004)[0] == 0xffff_1000
    assert sigreturn_frame(I386, 119, 0xffff_1008)[0] == 0xffff_1000
    with pytest.raises(ValueError):
        sigreturn_frame(X86_64, 173, 0x1000)
    with pytest.raises(ValueError):
        SignalTracker(dataclasses.replace(X86_64, name="aarch64"))


# --------------------------------------------------------------------------- deliveries

def test_x86_64_delivery_and_return() -> None:
    mem, tr = FakeMem(), SignalTracker(X86_64)
    sp = 0x7ffc_1234_5000
    regs = frame64(mem, sp, signal.SIGUSR1)
    d = tr.on_handler_entry(100, signal.SIGUSR1, regs, mem.read)
    assert d == Delivery(100, 10, HANDLER64, RESTORER64, IP64, sp, True, "x86_64")
    assert tr.open_deliveries(100) == (d,)
    r = tr.on_sigreturn(100, 15, at_sigreturn(d, X86_64), mem.read, "libc.so.6!__restore_rt+0x7")
    assert r.delivery == d and r.signo == 10 and r.anomaly is None and not r.resume_changed
    assert r.resume_ip == IP64 and r.frame == sp and r.abandoned == ()
    assert r.via == "libc.so.6!__restore_rt+0x7"
    assert tr.open_deliveries(100) == ()


def test_x86_64_plain_handler_gets_the_same_frame() -> None:
    # signal_64.c: "This also works for non SA_SIGINFO handlers": rsi and rdx are set anyway.
    mem, tr = FakeMem(), SignalTracker(X86_64)
    regs = frame64(mem, 0x7ffc_0000_8000, signal.SIGALRM)
    d = tr.on_handler_entry(7, signal.SIGALRM, regs, mem.read)
    assert d is not None and d.rt and d.resume_ip == IP64


def test_i386_rt_frame_vdso_restorer() -> None:
    mem, tr = FakeMem(), SignalTracker(I386)
    sp = 0xffd0_1000
    regs = frame32_rt(mem, sp, signal.SIGUSR1)
    d = tr.on_handler_entry(5, signal.SIGUSR1, regs, mem.read)
    assert d == Delivery(5, 10, HANDLER32, VDSO_RT32, IP32, sp, True, "i386")
    r = tr.on_sigreturn(5, 173, at_sigreturn(d, I386), mem.read, "[vdso]!__kernel_rt_sigreturn+0x7")
    assert (r.signo, r.resume_ip, r.anomaly, r.resume_changed) == (10, IP32, None, False)


def test_i386_plain_frame_sigreturn() -> None:
    mem, tr = FakeMem(), SignalTracker(I386)
    sp = 0xffd0_2000
    regs = frame32_plain(mem, sp, signal.SIGUSR2)
    d = tr.on_handler_entry(5, signal.SIGUSR2, regs, mem.read)
    assert d == Delivery(5, 12, HANDLER32, VDSO_PLAIN32, IP32, sp, False, "i386")
    r = tr.on_sigreturn(5, 119, at_sigreturn(d, I386, rt=False), mem.read, "__kernel_sigreturn")
    assert (r.signo, r.resume_ip, r.anomaly) == (12, IP32, None)


def test_i386_frames_told_apart_by_content_not_by_guess() -> None:
    """A plain frame whose gs/fs words happen to be small numbers is not taken for rt, and an
    rt frame needs both self-pointers and the matching edx/ecx."""
    mem = FakeMem()
    regs = frame32_rt(mem, 0xffd0_3000, signal.SIGUSR1)
    bad = dict(regs, rcx=0)                     # ecx not &uc: not what the kernel builds
    assert parse_handler_frame(I386, 1, signal.SIGUSR1, bad, mem.read) is None
    regs = frame32_plain(mem, 0xffd0_5000, signal.SIGUSR1)
    d = parse_handler_frame(I386, 1, signal.SIGUSR1, regs, mem.read)
    assert d is not None and not d.rt
    bad = dict(regs, rdx=0xffd0_5010)
    assert parse_handler_frame(I386, 1, signal.SIGUSR1, bad, mem.read) is None


def test_not_a_handler_entry_opens_nothing() -> None:
    """After a step with an ignored or default signal the registers are no frame's."""
    mem, tr = FakeMem(), SignalTracker(X86_64)
    regs = frame64(mem, 0x7ffc_0000_8000, signal.SIGUSR1)
    assert tr.on_handler_entry(1, signal.SIGUSR2, regs, mem.read) is None     # other signal
    assert tr.on_handler_entry(1, signal.SIGUSR1, dict(regs, rdx=0), mem.read) is None
    mem32 = FakeMem()
    regs32 = frame32_rt(mem32, 0xffd0_1000, signal.SIGUSR1)
    tr32 = SignalTracker(I386)
    assert tr32.on_handler_entry(1, signal.SIGUSR1, dict(regs32, rax=0), mem32.read) is None
    assert tr.open_deliveries(1) == () and tr32.open_deliveries(1) == ()


@pytest.mark.parametrize("abi", [X86_64, I386])
def test_unreadable_or_truncated_frame_at_entry(abi: Abi) -> None:
    mem, tr = FakeMem(), SignalTracker(abi)
    sp = 0x7ffc_0000_8000 if abi is X86_64 else 0xffd0_8000
    build = frame64 if abi is X86_64 else frame32_rt
    regs = build(FakeMem(), sp, signal.SIGUSR1)          # registers, but no memory at all
    assert tr.on_handler_entry(1, signal.SIGUSR1, regs, mem.read) is None
    full = FakeMem()
    build(full, sp, signal.SIGUSR1)
    mem.map(sp, bytes(full.regions[sp][:LAYOUTS[abi.name].rt_ip]))   # ends before the saved ip
    assert tr.on_handler_entry(1, signal.SIGUSR1, regs, mem.read) is None
    assert tr.open_deliveries(1) == ()


# --------------------------------------------------------------------------- returns

def test_nested_signals_close_lifo_per_thread() -> None:
    mem, tr = FakeMem(), SignalTracker(X86_64)
    a = tr.on_handler_entry(1, 10, frame64(mem, 0x7ffc_0001_0000, 10, ip=0x1111), mem.read)
    b = tr.on_handler_entry(1, 12, frame64(mem, 0x7ffc_0000_f000, 12, ip=0x2222), mem.read)
    other = tr.on_handler_entry(2, 14, frame64(mem, 0x7ffc_0100_0000, 14, ip=0x3333), mem.read)
    assert a and b and other
    assert tr.open_deliveries(1) == (a, b)
    rb = tr.on_sigreturn(1, 15, at_sigreturn(b, X86_64), mem.read, "v")
    assert (rb.signo, rb.resume_ip, rb.anomaly) == (12, 0x2222, None)
    ra = tr.on_sigreturn(1, 15, at_sigreturn(a, X86_64), mem.read, "v")
    assert (ra.signo, ra.resume_ip, ra.anomaly) == (10, 0x1111, None)
    assert tr.open_deliveries(2) == (other,)
    ro = tr.on_sigreturn(2, 15, at_sigreturn(other, X86_64), mem.read, "v")
    assert ro.signo == 14


def test_return_of_an_outer_handler_closes_abandoned_inner_ones() -> None:
    """The inner handler longjmp'd into the outer one, which then returned."""
    mem, tr = FakeMem(), SignalTracker(I386)
    a = tr.on_handler_entry(1, 10, frame32_rt(mem, 0xffd0_9000, 10), mem.read)
    b = tr.on_handler_entry(1, 12, frame32_plain(mem, 0xffd0_4000, 12), mem.read)
    assert a and b
    r = tr.on_sigreturn(1, 173, at_sigreturn(a, I386), mem.read, "v")
    assert r.signo == 10 and r.anomaly is None and r.abandoned == (b,)
    assert tr.open_deliveries(1) == ()


def test_forged_frame_without_delivery() -> None:
    """sigreturn-oriented programming: a frame no delivery built (sigs.c --forge)."""
    mem, tr = FakeMem(), SignalTracker(X86_64)
    landing, sp = 0x5555_5555_4242, 0x5555_5556_0008
    uc = Ucontext64()
    uc.uc_mcontext.rip = landing
    mem.map(sp, bytes(uc))                       # rsp points at the ucontext itself
    r = tr.on_sigreturn(1, 15, {"rsp": sp, "rip": 0x5555_5555_0102}, mem.read, "0x5555555550100")
    assert r.anomaly is Anomaly.NO_DELIVERY and r.signo is None and r.delivery is None
    assert r.resume_ip == landing and r.frame == sp - 8 and not r.resume_changed


def test_frame_mismatch_leaves_open_deliveries_alone() -> None:
    mem, tr = FakeMem(), SignalTracker(X86_64)
    d = tr.on_handler_entry(1, 10, frame64(mem, 0x7ffc_0001_0000, 10), mem.read)
    assert d is not None
    forged_sp = 0x7ffc_0002_0008
    uc = Ucontext64()
    uc.uc_mcontext.rip = 0x4141
    mem.map(forged_sp, bytes(uc))
    r = tr.on_sigreturn(1, 15, {"rsp": forged_sp}, mem.read, "v")
    assert r.anomaly is Anomaly.FRAME_MISMATCH and r.signo is None and r.resume_ip == 0x4141
    assert tr.open_deliveries(1) == (d,)
    assert tr.on_sigreturn(1, 15, at_sigreturn(d, X86_64), mem.read, "v").signo == 10


def test_sigreturn_kind_must_fit_the_frame() -> None:
    """An rt frame returned through the non-rt sigreturn: the kernel restores from another
    address (sp - 8, not sp - 4), which no delivery built."""
    mem, tr = FakeMem(), SignalTracker(I386)
    d = tr.on_handler_entry(1, 10, frame32_rt(mem, 0xffd0_9000, 10), mem.read)
    assert d is not None
    r = tr.on_sigreturn(1, 119, at_sigreturn(d, I386), mem.read, "v")
    assert r.anomaly is Anomaly.FRAME_MISMATCH


@pytest.mark.parametrize("abi", [X86_64, I386])
def test_resume_changed_by_the_handler(abi: Abi) -> None:
    mem, tr = FakeMem(), SignalTracker(abi)
    sp = 0x7ffc_0000_8000 if abi is X86_64 else 0xffd0_8000
    build = frame64 if abi is X86_64 else frame32_rt
    d = tr.on_handler_entry(3, signal.SIGILL, build(mem, sp, signal.SIGILL, ip=0x4000), mem.read)
    assert d is not None and d.resume_ip == 0x4000
    lay = LAYOUTS[abi.name]
    mem.write(sp + lay.rt_ip, (0x4002).to_bytes(abi.word, "little"))   # skip a ud2
    r = tr.on_sigreturn(3, lay.rt_sigreturn_nr, at_sigreturn(d, abi), mem.read, "v")
    assert r.resume_changed and r.resume_ip == 0x4002 and r.anomaly is None and r.signo == 4


def test_unreadable_context_at_sigreturn() -> None:
    mem, tr = FakeMem(), SignalTracker(X86_64)
    r = tr.on_sigreturn(1, 15, {"rsp": 0xdead_0000}, mem.read, "v")
    assert r.resume_ip is None and r.anomaly is Anomaly.NO_DELIVERY
    d = tr.on_handler_entry(1, 10, frame64(mem, 0x7ffc_0001_0000, 10), mem.read)
    assert d is not None
    del mem.regions[d.frame]                     # the handler unmapped its own stack
    mem.map(d.frame, bytes(16))                  # ... all but the first bytes
    r = tr.on_sigreturn(1, 15, at_sigreturn(d, X86_64), mem.read, "v")
    assert r.resume_ip is None and r.anomaly is Anomaly.UNREADABLE_FRAME and r.signo == 10
    assert tr.open_deliveries(1) == ()
    ev = sigreturn_event(r, 1, 0.0, lambda a: None)
    assert ev.resume_ip == 0 and ev.anomaly == "unreadable-frame" and ev.resume_symbol is None


def test_int80_rt_sigreturn_in_a_64_bit_process() -> None:
    """int $0x80 from a 64-bit process enters the i386 table: the engine passes abi=I386."""
    mem, tr = FakeMem(), SignalTracker(X86_64)
    sp = 0x0060_1004
    uc = Ucontext32()
    uc.uc_mcontext.ip = 0x0040_1234
    mem.map(sp + 140, bytes(uc))                 # frame = sp - 4, uc at frame + 144
    r = tr.on_sigreturn(1, 173, {"rsp": sp}, mem.read, "v", abi=I386)
    assert r.anomaly is Anomaly.NO_DELIVERY and r.resume_ip == 0x0040_1234


def test_forget_and_depth_bound() -> None:
    mem, tr = FakeMem(), SignalTracker(X86_64, max_depth=4)
    ds = [tr.on_handler_entry(1, 10, frame64(mem, 0x7ffc_0010_0000 - i * 0x1000, 10, ip=i),
                              mem.read) for i in range(6)]
    assert tr.open_deliveries(1) == tuple(ds[2:])
    tr.forget(1)
    assert tr.open_deliveries(1) == ()
    r = tr.on_sigreturn(1, 15, at_sigreturn(ds[5], X86_64), mem.read, "v")  # type: ignore[arg-type]
    assert r.anomaly is Anomaly.NO_DELIVERY and r.resume_ip == 5


def test_events_and_their_json() -> None:
    mem, tr = FakeMem(), SignalTracker(I386)
    d = tr.on_handler_entry(9, 10, frame32_rt(mem, 0xffd0_1000, 10), mem.read)
    assert d is not None
    names = {VDSO_RT32: "[vdso]!__kernel_rt_sigreturn", HANDLER32: "sigs!handler"}
    se = signal_event(d, 8, 1.5, names.get)
    assert se == SignalEvent(8, 9, 1.5, 10, "SIGUSR1", HANDLER32, "sigs!handler", VDSO_RT32,
                             "[vdso]!__kernel_rt_sigreturn", IP32, 0xffd0_1000)
    j = event_dict(se)
    assert j["restorer"] == f"{VDSO_RT32:#x}" and j["signame"] == "SIGUSR1"
    r = tr.on_sigreturn(9, 173, at_sigreturn(d, I386), mem.read, "[vdso]!__kernel_rt_sigreturn+0x7")
    re_ = sigreturn_event(r, 8, 1.6, names.get)
    assert isinstance(re_, SigreturnEvent)
    j = event_dict(re_)
    assert (j["signo"], j["anomaly"], j["resume_ip"], j["resume_changed"]) == \
        (10, None, f"{IP32:#x}", False)
    forged = tr.on_sigreturn(9, 173, {"rsp": 0xffd0_1004}, mem.read, "0xf7f95597")
    j = json.loads(json.dumps(event_dict(sigreturn_event(forged, 8, 1.7, names.get))))
    assert j["anomaly"] == "no-delivery" and j["signo"] is None


# --------------------------------------------------------------------------- live

SIGNEST_C = r"""
/* signest: SIGUSR1 (SA_SIGINFO) with SIGUSR2 (plain handler) nested inside, SIGALRM on the
 * alternate stack, SIGILL whose handler skips the ud2, SIGURG ignored, SIGWINCH at its
 * default (ignore), then SIGUSR1 again with SIGUSR2's handler longjmp'ing back into SIGUSR1's.
 * Each handler records its address, its return address (the restorer), the interrupted ip
 * and its context pointer: glibc's ucontext_t, or on i386 for the plain handler the
 * sigcontext that follows `sig` on the stack (struct sigframe_ia32). */
#define _GNU_SOURCE
#include <setjmp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>
#ifdef __i386__
#define IP(uc) (((ucontext_t *)(uc))->uc_mcontext.gregs[REG_EIP])
#else
#define IP(uc) (((ucontext_t *)(uc))->uc_mcontext.gregs[REG_RIP])
#endif
struct rec { int signo; uintptr_t handler, restorer, ip, ctx; };
static struct rec recs[64];
static volatile int nrec, abandon;
static sigjmp_buf env;
static char altstack[65536];
static void note(int sig, uintptr_t h, uintptr_t ret, uintptr_t ip, uintptr_t ctx)
{ struct rec *r = &recs[nrec++]; r->signo = sig; r->handler = h; r->restorer = ret; r->ip = ip; r->ctx = ctx; }
static void kill_self(int sig) { syscall(SYS_tgkill, getpid(), (pid_t)syscall(SYS_gettid), sig); }
static void h_usr1(int sig, siginfo_t *si, void *uc)
{
    (void)si;
    note(sig, (uintptr_t)&h_usr1, (uintptr_t)__builtin_return_address(0), IP(uc), (uintptr_t)uc);
    if (abandon) { if (sigsetjmp(env, 1) == 0) kill_self(SIGUSR2); }
    else kill_self(SIGUSR2);
}
#ifdef __x86_64__
/* Installed without SA_SIGINFO: signal_64.c passes &uc in rdx all the same. */
static void h_usr2(int sig, siginfo_t *si, void *uc)
{
    (void)si;
    note(sig, (uintptr_t)&h_usr2, (uintptr_t)__builtin_return_address(0), IP(uc), (uintptr_t)uc);
    if (abandon) siglongjmp(env, 1);
}
#else
static void h_usr2(int sig)
{
    struct sigcontext *sc = (struct sigcontext *)((char *)&sig + 4);
    note(sig, (uintptr_t)&h_usr2, (uintptr_t)__builtin_return_address(0), sc->eip, (uintptr_t)&sig);
    if (abandon) siglongjmp(env, 1);
}
#endif
static void h_info(int sig, siginfo_t *si, void *uc)
{
    (void)si;
    note(sig, (uintptr_t)&h_info, (uintptr_t)__builtin_return_address(0), IP(uc), (uintptr_t)uc);
    if (sig == SIGILL) IP(uc) += 2;
}
static void install(int sig, void *h, int flags)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = (void (*)(int))h;
    sa.sa_flags = flags;
    sigemptyset(&sa.sa_mask);
    if (sigaction(sig, &sa, NULL)) { perror("sigaction"); exit(2); }
}
int main(int argc, char **argv)
{
    stack_t ss; char c; int i; FILE *f;
    if (argc < 2) return 2;
    ss.ss_sp = altstack; ss.ss_size = sizeof altstack; ss.ss_flags = 0;
    if (sigaltstack(&ss, NULL)) return 2;
    install(SIGUSR1, (void *)h_usr1, SA_SIGINFO);
    install(SIGUSR2, (void *)h_usr2, 0);
    install(SIGALRM, (void *)h_info, SA_SIGINFO | SA_ONSTACK);
    install(SIGILL, (void *)h_info, SA_SIGINFO);
    signal(SIGURG, SIG_IGN);
    printf("ready %d\n", (int)getpid()); fflush(stdout);
    if (read(0, &c, 1) != 1) return 2;
    kill_self(SIGUSR1);
    kill_self(SIGALRM);
    __asm__ volatile("ud2");
    kill_self(SIGURG);
    kill_self(SIGWINCH);
    abandon = 1;
    kill_self(SIGUSR1);
    f = fopen(argv[1], "w");
    if (!f) return 2;
    for (i = 0; i < nrec; i++)
        fprintf(f, "{\"signo\": %d, \"handler\": %lu, \"restorer\": %lu, \"ip\": %lu, \"ctx\": %lu}\n",
                recs[i].signo, (unsigned long)recs[i].handler, (unsigned long)recs[i].restorer,
                (unsigned long)recs[i].ip, (unsigned long)recs[i].ctx);
    fprintf(f, "{\"altstack\": [%lu, %lu]}\n", (unsigned long)(uintptr_t)altstack,
            (unsigned long)sizeof altstack);
    fclose(f);
    return 0;
}
"""

AUDIT_ARCH = {0xC000003E: X86_64, 0x40000003: I386}   # include/uapi/linux/audit.h




@pytest.fixture(scope="module")
def signest(tmp_path_factory: pytest.TempPathFactory) -> dict[bool, Path]:
    d = tmp_path_factory.mktemp("signest")
    src = d / "signest.c"
    src.write_text(SIGNEST_C)
    out: dict[bool, Path] = {}
    for m32 in (False, True):
        exe = d / ("signest-m32" if m32 else "signest")
        r = subprocess.run(["gcc", "-O1", "-g", "-Wall", *(["-m32"] if m32 else []), "-o",
                            str(exe), str(src)], capture_output=True, text=True)
        if r.returncode == 0:
            out[m32] = exe
        elif not m32:
            pytest.fail(r.stderr)
    return out


def _caught(pid: int, tid: int, signo: int) -> bool:
    """Bit signo-1 of SigCgt (fs/proc/array.c: render_sigset_t): a handler is installed."""
    with open(f"/proc/{pid}/task/{tid}/status") as f:
        for line in f:
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (signo - 1) & 1)
    return False


@dataclass
class Traced:
    abi: Abi
    deliveries: list[Delivery] = field(default_factory=list)
    returns: list[Sigreturn] = field(default_factory=list)
    not_entered: list[int] = field(default_factory=list)     # stepped with, no handler
    passed: list[int] = field(default_factory=list)          # delivered without a step


def drive(proc: T.Proc) -> Traced:
    """The engine's --signals dance, with nothing else: PTRACE_SYSCALL throughout; at a
    delivery stop of a caught signal PTRACE_SINGLESTEP with it and read the frame at the
    SIGTRAP stop; at each sigreturn's entry read the frame it restores."""
    pid = proc.pid
    tids, pending = target.attach_process(pid)
    assert tids == [pid] and not pending
    regs = target.Regs()
    target.getregs(pid, regs)
    abi = target.abi_of(pid, regs)
    tracker = SignalTracker(abi)
    mem = target.Memory(pid)
    out = Traced(abi)
    T.go(proc)
    try:
        target.syscall(pid)
        status: int | None = None
        while True:
            if status is None:
                _, status = target.wait(pid)
            st, status = status, None
            if os.WIFEXITED(st) or os.WIFSIGNALED(st):
                break
            sig = os.WSTOPSIG(st)
            if sig == signal.SIGTRAP | 0x80:
                info = target.get_syscall_info(pid)
                sabi = AUDIT_ARCH[info.arch]
                if info.op == 1 and is_sigreturn(sabi, info.nr):
                    target.getregs(pid, regs)
                    via = f"{regs['rip'] - 2:#x}"
                    out.returns.append(tracker.on_sigreturn(pid, info.nr, regs, mem.read, via,
                                                            abi=sabi))
                target.syscall(pid)
            elif target.stop_event(st):
                target.syscall(pid)
            elif _caught(pid, pid, sig):
                target.singlestep(pid, sig)
                _, nxt = target.wait(pid)
                if os.WIFSTOPPED(nxt) and os.WSTOPSIG(nxt) == signal.SIGTRAP \
                        and not target.stop_event(nxt):
                    target.getregs(pid, regs)
                    d = tracker.on_handler_entry(pid, sig, regs, mem.read)
                    if d is None:
                        out.not_entered.append(sig)
                    else:
                        out.deliveries.append(d)
                    target.syscall(pid)
                else:
                    status = nxt
            else:
                out.passed.append(sig)
                target.syscall(pid, sig)
    except ProcessGone:
        pass
    finally:
        mem.close()
    return out


def _via_addr(r: Sigreturn) -> int:
    return int(r.via, 16)


SIGS_VARIANTS = [
    pytest.param(False, (), id="64-libc"),
    pytest.param(False, ("--forge",), id="64-forge"),
    pytest.param(True, (), id="m32-libc", marks=pytest.mark.i386),
    pytest.param(True, ("--raw-norestorer",), id="m32-raw-norestorer", marks=pytest.mark.i386),
    pytest.param(True, ("--raw-restorer",), id="m32-raw-restorer", marks=pytest.mark.i386),
]


@pytest.mark.live
@pytest.mark.parametrize("m32,args", SIGS_VARIANTS)
def test_live_sigs(target_bin: Callable[..., Path], reaper: T.Reaper, tmp_path: Path,
                   m32: bool, args: tuple[str, ...]) -> None:
    exe = target_bin("sigs", m32=m32)
    proc = T.start(exe, tmp_path / "rec.jsonl", "--count", "5", *args)
    vdso = T.vdso_range(proc.pid)
    got = drive(proc)
    rc, _, err = proc.finish()
    assert rc == 0, err
    rec = T.read_record(tmp_path / "rec.jsonl")
    deliv = [r for r in rec if r["kind"] == "delivery"]
    assert len(deliv) == len(got.deliveries) == 5, (got, rec)
    assert got.abi.name == ("i386" if m32 else "x86_64")
    forged = "--forge" in args
    assert len(got.returns) == 5 + forged
    for d, r, want in zip(got.deliveries, got.returns, deliv):
        assert d.signo == 10 and d.tid == want["tid"]
        assert d.handler == T.addr(want["handler"])
        assert d.restorer == T.addr(want["restorer"])
        assert d.resume_ip == T.addr(want["interrupted_ip"])
        assert d.rt                                     # SA_SIGINFO: rt frame on both ABIs
        assert r.delivery == d and r.anomaly is None and not r.resume_changed
        assert r.resume_ip == T.addr(want["interrupted_ip"])
        # the sigreturn instruction lies in the restorer the handler returned into
        assert 0 <= _via_addr(r) - d.restorer < 16, (hex(_via_addr(r)), hex(d.restorer))
        in_vdso = vdso[0] <= d.restorer < vdso[1]
        assert in_vdso == (m32 and "--raw-restorer" not in args)
    if forged:
        f = [r for r in rec if r["kind"] == "forge"][0]
        last = got.returns[-1]
        assert f["reached"] is True
        assert last.anomaly is Anomaly.NO_DELIVERY and last.signo is None
        assert last.resume_ip == T.addr(f["resume_ip"])


@pytest.mark.live
@pytest.mark.parametrize("m32", [pytest.param(False, id="64"),
                                 pytest.param(True, id="m32", marks=pytest.mark.i386)])
def test_live_nested_altstack_changed_abandoned_ignored(signest: dict[bool, Path],
                                                        reaper: T.Reaper, tmp_path: Path,
                                                        m32: bool) -> None:
    if m32 not in signest:
        pytest.fail(T.M32_HINT)
    proc = T.start(signest[m32], tmp_path / "rec.jsonl")
    got = drive(proc)
    rc, _, err = proc.finish()
    assert rc == 0, err
    rec = T.read_record(tmp_path / "rec.jsonl")
    alt_base, alt_size = rec[-1]["altstack"]
    hrec = rec[:-1]
    lay = LAYOUTS[got.abi.name]
    word = got.abi.word
    # ignored (SIG_IGN) and default-ignored signals: delivery stops, no handler, no frame
    assert sorted(got.passed) == sorted([signal.SIGURG, signal.SIGWINCH])
    assert got.not_entered == []
    assert [d.signo for d in got.deliveries] == [10, 12, 14, 4, 10, 12] == \
        [h["signo"] for h in hrec]
    for d, h in zip(got.deliveries, hrec):
        assert (d.handler, d.restorer, d.resume_ip) == (h["handler"], h["restorer"], h["ip"]), d
        if d.rt:
            assert h["ctx"] == d.frame + lay.rt_uc          # the handler's ucontext pointer
        else:
            assert h["ctx"] == d.frame + word                # &sig of the plain i386 handler
    # SIGUSR2's plain handler: a non-rt frame on i386 (returns by __kernel_sigreturn, 119)
    assert [d.rt for d in got.deliveries] == [True, True, True, True, True, True] if not m32 \
        else [True, False, True, True, True, False]
    usr1, usr2, alrm, ill, usr1b, usr2b = got.deliveries
    assert usr2.frame < usr1.frame                           # nested below on the same stack
    assert alt_base <= alrm.frame < alt_base + alt_size       # SA_ONSTACK
    assert not alt_base <= usr1.frame < alt_base + alt_size
    r = got.returns
    assert [x.signo for x in r] == [12, 10, 14, 4, 10]
    assert all(x.anomaly is None for x in r)
    assert [x.resume_ip for x in r] == [usr2.resume_ip, usr1.resume_ip, alrm.resume_ip,
                                        ill.resume_ip + 2, usr1b.resume_ip]
    assert [x.resume_changed for x in r] == [False, False, False, True, False]
    assert r[4].abandoned == (usr2b,) and all(x.abandoned == () for x in r[:4])
    want_nr = [lay.rt_sigreturn_nr] * 5
    if m32:
        want_nr[0] = 119
    assert [x.nr for x in r] == want_nr
