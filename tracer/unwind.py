"""Call-stack unwinding of a stopped thread, for `--stack` and the console's `bt`.

`unwind` walks the stack with the callers' DWARF CFI (tracer.cfi decodes it), and with
the frame-pointer chain where an object has no CFI for a pc (x86's saved rbp/return address
pair at rbp, arm64's frame record at x29: AAPCS64 6.4.6). The stack is untrusted input:
every step checks that the stack pointer grows, that the return address lies in executable
memory, and the walk ends at the first thing it cannot read; it never raises for bad data.

arm64: a call puts the return address in the link register x30 (DWARF 30, the return
address column), not on the stack; a function that calls others saves it in its frame
record, signed by pointer authentication when built with -mbranch-protection (paciasp: a
PAC in the address's top bits, NT_ARM_PAC_MASK says which). Every return address is
stripped of those bits (`pac_mask`) before it is checked and returned.
"""
from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final, Protocol

from tracer import arch as _arch
from tracer.arch.aarch64 import strip_pac
from tracer.cfi import FrameRule, RuleKind
from tracer.errors import MemoryReadError

__all__ = ["Arch", "ARCHES", "FrameRules", "ReadMem", "unwind", "eval_dwarf_expr"]

ReadMem = Callable[[int, int], bytes]


class FrameRules(Protocol):
    """What the unwinder needs of a module map (tracer.modmap.ModuleMap provides it)."""

    def frame_rule(self, lookup_pc: int) -> FrameRule: ...

    def is_executable(self, addr: int) -> bool: ...


@dataclass(frozen=True, slots=True)
class Arch:
    """DWARF register numbers of one ABI (from its tracer.arch module's `dwarf`)."""
    name: str
    word: int
    nregs: int   # registers tracked: the general ones and the return address column
    sp: int
    fp: int
    ra: int
    fmt: str     # struct format of one word
    # the return address is in a register at a function's entry (arm64's x30), not in the
    # word at sp (x86's `call`)
    link: bool = False

    @property
    def mask(self) -> int:
        return (1 << (8 * self.word)) - 1


def _from(a: _arch.Arch) -> Arch:
    d = a.dwarf
    # the return address column is a general register (x30) rather than a column of its own
    # (x86's rip/eip, numbered after the general registers)
    return Arch(a.name, a.word, d.nregs, sp=d.sp, fp=d.fp, ra=d.ra,
                fmt="<Q" if a.word == 8 else "<I", link=d.ra < len(d.names))


ARCHES: Final[Mapping[str, Arch]] = {
    a.name: _from(a) for a in (_arch.X86_64, _arch.I386, _arch.by_name("aarch64"))}

PAGE_SIZE: Final = 4096
_UNPACK: Final = {arch.fmt: struct.Struct(arch.fmt).unpack_from for arch in ARCHES.values()}

_UNDEFINED: Final = int(RuleKind.UNDEFINED)
_SAME_VALUE: Final = int(RuleKind.SAME_VALUE)
_OFFSET: Final = int(RuleKind.OFFSET)
_VAL_OFFSET: Final = int(RuleKind.VAL_OFFSET)
_REGISTER: Final = int(RuleKind.REGISTER)
_EXPRESSION: Final = int(RuleKind.EXPRESSION)
_VAL_EXPRESSION: Final = int(RuleKind.VAL_EXPRESSION)


