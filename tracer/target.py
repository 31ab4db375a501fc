"""The ptrace layer: the only module that imports python-ptrace.

Hot-path calls go straight to libc's ptrace() through python-ptrace's ctypes door
(`ptrace.ctypes_libc.libc`), with no argtypes (cheaper per call, see design.md); addresses are
passed as c_void_p. Requests python-ptrace predates (PTRACE_SEIZE, PTRACE_INTERRUPT,
PTRACE_GET_SYSCALL_INFO) are called by their numbers from include/uapi/linux/ptrace.h.
"""
from __future__ import annotations

import ctypes
import errno as _errno
import os
import signal
from dataclasses import dataclass

from typing import TYPE_CHECKING, Any

from ptrace.binding import func as _pfunc
from ptrace.ctypes_libc import libc as _libc

from tracer import procfs
from tracer.errors import (AlreadyTraced, AttachError, KernelThread, MemoryReadError,
                           MemoryWriteError, NoSuchProcess, PermissionDenied, ProcessGone,
                           UsageError, ZombieProcess)

if TYPE_CHECKING:
    from tracer.arch.base import Arch, RegLayout

__all__ = [
    "Regs", "Memory", "seize", "interrupt", "cont", "syscall",
    "singlestep", "detach", "getregs", "setregs", "geteventmsg", "wait",
    "wait_nohang", "attach_process", "spawn", "abi_of", "stop_event", "PTRACE_EVENT_STOP",
    "EVENT_CLONE", "EVENT_FORK", "EVENT_VFORK", "EVENT_EXEC", "EVENT_EXIT", "tgkill",
    "DEFAULT_OPTIONS", "FORK_OPTIONS", "precheck", "diagnose", "get_syscall_info", "SyscallInfo", "listen",
    "EVENT_SECCOMP", "SECCOMP_OPTION", "seccomp_filters",
]

# include/uapi/linux/ptrace.h
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_LISTEN = 0x4208
PTRACE_GET_SYSCALL_INFO = 0x420E
PTRACE_SECCOMP_GET_FILTER = 0x420C
PTRACE_EVENT_STOP = 128
PTRACE_O_EXITKILL = 1 << 20
EVENT_CLONE = _pfunc.PTRACE_EVENT_CLONE
EVENT_FORK = _pfunc.PTRACE_EVENT_FORK
EVENT_VFORK = _pfunc.PTRACE_EVENT_VFORK
EVENT_EXEC = _pfunc.PTRACE_EVENT_EXEC
EVENT_EXIT = _pfunc.PTRACE_EVENT_EXIT
EVENT_SECCOMP = 7                  # PTRACE_EVENT_SECCOMP
SECCOMP_OPTION = 0x80              # PTRACE_O_TRACESECCOMP
# arm64 (and riscv) have no PTRACE_GETREGS/SETREGS and python-ptrace defines neither there:
# their arch modules read registers through PTRACE_GETREGSET/SETREGSET (getregset/setregset
# at the end of this file).
_GETREGS: int | None = getattr(_pfunc, "PTRACE_GETREGS", None)
_SETREGS: int | None = getattr(_pfunc, "PTRACE_SETREGS", None)
_CONT = _pfunc.PTRACE_CONT
_SYSCALL = _pfunc.PTRACE_SYSCALL
_SINGLESTEP = _pfunc.PTRACE_SINGLESTEP
_DETACH = _pfunc.PTRACE_DETACH
_GETEVENTMSG = _pfunc.PTRACE_GETEVENTMSG
DEFAULT_OPTIONS = (_pfunc.PTRACE_O_TRACECLONE | _pfunc.PTRACE_O_TRACEEXEC
                   | _pfunc.PTRACE_O_TRACESYSGOOD)
FORK_OPTIONS = _pfunc.PTRACE_O_TRACEFORK | _pfunc.PTRACE_O_TRACEVFORK
WALL = 0x40000000  # __WALL, include/uapi/linux/wait.h

_ptrace = _libc["ptrace"]          # a private function object: python-ptrace sets argtypes on
_ptrace.restype = ctypes.c_long    # libc.ptrace, which would slow every call down.
_get_errno = ctypes.get_errno
_VOID = ctypes.c_void_p
_ULONG = ctypes.c_ulong



