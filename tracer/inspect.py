"""Reading a process without tracing it: auxv, maps and the vDSO image, through ptrace.

`peek(pid)` seizes and interrupts the thread-group leader for the duration of a `with` block
(no SIGSTOP, nothing visible to the tracee), so reads are consistent and a process another
tracer holds is refused with the reason.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from tracer import procfs, stops, target
from tracer.abi import Abi
from tracer.arch import native
from tracer.auxv import auxv_from_stack, decode, find, parse_auxv, AuxvEntry
from tracer.consts import AuxType
from tracer.errors import AuxvError, MemoryReadError, ProcessGone, VdsoError
from tracer.stops import Kind
from tracer.vdso import VdsoImage, parse_image

__all__ = ["peek", "AuxvReport", "read_auxv", "VdsoMapping", "find_vdso",
           "read_vdso", "Stopped"]


@dataclass(slots=True)
class Stopped:
    """What any reader needs from a stopped process: its memory and its ABI."""
    pid: int
    mem: target.Memory
    abi: Abi


@dataclass(frozen=True, slots=True)
class AuxvReport:
    pairs: tuple[tuple[int, int], ...]
    entries: tuple[AuxvEntry, ...]
    source: str                      # "stack" (checked against /proc/PID/auxv) or "procfs"
    mismatch: tuple[str, ...]        # names of types whose stack copy differs from procfs


@dataclass(frozen=True, slots=True)
class VdsoMapping:
    base: int                        # runtime_addr of the image (AT_SYSINFO_EHDR)
    size: int                        # bytes mapped ([vdso] line)
    vvar: tuple[tuple[str, int, int], ...]   # ([vvar], start, end) lines: unreadable (EIO)


@contextmanager
def peek(pid: int) -> Iterator[Stopped]:
    target.precheck(pid)
    try:
        target.seize(pid, 0)
    except OSError as e:
        raise target.diagnose(pid, e.errno) or e from e
    except ProcessGone as e:
        raise target.diagnose(pid) or e from e
    try:
        target.interrupt(pid)
        while True:
            stop = stops.wait_for(pid)
            if not stop.stopped:
                raise ProcessGone(f"process {pid} exited")
            if stop.kind is Kind.INTERRUPT or stop.kind is Kind.GROUP_STOP:
                break
            # a signal-delivery stop (a breakpoint's SIGTRAP included) keeps its signal
            target.cont(pid, stop.sig if stop.kind is Kind.SIGNAL or stop.kind is Kind.TRAP
                        else 0)
        host = native()                 # whose register layout ptrace fills
        regs = host.new_regs()
        host.regs_get(pid, regs)
        mem = target.Memory(pid)
        try:
            yield Stopped(pid, mem, target.abi_of(pid, regs))
        finally:
            mem.close()
    finally:
        try:
            target.detach(pid)
        except (ProcessGone, OSError):
            pass


def read_auxv(p: Stopped) -> AuxvReport:
    """The auxv from the initial stack (through ptrace), checked against /proc/PID/auxv."""
    proc_pairs: list[tuple[int, int]] | None
    try:
        proc_pairs = parse_auxv(procfs.read_auxv_file(p.pid), p.abi.word)
    except (OSError, AuxvError):
        proc_pairs = None
    stack_pairs: list[tuple[int, int]] | None
    try:
        start = procfs.read_stat(p.pid).start_stack
        stack_pairs = auxv_from_stack(p.mem.read, start, p.abi.word)
    except (OSError, MemoryReadError, AuxvError):
        stack_pairs = None
    if stack_pairs is None and proc_pairs is None:
        raise AuxvError(f"cannot read the auxiliary vector of {p.pid}")
    mismatch: tuple[str, ...] = ()
    if proc_pairs is None:
        pairs, source = stack_pairs, "stack"
    elif stack_pairs == proc_pairs:
        pairs, source = stack_pairs, "stack"
    else:
        # The kernel's saved copy is authoritative: the program may have written its stack.
        pairs, source = proc_pairs, "procfs"
        sd = dict(stack_pairs or [])
        mismatch = tuple(sorted({str(t) for t, v in proc_pairs if sd.get(t) != v}))
    assert pairs is not None
    return AuxvReport(tuple(pairs), tuple(decode(pairs, p.mem.read, p.abi)), source, mismatch)


def find_vdso(pid: int, pairs: tuple[tuple[int, int], ...] | list[tuple[int, int]]
              ) -> VdsoMapping:
    base = find(list(pairs), AuxType.AT_SYSINFO_EHDR)
    maps = procfs.read_maps(pid)
    vvar = tuple((m.path, m.start, m.end) for m in maps if m.path.startswith("[vvar"))
    for m in maps:
        if m.path == "[vdso]":
            if base is not None and base != m.start:
                raise VdsoError(f"AT_SYSINFO_EHDR {base:#x} is not the [vdso] mapping "
                                f"{m.start:#x}: the vDSO was moved (mremap)")
            return VdsoMapping(m.start, m.size, vvar)
    if base:
        raise VdsoError(f"AT_SYSINFO_EHDR is {base:#x} but no [vdso] is mapped: "
                        "the vDSO was unmapped")
    raise VdsoError(f"process {pid} has no vDSO (booted with vdso=0?)")


def read_vdso(p: Stopped, mapping: VdsoMapping) -> VdsoImage:
    return parse_image(p.mem.read(mapping.base, mapping.size))