class _StackReader:
    """Reads words through one window of tracee memory: a frame's words lie close
    together, so one read (to the end of the next page) serves several frames."""
    __slots__ = ("_read", "_base", "_buf", "_word", "_unpack", "_mask", "reads")

    # Reads per unwind; past this every read fails (the walk then ends).
    MAX_READS: Final = 64

    def __init__(self, read_mem: ReadMem, arch: Arch) -> None:
        self._read = read_mem
        self._base = 0
        self._buf = b""
        self._word = arch.word
        self._unpack = _UNPACK[arch.fmt]
        self._mask = arch.mask
        self.reads = 0

    @property
    def window(self) -> tuple[bytes, int]:
        """The bytes read last and their address, for callers that index them directly."""
        return self._buf, self._base

    def word(self, addr: int, size: int = 0) -> int | None:
        """The word (or `size` bytes, little-endian) at addr, or None if unreadable."""
        n = size or self._word
        off = addr - self._base
        if 0 <= off and off + n <= len(self._buf):
            if n == self._word:
                return int(self._unpack(self._buf, off)[0])
            return int.from_bytes(self._buf[off:off + n], "little")
        if addr < 0 or addr + n - 1 > self._mask:
            return None
        page_end = (addr | (PAGE_SIZE - 1)) + 1
        # The next page too when it is mapped; else to the end of this one; else just n.
        for length in (page_end + PAGE_SIZE - addr, page_end - addr, n):
            if length < n or self.reads >= self.MAX_READS:
                continue
            self.reads += 1
            try:
                data = self._read(addr, length)
            except MemoryReadError:
                continue
            if len(data) >= n:
                self._base, self._buf = addr, data
                return self.word(addr, size)
        return None


# DWARF 5, section 7.7.1, table 7.9: the operations a CFI expression uses in practice.
_OP_ADDR, _OP_DEREF, _OP_DEREF_SIZE, _OP_NOP = 0x03, 0x06, 0x94, 0x96
_OP_CONST = {0x08: (1, False), 0x09: (1, True), 0x0A: (2, False), 0x0B: (2, True),
             0x0C: (4, False), 0x0D: (4, True), 0x0E: (8, False), 0x0F: (8, True)}
_OP_CONSTU, _OP_CONSTS = 0x10, 0x11
_OP_DUP, _OP_DROP, _OP_OVER, _OP_PICK, _OP_SWAP, _OP_ROT = 0x12, 0x13, 0x14, 0x15, 0x16, 0x17
_OP_PLUS_UCONST, _OP_SKIP, _OP_BRA = 0x23, 0x2F, 0x28
_OP_LIT0, _OP_LIT31 = 0x30, 0x4F
_OP_BREG0, _OP_BREG31, _OP_BREGX = 0x70, 0x8F, 0x92
_BINARY: Final[dict[int, Callable[[int, int, int], int]]] = {
    # (a, b, bits) -> result, where a is the second entry and b the top of the stack
    0x1A: lambda a, b, w: a & b,
    0x1B: lambda a, b, w: _signed(a, w) // _signed(b, w) if b else _raise_div(),
    0x1C: lambda a, b, w: a - b,
    0x1D: lambda a, b, w: a % b if b else _raise_div(),
    0x1E: lambda a, b, w: a * b,
    0x21: lambda a, b, w: a | b,
    0x22: lambda a, b, w: a + b,
    0x24: lambda a, b, w: a << b if b < w else 0,
    0x25: lambda a, b, w: a >> b,
    0x26: lambda a, b, w: _signed(a, w) >> min(b, w),
    0x27: lambda a, b, w: a ^ b,
    0x29: lambda a, b, w: int(_signed(a, w) == _signed(b, w)),
    0x2A: lambda a, b, w: int(_signed(a, w) >= _signed(b, w)),
    0x2B: lambda a, b, w: int(_signed(a, w) > _signed(b, w)),
    0x2C: lambda a, b, w: int(_signed(a, w) <= _signed(b, w)),
    0x2D: lambda a, b, w: int(_signed(a, w) < _signed(b, w)),
    0x2E: lambda a, b, w: int(a != b),
}
_UNARY: Final[dict[int, Callable[[int, int], int]]] = {
    0x19: lambda a, w: abs(_signed(a, w)),
    0x1F: lambda a, w: -a,
    0x20: lambda a, w: ~a,
}
_MAX_OPS: Final = 64


class _BadExpr(Exception):
    """An expression this evaluator does not run; the walk ends there."""


def _raise_div() -> int:
    raise _BadExpr("division by zero")


def _signed(v: int, bits: int) -> int:
    return v - (1 << bits) if v >> (bits - 1) & 1 else v