class Regs:
    """One thread's registers: a ctypes buffer laid out as its arch's register set says
    (tracer.arch: `Arch.regs`), read and written in one ptrace call, indexed by the layout's
    names (no per-stop allocation). Regs() is the tracer's own arch's layout."""
    __slots__ = ("buf", "ref", "index")

    def __init__(self, layout: RegLayout | None = None) -> None:
        if layout is None:
            layout = _native_layout()
        self.index = layout.index
        self.buf = layout.array()
        self.ref = ctypes.byref(self.buf)

    def __getitem__(self, name: str) -> int:
        return int(self.buf[self.index[name]])

    def __setitem__(self, name: str, value: int) -> None:
        self.buf[self.index[name]] = value & 0xFFFFFFFFFFFFFFFF

    def as_dict(self) -> dict[str, int]:
        return {name: int(self.buf[i]) for name, i in self.index.items()}


_NATIVE_LAYOUT: RegLayout | None = None


def _native_layout() -> RegLayout:
    global _NATIVE_LAYOUT
    if _NATIVE_LAYOUT is None:
        from tracer.arch import native
        _NATIVE_LAYOUT = native().regs
    return _NATIVE_LAYOUT


def _fail(what: str, tid: int) -> None:
    err = _get_errno()
    if err == _errno.ESRCH:
        raise ProcessGone(f"{what}: thread {tid} is gone")
    raise OSError(err, f"{what}({tid}): {os.strerror(err)}")


def _call(req: int, tid: int, addr: object, data: object, what: str) -> int:
    ctypes.set_errno(0)
    r = _ptrace(req, tid, addr, data)
    if r == -1 and _get_errno():
        _fail(what, tid)
    return int(r)


def getregs(tid: int, regs: Regs) -> None:
    """PTRACE_GETREGS: the whole general register set, on a host that has the request (an
    arch module whose layout it fills binds it as its `regs_get`; everyone else reads
    registers through the arch: `Arch.regs_get`)."""
    if _ptrace(_GETREGS, tid, None, regs.ref) == -1:
        _fail("PTRACE_GETREGS", tid)


def setregs(tid: int, regs: Regs) -> None:
    """PTRACE_SETREGS (see getregs)."""
    if _ptrace(_SETREGS, tid, None, regs.ref) == -1:
        _fail("PTRACE_SETREGS", tid)


if _GETREGS is None or _SETREGS is None:
    def _no_regs_request(tid: int, regs: Regs) -> None:
        raise OSError(_errno.EINVAL, "this host has no PTRACE_GETREGS/SETREGS: registers are "
                      "read through the arch (tracer.arch: Arch.regs_get/regs_set)")
    getregs = setregs = _no_regs_request


def cont(tid: int, sig: int = 0) -> None:
    if _ptrace(_CONT, tid, None, sig) == -1:
        _fail("PTRACE_CONT", tid)


def syscall(tid: int, sig: int = 0) -> None:
    if _ptrace(_SYSCALL, tid, None, sig) == -1:
        _fail("PTRACE_SYSCALL", tid)


def singlestep(tid: int, sig: int = 0) -> None:
    if _ptrace(_SINGLESTEP, tid, None, sig) == -1:
        _fail("PTRACE_SINGLESTEP", tid)


def listen(tid: int) -> None:
    if _ptrace(PTRACE_LISTEN, tid, None, None) == -1:
        _fail("PTRACE_LISTEN", tid)


def detach(tid: int, sig: int = 0) -> None:
    if _ptrace(_DETACH, tid, None, sig) == -1:
        _fail("PTRACE_DETACH", tid)


def interrupt(tid: int) -> None:
    if _ptrace(PTRACE_INTERRUPT, tid, None, None) == -1:
        _fail("PTRACE_INTERRUPT", tid)


def seize(tid: int, options: int) -> None:
    _call(PTRACE_SEIZE, tid, None, _ULONG(options), "PTRACE_SEIZE")


def geteventmsg(tid: int) -> int:
    out = ctypes.c_ulong()
    _call(_GETEVENTMSG, tid, None, ctypes.byref(out), "PTRACE_GETEVENTMSG")
    return out.value


@dataclass(frozen=True, slots=True)
class SyscallInfo:
    """struct ptrace_syscall_info (include/uapi/linux/ptrace.h), entry or exit."""
    op: int               # 1 entry, 2 exit, 3 seccomp, 0 none
    arch: int
    instruction_pointer: int
    stack_pointer: int
    nr: int
    args: tuple[int, ...]
    rval: int
    is_error: bool


_SyscallInfoBuf = ctypes.c_uint8 * 88


