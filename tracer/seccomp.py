"""Stops that are harmless once the tracer is gone: a seccomp-filtered marker system call.

A stop on a trap instruction (x86: int3) outlives its tracer badly: when a tracer dies,
exit_ptrace() detaches its tracees and a thread sitting in the signal-delivery-stop of a
trap's SIGTRAP is woken with that SIGTRAP still to deliver (kernel/ptrace.c __ptrace_detach,
kernel/signal.c ptrace_signal), and every trap left in the code kills the next thread that
reaches it (the SIGTRAP of a trap instruction is forced: blocking or ignoring it does not
help).

A marker system call does not: the stubs make a system call whose number no kernel uses
(MARKER_BASE + site; include/uapi/asm/unistd_*.h stop far below, the x32 bit 0x40000000 is
clear), and a small classic-BPF filter installed in the tracee returns SECCOMP_RET_TRACE for
those numbers (checking seccomp_data.arch) and SECCOMP_RET_ALLOW for everything else. With a
tracer that set PTRACE_O_TRACESECCOMP the thread stops in PTRACE_EVENT_SECCOMP; with none (or
one gone during the stop) the system call is not run and returns -ENOSYS
(kernel/seccomp.c __seccomp_filter), exactly what the invalid number returns anyway.

The filter is permanent (inherited by forks and threads, kept across execve), so it is
installed once per process and recognised on later attaches. Installing it needs
CAP_SYS_ADMIN in the tracee or its no_new_privs bit, which is never set for it (that would
change what its later set-user-ID execs do); a tracee in strict mode (Seccomp: 1) is never
made to run a system call; a tracee with filters of its own gets ours only when each of
them, run here on the marker's and on the installing call's seccomp_data, lets them through
(the most restrictive action of all filters wins: KILL > TRAP > ERRNO > USER_NOTIF > TRACE >
LOG > ALLOW, include/uapi/linux/seccomp.h).
"""
from __future__ import annotations

import errno
import os
import struct
from dataclasses import dataclass

from tracer import procfs, target
from tracer.abi import I386, X86_64, Abi
from tracer.errors import MemoryWriteError, ProcessGone
from tracer.vdso import GATEWAY_SYMBOL, VdsoImage

__all__ = ["MARKER_BASE", "MARKER_SPAN", "program", "run_filter", "Verdict",
           "check", "install", "ensure", "only_ours", "seccomp_modes", "ACTION_ALLOW",
           "ACTION_TRACE", "syscall_site"]

MARKER_BASE = 0x3D5D0000
MARKER_SPAN = 0x1000
# include/uapi/linux/seccomp.h
_RET_ACTION_FULL = 0xFFFF0000
ACTION_ALLOW = 0x7FFF0000
ACTION_LOG = 0x7FFC0000
ACTION_TRACE = 0x7FF00000
_SET_MODE_FILTER = 1
_FILTER_FLAG_TSYNC = 1
_INSN = struct.Struct("<HBBI")      # struct sock_filter (include/uapi/linux/filter.h)
_DATA_LEN = 64                      # sizeof(struct seccomp_data)


def _i(code: int, jt: int, jf: int, k: int) -> bytes:
    return _INSN.pack(code, jt, jf, k)


# BPF_LD|BPF_W|BPF_ABS 0x20, BPF_JMP|BPF_JEQ|BPF_K 0x15, BPF_JMP|BPF_JGE|BPF_K 0x35,
# BPF_RET|BPF_K 0x06 (include/uapi/linux/bpf_common.h)
_PROGRAM = b"".join((
    _i(0x20, 0, 0, 4),                                   # A = arch
    _i(0x15, 2, 0, X86_64.audit_arch),                   # x86_64 -> nr check
    _i(0x15, 1, 0, I386.audit_arch),                     # i386 -> nr check
    _i(0x06, 0, 0, ACTION_ALLOW),
    _i(0x20, 0, 0, 0),                                   # A = nr
    _i(0x35, 0, 2, MARKER_BASE),
    _i(0x35, 1, 0, MARKER_BASE + MARKER_SPAN),
    _i(0x06, 0, 0, ACTION_TRACE),
    _i(0x06, 0, 0, ACTION_ALLOW),
))


def program() -> bytes:
    """Our filter: an array of struct sock_filter."""
    return _PROGRAM