def _leb128(code: bytes, i: int, signed: bool) -> tuple[int, int]:
    """A LEB128 number at code[i] (DWARF 5 section 7.6): (value, index after it)."""
    value = shift = 0
    while True:
        b = code[i]
        i += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            if signed and b & 0x40:
                value -= 1 << shift
            return value, i


def _uleb(code: bytes, i: int) -> tuple[int, int]:
    return _leb128(code, i, False)


def _sleb(code: bytes, i: int) -> tuple[int, int]:
    return _leb128(code, i, True)


def eval_dwarf_expr(code: bytes, regs: list[int | None], read_word: Callable[[int, int], int | None],
                    arch: Arch, push: int | None = None) -> int | None:
    """Run a DWARF expression (DWARF 5, section 2.5) over the register values; `push` is
    the initial stack entry (the CFA, for DW_CFA_expression rules). None when it uses
    something undefined, unreadable or unsupported. At most _MAX_OPS operations run."""
    mask, bits = arch.mask, 8 * arch.word
    stack: list[int] = [] if push is None else [push]
    i, ops = 0, 0
    try:
        while i < len(code):
            ops += 1
            if ops > _MAX_OPS:
                return None
            op = code[i]
            i += 1
            if _OP_LIT0 <= op <= _OP_LIT31:
                stack.append(op - _OP_LIT0)
            elif _OP_BREG0 <= op <= _OP_BREG31 or op == _OP_BREGX:
                if op == _OP_BREGX:
                    reg, i = _uleb(code, i)
                else:
                    reg = op - _OP_BREG0
                off, i = _sleb(code, i)
                val = regs[reg] if reg < len(regs) else None
                if val is None:
                    return None
                stack.append((val + off) & mask)
            elif op in _BINARY:
                b, a = stack.pop(), stack.pop()
                stack.append(_BINARY[op](a, b, bits) & mask)
            elif op in _UNARY:
                stack.append(_UNARY[op](stack.pop(), bits) & mask)
            elif op == _OP_DEREF or op == _OP_DEREF_SIZE:
                size = arch.word
                if op == _OP_DEREF_SIZE:
                    size = code[i]
                    i += 1
                    if not 1 <= size <= arch.word:
                        return None
                val = read_word(stack.pop(), size if size != arch.word else 0)
                if val is None:
                    return None
                stack.append(val)
            elif op in _OP_CONST:
                n, signed = _OP_CONST[op]
                if i + n > len(code):
                    return None
                stack.append(int.from_bytes(code[i:i + n], "little", signed=signed) & mask)
                i += n
            elif op == _OP_CONSTU:
                val, i = _uleb(code, i)
                stack.append(val & mask)
            elif op == _OP_CONSTS:
                val, i = _sleb(code, i)
                stack.append(val & mask)
            elif op == _OP_PLUS_UCONST:
                val, i = _uleb(code, i)
                stack.append((stack.pop() + val) & mask)
            elif op == _OP_ADDR:
                if i + arch.word > len(code):
                    return None
                stack.append(int.from_bytes(code[i:i + arch.word], "little"))
                i += arch.word
            elif op == _OP_DUP:
                stack.append(stack[-1])
            elif op == _OP_DROP:
                stack.pop()
            elif op == _OP_OVER:
                stack.append(stack[-2])
            elif op == _OP_PICK:
                stack.append(stack[-1 - code[i]])
                i += 1
            elif op == _OP_SWAP:
                stack[-1], stack[-2] = stack[-2], stack[-1]
            elif op == _OP_ROT:
                stack[-1], stack[-2], stack[-3] = stack[-2], stack[-3], stack[-1]
            elif op == _OP_SKIP or op == _OP_BRA:
                delta = int.from_bytes(code[i:i + 2], "little", signed=True)
                i += 2
                if op == _OP_SKIP or stack.pop() != 0:
                    i += delta
                if i < 0:
                    return None
            elif op == _OP_NOP:
                pass
            else:
                return None
        return stack[-1] if stack else None
    except (IndexError, _BadExpr):
        return None


