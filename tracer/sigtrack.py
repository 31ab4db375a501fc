"""The signal return path (`trace --signals`): deliveries, handlers, restorers, sigreturns.

Pure logic on registers and a memory reader; the engine does the ptrace dance:

- delivery: at a signal-delivery-stop for a caught signal the engine resumes with
  PTRACE_SINGLESTEP and the signal. The kernel builds the frame, points sp at it and ip at the
  handler, and reports a SIGTRAP stop before the handler's first instruction
  (kernel/signal.c: signal_delivered -> ptrace_notify(SIGTRAP) when stepping). There
  `SignalTracker.on_handler_entry` reads the frame and opens a `Delivery` on the thread.
- return: with PTRACE_SYSCALL the engine sees the entry of rt_sigreturn / sigreturn; there
  `SignalTracker.on_sigreturn` reads the context the kernel is about to restore and closes the
  matching delivery (LIFO per thread), or reports the anomaly.

Frame layouts: each arch's `sigframe` (tracer/arch/: x86_64.py, i386.py, aarch64.py), with the
kernel's frame structures they come from. Three kinds of handler entry: the handler's arguments
only in registers and the restorer the frame's first word (x86_64: always an rt frame); also in
the frame (i386: signo, and for an rt frame &info and &uc, told from a plain frame's saved
selectors by being self-pointers); or the restorer in the link register and &info/&uc in
registers only for SA_SIGINFO handlers (arm64: always an rt frame, told by the frame record the
kernel points x29 at).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from tracer.abi import I386, X86_64, Abi
from tracer.arch import by_name
from tracer.arch.base import SigFrameLayout
from tracer.errors import MemoryReadError
from tracer.events import SignalEvent, SigreturnEvent
from tracer.tables.signals import signame

__all__ = ["ReadMem", "RegsLike", "Anomaly", "FrameLayout", "LAYOUTS", "Delivery", "Sigreturn",
           "SignalTracker", "parse_handler_frame", "sigreturn_frame", "is_sigreturn",
           "signal_event", "sigreturn_event"]

ReadMem = Callable[[int, int], bytes]


class RegsLike(Protocol):
    """Registers by their 64-bit user_regs_struct names: a dict, or target.Regs itself."""
    def __getitem__(self, name: str) -> int: ...


class Anomaly(StrEnum):
    """Why a sigreturn is not the close of a delivery we saw."""
    NO_DELIVERY = "no-delivery"            # no delivery open on the thread: a forged frame (SROP)
    FRAME_MISMATCH = "frame-mismatch"      # deliveries open, but none built this frame
    UNREADABLE_FRAME = "unreadable-frame"  # the context to restore cannot be read


FrameLayout = SigFrameLayout

# each arch's frames (tracer.arch: Arch.sigframe)
LAYOUTS: dict[str, FrameLayout] = {a.name: a.sigframe for a in (X86_64, I386, by_name("aarch64"))}


def _layout(abi: Abi) -> FrameLayout:
    lay: FrameLayout | None = getattr(abi, "sigframe", None)
    if lay is None or lay.abi != abi.name:
        raise ValueError(f"no signal frame layout for ABI {abi.name}")
    return lay


@dataclass(frozen=True, slots=True)
class Delivery:
    """A signal the kernel delivered to a handler: what the frame at the handler's entry says."""
    tid: int
    signo: int
    handler: int                 # runtime_addr of the handler's first instruction
    restorer: int                # where the handler's `ret` goes: the frame's pretcode (x86), x30 (arm64)
    resume_ip: int               # the interrupted ip saved in the frame's context
    frame: int                   # runtime_addr of the frame (the handler's sp at entry)
    rt: bool                     # rt frame (always on x86_64 and arm64; SA_SIGINFO on i386)
    abi: str


@dataclass(frozen=True, slots=True)
class Sigreturn:
    """A return through rt_sigreturn / sigreturn, read at the system call's entry."""
    tid: int
    nr: int
    via: str                     # the trampoline, as the engine named it
    frame: int                   # runtime_addr of the frame the kernel restores from
    resume_ip: int | None        # where the restored context continues; None: unreadable
    delivery: Delivery | None    # the delivery it closes
    anomaly: Anomaly | None
    resume_changed: bool         # the handler changed where its context resumes
    abandoned: tuple[Delivery, ...] = ()  # deeper deliveries it closed too (longjmp'd out of)

    @property
    def signo(self) -> int | None:
        return self.delivery.signo if self.delivery is not None else None


def is_sigreturn(abi: Abi, nr: int) -> bool:
    """Whether system call `nr` of `abi` restores a signal frame."""
    lay = abi.sigframe
    return lay.abi == abi.name and (nr == lay.rt_sigreturn_nr or nr == lay.sigreturn_nr)