def run_filter(prog: bytes, data: dict[int, int | None]) -> int | None:
    """Run a classic-BPF seccomp program on seccomp_data given as {byte offset: 32-bit word}
    (a missing or None word is unknown). Returns the action word, or None when the result
    depends on an unknown word or the program is not one the kernel would accept."""
    n = len(prog) // 8
    a: int | None = 0
    x: int | None = 0
    mem: list[int | None] = [0] * 16
    pc = 0
    M = 0xFFFFFFFF
    for _ in range(4096):
        if not 0 <= pc < n:
            return None
        code, jt, jf, k = _INSN.unpack_from(prog, 8 * pc)
        pc += 1
        cls = code & 7
        if cls in (0, 1):                        # BPF_LD, BPF_LDX
            mode, val = code & 0xE0, None
            if mode == 0x00:                      # BPF_IMM
                val = k
            elif mode == 0x20 and cls == 0:       # BPF_ABS, 32-bit words only in seccomp
                if code & 0x18 != 0 or k % 4 or k >= _DATA_LEN:
                    return None
                val = data.get(k)
            elif mode == 0x60:                    # BPF_MEM
                if k >= 16:
                    return None
                val = mem[k]
            elif mode == 0x80:                    # BPF_LEN
                val = _DATA_LEN
            else:
                return None
            if cls == 0:
                a = val
            else:
                x = val
        elif cls in (2, 3):                      # BPF_ST, BPF_STX
            if k >= 16:
                return None
            mem[k] = a if cls == 2 else x
        elif cls == 4:                           # BPF_ALU
            op = code & 0xF0
            src = x if code & 0x08 else k
            if op == 0x80:                        # BPF_NEG
                a = None if a is None else (-a) & M
                continue
            if a is None or src is None:
                a = None
                continue
            if op in (0x30, 0x90) and src == 0:
                return None
            a = {0x00: a + src, 0x10: a - src, 0x20: a * src,
                 0x30: a // src if src else 0, 0x40: a | src, 0x50: a & src,
                 0x60: a << src if src < 32 else 0, 0x70: a >> src if src < 32 else 0,
                 0x90: a % src if src else 0, 0xA0: a ^ src}.get(op, -1)
            if a == -1:
                return None
            a &= M
        elif cls == 5:                           # BPF_JMP
            op = code & 0xF0
            if op == 0x00:                        # BPF_JA
                pc += k
                continue
            src = x if code & 0x08 else k
            if a is None or src is None:
                return None
            if op == 0x10:
                cond = a == src
            elif op == 0x20:
                cond = a > src
            elif op == 0x30:
                cond = a >= src
            elif op == 0x40:
                cond = bool(a & src)
            else:
                return None
            pc += jt if cond else jf
        elif cls == 6:                           # BPF_RET
            rv = a if code & 0x18 == 0x10 else k
            return rv
        else:                                    # BPF_MISC: TAX, TXA
            if code & 0xF8 == 0x00:
                x = a
            else:
                a = x
    return None


def _rank(action: int) -> int:
    """Higher is more restrictive (kernel/seccomp.c: the lowest action value wins, read as
    a signed 32-bit number)."""
    full = action & _RET_ACTION_FULL
    signed = full - (1 << 32) if full >> 31 else full
    return -signed


def _lets_through(prog: bytes, data: dict[int, int | None], allowed: tuple[int, ...]) -> bool:
    rv = run_filter(prog, data)
    return rv is not None and _rank(rv) <= max(_rank(x) for x in allowed)


def _data(abi: Abi, nr: int, args: tuple[int, ...] | None) -> dict[int, int | None]:
    d: dict[int, int | None] = {0: nr & 0xFFFFFFFF, 4: abi.audit_arch}
    if args is not None:
        for i, v in enumerate(args[:6]):
            d[16 + 8 * i] = v & 0xFFFFFFFF
            d[20 + 8 * i] = (v >> 32) & 0xFFFFFFFF
    return d


def seccomp_modes(pid: int, tids: list[int]) -> set[int]:
    """The seccomp modes of the threads (0 none, 1 strict, 2 filter: /proc/TID/status)."""
    modes = set()
    for t in tids:
        try:
            modes.add(int(procfs.read_status(t).get("Seccomp", "0")))
        except (OSError, ValueError):
            pass
    return modes


@dataclass(frozen=True, slots=True)
class Verdict:
    markers: bool                 # marker stops are safe in this process
    installed: bool               # our filter is on every thread already
    reason: str | None            # why not, for the notice