def unwind(regs: Mapping[int | str, int], read_mem: ReadMem, modules: FrameRules, abi: str,
           max_depth: int = 16, *, at_entry: bool = True, pac_mask: int = 0) -> list[int]:
    """Return addresses of the stopped thread, innermost first, at most max_depth.

    `regs` holds "pc" and "sp" and the other registers by DWARF number (see `Arch`).
    With `at_entry` (the engine's case: pc is the first instruction of a called function)
    nothing has been pushed yet, so the return address is the word at sp and the caller's
    sp is sp + word (the `call` instruction's effect, Intel SDM vol. 2A "CALL"); on arm64
    it is x30 and sp is the caller's (`bl`, Arm ARM C6.2.34). Later frames follow their
    CFI, or the frame-pointer chain where no CFI covers the pc. `pac_mask`: the bits
    pointer authentication signs into return addresses (arm64; 0: none), stripped from each.
    Unreadable memory ends the walk; read_mem errors other than MemoryReadError
    (the tracee exited) propagate.
    """
    arch = ARCHES[abi]
    if max_depth <= 0:
        return []
    n, mask, word = arch.nregs, arch.mask, arch.word
    sp_reg, ra_reg, fp_reg = arch.sp, arch.ra, arch.fp
    link = arch.link
    pac = pac_mask & mask
    state: list[int | None] = [None if (v := regs.get(i)) is None else v & mask for i in range(n)]
    pc = regs.get("pc", None if link else state[ra_reg])
    sp = regs.get("sp", state[sp_reg])
    if pc is None or sp is None:
        return []
    pc &= mask
    sp &= mask
    state[sp_reg] = sp
    if not link:
        state[ra_reg] = pc
    reader = _StackReader(read_mem, arch)
    read_word = reader.word
    out: list[int] = []
    exact_pc = True  # the pc to look up is not a return address (first frame, or after a signal frame)
    # the innermost frame of a link-register arch (not at entry): a leaf function keeps its
    # return address in x30 (no CFI rule for it) and may not move sp (CFA = sp)
    leaf_ok = link and not at_entry

    if at_entry:
        if link:
            ra = state[ra_reg]
        else:
            ra = read_word(sp)
            sp = (sp + word) & mask
        if ra is not None and pac:
            ra = strip_pac(ra, pac)
        if ra is None or ra == 0 or not modules.is_executable(ra):
            return out
        state[sp_reg], state[ra_reg] = sp, ra
        pc = ra
        out.append(ra)
        exact_pc = False

    frame_rule = modules.frame_rule
    is_executable = modules.is_executable
    unpack = _UNPACK[arch.fmt]
    buf, wbase = reader.window
    wlimit = len(buf) - word
    switched = False

    def switch_stacks(fp: int | None) -> tuple[int, int | None, int] | None:
        """A frame whose CFI gives no usable return address, once per walk: a function
        that moved sp to another stack before its call (Go's runtime calls the vDSO on the
        thread's system stack, g0, keeping its frame pointer on the goroutine's stack; its
        CFI describes sp, not the switch). The frame-pointer rule, allowed to change
        stacks: (caller's sp, caller's fp, return address) or None."""
        if not fp or fp % word:
            return None
        ra_fp = read_word((fp + word) & mask)
        if ra_fp and pac:
            ra_fp = strip_pac(ra_fp, pac)
        if not ra_fp or not is_executable(ra_fp):
            return None
        return (fp + 2 * word) & mask, read_word(fp), ra_fp

    while len(out) < max_depth:
        rule = frame_rule(pc if exact_pc else pc - 1)
        if rule is None:
            break
        row = rule[1]
        offsets = row.offsets if row is not None and row.max_reg < n else None
        if offsets is not None:
            # The fast path (almost every row): CFA = reg + offset, registers saved at
            # CFA + N. Only memory is read, so the state is updated in place.
            base = state[row.cfa_reg]  # type: ignore[union-attr]
            if base is None:
                break
            cfa = (base + row.cfa_offset) & mask  # type: ignore[union-attr]
            fp_before = state[fp_reg]
            if cfa > sp or (leaf_ok and cfa == sp):
                if not leaf_ok:
                    state[ra_reg] = None
                for reg, off in offsets:
                    o = cfa + off - wbase
                    if 0 <= o <= wlimit:
                        state[reg] = unpack(buf, o)[0]
                    else:
                        state[reg] = read_word((cfa + off) & mask)
                        buf, wbase = reader.window
                        wlimit = len(buf) - word
                ra_val = state[ra_reg]
                if ra_val and pac:
                    ra_val = state[ra_reg] = strip_pac(ra_val, pac)
                if ra_val and is_executable(ra_val):
                    state[sp_reg] = cfa
                    sp, pc = cfa, ra_val
                    out.append(ra_val)
                    exact_pc = row.signal_frame  # type: ignore[union-attr]
                    leaf_ok = False
                    continue
            # A CFA that does not grow the stack, or no usable return address: the end,
            # unless this frame switched stacks (above).
            if (not switched and any(reg == ra_reg for reg, _ in offsets)
                    and (sw := switch_stacks(fp_before)) is not None):
                switched = True
                sp, state[fp_reg], pc = sw
                state[sp_reg], state[ra_reg] = sp, pc
                out.append(pc)
                exact_pc = False
                continue
            break
        if row is not None:
            if row.cfa_expr is None:
                base = state[row.cfa_reg] if 0 <= row.cfa_reg < n else None
                if base is None:
                    break
                cfa = (base + row.cfa_offset) & mask
            else:
                cfa_val = eval_dwarf_expr(row.cfa_expr, state, read_word, arch)
                if cfa_val is None:
                    break
                cfa = cfa_val
            new = state.copy()
            if not leaf_ok:
                new[ra_reg] = None  # no rule for the return address column: undefined, the end
            for reg, kind, arg in row.rules:
                if reg >= n:
                    continue
                if kind == _OFFSET:
                    new[reg] = read_word((cfa + arg) & mask)  # type: ignore[operator]
                elif kind == _VAL_OFFSET:
                    new[reg] = (cfa + arg) & mask  # type: ignore[operator]
                elif kind == _UNDEFINED:
                    new[reg] = None
                elif kind == _SAME_VALUE:
                    new[reg] = state[reg]
                elif kind == _REGISTER:
                    new[reg] = state[arg] if isinstance(arg, int) and 0 <= arg < n else None
                elif kind == _EXPRESSION:
                    addr = eval_dwarf_expr(arg, state, read_word, arch, push=cfa)  # type: ignore[arg-type]
                    new[reg] = read_word(addr) if addr is not None else None
                elif kind == _VAL_EXPRESSION:
                    new[reg] = eval_dwarf_expr(arg, state, read_word, arch, push=cfa)  # type: ignore[arg-type]
            ra_val = new[ra_reg] if row.ra_reg == ra_reg else (new[row.ra_reg] if row.ra_reg < n else None)
            signal_frame = row.signal_frame
        else:
            # No CFI: the frame-pointer convention (x86_64 psABI 3.2.2, i386 psABI 2.2.2; the
            # AAPCS64 frame record): saved fp at [fp], return address at [fp + word]. The
            # caller's sp is taken as fp + 2 words: exact on x86; on arm64 a lower bound (GCC
            # puts the record at the bottom of the frame), enough for the growth check and
            # for callers whose CFA is x29-based.
            fp = state[fp_reg]
            if fp is None or fp < sp or fp % word:
                break
            cfa = (fp + 2 * word) & mask
            new = state.copy()
            new[fp_reg] = read_word(fp)
            ra_val = read_word((fp + word) & mask)
            signal_frame = False
        # The CFA is the caller's stack pointer (its value at the call site); a stack that
        # does not grow is a loop or garbage.
        if ra_val and pac:
            ra_val = strip_pac(ra_val, pac)
        if (cfa < sp or (cfa == sp and not leaf_ok)) or not ra_val or not is_executable(ra_val):
            break
        leaf_ok = False
        new[sp_reg] = cfa
        new[ra_reg] = ra_val
        state = new
        sp, pc = cfa, ra_val
        out.append(ra_val)
        exact_pc = signal_frame
    return out
