"""In-process recording of vDSO calls (`trace --inject`): a stub per function and a shared ring.

Injection (all threads stopped): the tracee itself runs memfd_create (MFD_ALLOW_SEALING),
fchmod 0600, ftruncate, fcntl(F_ADD_SEALS: the size can never change, nor the seals), mmap and
close from a `syscall` instruction of its own vDSO (see remote.py), which gives it
  * `/memfd:vdsotrace-code`, mapped r-x MAP_SHARED within rel32 reach of the vDSO, and
  * `/memfd:vdsotrace-ring`, mapped rw- MAP_SHARED;
an i386 tracee runs them (mmap2) from the `int 0x80` of __kernel_vsyscall, and the kernel
places both mappings below 4 GiB for a 32-bit system call (any address there is in rel32 reach
in 32-bit code). Its stubs are 32-bit code (stubs32.py); __kernel_vsyscall itself is not
recorded (the stop-based engine shows its system calls; --inject marks the vDSO functions'
calls into it as fallbacks).
the tracer opens both through /proc/PID/fd/N, writes the code through its own descriptor, and
reads and writes the ring with pread/pwrite (never mapped in the tracer: tracee-controlled
memory must not be able to fault it). Each traced function's entry becomes `jmp rel32` to its stub (stubs.py), which
records the call into the ring without any ptrace stop; the tracer drains the ring.

The ring is writable by the tracee: every slot is checked before it becomes a RawRecord, and a
slot that fails is counted (`corrupt()`) and skipped; a HEAD no stub can have written is
counted (`header_corrupt()`) and followed, and each drain is bounded whatever the header says.
A full ring is never overwritten: the stub waits for the tracer to make room (spinning, then
yielding its CPU) as long as the tracer's heartbeat in the code page (the TSC when it last
drained, `heartbeat()`) is younger than _PATIENCE_S, so every call is recorded at the
tracer's pace; a tracer killed, stopped or blocked stops beating, and the stubs then count
calls in the ring's `lost` word instead (`lost()`, believed only within what the process can
have counted), as they always do with `lossy` (the heartbeat is never written).

Leaving (all threads stopped): the code page's ring pointer is cleared (every stub stops
recording at once, forked children included, since the page is shared), threads in a stub
after its copy returned (gettid, the ring-writing window, the return) are stepped out of the
stub, the vDSO's bytes are restored, the records
still in the ring are drained, and the ring is unmapped. The code page is unmapped too unless
a thread is inside it or may return into it (a return address into it on its stack, or the
saved pc of a signal frame: stackscan.py); the ring stays mapped when such a saved pc lies in a
stub's ring-writing window (that context already holds the ring's address).
"""
from __future__ import annotations

import errno
import fcntl
import gc
import mmap
import os
import secrets
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

from tracer import procfs, seccomp, sigframes, stackscan, target
from tracer.abi import I386, X86_64, Abi
from tracer.decoders import Decoder, for_function, out_size
from tracer.errors import MemoryReadError, MemoryWriteError, ProcessGone, TracerError
from tracer.inject import layout as L
from tracer.instrument import Instrument
from tracer.tsc import TscClock, tsc_usable
from tracer.inject.plan import JMP_LEN, Plan, PlanError, plan_image
from tracer.inject.remote import RemoteCaller, RemoteError, Stepper
from tracer.inject.stubs import CodePage, build_code
from tracer.inject.stubs32 import build_code32
from tracer.vdso import GATEWAY_SYMBOL, VdsoFunction, VdsoImage

__all__ = ["InjectError", "RawRecord", "Recorder", "CallStats", "CODE_NAME", "RING_NAME"]

CODE_NAME = "vdsotrace-code"
RING_NAME = "vdsotrace-ring"
_HINT = "; run without --inject"



@dataclass(frozen=True, slots=True)
class _Numbers:
    MMAP: int
    MUNMAP: int
    CLOSE: int
    FTRUNCATE: int
    FCHMOD: int
    MEMFD_CREATE: int
    FCNTL: int


# arch/x86/entry/syscalls/syscall_64.tbl; syscall_32.tbl (i386: mmap2, its offset in pages;
# fcntl64)
_NR = {8: _Numbers(MMAP=9, MUNMAP=11, CLOSE=3, FTRUNCATE=77, FCHMOD=91, MEMFD_CREATE=319,
                   FCNTL=72),
       4: _Numbers(MMAP=192, MUNMAP=91, CLOSE=6, FTRUNCATE=93, FCHMOD=94, MEMFD_CREATE=356,
                   FCNTL=221)}
# include/uapi/linux/memfd.h, include/uapi/asm-generic/mman-common.h, mman.h
_MFD_CLOEXEC, _MFD_ALLOW_SEALING, _MFD_EXEC = 0x1, 0x2, 0x10
# include/uapi/linux/fcntl.h: F_ADD_SEALS = F_LINUX_SPECIFIC_BASE + 9, F_GET_SEALS + 10.
# SHRINK and GROW fix the size (a truncated file under a mapping faults with SIGBUS); SEAL
# forbids any change of the seals afterwards. No write seal: the tracer writes both files.
_F_ADD_SEALS, _F_GET_SEALS = 1033, 1034
_F_SEAL_SEAL, _F_SEAL_SHRINK, _F_SEAL_GROW = 0x1, 0x2, 0x4
_SEALS = _F_SEAL_SEAL | _F_SEAL_SHRINK | _F_SEAL_GROW
_PROT_READ, _PROT_WRITE, _PROT_EXEC = 1, 2, 4
_MAP_SHARED, _MAP_FIXED_NOREPLACE = 0x01, 0x100000
_PAGE = 4096
_REACH = (1 << 31) - (64 << 20)      # keep the code page well inside rel32 reach of the vDSO
_PID_MAX_LIMIT = 4 * 1024 * 1024     # include/linux/threads.h
# A stub facing a full ring waits for room while the tracer's heartbeat is younger than
# this, then counts the call lost. Not 0.1 s: on a loaded machine a runnable tracer can wait
# for a CPU that long (runqueue waits of 0.26-0.46 s measured on the project's 2-CPU VM),
# and a tracer killed or stopped costs its tracee this much once, not per call.
_PATIENCE_S = 0.5
_BEAT_S = 0.002                      # the least time between two heartbeats
_STALL_S = 2.0                       # an uncommitted slot this old, with later ones committed
_COPY_STEPS = 2000                   # single steps spent taking a thread out of a copied body
_SLOT = struct.Struct(L.SLOT_FORMAT)
_ERR_LO = (1 << 64) - 4095           # -4095..-1 as an unsigned word: -MAX_ERRNO..-1
_ERR_LO32 = (1 << 32) - 4095


