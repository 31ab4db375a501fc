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
import os
import secrets
import time
from dataclasses import dataclass

from tracer import procfs, seccomp, target
from tracer.abi import I386, X86_64, Abi
from tracer.arch.aarch64 import AARCH64, B_RANGE
from tracer.decoders import Decoder, for_function, out_size
from tracer.errors import MemoryReadError, MemoryWriteError, ProcessGone, TracerError
from tracer.inject import layout as L
from tracer.tsc import TscClock, tsc_usable
from tracer.inject.plan import JMP_LEN, Plan, PlanError, plan_image
from tracer.inject.remote import RemoteCaller, RemoteError, Stepper
from tracer.inject.stubs import CodePage, build_code
from tracer.inject.leave import Leaving
from tracer.inject.ring import (_PATIENCE_S, CallStats, RawRecord, _FileRing, _RingBuf,
                                host_fence)
from tracer.inject.stubs32 import build_code32
from tracer.inject.aarch64.plan import PlanA64, plan_image_a64
from tracer.inject.aarch64.stubs import build_code_a64
from tracer.vdso import GATEWAY_SYMBOL, SIGRETURN_TRAMPOLINES, VdsoFunction, VdsoImage

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
_NR = {"x86_64": _Numbers(MMAP=9, MUNMAP=11, CLOSE=3, FTRUNCATE=77, FCHMOD=91,
                        MEMFD_CREATE=319, FCNTL=72),
       "i386": _Numbers(MMAP=192, MUNMAP=91, CLOSE=6, FTRUNCATE=93, FCHMOD=94, MEMFD_CREATE=356,
                   FCNTL=221),
       # include/uapi/asm-generic/unistd.h (arm64)
       "aarch64": _Numbers(MMAP=222, MUNMAP=215, CLOSE=57, FTRUNCATE=46, FCHMOD=52,
                           MEMFD_CREATE=279, FCNTL=25)}
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
# arm64: a `b` reaches +-128 MiB; the code page (and the copies' `bl`s back into the vDSO) well
# inside that
_REACH_A64 = B_RANGE - (16 << 20)
_HWCAP_ATOMICS = 1 << 8              # arch/arm64/include/uapi/asm/hwcap.h: FEAT_LSE
_AT_HWCAP = 16


class InjectError(TracerError):
    """The tracee cannot be traced by injection (safely or exactly)."""


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


def _find_gap(pid: int, base: int, size: int, reach: int = _REACH,
              top: int = 0x7FFFFFFFF000) -> int:
    """A free, page-aligned range of `size` bytes, nearest the vDSO, within `reach` of it
    (x86_64: rel32; arm64: a `b`), below `top` (the end of the user address space)."""
    maps = sorted(procfs.read_maps(pid), key=lambda m: m.start)
    lo_lim = max(base - reach, 1 << 20)
    hi_lim = min(base + reach, top)
    best: int | None = None
    prev_end = 0
    for m in [*maps, procfs.MapEntry(top, top, "", 0, "", 0, "")]:
        gap_lo, gap_hi = prev_end + _PAGE, m.start - _PAGE   # a guard page each side
        prev_end = max(prev_end, m.end)
        lo, hi = max(gap_lo, lo_lim), min(gap_hi, hi_lim)
        if hi - lo < size:
            continue
        cand = hi - size if hi <= base else lo           # the end of the gap nearer the vDSO
        if best is None or abs(cand - base) < abs(best - base):
            best = cand
    if best is None:
        raise InjectError(f"no free address range within {reach >> 20} MiB of the vDSO for the "
                          f"stubs{_HINT}")
    return best & ~(_PAGE - 1)


