"""A tiny arm64 emitter: the fixed instruction forms the stubs use (Arm ARM C6, A64 base
instructions; every one a little-endian 32-bit word), with labels and pc-relative fix-ups.
Registers are numbers 0-30; 31 is sp or xzr/wzr, as the instruction form says."""
from __future__ import annotations

__all__ = ["Asm", "SP", "ZR", "EQ", "NE", "HS", "LO", "HI", "LS", "GE", "LT", "GT", "LE"]

SP = ZR = 31
EQ, NE, HS, LO, HI, LS, GE, LT, GT, LE = 0, 1, 2, 3, 8, 9, 10, 11, 12, 13


def _branch(word: int, pc: int, to: int) -> int:
    """`word` (b/bl imm26, b.cond/cbz/cbnz/ldr-literal imm19) aimed from `pc` at `to`."""
    off = to - pc
    if off % 4:
        raise ValueError(f"{to:#x} is not an instruction address")
    off >>= 2
    if word & 0x7C000000 == 0x14000000:                  # b, bl
        if not -(1 << 25) <= off < 1 << 25:
            raise ValueError(f"a branch at {pc:#x} cannot reach {to:#x}")
        return word | off & 0x3FFFFFF
    if not -(1 << 18) <= off < 1 << 18:
        raise ValueError(f"{pc:#x} is more than 1 MiB away from {to:#x}")
    return word | (off & 0x7FFFF) << 5


def _u(value: int, bits: int, what: str) -> int:
    if not 0 <= value < 1 << bits:
        raise ValueError(f"{what}: {value} does not fit {bits} bits")
    return value