def _word(data: bytes, off: int, word: int) -> int:
    return int.from_bytes(data[off:off + word], "little")


def _entry_regs(lay: FrameLayout, abi: Abi, tid: int, signo: int, regs: RegsLike,
                read: ReadMem) -> Delivery | None:
    """Frames whose handler arguments are only in registers (x86_64, arm64): always rt."""
    mask, w = abi.mask, lay.word
    sp, ip = regs[abi.sp] & mask, regs[abi.pc] & mask
    r_sig, r_info, r_uc = lay.handler_regs
    if ((regs[r_sig] & 0xFFFFFFFF) != signo or regs[r_info] & mask != sp + lay.rt_info
            or regs[r_uc] & mask != sp + lay.rt_uc):
        return None
    try:
        restorer = _word(read(sp, w), 0, w)
        resume = _word(read(sp + lay.rt_ip, w), 0, w)
    except MemoryReadError:
        return None
    return Delivery(tid, signo, ip, restorer, resume, sp, True, abi.name)


def _entry_link(lay: FrameLayout, abi: Abi, tid: int, signo: int, regs: RegsLike,
                read: ReadMem) -> Delivery | None:
    """arm64 (arch/arm64/kernel/signal.c setup_return): x0 = signo, x30 = the restorer,
    x29 = the frame record above the rt_sigframe, which holds the interrupted x29/x30, the
    same pair the frame's sigcontext saved; x1/x2 = &info/&uc only with SA_SIGINFO."""
    mask, w = abi.mask, lay.word
    sp, ip = regs[abi.sp] & mask, regs[abi.pc] & mask
    r_sig, r_info, r_uc = lay.handler_regs
    assert lay.restorer_reg is not None and lay.rt_fp_lr is not None
    if regs[r_sig] & 0xFFFFFFFF != signo:
        return None
    fp = regs[abi.fp] & mask
    # the record lies above the whole frame (get_sigframe: 16-byte aligned)
    if fp % 16 or fp < sp + lay.rt_ip + 3 * w:
        return None
    try:
        record = read(fp, 2 * w)
        saved = read(sp + lay.rt_fp_lr, 2 * w)
        resume = _word(read(sp + lay.rt_ip, w), 0, w)
    except MemoryReadError:
        return None
    if record != saved:
        return None
    return Delivery(tid, signo, ip, regs[lay.restorer_reg] & mask, resume, sp, True, abi.name)


def _entry_stack(lay: FrameLayout, abi: Abi, tid: int, signo: int, regs: RegsLike,
                 read: ReadMem) -> Delivery | None:
    """Frames that hold signo and (rt) the &info/&uc pointers themselves (i386), the
    registers too (rt) or zeros there (plain)."""
    mask, w = abi.mask, lay.word
    sp, ip = regs[abi.sp] & mask, regs[abi.pc] & mask
    r_sig, r_info, r_uc = lay.handler_regs
    if regs[r_sig] & 0xFFFFFFFF != signo:
        return None
    try:
        head = read(sp, 4 * w)               # pretcode, sig, pinfo, puc (rt) / gs, fs (plain)
    except MemoryReadError:
        return None
    restorer, sig, pinfo, puc = (_word(head, i * w, w) for i in range(4))
    if sig != signo:
        return None
    rt = pinfo == sp + lay.rt_info and puc == sp + lay.rt_uc
    if rt:
        if regs[r_info] & mask != pinfo or regs[r_uc] & mask != puc:
            return None
        ip_off = lay.rt_ip
    else:
        # a plain frame: both registers 0
        if lay.plain_ip is None or regs[r_info] & mask or regs[r_uc] & mask:
            return None
        ip_off = lay.plain_ip
    try:
        resume = _word(read(sp + ip_off, w), 0, w)
    except MemoryReadError:
        return None
    return Delivery(tid, signo, ip, restorer, resume, sp, rt, abi.name)




def parse_handler_frame(abi: Abi, tid: int, signo: int, regs: RegsLike,
                        read: ReadMem) -> Delivery | None:
    """The frame the kernel built for `signo`, read at the handler's first instruction.

    None when the registers and memory are not those of a frame the kernel just built for
    `signo` (the step did not enter a handler: an ignored or default signal, a failed frame
    setup) or when the frame cannot be read.
    """
    lay = _layout(abi)
    entry = (_entry_stack if lay.args_in_frame else
             _entry_link if lay.restorer_reg is not None else _entry_regs)
    return entry(lay, abi, tid, signo, regs, read)