def get_syscall_info(tid: int) -> SyscallInfo:
    buf = _SyscallInfoBuf()
    _call(PTRACE_GET_SYSCALL_INFO, tid, _VOID(len(buf)), ctypes.byref(buf),
          "PTRACE_GET_SYSCALL_INFO")
    raw = bytes(buf)
    op = raw[0]
    arch, ip, sp = int.from_bytes(raw[4:8], "little"), int.from_bytes(raw[8:16], "little"), \
        int.from_bytes(raw[16:24], "little")
    words = [int.from_bytes(raw[24 + 8 * i:32 + 8 * i], "little") for i in range(8)]
    if op == 1 or op == 3:
        return SyscallInfo(op, arch, ip, sp, words[0], tuple(words[1:7]), 0, False)
    if op == 2:
        rval = words[0] - (1 << 64) if words[0] >> 63 else words[0]
        return SyscallInfo(op, arch, ip, sp, -1, (), rval, bool(raw[32]))
    return SyscallInfo(op, arch, ip, sp, -1, (), 0, False)


def seccomp_filters(tid: int) -> list[bytes] | None:
    """The thread's seccomp filters, newest first, each as its array of struct sock_filter
    (PTRACE_SECCOMP_GET_FILTER: needs CAP_SYS_ADMIN and the thread in a ptrace stop); [] for
    none, None when they cannot be read."""
    out: list[bytes] = []
    for index in range(4096):
        ctypes.set_errno(0)
        n = _ptrace(PTRACE_SECCOMP_GET_FILTER, tid, _VOID(index), None)
        if n == -1:
            err = _get_errno()
            if err == _errno.ENOENT:
                return out
            if err == _errno.EINVAL and index == 0:
                return out                   # not in filter mode
            if err == _errno.ESRCH:
                raise ProcessGone(f"thread {tid} is gone")
            return None
        buf = (ctypes.c_uint8 * (8 * n))()
        if _ptrace(PTRACE_SECCOMP_GET_FILTER, tid, _VOID(index), ctypes.byref(buf)) != n:
            return None
        out.append(bytes(buf))
    return None


def tgkill(pid: int, tid: int, sig: int) -> None:
    if _libc.syscall(_tgkill_nr(), pid, tid, sig) == -1:
        err = _get_errno()
        if err == _errno.ESRCH:
            raise ProcessGone(f"tgkill: thread {tid} is gone")
        raise OSError(err, os.strerror(err))


_TGKILL_NR = 0


def _tgkill_nr() -> int:
    """__NR_tgkill of the tracer's own arch."""
    global _TGKILL_NR
    if not _TGKILL_NR:
        from tracer.arch import native
        _TGKILL_NR = native().tgkill_nr
    return _TGKILL_NR


def wait(pid: int = -1) -> tuple[int, int]:
    """Block for the next stop or exit of any traced thread: (tid, status)."""
    while True:
        try:
            return os.waitpid(pid, WALL)
        except InterruptedError:
            continue


def wait_nohang(pid: int = -1) -> tuple[int, int]:
    try:
        return os.waitpid(pid, WALL | os.WNOHANG)
    except ChildProcessError:
        return 0, 0


def stop_event(status: int) -> int:
    """The PTRACE_EVENT_* number of a stop status, 0 for none."""
    return (status >> 16) & 0xFF