class Asm:
    """Words for code that will run at runtime address `origin`."""

    def __init__(self, origin: int) -> None:
        assert origin % 4 == 0
        self.origin = origin
        self.words: list[int] = []
        self.labels: dict[str, int] = {}
        self._fix: list[tuple[int, str | int]] = []      # (index of word, label or address)

    @property
    def here(self) -> int:
        return self.origin + 4 * len(self.words)

    def addr(self, label: str) -> int:
        return self.origin + 4 * self.labels[label]

    def w(self, *words: int) -> None:
        self.words.extend(words)

    def raw(self, data: bytes) -> None:
        assert len(data) % 4 == 0
        self.words.extend(int.from_bytes(data[k:k + 4], "little") for k in range(0, len(data), 4))

    def label(self, name: str) -> None:
        self.labels[name] = len(self.words)

    def _ref(self, word: int, to: str | int) -> None:
        self._fix.append((len(self.words), to))
        self.words.append(word)

    def finish(self) -> bytes:
        for k, to in self._fix:
            dst = self.addr(to) if isinstance(to, str) else to
            self.words[k] = _branch(self.words[k], self.origin + 4 * k, dst)
        return b"".join(w.to_bytes(4, "little") for w in self.words)

    # ---- branches (to a label or an absolute address)
    def b(self, to: str | int) -> None:
        self._ref(0x14000000, to)

    def bl(self, to: str | int) -> None:
        self._ref(0x94000000, to)

    def bcond(self, cond: int, to: str | int) -> None:
        self._ref(0x54000000 | cond, to)

    def cbz(self, rt: int, to: str | int, wide: bool = True) -> None:
        self._ref((0xB4000000 if wide else 0x34000000) | rt, to)

    def cbnz(self, rt: int, to: str | int, wide: bool = True) -> None:
        self._ref((0xB5000000 if wide else 0x35000000) | rt, to)

    def ldr_lit(self, rt: int, to: str | int) -> None:
        """ldr xt, <address> (pc-relative, +-1 MiB)."""
        self._ref(0x58000000 | rt, to)

    def ret(self) -> None:
        self.w(0xD65F03C0)

    # ---- data processing
    def add_imm(self, rd: int, rn: int, imm: int, shift12: bool = False) -> None:
        self.w(0x91000000 | shift12 << 22 | _u(imm, 12, "add") << 10 | rn << 5 | rd)

    def sub_imm(self, rd: int, rn: int, imm: int) -> None:
        self.w(0xD1000000 | _u(imm, 12, "sub") << 10 | rn << 5 | rd)

    def cmp_imm(self, rn: int, imm: int, shift12: bool = False) -> None:
        self.w(0xF100001F | shift12 << 22 | _u(imm, 12, "cmp") << 10 | rn << 5)

    def subs_w_imm(self, rd: int, rn: int, imm: int) -> None:
        self.w(0x71000000 | _u(imm, 12, "subs") << 10 | rn << 5 | rd)

    def cmp(self, rn: int, rm: int) -> None:
        self.w(0xEB00001F | rm << 16 | rn << 5)

    def sub(self, rd: int, rn: int, rm: int) -> None:
        self.w(0xCB000000 | rm << 16 | rn << 5 | rd)

    def add_lsl(self, rd: int, rn: int, rm: int, shift: int) -> None:
        self.w(0x8B000000 | rm << 16 | _u(shift, 6, "lsl") << 10 | rn << 5 | rd)

    def orr_w_lsl(self, rd: int, rn: int, rm: int, shift: int) -> None:
        self.w(0x2A000000 | rm << 16 | _u(shift, 5, "lsl") << 10 | rn << 5 | rd)

    def orr_w_bit(self, rd: int, rn: int, bit: int) -> None:
        """orr wd, wn, #(1 << bit) (a logical immediate: one set bit rotated into place)."""
        self.w(0x32000000 | ((32 - bit) % 32) << 16 | rn << 5 | rd)

    def and_low16(self, rd: int, rn: int) -> None:
        """and xd, xn, #0xffff."""
        self.w(0x92403C00 | rn << 5 | rd)

    def mov(self, rd: int, rm: int) -> None:
        self.w(0xAA0003E0 | rm << 16 | rd)

    def movz(self, rd: int, imm16: int, wide: bool = True) -> None:
        self.w((0xD2800000 if wide else 0x52800000) | _u(imm16, 16, "movz") << 5 | rd)

    # ---- loads and stores (unsigned, scaled offsets)
    def ldr(self, rt: int, rn: int, off: int) -> None:
        assert off % 8 == 0
        self.w(0xF9400000 | _u(off // 8, 12, "ldr") << 10 | rn << 5 | rt)

    def str_(self, rt: int, rn: int, off: int) -> None:
        assert off % 8 == 0
        self.w(0xF9000000 | _u(off // 8, 12, "str") << 10 | rn << 5 | rt)

    def ldr_w(self, rt: int, rn: int, off: int) -> None:
        assert off % 4 == 0
        self.w(0xB9400000 | _u(off // 4, 12, "ldr") << 10 | rn << 5 | rt)

    def str_w(self, rt: int, rn: int, off: int) -> None:
        assert off % 4 == 0
        self.w(0xB9000000 | _u(off // 4, 12, "str") << 10 | rn << 5 | rt)

    def ldrb(self, rt: int, rn: int, off: int) -> None:
        self.w(0x39400000 | _u(off, 12, "ldrb") << 10 | rn << 5 | rt)

    def strb(self, rt: int, rn: int, off: int) -> None:
        self.w(0x39000000 | _u(off, 12, "strb") << 10 | rn << 5 | rt)

    def stp(self, rt: int, rt2: int, rn: int, off: int) -> None:
        assert off % 8 == 0
        self.w(0xA9000000 | ((off // 8) & 0x7F) << 15 | rt2 << 10 | rn << 5 | rt)

    def ldp(self, rt: int, rt2: int, rn: int, off: int) -> None:
        assert off % 8 == 0
        self.w(0xA9400000 | ((off // 8) & 0x7F) << 15 | rt2 << 10 | rn << 5 | rt)

    def stp_pre(self, rt: int, rt2: int, rn: int, off: int) -> None:
        """stp xt, xt2, [xn, #off]! (off negative: a push)."""
        assert off % 8 == 0 and -512 <= off < 512
        self.w(0xA9800000 | ((off // 8) & 0x7F) << 15 | rt2 << 10 | rn << 5 | rt)

    def ldp_post(self, rt: int, rt2: int, rn: int, off: int) -> None:
        """ldp xt, xt2, [xn], #off (a pop)."""
        assert off % 8 == 0 and -512 <= off < 512
        self.w(0xA8C00000 | ((off // 8) & 0x7F) << 15 | rt2 << 10 | rn << 5 | rt)

    # ---- atomics and ordering (Arm ARM B2.3: load-acquire / store-release; FEAT_LSE)
    def ldar(self, rt: int, rn: int) -> None:
        self.w(0xC8DFFC00 | rn << 5 | rt)

    def stlr(self, rt: int, rn: int) -> None:
        self.w(0xC89FFC00 | rn << 5 | rt)

    def cas(self, rs: int, rt: int, rn: int) -> None:
        """cas xs, xt, [xn] (FEAT_LSE): if [xn] == xs then [xn] = xt; xs = the old [xn]."""
        self.w(0xC8A07C00 | rs << 16 | rn << 5 | rt)

    def stadd(self, rs: int, rn: int) -> None:
        """stadd xs, [xn] (FEAT_LSE): [xn] += xs, atomically."""
        self.w(0xF820001F | rs << 16 | rn << 5)

    def ldxr(self, rt: int, rn: int) -> None:
        self.w(0xC85F7C00 | rn << 5 | rt)

    def stxr(self, ws: int, rt: int, rn: int) -> None:
        self.w(0xC8007C00 | ws << 16 | rn << 5 | rt)

    def clrex(self) -> None:
        self.w(0xD5033F5F)

    # ---- system
    def isb(self) -> None:
        self.w(0xD5033FDF)

    def mrs_cntvct(self, rt: int) -> None:
        self.w(0xD53BE040 | rt)

    def svc0(self) -> None:
        self.w(0xD4000001)

    def yield_(self) -> None:
        self.w(0xD503203F)

    def brk(self) -> None:
        self.w(0xD4200000)