class InjectError(TracerError):
    """The tracee cannot be traced by injection (safely or exactly)."""


class _RingShort(Exception):
    """The ring file is shorter than the tracer expects (it cannot be, once sealed)."""


class _FileRing:
    """The ring, read and written through the tracer's descriptor with pread/pwrite and never
    mapped into the tracer: it is memory the tracee controls, and a mapping of a file that
    shrinks under it faults (SIGBUS) in the reader, where a read only comes back short."""
    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __getitem__(self, sl: slice) -> bytes:
        n = sl.stop - sl.start
        data = os.pread(self.fd, n, sl.start)
        if len(data) != n:
            raise _RingShort()
        return data

    def __setitem__(self, sl: slice, data: bytes) -> None:
        if os.pwrite(self.fd, data, sl.start) != len(data):
            raise _RingShort()

    def close(self) -> None:
        pass                    # the descriptor is the Recorder's


_RingBuf = mmap.mmap | _FileRing


@dataclass(frozen=True, slots=True)
class RawRecord:
    tid: int
    func: str                   # plain name, e.g. "clock_gettime"
    args: tuple[int, ...]       # raw argument words (len = decoder.nargs)
    ret: int                    # raw return register value (unsigned, abi word)
    outs: tuple[bytes | None, ...]   # per decoder OutSpec; None: NULL pointer or not copied
    fallback: bool
    t_entry_ns: int             # CLOCK_MONOTONIC ns
    duration_ns: int
    caller: int                 # return address
    fid: int = 0                # index into the recorder's `funcs` (func is its plain name)


@dataclass(slots=True)
class CallStats:
    """Per-function totals for `-c`, filled by Recorder.drain_stats."""
    calls: int = 0
    fallbacks: int = 0
    errors: int = 0
    total_ns: int = 0

    def add(self, fallback: bool, error: bool, duration_ns: int) -> None:
        self.calls += 1
        self.fallbacks += fallback
        self.errors += error
        self.total_ns += duration_ns


def _record_maker() -> Callable[..., RawRecord]:
    """RawRecord(...) through the slots' descriptors: the frozen dataclass __init__ goes
    through object.__setattr__ per field and costs twice as much, which the drain loop's
    1M records/s budget cannot afford. Same fields, same order, same instance."""
    new = object.__new__
    s_tid, s_func, s_args, s_ret, s_outs, s_fb, s_t, s_dur, s_caller, s_fid = (
        getattr(RawRecord, name).__set__ for name in RawRecord.__slots__)

    def make(tid: int, func: str, args: tuple[int, ...], ret: int,
             outs: tuple[bytes | None, ...], fallback: bool, t_entry_ns: int,
             duration_ns: int, caller: int, fid: int) -> RawRecord:
        r = new(RawRecord)
        s_tid(r, tid)
        s_func(r, func)
        s_args(r, args)
        s_ret(r, ret)
        s_outs(r, outs)
        s_fb(r, fallback)
        s_t(r, t_entry_ns)
        s_dur(r, duration_ns)
        s_caller(r, caller)
        s_fid(r, fid)
        return r
    return make


_make_record = _record_maker()


def _status_refusal(pid: int) -> str | None:
    try:
        st = procfs.read_status(pid)
    except OSError as e:
        raise ProcessGone(f"process {pid} is gone") from e
    mode = st.get("Seccomp", "0")
    # mode 2 with nothing but the stop-based engine's marker filter (left by an earlier
    # trace, seccomp.py) lets every system call of the stubs through
    if mode != "0" and not (mode == "2" and seccomp.only_ours(pid)):
        return (f"process {pid} runs under seccomp (mode {mode}): the injected stubs "
                "make system calls a filter may kill it for")
    feats = st.get("x86_Thread_features", "")
    if "shstk" in feats.split():
        return (f"process {pid} has user shadow stacks enabled: the stubs' returns would be "
                "rejected")
    return None


def _find_gap(pid: int, base: int, size: int) -> int:
    """A free, page-aligned range of `size` bytes, nearest the vDSO, within rel32 reach."""
    maps = sorted(procfs.read_maps(pid), key=lambda m: m.start)
    lo_lim = max(base - _REACH, 1 << 20)
    hi_lim = min(base + _REACH, 0x7FFFFFFFF000)
    best: int | None = None
    prev_end = 0
    for m in [*maps, procfs.MapEntry(0x7FFFFFFFF000, 0x7FFFFFFFF000, "", 0, "", 0, "")]:
        gap_lo, gap_hi = prev_end + _PAGE, m.start - _PAGE   # a guard page each side
        prev_end = max(prev_end, m.end)
        lo, hi = max(gap_lo, lo_lim), min(gap_hi, hi_lim)
        if hi - lo < size:
            continue
        cand = hi - size if hi <= base else lo           # the end of the gap nearer the vDSO
        if best is None or abs(cand - base) < abs(best - base):
            best = cand
    if best is None:
        raise InjectError(f"no free address range within 2 GiB of the vDSO for the stubs{_HINT}")
    return best & ~(_PAGE - 1)


