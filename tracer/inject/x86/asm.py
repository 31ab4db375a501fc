"""A tiny x86 emitter: the handful of fixed instruction forms the stubs use, with labels
and rel32 fix-ups. Encodings follow the Intel SDM vol. 2 (REX.W = 0x48, ModRM/SIB). In 32-bit
code (`wrap=True`) a rel32 reaches every address: the displacement wraps modulo 2**32."""
from __future__ import annotations

__all__ = ["Asm", "rel32", "mem32"]


def rel32(value: int) -> bytes:
    if not -(1 << 31) <= value < (1 << 31):
        raise ValueError("displacement out of rel32 range")
    return (value & 0xFFFFFFFF).to_bytes(4, "little")


def _i32(value: int) -> bytes:
    return (value & 0xFFFFFFFF).to_bytes(4, "little")


def _d8(value: int) -> bytes:
    if not -128 <= value < 128:
        raise ValueError(f"disp8 {value} out of range")
    return (value & 0xFF).to_bytes(1, "little")


def mem32(op: int, reg: int, base: int, disp: int) -> bytes:
    """ModRM (+SIB) + displacement for the operand [base+disp] (32-bit addressing), with the
    /r field `reg`; `op` is the opcode byte(s) before it, given as an int < 256."""
    if base == 4:                                     # esp needs a SIB byte
        sib = b"\x24"
    else:
        sib = b""
    if disp == 0 and base != 5:
        mod, d = 0, b""
    elif -128 <= disp < 128:
        mod, d = 1, _d8(disp)
    else:
        mod, d = 2, _i32(disp)
    return bytes((op, (mod << 6) | ((reg & 7) << 3) | (base & 7))) + sib + d


class Asm:
    """Bytes for code that will run at runtime address `origin`."""

    def __init__(self, origin: int, wrap: bool = False) -> None:
        self.origin = origin
        self.wrap = wrap
        self.buf = bytearray()
        self.labels: dict[str, int] = {}
        self._fix32: list[tuple[int, str | int]] = []   # (offset of rel32, label or address)
        self._fix8: list[tuple[int, str]] = []

    @property
    def here(self) -> int:
        return self.origin + len(self.buf)

    def raw(self, data: bytes) -> None:
        self.buf += data

    def label(self, name: str) -> None:
        self.labels[name] = len(self.buf)

    def addr(self, name: str) -> int:
        return self.origin + self.labels[name]

    # ---------------------------------------------------------------- branches
    def _branch32(self, opcode: bytes, target: str | int) -> None:
        self.buf += opcode
        self._fix32.append((len(self.buf), target))
        self.buf += b"\0\0\0\0"

    def jmp(self, target: str | int) -> None:
        self._branch32(b"\xe9", target)

    def call(self, target: str | int) -> None:
        self._branch32(b"\xe8", target)

    def jcc(self, cond: int, target: str | int) -> None:
        """cond: the low nibble of 0F 8x (4 = e/z, 5 = ne, 3 = ae/nb, 2 = b)."""
        self._branch32(bytes((0x0F, 0x80 | cond)), target)

    def jcc8(self, cond: int, target: str) -> None:
        self.buf += bytes((0x70 | cond, 0))
        self._fix8.append((len(self.buf) - 1, target))

    def rip_ref(self, prefix: bytes, target: str | int) -> None:
        """An instruction that ends in a rip-relative disp32 (no immediate after it)."""
        self.buf += prefix
        self._fix32.append((len(self.buf), target))
        self.buf += b"\0\0\0\0"

    def finish(self) -> bytes:
        for off, tgt in self._fix32:
            dest = self.addr(tgt) if isinstance(tgt, str) else tgt
            d = dest - (self.origin + off + 4)
            self.buf[off:off + 4] = _i32(d) if self.wrap else rel32(d)
        for off, tgt in self._fix8:
            d = self.labels[tgt] - (off + 1)
            self.buf[off:off + 1] = _d8(d)
        return bytes(self.buf)

    # ---------------------------------------------------------------- fixed forms
    # Register numbers: rax 0, rcx 1, rdx 2, rbx 3, rsp 4, rbp 5, rsi 6, rdi 7, r8..r15 8..15.
    def store_rsp(self, disp: int, reg: int) -> None:
        """mov [rsp+disp8], reg64"""
        rex = 0x48 | (0x04 if reg >= 8 else 0)
        self.buf += bytes((rex, 0x89, 0x44 | ((reg & 7) << 3), 0x24)) + _d8(disp)

    def load_rsp(self, reg: int, disp: int) -> None:
        """mov reg64, [rsp+disp8]"""
        rex = 0x48 | (0x04 if reg >= 8 else 0)
        self.buf += bytes((rex, 0x8B, 0x44 | ((reg & 7) << 3), 0x24)) + _d8(disp)

    def store_rsp_imm(self, disp: int, imm: int) -> None:
        """mov qword [rsp+disp8], simm32"""
        self.buf += b"\x48\xc7\x44\x24" + _d8(disp) + _i32(imm)

    def store_rdx(self, disp: int, reg: int, size: int = 8) -> None:
        """mov [rdx+disp8], reg (size 8 or 4)"""
        rex = (0x48 if size == 8 else 0x40) | (0x04 if reg >= 8 else 0)
        modrm = 0x42 | ((reg & 7) << 3)
        pre = bytes((rex,)) if rex != 0x40 else b""
        self.buf += pre + bytes((0x89, modrm)) + _d8(disp)

    def load_rcx_mem(self, reg: int, disp: int, size: int = 8) -> None:
        """mov reg, [rcx+disp8] (size 8 or 4)"""
        rex = (0x48 if size == 8 else 0x40) | (0x04 if reg >= 8 else 0)
        modrm = 0x41 | ((reg & 7) << 3)
        pre = bytes((rex,)) if rex != 0x40 else b""
        self.buf += pre + bytes((0x8B, modrm)) + _d8(disp)

    def sub_rsp(self, imm: int) -> None:
        self.buf += b"\x48\x83\xec" + _d8(imm)

    def add_rsp(self, imm: int) -> None:
        self.buf += b"\x48\x83\xc4" + _d8(imm)

    def rdtsc64(self) -> None:
        """rdtsc; shl rdx, 32; or rax, rdx  -> rax = TSC (rdx clobbered)"""
        self.buf += b"\x0f\x31\x48\xc1\xe2\x20\x48\x09\xd0"

    def mov_eax_imm(self, imm: int) -> None:
        self.buf += b"\xb8" + _i32(imm)

    def syscall(self) -> None:
        self.buf += b"\x0f\x05"

    def ret(self) -> None:
        self.buf += b"\xc3"
