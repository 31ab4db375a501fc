"""Every CPU fact behind one interface (base.Arch), one module per ISA/ABI, and the registry
that picks one: from an ELF header (e_machine decides, never the class alone), from a stopped
thread (a 64-bit x86 process may run IA-32 code), or by name.

    from tracer.arch import X86_64, I386, for_elf, for_header, for_thread, by_name, native
"""
from __future__ import annotations

import importlib
import platform

from tracer.arch.base import Arch, UnsupportedArch
from tracer.arch.i386 import I386
from tracer.arch.x86_64 import X86_64

__all__ = ["Arch", "X86_64", "I386", "ARCHES", "EM_386", "EM_X86_64", "EM_AARCH64", "by_name",
           "for_elf", "for_header", "for_thread", "for_audit", "elf_ident", "native", "register", "UnsupportedArch",
           "TRACED", "INJECTED", "check_traceable"]

# include/uapi/linux/elf-em.h
EM_386 = 3
EM_X86_64 = 62
EM_AARCH64 = 183

ARCHES: dict[str, Arch] = {a.name: a for a in (X86_64, I386)}
_BY_ELF: dict[tuple[int, int], Arch] = {(a.e_machine, a.elf_class): a for a in ARCHES.values()}
# arches whose module is loaded on first use: (e_machine, class) -> (module, attribute)
_LAZY: dict[tuple[int, int], tuple[str, str]] = {(EM_AARCH64, 2): ("tracer.arch.aarch64", "AARCH64")}
_MACHINE_NAMES = {EM_386: "i386", EM_X86_64: "x86_64", EM_AARCH64: "aarch64"}
# The arches the tracing engine is written for (its stubs, remote system calls, marker filter
# and stop handling); a process of any other known arch is inspected only (auxv, vdso, dump,
# disas).
TRACED = frozenset({"x86_64", "i386", "aarch64"})
# The arches the in-tracee recorder (--inject, tracer/inject/) is written for.
INJECTED = frozenset({"x86_64", "i386", "aarch64"})
_LABELS = {"aarch64": "arm64"}


def register(arch: Arch) -> None:
    """Make `arch` known to the registry (arch modules loaded lazily call this)."""
    ARCHES[arch.name] = arch
    _BY_ELF[(arch.e_machine, arch.elf_class)] = arch


def by_name(name: str) -> Arch:
    try:
        return ARCHES[name]
    except KeyError:
        for mod, attr in _LAZY.values():
            if mod.rsplit(".", 1)[1] == name:
                return _load(mod, attr, name)
        raise UnsupportedArch(f"no support for the {name} architecture") from None


def _load(mod: str, attr: str, what: str) -> Arch:
    try:
        arch = getattr(importlib.import_module(mod), attr)
    except (ImportError, AttributeError):
        raise UnsupportedArch(f"{what} is not supported by this vdsotrace") from None
    assert isinstance(arch, Arch)
    register(arch)
    return arch


def check_traceable(arch: Arch, inject: bool = False) -> None:
    """UnsupportedArch unless the tracing engine (with `inject`, the in-tracee recorder) runs
    on `arch`'s processes."""
    if inject and arch.name in TRACED and arch.name not in INJECTED:
        raise UnsupportedArch(f"--inject is not supported for {_LABELS.get(arch.name, arch.name)} "
                              "processes yet (its in-tracee recorder is being built): trace "
                              "them without --inject")
    if arch.name not in TRACED:
        raise UnsupportedArch(f"tracing {_LABELS.get(arch.name, arch.name)} processes is not "
                              "supported yet: vdsotrace traces x86_64 and i386 processes; "
                              "inspect this one with vdso, disas, auxv or dump")


def for_elf(e_machine: int, elf_class: int) -> Arch:
    """The arch of an ELF object from its header's e_machine and EI_CLASS."""
    hit = _BY_ELF.get((e_machine, elf_class))
    if hit is not None:
        return hit
    lazy = _LAZY.get((e_machine, elf_class))
    name = _MACHINE_NAMES.get(e_machine, f"ELF machine {e_machine}")
    if lazy is not None:
        return _load(lazy[0], lazy[1], f"{name} ({elf_class * 32}-bit)")
    raise UnsupportedArch(f"{name} ({elf_class * 32 if elf_class in (1, 2) else '?'}-bit "
                          "ELF) is not supported: vdsotrace knows x86_64, i386"
                          + (" and aarch64" if _LAZY else ""))


def elf_ident(data: bytes) -> tuple[int, int]:
    """(e_machine, EI_CLASS) of an ELF header (little-endian); ValueError if it is none."""
    if len(data) < 20 or data[:4] != b"\x7fELF":
        raise ValueError("not an ELF header")
    if data[5] != 1:
        raise ValueError("not a little-endian ELF object")
    return int.from_bytes(data[18:20], "little"), data[4]


def for_header(data: bytes) -> Arch:
    """The arch of the ELF object whose first bytes are `data`."""
    try:
        machine, cls = elf_ident(data)
    except ValueError as e:
        raise UnsupportedArch(f"{e}: cannot tell its architecture") from None
    return for_elf(machine, cls)


def for_audit(audit_arch: int) -> Arch | None:
    """The arch of a system call by its AUDIT_ARCH_* (PTRACE_GET_SYSCALL_INFO's `arch`)."""
    for a in ARCHES.values():
        if a.audit_arch == audit_arch:
            return a
    return None


def for_thread(process: Arch, regs: object) -> Arch:
    """The ABI a stopped thread of a `process`-arch process runs in, from its registers."""
    from tracer.target import Regs
    assert isinstance(regs, Regs)
    return process.thread_arch(regs)


_NATIVE: Arch | None = None


def native() -> Arch:
    """The tracer's own arch (whose register layout ptrace fills)."""
    global _NATIVE
    if _NATIVE is None:
        m = platform.machine()
        _NATIVE = {"x86_64": X86_64, "AMD64": X86_64}.get(m) or by_name(
            {"aarch64": "aarch64", "arm64": "aarch64"}.get(m, m))
    return _NATIVE
