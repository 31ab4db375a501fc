"""Oracles for arm64 (aarch64) vDSO images, shared by the pure tests (on the checked-in fixture)
and the live tests in tests/vm (on an image read from a process in the emulated machine):
llvm-objdump's disassembly, GNU objdump's dynamic symbols, the kernel's /proc/cpuinfo names
of the HWCAP bits."""
from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

# llvm-objdump -d: "     340: 1f 3c 00 71  \tcmp\tw0, #15"
_LLVM_LINE = re.compile(r"^\s*([0-9a-f]+):\s((?:[0-9a-f]{2} ){4})\s*\t(\S+)(?:\t(.*))?$")
_LLVM_TARGET = re.compile(r"^(?:.*, )?0x([0-9a-f]+) <([^>]+)>$")
# LLVM 14 prints the pointer-authentication and BTI hints by number; capstone by name.
HINT_ALIASES = {"#25": "paciasp", "#29": "autiasp", "#34": "bti c", "#36": "bti j",
                "#38": "bti jc"}


@dataclass(frozen=True)
class LlvmInsn:
    address: int
    raw: bytes
    mnemonic: str
    operands: str

    @property
    def target(self) -> tuple[int, str] | None:
        """(address, `symbol+offset`) of a direct branch, as llvm-objdump prints it."""
        m = _LLVM_TARGET.match(self.operands)
        return (int(m.group(1), 16), m.group(2)) if m else None

    def same_mnemonic(self, capstone_mnemonic: str) -> bool:
        if self.mnemonic == "hint":
            return HINT_ALIASES.get(self.operands, "") == capstone_mnemonic or \
                capstone_mnemonic == "hint"
        return self.mnemonic == capstone_mnemonic


def parse_llvm_objdump(text: str) -> dict[int, LlvmInsn]:
    out = {}
    for line in text.splitlines():
        m = _LLVM_LINE.match(line)
        if m:
            addr = int(m.group(1), 16)
            out[addr] = LlvmInsn(addr, bytes.fromhex(m.group(2)), m.group(3), m.group(4) or "")
    return out


def llvm_objdump(path: Path, base: int = 0) -> dict[int, LlvmInsn]:
    """llvm-objdump -d of an image, at runtime addresses base + image_offset."""
    tool = shutil.which("llvm-objdump") or shutil.which("llvm-objdump-14")
    if tool is None:
        raise AssertionError("llvm-objdump is not installed: run scripts/setup --vm")
    r = subprocess.run([tool, "-d", f"--adjust-vma={base:#x}", str(path)], capture_output=True,
                       text=True, check=True)
    return parse_llvm_objdump(r.stdout)


# objdump -T: "0000000000000788 g    DF .text\t000000000000006c  LINUX_2.6.39 __kernel_clock_getres"
_T_LINE = re.compile(r"^([0-9a-f]{16}) g\s+(D[FO ]?)\s+(\S+)\s+([0-9a-f]+)\s+(\S+)\s+(\S+)$")


def objdump_T(text: str) -> dict[str, tuple[int, int, str]]:
    """name -> (value, size, version) of each dynamic symbol of the text."""
    out = {}
    for line in text.splitlines():
        m = _T_LINE.match(line.strip())
        if m:
            out[m.group(6)] = (int(m.group(1), 16), int(m.group(4), 16), m.group(5))
    return out


def cpuinfo_features(text: str) -> set[str]:
    """The first CPU's `Features` (arm64: one word per AT_HWCAP/AT_HWCAP2 bit set)."""
    for line in text.splitlines():
        if line.startswith("Features"):
            return set(line.split(":", 1)[1].split())
    raise AssertionError("no Features line in /proc/cpuinfo")


def as_cpuinfo_name(flag: str) -> str:
    """Our HWCAP flag name (the header's, HWCAP_SME_I16I64 -> SME_I16I64) as cpuinfo.c spells
    it (smei16i64)."""
    return flag.lower().replace("_", "")
