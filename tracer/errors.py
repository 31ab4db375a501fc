"""The error tree. Every error a user can cause says what is wrong and what to do.

Only cli.py turns these into a one-line message and an exit code.
"""
from __future__ import annotations

__all__ = [
    "TracerError", "AttachError", "NoSuchProcess", "PermissionDenied", "AlreadyTraced",
    "KernelThread", "ZombieProcess", "ProcessGone", "MemoryReadError", "MemoryWriteError", "VdsoError",
    "AuxvError", "UsageError", "UnknownFunction", "ElfError",
]


class TracerError(Exception):
    """Base of every error vdsotrace raises on purpose."""


class UsageError(TracerError):
    """The command line or a console command is wrong."""


class AttachError(TracerError):
    """The process cannot be attached to."""


class NoSuchProcess(AttachError):
    pass


class PermissionDenied(AttachError):
    pass


class AlreadyTraced(AttachError):
    pass


class KernelThread(AttachError):
    pass


class ZombieProcess(AttachError):
    pass


class ProcessGone(TracerError):
    """The tracee (or one of its threads) exited while we worked on it."""


class MemoryReadError(TracerError):
    def __init__(self, addr: int, size: int, reason: str = "") -> None:
        self.addr = addr
        self.size = size
        super().__init__(f"cannot read {size} bytes at {addr:#x}" + (f": {reason}" if reason else ""))


class MemoryWriteError(TracerError):
    def __init__(self, addr: int, size: int, reason: str = "") -> None:
        self.addr = addr
        self.size = size
        super().__init__(f"cannot write {size} bytes at {addr:#x}" + (f": {reason}" if reason else ""))


class ElfError(TracerError):
    """Bytes that are not the ELF image they claim to be."""


class VdsoError(ElfError):
    """No vDSO, or an image that is not a vDSO."""


class AuxvError(TracerError):
    """An auxiliary vector that cannot be read or parsed."""


class UnknownFunction(UsageError):
    """A function name that the vDSO does not export."""