class Recorder(Instrument):
    """The in-tracee recorder (--inject): stubs in a code page of ours record each call into
    a ring shared with the tracer, which drains it; no stop per call."""
    polls = True

    def __init__(self, pid: int, mem: target.Memory, abi: Abi, image: VdsoImage, base: int,
                 funcs: list[VdsoFunction], lossy: bool = False) -> None:
        self.pid = pid
        # lossy: a full ring drops (and counts) calls; else the stubs wait for room while the
        # tracer's heartbeat is fresh (never written with lossy: the stubs find it stale)
        self.lossy = lossy
        self._beat_at = 0.0
        # the longest time between two heartbeats (install counts as one): the stubs stop
        # waiting only after a silence longer than _PATIENCE_S, which this then shows
        self.longest_silence = 0.0
        self.patience_s = _PATIENCE_S
        self.mem = mem
        self.abi = abi
        self.image = image
        self.base = base
        # i386: the gateway is not copied (see plan.py); its calls from the vDSO functions
        # are recorded as those calls' fallbacks
        self.funcs = [f for f in funcs if f.symbol != GATEWAY_SYMBOL or abi.word == 8]
        self._skipped_gateway = len(self.funcs) != len(funcs)
        self._nr = _NR[abi.word]
        self.decoders: list[Decoder] = [for_function(f.plain) for f in self.funcs]
        self._fid_by_name = {f.plain: i for i, f in enumerate(self.funcs)}
        self._nargs = [min(d.nargs, L.MAX_ARGS) for d in self.decoders]
        self._outsz = [tuple(out_size(o.layout, abi) for o in d.outs[:L.NOUTS])
                       for d in self.decoders]
        self._plan: Plan | None = None
        self._code: CodePage | None = None
        self._code_addr = 0
        self._ring_addr = 0
        self._code_fd = -1
        self._ring_fd = -1
        self._ring: _RingBuf | None = None
        self._saved: list[tuple[int, bytes]] = []     # (runtime_addr, original bytes)
        self._tail = 0
        self._lost_final: int | None = None
        self._corrupt = 0
        self._header_corrupt = 0       # times HEAD was found where no stub can put it
        self._ring_broken = False      # the ring file came back short: not read any more
        self._final = False            # no stub can commit a slot any more
        self._lost_seen = 0            # the last plausible value of the lost counter
        self._lost_bad: int | None = None   # an impossible value the counter was found at
        self._t_install = time.monotonic()
        self._pending: list[RawRecord] = []
        self._clock: TscClock | None = None
        self._last_refine = 0.0
        self._stall_at: tuple[int, float] | None = None
        self.installed = False
        self.code_page_kept = False
        self.vdso_lost = False          # the process unmapped (or replaced) its vDSO
        self.ring_kept = False

    # ------------------------------------------------------------------ install
    def install_in(self, tids: list[int]) -> list[str]:
        self.install(tids[0])
        return []

    def lose_vdso(self) -> None:
        self.vdso_lost = True

    def install(self, tid: int) -> None:
        if self.abi not in (X86_64, I386) or self.image.abi is not self.abi:
            raise InjectError(f"--inject supports x86_64 and i386 tracees with their own "
                              f"vDSO only (an {self.image.abi.name} vDSO in an {self.abi.name} "
                              f"process){_HINT}")
        if not self.funcs and self._skipped_gateway:
            raise InjectError(f"--inject does not record {GATEWAY_SYMBOL} (system calls){_HINT}")
        why = _status_refusal(self.pid)
        if why:
            raise InjectError(why + _HINT)
        try:
            plan = plan_image(self.image, self.funcs, self.abi)
        except PlanError as e:
            raise InjectError(f"the vDSO is not the shape --inject expects: {e}{_HINT}") from e
        self._check_live_bytes(plan)
        tail, room = self._vdso_tail()
        if room >= 2 and not tsc_usable(self._threads(), self.mem, tail):
            raise InjectError(f"process {self.pid} has the time-stamp counter disabled (prctl "
                              "PR_SET_TSC): the injected stubs read it; trace without --inject")
        self._plan = plan
        self._clock = TscClock.anchored()
        # a 32-bit process: any address below 4 GiB is in reach; the kernel chooses
        hint = _find_gap(self.pid, self.base, L.CODE_SIZE) if self.abi.word == 8 else 0
        stepper = Stepper(self.pid)
        try:
            self._inject(tid, plan, hint, stepper)
            build = build_code if self.abi.word == 8 else build_code32
            self._code = build(plan, self.base, self._code_addr, self.decoders,
                               (secrets.randbits(31), -secrets.randbits(31) - 1),
                               self._ring_addr)
            page = bytearray(self._code.data)
            # (the i386 stubs compare its low 32 bits: 0.5 s of a TSC below 8 GHz fits)
            page[L.CODE_PATIENCE:L.CODE_PATIENCE + 8] = min(
                int(_PATIENCE_S * 1e9 / self._clock.rate), 0xFFFFFFFF).to_bytes(8, "little")
            if not self.lossy:
                page[L.CODE_HEARTBEAT:L.CODE_HEARTBEAT + 8] = self._clock.read().to_bytes(
                    8, "little")
            os.pwrite(self._code_fd, bytes(page), 0)
            self._beat_at = time.monotonic()
            self._step_out_of_entries(plan, stepper)
            self._patch_entries(plan)
            self.installed = True
        except (PlanError, RemoteError, MemoryWriteError, MemoryReadError, OSError) as e:
            left = self._undo_partial(tid, stepper)
            raise InjectError(f"cannot inject into {self.pid}: {e}{left}{_HINT}") from e
        finally:
            stepper.resend_held()

    def _check_live_bytes(self, plan: Plan) -> None:
        for fp in plan.functions:
            off, size = fp.func.image_offset, fp.func.size
            try:
                live = self.mem.read(self.base + off, size)
            except MemoryReadError as e:
                raise InjectError(f"cannot read {fp.func.symbol} in the tracee: {e}{_HINT}") from e
            if live != self.image.data[off:off + size]:
                raise InjectError(f"{fp.func.symbol} in the tracee differs from its image "
                                  f"(breakpoints or another patcher?){_HINT}")

    def _vdso_tail(self) -> tuple[int, int]:
        """runtime_addr and size of the zero padding after the image inside the mapping."""
        for m in procfs.read_maps(self.pid):
            if m.start == self.base:
                start = (self.image.image_size + 15) & ~15
                return self.base + start, m.end - self.base - start
        raise InjectError(f"the vDSO at {self.base:#x} is not mapped in {self.pid}{_HINT}")

    def _inject(self, tid: int, plan: Plan, hint: int, stepper: Stepper) -> None:
        names = CODE_NAME.encode() + b"\0" + RING_NAME.encode() + b"\0"
        tail, room = self._vdso_tail()
        if room < len(names):
            raise InjectError(f"no room after the vDSO image for scratch bytes{_HINT}")
        old_tail = self.mem.read(tail, len(names))
        call = self._caller(stepper, tid, plan)
        self._remote_fds: list[int] = []
        self.mem.write(tail, names)
        try:
            flags = _MFD_CLOEXEC | _MFD_ALLOW_SEALING
            code_fd = call(self._nr.MEMFD_CREATE, tail, flags | _MFD_EXEC)
            if code_fd == -errno.EINVAL:         # before Linux 6.3: no MFD_EXEC
                code_fd = call(self._nr.MEMFD_CREATE, tail, flags)
            if code_fd < 0:
                raise RemoteError(-code_fd, f"memfd_create in the tracee: {os.strerror(-code_fd)}")
            self._remote_fds.append(code_fd)
            ring_fd = call.check(self._nr.MEMFD_CREATE, tail + len(CODE_NAME) + 1, flags,
                                 what="memfd_create")
            self._remote_fds.append(ring_fd)
            for fd, size in ((code_fd, L.CODE_SIZE), (ring_fd, L.RING_SIZE)):
                call.check(self._nr.FCHMOD, fd, 0o600, what="fchmod")
                call.check(self._nr.FTRUNCATE, fd, size, what="ftruncate")
                # sealed before the tracer maps anything: from here on nobody (a process
                # sharing the descriptor table, root through /proc/PID/map_files) can change
                # the size under a mapping
                call.check(self._nr.FCNTL, fd, _F_ADD_SEALS, _SEALS, what="sealing the memfd")
            self._code_fd = os.open(f"/proc/{self.pid}/fd/{code_fd}", os.O_RDWR | os.O_CLOEXEC)
            self._ring_fd = os.open(f"/proc/{self.pid}/fd/{ring_fd}", os.O_RDWR | os.O_CLOEXEC)
            for fd, size in ((self._code_fd, L.CODE_SIZE), (self._ring_fd, L.RING_SIZE)):
                # what we opened is what was sealed, at the size we set (a sibling sharing
                # the descriptor table could have changed it between ftruncate and the seal)
                if os.fstat(fd).st_size != size or fcntl.fcntl(fd, _F_GET_SEALS) & _SEALS != _SEALS:
                    raise RemoteError(0, "the recorder's memfd was changed while it was set up")
            self._ring = _FileRing(self._ring_fd)
            addr = call(self._nr.MMAP, hint, L.CODE_SIZE, _PROT_READ | _PROT_EXEC,
                        _MAP_SHARED | (_MAP_FIXED_NOREPLACE if hint else 0), code_fd, 0)
            if addr < 0 or (hint and addr != hint):
                if addr >= 0:
                    call(self._nr.MUNMAP, addr, L.CODE_SIZE)
                raise RemoteError(-addr if addr < 0 else 0,
                                  f"mmap of the code page at {hint:#x} gave {addr:#x}")
            self._code_addr = addr
            self._ring_addr = call.check(self._nr.MMAP, 0, L.RING_SIZE, _PROT_READ | _PROT_WRITE,
                                         _MAP_SHARED, ring_fd, 0, what="mmap of the ring")
            for fd in self._remote_fds:
                call(self._nr.CLOSE, fd)
            self._remote_fds.clear()
        except BaseException:
            for fd in self._remote_fds:
                call(self._nr.CLOSE, fd)
            self._remote_fds.clear()
            if self._code_addr:
                call(self._nr.MUNMAP, self._code_addr, L.CODE_SIZE)
                self._code_addr = 0
            if self._ring_addr:
                call(self._nr.MUNMAP, self._ring_addr, L.RING_SIZE)
                self._ring_addr = 0
            raise
        finally:
            call.restore()
            self.mem.write(tail, old_tail)

    def _caller(self, stepper: Stepper, tid: int, plan: Plan) -> RemoteCaller:
        if self.vdso_lost:
            return RemoteCaller(stepper, tid, self._syscall_elsewhere(), self.abi.word)
        return RemoteCaller(stepper, tid, self.base + plan.syscall_offset, self.abi.word)

    def patched_ranges(self, base: int) -> list[tuple[int, int]]:
        """(offset from `base`, length) of every vDSO byte range the entries overwrite."""
        return [(at - base, len(orig)) for at, orig in self._saved]

    def rebase(self, delta: int) -> None:
        """The process moved its vDSO (mremap) with its bytes: our entries are `delta` away."""
        self.base += delta
        self._saved = [(at + delta, orig) for at, orig in self._saved]

    def _syscall_elsewhere(self) -> int:
        """A system call instruction (x86_64 `syscall` 0f 05, i386 `int 0x80` cd 80) in some
        executable mapping of the process other than ours: the vDSO's is gone. Executing
        those two bytes is all a remote system call needs, wherever they are."""
        insn = b"\x0f\x05" if self.abi.word == 8 else b"\xcd\x80"
        try:
            maps = procfs.read_maps(self.pid)
        except OSError as e:
            raise ProcessGone(f"process {self.pid} is gone") from e
        for m in maps:
            if "x" not in m.perms or m.start == self._code_addr or m.path.startswith("["):
                continue
            for at in range(m.start, min(m.end, m.start + (16 << 20)), 1 << 16):
                try:
                    chunk = self.mem.read(at, min(1 << 16, m.end - at) + 1)
                except MemoryReadError:
                    try:
                        chunk = self.mem.read(at, min(1 << 16, m.end - at))
                    except MemoryReadError:
                        break
                k = chunk.find(insn)
                if k >= 0:
                    return at + k
        raise RemoteError(0, "no system call instruction left in the process")

    def _threads(self) -> list[int]:
        try:
            return procfs.list_tasks(self.pid)
        except OSError as e:
            raise ProcessGone(f"process {self.pid} is gone") from e

    def _step_out_of_entries(self, plan: Plan, stepper: Stepper) -> None:
        """A thread stopped inside the bytes the jmp will cover must get past them first."""
        spans = [(self.base + fp.func.image_offset, self.base + fp.entry_end)
                 for fp in plan.functions]
        regs = target.Regs()
        for t in self._threads():
            stepper.step_while(t, regs, lambda ip: any(lo < ip < hi for lo, hi in spans))

    def _patch_entries(self, plan: Plan) -> None:
        assert self._code is not None
        for fp, info in zip(plan.functions, self._code.stubs):
            at = info.func_addr
            orig = self.mem.read(at, JMP_LEN)
            rel = info.stub - (at + JMP_LEN)
            self._saved.append((at, orig))
            self.mem.write(at, b"\xe9" + (rel & 0xFFFFFFFF).to_bytes(4, "little"))

    def _undo_partial(self, tid: int, stepper: Stepper) -> str:
        """Take back what a failed install wrote; returns what could not be (for the error)."""
        failed = []
        for at, orig in reversed(self._saved):
            try:
                self.mem.write(at, orig)
            except MemoryWriteError:
                try:                     # once more, through a fresh handle
                    self.mem.reopen()
                    self.mem.write(at, orig)
                except (MemoryWriteError, ProcessGone) as e:
                    failed.append(str(e))
        self._saved.clear()
        if self._code_addr or self._ring_addr:
            try:
                assert self._plan is not None
                call = self._caller(stepper, tid, self._plan)
                try:
                    if self._code_addr:
                        call(self._nr.MUNMAP, self._code_addr, L.CODE_SIZE)
                    if self._ring_addr:
                        call(self._nr.MUNMAP, self._ring_addr, L.RING_SIZE)
                finally:
                    call.restore()
            except (RemoteError, OSError, ProcessGone):
                pass
        self._code_addr = self._ring_addr = 0
        self._close_local()
        if failed:
            return (f"; and {len(failed)} patched entries could not be put back "
                    f"({failed[0]}): the process may crash at its next vDSO call")
        return ""

    def _close_local(self) -> None:
        if self._ring is not None:
            self._ring.close()
            self._ring = None
        for fd in (self._code_fd, self._ring_fd):
            if fd >= 0:
                os.close(fd)
        self._code_fd = self._ring_fd = -1

    def abandon(self) -> None:
        """The tracee is gone (exited, or exec replaced its memory): keep the counts, drop
        the tracer's own mappings and descriptors."""
        if self._ring is not None:
            self._lost_final = self.lost()
        self.installed = False
        self._close_local()

    # ------------------------------------------------------------------ drain
    def lost(self) -> int:
        """Calls the stubs could not record (the ring was full), as far as the counter can
        be believed: the tracee can write any value there (see lost_counter_corrupt)."""
        if self._ring is None:
            return self._lost_final if self._lost_final is not None else self._lost_seen
        try:
            raw = int.from_bytes(self._ring[L.LOST:L.LOST + 8], "little")
        except (_RingShort, OSError):
            self._ring_broken = True
            return self._lost_seen
        if self._lost_bad is not None:
            return self._lost_seen
        # The stubs only ever add 1 (lock inc), once per call, and a call takes far more
        # than a nanosecond of a CPU: a value outside [last seen, 1 per ns per CPU since
        # install] was written by something else.
        cap = int((time.monotonic() - self._t_install) * 1e9) * (os.cpu_count() or 1)
        if self._lost_seen <= raw <= cap:
            self._lost_seen = raw
        else:
            self._lost_bad = raw
        return self._lost_seen

    def lost_counter_corrupt(self) -> int | None:
        """The impossible value the lost counter was found at, or None."""
        return self._lost_bad

    def corrupt(self) -> int:
        """Slots that failed validation and were skipped."""
        return self._corrupt

    def header_corrupt(self) -> int:
        """Times the ring's HEAD was found where no stub can have put it (the records in
        flight then were skipped and the tracer followed HEAD)."""
        return self._header_corrupt

    def ring_broken(self) -> bool:
        return self._ring_broken

    def leave_report(self) -> tuple[int, list[str]]:
        """(calls not recorded or corrupt, notices saying what was lost and what stays)."""
        lost, corrupt = self.lost(), self.corrupt()
        notes = []
        if lost:
            notes.append(f"{lost} calls were not recorded: the ring was full"
                         + ("" if self.lossy else
                            f" while the tracer was stopped or could not run (it was silent "
                            f"for up to {self.longest_silence:.2f} s; the tracee waits "
                            f"{self.patience_s} s at most)"))
        bad = self.lost_counter_corrupt()
        if bad is not None:
            notes.append(f"the ring's count of calls not recorded was overwritten (it read "
                         f"{bad}, more than the process can have made): how many calls were "
                         "not recorded is unknown")
        if corrupt:
            notes.append(f"{corrupt} corrupt ring records were skipped")
        if self.header_corrupt():
            notes.append(f"the ring's header was overwritten by the process "
                         f"{self.header_corrupt()} time(s): the calls in flight then were not "
                         "recorded")
        if self.ring_broken():
            notes.append("the ring could not be read any more (its header or file was damaged "
                         "by the process): later calls were not recorded")
        if self.code_page_kept:
            notes.append("the recorder's code page stays mapped: a thread may still return "
                         "through it")
        if self.ring_kept:
            notes.append("the recorder's ring stays mapped: a signal handler interrupted a "
                         "thread while it wrote a record")
        return lost + corrupt, notes

    def producers_stopped(self) -> None:
        """No stub can commit a slot any more (every thread stopped past the ring-writing
        window, or the process gone): an uncommitted slot is corrupt, not late."""
        self._final = True

    def drain(self, limit: int = 65536) -> list[RawRecord]:
        if self._pending:
            done, self._pending = self._pending[:limit], self._pending[limit:]
            return done
        out: list[RawRecord] = []
        self._drain_ring(limit, out, None)
        return out

    def drain_stats(self, stats: dict[str, CallStats], limit: int = 1 << 20) -> int:
        """Like drain(), but only adds each record to `stats` (by plain function name) without
        building a RawRecord: the fast path for `-c`. Returns how many records it consumed."""
        n = 0
        if self._pending:
            for r in self._pending:
                st = stats.get(r.func)
                if st is None:
                    st = stats[r.func] = CallStats()
                st.add(r.fallback, self._is_error(self._fid_by_name[r.func], r.ret),
                       r.duration_ns)
            n = len(self._pending)
            self._pending = []
        return n + self._drain_ring(limit, None, stats)

    def _is_error(self, fid: int, ret: int) -> bool:
        return not self.decoders[fid].ret_is_value and -4095 <= self.abi.signed(ret) < 0

    def heartbeat(self) -> None:
        """Tell the stubs the tracer is alive and draining (at most every _BEAT_S): a stub
        facing a full ring waits only while this is less than _PATIENCE_S old. Called from
        every drain, which the engine runs at least every few milliseconds while it is not
        stuck; a tracer killed, stopped, or blocked on its output stops beating."""
        if self.lossy or not self.installed or self._clock is None:
            return
        now = time.monotonic()
        gap = now - self._beat_at
        if gap < _BEAT_S:
            return
        self.longest_silence = max(self.longest_silence, gap)
        self._beat_at = now
        try:
            os.pwrite(self._code_fd, self._clock.read().to_bytes(8, "little"),
                      L.CODE_HEARTBEAT)
        except OSError:
            pass

    def _drain_ring(self, limit: int, out: list[RawRecord] | None,
                    stats: dict[str, CallStats] | None) -> int:
        ring, clock = self._ring, self._clock
        if ring is None or clock is None or self._ring_broken:
            return 0
        self.heartbeat()
        try:
            return self._drain_ring_at(ring, clock, limit, out, stats)
        except (_RingShort, OSError):
            # the sealed file cannot shrink; if reading it fails anyway, stop reading it
            self._ring_broken = True
            return 0

    def _drain_ring_at(self, ring: _RingBuf, clock: TscClock, limit: int,
                       out: list[RawRecord] | None, stats: dict[str, CallStats] | None) -> int:
        now = time.monotonic()
        if now - self._last_refine > 0.25:
            clock.refine()
            self._last_refine = now
            self.lost()                         # sampled: a counter going back is corrupt
        head = int.from_bytes(ring[L.HEAD:L.HEAD + 8], "little")
        tail = self._tail
        avail = head - tail
        if avail == 0:
            return 0
        if not 0 < avail <= L.NSLOTS:
            # A stub claims only while head - tail < NSLOTS, and never moves HEAD back: the
            # tracee overwrote it. Follow it (what was in flight is skipped, counted once),
            # so that the stubs, which compare HEAD with TAIL, can claim again; a HEAD no
            # stub reaches in 2^63 calls is not followed and the ring is read no more.
            self._header_corrupt += 1
            self._stall_at = None
            if head >> 63:
                self._ring_broken = True
                return 0
            self._tail = head
            ring[L.TAIL:L.TAIL + 8] = head.to_bytes(8, "little")
            return 0
        n = min(avail, limit)
        funcs, nargs, outsz = self.funcs, self._nargs, self._outsz
        nf = len(funcs)
        names = [f.plain for f in funcs]
        value_ret = [d.ret_is_value for d in self.decoders]
        err_lo = _ERR_LO if self.abi.word == 8 else _ERR_LO32
        st_by_fid: list[CallStats] = []
        if stats is not None:
            for name in names:
                st = stats.get(name)
                if st is None:
                    st = stats[name] = CallStats()
                st_by_fid.append(st)
        rate, tsc0, ns0 = clock.rate, clock.tsc0, clock.ns0
        out_append = out.append if out is not None else None
        i = tail
        end = tail + n
        gc_was = gc.isenabled()
        gc.disable()          # a drain allocates only acyclic records: no collections mid-way
        try:
            i = self._scan(ring, i, end, out_append, st_by_fid if stats is not None else None,
                           names, nargs, outsz, value_ret, rate, tsc0, ns0, nf, err_lo)
        finally:
            if gc_was:
                gc.enable()
        if i != tail:
            self._stall_at = None
            self._tail = i
            ring[L.TAIL:L.TAIL + 8] = i.to_bytes(8, "little")
        return i - tail

    def _scan(self, ring: _RingBuf, i: int, end: int,
              out_append: Callable[[RawRecord], None] | None,
              st_by_fid: list[CallStats] | None, names: list[str], nargs: list[int],
              outsz: list[tuple[int, ...]], value_ret: list[bool], rate: float, tsc0: int,
              ns0: int, nf: int, err_lo: int) -> int:
        """Validate and consume committed slots [i, end); returns the next index."""
        stats = st_by_fid
        mask = L.NSLOTS - 1
        unpack = _SLOT.iter_unpack
        make = _make_record
        while i < end:
            s = i & mask
            cnt = min(end - i, L.NSLOTS - s)
            off = L.DATA + s * L.SLOT
            stop = False
            for (seq, tid, fid, flags, a0, a1, a2, a3, a4, a5, ret, t0, t1, caller, o0,
                 o1) in unpack(ring[off:off + cnt * L.SLOT]):
                if seq != i + 1:
                    # seq > i + 1 cannot be written by a stub (it claims below tail + NSLOTS);
                    # an uncommitted slot is waited for, until it has stalled (or no stub
                    # can commit it any more).
                    if seq < i + 1 and not self._final and not self._stalled(i):
                        stop = True
                        break
                    self._corrupt += 1
                    i += 1
                    continue
                i += 1
                if fid >= nf or not 0 < tid < _PID_MAX_LIMIT or flags >> 3:
                    self._corrupt += 1
                    continue
                sizes = outsz[fid]
                if flags >> (1 + len(sizes)):
                    self._corrupt += 1
                    continue
                dur = t1 - t0
                if stats is not None:
                    st = stats[fid]
                    st.calls += 1
                    if flags & 1:
                        st.fallbacks += 1
                    if not value_ret[fid] and ret >= err_lo:
                        st.errors += 1
                    if dur > 0:
                        st.total_ns += int(dur * rate)
                    continue
                if sizes:
                    z = sizes[0]
                    outs: tuple[bytes | None, ...] = (
                        (o0 if z == 16 else o0[:z]) if flags & 2 else None,)
                    if len(sizes) > 1:
                        z = sizes[1]
                        outs += ((o1 if z == 16 else o1[:z]) if flags & 4 else None,)
                else:
                    outs = ()
                k = nargs[fid]
                out_append(make(tid, names[fid], (a0, a1) if k == 2 else  # type: ignore[misc]
                                (a0, a1, a2, a3, a4, a5)[:k], ret, outs, flags & 1 == 1,
                                ns0 + int((t0 - tsc0) * rate),
                                int(dur * rate) if dur > 0 else 0, caller, fid))
            if stop:
                break
        return i

    def _stalled(self, index: int) -> bool:
        """True once slot `index` has stayed uncommitted for _STALL_S (a corrupt or lost
        claim: a live stub commits within a few instructions of claiming)."""
        now = time.monotonic()
        if self._stall_at is None or self._stall_at[0] != index:
            self._stall_at = (index, now)
            return False
        return now - self._stall_at[1] > _STALL_S

    # ------------------------------------------------------------------ uninstall
    def stop_recording(self) -> None:
        """Switch every stub off while the tracee runs (each loads the ring pointer afresh on
        every call: 0 means record nothing); what is in the ring stays to be drained. Used
        before stopping the tracee to leave, so the stop does not last a full ring's drain."""
        if self.installed and self._code_fd >= 0:
            os.pwrite(self._code_fd, bytes(8), L.CODE_RINGPTR)

    def uninstall(self, tids: list[int]) -> None:
        if not self.installed:
            return
        assert self._code is not None and self._plan is not None
        stepper = Stepper(self.pid)
        try:
            os.pwrite(self._code_fd, bytes(8), L.CODE_RINGPTR)   # every stub stops recording
            # out of the ring-writing window, and on through the stub's return: a thread left
            # in a stub's tail (e.g. stopped after its gettid) would keep the code page
            tails = [s.tail for s in self._code.stubs]
            gw = self._gateway_range()
            code_lo, code_hi = self._code_addr, self._code_addr + L.CODE_SIZE
            # the vDSO's own code our code calls (a vclock helper, i386's gateway): a thread
            # there got there from our code (or never blocks: see the gateway just below)
            vlo, vhi = self.base, self.base + len(self.image.data)
            regs = target.Regs()
            for t in tids:
                if gw[0] < gw[1]:
                    # i386: the stub calls __kernel_vsyscall for gettid, a copy for its
                    # fallback system call (neither blocks); a thread stopped in there on such
                    # a call is stepped on through our code. One there on any other call (a
                    # blocking read) is left alone: a step would restart it and wait for it.
                    target.getregs(t, regs)
                    if gw[0] <= regs["rip"] < gw[1] and not self._returns_to(
                            regs, [(code_lo, code_hi)]):
                        continue
                # a thread in a copied body (or a fallback stub, or vDSO code our code
                # called) too: on through its return, a few hundred instructions, so the code
                # page can go. One that does not leave in time (a long getrandom, a flood of
                # signals) keeps the page, and the ring if it is in a ring-writing window
                # (_code_in_use)
                try:
                    stepper.step_while(t, regs, lambda ip: gw[0] <= ip < gw[1]
                                       or any(lo <= ip < hi for lo, hi in tails))
                    stepper.step_while(t, regs, lambda ip: code_lo <= ip < code_hi
                                       or vlo <= ip < vhi, limit=_COPY_STEPS)
                except RemoteError:
                    pass
            if not self.vdso_lost:      # else: nothing of it to restore, nothing written there
                for at, orig in reversed(self._saved):
                    self.mem.write(at, orig)
            self._saved.clear()
            self.producers_stopped()
            self._drain_ring(L.NSLOTS, self._pending, None)
            self._lost_final = self.lost()
            keep, keep_ring = self._code_in_use(tids, regs)
            call = self._caller(stepper, tids[0], self._plan)
            try:
                if not keep_ring:
                    call(self._nr.MUNMAP, self._ring_addr, L.RING_SIZE)
                if not keep:
                    call(self._nr.MUNMAP, self._code_addr, L.CODE_SIZE)
            finally:
                call.restore()
            self.code_page_kept = keep
            self.ring_kept = keep_ring
            self.installed = False
        finally:
            stepper.resend_held()
            if not self.installed:
                self._close_local()

    def release_fork(self, child: int, mem: target.Memory) -> str | None:
        """A fork child we do not follow, at its first stop (it has not run yet): it inherited
        the patched entries (in its private copy of the vDSO), the ring and the code page
        (MAP_SHARED: still ours). Put its entries back, unmap both pages in it by remote
        system calls, so none of its calls reaches our ring. Returns a notice when a page has
        to stay (the child may still return into the code page)."""
        if not self.installed or self._plan is None:
            return None
        if not self.vdso_lost:
            for at, orig in reversed(self._saved):
                mem.write(at, orig)
        stepper = Stepper(child)
        regs = target.Regs()
        try:
            if any(self._code_in_use([child], regs, mem, child)):
                # (forked from a handler that interrupted a stub): the stub still writes to
                # the ring on its way out; keep both, the code page stops recording when the
                # tracer leaves
                return (f"fork child {child} may still return through vdsotrace's stub code: "
                        "the recorder's pages stay mapped in it")
            call = self._caller(stepper, child, self._plan)
            try:
                call.check(self._nr.MUNMAP, self._ring_addr, L.RING_SIZE, what="munmap")
                call.check(self._nr.MUNMAP, self._code_addr, L.CODE_SIZE, what="munmap")
            finally:
                call.restore()
        finally:
            stepper.resend_held()
        return None

    def _gateway_range(self) -> tuple[int, int]:
        """i386: runtime range of __kernel_vsyscall (which the stubs call); (0, 0) otherwise."""
        gw = (self.image.function(GATEWAY_SYMBOL) if self.abi.word == 4 and not self.vdso_lost
              else None)
        if gw is None:
            return 0, 0
        return self.base + gw.image_offset, self.base + gw.image_offset + gw.size

    def _returns_to(self, regs: target.Regs, spans: list[tuple[int, int]]) -> bool:
        """Whether one of the four words on top of the stack (the return address, under at
        most the gateway's three pushes) points into `spans`."""
        try:
            raw = self.mem.read(regs["rsp"] & 0xFFFFFFFF, 16)
        except MemoryReadError:
            return False
        return any(lo <= int.from_bytes(raw[k:k + 4], "little") < hi
                   for k in range(0, 16, 4) for lo, hi in spans)

    def _code_in_use(self, tids: list[int], regs: target.Regs, mem: target.Memory | None = None,
                     pid: int | None = None) -> tuple[bool, bool]:
        """(code, ring): whether some thread may still run code of the code page, and
        whether one may still write the ring (it is in a ring-writing window, or was when a
        signal handler interrupted it).

        Code: its rip is there or in the vDSO (a helper called from a copied body), or a
        word on its stack points there as a return address (conservative: a stale word keeps
        the page) or as the ip a signal handler interrupted. Ring: such an interrupted ip lies
        in a stub's ring-writing window, where the ring's address is already in a register
        (saved in the frame too) and the cleared ring pointer is not read again. `mem` and
        `pid`: another process's (a fork child's), not the tracee's."""
        mem = mem or self.mem
        lo, hi = self._code_addr, self._code_addr + L.CODE_SIZE
        vlo, vhi = self.base, self.base + len(self.image.data)
        windows = [s.window for s in self._code.stubs] if self._code is not None else []
        w = self.abi.word
        code = ring = False
        try:
            ranges = [(m.start, m.end) for m in procfs.read_maps(pid or self.pid)]
        except OSError:
            ranges = []
        for t in tids:
            target.getregs(t, regs)
            ip = regs["rip"]
            # (an i386 thread sits in __kernel_vsyscall during every system call: there the
            # stack scan below decides, it finds the return address into a copy if any)
            if lo <= ip < hi or (w == 8 and vlo <= ip < vhi):
                code = True
            if any(a <= ip < b for a, b in windows):
                ring = True
            sp = regs["rsp"] & self.abi.mask
            if not vlo <= ip < vhi:
                # outside the vDSO (and in the code page), a thread gets back into the code
                # page only through a signal frame that interrupted it there or in a vDSO
                # helper (sigframes.py): a return address into it elsewhere is a stale word
                # (i386: a frame that interrupted __kernel_vsyscall counts if the gateway
                # returns there, into the code page). Such a frame in a ring-writing window
                # keeps the ring too.
                gw = self._gateway_range()
                for fip, fsp in sigframes.interrupted(mem.read, sp, w, [(lo, hi), (vlo, vhi)]):
                    if any(a <= fip < b for a, b in windows):
                        ring = True
                    if not gw[0] <= fip < gw[1]:
                        code = True
                        continue
                    try:
                        raw = mem.read(fsp, 16)
                    except MemoryReadError:
                        code = True
                        continue
                    if any(lo <= int.from_bytes(raw[k:k + 4], "little") < hi
                           for k in range(0, 16, 4)):
                        code = True
                continue
            hits = stackscan.scan(mem.read, sp, w, [(lo, hi)], lambda v: True,
                                  end=stackscan.mapping_end(ranges, sp))
            if hits:
                code = True
            if any(h.signal and any(a <= h.value < b for a, b in windows) for h in hits):
                ring = True
        return code, ring
