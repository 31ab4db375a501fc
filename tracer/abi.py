"""Per-ABI facts, now tracer.arch's `Arch` (kept under its old names for the modules that
import them: an `Abi` is an `Arch`)."""
from __future__ import annotations

from tracer.arch import ARCHES, I386, X86_64, Arch, by_name

__all__ = ["Abi", "X86_64", "I386", "ABIS", "abi_by_name"]

Abi = Arch
ABIS = ARCHES


def abi_by_name(name: str) -> Arch:
    return by_name(name)