def check(pid: int, tids: list[int], abi: Abi, markers: int) -> Verdict:
    """May this process get (or does it have) our filter? Every thread must be stopped."""
    modes = seccomp_modes(pid, tids)
    if 1 in modes:
        return Verdict(False, False, "it runs in seccomp strict mode (no system call may be "
                                     "added to it)")
    if modes <= {0}:
        return Verdict(True, False, None)
    ours = _PROGRAM
    have_all = True
    foreign: list[bytes] = []
    for t in tids:
        try:
            progs = target.seccomp_filters(t)
        except ProcessGone:
            continue
        if progs is None:
            return Verdict(False, False, "its seccomp filters cannot be read (vdsotrace needs "
                                         "CAP_SYS_ADMIN for that)")
        if ours not in progs:
            have_all = False
        foreign.extend(p for p in progs if p != ours and p not in foreign)
    allowed = (ACTION_ALLOW, ACTION_TRACE)
    for p in foreign:
        for m in range(markers):
            if not _lets_through(p, _data(abi, MARKER_BASE + m, None), allowed):
                return Verdict(False, False, "its own seccomp filter would not let vdsotrace's "
                                             "marker system calls through")
        if not have_all and not _lets_through(
                p, _data(abi, abi.syscall_number("seccomp"), (_SET_MODE_FILTER, _FILTER_FLAG_TSYNC)),
                (ACTION_ALLOW,)):
            return Verdict(False, False, "its own seccomp filter forbids adding a filter")
    return Verdict(True, have_all, None)


def only_ours(pid: int) -> bool:
    """Whether every filter of every thread is our marker filter (what a process traced
    before by the stop-based engine keeps)."""
    try:
        tids = procfs.list_tasks(pid)
    except OSError:
        return False
    for t in tids:
        progs = target.seccomp_filters(t)
        if progs is None or any(p != _PROGRAM for p in progs):
            return False
    return True


def install(tid: int, mem: target.Memory, abi: Abi, scratch: int, site: int) -> str | None:
    """Make thread `tid` (stopped; the others stopped too) install our filter on every thread
    of its process (SECCOMP_FILTER_FLAG_TSYNC). `scratch` is a zeroed, writable range of 128
    bytes in the tracee (restored to zeros); `site` is a `syscall` (i386: `int 0x80`)
    instruction of the vDSO. Returns None, or why it could not be done."""
    from tracer.inject.remote import RemoteCaller, RemoteError, Stepper
    prog = _PROGRAM
    fprog_at = scratch + len(prog)
    # struct sock_fprog {unsigned short len; struct sock_filter *filter;}: the pointer
    # aligned to its own size
    fprog = (len(prog) // 8).to_bytes(2, "little") + bytes(abi.word - 2) + abi.pack_word(scratch)
    blob = prog + fprog
    stepper = Stepper(tid, abi)
    try:
        mem.write(scratch, blob)
    except MemoryWriteError as e:
        return f"cannot write the filter into it ({e})"
    try:
        call = RemoteCaller(stepper, tid, site, abi)
        try:
            rv = call(abi.syscall_number("seccomp"), _SET_MODE_FILTER, _FILTER_FLAG_TSYNC, fprog_at)
        finally:
            call.restore()
    except (RemoteError, OSError) as e:
        return f"the system call that installs the filter did not run ({e})"
    finally:
        try:
            mem.write(scratch, bytes(len(blob)))
        except MemoryWriteError:
            pass
        stepper.resend_held()
    if rv == 0:
        return None
    if rv > 0:
        return f"its thread {rv} has other seccomp filters than the rest"
    if rv in (-errno.EPERM, -errno.EACCES):          # EPERM, EACCES: neither CAP_SYS_ADMIN nor no_new_privs
        return ("it has neither CAP_SYS_ADMIN nor no_new_privs, which installing a seccomp "
                "filter needs (vdsotrace does not set no_new_privs for it)")
    return f"installing the filter failed: {os.strerror(-rv)}"


def ensure(pid: int, tids: list[int], mem: target.Memory, abi: Abi, scratch: int,
           site: int | None, markers: int) -> str | None:
    """Our filter on every thread, installed if needed: None when marker stops are safe,
    otherwise why not."""
    v = check(pid, tids, abi, markers)
    if not v.markers:
        return v.reason
    if v.installed:
        return None
    if site is None:
        return "its vDSO has no system call instruction to install the filter from"
    return install(tids[0], mem, abi, scratch, site)


def syscall_site(image: VdsoImage, base: int) -> int | None:
    """A system call instruction of the vDSO (the arch's `syscall_insn`) to run the installing
    call from: x86_64's first `syscall`, i386's `int 0x80` in __kernel_vsyscall (its only
    entry to the kernel from which a thread returns where remote.py expects)."""
    from tracer.disasm import disassemble
    insn = image.abi.syscall_insn
    for f in image.functions:
        if image.abi is I386 and f.symbol != GATEWAY_SYMBOL:
            continue
        for i in disassemble(image, f):
            if i.raw == insn:
                return base + i.address
    return None