class Memory:
    """A thread group's memory through /proc/PID/mem: one pread/pwrite per access.

    Writes go through the same FOLL_FORCE path as PTRACE_POKEDATA, so read-only executable
    pages (the vDSO) accept them: the kernel gives the process a private copy of the page.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.fd = -1
        self.reopen()

    def reopen(self) -> None:
        """After execve the old file refers to the old address space: open a new one."""
        self.close()
        try:
            self.fd = os.open(f"/proc/{self.pid}/mem", os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError as e:
            raise ProcessGone(f"process {self.pid} is gone") from e

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def read(self, addr: int, size: int) -> bytes:
        try:
            data = os.pread(self.fd, size, addr)
        except (OSError, OverflowError) as e:
            raise MemoryReadError(addr, size, getattr(e, "strerror", None) or str(e)) from e
        if len(data) != size:
            if not data:
                raise MemoryReadError(addr, size, "unmapped")
            # a read crossing into an unmapped page: the rest is missing
            raise MemoryReadError(addr, size, f"only {len(data)} bytes mapped")
        return data

    def read_word(self, addr: int, word: int) -> int:
        return int.from_bytes(self.read(addr, word), "little")

    def write(self, addr: int, data: bytes) -> None:
        try:
            n = os.pwrite(self.fd, data, addr)
        except (OSError, OverflowError) as e:
            raise MemoryWriteError(addr, len(data), getattr(e, "strerror", None) or str(e)) from e
        if n != len(data):
            raise MemoryWriteError(addr, len(data), f"only {n} bytes written")


def abi_of(pid: int, regs: Regs | None = None) -> Arch:
    """The arch a process runs: from its executable's ELF header, refined by a stopped
    thread's registers when given (tracer.arch.for_thread: an x86_64 process's thread may run
    IA-32 code)."""
    from tracer import arch
    try:
        with open(f"/proc/{pid}/exe", "rb") as f:
            head = f.read(64)
        process = arch.for_header(head)
    except (OSError, arch.UnsupportedArch):
        if regs is None:
            cls = procfs.exe_elf_class(pid)
            return arch.I386 if cls == 1 else arch.native()
        process = arch.native()
    return process if regs is None else process.thread_arch(regs)


def diagnose(pid: int, err: int | None = None) -> AttachError | None:
    """Why a process cannot be attached to, with what to do about it; None when nothing
    visible is wrong and no errno was given."""
    if not procfs.process_exists(pid):
        return NoSuchProcess(f"no such process: {pid} (check the pid with ps)")
    try:
        st = procfs.read_stat(pid)
    except OSError:
        return NoSuchProcess(f"no such process: {pid} (check the pid with ps)")
    if st.flags & procfs.PF_KTHREAD:
        return KernelThread(f"pid {pid} ({st.comm}) is a kernel thread: it has no user space "
                            "and no vDSO; pick a user process")
    if st.state in ("Z", "X"):
        return ZombieProcess(f"pid {pid} ({st.comm}) is a zombie: it has exited and has no "
                           "address space left to trace")
    try:
        tpid = procfs.tracer_pid(pid)
    except OSError:
        tpid = 0
    if tpid and tpid != os.getpid():
        return AlreadyTraced(f"cannot attach to {pid}: already traced by pid {tpid} "
                             f"({procfs.proc_name(tpid)}); detach that tracer first")
    if err in (_errno.EPERM, _errno.EACCES):
        scope = ""
        try:
            with open("/proc/sys/kernel/yama/ptrace_scope") as f:
                scope = f.read().strip()
        except OSError:
            pass
        hint = "run as root (or with CAP_SYS_PTRACE) or as the process's owner"
        if scope and scope != "0":
            hint += f"; kernel.yama.ptrace_scope is {scope} (0 allows attaching to own processes)"
        return PermissionDenied(f"cannot attach to {pid} ({st.comm}): operation not permitted; "
                                + hint)
    if err is None:
        return None
    return AttachError(f"cannot attach to {pid} ({st.comm}): {os.strerror(err)}")


def precheck(pid: int) -> None:
    """Refuse, before any ptrace call, what cannot be attached to, saying why."""
    if pid <= 0:
        raise UsageError(f"invalid pid {pid}: give a positive process id")
    if pid == os.getpid():
        raise UsageError("vdsotrace cannot trace itself")
    problem = diagnose(pid)
    if problem is not None:
        raise problem


def attach_process(pid: int, options: int = DEFAULT_OPTIONS) -> tuple[list[int], dict[int, int]]:
    """PTRACE_SEIZE + PTRACE_INTERRUPT every thread of `pid`; return them all stopped.

    SEIZE leaves no SIGSTOP pending and changes nothing the tracee can see. Threads created while
    we attach are caught by the clone option of the thread that made them, or by the next pass
    over /proc/PID/task. Returns (tids in attach order, statuses of stops that were not the
    interrupt stop and must be handled by the caller: tid -> status).
    """
    precheck(pid)
    try:
        tids = procfs.list_tasks(pid)
    except OSError as e:
        raise (diagnose(pid) or NoSuchProcess(f"no such process: {pid}")) from e
    seized: list[int] = []
    seen: set[int] = set()
    while True:
        new = [t for t in tids if t not in seen]
        if not new:
            break
        for tid in new:
            seen.add(tid)
            ctypes.set_errno(0)
            if _ptrace(PTRACE_SEIZE, tid, None, _ULONG(options)) == -1:
                err = _get_errno()
                if err == _errno.ESRCH and tid != pid:
                    continue                    # a thread that exited meanwhile
                if err == _errno.EPERM and tid != pid and seized:
                    continue                    # auto-attached through its parent's clone
                if seized:
                    _release(seized)
                raise diagnose(pid, err) or AttachError(f"cannot attach to {pid}")
            seized.append(tid)
            interrupt(tid)
        try:
            tids = procfs.list_tasks(pid)
        except OSError:
            break
    # Collect one stop per thread.
    pending: dict[int, int] = {}
    stopped: set[int] = set()
    want = set(seized)
    from tracer import stops         # (it imports this module)
    while want - stopped:
        tid, status = wait()
        stop = stops.classify(status)
        if not stop.stopped:
            want.discard(tid)
            seized = [t for t in seized if t != tid]
            if tid == pid:
                _release(seized)
                raise ProcessGone(f"process {pid} exited while attaching")
            continue
        if tid not in want:
            # A thread born during attach (auto-attached by the clone option).
            want.add(tid)
            seized.append(tid)
        if stop.kind is stops.Kind.INTERRUPT or stop.kind is stops.Kind.GROUP_STOP:
            stopped.add(tid)            # PTRACE_EVENT_STOP
            continue
        stopped.add(tid)
        pending[tid] = status
    return seized, pending


def _release(tids: list[int]) -> None:
    for t in tids:
        try:
            detach(t)
        except (ProcessGone, OSError):
            pass


def spawn(argv: list[str], options: int = DEFAULT_OPTIONS) -> int:
    """Start `argv` traced from its first instruction: returns the pid, stopped at the
    PTRACE_EVENT_EXEC stop of its execve (the new image's auxv and vDSO are in place)."""
    import shutil
    prog = argv[0]
    path = prog if "/" in prog else shutil.which(prog)
    if not path or not os.path.exists(path):
        raise UsageError(f"cannot run {prog!r}: no such file or command in PATH")
    if not os.access(path, os.X_OK):
        raise UsageError(f"cannot run {prog!r}: not executable")
    pid = os.fork()
    if pid == 0:  # child: stop until the parent has seized us, then exec
        try:
            # Python ignores SIGPIPE and SIGXFSZ, and exec keeps an ignored disposition: give
            # the program the defaults it would get from a shell (`prog | head` ends it)
            for ignored in (signal.SIGPIPE, signal.SIGXFSZ):
                signal.signal(ignored, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGSTOP)
            os.execv(path, argv)
        finally:
            os._exit(127)
    from tracer import stops         # (it imports this module)
    _, status = os.waitpid(pid, os.WUNTRACED)
    if not stops.classify(status).stopped:
        raise AttachError(f"cannot run {prog!r}: it exited before exec")
    seize(pid, options | _pfunc.PTRACE_O_TRACEEXEC)
    os.kill(pid, signal.SIGCONT)
    while True:
        tid, status = wait(pid)
        stop = stops.classify(status)
        if not stop.stopped:
            raise AttachError(f"cannot run {prog!r}: it exited before exec")
        if stop.kind is stops.Kind.EXEC:
            return pid
        if stop.is_event or stop.sig in (signal.SIGSTOP, signal.SIGCONT, signal.SIGTRAP):
            cont(pid, 0)
        else:
            cont(pid, stop.sig)


# ---- register sets: PTRACE_GETREGSET / PTRACE_SETREGSET (include/uapi/linux/ptrace.h) ----
# The request takes a note type (include/uapi/linux/elf.h: NT_PRSTATUS = 1 is the general
# registers on every architecture) and a struct iovec {base, len}; the kernel copies at most
# len bytes and writes back how many it filled. On arm64 this is the only register interface.
PTRACE_GETREGSET = 0x4204
PTRACE_SETREGSET = 0x4205
NT_PRSTATUS = 1


class _Iovec(ctypes.Structure):
    _fields_ = (("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t))


def getregset(tid: int, note: int, buf: ctypes.Array[Any]) -> int:
    """Fill `buf` (any ctypes array) with the thread's register set `note`; returns the number
    of bytes the kernel filled (a regset shorter than `buf` leaves the rest untouched)."""
    iov = _Iovec(ctypes.cast(buf, ctypes.c_void_p), ctypes.sizeof(buf))
    _call(PTRACE_GETREGSET, tid, _VOID(note), ctypes.byref(iov), "PTRACE_GETREGSET")
    return int(iov.iov_len)


def setregset(tid: int, note: int, buf: ctypes.Array[Any]) -> None:
    """Write the thread's register set `note` from `buf` (the whole set: the kernel refuses a
    partial NT_PRSTATUS with EINVAL on arm64)."""
    iov = _Iovec(ctypes.cast(buf, ctypes.c_void_p), ctypes.sizeof(buf))
    _call(PTRACE_SETREGSET, tid, _VOID(note), ctypes.byref(iov), "PTRACE_SETREGSET")


def read_regset(tid: int, note: int, size: int) -> bytes:
    """The register set `note` as bytes (at most `size`: what the kernel filled)."""
    buf = (ctypes.c_uint8 * size)()
    n = getregset(tid, note, buf)
    return bytes(buf)[:n]