class Recorder(Leaving):
    """The in-tracee recorder (--inject): stubs in a code page of ours record each call into
    a ring shared with the tracer, which drains it; no stop per call."""
    polls = True

    def __init__(self, pid: int, mem: target.Memory, abi: Abi, image: VdsoImage, base: int,
                 funcs: list[VdsoFunction], lossy: bool = False) -> None:
        # the batch decoder (and numpy) now, before any stub runs: imported by the first
        # drain it would take a tenth of a second in which no heartbeat is written
        from tracer.inject import batch  # noqa: F401
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
        self.funcs = [f for f in funcs if f.symbol != GATEWAY_SYMBOL or abi is not I386]
        if abi is AARCH64:
            # arm64's __kernel_rt_sigreturn is every handler's restorer, never called
            self.funcs = [f for f in self.funcs if f.symbol not in SIGRETURN_TRAMPOLINES]
        self._skipped_gateway = len(self.funcs) != len(funcs)
        self._nr = _NR.get(abi.name, _NR["x86_64"])     # (install refuses other arches)
        self.decoders: list[Decoder] = [for_function(f.plain) for f in self.funcs]
        self._fid_by_name = {f.plain: i for i, f in enumerate(self.funcs)}
        self._nargs = [min(d.nargs, L.MAX_ARGS) for d in self.decoders]
        self._outsz = [tuple(out_size(o.layout, abi) for o in d.outs[:L.NOUTS])
                       for d in self.decoders]
        self._plan: Plan | PlanA64 | None = None
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
    @staticmethod
    def prepare(image: VdsoImage, base: int, size: int, funcs: list[VdsoFunction]) -> None:
        TscClock.anchored()
        if image.abi is AARCH64:
            plan_image_a64(image, [f for f in funcs if f.symbol not in SIGRETURN_TRAMPOLINES])
            return
        plan_image(image, [f for f in funcs if f.symbol != GATEWAY_SYMBOL], image.abi)

    def install_in(self, tids: list[int]) -> list[str]:
        self.install(tids[0])
        return []

    def lose_vdso(self) -> None:
        self.vdso_lost = True

    def install(self, tid: int) -> None:
        if self.abi not in (X86_64, I386, AARCH64) or self.image.abi is not self.abi:
            raise InjectError(f"--inject supports x86_64, i386 and arm64 tracees with their own "
                              f"vDSO only (an {self.image.abi.name} vDSO in an {self.abi.name} "
                              f"process){_HINT}")
        if not self.funcs and self._skipped_gateway:
            raise InjectError(f"--inject does not record {GATEWAY_SYMBOL} (system calls){_HINT}")
        why = _status_refusal(self.pid)
        if why:
            raise InjectError(why + _HINT)
        if self.abi is AARCH64 and self._vdso_sealed():
            raise InjectError(f"process {self.pid} sealed its vDSO (mseal): --inject would "
                              f"patch a mapping the process declared immutable{_HINT}")
        try:
            plan: Plan | PlanA64 = (plan_image_a64(self.image, self.funcs)
                                    if self.abi is AARCH64 else
                                    plan_image(self.image, self.funcs, self.abi))
        except PlanError as e:
            raise InjectError(f"the vDSO is not the shape --inject expects: {e}{_HINT}") from e
        self._check_live_bytes(plan)
        tail, room = self._vdso_tail()
        # (arm64: EL0 reads cntvct_el0 whatever the process does; the kernel sets
        # CNTKCTL_EL1.EL0VCTEN and has no prctl to clear it: `cycle_counter` is empty)
        if self.abi.cycle_counter and room >= 2 and not tsc_usable(self._threads(), self.mem, tail, arch=self.abi):
            raise InjectError(f"process {self.pid} has the time-stamp counter disabled (prctl "
                              "PR_SET_TSC): the injected stubs read it; trace without --inject")
        self._plan = plan
        self._clock = TscClock.anchored()
        # a jump that reaches everywhere (i386: modulo 4 GiB): the kernel chooses the place
        if self.abi is AARCH64:
            # (below 2**48: a hint above it would opt the process into 52-bit addresses)
            hint = _find_gap(self.pid, self.base, L.CODE_SIZE, _REACH_A64, 1 << 48)
        else:
            hint = _find_gap(self.pid, self.base, L.CODE_SIZE) if self.abi.jump_reach else 0
        stepper = Stepper(self.pid, self.abi)
        try:
            self._inject(tid, plan, hint, stepper)
            if isinstance(plan, PlanA64):
                # 64-bit keys (loaded pc-relative, not immediates)
                self._code = build_code_a64(plan, self.base, self._code_addr, self.decoders,
                                            (secrets.randbits(64), secrets.randbits(64)),
                                            self._ring_addr, self._has_lse())
            else:
                build = build_code32 if self.abi is I386 else build_code
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

    def _vdso_sealed(self) -> bool:
        """The vDSO mapping carries `sl` in /proc/PID/smaps' VmFlags (mseal(2), Linux 6.10;
        system mappings sealed at exec with CONFIG_MSEAL_SYSTEM_MAPPINGS, 6.15)."""
        try:
            with open(f"/proc/{self.pid}/smaps") as f:
                inside = False
                for line in f:
                    if "-" in line.split(" ", 1)[0] and not line.startswith("VmFlags"):
                        inside = int(line.split("-", 1)[0], 16) == self.base
                    elif inside and line.startswith("VmFlags:"):
                        return "sl" in line.split()[1:]
        except (OSError, ValueError):
            return False
        return False

    def _has_lse(self) -> bool:
        """arm64: the process's AT_HWCAP has `atomics` (FEAT_LSE: cas, stadd)."""
        try:
            with open(f"/proc/{self.pid}/auxv", "rb") as f:
                raw = f.read()
        except OSError as e:
            raise ProcessGone(f"process {self.pid} is gone") from e
        for k in range(0, len(raw) - 15, 16):
            if int.from_bytes(raw[k:k + 8], "little") == _AT_HWCAP:
                return bool(int.from_bytes(raw[k + 8:k + 16], "little") & _HWCAP_ATOMICS)
        return False

    def _check_live_bytes(self, plan: Plan | PlanA64) -> None:
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

    def _inject(self, tid: int, plan: Plan | PlanA64, hint: int, stepper: Stepper) -> None:
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
            self._ring = _FileRing(self._ring_fd, host_fence())
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

    def _caller(self, stepper: Stepper, tid: int, plan: Plan | PlanA64) -> RemoteCaller:
        if self.vdso_lost:
            return RemoteCaller(stepper, tid, self._syscall_elsewhere(), self.abi)
        return RemoteCaller(stepper, tid, self.base + plan.syscall_offset, self.abi)

    def patched_ranges(self, base: int) -> list[tuple[int, int]]:
        """(offset from `base`, length) of every vDSO byte range the entries overwrite."""
        return [(at - base, len(orig)) for at, orig in self._saved]

    def rebase(self, delta: int) -> None:
        """The process moved its vDSO (mremap) with its bytes: our entries are `delta` away."""
        self.base += delta
        self._saved = [(at + delta, orig) for at, orig in self._saved]

    def _syscall_elsewhere(self) -> int:
        """A system call instruction (the arch's `syscall_insn`) in some executable mapping
        of the process other than ours: the vDSO's is gone. Executing that instruction is all
        a remote system call needs, wherever it is."""
        insn = self.abi.syscall_insn
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

    def _step_out_of_entries(self, plan: Plan | PlanA64, stepper: Stepper) -> None:
        """A thread stopped inside the bytes the jmp will cover must get past them first."""
        spans = [(self.base + fp.func.image_offset, self.base + fp.entry_end)
                 for fp in plan.functions]
        regs = self.abi.new_regs()
        for t in self._threads():
            stepper.step_while(t, regs, lambda ip: any(lo < ip < hi for lo, hi in spans))

    def _patch_entries(self, plan: Plan | PlanA64) -> None:
        assert self._code is not None
        for k, info in enumerate(self._code.stubs):
            at = info.func_addr
            try:
                jump = self.abi.jump(at, info.stub)
            except ValueError as e:     # _find_gap's hint keeps the page in reach
                raise PlanError(f"the stub of {plan.functions[k].func.symbol} is out of reach: "
                                f"{e}") from e
            assert len(jump) == (JMP_LEN if self.abi is not AARCH64 else self.abi.jump_len)
            orig = self.mem.read(at, len(jump))
            self._saved.append((at, orig))
            self.mem.write(at, jump)

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


    # ------------------------------------------------------------------ uninstall


