"""int3 planting without ever lifting a breakpoint: every patched instruction is executed out
of line, relocated into a slot in the vDSO's own padding, so no thread can slip past a
breakpoint while another is being handled and no single-step is needed.

The vDSO image ends well before its mapping does (about 1.5 KiB free on x86_64, 0.6 KiB on
i386, design.md); that tail accepts ptrace writes and holds the slots. Everything written is
restored byte for byte by `unplant`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from tracer.abi import Abi
from tracer.disasm import relocate, sites
from tracer.errors import TracerError
from tracer.target import Memory
from tracer.vdso import VdsoFunction, VdsoImage

__all__ = ["ENTRY", "RET", "FALL", "Bp", "Patcher", "INT3"]

ENTRY, RET, FALL = 0, 1, 2
INT3 = b"\xcc"
_MAX_INSN = 15


@dataclass(slots=True)
class Bp:
    addr: int                 # runtime_addr of the patched instruction
    kind: int                 # ENTRY, RET, FALL
    func: int                 # index into Patcher.funcs
    slot: int                 # runtime_addr of its out-of-line copy
    orig: int                 # the original first byte


@dataclass(slots=True)
class Patcher:
    image: VdsoImage
    base: int
    mapping_size: int
    funcs: list[VdsoFunction] = field(default_factory=list)
    bps: dict[int, Bp] = field(default_factory=dict)
    # (slot start, slot end, [(offset in slot, equivalent original address)])
    slots: list[tuple[int, int, list[tuple[int, int]]]] = field(default_factory=list)
    pad_start: int = 0
    pad_used: bytes = b""
    planted: bool = False
    warnings: list[str] = field(default_factory=list)

    @property
    def abi(self) -> Abi:
        return self.image.abi

    def plan(self, funcs: list[VdsoFunction]) -> None:
        """Decide every patch site and its slot for `funcs` (nothing is written yet)."""
        self.funcs = list(funcs)
        self.bps = {}
        self.slots = []
        self.warnings = []
        data, base = self.image.data, self.base
        pad = (self.image.image_size + 15) & ~15
        self.pad_start = pad
        if any(data[pad:self.mapping_size]):
            raise TracerError("the vDSO's padding is not empty (another tool patched it?): "
                              "refusing to write there")
        blob = bytearray()
        ret_slots: dict[bytes, int] = {}

        def add_slot(code: bytes, bounds: list[tuple[int, int]]) -> int:
            addr = base + pad + len(blob)
            blob.extend(code)
            while len(blob) % 4:
                blob.append(0xCC)           # never executed; keeps slots apart
            self.slots.append((addr, addr + len(code), bounds))
            return addr

        for idx, f in enumerate(self.funcs):
            s = sites(self.image, f)
            if s.escapes:
                self.warnings.append(f"{f.symbol} jumps out of its body: some returns may be "
                                     "missed")
            for off, kind in [(s.entry, ENTRY)] + [(o, FALL) for o in s.fallbacks] + \
                    [(o, RET) for o in s.rets]:
                if base + off in self.bps:
                    continue
                code = data[off:off + _MAX_INSN]
                if kind == RET:
                    # One shared slot per distinct ret encoding (a ret is position
                    # independent); a thread parked there maps back to any ret site.
                    raw, _ = relocate(self.abi, code, base + off, 0)
                    if raw not in ret_slots:
                        ret_slots[raw] = add_slot(raw, [(0, base + off)])
                    slot = ret_slots[raw]
                else:
                    slot = base + pad + len(blob)
                    try:
                        raw, bounds = relocate(self.abi, code, base + off, slot)
                    except ValueError as e:
                        raise TracerError(f"cannot patch {f.symbol}+{off - f.image_offset:#x}: "
                                          f"{e}") from e
                    add_slot(raw, bounds)
                self.bps[base + off] = Bp(base + off, kind, idx, slot, data[off])
        if pad + len(blob) > self.mapping_size:
            raise TracerError(f"not enough room in the vDSO's padding for {len(self.funcs)} "
                              "functions: trace fewer with -e")
        self.pad_used = bytes(blob)

    def plant(self, mem: Memory) -> None:
        """Write the slots first, then the int3s: a thread never sees a half-made patch."""
        if self.pad_used:
            mem.write(self.base + self.pad_start, self.pad_used)
        for bp in self.bps.values():
            mem.write(bp.addr, INT3)
        self.planted = True

    def unplant(self, mem: Memory) -> None:
        """Put back every original byte, the padding included."""
        for bp in self.bps.values():
            mem.write(bp.addr, bytes((bp.orig,)))
        if self.pad_used:
            mem.write(self.base + self.pad_start, bytes(len(self.pad_used)))
        self.planted = False

    def in_slots(self, pc: int) -> bool:
        lo = self.base + self.pad_start
        return lo <= pc < lo + len(self.pad_used)

    def pc_back(self, pc: int) -> int | None:
        """The original address equivalent to a pc at an instruction boundary inside a slot;
        None when pc is not at such a boundary (step the thread on until it is)."""
        for start, end, bounds in self.slots:
            if start <= pc < end:
                for off, orig in bounds:
                    if start + off == pc:
                        return orig
                return None
        return None