def sigreturn_frame(abi: Abi, nr: int, sp: int) -> tuple[int, int]:
    """(frame, address of the saved ip) that system call `nr` restores, given sp at its entry.

    Raises ValueError for a system call that is not a sigreturn of `abi`.
    """
    lay = _layout(abi)
    sp &= abi.mask
    if nr == lay.rt_sigreturn_nr:
        frame = (sp - lay.rt_sigreturn_sp_adjust) & abi.mask
        return frame, frame + lay.rt_ip
    if nr == lay.sigreturn_nr and lay.sigreturn_sp_adjust is not None \
            and lay.plain_ip is not None:
        frame = (sp - lay.sigreturn_sp_adjust) & abi.mask
        return frame, frame + lay.plain_ip
    raise ValueError(f"system call {nr} is not a sigreturn on {abi.name}")


class SignalTracker:
    """Open deliveries per thread; matches each sigreturn with the delivery it closes.

    One per address space (the ABI is the space's); `abi=` on a call overrides it, for a
    system call made through the other ABI's entry (int $0x80 in a 64-bit process).
    """

    def __init__(self, abi: Abi, max_depth: int = 64) -> None:
        _layout(abi)
        self.abi = abi
        self.max_depth = max_depth
        self._open: dict[int, list[Delivery]] = {}

    def open_deliveries(self, tid: int) -> tuple[Delivery, ...]:
        """The thread's open deliveries, outermost first."""
        return tuple(self._open.get(tid, ()))

    def forget(self, tid: int) -> None:
        """The thread exited or exec'd: its handlers will never return."""
        self._open.pop(tid, None)

    def clear(self) -> None:
        self._open.clear()

    def on_handler_entry(self, tid: int, signo: int, regs: RegsLike, read: ReadMem,
                         *, abi: Abi | None = None) -> Delivery | None:
        """At the SIGTRAP stop after PTRACE_SINGLESTEP with `signo`: open the delivery, or
        None when the thread did not enter a handler for `signo` (nothing is opened)."""
        d = parse_handler_frame(abi or self.abi, tid, signo, regs, read)
        if d is not None:
            stack = self._open.setdefault(tid, [])
            stack.append(d)
            if len(stack) > self.max_depth:
                # Handlers that longjmp out never return; keep the newest.
                del stack[:len(stack) - self.max_depth]
        return d

    def on_sigreturn(self, tid: int, nr: int, regs: RegsLike, read: ReadMem,
                     via: str, *, abi: Abi | None = None) -> Sigreturn:
        """At the entry of rt_sigreturn / sigreturn: close the delivery whose frame the kernel
        restores, and any deeper ones (handlers left by longjmp); with none open, or none that
        built this frame, report the anomaly and leave the open ones alone."""
        a = abi or self.abi
        frame, ip_addr = sigreturn_frame(a, nr, regs[a.sp])
        try:
            resume: int | None = _word(read(ip_addr, a.word), 0, a.word)
        except MemoryReadError:
            resume = None
        stack = self._open.get(tid)
        if not stack:
            return Sigreturn(tid, nr, via, frame, resume, None, Anomaly.NO_DELIVERY, False)
        for i in range(len(stack) - 1, -1, -1):
            d = stack[i]
            if d.frame == frame and d.abi == a.name:
                abandoned = tuple(reversed(stack[i + 1:]))
                del stack[i:]
                if not stack:
                    del self._open[tid]
                if resume is None:
                    return Sigreturn(tid, nr, via, frame, None, d, Anomaly.UNREADABLE_FRAME,
                                     False, abandoned)
                return Sigreturn(tid, nr, via, frame, resume, d, None, resume != d.resume_ip,
                                 abandoned)
        return Sigreturn(tid, nr, via, frame, resume, None, Anomaly.FRAME_MISMATCH, False)


# ---------------------------------------------------------------- events

Symbolize = Callable[[int], "str | None"]


def signal_event(d: Delivery, pid: int, time: float, symbol: Symbolize) -> SignalEvent:
    """The `signal` event of a delivery; `symbol(addr)` names an address or gives None."""
    return SignalEvent(pid=pid, tid=d.tid, time=time, signo=d.signo, signame=signame(d.signo),
                       handler=d.handler, handler_symbol=symbol(d.handler),
                       restorer=d.restorer, restorer_symbol=symbol(d.restorer),
                       resume_ip=d.resume_ip, frame=d.frame)


def sigreturn_event(r: Sigreturn, pid: int, time: float, symbol: Symbolize) -> SigreturnEvent:
    """The `sigreturn` event of a return. An unreadable context (the kernel will kill the
    thread with SIGSEGV) has no resume address: SigreturnEvent.resume_ip is an int, so it is
    written as 0, with the anomaly saying why."""
    resume = r.resume_ip if r.resume_ip is not None else 0
    return SigreturnEvent(pid=pid, tid=r.tid, time=time, via=r.via, resume_ip=resume,
                          resume_symbol=symbol(resume) if r.resume_ip is not None else None,
                          signo=r.signo,
                          anomaly=r.anomaly.value if r.anomaly is not None else None,
                          resume_changed=r.resume_changed)
